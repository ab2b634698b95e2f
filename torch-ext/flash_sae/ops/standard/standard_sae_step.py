"""The whole standard (ReLU + L1) SAE training step, on the sparse path.

    z     = (x - b_dec) @ W_enc.T + b_enc
    f     = relu(z)
    loss  = sum over D of (b_dec + f @ W_dec - x)^2, mean over B
            + l1_coefficient * mean over B of sum_f f * ||W_dec[f]||

Anthropic's April 2024 update's penalty (the L1 of the code weighted by the decoder rows' norms),
in SAELens's units: its ``standard`` training SAE with the default config (``lp_norm`` 1,
``apply_b_dec_to_input``, ``l1_coefficient`` 1.0; an L1 warm-up is the caller's: pass the
step's coefficient). The penalty's gradient reaches the code (l1_coefficient * ||W_dec[f]|| / B
at each active entry) and the decoder rows (l1_coefficient / B * (sum of f's values) *
W_dec[f] / ||W_dec[f]||; 0 at a zero row, as torch's norm gives).

What is fused:
- one collection per pre-activation chunk (``primitives.select.preacts.threshold_preacts`` at threshold
  0) gathers the active entries (z > 0) into a variable-length code of fixed capacity;
- decode and MSE: the row gather over the code; the penalty from the code and the decoder rows'
  norms (one fp32 norm per row, read from W_dec without an fp32 copy);
- backward: ``primitives.step_backward`` with the penalty's per-entry gradient added before the
  ReLU's gate (one CSR transpose), and its term along each decoder row added by the same
  segmented pass that sums dW_dec (from each latent's sum of values), before the row's one rounding.

A transcoder (``target``): x is encoded as it is (no ``x - b_dec``) and the decode reconstructs
the target [B, D_out] (W_dec [F, D_out], b_dec [D_out]); the penalty is unchanged, and the loss
is differentiable in the target too.

A crosscoder (``crosscoder=CrosscoderLayers(L)``, with ``target=x``): each decoder row is
L equal per-layer blocks and the penalty weight is the sum of their norms, sum_l ||W_dec[f, l]|| (Lindsey
et al. 2024), not the norm of the whole row. The code's gradient reads that sum; block g of the
decoder row gets l1_coefficient / B * (sum of f's values) * W_dec[f, l] / ||W_dec[f, l]||, from the
same segmented pass (its row term reads one value per block: ``csr.RowTerm.group``).
``l2_loss`` replaces the squared error by the mean over rows and layers of each layer's error norm,
unsquared (dictionary_learning's crosscoder trainer's default); its
backward is the MSE backward at a rescaled residual (``primitives.step_backward.grouped_l2_loss``).

Capacity: as ``jumprelu_sae_step``'s: ``count`` entries qualified; ``overflow = count >
capacity`` means some were dropped. Precision: fp32 accumulation, the loss in fp32, gradients in
the parameters' dtype. Deterministic. Nothing [B, F] is kept.
"""

import torch

from ..._registry import register_op
from ..._validation import as_count, check_standard_args
from ...crosscoder_layers import CrosscoderLayers
from ...primitives.dead_set import mm_f32
from ...primitives.decoder_geometry import add_scaled_rows_
from ...primitives.gather import gather_residual
from ...primitives.select.preacts import threshold_preacts
from ...primitives.step_backward import grouped_l2_loss, grouped_row_norms, penalty_step_backward
from ...results import StandardSAEStep, total_variance
from .._step import (
    at_entries,
    capacity_step_fakes,
    checked_step_args,
    cuda_fused,
    reconstructed,
    saved_step_tensors,
    step_grads_fake,
    step_head,
    step_inputs,
    step_tensors,
    target_grad_fake,
    target_grad_for,
)

TINY = torch.finfo(torch.float32).tiny

# Host launchers ----------------------------------------------------------------


StandardSaeStepInputs = step_inputs(
    "StandardSaeStepInputs", l1_coefficient=float, capacity=int, decoder_norm_groups=int, l2_loss_groups=int
)


