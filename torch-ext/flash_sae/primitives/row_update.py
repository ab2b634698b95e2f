"""Adam applied to a weight row inside the segmented pass that computes the row's gradient.

Every row of ``W_enc`` and ``W_dec`` is owned by one program of the backward's segmented pass
(``csr.py``), which holds the row's gradient in registers before writing it. With a ``RowUpdate``
claimed for the weight, that program applies the optimizer there instead: it reads the row's fp32
master copy and Adam moments, updates them, and writes the master row, the moments and the
weight's own (compute-dtype) row. No [F, D] gradient tensor is written or read.

Per row, in fp32 and in this order (what ``torch.optim.Adam`` / ``AdamW`` do, with the decoder-norm
steps of a unit-norm decoder around them):

    g  <- g + extra[f]                                  the dead-latent loss's slot rows, if any
    g  <- g - <g, p> p / |p|^2                          (unit_norm) the component along the row removed
    g  <- g + wd * p     or  p <- p * (1 - lr * wd)     weight decay: Adam's (L2), or AdamW's (decoupled)
    m  <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2
    p  <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    p  <- p / |p|                                       (unit_norm) back on the unit sphere

with t the step being taken (``step`` + 1: ``step`` counts the updates already applied; the
optimizer increments it after each iteration). A row with no gradient (an empty segment) gets
exactly this with g = 0: its moments decay and it moves by its momentum, as torch's Adam moves it.
With ``lazy`` such a row is skipped instead (no state read or written: ``torch.optim.SparseAdam``'s
semantics, where a row's moments advance only on the steps that give it a gradient, while the bias
correction follows the global step count).

Claims: an optimizer claims a weight (``claim``); the backward of every step that computes that
weight's gradient asks ``claimed(weight)`` and, given a ``RowUpdate``, applies it and returns no
gradient for the weight. The weight is recognised by its storage, shape and strides, while it is
alive; ``release`` ends a claim.
"""

import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_utils import cast_rtne


class RowUpdate(NamedTuple):
    """One weight's Adam state and options, for the segmented pass that computes its gradient.

    ``master``: [F, D] fp32, the trained copy (None: the weight is fp32 and is itself updated).
    ``exp_avg``, ``exp_avg_sq``: [F, D] fp32. ``lr``: 0-d fp32 device tensor (a schedule sets it in
    place); ``step``: 0-d fp32 device tensor, the updates applied so far. ``unit_norm``: the row's
    gradient is projected off the row before the update and the row rescaled to unit norm after it.
    ``decoupled``: AdamW's weight decay, else Adam's. ``lazy``: rows without a gradient are skipped."""

    master: torch.Tensor | None
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    lr: torch.Tensor
    step: torch.Tensor
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    unit_norm: bool = False
    lazy: bool = False


class SlotRows(NamedTuple):
    """Extra gradient rows for some latents, added to theirs before the update: ``rows`` [C, D] fp32 and
    ``slot_of`` [F] int32 (the row of latent f, or -1). A dead-latent loss's rows at its dead slots."""

    rows: torch.Tensor
    slot_of: torch.Tensor


class ClaimedUpdate(NamedTuple):
    """What a segmented pass applies to a claimed weight: its ``RowUpdate`` and, where a dead-latent loss
    adds rows to some latents' gradients, those ``SlotRows``."""

    update: RowUpdate
    slots: SlotRows | None = None


def slot_rows_for(ids: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor, F: int) -> SlotRows:
    """``SlotRows`` of slots ``ids`` [C] (distinct where ``valid``) holding ``rows`` [C, D] fp32: no host sync."""
    slot_of = torch.full((F + 1,), -1, dtype=torch.int32, device=ids.device)
    at = torch.where(valid, ids, F)  # invalid slots write the spare entry F
    slot_of.scatter_(0, at, torch.arange(ids.numel(), dtype=torch.int32, device=ids.device))
    return SlotRows(rows=rows.float().contiguous(), slot_of=slot_of[:F])


# Claims -----------------------------------------------------------------------------

_CLAIMS: dict[int, list] = {}  # data_ptr -> [weakref to the weight, shape, strides, dtype, update, uses]


def _key(weight: torch.Tensor) -> int:
    return weight.data_ptr()


def claim(weight: torch.Tensor, update: RowUpdate) -> None:
    """From now on, the backward of a step applies ``update`` to ``weight``'s rows instead of returning
    its gradient."""
    _CLAIMS[_key(weight)] = [weakref.ref(weight), tuple(weight.shape), weight.stride(), weight.dtype, update, 0]


def release(weight: torch.Tensor) -> None:
    """Ends ``weight``'s claim (its gradient is returned again)."""
    entry = _CLAIMS.get(_key(weight))
    if entry is not None and entry[0]() is weight:
        del _CLAIMS[_key(weight)]


