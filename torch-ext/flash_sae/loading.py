"""Loading dictionaries trained elsewhere, from local files: SAELens, sparsify, Gemma Scope, circuit-tracer.

Each loader reads the files its package writes and returns the flash-sae module that computes the same
code and the same reconstruction (``docs/loading.md`` lists what maps to what). Nothing is downloaded
and no peer package is imported: the safetensors and ``.npz`` readers here use the standard library and
torch. The modules are dispatched through the architecture registry (``ARCHITECTURES``).

What a module cannot compute is refused with a ValueError naming the file's field (an unknown
architecture, a per-input normalisation, an activation other than the one the module computes), and a
missing file with a ValueError naming ``path``. What the weights can hold is folded into them, in fp64,
before the module's dtype is applied:

- SAELens's ``rescale_acts_by_decoder_norm`` of a TopK SAE: the decoder norms n_f go into the encoder
  (W_enc[:, f] * n_f, b_enc[f] * n_f, W_dec[f] / n_f), as SAELens's own inference export does;
- ``apply_b_dec_to_input=False`` of an SAE (and Gemma Scope's encoder, which reads x as it is): the
  flash-sae SAEs subtract b_dec, so b_enc += b_dec @ W_enc (a Gated SAE's b_gate and b_mag likewise);
- ``normalize_activations="expected_average_only_in"`` of a SAELens training checkpoint: the factor its
  ``activation_scaler.json`` holds, folded as ``SAE.fold_activation_norm_scaling_factor`` does.

The loaders never renormalise decoder rows: a file's rows load as they are (the TopK modules rescale
their rows only in ``after_optimizer_step``, while training).
"""

import ast
import json
import os
import pathlib
import re
import struct
import zipfile

import torch

from ._validation import is_int
from .architectures import ARCHITECTURES

# File readers -----------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_NPY_DTYPES = {
    "f8": torch.float64, "f4": torch.float32, "f2": torch.float16, "i8": torch.int64, "i4": torch.int32,
    "i2": torch.int16, "i1": torch.int8, "u1": torch.uint8, "b1": torch.bool,
}  # fmt: skip


def _tensor(buffer, dtype: torch.dtype, shape, source: str) -> torch.Tensor:
    numel = 1
    for n in shape:
        numel *= int(n)
    size = numel * torch.empty((), dtype=dtype).element_size()
    if len(buffer) < size:
        raise ValueError(f"path: {source} is truncated ({len(buffer)} bytes where {size} are needed)")
    if numel == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(buffer[:size]), dtype=dtype).reshape(tuple(shape))


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU, the stored dtypes), read with the standard library, one tensor
    at a time."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n <= path.stat().st_size else None
        except (struct.error, ValueError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict):
            raise ValueError(f"path: {path} is not a safetensors file")
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise ValueError(f"path: {path}'s tensor {name!r} has dtype {entry.get('dtype')!r}, which is not read")
            start, end = entry["data_offsets"]
            f.seek(8 + n + start)
            out[name] = _tensor(f.read(end - start), dtype, entry["shape"], f"{path}[{name!r}]")
        return out


def _read_npy(data: bytes, source: str) -> torch.Tensor:
    if data[:6] != b"\x93NUMPY":
        raise ValueError(f"path: {source} is not an .npy array")
    if data[6] == 1:
        (length,), start = struct.unpack("<H", data[8:10]), 10
    else:
        (length,), start = struct.unpack("<I", data[8:12]), 12
    header = ast.literal_eval(data[start : start + length].decode("latin1"))
    descr = header["descr"]
    if not isinstance(descr, str) or descr[0] not in "<|=" or descr[1:] not in _NPY_DTYPES:
        raise ValueError(f"path: {source} has dtype {descr!r}, which is not read (little-endian numbers only)")
    shape = tuple(header["shape"])
    if header["fortran_order"]:
        t = _tensor(data[start + length :], _NPY_DTYPES[descr[1:]], shape[::-1], source)
        return t.permute(*reversed(range(len(shape)))).contiguous()
    return _tensor(data[start + length :], _NPY_DTYPES[descr[1:]], shape, source)


