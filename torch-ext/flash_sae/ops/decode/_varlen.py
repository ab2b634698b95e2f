"""What the variable-length decoder ops share: argument preparation and the code's used entries.

A variable-length code is (vals [N], indices [N], row_offsets [B + 1]): row b owns entries
row_offsets[b]:row_offsets[b+1], in any order; entries outside [row_offsets[0],
row_offsets[B]) are unused (the JumpReLU step's code pads its fixed capacity so). It is the
format ``batchtopk_sae_step``, ``matryoshka_*_sae_step`` and ``jumprelu_sae_step`` return.
Not an op: a private module of the ``decode`` family.
"""

import torch

from ..._validation import (
    check_bias,
    check_index_range,
    check_row_offsets,
    check_same_device,
    check_varlen_code,
    resolve_validate,
)
from ...primitives.gather import row_ids


def varlen_inputs(vals, indices, row_offsets, weight, bias, validate) -> tuple:
    """Validated, contiguous (vals, indices, int64 row_offsets, weight, bias), and (B, N, D).

    With ``validate`` (the default for CPU tensors) malformed offsets and out-of-range ids of
    used entries raise ValueError. Without it (a GPU's default: checking is a host sync) the
    offsets are clamped to [0, N] and made non-decreasing on the device, so no read leaves
    the code; an out-of-range id turns its row into NaN, as in ``sparse_decode``.
    """
    B, N, F, D = check_varlen_code(vals, indices, row_offsets, weight)
    if bias is not None:
        check_bias("bias", bias, D, "weight", weight)
        check_same_device(weight=weight, bias=bias)
        bias = bias.contiguous()
    offsets = row_offsets.to(torch.int64)
    if resolve_validate(validate, indices):
        check_row_offsets(offsets, N)
        check_index_range(indices[: int(offsets[-1])], F)
    else:
        offsets = torch.cummax(offsets.clamp(0, N), 0).values
    return vals.contiguous(), indices.contiguous(), offsets.contiguous(), weight.contiguous(), bias, (B, N, D)


def used_code(indices: torch.Tensor, row_offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(used [N] bool, ids with -1 for unused entries, rows [N]): what the segmented backward reads.

    An id of -1 joins no segment of the CSR transpose, so unused entries add nothing to any
    gradient row; their ``dvals`` are set to 0 by the callers.
    """
    N = indices.numel()
    entries = torch.arange(N, device=indices.device)
    used = (entries >= row_offsets[0]) & (entries < row_offsets[-1])
    return used, torch.where(used, indices.to(torch.int64), -1), row_ids(row_offsets, N)
