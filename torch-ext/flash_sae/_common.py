"""Shared host-side helpers: argument validation, dispatch policy and block sizes.

Every public op validates its arguments here before anything is launched, so a
bad call fails with a ``ValueError`` that names the offending argument instead of
a crash, a wrong answer or an illegal memory access.

Dispatch policy: tensors on a GPU run the Triton kernels. CPU tensors run the
same Triton kernels when ``TRITON_INTERPRET=1`` was set before this package was
imported (that is how CI exercises the real kernels without a GPU); otherwise
they run a plain-torch path with the same sparse algorithm and fp32
accumulation.
"""

import os

import torch

# Constants -------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)

# Read once, at import: triton reads the same variable when it decorates kernels.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Dispatch ----------------------------------------------------------------------


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t``'s device runs the Triton kernels (a GPU, or the interpreter)."""
    return t.device.type != "cpu" or TRITON_INTERPRET


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Tuning policy, in one visible place (read at launch time, never at import).
# The gather kernels (decode forward, hierarchical scans) run one program per
# (row, D-block) and walk K one latent at a time with 1-D accumulators, so
# registers stay few, occupancy high, and many row loads are in flight per SM;
# ``*_unroll`` latents are issued back to back per loop step. The CSR segmented
# sum runs one program per (latent, D-block). Chosen by benchmarks/tune.py on
# an H100; the measurements are in benchmarks/NOTES.md.
TUNING = {
    "gather_block_d": 256,
    "gather_warps": 1,
    "gather_unroll": 1,
    "segment_block_d": 512,
    "segment_warps": 1,
    "segment_unroll": 1,
    # topk_encode: the group size G of the selection (a power of two; the
    # torch.topk calls see F/G group keys and k*G candidates per row), groups
    # per program of the group-maximum kernel and its warps, and the byte
    # budget of one pre-activation chunk (the forward's transient GEMM output).
    "select_group": 32,
    "select_groups": 256,
    "select_warps": 4,
    "chunk_bytes": 2 * 2**30,
}


def block_d(D: int) -> int:
    """Columns of D per program of the gather kernels (a power of two, at least 16)."""
    return min(TUNING["gather_block_d"], max(16, next_pow2(D)))


def segment_block_d(width: int) -> int:
    """Columns per program of the segmented sum over a window of ``width`` columns."""
    return min(TUNING["segment_block_d"], max(16, next_pow2(width)))


# Validation --------------------------------------------------------------------


def check_tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {t.dtype}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; all tensors must be on one device"
            )


def check_same_dtype(ref_name: str, ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype != ref.dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; {name} must have {ref_name}'s dtype"
            )


def check_sparse_code(indices, vals, weight, *, allow_empty: bool) -> tuple[int, int, int, int]:
    """Validates the (indices, vals, weight) triple; returns (B, K, F, D)."""
    check_tensor("indices", indices, 2, INDEX_DTYPES)
    check_tensor("weight", weight, 2)
    check_tensor("vals", vals, 2)
    B, K = indices.shape
    F, D = weight.shape
    if tuple(vals.shape) != (B, K):
        raise ValueError(f"vals must have indices' shape {(B, K)}, got {tuple(vals.shape)}")
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


def check_index_range(indices: torch.Tensor, F: int) -> None:
    """Raises ValueError if any index is outside [0, F). Synchronises with the device."""
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= F)
    if bool(bad.any()):
        first = int(indices[bad][0])
        raise ValueError(f"indices must lie in [0, F={F}); found {first}")


def resolve_validate(validate, indices: torch.Tensor) -> bool:
    """``None`` means: check index range where it costs no device sync (CPU tensors)."""
    if validate is None:
        return indices.device.type == "cpu"
    if not isinstance(validate, bool):
        raise ValueError(f"validate must be None, True or False, got {validate!r}")
    return validate


# Eager fast path -----------------------------------------------------------------


def eager_function(name: str, forward, setup_context, backward):
    """A ``torch.autograd.Function`` running an op's own forward, context and backward.

    Public functions call it in eager mode and the registered ``torch.library``
    op under ``torch.compile`` (``torch.compiler.is_compiling()``): both run the
    same launchers, but the Function skips the custom-op dispatcher's Python
    overhead (tens of microseconds per op, which is most of a small op's time).
    """

    def fwd(ctx, *inputs):
        out = forward(*inputs)
        setup_context(ctx, inputs, out)
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    cls = type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})
    return cls.apply