def decoder_norms(W_dec: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the penalty's weight per latent [F] fp32, the norms the backward reads): ||W_dec[f]|| (both the
    same [F] tensor) for one group; else the sum over the G blocks of ||W_dec[f, g]|| and those [F, G] norms."""
    if groups == 1:
        norms = torch.linalg.vector_norm(W_dec, dim=1, dtype=torch.float32)
        return norms, norms
    norms = grouped_row_norms(W_dec, groups)
    return norms.sum(1), norms


def penalty_weight(norms: torch.Tensor) -> torch.Tensor:
    """The penalty's weight per latent [F] from the saved norms ([F], or [F, G] blocks: their sum)."""
    return norms if norms.ndim == 1 else norms.sum(1)


def standard_sae_step_fwd(
    i: StandardSaeStepInputs,
) -> tuple[torch.Tensor, ...]:
    """Returns (loss, mse, l1, l0, fvu, fire_counts, vals, indices, row_offsets, count, overflow,
    residual, norms); the residual and the decoder rows' norms are kept for the backward."""
    y, centre = reconstructed(i.x, i.b_dec, i.target)
    B, D = y.shape
    F = i.W_dec.shape[0]
    zero = torch.zeros(F, dtype=i.x.dtype, device=i.x.device)
    vals, indices, row_offsets, count = threshold_preacts(i.x, i.W_enc, i.b_enc, centre, zero, 0.0, i.capacity)
    counts = torch.zeros(F, dtype=torch.int64, device=i.x.device)  # fired, counted by the decode
    residual, sq = gather_residual(vals, indices, i.W_dec, i.b_dec, y, row_offsets=row_offsets, counts=counts)
    weight, norms = decoder_norms(i.W_dec, i.decoder_norm_groups)
    l1 = (vals.float() * at_entries(weight, indices)).sum() / B
    l0 = (indices >= 0).sum().float() / B
    recon = sq / B
    if i.l2_loss_groups:  # the blocks' error norms; the backward reads the rescaled residual
        recon, residual = grouped_l2_loss(residual, i.l2_loss_groups, per_row=True)
    loss = recon + i.l1_coefficient * l1
    return (loss, sq / (B * D), l1, l0, sq / total_variance(y), counts, vals, indices, row_offsets, count,
            count > i.capacity, residual, norms)  # fmt: skip


def standard_sae_step_fwd_fake(i: StandardSaeStepInputs):
    x, (F, D), G = i.x, i.W_dec.shape, i.decoder_norm_groups
    norms = x.new_empty((F,) if G == 1 else (F, G), dtype=torch.float32)
    return capacity_step_fakes(i, 5, x.new_empty(x.shape[0], D, dtype=torch.float32), norms)


