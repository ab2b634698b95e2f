"""Argument validation for every public op, in one module.

Each public function validates here before anything is launched, so a bad call
fails with a ``ValueError`` that names the offending argument instead of a
crash, a wrong answer or an illegal memory access. Dtype rule: every float
tensor takes the weights' dtype (``weight``, or ``W_enc`` for the encoder
ops); a mismatch names the tensor to cast. None of these checks reads tensor
values except ``check_index_range``, which is a host sync and runs only where
``resolve_validate`` asks for it.
"""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def is_int(value) -> bool:
    """An int count: ``int`` or any ``numbers.Integral`` (numpy's integers), but not ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_count(value):
    """A count given as any integer type (numpy's too) as a Python ``int``; anything else unchanged, for
    ``check_int`` to report by name."""
    return int(value) if is_int(value) else value


def is_real(value) -> bool:
    """A real number: ``int``, ``float`` or any ``numbers.Real`` (numpy's scalars), but not ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_float_dtype(name: str, dtype) -> torch.dtype:
    """A parameters' dtype: fp32, bf16 or fp16 (a ``torch.dtype``, not a string); returns it."""
    allowed = ", ".join(str(d) for d in FLOAT_DTYPES)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name} must be a torch.dtype, one of ({allowed}), got {dtype!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of ({allowed}), got {dtype}: the kernels support no other dtype")
    return dtype


def check_tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        hint = ""
        if ndim == 2 and t.ndim > 2:
            hint = (
                f"; flatten the leading dimensions first: {name}.reshape(-1, {t.shape[-1]}) "
                f"({name}.flatten(0, -2)), and reshape the result back"
            )
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}{hint}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; all tensors must be on one device"
            )


def check_same_dtype(ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Every tensor in ``tensors`` must have ``ref``'s dtype (``ref`` is the weight the rule follows)."""
    for name, t in tensors.items():
        if t is not None and t.dtype != ref.dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; every float tensor takes "
                f"{ref_name}'s dtype: cast {name} with .to({ref_name}.dtype)"
            )


def check_int(name: str, value, low: int, high: int, *, integral: bool = False) -> None:
    """``value`` an int count in [low, high]. ``integral``: any ``numbers.Integral`` but bool (numpy's
    integers too), for a caller that uses ``int(value)``; else a Python ``int`` (the value is passed on
    as it is, to code that needs an ``int``)."""
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not integral and not isinstance(value, int):
        raise ValueError(f"{name} must be a Python int, got {type(value).__name__}: pass {name}=int({name})")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {name}={value}")


# The sparse code and the decoder ------------------------------------------------


def check_sparse_code(vals, indices, weight, *, allow_empty: bool) -> tuple[int, int, int, int]:
    """Validates a code (vals, indices) over ``weight``'s rows; returns (B, K, F, D)."""
    if isinstance(vals, torch.Tensor) and isinstance(indices, torch.Tensor):
        if indices.is_floating_point() and not vals.is_floating_point():
            raise ValueError(
                "vals and indices look swapped (indices is float, vals is not): flash-sae takes a code as "
                "(vals, indices), the order torch.topk returns; only the flex-sae losses keep flex-sae's "
                "(indices, weight, vals, ...)"
            )
    check_tensor("indices", indices, 2, INDEX_DTYPES)
    check_tensor("weight", weight, 2)
    check_tensor("vals", vals, 2)
    B, K = indices.shape
    F, D = weight.shape
    check_shape("vals", vals, (B, K))
    if F < 1:
        raise ValueError(f"weight must have at least one row (F >= 1), got shape {(F, D)}")
    if D < 1:
        raise ValueError(f"weight must have at least one column (D >= 1), got shape {(F, D)}")
    if K > F:
        raise ValueError(f"indices has K={K} columns but weight has only F={F} rows; K must be <= F")
    if not allow_empty:
        if B == 0:
            raise ValueError("indices is an empty batch (B = 0); the mean loss of no rows is undefined")
        if K == 0:
            raise ValueError("indices has K = 0 columns; the loss needs at least one active latent")
    check_same_dtype("weight", weight, vals=vals)
    return B, K, F, D


