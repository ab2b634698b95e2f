"""What ``examples/train_sae.py`` reads from a transformer for the families that are not SAEs, and how their
output goes back into the model's forward.

- A **transcoder** (``--arch *_transcoder``, ``--layer l``) reads one block's MLP input and predicts that MLP's
  output; a **cross-layer transcoder** (CLT, ``--arch *_clt``) reads every block's MLP input and predicts every
  block's MLP output, [B, L, D] each; a **crosscoder** (``--arch *_crosscoder --layers 1,3,5``) reconstructs the
  residual stream entering the chosen blocks (``hidden_states[l]``, as the SAE's ``--layer``), [B, L, D].
- The MLP, by model family: GPT-2 (and any block with an ``mlp`` module: Llama, Mistral, ...): the input is
  ``mlp``'s input (GPT-2: ``ln_2``'s output), the output is ``mlp``'s output, before the residual add.
  BERT (MiniLM): the input is ``intermediate``'s input (the attention block's output, after its LayerNorm),
  the output is ``output.dense``'s output, before the dropout, the residual add and ``output.LayerNorm``.
  TransformerLens names them ``blocks.{l}.ln2.hook_normalized`` (BERT: ``blocks.{l}.ln1.hook_normalized``) and
  ``blocks.{l}.hook_mlp_out``.
- The first position of each sequence (the BOS / CLS token) is not harvested and not spliced, as for SAEs.
- Splicing: the MLP outputs at positions 1: are replaced while the model runs, a transcoder's through
  ``flash_sae.attach`` (read at the MLP's input, written at its output), a CLT's by the hooks here; a CLT's output for
  block l is computed from the MLP inputs of blocks 0..l as they occur in the spliced forward (each already
  downstream of the earlier blocks' replacements), so the hooks run in layer order.

Everything here runs without gradients; the harvest stops the forward after the last block it reads (the
deeper blocks, the final norm and the LM head never run).
"""

import contextlib
import dataclasses
import sys
from typing import Callable, NamedTuple

import torch

MLP_FAMILIES = ("transcoder", "clt")  # the families that read and replace MLPs


class _Stop(Exception):
    """Raised by a harvest hook once it holds everything it reads: the deeper blocks never run."""


class MLPSite(NamedTuple):
    """One block's MLP as two hook points: ``reads``' first input is the MLP's input, ``writes``' output is the
    MLP's output (the same module for GPT-2's ``mlp``)."""

    layer: int
    reads: torch.nn.Module
    writes: torch.nn.Module
    style: str  # "mlp" (GPT-2, Llama) or "bert": which TransformerLens names apply


def mlp_site(block: torch.nn.Module, layer: int) -> MLPSite:
    """Block ``layer``'s MLP (see the module docstring for what is read and written per model family)."""
    if isinstance(getattr(block, "mlp", None), torch.nn.Module):
        return MLPSite(layer, block.mlp, block.mlp, "mlp")
    output = getattr(block, "output", None)
    if isinstance(getattr(block, "intermediate", None), torch.nn.Module) and isinstance(
        getattr(output, "dense", None), torch.nn.Module
    ):
        return MLPSite(layer, block.intermediate, output.dense, "bert")
    raise SystemExit(
        f"block {layer} ({type(block).__name__}) has neither an `mlp` module (GPT-2, Llama) nor BERT's "
        "`intermediate` and `output.dense`: the transcoder families cannot find its MLP"
    )


def mlp_hook_names(site: MLPSite) -> tuple[str, str]:
    """TransformerLens's (and SAELens's) names of the MLP's input and output at ``site``."""
    norm = "ln1" if site.style == "bert" else "ln2"  # TransformerLens's BERT block normalises after attention with ln1
    return f"blocks.{site.layer}.{norm}.hook_normalized", f"blocks.{site.layer}.hook_mlp_out"


