"""SAE decoder loss over a variable-length code: ``mean over B*D of (x_hat - target)^2``, fused.

    x_hat[b] = bias + sum over row b's entries (row_offsets[b]:row_offsets[b+1]) of vals * weight[indices]

The code is the one the BatchTopK, Matryoshka and JumpReLU steps return (see
``ops.decode._varlen``); this is ``topk_sae_loss`` for codes whose rows differ in length.

What is fused: forward, the variable-length row gather with its MSE epilogue (the fp32
residual [B, D], kept for backward, and the squared-error sum); backward, with
s = 2 * grad / (B*D), one CSR segmented pass over the used entries gives ``dweight`` and
``dvals = s * <r[row], weight[id]>``; ``dbias = s * sum_b r`` and ``dtarget = -s * r`` are
elementwise. Unused entries get ``dvals`` 0.

Precision: fp32 accumulation; the loss in fp32, each gradient in its input's dtype.
Deterministic; no host sync on a GPU unless ``validate=True``. B >= 1.
"""

from typing import NamedTuple

import torch

from ..._registry import register_op
from ..._validation import check_bias, check_same_device, check_same_dtype, check_shape, check_tensor
from ...primitives.gather import gather_residual, gather_rows_backward
from ._loss import loss_fwd_fake, loss_gradients, loss_gradients_fake
from ._varlen import used_code, varlen_inputs

# Host launchers ----------------------------------------------------------------


class VarlenSaeLossInputs(NamedTuple):
    """``varlen_sae_loss``'s arguments, in the registered op's order."""

    vals: torch.Tensor
    indices: torch.Tensor
    row_offsets: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    target: torch.Tensor


def varlen_sae_loss_fwd(i: VarlenSaeLossInputs) -> tuple[torch.Tensor, ...]:
    """Returns (loss [] fp32, residual [B, D] fp32 = x_hat - target, kept for the backward)."""
    B, D = i.target.shape
    residual, sq = gather_residual(i.vals, i.indices, i.weight, i.bias, i.target, row_offsets=i.row_offsets)
    return sq / (B * D), residual


def varlen_sae_loss_fwd_fake(i: VarlenSaeLossInputs):
    return loss_fwd_fake(i)


def varlen_sae_loss_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dvals, dweight, dbias, dtarget) with s = 2 * grad / (B*D): one segmented pass for the first two."""
    B, D = saved.residual.shape
    s_const = 2.0 / (B * D)
    used, ids, rows = used_code(saved.indices, saved.row_offsets)

    def weight_and_dots():
        dweight, dots = gather_rows_backward(
            saved.residual, saved.vals, ids, saved.weight, scale=grads.loss.float(), scale_const=s_const, rows=rows
        )
        return dweight, torch.where(used, dots, 0.0)

    dweight, dvals, dbias, dtarget = loss_gradients(
        [needs[1], needs[0], needs[2], needs[3]],
        saved.weight,
        saved.vals,
        grads.loss.float() * s_const,
        saved.residual,
        weight_and_dots,
    )
    return dvals, dweight, dbias, dtarget


def varlen_sae_loss_bwd_fake(grads, saved, needs: list[bool]):
    vals, weight, residual = saved.vals, saved.weight, saved.residual
    order = [needs[1], needs[0], needs[2], needs[3]]  # loss_gradients' order: weight, vals, bias, target
    dweight, dvals, dbias, dtarget = loss_gradients_fake(order, weight, vals, residual)
    return dvals, dweight, dbias, dtarget


# Op registration and autograd ----------------------------------------------------

_varlen_sae_loss = register_op(
    "varlen_sae_loss",
    inputs=VarlenSaeLossInputs,
    launchers=(varlen_sae_loss_fwd, varlen_sae_loss_fwd_fake, varlen_sae_loss_bwd, varlen_sae_loss_bwd_fake),
    saved=("vals", "indices", "row_offsets", "weight", "residual"),
    outputs=("loss", "residual"),
    differentiable=("loss",),
    grad_inputs=("vals", "weight", "bias", "target"),
)


# Public function ---------------------------------------------------------------


def varlen_sae_loss(
    vals: torch.Tensor, indices: torch.Tensor, row_offsets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    target: torch.Tensor, *, validate: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """SAE reconstruction loss of a variable-length code, ``((varlen_sparse_decode(...) - target)**2).mean()``.

    Args:
        vals, indices, row_offsets, weight, validate: as ``varlen_sparse_decode`` (B >= 1 rows).
        bias: [D] decoder bias, weight's dtype.
        target: [B, D] inputs to reconstruct, weight's dtype.

    Returns:
        A 0-d fp32 tensor, the mean over B*D squared errors; differentiable in vals, weight,
        bias and target (gradients in their inputs' dtypes), with a deterministic O(N*D)
        backward.
    """
    vals, indices, offsets, weight, _, (B, N, D) = varlen_inputs(vals, indices, row_offsets, weight, None, validate)
    if B < 1:
        raise ValueError("row_offsets describes no row (B = 0); the mean loss of no rows is undefined")
    check_bias("bias", bias, D, "weight", weight)
    check_tensor("target", target, 2)
    check_shape("target", target, (B, D))
    check_same_dtype("weight", weight, target=target)
    check_same_device(weight=weight, bias=bias, target=target)
    loss, _ = _varlen_sae_loss(vals, indices, offsets, weight, bias.contiguous(), target.contiguous())
    return loss
