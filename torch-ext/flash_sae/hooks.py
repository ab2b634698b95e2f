"""SAEs and transcoders inside a model: ``attach`` splices, edits and records their codes at named hookpoints.

    with flash_sae.attach(model, {"transformer.h.3:input": sae}, record=True, ablate=[17]) as session:
        logits = model(input_ids).logits
    session.codes["transformer.h.3:input"]      # a SparseCode: the code of every row the hook saw

A hookpoint is a submodule's dotted name as ``model.named_modules()`` gives it (``encoder.layer.3``,
``model.layers.5.mlp``): its output (the first element where the module returns a tuple, as
Hugging Face blocks do), or with the suffix ``:input`` its first input (the first positional argument,
else the ``hidden_states`` keyword). An SAE reads and writes one hookpoint; a transcoder reads its
hookpoint and writes ``Hook.output`` (an MLP's input and output: ``"transformer.h.0.mlp:input"`` and
``"transformer.h.0.mlp"``).

At each forward the hook flattens the activation to rows [N, D], casts them to the module's dtype and
device (times ``scale``), encodes them with the module's ``sparse_code`` (the sparse code only: no [N, F]
tensor), and writes back, cast to the activation's dtype:

- ``splice`` (default): the reconstruction x_hat with the edits;
- ``splice`` with ``keep_error``: x + (x_hat_edited - x_hat), the activation with only the edits' effect
  (without edits the hook writes nothing and the model's output is bit-identical);
- ``zero_ablate``: zeros (the baseline of the CE loss recovered);
- ``splice=False``: nothing (record only).

The edits act on the code: ``ablate`` sets latents to 0, ``clamp`` sets latents to values (whether or not
they fired), and ``steer`` adds vectors (a latent's decoder row or a given [D_out] vector, times a scale).
Their effect is the sparse sum (new value - code value) * W_dec[f] over the edited latents, O(N*K*E + N*E*D).
Leaving the ``with`` block, normally or by an exception, removes every hook.
"""

import contextlib
import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._validation import is_int, is_real
from .architectures import ARCHITECTURES
from .results import SparseCode

INPUT_SUFFIX = ":input"
FAMILIES = ("sae", "transcoder")  # the registry's families a hookpoint takes


@dataclasses.dataclass(frozen=True)
class Hook:
    """What one hookpoint does with its module (the options are validated when ``attach`` opens).

    Attributes:
        module: an SAE or transcoder module (an ``ARCHITECTURES`` entry of family ``"sae"`` or
            ``"transcoder"``); put a BatchTopK module in eval mode for its inference threshold.
        splice: write the module's output back into the model (False: record only).
        keep_error: with ``splice``, add the error term back: the written activation is
            x + (x_hat_edited - x_hat), so only the edits change the model's output.
        zero_ablate: write zeros instead (the CE-loss-recovered baseline); no edits with it.
        ablate: latent ids whose value becomes 0.
        clamp: {latent id: value}: the latent's value becomes ``value`` in every row.
        steer: (latent id or a [D_out] tensor, scale) pairs: scale * W_dec[latent] or scale * vector
            added to every row's output.
        record: keep the code of the last forward in ``HookSession.codes`` (a ``SparseCode``).
        output: a transcoder's output hookpoint (required for a transcoder; an SAE writes where it reads).
        positions: a slice of the activation's second-to-last axis (the sequence of a [batch, seq, D]
            activation) that the hook reads and writes; None: every position.
        scale: the module reads the activation times ``scale`` (the ``activation_scale`` it was trained
            with) and its output is divided by ``scale``.
        capacity_per_row: a variable-length code's slots per row, which makes the encode sync-free
            (entries past it are dropped); None counts first (one host sync per forward). TopK: None.
    """

    module: nn.Module
    splice: bool = True
    keep_error: bool = False
    zero_ablate: bool = False
    ablate: Sequence[int] = ()
    clamp: Mapping[int, float] = dataclasses.field(default_factory=dict)
    steer: Sequence[tuple] = ()
    record: bool = False
    output: str | None = None
    positions: slice | None = None
    scale: float = 1.0
    capacity_per_row: int | None = None


class HookSession:
    """What ``attach`` yields: ``codes`` maps each recording hookpoint to the ``SparseCode`` of its last
    forward (rows: the activation's rows at ``positions``, flattened in order), and ``hooks`` the
    validated ``Hook`` of each hookpoint."""

    def __init__(self, hooks: dict):
        self.hooks = hooks
        self.codes: dict[str, SparseCode] = {}


