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
NaN, for B = 1) and the per-latent fire counts (slots with a value > 0, integer
atomic adds in the decode gather, so exact and deterministic); L0 is k by construction
(slots whose pre-activation was <= 0 hold value 0).

Bytes: the encoder GEMM's pre-activations (written once, read once, chunked
over F), O(B*K*D) gathers, one write each of dW_enc and dW_dec. Kept for
backward: x, the weights, the [B, K] code and the fp32 residual [B, D].

Precision: fp32 accumulation; loss and FVU in fp32; gradients in the inputs'
dtype. Deterministic. Shapes as ``topk_encode``.
"""

from typing import NamedTuple

import torch

from ..._registry import register_op
from ..._validation import as_count, check_dead_loss_args
from ...primitives.gather import gather_residual
from ...primitives.select.preacts import topk_preacts
from ...results import TopKSAEStep, total_variance
from .._dead import (
    DEAD_OUTPUTS,
    NO_DEAD_LOSS,
    DeadLossSpec,
    dead_columns_for,
    dead_fakes,
    dead_loss_spec,
    dead_outputs,
)
from .._step import (
    SELECTION_STEP_SAVED,
    checked_step_args,
    mse_selection_step_backward,
    mse_selection_step_backward_fake,
)

# Host launchers ----------------------------------------------------------------


class TopkSaeStepInputs(NamedTuple):
    """``topk_sae_step``'s arguments, in the registered op's order."""

    x: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    target: torch.Tensor | None
    k: int
    dead_mask: torch.Tensor | None
    dead_offset: torch.Tensor | None
    dead: list[int]
    aux_coef: float


def topk_sae_step_fwd(
    i: TopkSaeStepInputs,
) -> tuple[torch.Tensor, ...]:
    """Returns (loss, fvu, fire_counts, vals, indices, residual, *DEAD_OUTPUTS); ``dead`` is a
    ``DeadLossSpec`` (``ops/_dead.py``), the dead-latent loss's outputs are empty without one. The
    reconstruction's target is x (encoded as x - b_dec), or ``target`` (x encoded as it is)."""
    x, W_dec, b_dec = i.x, i.W_dec, i.b_dec
    y, centre = (x, b_dec) if i.target is None else (i.target, None)
    B, D = y.shape
    spec = DeadLossSpec.from_op(i.dead)
    columns, slots = dead_columns_for(x, spec, i.dead_mask, i.dead_offset)
    vals, indices = topk_preacts(x, i.W_enc, i.b_enc, i.k, centre, columns=columns, relu=True)
    counts = torch.zeros(W_dec.shape[0], dtype=torch.int64, device=x.device)  # fired, counted by the decode
    residual, sq = gather_residual(vals, indices, W_dec, b_dec, y, counts=counts)
    dead_out = dead_outputs(spec, slots, x, residual, W_dec)
    loss = sq / (B * D)
    if spec.mode:
        loss = loss + i.aux_coef * dead_out[0]
    return loss, sq / total_variance(y), counts, vals, indices, residual, *dead_out


def topk_sae_step_fwd_fake(i: TopkSaeStepInputs):
    x, W_dec, k, dead = i.x, i.W_dec, i.k, i.dead
    B, D = x.shape[0], W_dec.shape[1]
    F = W_dec.shape[0]
    f32, i64 = torch.float32, torch.int64
    return (
        x.new_empty((), dtype=f32),
        x.new_empty((), dtype=f32),
        x.new_empty(F, dtype=i64),
        x.new_empty(B, k),
        x.new_empty(B, k, dtype=i64),
        x.new_empty(B, D, dtype=f32),
        *dead_fakes(x, W_dec, DeadLossSpec.from_op(dead)),
    )


# Op registration and autograd ----------------------------------------------------

_topk_sae_step = register_op(
    "topk_sae_step",
    inputs=TopkSaeStepInputs,
    launchers=(
        topk_sae_step_fwd,
        topk_sae_step_fwd_fake,
        mse_selection_step_backward,
        mse_selection_step_backward_fake,
    ),
    saved=SELECTION_STEP_SAVED,
    outputs=("loss", "fvu", "fire_counts", "vals", "indices", "residual", *DEAD_OUTPUTS),
    differentiable=("loss", "aux_loss"),
    grad_inputs=("x", "W_enc", "b_enc", "W_dec", "b_dec", "target"),
)


