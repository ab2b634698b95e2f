"""The whole BatchTopK SAE training step (Bussmann, Leask, Nanda 2024), on the sparse path.

    acts  = relu(pre * ||W_dec[f]||)   (rescale_acts_by_decoder_norm; else relu(pre)),
            pre = (x - b_dec) @ W_enc.T + b_enc
    code  = the int(k * B) largest entries of acts over the whole batch (rows get different counts)
    x_hat = b_dec + sum over the code of relu(pre) * W_dec[f]      (= acts / ||W_dec[f]|| * W_dec[f])
    loss  = mean over B*D of (x_hat - x)^2

The rescaling is SAELens's default for its TopK and BatchTopK training SAEs: the selection
ranks pre-activations as if the decoder rows had unit norm; the reconstruction is the
plain one, so no gradient flows through the norms. For a crosscoder (``crosscoder=CrosscoderLayers(L)``)
the factor is the sum of the norms of the L per-layer blocks of each decoder row, sum_l ||W_dec[f, l]||,
by which dictionary_learning's ``BatchTopKCrossCoder`` ranks.

With ``CrosscoderLayers(L, l2_loss=True)`` the loss is the mean over rows and layers of each layer's
error norm (unsquared), as dictionary_learning's crosscoder trainer minimises; its backward
is the MSE backward at a rescaled residual (``primitives.step_backward.grouped_l2_loss``), so the
passes are the same.

What is fused:
- selection, exact, from the chunked encoder GEMM (``primitives.select.preacts.batch_topk_preacts``):
  the group-maximum prefilter over the flattened chunk, then the ordered compaction
  (``primitives.compact``) over the group keys and over the chosen groups' entries, a merge
  across chunks; tie rule: larger value first, then the lower flat position b * F + f. No
  [B, F] tensor survives the forward.
- decode and MSE: the row gather over the variable-length code (``row_offsets``), with the
  fp32 residual and the squared-error sum in the same pass.
- backward: ``primitives.step_backward`` (one CSR transpose for both weight gradients, the
  encoder's sparse backward), as for the TopK step.

Returned without a host sync: the loss, FVU, per-latent fire counts, the code, and the
smallest positive selected activation (for the inference threshold; +inf if none).

Precision: fp32 accumulation; loss and FVU in fp32; gradients in the parameters' dtype.
Deterministic. Shapes: B >= 1, F < 2^31, 1 <= int(k * B) <= B * F.
"""

import torch

from ..._validation import check_batch_k, check_prefix_sizes
from ...crosscoder_layers import CrosscoderLayers
from ...dead_latent_loss import DeadLatentLoss
from ...primitives.select.preacts import batch_topk_preacts
from ...primitives.step_backward import grouped_l2_loss, grouped_row_norms
from ...results import BatchTopKSAEStep, MatryoshkaSAEStep
from .._dead import DEAD_INPUTS, DEAD_OUTPUTS, dead_op_args
from .._step import (
    Selected,
    checked_step_args,
    mse_selection_step_fwd,
    mse_selection_step_fwd_fake,
    register_selection_step,
    selection_step_head,
    step_head,
    step_inputs,
    step_tensors,
)

# Host launchers ----------------------------------------------------------------


BatchtopkSaeStepInputs = step_inputs(
    "BatchtopkSaeStepInputs", n=int, rescale_acts_by_decoder_norm=bool, decoder_norm_groups=int, l2_loss_groups=int,
    prefix_sizes=list[int], **DEAD_INPUTS,
)  # fmt: skip


def ranking_scale(W_dec: torch.Tensor, rescale: bool, groups: int) -> torch.Tensor | None:
    """The factor the selection ranks pre-activations by: None without the rescaling; ||W_dec[f]||; with G > 1
    groups, the sum over the G column blocks of ||W_dec[f, g]|| (summed in fp32). In W_dec's dtype, the
    activations' (the selection multiplies in that dtype)."""
    if not rescale:
        return None
    W = W_dec.detach()
    return W.norm(dim=1) if groups == 1 else grouped_row_norms(W, groups).sum(1).to(W.dtype)


