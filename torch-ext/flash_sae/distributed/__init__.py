"""Training past one GPU: SAEs with their latents sharded over ranks (torch.distributed), and
data-parallel replicas on top: the TopK, BatchTopK, Matryoshka BatchTopK, JumpReLU and standard SAEs, each
a step (``sharded_topk_sae_step``, ``sharded_batchtopk_sae_step``, ``sharded_matryoshka_batchtopk_sae_step``,
``sharded_jumprelu_sae_step``, ``sharded_standard_sae_step``) and a module (``ShardedSparseAutoencoder``,
``ShardedBatchTopKSparseAutoencoder``, ``ShardedMatryoshkaBatchTopKSparseAutoencoder``,
``ShardedJumpReLUSparseAutoencoder``, ``ShardedStandardSparseAutoencoder``); ``save_checkpoint`` /
``load_checkpoint`` move
state between any layouts and the one-process modules."""

from .layout import DATA_DIM, LATENT_DIM, LatentLayout, shard_bounds
from .sharded_auxk import gather_latents
from .sharded_batchtopk_sae_step import (
    sharded_batchtopk_encode,
    sharded_batchtopk_sae_step,
    sharded_matryoshka_batchtopk_sae_step,
)
from .sharded_batchtopk_sparse_autoencoder import (
    ShardedBatchTopKSparseAutoencoder,
    ShardedMatryoshkaBatchTopKSparseAutoencoder,
)
from .sharded_sparse_autoencoder import ShardedLatents, ShardedSparseAutoencoder, load_checkpoint, save_checkpoint
from .sharded_threshold_sae_steps import LatentShards, sharded_jumprelu_sae_step, sharded_standard_sae_step
from .sharded_threshold_sparse_autoencoders import ShardedJumpReLUSparseAutoencoder, ShardedStandardSparseAutoencoder
from .sharded_topk_sae_step import sharded_decode, sharded_topk_encode, sharded_topk_sae_step

__all__ = [
    "DATA_DIM",
    "LATENT_DIM",
    "LatentLayout",
    "LatentShards",
    "ShardedBatchTopKSparseAutoencoder",
    "ShardedJumpReLUSparseAutoencoder",
    "ShardedLatents",
    "ShardedMatryoshkaBatchTopKSparseAutoencoder",
    "ShardedSparseAutoencoder",
    "ShardedStandardSparseAutoencoder",
    "gather_latents",
    "load_checkpoint",
    "save_checkpoint",
    "shard_bounds",
    "sharded_batchtopk_encode",
    "sharded_batchtopk_sae_step",
    "sharded_decode",
    "sharded_jumprelu_sae_step",
    "sharded_matryoshka_batchtopk_sae_step",
    "sharded_standard_sae_step",
    "sharded_topk_encode",
    "sharded_topk_sae_step",
]
