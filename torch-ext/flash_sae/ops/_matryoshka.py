"""Matryoshka's prefix levels, the optional loss term of the TopK and BatchTopK steps: all nested levels'
losses in one decoder pass, and their backward (``ops/_step.py`` calls these when ``prefix_sizes`` is given).

Nested dictionaries: prefix sizes m_1 < ... < m_G = F; level g reconstructs x with the
latents of id < m_g only, and the loss sums every level's error:

    x_hat_g = b_dec + sum over the code's entries with id < m_g of vals * W_dec[f]
    loss    = sum_g mean over B*D of (x_hat_g - x)^2          (SAELens's total is D x this)

Forward: the code is ordered by latent id inside each row, so each level is a prefix of the
row's entries: the row gather walks the entries once and writes the residual
e_g = x_hat_g - x each time it passes a level's end. Backward: a latent of level L(f) (the
first level that contains it) enters every x_hat_g with g >= L(f), so its gradient row is
the suffix sum S_L = sum over g >= L of e_g: G vectors per row, not one per entry. The
shared MSE-step backward then runs once, with latent f reading S_L(f) in the segmented pass
(one CSR transpose for both weight gradients), and x, b_dec seeing S_0.

A transcoder (``target`` [B, D_out]): every level reconstructs the target instead of x, and x is
encoded as it is (no ``x - b_dec``); the target's gradient is -s * S_0.
"""

import torch

from ..primitives.gather import gather_level_residuals, row_ids
from ..primitives.step_backward import StepTensors, matryoshka_step_backward
from ..results import fire_counts, total_variance


def level_sizes(prefix_sizes: list[int], device) -> torch.Tensor:
    """The sizes as a device tensor, filled on the device (no host-to-device copy, so CUDA graphs capture it)."""
    return torch.stack([torch.full((), m, dtype=torch.int64, device=device) for m in prefix_sizes])


def matryoshka_levels_fwd(y, W_dec, b_dec, vals, indices, row_offsets, prefix_sizes):
    """(loss, level_losses [G], fvu, fire_counts, residuals [G, B, D] fp32) of a row-major code sorted by id
    in each row; ``y`` [B, D] is what every level reconstructs (x, or a transcoder's target)."""
    B, D = y.shape
    F = W_dec.shape[0]
    sizes = level_sizes(prefix_sizes, y.device)
    flat = row_ids(row_offsets, indices.numel()) * F + indices
    level_ends = torch.searchsorted(flat, torch.arange(B, device=y.device).unsqueeze(1) * F + sizes)
    residuals, sq = gather_level_residuals(
        vals, indices, W_dec, b_dec, y, row_offsets=row_offsets, level_ends=level_ends
    )
    level_losses = sq / (B * D)
    return level_losses.sum(), level_losses, sq[-1] / total_variance(y), fire_counts(vals, indices, F), residuals


def matryoshka_levels_bwd(grad, step: StepTensors, prefix_sizes: list[int], centred: bool):
    """The levels' backward: ``step.residual`` holds the forward's residuals [G, B, D]; returns ((dx, dW_enc,
    db_enc, dW_dec, db_dec), S_0), the MSE step's backward over the levels' suffix sums, and S_0 (the sum of
    every level's residual: the target's gradient is -s * S_0)."""
    F = step.W_dec.shape[0]
    suffix = step.residual.flip(0).cumsum(0).flip(0).contiguous()
    sizes = level_sizes(prefix_sizes, step.x.device)
    levels = torch.searchsorted(sizes, torch.arange(F, device=step.x.device), right=True).to(torch.int32)
    grads = matryoshka_step_backward(grad, step._replace(residual=suffix), levels=levels, centred=centred)
    return grads, suffix[0]


def min_positive(acts: torch.Tensor) -> torch.Tensor:
    """The smallest positive entry as 0-d fp32 (+inf if none); no host sync."""
    return torch.where(acts > 0, acts.float(), float("inf")).amin()
