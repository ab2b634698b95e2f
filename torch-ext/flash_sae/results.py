"""What the steps return: named result types, and the statistics in them, computed on the device.

Every statistic here is computed without a host sync (no ``.item()``, no
Python branch on a tensor value), so a step that returns it stays CUDA-graph
capturable. ``testing/reference.py`` imports these; production code never imports
the reference.
"""

from typing import NamedTuple

import torch


class TopKSAEStep(NamedTuple):
    """What one TopK SAE step returns: the loss and what trainers log, all on device."""

    loss: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error (+ aux_coef * aux_loss)
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent fired (value > 0)
    vals: torch.Tensor  # [B, K]: the code's values (L0 is K)
    indices: torch.Tensor  # [B, K] int64: the code's latent ids
    aux_loss: torch.Tensor | None = None  # [] fp32: the dead-latent loss (before its coefficient), if asked


class BatchTopKSAEStep(NamedTuple):
    """What one BatchTopK SAE step returns. The code is variable-length: row b's entries are
    ``vals[row_offsets[b]:row_offsets[b+1]]`` (and the same slice of ``indices``), by latent id."""

    loss: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error (+ aux_coef * aux_loss)
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent fired (value > 0)
    vals: torch.Tensor  # [N]: the code's values relu(pre), N = int(k * B)
    indices: torch.Tensor  # [N] int64: the code's latent ids
    row_offsets: torch.Tensor  # [B + 1] int64: row b owns entries row_offsets[b]:row_offsets[b+1]
    min_act: torch.Tensor  # [] fp32: the smallest positive selected activation (inf if none), for the threshold
    aux_loss: torch.Tensor | None = None  # [] fp32: the dead-latent loss (before its coefficient), if asked


class MatryoshkaSAEStep(NamedTuple):
    """What one Matryoshka BatchTopK SAE step returns: the BatchTopK code and one loss per prefix level."""

    loss: torch.Tensor  # [] fp32: the sum of the level losses
    level_losses: torch.Tensor  # [G] fp32: mean over B*D of the squared error of each prefix reconstruction
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained by the whole dictionary (the last level)
    fire_counts: torch.Tensor  # [F] int64
    vals: torch.Tensor  # [N]: relu(pre) at the selected entries
    indices: torch.Tensor  # [N] int64
    row_offsets: torch.Tensor  # [B + 1] int64
    min_act: torch.Tensor  # [] fp32: the smallest positive selected activation (inf if none)


class StandardSAEStep(NamedTuple):
    """What one standard (ReLU + L1) SAE step returns. The code is variable-length with a fixed
    capacity, as ``JumpReLUSAEStep``'s: the active entries (z > 0) of each row, by latent id.
    ``overflow`` is True when more entries were active than fit."""

    loss: torch.Tensor  # [] fp32: sum over D of the squared error, mean over B, + l1_coefficient * l1
    mse: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error
    l1: torch.Tensor  # [] fp32: mean over B of sum_f f * ||W_dec[f]||
    l0: torch.Tensor  # [] fp32: active latents per row, on average (the entries collected)
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent was active
    vals: torch.Tensor  # [capacity]: relu(z) at the collected entries (0 past the last one)
    indices: torch.Tensor  # [capacity] int64: their latent ids (-1 past the last one)
    row_offsets: torch.Tensor  # [B + 1] int64
    count: torch.Tensor  # [] int64: entries that were active
    overflow: torch.Tensor  # [] bool: count > capacity (entries were dropped)


class GatedSAEStep(NamedTuple):
    """What one Gated SAE step returns. The code is variable-length with a fixed capacity, as
    ``StandardSAEStep``'s, over the open gates (pi_gate > 0) of each row, by latent id; ``vals``
    holds the code f = relu(pi_mag) there, so an open gate whose magnitude is <= 0 holds a 0.
    ``overflow`` is True when more gates were open than fit."""

    loss: torch.Tensor  # [] fp32: mse summed over D, mean over B, + l1_coefficient * l1 + aux
    mse: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error
    l1: torch.Tensor  # [] fp32: mean over B of sum_f relu(pi_gate) * ||W_dec[f]||
    aux: torch.Tensor  # [] fp32: the gate path's reconstruction error, summed over D, mean over B
    l0: torch.Tensor  # [] fp32: latents with f > 0 per row, on average
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent had f > 0
    vals: torch.Tensor  # [capacity]: f at the open gates (0 past the last one)
    indices: torch.Tensor  # [capacity] int64: their latent ids (-1 past the last one)
    row_offsets: torch.Tensor  # [B + 1] int64
    count: torch.Tensor  # [] int64: open gates
    overflow: torch.Tensor  # [] bool: count > capacity (entries were dropped)


class JumpReLUSAEStep(NamedTuple):
    """What one JumpReLU SAE step returns. The code is variable-length with a fixed capacity: row b's
    entries are ``vals[row_offsets[b]:row_offsets[b+1]]``; it holds the active entries (value > 0
    after the jump) and those within half a bandwidth of the threshold (value 0), which the
    threshold's estimators need. ``overflow`` is True when more entries qualified than fit."""

    loss: torch.Tensor  # [] fp32: sum over D of the squared error, mean over B, + l0_coefficient * l0
    mse: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error
    l0: torch.Tensor  # [] fp32: active latents per row, on average
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent was active
    vals: torch.Tensor  # [capacity]: z * H(z - threshold) at the collected entries
    indices: torch.Tensor  # [capacity] int64: their latent ids (-1 past the last one)
    row_offsets: torch.Tensor  # [B + 1] int64
    count: torch.Tensor  # [] int64: entries that qualified (active or in the band)
    overflow: torch.Tensor  # [] bool: count > capacity (entries were dropped; see the module's recovery)


def fire_counts(vals: torch.Tensor, indices: torch.Tensor, F: int) -> torch.Tensor:
    """How many rows of the batch each latent fired in (a slot with value > 0); [F] int64.

    An integer scatter-add: exact, deterministic and free of host syncs.
    """
    fired = (vals.detach() > 0).reshape(-1).to(torch.int64)
    return torch.zeros(F, dtype=torch.int64, device=indices.device).index_add_(0, indices.reshape(-1).long(), fired)


def total_variance(x: torch.Tensor) -> torch.Tensor:
    """sum over the batch of (x - mean_b x)^2, in fp32 (the FVU's denominator); 0 for B = 1.

    Each column's sum of squared deviations is torch's one-pass (Welford) variance with the
    correction B - 1, i.e. divided by 1: two launches where the mean, the centring, the square and
    the sum took four."""
    return x.float().var(0, correction=x.shape[0] - 1).sum()
