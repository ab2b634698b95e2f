"""Ordered compaction: the positions of the m largest integer keys, ties by lower position.

``top_positions(keys, m)`` returns, in ascending order, the positions of the m
largest entries of a 1-D integer key array, equal keys ranked by the lower
position (a stable descending sort's first m). It is BatchTopK's selection rule
once the keys are laid out in flat (row-major) order.

How, without sorting and without a host sync:
1. t, the m-th largest key, is the minimum of ``torch.topk(keys, m).values``
   (a radix select: two digit passes for 16-bit keys, four for 32-bit ones).
2. ``_count_kernel``: per block of BLOCK keys, how many are > t and how many == t.
3. ``torch.cumsum`` over the blocks' counts (each count row contiguous: a scan
   along the outer dim of an [n_blocks, 2] array is a slow one-thread-per-column
   kernel) gives every block its exclusive bases. All keys > t are selected (fewer than m of them); of the keys == t,
   the first ``need = m - count(> t)`` by position.
4. ``_write_kernel`` rereads each block that has a selected entry, ranks its
   entries inside the block by ``tl.cumsum`` and writes the selected positions
   at their final slots, which are ascending because the blocks' bases are.

Bytes: the keys are read by the radix select and the count, and again only in
the blocks holding a selected entry; the output is m int64 positions. Nothing
is sorted, nothing is atomic: the result is deterministic and identical to
``stable descending sort(keys)[:m]`` sorted.
"""

import torch
import triton
import triton.language as tl

from .._launch import use_triton

BLOCK = 1024


@triton.jit
def _count_kernel(keys_ptr, t_ptr, counts_ptr, L, n_blocks, BLOCK: tl.constexpr):
    """counts[0, block] = how many keys > t, counts[1, block] = how many == t, over the block."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < L
    t = tl.load(t_ptr)
    k = tl.load(keys_ptr + offs, mask=live, other=0)
    tl.store(counts_ptr + pid, tl.sum((live & (k > t)).to(tl.int32), axis=0))
    tl.store(counts_ptr + n_blocks + pid, tl.sum((live & (k == t)).to(tl.int32), axis=0))


@triton.jit
def _write_kernel(keys_ptr, t_ptr, ends_ptr, counts_ptr, out_ptr, m, L, n_blocks, BLOCK: tl.constexpr):
    """Writes the selected positions of one block at their slots of ``out`` [m]; a block with none
    selected (most of them: m is a small share of L) stops after reading its counts."""
    pid = tl.program_id(0)
    gt_n = tl.load(counts_ptr + pid)
    eq_n = tl.load(counts_ptr + n_blocks + pid)
    # Exclusive bases of this block (inclusive prefix sums minus the block's own counts).
    gt_base = tl.load(ends_ptr + pid) - gt_n
    eq_base = tl.load(ends_ptr + n_blocks + pid) - eq_n
    need = m - tl.load(ends_ptr + n_blocks - 1)  # ties to take: m minus every key > t
    eq_take = tl.minimum(tl.maximum(need - eq_base, 0), eq_n)
    if gt_n + eq_take > 0:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < L
        t = tl.load(t_ptr)
        k = tl.load(keys_ptr + offs, mask=live, other=0)
        gt = (live & (k > t)).to(tl.int32)
        eq = (live & (k == t)).to(tl.int32)
        eq_rank = eq_base + tl.cumsum(eq, axis=0) - eq
        sel = gt | (eq & (eq_rank < need).to(tl.int32))
        slot = gt_base + tl.minimum(eq_base, need) + tl.cumsum(sel, axis=0) - sel
        tl.store(out_ptr + slot, offs, mask=sel != 0)


def kth_largest(keys: torch.Tensor, m: int) -> torch.Tensor:
    """The m-th largest entry of a 1-D integer tensor, as a 1-element tensor (no host sync)."""
    return torch.topk(keys, m, sorted=False).values.amin().reshape(1)


def top_positions(keys: torch.Tensor, m: int) -> torch.Tensor:
    """Positions (int64, ascending) of the m largest entries of 1-D integer ``keys``, ties by lower position.

    1 <= m <= keys.numel(). Deterministic; no host sync.
    """
    L = keys.numel()
    t = kth_largest(keys, m)
    if not use_triton(keys):
        gt = keys > t
        eq = keys == t
        need = m - gt.sum()
        sel = gt | (eq & (torch.cumsum(eq, 0) <= need))
        return torch.nonzero_static(sel, size=m).squeeze(1)
    n_blocks = triton.cdiv(L, BLOCK)
    counts = torch.empty(2, n_blocks, dtype=torch.int32, device=keys.device)
    _count_kernel[(n_blocks,)](keys, t, counts, L, n_blocks, BLOCK=BLOCK, num_warps=4)
    ends = torch.cumsum(counts, 1, dtype=torch.int64)  # along the contiguous dim: a fast scan
    out = torch.empty(m, dtype=torch.int64, device=keys.device)
    _write_kernel[(n_blocks,)](keys, t, ends, counts, out, m, L, n_blocks, BLOCK=BLOCK, num_warps=4)
    return out
