"""CSR transpose of the sparse code and the deterministic segmented row sum.

Every weight gradient in flash-sae has the form

    dW[f] = scale * sum over (b, k) with indices[b, k] == f of coef[b, k] * row(b, k)

where ``row`` is a [D] vector (a residual row, an upstream-gradient row, or a
per-element row of a contribution buffer). A scatter with float atomics would be
nondeterministic, so we transpose the code instead: a stable sort of the B*K
latent ids gives ``perm`` (element ids grouped by latent, ascending (b, k) order
inside each group) and ``offsets`` ([F + 1] segment bounds). One program per
(latent, D-block) then sums its segment in a fixed order and writes its dW block
exactly once, zero rows included, so the dense [F, D] gradient needs no separate
zero-fill and the result is bitwise reproducible.

Optionally, the same pass returns ``dots[e] = <row(e), W[f]>`` per element, the
gather-dot that the gradient of ``vals`` needs, reading each touched row of W
once instead of once per occurrence.

Bytes: reads W's touched rows (dots and the coefficient-scaled row term; an untouched
latent's row is read only for a row term not scaled by its coefficients), the segment rows
(often L2 resident: they are [B, D] fp32), writes F*D gradient elements. No float atomics.
Indices outside [0, F) sort outside every segment and are ignored here; the
forward kernels poison their outputs with NaN instead.
"""

import torch
import triton
import triton.language as tl

from .._launch import TUNING, segment_block_d, use_triton
from .triton_utils import cast_rtne

# Kernels -----------------------------------------------------------------------


