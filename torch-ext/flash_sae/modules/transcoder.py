"""Transcoders and skip transcoders: the SAE modules given a separate output width and target.

A transcoder encodes x [B, D_in] as it is (no ``x - b_dec``) and predicts a target y [B, D_out]
(an MLP's output from its input, say): y_hat = b_dec + sum_f a_f W_dec[f] (+ W_skip x). Each
module here is an SAE module of ``modules/`` with ``Transcoder`` mixed in; the training step is that
module's step with ``target=``, so the selection, the loss terms, the dead-latent loss and the
sparse backward are the SAE's.

The skip term (Paulo et al. 2025, "Transcoders beat sparse autoencoders for interpretability"):
with ``skip=True`` the module owns a dense ``W_skip`` [D_out, D_in] (zero at init) and
y_hat = W_dec f + W_skip x + b_dec. The step reconstructs y - x @ W_skip.T, a differentiable
[B, D_out] target computed by torch, so W_skip's gradient (-r x summed over the batch) and its
share of x's gradient come from autograd through that one product; the sparse step is unchanged.
"""

import math

import torch
from torch import nn

from .._validation import check_same_device, check_same_dtype, check_tensor, is_real
from ..results import total_variance
from .base import _check_positive_int
from .batchtopk import BatchTopKSparseAutoencoder
from .jumprelu import JumpReLUSparseAutoencoder
from .sparse_autoencoder import SparseAutoencoder
from .standard import StandardSparseAutoencoder

# SAELens's transcoder architectures by (activation, skip): what ``to_saelens`` writes.
SAELENS_TRANSCODERS = {
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}


