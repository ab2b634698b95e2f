"""The whole backward of an SAE's MSE step at a code: decoder and encoder, one CSR transpose.

With ``loss = c * sum (b_dec + decode(code) - x)^2`` (c = 1 / (B*D)), residual
r = x_hat - x (fp32, kept by the forward) and s = 2 * c * grad:

    dW_dec[f], dots  <- the gather's adjoint over r (one segmented pass; dots = <r[b], W_dec[f]>)
    dpre             =  s * dots where the code's value is > 0 (the ReLU's mask), else 0
    dx, dW_enc, ...  <- the encoder's sparse backward over dpre (``encoder.py``); its gather of
                        dx_enc also subtracts s * r, so dx = dx_enc - s * r comes out of one pass
    db_dec           =  s * sum_b r - sum_b dx_enc (the centring's share) = -sum_b dx

One CSR transpose of the code serves both weight gradients. A weight an optimizer has claimed
(``row_update.claim``: ``flash_sae.FusedAdam``) gets its update in the pass that computes its gradient,
and its gradient comes back None. The code is [B, K] or a
variable-length one (``row_offsets``; see ``gather.gather_rows``). Used by every step whose
reconstruction is a plain decode of its code, one function per kind of step over the same passes:
``mse_step_backward`` (TopK, BatchTopK), ``matryoshka_step_backward`` (the prefix levels),
``penalty_step_backward`` (a per-row MSE plus a sparsity penalty: standard) and
``step_backward_with_da`` (a per-row MSE at a gated code, also returning dL/d(value): JumpReLU).
"""

from typing import NamedTuple

import torch

from .csr import RowOut, RowTerm, csr_transpose
from .dead_set import add_rows_
from .encoder import encoder_backward
from .gather import LevelRows, gather_rows_backward, gather_rows_backward_gated, row_ids
from .row_update import ClaimedUpdate, claimed, slot_rows_for


class StepTensors(NamedTuple):
    """What an MSE step's backward reads from its forward: the input ``x`` [B, D], the weights (``W_enc``
    [F, D], ``W_dec`` [F, D], ``b_dec`` [D]), the code (``vals``, ``indices``: [B, K], or flat [N] with
    ``row_offsets`` [B + 1]; see ``gather.gather_rows``) and the fp32 ``residual`` x_hat - x [B, D]."""

    x: torch.Tensor
    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    vals: torch.Tensor
    indices: torch.Tensor
    residual: torch.Tensor
    row_offsets: torch.Tensor | None = None


class SlotGrads(NamedTuple):
    """A dead-latent loss's gradients at its slots, added to the step's: ``ids`` [C] latent ids (distinct
    where ``valid`` [C] bool), ``dW_enc`` [C, D] fp32 or None, ``db_enc`` [C] fp32 or None, ``dW_dec``
    [C, D] fp32."""

    ids: torch.Tensor
    valid: torch.Tensor
    dW_enc: torch.Tensor | None
    db_enc: torch.Tensor | None
    dW_dec: torch.Tensor


def mse_step_backward(
    grad: torch.Tensor,
    step: StepTensors,
    *,
    dx_extra: torch.Tensor | None = None,
    centred: bool = True,
    slots: SlotGrads | None = None,
) -> tuple[torch.Tensor, ...]:
    """Returns (dx, dW_enc, db_enc, dW_dec, db_dec), each in W_enc's dtype, of the mean over B*D of the
    squared residual at a ReLU code (gradient passes where the value is > 0): TopK, BatchTopK.

    ``dx_extra`` (fp32 [B, D]): a further gradient of x through the centring x - b_dec (a dead-latent
    loss's), added to dx and, negated, to db_dec before either is rounded. ``centred`` False: the step
    reconstructs a separate target (a transcoder's), so the encoder reads x itself (no ``x - b_dec``),
    dx is the encoder's share only and db_dec = s * sum_b r; the target's own gradient, -s * r, is
    ``target_grad``'s. ``slots``: a dead-latent loss's gradients at its slots, added to the weights'
    rows (inside an optimizer's update where the weight is claimed).
    """
    return _mse_step_backward(grad, step, _Modes(dx_extra=dx_extra, centred=centred, slots=slots))


def matryoshka_step_backward(
    grad: torch.Tensor, step: StepTensors, *, levels: torch.Tensor, centred: bool = True
) -> tuple[torch.Tensor, ...]:
    """``mse_step_backward`` over Matryoshka's prefix levels: ``levels`` [F] int32 is each latent's level
    and ``step.residual`` is [G, B, D], the suffix sums over the levels S_g = sum over g' >= g of e_g'
    (the gradient row of a latent of level g); latent f reads S_levels[f], and x, b_dec see S_0, the
    sum of every level's residual. ``centred``: as ``mse_step_backward``'s. Returns (dx, dW_enc, db_enc,
    dW_dec, db_dec)."""
    return _mse_step_backward(grad, step, _Modes(levels=levels, centred=centred))