# Public function ---------------------------------------------------------------


def topk_sae_step(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    *,
    target: torch.Tensor | None = None,
    dead_mask: torch.Tensor | None = None,
    dead_offset: torch.Tensor | int | None = None,
    dead_loss: str = "auxk",
    k_aux: int | None = None,
    aux_coef: float | None = None,
    aux_relu: bool = True,
    aux_encoder_grad: bool = True,
    dead_capacity: int | None = None,
) -> TopKSAEStep:
    """One TopK SAE step: ``loss = mean((b_dec + decode(topk_encode(x)) - x)^2)`` and its statistics.

    Args:
        x: [B, D] activations, the parameters' dtype.
        W_enc: [F, D] encoder rows (fp32, bf16 or fp16); b_enc: [F]; W_dec: [F, D]
            decoder rows; b_dec: [D], subtracted before encoding and added after
            decoding. All W_enc's dtype.
        k: active latents per row, 1 <= k <= F.
        target: None (an SAE: reconstruct x), or [B, D_out] in x's dtype (a transcoder:
            reconstruct ``target``, e.g. an MLP's output, from x). With a target, W_dec is
            [F, D_out] and b_dec [D_out]; x is encoded as it is (no ``x - b_dec``), the loss is
            the mean over B*D_out of ``(b_dec + decode - target)^2``, ``fvu`` is relative to the
            target's variance, and the loss is differentiable in ``target`` too.
        dead_mask: [F] bool, the latents counted dead (a module's ``dead_mask()``). With it the
            step adds a dead-latent loss on the dead set (``ops/_dead.py`` states the formulas):
        dead_loss: ``"auxk"`` (Gao et al. 2024) or ``"ghost"`` (ghost grads).
        k_aux: AuxK's dead latents per row (default D // 2, the trainers' heuristic).
        aux_coef: the loss is ``mse + aux_coef * aux_loss`` (default 1/32 for AuxK, the
            paper's alpha; 1.0 for ghost grads). SAELens's ``aux_loss_coefficient`` is 1.0.
        aux_relu: AuxK activates the dead pre-activations with a ReLU (the paper, sparsify);
            False uses them as they are (SAELens).
        aux_encoder_grad: False stops the auxiliary gradient at the code, so only W_dec
            learns from it (what sparsify's encoder backward does).
        dead_capacity: slots of the dead set (default 2 * k_aux, at most F); its cost is
            O(B * dead_capacity * D) on the tensor cores. With more dead latents than slots, the
            step takes the first ``dead_capacity`` from ``dead_offset`` on (cyclically).
        dead_offset: where the dead set starts (an int or a 0-d int64 device tensor; default 0).
            The modules slide it past each step's window (``next_dead_offset``), so every dead
            latent gets its turn.

    Returns:
        ``TopKSAEStep(loss, fvu, fire_counts, vals, indices, aux_loss)``: ``loss`` is a 0-d
        fp32 tensor, differentiable in every tensor argument; ``fvu`` (0-d fp32)
        and ``fire_counts`` ([F] int64, how often each latent fired in this
        batch) are computed on the device without a host sync; ``vals``/``indices``
        are the [B, k] code; ``aux_loss`` (0-d fp32, differentiable, None without a
        ``dead_mask``) is the dead-latent loss before ``aux_coef``. Nothing [B, F] is kept
        for the backward, which is deterministic.
    """
    k = as_count(k)
    B, D, F = checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, k)
    target = target.contiguous() if target is not None else None
    spec, coef, offset = NO_DEAD_LOSS, 0.0, None
    if dead_mask is not None:
        check = check_dead_loss_args(
            dead_mask, dead_offset, dead_loss, k_aux, aux_coef, aux_relu, aux_encoder_grad, dead_capacity, x, F
        )
        spec, coef, offset = dead_loss_spec(check, aux_relu, aux_encoder_grad)
        dead_mask = dead_mask.contiguous()
    params = (x, W_enc, b_enc, W_dec, b_dec)
    out = _topk_sae_step.named(
        _topk_sae_step(*(t.contiguous() for t in params), target, k, dead_mask, offset, spec.to_op(), coef)
    )
    return TopKSAEStep(out.loss, out.fvu, out.fire_counts, out.vals, out.indices,
                       aux_loss=out.aux_loss if spec.mode else None)  # fmt: skip
