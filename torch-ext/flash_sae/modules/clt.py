"""Cross-layer transcoders (CLTs) on the sparse path: TopK, BatchTopK and JumpReLU per layer.

A CLT over L layers: layer l's F latents read layer l's MLP input x_l and write to the MLP
outputs of every layer t >= l:

    a_l     = sigma_l(x_l @ W_enc[l].T + b_enc[l])                      [B, F] (a sparse code)
    y_hat_t = b_dec[t] + sum over l <= t of a_l @ W_dec[l -> t]         [B, D]
    loss    = sum over t of mean over B*D of (y_hat_t - y_t)^2  (+ the JumpReLU rule's penalty)

Layout: source layer l's decoders are one matrix ``W_dec[l]`` [F, (L - l) * D]: latent f owns
one row holding its L - l output vectors, W_dec[l -> t] = ``W_dec[l].view(F, L - l, D)[:, t - l]``
(circuit-tracer's ``W_dec_{l}`` [F, L - l, D], flattened). So each active (l, f) entry decodes
to all its outputs from one gather (``sparse_decode`` / ``varlen_sparse_decode`` over
``W_dec[l]``), and the backward's segmented pass writes each row once.

The step composes registered ops: per layer, the encode with its sparse backward (``topk_encode``,
``batchtopk_encode``, ``jumprelu_encode``), the decode into the concatenated outputs, and the
squared error on [B, L, D]. Autograd keeps only codes, inputs and [B, L, D] tensors: nothing
[B, F]; every weight gradient is a CSR segmented sum (deterministic, no float atomics).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F_

from .._validation import check_clt_decoder, check_clt_inputs, check_int, is_real
from ..ops.batchtopk.batchtopk_encode import batchtopk_encode
from ..ops.decode.sparse_decode import sparse_decode
from ..ops.decode.varlen_sparse_decode import varlen_sparse_decode
from ..ops.jumprelu.jumprelu_encode import jumprelu_encode
from ..ops.topk.topk_encode import topk_encode
from ..results import CrossLayerTranscoderStep, SparseCode, code_l0, fire_counts
from ._capacity import SeenCount, grown_capacity
from .base import _check_positive_int, _module_dtype


def gather_by_id(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``values[ids]`` ([F] float, ids [N] in [0, F)) as [N], with a deterministic adjoint: ``sparse_decode``
    of a one-entry-per-row code over the [F, 1] column, whose backward is a CSR segmented sum (a plain
    index's backward is a scatter-add)."""
    ones = values.new_ones(ids.numel(), 1)
    return sparse_decode(ones, ids.reshape(-1, 1), values.unsqueeze(1), validate=False).squeeze(1)


def decode_layer_codes(codes: list, W_dec, b_dec: torch.Tensor, B: int) -> torch.Tensor:
    """ys_hat [B, L, D] fp32 from each source layer's code (local ids): b_dec [L, D], then each layer's
    ``sparse_decode`` / ``varlen_sparse_decode`` over its decoder W_dec[l] ([F, (L - l) * D], or circuit-tracer's
    [F, L - l, D]) added in place to its targets' slice (L(L+1)/2 [B, D] adds in all), in fp32."""
    L, D = b_dec.shape
    y_hat = b_dec.float().expand(B, L, D).clone()
    for layer, code in enumerate(codes):
        w = W_dec[layer].reshape(W_dec[layer].shape[0], -1)
        if code.row_offsets is None:
            out = sparse_decode(code.vals, code.indices, w, validate=False)
        else:
            out = varlen_sparse_decode(code.vals, code.indices, code.row_offsets, w, validate=False)
        y_hat[:, layer:] += out.view(B, L - layer, D)
    return y_hat