def batchtopk_sae_step_fwd(i: BatchtopkSaeStepInputs) -> tuple[torch.Tensor, ...]:
    """``mse_selection_step_fwd`` with the batch rule: (loss, mse, fvu, fire_counts, vals, indices,
    row_offsets, min_act, residual, level_losses, *DEAD_OUTPUTS). With the rescaling, AuxK ranks the dead
    pre-activations by pre * ||W_dec[f]|| too. The code is row-major by latent id, as Matryoshka's levels need."""
    scale = ranking_scale(i.W_dec, i.rescale_acts_by_decoder_norm, i.decoder_norm_groups)

    def select(centre, columns):
        acts, vals, indices, row_offsets = batch_topk_preacts(
            i.x, i.W_enc, i.b_enc, i.n, centre, scale, columns=columns
        )  # fmt: skip
        min_act = torch.where(acts > 0, acts.float(), float("inf")).amin()
        return Selected(vals, indices, row_offsets, scale, (min_act,))

    out = mse_selection_step_fwd(i, select)
    return with_l2_loss(i, out) if i.l2_loss_groups else out


def with_l2_loss(i: BatchtopkSaeStepInputs, out: tuple) -> tuple:
    """The outputs with ``l2_loss_groups``: the loss the mean of the blocks' error norms (+ the dead-latent
    term), ``mse`` the mean squared error (returned even without a dead-latent loss) and the residual the
    one the MSE backward turns into the norms' gradient."""
    out = _batchtopk_sae_step.named(out)
    l2, residual = grouped_l2_loss(out.residual, i.l2_loss_groups, per_row=False)
    mse = out.mse if out.mse.numel() else out.loss
    loss = l2 + i.aux_coef * out.aux_loss if out.mse.numel() else l2
    return tuple(out._replace(loss=loss, mse=mse, residual=residual))


def batchtopk_sae_step_fwd_fake(i: BatchtopkSaeStepInputs):
    x, n, i64 = i.x, i.n, torch.int64
    code = (x.new_empty(n), x.new_empty(n, dtype=i64), x.new_empty(x.shape[0] + 1, dtype=i64))
    out = mse_selection_step_fwd_fake(i, code, (x.new_empty((), dtype=torch.float32),))
    if not i.l2_loss_groups:
        return out
    return tuple(_batchtopk_sae_step.named(out)._replace(mse=x.new_empty((), dtype=torch.float32)))


# Op registration and autograd ----------------------------------------------------

_batchtopk_sae_step = register_selection_step(
    "batchtopk_sae_step",
    BatchtopkSaeStepInputs,
    batchtopk_sae_step_fwd,
    batchtopk_sae_step_fwd_fake,
    (
        "loss",
        "mse",
        "fvu",
        "fire_counts",
        "vals",
        "indices",
        "row_offsets",
        "min_act",
        "residual",
        "level_losses",
        *DEAD_OUTPUTS,
    ),
)


# Public function ---------------------------------------------------------------


