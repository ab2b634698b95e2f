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

from ..._registry import register_op
from ..._validation import check_dead_loss_args, check_step_args
from ...primitives.gather import gather_rows
from ...primitives.select import topk_preacts
from ...primitives.step_backward import mse_step_backward
from ...results import TopKSAEStep, total_variance
from .._dead import AUXK, MODES, add_slot_grads_, dead_columns, dead_fakes, dead_loss_bwd, dead_loss_fwd
from .._step import step_grads_fake

# Host launchers ----------------------------------------------------------------


def topk_sae_step_fwd(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, fvu, fire_counts, vals, indices, residual)."""
    B, D = x.shape
    vals, indices = topk_preacts(x, W_enc, b_enc, k, b_dec, relu=True)
    counts = torch.zeros(W_dec.shape[0], dtype=torch.int64, device=x.device)  # fired, counted by the decode
    residual, sq = gather_rows(vals, indices, W_dec, b_dec, x, counts=counts)
    return sq / (B * D), sq / total_variance(x), counts, vals, indices, residual


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


# With a dead-latent loss (AuxK or ghost grads; ``ops/_dead.py``) ------------------------


def topk_sae_step_dead_fwd(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
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
]:
    """Returns (loss, aux_loss, fvu, fire_counts, vals, indices, residual, A, gate, dE1, ids, valid)."""
    B, D = x.shape
    ids, valid, n_dead, pre_d = dead_columns(x, dead_mask, capacity, dead_offset)
    vals, indices = topk_preacts(x, W_enc, b_enc, k, b_dec, columns=(ids, pre_d), relu=True)
    counts = torch.zeros(W_dec.shape[0], dtype=torch.int64, device=x.device)  # fired, counted by the decode
    residual, sq = gather_rows(vals, indices, W_dec, b_dec, x, counts=counts)
    aux, A, gate, dE1 = dead_loss_fwd(mode, pre_d, ids, valid, n_dead, residual, W_dec, k_aux, relu)
    if gate is None:
        gate = x.new_empty(0, dtype=torch.bool)
    mse = sq / (B * D)
    return mse + aux_coef * aux, aux, sq / total_variance(x), counts, vals, indices, residual, A, gate, dE1, ids, valid


def topk_sae_step_dead_fwd_fake(
    x, W_enc, b_enc, W_dec, b_dec, k, dead_mask, dead_offset, mode, k_aux, aux_coef, relu, eg, capacity
):
    main = topk_sae_step_fwd_fake(x, W_enc, b_enc, W_dec, b_dec, k)
    return (main[0], x.new_empty((), dtype=torch.float32), *main[1:], *dead_fakes(x, capacity, mode))


def topk_sae_step_dead_bwd(
    grad: torch.Tensor,
    grad_aux: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    vals: torch.Tensor,
    indices: torch.Tensor,
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
    grads = mse_step_backward(grad, x, W_enc, W_dec, b_dec, vals, indices, residual, dx_extra=dx)
    add_slot_grads_(grads, ids, valid, dW_e, db_e, dW_d)
    return grads


def topk_sae_step_dead_bwd_fake(
    grad, grad_aux, x, W_enc, W_dec, b_dec, vals, indices, residual, A, gate, dE1, ids, valid, mode, coef, eg, needs
):
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


_topk_sae_step_dead = register_op(
    "topk_sae_step_dead",
    forward=topk_sae_step_dead_fwd,
    forward_fake=topk_sae_step_dead_fwd_fake,
    backward=topk_sae_step_dead_bwd,
    backward_fake=topk_sae_step_dead_bwd_fake,
    # x, W_enc, W_dec, b_dec, the code, residual, the dead slots' tensors; mode, aux_coef, encoder_grad
    save=lambda args, outputs: (
        args[0],
        args[1],
        args[3],
        args[4],
        outputs[4],
        outputs[5],
        *outputs[6:12],
        args[8],
        args[10],
        args[12],
    ),  # fmt: skip
    differentiable=(0, 1),
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
    *,
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
    B, D, F = check_step_args(x, W_enc, b_enc, W_dec, b_dec, k)
    if dead_mask is not None:
        mode, k_aux, aux_coef, capacity, dead_offset = check_dead_loss_args(
            dead_mask, dead_offset, dead_loss, k_aux, aux_coef, aux_relu, aux_encoder_grad, dead_capacity, x, F
        )
        args = (x, W_enc, b_enc, W_dec, b_dec)
        out = _topk_sae_step_dead(
            *(t.contiguous() for t in args), k, dead_mask.contiguous(), dead_offset, MODES[mode], k_aux, aux_coef,
            aux_relu, aux_encoder_grad, capacity,
        )  # fmt: skip
        return TopKSAEStep(out[0], *out[2:6], aux_loss=out[1])
    out = _topk_sae_step(
        x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), W_dec.contiguous(), b_dec.contiguous(), k
    )
    return TopKSAEStep(*out[:5])
