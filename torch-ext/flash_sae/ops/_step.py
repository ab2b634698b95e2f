"""What the fused SAE steps of every family share (a private module of ``ops``, not an op)."""

from typing import NamedTuple

import torch

from .._registry import placeholder, register_op
from .._validation import check_encoder_args, check_same_device, check_same_dtype, check_step_args, check_tensor
from ..primitives.gather import gather_residual
from ..primitives.step_backward import StepTensors, mse_step_backward, target_grad
from ..results import SparseCode, code_l0, total_variance
from ._dead import DeadLossSpec, backward_with_dead_loss, dead_columns_for, dead_fakes, dead_outputs
from ._matryoshka import matryoshka_levels_bwd, matryoshka_levels_fwd


def check_target_step_args(x, W_enc, b_enc, W_dec, b_dec, target, k) -> tuple[int, int, int]:
    """A step's arguments when it reconstructs a separate ``target`` (a transcoder): x [B, D_in] is
    encoded as it is; W_dec [F, D_out], b_dec [D_out] and target [B, D_out]. Returns (B, D_in, F)."""
    B, D, F = check_encoder_args(x, W_enc, b_enc, k, None)
    check_tensor("W_dec", W_dec, 2)
    check_tensor("target", target, 2)
    if b_dec is None:
        raise ValueError("b_dec must be a [D_out] tensor (use zeros for a decoder without a bias)")
    check_tensor("b_dec", b_dec, 1)
    if W_dec.shape[0] != F:
        raise ValueError(f"W_dec must have W_enc's {F} rows (one per latent), got {tuple(W_dec.shape)}")
    D_out = W_dec.shape[1]
    if tuple(target.shape) != (B, D_out):
        raise ValueError(
            f"target must be [B, D_out] = [{B}, {D_out}] (x's rows, W_dec's width), got {tuple(target.shape)}"
        )
    if tuple(b_dec.shape) != (D_out,):
        raise ValueError(f"b_dec must be [D_out] = [{D_out}] (W_dec's width), got {tuple(b_dec.shape)}")
    check_same_dtype("W_enc", W_enc, W_dec=W_dec, b_dec=b_dec, target=target)
    check_same_device(x=x, W_dec=W_dec, b_dec=b_dec, target=target)
    return B, D, F


def step_grads_fake(x, W_enc, W_dec, b_dec, *extra):
    """A step backward's fake outputs: (dx, dW_enc, db_enc, dW_dec, db_dec), then one per ``extra`` tensor."""
    grads = (torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[0]))
    return (*grads, torch.empty_like(W_dec), torch.empty_like(b_dec), *(torch.empty_like(t) for t in extra))


def reconstructed(x, b_dec, target):
    """(what the step reconstructs, the encoder's centre): (x, b_dec) for an SAE, (target, None) for a
    transcoder (x encoded as it is)."""
    return (x, b_dec) if target is None else (target, None)


def target_grad_for(need: bool, grad, residual, target, like, *, per_row=False) -> torch.Tensor:
    """A transcoder step's d loss / d target (``target_grad``) where it is needed, else a placeholder
    like ``like``'s (the step's x)."""
    return target_grad(grad, residual, target.dtype, per_row=per_row) if need else placeholder(like)


def target_grad_fake(need: bool, target, like) -> torch.Tensor:
    """The fake of ``target_grad_for``."""
    return torch.empty_like(target) if need else like.new_empty(0)


def at_entries(per_latent: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """An [F] vector read at each entry of a code (0 at the empty slots, id -1)."""
    return torch.where(indices >= 0, per_latent[indices.clamp_min(0)], 0.0)


def cuda_fused(fn):
    """``fn`` (a chain of elementwise passes and reductions over [B, F]) compiled by torch.compile for CUDA
    tensors, so the chain runs as a few fused kernels instead of one pass per op; eager elsewhere (the
    CPU and the interpreter run it as written) and when an outer torch.compile traces it. Compiled on
    first use for static shapes: each new shape or dtype compiles again (a training run has one or
    two), and past dynamo's recompile limit (8) new ones run eagerly (the same results up to summation
    order). The first call at a shape compiles: warm up eagerly before capturing a CUDA graph. (Dynamic
    shapes were measured slower: 5.6 s a step at B * F = 2^30; docs/design/encoder-gemm.md.)"""
    compiled = None

    def call(*args):
        nonlocal compiled
        if not args[0].is_cuda or torch.compiler.is_compiling():
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args)

    call.__doc__ = fn.__doc__
    call.eager = fn
    return call


