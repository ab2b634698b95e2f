"""What the steps return: named result types, and the statistics in them, computed on the device.

Every step result starts with the same six fields, in this order (``STEP_FIELDS``):

- ``loss``: [] fp32, the training objective, differentiable in every tensor argument;
- ``mse``: [] fp32, the mean over B*D of the squared reconstruction error (detached);
- ``fvu``: [] fp32, the fraction of variance unexplained (sum of squared errors over the batch's
  total variance about its mean; undefined, inf or NaN, for B = 1);
- ``l0``: [] fp32, latents with a value > 0 per row, on average;
- ``fire_counts``: [F] int64, the rows of this batch in which each latent had a value > 0;
- ``code``: the sparse code, a ``SparseCode``;

and the architecture's own terms after them. Every statistic here is computed without a host
sync (no ``.item()``, no Python branch on a tensor value), so a step that returns it stays
CUDA-graph capturable. ``flash_sae.testing.reference`` imports these; production code never
imports the reference.
"""

from typing import NamedTuple

import torch

STEP_FIELDS = ("loss", "mse", "fvu", "l0", "fire_counts", "code")


class SparseCode(NamedTuple):
    """A batch's sparse code, by latent id.

    Fixed width (the TopK steps): ``vals`` and ``indices`` are [B, K]; ``row_offsets`` is None.
    Variable length (every other step): ``vals`` and ``indices`` are flat, and row b owns entries
    ``row_offsets[b]:row_offsets[b + 1]``; a fixed-capacity code's slots past ``row_offsets[B]``
    hold value 0 and index -1. ``to_dense(n_features)`` scatters it to [B, F].
    """

    vals: torch.Tensor  # the code's values, in the parameters' dtype
    indices: torch.Tensor  # int64 latent ids
    row_offsets: torch.Tensor | None = None  # [B + 1] int64, or None for a [B, K] code

    def to_dense(self, n_features: int) -> torch.Tensor:
        """The code as a dense [B, n_features] tensor (zeros where no entry is), without a host sync."""
        if self.row_offsets is None:
            B = self.vals.shape[0]
            dense = self.vals.new_zeros(B, n_features)
            return dense.scatter_(1, self.indices.long(), self.vals)
        B = self.row_offsets.shape[0] - 1
        slots = torch.arange(self.vals.shape[0], device=self.vals.device)
        rows = torch.searchsorted(self.row_offsets, slots, right=True) - 1
        live = (slots < self.row_offsets[-1]) & (self.indices >= 0)
        flat = torch.where(live, rows.clamp(0, B - 1) * n_features + self.indices.long().clamp_min(0), 0)
        dense = self.vals.new_zeros(B * n_features)
        dense.index_put_((flat,), torch.where(live, self.vals, 0), accumulate=True)
        return dense.view(B, n_features)


class TopKSAEStep(NamedTuple):
    """What one TopK SAE step returns (``STEP_FIELDS`` first); the code is [B, K]."""

    loss: torch.Tensor  # [] fp32: mse (+ aux_coef * aux_loss with a dead-latent loss)
    mse: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    l0: torch.Tensor  # [] fp32: latents with a value > 0 per row, on average (at most K)
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent fired (value > 0)
    code: SparseCode  # vals, indices [B, K]
    aux_loss: torch.Tensor | None = None  # [] fp32: the dead-latent loss (before its coefficient), if asked


class BatchTopKSAEStep(NamedTuple):
    """What one BatchTopK SAE step returns (``STEP_FIELDS`` first); the code is variable-length,
    int(k * B) entries, each row's by latent id."""

    loss: torch.Tensor  # [] fp32: mse (+ aux_coef * aux_loss with a dead-latent loss)
    mse: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    l0: torch.Tensor  # [] fp32: latents with a value > 0 per row, on average
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent fired (value > 0)
    code: SparseCode  # vals relu(pre), indices [N = int(k * B)], row_offsets [B + 1]
    min_act: torch.Tensor  # [] fp32: the smallest positive selected activation (inf if none), for the threshold
    aux_loss: torch.Tensor | None = None  # [] fp32: the dead-latent loss (before its coefficient), if asked


class MatryoshkaSAEStep(NamedTuple):
    """What one Matryoshka (TopK or BatchTopK) SAE step returns (``STEP_FIELDS`` first): the code
    (variable-length) and one loss per prefix level."""

    loss: torch.Tensor  # [] fp32: the sum of the level losses
    mse: torch.Tensor  # [] fp32: the whole dictionary's (the last level's) mean squared error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained by the whole dictionary
    l0: torch.Tensor  # [] fp32: latents with a value > 0 per row, on average
    fire_counts: torch.Tensor  # [F] int64
    code: SparseCode  # vals relu(pre), indices, row_offsets [B + 1]
    level_losses: torch.Tensor  # [G] fp32: mean over B*D of the squared error of each prefix reconstruction
    min_act: torch.Tensor  # [] fp32: the smallest positive selected activation (inf if none)


