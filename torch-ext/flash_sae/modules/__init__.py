"""``nn.Module``s over the ops, and their shared bases: ``SparseAutoencoder`` (TopK),
``BatchTopKSparseAutoencoder``, ``JumpReLUSparseAutoencoder``."""

from .base import BatchTopKSAEBase, JumpReLUSAEBase, SAEBase, TopKSAEBase
from .batchtopk import BatchTopKSparseAutoencoder
from .jumprelu import JumpReLUSparseAutoencoder
from .sparse_autoencoder import SparseAutoencoder

__all__ = [
    "BatchTopKSAEBase",
    "BatchTopKSparseAutoencoder",
    "JumpReLUSAEBase",
    "JumpReLUSparseAutoencoder",
    "SAEBase",
    "SparseAutoencoder",
    "TopKSAEBase",
]