def read_npz(path) -> dict[str, torch.Tensor]:
    """The arrays of a numpy ``.npz`` file (``numpy.savez``'s, compressed or not) as CPU tensors."""
    path = pathlib.Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            return {
                name[: -len(".npy")]: _read_npy(z.read(name), f"{path}[{name!r}]")
                for name in z.namelist()
                if name.endswith(".npy")
            }
    except zipfile.BadZipFile:
        raise ValueError(f"path: {path} is not an .npz file") from None


# Shared helpers ---------------------------------------------------------------------------


def _existing(path) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"path: {p} does not exist")
    return p


def _file(directory: pathlib.Path, name: str, what: str) -> pathlib.Path:
    if not directory.is_dir():
        raise ValueError(f"path: {directory} is not a directory (it should hold {name}, {what})")
    f = directory / name
    if not f.is_file():
        raise ValueError(f"path: {directory} holds no {name} ({what})")
    return f


def _read_json(path: pathlib.Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"path: {path} is not JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"path: {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _module_dtype(dtype, stored: torch.dtype) -> torch.dtype:
    """``dtype``, or the file's (``stored``) when None: fp32, bf16 or fp16; any other float loads as fp32."""
    if dtype is not None:
        return dtype
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _check_tensors(tensors: dict, shapes: dict, source: str) -> None:
    """``tensors`` holds exactly ``shapes``' names, each float of that shape; a ValueError names the tensor."""
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise ValueError(f"{source} must hold exactly {sorted(shapes)}; missing {missing}, unexpected {extra}")
    for name, shape in shapes.items():
        t = tensors[name]
        if not t.is_floating_point() or tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{source}[{name!r}] must be a float tensor of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}"
            )


@torch.no_grad()
def _copy_into(module, tensors: dict) -> None:
    """The module's parameters named in ``tensors`` <- those tensors (shapes checked by the caller)."""
    for name, t in tensors.items():
        getattr(module, name).copy_(t)


def _check_nonnegative(name: str, threshold: torch.Tensor) -> None:
    if bool((threshold < 0).any()):  # loading, not training: one read
        raise ValueError(
            f"{name} holds negative thresholds: this format computes z * (z > threshold) without a ReLU, which "
            "flash-sae's JumpReLU (threshold >= 0) does not"
        )


# SAELens ----------------------------------------------------------------------------------

# SAELens's architecture (cfg.json's ``architecture``) -> the flash-sae architecture it loads into
SAELENS_ARCHITECTURES = {
    "standard": "standard",
    "gated": "gated",
    "topk": "topk",
    "jumprelu": "jumprelu",  # also a BatchTopK or Matryoshka SAE's inference export
    "batchtopk": "batchtopk",  # SAELens's training checkpoint of a BatchTopK SAE
    "matryoshka_batchtopk": "matryoshka",
    "transcoder": "standard_transcoder",
    "skip_transcoder": "standard_transcoder",
    "jumprelu_transcoder": "jumprelu_transcoder",
    "jumprelu_skip_transcoder": "jumprelu_transcoder",
}


def _saelens_major_version(cfg: dict) -> int | None:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    match = re.match(r"\s*(\d+)", version) if isinstance(version, str) else None
    return int(match.group(1)) if match else None


