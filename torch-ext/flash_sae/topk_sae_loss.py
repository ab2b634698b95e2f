"""TopK SAE decoder loss: ``mean over B*D of (bias + sum_k vals*weight[indices] - target)^2``.

The signature and the loss definition are flex-sae's, so switching is a change of
repo id.

What is fused:
- forward: ``sparse_decode``'s gather kernel with an MSE epilogue; one pass reads
  the K active rows per input, writes the fp32 residual r = x_hat - target
  ([B, D], the only thing kept for backward besides the inputs), partial sums of
  r^2 and ``dots[b, k] = <r[b], weight[indices[b, k]]>``, re-reading the K rows
  from cache. So the backward never gathers weight rows again.
- backward: with s = 2 * grad / (B*D),
  ``dvals = s * dots``, ``dbias = s * sum_b r``, ``dtarget = -s * r`` (elementwise),
  and ``dweight[f] = s * sum over (b, k) in f's segment of vals[b, k] * r[b]``,
  the deterministic CSR segmented sum of ``_csr.py`` that writes every row of the
  dense [F, D] gradient exactly once (untouched rows get zeros).

Bytes (bf16, B=2048, D=2304, F=65536, K=64): forward 604 MB of gathered rows;
backward 302 MB of dweight writes plus [B, D] fp32 residual reads that mostly hit
L2. Versus dense PyTorch it skips the [B, F] code, the dense [B,F]x[F,D] GEMMs
and the second gather for dvals.

Precision: fp32 accumulation everywhere; the loss is returned in fp32, each
gradient in its parameter's dtype. Deterministic: no atomics.

Shapes: B >= 1, 1 <= K <= F, D >= 1, any sizes. B = 0 or K = 0 raise ValueError.
"""

import torch

from ._common import (
    check_index_range,
    check_same_device,
    check_same_dtype,
    check_sparse_code,
    check_tensor,
    resolve_validate,
)
from ._csr import csr_transpose, segment_sum
from ._ops import add_op_namespace_prefix
from .sparse_decode import sparse_decode_fwd

# Host launchers ----------------------------------------------------------------


def topk_sae_loss_fwd(indices, weight, vals, bias, target):
    """Returns (loss [] fp32, residual [B, D] fp32, dots [B, K] fp32)."""
    B, _ = indices.shape
    D = weight.shape[1]
    residual, dots, sq = sparse_decode_fwd(indices, vals, weight, bias, target)
    return sq / (B * D), residual, dots


def topk_sae_loss_bwd(grad, indices, weight, vals, residual):
    """Returns dweight [F, D] in weight's dtype for upstream scalar ``grad``."""
    B, K = indices.shape
    F, D = weight.shape
    dweight = torch.empty_like(weight)
    perm, offsets = csr_transpose(indices, F)
    segment_sum(
        perm,
        offsets,
        residual,
        K=K,
        out=dweight,
        element_rows=False,
        coef=vals,
        scale=grad,
        scale_const=2.0 / (B * D),
    )
    return dweight


# Op registration ---------------------------------------------------------------


@torch.library.custom_op(add_op_namespace_prefix("topk_sae_loss"), mutates_args=())
def _topk_sae_loss_op(
    indices: torch.Tensor,
    weight: torch.Tensor,
    vals: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    validate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if validate:
        check_index_range(indices, weight.shape[0])
    return topk_sae_loss_fwd(indices, weight, vals, bias, target)


@_topk_sae_loss_op.register_fake
def _(indices, weight, vals, bias, target, validate):
    B, K = indices.shape
    f32 = torch.float32
    return (
        weight.new_empty((), dtype=f32),
        weight.new_empty(B, weight.shape[1], dtype=f32),
        weight.new_empty(B, K, dtype=f32),
    )


@torch.library.custom_op(add_op_namespace_prefix("topk_sae_loss_backward"), mutates_args=())
def _topk_sae_loss_backward_op(
    grad: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    vals: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    return topk_sae_loss_bwd(grad.float(), indices, weight, vals, residual)


@_topk_sae_loss_backward_op.register_fake
def _(grad, indices, weight, vals, residual):
    return torch.empty_like(weight)


# Autograd ----------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    indices, weight, vals, bias, target, _ = inputs
    _, residual, dots = output
    ctx.mark_non_differentiable(residual, dots)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(indices, weight, vals, residual, dots)
    ctx.dtypes = (bias.dtype, target.dtype)


def _backward(ctx, grad, _grad_residual, _grad_dots):
    indices, weight, vals, residual, dots = ctx.saved_tensors
    bias_dtype, target_dtype = ctx.dtypes
    dweight = dvals = dbias = dtarget = None
    if grad is None:
        return None, None, None, None, None, None
    B, D = residual.shape
    s = grad.float() * (2.0 / (B * D))
    if ctx.needs_input_grad[1]:
        dweight = _topk_sae_loss_backward_op(grad, indices, weight, vals, residual)
    if ctx.needs_input_grad[2]:
        dvals = (dots * s).to(vals.dtype)
    if ctx.needs_input_grad[3]:
        dbias = (residual.sum(0) * s).to(bias_dtype)
    if ctx.needs_input_grad[4]:
        dtarget = (residual * -s).to(target_dtype)
    return None, dweight, dvals, dbias, dtarget, None


_topk_sae_loss_op.register_autograd(_backward, setup_context=_setup_context)


# Public function ---------------------------------------------------------------


def check_decoder_loss_args(indices, weight, vals, bias, target):
    """Shared argument checks of the decoder losses; returns (B, K, F, D)."""
    B, K, F, D = check_sparse_code(indices, vals, weight, allow_empty=False)
    check_tensor("bias", bias, 1)
    check_tensor("target", target, 2)
    if bias.shape[0] != D:
        raise ValueError(f"bias must have shape ({D},), got {tuple(bias.shape)}")
    if tuple(target.shape) != (B, D):
        raise ValueError(f"target must have shape {(B, D)}, got {tuple(target.shape)}")
    check_same_dtype("weight", weight, bias=bias, target=target)
    check_same_device(weight=weight, indices=indices, vals=vals, bias=bias, target=target)
    return B, K, F, D


def topk_sae_loss(
    indices: torch.Tensor,
    weight: torch.Tensor,
    vals: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    *,
    validate: bool | None = None,
) -> torch.Tensor:
    """TopK SAE reconstruction loss, ``((bias + sum_k vals*weight[indices] - target)**2).mean()``.

    Args:
        indices: [B, K] int32 or int64 latent ids in [0, F); repeats are summed.
        weight: [F, D] decoder rows, fp32, bf16 or fp16.
        vals: [B, K] latent values, weight's dtype.
        bias: [D] decoder bias, weight's dtype.
        target: [B, D] inputs to reconstruct, weight's dtype.
        validate: check indices lie in [0, F) (ValueError otherwise). ``None``
            (default) checks CPU tensors only: on a GPU it would be a host sync.
            Unchecked out-of-range ids make the loss NaN, never an illegal access.

    Returns:
        A 0-d fp32 tensor: the mean over B*D squared errors. Differentiable in
        weight, vals, bias and target; gradients have their input's dtype.
        B = 0 or K = 0 raise ValueError.
    """
    check_decoder_loss_args(indices, weight, vals, bias, target)
    validate = resolve_validate(validate, indices)
    loss, _, _ = _topk_sae_loss_op(
        indices.contiguous(),
        weight.contiguous(),
        vals.contiguous(),
        bias.contiguous(),
        target.contiguous(),
        validate,
    )
    return loss