# The arguments every SAE step's op starts with, in order; each step adds its own after them.
STEP_TENSORS = (
    ("x", torch.Tensor), ("W_enc", torch.Tensor), ("b_enc", torch.Tensor), ("W_dec", torch.Tensor),
    ("b_dec", torch.Tensor), ("target", torch.Tensor | None),
)  # fmt: skip
STEP_GRAD_INPUTS = tuple(name for name, _ in STEP_TENSORS)


def step_inputs(name: str, **fields) -> type:
    """The ``NamedTuple`` of a step op's arguments: ``STEP_TENSORS``, then ``fields`` (name: type) in order."""
    return NamedTuple(name, [*STEP_TENSORS, *fields.items()])


def saved_step_tensors(saved, *, vals=None, residual=None) -> StepTensors:
    """The ``StepTensors`` a step backward reads from its saved fields (x, W_enc, W_dec, b_dec, vals, indices,
    residual, row_offsets if saved); ``vals`` and ``residual`` replace the saved ones where given."""
    return StepTensors(
        x=saved.x, W_enc=saved.W_enc, W_dec=saved.W_dec, b_dec=saved.b_dec,
        vals=saved.vals if vals is None else vals, indices=saved.indices,
        residual=saved.residual if residual is None else residual, row_offsets=getattr(saved, "row_offsets", None),
    )  # fmt: skip


def step_tensors(x, W_enc, b_enc, W_dec, b_dec, target) -> tuple:
    """A step's tensor arguments made contiguous, in ``STEP_TENSORS``' order (target may be None)."""
    return (*(t.contiguous() for t in (x, W_enc, b_enc, W_dec, b_dec)), None if target is None else target.contiguous())


def checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, k) -> tuple[int, int, int]:
    """(B, D_in, F) of an SAE step (``target`` None: W_dec as W_enc) or of a transcoder's."""
    if target is None:
        return check_step_args(x, W_enc, b_enc, W_dec, b_dec, k)
    return check_target_step_args(x, W_enc, b_enc, W_dec, b_dec, target, k)


# What the TopK and BatchTopK steps' shared backward reads (BatchTopK adds row_offsets), by name.
SELECTION_STEP_SAVED = ("x", "W_enc", "W_dec", "b_dec", "target", "vals", "indices", "residual", "A", "gate", "dE1",
                        "ids", "valid", "dead", "aux_coef", "prefix_sizes")  # fmt: skip


def flat_code(vals, indices, row_offsets):
    """A code as (vals, indices, row_offsets) flat by row: a [B, K] code's row_offsets are arange(B + 1) * K."""
    if row_offsets is not None:
        return vals, indices, row_offsets
    B, K = indices.shape
    return vals.reshape(-1), indices.reshape(-1), torch.arange(B + 1, device=indices.device) * K


