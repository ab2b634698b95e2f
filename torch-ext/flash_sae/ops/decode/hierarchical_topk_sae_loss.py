"""HierarchicalTopK SAE decoder loss (arXiv 2505.24473).

With prefix reconstructions ``r_j = bias + sum_{k<=j} vals_k * weight[idx_k]`` taken
in the column order of ``indices`` (callers pass top-k sorted by value, largest
first), the loss is ``mean over (B, K, D) of (r_j - target)^2``. Signature and
definition match flex-sae's.

Derivation of the backward. Let e_j = r_j - target and s = 2 * grad / (B*K*D).
Then dL/dr_j = s * e_j, and vals_k * weight[idx_k] enters every r_j with j >= k,
so with the suffix sums ``S_k = sum_{j>=k} e_j``:
    dvals_k  = s * <S_k, weight[idx_k]>
    dweight[idx_k] += s * vals_k * S_k
    dbias    = s * sum_b S_0,   dtarget = -s * S_0.
S_k is a different [D] vector for every (b, k), produced by a reverse scan over
k in row order; the weight gradient needs it grouped by latent. Deterministic
(atomic-free) means a transpose of B*K*D values, so the backward works on
windows of DC columns: a reverse-scan kernel writes ``vals_k * S_k`` for the
window into a buffer [B*K, DC] (at most ``TUNING["hierarchical_buffer_bytes"]``, which
bounds the transient memory), and the shared CSR segmented sum
(``primitives.csr``) reduces
it per latent into the window of dweight. The scan rebuilds e_j backwards from the saved final
residual, ``e_{j-1} = e_j - vals_j * weight[idx_j]``, so nothing of size
B*K*D is kept between forward and backward.

What is fused:
- forward, one pass per (row, D-block): the K gathered rows, the running
  prefix residual e_j, the squared-error sum, and the two [B, D] fp32 rows the
  backward needs: the final residual e_{K-1} and S_0 = sum_j e_j.
- backward: one reverse-scan pass (gather, dvals dot, contribution rows) and
  one segmented sum per window.

The buffer's dtype (``buffer_dtype``): bf16 when the weight is bf16 (unless
``TUNING["hierarchical_bf16_buffer"]`` is False), else fp32. A bf16 weight
gradient is itself rounded to bf16; each stored contribution carries one more
rounding of that size (at most 2^-8 relative) before the fp32 segmented sum, which
halves the buffer's traffic. fp16 weights keep fp32 contributions (fp16's range
could overflow on v * S, and bf16 would lose fp16's finer rounding).

Bytes (bf16, B=2048, D=2304, F=65536, K=64): forward 604 MB gathered; backward
604 MB gathered again, 302 MB of dweight writes, and the contribution buffer
(604 MB bf16 written and read back; 1.2 GB in fp32): the price of determinism
(its measured cost is in the docs' design notes, segmented-sum).

Precision: fp32 accumulation; loss returned in fp32, gradients in their
parameter's dtype. Shapes: B >= 1, 1 <= K <= F, D >= 1, any sizes.
"""

import torch
import triton
import triton.language as tl

from ..._launch import TUNING, block_d, use_triton
from ..._registry import register_op
from ..._validation import check_index_range
from ...primitives.csr import SegmentRows, csr_transpose, segment_sum_scaled
from ...primitives.triton_utils import cast_rtne, load_latent
from ._loss import DecoderLossInputs, loss_fwd_fake, loss_gradients, loss_gradients_fake, loss_inputs

# Kernels -----------------------------------------------------------------------


@triton.jit
def _hierarchical_topk_sae_loss_fwd_kernel(
    idx_ptr,  # [B, K] int32/int64 latent ids
    vals_ptr,  # [B, K] float latent values
    w_ptr,  # [F, D] float decoder weight
    bias_ptr,  # [D] float
    target_ptr,  # [B, D] float
    res_ptr,  # [B, D] fp32 out: final residual e_{K-1}
    esum_ptr,  # [B, D] fp32 out: S_0 = sum_j e_j
    sq_ptr,  # [B, ND] fp32 out: partial sum_j sum_d e_j^2
    K,
    F,
    D,
    BLOCK_D: tl.constexpr,
    UNROLL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    ND = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    t = tl.load(target_ptr + b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    e = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) - t  # running e_j
    esum = tl.zeros([BLOCK_D], dtype=tl.float32)
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, UNROLL):
        for u in tl.static_range(UNROLL):
            k = k0 + u
            live = k < K
            idx, v = load_latent(idx_ptr, vals_ptr, b * K + k, live, F)
            live_d = mask_d & (offs_d * 0 + k < K)
            w = tl.load(w_ptr + idx * D + offs_d, mask=live_d, other=0.0)
            e += v * w.to(tl.float32)
            e_live = tl.where(live_d, e, 0.0)
            sq += e_live * e_live
            esum += e_live
    tl.store(res_ptr + b * D + offs_d, e, mask=mask_d)
    tl.store(esum_ptr + b * D + offs_d, esum, mask=mask_d)
    tl.store(sq_ptr + b * ND + pid_d, tl.sum(sq, axis=0))


