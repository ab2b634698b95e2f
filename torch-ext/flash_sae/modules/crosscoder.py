"""Crosscoders (Lindsey et al. 2024, "Sparse crosscoders for cross-layer features and model diffing"):
one latent space read from and written to L layers (or L models' same layer), on the sparse path.

    pre     = sum_l W_enc[l] x_l + b_enc                  x_l [D]: layer l's activations
    f       = the code of pre (ReLU, TopK, BatchTopK or JumpReLU)
    x_hat_l = W_dec[l] f + b_dec[l]
    loss    = the squared error summed over the layers, + the sparsity term; where a decoder norm
              weighs it (the standard penalty, BatchTopK's ranking), the norm is sum_l ||W_dec[f, l]||,
              the sum of the per-layer norms, not the norm of the concatenated row

With xs [B, L, D] flattened to x [B, L * D], that is exactly an SAE over the concatenation whose
encoder reads x uncentred, the steps' ``target=x`` path: so each module here is an SAE module of
width L * D whose step runs with ``target=x`` and ``crosscoder=CrosscoderLayers(L)`` (where a
decoder norm counts, it is the sum of the per-layer norms). The layout: ``W_enc`` [F, L * D],
``W_dec`` [F, L * D] (row f: the L per-layer blocks W_dec[f, l] of D columns, layer-major),
``b_enc`` [F], ``b_dec`` [L * D]. ``to_dictionary_learning`` and ``from_dictionary_learning``
convert to and from dictionary_learning's ``CrossCoder`` layout (encoder.weight [L, D, F],
encoder.bias [F], decoder.weight [L, F, D], decoder.bias [L, D]).

What a crosscoder adds to its SAE module: ``loss(xs)`` and ``forward(xs)`` take [B, L, D]; the
encoder reads xs uncentred; each result adds ``layer_fvu`` [L], each layer's fraction of variance
unexplained (from the step's code, one extra decode of it without gradients: O(B * K * L * D)).
"""

import torch

from .._validation import check_same_device, check_same_dtype
from ..crosscoder_layers import CrosscoderLayers
from ..dead_latent_loss import DeadLatentLoss
from ..ops.batchtopk.batchtopk_sae_step import batchtopk_sae_step
from ..ops.decode.sparse_decode import sparse_decode
from ..ops.jumprelu.jumprelu_sae_step import jumprelu_sae_step
from ..ops.standard.standard_sae_step import standard_sae_step, standard_sae_step_dense
from ..ops.topk.topk_encode import topk_encode
from ..ops.topk.topk_sae_step import topk_sae_step
from ..primitives.gather import gather_residual, gather_rows
from ..primitives.select.preacts import batch_topk_preacts, threshold_preacts
from ..primitives.step_backward import grouped_row_norms
from ..results import (
    BatchTopKCrosscoderStep,
    JumpReLUCrosscoderStep,
    StandardCrosscoderStep,
    TopKCrosscoderStep,
    layer_fvu,
)
from .base import _check_positive_int
from .batchtopk import BatchTopKSparseAutoencoder
from .jumprelu import JumpReLUSparseAutoencoder
from .sparse_autoencoder import SparseAutoencoder
from .standard import StandardSparseAutoencoder


def threshold_code(x, W_enc, b_enc, theta, capacity, scale=None):
    """The entries of the uncentred pre-activations above ``theta`` (pre * scale > theta with ``scale``) as
    a variable-length code (vals, indices, row_offsets); ``capacity`` None counts first (one host sync)."""
    if capacity is None:
        capacity = max(1, int(threshold_preacts(x, W_enc, b_enc, None, theta, 0.0, 1, scale)[3]))
    vals, indices, row_offsets, _ = threshold_preacts(x, W_enc, b_enc, None, theta, 0.0, capacity, scale)
    return vals, indices, row_offsets


# The codes of xs, from a crosscoder's attributes (its four weights over the [L * D] concatenation and the
# rule's own): the modules' ``encode`` and the hub layers share them. ``x`` is the flattened [B, L * D].