def mse_selection_step_backward(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """The backward launcher of a step whose loss is the MSE of a selected code's decode (TopK, BatchTopK),
    with the step's optional parts: a separate target, Matryoshka's levels and a dead-latent loss. ``grads``:
    ``loss`` and ``aux_loss``; ``saved``: ``SELECTION_STEP_SAVED`` (and ``row_offsets`` for a variable-length
    code).
    Returns (dx, dW_enc, db_enc, dW_dec, db_dec, dtarget)."""
    x, W_enc, W_dec, b_dec, target, residual = (
        saved.x,
        saved.W_enc,
        saved.W_dec,
        saved.b_dec,
        saved.target,
        saved.residual,
    )
    centred = target is None
    if saved.prefix_sizes:  # Matryoshka's levels (no dead-latent loss with them)
        vals, indices, row_offsets = flat_code(saved.vals, saved.indices, getattr(saved, "row_offsets", None))
        step = saved_step_tensors(saved)._replace(vals=vals, indices=indices, row_offsets=row_offsets)
        grads_, S0 = matryoshka_levels_bwd(grads.loss, step, saved.prefix_sizes, centred)
        return (*grads_, target_grad(grads.loss, S0, target.dtype) if needs[5] else placeholder(x))

    def mse_backward(dx_extra, slots):
        return mse_step_backward(grads.loss, saved_step_tensors(saved), dx_extra=dx_extra, centred=centred, slots=slots)

    spec = DeadLossSpec.from_op(saved.dead)
    dead_saved = (saved.A, saved.gate, saved.dE1, saved.ids, saved.valid)
    centring = (x, W_enc, W_dec, b_dec if centred else None)
    out = backward_with_dead_loss(grads.loss, grads.aux_loss, spec, saved.aux_coef, dead_saved, centring, mse_backward)
    return (*out, target_grad(grads.loss, residual, target.dtype) if needs[5] else placeholder(x))


def mse_selection_step_backward_fake(grads, saved, needs: list[bool]):
    """The fake of ``mse_selection_step_backward``'s outputs."""
    x, target = saved.x, saved.target
    grads_ = step_grads_fake(x, saved.W_enc, saved.W_dec, saved.b_dec)
    return (*grads_, torch.empty_like(target) if needs[5] else x.new_empty(0))


# The forward of a step whose loss is the MSE of a selected code's decode (TopK, BatchTopK) --------


class Selected(NamedTuple):
    """What a selection rule gives the shared forward: the code, the factor it ranked by (or None), and
    the rule's own outputs, which the op returns after the code."""

    vals: torch.Tensor
    indices: torch.Tensor
    row_offsets: torch.Tensor | None
    key_scale: torch.Tensor | None
    extra: tuple


def mse_selection_step_fwd(i, select) -> tuple:
    """The forward of an MSE step over a selected code, with its optional parts: a separate target,
    Matryoshka's prefix levels and a dead-latent loss. ``i`` holds x, W_enc, b_enc, W_dec, b_dec, target,
    prefix_sizes (empty: one level, the whole dictionary), dead_mask, dead_offset, dead, aux_coef;
    ``select(centre, columns) -> Selected`` is the rule (``centre``: b_dec for an SAE, None for a
    transcoder; ``columns``: the dead set's pre-activations to copy out while it selects). Returns (loss,
    mse, fvu, fire_counts, vals, indices[, row_offsets], *extra, residual, level_losses, *DEAD_OUTPUTS);
    ``mse`` is empty without a dead-latent loss (it is then the loss itself, or with levels the last
    level's), ``level_losses`` without levels, and ``residual`` is [G, B, D] with G levels."""
    x, W_dec, b_dec = i.x, i.W_dec, i.b_dec
    y, centre = (x, b_dec) if i.target is None else (i.target, None)
    B, D = y.shape
    spec = DeadLossSpec.from_op(i.dead)
    columns, slots = dead_columns_for(x, spec, i.dead_mask, i.dead_offset)
    sel = select(centre, columns)
    vals, indices, row_offsets = sel.vals, sel.indices, sel.row_offsets
    if i.prefix_sizes:  # each level a prefix of each row's entries: the code ordered by latent id in each row
        if row_offsets is None:
            indices, order = indices.sort(dim=1)
            vals = vals.gather(1, order)
        loss, level_losses, fvu, counts, residual = matryoshka_levels_fwd(
            y, W_dec, b_dec, *flat_code(vals, indices, row_offsets), i.prefix_sizes
        )
        mse, dead_out = loss.new_empty(0), dead_fakes(x, W_dec, spec)
    else:
        counts = torch.zeros(W_dec.shape[0], dtype=torch.int64, device=x.device)  # fired, counted by the decode
        residual, sq = gather_residual(vals, indices, W_dec, b_dec, y, row_offsets=row_offsets, counts=counts)
        dead_out = dead_outputs(spec, slots, x, residual, W_dec, sel.key_scale)
        mse = sq / (B * D)
        loss, mse = (mse + i.aux_coef * dead_out[0], mse) if spec.mode else (mse, mse.new_empty(0))
        fvu, level_losses = sq / total_variance(y), sq.new_empty(0)
    code = (vals, indices) if row_offsets is None else (vals, indices, row_offsets)
    return loss, mse, fvu, counts, *code, *sel.extra, residual, level_losses, *dead_out


def mse_selection_step_fwd_fake(i, code: tuple, extra: tuple = ()) -> tuple:
    """``mse_selection_step_fwd``'s fake outputs, given the code's and the rule's own fake tensors."""
    x, W_dec = i.x, i.W_dec
    B, D, F = x.shape[0], W_dec.shape[1], W_dec.shape[0]
    spec = DeadLossSpec.from_op(i.dead)
    f32 = torch.float32
    head = (x.new_empty((), dtype=f32), x.new_empty(() if spec.mode else (0,), dtype=f32), x.new_empty((), dtype=f32))
    G = len(i.prefix_sizes)
    residual, level_losses = x.new_empty((G, B, D) if G else (B, D), dtype=f32), x.new_empty(G, dtype=f32)
    return (*head, x.new_empty(F, dtype=torch.int64), *code, *extra, residual, level_losses,
            *dead_fakes(x, W_dec, spec))  # fmt: skip


# The common head of every step result ------------------------------------------------------


def step_head(out, rows: int, *, mse=None, l0=None) -> dict:
    """The fields every step result starts with (``results.STEP_FIELDS``), from an op's named outputs:
    loss, mse (``out.mse`` unless given), fvu, l0 (``out.l0``, else counted from the code), fire_counts
    and the code (vals, indices and, when the op returns them, row_offsets)."""
    code = SparseCode(out.vals, out.indices, getattr(out, "row_offsets", None))
    if l0 is None:
        l0 = out.l0 if hasattr(out, "l0") else code_l0(out.vals, rows)
    return dict(loss=out.loss, mse=out.mse if mse is None else mse, fvu=out.fvu, l0=l0,
                fire_counts=out.fire_counts, code=code)  # fmt: skip


def selection_step_head(out, rows: int, dead_on: bool) -> dict:
    """``step_head`` of a selection step: without a dead-latent loss its mse is its loss (detached)."""
    return step_head(out, rows, mse=out.mse if dead_on else out.loss.detach())


def register_selection_step(name: str, inputs: type, forward, forward_fake, outputs: tuple):
    """``register_op`` for a step whose loss is the MSE of a selected code (TopK, BatchTopK): the shared
    backward (``mse_selection_step_backward``), ``SELECTION_STEP_SAVED`` (+ ``row_offsets`` for a
    variable-length code), the loss and the dead-latent loss differentiable, every step tensor's gradient."""
    saved = (*SELECTION_STEP_SAVED, "row_offsets") if "row_offsets" in outputs else SELECTION_STEP_SAVED
    launchers = (forward, forward_fake, mse_selection_step_backward, mse_selection_step_backward_fake)
    return register_op(name, inputs=inputs, launchers=launchers, saved=saved, outputs=outputs,
                       differentiable=("loss", "aux_loss"), grad_inputs=STEP_GRAD_INPUTS)  # fmt: skip


def capacity_step_fakes(i, n_scalars: int, *extra) -> tuple:
    """A fixed-capacity step's fake outputs (JumpReLU, standard, Gated): ``n_scalars`` 0-d fp32 losses and
    statistics, fire_counts [F], the code (vals and indices [capacity], row_offsets [B + 1]), count and
    overflow, then ``extra`` (the tensors the step keeps for its backward, as fakes)."""
    x, F, capacity, i64 = i.x, i.W_dec.shape[0], i.capacity, torch.int64
    scalars = [x.new_empty((), dtype=torch.float32) for _ in range(n_scalars)]
    code = (x.new_empty(capacity), x.new_empty(capacity, dtype=i64), x.new_empty(x.shape[0] + 1, dtype=i64))
    return (*scalars, x.new_empty(F, dtype=i64), *code, x.new_empty((), dtype=i64),
            x.new_empty((), dtype=torch.bool), *extra)  # fmt: skip
