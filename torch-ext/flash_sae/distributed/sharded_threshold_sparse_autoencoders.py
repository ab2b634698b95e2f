"""The JumpReLU and standard SAEs with their latents split over ranks (``sharded_threshold_sae_steps``).

Each is the one-process module's parameters, initialisation and rules over this rank's F_r latents, with
the layout and checkpoints of ``ShardedLatents``. Each shard sizes its own code: ``capacity_per_row``
(of the shard's latents) grows from the counts the shard's steps return, read without a host sync
(``modules/_capacity.py``), starting at F_r (every latent: exact from the first step). The JumpReLU
threshold is a per-latent parameter, split by latent like the weights.
"""

import torch

from .._validation import is_int
from ..modules._capacity import LearnedCapacity, SeenCount, grown_capacity
from ..modules._geometry import FusedDecoderGeometry
from ..modules.base import JumpReLUSAEBase, StandardSAEBase
from ..results import JumpReLUSAEStep, StandardSAEStep
from .sharded_sparse_autoencoder import SHARDED, ShardedLatents, shard_setup
from .sharded_threshold_sae_steps import LatentShards, sharded_jumprelu_sae_step, sharded_standard_sae_step


class ShardCapacity(LearnedCapacity):
    """Mixin: a threshold SAE built on this rank's shard (the one-process module's constructor over F_r
    latents), and the shard's code size, learned from its own counts (``LearnedCapacity`` records them)."""

    def __init__(self, d_model, n_features, *, mesh=None, group=None, seed=None, capacity_per_row=None, **kwargs):
        setup = shard_setup(n_features, mesh, group, kwargs.get("device"), seed)
        super().__init__(d_model, setup.n_local, seed=setup.seed, **kwargs)
        self._set_shards(setup, n_features)
        self._init_capacity(capacity_per_row)

    def _sparsity_repr(self) -> str:
        return f"{super()._sparsity_repr()}, {self._shards_repr()}"

    def _init_capacity(self, capacity_per_row) -> None:
        if capacity_per_row is not None and (not is_int(capacity_per_row) or capacity_per_row < 1):
            raise ValueError(f"capacity_per_row must be a positive int or None, got {capacity_per_row!r}")
        self.capacity_per_row = min(int(capacity_per_row or self.n_local), self.n_local)
        self._seen = SeenCount()

    def _capacity(self, B: int) -> int:
        per_row = self._seen.poll()
        if per_row is not None:
            self.capacity_per_row = grown_capacity(per_row, self.n_local)
        return min(B * self.n_local, self.capacity_per_row * B)

    def _shards(self) -> LatentShards:
        return LatentShards(self.layout.latent_group, self.n_features)

    def encode(self, x: torch.Tensor, capacity: int | None = None):
        raise NotImplementedError(
            f"{type(self).__name__} has no encode: save_checkpoint, then load it into the one-process module"
        )

    def decode(self, *code):
        raise NotImplementedError(
            f"{type(self).__name__} has no decode: save_checkpoint, then load it into the one-process module"
        )


class ShardedJumpReLUSparseAutoencoder(ShardedLatents, ShardCapacity, FusedDecoderGeometry, JumpReLUSAEBase):
    """A JumpReLU SAE (``JumpReLUSparseAutoencoder``'s parameters, math and defaults) whose F latents are
    split over ranks.

    Args:
        d_model, n_features: D and F (over all shards).
        mesh, group, seed: as ``ShardedSparseAutoencoder``'s.
        capacity_per_row: the shard's starting code size per row (default F_r); it adapts.
        init_threshold, bandwidth, l0_coefficient, threshold_parameterization, decoder_init_norm, dtype,
            device, dead_window_tokens: as ``JumpReLUSparseAutoencoder``'s.

    Parameters (this rank's): ``W_enc`` [F_r, D], ``b_enc`` [F_r], ``W_dec`` [F_r, D], ``threshold`` (or
    ``log_threshold``) [F_r] fp32; ``b_dec`` [D] the same on every rank. ``loss(x)`` is
    ``sharded_jumprelu_sae_step``; for ``encode`` / ``decode``, load the checkpoint into the one-process
    module.
    """

    sharded_state = SHARDED + ("threshold", "log_threshold")

    def _step(self, x: torch.Tensor) -> JumpReLUSAEStep:
        """``sharded_jumprelu_sae_step`` with this module's shard, threshold and options."""
        return sharded_jumprelu_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.current_threshold(),
            capacity=self._capacity(x.shape[0]), shards=self._shards(), bandwidth=self.bandwidth,
            l0_coefficient=self.l0_coefficient,
        )  # fmt: skip


class ShardedStandardSparseAutoencoder(ShardedLatents, ShardCapacity, FusedDecoderGeometry, StandardSAEBase):
    """A standard SAE (``StandardSparseAutoencoder``'s parameters and math: ReLU code, L1 weighted by the
    decoder rows' norms) whose F latents are split over ranks; always the sparse step (the shard's
    capacity starts at every latent and adapts).

    Args:
        d_model, n_features: D and F (over all shards).
        mesh, group, seed: as ``ShardedSparseAutoencoder``'s.
        capacity_per_row: the shard's starting code size per row (default F_r); it adapts.
        l1_coefficient, decoder_init_norm, dtype, device, dead_window_tokens: as
            ``StandardSparseAutoencoder``'s.
    """

    def _step(self, x: torch.Tensor) -> StandardSAEStep:
        """``sharded_standard_sae_step`` with this module's shard and options."""
        return sharded_standard_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, capacity=self._capacity(x.shape[0]),
            shards=self._shards(), l1_coefficient=self.l1_coefficient,
        )  # fmt: skip