@torch.no_grad()
def standard_crosscoder_code(cc, x: torch.Tensor, capacity: int | None = None):
    """The active entries (pre > 0) as a variable-length code (vals, indices, row_offsets)."""
    zero = torch.zeros(cc.W_enc.shape[0], dtype=x.dtype, device=x.device)
    return threshold_code(x, cc.W_enc, cc.b_enc, zero, capacity)


@torch.no_grad()
def batchtopk_crosscoder_code(cc, x: torch.Tensor, n_layers: int, capacity: int | None = None):
    """``cc.k``, ``cc.rescale_acts_by_decoder_norm``, ``cc.threshold`` (0-d): the batch rule in training mode,
    the threshold rule (relu(pre) * sum_l ||W_dec[f, l]|| > threshold) in eval mode."""
    W_dec = cc.W_dec.detach()
    scale = grouped_row_norms(W_dec, n_layers).sum(1).to(W_dec.dtype) if cc.rescale_acts_by_decoder_norm else None
    if cc.training:
        _, vals, indices, row_offsets = batch_topk_preacts(x, cc.W_enc, cc.b_enc, int(cc.k * x.shape[0]), None, scale)
        return vals, indices, row_offsets
    theta = cc.threshold.expand(cc.W_enc.shape[0])
    vals, indices, row_offsets = threshold_code(x, cc.W_enc, cc.b_enc, theta, capacity, scale)
    return torch.relu(vals), indices, row_offsets


@torch.no_grad()
def jumprelu_crosscoder_code(cc, x: torch.Tensor, capacity: int | None = None):
    """The active entries (pre > threshold; ``cc.threshold`` [F] or ``cc.log_threshold``)."""
    theta = cc.threshold if hasattr(cc, "threshold") else cc.log_threshold.exp()
    return threshold_code(x, cc.W_enc, cc.b_enc, theta.detach().clamp_min(0), capacity)


@torch.no_grad()
def decode_layers(cc, vals, indices, row_offsets, n_layers: int) -> torch.Tensor:
    """xs_hat [B, L, D] of a variable-length code through ``cc``'s decoder."""
    x_hat = gather_rows(vals, indices, cc.W_dec, cc.b_dec, row_offsets=row_offsets)
    return x_hat.reshape(x_hat.shape[0], n_layers, -1)