def check_varlen_code(vals, indices, row_offsets, weight) -> tuple[int, int, int, int]:
    """Validates a variable-length code over ``weight``'s rows; returns (B, N, F, D).

    vals [N] (weight's dtype), indices [N] int32/int64, row_offsets [B + 1] int32/int64, all on
    weight's device. The offsets' values are checked by ``check_row_offsets`` (a host sync).
    """
    check_tensor("indices", indices, 1, INDEX_DTYPES)
    check_tensor("vals", vals, 1)
    check_tensor("row_offsets", row_offsets, 1, INDEX_DTYPES)
    check_tensor("weight", weight, 2)
    N = indices.shape[0]
    check_shape("vals", vals, (N,))
    if row_offsets.shape[0] < 1:
        raise ValueError("row_offsets must have B + 1 >= 1 entries, got an empty tensor")
    F, D = weight.shape
    if F < 1 or D < 1:
        raise ValueError(f"weight must have at least one row and one column, got shape {(F, D)}")
    check_same_dtype("weight", weight, vals=vals)
    check_same_device(weight=weight, vals=vals, indices=indices, row_offsets=row_offsets)
    return row_offsets.shape[0] - 1, N, F, D


def check_row_offsets(row_offsets: torch.Tensor, N: int) -> None:
    """Raises ValueError unless row_offsets starts at 0, never decreases and ends at most at N. Syncs."""
    if int(row_offsets[0]) != 0:
        raise ValueError(f"row_offsets must start at 0, got {int(row_offsets[0])}")
    if bool((row_offsets.diff() < 0).any()):
        raise ValueError("row_offsets must be non-decreasing")
    if int(row_offsets[-1]) > N:
        raise ValueError(f"row_offsets must end at most at N={N} (the code's length), got {int(row_offsets[-1])}")


def check_bias(name: str, bias, D: int, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor(name, bias, 1)
    check_shape(name, bias, (D,))
    check_same_dtype(ref_name, ref, **{name: bias})


def check_decoder_loss_args(indices, weight, vals, bias, target) -> tuple[int, int, int, int]:
    """The decoder losses' arguments (flex-sae's order); returns (B, K, F, D)."""
    B, K, F, D = check_sparse_code(vals, indices, weight, allow_empty=False)
    check_bias("bias", bias, D, "weight", weight)
    check_tensor("target", target, 2)
    check_shape("target", target, (B, D))
    check_same_dtype("weight", weight, target=target)
    check_same_device(weight=weight, indices=indices, vals=vals, bias=bias, target=target)
    return B, K, F, D


def check_index_range(indices: torch.Tensor, F: int) -> None:
    """Raises ValueError if any index is outside [0, F). Synchronises with the device."""
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= F)
    if bool(bad.any()):
        first = int(indices[bad][0])
        raise ValueError(f"indices must lie in [0, F={F}); found {first}")


def resolve_validate(validate, indices: torch.Tensor) -> bool:
    """``None`` means: check the index range where it costs no device sync (CPU tensors)."""
    if validate is None:
        return indices.device.type == "cpu"
    if not isinstance(validate, bool):
        raise ValueError(f"validate must be None, True or False, got {validate!r}")
    return validate


# The encoder and the full step ----------------------------------------------------


def check_encoder_args(x, W_enc, b_enc, k, b_dec) -> tuple[int, int, int]:
    """The encoder ops' arguments; returns (B, D, F)."""
    check_tensor("x", x, 2)
    check_tensor("W_enc", W_enc, 2)
    check_tensor("b_enc", b_enc, 1)
    B, D = x.shape
    F = W_enc.shape[0]
    if B == 0:
        raise ValueError("x is an empty batch (B = 0); there is nothing to encode")
    if D == 0:
        raise ValueError("x has D = 0 columns")
    if W_enc.shape[1] != D:
        raise ValueError(
            f"x has D={D} columns but W_enc {tuple(W_enc.shape)} expects D={W_enc.shape[1]}: "
            f"x must have shape (B, {W_enc.shape[1]})"
        )
    if F == 0 or F >= 2**31:
        raise ValueError(f"W_enc must have 1 <= F < 2^31 rows, got F={F}")
    check_shape("b_enc", b_enc, (F,))
    if b_dec is not None:
        check_tensor("b_dec", b_dec, 1)
        check_shape("b_dec", b_dec, (D,))
    check_int("k", k, 1, F)
    check_same_dtype("W_enc", W_enc, x=x, b_enc=b_enc, b_dec=b_dec)
    check_same_device(W_enc=W_enc, x=x, b_enc=b_enc, b_dec=b_dec)
    return B, D, F


