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

from ._common import check_same_device, check_same_dtype, check_tensor, eager_function
from ._csr import csr_transpose, segment_sum
from ._ops import add_op_namespace_prefix
from .reference import TopKSAEStep, fire_counts
from .sparse_decode import sparse_decode_fwd
from .topk_encode import check_encoder_args, topk_encode_bwd, topk_encode_fwd

# Host launchers ----------------------------------------------------------------


def topk_sae_step_fwd(x, W_enc, b_enc, W_dec, b_dec, k):
    """Returns (loss, fvu, fire_counts, vals, indices, residual)."""
    B, D = x.shape
    vals, indices = topk_encode_fwd(x, W_enc, b_enc, k, b_dec)
    residual, sq = sparse_decode_fwd(indices, vals, W_dec, b_dec, x)
    xf = x.float()
    total_var = (xf - xf.mean(0)).pow(2).sum()
    return sq / (B * D), sq / total_var, fire_counts(indices, vals, W_dec.shape[0]), vals, indices, residual


def topk_sae_step_bwd(grad, x, W_enc, W_dec, b_dec, vals, indices, residual):
    """Returns (dx, dW_enc, db_enc, dW_dec, db_dec), each in its input's dtype."""
    B, D = residual.shape
    K = indices.shape[1]
    perm, offsets = csr_transpose(indices, W_dec.shape[0])
    s_const = 2.0 / (B * D)
    s = grad.float() * s_const
    dW_dec = torch.empty_like(W_dec)
    dots = segment_sum(
        perm,
        offsets,
        residual,
        K=K,
        out=dW_dec,
        element_rows=False,
        coef=vals,
        scale=grad.float(),
        scale_const=s_const,
        weight=W_dec,
    )
    dvals = dots.view(B, K) * s
    dx_enc, dW_enc, db_enc, db_dec_enc = topk_encode_bwd(dvals, x, W_enc, b_dec, vals, indices, csr=(perm, offsets))
    dx = dx_enc - residual * s
    db_dec = residual.sum(0) * s + db_dec_enc
    dtype = x.dtype
    return dx.to(dtype), dW_enc, db_enc.to(dtype), dW_dec, db_dec.to(dtype)


# Op registration ---------------------------------------------------------------


@torch.library.custom_op(add_op_namespace_prefix("topk_sae_step"), mutates_args=())
def _topk_sae_step_op(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return topk_sae_step_fwd(x, W_enc, b_enc, W_dec, b_dec, k)


@_topk_sae_step_op.register_fake
def _(x, W_enc, b_enc, W_dec, b_dec, k):
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


@torch.library.custom_op(add_op_namespace_prefix("topk_sae_step_backward"), mutates_args=())
def _topk_sae_step_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    vals: torch.Tensor,
    indices: torch.Tensor,
    residual: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return topk_sae_step_bwd(grad, x, W_enc, W_dec, b_dec, vals, indices, residual)


@_topk_sae_step_backward_op.register_fake
def _(grad, x, W_enc, W_dec, b_dec, vals, indices, residual):
    return (
        torch.empty_like(x),
        torch.empty_like(W_enc),
        W_enc.new_empty(W_enc.shape[0]),
        torch.empty_like(W_dec),
        torch.empty_like(b_dec),
    )


# Autograd ----------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, W_enc, _, W_dec, b_dec, _ = inputs
    _, fvu, counts, vals, indices, residual = output
    ctx.mark_non_differentiable(fvu, counts, vals, indices, residual)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, W_enc, W_dec, b_dec, vals, indices, residual)


def _backward(ctx, grad, *_unused, bwd=None):
    if grad is None:
        return (None,) * 6
    grads = (bwd or _topk_sae_step_backward_op)(grad, *ctx.saved_tensors)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])) + (None,)


_topk_sae_step_op.register_autograd(_backward, setup_context=_setup_context)
_topk_sae_step_eager = eager_function(
    "TopkSaeStep", topk_sae_step_fwd, _setup_context, lambda ctx, *g: _backward(ctx, *g, bwd=topk_sae_step_bwd)
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
        x: [B, D] activations, fp32, bf16 or fp16.
        W_enc: [F, D] encoder rows; b_enc: [F]; W_dec: [F, D] decoder rows;
            b_dec: [D], subtracted before encoding and added after decoding. All x's dtype.
        k: active latents per row, 1 <= k <= F.

    Returns:
        ``TopKSAEStep(loss, fvu, fire_counts, vals, indices)``: ``loss`` is a 0-d
        fp32 tensor, differentiable in every tensor argument; ``fvu`` (0-d fp32)
        and ``fire_counts`` ([F] int64, how often each latent fired in this
        batch) are computed on the device without a host sync; ``vals``/``indices``
        are the [B, k] code. Nothing [B, F] is kept for the backward, which is
        deterministic.
    """
    if b_dec is None:
        raise ValueError("b_dec must be a [D] tensor (use zeros for an SAE without a decoder bias)")
    check_encoder_args(x, W_enc, b_enc, k, b_dec)
    check_tensor("W_dec", W_dec, 2)
    if tuple(W_dec.shape) != tuple(W_enc.shape):
        raise ValueError(f"W_dec must have W_enc's shape {tuple(W_enc.shape)}, got {tuple(W_dec.shape)}")
    check_same_dtype("x", x, W_dec=W_dec)
    check_same_device(x=x, W_dec=W_dec)
    op = _topk_sae_step_op if torch.compiler.is_compiling() else _topk_sae_step_eager
    out = op(x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), W_dec.contiguous(), b_dec.contiguous(), k)
    return TopKSAEStep(*out[:5])