def _saelens_pre_6_cfg(cfg: dict, tensors: dict) -> tuple[dict, dict]:
    """(cfg, tensors) as SAELens 6 reads a cfg.json without a ``sae_lens_version`` of 6 or later (its
    ``handle_pre_6_0_config`` and ``read_sae_components_from_disk``): ``activation_fn_str`` renamed
    ``activation_fn``; the architecture ``"standard"`` unless named, ``"topk"`` with cfg['activation_fn_kwargs']['k']
    for a TopK activation; ``apply_b_dec_to_input`` True unless given; a boolean or null
    ``normalize_activations`` as its name; a ``scaling_factor`` of ones dropped."""
    major = _saelens_major_version(cfg)
    if major is not None and major >= 6:
        return cfg, tensors
    cfg = dict(cfg)
    if "activation_fn_str" in cfg:
        cfg["activation_fn"] = cfg.pop("activation_fn_str")
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("apply_b_dec_to_input", True)
    norm = cfg.get("normalize_activations")
    if norm is None or isinstance(norm, bool):
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    k = (cfg.get("activation_fn_kwargs") or {}).get("k") if isinstance(cfg.get("activation_fn_kwargs"), dict) else None
    if cfg.get("activation_fn") == "topk" and k is not None:
        cfg["architecture"], cfg["k"] = "topk", k
    if "scaling_factor" in tensors:
        factor = tensors["scaling_factor"]
        if not bool(torch.all(factor == 1)):
            raise ValueError(
                "tensors['scaling_factor'] is a fine-tuning scale other than 1, which SAELens 6 no longer applies "
                "either; flash-sae loads it only when it is all ones"
            )
        tensors = {name: t for name, t in tensors.items() if name != "scaling_factor"}
    return cfg, tensors


def _saelens_training_options(cfg: dict, keyword_names: set) -> dict:
    """The training options a SAELens training cfg holds that mean the same for the flash-sae module."""
    options = {}
    if "jumprelu_bandwidth" in cfg:
        options["bandwidth"] = cfg["jumprelu_bandwidth"]
    if "l0_coefficient" in cfg and cfg.get("jumprelu_sparsity_loss_mode", "step") == "step":
        options["l0_coefficient"] = cfg["l0_coefficient"]  # SAELens's tanh and quadratic modes are not ours
    if "l1_coefficient" in cfg:
        options["l1_coefficient"] = cfg["l1_coefficient"]
    return {k: v for k, v in options.items() if k in keyword_names}


def _saelens_scale(cfg: dict, directory: pathlib.Path | None) -> float | None:
    """The activation scale to fold in, from ``normalize_activations`` (None: nothing to fold)."""
    mode = cfg.get("normalize_activations", "none")
    if mode == "none":
        return None
    if mode == "expected_average_only_in":
        scaler = directory / "activation_scaler.json" if directory is not None else None
        state = _read_json(scaler) if scaler is not None and scaler.is_file() else {}
        factor = state.get("scaling_factor")
        if state.get("has_whitening") or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(
                "cfg['normalize_activations'] is 'expected_average_only_in', but the directory holds no "
                "activation_scaler.json with a positive scaling_factor (SAELens's training checkpoints do): the "
                "factor is not in the weights. Fold it (SAELens: sae.fold_activation_norm_scaling_factor) and save "
                "again"
            )
        return float(factor)
    raise ValueError(
        f"cfg['normalize_activations'] is {mode!r}: a normalisation computed per input (or a whitening) is not "
        "a linear map the flash-sae modules' weights can hold; flash-sae loads 'none' and "
        "'expected_average_only_in'"
    )


