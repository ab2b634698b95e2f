"""Threshold collection: every entry of a pre-activation chunk above a per-latent threshold, and those near it.

A JumpReLU (or standard, or Gated) step's code is the set of entries with pre (* scale) > theta,
plus, with a bandwidth, the entries in its estimators' band |(pre - theta) / bandwidth| < 1/2.
``threshold_collect`` appends a chunk's set to a fixed-capacity variable-length code in two passes
(count per block, a scan, write), with no host sync.
"""

import torch
import triton
import triton.language as tl

from ..._launch import use_triton
from ..triton_utils import cast_rtne
from .keys import scaled

# Kernels -----------------------------------------------------------------------


@triton.jit
def _collected(pre_ptr, theta_ptr, scale_ptr, row, offs, live, stride_pb, idx_base, bandwidth, HAS_SCALE, HAS_BAND):
    """(raw pre values, int32 0/1 collected) of one block: key > theta, or (with a band)
    |(key - theta) / bandwidth| < 1/2, key = pre (* scale), every intermediate rounded to the
    chunk's dtype as torch rounds it."""
    dtype = pre_ptr.dtype.element_ty
    raw = tl.load(pre_ptr + row * stride_pb + offs, mask=live, other=0.0)
    theta = tl.load(theta_ptr + idx_base + offs, mask=live, other=0.0).to(tl.float32)
    key = raw
    if HAS_SCALE:
        sc = tl.load(scale_ptr + idx_base + offs, mask=live, other=1.0).to(tl.float32)
        key = cast_rtne(key.to(tl.float32) * sc, dtype)
    key = key.to(tl.float32)
    hit = key > theta
    if HAS_BAND:
        diff = cast_rtne(key - theta, dtype).to(tl.float32)
        u = cast_rtne(diff / bandwidth, dtype).to(tl.float32)
        hit = hit | ((u > -0.5) & (u < 0.5))
    return raw, (hit & live).to(tl.int32)


@triton.jit
def _threshold_collect_kernel(
    pre_ptr,  # [B, n] float pre-activations of one chunk (row stride stride_pb)
    theta_ptr,  # [F] float threshold, in the chunk's dtype
    scale_ptr,  # [F] float per-latent factor (HAS_SCALE)
    count_ptr,  # [B * n_blocks]: out, each block's count (int32); in (WRITE), their inclusive prefix sums (int64)
    flat_ptr,  # [capacity] int64 out (WRITE): flat position row * F + latent of each collected entry
    raw_ptr,  # [capacity] out (WRITE): its pre-activation, the chunk's dtype
    n,
    stride_pb,
    idx_base,  # latent id of the chunk's column 0
    F,
    capacity,
    slot0_ptr,  # [] int64: slots before this chunk's first (entries of earlier chunks)
    bandwidth,
    BLOCK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BAND: tl.constexpr,
    WRITE: tl.constexpr,
):
    """The counting pass writes each block's count of collected entries (``_collected``); after a
    scan, the WRITE pass recomputes the set in the blocks that have any and writes it at its
    row-major slots (those below ``capacity``)."""
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    block = row * tl.num_programs(1) + pid
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    if WRITE:  # the block's count from the inclusive prefix sums; most blocks have none and stop there
        end = tl.load(count_ptr + block)
        n_hit = end - tl.load(count_ptr + block - 1, mask=block > 0, other=0)
        if n_hit > 0:
            raw, hit = _collected(
                pre_ptr, theta_ptr, scale_ptr, row, offs, live, stride_pb, idx_base, bandwidth, HAS_SCALE, HAS_BAND
            )
            slot = tl.load(slot0_ptr) + end - n_hit + tl.cumsum(hit, axis=0) - hit
            ok = (hit != 0) & (slot < capacity)
            tl.store(flat_ptr + slot, row * F + idx_base + offs, mask=ok)
            tl.store(raw_ptr + slot, raw, mask=ok)
    else:
        _, hit = _collected(
            pre_ptr, theta_ptr, scale_ptr, row, offs, live, stride_pb, idx_base, bandwidth, HAS_SCALE, HAS_BAND
        )
        tl.store(count_ptr + block, tl.sum(hit, axis=0))


# Host launchers ----------------------------------------------------------------


def threshold_collect(pre, f0, F, theta, bandwidth, scale, flat, raw, slot0):
    """Collects a chunk's entries (see ``threshold_preacts``) into ``flat``/``raw`` from slot ``slot0`` on.

    ``slot0`` is a 0-d int64 tensor (the entries of earlier chunks); returns ``slot0`` plus this
    chunk's count. Slots at or past ``capacity`` are not written. No host sync.
    """
    B, w = pre.shape
    capacity = flat.numel()
    if not use_triton(pre):
        t = theta[f0 : f0 + w]
        key = scaled(pre, scale[f0 : f0 + w] if scale is not None else None)
        mask = key > t
        if bandwidth > 0:
            u = (key - t) / bandwidth
            mask |= (u > -0.5) & (u < 0.5)
        at = torch.nonzero_static(mask, size=capacity, fill_value=-1)
        slots = slot0 + torch.arange(capacity, device=pre.device)
        keep = (at[:, 0] >= 0) & (slots < capacity)
        slots = torch.where(keep, slots, capacity)  # a dump slot past the end
        flat_ext = torch.cat([flat, flat.new_empty(1)])
        raw_ext = torch.cat([raw, raw.new_empty(1)])
        flat_ext[slots] = at[:, 0] * F + f0 + at[:, 1]
        raw_ext[slots] = pre[at[:, 0].clamp_min(0), at[:, 1].clamp_min(0)]
        flat.copy_(flat_ext[:capacity])
        raw.copy_(raw_ext[:capacity])
        return slot0 + mask.sum()
    BLOCK = 1024
    n_blocks = triton.cdiv(w, BLOCK)
    counts = torch.empty(B * n_blocks, dtype=torch.int32, device=pre.device)
    scale_arg = scale if scale is not None else theta
    args = (pre, theta, scale_arg)
    common = dict(BLOCK=BLOCK, HAS_SCALE=scale is not None, HAS_BAND=bandwidth > 0, num_warps=4)
    _threshold_collect_kernel[(B, n_blocks)](
        *args, counts, flat, raw, w, pre.stride(0), f0, F, capacity, slot0, float(bandwidth), WRITE=False, **common
    )
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    _threshold_collect_kernel[(B, n_blocks)](
        *args, ends, flat, raw, w, pre.stride(0), f0, F, capacity, slot0, float(bandwidth), WRITE=True, **common
    )
    return slot0 + ends[-1]
