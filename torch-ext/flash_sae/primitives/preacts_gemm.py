"""The encoder GEMM with the TopK selection's group pass in its epilogue (bf16 / fp16, Hopper).

``pre = xc @ W.T + b`` over one chunk of latents, in one persistent Triton GEMM
over TMA loads and stores, whose epilogue also writes each group of G
consecutive columns' largest sortable key: what ``select.groups._group_best_kernel``
(``keys_only``) computes by reading ``pre`` whole again. The candidate stage
(``select.row_topk._row_select_kernel``) then reads those keys and k*G entries per row,
so the pre-activations are written once and never read whole:
``benchmarks/preacts_gemm.py --ab`` measures the GEMM plus selection at 0.95-0.99x
the cuBLAS path, and the whole TopK step at 0.95-0.99x (``compare_builds.py
--toggle preacts_gemm``; H100, docs/design/encoder-gemm.md). On by default
(``TUNING["preacts_gemm"]``) where ``fits`` holds; cuBLAS plus the group pass elsewhere.

Values. The fp32 accumulator plus the bias (fp32), rounded once to the dtype
(round-to-nearest-even), as cuBLAS's ``addmm`` epilogue does. The products are
accumulated by the same wgmma instructions in the same K order as cuBLAS, and
the outputs measured equal cuBLAS's bit for bit (every entry, four shapes, up to
4096 x 262144), but nothing guarantees that on every shape: the selection is
exact on the values this kernel stored, which is what the tests check.

Keys. Rounding is monotone, so a group's largest rounded value is the rounding
of its largest fp32 sum: the epilogue reduces the fp32 tile by groups and keys
only the maxima (keying every entry cost as much as the separate pass did). A
NaN would be lost by the float maximum, so a tile holding any NaN keys every
rounded entry instead (the keys are then exactly ``_group_best_kernel``'s,
a NaN by its bits).

Used by ``select.topk_preacts`` when ``fits`` holds: Triton's TMA descriptors,
a GPU of compute capability >= 9 (or the interpreter), bf16/fp16, rows of x, W
and the output 16-byte aligned (D and the chunk width multiples of 8), and G in
[16, 64] (``GROUPS``: the sizes measured) dividing the tile width; otherwise
cuBLAS and the group pass run as before.
"""

import functools

import torch
import triton
import triton.language as tl

from .._launch import TUNING, use_triton
from .triton_utils import cast_rtne

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older Triton: the cuBLAS path runs
    TensorDescriptor = None


@triton.jit
def _key16(v):
    """A 16-bit float's int32 key whose signed order is the float order; -0.0 gets +0.0's key
    (``select.keys.sortable_key`` for 16-bit dtypes)."""
    b = v.to(tl.int16, bitcast=True).to(tl.int32)
    s = b ^ ((b >> 15) & 0x7FFF)
    return tl.where(s == -1, 0, s)


@triton.jit
def _round(s, dtype: tl.constexpr, RTNE_BITS: tl.constexpr):
    if RTNE_BITS:  # the interpreter's bf16 cast truncates; the GPU's conversion is already RTNE
        return cast_rtne(s, dtype)
    return s.to(dtype)


