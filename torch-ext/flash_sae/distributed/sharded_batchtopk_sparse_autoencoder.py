"""The BatchTopK and Matryoshka BatchTopK SAEs with their latents split over ranks, replicas on top.

Each is the one-process module's parameters, initialisation and threshold rule (``BatchTopKSAEBase``) over
this rank's F_r latents, with the layout and checkpoints of ``ShardedLatents`` and the sharded steps
(``sharded_batchtopk_sae_step``). The inference threshold is a replicated buffer: every rank of a latent
group gets the same ``min_act`` from the step, and replicas take its minimum over the data group, so the
threshold is the same on every rank.
"""

import torch

from .._validation import check_prefix_sizes
from ..modules._geometry import FusedDecoderGeometry
from ..modules.base import BatchTopKSAEBase
from ..results import BatchTopKSAEStep, MatryoshkaSAEStep
from .sharded_batchtopk_sae_step import (
    sharded_batchtopk_encode,
    sharded_batchtopk_sae_step,
    sharded_matryoshka_batchtopk_sae_step,
)
from .sharded_sparse_autoencoder import ShardedLatents, shard_setup
from .sharded_topk_sae_step import sharded_decode


class ShardedBatchTopKSparseAutoencoder(ShardedLatents, FusedDecoderGeometry, BatchTopKSAEBase):
    """A BatchTopK SAE (``BatchTopKSparseAutoencoder``'s parameters, math and inference threshold) whose F
    latents are split over ranks.

    Args:
        d_model, n_features, k: D, F (over all shards) and the active latents per row on average (int or
            float): a batch of B rows keeps int(k * B) entries over all shards.
        mesh, group, seed: as ``ShardedSparseAutoencoder``'s.
        rescale_acts_by_decoder_norm, threshold_lr, decoder_init_norm, dtype, device, dead_window_tokens:
            as ``BatchTopKSparseAutoencoder``'s (no dead-latent loss: the dead set is not exchanged).

    Parameters (this rank's): ``W_enc`` [F_r, D], ``b_enc`` [F_r], ``W_dec`` [F_r, D]; ``b_dec`` [D] and the
    buffer ``threshold`` (0-d fp64) the same on every rank. ``loss(x)`` is the sharded step; in training
    mode it updates the threshold and the dead counts. ``encode`` (training mode: the batch rule) returns
    the whole code (vals [N], global ids [N], row_offsets [B + 1]); for the eval-mode threshold rule, load
    the checkpoint into the one-process module.
    """

    def __init__(self, d_model, n_features, k, *, mesh=None, group=None, seed=None, **kwargs):
        setup = shard_setup(n_features, mesh, group, kwargs.get("device"), seed)
        if kwargs.get("dead_loss") is not None:
            raise ValueError("dead_loss: the sharded BatchTopK SAEs take no dead-latent loss (use None)")
        if not isinstance(k, (int, float)) or isinstance(k, bool) or not 0 < k <= n_features:
            raise ValueError(f"k must be a number in (0, n_features={n_features}], got {k!r}")
        super().__init__(d_model, setup.n_local, min(k, setup.n_local), seed=setup.seed, **kwargs)
        self._set_shards(setup, n_features)
        self.k = k

    def _sparsity_repr(self) -> str:
        return f"k={self.k}, {self._shards_repr()}"

    def _step_args(self, x: torch.Tensor) -> tuple:
        return (x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k)

    def _step_options(self) -> dict:
        return dict(
            group=self.layout.latent_group, n_features=self.n_features,
            rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm,
        )  # fmt: skip

    def _step(self, x: torch.Tensor) -> BatchTopKSAEStep:
        """``sharded_batchtopk_sae_step`` with this module's shard and options."""
        return sharded_batchtopk_sae_step(*self._step_args(x), **self._step_options())

    def encode(self, x: torch.Tensor):
        """The whole code of ``x`` by the batch rule (vals, global ids, row_offsets), the same on every rank of
        the latent group; training mode only."""
        if not self.training:
            raise NotImplementedError(
                "encode in eval mode (the inference threshold's rule) is not implemented for the sharded module: "
                "save_checkpoint, then load it into the one-process module for inference"
            )
        return sharded_batchtopk_encode(*self._step_args(x), **self._step_options())

    def decode(self, vals: torch.Tensor, indices: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """x_hat [B, D] from a whole variable-length code with global ids."""
        return sharded_decode(
            vals, indices, self.W_dec, self.b_dec, group=self.layout.latent_group, n_features=self.n_features,
            row_offsets=row_offsets,
        )  # fmt: skip


class ShardedMatryoshkaBatchTopKSparseAutoencoder(ShardedBatchTopKSparseAutoencoder):
    """``ShardedBatchTopKSparseAutoencoder`` whose loss sums Matryoshka's nested prefix losses
    (``MatryoshkaBatchTopKSparseAutoencoder``'s). ``prefix_sizes``: m_1 < ... < m_G = n_features, global
    latent counts (a level may end inside a shard)."""

    def __init__(self, d_model, n_features, k, *, prefix_sizes, **kwargs):
        super().__init__(d_model, n_features, k, **kwargs)
        self.prefix_sizes = check_prefix_sizes(prefix_sizes, n_features)

    def _sparsity_repr(self) -> str:
        return f"k={self.k}, prefix_sizes={self.prefix_sizes}, {self._shards_repr()}"

    def _step(self, x: torch.Tensor) -> MatryoshkaSAEStep:
        """``sharded_matryoshka_batchtopk_sae_step`` with this module's shard and options."""
        return sharded_matryoshka_batchtopk_sae_step(*self._step_args(x), self.prefix_sizes, **self._step_options())
