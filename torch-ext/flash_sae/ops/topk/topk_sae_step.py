"""The whole TopK SAE training step: encode, decode, MSE loss, forward and backward.

    vals, indices = topk_encode(x, W_enc, b_enc, k, b_dec)
    loss = mean over B*D of (b_dec + sum_k vals * W_dec[indices] - x)^2

What is fused beyond composing ``topk_encode`` and ``topk_sae_loss``:
- one CSR transpose of the code (the stable sort, the costliest small op of the
  backward) serves both the decoder and the encoder weight gradients;
- the decoder's segmented pass returns ``<r[b], W_dec[f]>`` for every (b, k),
  which is the gradient reaching the code; with the ReLU mask it becomes the
  encoder's coefficient directly, with no [B, K] round trip through autograd;
- b_dec's two gradients (decoder bias, and the centring ``x - b_dec``) are
  summed in one place.
What is not fused (yet): the two segmented passes (decoder and encoder) are
separate launches, since the encoder's coefficients need the decoder's full
dot products first.

Built from the primitives directly (``select`` for the encoder's selection,
``gather`` for decode, ``step_backward`` for the whole backward), not from
the ``topk_encode`` / ``topk_sae_loss`` ops.

Statistics returned without a host sync: the fraction of variance unexplained
(sum r^2 over the batch's total variance about its mean; undefined, inf or
NaN, for B = 1) and the per-latent fire counts (slots with a value > 0, an
integer scatter-add, so exact and deterministic); L0 is k by construction
(slots whose pre-activation was <= 0 hold value 0).

Bytes: the encoder GEMM's pre-activations (written once, read once, chunked
over F), O(B*K*D) gathers, one write each of dW_enc and dW_dec. Kept for
backward: x, the weights, the [B, K] code and the fp32 residual [B, D].

Precision: fp32 accumulation; loss and FVU in fp32; gradients in the inputs'
dtype. Deterministic. Shapes as ``topk_encode``.
"""

import torch

from ..._registry import register_op
from ..._validation import check_step_args
from ...primitives.gather import gather_rows
from ...primitives.select import topk_preacts
from ...primitives.step_backward import mse_step_backward
from ...results import TopKSAEStep, fire_counts, total_variance
from .._step import step_grads_fake

# Host launchers ----------------------------------------------------------------


def topk_sae_step_fwd(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, fvu, fire_counts, vals, indices, residual)."""
    B, D = x.shape
    values, indices = topk_preacts(x, W_enc, b_enc, k, b_dec)
    vals = torch.relu(values)
    residual, sq = gather_rows(vals, indices, W_dec, b_dec, x)
    return sq / (B * D), sq / total_variance(x), fire_counts(vals, indices, W_dec.shape[0]), vals, indices, residual


def topk_sae_step_fwd_fake(x, W_enc, b_enc, W_dec, b_dec, k):
    B, D = x.shape
    F = W_dec.shape[0]
    f32, i64 = torch.float32, torch.int64
    return (
        x.new_empty((), dtype=f32),
        x.new_empty((), dtype=f32),
        x.new_empty(F, dtype=i64),
        x.new_empty(B, k),
        x.new_empty(B, k, dtype=i64),
        x.new_empty(B, D, dtype=f32),
    )


def topk_sae_step_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    vals: torch.Tensor,
    indices: torch.Tensor,
    residual: torch.Tensor,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW_enc, db_enc, dW_dec, db_dec), each in W_enc's dtype; one CSR transpose serves both weights."""
    return mse_step_backward(grad, x, W_enc, W_dec, b_dec, vals, indices, residual)


def topk_sae_step_bwd_fake(grad, x, W_enc, W_dec, b_dec, vals, indices, residual, needs):
    return step_grads_fake(x, W_enc, W_dec, b_dec)


# Op registration and autograd ----------------------------------------------------

_topk_sae_step = register_op(
    "topk_sae_step",
    forward=topk_sae_step_fwd,
    forward_fake=topk_sae_step_fwd_fake,
    backward=topk_sae_step_bwd,
    backward_fake=topk_sae_step_bwd_fake,
    # x, W_enc, W_dec, b_dec, and the code and residual
    save=lambda args, outputs: (args[0], args[1], args[3], args[4], outputs[3], outputs[4], outputs[5]),
    differentiable=(0,),
    grad_inputs=(0, 1, 2, 3, 4),  # x, W_enc, b_enc, W_dec, b_dec
)


# Public function ---------------------------------------------------------------


def topk_sae_step(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
) -> TopKSAEStep:
    """One TopK SAE step: ``loss = mean((b_dec + decode(topk_encode(x)) - x)^2)`` and its statistics.

    Args:
        x: [B, D] activations, the parameters' dtype.
        W_enc: [F, D] encoder rows (fp32, bf16 or fp16); b_enc: [F]; W_dec: [F, D]
            decoder rows; b_dec: [D], subtracted before encoding and added after
            decoding. All W_enc's dtype.
        k: active latents per row, 1 <= k <= F.

    Returns:
        ``TopKSAEStep(loss, fvu, fire_counts, vals, indices)``: ``loss`` is a 0-d
        fp32 tensor, differentiable in every tensor argument; ``fvu`` (0-d fp32)
        and ``fire_counts`` ([F] int64, how often each latent fired in this
        batch) are computed on the device without a host sync; ``vals``/``indices``
        are the [B, k] code. Nothing [B, F] is kept for the backward, which is
        deterministic.
    """
    check_step_args(x, W_enc, b_enc, W_dec, b_dec, k)
    out = _topk_sae_step(
        x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), W_dec.contiguous(), b_dec.contiguous(), k
    )
    return TopKSAEStep(*out[:5])
