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

import torch

from ..._validation import as_count, check_prefix_sizes
from ...dead_latent_loss import DeadLatentLoss
from ...primitives.select.preacts import topk_preacts
from ...results import MatryoshkaSAEStep, SparseCode, TopKSAEStep
from .._dead import DEAD_INPUTS, DEAD_OUTPUTS, dead_op_args
from .._matryoshka import min_positive
from .._step import (
    Selected,
    checked_step_args,
    flat_code,
    mse_selection_step_fwd,
    mse_selection_step_fwd_fake,
    register_selection_step,
    selection_step_head,
    step_head,
    step_inputs,
    step_tensors,
)

# Host launchers ----------------------------------------------------------------


TopkSaeStepInputs = step_inputs("TopkSaeStepInputs", k=int, prefix_sizes=list[int], **DEAD_INPUTS)


def topk_sae_step_fwd(i: TopkSaeStepInputs) -> tuple[torch.Tensor, ...]:
    """``mse_selection_step_fwd`` with the per-row TopK rule: (loss, mse, fvu, fire_counts, vals, indices,
    residual, level_losses, *DEAD_OUTPUTS); with Matryoshka's levels the [B, k] code is ordered by latent id
    in each row."""

    def select(centre, columns):
        vals, indices = topk_preacts(i.x, i.W_enc, i.b_enc, i.k, centre, columns=columns, relu=True)
        return Selected(vals, indices, None, None, ())

    return mse_selection_step_fwd(i, select)


def topk_sae_step_fwd_fake(i: TopkSaeStepInputs):
    B = i.x.shape[0]
    return mse_selection_step_fwd_fake(i, (i.x.new_empty(B, i.k), i.x.new_empty(B, i.k, dtype=torch.int64)))


# Op registration and autograd ----------------------------------------------------

_topk_sae_step = register_selection_step(
    "topk_sae_step",
    TopkSaeStepInputs,
    topk_sae_step_fwd,
    topk_sae_step_fwd_fake,
    ("loss", "mse", "fvu", "fire_counts", "vals", "indices", "residual", "level_losses", *DEAD_OUTPUTS),
)


# Public function ---------------------------------------------------------------


def topk_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int, *,
    target: torch.Tensor | None = None, dead_loss: DeadLatentLoss | None = None,
) -> TopKSAEStep:  # fmt: skip
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
        dead_loss: None, or a ``DeadLatentLoss`` with its ``mask`` (the [F] bool dead set, a
            module's ``dead_mask()``): the step then adds AuxK or ghost grads on the dead set
            (``ops/_dead.py`` states the formulas): ``loss = mse + coef * aux_loss``.

    Returns:
        ``TopKSAEStep(loss, mse, fvu, l0, fire_counts, code, aux_loss)``: ``loss`` is a 0-d fp32
        tensor, differentiable in every tensor argument; ``mse``, ``fvu``, ``l0`` (0-d fp32) and
        ``fire_counts`` ([F] int64, how often each latent fired in this batch) are computed on the
        device without a host sync; ``code`` holds the [B, k] ``vals`` and ``indices``; ``aux_loss``
        (0-d fp32, differentiable, None without a ``dead_loss``) is the dead-latent loss before
        its coefficient. Nothing [B, F] is kept for the backward, which is deterministic.
    """
    k = as_count(k)
    B, D, F = checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, k)
    dead = dead_op_args(dead_loss, x, F)
    out = _topk_sae_step.named(_topk_sae_step(*step_tensors(x, W_enc, b_enc, W_dec, b_dec, target), k, [], *dead))
    return TopKSAEStep(**selection_step_head(out, B, dead.on), aux_loss=out.aux_loss if dead.on else None)


def matryoshka_topk_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int,
    prefix_sizes, *, target: torch.Tensor | None = None,
) -> MatryoshkaSAEStep:  # fmt: skip
    """The TopK step with Matryoshka's nested levels (Nabeshima 2024's TopK variant): the summed losses of
    nested prefix dictionaries, on the same registered op as ``topk_sae_step``.

        vals, indices = topk_encode(x, W_enc, b_enc, k, b_dec)     (each row's k largest, relu'd)
        loss          = sum over the nested levels m_1 < ... < m_G = F of the level's MSE

    The selection is ``topk_sae_step``'s (same tie rule); the code is reordered by latent id inside each
    row, so each level is a prefix of the row: all G levels in one decoder pass, one CSR transpose in the
    backward (``ops/_matryoshka.py``).

    Args:
        x, W_enc, b_enc, W_dec, b_dec, k: as ``topk_sae_step`` (k latents per row, 1 <= k <= F).
        prefix_sizes: the nested dictionaries' sizes m_1 < ... < m_G, ending at F.
        target: None (an SAE), or [B, D_out] (a transcoder), as ``topk_sae_step``'s: every level
            reconstructs the target (each level's loss a mean over B*D_out), x is encoded as it is,
            and the loss is differentiable in ``target`` too.

    Returns:
        ``MatryoshkaSAEStep(loss, mse, fvu, l0, fire_counts, code, level_losses, min_act)``:
        ``loss`` (0-d fp32, the sum of the G level losses, each a mean over B*D) is
        differentiable in every tensor argument; the code is [B * k] by row, then latent id
        (``row_offsets`` = arange(B + 1) * k); ``min_act`` is the smallest positive value of the
        code. No host sync; nothing [B, F] kept (the G residuals are [G, B, D] fp32); deterministic.
    """
    k = as_count(k)
    B, _, F = checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, k)
    sizes = check_prefix_sizes(prefix_sizes, F)
    tensors = step_tensors(x, W_enc, b_enc, W_dec, b_dec, target)
    out = _topk_sae_step.named(_topk_sae_step(*tensors, k, sizes, *dead_op_args(None, x, F)))
    head = step_head(out, B, mse=out.level_losses[-1])
    head["code"] = SparseCode(*flat_code(out.vals, out.indices, None))
    return MatryoshkaSAEStep(**head, level_losses=out.level_losses, min_act=min_positive(out.vals))