@triton.jit
def _hierarchical_topk_sae_loss_bwd_kernel(
    idx_ptr,  # [B, K] int32/int64 latent ids
    vals_ptr,  # [B, K] float latent values
    w_ptr,  # [F, D] float decoder weight
    res_ptr,  # [B, D] fp32 final residual from the forward
    buf_ptr,  # [B*K, stride_buf] out (bf16 or fp32): vals_k * S_k for this column window
    dots_ptr,  # [ND, B, K] fp32 out: partial <S_k, W[idx_k]>
    B,
    K,
    F,
    D,
    stride_buf,
    d_base,  # first column of the window
    d_width,  # columns in the window
    BLOCK_D: tl.constexpr,
    UNROLL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = offs_c < d_width
    cols = d_base + offs_c
    dots_row = dots_ptr + ((d_base // BLOCK_D + pid_d).to(tl.int64) * B + b) * K
    e = tl.load(res_ptr + b * D + cols, mask=mask_c, other=0.0)  # e_k, walking k down
    s = tl.zeros([BLOCK_D], dtype=tl.float32)  # S_k = sum_{j>=k} e_j
    for k0 in range(0, K, UNROLL):
        for u in tl.static_range(UNROLL):
            k = K - 1 - (k0 + u)
            live = k >= 0
            idx, v = load_latent(idx_ptr, vals_ptr, b * K + k, live, F)
            live_c = mask_c & (offs_c * 0 + k >= 0)
            w = tl.load(w_ptr + idx * D + cols, mask=live_c, other=0.0).to(tl.float32)
            s = tl.where(live_c, s + e, s)
            tl.store(dots_row + k, tl.sum(s * w, axis=0), mask=live)
            contribution = cast_rtne(v * s, buf_ptr.dtype.element_ty)
            tl.store(buf_ptr + (b * K + k) * stride_buf + offs_c, contribution, mask=live_c)
            e -= v * w  # e_{k-1}


# Host launchers ----------------------------------------------------------------


def hierarchical_topk_sae_loss_fwd(i: DecoderLossInputs) -> tuple[torch.Tensor, ...]:
    """Returns (loss [] fp32, residual [B, D] fp32, esum [B, D] fp32); the last two are kept for backward."""
    if i.validate:
        check_index_range(i.indices, i.weight.shape[0])
    B, K = i.indices.shape
    F, D = i.weight.shape
    if not use_triton(i.weight):
        return _hierarchical_fwd_torch(i.indices, i.weight, i.vals, i.bias, i.target)
    BLOCK_D = block_d(D)
    ND = triton.cdiv(D, BLOCK_D)
    residual = torch.empty(B, D, device=i.weight.device, dtype=torch.float32)
    esum = torch.empty_like(residual)
    sq = torch.empty(B, ND, device=i.weight.device, dtype=torch.float32)
    _hierarchical_topk_sae_loss_fwd_kernel[(B, ND)](
        i.indices,
        i.vals,
        i.weight,
        i.bias,
        i.target,
        residual,
        esum,
        sq,
        K,
        F,
        D,
        BLOCK_D=BLOCK_D,
        UNROLL=TUNING["gather_unroll"],
        num_warps=TUNING["gather_warps"],
    )
    return sq.sum() / (B * K * D), residual, esum


def buffer_dtype(weight: torch.Tensor) -> torch.dtype:
    """The backward's contribution buffer: bf16 for a bf16 weight (its gradient is bf16 anyway), else fp32."""
    bf16 = weight.dtype == torch.bfloat16 and TUNING["hierarchical_bf16_buffer"]
    return torch.bfloat16 if bf16 else torch.float32


def window_columns(B: int, K: int, D: int, BLOCK_D: int, element_bytes: int = 4) -> int:
    """Columns per backward window: a multiple of BLOCK_D whose buffer fits the tuning table's cap."""
    fit = TUNING["hierarchical_buffer_bytes"] // max(1, B * K * element_bytes)
    cols = max(BLOCK_D, fit // BLOCK_D * BLOCK_D)
    return min(cols, triton.cdiv(D, BLOCK_D) * BLOCK_D)


def _weight_and_dots(grad, indices, weight, vals, residual):
    """Returns (dweight [F, D] weight's dtype, scaled by grad; dots [B, K] fp32 = <S_k, W[idx_k]>)."""
    B, K = indices.shape
    F, D = weight.shape
    dweight = torch.empty_like(weight)
    perm, offsets = csr_transpose(indices, F)
    scale_const = 2.0 / (B * K * D)
    if not use_triton(weight):
        buf, dots = _hierarchical_bwd_torch(indices, weight, vals, residual)
        elements = SegmentRows(src=buf, K=K, element_rows=True)
        segment_sum_scaled(perm, offsets, elements, out=dweight, scale=grad, scale_const=scale_const)
        return dweight, dots
    BLOCK_D = block_d(D)
    ND = triton.cdiv(D, BLOCK_D)
    dtype = buffer_dtype(weight)
    DC = window_columns(B, K, D, BLOCK_D, dtype.itemsize)
    buf = torch.empty(B * K, DC, device=weight.device, dtype=dtype)
    dots = torch.empty(ND, B, K, device=weight.device, dtype=torch.float32)
    for d0 in range(0, D, DC):
        width = min(DC, D - d0)
        _hierarchical_topk_sae_loss_bwd_kernel[(B, triton.cdiv(width, BLOCK_D))](
            indices,
            vals,
            weight,
            residual,
            buf,
            dots,
            B,
            K,
            F,
            D,
            DC,
            d0,
            width,
            BLOCK_D=BLOCK_D,
            UNROLL=TUNING["gather_unroll"],
            num_warps=TUNING["gather_warps"],
        )
        segment_sum_scaled(
            perm,
            offsets,
            SegmentRows(src=buf[:, :width], K=K, element_rows=True),
            out=dweight,
            scale=grad,
            scale_const=scale_const,
            d_base=d0,
        )
    return dweight, dots.sum(0)


def _gather_contributions(indices, weight, vals):
    F = weight.shape[0]
    bad = (indices < 0) | (indices >= F)
    v = torch.where(bad, float("nan"), vals.float())
    return v, v.unsqueeze(-1) * weight[indices.clamp(0, F - 1).long()].float()  # [B, K, D]


def _hierarchical_fwd_torch(indices, weight, vals, bias, target):
    """CPU path without the interpreter: same math in fp32."""
    B, K = indices.shape
    _, c = _gather_contributions(indices, weight, vals)
    e = (bias.float() - target.float()).unsqueeze(1) + c.cumsum(1)
    return (e * e).sum() / e.numel(), e[:, -1].contiguous(), e.sum(1)


def _hierarchical_bwd_torch(indices, weight, vals, residual):
    F = weight.shape[0]
    v, c = _gather_contributions(indices, weight, vals)
    after = c.flip(1).cumsum(1).flip(1) - c
    e = residual.unsqueeze(1) - after
    s = e.flip(1).cumsum(1).flip(1)
    w = weight[indices.clamp(0, F - 1).long()].float()
    buf = (v.unsqueeze(-1) * s).reshape(-1, weight.shape[1]).to(buffer_dtype(weight))
    return buf, (s * w).sum(-1)


def hierarchical_topk_sae_loss_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dweight, dvals, dbias, dtarget) with s = 2 * grad / (B*K*D); the reverse scan only for the first two."""
    B, K = saved.indices.shape
    s = grads.loss.float() * (2.0 / (B * K * saved.residual.shape[1]))
    return loss_gradients(
        needs,
        saved.weight,
        saved.vals,
        s,
        saved.esum,
        lambda: _weight_and_dots(grads.loss.float(), saved.indices, saved.weight, saved.vals, saved.residual),
    )


def hierarchical_topk_sae_loss_fwd_fake(i: DecoderLossInputs):
    return loss_fwd_fake(i, residuals=2)  # the residual and the prefix residuals' sum


def hierarchical_topk_sae_loss_bwd_fake(grads, saved, needs: list[bool]):
    weight, vals, residual = saved.weight, saved.vals, saved.residual
    return loss_gradients_fake(needs, weight, vals, residual)


# Op registration and autograd ----------------------------------------------------

_hierarchical_topk_sae_loss = register_op(
    "hierarchical_topk_sae_loss",
    inputs=DecoderLossInputs,
    launchers=(
        hierarchical_topk_sae_loss_fwd,
        hierarchical_topk_sae_loss_fwd_fake,
        hierarchical_topk_sae_loss_bwd,
        hierarchical_topk_sae_loss_bwd_fake,
    ),
    saved=("indices", "weight", "vals", "residual", "esum"),
    outputs=("loss", "residual", "esum"),
    differentiable=("loss",),
    grad_inputs=("weight", "vals", "bias", "target"),
)


# Public function ---------------------------------------------------------------


def hierarchical_topk_sae_loss(
    indices: torch.Tensor, weight: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, *,
    validate: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """HierarchicalTopK loss: mean squared error of every prefix reconstruction.

    Prefixes follow the column order of ``indices``: pass the top-k sorted by
    value, largest first (``torch.topk(..., sorted=True)`` does), so prefix j is
    the best (j+1)-sparse reconstruction the code offers.

    Arguments, shapes, dtypes and ``validate``: as ``topk_sae_loss`` (flex-sae's signature).

    Returns:
        A 0-d fp32 tensor: the mean over B*K*D squared errors. Differentiable in
        weight, vals, bias and target. B = 0 or K = 0 raise ValueError.
    """
    loss, _, _ = _hierarchical_topk_sae_loss(*loss_inputs(indices, weight, vals, bias, target, validate))
    return loss