class CrosscoderLayout:
    """The crosscoder's layer layout over an SAE module (mixin, listed first): ``n_layers`` L blocks of
    ``d_model`` D columns; the SAE module underneath has width L * D. ``d_model`` is D (per layer).

    ``block_init``: the decoder's per-layer blocks start at the module's ``decoder_init_norm`` each
    (dictionary_learning's ``norm_init_scale``, per layer and latent), W_enc tied to W_dec; False
    keeps the SAE module's whole-row init (the TopK crosscoder, whose rows stay at unit norm).
    """

    block_init = True
    saelens_architecture = None  # SAELens has no crosscoder: see to_dictionary_learning
    reconstructions = ("mse",)  # the reconstruction losses the module's step offers

    def __init__(self, d_model, n_features, *args, n_layers, reconstruction="mse", **kwargs):
        d_model = _check_positive_int("d_model", d_model)
        n_layers = _check_positive_int("n_layers", n_layers)
        if reconstruction not in self.reconstructions:
            raise ValueError(f"reconstruction must be one of {self.reconstructions}, got {reconstruction!r}")
        if kwargs.get("dead_loss") is not None:  # AuxK's default k_aux: half a layer's width, not of L * D
            F = _check_positive_int("n_features", n_features)
            kwargs["dead_loss"] = DeadLatentLoss.of(kwargs["dead_loss"]).with_defaults(d_model, F)
        super().__init__(d_model * n_layers, n_features, *args, **kwargs)
        self.d_model, self.n_layers, self.reconstruction = d_model, n_layers, reconstruction
        if self.block_init:
            self._init_blocks()

    @property
    def layers(self) -> CrosscoderLayers:
        """The steps' ``crosscoder`` argument: L layers, each layer's error norm with ``"layer_l2"``."""
        return CrosscoderLayers(self.n_layers, l2_loss=self.reconstruction == "layer_l2")

    @torch.no_grad()
    def _init_blocks(self) -> None:
        F, L = self.n_features, self.n_layers
        w = self.W_dec.double()
        row_norm = w.norm(dim=1)  # the SAE module's decoder_init_norm
        blocks = w.reshape(F, L, -1)
        blocks = blocks / blocks.norm(dim=2, keepdim=True).clamp_min(1e-30) * row_norm[:, None, None]
        self.W_dec.copy_(blocks.reshape(F, -1))
        self.W_enc.copy_(blocks.reshape(F, -1))

    def resample_dead_(self, *args, **kwargs):
        """Not adapted to crosscoders yet (the SAE modules' resampling reads [N, D] inputs)."""
        raise NotImplementedError(
            f"{type(self).__name__}.resample_dead_: resampling is not adapted to crosscoders yet; use a "
            "dead-latent loss (dead_loss='auxk' on the TopK and BatchTopK crosscoders)"
        )

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, reconstruction={self.reconstruction!r}, {super().extra_repr()}"

    def flatten_layers(self, xs: torch.Tensor) -> torch.Tensor:
        """xs [B, L, D] (the parameters' dtype and device) as the [B, L * D] concatenation; a ValueError
        naming ``xs`` otherwise."""
        L, D = self.n_layers, self.d_model
        if not isinstance(xs, torch.Tensor) or xs.ndim != 3 or tuple(xs.shape[1:]) != (L, D) or xs.shape[0] < 1:
            raise ValueError(
                f"xs must be a [B, n_layers, d_model] = [B, {L}, {D}] tensor with B >= 1, got "
                f"{tuple(xs.shape) if isinstance(xs, torch.Tensor) else type(xs).__name__}"
            )
        check_same_dtype("W_enc", self.W_enc, xs=xs)
        check_same_device(W_enc=self.W_enc, xs=xs)
        return xs.reshape(xs.shape[0], L * D)

    def loss(self, xs: torch.Tensor):
        """The fused training step on xs [B, L, D]: the SAE step over the concatenation, read uncentred,
        then ``layer_fvu`` [L]. Training mode also keeps the module's state on the device (as the SAE
        module's ``loss``). No host sync."""
        x = self.flatten_layers(xs)
        step = super().loss(x)
        return self.crosscoder_result(**step._asdict(), layer_fvu=self._layer_fvu(step, x))

    @torch.no_grad()
    def _layer_fvu(self, step, x: torch.Tensor) -> torch.Tensor:
        code = step.code
        if code is None:  # the standard module's dense path: the reconstruction densely
            x_hat = torch.relu(torch.addmm(self.b_enc, x, self.W_enc.t())) @ self.W_dec + self.b_dec
            residual = x_hat.float() - x.float()
        else:
            vals, indices, row_offsets = code.vals.detach(), code.indices, code.row_offsets
            residual, _ = gather_residual(vals, indices, self.W_dec, self.b_dec, x, row_offsets=row_offsets)
        return layer_fvu(residual, x, self.n_layers)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """The reconstruction [B, L, D] of xs [B, L, D] (no gradients: train with ``loss``)."""
        return self.decode(*self.encode(xs))

    def _unflatten(self, x_hat: torch.Tensor) -> torch.Tensor:
        return x_hat.reshape(x_hat.shape[0], self.n_layers, self.d_model)

    def decoder_norms(self) -> torch.Tensor:
        """[F, L] fp32: ||W_dec[f, l]||, each latent's decoder norm in each layer (model diffing's relative
        norms read these)."""
        return grouped_row_norms(self.W_dec.detach(), self.n_layers)

    # dictionary_learning's layout --------------------------------------------------------

    @torch.no_grad()
    def to_dictionary_learning(self) -> dict:
        """This crosscoder's weights as dictionary_learning's ``CrossCoder`` state dict (fp32, CPU):
        ``encoder.weight`` [L, D, F], ``encoder.bias`` [F], ``decoder.weight`` [L, F, D],
        ``decoder.bias`` [L, D]. Its other buffers (``code_normalization_id``, a BatchTopK crosscoder's
        ``k`` and ``threshold``) are its own: pass ``strict=False`` to ``load_state_dict``, or add them."""
        F, L, D = self.n_features, self.n_layers, self.d_model
        cpu = lambda t: t.detach().float().cpu()  # noqa: E731
        return {
            "encoder.weight": cpu(self.W_enc).reshape(F, L, D).permute(1, 2, 0).contiguous(),
            "encoder.bias": cpu(self.b_enc),
            "decoder.weight": cpu(self.W_dec).reshape(F, L, D).transpose(0, 1).contiguous(),
            "decoder.bias": cpu(self.b_dec).reshape(L, D),
        }

    @classmethod
    def from_dictionary_learning(cls, state_dict: dict, *args, **kwargs):
        """The crosscoder of a dictionary_learning ``CrossCoder`` state dict (``encoder.weight`` [L, D, F],
        ``encoder.bias`` [F], ``decoder.weight`` [L, F, D], ``decoder.bias`` [L, D]; other keys are
        ignored); ``args`` and ``kwargs`` go to the constructor after (d_model, n_features) (``k``,
        ``dtype``, ``device``, ...; ``n_layers`` comes from the weights). A missing key or a shape that
        does not fit is a ValueError naming ``state_dict``."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
        names = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
        missing = [n for n in names if not isinstance(state_dict.get(n), torch.Tensor)]
        if missing:
            raise ValueError(f"state_dict must hold the tensors {list(names)}; missing {missing}")
        W_enc, b_enc, W_dec, b_dec = (state_dict[n] for n in names)
        if W_enc.ndim != 3:
            raise ValueError(f"state_dict['encoder.weight'] must be [L, D, F], got {tuple(W_enc.shape)}")
        L, D, F = W_enc.shape
        for name, t, shape in (("encoder.bias", b_enc, (F,)), ("decoder.weight", W_dec, (L, F, D)),
                               ("decoder.bias", b_dec, (L, D))):  # fmt: skip
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"state_dict['{name}'] must be {list(shape)} (encoder.weight's [L, D, F] = "
                    f"{[L, D, F]}), got {list(t.shape)}"
                )
        if "n_layers" in kwargs:
            raise ValueError("n_layers: it comes from state_dict's weights; pass none")
        module = cls(D, F, *args, n_layers=L, **kwargs)
        with torch.no_grad():
            module.W_enc.copy_(W_enc.permute(2, 0, 1).reshape(F, L * D))
            module.b_enc.copy_(b_enc)
            module.W_dec.copy_(W_dec.transpose(0, 1).reshape(F, L * D))
            module.b_dec.copy_(b_dec.reshape(L * D))
        return module


class StandardCrosscoder(CrosscoderLayout, StandardSparseAutoencoder):
    """Standard crosscoder (Lindsey et al. 2024): a ReLU code, the squared error summed over the layers,
    and the L1 penalty weighted by the sum of the per-layer decoder norms, sum_l ||W_dec[f, l]||.

    Args:
        d_model: D, each layer's width; n_features: F.
        n_layers: L, the layers (or models) read and reconstructed.
        l1_coefficient: the penalty's weight (default 1.0).
        reconstruction: ``"mse"`` (default): the squared error summed over L * D, mean over B (Anthropic's);
            ``"layer_l2"``: the mean over B and the L layers of ||x_hat_l - x_l||_2, unsquared
            (dictionary_learning's ``CrossCoderTrainer`` default).
        decoder_init_norm: each per-layer decoder block's norm at init (default 0.1); W_enc = W_dec.
        dense_above, capacity_per_row, dtype, device, seed, dead_window_tokens: as
            ``StandardSparseAutoencoder``'s (the sparse/dense switch included).

    ``loss(xs)`` (xs [B, L, D]): the reconstruction term + l1_coefficient * mean over B of
    sum_f f * sum_l ||W_dec[f, l]||: a ``StandardCrosscoderStep``. ``encode(xs)`` returns the active
    entries as a variable-length code; ``decode(...)`` and ``forward(xs)`` give [B, L, D].
    """

    crosscoder_result = StandardCrosscoderStep
    reconstructions = ("mse", "layer_l2")

    def _step(self, x: torch.Tensor):
        capacity = self._path(x.shape[0])
        params = (x, self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        opts = dict(l1_coefficient=self.l1_coefficient, target=x, crosscoder=self.layers)
        if capacity is None:
            return standard_sae_step_dense(*params, **opts)
        return standard_sae_step(*params, capacity=capacity, **opts)

    @torch.no_grad()
    def encode(self, xs: torch.Tensor, capacity: int | None = None):
        """(vals, indices, row_offsets) of the active entries (pre > 0) of xs [B, L, D]; ``capacity`` None
        counts first (one host sync)."""
        return standard_crosscoder_code(self, self.flatten_layers(xs), capacity)

    def decode(self, vals: torch.Tensor, indices: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """xs_hat [B, L, D] from a variable-length code."""
        return decode_layers(self, vals, indices, row_offsets, self.n_layers)


class BatchTopKCrosscoder(CrosscoderLayout, BatchTopKSparseAutoencoder):
    """BatchTopK crosscoder, as dictionary_learning's ``BatchTopKCrossCoder``: the int(k * B) largest of
    relu(pre) * sum_l ||W_dec[f, l]|| over the whole batch are kept, with their values relu(pre); the
    loss is the squared error of the decode.

    Args:
        d_model: D, each layer's width; n_features: F; k: active latents per row on average.
        n_layers: L, the layers (or models) read and reconstructed.
        rescale_acts_by_decoder_norm: rank by relu(pre) * sum_l ||W_dec[f, l]|| (default True, as
            dictionary_learning's ``code_normalization`` "crosscoder"); False ranks relu(pre).
        reconstruction: ``"mse"`` (default): the mean over B * L * D of the squared error;
            ``"layer_l2"``: the mean over B and the L layers of ||x_hat_l - x_l||_2, unsquared (what
            dictionary_learning's ``BatchTopKCrossCoderTrainer`` minimises).
        decoder_init_norm: each per-layer decoder block's norm at init (default 0.1; dictionary_learning's
            ``norm_init_scale`` is 1.0); W_enc = W_dec.
        threshold_lr, dtype, device, seed, dead_window_tokens, dead_loss: as
            ``BatchTopKSparseAutoencoder``'s (the inference threshold on pre * sum_l ||W_dec[f, l]||).

    ``loss(xs)`` (xs [B, L, D]): the reconstruction term (+ the dead-latent loss's), a
    ``BatchTopKCrosscoderStep``. ``encode(xs)``: the batch rule in training mode, the threshold
    rule in eval mode.
    """

    crosscoder_result = BatchTopKCrosscoderStep
    reconstructions = ("mse", "layer_l2")

    def _step(self, x: torch.Tensor):
        return batchtopk_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, target=x,
            rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm, dead_loss=self.step_dead_loss(),
            crosscoder=self.layers,
        )  # fmt: skip

    def activation_scale(self):
        """The per-latent factor the selection ranks by: sum_l ||W_dec[f, l]|| when rescaling, else None."""
        return self.decoder_norms().sum(1).to(self.W_dec.dtype) if self.rescale_acts_by_decoder_norm else None

    @torch.no_grad()
    def encode(self, xs: torch.Tensor, capacity: int | None = None):
        """(vals, indices, row_offsets) of xs [B, L, D]: the batch rule in training mode, the threshold rule
        (relu(pre) * scale > threshold) in eval mode, where ``capacity`` bounds the code (None: count
        first, one host sync)."""
        x = self.flatten_layers(xs)
        self.warn_if_threshold_cold()
        return batchtopk_crosscoder_code(self, x, self.n_layers, capacity)

    def decode(self, vals: torch.Tensor, indices: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """xs_hat [B, L, D] from a variable-length code."""
        return decode_layers(self, vals, indices, row_offsets, self.n_layers)


class TopKCrosscoder(CrosscoderLayout, SparseAutoencoder):
    """TopK crosscoder: the k largest pre-activations of each row through a ReLU (flash-sae's TopK SAE
    over the concatenation, read uncentred), the mean over B * L * D of the squared error.

    Args:
        d_model: D, each layer's width; n_features: F; k: active latents per row.
        n_layers: L, the layers (or models) read and reconstructed.
        dtype, device, seed, dead_window_tokens, dead_loss: as ``SparseAutoencoder``'s.

    As the TopK SAE, the decoder rows (the whole [L * D] row) stay at unit norm: call
    ``before_optimizer_step()`` and ``after_optimizer_step()`` around the optimizer; so ranking raw
    pre-activations is ranking pre * ||W_dec[f]||. ``loss(xs)`` is a ``TopKCrosscoderStep``;
    ``encode(xs)`` returns (vals, indices) [B, k]; ``decode(vals, indices)`` [B, L, D].
    """

    block_init = False  # unit-norm rows, the TopK module's init and rule
    crosscoder_result = TopKCrosscoderStep

    def _step(self, x: torch.Tensor):
        return topk_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, target=x, dead_loss=self.step_dead_loss()
        )  # fmt: skip

    def encode(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vals [B, k], indices [B, k] int64) of xs [B, L, D], descending."""
        return topk_encode(self.flatten_layers(xs), self.W_enc, self.b_enc, self.k)

    def decode(self, vals: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """xs_hat [B, L, D] from a [B, k] code."""
        return self._unflatten(sparse_decode(vals, indices, self.W_dec, self.b_dec))


class JumpReLUCrosscoder(CrosscoderLayout, JumpReLUSparseAutoencoder):
    """JumpReLU crosscoder: the code z * H(z - theta) of the uncentred pre-activations, the squared error
    summed over the layers and l0_coefficient times the L0 (the JumpReLU SAE's loss and straight-through
    estimators over the concatenation; no decoder norm enters it).

    Args:
        d_model: D, each layer's width; n_features: F.
        n_layers: L, the layers (or models) read and reconstructed.
        l0_coefficient, init_threshold, bandwidth, threshold_parameterization, capacity_per_row,
            decoder_init_norm (per layer block), dtype, device, seed, dead_window_tokens: as
            ``JumpReLUSparseAutoencoder``'s.

    ``loss(xs)`` (xs [B, L, D]): squared error summed over L * D, mean over B, + l0_coefficient *
    L0: a ``JumpReLUCrosscoderStep``.
    """

    crosscoder_result = JumpReLUCrosscoderStep

    def _step(self, x: torch.Tensor):
        return jumprelu_sae_step(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.current_threshold(), target=x,
            capacity=self._capacity(x.shape[0]), bandwidth=self.bandwidth, l0_coefficient=self.l0_coefficient,
        )  # fmt: skip

    @torch.no_grad()
    def encode(self, xs: torch.Tensor, capacity: int | None = None):
        """(vals, indices, row_offsets) of the active entries (pre > threshold) of xs [B, L, D]; ``capacity``
        None counts first (one host sync)."""
        return jumprelu_crosscoder_code(self, self.flatten_layers(xs), capacity)

    def decode(self, vals: torch.Tensor, indices: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """xs_hat [B, L, D] from a variable-length code."""
        return decode_layers(self, vals, indices, row_offsets, self.n_layers)