def _check_scale(name: str, value) -> float:
    if not is_real(value) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class Transcoder:
    """What turns an SAE module into a transcoder (mixin, listed before the SAE module).

    Keywords: ``d_out`` (None: ``d_in``) and ``skip`` (a dense ``W_skip`` [D_out, D_in], zero at
    init). Parameters ``W_enc`` [F, D_in], ``b_enc`` [F], ``W_dec`` [F, D_out], ``b_dec`` [D_out]
    (+ ``W_skip``); W_dec is drawn on its own by the SAE module's rule (not tied to W_enc). There
    is no input bias: none of SAELens's, circuit-tracer's or sparsify's transcoders has one.
    """

    centres_input = False
    saelens_activation = None  # "relu" or "jumprelu": SAELens's and circuit-tracer's activation; None: none

    def __init__(self, d_in, n_features, *args, d_out=None, skip=False, **kwargs):
        d_in = _check_positive_int("d_in", d_in)
        d_out = d_in if d_out is None else _check_positive_int("d_out", d_out)
        if not isinstance(skip, bool):
            raise ValueError(f"skip must be a bool, got {skip!r}")
        super().__init__(d_in, n_features, *args, d_out=d_out, **kwargs)
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=self.W_dec.dtype, device=self.W_dec.device))
        else:
            self.register_parameter("W_skip", None)

    @property
    def d_in(self) -> int:
        """D_in, the input's width (``d_model``)."""
        return self.d_model

    @property
    def skip(self) -> bool:
        return self.W_skip is not None

    def _check_pair(self, x, y) -> None:
        """x [B, D_in] and y [B, D_out] in the parameters' dtype and on their device; a ValueError names which."""
        check_tensor("x", x, 2)
        check_tensor("y", y, 2)
        B = x.shape[0]
        if x.shape[1] != self.d_in:
            raise ValueError(f"x must be [B, d_in] = [B, {self.d_in}], got {tuple(x.shape)}")
        if tuple(y.shape) != (B, self.d_out):
            raise ValueError(f"y must be [B, d_out] = [{B}, {self.d_out}] (x's rows), got {tuple(y.shape)}")
        check_same_dtype("W_enc", self.W_enc, x=x, y=y)
        check_same_device(W_enc=self.W_enc, x=x, y=y)

    def skip_term(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W_skip.T [B, D_out] (circuit-tracer's ``compute_skip``); a ValueError without ``skip``."""
        if self.W_skip is None:
            raise ValueError("skip_term: this transcoder has no skip connection (built with skip=False)")
        return x @ self.W_skip.T

    def loss(self, x: torch.Tensor, y: torch.Tensor):
        """The fused training step on inputs x [B, D_in] and targets y [B, D_out] (same dtype and device
        as the parameters): the SAE module's step result (``STEP_FIELDS`` first) with y (minus
        x @ W_skip.T with ``skip``) as its target; ``mse`` is the mean over B*D_out of (y - y_hat)^2
        and ``fvu`` the fraction of y's variance unexplained. In training mode it keeps the module's
        state on the device, as the SAE module's ``loss``. No host sync."""
        self._check_pair(x, y)
        target = y if self.W_skip is None else torch.addmm(y, x, self.W_skip.T, alpha=-1)
        step = self._step(x, target)
        if self.W_skip is not None:  # the step's fvu is of y - W_skip x: give y's
            step = step._replace(fvu=step.mse * (y.shape[0] * y.shape[1]) / total_variance(y))
        self._after_step(step, x.shape[0])
        return step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction y_hat [B, D_out] = decode(encode(x)) (+ x @ W_skip.T)."""
        y_hat = super().forward(x)
        return y_hat if self.W_skip is None else torch.addmm(y_hat, x, self.W_skip.T)

    def resample_dead_(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__}.resample_dead_: resampling weighs inputs by their reconstruction error, "
            "which a transcoder measures against its target; not implemented for transcoders"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_out={self.d_out}, skip={self.skip}"

    # SAELens's and circuit-tracer's formats ------------------------------------------------

    @property
    def saelens_architecture(self) -> str | None:
        if self.saelens_activation is None:
            return None
        return SAELENS_TRANSCODERS[(self.saelens_activation, self.skip)]

    @classmethod
    def _saelens_reads(cls) -> tuple[str, ...]:
        if not cls.saelens_loadable or cls.saelens_activation is None:
            return ()
        return tuple(name for (act, _), name in SAELENS_TRANSCODERS.items() if act == cls.saelens_activation)

    @classmethod
    def _saelens_tensor_shapes(cls, d_in: int, d_sae: int, cfg: dict) -> dict:
        d_out = cfg.get("d_out")
        if not isinstance(d_out, int) or isinstance(d_out, bool) or d_out < 1:
            raise ValueError(f"cfg['d_out'] must be a positive int, got {d_out!r}")
        shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "b_enc": (d_sae,)}
        if cls.saelens_activation == "jumprelu":
            shapes["threshold"] = (d_sae,)
        if "skip" in cfg["architecture"]:
            shapes["W_skip"] = (d_out, d_in)
        return shapes

    @classmethod
    def _from_saelens_cfg(cls, cfg, d_in, d_sae, **kwargs):
        for name in ("d_out", "skip"):
            if name in kwargs:
                raise ValueError(
                    f"{name}: a SAELens transcoder's {name} is read from cfg; pass no {name} to from_saelens"
                )
        skip = "skip" in cfg["architecture"]
        return super()._from_saelens_cfg(cfg, d_in, d_sae, d_out=cfg["d_out"], skip=skip, **kwargs)

    def _load_saelens_extra(self, tensors: dict) -> None:
        if self.W_skip is not None:
            self.W_skip.copy_(tensors["W_skip"])
        super()._load_saelens_extra(tensors)

    @torch.no_grad()
    def to_saelens(self, activation_scale: float = 1.0, metadata: dict | None = None, *, output_scale=None):
        """(cfg, tensors): this transcoder in SAELens's format (``cfg.json`` and
        ``sae_weights.safetensors`` of ``SAE.load_from_disk``), fp32 CPU tensors; the caller writes
        the files. The architecture is SAELens's ``"transcoder"`` / ``"skip_transcoder"`` (ReLU:
        ``StandardTranscoder``) or ``"jumprelu_transcoder"`` / ``"jumprelu_skip_transcoder"``
        (``JumpReLUTranscoder``, and ``BatchTopKTranscoder`` with its inference threshold); SAELens has
        no TopK transcoder (a ValueError). Tensors: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_out],
        ``b_enc``, ``b_dec`` [d_out] (+ ``threshold`` [d_sae], ``W_skip`` [d_out, d_in]); cfg holds
        ``d_out`` and ``apply_b_dec_to_input`` False.

        ``activation_scale``: the factor x was scaled by in training (x_module = activation_scale *
        x_raw); ``output_scale`` that of y (None: the same); both are folded into the weights, so
        the export maps raw x to raw y. ``metadata``: as ``SAEBase.to_saelens``.
        """
        if self.saelens_activation is None:
            raise ValueError(
                f"{type(self).__name__} has no SAELens export: SAELens has no transcoder class that computes "
                "a per-row TopK code (its transcoders are ReLU and JumpReLU)"
            )
        c_in = _check_scale("activation_scale", activation_scale)
        c_out = c_in if output_scale is None else _check_scale("output_scale", output_scale)
        cfg, tensors = super().to_saelens(c_in, metadata)
        cpu = lambda t: t.detach().float().cpu()  # noqa: E731
        tensors["W_dec"] = cpu(self.W_dec) / c_out
        tensors["b_dec"] = cpu(self.b_dec) / c_out
        if self.W_skip is not None:
            tensors["W_skip"] = cpu(self.W_skip) * (c_in / c_out)
        cfg.update(d_out=self.d_out, apply_b_dec_to_input=False)
        return cfg, tensors

    @torch.no_grad()
    def to_circuit_tracer(self, activation_scale: float = 1.0, *, output_scale=None) -> dict:
        """The tensors of this transcoder's circuit-tracer file (``layer_{i}.safetensors``, what its
        ``load_relu_transcoder`` and ``load_transcoder_set`` read), fp32 CPU: ``W_enc`` [F, D],
        ``W_dec`` [F, D], ``b_enc`` [F], ``b_dec`` [D], ``activation_function.threshold`` [F] (JumpReLU;
        BatchTopK's inference threshold; absent for ReLU), ``W_skip`` [D, D] with ``skip``. The caller
        writes the file (``safetensors.torch.save_file``). circuit-tracer's single-layer transcoders
        read and write one width (d_in == d_out) and compute ReLU or JumpReLU codes: another width or
        a TopK transcoder is a ValueError. Scales: as ``to_saelens``."""
        if self.saelens_activation is None:
            raise ValueError(
                f"{type(self).__name__} has no circuit-tracer export: circuit-tracer's transcoder loader builds "
                "ReLU or JumpReLU codes only"
            )
        if self.d_out != self.d_in:
            raise ValueError(
                f"d_out: circuit-tracer's SingleLayerTranscoder reads and writes one width (d_model), but this "
                f"transcoder has d_in={self.d_in}, d_out={self.d_out}"
            )
        _, t = self.to_saelens(activation_scale, output_scale=output_scale)
        out = {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
        if "threshold" in t:
            out["activation_function.threshold"] = t["threshold"]
        if "W_skip" in t:
            out["W_skip"] = t["W_skip"]
        return out


def circuit_tracer_transcoder_set(transcoders, *, feature_input_hook: str, feature_output_hook: str, scan=None):
    """(config, files): per-layer transcoders as a circuit-tracer transcoder set.

    ``transcoders``: a list of transcoders, layer 0 first (one width, one ``n_features``, all with a
    skip connection or none, as circuit-tracer's ``TranscoderSet`` requires). ``config`` is the
    ``config.yaml`` of circuit-tracer's hub layout (``model_kind: transcoder_set``, the two hooks and
    ``scan`` if given; JSON is YAML, so ``json.dump`` writes it); ``files`` maps ``layer_{i}.safetensors``
    to each layer's tensors (``Transcoder.to_circuit_tracer``). Uploaded beside the config to a hub
    repository, the set loads with ``circuit_tracer``'s ``load_transcoder_from_hub``; from a local
    directory, with ``load_transcoder_set({i: path})`` (or ``load_transcoders`` given the config with
    ``"transcoders"``: the files' paths).
    """
    if not isinstance(transcoders, (list, tuple)) or not transcoders:
        raise ValueError(f"transcoders must be a non-empty list of transcoders, got {transcoders!r}")
    for i, t in enumerate(transcoders):
        if not isinstance(t, Transcoder):
            raise ValueError(f"transcoders[{i}] must be a transcoder module, got {type(t).__name__}")
    first = transcoders[0]
    for i, t in enumerate(transcoders):
        if (t.d_in, t.n_features, t.skip) != (first.d_in, first.n_features, first.skip):
            raise ValueError(
                f"transcoders[{i}] has (d_in, n_features, skip) = {(t.d_in, t.n_features, t.skip)} but "
                f"transcoders[0] has {(first.d_in, first.n_features, first.skip)}: a circuit-tracer set shares them"
            )
    for name, hook in (("feature_input_hook", feature_input_hook), ("feature_output_hook", feature_output_hook)):
        if not isinstance(hook, str) or not hook:
            raise ValueError(f"{name} must be a hook name (a non-empty str), got {hook!r}")
    config = {"model_kind": "transcoder_set", "feature_input_hook": feature_input_hook,
              "feature_output_hook": feature_output_hook}  # fmt: skip
    if scan is not None:
        config["scan"] = scan
    return config, {f"layer_{i}.safetensors": t.to_circuit_tracer() for i, t in enumerate(transcoders)}


class TopKTranscoder(Transcoder, SparseAutoencoder):
    """TopK transcoder: y_hat = b_dec + sum_k relu(topk(x @ W_enc.T + b_enc)) W_dec (+ W_skip x).

    Args:
        d_in: D_in, the input's width; n_features: F; k: active latents per row, 1 <= k <= F.
        d_out: D_out, the target's width (None: d_in).
        skip: add a dense skip connection ``W_skip`` [D_out, D_in], zero at init.
        dead_loss: None, ``"auxk"``, ``"ghost"`` or a ``DeadLatentLoss``; AuxK's ``k_aux`` defaults to
            D_out // 2 (sparsify's transcoder heuristic) and reconstructs the residual y - y_hat.
        dtype, device, seed, dead_window_tokens: as ``SparseAutoencoder``.

    As ``SparseAutoencoder``: decoder rows drawn normal and held at unit norm (call
    ``before_optimizer_step`` and ``after_optimizer_step`` around the optimizer), W_enc drawn the same
    way. ``loss(x, y)`` is ``topk_sae_step`` with ``target=``: a ``TopKSAEStep``. ``encode(x)`` ->
    (vals [B, k], indices [B, k] int64); ``decode(vals, indices)`` -> W_dec's part and b_dec [B, D_out]
    (no skip term); ``forward(x)`` -> y_hat [B, D_out]. SAELens and circuit-tracer have no TopK
    transcoder: ``to_saelens`` and ``to_circuit_tracer`` raise.
    """


class BatchTopKTranscoder(Transcoder, BatchTopKSparseAutoencoder):
    """BatchTopK transcoder: the batch keeps its int(k * B) largest relu(pre) (ranked by pre * ||W_dec[f]||
    by default), pre = x @ W_enc.T + b_enc; y_hat = b_dec + sum relu(pre) W_dec[f] (+ W_skip x).

    Args: as ``BatchTopKSparseAutoencoder`` (``k``, ``rescale_acts_by_decoder_norm``, ``threshold_lr``,
    ``dead_loss``, SAELens's init), plus ``d_out`` and ``skip`` (``TopKTranscoder``). ``loss(x, y)`` is
    ``batchtopk_sae_step`` with ``target=`` and updates the inference threshold in training mode;
    ``encode``/``decode``/``forward`` as the SAE module's (the threshold rule in eval mode), with the
    skip term in ``forward``. ``to_saelens`` writes SAELens's JumpReLU transcoder (the inference rule,
    as the BatchTopK SAE's export does); it loads back with ``JumpReLUTranscoder.from_saelens``.
    """

    saelens_activation = "jumprelu"


class JumpReLUTranscoder(Transcoder, JumpReLUSparseAutoencoder):
    """JumpReLU transcoder: a = z * H(z - theta), z = x @ W_enc.T + b_enc; y_hat = b_dec + a @ W_dec
    (+ W_skip x); loss = sum over D_out of (y - y_hat)^2, mean over B, + l0_coefficient * L0.

    Args: as ``JumpReLUSparseAutoencoder`` (``l0_coefficient``, ``init_threshold``, ``bandwidth``,
    ``threshold_parameterization``, ``capacity_per_row``, SAELens's init), plus ``d_out`` and ``skip``.
    ``loss(x, y)`` is ``jumprelu_sae_step`` with ``target=``. SAELens: ``"jumprelu_transcoder"`` /
    ``"jumprelu_skip_transcoder"``; circuit-tracer: its JumpReLU activation.
    """

    saelens_activation = "jumprelu"


class StandardTranscoder(Transcoder, StandardSparseAutoencoder):
    """Standard (ReLU + L1) transcoder: a = relu(x @ W_enc.T + b_enc); y_hat = b_dec + a @ W_dec (+ W_skip x);
    loss = sum over D_out of (y - y_hat)^2, mean over B, + l1_coefficient * sum_f a_f ||W_dec[f]||.

    Args: as ``StandardSparseAutoencoder`` (``l1_coefficient``, ``dense_above``, ``capacity_per_row``,
    SAELens's init), plus ``d_out`` and ``skip``. ``loss(x, y)`` is ``standard_sae_step`` (or its dense
    formulation while the code is dense) with ``target=``. SAELens: ``"transcoder"`` /
    ``"skip_transcoder"``; circuit-tracer: its ReLU activation.
    """

    saelens_activation = "relu"
