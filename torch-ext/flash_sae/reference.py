"""Plain-torch reference implementations shared by the tests, benchmarks and example.

Each function is the textbook dense-gather formula, differentiable by autograd.
Called on fp64 copies of the inputs it is the ground truth; called on the
inputs in their own dtype it measures the error torch itself makes in that
dtype, which is what flash-sae's tolerances are relative to.
"""

from typing import NamedTuple

import torch
from torch import nn


def sparse_decode(indices, vals, weight, bias=None):
    """x_hat[b] = bias + sum_k vals[b, k] * weight[indices[b, k]]; [B, D]."""
    x_hat = (vals.unsqueeze(-1) * weight[indices.long()]).sum(1)
    if bias is not None:
        x_hat = x_hat + bias
    return x_hat


def topk_sae_loss(indices, weight, vals, bias, target):
    """Mean over B*D of (sparse_decode - target)^2."""
    return (sparse_decode(indices, vals, weight, bias) - target).pow(2).mean()


def hierarchical_topk_sae_loss(indices, weight, vals, bias, target):
    """Mean over B*K*D of the squared error of every prefix reconstruction.

    Prefix j uses the first j+1 columns of ``indices``, in column order.
    """
    recon = bias + (vals.unsqueeze(-1) * weight[indices.long()]).cumsum(1)  # [B, K, D]
    return (recon - target.unsqueeze(1)).pow(2).mean()


# Encoder and the full TopK SAE step ------------------------------------------------


def topk_select(pre, k):
    """The top-k of each row of ``pre`` [B, F], by the tie rule flash-sae documents.

    Larger value first; equal values (and -0.0 == +0.0) go to the lower latent
    id. A stable descending sort states exactly that rule. Returns (values,
    indices), both [B, k], in descending order.
    """
    values, indices = torch.sort(pre, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def encoder_preacts(x, W_enc, b_enc, b_dec=None):
    """pre = (x - b_dec) @ W_enc.T + b_enc; [B, F], as ``nn.Linear`` computes it (one rounding)."""
    xc = x - b_dec if b_dec is not None else x
    return torch.addmm(b_enc, xc, W_enc.T)


def topk_encode(x, W_enc, b_enc, k, b_dec=None, indices=None):
    """vals = relu(top-k of the pre-activations) and their latent ids; ([B, k], [B, k] int64).

    With ``indices`` given, the selection is skipped and those latents are read
    instead: the tests use it to compare gradients at the kernel's own choice.
    """
    pre = encoder_preacts(x, W_enc, b_enc, b_dec)
    if indices is None:
        _, indices = topk_select(pre.detach(), k)
    return torch.relu(pre.gather(1, indices)), indices


def fraction_of_variance_unexplained(x, x_hat):
    """sum((x_hat - x)^2) / sum((x - mean_b x)^2), the FVU trainers log."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def fire_counts(indices, vals, F):
    """How many rows of the batch each latent fired in (a slot with value > 0); [F] int64.

    An integer scatter-add: exact, deterministic and free of host syncs.
    """
    fired = (vals.detach() > 0).reshape(-1).to(torch.int64)
    return torch.zeros(F, dtype=torch.int64, device=indices.device).index_add_(0, indices.reshape(-1).long(), fired)


class TopKSAEStep(NamedTuple):
    """What one TopK SAE step returns: the loss and what trainers log, all on device."""

    loss: torch.Tensor  # [] fp32: mean over B*D of the squared reconstruction error
    fvu: torch.Tensor  # [] fp32: fraction of variance unexplained
    fire_counts: torch.Tensor  # [F] int64: rows of this batch in which each latent fired (value > 0)
    vals: torch.Tensor  # [B, K]: the code's values (L0 is K)
    indices: torch.Tensor  # [B, K] int64: the code's latent ids


def topk_sae_step(x, W_enc, b_enc, W_dec, b_dec, k, indices=None):
    """Encode, decode and the MSE loss of a TopK SAE, densely: the ground truth for ``topk_sae_step``."""
    vals, indices = topk_encode(x, W_enc, b_enc, k, b_dec, indices=indices)
    x_hat = sparse_decode(indices, vals, W_dec, b_dec)
    loss = (x_hat - x).pow(2).mean()
    fvu = fraction_of_variance_unexplained(x.detach(), x_hat.detach())
    return TopKSAEStep(loss, fvu, fire_counts(indices, vals, W_dec.shape[0]), vals, indices)


# The module -------------------------------------------------------------------------


class SparseAutoencoder(nn.Module):
    """A TopK sparse autoencoder in plain PyTorch: the twin of ``flash_sae.SparseAutoencoder``.

    Parameters, in the layout common trainers use:
        W_enc [F, D], b_enc [F], W_dec [F, D] (one unit-norm row per latent), b_dec [D].
    Initialisation: W_dec rows drawn from a normal distribution and scaled to unit
    norm, W_enc = W_dec (tied init), both biases zero.
    """

    def __init__(self, d_model, n_features, k, *, dtype=None, device=None, seed=None):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(n_features, int) or n_features < 1:
            raise ValueError(f"n_features must be a positive int, got {n_features!r}")
        if not isinstance(k, int) or not 1 <= k <= n_features:
            raise ValueError(f"k must be an int in [1, n_features={n_features}], got {k!r}")
        self.d_model, self.n_features, self.k = d_model, n_features, k
        dtype = dtype or torch.get_default_dtype()
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(n_features, d_model, generator=g, dtype=torch.float64)
        w = w / w.norm(dim=1, keepdim=True)
        factory = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(w.clone().to(**factory))
        self.b_enc = nn.Parameter(torch.zeros(n_features, **factory))
        self.W_dec = nn.Parameter(w.to(**factory))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **factory))

    def encode(self, x):
        """(vals, indices), each [B, k]."""
        return topk_encode(x, self.W_enc, self.b_enc, self.k, self.b_dec)

    def decode(self, vals, indices):
        """x_hat [B, D] from a sparse code."""
        return sparse_decode(indices, vals, self.W_dec, self.b_dec)

    def forward(self, x):
        """The reconstruction x_hat [B, D]."""
        return self.decode(*self.encode(x))

    def loss(self, x):
        """A ``TopKSAEStep``: the MSE loss (differentiable) and the logged statistics."""
        return topk_sae_step(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self):
        """Rescales every decoder row to unit L2 norm (call after each optimiser step)."""
        norm = self.W_dec.float().norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        self.W_dec.copy_((self.W_dec.float() / norm).to(self.W_dec.dtype))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self):
        """Projects out of W_dec.grad its component along each (unit-norm) decoder row."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec.float()
        g = self.W_dec.grad.float()
        g -= (g * w).sum(1, keepdim=True) * w / w.pow(2).sum(1, keepdim=True).clamp_min(1e-30)
        self.W_dec.grad.copy_(g.to(self.W_dec.grad.dtype))