class Edits:
    """A hookpoint's edits as tensors on the module's device: the edited latents, their new values, and
    the steering sum."""

    def __init__(self, hook: Hook, W_dec: torch.Tensor):
        ids = [int(f) for f in hook.ablate] + [int(f) for f in hook.clamp]
        values = [0.0] * len(hook.ablate) + [float(v) for v in hook.clamp.values()]
        device = W_dec.device
        self.ids = torch.tensor(ids, dtype=torch.int64, device=device)
        self.values = torch.tensor(values, dtype=torch.float32, device=device)
        self.steer = None
        for what, scale in hook.steer:
            row = W_dec[int(what)] if is_int(what) else what.to(device)
            add = float(scale) * row.detach().float()
            self.steer = add if self.steer is None else self.steer + add
        self.any = bool(ids) or self.steer is not None

    def delta(self, code: SparseCode, W_dec: torch.Tensor, rows: int) -> torch.Tensor | None:
        """[rows, D_out] fp32: the edits' effect on the output, sum over edited latents of (new - current)
        * W_dec[f], plus the steering; None without edits."""
        if not self.any:
            return None
        out = torch.zeros(rows, W_dec.shape[1], dtype=torch.float32, device=W_dec.device)
        if self.ids.numel():
            current = code_values_at(code, self.ids, rows)
            out = out + (self.values - current) @ W_dec.detach()[self.ids].float()
        return out if self.steer is None else out + self.steer


