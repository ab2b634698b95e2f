"""``nn.Module``s over the ops: ``SparseAutoencoder`` (TopK), and their shared base."""

from .base import TopKSAEBase
from .sparse_autoencoder import SparseAutoencoder

__all__ = ["SparseAutoencoder", "TopKSAEBase"]
