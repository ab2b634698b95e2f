"""What every SAE module shares: parameters, their layout and initialisation, the decoder-norm steps.

Each module (the kernels) and its plain-torch twin in ``reference`` (the tests' ground
truth) subclass the same base here and differ only in how they compute, so a
``state_dict`` moves between them unchanged.
"""

import dataclasses
import math
import warnings

import torch
from torch import nn

from .._validation import FLOAT_DTYPES, check_float_dtype, is_int, is_real
from ..dead_latent_loss import DeadLatentLoss
from ..primitives.dead_set import next_dead_offset
from ..results import SparseCode


def _check_positive_int(name, value) -> int:
    """A positive int count (``numbers.Integral``, numpy's too, not bool); returns it as an ``int``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _module_dtype(dtype) -> torch.dtype:
    """The parameters' dtype: fp32, bf16 or fp16; None takes torch's default dtype, which must be one."""
    if dtype is None:
        default = torch.get_default_dtype()
        if default not in FLOAT_DTYPES:
            raise ValueError(
                f"dtype=None takes torch's default dtype, {default}, which the kernels do not support: "
                "pass dtype=torch.float32, torch.bfloat16 or torch.float16"
            )
        return default
    return check_float_dtype("dtype", dtype)


class SAEBase(nn.Module):
    """Parameters ``W_enc`` [F, D], ``b_enc`` [F], ``W_dec`` [F, D] (one row per latent), ``b_dec`` [D].

    Initialisation (``decoder_init``):
    - ``"normal"`` (flash-sae's TopK module): W_dec rows drawn from a normal distribution in
      fp64 and scaled to unit norm;
    - ``"saelens"`` (SAELens's training SAEs): W_dec drawn Kaiming-uniform, its rows scaled to
      ``decoder_init_norm`` (SAELens's default 0.1, Anthropic's April 2024 "heuristic" init).
    Then W_enc = W_dec (tied init) and both biases zero. ``seed`` seeds the draw (the global
    RNG otherwise). ``dtype``: fp32, bf16 or fp16 (a ``torch.dtype``; None: torch's default dtype,
    which must be one of them); anything else is a ValueError here rather than a failure at the
    first call. ``d_out`` (a transcoder's output width, ``modules.transcoder``): W_dec [F, d_out] and
    b_dec [d_out], W_dec drawn on its own after W_enc by the same rule (None: an SAE, W_dec = W_enc,
    ``d_out`` = D). Counts (``d_model``, ``n_features``, ``k``, ...) take any ``numbers.Integral``
    (numpy's integers too), stored as ``int``.

    Dead-latent tracking, on the device: the buffer ``tokens_since_fired`` [F] int64 (in the
    ``state_dict``; a checkpoint without it loads with zeros) counts, per latent, the training
    tokens (rows of x) seen since it last fired. Each module's ``loss`` updates it in training
    mode from the step's ``fire_counts``. A latent is dead once the count exceeds
    ``dead_window_tokens`` (``tokens_since_fired > dead_window_tokens``, sparsify's rule with its
    ``dead_feature_threshold``, default 10M; SAELens applies the same ``>`` to steps instead,
    ``dead_feature_window`` = 1000). ``dead_mask()`` and ``dead_fraction()`` read
    it without a host sync.
    """

    resample_encoder_scale = 0.2  # see resample_dead_
    # whether the step's backward computes W_enc's and W_dec's gradients in one segmented pass each, where an
    # optimizer can claim them (``flash_sae.FusedAdam``)
    supports_fused_optimizer = False
    centres_input = True  # the encoder reads x - b_dec (an SAE); a transcoder reads x as it is

    def __init__(
        self,
        d_model,
        n_features,
        *,
        dtype=None,
        device=None,
        seed=None,
        decoder_init="normal",
        decoder_init_norm=1.0,
        dead_window_tokens=10_000_000,
        d_out=None,
    ):
        super().__init__()
        dtype = _module_dtype(dtype)
        self.dead_window_tokens = _check_positive_int("dead_window_tokens", dead_window_tokens)
        d_model = _check_positive_int("d_model", d_model)
        n_features = _check_positive_int("n_features", n_features)
        if decoder_init not in ("normal", "saelens"):
            raise ValueError(f"decoder_init must be 'normal' or 'saelens', got {decoder_init!r}")
        if not is_real(decoder_init_norm) or not decoder_init_norm > 0:
            raise ValueError(f"decoder_init_norm must be a positive number, got {decoder_init_norm!r}")
        tied = d_out is None
        d_out = d_model if tied else _check_positive_int("d_out", d_out)
        self.d_model, self.n_features, self.d_out = d_model, n_features, d_out
        g = torch.Generator().manual_seed(seed) if seed is not None else None

        def rows(width):
            w = torch.empty(n_features, width, dtype=torch.float64)
            if decoder_init == "normal":
                w.normal_(generator=g)
            else:
                nn.init.kaiming_uniform_(w, generator=g)
            return w / w.norm(dim=1, keepdim=True) * decoder_init_norm

        w = rows(d_model)
        factory = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(w.clone().to(**factory))
        self.b_enc = nn.Parameter(torch.zeros(n_features, **factory))
        self.W_dec = nn.Parameter((w if tied else rows(d_out)).to(**factory))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **factory))
        self.register_buffer("tokens_since_fired", torch.zeros(n_features, dtype=torch.int64, device=device))

    @torch.no_grad()
    def record_firing(self, fire_counts: torch.Tensor, n_tokens: int) -> None:
        """tokens_since_fired <- 0 where a latent fired in this batch, else + n_tokens (on device)."""
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fire_counts > 0, 0)

    def dead_mask(self) -> torch.Tensor:
        """[F] bool: the latents silent for more than ``dead_window_tokens`` training tokens
        (``tokens_since_fired > dead_window_tokens``, sparsify's and SAELens's ``>``)."""
        return self.tokens_since_fired > self.dead_window_tokens

    def dead_fraction(self) -> torch.Tensor:
        """0-d fp32: the share of dead latents (a device tensor: reading it is the caller's sync)."""
        return self.dead_mask().float().mean()

    @torch.no_grad()
    def resample_dead_(
        self,
        x: torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        encoder_norm_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Re-initialises the dead latents toward inputs the SAE reconstructs badly, on the device.

        The resampling of Anthropic's "Towards Monosemanticity" (2023): each input of ``x`` [N, D]
        is drawn with probability proportional to the square of its squared reconstruction error;
        a dead latent f gets a drawn input's direction v (of x - b_dec, unit norm) as its decoder
        row, scaled to the live decoder rows' mean norm; its encoder row is v times
        ``encoder_norm_scale`` times the live encoder rows' mean norm; its encoder bias is 0 (a
        Gated SAE's b_gate, r_mag and b_mag: ``latent_vectors()``);
        its dead count restarts; and, with ``optimizer`` (Adam, AdamW, ``FusedAdam``, ...), the moments of
        those rows (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) are reset to 0 and an fp32 ``master``
        copy it keeps (``FusedAdam``'s) takes the new rows; an optimizer that does
        not hold every resampled parameter (another module's, or the fp32 master copy's) is a
        ValueError naming ``optimizer``. Every other latent is untouched. No host sync in
        ``SparseAutoencoder`` (the dead set is a mask; the draw is ``torch.multinomial``); the other
        modules' ``forward`` may size its code by counting first (one sync).
        Returns the number of resampled latents (a 0-d device tensor).

        ``encoder_norm_scale`` defaults to the module's ``resample_encoder_scale``: Anthropic's 0.2
        for threshold (ReLU-like) SAEs; 1.0 for the TopK and BatchTopK SAEs, where a latent must
        outrank the live ones to fire: at 0.2 none of the resampled latents of the synthetic
        training test ever fired again (``tests/test_dead_latent_training.py``).
        """
        if encoder_norm_scale is None:
            encoder_norm_scale = self.resample_encoder_scale
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.d_model or x.shape[0] < 1:
            hint = ""
            if isinstance(x, torch.Tensor) and x.ndim > 2 and x.shape[-1] == self.d_model:
                hint = f"; flatten the leading dimensions first: x.reshape(-1, {self.d_model}) (x.flatten(0, -2))"
            raise ValueError(
                f"x must be a [N, {self.d_model}] tensor with N >= 1, got {getattr(x, 'shape', x)!r}{hint}"
            )
        if x.device != self.W_dec.device:
            raise ValueError(f"x is on {x.device} but the SAE is on {self.W_dec.device}")
        if not is_real(encoder_norm_scale):
            raise ValueError(f"encoder_norm_scale must be a number, got {encoder_norm_scale!r}")
        if optimizer is not None:
            self._check_optimizer_holds(optimizer)
        dead = self.dead_mask()
        x = x.to(self.W_dec.dtype)
        err = (self.forward(x).float() - x.float()).pow(2).sum(1)
        weight = err.pow(2)
        weight = torch.where(weight.sum() > 0, weight, torch.ones_like(weight))  # all exact: draw uniformly
        pick = self._resample_picks(weight, generator)
        v = x.float()[pick] - self.b_dec.float()
        v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        all_dead = self._all_latents(dead)

        def mean_live_norm(W):
            norms, live = self._all_latents(W.float().norm(dim=1)), (~all_dead).float()
            n_live = live.sum()
            return torch.where(n_live > 0, (norms * live).sum() / n_live.clamp_min(1), norms.mean())

        rows = dead.unsqueeze(1)
        dec_norm, enc_norm = mean_live_norm(self.W_dec), mean_live_norm(self.W_enc)
        self.W_dec.copy_(torch.where(rows, (v * dec_norm).to(self.W_dec.dtype), self.W_dec))
        self.W_enc.copy_(torch.where(rows, (v * (enc_norm * encoder_norm_scale)).to(self.W_enc.dtype), self.W_enc))
        for bias in self.latent_vectors():
            bias.copy_(torch.where(dead, 0, bias))
        self.tokens_since_fired.masked_fill_(dead, 0)
        if optimizer is not None:
            for p in (self.W_enc, *self.latent_vectors(), self.W_dec):
                at = dead.view(-1, *([1] * (p.ndim - 1)))
                for key, moment in optimizer.state.get(p, {}).items():
                    if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and moment.shape == p.shape:
                        moment.masked_fill_(at, 0)
                    elif key == "master" and moment.shape == p.shape:  # an optimizer's fp32 copy (FusedAdam)
                        moment.copy_(torch.where(at, p.float(), moment))
        return all_dead.sum()

    def _resample_picks(self, weight: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``resample_dead_``'s draw: the input row each latent would take, [F] int64 (every latent draws,
        so the draw does not depend on which latents are dead)."""
        return torch.multinomial(weight, self.n_features, replacement=True, generator=generator)

    def _all_latents(self, t: torch.Tensor) -> torch.Tensor:
        """A per-latent [F] tensor over all the dictionary's latents (this module holds them all)."""
        return t

    def _check_optimizer_holds(self, optimizer) -> None:
        """``resample_dead_``'s optimizer must hold the parameters it resets (else it would reset nothing)."""
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not hasattr(optimizer, "state"):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        held = {id(p) for group in groups for p in group["params"]}
        names = {id(p): n for n, p in self.named_parameters()}
        missing = [names.get(id(p), "?") for p in (self.W_enc, *self.latent_vectors(), self.W_dec) if id(p) not in held]
        if missing:
            raise ValueError(
                f"optimizer does not hold this module's parameters {', '.join(missing)}, so resampling "
                "would reset none of their moments: pass the optimizer that trains this module, or "
                "optimizer=None (with fp32 master weights, resample the module the optimizer trains)"
            )

    def latent_vectors(self) -> tuple[nn.Parameter, ...]:
        """The per-latent [F] parameters of the encoder (reset to 0 for a resampled latent): ``b_enc``."""
        return (self.b_enc,)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint from before dead tracking, or from another trainer, holds no counts: start from zero.
        for name in ("tokens_since_fired", "dead_offset"):
            if name in self._buffers and prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros_like(self._buffers[name])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_features={self.n_features}, {self._sparsity_repr()}, "
            f"dtype={self.W_dec.dtype}, device={self.W_dec.device}"
        )

    def _sparsity_repr(self) -> str:
        return f"k={self.k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat [B, D]."""
        return self.decode(*self.encode(x))

    fixed_width_code = False  # encode returns a variable-length code (vals, indices, row_offsets)

    def sparse_code(self, x: torch.Tensor, *, capacity: int | None = None) -> SparseCode:
        """The inference code of x [B, D] (the parameters' dtype and device) as a ``SparseCode``, without
        gradients: nothing is saved for a backward, and no [B, F] tensor is kept (the encoder's
        pre-activations exist chunk by chunk inside the selection).

        A TopK module's code is fixed width, vals and indices [B, k] (``row_offsets`` None), and never
        waits on the device. The other modules' codes are variable length (flat vals and indices,
        ``row_offsets`` [B + 1]); their size is known only on the device, so ``capacity`` (the code's
        total slots, e.g. B times an expected L0 with a margin) makes the call sync-free; entries past
        it are dropped. ``capacity`` None counts first: one host sync, and the code is exact. A BatchTopK
        module in training mode keeps its batch rule's int(k * B) entries (no sync either way); in eval
        mode its threshold rule is a threshold code as above.
        """
        if capacity is not None and (self.fixed_width_code or not is_int(capacity) or capacity < 1):
            what = "None for a fixed-width (TopK) code" if self.fixed_width_code else "a positive int or None"
            raise ValueError(f"capacity must be {what}, got {capacity!r}")
        with torch.no_grad():
            code = self.encode(x) if capacity is None else self.encode(x, int(capacity))
        return SparseCode(*code)

    def loss(self, x: torch.Tensor):
        """The fused training step: the architecture's step result (``loss``, ``mse``, ``fvu``, ``l0``,
        ``fire_counts``, ``code``, then its own terms). In training mode it also keeps the module's
        state on the device: the dead-latent counts from ``fire_counts`` (``tokens_since_fired``) and
        the architecture's own (the dead set's offset, the inference threshold). No host sync."""
        step = self._step(x)
        self._after_step(step, x.shape[0])
        return step

    def _step(self, x: torch.Tensor):
        """The architecture's step on ``x`` with this module's parameters and options."""
        raise NotImplementedError(f"{type(self).__name__} defines no training step")

    @torch.no_grad()
    def _after_step(self, step, rows: int) -> None:
        """The bookkeeping after a step of ``rows`` rows; mixins extend it (calling ``super()``)."""
        if self.training:
            self.record_firing(step.fire_counts, rows)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self):
        """Rescales every decoder row to unit L2 norm (call after each optimiser step)."""
        norm = self.W_dec.float().norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        self.W_dec.copy_((self.W_dec.float() / norm).to(self.W_dec.dtype))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self):
        """Projects out of W_dec.grad its component along each decoder row."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec.float()
        g = self.W_dec.grad.float()
        g -= (g * w).sum(1, keepdim=True) * w / w.pow(2).sum(1, keepdim=True).clamp_min(1e-30)
        self.W_dec.grad.copy_(g.to(self.W_dec.grad.dtype))

    def before_optimizer_step(self) -> None:
        """What the architecture does to the gradients before each optimizer step: nothing here (the TopK
        SAE projects the decoder gradient, ``TopKSAEBase``). A trainer calls it on the module the
        optimizer trains (the fp32 master copy with mixed precision)."""

    def after_optimizer_step(self) -> None:
        """What the architecture does to the parameters after each optimizer step: nothing here (the TopK
        SAE renormalises its decoder rows; the direct JumpReLU threshold is clamped at 0)."""

    # SAELens's format -----------------------------------------------------------------

    saelens_architecture = None  # the SAELens architecture ``to_saelens`` writes (None: no export)
    saelens_loadable = True  # whether ``from_saelens`` reads that architecture back into this class

    def _saelens_latent_tensors(self) -> dict:
        """The encoder's per-latent [F] tensors, named as SAELens names them."""
        return {"b_enc": self.b_enc}

    def _saelens_threshold(self):
        """SAELens's per-latent ``threshold`` [F] (fp32) on pre-activations, or None."""
        return None

    def _saelens_cfg_extra(self) -> dict:
        return {}

    # SAELens's run-metadata fields (its LLM training runner's names). SAELens 6.54 reads them from the top
    # level of a cfg.json without ``sae_lens_version`` (its pre-6.0 path, the one an export takes) and
    # from ``cfg["metadata"]`` otherwise: ``to_saelens`` writes both.
    SAELENS_METADATA_KEYS = (
        "model_name", "hook_name", "hook_head_index", "context_size", "dataset_path", "prepend_bos",
        "seqpos_slice", "model_class_name", "model_from_pretrained_kwargs", "exclude_special_tokens",
        "neuronpedia_id",
    )  # fmt: skip

    @torch.no_grad()
    def to_saelens(self, activation_scale: float = 1.0, metadata: dict | None = None) -> tuple[dict, dict]:
        """(cfg, tensors): this SAE in SAELens's format (``cfg.json`` and ``sae_weights.safetensors`` of
        ``SAE.load_from_disk``), fp32 CPU tensors; the caller writes the files.

        SAELens's layout: ``W_enc`` [d_in, d_sae] (this module's transposed), ``W_dec`` [d_sae, d_in],
        ``b_dec`` [d_in], and the per-latent vectors. ``activation_scale``: the factor the module's
        inputs were scaled by in training (x_module = activation_scale * x_raw); it is folded into the
        weights, so the export reads raw activations. ``metadata``: the run's fields, SAELens's names
        (``model_name``, ``hook_name``, ``context_size``, ``dataset_path``, ...: ``SAELENS_METADATA_KEYS``),
        written to ``cfg["metadata"]`` and, those SAELens reads there, to the top level too.
        """
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        metadata = dict(metadata or {})
        if self.saelens_architecture is None:
            raise ValueError(f"{type(self).__name__} has no SAELens export")
        if not is_real(activation_scale) or not math.isfinite(activation_scale) or not activation_scale > 0:
            raise ValueError(f"activation_scale must be a finite number > 0, got {activation_scale!r}")
        c = float(activation_scale)  # x_module = c * x_raw: W_enc * c, W_dec / c, b_dec / c
        cpu = lambda t: t.detach().float().cpu()  # noqa: E731
        tensors = {
            "W_enc": (cpu(self.W_enc) * c).T.contiguous(),
            "W_dec": cpu(self.W_dec) / c,
            "b_dec": cpu(self.b_dec) / c,
            **{name: cpu(t) for name, t in self._saelens_latent_tensors().items()},
        }
        threshold = self._saelens_threshold()
        if threshold is not None:  # on pre-activations, which the folding keeps
            tensors["threshold"] = cpu(threshold)
        cfg = {
            "architecture": self.saelens_architecture, "d_in": self.d_model, "d_sae": self.n_features,
            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", **self._saelens_cfg_extra(),
            **{k: v for k, v in metadata.items() if k in self.SAELENS_METADATA_KEYS}, "metadata": metadata,
        }  # fmt: skip
        return cfg, tensors

    @classmethod
    def _saelens_tensor_shapes(cls, d_in: int, d_sae: int, cfg: dict) -> dict:
        shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "b_enc": (d_sae,)}
        if cls.saelens_architecture == "jumprelu":
            shapes["threshold"] = (d_sae,)
        return shapes

    @classmethod
    def _saelens_reads(cls) -> tuple[str, ...]:
        """The SAELens architectures ``from_saelens`` reads into this class."""
        return (cls.saelens_architecture,) if cls.saelens_loadable else ()

    @classmethod
    def _from_saelens_cfg(cls, cfg: dict, d_in: int, d_sae: int, **kwargs):
        return cls(d_in, d_sae, **kwargs)

    def _load_saelens_extra(self, tensors: dict) -> None:
        pass

    @classmethod
    def from_saelens(cls, cfg: dict, tensors: dict, **kwargs):
        """The module of SAELens-format ``cfg`` (the ``cfg.json`` dict) and ``tensors`` (the
        ``sae_weights.safetensors`` dict): the inverse of ``to_saelens``. ``kwargs`` go to the
        constructor (``dtype``, ``device``, training options). Every tensor's shape is checked against
        ``cfg``'s ``d_in`` and ``d_sae`` (SAELens's W_enc is [d_in, d_sae], transposed here by rule), and
        the architecture, ``apply_b_dec_to_input`` and ``normalize_activations`` against what this class
        computes; a mismatch is a ValueError naming ``cfg`` or ``tensors``."""
        if not isinstance(cfg, dict):
            raise ValueError(f"cfg must be a dict (cfg.json's contents), got {type(cfg).__name__}")
        if not isinstance(tensors, dict):
            raise ValueError(
                f"tensors must be a dict of tensors (the safetensors file's), got {type(tensors).__name__}"
            )
        arch = cfg.get("architecture")
        reads = cls._saelens_reads()
        if arch not in reads:
            hints = {
                "jumprelu": "JumpReLUSparseAutoencoder",
                "jumprelu_transcoder": "JumpReLUTranscoder",
                "jumprelu_skip_transcoder": "JumpReLUTranscoder",
            }
            hint = (
                f" (SAELens's {arch!r}: load it with {hints[arch]}.from_saelens)"
                if arch in hints and hints[arch] != cls.__name__
                else ""
            )
            raise ValueError(
                f"cfg['architecture'] is {arch!r}, but {cls.__name__} loads "
                f"{' or '.join(map(repr, reads)) if reads else 'no SAELens architecture'}{hint}"
            )
        d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
        for name, value in (("d_in", d_in), ("d_sae", d_sae)):
            if not is_int(value) or value < 1:
                raise ValueError(f"cfg['{name}'] must be a positive int, got {value!r}")
        if cfg.get("apply_b_dec_to_input", True) is not cls.centres_input:
            raise ValueError(
                f"cfg['apply_b_dec_to_input'] must be {cls.centres_input}: "
                + ("flash-sae's SAEs subtract b_dec from x" if cls.centres_input else "a transcoder reads x as it is")
            )
        if cfg.get("normalize_activations", "none") != "none":
            raise ValueError(
                f"cfg['normalize_activations'] must be 'none' (fold the scaling into the weights), "
                f"got {cfg['normalize_activations']!r}"
            )
        shapes = cls._saelens_tensor_shapes(int(d_in), int(d_sae), cfg)
        missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
        if missing or extra:
            raise ValueError(
                f"tensors must hold exactly {sorted(shapes)} for cfg['architecture'] {arch!r}; "
                f"missing {missing}, unexpected {extra}"
            )
        for name, shape in shapes.items():
            t = tensors[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"tensors['{name}'] must be a float tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"tensors['{name}'] has shape {tuple(t.shape)} but cfg (d_in={d_in}, d_sae={d_sae}) "
                    f"needs {shape} (SAELens's layout: W_enc [d_in, d_sae], W_dec [d_sae, d_in])"
                )
        sae = cls._from_saelens_cfg(cfg, int(d_in), int(d_sae), **kwargs)
        with torch.no_grad():
            sae.W_enc.copy_(tensors["W_enc"].T)
            sae.W_dec.copy_(tensors["W_dec"])
            sae.b_dec.copy_(tensors["b_dec"])
            for name, p in sae._saelens_latent_tensors().items():
                p.copy_(tensors[name])
            sae._load_saelens_extra(tensors)
        return sae


class DeadLossOptions:
    """The dead-latent loss of the TopK and BatchTopK modules (mixin for ``SAEBase`` subclasses).

    ``dead_loss``: None (default), ``"auxk"``, ``"ghost"`` or a ``DeadLatentLoss`` without a mask
    (its options: ``k_aux``, ``coef``, ``relu``, ``encoder_grad``, ``capacity``; ``k_aux`` defaults to
    half the reconstruction's width, D // 2, a transcoder's D_out // 2). With one, ``loss``
    in training mode passes it with the current ``dead_mask()`` and ``dead_offset`` to its step,
    whose ``aux_loss`` reports the dead-latent loss, and then slides ``dead_offset`` past the window
    the step took (on device), so every dead latent gets its turn.
    """

    resample_encoder_scale = 1.0  # a TopK-family latent must outrank the live ones (see resample_dead_)

    def _set_dead_loss(self, dead_loss) -> None:
        dead_loss = DeadLatentLoss.of(dead_loss)
        if dead_loss is not None and (dead_loss.mask is not None or dead_loss.offset is not None):
            raise ValueError(
                "dead_loss: a module tracks its own dead set; pass a DeadLatentLoss without mask or offset"
            )
        self.dead_loss = None if dead_loss is None else dead_loss.with_defaults(self.d_out, self.n_features)
        # where the next step's dead set starts (``primitives.dead_set``), slid past each step's window
        self.register_buffer("dead_offset", torch.zeros((), dtype=torch.int64, device=self.W_dec.device))

    def step_dead_loss(self) -> DeadLatentLoss | None:
        """What the step gets: the dead-latent loss with this module's dead set, in training mode; else None."""
        if self.dead_loss is None or not self.training:
            return None
        return dataclasses.replace(self.dead_loss, mask=self._all_latents(self.dead_mask()), offset=self.dead_offset)

    @torch.no_grad()
    def _after_step(self, step, rows: int) -> None:
        if self.training and self.dead_loss is not None:  # the dead set the step took: counts not yet updated
            mask = self._all_latents(self.dead_mask())
            self.dead_offset.copy_(next_dead_offset(mask, self.dead_loss.capacity, self.dead_offset))
        super()._after_step(step, rows)


class UnitNormDecoder:
    """Decoder rows kept at unit norm through training (mixin for ``SAEBase`` subclasses): before each
    optimizer step the decoder gradient's component along each row is projected out, after it the
    rows are rescaled to unit norm."""

    def before_optimizer_step(self) -> None:
        self.remove_gradient_parallel_to_decoder_directions()

    def after_optimizer_step(self) -> None:
        self.set_decoder_norm_to_unit_norm()


class TopKSAEBase(UnitNormDecoder, DeadLossOptions, SAEBase):
    """A TopK SAE's parameters (``SAEBase``, normal unit-norm init) and its per-row ``k``.

    Subclasses define ``encode(x) -> (vals, indices)``, ``decode(vals, indices) -> x_hat``
    and ``_step(x)``. Keywords other than ``dead_loss`` (``DeadLossOptions``) go to ``SAEBase``.
    """

    fixed_width_code = True  # encode returns (vals, indices), both [B, k]

    def __init__(self, d_model, n_features, k, *, dead_loss=None, **kwargs):
        super().__init__(d_model, n_features, **kwargs)
        if not is_int(k) or not 1 <= k <= n_features:
            raise ValueError(f"k must be an int in [1, n_features={n_features}], got {k!r}")
        self.k = int(k)
        self._set_dead_loss(dead_loss)

    saelens_architecture = "topk"

    def _saelens_cfg_extra(self) -> dict:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def _from_saelens_cfg(cls, cfg, d_in, d_sae, **kwargs):
        if cfg.get("rescale_acts_by_decoder_norm", False) is not False:
            raise ValueError(
                "cfg['rescale_acts_by_decoder_norm'] must be False: the TopK module ranks raw pre-activations"
            )
        if "k" in kwargs:
            raise ValueError("k: a SAELens TopK SAE's k is cfg['k']; pass no k to from_saelens")
        k = cfg.get("k")
        if not is_int(k) or not 1 <= k <= d_sae:
            raise ValueError(f"cfg['k'] must be an int in [1, d_sae={d_sae}], got {k!r}")
        return cls(d_in, d_sae, int(k), **kwargs)


class SAELensInitBase(SAEBase):
    """``SAEBase`` with SAELens's initialisation: Kaiming-uniform decoder rows of norm ``decoder_init_norm``."""

    def __init__(self, d_model, n_features, *, decoder_init_norm=0.1, **kwargs):
        super().__init__(d_model, n_features, decoder_init="saelens", decoder_init_norm=decoder_init_norm, **kwargs)


class BatchTopKSAEBase(DeadLossOptions, SAELensInitBase):
    """A BatchTopK SAE: ``SAEBase`` with SAELens's init, ``k`` active latents per row on average,
    the decoder-norm rescaling flag, and the inference threshold (a float64 buffer, as SAELens
    keeps it), estimated on device during training as SAELens does: an exponential moving
    average, rate ``threshold_lr``, of each batch's smallest positive selected activation."""

    def __init__(
        self, d_model, n_features, k, *, rescale_acts_by_decoder_norm=True, threshold_lr=0.01, dead_loss=None, **kwargs
    ):  # fmt: skip
        super().__init__(d_model, n_features, **kwargs)
        self._set_dead_loss(dead_loss)
        if not is_real(k) or not 0 < k <= n_features:
            raise ValueError(f"k must be a number in (0, n_features={n_features}], got {k!r}")
        k = int(k) if is_int(k) else float(k)
        if not isinstance(rescale_acts_by_decoder_norm, bool):
            raise ValueError(f"rescale_acts_by_decoder_norm must be a bool, got {rescale_acts_by_decoder_norm!r}")
        if not is_real(threshold_lr) or not 0 < threshold_lr <= 1:
            raise ValueError(f"threshold_lr must be a number in (0, 1], got {threshold_lr!r}")
        self.k = k
        self.rescale_acts_by_decoder_norm = rescale_acts_by_decoder_norm
        self.threshold_lr = threshold_lr
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64, device=self.W_dec.device))
        # the threshold's updates so far, on device (a CUDA graph replays the increment); not in the
        # state_dict: a loaded positive threshold counts as warm (``_load_from_state_dict``)
        self.register_buffer(
            "threshold_updates", torch.zeros((), dtype=torch.int64, device=self.W_dec.device), persistent=False
        )  # fmt: skip
        self._threshold_checked = False  # eval mode found the threshold warm, or warned once

    @torch.no_grad()
    def _after_step(self, step, rows: int) -> None:
        if self.training:
            self.update_threshold(step.min_act)
        super()._after_step(step, rows)

    def threshold_warmup_steps(self) -> int:
        """The training steps after which the inference threshold counts as warm: 1 / ``threshold_lr``
        (the moving average's time constant; from 0 it has then reached 63 % of its target)."""
        return math.ceil(1 / self.threshold_lr)

    @torch.no_grad()
    def update_threshold(self, min_act: torch.Tensor) -> None:
        """threshold <- (1 - lr) * threshold + lr * min_act, skipped (on device) when no activation was positive."""
        new = (1 - self.threshold_lr) * self.threshold + self.threshold_lr * min_act.double()
        self.threshold.copy_(torch.where(torch.isfinite(min_act), new, self.threshold))
        self.threshold_updates.add_(1)

    def warn_if_threshold_cold(self) -> None:
        """In eval mode, once: a warning if the inference threshold has had fewer than
        ``threshold_warmup_steps()`` updates (eval-mode ``encode`` then keeps nearly every positive
        pre-activation: a dense code). Reads one device scalar, in eval mode only, until it finds
        the threshold warm or has warned."""
        if self.training or self._threshold_checked:
            return
        updates, need = int(self.threshold_updates), self.threshold_warmup_steps()
        self._threshold_checked = True
        if updates < need:
            warnings.warn(
                f"{type(self).__name__} in eval mode encodes with its inference threshold (pre * scale > "
                f"threshold), which has had {updates} of the {need} training steps it needs to warm up "
                f"(1 / threshold_lr); until then the code is nearly dense. Train longer, load a trained "
                "state_dict, or encode in train() mode (the batch rule). (If you set threshold yourself, "
                "ignore this.)",
                stacklevel=3,
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "threshold" in state_dict:  # a trained threshold (positive) counts as warm
            with torch.no_grad():
                warm = torch.full_like(self.threshold_updates, self.threshold_warmup_steps())
                self.threshold_updates.copy_(torch.where(self.threshold > 0, warm, self.threshold_updates))
            self._threshold_checked = False

    # SAELens's format: the inference rule (fires iff pre * ||W_dec[f]|| > threshold, value relu(pre))
    # as SAELens's JumpReLU (fires iff pre > threshold_f, value pre), as SAELens exports its BatchTopK
    # SAEs; it loads back with ``JumpReLUSparseAutoencoder.from_saelens``.
    saelens_architecture = "jumprelu"
    saelens_loadable = False

    # SAELens's training checkpoints (``SAE.save_model`` of its ``BatchTopKTrainingSAE``: architecture
    # ``"batchtopk"``, the scalar ``topk_threshold``) load into this class as they are.
    saelens_training_architecture = "batchtopk"

    @classmethod
    def _saelens_reads(cls) -> tuple[str, ...]:
        return (cls.saelens_training_architecture,)

    @classmethod
    def _saelens_tensor_shapes(cls, d_in: int, d_sae: int, cfg: dict) -> dict:
        shapes = {**super()._saelens_tensor_shapes(d_in, d_sae, cfg), "topk_threshold": ()}
        shapes.pop("threshold", None)  # the export's (``saelens_architecture``); a checkpoint holds topk_threshold
        return shapes

    @classmethod
    def _saelens_options(cls, cfg: dict, d_sae: int, kwargs: dict) -> dict:
        """The constructor's options a SAELens BatchTopK training cfg holds: k, the rescaling flag, the rate."""
        for name in ("k", "rescale_acts_by_decoder_norm"):
            if name in kwargs:
                raise ValueError(f"{name}: a SAELens BatchTopK SAE's {name} is cfg['{name}']; do not pass it")
        k = cfg.get("k")
        if not is_real(k) or not 0 < k <= d_sae:
            raise ValueError(f"cfg['k'] must be a number in (0, d_sae={d_sae}], got {k!r}")
        rescale = cfg.get("rescale_acts_by_decoder_norm", True)
        if not isinstance(rescale, bool):
            raise ValueError(f"cfg['rescale_acts_by_decoder_norm'] must be a bool, got {rescale!r}")
        options = {"rescale_acts_by_decoder_norm": rescale}
        if "topk_threshold_lr" in cfg and "threshold_lr" not in kwargs:
            options["threshold_lr"] = cfg["topk_threshold_lr"]
        return {"k": k, **options}

    @classmethod
    def _from_saelens_cfg(cls, cfg, d_in, d_sae, **kwargs):
        return cls(d_in, d_sae, **cls._saelens_options(cfg, d_sae, kwargs), **kwargs)

    def _load_saelens_extra(self, tensors: dict) -> None:
        self.threshold.copy_(tensors["topk_threshold"])
        warm = torch.full_like(self.threshold_updates, self.threshold_warmup_steps())  # a trained threshold is warm
        self.threshold_updates.copy_(torch.where(self.threshold > 0, warm, self.threshold_updates))
        self._threshold_checked = False

    def _saelens_threshold(self):
        theta = self.threshold.detach().double().expand(self.n_features)
        if self.rescale_acts_by_decoder_norm:  # a zero decoder row: inf, never fires (as here)
            theta = theta / self.W_dec.detach().double().norm(dim=1)
        return theta.float()

    def activation_scale(self):
        """The per-latent factor the selection ranks by: ||W_dec[f]|| when rescaling, else None."""
        return self.W_dec.detach().norm(dim=1) if self.rescale_acts_by_decoder_norm else None


class MatryoshkaSAEBase(BatchTopKSAEBase):
    """``BatchTopKSAEBase`` with nested dictionary sizes ``prefix_sizes`` m_1 < ... < m_G = F."""

    def __init__(self, d_model, n_features, k, *, prefix_sizes, **kwargs):
        if kwargs.get("dead_loss") is not None:
            raise ValueError("dead_loss: the Matryoshka steps have no dead-latent loss yet; use None")
        super().__init__(d_model, n_features, k, **kwargs)
        sizes = list(prefix_sizes) if isinstance(prefix_sizes, (list, tuple)) else None
        if (
            not sizes
            or any(not is_int(m) or m < 1 for m in sizes)
            or any(a >= b for a, b in zip(sizes, sizes[1:]))
            or sizes[-1] != n_features
        ):
            raise ValueError(
                f"prefix_sizes must be positive ints, strictly increasing, ending at n_features={n_features}; "
                f"got {prefix_sizes!r}"
            )
        self.prefix_sizes = [int(m) for m in sizes]

    def _sparsity_repr(self) -> str:
        return f"k={self.k}, prefix_sizes={self.prefix_sizes}"

    saelens_training_architecture = "matryoshka_batchtopk"

    @classmethod
    def _saelens_options(cls, cfg: dict, d_sae: int, kwargs: dict) -> dict:
        if "prefix_sizes" in kwargs:
            raise ValueError("prefix_sizes: a SAELens Matryoshka SAE's levels are cfg['matryoshka_widths']")
        widths = cfg.get("matryoshka_widths")
        if not isinstance(widths, list):
            raise ValueError(f"cfg['matryoshka_widths'] must be a list of ints, got {widths!r}")
        return {**super()._saelens_options(cfg, d_sae, kwargs), "prefix_sizes": widths}


class JumpReLUSAEBase(SAELensInitBase):
    """A JumpReLU SAE: ``SAEBase`` with SAELens's init and a learned per-latent threshold.

    ``threshold_parameterization``: ``"direct"`` (SAELens's default: a parameter ``threshold``
    kept in fp32, clamped at 0 before each step) or ``"log"`` (the paper's: a parameter
    ``log_threshold``, threshold = exp(log_threshold), fp32). ``init_threshold`` 0.01,
    ``bandwidth`` 0.05 and ``l0_coefficient`` 1.0 are SAELens's defaults.
    """

    def __init__(
        self,
        d_model,
        n_features,
        *,
        init_threshold=0.01,
        bandwidth=0.05,
        l0_coefficient=1.0,
        threshold_parameterization="direct",
        **kwargs,
    ):
        super().__init__(d_model, n_features, **kwargs)
        if threshold_parameterization not in ("direct", "log"):
            raise ValueError(
                f"threshold_parameterization must be 'direct' or 'log', got {threshold_parameterization!r}"
            )
        for name, value in (("init_threshold", init_threshold), ("bandwidth", bandwidth)):
            if not is_real(value) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not is_real(l0_coefficient) or not l0_coefficient >= 0:
            raise ValueError(f"l0_coefficient must be a number >= 0, got {l0_coefficient!r}")
        self.bandwidth, self.l0_coefficient = float(bandwidth), float(l0_coefficient)
        self.threshold_parameterization = threshold_parameterization
        init = torch.full((n_features,), float(init_threshold), dtype=torch.float32, device=self.W_dec.device)
        if threshold_parameterization == "direct":
            self.threshold = nn.Parameter(init)
        else:
            self.log_threshold = nn.Parameter(init.log())

    def _sparsity_repr(self) -> str:
        return f"bandwidth={self.bandwidth}, l0_coefficient={self.l0_coefficient}"

    saelens_architecture = "jumprelu"

    def _saelens_threshold(self):
        return self.current_threshold().detach()

    def _load_saelens_extra(self, tensors: dict) -> None:
        theta = tensors["threshold"].to(device=self.W_dec.device, dtype=torch.float32)
        if self.threshold_parameterization == "log":
            self.log_threshold.copy_(theta.log())
        else:
            self.threshold.copy_(theta)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """The direct threshold clamped at 0 (what ``current_threshold`` does before each step)."""
        if self.threshold_parameterization == "direct":
            self.threshold.clamp_(min=0.0)

    def current_threshold(self) -> torch.Tensor:
        """theta [F] fp32, differentiable in the threshold's parameter."""
        if self.threshold_parameterization == "log":
            return self.log_threshold.exp()
        # As SAELens: projected on .data (no version bump for autograd), not clamped in the graph.
        self.threshold.data.clamp_(min=0.0)
        return self.threshold

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype) casts every float parameter; the threshold stays fp32 (as SAELens keeps it),
        # restored from its value before the cast rather than cast back (no bf16 rounding on the way).
        names = [n for n in ("threshold", "log_threshold") if self._parameters.get(n) is not None]
        before = {n: self._parameters[n].data for n in names}
        out = super()._apply(fn, *args, **kwargs)
        for n in names:
            p = self._parameters[n]
            if p.dtype != torch.float32:
                p.data = before[n].to(device=p.device, dtype=torch.float32)
        return out


class StandardSAEBase(SAELensInitBase):
    """A standard SAE (ReLU code, L1 penalty weighted by the decoder rows' norms): ``SAEBase`` with
    SAELens's init and ``l1_coefficient`` (SAELens's default 1.0)."""

    def __init__(self, d_model, n_features, *, l1_coefficient=1.0, **kwargs):
        super().__init__(d_model, n_features, **kwargs)
        if not is_real(l1_coefficient) or not l1_coefficient >= 0:
            raise ValueError(f"l1_coefficient must be a number >= 0, got {l1_coefficient!r}")
        self.l1_coefficient = float(l1_coefficient)

    saelens_architecture = "standard"

    def _sparsity_repr(self) -> str:
        return f"l1_coefficient={self.l1_coefficient}"


class GatedSAEBase(StandardSAEBase):
    """A Gated SAE (Rajamanoharan et al. 2024): ``SAEBase``'s W_enc, W_dec and b_dec with SAELens's
    init, and in place of ``b_enc`` the gate's bias ``b_gate``, the magnitude path's log-scale
    ``r_mag`` and bias ``b_mag`` (all [F], zero at init, as SAELens's ``gated`` training SAE),
    ``l1_coefficient`` (``StandardSAEBase``'s, on the gate) and ``freeze_aux_decoder`` (see
    ``gated_sae_step``)."""

    def __init__(self, d_model, n_features, *, freeze_aux_decoder=True, **kwargs):
        super().__init__(d_model, n_features, **kwargs)
        if not isinstance(freeze_aux_decoder, bool):
            raise ValueError(f"freeze_aux_decoder must be a bool, got {freeze_aux_decoder!r}")
        self.freeze_aux_decoder = freeze_aux_decoder
        b_enc = self.b_enc
        del self.b_enc
        self.b_gate = nn.Parameter(torch.zeros_like(b_enc))
        self.r_mag = nn.Parameter(torch.zeros_like(b_enc))
        self.b_mag = nn.Parameter(torch.zeros_like(b_enc))

    def latent_vectors(self) -> tuple[nn.Parameter, ...]:
        return (self.b_gate, self.r_mag, self.b_mag)

    saelens_architecture = "gated"

    def _saelens_latent_tensors(self) -> dict:
        return {"b_gate": self.b_gate, "r_mag": self.r_mag, "b_mag": self.b_mag}

    @classmethod
    def _saelens_tensor_shapes(cls, d_in: int, d_sae: int, cfg: dict) -> dict:
        shapes = super()._saelens_tensor_shapes(d_in, d_sae, cfg)
        del shapes["b_enc"]
        return {**shapes, "b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)}

    def gated_params(self) -> tuple[nn.Parameter, ...]:
        """The step's six parameters after x, in its order: W_enc, b_gate, r_mag, b_mag, W_dec, b_dec."""
        return (self.W_enc, self.b_gate, self.r_mag, self.b_mag, self.W_dec, self.b_dec)

    def _sparsity_repr(self) -> str:
        return f"{super()._sparsity_repr()}, freeze_aux_decoder={self.freeze_aux_decoder}"
