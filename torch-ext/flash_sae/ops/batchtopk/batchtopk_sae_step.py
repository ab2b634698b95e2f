"""The whole BatchTopK SAE training step (Bussmann, Leask, Nanda 2024), on the sparse path.

    acts  = relu(pre * ||W_dec[f]||)   (rescale_acts_by_decoder_norm; else relu(pre)),
            pre = (x - b_dec) @ W_enc.T + b_enc
    code  = the int(k * B) largest entries of acts over the whole batch (rows get different counts)
    x_hat = b_dec + sum over the code of relu(pre) * W_dec[f]      (= acts / ||W_dec[f]|| * W_dec[f])
    loss  = mean over B*D of (x_hat - x)^2

The rescaling is SAELens's default for its TopK and BatchTopK training SAEs: the selection
ranks pre-activations as if the decoder rows had unit norm; the reconstruction is the
plain one, so no gradient flows through the norms.

What is fused:
- selection, exact, from the chunked encoder GEMM (``primitives.select.batch_topk_preacts``):
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

from ..._registry import register_op
from ..._validation import check_batch_k, check_dead_loss_args, check_step_args
from ...primitives.gather import gather_rows
from ...primitives.select import batch_topk_preacts
from ...primitives.step_backward import mse_step_backward
from ...results import BatchTopKSAEStep, total_variance
from .._dead import AUXK, MODES, add_slot_grads_, dead_columns, dead_fakes, dead_loss_bwd, dead_loss_fwd
from .._step import step_grads_fake

# Host launchers ----------------------------------------------------------------


def batchtopk_sae_step_fwd(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    n: int,
    rescale_acts_by_decoder_norm: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Returns (loss, fvu, fire_counts, vals, indices, row_offsets, min_act, residual)."""
    B, D = x.shape
    scale = W_dec.detach().norm(dim=1) if rescale_acts_by_decoder_norm else None
    acts, vals, indices, row_offsets = batch_topk_preacts(x, W_enc, b_enc, n, b_dec, scale)
    counts = torch.zeros(W_dec.shape[0], dtype=torch.int64, device=x.device)  # fired, counted by the decode
    residual, sq = gather_rows(vals, indices, W_dec, b_dec, x, row_offsets=row_offsets, counts=counts)
    min_act = torch.where(acts > 0, acts.float(), float("inf")).amin()
    return sq / (B * D), sq / total_variance(x), counts, vals, indices, row_offsets, min_act, residual


def batchtopk_sae_step_fwd_fake(x, W_enc, b_enc, W_dec, b_dec, n, rescale_acts_by_decoder_norm):
    B, D = x.shape
    F = W_dec.shape[0]
    f32, i64 = torch.float32, torch.int64
    return (
        x.new_empty((), dtype=f32),
        x.new_empty((), dtype=f32),
        x.new_empty(F, dtype=i64),
        x.new_empty(n),
        x.new_empty(n, dtype=i64),
        x.new_empty(B + 1, dtype=i64),
        x.new_empty((), dtype=f32),
        x.new_empty(B, D, dtype=f32),
    )


def batchtopk_sae_step_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    vals: torch.Tensor,
    indices: torch.Tensor,
    row_offsets: torch.Tensor,
    residual: torch.Tensor,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW_enc, db_enc, dW_dec, db_dec), each in W_enc's dtype; one CSR transpose serves both weights."""
    return mse_step_backward(grad, x, W_enc, W_dec, b_dec, vals, indices, residual, row_offsets)


def batchtopk_sae_step_bwd_fake(grad, x, W_enc, W_dec, b_dec, vals, indices, row_offsets, residual, needs):
    return step_grads_fake(x, W_enc, W_dec, b_dec)


# With a dead-latent loss (AuxK or ghost grads; ``ops/_dead.py``) ------------------------