def claimed(weight: torch.Tensor) -> RowUpdate | None:
    """The ``RowUpdate`` claimed for ``weight`` (the same storage, shape, strides and dtype as the claimed
    tensor, which is alive), else None. Each call counts as one use (``take_uses``): the caller applies it."""
    entry = _CLAIMS.get(_key(weight))
    if entry is None:
        return None
    ref, shape, stride, dtype, update, _ = entry
    owner = ref()
    if owner is None:
        del _CLAIMS[_key(weight)]
        return None
    same = owner.data_ptr() == weight.data_ptr() and tuple(weight.shape) == shape and weight.stride() == stride
    if not (same and weight.dtype == dtype):
        return None
    entry[5] += 1
    return update


def take_uses(weight: torch.Tensor) -> int:
    """How many backward passes applied ``weight``'s claimed update since the last call (host-side
    bookkeeping, no sync); resets the count."""
    entry = _CLAIMS.get(_key(weight))
    if entry is None or entry[0]() is not weight:
        return 0
    uses, entry[5] = entry[5], 0
    return uses


# The update, on one row --------------------------------------------------------------


@triton.jit
def adam_row(
    g,  # [BLOCK_D] fp32 gradient of the row (masked columns 0)
    f,  # the row
    cols,  # [BLOCK_D] column ids
    mask,  # [BLOCK_D] live columns
    D,
    w_ptr,  # [F, D] the weight (compute dtype): written from the master (HAS_MASTER), else the master itself
    master_ptr,  # [F, D] fp32 master (HAS_MASTER)
    m_ptr,
    v_ptr,
    lr_ptr,
    step_ptr,
    beta1,
    beta2,
    eps,
    weight_decay,
    HAS_MASTER: tl.constexpr,
    UNIT_NORM: tl.constexpr,
    DECOUPLED: tl.constexpr,
):
    """Adam (``row_update``'s docstring) on row ``f``, whose whole row lies in ``cols`` when UNIT_NORM."""
    off = f * D + cols
    if HAS_MASTER:
        p = tl.load(master_ptr + off, mask=mask, other=0.0)
    else:
        p = tl.load(w_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if UNIT_NORM:
        g = g - (tl.sum(g * p, axis=0) / tl.maximum(tl.sum(p * p, axis=0), 1e-30)) * p
    lr = tl.load(lr_ptr).to(tl.float32)
    t = tl.load(step_ptr).to(tl.float32) + 1.0
    if weight_decay != 0.0:
        if DECOUPLED:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = tl.load(m_ptr + off, mask=mask, other=0.0)
    v = tl.load(v_ptr + off, mask=mask, other=0.0)
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    bc1 = 1.0 - tl.exp2(t * tl.log2(beta1))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2)))
    p = p - (lr / bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
    if UNIT_NORM:
        p = p / tl.maximum(tl.sqrt(tl.sum(p * p, axis=0)), 1.1754943508222875e-38)
    tl.store(m_ptr + off, m, mask=mask)
    tl.store(v_ptr + off, v, mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + off, p, mask=mask)
    tl.store(w_ptr + off, cast_rtne(p, w_ptr.dtype.element_ty), mask=mask)


def adam_rows_torch(grad: torch.Tensor, weight: torch.Tensor, update: RowUpdate, touched: torch.Tensor) -> None:
    """The plain-torch path of ``adam_row`` over every row (CPU tensors): ``grad`` [F, D] fp32; ``touched``
    [F] bool, the rows with a gradient (only those are updated with ``lazy``)."""
    p = update.master if update.master is not None else weight.float()
    g = grad
    if update.unit_norm:
        g = g - ((g * p).sum(1, keepdim=True) / (p * p).sum(1, keepdim=True).clamp_min(1e-30)) * p
    lr = update.lr.float()
    t = update.step.float() + 1.0
    beta1, beta2 = update.betas
    wd = update.weight_decay
    if wd != 0.0:
        if update.decoupled:
            p = p * (1.0 - lr * wd)
        else:
            g = g + wd * p
    m = update.exp_avg + (1.0 - beta1) * (g - update.exp_avg)
    v = beta2 * update.exp_avg_sq + (1.0 - beta2) * g * g
    bc1 = 1.0 - beta1**t
    bc2_sqrt = (1.0 - beta2**t).sqrt()
    p = p - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + update.eps)
    if update.unit_norm:
        p = p / p.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    rows = touched[:, None] if update.lazy else torch.ones_like(touched)[:, None]
    update.exp_avg.copy_(torch.where(rows, m, update.exp_avg))
    update.exp_avg_sq.copy_(torch.where(rows, v, update.exp_avg_sq))
    if update.master is not None:
        update.master.copy_(torch.where(rows, p, update.master))
    weight.copy_(torch.where(rows, p.to(weight.dtype), weight))