def _fold_saelens(module_cls, cfg: dict, tensors: dict, scale: float | None) -> tuple[dict, dict]:
    """(cfg, tensors) with what the weights can hold folded in (module docstring), in fp64."""
    rescale_topk = cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm", False) is True
    uncentred = module_cls.centres_input and cfg.get("apply_b_dec_to_input", True) is False
    if scale is None and not rescale_topk and not uncentred:
        return cfg, tensors
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    for name, value in (("d_in", d_in), ("d_sae", d_sae)):
        if not is_int(value) or value < 1:
            raise ValueError(f"cfg['{name}'] must be a positive int, got {value!r}")
    _check_tensors(tensors, module_cls._saelens_tensor_shapes(int(d_in), int(d_sae), cfg), "tensors")
    t = {name: v.double() for name, v in tensors.items()}
    if scale is not None:  # SAELens's fold_activation_norm_scaling_factor
        t["W_enc"], t["W_dec"], t["b_dec"] = t["W_enc"] * scale, t["W_dec"] / scale, t["b_dec"] / scale
        if "topk_threshold" in t and cfg.get("rescale_acts_by_decoder_norm", True):
            t["topk_threshold"] = t["topk_threshold"] / scale  # in units of pre * ||W_dec[f]||
    if uncentred:  # the module subtracts b_dec: add back what that takes from the pre-activations
        shift = t["b_dec"] @ t["W_enc"]
        if "b_gate" in t:
            t["b_gate"], t["b_mag"] = t["b_gate"] + shift, t["b_mag"] + shift * t["r_mag"].exp()
        else:
            t["b_enc"] = t["b_enc"] + shift
    if rescale_topk:  # SAELens's own inference export (its get_W_dec_norm clamps at 1e-8)
        n = t["W_dec"].norm(dim=1).clamp_min(1e-8)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
    cfg = {**cfg, "normalize_activations": "none"}
    if uncentred:
        cfg["apply_b_dec_to_input"] = True
    if rescale_topk:
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg, t


def _module_from_saelens(cfg: dict, tensors: dict, directory, device, dtype, options: dict):
    """The flash-sae module of a SAELens cfg and tensors (``load_saelens``'s and ``load_gemma_scope``'s core)."""
    arch = cfg.get("architecture")
    if arch not in SAELENS_ARCHITECTURES:
        raise ValueError(
            f"cfg['architecture'] is {arch!r}, which flash-sae does not load; it loads SAELens's "
            f"{sorted(SAELENS_ARCHITECTURES)}"
        )
    module_cls = ARCHITECTURES[SAELENS_ARCHITECTURES[arch]].module
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise ValueError(f"cfg['reshape_activations'] must be 'none' or 'hook_z', got {cfg['reshape_activations']!r}")
    scale = _saelens_scale(cfg, directory)
    if scale is not None and not module_cls.centres_input:
        raise ValueError(
            "cfg['normalize_activations']: a transcoder's input scale cannot be folded without its output's; "
            "flash-sae loads transcoders with 'none'"
        )
    stored = tensors["W_enc"].dtype if "W_enc" in tensors else torch.float32  # from_saelens names what is missing
    cfg, tensors = _fold_saelens(module_cls, cfg, tensors, scale)
    sparsity = ARCHITECTURES[SAELENS_ARCHITECTURES[arch]].sparsity
    allowed = {sparsity} | ({"bandwidth"} if sparsity == "l0_coefficient" else set())
    kwargs = {**_saelens_training_options(cfg, allowed), **options}
    kwargs.update(dtype=_module_dtype(dtype, stored), device=device)
    return module_cls.from_saelens(cfg, tensors, **kwargs)