def _first_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def harvest_mlps(model, ids: torch.Tensor, sites: list[MLPSite], device) -> torch.Tensor:
    """[n * (context - 1), 2, L, D] fp32: each site's MLP input (``[:, 0]``) and output (``[:, 1]``), the
    first position dropped; ``sites`` in layer order. The forward stops after the last site's MLP."""
    inputs, outputs, hooks = {}, {}, []

    def read(i):
        return lambda module, args, kwargs: inputs.__setitem__(i, _first_input(args, kwargs))

    def write(i):
        def hook(module, args, output):
            outputs[i] = _output_tensor(output)
            if i == len(sites) - 1:
                raise _Stop

        return hook

    for i, site in enumerate(sites):
        hooks.append(site.reads.register_forward_pre_hook(read(i), with_kwargs=True))
        hooks.append(site.writes.register_forward_hook(write(i)))
    try:
        model(input_ids=ids.to(device))
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    if len(outputs) != len(sites):
        raise RuntimeError(f"the MLPs of blocks {[s.layer for s in sites]} did not all run in {type(model).__name__}")
    pairs = [torch.stack([inputs[i], outputs[i]], dim=2) for i in range(len(sites))]  # [n, T, 2, D] each
    rows = torch.stack(pairs, dim=3)[:, 1:]  # [n, T - 1, 2, L, D]
    return rows.reshape(-1, *rows.shape[2:]).float()


@torch.no_grad()
def harvest_residuals(model, ids: torch.Tensor, blocks, layers: tuple[int, ...], device) -> torch.Tensor:
    """[n * (context - 1), L, D] fp32: ``hidden_states[l]`` for each l of ``layers``, the first position dropped.

    Each block's input is taken by a forward pre-hook and the forward stops after the deepest one; a layer
    equal to the number of blocks (the last hidden state) runs the whole model instead."""
    ids = ids.to(device)
    if max(layers) >= len(blocks):
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
        h = torch.stack([states[layer] for layer in layers], dim=2)
    else:
        seen, hooks = {}, []

        def take(layer):
            def hook(module, args, kwargs):
                seen[layer] = _first_input(args, kwargs)
                if layer == max(layers):
                    raise _Stop

            return hook

        for layer in sorted(set(layers)):
            hooks.append(blocks[layer].register_forward_pre_hook(take(layer), with_kwargs=True))
        try:
            model(input_ids=ids)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        if len(seen) != len(set(layers)):
            raise RuntimeError(f"blocks {sorted(set(layers))} of {type(model).__name__} did not all run")
        h = torch.stack([seen[layer] for layer in layers], dim=2)
    h = h[:, 1:]
    return h.reshape(-1, *h.shape[2:]).float()


# A replacement: ``replace(i, xs)`` -> the rows [N, D] that site i's MLP output becomes, given the MLP inputs
# xs[0..i] (each [N, D], positions 1: of every sequence) of this forward.
Replacement = Callable[[int, list], torch.Tensor]


