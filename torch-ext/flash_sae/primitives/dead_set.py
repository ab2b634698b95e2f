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

from .compact import top_positions


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
    at = top_positions(keys, capacity)
    valid = dead_mask[at]
    return torch.where(valid, at, F), valid, dead_mask.sum()


def next_dead_offset(dead_mask: torch.Tensor, capacity: int, offset: torch.Tensor) -> torch.Tensor:
    """The offset after the window ``dead_slots`` took: one past its last dead latent (cyclically), or
    ``offset`` itself when every dead latent fit. No host sync."""
    F = dead_mask.numel()
    pos = torch.arange(F, device=dead_mask.device)
    in_order = dead_mask[torch.remainder(pos + offset, F)]  # dead flags from the offset on
    seen = torch.cumsum(in_order.to(torch.int32), 0)
    last = torch.searchsorted(seen, torch.full((1,), capacity, dtype=seen.dtype, device=seen.device))[0]
    return torch.where(seen[-1] > capacity, torch.remainder(offset + last + 1, F), offset)


def slot_rows(W: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """W's rows at the slots [C, D]; zero rows in empty slots (so no value of W leaks into them)."""
    rows = W[ids.clamp(max=W.shape[0] - 1)]
    return torch.where(valid.unsqueeze(1), rows, 0)


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32: on a GPU, 16-bit inputs go to the tensor cores with an fp32 output."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def add_rows_(out: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> None:
    """out[ids[j]] += rows[j] at the valid slots (distinct ids, so the result does not depend on order)."""
    rows = torch.where(valid.view(-1, *([1] * (rows.ndim - 1))), rows, 0).to(out.dtype)
    out.index_add_(0, ids.clamp(max=out.shape[0] - 1), rows)
