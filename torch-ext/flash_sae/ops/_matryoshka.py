"""Host code the Matryoshka steps share: all nested levels' losses in one decoder pass, and their backward.

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

from .._registry import register_op
from ..primitives.gather import gather_level_residuals, row_ids
from ..primitives.step_backward import matryoshka_step_backward
from ..results import MatryoshkaSAEStep, fire_counts, total_variance
from ._step import (
    STEP_GRAD_INPUTS,
    reconstructed,
    saved_step_tensors,
    step_grads_fake,
    step_head,
    target_grad_fake,
    target_grad_for,
)

# The outputs of both Matryoshka steps, by name (their backward is ``matryoshka_levels_bwd``).
MATRYOSHKA_OUTPUTS = (
    "loss", "level_losses", "fvu", "fire_counts", "vals", "indices", "row_offsets", "min_act", "residuals",
)  # fmt: skip


def level_sizes(prefix_sizes: list[int], device) -> torch.Tensor:
    """The sizes as a device tensor, filled on the device (no host-to-device copy, so CUDA graphs capture it)."""
    return torch.stack([torch.full((), m, dtype=torch.int64, device=device) for m in prefix_sizes])


def matryoshka_levels_fwd(x, W_dec, b_dec, vals, indices, row_offsets, prefix_sizes):
    """(loss, level_losses [G], fvu, fire_counts, residuals [G, B, D] fp32) of a row-major code sorted by id;
    ``x`` is what every level reconstructs (a transcoder's target)."""
    B, D = x.shape
    F = W_dec.shape[0]
    sizes = level_sizes(prefix_sizes, x.device)
    flat = row_ids(row_offsets, indices.numel()) * F + indices
    level_ends = torch.searchsorted(flat, torch.arange(B, device=x.device).unsqueeze(1) * F + sizes)
    residuals, sq = gather_level_residuals(
        vals, indices, W_dec, b_dec, x, row_offsets=row_offsets, level_ends=level_ends
    )
    level_losses = sq / (B * D)
    return level_losses.sum(), level_losses, sq[-1] / total_variance(x), fire_counts(vals, indices, F), residuals


def matryoshka_levels_fwd_fake(x, W_dec, n_levels):
    """Fake (meta) outputs of ``matryoshka_levels_fwd``'s loss, level losses and fvu, fire counts, residuals."""
    B, D = x.shape[0], W_dec.shape[1]
    f32 = torch.float32
    return (
        x.new_empty((), dtype=f32),
        x.new_empty(n_levels, dtype=f32),
        x.new_empty((), dtype=f32),
        x.new_empty(W_dec.shape[0], dtype=torch.int64),
        x.new_empty(n_levels, B, D, dtype=f32),
    )


# What both Matryoshka steps' backward reads, by name.
MATRYOSHKA_SAVED = ("x", "W_enc", "W_dec", "b_dec", "target", "vals", "indices", "row_offsets", "residuals",
                    "prefix_sizes")  # fmt: skip


def matryoshka_levels_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """The Matryoshka steps' backward launcher: (dx, dW_enc, db_enc, dW_dec, db_dec, dtarget), the MSE
    step's backward over the levels' suffix sums (``saved``: ``MATRYOSHKA_SAVED``)."""
    x, W_dec = saved.x, saved.W_dec
    F = W_dec.shape[0]
    suffix = saved.residuals.flip(0).cumsum(0).flip(0).contiguous()
    sizes = level_sizes(saved.prefix_sizes, x.device)
    levels = torch.searchsorted(sizes, torch.arange(F, device=x.device), right=True).to(torch.int32)
    step = saved_step_tensors(saved, residual=suffix)
    step_grads = matryoshka_step_backward(grads.loss, step, levels=levels, centred=saved.target is None)
    return (*step_grads, target_grad_for(needs[5], grads.loss, suffix[0], saved.target, x))


def matryoshka_levels_bwd_fake(grads, saved, needs: list[bool]):
    x = saved.x
    return (*step_grads_fake(x, saved.W_enc, saved.W_dec, saved.b_dec), target_grad_fake(needs[5], saved.target, x))


def min_positive(acts: torch.Tensor) -> torch.Tensor:
    """The smallest positive entry as 0-d fp32 (+inf if none); no host sync."""
    return torch.where(acts > 0, acts.float(), float("inf")).amin()


def matryoshka_result(out, rows: int) -> MatryoshkaSAEStep:
    """A Matryoshka step's result from its op's named outputs; ``mse`` is the last level's (the whole dictionary's)."""
    head = step_head(out, rows, mse=out.level_losses[-1])
    return MatryoshkaSAEStep(**head, level_losses=out.level_losses, min_act=out.min_act)


def matryoshka_step_fwd(i, select) -> tuple:
    """The forward of a Matryoshka step given its selection rule: ``select(centre)`` returns the code
    ordered by latent id inside each row (vals, indices, row_offsets) and the activations it ranked (for
    ``min_act``); ``centre`` is b_dec for an SAE, None for a transcoder. Every level reconstructs x, or
    the target. Returns ``MATRYOSHKA_OUTPUTS``."""
    y, centre = reconstructed(i.x, i.b_dec, i.target)
    vals, indices, row_offsets, ranked = select(centre)
    loss, level_losses, fvu, counts, residuals = matryoshka_levels_fwd(
        y, i.W_dec, i.b_dec, vals, indices, row_offsets, i.prefix_sizes
    )
    return loss, level_losses, fvu, counts, vals, indices, row_offsets, min_positive(ranked), residuals


def matryoshka_step_fwd_fake(i, n: int) -> tuple:
    """``matryoshka_step_fwd``'s fake outputs for a code of ``n`` entries."""
    x, i64 = i.x, torch.int64
    loss, level_losses, fvu, counts, residuals = matryoshka_levels_fwd_fake(x, i.W_dec, len(i.prefix_sizes))
    code = (x.new_empty(n), x.new_empty(n, dtype=i64), x.new_empty(x.shape[0] + 1, dtype=i64))
    return loss, level_losses, fvu, counts, *code, x.new_empty((), dtype=torch.float32), residuals


def register_matryoshka_step(name: str, inputs: type, forward, forward_fake):
    """``register_op`` for a Matryoshka step: the shared levels' backward, ``MATRYOSHKA_OUTPUTS`` and
    ``MATRYOSHKA_SAVED``, the loss differentiable in every step tensor."""
    launchers = (forward, forward_fake, matryoshka_levels_bwd, matryoshka_levels_bwd_fake)
    return register_op(name, inputs=inputs, launchers=launchers, saved=MATRYOSHKA_SAVED, outputs=MATRYOSHKA_OUTPUTS,
                       differentiable=("loss",), grad_inputs=STEP_GRAD_INPUTS)  # fmt: skip
