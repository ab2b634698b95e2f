"""``JumpReLUSparseAutoencoder``: a JumpReLU SAE trained with ``jumprelu_sae_step``.

Parameters, SAELens's initialisation and the threshold's parameterisation come from
``modules.base.JumpReLUSAEBase``, which the plain-torch twin
``reference.JumpReLUSparseAutoencoder`` shares.

Capacity, without a host sync (``modules/_capacity.py``). The step's code has a static size.
The module starts at ``capacity_per_row`` entries per row (default: F, which can never
overflow) and sizes the capacity to 1.5x the last count per row that reached the host without
a wait, rounded up to a power of two. A step whose entries did not fit says so in
``step.overflow``; the capacity then grows from that step's count, so a later step is exact
again.
"""

import torch

from .._validation import is_int
from ..ops.jumprelu.jumprelu_sae_step import jumprelu_sae_step
from ..primitives.select.preacts import threshold_preacts
from ..results import JumpReLUSAEStep
from ._capacity import LearnedCapacity, SeenCount, grown_capacity
from ._geometry import FusedDecoderGeometry
from .base import JumpReLUSAEBase
from .batchtopk import decode_code


@torch.no_grad()
def jumprelu_encode_code(sae, x: torch.Tensor, capacity: int | None = None, *, centred: bool = True):
    """The active entries (z > threshold) as a variable-length code, from ``sae``'s attributes
    (``threshold`` [F]); ``capacity`` None counts first (one host sync). Shared with the hub layer.
    ``centred``: the encoder reads x - b_dec (an SAE); False reads x as it is (a transcoder)."""
    centre = sae.b_dec if centred else None
    theta = sae.threshold if hasattr(sae, "threshold") else sae.log_threshold.exp()
    theta = theta.clamp_min(0)
    if capacity is None:
        capacity = max(1, int(threshold_preacts(x, sae.W_enc, sae.b_enc, centre, theta, 0.0, 1)[3]))
    vals, indices, row_offsets, _ = threshold_preacts(x, sae.W_enc, sae.b_enc, centre, theta, 0.0, capacity)
    return vals, indices, row_offsets


class JumpReLUSparseAutoencoder(LearnedCapacity, FusedDecoderGeometry, JumpReLUSAEBase):
    """JumpReLU SAE (Rajamanoharan et al. 2024), SAELens's training conventions by default.

    Args:
        d_model, n_features: D and F.
        init_threshold, bandwidth, l0_coefficient: SAELens's defaults 0.01, 0.05, 1.0.
        threshold_parameterization: "direct" (SAELens) or "log" (the paper).
        capacity_per_row: the code's starting size per row (default F); it adapts (module docstring).
        decoder_init_norm, dtype, device, seed, dead_window_tokens: as ``BatchTopKSparseAutoencoder``.

    ``loss(x)`` is the fused training step (MSE summed over D, mean over B, + l0_coefficient *
    L0). ``encode(x)`` returns the active entries as a variable-length code; ``encode``,
    ``decode`` and ``forward`` run without gradients: train with ``loss``.
    """

    supports_fused_optimizer = True  # flash_sae.FusedAdam: both weights' gradients come from the step's passes

    def __init__(self, d_model, n_features, *, capacity_per_row=None, **kwargs):
        super().__init__(d_model, n_features, **kwargs)
        if capacity_per_row is not None and (not is_int(capacity_per_row) or capacity_per_row < 1):
            raise ValueError(f"capacity_per_row must be a positive int or None, got {capacity_per_row!r}")
        self.capacity_per_row = min(int(capacity_per_row or n_features), self.n_features)
        self._seen = SeenCount()

    def _capacity(self, B: int) -> int:
        per_row = self._seen.poll()
        if per_row is not None:
            self.capacity_per_row = grown_capacity(per_row, self.n_features)
        return min(B * self.n_features, self.capacity_per_row * B)

    def _step(self, x: torch.Tensor, target: torch.Tensor | None = None) -> JumpReLUSAEStep:
        return jumprelu_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.current_threshold(),
            capacity=self._capacity(x.shape[0]), bandwidth=self.bandwidth, l0_coefficient=self.l0_coefficient,
            target=target,
        )  # fmt: skip

    def encode(self, x: torch.Tensor, capacity: int | None = None):
        """(vals, indices, row_offsets) of the active entries; ``capacity`` None counts first (one host sync)."""
        return jumprelu_encode_code(self, x, capacity, centred=self.centres_input)

    def decode(self, vals: torch.Tensor, indices: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """x_hat [B, D] from a variable-length code."""
        return decode_code(self, vals, indices, row_offsets)
