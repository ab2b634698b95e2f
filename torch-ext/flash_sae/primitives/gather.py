"""Row gather: ``out[b] = bias + sum_k vals[b, k] * weight[indices[b, k]]``, and its adjoint.

This is the forward of every decode (``sparse_decode``, the decoder losses, the
steps) and the ``dx`` of every encoder backward (the same sum over the
encoder's rows). ``gather_residual`` runs the same pass as the decoder's MSE epilogue:
it writes the fp32 residual ``out - target`` and per-row partial sums of its
square instead of ``out``; ``gather_level_residuals`` writes one such residual per
Matryoshka prefix level in the same walk.

Forward, ``gather_rows`` (and the two above, one launcher): one program per (row, D-block) walks K with 1-D fp32
accumulators; no [B, F] code and no [B, K, D] gather is built. Reads B*K*D
weight elements (repeats hit L2), writes B*D.

Adjoint, ``gather_rows_backward`` (and ``gather_rows_backward_gated``): for a [B, D] row source ``grad`` (an
upstream gradient or a residual), one CSR segmented pass (``csr.py``) gives
``dweight[f] = scale * sum over (b, k) with indices[b, k] == f of vals[b, k] * grad[b]``
(every row of the dense [F, D] gradient written exactly once, untouched rows
as zeros) and ``dots[b, k] = <grad[b], weight[indices[b, k]]>``, reading each
touched weight row once. (Computing the dots in the forward's walk instead
was measured slower: the second walk missed L2; docs/design/segmented-sum.md.)

Precision: fp32 accumulation; stores round to nearest-even. Deterministic: no
float atomics (the optional fire counts are integer atomic adds, exact in any
order). Shapes: any B >= 0, K >= 0, F >= 1, D >= 1; int64 offsets, so F*D and
B*D may pass 2^31. An id outside [0, F) reads an in-bounds row and poisons its
output row with NaN (``triton_utils.load_latent``).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._launch import TUNING, block_d, next_pow2, use_triton
from .csr import PLAIN_ROWS, RowOut, SegmentRows, csr_transpose, segment_sum_dots
from .triton_utils import cast_rtne, load_latent

# Kernels -----------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(
    idx_ptr,  # [B, K] int32/int64 latent ids, or [N] (VARLEN)
    vals_ptr,  # [B, K] float latent values, or [N] (VARLEN)
    offsets_ptr,  # [B + 1] int64: row b owns entries offsets[b]:offsets[b+1] (VARLEN)
    level_ends_ptr,  # [B, LEVELS] int64: where each prefix level of row b ends (LEVELS > 0)
    w_ptr,  # [F, D] float weight rows
    bias_ptr,  # [D] float (HAS_BIAS)
    target_ptr,  # [B, D] float (HAS_TARGET)
    out_ptr,  # [B, D] out in out's dtype, or fp32 residual (HAS_TARGET); [LEVELS, B, D] with levels
    sq_ptr,  # [B, ND] fp32 partial sum of residual^2 (HAS_TARGET); [LEVELS, B, ND] with levels
    counts_ptr,  # [F] int64 (COUNT): += 1 for each entry with an id in [0, F) and a value > 0
    tscale_ptr,  # [] float (MINUS): out = bias + sum - tscale * tscale_const * target
    tscale_const,
    B,
    K,
    F,
    D,
    BLOCK_D: tl.constexpr,
    UNROLL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    VARLEN: tl.constexpr,
    LEVELS: tl.constexpr,  # > 0: one residual per prefix level (Matryoshka), snapshot as the walk passes it
    COUNT: tl.constexpr,  # count the fired entries (integer atomics: exact, order-free), D-block 0 only
    MINUS: tl.constexpr,  # subtract a scaled target from out (no residual, no sq; not with HAS_TARGET)
):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    ND = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if VARLEN:
        start = tl.load(offsets_ptr + b)
        end = tl.load(offsets_ptr + b + 1)
    else:
        start = b * K
        end = start + K
    if LEVELS > 0:
        t = tl.load(target_ptr + b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        for g in tl.static_range(LEVELS):
            stop = tl.load(level_ends_ptr + b * LEVELS + g)
            for k in range(start, stop):
                idx, v = load_latent(idx_ptr, vals_ptr, k, k < stop, F)
                w = tl.load(w_ptr + idx * D + offs_d, mask=mask_d, other=0.0)
                acc += v * w.to(tl.float32)
            start = stop
            r = tl.where(mask_d, acc - t, 0.0)
            tl.store(out_ptr + (g * B + b) * D + offs_d, r, mask=mask_d)
            tl.store(sq_ptr + (g * B + b) * ND + pid_d, tl.sum(r * r, axis=0))
    else:
        for k0 in range(start, end, UNROLL):
            for u in tl.static_range(UNROLL):
                k = k0 + u
                live = k < end
                idx, v = load_latent(idx_ptr, vals_ptr, k, live, F)
                w = tl.load(w_ptr + idx * D + offs_d, mask=mask_d & (offs_d * 0 + k < end), other=0.0)
                acc += v * w.to(tl.float32)
                if COUNT:  # a bad id's value is NaN (load_latent), so it is not counted; relaxed: no fence
                    fired = live & (v > 0) & (pid_d == 0)
                    tl.atomic_add(counts_ptr + idx, tl.full([], 1, tl.int64), mask=fired, sem="relaxed")
        if HAS_TARGET:
            t = tl.load(target_ptr + b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            r = tl.where(mask_d, acc - t, 0.0)
            tl.store(out_ptr + b * D + offs_d, r, mask=mask_d)
            tl.store(sq_ptr + b * ND + pid_d, tl.sum(r * r, axis=0))
        else:
            if MINUS:
                t = tl.load(target_ptr + b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                acc -= (tl.load(tscale_ptr).to(tl.float32) * tscale_const) * t
            tl.store(out_ptr + b * D + offs_d, cast_rtne(acc, out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _row_dots_kernel(
    src_ptr,  # [B, D] the row source (any float dtype, read as fp32)
    weight_ptr,  # [F, D]
    rows_ptr,  # [N] int64: each entry's row of src (B or more: none)
    ids_ptr,  # [N] int64: each entry's row of weight (outside [0, F): none)
    out_ptr,  # [N] fp32
    N,
    B,
    F,
    D,
    ENTRIES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    for u in tl.static_range(ENTRIES):
        e = tl.program_id(0).to(tl.int64) * ENTRIES + u
        live = e < N
        row = tl.load(rows_ptr + e, mask=live, other=0).to(tl.int64)
        idx = tl.load(ids_ptr + e, mask=live, other=-1).to(tl.int64)
        ok = live & (row >= 0) & (row < B) & (idx >= 0) & (idx < F)
        row = tl.where(ok, row, 0)
        idx = tl.where(ok, idx, 0)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):  # an empty entry reads row 0 of each (in bounds) and stores 0
            m = (d0 + offs_d) < D
            a = tl.load(src_ptr + row * D + d0 + offs_d, mask=m, other=0.0).to(tl.float32)
            w = tl.load(weight_ptr + idx * D + d0 + offs_d, mask=m, other=0.0).to(tl.float32)
            acc += a * w
        tl.store(out_ptr + e, tl.where(ok, tl.sum(acc, axis=0), 0.0), mask=live)


# Host launchers ----------------------------------------------------------------


def gather_rows(
    vals: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    row_offsets: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    minus: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """The decode ``out[b] = bias + sum over row b's entries of vals * weight[indices]``: [B, D] in
    ``out_dtype`` (default: weight's dtype), accumulated in fp32 with one rounding.

    The code is [B, K] (vals, indices), or with ``row_offsets`` [B + 1] a variable-length code: flat
    [N] (vals, indices), row b's entries at row_offsets[b]:row_offsets[b+1] (entries past
    row_offsets[B] are unused). With ``minus = (t, scale, const)`` (t [B, D], scale a 0-d float
    tensor), ``out`` is ``bias + sum - scale * const * t``, the subtraction in fp32 before the one
    rounding. ``counts`` ([F] int64): each entry with an id in [0, F) and a value > 0 adds 1 to
    counts[id] (the fire counts, in the same walk).
    """
    return _gather(vals, indices, weight, bias, out_dtype=out_dtype, row_offsets=row_offsets, counts=counts,
                   minus=minus)  # fmt: skip


def gather_residual(
    vals: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    row_offsets: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's MSE epilogue in the decode's walk: (residual [B, D] fp32 = ``gather_rows(...) - target``
    before any rounding, sq [] fp32 = sum(residual^2)). The code and ``counts`` as ``gather_rows``'s."""
    return _gather(vals, indices, weight, bias, target=target, row_offsets=row_offsets, counts=counts)


