"""Sparse decode of a variable-length code: ``x_hat[b] = bias + sum over row b's entries of vals * weight[indices]``.

The code is the one the BatchTopK, Matryoshka and JumpReLU steps return (vals [N],
indices [N], row_offsets [B + 1]; see ``ops.decode._varlen``): rows hold different numbers
of active latents.

What is fused: the gather of each row's active decoder rows, the weighted sum and the bias,
in one pass with fp32 accumulation (``primitives.gather`` with its variable-length walk).
Backward: one CSR segmented pass over the used entries gives the weight gradient and
``dvals = <grad[row], weight[id]>`` (the gather's adjoint); ``dbias`` is the column sum of
the upstream gradient. Unused entries get ``dvals`` 0.

Bytes and FLOPs: O(N * D) both ways, plus one write of the dense [F, D] weight gradient.
Precision: fp32 accumulation; each output in its input's dtype. Deterministic. No host sync
on a GPU unless ``validate=True``.
"""

from typing import NamedTuple

import torch

from ..._registry import fake_gradients, gradient_or_placeholder, register_op
from ...primitives.gather import gather_rows, gather_rows_backward
from ._varlen import used_code, varlen_inputs

# Host launchers ----------------------------------------------------------------


class VarlenSparseDecodeInputs(NamedTuple):
    """``varlen_sparse_decode``'s arguments, in the registered op's order."""

    vals: torch.Tensor
    indices: torch.Tensor
    row_offsets: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


def varlen_sparse_decode_fwd(i: VarlenSparseDecodeInputs) -> torch.Tensor:
    return gather_rows(i.vals, i.indices, i.weight, i.bias, row_offsets=i.row_offsets)


def varlen_sparse_decode_fwd_fake(i: VarlenSparseDecodeInputs):
    row_offsets, weight = i.row_offsets, i.weight
    return weight.new_empty(row_offsets.shape[0] - 1, weight.shape[1])


def varlen_sparse_decode_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dvals, dweight, dbias); the first two from one segmented pass, computed when either is needed."""
    need_vals, need_weight, need_bias = needs
    dvals = dweight = None
    if need_vals or need_weight:
        used, ids, rows = used_code(saved.indices, saved.row_offsets)
        dweight, dots = gather_rows_backward(grads.x_hat, saved.vals, ids, saved.weight, rows=rows)
        dvals = torch.where(used, dots, 0.0).to(saved.vals.dtype)
    return (
        dvals if need_vals else saved.vals.new_empty(0),
        dweight if need_weight else saved.weight.new_empty(0),
        gradient_or_placeholder(need_bias, saved.weight, lambda: grads.x_hat.float().sum(0).to(saved.weight.dtype)),
    )


def varlen_sparse_decode_bwd_fake(grads, saved, needs: list[bool]):
    vals, weight = saved.vals, saved.weight
    return fake_gradients(needs, vals, weight, weight.new_empty(weight.shape[1]))


# Op registration and autograd ----------------------------------------------------

_varlen_sparse_decode = register_op(
    "varlen_sparse_decode",
    inputs=VarlenSparseDecodeInputs,
    launchers=(
        varlen_sparse_decode_fwd,
        varlen_sparse_decode_fwd_fake,
        varlen_sparse_decode_bwd,
        varlen_sparse_decode_bwd_fake,
    ),
    saved=("vals", "indices", "row_offsets", "weight"),
    outputs=("x_hat",),
    differentiable=("x_hat",),
    grad_inputs=("vals", "weight", "bias"),
)


# Public function ---------------------------------------------------------------


def varlen_sparse_decode(
    vals: torch.Tensor, indices: torch.Tensor, row_offsets: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None = None, *, validate: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """Decodes a variable-length code: row b is ``bias + sum of vals[i] * weight[indices[i]]`` over
    i in ``row_offsets[b]:row_offsets[b+1]``.

    Args:
        vals: [N] latent values, weight's dtype.
        indices: [N] int32 or int64 latent ids in [0, F) (repeats are summed).
        row_offsets: [B + 1] int32 or int64; row_offsets[0] = 0, non-decreasing, row_offsets[B] <= N.
            Entries past row_offsets[B] are unused (a fixed-capacity code's padding).
        weight: [F, D] decoder rows (fp32, bf16 or fp16); bias: optional [D], weight's dtype.
        validate: check the offsets and the used ids and raise ValueError if malformed. ``None``
            (default) checks CPU tensors only (on a GPU the check is a host sync); unchecked, the
            offsets are clamped on the device so no read leaves the code, and an out-of-range id
            makes its row NaN.

    Returns:
        x_hat [B, D] in weight's dtype (an empty row decodes to the bias, or zeros).
        Differentiable in ``vals``, ``weight`` and ``bias``; the backward is O(N*D) and
        deterministic.
    """
    vals, indices, offsets, weight, bias, _ = varlen_inputs(vals, indices, row_offsets, weight, bias, validate)
    return _varlen_sparse_decode(vals, indices, offsets, weight, bias)
