"""Decoder geometry in one pass per row: unit-norm decoder rows, and the gradient with its component
along each decoder row removed (the two steps TopK trainers run around each optimiser step).

    unit_norm_rows_(W):        W[f] <- W[f] / ||W[f]||            (a zero row stays zero)
    remove_parallel_(W, G):    G[f] <- G[f] - (<G[f], W[f]> / ||W[f]||^2) W[f]

Both in place, fp32 arithmetic, each result rounded once to its tensor's dtype. One program per
row walks D in blocks twice (the reduction, then the update), so W and G are read twice (the
second read mostly from L2) and written once; no fp32 copy of the [F, D] matrices, where the
plain torch formulas (``modules.base.SAEBase``) build several: at F = 2^21, D = 2048 each such
copy is 16 GiB.

``rows`` (optional [F] bool) restricts the work to those rows; the others are left untouched
(a gradient row no code touched is zero, and its projection is zero too).
"""

import torch
import triton
import triton.language as tl

from .._launch import next_pow2, use_triton
from .._validation import check_same_device, check_shape, check_tensor
from .triton_utils import cast_rtne

TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _unit_norm_row(w_ptr, row, D, stride, tiny, BLOCK_D: tl.constexpr):
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + row * stride + offs, mask=offs < D, other=0.0).to(tl.float32)
        acc += w * w
    norm = tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), tiny)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + row * stride + offs, mask=offs < D, other=0.0).to(tl.float32)
        tl.store(w_ptr + row * stride + offs, cast_rtne(w / norm, w_ptr.dtype.element_ty), mask=offs < D)


@triton.jit
def _unit_norm_rows_kernel(w_ptr, rows_ptr, D, stride, tiny, BLOCK_D: tl.constexpr, HAS_ROWS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        if tl.load(rows_ptr + row) != 0:
            _unit_norm_row(w_ptr, row, D, stride, tiny, BLOCK_D)
    else:
        _unit_norm_row(w_ptr, row, D, stride, tiny, BLOCK_D)


@triton.jit
def _remove_parallel_row(w_ptr, g_ptr, row, D, stride_w, stride_g, BLOCK_D: tl.constexpr):
    wg = tl.zeros([BLOCK_D], dtype=tl.float32)
    ww = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + row * stride_w + offs, mask=offs < D, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + offs, mask=offs < D, other=0.0).to(tl.float32)
        wg += w * g
        ww += w * w
    c = tl.sum(wg, axis=0) / tl.maximum(tl.sum(ww, axis=0), 1e-30)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + row * stride_w + offs, mask=offs < D, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + offs, mask=offs < D, other=0.0).to(tl.float32)
        tl.store(g_ptr + row * stride_g + offs, cast_rtne(g - c * w, g_ptr.dtype.element_ty), mask=offs < D)


@triton.jit
def _remove_parallel_kernel(
    w_ptr, g_ptr, rows_ptr, D, stride_w, stride_g, BLOCK_D: tl.constexpr, HAS_ROWS: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        if tl.load(rows_ptr + row) != 0:
            _remove_parallel_row(w_ptr, g_ptr, row, D, stride_w, stride_g, BLOCK_D)
    else:
        _remove_parallel_row(w_ptr, g_ptr, row, D, stride_w, stride_g, BLOCK_D)


def _block_d(D: int) -> int:
    return min(1024, max(16, next_pow2(D)))


def _check(name: str, t, rows) -> tuple[int, int]:
    """A [F, D] float matrix with contiguous rows, and the optional [F] bool row mask on its device."""
    check_tensor(name, t, 2)
    if t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along D (rows contiguous)")
    F, D = t.shape
    if rows is not None:
        check_tensor("rows", rows, 1, (torch.bool,))
        check_shape("rows", rows, (F,))
        check_same_device(**{name: t, "rows": rows})
    return F, D


@torch.no_grad()
def unit_norm_rows_(W: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Scales each row of W [F, D] to unit L2 norm in place (fp32 arithmetic); returns W."""
    F, D = _check("W", W, rows)
    if F == 0 or D == 0:
        return W
    if not use_triton(W):
        w = W.float() if rows is None else W[rows].float()
        w = (w / w.norm(dim=1, keepdim=True).clamp_min(TINY)).to(W.dtype)
        if rows is None:
            W.copy_(w)
        else:
            W[rows] = w
        return W
    row_mask = rows.view(torch.uint8) if rows is not None else W
    _unit_norm_rows_kernel[(F,)](W, row_mask, D, W.stride(0), TINY, BLOCK_D=_block_d(D), HAS_ROWS=rows is not None)
    return W


@torch.no_grad()
def remove_parallel_(W: torch.Tensor, G: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Removes from each row of G [F, D] its component along the same row of W, in place; returns G."""
    F, D = _check("W", W, rows)
    _check("G", G, None)
    check_shape("G", G, (F, D))
    check_same_device(W=W, G=G)
    if F == 0 or D == 0:
        return G
    if not use_triton(W):
        sel = slice(None) if rows is None else rows
        w, g = W[sel].float(), G[sel].float()
        g -= (g * w).sum(1, keepdim=True) / w.pow(2).sum(1, keepdim=True).clamp_min(1e-30) * w
        G[sel] = g.to(G.dtype)
        return G
    _remove_parallel_kernel[(F,)](
        W,
        G,
        rows.view(torch.uint8) if rows is not None else W,
        D,
        W.stride(0),
        G.stride(0),
        BLOCK_D=_block_d(D),
        HAS_ROWS=rows is not None,
    )
    return G


@triton.jit
def _add_scaled_rows_kernel(out_ptr, base_ptr, w_ptr, scale_ptr, D, BLOCK_D: tl.constexpr, HAS_BASE: tl.constexpr):
    """out[f] = (base[f] or out[f]) + scale[f] * w[f] in fp32, one rounding to out's dtype."""
    row = tl.program_id(0).to(tl.int64)
    a = tl.load(scale_ptr + row)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = cols < D
    if HAS_BASE:
        acc = tl.load(base_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    else:
        acc = tl.load(out_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    if a != 0.0:
        acc += a * tl.load(w_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, cast_rtne(acc, out_ptr.dtype.element_ty), mask=inside)


@torch.no_grad()
def add_scaled_rows_(
    out: torch.Tensor, W: torch.Tensor, scale: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """out[f] = base[f] + scale[f] * W[f] (``base`` fp32 [F, D]; default: out itself) for contiguous
    out, W [F, D] and fp32 scale [F], fp32 arithmetic and one rounding per entry (a gradient term along
    each decoder row, e.g. that of a norm-weighted L1, added to an fp32 product before it is rounded)."""
    F = out.shape[0]
    D = out[0].numel() if F else 0
    if F == 0 or D == 0:
        return out
    if not use_triton(out):
        acc = base if base is not None else out.float()
        out.copy_((acc + scale[:, None] * W.float()).to(out.dtype))
        return out
    bd = min(_block_d(D), 1024)
    _add_scaled_rows_kernel[(F, triton.cdiv(D, bd))](
        out, base if base is not None else out, W, scale, D, BLOCK_D=bd, HAS_BASE=base is not None, num_warps=4
    )
    return out
