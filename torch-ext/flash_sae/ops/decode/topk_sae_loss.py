"""TopK SAE decoder loss: ``mean over B*D of (bias + sum_k vals*weight[indices] - target)^2``.

The signature and the loss definition are flex-sae's, so switching is a change of
repo id.

What is fused:
- forward: the row gather (``primitives.gather``) with its MSE epilogue; one pass reads
  the K active rows per input and writes the fp32 residual r = x_hat - target
  ([B, D], the only thing kept for backward besides the inputs) and partial sums
  of r^2.
- backward: with s = 2 * grad / (B*D), one CSR segmented pass (the gather's adjoint)
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

from ..._registry import register_op
from ..._validation import check_index_range
from ...primitives.gather import gather_residual, gather_rows_backward
from ._loss import DecoderLossInputs, loss_fwd_fake, loss_gradients, loss_gradients_fake, loss_inputs

# Host launchers ----------------------------------------------------------------


def topk_sae_loss_fwd(i: DecoderLossInputs) -> tuple[torch.Tensor, ...]:
    """Returns (loss [] fp32, residual [B, D] fp32 = x_hat - target, kept for the backward)."""
    if i.validate:
        check_index_range(i.indices, i.weight.shape[0])
    B, D = i.target.shape
    residual, sq = gather_residual(i.vals, i.indices, i.weight, i.bias, i.target)
    return sq / (B * D), residual


def topk_sae_loss_fwd_fake(i: DecoderLossInputs):
    return loss_fwd_fake(i)


def topk_sae_loss_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dweight, dvals, dbias, dtarget) with s = 2 * grad / (B*D): one segmented pass for the first two."""
    B, D = saved.residual.shape
    s_const = 2.0 / (B * D)
    return loss_gradients(
        needs,
        saved.weight,
        saved.vals,
        grads.loss.float() * s_const,
        saved.residual,
        lambda: gather_rows_backward(
            saved.residual, saved.vals, saved.indices, saved.weight, scale=grads.loss.float(), scale_const=s_const
        ),
    )


def topk_sae_loss_bwd_fake(grads, saved, needs: list[bool]):
    weight, vals, residual = saved.weight, saved.vals, saved.residual
    return loss_gradients_fake(needs, weight, vals, residual)


# Op registration and autograd ----------------------------------------------------

_topk_sae_loss = register_op(
    "topk_sae_loss",
    inputs=DecoderLossInputs,
    launchers=(topk_sae_loss_fwd, topk_sae_loss_fwd_fake, topk_sae_loss_bwd, topk_sae_loss_bwd_fake),
    saved=("indices", "weight", "vals", "residual"),
    outputs=("loss", "residual"),
    differentiable=("loss",),
    grad_inputs=("weight", "vals", "bias", "target"),
)


# Public function ---------------------------------------------------------------


def topk_sae_loss(
    indices: torch.Tensor, weight: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, *,
    validate: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """TopK SAE reconstruction loss, ``((bias + sum_k vals*weight[indices] - target)**2).mean()``.

    flex-sae's signature (ids first, then the weight, then values): switching
    from flex-sae is a change of repo id.

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
    loss, _ = _topk_sae_loss(*loss_inputs(indices, weight, vals, bias, target, validate))
    return loss
