"""``nn.Module``s over the ops, and their shared bases: ``SparseAutoencoder`` (TopK),
``BatchTopKSparseAutoencoder``, ``MatryoshkaBatchTopKSparseAutoencoder``, ``JumpReLUSparseAutoencoder``,
``StandardSparseAutoencoder``, ``VanillaSparseAutoencoder``, ``GatedSparseAutoencoder``."""

from .base import (
    BatchTopKSAEBase,
    GatedSAEBase,
    JumpReLUSAEBase,
    MatryoshkaSAEBase,
    SAEBase,
    SAELensInitBase,
    StandardSAEBase,
    TopKSAEBase,
)
from .batchtopk import BatchTopKSparseAutoencoder, MatryoshkaBatchTopKSparseAutoencoder
from .gated import GatedSparseAutoencoder
from .jumprelu import JumpReLUSparseAutoencoder
from .sparse_autoencoder import SparseAutoencoder
from .standard import StandardSparseAutoencoder, VanillaSparseAutoencoder

__all__ = [
    "BatchTopKSAEBase",
    "BatchTopKSparseAutoencoder",
    "GatedSAEBase",
    "GatedSparseAutoencoder",
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
    "VanillaSparseAutoencoder",
]