def check_step_args(x, W_enc, b_enc, W_dec, b_dec, k) -> tuple[int, int, int]:
    """A full SAE step's arguments (encoder, then decoder); returns (B, D, F)."""
    if b_dec is None:
        raise ValueError("b_dec must be a [D] tensor (use zeros for an SAE without a decoder bias)")
    B, D, F = check_encoder_args(x, W_enc, b_enc, k, b_dec)
    check_tensor("W_dec", W_dec, 2)
    if tuple(W_dec.shape) != tuple(W_enc.shape):
        raise ValueError(f"W_dec must have W_enc's shape {tuple(W_enc.shape)}, got {tuple(W_dec.shape)}")
    check_same_dtype("W_enc", W_enc, W_dec=W_dec)
    check_same_device(W_enc=W_enc, W_dec=W_dec)
    return B, D, F


def check_batch_k(k, B: int, F: int) -> int:
    """BatchTopK's k: active latents per row on average (int or float); returns N = int(k * B)."""
    if not is_real(k):
        raise ValueError(f"k must be an int or a float, got {type(k).__name__}")
    if not math.isfinite(k):
        raise ValueError(f"k must be a finite number, got k={k}")
    n = int(k * B)
    if not 1 <= n <= B * F:
        raise ValueError(f"k must give 1 <= int(k * B) <= B * F = {B * F} selected entries, got k={k} (B={B})")
    return n


def check_jumprelu_args(threshold, F: int, capacity, bandwidth, l0_coefficient, x) -> None:
    """JumpReLU's arguments. The threshold must be >= 0, as the modules keep it (a positive
    ``init_threshold``; the direct parameter clamped at 0 before each step, the log one positive):
    checked where reading it costs no device sync (a CPU tensor); on a GPU it is not read."""
    check_tensor("threshold", threshold, 1)
    check_shape("threshold", threshold, (F,))
    check_same_device(x=x, threshold=threshold)
    if threshold.device.type == "cpu" and not torch.compiler.is_compiling() and not bool((threshold >= 0).all()):
        bad = threshold[~(threshold >= 0)][0].item()
        raise ValueError(
            f"threshold must be >= 0 everywhere (as the JumpReLU module keeps it), found {bad}; "
            "clamp it with threshold.clamp_min(0)"
        )
    check_int("capacity", capacity, 1, x.shape[0] * F)
    if not is_real(bandwidth) or not bandwidth > 0:
        raise ValueError(f"bandwidth must be a positive number, got {bandwidth!r}")
    if not is_real(l0_coefficient) or not l0_coefficient >= 0:
        raise ValueError(f"l0_coefficient must be a number >= 0, got {l0_coefficient!r}")


def check_standard_args(F: int, capacity, l1_coefficient, x) -> None:
    check_int("capacity", capacity, 1, x.shape[0] * F)
    if not is_real(l1_coefficient) or not l1_coefficient >= 0:
        raise ValueError(f"l1_coefficient must be a number >= 0, got {l1_coefficient!r}")


def check_gated_args(x, W_enc, r_mag, b_mag, capacity, l1_coefficient) -> None:
    F = W_enc.shape[0]
    for name, t in (("r_mag", r_mag), ("b_mag", b_mag)):
        check_tensor(name, t, 1)
        check_shape(name, t, (F,))
    check_same_dtype("W_enc", W_enc, r_mag=r_mag, b_mag=b_mag)
    check_same_device(W_enc=W_enc, r_mag=r_mag, b_mag=b_mag)
    check_standard_args(F, capacity, l1_coefficient, x)