def topk_clt_forward(host, xs: torch.Tensor) -> torch.Tensor:
    """ys_hat [B, L, D] in xs's dtype of a TopK CLT held by ``host``'s attributes: ``W_enc`` [L, F, D], ``b_enc``
    [L, F], ``W_dec`` (L matrices [F, (L - l) * D] or [F, L - l, D]), ``b_dec`` [L, D] and an int ``k``, from
    xs [B, L, D]. Differentiable (the encode's and the decodes' sparse backwards); shared with the hub layer."""
    codes = [SparseCode(*topk_encode(x, W, b, host.k)) for x, W, b in
             zip(xs.unbind(1), host.W_enc.unbind(0), host.b_enc.unbind(0))]  # fmt: skip
    return decode_layer_codes(codes, host.W_dec, host.b_dec, xs.shape[0]).to(xs.dtype)


class CrossLayerTranscoderBase(nn.Module):
    """What the CLT modules share: parameters, initialisation, the step's composition, dead-latent counts.

    Parameters (circuit-tracer's names): ``W_enc`` [L, F, D], ``b_enc`` [L, F], ``W_dec`` (a
    ``ParameterList``; ``W_dec[l]`` [F, (L - l) * D], see the module docstring), ``b_dec`` [L, D].
    Initialisation as Anthropic's CLTs and decode-clt: W_enc uniform in +-1/sqrt(F), W_dec uniform
    in +-1/sqrt(L * D), biases zero (drawn in fp64 from ``seed``'s generator, then cast).

    Dead latents: ``tokens_since_fired`` [L * F] int64 (layer l's latent f at l * F + f), updated
    on the device by ``loss`` in training mode; ``dead_mask()`` reads it (``> dead_window_tokens``).

    No decoder-norm constraint: ``before_optimizer_step`` / ``after_optimizer_step`` do nothing.
    The JumpReLU rule's penalty weights each latent by its decoder norm, which is what keeps the
    norm from trading against the activation (as in Anthropic's and decode-clt's training); the
    TopK and BatchTopK rules rank encoder pre-activations, which the decoder's scale does not
    touch, and decode-clt trains them with free decoders too.
    """

    def __init__(self, d_model, n_features, *, n_layers, dtype=None, device=None, seed=None,
                 dead_window_tokens=10_000_000):  # fmt: skip
        super().__init__()
        dtype = _module_dtype(dtype)
        self.d_model = _check_positive_int("d_model", d_model)
        self.n_features = _check_positive_int("n_features", n_features)
        self.n_layers = _check_positive_int("n_layers", n_layers)
        self.dead_window_tokens = _check_positive_int("dead_window_tokens", dead_window_tokens)
        L, F, D = self.n_layers, self.n_features, self.d_model
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        factory = {"dtype": dtype, "device": device}

        def uniform(bound, *shape):
            w = torch.rand(*shape, dtype=torch.float64, generator=g) * (2 * bound) - bound
            return nn.Parameter(w.to(**factory))

        self.W_enc = uniform(1 / math.sqrt(F), L, F, D)
        self.b_enc = nn.Parameter(torch.zeros(L, F, **factory))
        self.W_dec = nn.ParameterList([uniform(1 / math.sqrt(L * D), F, (L - layer) * D) for layer in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, D, **factory))
        self.register_buffer("tokens_since_fired", torch.zeros(L * F, dtype=torch.int64, device=device))

    # The step ------------------------------------------------------------------------

    def _encode_layer(self, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> SparseCode:
        """One layer's code of x [B, D] through its encoder W_enc [F, D], b_enc [F] (differentiable vals,
        latent ids in [0, F))."""
        raise NotImplementedError

    def _sparsity_terms(self, codes: list) -> dict:
        """The rule's extra loss terms and result fields (``sparsity_loss``, ``count``, ``overflow``)."""
        return {}

    def _decode_codes(self, codes: list, B: int) -> torch.Tensor:
        return decode_layer_codes(codes, self.W_dec, self.b_dec, B)

    def _layer_inputs(self, xs: torch.Tensor) -> list:
        """(x_l, W_enc[l], b_enc[l]) per layer, through ``unbind``: the backward stacks each gradient once
        (indexing layer by layer would add L full-size zero-padded gradients)."""
        return list(zip(xs.unbind(1), self.W_enc.unbind(0), self.b_enc.unbind(0)))

    def _codes(self, xs: torch.Tensor, exact: bool = False) -> list:
        """Each layer's code; ``exact`` (inference): a fixed-capacity code is sized so nothing is dropped."""
        return [self._encode_layer(*inputs) for inputs in self._layer_inputs(xs)]

    def _step(self, xs: torch.Tensor, ys: torch.Tensor) -> CrossLayerTranscoderStep:
        B, L, F = xs.shape[0], self.n_layers, self.n_features
        codes = self._codes(xs)
        err = (self._decode_codes(codes, B) - ys.float()).pow(2)  # [B, L, D]
        layer_sq = err.sum((0, 2))
        layer_var = ys.detach().float().var(0, correction=B - 1).sum(-1)  # each target's total variance
        extra = self._sparsity_terms(codes)
        loss = layer_sq.sum() / (B * self.d_model)
        if extra.get("sparsity_loss") is not None:
            loss = loss + extra["sparsity_loss"]
            extra["sparsity_loss"] = extra["sparsity_loss"].detach()
        layer_sq = layer_sq.detach()
        layer_l0 = torch.stack([code_l0(code.vals, B) for code in codes])
        code = self._global_code(codes, B)
        return CrossLayerTranscoderStep(
            loss=loss, mse=layer_sq.sum() / err.numel(), fvu=layer_sq.sum() / layer_var.sum(), l0=layer_l0.sum(),
            fire_counts=fire_counts(code.vals, code.indices.clamp_min(0), L * F), code=code,
            layer_fvu=layer_sq / layer_var, layer_l0=layer_l0, **extra,
        )  # fmt: skip

    def _global_code(self, codes: list, B: int) -> SparseCode:
        """One code over the L * F latents (layer l's latent f at l * F + f), detached."""
        F = self.n_features
        if codes[0].row_offsets is None:  # [B, K] per layer: side by side
            vals = torch.cat([c.vals.detach() for c in codes], 1)
            ids = torch.cat([c.indices + layer * F for layer, c in enumerate(codes)], 1)
            return SparseCode(vals, ids)
        # variable length: row b holds each layer's row-b entries in layer order (so by global id); the
        # slots past each layer's last row go to the end, as a fixed-capacity code's padding
        counts = torch.stack([c.row_offsets.diff() for c in codes])  # [L, B]
        row_offsets = F_.pad(counts.sum(0).cumsum(0), (1, 0))
        before = counts.cumsum(0) - counts  # entries of the earlier layers in each row
        total = sum(c.vals.numel() for c in codes)
        vals = codes[0].vals.new_zeros(total)
        ids = torch.full((total,), -1, dtype=torch.int64, device=vals.device)
        tail = row_offsets[-1]
        for layer, c in enumerate(codes):
            n = c.vals.numel()
            slot = torch.arange(n, device=vals.device)
            row = torch.searchsorted(c.row_offsets, slot, right=True) - 1
            used = (slot >= c.row_offsets[0]) & (slot < c.row_offsets[-1]) & (c.indices >= 0)
            rowc = row.clamp(0, B - 1)
            dest = row_offsets[rowc] + before[layer, rowc] + slot - c.row_offsets[rowc]
            unused_rank = torch.cumsum((~used).long(), 0) - 1
            dest = torch.where(used, dest, tail + unused_rank)
            tail = tail + (~used).sum()
            vals = vals.index_put((dest,), torch.where(used, c.vals.detach(), 0))
            ids = ids.index_put((dest,), torch.where(used, c.indices + layer * F, -1))
        return SparseCode(vals, ids, row_offsets)

    # Public API ----------------------------------------------------------------------

    def _check_inputs(self, **tensors) -> None:
        for name, t in tensors.items():
            check_clt_inputs(name, t, self.n_layers, self.d_model, self.W_enc)

    def loss(self, xs: torch.Tensor, ys: torch.Tensor) -> CrossLayerTranscoderStep:
        """The training step on xs (each layer's MLP input) and ys (each layer's MLP output), [B, L, D] each
        in the parameters' dtype: a ``CrossLayerTranscoderStep`` (``STEP_FIELDS`` first, then ``layer_fvu``
        and ``layer_l0`` [L] fp32). ``loss`` is differentiable in every parameter and in xs and ys. In
        training mode it also updates the dead-latent counts on the device. No host sync."""
        self._check_inputs(xs=xs, ys=ys)
        check_clt_decoder(self.W_dec, self.n_features, self.n_layers, self.d_model, self.W_enc)
        step = self._step(xs, ys)
        self._after_step(step, xs.shape[0])
        return step

    @torch.no_grad()
    def _after_step(self, step, rows: int) -> None:
        if self.training:
            self.tokens_since_fired.add_(rows).masked_fill_(step.fire_counts > 0, 0)

    def dead_mask(self) -> torch.Tensor:
        """[L * F] bool: the latents silent for more than ``dead_window_tokens`` training tokens."""
        return self.tokens_since_fired > self.dead_window_tokens

    def dead_fraction(self) -> torch.Tensor:
        """0-d fp32: the share of dead latents (a device tensor)."""
        return self.dead_mask().float().mean()

    @torch.no_grad()
    def encode(self, xs: torch.Tensor) -> SparseCode:
        """The code of xs [B, L, D] over the L * F latents (layer l's latent f at l * F + f), as ``loss``'s."""
        self._check_inputs(xs=xs)
        return self._global_code(self._codes(xs, exact=True), xs.shape[0])

    @torch.no_grad()
    def decode(self, code: SparseCode) -> torch.Tensor:
        """ys_hat [B, L, D] from a code over the L * F latents (``encode``'s, or any ``SparseCode`` with ids
        in [0, L * F); -1 marks an empty slot)."""
        F = self.n_features
        per_layer = []
        for layer in range(self.n_layers):
            mine = (code.indices >= layer * F) & (code.indices < (layer + 1) * F)
            vals = torch.where(mine, code.vals, 0)
            ids = torch.where(mine, code.indices - layer * F, 0)
            per_layer.append(SparseCode(vals, ids, code.row_offsets))
        B = code.vals.shape[0] if code.row_offsets is None else code.row_offsets.shape[0] - 1
        return self._decode_codes(per_layer, B).to(self.W_enc.dtype)

    @torch.no_grad()
    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """ys_hat [B, L, D] from xs [B, L, D] (no gradients: train with ``loss``)."""
        self._check_inputs(xs=xs)
        return self._decode_codes(self._codes(xs, exact=True), xs.shape[0]).to(self.W_enc.dtype)

    def before_optimizer_step(self) -> None:
        """Nothing: the CLTs keep no decoder-norm constraint (see the class docstring)."""

    def after_optimizer_step(self) -> None:
        """Nothing, but the JumpReLU rule's (none here; see the class docstring)."""

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_features={self.n_features}, n_layers={self.n_layers}"

    # circuit-tracer's format -------------------------------------------------------------

    def _threshold(self) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    @torch.no_grad()
    def to_circuit_tracer(self, activation_scale: float = 1.0) -> dict:
        """circuit-tracer's CLT files: ``{file name: {tensor name: tensor}}``, CPU tensors in the parameters'
        dtype, to write with ``safetensors.torch.save_file`` into one directory that
        ``circuit_tracer.transcoder.cross_layer_transcoder.load_clt`` reads: ``W_enc_{l}.safetensors``
        (``W_enc_{l}`` [F, D], ``b_enc_{l}`` [F], ``b_dec_{l}`` [D], and ``threshold_{l}`` [F] for a
        JumpReLU CLT) and ``W_dec_{l}.safetensors`` (``W_dec_{l}`` [F, L - l, D]). circuit-tracer
        encodes without a TopK rule (ReLU, or JumpReLU with the threshold); see docs/architectures/clt.md.

        ``activation_scale``: the factor c the module's inputs and targets were scaled by in training
        (xs_module = c * xs_raw, ys_module = c * ys_raw); it is folded in (W_enc * c, W_dec / c, b_dec / c;
        the pre-activations and thresholds are unchanged), so the files read and predict raw activations."""
        if not is_real(activation_scale) or not math.isfinite(activation_scale) or not activation_scale > 0:
            raise ValueError(f"activation_scale must be a finite number > 0, got {activation_scale!r}")
        c = float(activation_scale)
        L, F, D = self.n_layers, self.n_features, self.d_model
        theta = self._threshold()
        files = {}
        for layer in range(L):
            enc = {f"W_enc_{layer}": self.W_enc[layer] * c, f"b_enc_{layer}": self.b_enc[layer],
                   f"b_dec_{layer}": self.b_dec[layer] / c}  # fmt: skip
            if theta is not None:
                enc[f"threshold_{layer}"] = theta[layer].to(self.W_enc.dtype)
            files[f"W_enc_{layer}.safetensors"] = {k: v.detach().cpu().contiguous() for k, v in enc.items()}
            w = (self.W_dec[layer].detach() / c).view(F, L - layer, D).cpu().contiguous()
            files[f"W_dec_{layer}.safetensors"] = {f"W_dec_{layer}": w}
        return files

    @classmethod
    def from_circuit_tracer(cls, tensors: dict, *args, **kwargs):
        """A module from circuit-tracer's CLT tensors, ``{name: tensor}`` (the union of its files' tensors,
        ``W_enc_{l}``, ``b_enc_{l}``, ``b_dec_{l}``, ``W_dec_{l}`` [F, L - l, D], ``threshold_{l}``) or its
        ``CrossLayerTranscoder``'s ``state_dict()``. ``args`` and ``kwargs`` are the constructor's (k,
        sparsity options, ``dtype``, ``device``); d_model, n_features and n_layers come from the tensors."""
        if "W_enc" in tensors:  # circuit-tracer's module state_dict
            L = tensors["W_enc"].shape[0]
            flat = {}
            for layer in range(L):
                flat[f"W_enc_{layer}"] = tensors["W_enc"][layer]
                flat[f"b_enc_{layer}"] = tensors["b_enc"][layer]
                flat[f"b_dec_{layer}"] = tensors["b_dec"][layer]
                flat[f"W_dec_{layer}"] = tensors[f"W_dec.{layer}"]
                if "activation_function.threshold" in tensors:
                    flat[f"threshold_{layer}"] = tensors["activation_function.threshold"][layer].reshape(-1)
            tensors = flat
        L = sum(1 for name in tensors if name.startswith("W_enc_"))
        if L == 0 or any(f"W_enc_{layer}" not in tensors for layer in range(L)):
            raise ValueError(f"tensors must hold W_enc_0 .. W_enc_{{L-1}}, got {sorted(tensors)[:8]}")
        F, D = tensors["W_enc_0"].shape
        module = cls(D, F, *args, n_layers=L, **kwargs)
        with torch.no_grad():
            for layer in range(L):
                w = tensors[f"W_dec_{layer}"]
                if tuple(w.shape) != (F, L - layer, D):
                    raise ValueError(f"W_dec_{layer} must have shape {(F, L - layer, D)}, got {tuple(w.shape)}")
                module.W_enc[layer].copy_(tensors[f"W_enc_{layer}"])
                module.b_enc[layer].copy_(tensors[f"b_enc_{layer}"])
                module.b_dec[layer].copy_(tensors[f"b_dec_{layer}"])
                module.W_dec[layer].copy_(w.reshape(F, -1))
            module._load_threshold([tensors.get(f"threshold_{layer}") for layer in range(L)])
        return module

    def _load_threshold(self, thresholds: list) -> None:
        return None


class TopKCrossLayerTranscoder(CrossLayerTranscoderBase):
    """A CLT whose layers each keep their k largest pre-activations per row (through a ReLU).

    Args:
        d_model: D, each layer's width (MLP input and output).
        n_features: F, latents per layer (L * F in all).
        k: active latents per row and layer, 1 <= k <= F.
        n_layers: L.
        dtype, device, seed, dead_window_tokens: as ``CrossLayerTranscoderBase``.

    ``loss(xs, ys)`` is the training step (the summed per-layer MSE); its code is [B, L * k].
    """

    def __init__(self, d_model, n_features, k, *, n_layers, **kwargs):
        super().__init__(d_model, n_features, n_layers=n_layers, **kwargs)
        check_int("k", k, 1, self.n_features, integral=True)
        self.k = int(k)

    def _encode_layer(self, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> SparseCode:
        vals, indices = topk_encode(x, W_enc, b_enc, self.k)
        return SparseCode(vals, indices)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"


class BatchTopKCrossLayerTranscoder(CrossLayerTranscoderBase):
    """A CLT whose layers each keep the int(k * B) largest ReLU'd pre-activations of the batch.

    Args:
        d_model, n_features, n_layers: D, F (per layer) and L.
        k: active latents per row and layer on average (int or float > 0).
        dtype, device, seed, dead_window_tokens: as ``CrossLayerTranscoderBase``.

    ``loss(xs, ys)`` is the training step (the summed per-layer MSE); its code is variable-length
    over the L * F latents.
    """

    def __init__(self, d_model, n_features, k, *, n_layers, **kwargs):
        super().__init__(d_model, n_features, n_layers=n_layers, **kwargs)
        if not is_real(k) or not 0 < k <= self.n_features:
            raise ValueError(f"k must be a number in (0, n_features={self.n_features}], got {k!r}")
        self.k = k

    def _encode_layer(self, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> SparseCode:
        return SparseCode(*batchtopk_encode(x, W_enc, b_enc, self.k))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"


class JumpReLUCrossLayerTranscoder(CrossLayerTranscoderBase):
    """A JumpReLU CLT with the tanh sparsity penalty of Anthropic's "Circuit Tracing" methods (2025).

        a_{l,f} = z * H(z - theta_{l,f}),  z = x_l @ W_enc[l, f] + b_enc[l, f]
        penalty = sparsity_coefficient * mean over B of sum over (l, f) of tanh(c * n_{l,f} * a_{l,f})

    ``n_{l,f} = ||W_dec[l][f]||`` is the L2 norm of the latent's whole decoder row, all L - l output vectors (as
    circuit-tracer's format and decode-clt's ``get_decoder_norms`` define it); c = ``tanh_scale``.
    theta = exp(log_threshold), ``log_threshold`` [L, F] fp32 (decode-clt's parameterisation); its
    gradient is the straight-through estimator with the rectangle kernel (``jumprelu_encode``).

    Args:
        d_model, n_features, n_layers: D, F (per layer) and L.
        sparsity_coefficient: lambda (>= 0), default 1e-3 (decode-clt's ``sparsity_lambda``).
        tanh_scale: c (> 0), default 1.0 (decode-clt's ``sparsity_c``).
        init_threshold: theta's initial value (> 0), default 0.03 (decode-clt's ``jumprelu_threshold``).
        bandwidth: the rectangle kernel's width (> 0), default 1.0 (decode-clt's).
        capacity_per_row: each layer's code size per row to start from (default F, which never
            overflows); it then follows 1.5x the largest per-layer count per row seen, without a
            host sync (``modules/_capacity.py``). ``step.overflow`` says when a step dropped entries.
            ``forward`` and ``encode`` (inference) count each layer's entries first, one host sync per
            layer, and drop nothing.
        dtype, device, seed, dead_window_tokens: as ``CrossLayerTranscoderBase``.
    """

    def __init__(self, d_model, n_features, *, n_layers, sparsity_coefficient=1e-3, tanh_scale=1.0,
                 init_threshold=0.03, bandwidth=1.0, capacity_per_row=None, **kwargs):  # fmt: skip
        super().__init__(d_model, n_features, n_layers=n_layers, **kwargs)
        if not is_real(sparsity_coefficient) or not sparsity_coefficient >= 0:
            raise ValueError(f"sparsity_coefficient must be a number >= 0, got {sparsity_coefficient!r}")
        for name, value in (("tanh_scale", tanh_scale), ("init_threshold", init_threshold), ("bandwidth", bandwidth)):
            if not is_real(value) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if capacity_per_row is not None:
            check_int("capacity_per_row", capacity_per_row, 1, 2**62, integral=True)
        self.sparsity_coefficient, self.tanh_scale = float(sparsity_coefficient), float(tanh_scale)
        self.bandwidth = float(bandwidth)
        self.capacity_per_row = min(int(capacity_per_row or self.n_features), self.n_features)
        init = torch.full((self.n_layers, self.n_features), math.log(init_threshold), dtype=torch.float32)
        self.log_threshold = nn.Parameter(init.to(self.W_enc.device))
        self._seen = SeenCount()
        self._capacity = None

    def threshold(self) -> torch.Tensor:
        """theta [L, F] fp32, differentiable in ``log_threshold``."""
        return self.log_threshold.exp()

    def _threshold(self) -> torch.Tensor:
        return self.threshold().detach()

    def _load_threshold(self, thresholds: list) -> None:
        if any(t is None for t in thresholds):
            raise ValueError("tensors must hold threshold_{l} for every layer to load a JumpReLU CLT")
        theta = torch.stack([t.reshape(-1).float() for t in thresholds]).to(self.log_threshold.device)
        self.log_threshold.copy_(theta.clamp_min(torch.finfo(torch.float32).tiny).log())

    def _codes(self, xs: torch.Tensor, exact: bool = False) -> list:
        if exact:  # inference: count each layer's entries first (a host sync per layer), then collect them all
            return self._counted_codes(xs)
        per_row = self._seen.poll()
        if per_row is not None:
            self.capacity_per_row = grown_capacity(per_row, self.n_features)
        self._capacity = min(xs.shape[0] * self.n_features, self.capacity_per_row * xs.shape[0])
        codes, self._counts = [], []
        for (x, W_enc, b_enc), theta in zip(self._layer_inputs(xs), self.threshold().unbind(0)):
            vals, indices, row_offsets, count = jumprelu_encode(
                x, W_enc, b_enc, theta, capacity=self._capacity, bandwidth=self.bandwidth
            )
            codes.append(SparseCode(vals, indices, row_offsets))
            self._counts.append(count)
        return codes

    def _counted_codes(self, xs: torch.Tensor) -> list:
        codes = []
        for (x, W_enc, b_enc), theta in zip(self._layer_inputs(xs), self.threshold().unbind(0)):
            count = jumprelu_encode(x, W_enc, b_enc, theta, capacity=1, bandwidth=self.bandwidth)[3]
            capacity = max(1, int(count))
            codes.append(SparseCode(*jumprelu_encode(x, W_enc, b_enc, theta, capacity=capacity,
                                                     bandwidth=self.bandwidth)[:3]))  # fmt: skip
        return codes

    def _sparsity_terms(self, codes: list) -> dict:
        B = codes[0].row_offsets.shape[0] - 1
        penalty = 0.0
        for layer, code in enumerate(codes):
            # [F] fp32, the norm of the latent's whole decoder row (accumulated in fp32, no fp32 copy of W_dec)
            norms = torch.linalg.vector_norm(self.W_dec[layer], dim=1, dtype=torch.float32)
            n = gather_by_id(norms, code.indices.clamp_min(0))
            penalty = penalty + torch.tanh(self.tanh_scale * n * code.vals.float()).sum()
        counts = torch.stack(self._counts)  # [L]: the entries each layer's code needed
        return dict(sparsity_loss=self.sparsity_coefficient * penalty / B, count=counts.sum(),
                    overflow=(counts > self._capacity).any())  # fmt: skip

    @torch.no_grad()
    def _after_step(self, step, rows: int) -> None:
        self._seen.record(torch.stack(self._counts).max(), rows)  # the fullest layer sizes the next capacity
        super()._after_step(step, rows)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", sparsity_coefficient={self.sparsity_coefficient}, tanh_scale={self.tanh_scale}, "
            f"bandwidth={self.bandwidth}"
        )