@triton.jit
def _segment_sum_kernel(
    offsets_ptr,  # [F + 1] int64 segment bounds into perm
    perm_ptr,  # [N] int64 element ids e = b * K + k, grouped by latent
    src_ptr,  # [rows, stride_src] float; row e (ELEMENT_ROWS), rows[e] (ROW_IDS) or row e // K
    rows_ptr,  # [N] int64 row of each element (ROW_IDS: a variable-length code)
    level_ptr,  # [F] int32 prefix level of each latent: its rows come from block level * level_stride (HAS_LEVEL)
    coef_ptr,  # [N] float per-element coefficient (HAS_COEF)
    scale_ptr,  # [] float upstream scalar (HAS_SCALE)
    w_ptr,  # [F, D] float weight, read for dots (HAS_DOTS)
    dw_ptr,  # [F, D] out gradient, weight's dtype
    dots_ptr,  # [ND, N] fp32 out: partial dots per D-block of the window (HAS_DOTS)
    csum_ptr,  # [F] fp32 out: scaled sum of the segment's coefficients (HAS_CSUM)
    row_ptr,  # [F] fp32: out[f] also gets row[f] * (sum of the segment's coefficients) * w[f] (ROW_TERM),
    # or row[f] * w[f] (ROW_TERM and not ROW_BY_CSUM)
    sbias_ptr,  # [width] float: subtracted (in fp32) from every row of src (SRC_BIAS)
    N,
    K,
    D,
    stride_src,
    d_base,  # first column of the window this launch covers
    d_width,  # columns in the window
    scale_const,
    level_stride,
    BLOCK_D: tl.constexpr,
    UNROLL: tl.constexpr,
    ELEMENT_ROWS: tl.constexpr,
    ROW_IDS: tl.constexpr,
    HAS_LEVEL: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_DOTS: tl.constexpr,
    HAS_CSUM: tl.constexpr,
    ROW_TERM: tl.constexpr,
    ROW_BY_CSUM: tl.constexpr,
    GATED_DOTS: tl.constexpr,  # (HAS_DOTS, HAS_COEF) dots * the scale where coef > 0, else 0
    SRC_BIAS: tl.constexpr,
):
    f = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # column inside the window
    mask_c = offs_c < d_width
    cols = d_base + offs_c
    start = tl.load(offsets_ptr + f)
    end = tl.load(offsets_ptr + f + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    csum = tl.sum(acc, axis=0)
    row_base = 0
    if HAS_LEVEL:
        row_base = tl.load(level_ptr + f).to(tl.int64) * level_stride
    if HAS_DOTS or ROW_TERM:
        # An empty segment needs W[f] only for a row term not scaled by the (zero) coefficient sum:
        # skipping the read saves F * (share of untouched latents) rows at large F.
        mask_w = mask_c & (offs_c * 0 + start < end)
        if ROW_TERM and not ROW_BY_CSUM:
            mask_w = mask_c
        w = tl.load(w_ptr + f * D + cols, mask=mask_w, other=0.0).to(tl.float32)
    if GATED_DOTS:  # the scale is needed inside the loop (elsewhere it is loaded after it, as before)
        scale = scale_const
        if HAS_SCALE:
            scale = scale * tl.load(scale_ptr).to(tl.float32)
    if HAS_DOTS:
        dots_blk = dots_ptr + pid_d.to(tl.int64) * N
    if SRC_BIAS:
        sbias = tl.load(sbias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    for i0 in range(start, end, UNROLL):
        for u in tl.static_range(UNROLL):
            i = i0 + u
            live = i < end
            e = tl.load(perm_ptr + i, mask=live, other=0)
            if ELEMENT_ROWS:
                row = e
            elif ROW_IDS:
                row = tl.load(rows_ptr + e, mask=live, other=0) + row_base
            else:
                row = e // K + row_base
            live_c = mask_c & (offs_c * 0 + i < end)
            x = tl.load(src_ptr + row * stride_src + offs_c, mask=live_c, other=0.0).to(tl.float32)
            if SRC_BIAS:
                x = tl.where(live_c, x - sbias, 0.0)
            if HAS_COEF:
                c = tl.load(coef_ptr + e, mask=live, other=0.0).to(tl.float32)
                acc += c * x
                if HAS_CSUM or ROW_BY_CSUM:
                    csum += c
            else:
                acc += x
            if HAS_DOTS:
                if GATED_DOTS:
                    tl.store(dots_blk + e, tl.where(c > 0, tl.sum(x * w, axis=0) * scale, 0.0), mask=live)
                else:  # as it was before GATED_DOTS (a reordered store address measured 3.7 % slower)
                    tl.store(dots_blk + e, tl.sum(x * w, axis=0), mask=live)
    if not GATED_DOTS:
        scale = scale_const
        if HAS_SCALE:
            scale = scale * tl.load(scale_ptr).to(tl.float32)
    out = acc * scale
    if ROW_BY_CSUM:
        out += tl.load(row_ptr + f) * csum * w
    elif ROW_TERM:
        out += tl.load(row_ptr + f) * w
    tl.store(dw_ptr + f * D + cols, cast_rtne(out, dw_ptr.dtype.element_ty), mask=mask_c)
    if HAS_CSUM:
        tl.store(csum_ptr + f, csum * scale, mask=pid_d == 0)


# Host launchers ----------------------------------------------------------------


def csr_transpose(indices: torch.Tensor, F: int, in_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups the B*K elements of ``indices`` by latent, deterministically.

    Returns ``perm`` ([B*K] int64 element ids, stable within each latent) and
    ``offsets`` ([F + 1] int64): latent f owns perm[offsets[f]:offsets[f+1]].
    Out-of-range ids are clamped to -1 or F, so they fall outside every segment;
    ``in_range``: the caller's ids are already in [-1, F) (a code the package selected), and the
    clamp, one launch, is skipped.
    """
    flat = indices.reshape(-1)
    if not in_range:
        flat = flat.clamp(-1, F)
    key_dtype = torch.int32 if F < 2**31 - 1 else torch.int64
    keys = flat.to(key_dtype)
    sorted_keys, perm = torch.sort(keys, stable=True)
    bounds = torch.arange(F + 1, device=indices.device, dtype=key_dtype)
    offsets = torch.searchsorted(sorted_keys, bounds)
    return perm, offsets


def segment_sum(
    perm: torch.Tensor,
    offsets: torch.Tensor,
    src: torch.Tensor,
    *,
    K: int,
    out: torch.Tensor,
    element_rows: bool,
    coef: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    scale_const: float = 1.0,
    weight: torch.Tensor | None = None,
    d_base: int = 0,
    coef_sum: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    levels: torch.Tensor | None = None,
    level_stride: int = 0,
    row_term: torch.Tensor | None = None,
    row_term_by_coef: bool = True,
    gated_dots: bool = False,
    src_bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Writes ``out[:, d_base:d_base + src.shape[1]]`` in one deterministic pass.

    ``out`` is the [F, D] gradient. ``src`` is read as fp32, [N, w] when
    ``element_rows`` (a row per element), else [B, w] with element e's row
    ``rows[e]`` (a variable-length code, ``rows`` given) or e // K (a [B, K] code).
    With ``levels`` ([F] int32, Matryoshka), ``src`` stacks one block of ``level_stride`` rows
    per prefix level, and latent f reads its rows from block levels[f]. Each element's
    row is multiplied by ``coef[e]``; the sum by ``scale_const * scale``.
    With ``weight``, also returns ``dots`` [N] fp32: <row(e), weight[f]> over the
    window's columns, unscaled (rows of out-of-range elements stay 0).
    With ``coef_sum`` (an [F] fp32 tensor), also writes into it the scaled sum
    of each segment's coefficients (the bias gradient), in the same pass.
    With ``row_term`` (an [F] fp32 tensor; needs ``weight`` and ``coef``), ``out[f]`` also gets
    ``row_term[f] * (sum of f's coefficients) * weight[f]`` before its one rounding (a gradient
    along each row, e.g. a decoder-norm-weighted penalty's); with ``row_term_by_coef`` False,
    ``row_term[f] * weight[f]`` (the caller has summed what the row term scales).
    ``gated_dots`` (needs ``weight`` and ``coef``): each dot is multiplied by the sum's scale
    (``scale_const * scale``) where its coefficient is > 0 and is 0 elsewhere (a ReLU code's
    gradient at the pre-activations, with no [N] pass of its own); per D-block of the window.
    ``src_bias`` ([src.shape[1]]): subtracted in fp32 from every row of ``src`` as it is read (the
    encoder's centring x - b_dec, without an fp32 copy of it).
    """
    F, D = out.shape
    N = perm.numel()
    width = src.shape[1]
    if row_term is not None and (weight is None or (coef is None and row_term_by_coef)):
        raise ValueError("segment_sum: row_term needs weight (and coef unless row_term_by_coef is False)")
    want_dots = weight is not None
    if gated_dots and (not want_dots or coef is None):
        raise ValueError("segment_sum: gated_dots needs weight and coef")
    if not use_triton(src):
        return _segment_sum_torch(
            perm,
            offsets,
            src,
            K,
            out,
            element_rows,
            coef,
            scale,
            scale_const,
            weight,
            d_base,
            coef_sum,
            rows,
            levels,
            level_stride,
            row_term,
            row_term_by_coef,
            gated_dots,
            src_bias,
        )
    BLOCK_D = segment_block_d(width)
    ND = triton.cdiv(width, BLOCK_D)
    dots = torch.zeros(ND, N, device=src.device, dtype=torch.float32) if want_dots else None
    dummy = out
    _segment_sum_kernel[(F, ND)](
        offsets,
        perm,
        src,
        rows if rows is not None else perm,
        levels if levels is not None else perm,
        coef if coef is not None else dummy,
        scale if scale is not None else dummy,
        weight if want_dots else dummy,
        out,
        dots if want_dots else dummy,
        coef_sum if coef_sum is not None else dummy,
        row_term if row_term is not None else dummy,
        src_bias if src_bias is not None else dummy,
        N,
        K,
        D,
        src.stride(0),
        d_base,
        width,
        float(scale_const),
        level_stride,
        BLOCK_D=BLOCK_D,
        UNROLL=TUNING["segment_unroll"],
        ELEMENT_ROWS=element_rows,
        ROW_IDS=rows is not None,
        HAS_LEVEL=levels is not None,
        HAS_COEF=coef is not None,
        HAS_SCALE=scale is not None,
        HAS_DOTS=want_dots,
        HAS_CSUM=coef_sum is not None,
        ROW_TERM=row_term is not None,
        ROW_BY_CSUM=row_term is not None and row_term_by_coef,
        GATED_DOTS=gated_dots,
        SRC_BIAS=src_bias is not None,
        num_warps=TUNING["segment_warps"],
    )
    if not want_dots:
        return None
    return dots[0] if ND == 1 else dots.sum(0)  # one D-block: no reduction launch


def _segment_sum_torch(
    perm,
    offsets,
    src,
    K,
    out,
    element_rows,
    coef,
    scale,
    scale_const,
    weight,
    d_base,
    coef_sum,
    rows=None,
    levels=None,
    level_stride=0,
    row_term=None,
    row_term_by_coef=True,
    gated_dots=False,
    src_bias=None,
):
    """Plain-torch path for CPU tensors: the same sums."""
    F = out.shape[0]
    width = src.shape[1]
    lo, hi = int(offsets[0]), int(offsets[-1])
    e = perm[lo:hi]
    row_of = e if element_rows else (rows[e] if rows is not None else e // K)
    latent = torch.repeat_interleave(torch.arange(F, device=src.device), offsets.diff())
    if levels is not None:
        row_of = row_of + levels[latent].long() * level_stride
    x = src[row_of].float()
    if src_bias is not None:
        x = x - src_bias.float()
    contrib = x * coef.reshape(-1)[e].float()[:, None] if coef is not None else x
    acc = torch.zeros(F, width, dtype=torch.float32, device=src.device)
    acc.index_add_(0, latent, contrib)
    s = scale_const * (scale.float() if scale is not None else 1.0)
    acc = acc * s
    if coef_sum is not None or (row_term is not None and row_term_by_coef):
        c = torch.zeros(F, dtype=torch.float32, device=src.device)
        c.index_add_(0, latent, coef.reshape(-1)[e].float())
        if coef_sum is not None:
            coef_sum.copy_(c * s)
        if row_term is not None:
            by = c if row_term_by_coef else 1.0
            term = (row_term * by)[:, None] * weight[:, d_base : d_base + width].float()
            if row_term_by_coef:  # as the kernel: an empty segment's term is 0, whatever its row of W holds
                term = torch.where((offsets.diff() > 0)[:, None], term, 0.0)
            acc += term
    elif row_term is not None:
        acc += row_term[:, None] * weight[:, d_base : d_base + width].float()
    out[:, d_base : d_base + width] = acc.to(out.dtype)
    if weight is None:
        return None
    dots = torch.zeros(perm.numel(), dtype=torch.float32, device=src.device)
    dots[e] = (x * weight[latent, d_base : d_base + width].float()).sum(1)
    if gated_dots:
        dots = torch.where(coef.reshape(-1).float() > 0, dots * s, 0.0)
    return dots