class JumpReLUSAEStep(NamedTuple):
    """What one JumpReLU SAE step returns (``STEP_FIELDS`` first). The code has a fixed capacity:
    the active entries (value > 0 after the jump) and those within half a bandwidth of the
    threshold (value 0), which the threshold's estimators need. ``overflow`` is True when more
    entries qualified than fit."""

    loss: torch.Tensor  # [] fp32: sum over D of the squared error, mean over B, + l0_coefficient * l0
    mse: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    l0: torch.Tensor  # [] fp32: active latents per row, on average
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent was active
    code: SparseCode  # vals z * H(z - threshold), indices (-1 past the last entry), row_offsets
    count: torch.Tensor  # [] int64: entries that qualified (active or in the band)
    overflow: torch.Tensor  # [] bool: count > capacity (entries were dropped; see the module's recovery)


class StandardSAEStep(NamedTuple):
    """What one standard (ReLU + L1) SAE step returns (``STEP_FIELDS`` first). The code has a fixed
    capacity, as ``JumpReLUSAEStep``'s: the active entries (z > 0). ``overflow`` is True when
    more entries were active than fit."""

    loss: torch.Tensor  # [] fp32: sum over D of the squared error, mean over B, + l1_coefficient * l1
    mse: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    l0: torch.Tensor  # [] fp32: active latents per row, on average (the entries collected)
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent was active
    code: SparseCode  # vals relu(z), indices (-1 past the last entry), row_offsets
    l1: torch.Tensor  # [] fp32: mean over B of sum_f f * ||W_dec[f]||
    count: torch.Tensor  # [] int64: entries that were active
    overflow: torch.Tensor  # [] bool: count > capacity (entries were dropped)


class GatedSAEStep(NamedTuple):
    """What one Gated SAE step returns (``STEP_FIELDS`` first). The code has a fixed capacity, over
    the open gates (pi_gate > 0) of each row; ``vals`` holds f = relu(pi_mag) there, so an open gate
    whose magnitude is <= 0 holds a 0. ``overflow`` is True when more gates were open than fit."""

    loss: torch.Tensor  # [] fp32: mse summed over D, mean over B, + l1_coefficient * l1 + aux
    mse: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    l0: torch.Tensor  # [] fp32: latents with f > 0 per row, on average
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent had f > 0
    code: SparseCode  # vals f, indices (-1 past the last entry), row_offsets
    l1: torch.Tensor  # [] fp32: mean over B of sum_f relu(pi_gate) * ||W_dec[f]||
    aux: torch.Tensor  # [] fp32: the gate path's reconstruction error, summed over D, mean over B
    count: torch.Tensor  # [] int64: open gates
    overflow: torch.Tensor  # [] bool: count > capacity (entries were dropped)


STEP_RESULTS = (TopKSAEStep, BatchTopKSAEStep, MatryoshkaSAEStep, JumpReLUSAEStep, StandardSAEStep, GatedSAEStep)


def code_l0(vals: torch.Tensor, rows: int) -> torch.Tensor:
    """[] fp32: the nonzero entries of a code of ``rows`` rows, per row, on the device: its latents with a
    value > 0 for the codes whose values are >= 0 (every selected code is relu'd). Two launches."""
    return torch.count_nonzero(vals.detach()).div(rows, rounding_mode=None).float()


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


class CrossLayerTranscoderStep(NamedTuple):
    """What one cross-layer transcoder step returns (``STEP_FIELDS`` first), for every selection rule.

    The code is one ``SparseCode`` over the L*F latents, layer l's latent f at id l*F + f: [B, L*K]
    for the TopK rule (layer l's K entries in columns l*K:(l+1)*K), variable-length (each row's
    entries by id) for BatchTopK and JumpReLU."""

    loss: torch.Tensor  # [] fp32: sum over the L targets of each one's mean over B*D squared error (+ sparsity_loss)
    mse: torch.Tensor  # [] fp32: mean over B*L*D of the squared error
    fvu: torch.Tensor  # [] fp32: sum of squared errors over the sum of the L targets' variances
    l0: torch.Tensor  # [] fp32: active latents (value > 0) per row, over all layers, on average
    fire_counts: torch.Tensor  # [L*F] int64: rows of this batch in which each latent fired
    code: SparseCode  # see the class docstring
    layer_fvu: torch.Tensor  # [L] fp32: each target layer's fraction of variance unexplained
    layer_l0: torch.Tensor  # [L] fp32: each source layer's active latents per row
    sparsity_loss: torch.Tensor | None = None  # [] fp32: the JumpReLU rule's tanh penalty (with its coefficient)
    count: torch.Tensor | None = None  # [] int64: JumpReLU entries that qualified, over all layers
    overflow: torch.Tensor | None = None  # [] bool: a layer's entries did not fit its capacity