def batchtopk_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: float, *,
    target: torch.Tensor | None = None, rescale_acts_by_decoder_norm: bool = False,
    dead_loss: DeadLatentLoss | None = None, crosscoder: CrosscoderLayers | None = None,
) -> BatchTopKSAEStep:  # fmt: skip
    """One BatchTopK SAE step: the int(k * B) largest activations of the whole batch, decoded, MSE.

    Args:
        x: [B, D] activations, the parameters' dtype.
        W_enc: [F, D] encoder rows (fp32, bf16 or fp16); b_enc: [F]; W_dec: [F, D] decoder
            rows; b_dec: [D], subtracted before encoding and added after decoding.
        k: active latents per row on average (an int or a float, as SAELens's ``k``); the
            batch keeps N = int(k * B) entries, 1 <= N <= B * F.
        target: None (an SAE), or [B, D_out] (a transcoder), as ``topk_sae_step``'s.
        rescale_acts_by_decoder_norm: rank relu(pre * ||W_dec[f]||) instead of relu(pre)
            (SAELens's default for its BatchTopK training SAE).
        dead_loss: a ``DeadLatentLoss`` with its mask, as ``topk_sae_step``'s; with the rescaling,
            AuxK ranks the dead pre-activations by pre * ||W_dec[f]|| too (as SAELens does).
        crosscoder: None, or a ``CrosscoderLayers(L, l2_loss)`` (with ``target=x``, xs [B, L, D]
            flattened): with the rescaling, rank by sum_l ||W_dec[f, l]||, the norms of the L per-layer
            blocks of each row (as dictionary_learning's ``BatchTopKCrossCoder``); with ``l2_loss`` the
            loss is the mean over B and L of ||x_hat_l - x_l||_2, unsquared (``mse`` stays the mean
            squared error).

    Returns:
        ``BatchTopKSAEStep(loss, mse, fvu, l0, fire_counts, code, min_act, aux_loss)``:
        ``loss`` (0-d fp32, the mean over B*D) is differentiable in every tensor argument;
        the code is variable-length (row b's entries at row_offsets[b]:row_offsets[b+1], by
        latent id); ``min_act`` is the smallest positive ranked activation, the input of the
        inference-threshold estimate; ``aux_loss`` as ``topk_sae_step``'s. No host sync; nothing
        [B, F] kept; deterministic.
    """
    B, _, F = checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, 1)
    n = check_batch_k(k, B, F)
    if not isinstance(rescale_acts_by_decoder_norm, bool):
        raise ValueError(f"rescale_acts_by_decoder_norm must be a bool, got {rescale_acts_by_decoder_norm!r}")
    groups, l2_groups = CrosscoderLayers.groups(crosscoder, W_dec.shape[1])
    dead = dead_op_args(dead_loss, x, F)
    tensors = step_tensors(x, W_enc, b_enc, W_dec, b_dec, target)
    out = _batchtopk_sae_step.named(
        _batchtopk_sae_step(*tensors, n, rescale_acts_by_decoder_norm, groups, l2_groups, [], *dead)
    )  # fmt: skip
    head = step_head(out, B) if l2_groups else selection_step_head(out, B, dead.on)
    return BatchTopKSAEStep(**head, min_act=out.min_act, aux_loss=out.aux_loss if dead.on else None)


def matryoshka_batchtopk_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: float,
    prefix_sizes, *, target: torch.Tensor | None = None, rescale_acts_by_decoder_norm: bool = False,
) -> MatryoshkaSAEStep:  # fmt: skip
    """The BatchTopK step with Matryoshka's nested levels (Bussmann et al. 2025; Nabeshima 2024): the summed
    losses of nested prefixes, on the same registered op as ``batchtopk_sae_step``.

        code   = BatchTopK's (the int(k * B) largest of relu(pre (* ||W_dec||)))
        loss   = sum over the nested levels m_1 < ... < m_G = F of the level's MSE (``ops/_matryoshka.py``)

    Args:
        x, W_enc, b_enc, W_dec, b_dec, k, rescale_acts_by_decoder_norm: as ``batchtopk_sae_step``.
        prefix_sizes: the nested dictionaries' sizes m_1 < ... < m_G, ending at F (SAELens's
            ``matryoshka_widths``).
        target: None (an SAE), or [B, D_out] (a transcoder), as ``batchtopk_sae_step``'s: every level
            reconstructs the target (each level's loss a mean over B*D_out), x is encoded as it is,
            and the loss is differentiable in ``target`` too.

    Returns:
        ``MatryoshkaSAEStep(loss, mse, fvu, l0, fire_counts, code, level_losses, min_act)``:
        ``loss`` (0-d fp32, the sum of the G level losses, each a mean over B*D) is
        differentiable in every tensor argument. No host sync; nothing [B, F] kept (the G residuals are
        [G, B, D] fp32); deterministic.
    """
    B, _, F = checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, 1)
    n = check_batch_k(k, B, F)
    sizes = check_prefix_sizes(prefix_sizes, F)
    if not isinstance(rescale_acts_by_decoder_norm, bool):
        raise ValueError(f"rescale_acts_by_decoder_norm must be a bool, got {rescale_acts_by_decoder_norm!r}")
    tensors = step_tensors(x, W_enc, b_enc, W_dec, b_dec, target)
    no_dead = dead_op_args(None, x, F)
    out = _batchtopk_sae_step.named(
        _batchtopk_sae_step(*tensors, n, rescale_acts_by_decoder_norm, 1, 0, sizes, *no_dead)
    )
    head = step_head(out, B, mse=out.level_losses[-1])
    return MatryoshkaSAEStep(**head, level_losses=out.level_losses, min_act=out.min_act)
