"""Hub layers: stateless, forward-only replacements for a host module's ``forward``.

``kernels.kernelize`` swaps a host module's ``forward`` for one of these when
the host class is decorated with ``@use_kernel_forward_from_hub("<name>")``
and mapped to this repository. The layer reads the host's attributes; it
owns no state, so the host keeps its parameters, ``state_dict`` and optimiser.

``SparseAutoencoder``: the host needs ``W_enc`` [F, D], ``b_enc`` [F],
``W_dec`` [F, D], ``b_dec`` [D] and an int ``k`` (the layout of
``flash_sae.SparseAutoencoder``); ``forward(x)`` returns the reconstruction
``x_hat`` [B, D]. Both passes run flash-sae's kernels, so training through a
kernelized host gets the sparse backward too.
"""

import torch
from torch import nn

from .ops.decode.sparse_decode import sparse_decode
from .ops.topk.topk_encode import topk_encode


class SparseAutoencoder(nn.Module):
    """``x_hat = sparse_decode(*topk_encode(x))`` over the host's TopK SAE parameters."""

    W_enc: torch.Tensor  # [F, D], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D]
    b_dec: torch.Tensor  # [D]
    k: int

    can_torch_compile: bool = True
    has_backward: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, indices = topk_encode(x, self.W_enc, self.b_enc, self.k, self.b_dec)
        return sparse_decode(vals, indices, self.W_dec, self.b_dec)