def load_saelens(path, *, device=None, dtype=None, **options):
    """The flash-sae module of a SAELens SAE or transcoder saved on disk (``SAE.save_model``,
    ``TrainingSAE.save_model`` or ``save_inference_model``): a directory holding ``cfg.json`` and
    ``sae_weights.safetensors``.

    By ``cfg['architecture']``: ``"standard"`` -> ``StandardSparseAutoencoder``, ``"gated"`` ->
    ``GatedSparseAutoencoder``, ``"topk"`` -> ``SparseAutoencoder``, ``"jumprelu"`` ->
    ``JumpReLUSparseAutoencoder`` (SAELens's inference export of a BatchTopK or Matryoshka SAE is one),
    ``"batchtopk"`` -> ``BatchTopKSparseAutoencoder`` and ``"matryoshka_batchtopk"`` ->
    ``MatryoshkaBatchTopKSparseAutoencoder`` (SAELens's training checkpoints: k, the decoder-norm flag, the
    widths and the inference threshold ``topk_threshold`` load as they are), ``"transcoder"`` /
    ``"skip_transcoder"`` -> ``StandardTranscoder``, ``"jumprelu_transcoder"`` /
    ``"jumprelu_skip_transcoder"`` -> ``JumpReLUTranscoder`` (d_out and the skip term from the cfg).
    SAELens's ``abstopk``, ``temporal`` and ``matching_pursuit`` SAEs are a ValueError.

    Folded into the weights (the module docstring): a TopK SAE's ``rescale_acts_by_decoder_norm``, an
    SAE's ``apply_b_dec_to_input=False``, and ``normalize_activations="expected_average_only_in"`` with
    the factor of the checkpoint's ``activation_scaler.json``; any other ``normalize_activations`` is a
    ValueError. A cfg.json written before SAELens 6 is read as SAELens 6 reads it (a TopK activation
    named in ``activation_fn_kwargs`` makes a TopK SAE). ``reshape_activations="hook_z"`` loads as it
    is: pass the heads flattened, [B, n_heads * d_head]. A training cfg's options that mean the same
    here are read too (``jumprelu_bandwidth``, ``l0_coefficient`` with the ``"step"`` loss,
    ``l1_coefficient``, ``topk_threshold_lr``).

    Args:
        path: the directory.
        device: where the parameters go (None: the CPU).
        dtype: the parameters' dtype (fp32, bf16 or fp16; None: the file's, fp64 as fp32).
        options: other constructor keywords of the module (``dead_loss``, ``capacity_per_row``, ...).

    Returns:
        the module, in training mode (``.eval()`` for a BatchTopK module's threshold rule).
    """
    directory = _existing(path)
    cfg = _read_json(_file(directory, "cfg.json", "SAELens's config"))
    tensors = read_safetensors(_file(directory, "sae_weights.safetensors", "SAELens's weights"))
    cfg, tensors = _saelens_pre_6_cfg(cfg, tensors)
    return _module_from_saelens(cfg, tensors, directory, device, dtype, options)


# sparsify ---------------------------------------------------------------------------------


def _sparsify_coder(directory: pathlib.Path, device, dtype, options: dict):
    cfg = _read_json(_file(directory, "cfg.json", "sparsify's config"))
    tensors = read_safetensors(_file(directory, "sae.safetensors", "sparsify's weights"))
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(
            f"cfg['activation'] is {cfg['activation']!r}: flash-sae loads sparsify's 'topk' coders (the k largest "
            "ReLU'd pre-activations per row)"
        )
    d_in, k, transcode, skip = cfg.get("d_in"), cfg.get("k"), cfg.get("transcode", False), cfg.get("skip_connection")
    if not is_int(d_in) or d_in < 1:
        raise ValueError(f"cfg['d_in'] must be a positive int, got {d_in!r}")
    n = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)
    if not is_int(n) or n < 1:
        raise ValueError(f"cfg['num_latents'] (or d_in * cfg['expansion_factor']) must be a positive int, got {n!r}")
    if not is_int(k) or not 1 <= k <= n:
        raise ValueError(f"cfg['k'] must be an int in [1, {n}], got {k!r}")
    if skip and not transcode:
        raise ValueError(
            "cfg['skip_connection']: a sparse autoencoder (transcode=False) with a skip connection; flash-sae's "
            "skip term belongs to its transcoders"
        )
    shapes = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if skip:
        shapes["W_skip"] = (d_in, d_in)
    _check_tensors(tensors, shapes, f"{directory / 'sae.safetensors'}")
    if transcode:
        module_cls, extra = ARCHITECTURES["topk_transcoder"].module, {"d_out": d_in, "skip": bool(skip)}
    else:
        module_cls, extra = ARCHITECTURES["topk"].module, {}
    module = module_cls(
        d_in, n, k, dtype=_module_dtype(dtype, tensors["encoder.weight"].dtype), device=device, **extra, **options
    )
    weights = {"W_enc": tensors.pop("encoder.weight"), "b_enc": tensors.pop("encoder.bias"), **tensors}
    _copy_into(module, weights)
    return module


