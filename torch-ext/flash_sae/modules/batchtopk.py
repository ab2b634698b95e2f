"""``BatchTopKSparseAutoencoder``: a BatchTopK SAE trained with ``batchtopk_sae_step``.

Parameters, SAELens's initialisation, the decoder-norm rescaling flag and the inference
threshold come from ``modules.base.BatchTopKSAEBase``, which the plain-torch twin
``reference.BatchTopKSparseAutoencoder`` shares.
"""

import torch

from ..ops.batchtopk.batchtopk_sae_step import batchtopk_sae_step, matryoshka_batchtopk_sae_step
from ..primitives.gather import gather_rows
from ..primitives.select.preacts import batch_topk_preacts, threshold_preacts
from ..results import BatchTopKSAEStep, MatryoshkaSAEStep
from ._geometry import FusedDecoderGeometry
from .base import BatchTopKSAEBase, MatryoshkaSAEBase


@torch.no_grad()
def batchtopk_encode_code(sae, x: torch.Tensor, capacity: int | None = None, *, centred: bool = True):
    """A BatchTopK SAE's code of ``x`` (vals, indices, row_offsets) from ``sae``'s attributes: the batch
    rule in training mode, the threshold rule in eval mode (shared by the module and its hub layer).
    ``centred``: the encoder reads x - b_dec (an SAE); False reads x as it is (a transcoder)."""
    F = sae.W_enc.shape[0]
    centre = sae.b_dec if centred else None
    scale = sae.W_dec.detach().norm(dim=1) if sae.rescale_acts_by_decoder_norm else None
    if sae.training:
        _, vals, indices, row_offsets = batch_topk_preacts(
            x, sae.W_enc, sae.b_enc, int(sae.k * x.shape[0]), centre, scale
        )
        return vals, indices, row_offsets
    theta = sae.threshold.expand(F)
    if capacity is None:
        capacity = max(1, int(threshold_preacts(x, sae.W_enc, sae.b_enc, centre, theta, 0.0, 1, scale)[3]))
    vals, indices, row_offsets, _ = threshold_preacts(x, sae.W_enc, sae.b_enc, centre, theta, 0.0, capacity, scale)
    return torch.relu(vals), indices, row_offsets


@torch.no_grad()
def decode_code(sae, vals, indices, row_offsets) -> torch.Tensor:
    """x_hat [B, D] of a variable-length code through ``sae``'s decoder."""
    return gather_rows(vals, indices, sae.W_dec, sae.b_dec, row_offsets=row_offsets)


class BatchTopKSparseAutoencoder(FusedDecoderGeometry, BatchTopKSAEBase):
    """BatchTopK SAE (Bussmann, Leask, Nanda 2024), SAELens's training conventions by default.

    Args:
        d_model, n_features: D and F.
        k: active latents per row on average (int or float); a batch of B rows keeps int(k * B).
        rescale_acts_by_decoder_norm: rank pre * ||W_dec[f]|| (SAELens's default, True).
        threshold_lr: rate of the inference threshold's moving average (SAELens's 0.01).
        decoder_init_norm: decoder rows' norm at init (SAELens's 0.1); W_enc = W_dec.
        dtype, device, seed: of the parameters and their draw.
        dead_window_tokens: tokens without firing after which a latent counts as dead (10M; ``SAEBase``).
        dead_loss: None, ``"auxk"``, ``"ghost"`` or a ``DeadLatentLoss``, a dead-latent loss that
            ``loss`` adds in training mode (``DeadLossOptions``; the Matryoshka module takes none yet).

    ``loss(x)`` is the fused training step; in training mode it also updates ``threshold``
    and the dead-latent counts (``tokens_since_fired``) on the device. ``encode(x)`` returns a
    variable-length code (vals, indices, row_offsets): the batch rule in training mode, the
    threshold rule (pre * scale > threshold) in eval mode. ``encode``, ``decode`` and
    ``forward`` run without gradients: train with ``loss``.
    """

    supports_fused_optimizer = True  # flash_sae.FusedAdam: both weights' gradients come from the step's passes

    def _step(self, x: torch.Tensor, target: torch.Tensor | None = None) -> BatchTopKSAEStep:
        return batchtopk_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, target=target,
            rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm, dead_loss=self.step_dead_loss(),
        )  # fmt: skip

    def encode(self, x: torch.Tensor, capacity: int | None = None):
        """(vals, indices, row_offsets). Eval mode: ``capacity`` bounds the code (None: count first,
        one host sync); entries past it are dropped. Eval mode warns once if the inference threshold
        has not warmed up (``warn_if_threshold_cold``)."""
        self.warn_if_threshold_cold()
        return batchtopk_encode_code(self, x, capacity, centred=self.centres_input)

    def decode(self, vals: torch.Tensor, indices: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """x_hat [B, D] from a variable-length code."""
        return decode_code(self, vals, indices, row_offsets)


class MatryoshkaBatchTopKSparseAutoencoder(MatryoshkaSAEBase, BatchTopKSparseAutoencoder):
    """Matryoshka BatchTopK SAE: ``BatchTopKSparseAutoencoder`` whose loss sums nested prefix losses.

    Args: as ``BatchTopKSparseAutoencoder``, plus ``prefix_sizes`` m_1 < ... < m_G = F (SAELens's
    ``matryoshka_widths``). ``loss(x)`` is ``matryoshka_batchtopk_sae_step`` (and updates the
    inference threshold in training mode); ``encode``/``decode``/``forward`` are BatchTopK's.
    """

    def _step(self, x: torch.Tensor) -> MatryoshkaSAEStep:
        return matryoshka_batchtopk_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, self.prefix_sizes,
            rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm,
        )  # fmt: skip
