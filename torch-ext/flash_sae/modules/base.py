"""What every TopK SAE module shares: parameters, their layout and initialisation, the decoder-norm steps.

``modules.SparseAutoencoder`` (the kernels) and ``reference.SparseAutoencoder``
(plain torch, the tests' twin) both subclass ``TopKSAEBase`` and differ only in
how ``encode``, ``decode`` and ``loss`` compute; so a ``state_dict`` moves
between them unchanged.
"""

import torch
from torch import nn


class TopKSAEBase(nn.Module):
    """Parameters ``W_enc`` [F, D], ``b_enc`` [F], ``W_dec`` [F, D] (one unit-norm row per latent), ``b_dec`` [D].

    Initialisation: W_dec rows drawn from a normal distribution (in fp64, from
    ``seed`` if given, else the global RNG) and scaled to unit norm, W_enc =
    W_dec (tied init), both biases zero. Subclasses define ``encode(x) ->
    (vals, indices)``, ``decode(vals, indices) -> x_hat`` and ``loss(x)``.
    """

    def __init__(self, d_model, n_features, k, *, dtype=None, device=None, seed=None):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise ValueError(f"n_features must be a positive int, got {n_features!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_features:
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

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_features={self.n_features}, k={self.k}, "
            f"dtype={self.W_dec.dtype}, device={self.W_dec.device}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat [B, D]."""
        return self.decode(*self.encode(x))

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