def load_sparsify(path, *, hookpoint=None, device=None, dtype=None, **options):
    """flash-sae modules of EleutherAI sparsify's sparse coders saved on disk (``SparseCoder.save_to_disk``:
    a directory holding ``cfg.json`` and ``sae.safetensors``, one per hookpoint).

    A TopK coder (``activation="topk"``) loads as ``SparseAutoencoder``; a transcoder (``transcode=True``)
    as ``TopKTranscoder`` (d_out = d_in, ``W_skip`` with ``skip_connection``). sparsify's encoder,
    ``topk(relu(pre))`` with pre = (x - b_dec) @ W_enc.T + b_enc (an SAE; a transcoder reads x as it is),
    keeps the same values as flash-sae's ``relu(topk(pre))``; on a row with fewer than k positive
    pre-activations the zero-valued entries may name other latents, which decode to nothing. The
    training options ``multi_topk`` and ``normalize_decoder`` do not change the computation; the
    ``groupmax`` activation and an SAE with a skip connection are ValueErrors.

    Args:
        path: a coder's directory (``cfg.json`` in it), or a training run's directory holding one folder per
            hookpoint.
        hookpoint: with a run's directory, the folder to load (e.g. ``"layers.6.mlp"``); None loads them all.
        device, dtype, options: as ``load_saelens``.

    Returns:
        the module for a coder's directory or a ``hookpoint``; for a run's directory without one, a dict
        hookpoint -> module, in natural order (``layers.2`` before ``layers.10``).
    """
    directory = _existing(path)
    if hookpoint is not None:
        if not isinstance(hookpoint, str) or not hookpoint:
            raise ValueError(f"hookpoint must be a folder name (a non-empty str) or None, got {hookpoint!r}")
        if not (directory / hookpoint / "cfg.json").is_file():
            have = sorted((d.name for d in directory.iterdir() if (d / "cfg.json").is_file()), key=_natural_key)
            raise ValueError(f"hookpoint {hookpoint!r} is not a coder's folder in {directory}; it holds {have}")
        return _sparsify_coder(directory / hookpoint, device, dtype, options)
    if not directory.is_dir():
        raise ValueError(f"path: {directory} is not a directory (a coder's, or a run's with one folder per hookpoint)")
    if (directory / "cfg.json").is_file():
        return _sparsify_coder(directory, device, dtype, options)
    names = sorted((d.name for d in directory.iterdir() if (d / "cfg.json").is_file()), key=_natural_key)
    if not names:
        raise ValueError(f"path: {directory} holds neither cfg.json nor hookpoint folders with one")
    return {name: _sparsify_coder(directory / name, device, dtype, options) for name in names}


# Gemma Scope ------------------------------------------------------------------------------

GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def _read_params(path: pathlib.Path, default_name: str) -> tuple[pathlib.Path, dict]:
    """(file, tensors) of an ``.npz`` or ``.safetensors`` file (a directory: its ``default_name``)."""
    if path.is_dir():
        path = _file(path, default_name, "the parameters")
    if path.suffix == ".npz":
        return path, read_npz(path)
    if path.suffix == ".safetensors":
        return path, read_safetensors(path)
    raise ValueError(f"path: {path} must be an .npz or a .safetensors file")