def standard_sae_step_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dx, dW_enc, db_enc, dW_dec, db_dec, dtarget): the MSE step's backward with the penalty's code
    gradient added before the ReLU's gate, then the penalty's term along each decoder row."""
    B = saved.x.shape[0]
    c = grads.loss.float() * (saved.l1_coefficient / B)
    da_l1 = c * at_entries(penalty_weight(saved.norms), saved.indices)
    # d||w||/dw = w/||w|| (0 at w = 0); per block with grouped norms ([F, G])
    row_term = torch.where(saved.norms > 0, c / saved.norms.clamp_min(TINY), 0.0)
    step = saved_step_tensors(saved)
    step_grads = penalty_step_backward(
        grads.loss, step, da_extra=da_l1, dw_dec_row_term=row_term, centred=saved.target is None
    )
    return (*step_grads, target_grad_for(needs[5], grads.loss, saved.residual, saved.target, saved.x, per_row=True))


def standard_sae_step_bwd_fake(grads, saved, needs: list[bool]):
    x, W_enc, W_dec, b_dec = saved.x, saved.W_enc, saved.W_dec, saved.b_dec
    return (*step_grads_fake(x, W_enc, W_dec, b_dec), target_grad_fake(needs[5], saved.target, x))


# Op registration and autograd ----------------------------------------------------

_standard_sae_step = register_op(
    "standard_sae_step",
    inputs=StandardSaeStepInputs,
    launchers=(standard_sae_step_fwd, standard_sae_step_fwd_fake, standard_sae_step_bwd, standard_sae_step_bwd_fake),
    saved=tuple("x W_enc W_dec b_dec target vals indices row_offsets residual norms l1_coefficient".split()),
    outputs=tuple("loss mse l1 l0 fvu fire_counts vals indices row_offsets count overflow residual norms".split()),
    differentiable=("loss",),
    grad_inputs=("x", "W_enc", "b_enc", "W_dec", "b_dec", "target"),
)


# Public function ---------------------------------------------------------------


def standard_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
    capacity: int, l1_coefficient: float = 1.0, target: torch.Tensor | None = None,
    crosscoder: CrosscoderLayers | None = None,
) -> StandardSAEStep:  # fmt: skip
    """One standard SAE step: the ReLU code, MSE + the decoder-norm-weighted L1 penalty.

    Args:
        x: [B, D] activations, the parameters' dtype.
        W_enc: [F, D]; b_enc: [F]; W_dec: [F, D]; b_dec: [D] (W_enc's dtype).
        capacity: the code's fixed size (active entries over the batch, 1 <= capacity <= B * F).
            More than that sets ``overflow``.
        l1_coefficient: lambda, the penalty's weight (>= 0); SAELens's default 1.0.
        target: None (an SAE: reconstruct x), or [B, D_out] in x's dtype (a transcoder: reconstruct
            ``target`` from x). With a target, W_dec is [F, D_out] and b_dec [D_out]; x is encoded
            as it is (no ``x - b_dec``), the MSE term is the sum over D_out of ``(b_dec + decode -
            target)^2`` (mean over B), ``mse`` and ``fvu`` are the target's, the penalty is
            unchanged, and the loss is differentiable in ``target`` too.
        crosscoder: None, or a ``CrosscoderLayers(L, l2_loss)`` (with ``target=x``, xs [B, L, D]
            flattened): the penalty weights latent f by sum_l ||W_dec[f, l]||, the norms of the L
            per-layer blocks of its row; with ``l2_loss`` the reconstruction term is the mean over B
            and L of ||x_hat_l - x_l||_2, unsquared (``mse`` stays the mean squared error).

    Returns:
        ``StandardSAEStep(loss, mse, fvu, l0, fire_counts, code, l1, count, overflow)``;
        ``loss`` (0-d fp32) is differentiable in x and the four weights (and the target). No host
        sync; nothing [B, F] kept; deterministic.
    """
    B, _, _ = checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, 1)
    capacity = as_count(capacity)
    check_standard_args(W_enc.shape[0], capacity, l1_coefficient, x)
    groups, l2_groups = CrosscoderLayers.groups(crosscoder, W_dec.shape[1])
    tensors = step_tensors(x, W_enc, b_enc, W_dec, b_dec, target)
    out = _standard_sae_step.named(_standard_sae_step(*tensors, float(l1_coefficient), capacity, groups, l2_groups))
    return StandardSAEStep(**step_head(out, B), l1=out.l1, count=out.count, overflow=out.overflow)


@cuda_fused
def _dense_relu_code(z, norms):
    """The ReLU code from the pre-activations, each latent's count of active rows, and each row's
    penalty sum_f f * ||W_dec[f]|| in fp32 (one pass over [B, F] on CUDA)."""
    acts = torch.relu(z)
    return acts, (acts > 0).sum(0), (acts.float() * norms).sum(1)


@cuda_fused
def _dense_relu_grads(d_acts, acts):
    """The ReLU's gate on dL/d(code), each latent's sum of the code (fp32) and of the gated gradient (fp32)."""
    dz = torch.where(acts > 0, d_acts, 0)
    return dz, acts.sum(0, dtype=torch.float32), dz.sum(0, dtype=torch.float32)


class _DenseStep(torch.autograd.Function):
    """The dense formulation: six cuBLAS products and a few passes over [B, F], fused where torch
    allows (the penalty's code gradient as the bias of the dA product, the ReLU's gate and the column
    sums in one fused pass, dW_dec's product in fp32 and the penalty's decoder-row term added in one
    row pass that rounds once)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, target, l1_coefficient, groups, l2_groups):
        B = x.shape[0]
        y = x if target is None else target
        xc = x - b_dec if target is None else x  # a transcoder encodes x as it is
        weight, norms = decoder_norms(W_dec, groups)
        acts, counts, l1_rows = _dense_relu_code(torch.addmm(b_enc, xc, W_enc.t()), weight)
        residual = torch.addmm(b_dec, acts, W_dec).float().sub_(y.float())
        sq = residual.square().sum()
        l1 = l1_rows.sum() / B
        recon = sq / B
        if l2_groups:  # the blocks' error norms; the backward reads the rescaled residual
            recon, residual = grouped_l2_loss(residual, l2_groups, per_row=True)
        ctx.save_for_backward(xc, W_enc, W_dec, acts, residual, norms)
        ctx.l1_coefficient = l1_coefficient
        ctx.target_dtype = None if target is None else target.dtype
        ctx.mark_non_differentiable(sq, l1, counts)
        return recon + l1_coefficient * l1, sq, l1, counts

    @staticmethod
    def backward(ctx, grad, *_):
        xc, W_enc, W_dec, acts, residual, norms = ctx.saved_tensors
        B, dtype = xc.shape[0], xc.dtype
        g = grad.float()
        c = g * (ctx.l1_coefficient / B)
        d_xhat32 = residual * (2 * g / B)
        d_xhat = d_xhat32.to(dtype)
        d_acts = torch.addmm((c * penalty_weight(norms)).to(dtype), d_xhat, W_dec.t())  # + the penalty's code grad
        dz, acts_sum, db_enc = _dense_relu_grads(d_acts, acts)
        if norms.ndim == 1:
            row_scale = torch.where(norms > 0, c * acts_sum / norms.clamp_min(TINY), 0.0)
            dW_dec = add_scaled_rows_(torch.empty_like(W_dec), W_dec, row_scale, base=mm_f32(acts.t(), d_xhat))
        else:  # grouped norms: each block of a row along itself, by its own norm, rounded once
            F, G = norms.shape
            block_scale = torch.where(norms > 0, (c * acts_sum)[:, None] / norms.clamp_min(TINY), 0.0)
            term = (block_scale[:, :, None] * W_dec.reshape(F, G, -1).float()).reshape(W_dec.shape)
            dW_dec = (mm_f32(acts.t(), d_xhat) + term).to(W_dec.dtype)
        dW_enc = dz.t() @ xc
        db_enc = db_enc.to(dtype)
        dxc = (dz @ W_enc).float()
        if ctx.target_dtype is not None:  # a transcoder: x only feeds the encoder, b_dec only the decode
            dtarget = (-d_xhat32).to(ctx.target_dtype) if ctx.needs_input_grad[5] else None
            return dxc.to(dtype), dW_enc, db_enc, dW_dec, d_xhat32.sum(0).to(dtype), dtarget, None, None, None
        dx = (dxc - d_xhat32).to(dtype)
        db_dec = (d_xhat32.sum(0) - dxc.sum(0)).to(dtype)
        return dx, dW_enc, db_enc, dW_dec, db_dec, None, None, None, None


