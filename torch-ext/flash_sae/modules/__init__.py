"""``nn.Module``s over the ops, and their shared bases: ``SparseAutoencoder`` (TopK),
``BatchTopKSparseAutoencoder``, ``MatryoshkaBatchTopKSparseAutoencoder``, ``JumpReLUSparseAutoencoder``,
``StandardSparseAutoencoder``."""

from .base import (
    BatchTopKSAEBase,
    JumpReLUSAEBase,
    MatryoshkaSAEBase,
    SAEBase,
    SAELensInitBase,
    StandardSAEBase,
    TopKSAEBase,
)
from .batchtopk import BatchTopKSparseAutoencoder, MatryoshkaBatchTopKSparseAutoencoder
from .jumprelu import JumpReLUSparseAutoencoder
from .sparse_autoencoder import SparseAutoencoder
from .standard import StandardSparseAutoencoder

__all__ = [
    "BatchTopKSAEBase",
    "BatchTopKSparseAutoencoder",
    "JumpReLUSAEBase",
    "JumpReLUSparseAutoencoder",
    "MatryoshkaBatchTopKSparseAutoencoder",
    "MatryoshkaSAEBase",
    "SAEBase",
    "SAELensInitBase",
    "SparseAutoencoder",
    "StandardSAEBase",
    "StandardSparseAutoencoder",
    "TopKSAEBase",
]