@contextlib.contextmanager
def spliced(sites: list[MLPSite], replace: Replacement | None):
    """While open, each site's MLP output at positions 1: is ``replace(i, xs)`` (``None``: zeros, the
    zero ablation); position 0 keeps the model's own. The hooks read each MLP's input as it occurs in the
    spliced forward, so site i's replacement sees the effect of the earlier sites' replacements."""
    inputs, hooks = {}, []

    def read(i):
        return lambda module, args, kwargs: inputs.__setitem__(i, _first_input(args, kwargs)[:, 1:])

    def write(i):
        def hook(module, args, output):
            out = _output_tensor(output)
            rest = out[:, 1:]
            if replace is None:
                new = torch.zeros_like(rest)
            else:
                xs = [inputs[j].reshape(-1, inputs[j].shape[-1]) for j in range(i + 1)]
                new = replace(i, xs).to(out.dtype).reshape(rest.shape)
            out = torch.cat([out[:, :1], new], dim=1)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    for i, site in enumerate(sites):
        hooks.append(site.reads.register_forward_pre_hook(read(i), with_kwargs=True))
        hooks.append(site.writes.register_forward_hook(write(i)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def next_token_ce(model, ids: torch.Tensor, device) -> float:
    """The causal LM's mean next-token cross-entropy, over the predictions made from positions 1..T-2 (the
    positions a splice replaces; position 0, the BOS token, is never replaced)."""
    ids = ids.to(device)
    logits = model(input_ids=ids).logits[:, 1:-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1)).item()


def ce_summary(losses: dict) -> dict:
    """The CE losses clean, zero-ablated and spliced, and the fraction recovered, (zero - spliced) / (zero - clean)
    (NaN when zero = clean)."""
    gap = losses["zero"] - losses["clean"]
    recovered = (losses["zero"] - losses["spliced"]) / gap if gap != 0 else float("nan")
    return {
        "ce_clean": losses["clean"],
        "ce_zero_ablated": losses["zero"],
        "ce_spliced": losses["spliced"],
        "ce_loss_recovered": recovered,
    }


@torch.no_grad()
def ce_recovered(model, ids: torch.Tensor, sites: list[MLPSite], replace: Replacement, device) -> dict:
    """The CE loss clean, with the sites' MLP outputs zero-ablated, and with ``replace``'s spliced in, and the
    fraction recovered (``ce_summary``). For any replacement (a CLT's reads every earlier block); a transcoder
    or an SAE goes through ``flash_sae.attach`` instead (``ce_recovered_attached``)."""
    losses = {"clean": next_token_ce(model, ids, device)}
    for mode, how in (("zero", None), ("spliced", replace)):
        with spliced(sites, how):
            losses[mode] = next_token_ce(model, ids, device)
    return ce_summary(losses)


def package_of(module):
    """The loaded flash-sae package a module's class comes from (its ``attach`` and ``Hook``)."""
    return sys.modules[type(module).__module__.split(".modules.")[0]]


def module_name(model, module) -> str:
    """``module``'s dotted name in ``model`` (``model.named_modules()``): a hookpoint."""
    return next(name for name, m in model.named_modules() if m is module)


@torch.no_grad()
def ce_recovered_attached(model, ids: torch.Tensor, hooks: dict, device) -> dict:
    """The CE loss clean, with the hookpoints of ``hooks`` ({hookpoint: flash_sae.Hook}) zero-ablated and with
    the hooks attached (``flash_sae.attach``), and the fraction recovered (``ce_summary``)."""
    fs = package_of(next(iter(hooks.values())).module)
    losses = {"clean": next_token_ce(model, ids, device)}
    zeroed = {point: dataclasses.replace(hook, zero_ablate=True) for point, hook in hooks.items()}
    for mode, how in (("zero", zeroed), ("spliced", hooks)):
        with fs.attach(model, how):
            losses[mode] = next_token_ce(model, ids, device)
    return ce_summary(losses)


@dataclasses.dataclass(frozen=True)
class Source:
    """What a family's module reads from the model and how a buffer row feeds it.

    Rows (one per token): a transcoder's [2, D] (MLP input, output), a CLT's [2, L, D] (every block's MLP
    input, output), a crosscoder's [L, D] (the residual streams). ``layers``: the transcoder's block, all
    blocks for a CLT, the crosscoder's ``hidden_states`` indices."""

    family: str
    blocks: torch.nn.ModuleList
    layers: tuple[int, ...]

    @property
    def sites(self) -> list[MLPSite]:
        return [mlp_site(self.blocks[layer], layer) for layer in self.layers]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def harvest(self, model, ids: torch.Tensor, device) -> torch.Tensor:
        """The rows of ``ids``' tokens (first positions dropped), fp32."""
        if self.family == "crosscoder":
            return harvest_residuals(model, ids, self.blocks, self.layers, device)
        rows = harvest_mlps(model, ids, self.sites, device)  # [N, 2, L, D]
        return rows[:, :, 0] if self.family == "transcoder" else rows

    def model_input(self, rows: torch.Tensor) -> torch.Tensor:
        """What the module's ``forward`` and ``encode`` read: x [N, D] or xs [N, L, D]."""
        return rows if self.family == "crosscoder" else rows[:, 0].contiguous()

    def target(self, rows: torch.Tensor) -> torch.Tensor:
        """What the module predicts: y [N, D] or ys [N, L, D] (a crosscoder's is its input)."""
        return rows if self.family == "crosscoder" else rows[:, 1].contiguous()

    def loss_args(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``module.loss``'s arguments: (x, y), (xs, ys) or (xs,)."""
        if self.family == "crosscoder":
            return (rows,)
        return self.model_input(rows), self.target(rows)

    def replacement(self, sae, factor: float, dtype: torch.dtype) -> Replacement:
        """The module as a splice: site i's MLP output from the inputs xs[0..i] (raw activations; the module
        reads them times ``factor`` in ``dtype`` and its prediction is divided by ``factor``).

        A CLT's output at block i reads only blocks 0..i (its decoder is causal), so the inputs of the blocks
        after i, not yet computed in the spliced forward, enter as zeros and change nothing at block i
        (the module's inference rule is per layer: TopK per layer, a threshold)."""
        if self.family not in MLP_FAMILIES:
            raise ValueError(f"a {self.family} replaces no MLP")

        def module_in(x):
            return (x.float() * factor).to(dtype)

        if self.family == "transcoder":
            return lambda i, xs: sae(module_in(xs[-1])).float() / factor

        def clt(i, xs):
            stacked = xs[0].new_zeros(xs[0].shape[0], self.n_layers, xs[0].shape[-1])
            stacked[:, : i + 1] = torch.stack(xs, dim=1)
            return sae(module_in(stacked))[:, i].float() / factor

        return clt

    def hook_names(self) -> dict:
        """The run's SAELens / TransformerLens metadata for the MLP families: the input and output hooks."""
        names = [mlp_hook_names(site) for site in self.sites]
        if self.family == "transcoder":
            return {"hook_name": names[0][0], "hook_name_out": names[0][1], "hf_mlp_layer": self.layers[0]}
        return {"hook_names": [n[0] for n in names], "hook_names_out": [n[1] for n in names]}


def fvu_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """FVU (sum of squared errors over the target's total variance about its mean over the rows) and explained
    variance of ``pred`` [N, D] or [N, L, D]; for [N, L, D], ``layer_fvu``: each layer's FVU, a list."""
    r = target - pred
    out = {
        "fvu": (r.pow(2).sum() / (target - target.mean(0)).pow(2).sum()).item(),
        "explained_variance": (1 - r.var(0).sum() / target.var(0).sum()).item(),
    }
    if target.dim() == 3:
        per_layer = r.pow(2).sum((0, 2)) / (target - target.mean(0)).pow(2).sum((0, 2))
        out["layer_fvu"] = per_layer.tolist()
    return out


@torch.no_grad()
def evaluate_replacement(sae, model, causal: bool, source: Source, ids: torch.Tensor, factor: float, device, dtype):
    """Held-out metrics of a transcoder, CLT or crosscoder: L0, FVU, explained variance, dead fraction; per layer
    (CLT, crosscoder) ``layer_fvu`` and (where the step reports it: a CLT) ``layer_l0``; for transcoders and CLTs
    on a causal LM the CE loss clean, MLP outputs zero-ablated, spliced, and the fraction recovered."""
    rows = source.harvest(model, ids, device) * factor
    step = sae.loss(*(t.to(dtype) for t in source.loss_args(rows)))  # eval mode: no dead-count update
    pred = sae(source.model_input(rows).to(dtype)).float()
    out = {"l0": step.l0.item(), **fvu_metrics(pred, source.target(rows)), "dead_fraction": sae.dead_fraction().item()}
    if source.family != "transcoder":
        out["layers"] = list(source.layers)
    if getattr(step, "layer_l0", None) is not None:
        out["layer_l0"] = step.layer_l0.float().tolist()
    if causal and source.family == "transcoder":  # the MLP's input read, its output written, positions 1:
        site = source.sites[0]
        hook = package_of(sae).Hook(
            sae, output=module_name(model, site.writes), positions=slice(1, None), scale=factor
        )  # fmt: skip
        out.update(ce_recovered_attached(model, ids, {module_name(model, site.reads) + ":input": hook}, device))
    elif causal and source.family == "clt":
        out.update(ce_recovered(model, ids, source.sites, source.replacement(sae, factor, dtype), device))
    return out
