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

``BatchTopKSparseAutoencoder`` (also for Matryoshka hosts) and
``JumpReLUSparseAutoencoder`` are forward-only (``has_backward = False``: train
with the modules' ``loss``, which is the fused step); ``forward(x)`` returns
``x_hat`` as the modules' ``forward`` does. BatchTopK hosts need the four
weights, ``k``, ``rescale_acts_by_decoder_norm`` and the inference
``threshold`` (0-d); in training mode the batch rule selects, in eval mode the
threshold. JumpReLU hosts need the four weights and ``threshold`` [F] (or
``log_threshold``). ``StandardSparseAutoencoder`` (the ReLU + L1 SAE) is forward-only too;
its hosts need the four weights. ``GatedSparseAutoencoder`` is forward-only too; its hosts need
``W_enc``, ``b_gate``, ``r_mag``, ``b_mag``, ``W_dec`` and ``b_dec``. These eval-mode codes are
sized by counting first, one host sync per call (this is inference).

The transcoders (``TopKTranscoder``, ``BatchTopKTranscoder``, ``JumpReLUTranscoder``,
``StandardTranscoder``): the hosts of the matching SAE layers, with ``W_enc`` [F, D_in] read as it
is (no ``x - b_dec``), ``W_dec`` [F, D_out] and ``b_dec`` [D_out], and optionally ``W_skip``
[D_out, D_in] (absent or None: no skip term); ``forward(x)`` returns y_hat [B, D_out], as the
modules' ``forward`` does. ``TopKTranscoder`` has the TopK layer's backward; the others are
forward-only.

``TopKCrossLayerTranscoder``: the host needs ``W_enc`` [L, F, D], ``b_enc`` [L, F], ``W_dec`` (L
matrices, [F, (L - l) * D] or circuit-tracer's [F, L - l, D]), ``b_dec`` [L, D] and an int ``k``;
``forward(xs)`` maps every layer's MLP input xs [B, L, D] to the MLP outputs ys_hat [B, L, D], with
flash-sae's backward.

The crosscoder layers (``TopKCrosscoder``, which trains, and the forward-only
``BatchTopKCrosscoder``, ``StandardCrosscoder``, ``JumpReLUCrosscoder``) take ``x`` [B, L, D]
and read hosts in ``flash_sae``'s crosscoder layout (the four weights over the [L * D]
concatenation); they return xs_hat [B, L, D].
"""

import torch
from torch import nn

from .modules.batchtopk import batchtopk_encode_code, decode_code
from .modules.clt import topk_clt_forward
from .modules.crosscoder import (
    batchtopk_crosscoder_code,
    decode_layers,
    jumprelu_crosscoder_code,
    standard_crosscoder_code,
)
from .modules.gated import gated_encode_code
from .modules.jumprelu import jumprelu_encode_code
from .modules.standard import standard_encode_code
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


class BatchTopKSparseAutoencoder(nn.Module):
    """``x_hat`` of a BatchTopK (or Matryoshka BatchTopK) host, as ``flash_sae.BatchTopKSparseAutoencoder.forward``."""

    can_torch_compile: bool = False
    has_backward: bool = False

    W_enc: torch.Tensor  # [F, D], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D]
    b_dec: torch.Tensor  # [D]
    k: float
    rescale_acts_by_decoder_norm: bool
    threshold: torch.Tensor  # [] inference threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_code(self, *batchtopk_encode_code(self, x))


class JumpReLUSparseAutoencoder(nn.Module):
    """``x_hat`` of a JumpReLU host, as ``flash_sae.JumpReLUSparseAutoencoder.forward``."""

    can_torch_compile: bool = False
    has_backward: bool = False

    W_enc: torch.Tensor  # [F, D], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D]
    b_dec: torch.Tensor  # [D]
    threshold: torch.Tensor  # [F] (or log_threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_code(self, *jumprelu_encode_code(self, x))


class StandardSparseAutoencoder(nn.Module):
    """``x_hat`` of a standard (ReLU) host, as ``flash_sae.StandardSparseAutoencoder.forward``."""

    can_torch_compile: bool = False
    has_backward: bool = False

    W_enc: torch.Tensor  # [F, D], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D]
    b_dec: torch.Tensor  # [D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_code(self, *standard_encode_code(self, x))


class GatedSparseAutoencoder(nn.Module):
    """``x_hat`` of a Gated host, as ``flash_sae.GatedSparseAutoencoder.forward``."""

    can_torch_compile: bool = False
    has_backward: bool = False

    W_enc: torch.Tensor  # [F, D], borrowed from the host module
    b_gate: torch.Tensor  # [F]
    r_mag: torch.Tensor  # [F]
    b_mag: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D]
    b_dec: torch.Tensor  # [D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_code(self, *gated_encode_code(self, x))


# Transcoders --------------------------------------------------------------------------------------------


def _plus_skip(host, x: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """y_hat + x @ W_skip.T where the host has a skip connection (``W_skip`` not None), else y_hat."""
    W_skip = getattr(host, "W_skip", None)
    return y_hat if W_skip is None else torch.addmm(y_hat, x, W_skip.T)


class TopKTranscoder(nn.Module):
    """``y_hat`` of a TopK transcoder host, as ``flash_sae.TopKTranscoder.forward`` (with its backward)."""

    W_enc: torch.Tensor  # [F, D_in], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D_out]
    b_dec: torch.Tensor  # [D_out]
    W_skip: torch.Tensor | None  # [D_out, D_in] or absent
    k: int

    can_torch_compile: bool = True
    has_backward: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, indices = topk_encode(x, self.W_enc, self.b_enc, self.k)
        return _plus_skip(self, x, sparse_decode(vals, indices, self.W_dec, self.b_dec))


class BatchTopKTranscoder(nn.Module):
    """``y_hat`` of a BatchTopK transcoder host, as ``flash_sae.BatchTopKTranscoder.forward``."""

    can_torch_compile: bool = False
    has_backward: bool = False

    W_enc: torch.Tensor  # [F, D_in], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D_out]
    b_dec: torch.Tensor  # [D_out]
    W_skip: torch.Tensor | None  # [D_out, D_in] or absent
    k: float
    rescale_acts_by_decoder_norm: bool
    threshold: torch.Tensor  # [] inference threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _plus_skip(self, x, decode_code(self, *batchtopk_encode_code(self, x, centred=False)))


class JumpReLUTranscoder(nn.Module):
    """``y_hat`` of a JumpReLU transcoder host, as ``flash_sae.JumpReLUTranscoder.forward``."""

    can_torch_compile: bool = False
    has_backward: bool = False

    W_enc: torch.Tensor  # [F, D_in], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D_out]
    b_dec: torch.Tensor  # [D_out]
    W_skip: torch.Tensor | None  # [D_out, D_in] or absent
    threshold: torch.Tensor  # [F] (or log_threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _plus_skip(self, x, decode_code(self, *jumprelu_encode_code(self, x, centred=False)))


class StandardTranscoder(nn.Module):
    """``y_hat`` of a standard (ReLU) transcoder host, as ``flash_sae.StandardTranscoder.forward``."""

    can_torch_compile: bool = False
    has_backward: bool = False

    W_enc: torch.Tensor  # [F, D_in], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D_out]
    b_dec: torch.Tensor  # [D_out]
    W_skip: torch.Tensor | None  # [D_out, D_in] or absent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _plus_skip(self, x, decode_code(self, *standard_encode_code(self, x, centred=False)))


# Cross-layer transcoders -------------------------------------------------------------------------------


class TopKCrossLayerTranscoder(nn.Module):
    """``ys_hat`` [B, L, D] of a TopK cross-layer transcoder host from ``xs`` [B, L, D], as
    ``flash_sae.TopKCrossLayerTranscoder.forward`` (with gradients: the per-layer ``topk_encode`` and
    ``sparse_decode`` backwards). The host needs ``W_enc`` [L, F, D], ``b_enc`` [L, F], ``W_dec`` (L
    matrices, [F, (L - l) * D] or circuit-tracer's [F, L - l, D]), ``b_dec`` [L, D] and an int ``k``."""

    W_enc: torch.Tensor  # [L, F, D], borrowed from the host module
    b_enc: torch.Tensor  # [L, F]
    W_dec: list  # L tensors [F, (L - l) * D]
    b_dec: torch.Tensor  # [L, D]
    k: int

    can_torch_compile: bool = True
    has_backward: bool = True

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return topk_clt_forward(self, xs)


# Crosscoders: ``x`` is [B, L, D] (L layers of width D); the host's weights are over the [L * D]
# concatenation, as ``flash_sae.StandardCrosscoder``'s (W_enc [F, L * D], b_enc [F], W_dec [F, L * D],
# b_dec [L * D]); the encoder reads x uncentred. ``forward(x)`` returns xs_hat [B, L, D].


class TopKCrosscoder(nn.Module):
    """xs_hat [B, L, D] of a TopK crosscoder host (its four weights and an int ``k``), as
    ``flash_sae.TopKCrosscoder.forward``; differentiable, through flash-sae's sparse backward."""

    W_enc: torch.Tensor  # [F, L * D], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, L * D]
    b_dec: torch.Tensor  # [L * D]
    k: int

    can_torch_compile: bool = True
    has_backward: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        vals, indices = topk_encode(x.reshape(B, L * D), self.W_enc, self.b_enc, self.k)
        return sparse_decode(vals, indices, self.W_dec, self.b_dec).reshape(B, L, D)


class BatchTopKCrosscoder(nn.Module):
    """xs_hat [B, L, D] of a BatchTopK crosscoder host (its four weights, ``k``,
    ``rescale_acts_by_decoder_norm`` and the 0-d ``threshold``), as ``flash_sae.BatchTopKCrosscoder.forward``."""

    can_torch_compile: bool = False
    has_backward: bool = False

    W_enc: torch.Tensor  # [F, L * D], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, L * D]
    b_dec: torch.Tensor  # [L * D]
    k: float
    rescale_acts_by_decoder_norm: bool
    threshold: torch.Tensor  # [] inference threshold on relu(pre) * sum_l ||W_dec[f, l]||

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return decode_layers(self, *batchtopk_crosscoder_code(self, x.reshape(B, L * D), L), L)


class StandardCrosscoder(nn.Module):
    """xs_hat [B, L, D] of a standard (ReLU) crosscoder host (its four weights), as
    ``flash_sae.StandardCrosscoder.forward``."""

    can_torch_compile: bool = False
    has_backward: bool = False

    W_enc: torch.Tensor  # [F, L * D], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, L * D]
    b_dec: torch.Tensor  # [L * D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return decode_layers(self, *standard_crosscoder_code(self, x.reshape(B, L * D)), L)


class JumpReLUCrosscoder(nn.Module):
    """xs_hat [B, L, D] of a JumpReLU crosscoder host (its four weights and ``threshold`` [F], or
    ``log_threshold``), as ``flash_sae.JumpReLUCrosscoder.forward``."""

    can_torch_compile: bool = False
    has_backward: bool = False

    W_enc: torch.Tensor  # [F, L * D], borrowed from the host module
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, L * D]
    b_dec: torch.Tensor  # [L * D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return decode_layers(self, *jumprelu_crosscoder_code(self, x.reshape(B, L * D)), L)