# Crosscoders: an SAE's step over the concatenation of L layers, with each layer's FVU -------------


class StandardCrosscoderStep(NamedTuple):
    """What one standard crosscoder step returns: ``StandardSAEStep``'s fields over the [B, L * D]
    concatenation (``l1`` weighted by sum_l ||W_dec[f, l]||), then ``layer_fvu``."""

    loss: torch.Tensor  # [] fp32: the reconstruction term (reconstruction="mse": squared error summed over
    # L * D, mean over B; "layer_l2": mean over B and L of the layers' error norms) + l1_coefficient * l1
    mse: torch.Tensor  # [] fp32: mean over B * L * D of the squared reconstruction error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained, all layers together
    l0: torch.Tensor  # [] fp32: active latents per row, on average
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent was active
    code: SparseCode | None  # vals relu(z), indices, row_offsets (None on the dense path)
    l1: torch.Tensor  # [] fp32: mean over B of sum_f f * sum_l ||W_dec[f, l]||
    count: torch.Tensor  # [] int64: entries that were active
    overflow: torch.Tensor  # [] bool: count > capacity (entries were dropped)
    layer_fvu: torch.Tensor  # [L] fp32: each layer's fraction of variance unexplained


class TopKCrosscoderStep(NamedTuple):
    """What one TopK crosscoder step returns: ``TopKSAEStep``'s fields over the [B, L * D]
    concatenation, then ``layer_fvu``."""

    loss: torch.Tensor  # [] fp32: mse (+ aux_coef * aux_loss with a dead-latent loss)
    mse: torch.Tensor  # [] fp32: mean over B * L * D of the squared reconstruction error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained, all layers together
    l0: torch.Tensor  # [] fp32: latents with a value > 0 per row, on average (at most K)
    fire_counts: torch.Tensor  # [F] int64
    code: SparseCode  # vals, indices [B, K]
    aux_loss: torch.Tensor | None  # [] fp32: the dead-latent loss, if asked
    layer_fvu: torch.Tensor  # [L] fp32: each layer's fraction of variance unexplained


class BatchTopKCrosscoderStep(NamedTuple):
    """What one BatchTopK crosscoder step returns: ``BatchTopKSAEStep``'s fields over the [B, L * D]
    concatenation, then ``layer_fvu``."""

    loss: torch.Tensor  # [] fp32: mse, or with reconstruction="layer_l2" the mean over B and L of the layers'
    # error norms (+ aux_coef * aux_loss with a dead-latent loss)
    mse: torch.Tensor  # [] fp32: mean over B * L * D of the squared reconstruction error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained, all layers together
    l0: torch.Tensor  # [] fp32: latents with a value > 0 per row, on average
    fire_counts: torch.Tensor  # [F] int64
    code: SparseCode  # vals relu(pre), indices, row_offsets
    min_act: torch.Tensor  # [] fp32: the smallest positive ranked activation (inf if none)
    aux_loss: torch.Tensor | None  # [] fp32: the dead-latent loss, if asked
    layer_fvu: torch.Tensor  # [L] fp32: each layer's fraction of variance unexplained


class JumpReLUCrosscoderStep(NamedTuple):
    """What one JumpReLU crosscoder step returns: ``JumpReLUSAEStep``'s fields over the [B, L * D]
    concatenation, then ``layer_fvu``."""

    loss: torch.Tensor  # [] fp32: squared error summed over L * D, mean over B, + l0_coefficient * l0
    mse: torch.Tensor  # [] fp32: mean over B * L * D of the squared reconstruction error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained, all layers together
    l0: torch.Tensor  # [] fp32: active latents per row, on average
    fire_counts: torch.Tensor  # [F] int64
    code: SparseCode  # vals z * H(z - threshold), indices, row_offsets
    count: torch.Tensor  # [] int64: entries that qualified (active or in the band)
    overflow: torch.Tensor  # [] bool: count > capacity
    layer_fvu: torch.Tensor  # [L] fp32: each layer's fraction of variance unexplained


def layer_fvu(residual: torch.Tensor, x: torch.Tensor, n_layers: int) -> torch.Tensor:
    """[L] fp32: each layer's sum of squared errors over its total variance, from the residual [B, L * D]
    (fp32) and the input [B, L * D]; inf or NaN for B = 1, as ``fvu``."""
    B = x.shape[0]
    sq = residual.float().reshape(B, n_layers, -1).square().sum((0, 2))
    var = x.float().reshape(B, n_layers, -1).var(0, correction=B - 1).sum(-1)
    return sq / var
