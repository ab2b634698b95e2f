"""Sparse decode: ``x_hat[b] = bias + sum_k vals[b, k] * weight[indices[b, k]]``.

What is fused: the gather of the K active decoder rows, the weighted sum and the
bias, in one pass with fp32 accumulation; no [B, F] code and no [B, K, D] gather
is ever built. The same kernel, with ``HAS_TARGET``, is the forward of
``topk_sae_loss``: it writes the fp32 residual ``x_hat - target`` and per-row
partial sums of its square instead of x_hat.

Backward: one CSR segmented pass (``_csr.py``) per call gives both the weight
gradient and ``dvals[b, k] = <grad[b], weight[indices[b, k]]>``: each program
owns one latent, reads its weight row once, and walks the (b, k) that use it.
(Computing dvals in the forward's gather instead was measured slower: the
second walk over the K rows missed L2; see benchmarks/NOTES.md.)

Bytes: forward reads B*K*D weight elements (the gather) and writes B*D.
Backward reads each touched weight row once, the [B, D] upstream gradient (L2
resident at training sizes), and writes the [F, D] gradient once. FLOPs are
O(B*K*D) both ways.

Precision: inputs may be fp32, bf16 or fp16; all accumulation is fp32; each
output has its input's dtype. Deterministic: no atomics anywhere.

Shapes: any B >= 0, K >= 0 (K <= F), F >= 1, D >= 1; no power-of-2 or
block-multiple requirement. Offsets are int64, so F*D and B*D may pass 2^31.
Out-of-range indices turn their output row into NaN (and raise ValueError when
validated, which is the default for CPU tensors).
"""

import torch
import triton
import triton.language as tl

from ._common import (
    TUNING,
    block_d,
    check_index_range,
    check_same_device,
    check_same_dtype,
    check_sparse_code,
    check_tensor,
    eager_function,
    resolve_validate,
    use_triton,
)
from ._csr import csr_transpose, segment_sum
from ._ops import add_op_namespace_prefix
from ._triton_utils import cast_rtne, load_latent

# Kernels -----------------------------------------------------------------------