def code_values_at(code: SparseCode, ids: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, E] fp32: each row's value of latents ``ids`` [E] in ``code`` (0 where absent). A latent
    appears at most once per row, so each sum has one term at most: exact and order-free."""
    match = code.indices.unsqueeze(-1) == ids  # [B, K, E] or [S, E]
    vals = code.vals.float().unsqueeze(-1) * match
    if code.row_offsets is None:
        return vals.sum(1)
    slots = torch.arange(code.vals.shape[0], device=ids.device)
    row = (torch.searchsorted(code.row_offsets, slots, right=True) - 1).clamp(0, rows - 1)
    return torch.zeros(rows, ids.shape[0], dtype=torch.float32, device=ids.device).index_add_(0, row, vals)


def module_family(module) -> str:
    """The family, ``"sae"`` or ``"transcoder"``, of the first registered architecture in ``module``'s class
    hierarchy; anything else is a ValueError naming ``module``."""
    by_class = {arch.module: arch.family for arch in ARCHITECTURES.values()}
    family = next((by_class[c] for c in type(module).__mro__ if c in by_class), None)
    if family not in FAMILIES:
        what = f"a {family} module" if family else type(module).__name__
        raise ValueError(
            f"module must be an SAE or transcoder module (a registered architecture of family 'sae' or "
            f"'transcoder'), got {what}"
        )
    return family


def resolve(model: nn.Module, point: str, modules: dict) -> tuple[nn.Module, bool]:
    """(submodule, reads its input) of hookpoint ``point``; an unknown name is a ValueError listing the
    close matches."""
    if not isinstance(point, str):
        raise ValueError(f"hookpoint must be a str (a submodule's dotted name), got {point!r}")
    name, at_input = (point[: -len(INPUT_SUFFIX)], True) if point.endswith(INPUT_SUFFIX) else (point, False)
    if name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; see model.named_modules()"
        raise ValueError(f"hookpoint {point!r}: {type(model).__name__} has no submodule named {name!r}{hint}")
    return modules[name], at_input


def check_hook(point: str, hook: Hook, family: str) -> None:
    """Every option of ``hook`` at ``point``; a ValueError names the option."""
    F, d_out = hook.module.n_features, hook.module.d_out
    for name in ("splice", "keep_error", "zero_ablate", "record"):
        if not isinstance(getattr(hook, name), bool):
            raise ValueError(f"{point}: {name} must be a bool, got {getattr(hook, name)!r}")
    ids = list(hook.ablate) if isinstance(hook.ablate, Sequence) and not isinstance(hook.ablate, str) else None
    if ids is None or any(not is_int(f) or not 0 <= f < F for f in ids):
        raise ValueError(f"{point}: ablate must be a list of latent ids in [0, {F}), got {hook.ablate!r}")
    if not isinstance(hook.clamp, Mapping) or any(
        not is_int(f) or not 0 <= f < F or not is_real(v) or not math.isfinite(v) for f, v in hook.clamp.items()
    ):
        raise ValueError(f"{point}: clamp must map latent ids in [0, {F}) to finite numbers, got {hook.clamp!r}")
    if set(ids) & set(hook.clamp):
        raise ValueError(f"{point}: clamp and ablate name the same latents {sorted(set(ids) & set(hook.clamp))}")
    if not isinstance(hook.steer, Sequence) or any(not _is_steer(s, F, d_out) for s in hook.steer):
        raise ValueError(
            f"{point}: steer must be a list of (latent id in [0, {F}) or a [{d_out}] float tensor, scale) pairs, "
            f"got {hook.steer!r}"
        )
    edits = bool(ids or hook.clamp or hook.steer)
    if edits and (hook.zero_ablate or not hook.splice):
        which = "zero_ablate" if hook.zero_ablate else "splice"
        raise ValueError(f"{point}: ablate, clamp and steer write into the model: {which} allows none")
    if hook.keep_error and (hook.zero_ablate or not hook.splice):
        raise ValueError(f"{point}: keep_error needs splice=True and zero_ablate=False")
    if hook.positions is not None and not isinstance(hook.positions, slice):
        raise ValueError(f"{point}: positions must be a slice or None, got {hook.positions!r}")
    if not is_real(hook.scale) or not math.isfinite(hook.scale) or not hook.scale > 0:
        raise ValueError(f"{point}: scale must be a finite number > 0, got {hook.scale!r}")
    cap = hook.capacity_per_row
    if cap is not None and (hook.module.fixed_width_code or not is_int(cap) or cap < 1):
        what = "None for a TopK module" if hook.module.fixed_width_code else "a positive int or None"
        raise ValueError(f"{point}: capacity_per_row must be {what}, got {cap!r}")
    if (family == "transcoder") != (hook.output is not None):
        raise ValueError(
            f"{point}: output names a transcoder's output hookpoint: required for a transcoder, None for an SAE "
            f"(which writes where it reads); got {hook.output!r} for a {family}"
        )


def _is_steer(entry, F: int, d_out: int) -> bool:
    if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not is_real(entry[1]):
        return False
    what = entry[0]
    if is_int(what):
        return 0 <= what < F
    return isinstance(what, torch.Tensor) and what.is_floating_point() and tuple(what.shape) == (d_out,)


def read_activation(point: str, args, kwargs, output, at_input: bool) -> torch.Tensor:
    """The activation a hook sees: the first input (``hidden_states`` as a keyword) or the output (the first
    element of a tuple)."""
    if at_input:
        act = args[0] if args else kwargs.get("hidden_states")
    else:
        act = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(act, torch.Tensor) or not act.is_floating_point() or act.ndim < 1:
        where = "first input" if at_input else "output (or its first element)"
        raise ValueError(f"hookpoint {point!r}: its {where} is not a float tensor ({type(act).__name__})")
    return act


def write_activation(args, kwargs, output, at_input: bool, new: torch.Tensor):
    """What a hook returns to put ``new`` in place of the activation ``read_activation`` read."""
    if at_input:
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
    if isinstance(output, (tuple, list)):
        return type(output)((new, *output[1:]))
    return new


EMPTY = object()  # a read hookpoint that saw no rows: its write hookpoint writes nothing


class Site:
    """One hookpoint's work: encode the rows it reads, record, and compute what it writes."""

    def __init__(self, point: str, hook: Hook, family: str, session: HookSession):
        self.point, self.hook, self.family, self.session = point, hook, family, session
        self.edits = Edits(hook, hook.module.W_dec)
        self.pending = None  # a transcoder's (code, x, rows) between its input and output hookpoints

    def rows_of(self, act: torch.Tensor, width: int, what: str) -> torch.Tensor:
        if act.ndim < 2 or act.shape[-1] != width:
            raise ValueError(
                f"hookpoint {what!r}: the activation has shape {tuple(act.shape)}, but the "
                f"{type(self.hook.module).__name__}'s width there is {width} (its last dim)"
            )
        sel = act if self.hook.positions is None else act[..., self.hook.positions, :]
        return sel.reshape(-1, width)

    def encode(self, act: torch.Tensor):
        """(code, x as the module reads it) of the rows at the read hookpoint; records the code."""
        m = self.hook.module
        rows = self.rows_of(act, m.d_model, self.point)
        x = (rows.float() * self.hook.scale).to(dtype=m.W_dec.dtype, device=m.W_dec.device)
        cap = self.hook.capacity_per_row
        code = m.sparse_code(x, capacity=None if cap is None else cap * x.shape[0])
        if self.hook.record:
            self.session.codes[self.point] = code
        return code, x

    def written(self, act: torch.Tensor, code: SparseCode, x: torch.Tensor, what: str) -> torch.Tensor | None:
        """The activation ``act`` at the write hookpoint with the hook's rows replaced; None: unchanged."""
        hook, m = self.hook, self.hook.module
        target = self.rows_of(act, m.d_out, what)
        if target.shape[0] != x.shape[0]:
            raise ValueError(
                f"hookpoint {what!r}: {target.shape[0]} rows, but {self.point!r} gave the transcoder {x.shape[0]}"
            )
        delta = self.edits.delta(code, m.W_dec, x.shape[0])
        if hook.zero_ablate:
            new = torch.zeros_like(target)
        elif hook.keep_error:
            if delta is None:
                return None
            new = target + (delta / hook.scale).to(device=target.device, dtype=target.dtype)
        else:
            with torch.no_grad():
                pred = m.decode(*(t for t in code if t is not None))
                if getattr(m, "W_skip", None) is not None:
                    pred = torch.addmm(pred, x, m.W_skip.T)
            pred = pred.float() if delta is None else pred.float() + delta
            new = (pred / hook.scale).to(device=target.device, dtype=target.dtype)
        if hook.positions is None:
            return new.reshape(act.shape)
        out = act.clone()
        out[..., hook.positions, :] = new.reshape(out[..., hook.positions, :].shape)
        return out

    def at_read(self, args, kwargs, output, at_input: bool):
        act = read_activation(self.point, args, kwargs, output, at_input)
        if self.rows_of(act, self.hook.module.d_model, self.point).shape[0] == 0:
            self.pending = EMPTY  # no rows at these positions (one new token past ``positions``' start, say)
            return None
        code, x = self.encode(act)
        if not self.hook.splice:
            return None
        if self.family == "transcoder":
            self.pending = (code, x)
            return None
        new = self.written(act, code, x, self.point)
        return None if new is None else write_activation(args, kwargs, output, at_input, new)

    def at_write(self, args, kwargs, output, at_input: bool):
        if self.pending is None:
            raise ValueError(
                f"hookpoint {self.hook.output!r} ran before the transcoder's input hookpoint {self.point!r} in "
                "this forward: a transcoder reads its input first"
            )
        pending, self.pending = self.pending, None
        if pending is EMPTY:
            return None
        code, x = pending
        act = read_activation(self.hook.output, args, kwargs, output, at_input)
        new = self.written(act, code, x, self.hook.output)
        return None if new is None else write_activation(args, kwargs, output, at_input, new)