def load_gemma_scope(path, *, device=None, dtype=None, **options):
    """A ``JumpReLUSparseAutoencoder`` of a Gemma Scope SAE: its ``params.npz`` (or a directory holding it),
    or a safetensors file with the same keys.

    The file holds ``W_enc`` [D, F], ``W_dec`` [F, D], ``b_enc`` [F], ``b_dec`` [D] and ``threshold`` [F]
    (``w_enc`` / ``w_dec`` are read as ``W_enc`` / ``W_dec``). Gemma Scope computes
    a = relu(z) * (z > threshold) with z = x @ W_enc + b_enc, x read as it is, and x_hat = a @ W_dec + b_dec;
    the module reads x - b_dec, so b_dec @ W_enc is folded into b_enc (in fp64). The decoder rows load as
    they are (not unit norm), and the threshold as the module's fp32 ``threshold`` parameter.

    Args:
        path: the file, or a directory holding ``params.npz``.
        device, dtype, options: as ``load_saelens``.
    """
    file, tensors = _read_params(_existing(path), "params.npz")
    tensors = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}
    missing, extra = sorted(set(GEMMA_SCOPE_KEYS) - set(tensors)), sorted(set(tensors) - set(GEMMA_SCOPE_KEYS))
    if missing or extra:
        raise ValueError(
            f"path: {file} must hold exactly {list(GEMMA_SCOPE_KEYS)} (Gemma Scope's layout); missing {missing}, "
            f"unexpected {extra}"
        )
    if tensors["W_enc"].dim() != 2:
        raise ValueError(f"path: {file}'s W_enc must be [D, F], got {tuple(tensors['W_enc'].shape)}")
    d_in, d_sae = tensors["W_enc"].shape
    cfg = {"architecture": "jumprelu", "d_in": int(d_in), "d_sae": int(d_sae), "apply_b_dec_to_input": False}
    return _module_from_saelens(cfg, tensors, None, device, dtype, options)


# circuit-tracer ---------------------------------------------------------------------------


def _circuit_tracer_transcoder(file: pathlib.Path, device, dtype, options: dict):
    """One of circuit-tracer's single-layer transcoders: its safetensors file (``SingleLayerTranscoder.
    to_safetensors``) or a Gemma Scope transcoder's ``.npz`` (``load_gemma_scope_transcoder``)."""
    file, tensors = _read_params(file, "params.npz")
    if file.suffix == ".npz":  # Gemma Scope's layout: W_enc [D, F], threshold
        tensors = dict(tensors)
        if "W_enc" in tensors:
            tensors["W_enc"] = tensors["W_enc"].T
        if "threshold" in tensors:
            tensors["activation_function.threshold"] = tensors.pop("threshold")
    if "b_enc" not in tensors or "b_dec" not in tensors or tensors["b_dec"].dim() != 1:
        raise ValueError(f"path: {file} must hold b_enc [F] and b_dec [D] (circuit-tracer's transcoder layout)")
    F, D = tensors["b_enc"].shape[0], tensors["b_dec"].shape[0]
    shapes = {"W_enc": (F, D), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,)}
    jumprelu = "activation_function.threshold" in tensors
    if jumprelu:
        shapes["activation_function.threshold"] = (F,)
    skip = "W_skip" in tensors
    if skip:
        shapes["W_skip"] = (D, D)
    _check_tensors(tensors, shapes, str(file))
    weights = {name: tensors[name] for name in ("W_enc", "W_dec", "b_enc", "b_dec") + (("W_skip",) if skip else ())}
    if jumprelu:
        _check_nonnegative(f"{file}['activation_function.threshold']", tensors["activation_function.threshold"])
        weights["threshold"] = tensors["activation_function.threshold"]
    module_cls = ARCHITECTURES["jumprelu_transcoder" if jumprelu else "standard_transcoder"].module
    if jumprelu and options.get("threshold_parameterization", "direct") != "direct":
        raise ValueError("threshold_parameterization: circuit-tracer's thresholds load as the direct parameter")
    module = module_cls(D, F, d_out=D, skip=skip, dtype=_module_dtype(dtype, tensors["W_enc"].dtype), device=device,
                        **options)  # fmt: skip
    _copy_into(module, weights)
    return module