@triton.jit
def _sparse_decode_fwd_kernel(
    idx_ptr,  # [B, K] int32/int64 latent ids
    vals_ptr,  # [B, K] float latent values
    w_ptr,  # [F, D] float decoder weight
    bias_ptr,  # [D] float (HAS_BIAS)
    target_ptr,  # [B, D] float (HAS_TARGET)
    out_ptr,  # [B, D] x_hat in weight's dtype, or fp32 residual (HAS_TARGET)
    sq_ptr,  # [B, ND] fp32 partial sum of residual^2 (HAS_TARGET)
    B,
    K,
    F,
    D,
    BLOCK_D: tl.constexpr,
    UNROLL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TARGET: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    ND = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for k0 in range(0, K, UNROLL):
        for u in tl.static_range(UNROLL):
            k = k0 + u
            live = k < K
            idx, v = load_latent(idx_ptr, vals_ptr, b * K + k, live, F)
            w = tl.load(w_ptr + idx * D + offs_d, mask=mask_d & (offs_d * 0 + k < K), other=0.0)
            acc += v * w.to(tl.float32)
    if HAS_TARGET:
        t = tl.load(target_ptr + b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        r = tl.where(mask_d, acc - t, 0.0)
        tl.store(out_ptr + b * D + offs_d, r, mask=mask_d)
        tl.store(sq_ptr + b * ND + pid_d, tl.sum(r * r, axis=0))
    else:
        tl.store(out_ptr + b * D + offs_d, cast_rtne(acc, out_ptr.dtype.element_ty), mask=mask_d)


# Host launchers ----------------------------------------------------------------


def sparse_decode_fwd(
    indices: torch.Tensor,
    vals: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
):
    """Without ``target``: returns x_hat [B, D] in ``out_dtype`` (default: weight's dtype).

    With ``target``: returns (residual [B, D] fp32, sq [] fp32) where
    residual = x_hat - target and sq = sum(residual^2).
    """
    B, K = indices.shape
    F, D = weight.shape
    dev = weight.device
    if not use_triton(weight):
        return _sparse_decode_fwd_torch(indices, vals, weight, bias, target, out_dtype)
    BLOCK_D = block_d(D)
    ND = triton.cdiv(D, BLOCK_D)
    has_target = target is not None
    if has_target:
        out = torch.empty(B, D, device=dev, dtype=torch.float32)
        sq = torch.empty(B, ND, device=dev, dtype=torch.float32)
    else:
        out = torch.empty(B, D, device=dev, dtype=out_dtype or weight.dtype)
        sq = out
    if B > 0:
        _sparse_decode_fwd_kernel[(B, ND)](
            indices,
            vals,
            weight,
            bias if bias is not None else weight,
            target if has_target else weight,
            out,
            sq,
            B,
            K,
            F,
            D,
            BLOCK_D=BLOCK_D,
            UNROLL=TUNING["gather_unroll"],
            HAS_BIAS=bias is not None,
            HAS_TARGET=has_target,
            num_warps=TUNING["gather_warps"],
        )
    if not has_target:
        return out
    return out, sq.sum()


def _sparse_decode_fwd_torch(indices, vals, weight, bias, target, out_dtype=None):
    """CPU path without the interpreter: same math, fp32 accumulation, one latent column at a time."""
    B, K = indices.shape
    F, D = weight.shape
    bad = (indices < 0) | (indices >= F)
    idx = indices.clamp(0, F - 1).long()
    v = torch.where(bad, float("nan"), vals.float())
    acc = torch.zeros(B, D, dtype=torch.float32)
    if bias is not None:
        acc += bias.float()
    for k in range(K):
        acc += v[:, k, None] * weight[idx[:, k]].float()
    if target is None:
        return acc.to(out_dtype or weight.dtype)
    r = acc - target.float()
    return r, (r * r).sum()


def sparse_decode_bwd(
    grad: torch.Tensor,
    indices: torch.Tensor,
    vals: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    scale_const: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``scale * scale_const * <grad, sparse_decode(indices, vals, weight)>``.

    ``grad`` is a [B, D] row source (the upstream gradient, or a residual; any
    float dtype, read as fp32). Returns (dweight [F, D] in weight's dtype, scaled;
    dots [B, K] fp32 = <grad[b], weight[indices[b, k]]>, unscaled), both from one
    segmented pass that reads each touched weight row once.
    """
    B, K = indices.shape
    F = weight.shape[0]
    dweight = torch.empty_like(weight)
    perm, offsets = csr_transpose(indices, F)
    dots = segment_sum(
        perm,
        offsets,
        grad,
        K=K,
        out=dweight,
        element_rows=False,
        coef=vals,
        scale=scale,
        scale_const=scale_const,
        weight=weight,
    )
    return dweight, dots.reshape(B, K)


def sparse_decode_bwd_for_vals(grad, indices, vals, weight):
    """``sparse_decode_bwd`` for an upstream gradient: (dweight, dvals in vals' dtype)."""
    dweight, dots = sparse_decode_bwd(grad.contiguous(), indices, vals, weight)
    return dweight, dots.to(vals.dtype)


# Op registration ---------------------------------------------------------------


@torch.library.custom_op(add_op_namespace_prefix("sparse_decode"), mutates_args=())
def _sparse_decode_op(
    indices: torch.Tensor,
    vals: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    validate: bool,
) -> torch.Tensor:
    return _forward(indices, vals, weight, bias, validate)


def _forward(indices, vals, weight, bias, validate):
    if validate:
        check_index_range(indices, weight.shape[0])
    return sparse_decode_fwd(indices, vals, weight, bias)


@_sparse_decode_op.register_fake
def _(indices, vals, weight, bias, validate):
    return weight.new_empty(indices.shape[0], weight.shape[1])


@torch.library.custom_op(add_op_namespace_prefix("sparse_decode_backward"), mutates_args=())
def _sparse_decode_backward_op(
    grad: torch.Tensor,
    indices: torch.Tensor,
    vals: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_decode_bwd_for_vals(grad, indices, vals, weight)


@_sparse_decode_backward_op.register_fake
def _(grad, indices, vals, weight):
    return torch.empty_like(weight), torch.empty_like(vals)


# Autograd ----------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    indices, vals, weight, bias, _ = inputs
    ctx.save_for_backward(indices, vals, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad, bwd=None):
    indices, vals, weight = ctx.saved_tensors
    dweight = dvals = dbias = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dweight, dvals = (bwd or _sparse_decode_backward_op)(grad, indices, vals, weight)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        dbias = grad.float().sum(0).to(weight.dtype)
    return None, dvals, dweight, dbias, None


_sparse_decode_op.register_autograd(_backward, setup_context=_setup_context)


_sparse_decode_eager = eager_function(
    "SparseDecode", _forward, _setup_context, lambda ctx, grad: _backward(ctx, grad, bwd=sparse_decode_bwd_for_vals)
)


# Public function ---------------------------------------------------------------


def sparse_decode(
    indices: torch.Tensor,
    vals: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    validate: bool | None = None,
) -> torch.Tensor:
    """Decodes a sparse code: ``x_hat = bias + sum_k vals[:, k, None] * weight[indices[:, k]]``.

    Args:
        indices: [B, K] int32 or int64 latent ids in [0, F). Repeats are summed.
        vals: [B, K] latent values, weight's dtype.
        weight: [F, D] decoder rows (fp32, bf16 or fp16).
        bias: optional [D], weight's dtype.
        validate: check that indices lie in [0, F) and raise ValueError if not.
            ``None`` (default) checks CPU tensors only, because on a GPU the check
            is a host sync; unchecked out-of-range ids give NaN rows, never an
            illegal memory access.

    Returns:
        x_hat [B, D] in weight's dtype. B = 0 gives an empty [0, D] tensor; K = 0
        gives ``bias`` (or zeros) broadcast to [B, D].

    Differentiable in ``vals``, ``weight`` and ``bias`` with an O(B*K*D),
    deterministic backward.
    """
    B, K, F, D = check_sparse_code(indices, vals, weight, allow_empty=True)
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != D:
            raise ValueError(f"bias must have shape ({D},), got {tuple(bias.shape)}")
        check_same_dtype("weight", weight, bias=bias)
    check_same_device(weight=weight, indices=indices, vals=vals, bias=bias)
    validate = resolve_validate(validate, indices)
    op = _sparse_decode_op if torch.compiler.is_compiling() else _sparse_decode_eager
    return op(
        indices.contiguous(),
        vals.contiguous(),
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        validate,
    )
