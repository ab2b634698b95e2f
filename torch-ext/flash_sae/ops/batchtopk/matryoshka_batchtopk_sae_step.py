"""The Matryoshka BatchTopK SAE training step (Bussmann et al. 2025; Nabeshima 2024), on the sparse path.

Nested dictionaries: prefix sizes m_1 < ... < m_G = F; level g reconstructs x with the
latents of id < m_g only, and the loss sums every level's error:

    code        = BatchTopK's (``batchtopk_sae_step``: the int(k * B) largest of relu(pre (* ||W_dec||)))
    x_hat_g     = b_dec + sum over the code's entries with id < m_g of relu(pre) * W_dec[f]
    loss        = sum_g mean over B*D of (x_hat_g - x)^2          (SAELens's total is D x this)

What is fused: all G levels in one decoder pass. The code is ordered by latent id inside
each row, so each level is a prefix of the row's entries: the row gather walks the entries
once and writes the residual e_g = x_hat_g - x each time it passes a level's end. Backward:
a latent of level L(f) (the first level that contains it) enters every x_hat_g with g >= L(f),
so its gradient row is the suffix sum S_L = sum over g >= L of e_g: G vectors per row, not one
per entry. The shared MSE-step backward then runs once, with latent f reading S_L(f) in the
segmented pass (one CSR transpose for both weight gradients), and x, b_dec seeing S_0.

Precision: fp32 accumulation; losses in fp32; gradients in the parameters' dtype.
Deterministic; no host sync; nothing [B, F] kept (the G residuals are [G, B, D] fp32).
"""

import torch

from ..._registry import register_op
from ..._validation import check_batch_k, check_prefix_sizes, check_step_args
from ...primitives.gather import gather_rows, row_ids
from ...primitives.select import batch_topk_preacts
from ...primitives.step_backward import mse_step_backward
from ...results import MatryoshkaSAEStep, fire_counts, total_variance
from .._step import step_grads_fake

# Host launchers ----------------------------------------------------------------


def _sizes(prefix_sizes: list[int], device) -> torch.Tensor:
    """The sizes as a device tensor, filled on the device (no host-to-device copy, so CUDA graphs capture it)."""
    return torch.stack([torch.full((), m, dtype=torch.int64, device=device) for m in prefix_sizes])


def matryoshka_batchtopk_sae_step_fwd(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    n: int,
    prefix_sizes: list[int],
    rescale_acts_by_decoder_norm: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
]:  # fmt: skip
    """Returns (loss, level_losses, fvu, fire_counts, vals, indices, row_offsets, min_act, residuals [G, B, D])."""
    B, D = x.shape
    F = W_dec.shape[0]
    scale = W_dec.detach().norm(dim=1) if rescale_acts_by_decoder_norm else None
    acts, vals, indices, row_offsets = batch_topk_preacts(x, W_enc, b_enc, n, b_dec, scale)
    sizes = _sizes(prefix_sizes, x.device)
    flat = row_ids(row_offsets, indices.numel()) * F + indices
    level_ends = torch.searchsorted(flat, torch.arange(B, device=x.device).unsqueeze(1) * F + sizes)
    residuals, sq = gather_rows(vals, indices, W_dec, b_dec, x, row_offsets=row_offsets, level_ends=level_ends)
    level_losses = sq / (B * D)
    min_act = torch.where(acts > 0, acts.float(), float("inf")).amin()
    counts = fire_counts(vals, indices, F)
    fvu = sq[-1] / total_variance(x)
    return level_losses.sum(), level_losses, fvu, counts, vals, indices, row_offsets, min_act, residuals


def matryoshka_batchtopk_sae_step_fwd_fake(x, W_enc, b_enc, W_dec, b_dec, n, prefix_sizes, rescale):
    B, D = x.shape
    F = W_dec.shape[0]
    G = len(prefix_sizes)
    f32, i64 = torch.float32, torch.int64
    return (
        x.new_empty((), dtype=f32),
        x.new_empty(G, dtype=f32),
        x.new_empty((), dtype=f32),
        x.new_empty(F, dtype=i64),
        x.new_empty(n),
        x.new_empty(n, dtype=i64),
        x.new_empty(B + 1, dtype=i64),
        x.new_empty((), dtype=f32),
        x.new_empty(G, B, D, dtype=f32),
    )


