"""What the two decoder losses share: argument preparation and the gradient epilogue.

Both losses are ``c * sum (rows of errors)^2`` over a gather of the code, so with
s = 2 * grad * c their gradients have one shape: ``dvals = s * dots`` (the
per-entry dots their own pass computes), ``dbias = s * sum_b rows[b]`` and
``dtarget = -s * rows``, where ``rows`` is the final residual (TopK) or the sum
of the prefix residuals (HierarchicalTopK). Not an op: a private module of the
``decode`` family.
"""

from typing import NamedTuple

import torch

from ..._registry import fake_gradients, gradient_or_placeholder, placeholder
from ..._validation import check_decoder_loss_args, resolve_validate


class DecoderLossInputs(NamedTuple):
    """The two decoder losses' arguments (flex-sae's order), as their registered ops take them."""

    indices: torch.Tensor
    weight: torch.Tensor
    vals: torch.Tensor
    bias: torch.Tensor
    target: torch.Tensor
    validate: bool


def loss_inputs(indices, weight, vals, bias, target, validate) -> tuple:
    """Validated, contiguous arguments of a decoder-loss op (flex-sae's order), ``validate`` resolved."""
    check_decoder_loss_args(indices, weight, vals, bias, target)
    validate = resolve_validate(validate, indices)
    return (
        indices.contiguous(),
        weight.contiguous(),
        vals.contiguous(),
        bias.contiguous(),
        target.contiguous(),
        validate,
    )


def loss_fwd_fake(i, residuals: int = 1) -> tuple:
    """A decoder loss's fake outputs: the 0-d fp32 loss, then ``residuals`` fp32 tensors shaped as the target."""
    f32 = torch.float32
    return (
        i.weight.new_empty((), dtype=f32),
        *(i.weight.new_empty(i.target.shape, dtype=f32) for _ in range(residuals)),
    )


def loss_gradients(needs, weight, vals, s, rows, weight_and_dots) -> tuple:
    """(dweight, dvals, dbias, dtarget), each in its input's dtype (placeholders where not needed).

    ``weight_and_dots()`` returns (dweight, dots [B, K] fp32) and runs only when either is needed.
    """
    need_weight, need_vals, need_bias, need_target = needs
    dweight = dvals = None
    if need_weight or need_vals:
        dweight, dots = weight_and_dots()
        dvals = (dots * s).to(vals.dtype)
    return (
        dweight if need_weight else placeholder(weight),
        dvals if need_vals else placeholder(vals),
        gradient_or_placeholder(need_bias, weight, lambda: (rows.sum(0) * s).to(weight.dtype)),
        gradient_or_placeholder(need_target, weight, lambda: (rows * -s).to(weight.dtype)),
    )


def loss_gradients_fake(needs, weight, vals, rows: torch.Tensor) -> tuple:
    return fake_gradients(needs, weight, vals, weight.new_empty(rows.shape[1]), weight.new_empty(rows.shape))
