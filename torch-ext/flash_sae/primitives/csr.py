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

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._launch import TUNING, next_pow2, segment_block_d, use_triton
from .row_update import ClaimedUpdate, RowUpdate, adam_row, adam_rows_torch
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
    # or row[f] * w[f] (ROW_TERM and not ROW_BY_CSUM); [F, D // row_group] with ROW_GROUPS: column d
    # of out[f] reads row[f, d // row_group]
    sbias_ptr,  # [width] float: subtracted (in fp32) from every row of src (SRC_BIAS)
    master_ptr,  # [F, D] fp32 master rows (UPDATE and HAS_MASTER; dw_ptr is then the weight itself)
    m_ptr,  # [F, D] fp32 Adam moments (UPDATE)
    v_ptr,
    lr_ptr,  # [] fp32 learning rate (UPDATE)
    step_ptr,  # [] fp32 updates applied so far (UPDATE)
    slot_of_ptr,  # [F] int32 extra gradient row of each latent or -1 (HAS_SLOTS)
    slot_rows_ptr,  # [C, D] fp32 extra gradient rows (HAS_SLOTS)
    N,
    K,
    D,
    stride_src,
    d_base,  # first column of the window this launch covers
    d_width,  # columns in the window
    scale_const,
    level_stride,
    row_group,  # columns per group of the row term (ROW_GROUPS)
    beta1,  # Adam's (UPDATE)
    beta2,
    eps,
    weight_decay,
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
    ROW_GROUPS: tl.constexpr,  # (ROW_TERM) one row-term value per group of row_group columns
    GATED_DOTS: tl.constexpr,  # (HAS_DOTS, HAS_COEF) dots * the scale where coef > 0, else 0
    SRC_BIAS: tl.constexpr,
    UPDATE: tl.constexpr,  # apply Adam to the row (``row_update.adam_row``) instead of writing its gradient
    HAS_MASTER: tl.constexpr,
    UNIT_NORM: tl.constexpr,  # (UPDATE) the window is the whole row (one D-block)
    DECOUPLED: tl.constexpr,
    LAZY: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
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
    if ROW_TERM:
        if ROW_GROUPS:  # a grouped norm's term: each column reads its group's value
            n_groups = D // row_group
            row_val = tl.load(row_ptr + f * n_groups + cols // row_group, mask=mask_c, other=0.0)
        else:
            row_val = tl.load(row_ptr + f)
        if ROW_BY_CSUM:
            out += row_val * csum * w
        else:
            out += row_val * w
    if UPDATE:
        has_grad = start < end
        if HAS_SLOTS:
            slot = tl.load(slot_of_ptr + f).to(tl.int64)
            out += tl.load(slot_rows_ptr + slot * D + cols, mask=mask_c & (offs_c * 0 + slot >= 0), other=0.0)
            has_grad = has_grad | (slot >= 0)
        if LAZY:  # a row without a gradient is left as it is
            if has_grad:
                adam_row(out, f, cols, mask_c, D, dw_ptr, master_ptr, m_ptr, v_ptr, lr_ptr, step_ptr, beta1, beta2,
                         eps, weight_decay, HAS_MASTER, UNIT_NORM, DECOUPLED)  # fmt: skip
        else:
            adam_row(out, f, cols, mask_c, D, dw_ptr, master_ptr, m_ptr, v_ptr, lr_ptr, step_ptr, beta1, beta2, eps,
                     weight_decay, HAS_MASTER, UNIT_NORM, DECOUPLED)  # fmt: skip
    else:
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


class SegmentRows(NamedTuple):
    """The rows a segmented sum reads: element e's row of ``src`` ([rows, w], any float dtype, read as fp32).

    Row e itself with ``element_rows`` (``src`` [N, w], a row per element), else ``rows[e]`` (a
    variable-length code, ``rows`` [N] int64 given) or e // K (a [B, K] code). With ``levels`` ([F]
    int32, Matryoshka), ``src`` stacks one block of ``level_stride`` rows per prefix level and latent f
    reads its rows from block levels[f]. ``bias`` ([w]): subtracted in fp32 from every row as it is
    read (the encoder's centring x - b_dec, without an fp32 copy of it).
    """

    src: torch.Tensor
    K: int
    element_rows: bool = False
    rows: torch.Tensor | None = None
    levels: torch.Tensor | None = None
    level_stride: int = 0
    bias: torch.Tensor | None = None


class RowTerm(NamedTuple):
    """A gradient along each latent's weight row, added to out[f] before its one rounding:
    ``values[f] * (sum of f's coefficients) * weight[f]``, or ``values[f] * weight[f]`` when not
    ``by_coef`` (the caller has summed what the term scales). ``values``: [F] fp32.

    ``group`` > 0: the row is G = D / group blocks of ``group`` columns, each with its own value
    (``values`` [F, G] fp32; column d of row f reads values[f, d // group]): the gradient of a
    penalty weighted by a sum of per-block norms (a crosscoder's sum over layers of ||W_dec[f, l]||)."""

    values: torch.Tensor
    by_coef: bool = True
    group: int = 0


class RowOut(NamedTuple):
    """What each latent's summed row becomes before it leaves a pass: ``term`` (``RowTerm``) is added, and the
    row is written as the gradient, or, with ``update`` (``row_update.ClaimedUpdate``), applied to the weight
    by its optimizer (the pass then writes no gradient)."""

    term: RowTerm | None = None
    update: ClaimedUpdate | None = None


PLAIN_ROWS = RowOut()  # each row written as the gradient, nothing added


class SegmentPass(NamedTuple):
    """What one segmented pass writes besides its rows (``SegmentRows``): ``out`` [F, D] (the gradient,
    its columns ``d_base:d_base + w``), each element's row times ``coef[e]`` ([N] float; 1 without),
    the sum times ``scale_const * scale`` (``scale`` a 0-d float tensor, or None). With ``weight``
    ([F, D]) the pass also returns ``dots`` [N] fp32 = <row(e), weight[f]> over the window's columns,
    unscaled (out-of-range elements: 0); with ``gated_dots`` (needs ``weight`` and ``coef``) each dot
    is multiplied by the sum's scale where its coefficient is > 0 and is 0 elsewhere. ``coef_sum`` ([F]
    fp32) receives the scaled sum of each segment's coefficients. ``row_term``: see ``RowTerm`` (needs
    ``weight``, and ``coef`` when ``by_coef``).

    ``update`` (``row_update.ClaimedUpdate``): ``out`` is the weight itself, and each row gets Adam applied to
    its gradient (plus the update's extra slot rows) instead of the gradient written."""

    out: torch.Tensor
    coef: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    scale_const: float = 1.0
    weight: torch.Tensor | None = None
    d_base: int = 0
    coef_sum: torch.Tensor | None = None
    row_term: RowTerm | None = None
    gated_dots: bool = False
    update: ClaimedUpdate | None = None


def segment_sum_scaled(
    perm: torch.Tensor,
    offsets: torch.Tensor,
    rows: SegmentRows,
    *,
    out: torch.Tensor,
    scale: torch.Tensor,
    scale_const: float,
    d_base: int = 0,
) -> None:
    """Writes ``out[f, d_base:d_base + w] = scale_const * scale * sum of f's segment rows`` (``out`` [F, D],
    its dtype; ``scale`` a 0-d float tensor): one deterministic pass, every row written once."""
    _segment_sum(perm, offsets, rows, SegmentPass(out=out, scale=scale, scale_const=scale_const, d_base=d_base))


def segment_sum_weighted(
    perm: torch.Tensor,
    offsets: torch.Tensor,
    rows: SegmentRows,
    *,
    out: torch.Tensor,
    coef: torch.Tensor,
    coef_sum: torch.Tensor,
    update: ClaimedUpdate | None = None,
) -> None:
    """Writes ``out[f] = sum over f's segment of coef[e] * row(e)`` (``out`` [F, D], its dtype; ``coef`` [N]
    float) and ``coef_sum[f] = sum of f's coefficients`` ([F] fp32), in one deterministic pass. With
    ``update``, ``out`` is the weight, updated in place (``SegmentPass``)."""
    _segment_sum(perm, offsets, rows, SegmentPass(out=out, coef=coef, coef_sum=coef_sum, update=update))


def segment_sum_dots(
    perm: torch.Tensor,
    offsets: torch.Tensor,
    rows: SegmentRows,
    *,
    out: torch.Tensor,
    coef: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    scale_const: float = 1.0,
    row_out: RowOut = PLAIN_ROWS,
    gated_dots: bool = False,
) -> torch.Tensor:
    """Writes ``out[f] = scale_const * scale * sum over f's segment of coef[e] * row(e)`` (plus ``row_out``'s
    term; ``RowOut``) and returns ``dots`` [N] fp32 = <row(e), weight[f]>, unscaled, both from one pass reading
    each touched row of ``weight`` [F, D] once; with ``gated_dots`` the dots come back times the sum's scale
    where coef > 0, else 0 (a ReLU code's gradient at its pre-activations). With ``update``, ``out`` is
    ``weight``, updated in place after its dots are read. See ``SegmentPass``."""
    p = SegmentPass(out=out, coef=coef, scale=scale, scale_const=scale_const, weight=weight, row_term=row_out.term,
                    gated_dots=gated_dots, update=row_out.update)  # fmt: skip
    return _segment_sum(perm, offsets, rows, p)


def _segment_sum(perm: torch.Tensor, offsets: torch.Tensor, rows: SegmentRows, p: SegmentPass) -> torch.Tensor | None:
    """One launch of ``_segment_sum_kernel`` (or the plain-torch path on CPU tensors): writes
    ``p.out[:, p.d_base:p.d_base + w]`` and returns the dots with ``p.weight``, else None."""
    F, D = p.out.shape
    N = perm.numel()
    src = rows.src
    width = src.shape[1]
    row_term = p.row_term
    if row_term is not None and (p.weight is None or (p.coef is None and row_term.by_coef)):
        raise ValueError("segment_sum: row_term needs weight (and coef unless row_term_by_coef is False)")
    want_dots = p.weight is not None
    if p.gated_dots and (not want_dots or p.coef is None):
        raise ValueError("segment_sum: gated_dots needs weight and coef")
    update, slots = (p.update.update, p.update.slots) if p.update is not None else (None, None)
    if update is not None and (p.d_base != 0 or width != D):
        raise ValueError("segment_sum: a row update needs the whole row in one window")
    if not use_triton(src):
        return _segment_sum_torch(perm, offsets, rows, p)
    BLOCK_D = segment_block_d(width)
    warps = TUNING["segment_warps"]
    if update is not None and update.unit_norm:  # one program per whole row: its norms need every column
        BLOCK_D = max(16, next_pow2(width))
        warps = TUNING["segment_update_warps"] or max(1, min(16, BLOCK_D // 512))
    ND = triton.cdiv(width, BLOCK_D)
    dots = torch.zeros(ND, N, device=src.device, dtype=torch.float32) if want_dots else None
    out = p.out
    dummy = out
    _segment_sum_kernel[(F, ND)](
        offsets,
        perm,
        src,
        rows.rows if rows.rows is not None else perm,
        rows.levels if rows.levels is not None else perm,
        p.coef if p.coef is not None else dummy,
        p.scale if p.scale is not None else dummy,
        p.weight if want_dots else dummy,
        out,
        dots if want_dots else dummy,
        p.coef_sum if p.coef_sum is not None else dummy,
        row_term.values if row_term is not None else dummy,
        rows.bias if rows.bias is not None else dummy,
        update.master if update is not None and update.master is not None else dummy,
        update.exp_avg if update is not None else dummy,
        update.exp_avg_sq if update is not None else dummy,
        update.lr if update is not None else dummy,
        update.step if update is not None else dummy,
        slots.slot_of if slots is not None else dummy,
        slots.rows if slots is not None else dummy,
        N,
        rows.K,
        D,
        src.stride(0),
        p.d_base,
        width,
        float(p.scale_const),
        rows.level_stride,
        row_term.group if row_term is not None and row_term.group else 1,
        *_adam_scalars(update),
        BLOCK_D=BLOCK_D,
        UNROLL=TUNING["segment_unroll"],
        ELEMENT_ROWS=rows.element_rows,
        ROW_IDS=rows.rows is not None,
        HAS_LEVEL=rows.levels is not None,
        HAS_COEF=p.coef is not None,
        HAS_SCALE=p.scale is not None,
        HAS_DOTS=want_dots,
        HAS_CSUM=p.coef_sum is not None,
        ROW_TERM=row_term is not None,
        ROW_BY_CSUM=row_term is not None and row_term.by_coef,
        ROW_GROUPS=row_term is not None and row_term.group > 0,
        GATED_DOTS=p.gated_dots,
        SRC_BIAS=rows.bias is not None,
        UPDATE=update is not None,
        HAS_MASTER=update is not None and update.master is not None,
        UNIT_NORM=update is not None and update.unit_norm,
        DECOUPLED=update is not None and update.decoupled,
        LAZY=update is not None and update.lazy,
        HAS_SLOTS=slots is not None,
        num_warps=warps,
    )
    if not want_dots:
        return None
    return dots[0] if ND == 1 else dots.sum(0)  # one D-block: no reduction launch


def _adam_scalars(update: RowUpdate | None) -> tuple[float, float, float, float]:
    """(beta1, beta2, eps, weight_decay) of ``update`` (placeholders without one)."""
    if update is None:
        return 0.9, 0.999, 1e-8, 0.0
    return float(update.betas[0]), float(update.betas[1]), float(update.eps), float(update.weight_decay)


def _segment_sum_torch(
    perm: torch.Tensor, offsets: torch.Tensor, rows: SegmentRows, p: SegmentPass
) -> torch.Tensor | None:
    """Plain-torch path for CPU tensors: the same sums."""
    src, K, out, coef, weight, d_base = rows.src, rows.K, p.out, p.coef, p.weight, p.d_base
    F = out.shape[0]
    width = src.shape[1]
    lo, hi = int(offsets[0]), int(offsets[-1])
    e = perm[lo:hi]
    row_of = e if rows.element_rows else (rows.rows[e] if rows.rows is not None else e // K)
    latent = torch.repeat_interleave(torch.arange(F, device=src.device), offsets.diff())
    if rows.levels is not None:
        row_of = row_of + rows.levels[latent].long() * rows.level_stride
    x = src[row_of].float()
    if rows.bias is not None:
        x = x - rows.bias.float()
    contrib = x * coef.reshape(-1)[e].float()[:, None] if coef is not None else x
    acc = torch.zeros(F, width, dtype=torch.float32, device=src.device)
    acc.index_add_(0, latent, contrib)
    s = p.scale_const * (p.scale.float() if p.scale is not None else 1.0)
    acc = acc * s
    row_term = p.row_term
    by_coef = row_term is not None and row_term.by_coef
    if p.coef_sum is not None or by_coef:
        c = torch.zeros(F, dtype=torch.float32, device=src.device)
        c.index_add_(0, latent, coef.reshape(-1)[e].float())
        if p.coef_sum is not None:
            p.coef_sum.copy_(c * s)
        if row_term is not None:
            by = c if by_coef else 1.0
            term = _row_term_values(row_term, by, d_base, width) * weight[:, d_base : d_base + width].float()
            if by_coef:  # as the kernel: an empty segment's term is 0, whatever its row of W holds
                term = torch.where((offsets.diff() > 0)[:, None], term, 0.0)
            acc += term
    elif row_term is not None:
        acc += _row_term_values(row_term, 1.0, d_base, width) * weight[:, d_base : d_base + width].float()
    if p.update is None:
        out[:, d_base : d_base + width] = acc.to(out.dtype)
    if weight is None:
        _update_torch(acc, offsets, p)
        return None
    dots = torch.zeros(perm.numel(), dtype=torch.float32, device=src.device)
    dots[e] = (x * weight[latent, d_base : d_base + width].float()).sum(1)
    if p.gated_dots:
        dots = torch.where(coef.reshape(-1).float() > 0, dots * s, 0.0)
    _update_torch(acc, offsets, p)  # after the dots, which read the weight before its update
    return dots


def _update_torch(grad: torch.Tensor, offsets: torch.Tensor, p: SegmentPass) -> None:
    """``p.update`` applied to ``p.out`` (the weight) at gradient ``grad`` [F, w] fp32 plus its slot rows."""
    if p.update is None:
        return
    touched = offsets.diff() > 0
    slots = p.update.slots
    if slots is not None:
        has_slot = slots.slot_of >= 0
        grad = grad + torch.where(has_slot[:, None], slots.rows[slots.slot_of.long().clamp_min(0)], 0.0)
        touched = touched | has_slot
    adam_rows_torch(grad, p.out, p.update.update, touched)


def _row_term_values(row_term: RowTerm, by, d_base: int, width: int) -> torch.Tensor:
    """The row term's factor of each column of the window (fp32, [F, 1], or [F, width] when grouped)."""
    if not row_term.group:
        return (row_term.values * by)[:, None]
    cols = torch.arange(d_base, d_base + width, device=row_term.values.device) // row_term.group
    return row_term.values[:, cols] * (by[:, None] if isinstance(by, torch.Tensor) else by)
