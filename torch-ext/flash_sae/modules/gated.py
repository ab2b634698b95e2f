"""``GatedSparseAutoencoder``: a Gated SAE (Rajamanoharan et al. 2024) trained with ``gated_sae_step``,
switching to the dense formulation while most gates are open.

Parameters and SAELens's initialisation come from ``modules.base.GatedSAEBase``, which the
plain-torch twin ``reference.GatedSparseAutoencoder`` shares. The sparse/dense choice is the
standard SAE's (``modules/_capacity.DenseSwitch``): from the count of open gates that reached the
host without a wait, never a sync in the step.
"""

import torch

from ..ops.gated.gated_sae_step import gated_code, gated_sae_step, gated_sae_step_dense
from ..results import GatedSAEStep
from ._capacity import DenseSwitch
from ._geometry import FusedDecoderGeometry
from .base import GatedSAEBase
from .batchtopk import decode_code

# Open gates per row, as a fraction of F, above which the dense formulation is faster: on an H100 in bf16
# the two steps' CUDA-graph times cross at about 0.0052 (2048, 2304, 65536) and 0.0044 (4096, 2048,
# 262144), interpolated between measured densities (benchmarks/standard_sae_step.py --arch gated,
# results/gated_sae_step_h100.log).
DENSE_ABOVE = 0.005


@torch.no_grad()
def gated_encode_code(sae, x: torch.Tensor, capacity: int | None = None):
    """The gated code (f at the open gates) as a variable-length code, from ``sae``'s parameters:
    (vals, indices, row_offsets); an open gate whose magnitude is <= 0 holds 0. ``capacity`` None
    counts first (one host sync). Shared with the hub layer."""
    params = (x, sae.W_enc, sae.b_gate, sae.r_mag, sae.b_mag, sae.b_dec)
    if capacity is None:
        capacity = max(1, int(gated_code(*params, 1)[4]))
    _, mag, indices, row_offsets, _, _ = gated_code(*params, capacity)
    vals = torch.relu(mag)  # 0 at the empty slots
    return vals, indices, row_offsets


class GatedSparseAutoencoder(DenseSwitch, FusedDecoderGeometry, GatedSAEBase):
    """Gated SAE: a gate path (b_gate) and a magnitude path (exp(r_mag) times the same encoder rows,
    plus b_mag), the L1 penalty on the gate weighted by the decoder rows' norms, and the gate path's
    auxiliary reconstruction; SAELens's ``gated`` training conventions by default.

    Args:
        d_model, n_features: D and F.
        l1_coefficient: the penalty's weight (SAELens's default 1.0); change it between steps for a
            warm-up.
        freeze_aux_decoder: True (default, the paper's rule): the auxiliary loss does not train W_dec
            or b_dec; False: it does, as SAELens's implementation.
        dense_above, capacity_per_row: as ``StandardSparseAutoencoder`` (open gates per row / F).
        decoder_init_norm, dtype, device, seed, dead_window_tokens: as ``BatchTopKSparseAutoencoder``.

    ``loss(x)`` is the training step. ``encode(x)`` returns the gated code as a variable-length
    code; ``encode``, ``decode`` and ``forward`` run without gradients: train with ``loss``.
    """

    def __init__(self, d_model, n_features, *, dense_above=DENSE_ABOVE, capacity_per_row=None, **kwargs):
        super().__init__(d_model, n_features, **kwargs)
        self._init_switch(dense_above, capacity_per_row)

    def _step(self, x: torch.Tensor) -> GatedSAEStep:
        capacity = self._path(x.shape[0])
        kw = dict(l1_coefficient=self.l1_coefficient, freeze_aux_decoder=self.freeze_aux_decoder)
        if capacity is None:
            return gated_sae_step_dense(x, *self.gated_params(), **kw)
        return gated_sae_step(x, *self.gated_params(), capacity=capacity, **kw)

    def encode(self, x: torch.Tensor, capacity: int | None = None):
        """(vals, indices, row_offsets): f at the open gates; ``capacity`` None counts first (one host sync)."""
        return gated_encode_code(self, x, capacity)

    def decode(self, vals: torch.Tensor, indices: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """x_hat [B, D] from a variable-length code."""
        return decode_code(self, vals, indices, row_offsets)