def _register(module: nn.Module, at_input: bool, fn) -> torch.utils.hooks.RemovableHandle:
    if at_input:
        return module.register_forward_pre_hook(lambda mod, args, kwargs: fn(args, kwargs, None, True),
                                                with_kwargs=True)  # fmt: skip
    return module.register_forward_hook(lambda mod, args, output: fn(args, {}, output, False))


@contextlib.contextmanager
def attach(model: nn.Module, saes: Mapping, **options):
    """Attaches SAE and transcoder modules to ``model`` at named hookpoints while the ``with`` block runs.

    Args:
        model: any ``torch.nn.Module`` (a ``transformers`` model, say), in any dtype and on any device
            (the hooks cast the activations to each module's dtype and device, and back).
        saes: {hookpoint: a module or a ``Hook``}. A hookpoint is a submodule's dotted name
            (``model.named_modules()``), its output, or with the suffix ``:input`` its first input.
        options: ``Hook``'s fields for the entries given as bare modules (``splice``, ``keep_error``,
            ``zero_ablate``, ``ablate``, ``clamp``, ``steer``, ``record``, ``output``, ``positions``,
            ``scale``, ``capacity_per_row``).

    Yields:
        a ``HookSession``: ``session.codes[hookpoint]`` is the ``SparseCode`` of the last forward at
        each hookpoint with ``record`` (vals and indices [N, k] for TopK, variable length otherwise).

    A bad hookpoint (with the close matches), an unknown option, a module of another family or a bad
    option is a ValueError before any hook is registered; an activation whose last dim is not the
    module's width is a ValueError naming the hookpoint at the first forward. Every hook is removed
    when the block exits, normally or by an exception.
    """
    fields = {f.name for f in dataclasses.fields(Hook)} - {"module"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"options {unknown} are not Hook fields ({sorted(fields)})")
    if not isinstance(saes, Mapping) or not saes:
        raise ValueError(f"saes must be a non-empty {{hookpoint: module or Hook}} mapping, got {saes!r}")
    modules = dict(model.named_modules())
    hooks, plan = {}, []
    for point, entry in saes.items():
        if isinstance(entry, Hook):
            if options:
                raise ValueError(f"{point}: options apply to bare modules; give a Hook its own options instead")
            hook = entry
        else:
            hook = Hook(entry, **options)
        family = module_family(hook.module)
        reads = resolve(model, point, modules)
        check_hook(point, hook, family)
        writes = resolve(model, hook.output, modules) if hook.output is not None else None
        hooks[point] = hook
        plan.append((point, hook, family, reads, writes))
    session = HookSession(hooks)
    handles = []
    try:
        for point, hook, family, (reader, read_in), writes in plan:
            site = Site(point, hook, family, session)
            handles.append(_register(reader, read_in, site.at_read))
            if writes is not None and hook.splice:
                handles.append(_register(writes[0], writes[1], site.at_write))
        yield session
    finally:
        for handle in handles:
            handle.remove()
