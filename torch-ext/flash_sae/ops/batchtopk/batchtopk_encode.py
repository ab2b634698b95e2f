"""BatchTopK encoder: the n = int(k * B) largest of relu(x @ W_enc.T + b_enc) over the whole batch.

What is fused and what is not:
- forward: the encoder GEMM in cuBLAS over chunks of F and the whole-batch selection in one
  read of each chunk (``primitives.select.preacts.batch_topk_preacts``); no [B, F] tensor
  survives the forward. The code is variable-length (each row's entries by latent id) with a
  static size n, so nothing is sized on the host.
- backward (saves only x, W_enc and the [n] code): with dpre = dvals * (vals > 0),
  ``primitives.encoder`` writes dW_enc and db_enc in one deterministic CSR segmented pass and dx
  with the row gather over the n active encoder rows.

The encoder reads x as it is (no centring): the cross-layer transcoder's per-layer encoder.
Tie rule: as ``batch_topk_preacts`` (larger value first; equal values to the lower flat
position b * F + f). Precision: GEMM as torch's; backward accumulates in fp32; outputs in x's
dtype. Shapes: B >= 1, 1 <= int(k * B) <= B * F, F < 2^31; any D.
"""

from typing import NamedTuple

import torch

from ..._registry import register_op
from ..._validation import check_batch_k, check_encoder_args
from ...primitives.encoder import encoder_backward
from ...primitives.gather import row_ids
from ...primitives.select.preacts import batch_topk_preacts

# Host launchers ----------------------------------------------------------------


class BatchtopkEncodeInputs(NamedTuple):
    """``batchtopk_encode``'s arguments, in the registered op's order."""

    x: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    n: int


def batchtopk_encode_fwd(i: BatchtopkEncodeInputs) -> tuple[torch.Tensor, ...]:
    """Returns (vals [n] in x's dtype, indices [n] int64, row_offsets [B + 1] int64), row-major."""
    acts, _, ids, row_offsets = batch_topk_preacts(i.x, i.W_enc, i.b_enc, i.n, None)
    return acts, ids, row_offsets


def batchtopk_encode_fwd_fake(i: BatchtopkEncodeInputs):
    x, n = i.x, i.n
    int64 = dict(dtype=torch.int64)
    return x.new_empty(n), x.new_empty(n, **int64), x.new_empty(x.shape[0] + 1, **int64)


def batchtopk_encode_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dx, dW_enc, db_enc) in W_enc's dtype, from one segmented pass and one gather."""
    dpre = torch.where(saved.vals > 0, grads.vals.float(), 0.0)
    rows = row_ids(saved.row_offsets, saved.indices.numel())
    dx, dW_enc, db_enc, _ = encoder_backward(
        dpre, saved.x, saved.W_enc, None, saved.indices, row_offsets=saved.row_offsets, rows=rows
    )
    dtype = saved.W_enc.dtype
    return dx.to(dtype), dW_enc, db_enc.to(dtype)


def batchtopk_encode_bwd_fake(grads, saved, needs: list[bool]):
    x, W_enc = saved.x, saved.W_enc
    return torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[0])


# Op registration and autograd ----------------------------------------------------

_batchtopk_encode = register_op(
    "batchtopk_encode",
    inputs=BatchtopkEncodeInputs,
    launchers=(batchtopk_encode_fwd, batchtopk_encode_fwd_fake, batchtopk_encode_bwd, batchtopk_encode_bwd_fake),
    saved=("x", "W_enc", "vals", "indices", "row_offsets"),
    outputs=("vals", "indices", "row_offsets"),
    differentiable=("vals",),
    grad_inputs=("x", "W_enc", "b_enc"),
)


# Public function ---------------------------------------------------------------


def batchtopk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k) -> tuple[torch.Tensor, ...]:
    """BatchTopK encoder: the int(k * B) largest entries of ``relu(x @ W_enc.T + b_enc)`` over the batch.

    Args:
        x: [B, D] inputs, W_enc's dtype (read as they are: no decoder-bias centring).
        W_enc: [F, D] encoder rows, fp32, bf16 or fp16; b_enc: [F], W_enc's dtype.
        k: active latents per row on average (int or float); int(k * B) entries are kept.

    Returns:
        (vals [n] in x's dtype, indices [n] int64, row_offsets [B + 1] int64): a variable-length
        code, row b owning entries row_offsets[b]:row_offsets[b + 1], each row's by latent id.
        Differentiable in x, W_enc and b_enc (through ``vals``); the backward keeps only the code
        and the inputs, is O(n * D) plus one write of dW_enc, and is deterministic. No host sync.
    """
    check_encoder_args(x, W_enc, b_enc, 1, None)
    n = check_batch_k(k, x.shape[0], W_enc.shape[0])
    return _batchtopk_encode(x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), n)