def check_prefix_sizes(prefix_sizes, F: int) -> list[int]:
    """Matryoshka's nested dictionary sizes m_1 < ... < m_G = F; returns them as a list."""
    if not isinstance(prefix_sizes, (list, tuple)) or len(prefix_sizes) == 0:
        raise ValueError(f"prefix_sizes must be a non-empty list of ints, got {prefix_sizes!r}")
    sizes = list(prefix_sizes)
    for m in sizes:
        if not is_int(m) or m < 1:
            raise ValueError(f"prefix_sizes must hold positive ints, got {prefix_sizes!r}")
    sizes = [int(m) for m in sizes]
    if any(a >= b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"prefix_sizes must be strictly increasing, got {prefix_sizes!r}")
    if sizes[-1] != F:
        raise ValueError(f"prefix_sizes must end at F={F} (the whole dictionary), got {prefix_sizes!r}")
    return sizes


def default_k_aux(D: int, F: int) -> int:
    """AuxK's default: D // 2 dead latents per row (both trainers' heuristic, after Gao et al.), at most F."""
    return min(F, max(1, D // 2))


def default_dead_capacity(F: int, k_aux: int) -> int:
    """The dead set's default size: 2 * k_aux slots, at most F (see ``primitives/dead_set.py``)."""
    return min(F, 2 * k_aux)


# Cross-layer transcoders ----------------------------------------------------------------


def check_clt_inputs(name: str, t, n_layers: int, d_model: int, ref: torch.Tensor) -> None:
    """``t`` must be [B, n_layers, d_model] in ``ref``'s dtype and on its device (``name`` in the message)."""
    check_tensor(name, t, 3)
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (B = 0)")
    if t.shape[1] != n_layers:
        raise ValueError(f"{name} must hold n_layers={n_layers} layers in dim 1, got shape {tuple(t.shape)}")
    if t.shape[2] != d_model:
        raise ValueError(f"{name} must have d_model={d_model} in dim 2, got shape {tuple(t.shape)}")
    check_same_dtype("W_enc", ref, **{name: t})
    check_same_device(W_enc=ref, **{name: t})


def check_clt_decoder(W_dec, n_features: int, n_layers: int, d_model: int, ref: torch.Tensor) -> None:
    """``W_dec``: a sequence of L tensors, W_dec[l] [F, (L - l) * D] in ``ref``'s dtype and on its device."""
    if len(W_dec) != n_layers:
        raise ValueError(f"W_dec must hold n_layers={n_layers} matrices (one per source layer), got {len(W_dec)}")
    for layer, w in enumerate(W_dec):
        name = f"W_dec[{layer}]"
        check_tensor(name, w, 2)
        want = (n_features, (n_layers - layer) * d_model)
        if tuple(w.shape) != want:
            raise ValueError(
                f"W_dec[{layer}] must have shape {want} (F, (L - l) * D: the causal triangle), got {tuple(w.shape)}"
            )
        check_same_dtype("W_enc", ref, **{name: w})
        check_same_device(W_enc=ref, **{name: w})


def check_decoder_norm_groups(decoder_norm_groups, D_out: int) -> int:
    """The number of equal column blocks of a decoder row whose norms are summed (a crosscoder's layers):
    a positive int dividing W_dec's width ``D_out``; returns it as an ``int``."""
    if not is_int(decoder_norm_groups) or decoder_norm_groups < 1:
        raise ValueError(f"decoder_norm_groups must be a positive int, got {decoder_norm_groups!r}")
    if D_out % decoder_norm_groups:
        raise ValueError(
            f"decoder_norm_groups={decoder_norm_groups} must divide W_dec's width {D_out} (equal blocks per row)"
        )
    return int(decoder_norm_groups)


def check_l2_loss_groups(l2_loss_groups, D_out: int) -> int:
    """0 (the loss is the MSE) or the number of equal column blocks of the reconstruction whose error norms
    the loss averages (a crosscoder's layers): an int >= 0 dividing the target's width ``D_out``."""
    if not is_int(l2_loss_groups) or l2_loss_groups < 0:
        raise ValueError(f"l2_loss_groups must be an int >= 0 (0: the MSE), got {l2_loss_groups!r}")
    if l2_loss_groups and D_out % l2_loss_groups:
        raise ValueError(f"l2_loss_groups={l2_loss_groups} must divide the reconstruction's width {D_out}")
    return int(l2_loss_groups)
