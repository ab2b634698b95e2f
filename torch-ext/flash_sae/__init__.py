"""flash-sae: Triton kernels for training TopK-family sparse autoencoders.

After the encoder, each input activates K of F latents, so decoding, the
reconstruction loss and the whole backward pass cost O(B*K*D) plus one write of
the dense [F, D] weight gradient. No [B, F] tensor is kept for the backward;
the encoder's pre-activations exist only chunk by chunk during the forward.
"""

from . import layers, reference
from .hierarchical_topk_sae_loss import hierarchical_topk_sae_loss
from .sparse_autoencoder import SparseAutoencoder
from .sparse_decode import sparse_decode
from .topk_encode import topk_encode
from .topk_sae_loss import topk_sae_loss
from .topk_sae_step import topk_sae_step

__all__ = [
    "SparseAutoencoder",
    "hierarchical_topk_sae_loss",
    "layers",
    "reference",
    "sparse_decode",
    "topk_encode",
    "topk_sae_loss",
    "topk_sae_step",
]
