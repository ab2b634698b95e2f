"""JumpReLU encoder: ``f = z * H(z - theta)`` with ``z = x @ W_enc.T + b_enc``, as a fixed-capacity code.

The straight-through estimators of Rajamanoharan et al. (2024) with the rectangle kernel
R(u) = 1{|u| < 1/2}, u = (z - theta) / bandwidth (circuit-tracer's ``jumprelu``):

    df/dz = H(z - theta)        df/dtheta = -(theta / bandwidth) R(u)

so theta's gradient needs dL/df at every entry in the band, active or not. The code therefore
holds the active entries and the band's (value 0: they decode to nothing, but a decoder's
backward computes their dL/df with everyone else's).

What is fused: one collection per pre-activation chunk (``threshold_preacts``) into a code of
static size ``capacity`` (no host sync; ``count`` says how many qualified, ``count > capacity``
means entries were dropped). Backward: dx, dW_enc and db_enc from ``primitives.encoder`` (one
deterministic CSR segmented pass and one gather, gate H(z - theta)); dtheta as a segmented sum
over the same CSR transpose. The encoder reads x as it is (the cross-layer transcoder's
per-layer encoder). Precision: comparisons in x's dtype (theta cast to it); backward in fp32;
gradients in their inputs' dtypes. Nothing [B, F] is kept.
"""

from typing import NamedTuple

import torch

from ..._registry import register_op
from ..._validation import as_count, check_encoder_args, check_jumprelu_args
from ...primitives.csr import csr_transpose
from ...primitives.encoder import encoder_backward
from ...primitives.gather import row_ids
from ...primitives.select.preacts import threshold_preacts

# Host launchers ----------------------------------------------------------------


class JumpreluEncodeInputs(NamedTuple):
    """``jumprelu_encode``'s arguments, in the registered op's order."""

    x: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    threshold: torch.Tensor
    bandwidth: float
    capacity: int


def _active(z, indices, threshold, dtype):
    """(active, theta at each entry): z > theta in the activations' dtype; empty slots never active."""
    theta = threshold.to(dtype)[indices.clamp_min(0)]
    return (z > theta) & (indices >= 0), theta


def jumprelu_encode_fwd(i: JumpreluEncodeInputs) -> tuple[torch.Tensor, ...]:
    """Returns (vals [capacity], indices [capacity] (-1 in empty slots), row_offsets [B + 1], count [], z)."""
    z, indices, row_offsets, count = threshold_preacts(
        i.x, i.W_enc, i.b_enc, None, i.threshold, i.bandwidth, i.capacity
    )
    active, _ = _active(z, indices, i.threshold, i.x.dtype)
    return torch.where(active, z, 0), indices, row_offsets, count, z


def jumprelu_encode_fwd_fake(i: JumpreluEncodeInputs):
    x, cap = i.x, i.capacity
    int64 = dict(dtype=torch.int64)
    return (x.new_empty(cap), x.new_empty(cap, **int64), x.new_empty(x.shape[0] + 1, **int64),
            x.new_empty((), **int64), x.new_empty(cap))  # fmt: skip


def jumprelu_encode_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dx, dW_enc, db_enc, dthreshold), from one CSR transpose of the code."""
    F = saved.W_enc.shape[0]
    active, theta = _active(saved.z, saved.indices, saved.threshold, saved.x.dtype)
    g = grads.vals.float()
    csr = csr_transpose(saved.indices, F, in_range=True)
    rows = row_ids(saved.row_offsets, saved.indices.numel())
    dx, dW_enc, db_enc, _ = encoder_backward(
        torch.where(active, g, 0.0), saved.x, saved.W_enc, None, saved.indices, csr=csr,
        row_offsets=saved.row_offsets, rows=rows,
    )  # fmt: skip
    u = (saved.z - theta) / saved.bandwidth  # in the activations' dtype, as the reference computes it
    band = (u > -0.5) & (u < 0.5) & (saved.indices >= 0)
    q = torch.where(band, -(theta.float() / saved.bandwidth) * g, 0.0)
    perm, offsets = csr
    dthreshold = torch.segment_reduce(q[perm], "sum", offsets=offsets, unsafe=True)
    dtype = saved.W_enc.dtype
    return dx.to(dtype), dW_enc, db_enc.to(dtype), dthreshold.to(saved.threshold.dtype)


def jumprelu_encode_bwd_fake(grads, saved, needs: list[bool]):
    x, W_enc = saved.x, saved.W_enc
    return (torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[0]),
            torch.empty_like(saved.threshold))  # fmt: skip


# Op registration and autograd ----------------------------------------------------

_jumprelu_encode = register_op(
    "jumprelu_encode",
    inputs=JumpreluEncodeInputs,
    launchers=(jumprelu_encode_fwd, jumprelu_encode_fwd_fake, jumprelu_encode_bwd, jumprelu_encode_bwd_fake),
    saved=("x", "W_enc", "threshold", "bandwidth", "z", "indices", "row_offsets"),
    outputs=("vals", "indices", "row_offsets", "count", "z"),
    differentiable=("vals",),
    grad_inputs=("x", "W_enc", "b_enc", "threshold"),
)


# Public function ---------------------------------------------------------------


def jumprelu_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor, *, capacity: int,
    bandwidth: float = 1.0,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """JumpReLU encoder: ``vals = z * H(z - threshold)``, z = x @ W_enc.T + b_enc, as a fixed-capacity code.

    Args:
        x: [B, D] inputs, W_enc's dtype (read as they are: no decoder-bias centring).
        W_enc: [F, D] encoder rows, fp32, bf16 or fp16; b_enc: [F], W_enc's dtype.
        threshold: [F] theta >= 0 (any float dtype; compared in x's dtype).
        capacity: the code's static size (entries over the batch, active or in the band).
        bandwidth: the rectangle kernel's width (> 0).

    Returns:
        (vals [capacity] in x's dtype, indices [capacity] int64, row_offsets [B + 1] int64,
        count [] int64): the active entries (vals = z) and those within half a bandwidth of the
        threshold (vals = 0), each row's by latent id; empty slots hold id -1 and value 0;
        ``count > capacity`` means entries were dropped. ``vals`` is differentiable in x, W_enc,
        b_enc and threshold (the straight-through estimators above); deterministic; no host sync.
    """
    check_encoder_args(x, W_enc, b_enc, 1, None)
    capacity = as_count(capacity)
    check_jumprelu_args(threshold, W_enc.shape[0], capacity, bandwidth, 0.0, x)
    out = _jumprelu_encode.named(_jumprelu_encode(
        x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), threshold.contiguous(), float(bandwidth), capacity
    ))  # fmt: skip
    return out.vals, out.indices, out.row_offsets, out.count