def standard_sae_step_dense(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
    l1_coefficient: float = 1.0, target: torch.Tensor | None = None, crosscoder: CrosscoderLayers | None = None,
) -> StandardSAEStep:  # fmt: skip
    """The same step in its dense formulation, for while the code is dense (early in training).

    cuBLAS products over the dense [B, F] code (which the backward keeps), the loss's sums in fp32.
    Same loss and gradients as ``standard_sae_step`` by the parity rule; ``code`` is None (the
    code is dense), ``count`` is the number of active entries
    and ``overflow`` False. ``target``, ``crosscoder``: as ``standard_sae_step``'s.
    No host sync.
    """
    checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, 1)
    check_standard_args(W_enc.shape[0], 1, l1_coefficient, x)
    groups, l2_groups = CrosscoderLayers.groups(crosscoder, W_dec.shape[1])
    y = x if target is None else target.contiguous()
    B, D = y.shape
    args = (x, W_enc, b_enc, W_dec, b_dec)
    loss, sq, l1, counts = _DenseStep.apply(
        *(t.contiguous() for t in args), None if target is None else y, float(l1_coefficient), groups, l2_groups
    )
    count = counts.sum()
    return StandardSAEStep(
        loss=loss, mse=sq / (B * D), fvu=sq / total_variance(y), l0=count.float() / B, fire_counts=counts,
        code=None, l1=l1, count=count, overflow=torch.zeros((), dtype=torch.bool, device=x.device),
    )  # fmt: skip
