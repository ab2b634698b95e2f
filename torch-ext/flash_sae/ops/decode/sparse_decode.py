"""Sparse decode: ``x_hat[b] = bias + sum_k vals[b, k] * weight[indices[b, k]]``.

What is fused: the gather of the K active decoder rows, the weighted sum and the
bias, in one pass with fp32 accumulation (``primitives.gather``); no [B, F]
code and no [B, K, D] gather is ever built.

Backward: one CSR segmented pass per call gives both the weight gradient and
``dvals[b, k] = <grad[b], weight[indices[b, k]]>`` (the gather's adjoint):
each program owns one latent, reads its weight row once, and walks the (b, k)
that use it. ``dbias`` is the column sum of the upstream gradient.

Bytes: forward reads B*K*D weight elements and writes B*D; backward reads each
touched weight row once and the [B, D] upstream gradient (L2 resident at
training sizes), and writes the [F, D] gradient once. FLOPs O(B*K*D) both ways.

Precision: fp32 accumulation; each output in its input's dtype. Deterministic.
Shapes: any B >= 0, K >= 0 (K <= F), F >= 1, D >= 1. Out-of-range indices turn
their output row into NaN (and raise ValueError when validated, the default
for CPU tensors).
"""

from typing import NamedTuple

import torch

from ..._registry import fake_gradients, gradient_or_placeholder, register_op
from ..._validation import (
    check_bias,
    check_index_range,
    check_same_device,
    check_sparse_code,
    resolve_validate,
)
from ...primitives.gather import gather_rows, gather_rows_backward

# Host launchers ----------------------------------------------------------------


class SparseDecodeInputs(NamedTuple):
    """``sparse_decode``'s arguments, in the registered op's order."""

    vals: torch.Tensor
    indices: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    validate: bool


def sparse_decode_fwd(i: SparseDecodeInputs) -> torch.Tensor:
    if i.validate:
        check_index_range(i.indices, i.weight.shape[0])
    return gather_rows(i.vals, i.indices, i.weight, i.bias)


def sparse_decode_fwd_fake(i: SparseDecodeInputs):
    indices, weight = i.indices, i.weight
    return weight.new_empty(indices.shape[0], weight.shape[1])


def sparse_decode_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dvals, dweight, dbias); the first two from one segmented pass, computed when either is needed."""
    grad, vals, indices, weight = grads.x_hat, saved.vals, saved.indices, saved.weight
    need_vals, need_weight, need_bias = needs
    dvals = dweight = None
    if need_vals or need_weight:
        dweight, dots = gather_rows_backward(grad, vals, indices, weight)
        dvals = dots.to(vals.dtype)
    return (
        dvals if need_vals else vals.new_empty(0),
        dweight if need_weight else weight.new_empty(0),
        gradient_or_placeholder(need_bias, weight, lambda: grad.float().sum(0).to(weight.dtype)),
    )


def sparse_decode_bwd_fake(grads, saved, needs: list[bool]):
    vals, weight = saved.vals, saved.weight
    return fake_gradients(needs, vals, weight, weight.new_empty(weight.shape[1]))


# Op registration and autograd ----------------------------------------------------

_sparse_decode = register_op(
    "sparse_decode",
    inputs=SparseDecodeInputs,
    launchers=(sparse_decode_fwd, sparse_decode_fwd_fake, sparse_decode_bwd, sparse_decode_bwd_fake),
    saved=("vals", "indices", "weight", "bias"),
    outputs=("x_hat",),
    differentiable=("x_hat",),
    grad_inputs=("vals", "weight", "bias"),
)


# Public function ---------------------------------------------------------------


def sparse_decode(
    vals: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    validate: bool | None = None,
) -> torch.Tensor:
    """Decodes a sparse code: ``x_hat = bias + sum_k vals[:, k, None] * weight[indices[:, k]]``.

    Args:
        vals: [B, K] latent values, weight's dtype.
        indices: [B, K] int32 or int64 latent ids in [0, F). Repeats are summed.
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
    B, K, F, D = check_sparse_code(vals, indices, weight, allow_empty=True)
    if bias is not None:
        check_bias("bias", bias, D, "weight", weight)
    check_same_device(weight=weight, indices=indices, vals=vals, bias=bias)
    validate = resolve_validate(validate, indices)
    return _sparse_decode(
        vals.contiguous(),
        indices.contiguous(),
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        validate,
    )
