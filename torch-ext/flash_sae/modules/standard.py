"""``StandardSparseAutoencoder``: a standard (ReLU + L1) SAE trained with ``standard_sae_step``, switching
to the dense formulation while its code is dense.

Parameters and SAELens's initialisation come from ``modules.base.StandardSAEBase``, which the
plain-torch twin ``reference.StandardSparseAutoencoder`` shares.

Sparse or dense, without a host sync. Early in training a ReLU code is dense (L0 in the
thousands), where the sparse step is slower than dense products. The module learns the code's
density from the counts that reached the host without a wait (``modules/_capacity.py``): until a
count has arrived, and whenever the last one was above ``dense_above`` * F active latents per
row, ``loss`` runs ``standard_sae_step_dense``; otherwise ``standard_sae_step`` with a capacity
of 1.5x the count seen (a power of two). ``last_path`` says which ran. Both give the same loss
and gradients by the parity rule. A sparse step whose code overflowed says so
(``step.overflow``), and the capacity grows from its count.
"""

import torch

from ..ops.standard.standard_sae_step import standard_sae_step, standard_sae_step_dense
from ..primitives.select.preacts import threshold_preacts
from ..results import StandardSAEStep
from ._capacity import DenseSwitch
from ._geometry import FusedDecoderGeometry
from .base import StandardSAEBase, UnitNormDecoder
from .batchtopk import decode_code

# Active latents per row, as a fraction of F, above which the dense formulation is faster: on an H100 in
# bf16 the two steps' CUDA-graph times cross at about 0.0070 (2048, 2304, 65536) and 0.0055 (4096, 2048,
# 262144), interpolated between measured densities (benchmarks/standard_sae_step.py,
# results/standard_sae_step_h100.log, after the dense formulation's fused passes).
DENSE_ABOVE = 0.006


@torch.no_grad()
def standard_encode_code(sae, x: torch.Tensor, capacity: int | None = None, *, centred: bool = True):
    """The active entries (z > 0) as a variable-length code, from ``sae``'s four weights; ``capacity``
    None counts first (one host sync). Shared with the hub layer. ``centred``: the encoder reads
    x - b_dec (an SAE); False reads x as it is (a transcoder)."""
    centre = sae.b_dec if centred else None
    zero = torch.zeros(sae.W_enc.shape[0], dtype=x.dtype, device=x.device)
    if capacity is None:
        capacity = max(1, int(threshold_preacts(x, sae.W_enc, sae.b_enc, centre, zero, 0.0, 1)[3]))
    vals, indices, row_offsets, _ = threshold_preacts(x, sae.W_enc, sae.b_enc, centre, zero, 0.0, capacity)
    return vals, indices, row_offsets


class StandardSparseAutoencoder(DenseSwitch, FusedDecoderGeometry, StandardSAEBase):
    """Standard SAE (ReLU code; L1 penalty weighted by the decoder rows' norms, Anthropic's April 2024
    update), SAELens's ``standard`` training conventions by default.

    Args:
        d_model, n_features: D and F.
        l1_coefficient: the penalty's weight (SAELens's default 1.0); change it between steps for a
            warm-up.
        dense_above: the density (active latents per row / F) above which ``loss`` runs the dense
            formulation (default ``DENSE_ABOVE``, the H100 crossover); 1.0 never, 0.0 always.
        capacity_per_row: a starting sparse capacity per row; None (default) starts dense until
            the first count arrives.
        decoder_init_norm, dtype, device, seed, dead_window_tokens: as ``BatchTopKSparseAutoencoder``.

    ``loss(x)`` is the training step (MSE summed over D, mean over B, + l1_coefficient * L1).
    ``encode(x)`` returns the active entries as a variable-length code; ``encode``, ``decode``
    and ``forward`` run without gradients: train with ``loss``.
    """

    supports_fused_optimizer = True  # flash_sae.FusedAdam: both weights' gradients come from the step's passes

    def __init__(self, d_model, n_features, *, dense_above=DENSE_ABOVE, capacity_per_row=None, **kwargs):
        super().__init__(d_model, n_features, **kwargs)
        self._init_switch(dense_above, capacity_per_row)

    def _step(self, x: torch.Tensor, target: torch.Tensor | None = None) -> StandardSAEStep:
        capacity = self._path(x.shape[0])
        params = (x, self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        if capacity is None:
            return standard_sae_step_dense(*params, l1_coefficient=self.l1_coefficient, target=target)
        return standard_sae_step(*params, capacity=capacity, l1_coefficient=self.l1_coefficient, target=target)

    def encode(self, x: torch.Tensor, capacity: int | None = None):
        """(vals, indices, row_offsets) of the active entries (z > 0); ``capacity`` None counts first
        (one host sync)."""
        return standard_encode_code(self, x, capacity, centred=self.centres_input)

    def decode(self, vals: torch.Tensor, indices: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """x_hat [B, D] from a variable-length code."""
        return decode_code(self, vals, indices, row_offsets)


class VanillaSparseAutoencoder(UnitNormDecoder, StandardSparseAutoencoder):
    """The ReLU SAE of "Towards Monosemanticity" (Bricken et al. 2023): an L1 penalty on the code and
    decoder rows held at unit norm.

    Composed, not computed anew: the standard SAE's step, whose penalty weights each latent by
    ||W_dec[f]||, is the plain L1 penalty while every row has unit norm; the penalty's decoder
    gradient lies along each row, so the projection ``before_optimizer_step`` applies
    (``UnitNormDecoder``) removes it, and ``after_optimizer_step`` puts the rows back on the unit
    sphere. Call both around ``optimizer.step()``.

    Args: as ``StandardSparseAutoencoder``; ``decoder_init_norm`` defaults to 1 (unit rows from the start).
    """

    def __init__(self, d_model, n_features, *, decoder_init_norm=1.0, **kwargs):
        super().__init__(d_model, n_features, decoder_init_norm=decoder_init_norm, **kwargs)