def penalty_step_backward(
    grad: torch.Tensor, step: StepTensors, *, da_extra: torch.Tensor, dw_dec_row_term: torch.Tensor, centred=True
) -> tuple[torch.Tensor, ...]:
    """The backward of a per-row MSE (squared error summed over D, averaged over B: c = 1 / B) plus a
    sparsity penalty at a ReLU code (the standard step's). ``da_extra`` (fp32, shaped as ``vals``): the
    penalty's dL/d(value) per entry, added before the gate; ``dw_dec_row_term`` ([F] fp32): dW_dec[f]
    also gets ``dw_dec_row_term[f] * (sum of f's values) * W_dec[f]`` before its rounding (the
    penalty's gradient along the decoder rows); [F, G] fp32 for a penalty weighted by the sum of the
    norms of G equal column blocks of each row (a crosscoder's layers): block g of dW_dec[f] gets
    ``dw_dec_row_term[f, g] * (sum of f's values) * W_dec[f, block g]``. ``centred``: as
    ``mse_step_backward``'s. Returns (dx, dW_enc, db_enc, dW_dec, db_dec)."""
    modes = _Modes(per_row=True, da_extra=da_extra, dw_dec_row_term=dw_dec_row_term, centred=centred)
    return _mse_step_backward(grad, step, modes)


def step_backward_with_da(grad: torch.Tensor, step: StepTensors, *, gate: torch.Tensor, centred=True) -> tuple:
    """The backward of a per-row MSE (c = 1 / B) at a code whose values pass gradient to the
    pre-activations where ``gate`` (bool, shaped as ``vals``) holds (a JumpReLU's step function).
    Returns (dx, dW_enc, db_enc, dW_dec, db_dec, da, (perm, offsets)): also da = dL/d(value) at every
    entry (fp32, shaped as ``vals``) and the code's CSR transpose, for gradients beyond these five (a
    JumpReLU threshold's). ``centred``: as ``mse_step_backward``'s."""
    return _mse_step_backward(grad, step, _Modes(gate=gate, per_row=True, with_da=True, centred=centred))


class _Modes(NamedTuple):
    """The parts of ``_mse_step_backward`` the functions above choose (their docstrings say what each does)."""

    gate: torch.Tensor | None = None
    per_row: bool = False
    with_da: bool = False
    levels: torch.Tensor | None = None
    dx_extra: torch.Tensor | None = None
    da_extra: torch.Tensor | None = None
    dw_dec_row_term: torch.Tensor | None = None
    centred: bool = True
    slots: SlotGrads | None = None


def _claimed_update(weight: torch.Tensor, slots: SlotGrads | None, rows: torch.Tensor | None):
    """The ``ClaimedUpdate`` of ``weight`` (its optimizer's ``RowUpdate`` and the extra ``rows`` at ``slots``), or
    None where no optimizer claimed the weight."""
    update = claimed(weight)
    if update is None:
        return None
    extra = slot_rows_for(slots.ids, slots.valid, rows, weight.shape[0]) if rows is not None else None
    return ClaimedUpdate(update=update, slots=extra)


