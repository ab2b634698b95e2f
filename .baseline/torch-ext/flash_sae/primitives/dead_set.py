"""The dead set: a step's dead latents, compacted to a fixed capacity, and dense products over it.

The dead-latent losses (AuxK, ghost grads; ``ops/_dead.py``) act on the latents a mask calls
dead. Their number changes from step to step, but a captured step needs fixed shapes, so the
set is compacted into ``capacity`` slots, in id order: the first ``capacity`` dead latents from
an offset on, cyclically (all of them when fewer are dead; the modules slide the offset past
each step's window, so every dead latent gets its turn). Empty slots carry the id F and
``valid`` False. No host sync: the compaction is ``compact.top_positions`` over the mask.

Over the slots, the losses are dense: an activation matrix A [B, C] times the slots' decoder
rows [C, D], and the transposes in the backward, on the tensor cores (``mm_f32``: the
parameters' dtype in, fp32 accumulation and output). Their cost is O(B * C * D) whatever the
number of dead latents, and nothing [B, F] exists.
"""

import torch
import triton
import triton.language as tl

from .._launch import use_triton
from .triton_utils import cast_rtne

# Kernels -----------------------------------------------------------------------


@triton.jit
def _slot_rows_kernel(W_ptr, ids_ptr, valid_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    """out[j] = W[ids[j]] at a valid slot, 0 at an empty one; one program per (slot, D-block)."""
    j = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = cols < D
    ok = tl.load(valid_ptr + j) != 0
    f = tl.where(ok, tl.load(ids_ptr + j), 0)  # an empty slot's id (F) is never read
    row = tl.load(W_ptr + f * D + cols, mask=inside, other=0.0)
    tl.store(out_ptr + j * D + cols, tl.where(ok, row, 0.0), mask=inside)


@triton.jit
def _add_slot_rows_kernel(out_ptr, rows_ptr, ids_ptr, valid_ptr, D, BLOCK_D: tl.constexpr):
    """out[ids[j]] += rows[j] (fp32) at the valid slots, one rounding to out's dtype; ids are distinct."""
    j = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = tl.load(valid_ptr + j) != 0
    if ok:
        f = tl.load(ids_ptr + j)
        inside = cols < D
        acc = tl.load(out_ptr + f * D + cols, mask=inside, other=0.0).to(tl.float32)
        acc += tl.load(rows_ptr + j * D + cols, mask=inside, other=0.0)
        tl.store(out_ptr + f * D + cols, cast_rtne(acc, out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dead_window_kernel(
    dead_ptr,  # [F] int8: the dead mask
    csum_ptr,  # [F] int32: its inclusive prefix sums
    offset_ptr,  # [] int64: where the window starts
    ids_ptr,  # [C] int64 out: the window's ids, ascending; F in empty slots
    valid_ptr,  # [C] int8 out
    next_ptr,  # [] int64 out: the next window's offset
    F,
    C,
    BLOCK: tl.constexpr,
):
    """``dead_slots``'s window: each program reads a block of latents (and fills the empty slots of the
    same index range); a taken latent's slot follows from the prefix count before it."""
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = f < F
    off = tl.load(offset_ptr)
    n_dead = tl.load(csum_ptr + F - 1)
    before = tl.where(off > 0, tl.load(csum_ptr + tl.maximum(off - 1, 0)), 0)  # dead latents in [0, off)
    t_hi = tl.minimum(n_dead - before, C)
    t_lo = tl.minimum(C - t_hi, before)
    d = tl.load(dead_ptr + f, mask=live, other=0).to(tl.int32)
    cb = tl.load(csum_ptr + f, mask=live, other=0) - d  # dead latents before f
    lo = f < off
    rank = tl.where(lo, cb, cb - before)
    take = live & (d != 0) & tl.where(lo, rank < t_lo, rank < t_hi)
    slot = tl.where(lo, rank, t_lo + rank)
    tl.store(ids_ptr + slot, f.to(tl.int64), mask=take)
    tl.store(valid_ptr + slot, tl.full((BLOCK,), 1, tl.int8), mask=take)
    empty = (f < C) & (f >= t_lo + t_hi)
    tl.store(ids_ptr + f, tl.full((BLOCK,), 0, tl.int64) + F, mask=empty)
    tl.store(valid_ptr + f, tl.full((BLOCK,), 0, tl.int8), mask=empty)
    zero = tl.zeros((BLOCK,), tl.int32)  # scalars broadcast to vectors: the interpreter's masks must be
    spill = (zero + n_dead) > C
    last_rank = tl.where(lo, zero + t_lo - 1, zero + t_hi - 1)
    last_part = tl.where((zero + t_lo) > 0, lo, f >= off)
    last = take & last_part & (rank == last_rank) & spill
    tl.store(next_ptr + f * 0, ((f + 1) % F).to(tl.int64), mask=last)
    first = (f == 0) & (~spill)
    tl.store(next_ptr + f * 0, tl.full((BLOCK,), 0, tl.int64) + off, mask=first)


# Host launchers ----------------------------------------------------------------


def dead_slots(
    dead_mask: torch.Tensor, capacity: int, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``capacity`` dead latents in id order from ``offset`` on, cyclically (0-d int64 tensor).

    Returns (ids [C] int64, ascending, F in empty slots; valid [C] bool; n_dead [] int32, all dead
    latents; next_offset [] int64, one past the window's last latent in that cyclic order, or
    ``offset`` itself when every dead latent fit). From one scan of the mask: with cb(f) the dead
    latents before f, the window takes t_hi = min(dead in [offset, F), C) latents of the high part
    and t_lo = min(C - t_hi, dead in [0, offset)) of the low part, and a taken latent's slot follows
    from cb(f) alone, so each is written by the program that reads it. No host sync.
    """
    F, C = dead_mask.numel(), capacity
    csum = torch.cumsum(dead_mask, 0, dtype=torch.int32)
    if use_triton(dead_mask):
        ids = torch.empty(C, dtype=torch.int64, device=dead_mask.device)
        valid = torch.empty(C, dtype=torch.bool, device=dead_mask.device)
        nxt = torch.empty((), dtype=torch.int64, device=dead_mask.device)
        BLOCK = 1024
        _dead_window_kernel[(triton.cdiv(F, BLOCK),)](
            dead_mask.view(torch.int8), csum, offset, ids, valid.view(torch.int8), nxt, F, C, BLOCK=BLOCK, num_warps=4
        )
        return ids, valid, csum[-1], nxt
    pos = torch.arange(F, device=dead_mask.device)
    n_dead = csum[-1]
    before = torch.where(offset > 0, csum[(offset - 1).clamp(min=0)], 0)
    t_hi = torch.clamp(n_dead - before, max=C)
    t_lo = torch.minimum(C - t_hi, before)
    lo = pos < offset
    rank = torch.where(lo, csum - dead_mask.int(), csum - dead_mask.int() - before)
    take = dead_mask & torch.where(lo, rank < t_lo, rank < t_hi)
    slot = torch.where(take, torch.where(lo, rank, t_lo + rank), C)  # the rest writes a spare slot
    ids = torch.full((C + 1,), F, dtype=torch.int64, device=dead_mask.device)
    ids[slot] = torch.where(take, pos, F)
    ids = ids[:C]
    last = take & torch.where(t_lo > 0, lo & (rank == t_lo - 1), ~lo & (rank == t_hi - 1))
    nxt = torch.where(n_dead > C, torch.remainder(torch.argmax(last.int()) + 1, F), offset)
    return ids, ids < F, n_dead, nxt


def next_dead_offset(dead_mask: torch.Tensor, capacity: int, offset: torch.Tensor) -> torch.Tensor:
    """The offset after the window ``dead_slots`` takes (its fourth output). No host sync."""
    return dead_slots(dead_mask, capacity, offset)[3]


def _block(D: int) -> int:
    return min(1024, triton.next_power_of_2(max(D, 16)))


def slot_rows(W: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """W's rows at the slots [C, D]; zero rows in empty slots (so no value of W leaks into them)."""
    if not use_triton(W):
        return torch.where(valid.unsqueeze(1), W[ids.clamp(max=W.shape[0] - 1)], 0)
    C, D = ids.numel(), W.shape[1]
    out = W.new_empty(C, D)
    bd = _block(D)
    _slot_rows_kernel[(C, triton.cdiv(D, bd))](W, ids, valid, out, D, BLOCK_D=bd, num_warps=4)
    return out


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32: on a GPU, 16-bit inputs go to the tensor cores with an fp32 output."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def add_rows_(out: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> None:
    """out[ids[j]] += rows[j] (fp32 rows, [C, D] or [C]) at the valid slots, rounded once to out's dtype.

    The ids of valid slots are distinct, so the result does not depend on order."""
    if not use_triton(out):
        at = ids[valid]
        out[at] = (out[at].float() + rows[valid]).to(out.dtype)
        return
    D = out[0].numel()
    bd = _block(D)
    _add_slot_rows_kernel[(ids.numel(), triton.cdiv(D, bd))](out, rows, ids, valid, D, BLOCK_D=bd, num_warps=4)