def gather_level_residuals(
    vals: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    row_offsets: torch.Tensor,
    level_ends: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """G nested prefix reconstructions in one walk (Matryoshka): a variable-length code (``row_offsets``)
    ordered by latent id in each row, and ``level_ends`` [B, G] int64: level g of row b ends before
    entry level_ends[b, g]. Returns (residuals [G, B, D] fp32, level g's ``gather_residual`` of the
    entries before its end; sq [G] fp32, each level's sum of squares)."""
    return _gather(vals, indices, weight, bias, target=target, row_offsets=row_offsets, level_ends=level_ends)


def _gather(
    vals, indices, weight, bias, *, target=None, out_dtype=None, row_offsets=None, level_ends=None, counts=None,
    minus=None,
):  # fmt: skip
    """One launch of ``_gather_rows_kernel`` (or the plain-torch path) for the three functions above."""
    varlen = row_offsets is not None
    B, K = (row_offsets.numel() - 1, 0) if varlen else indices.shape
    F, D = weight.shape
    dev = weight.device
    levels = 0 if level_ends is None else level_ends.shape[1]
    if (counts is not None and levels) or (minus is not None and target is not None):
        raise ValueError("gather_rows: counts does not go with level_ends, nor minus with target")
    if not use_triton(weight):
        if levels:
            return _gather_levels_torch(vals, indices, weight, bias, target, row_offsets, level_ends)
        if counts is not None:
            n = B * K if not varlen else int(row_offsets[-1])
            ids, v = indices.reshape(-1)[:n], vals.reshape(-1)[:n]
            fired = ((ids >= 0) & (ids < F) & (v > 0)).to(torch.int64)
            counts.index_add_(0, ids.clamp(0, F - 1).long(), fired)
        return _gather_rows_torch(vals, indices, weight, bias, target, out_dtype, row_offsets, minus)
    BLOCK_D = block_d(D)
    ND = triton.cdiv(D, BLOCK_D)
    has_target = target is not None
    if levels:
        out = torch.empty(levels, B, D, device=dev, dtype=torch.float32)
        sq = torch.empty(levels, B, ND, device=dev, dtype=torch.float32)
    elif has_target:
        out = torch.empty(B, D, device=dev, dtype=torch.float32)
        sq = torch.empty(B, ND, device=dev, dtype=torch.float32)
    else:
        out = torch.empty(B, D, device=dev, dtype=out_dtype or weight.dtype)
        sq = out
    if B > 0:
        _gather_rows_kernel[(B, ND)](
            indices,
            vals,
            row_offsets if varlen else indices,
            level_ends if levels else indices,
            weight,
            bias if bias is not None else weight,
            target if has_target else minus[0] if minus is not None else weight,
            out,
            sq,
            counts if counts is not None else indices,
            minus[1] if minus is not None else weight,
            float(minus[2]) if minus is not None else 1.0,
            B,
            K,
            F,
            D,
            BLOCK_D=BLOCK_D,
            UNROLL=TUNING["gather_unroll"],
            HAS_BIAS=bias is not None,
            HAS_TARGET=has_target,
            VARLEN=varlen,
            LEVELS=levels,
            COUNT=counts is not None,
            MINUS=minus is not None,
            num_warps=TUNING["gather_warps"],
        )
    if levels:
        return out, sq.sum((1, 2))
    if not has_target:
        return out
    return out, sq.sum()


def _gather_rows_torch(vals, indices, weight, bias, target, out_dtype=None, row_offsets=None, minus=None):
    """The plain-torch path: same math, fp32 accumulation, one latent column at a time
    (a variable-length code: one entry at a time, added to its row)."""
    F, D = weight.shape
    bad = (indices < 0) | (indices >= F)
    idx = indices.clamp(0, F - 1).long()
    v = torch.where(bad, float("nan"), vals.float())
    if row_offsets is not None:
        B = row_offsets.numel() - 1
        acc = torch.zeros(B, D, dtype=torch.float32, device=weight.device)
        if bias is not None:
            acc += bias.float()
        n = int(row_offsets[-1])
        rows = row_ids(row_offsets, n)
        acc.index_add_(0, rows, v[:n, None] * weight[idx[:n]].float())
    else:
        B, K = indices.shape
        acc = torch.zeros(B, D, dtype=torch.float32, device=weight.device)
        if bias is not None:
            acc += bias.float()
        for k in range(K):
            acc += v[:, k, None] * weight[idx[:, k]].float()
    if target is None:
        if minus is not None:
            t, scale, const = minus
            acc -= (scale.float() * const) * t.float()
        return acc.to(out_dtype or weight.dtype)
    r = acc - target.float()
    return r, (r * r).sum()


def _gather_levels_torch(vals, indices, weight, bias, target, row_offsets, level_ends):
    """The plain-torch path of the prefix levels: each level's reconstruction from its entries."""
    n = int(row_offsets[-1])
    rows = row_ids(row_offsets, n)
    pos = torch.arange(n, device=vals.device)
    out = []
    for g in range(level_ends.shape[1]):
        keep = torch.zeros_like(vals, dtype=torch.bool)
        keep[:n] = pos < level_ends[rows, g]
        r, _ = _gather_rows_torch(torch.where(keep, vals, 0), indices, weight, bias, target, None, row_offsets)
        out.append(r)
    res = torch.stack(out)
    return res, res.pow(2).sum((1, 2))


def row_ids(row_offsets: torch.Tensor, n: int) -> torch.Tensor:
    """The row of each of the first ``n`` entries of a variable-length code; [n] int64 (B past the last row)."""
    entries = torch.arange(n, device=row_offsets.device, dtype=row_offsets.dtype)
    return torch.searchsorted(row_offsets, entries, right=True) - 1


def row_dots(src: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``dots[e] = <src[rows[e]], weight[ids[e]]>`` for each entry of a code, fp32 [N] (fp32 accumulation).

    ``src`` [B, D] and ``weight`` [F, D] in any float dtype; an entry whose row is outside [0, B) or
    whose id is outside [0, F) (an empty slot) gets 0 (the kernel reads row 0 of each for it, in
    bounds since B, F >= 1 there). The encoder's value at a
    code's entries without the [B, F] product: O(N * D) reads, one program per four entries.
    """
    N = ids.numel()
    B, D = src.shape
    F = weight.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=src.device)
    if N == 0:
        return out
    if B == 0:
        return out.zero_()
    if not use_triton(src):
        ok = (rows >= 0) & (rows < B) & (ids >= 0) & (ids < F)
        a = src[rows.clamp(0, B - 1)].float()
        w = weight[ids.clamp(0, F - 1)].float()
        return torch.where(ok, (a * w).sum(1), 0.0)
    entries = 4
    BLOCK_D = min(512, max(16, next_pow2(D)))
    _row_dots_kernel[(triton.cdiv(N, entries),)](
        src.contiguous(), weight.contiguous(), rows.contiguous(), ids.contiguous(), out, N, B, F, D,
        ENTRIES=entries, BLOCK_D=BLOCK_D, num_warps=4,
    )  # fmt: skip
    return out


class LevelRows(NamedTuple):
    """Matryoshka's per-latent row blocks: latent f reads its rows of a stacked [G * stride, D] source
    from block ``ids[f]`` ([F] int32 prefix level), each block ``stride`` rows."""

    ids: torch.Tensor
    stride: int


def gather_rows_backward(
    grad: torch.Tensor,
    vals: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    scale_const: float = 1.0,
    csr: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: torch.Tensor | None = None,
    levels: LevelRows | None = None,
    row_out: RowOut = PLAIN_ROWS,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``scale * scale_const * <grad, gather_rows(vals, indices, weight)>``.

    ``grad`` is a [B, D] row source, read as fp32. Returns (dweight [F, D] in
    weight's dtype, scaled; dots, shaped as ``indices``, fp32 =
    <grad[row], weight[indices]>, unscaled), both from one segmented pass.
    ``csr`` reuses a (perm, offsets) transpose of ``indices``; for a
    variable-length code, ``rows`` [N] is each entry's row (``row_ids``), and
    unused entries must have an id outside [0, F) (they join no segment). With ``levels``
    (``LevelRows``) ``grad`` stacks one [B, D] block per prefix level and latent f reads block
    levels.ids[f]. ``row_out`` (``csr.RowOut``): its ``term`` adds a gradient along each row of dweight
    before its rounding; with its ``update`` the pass applies the optimizer to ``weight``'s rows in place
    instead, and dweight comes back None.
    """
    perm, offsets, source, dweight = _backward_pass(grad, indices, weight, csr, rows, levels, row_out.update)
    dots = segment_sum_dots(perm, offsets, source, out=dweight, coef=vals, weight=weight, scale=scale,
                            scale_const=scale_const, row_out=row_out)  # fmt: skip
    return (None if row_out.update is not None else dweight), dots.reshape(indices.shape)


def gather_rows_backward_gated(
    grad: torch.Tensor,
    vals: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: torch.Tensor,
    scale_const: float,
    csr: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: torch.Tensor | None = None,
    levels: LevelRows | None = None,
    row_out: RowOut = PLAIN_ROWS,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``gather_rows_backward`` whose dots come back scaled (``scale * scale_const``) where the value is
    > 0 and 0 elsewhere: a ReLU code's gradient at its pre-activations, fp32 shaped as ``indices``,
    with no pass of its own. Returns (dweight, that gradient); ``row_out``: as there."""
    perm, offsets, source, dweight = _backward_pass(grad, indices, weight, csr, rows, levels, row_out.update)
    dots = segment_sum_dots(perm, offsets, source, out=dweight, coef=vals, weight=weight, scale=scale,
                            scale_const=scale_const, row_out=row_out, gated_dots=True)  # fmt: skip
    return (None if row_out.update is not None else dweight), dots.reshape(indices.shape)


def _backward_pass(grad, indices, weight, csr, rows, levels, update):
    """The adjoint's set-up: (perm, offsets) of ``indices`` (``csr`` when given), the rows it reads
    (``csr.SegmentRows`` over ``grad``) and the [F, D] dweight it writes (the weight itself with ``update``)."""
    K = indices.shape[1] if indices.ndim == 2 else 1
    F = weight.shape[0]
    dweight = weight if update is not None else torch.empty_like(weight)
    perm, offsets = csr if csr is not None else csr_transpose(indices, F)
    source = SegmentRows(
        src=grad.contiguous(),
        K=K,
        rows=rows,
        levels=levels.ids if levels is not None else None,
        level_stride=levels.stride if levels is not None else 0,
    )
    return perm, offsets, source, dweight