def _mse_step_backward(grad: torch.Tensor, step: StepTensors, modes: _Modes):
    x, W_enc, W_dec, b_dec = step.x, step.W_enc, step.W_dec, step.b_dec
    vals, indices, residual, row_offsets = step.vals, step.indices, step.residual, step.row_offsets
    stacked = residual
    if modes.levels is not None:
        stacked = residual.reshape(-1, residual.shape[-1])
        residual = residual[0]
    B, D = residual.shape
    csr = csr_transpose(indices, W_dec.shape[0], in_range=True)  # a code the step selected: ids in [-1, F)
    rows = row_ids(row_offsets, indices.numel()) if row_offsets is not None else None
    s_const = 2.0 / B if modes.per_row else 2.0 / (B * D)
    scale_grad = grad.float()
    levels = LevelRows(ids=modes.levels, stride=B) if modes.levels is not None else None
    row_term = None
    if modes.dw_dec_row_term is not None:  # [F], or [F, G]: one value per block of D // G columns
        groups = modes.dw_dec_row_term.shape[1] if modes.dw_dec_row_term.ndim == 2 else 0
        row_term = RowTerm(modes.dw_dec_row_term, group=W_dec.shape[1] // groups if groups else 0)
    # The plain ReLU gate with nothing added to da: the segmented pass returns dpre itself.
    fused = modes.gate is None and modes.da_extra is None and not modes.with_da
    backward = gather_rows_backward_gated if fused else gather_rows_backward
    slots = modes.slots
    dec_update = _claimed_update(W_dec, slots, slots.dW_dec if slots is not None else None)
    enc_update = _claimed_update(W_enc, slots, slots.dW_enc if slots is not None else None)
    dW_dec, dots = backward(stacked, vals, indices, W_dec, scale=scale_grad, scale_const=s_const, csr=csr, rows=rows,
                            levels=levels, row_out=RowOut(term=row_term, update=dec_update))  # fmt: skip
    if fused:
        dpre = dots
    else:
        da = dots * (scale_grad * s_const)
        if modes.da_extra is not None:
            da = da + modes.da_extra
        dpre = torch.where(vals > 0 if modes.gate is None else modes.gate, da, 0.0)
    # dx = dx_enc - s * r in the encoder gather's pass; db_dec = s * sum_b r - sum_b dx_enc = -sum_b dx
    if modes.centred:
        dx, dW_enc, db_enc, db_dec = encoder_backward(
            dpre, x, W_enc, b_dec, indices, csr=csr, row_offsets=row_offsets, rows=rows,
            minus=(residual, scale_grad, s_const), update=enc_update,
        )  # fmt: skip
    else:
        dx, dW_enc, db_enc, _ = encoder_backward(dpre, x, W_enc, None, indices, csr=csr, row_offsets=row_offsets,
                                                 rows=rows, update=enc_update)  # fmt: skip
        db_dec = residual.sum(0) * (scale_grad * s_const)
    if modes.dx_extra is not None:
        dx = dx + modes.dx_extra
        if modes.centred:
            db_dec = db_dec - modes.dx_extra.sum(0)
    if slots is not None:  # the dead-latent loss's rows, where no optimizer took them into its update
        if dW_dec is not None:
            add_rows_(dW_dec, slots.ids, slots.valid, slots.dW_dec)
        if slots.dW_enc is not None:
            if dW_enc is not None:
                add_rows_(dW_enc, slots.ids, slots.valid, slots.dW_enc)
            add_rows_(db_enc, slots.ids, slots.valid, slots.db_enc)
    dtype = W_enc.dtype
    grads = (dx.to(dtype), dW_enc, db_enc.to(dtype), dW_dec, db_dec.to(dtype))
    return (*grads, da, csr) if modes.with_da else grads


def grouped_row_norms(W: torch.Tensor, groups: int) -> torch.Tensor:
    """[F, groups] fp32: the L2 norm of each of the ``groups`` equal column blocks of each row of ``W``
    [F, D] (D a multiple of ``groups``), read without an fp32 copy of ``W``. A crosscoder's decoder
    row [L * D] has one block per layer; the penalty weight is the sum of the blocks' norms."""
    F, D = W.shape
    return torch.linalg.vector_norm(W.reshape(F, groups, D // groups), dim=2, dtype=torch.float32)


def grouped_l2_loss(residual: torch.Tensor, groups: int, *, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A reconstruction loss of unsquared norms: (loss [] fp32, the residual a step's backward then reads).

    loss = mean over the B rows and the ``groups`` equal column blocks of ||r[b, g]||_2 (r = x_hat - target,
    the fp32 ``residual`` [B, D]): dictionary_learning's crosscoder trainers' ``l2_loss``, one block per
    layer. Its gradient, r[b, g] / (B * G * ||r[b, g]||) (0 where the block's error is 0, as torch's norm
    gives), is the MSE backward's at a rescaled residual: the returned one, which the step's backward reads
    in place of r (an MSE whose mean is over B * D, or with ``per_row`` over B: its s = 2 * grad / (B * D)
    or 2 * grad / B)."""
    B, D = residual.shape
    blocks = residual.reshape(B, groups, D // groups)
    norms = torch.linalg.vector_norm(blocks, dim=2)
    width = 1.0 if per_row else float(D)
    factor = torch.where(norms > 0, width / (2 * groups * norms.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    return norms.mean(), (blocks * factor[:, :, None]).reshape(B, D)


def target_grad(grad: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype, *, per_row=False) -> torch.Tensor:
    """d loss / d target = -s * r for a step whose loss is the mean over B*D of r^2, r = x_hat - target
    (``per_row``: the sum over D, mean over B, as ``mse_step_backward``'s)."""
    B, D = residual.shape
    return (residual * (grad.float() * (-2.0 / (B if per_row else B * D)))).to(dtype)