def matryoshka_batchtopk_sae_step_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    vals: torch.Tensor,
    indices: torch.Tensor,
    row_offsets: torch.Tensor,
    residuals: torch.Tensor,
    prefix_sizes: list[int],
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW_enc, db_enc, dW_dec, db_dec): the MSE step's backward over the levels' suffix sums."""
    F = W_dec.shape[0]
    suffix = residuals.flip(0).cumsum(0).flip(0).contiguous()
    sizes = _sizes(prefix_sizes, x.device)
    levels = torch.searchsorted(sizes, torch.arange(F, device=x.device), right=True).to(torch.int32)
    return mse_step_backward(grad, x, W_enc, W_dec, b_dec, vals, indices, suffix, row_offsets, levels=levels)


def matryoshka_batchtopk_sae_step_bwd_fake(
    grad, x, W_enc, W_dec, b_dec, vals, indices, row_offsets, residuals, prefix_sizes, needs
):
    return step_grads_fake(x, W_enc, W_dec, b_dec)


# Op registration and autograd ----------------------------------------------------

_matryoshka_batchtopk_sae_step = register_op(
    "matryoshka_batchtopk_sae_step",
    forward=matryoshka_batchtopk_sae_step_fwd,
    forward_fake=matryoshka_batchtopk_sae_step_fwd_fake,
    backward=matryoshka_batchtopk_sae_step_bwd,
    backward_fake=matryoshka_batchtopk_sae_step_bwd_fake,
    # x, W_enc, W_dec, b_dec; the code (vals, indices, row_offsets), the levels' residuals; the sizes
    save=lambda args, outputs: (args[0], args[1], args[3], args[4], *outputs[4:7], outputs[8], args[6]),
    differentiable=(0,),
    grad_inputs=(0, 1, 2, 3, 4),  # x, W_enc, b_enc, W_dec, b_dec
)


# Public function ---------------------------------------------------------------


def matryoshka_batchtopk_sae_step(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: float,
    prefix_sizes,
    *,
    rescale_acts_by_decoder_norm: bool = False,
) -> MatryoshkaSAEStep:
    """One Matryoshka BatchTopK SAE step: the BatchTopK code, and the summed losses of nested prefixes.

    Args:
        x, W_enc, b_enc, W_dec, b_dec, k, rescale_acts_by_decoder_norm: as ``batchtopk_sae_step``.
        prefix_sizes: the nested dictionaries' sizes m_1 < ... < m_G, ending at F (SAELens's
            ``matryoshka_widths``).

    Returns:
        ``MatryoshkaSAEStep(loss, level_losses, fvu, fire_counts, vals, indices, row_offsets,
        min_act)``: ``loss`` (0-d fp32, the sum of the G level losses, each a mean over B*D) is
        differentiable in every tensor argument. No host sync; nothing [B, F] kept; deterministic.
    """
    B, _, F = check_step_args(x, W_enc, b_enc, W_dec, b_dec, 1)
    n = check_batch_k(k, B, F)
    sizes = check_prefix_sizes(prefix_sizes, F)
    if not isinstance(rescale_acts_by_decoder_norm, bool):
        raise ValueError(f"rescale_acts_by_decoder_norm must be a bool, got {rescale_acts_by_decoder_norm!r}")
    out = _matryoshka_batchtopk_sae_step(
        x.contiguous(),
        W_enc.contiguous(),
        b_enc.contiguous(),
        W_dec.contiguous(),
        b_dec.contiguous(),
        n,
        sizes,
        rescale_acts_by_decoder_norm,
    )
    return MatryoshkaSAEStep(*out[:8])