@triton.jit
def tile_coords(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Output tile ``tile``'s (row block, column block): GROUP_M row blocks walked per column block, so
    tiles running together share W's blocks in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _preacts_gemm_kernel(
    a_desc,  # TMA descriptor of xc [M, K], blocks [BM, BK]
    b_desc,  # TMA descriptor of the chunk's W [N, K], blocks [BN, BK]
    c_desc,  # TMA descriptor of pre [M, N], blocks [BM, BN]
    b_ptr,  # [N] the chunk's encoder bias
    gkey_ptr,  # [M, n_groups] int32 out: each group of G columns' largest key
    M,
    N,
    K,
    n_groups,
    BM: tl.constexpr,
    BN: tl.constexpr,  # a multiple of G
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,  # tiles along M walked together, so W's tiles are reused from L2
    G: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    INTERPRETED: tl.constexpr,  # the CPU interpreter: fp32 dot (its 16-bit dot reads raw bits), RTNE by bits
):
    """Persistent: program p takes output tiles p, p + NUM_PROGRAMS, ...; TMA zero-fills loads past
    the edges and clips stores there."""
    start = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    dtype: tl.constexpr = c_desc.dtype
    for tile in tl.range(start, tiles_m * tiles_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = tile_coords(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BM, ki * BK])
            b = b_desc.load([pid_n * BN, ki * BK])
            if INTERPRETED:  # products of 16-bit floats are exact in fp32
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.T, acc)
        rn = pid_n * BN + tl.arange(0, BN)
        col_ok = rn < N
        s = acc + tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        v = _round(s, dtype, INTERPRETED)
        c_desc.store([pid_m * BM, pid_n * BN], v)
        rm = pid_m * BM + tl.arange(0, BM)
        grp = pid_n * (BN // G) + tl.arange(0, BN // G)
        smax = tl.max(tl.reshape(tl.where(col_ok[None, :], s, float("-inf")), (BM, BN // G, G)), axis=2)
        gmax = _key16(_round(smax, dtype, INTERPRETED))
        if tl.max(tl.max(tl.where(s != s, 1, 0), axis=1), axis=0) > 0:  # a NaN: key every rounded entry
            key = tl.where(col_ok[None, :], _key16(v), -2147483648)
            gmax = tl.max(tl.reshape(key, (BM, BN // G, G)), axis=2)
        tl.store(
            gkey_ptr + rm.to(tl.int64)[:, None] * n_groups + grp[None, :],
            gmax,
            mask=(rm < M)[:, None] & (grp < n_groups)[None, :],
        )


GROUPS = (16, 64)  # the group sizes measured on the H100; G = 1 at the 128 x 256 tile needed 344 KB of shared memory


@functools.lru_cache(maxsize=16)
def _programs(device: torch.device) -> int:
    """Programs of the persistent grid: one per SM on a GPU, a few in the interpreter."""
    if device.type == "cpu":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=16)
def _capable(device: torch.device) -> bool:
    return device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9


def _aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def fits(xc: torch.Tensor, W: torch.Tensor, out: torch.Tensor, G: int) -> bool:
    """Whether ``preacts_group_keys`` takes these operands and group size (else cuBLAS + the group pass)."""
    return (
        TUNING["preacts_gemm"]
        and TensorDescriptor is not None
        and use_triton(xc)
        and xc.dtype in (torch.bfloat16, torch.float16)
        and W.dtype == xc.dtype
        and GROUPS[0] <= G <= GROUPS[1]
        and TUNING["preacts_gemm_tile"][1] % G == 0
        and _capable(xc.device)
        and _aligned(xc)
        and _aligned(W)
        and _aligned(out)
    )


def preacts_group_keys(xc: torch.Tensor, W: torch.Tensor, b: torch.Tensor, G: int, out: torch.Tensor) -> torch.Tensor:
    """``out <- xc @ W.T + b`` ([B, w], xc's dtype); returns each row's group keys, [B, ceil(w / G)] int32.

    xc [B, D], W [w, D] (rows of a larger weight may be sliced), b [w], ``out`` [B, w]; needs
    ``fits(xc, W, out, G)``.
    """
    B, D = xc.shape
    w = W.shape[0]
    n_groups = triton.cdiv(w, G)
    gkeys = torch.empty(B, n_groups, dtype=torch.int32, device=xc.device)
    BM, BN, BK = TUNING["preacts_gemm_tile"]
    programs = min(_programs(xc.device), triton.cdiv(B, BM) * triton.cdiv(w, BN))
    _preacts_gemm_kernel[(programs,)](
        TensorDescriptor.from_tensor(xc, [BM, BK]), TensorDescriptor.from_tensor(W, [BN, BK]),
        TensorDescriptor.from_tensor(out, [BM, BN]), b, gkeys, B, w, D, n_groups,
        BM=BM, BN=BN, BK=BK, GROUP_M=TUNING["preacts_gemm_group_m"], G=G, NUM_PROGRAMS=programs,
        INTERPRETED=xc.device.type == "cpu", num_warps=TUNING["preacts_gemm_warps"],
        num_stages=TUNING["preacts_gemm_stages"],
    )  # fmt: skip
    return gkeys
