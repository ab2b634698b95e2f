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
from .compact import top_positions
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


# Host launchers ----------------------------------------------------------------


def dead_slots(
    dead_mask: torch.Tensor, capacity: int, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``capacity`` dead latents in id order from ``offset`` on, cyclically (0-d int64 tensor).

    Returns (ids [C] int64, ascending, F in empty slots; valid [C] bool; n_dead [] int64, all dead
    latents). A dead latent's key is F minus its distance past the offset (live ones: -1), so the
    C largest keys are the first C dead latents from the offset; ``top_positions`` returns them by id.
    """
    F = dead_mask.numel()
    pos = torch.arange(F, device=dead_mask.device)
    keys = torch.where(dead_mask, F - torch.remainder(pos - offset, F), -1).to(torch.int32)
    seen, last = _window(dead_mask, capacity, offset)
    n_dead = seen[-1]
    kth = torch.where(n_dead >= capacity, F - last, -1)  # the C-th largest key, without a radix select
    at = top_positions(keys, capacity, kth)
    valid = dead_mask[at]
    return torch.where(valid, at, F), valid, n_dead


def _window(dead_mask, capacity, offset):
    """(running count of dead latents in rotated order from ``offset``, [F]; the rotated position of the
    capacity-th one, 0-d; past the end when fewer are dead)."""
    F = dead_mask.numel()
    pos = torch.arange(F, device=dead_mask.device)
    in_order = dead_mask[torch.remainder(pos + offset, F)]  # dead flags from the offset on
    seen = torch.cumsum(in_order.to(torch.int32), 0)
    return seen, torch.searchsorted(seen, torch.full((1,), capacity, dtype=seen.dtype, device=seen.device))[0]


def next_dead_offset(dead_mask: torch.Tensor, capacity: int, offset: torch.Tensor) -> torch.Tensor:
    """The offset after the window ``dead_slots`` took: one past its last dead latent (cyclically), or
    ``offset`` itself when every dead latent fit. No host sync."""
    F = dead_mask.numel()
    seen, last = _window(dead_mask, capacity, offset)
    return torch.where(seen[-1] > capacity, torch.remainder(offset + last + 1, F), offset)


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
