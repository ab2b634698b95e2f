"""Training past one GPU: the TopK SAE with its latents sharded over ranks (torch.distributed), and
data-parallel replicas on top. ``sharded_topk_sae_step`` is the op; ``ShardedSparseAutoencoder``
the module; ``save_checkpoint`` / ``load_checkpoint`` move state between any layouts."""

from .layout import DATA_DIM, LATENT_DIM, LatentLayout, shard_bounds
from .sharded_sparse_autoencoder import ShardedSparseAutoencoder, load_checkpoint, save_checkpoint
from .sharded_topk_sae_step import sharded_decode, sharded_topk_encode, sharded_topk_sae_step

__all__ = [
    "DATA_DIM",
    "LATENT_DIM",
    "LatentLayout",
    "ShardedSparseAutoencoder",
    "load_checkpoint",
    "save_checkpoint",
    "shard_bounds",
    "sharded_decode",
    "sharded_topk_encode",
    "sharded_topk_sae_step",
]