def _circuit_tracer_clt(directory: pathlib.Path, device, dtype, options: dict):
    n_layers = 0
    while (directory / f"W_enc_{n_layers}.safetensors").is_file():
        n_layers += 1
    tensors = {}
    for layer in range(n_layers):
        tensors.update(read_safetensors(directory / f"W_enc_{layer}.safetensors"))
        tensors.update(read_safetensors(_file(directory, f"W_dec_{layer}.safetensors", f"layer {layer}'s decoder")))
    if any(name.startswith("W_skip") for name in tensors):
        raise ValueError(f"path: {directory} holds a skip connection (W_skip), which flash-sae's CLTs do not have")
    F, D = tensors["W_enc_0"].shape
    relu = "threshold_0" not in tensors
    for layer in range(n_layers):
        shapes = {f"W_enc_{layer}": (F, D), f"b_enc_{layer}": (F,), f"b_dec_{layer}": (D,),
                  f"W_dec_{layer}": (F, n_layers - layer, D)}  # fmt: skip
        if not relu:
            shapes[f"threshold_{layer}"] = (F,)
        _check_tensors({n: tensors.get(n, torch.empty(0)) for n in shapes}, shapes, str(directory))
        if not relu:
            _check_nonnegative(f"{directory}['threshold_{layer}']", tensors[f"threshold_{layer}"])
        else:  # a ReLU CLT: the JumpReLU rule at threshold 0 computes it
            tensors[f"threshold_{layer}"] = torch.zeros(F)
    module_cls = ARCHITECTURES["jumprelu_clt"].module
    return module_cls.from_circuit_tracer(tensors, dtype=_module_dtype(dtype, tensors["W_enc_0"].dtype), device=device,
                                          **options)  # fmt: skip


def load_circuit_tracer(path, *, device=None, dtype=None, **options):
    """flash-sae modules of the transcoders circuit-tracer reads from local files.

    - A cross-layer transcoder's directory (``CrossLayerTranscoder.to_safetensors``, what ``load_clt``
      reads: ``W_enc_{l}.safetensors`` with ``W_enc_{l}`` [F, D], ``b_enc_{l}``, ``b_dec_{l}`` and
      ``threshold_{l}`` for a JumpReLU CLT; ``W_dec_{l}.safetensors`` with ``W_dec_{l}`` [F, L - l, D]) ->
      ``JumpReLUCrossLayerTranscoder``. A ReLU CLT (no thresholds) loads with threshold 0, which computes
      the same code (its ``log_threshold`` is then log of fp32's smallest normal number).
    - A directory of per-layer transcoders (``TranscoderSet.to_safetensors``: ``layer_{i}.safetensors``,
      what ``load_transcoder_set`` reads) -> a list of transcoders, layer 0 first.
    - One transcoder's file: a ``.safetensors`` (``SingleLayerTranscoder.to_safetensors``: ``W_enc`` [F,
      D], ``W_dec`` [F, D], ``b_enc``, ``b_dec``, ``activation_function.threshold`` for JumpReLU, ``W_skip``
      [D, D]) or a Gemma Scope transcoder's ``.npz`` -> ``JumpReLUTranscoder`` (a threshold) or
      ``StandardTranscoder`` (ReLU), d_out = d_in.

    circuit-tracer's JumpReLU computes z * (z > threshold) without a ReLU, so a negative threshold is a
    ValueError; a CLT with a skip connection is one too.

    Args:
        path: the directory or the file.
        device, dtype, options: as ``load_saelens``.
    """
    p = _existing(path)
    if p.is_dir() and (p / "W_enc_0.safetensors").is_file():
        return _circuit_tracer_clt(p, device, dtype, options)
    if p.is_dir():
        layers = {}
        for f in p.glob("layer_*.safetensors"):
            match = re.fullmatch(r"layer_(\d+)\.safetensors", f.name)
            if match:
                layers[int(match.group(1))] = f
        if not layers:
            raise ValueError(
                f"path: {p} holds neither W_enc_0.safetensors (a cross-layer transcoder) nor layer_{{i}}.safetensors "
                "(per-layer transcoders)"
            )
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"path: {p}'s layer files must be layer_0 .. layer_{{L-1}}, got layers {sorted(layers)}")
        return [_circuit_tracer_transcoder(layers[i], device, dtype, options) for i in range(len(layers))]
    return _circuit_tracer_transcoder(p, device, dtype, options)
