"""``SparseAutoencoder``: a drop-in TopK SAE module whose every pass runs flash-sae's kernels.

Parameters, layout, initialisation and the decoder-norm steps come from
``modules.base.TopKSAEBase``, which the plain-torch twin
``reference.SparseAutoencoder`` shares, so a checkpoint moves between the two
unchanged and the tests compare them directly.
"""

import torch

from ..ops.decode.sparse_decode import sparse_decode
from ..ops.topk.topk_encode import topk_encode
from ..ops.topk.topk_sae_step import topk_sae_step
from ..results import TopKSAEStep
from ._geometry import FusedDecoderGeometry
from .base import TopKSAEBase


class SparseAutoencoder(FusedDecoderGeometry, TopKSAEBase):
    """TopK sparse autoencoder: ``x_hat = b_dec + sum_k relu(topk((x - b_dec) @ W_enc.T + b_enc)) W_dec``.

    Args:
        d_model: D, the width of the activations.
        n_features: F, the number of latents.
        k: active latents per input, 1 <= k <= F.
        dtype, device: of the parameters (fp32, bf16 or fp16).
        seed: optional seed for the initialisation (the global RNG otherwise).
        dead_window_tokens: training tokens without firing after which a latent counts as dead
            (default 10M; see ``modules.base.SAEBase``).
        dead_loss: None, ``"auxk"``, ``"ghost"`` or a ``DeadLatentLoss`` (its options), a dead-latent
            loss that ``loss`` adds in training mode (``DeadLossOptions``).

    Parameters: ``W_enc`` [F, D], ``b_enc`` [F], ``W_dec`` [F, D], ``b_dec`` [D].
    ``W_dec`` starts with unit-norm rows and ``W_enc`` as its copy (tied
    init); the biases start at zero. Call ``set_decoder_norm_to_unit_norm()``
    after each optimiser step to keep decoder rows at unit norm, and
    ``remove_gradient_parallel_to_decoder_directions()`` before it if you
    want the usual projected decoder gradient. ``loss`` in training mode updates the
    dead-latent counts ``tokens_since_fired`` (a buffer); ``dead_mask()`` and
    ``dead_fraction()`` read them on the device; ``resample_dead_(x, optimizer)``
    re-initialises the dead latents. ``loss(x)`` is the fused step (``topk_sae_step``): a
    ``TopKSAEStep``.
    """

    supports_fused_optimizer = True  # flash_sae.FusedAdam: both weights' gradients come from the step's passes

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vals [B, k] in the parameters' dtype, indices [B, k] int64), descending."""
        return topk_encode(x, self.W_enc, self.b_enc, self.k, self.b_dec if self.centres_input else None)

    def decode(self, vals: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x_hat [B, D] from a sparse code."""
        return sparse_decode(vals, indices, self.W_dec, self.b_dec)

    def _step(self, x: torch.Tensor, target: torch.Tensor | None = None) -> TopKSAEStep:
        return topk_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, target=target, dead_loss=self.step_dead_loss()
        )  # fmt: skip
