"""TopK SAE decoder loss: ``mean over B*D of (bias + sum_k vals*weight[indices] - target)^2``.

The signature and the loss definition are flex-sae's, so switching is a change of
repo id.

What is fused:
- forward: ``sparse_decode``'s gather kernel with an MSE epilogue; one pass reads
  the K active rows per input and writes the fp32 residual r = x_hat - target
  ([B, D], the only thing kept for backward besides the inputs) and partial sums
  of r^2.
- backward: with s = 2 * grad / (B*D), one CSR segmented pass (``_csr.py``)
  gives ``dweight[f] = s * sum over (b, k) in f's segment of vals[b, k] * r[b]``
  (every row of the dense [F, D] gradient written exactly once, untouched rows
  as zeros) and ``dots[b, k] = <r[b], weight[f]>``, reading each touched
  weight row once; then ``dvals = s * dots``, ``dbias = s * sum_b r`` and
  ``dtarget = -s * r`` are elementwise.

Bytes (bf16, B=2048, D=2304, F=65536, K=64): forward 604 MB of gathered rows
(fewer from DRAM: repeated latents hit L2); backward at most 302 MB of touched
weight rows read and 302 MB of dweight written, plus [B, D] fp32 residual reads
that mostly hit L2. Versus dense PyTorch it skips the [B, F] code and the
dense [B,F]x[F,D] GEMMs.

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
    eager_function,
    resolve_validate,
)
from ._ops import add_op_namespace_prefix
from .sparse_decode import sparse_decode_bwd, sparse_decode_fwd

# Host launchers ----------------------------------------------------------------


def topk_sae_loss_fwd(indices, weight, vals, bias, target):
    """Returns (loss [] fp32, residual [B, D] fp32)."""
    B, _ = indices.shape
    D = weight.shape[1]
    residual, sq = sparse_decode_fwd(indices, vals, weight, bias, target)
    return sq / (B * D), residual


def topk_sae_loss_bwd(grad, indices, weight, vals, residual):
    """Returns (dweight [F, D] in weight's dtype, dots [B, K] fp32 = <residual[b], W[idx]>)."""
    B, D = residual.shape
    return sparse_decode_bwd(residual, indices, vals, weight, scale=grad, scale_const=2.0 / (B * D))


# Op registration ---------------------------------------------------------------


@torch.library.custom_op(add_op_namespace_prefix("topk_sae_loss"), mutates_args=())
def _topk_sae_loss_op(
    indices: torch.Tensor,
    weight: torch.Tensor,
    vals: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    validate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(indices, weight, vals, bias, target, validate)


def _forward(indices, weight, vals, bias, target, validate):
    if validate:
        check_index_range(indices, weight.shape[0])
    return topk_sae_loss_fwd(indices, weight, vals, bias, target)


@_topk_sae_loss_op.register_fake
def _(indices, weight, vals, bias, target, validate):
    f32 = torch.float32
    return weight.new_empty((), dtype=f32), weight.new_empty(target.shape, dtype=f32)


@torch.library.custom_op(add_op_namespace_prefix("topk_sae_loss_backward"), mutates_args=())
def _topk_sae_loss_backward_op(
    grad: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    vals: torch.Tensor,
    residual: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return topk_sae_loss_bwd(grad.float(), indices, weight, vals, residual)


@_topk_sae_loss_backward_op.register_fake
def _(grad, indices, weight, vals, residual):
    return torch.empty_like(weight), vals.new_empty(vals.shape, dtype=torch.float32)


# Autograd ----------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    indices, weight, vals, bias, target, _ = inputs
    _, residual = output
    ctx.mark_non_differentiable(residual)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(indices, weight, vals, residual)
    ctx.dtypes = (bias.dtype, target.dtype)


def _backward(ctx, grad, _grad_residual, bwd=None):
    indices, weight, vals, residual = ctx.saved_tensors
    bias_dtype, target_dtype = ctx.dtypes
    dweight = dvals = dbias = dtarget = None
    if grad is None:
        return None, None, None, None, None, None
    B, D = residual.shape
    s = grad.float() * (2.0 / (B * D))
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dw, dots = (bwd or _topk_sae_loss_backward_op)(grad, indices, weight, vals, residual)
        dweight = dw if ctx.needs_input_grad[1] else None
        dvals = (dots * s).to(vals.dtype) if ctx.needs_input_grad[2] else None
    if ctx.needs_input_grad[3]:
        dbias = (residual.sum(0) * s).to(bias_dtype)
    if ctx.needs_input_grad[4]:
        dtarget = (residual * -s).to(target_dtype)
    return None, dweight, dvals, dbias, dtarget, None


_topk_sae_loss_op.register_autograd(_backward, setup_context=_setup_context)
_topk_sae_loss_eager = eager_function(
    "TopkSaeLoss",
    _forward,
    _setup_context,
    lambda ctx, grad, g_res: _backward(ctx, grad, g_res, bwd=lambda g, *a: topk_sae_loss_bwd(g.float(), *a)),
)


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
    op = _topk_sae_loss_op if torch.compiler.is_compiling() else _topk_sae_loss_eager
    loss, _ = op(
        indices.contiguous(),
        weight.contiguous(),
        vals.contiguous(),
        bias.contiguous(),
        target.contiguous(),
        validate,
    )
    return loss
