"""TopK encoder: ``vals, indices = relu(top-k over F of (x - b_dec) @ W_enc.T + b_enc)``.

What is fused and what is not:
- forward: the encoder GEMM in cuBLAS over chunks of F and the exact top-k
  selection in one read of each chunk (``primitives.select``, which states the
  tie rule and why the group-maximum prefilter is exact); no [B, F] tensor
  survives the forward. Then the ReLU of the k selected values.
- backward (saves only x, the weights and the [B, k] code): with
  dpre = dvals * (vals > 0), ``primitives.encoder`` writes dW_enc and db_enc in
  one deterministic CSR segmented pass and dx with the row gather over the k
  active encoder rows; db_dec = -sum_b dx.

Tie rule: larger value first; equal values go to the lower latent id; -0.0
equals +0.0 (``reference.topk_select`` is the same rule as a stable sort).

Precision: GEMM as torch's (fp32 accumulation in cuBLAS); backward accumulates
in fp32; outputs in the input dtype. Shapes: B >= 1, 1 <= k <= F, F < 2^31; any D.
"""

from typing import NamedTuple

import torch

from ..._registry import register_op
from ..._validation import as_count, check_encoder_args
from ...primitives.encoder import encoder_backward
from ...primitives.select.preacts import topk_preacts

# Host launchers ----------------------------------------------------------------


class TopkEncodeInputs(NamedTuple):
    """``topk_encode``'s arguments, in the registered op's order."""

    x: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor | None
    k: int


def topk_encode_fwd(i: TopkEncodeInputs) -> tuple[torch.Tensor, ...]:
    """Returns (vals [B, k] in x's dtype, indices [B, k] int64), in descending order."""
    return topk_preacts(i.x, i.W_enc, i.b_enc, i.k, i.b_dec, relu=True)


def topk_encode_fwd_fake(i: TopkEncodeInputs):
    x, k = i.x, i.k
    B = x.shape[0]
    return x.new_empty(B, k), x.new_empty(B, k, dtype=torch.int64)


def topk_encode_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dx, dW_enc, db_enc, db_dec), each in W_enc's dtype; one pass serves all four."""
    dpre = torch.where(saved.vals > 0, grads.vals.float(), 0.0)
    dx, dW_enc, db_enc, db_dec = encoder_backward(dpre, saved.x, saved.W_enc, saved.b_dec, saved.indices)
    dtype = saved.W_enc.dtype
    return dx.to(dtype), dW_enc, db_enc.to(dtype), db_dec.to(dtype) if db_dec is not None else saved.x.new_empty(0)


def topk_encode_bwd_fake(grads, saved, needs: list[bool]):
    x, W_enc, b_dec = saved.x, saved.W_enc, saved.b_dec
    db_dec = x.new_empty(x.shape[1]) if b_dec is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[0]), db_dec


# Op registration and autograd ----------------------------------------------------

_topk_encode = register_op(
    "topk_encode",
    inputs=TopkEncodeInputs,
    launchers=(topk_encode_fwd, topk_encode_fwd_fake, topk_encode_bwd, topk_encode_bwd_fake),
    saved=("x", "W_enc", "b_dec", "vals", "indices"),
    outputs=("vals", "indices"),
    differentiable=("vals",),
    grad_inputs=("x", "W_enc", "b_enc", "b_dec"),
)


# Public function ---------------------------------------------------------------


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_dec: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """TopK SAE encoder: the k largest pre-activations of each row, through a ReLU.

    ``pre = (x - b_dec) @ W_enc.T + b_enc``; returns ``(vals, indices)`` with
    ``vals = relu(top-k of pre)``, both [B, k], sorted by descending value.

    Args:
        x: [B, D] inputs, W_enc's dtype.
        W_enc: [F, D] encoder rows (one per latent), fp32, bf16 or fp16.
        b_enc: [F] encoder bias, W_enc's dtype.
        k: active latents per row, 1 <= k <= F.
        b_dec: optional [D] decoder bias, subtracted from x first (the usual
            "centring"); W_enc's dtype.

    Returns:
        vals [B, k] in x's dtype and indices [B, k] int64. Ties go to the lower
        latent id (see ``primitives.select``). Differentiable in x, W_enc, b_enc
        and b_dec; the backward keeps only the [B, k] code and the inputs, is
        O(B*k*D) plus one write of dW_enc, and is deterministic.
    """
    k = as_count(k)
    check_encoder_args(x, W_enc, b_enc, k, b_dec)
    return _topk_encode(
        x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_dec.contiguous() if b_dec is not None else None, k
    )