def batchtopk_sae_step_dead_fwd(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    n: int,
    rescale_acts_by_decoder_norm: bool,
    dead_mask: torch.Tensor,
    dead_offset: torch.Tensor,
    mode: int,
    k_aux: int,
    aux_coef: float,
    relu: bool,
    encoder_grad: bool,
    capacity: int,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """Returns (loss, aux_loss, fvu, fire_counts, vals, indices, row_offsets, min_act, residual,
    A, gate, dE1, ids, valid)."""
    B, D = x.shape
    scale = W_dec.detach().norm(dim=1) if rescale_acts_by_decoder_norm else None
    ids, valid, n_dead, pre_d = dead_columns(x, dead_mask, capacity, dead_offset)
    acts, vals, indices, row_offsets = batch_topk_preacts(x, W_enc, b_enc, n, b_dec, scale, columns=(ids, pre_d))
    counts = torch.zeros(W_dec.shape[0], dtype=torch.int64, device=x.device)  # fired, counted by the decode
    residual, sq = gather_rows(vals, indices, W_dec, b_dec, x, row_offsets=row_offsets, counts=counts)
    min_act = torch.where(acts > 0, acts.float(), float("inf")).amin()
    aux, A, gate, dE1 = dead_loss_fwd(mode, pre_d, ids, valid, n_dead, residual, W_dec, k_aux, relu, scale)
    if gate is None:
        gate = x.new_empty(0, dtype=torch.bool)
    mse = sq / (B * D)
    code = (vals, indices, row_offsets, min_act, residual)
    return mse + aux_coef * aux, aux, sq / total_variance(x), counts, *code, A, gate, dE1, ids, valid


def batchtopk_sae_step_dead_fwd_fake(
    x, W_enc, b_enc, W_dec, b_dec, n, rescale, dead_mask, dead_offset, mode, k_aux, aux_coef, relu, eg, capacity
):
    main = batchtopk_sae_step_fwd_fake(x, W_enc, b_enc, W_dec, b_dec, n, rescale)
    return (main[0], x.new_empty((), dtype=torch.float32), *main[1:], *dead_fakes(x, capacity, mode))


def batchtopk_sae_step_dead_bwd(
    grad: torch.Tensor,
    grad_aux: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    vals: torch.Tensor,
    indices: torch.Tensor,
    row_offsets: torch.Tensor,
    residual: torch.Tensor,
    A: torch.Tensor,
    gate: torch.Tensor,
    dE1: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    mode: int,
    aux_coef: float,
    encoder_grad: bool,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW_enc, db_enc, dW_dec, db_dec): the MSE step's, plus the dead-latent loss's on the dead slots."""
    g_aux = torch.add(grad_aux.float(), grad.float(), alpha=aux_coef)
    dx, dW_e, db_e, dW_d = dead_loss_bwd(
        g_aux, x, W_enc, W_dec, b_dec, ids, valid, A, gate if mode == AUXK else None, dE1, encoder_grad
    )
    grads = mse_step_backward(grad, x, W_enc, W_dec, b_dec, vals, indices, residual, row_offsets, dx_extra=dx)
    add_slot_grads_(grads, ids, valid, dW_e, db_e, dW_d)
    return grads


def batchtopk_sae_step_dead_bwd_fake(
    grad, grad_aux, x, W_enc, W_dec, b_dec, vals, indices, row_offsets, residual, A, gate, dE1, ids, valid, *rest
):
    return step_grads_fake(x, W_enc, W_dec, b_dec)


# Op registration and autograd ----------------------------------------------------

_batchtopk_sae_step = register_op(
    "batchtopk_sae_step",
    forward=batchtopk_sae_step_fwd,
    forward_fake=batchtopk_sae_step_fwd_fake,
    backward=batchtopk_sae_step_bwd,
    backward_fake=batchtopk_sae_step_bwd_fake,
    # x, W_enc, W_dec, b_dec, and the code (vals, indices, row_offsets) and residual
    save=lambda args, outputs: (args[0], args[1], args[3], args[4], *outputs[3:6], outputs[7]),
    differentiable=(0,),
    grad_inputs=(0, 1, 2, 3, 4),  # x, W_enc, b_enc, W_dec, b_dec
)


_batchtopk_sae_step_dead = register_op(
    "batchtopk_sae_step_dead",
    forward=batchtopk_sae_step_dead_fwd,
    forward_fake=batchtopk_sae_step_dead_fwd_fake,
    backward=batchtopk_sae_step_dead_bwd,
    backward_fake=batchtopk_sae_step_dead_bwd_fake,
    # x, W_enc, W_dec, b_dec, the code, residual, the dead slots' tensors; mode, aux_coef, encoder_grad
    save=lambda args, outputs: (
        args[0],
        args[1],
        args[3],
        args[4],
        *outputs[4:7],
        *outputs[8:14],
        args[9],
        args[11],
        args[13],
    ),  # fmt: skip
    differentiable=(0, 1),
    grad_inputs=(0, 1, 2, 3, 4),  # x, W_enc, b_enc, W_dec, b_dec
)


# Public function ---------------------------------------------------------------


def batchtopk_sae_step(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: float,
    *,
    rescale_acts_by_decoder_norm: bool = False,
    dead_mask: torch.Tensor | None = None,
    dead_offset: torch.Tensor | int | None = None,
    dead_loss: str = "auxk",
    k_aux: int | None = None,
    aux_coef: float | None = None,
    aux_relu: bool = True,
    aux_encoder_grad: bool = True,
    dead_capacity: int | None = None,
) -> BatchTopKSAEStep:
    """One BatchTopK SAE step: the int(k * B) largest activations of the whole batch, decoded, MSE.

    Args:
        x: [B, D] activations, the parameters' dtype.
        W_enc: [F, D] encoder rows (fp32, bf16 or fp16); b_enc: [F]; W_dec: [F, D] decoder
            rows; b_dec: [D], subtracted before encoding and added after decoding.
        k: active latents per row on average (an int or a float, as SAELens's ``k``); the
            batch keeps N = int(k * B) entries, 1 <= N <= B * F.
        rescale_acts_by_decoder_norm: rank relu(pre * ||W_dec[f]||) instead of relu(pre)
            (SAELens's default for its BatchTopK training SAE).
        dead_mask, dead_offset, dead_loss, k_aux, aux_coef, aux_relu, aux_encoder_grad, dead_capacity: the
            dead-latent loss, as ``topk_sae_step``'s; with the rescaling, AuxK ranks the dead
            pre-activations by pre * ||W_dec[f]|| too (as SAELens does).

    Returns:
        ``BatchTopKSAEStep(loss, fvu, fire_counts, vals, indices, row_offsets, min_act)``:
        ``loss`` (0-d fp32, the mean over B*D) is differentiable in every tensor argument;
        the code is variable-length (row b's entries at row_offsets[b]:row_offsets[b+1], by
        latent id); ``min_act`` is the smallest positive ranked activation, the input of the
        inference-threshold estimate; ``aux_loss`` as ``topk_sae_step``'s. No host sync; nothing
        [B, F] kept; deterministic.
    """
    B, _, F = check_step_args(x, W_enc, b_enc, W_dec, b_dec, 1)
    n = check_batch_k(k, B, F)
    if not isinstance(rescale_acts_by_decoder_norm, bool):
        raise ValueError(f"rescale_acts_by_decoder_norm must be a bool, got {rescale_acts_by_decoder_norm!r}")
    if dead_mask is not None:
        mode, k_aux, aux_coef, capacity, dead_offset = check_dead_loss_args(
            dead_mask, dead_offset, dead_loss, k_aux, aux_coef, aux_relu, aux_encoder_grad, dead_capacity, x, F
        )
        args = (x, W_enc, b_enc, W_dec, b_dec)
        out = _batchtopk_sae_step_dead(
            *(t.contiguous() for t in args), n, rescale_acts_by_decoder_norm, dead_mask.contiguous(), dead_offset,
            MODES[mode], k_aux, aux_coef, aux_relu, aux_encoder_grad, capacity,
        )  # fmt: skip
        return BatchTopKSAEStep(out[0], *out[2:8], aux_loss=out[1])
    out = _batchtopk_sae_step(
        x.contiguous(),
        W_enc.contiguous(),
        b_enc.contiguous(),
        W_dec.contiguous(),
        b_dec.contiguous(),
        n,
        rescale_acts_by_decoder_norm,
    )
    return BatchTopKSAEStep(*out[:7])
