"""TopK encoder: ``vals, indices = relu(top-k over F of (x - b_dec) @ W_enc.T + b_enc)``.

What is fused and what is not:
- forward: the encoder GEMM runs in cuBLAS (``torch.addmm``), over chunks of F
  so its [B, F_chunk] output stays within ``TUNING["chunk_bytes"]``; each chunk
  is read exactly once by ``_topk_select_kernel``, which keeps the top-k
  candidates of each (row, tile of F) as 32-bit sortable keys plus int32 ids
  ([B, F / BLOCK, CAP], a few MB). Merge levels of the same kernel reduce the
  candidates while more than ``merge_final`` are left per row; then one
  torch.topk over the candidates packed as int64 (key, -id) picks and orders
  the final k exactly. No [B, F] tensor
  survives the forward (with ``chunk_bytes`` at 512 MiB and B=4096, D=2048,
  F=2^21, bf16, the transient peak is that one chunk plus the candidates).
- selection (one program per (row, tile)): the tile's keys stay in registers.
  The k-th largest of the tile's group maxima (groups of G consecutive
  entries) is a lower bound m of the tile's k-th largest entry, found by a
  bitwise search over only BLOCK/G values; entries >= m (usually about k of
  them) are compacted in index order with one prefix sum. Only if more than
  CAP entries pass (heavy ties) does the tile fall back to the exact bitwise
  search over all its keys. Cost per entry: a load, a key transform, a max, a
  compare and a prefix-sum step, against ~16 compare-and-count passes for a
  bitwise radix select over the whole tile.
- backward (saves only x, the weights and the [B, k] code): with
  dpre = dvals * (vals > 0), the deterministic CSR segmented sum of ``_csr.py``
  writes ``dW_enc[f] = sum dpre[b, k] * (x - b_dec)[b]`` and
  ``db_enc[f] = sum dpre[b, k]`` in one pass; ``dx`` is ``sparse_decode``'s
  gather kernel over the k active encoder rows; ``db_dec = -sum_b dx``.

Tie rule (deterministic, and the reference's ``topk_select``): larger value
first; equal values go to the lower latent id; -0.0 equals +0.0. NaN compares
by its bits (a positive NaN is above +inf, a negative NaN below -inf). The
selection is exact on the pre-activations as computed in the input dtype.

Bytes (bf16, B=4096, D=2048, F=262144): the GEMM writes 2 GiB of
pre-activations and the selection reads them once; torch.topk reads them
several times. The backward is O(B*k*D) plus one write of dW_enc.

Precision: GEMM as torch's (fp32 accumulation in cuBLAS); backward accumulates
in fp32; outputs in the input dtype. Shapes: B >= 1, 1 <= k <= min(F, 8192),
F < 2^31; any D.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    TUNING,
    check_same_device,
    check_same_dtype,
    check_tensor,
    eager_function,
    next_pow2,
    use_triton,
)
from ._csr import csr_transpose, segment_sum
from ._ops import add_op_namespace_prefix
from .sparse_decode import sparse_decode_fwd

# Constants ---------------------------------------------------------------------

MAX_K = 8192
KEY_PAD = -(2**31)  # the key of an empty candidate slot: below every real key
IDX_PAD = 2**31 - 1  # its latent id
MAX_TILE = 16384  # tile entries per program (the packed prefix sum needs <= 2^16)

# Kernels -----------------------------------------------------------------------


@triton.jit
def _sortable_key(v, KEY_BITS: tl.constexpr):
    """Float -> int32 whose signed order is the float order; -0.0 gets +0.0's key.

    A float's bits are sign-magnitude: flipping the magnitude bits of negative
    numbers makes them two's-complement ordered. 16-bit floats give keys in
    [-2^15, 2^15); fp32 keys are kept above KEY_PAD.
    """
    if KEY_BITS == 16:
        b = v.to(tl.int16, bitcast=True).to(tl.int32)
        s = b ^ ((b >> 15) & 0x7FFF)
    else:
        b = v.to(tl.int32, bitcast=True)
        s = b ^ ((b >> 31) & 0x7FFFFFFF)
        s = tl.maximum(s, -2147483647)
    return tl.where(s == -1, 0, s)


@triton.jit
def _kth_largest(key, K, KEY_BITS: tl.constexpr):
    """The largest t with count(key >= t) >= K, one bit a step from the top.

    If fewer than K keys are real (the rest KEY_PAD), returns the lowest real key.
    """
    n_pos = tl.sum((key >= 0).to(tl.int32), axis=0)
    t = tl.where(n_pos >= K, 0, -(1 << (KEY_BITS - 1)))
    for i in tl.static_range(KEY_BITS - 1):
        cand = t + (1 << (KEY_BITS - 2 - i))
        cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
        t = tl.where(cnt >= K, cand, t)
    return t


@triton.jit
def _store_candidates(key, idx, keep, n_keep, out_key_ptr, out_idx_ptr, pos, CAP: tl.constexpr):
    """Writes the kept (key, id) pairs at ``pos`` and pads slots [n_keep, CAP)."""
    tl.store(out_key_ptr + pos, key, mask=keep)
    tl.store(out_idx_ptr + pos, idx, mask=keep)
    slots = tl.arange(0, CAP)
    pad = slots >= n_keep
    tl.store(out_key_ptr + slots, tl.where(pad, -2147483648, 0), mask=pad)
    tl.store(out_idx_ptr + slots, tl.where(pad, 2147483647, 0), mask=pad)


@triton.jit
def _store_top_k(key, idx, K, out_key_ptr, out_idx_ptr, KEY_BITS: tl.constexpr, CAP: tl.constexpr):
    """Exact top-K of the tile under the tie rule, compacted in tile order."""
    t = _kth_largest(key, K, KEY_BITS)
    gt = key > t
    eq = key == t
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    n_eq = tl.sum(eq.to(tl.int32), axis=0)
    need = K - n_gt
    # One prefix sum counts both: low 16 bits the entries above t, high bits the ties.
    c = tl.cumsum(gt.to(tl.int32) + (eq.to(tl.int32) << 16), axis=0)
    eq_c = c >> 16
    keep = gt | (eq & (eq_c <= need))
    pos = (c & 0xFFFF) + tl.minimum(eq_c, need) - 1
    _store_candidates(key, idx, keep, n_gt + tl.minimum(n_eq, need), out_key_ptr, out_idx_ptr, pos, CAP)


@triton.jit
def _load_keys(src_ptr, src_idx_ptr, row_ptr, offs, n, idx_base, KEY_BITS: tl.constexpr, FROM_VALUES: tl.constexpr):
    """Keys and latent ids at ``offs`` of one row; entries past ``n`` get KEY_PAD / IDX_PAD."""
    mask = offs < n
    if FROM_VALUES:
        v = tl.load(src_ptr + row_ptr + offs, mask=mask, other=0.0)
        key = tl.where(mask, _sortable_key(v, KEY_BITS), -2147483648)
        idx = tl.where(mask, idx_base + offs, 2147483647)
    else:
        key = tl.load(src_ptr + row_ptr + offs, mask=mask, other=-2147483648)
        idx = tl.load(src_idx_ptr + row_ptr + offs, mask=mask, other=2147483647)
    return key, idx


@triton.jit
def _topk_select_kernel(
    src_ptr,  # [B, n] float pre-activations (FROM_VALUES) or int32 keys
    src_idx_ptr,  # [B, n] int32 latent ids (not FROM_VALUES)
    out_key_ptr,  # [B, n_tiles_out, CAP] int32 candidate keys
    out_idx_ptr,  # [B, n_tiles_out, CAP] int32 candidate latent ids
    n,
    stride_src,
    idx_base,  # latent id of column 0 (FROM_VALUES)
    tile_base,  # first output tile of this launch
    n_tiles_out,
    K,
    BLOCK: tl.constexpr,
    CAP: tl.constexpr,
    G: tl.constexpr,
    KEY_BITS: tl.constexpr,
    FROM_VALUES: tl.constexpr,
    PREFILTER: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    row_ptr = row * stride_src
    out = (row * n_tiles_out + tile_base + tile) * CAP
    if PREFILTER:
        # The tile as [BLOCK / G, G] groups of consecutive entries: the K-th largest group
        # maximum bounds the tile's K-th largest entry from below. Positions of the entries
        # at or above it come from a scan over group counts plus a scan inside each group,
        # both small, in index order.
        offs = tile * BLOCK + tl.arange(0, BLOCK // G)[:, None] * G + tl.arange(0, G)[None, :]
        key, idx = _load_keys(src_ptr, src_idx_ptr, row_ptr, offs, n, idx_base, KEY_BITS, FROM_VALUES)
        m = _kth_largest(tl.max(key, axis=1), K, KEY_BITS)
        cand = key >= m
        cand_i = cand.to(tl.int32)
        per_group = tl.sum(cand_i, axis=1)
        n_cand = tl.sum(per_group, axis=0)
        if n_cand <= CAP:
            before = tl.cumsum(per_group, axis=0) - per_group
            pos = before[:, None] + tl.cumsum(cand_i, axis=1) - 1
            _store_candidates(key, idx, cand, n_cand, out_key_ptr + out, out_idx_ptr + out, pos, CAP)
        else:
            # Heavy ties: the exact search over the tile, reloaded flat (it is in L1/L2).
            flat = tile * BLOCK + tl.arange(0, BLOCK)
            key_flat, idx_flat = _load_keys(src_ptr, src_idx_ptr, row_ptr, flat, n, idx_base, KEY_BITS, FROM_VALUES)
            _store_top_k(key_flat, idx_flat, K, out_key_ptr + out, out_idx_ptr + out, KEY_BITS, CAP)
    else:
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        key, idx = _load_keys(src_ptr, src_idx_ptr, row_ptr, offs, n, idx_base, KEY_BITS, FROM_VALUES)
        _store_top_k(key, idx, K, out_key_ptr + out, out_idx_ptr + out, KEY_BITS, CAP)


# Host launchers ----------------------------------------------------------------


def _key_bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16


def keys_to_values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``_sortable_key``: int32 keys -> the floats they came from."""
    if _key_bits(dtype) == 16:
        bits = torch.where(keys >= 0, keys, keys ^ 0x7FFF).to(torch.int16)
    else:
        bits = torch.where(keys >= 0, keys, keys ^ 0x7FFFFFFF)
    return bits.view(dtype)


def _tile_plan(k: int, n: int, block: int) -> tuple[int, int, bool]:
    """(BLOCK, CAP, PREFILTER) for selecting k from rows of n entries."""
    kp = next_pow2(k)
    block = min(max(block, 4 * kp), MAX_TILE, max(16, next_pow2(n)))
    prefilter = 2 * kp * 4 <= block and TUNING["select_prefilter"]
    return block, (2 * kp if prefilter else kp), prefilter


def _launch_select(src, src_idx, out_key, out_idx, n, idx_base, tile_base, k, block, cap, prefilter, key_bits):
    B = src.shape[0]
    n_tiles_out = out_key.shape[1]
    grid = (B, triton.cdiv(n, block))
    _topk_select_kernel[grid](
        src,
        src_idx if src_idx is not None else src,
        out_key,
        out_idx,
        n,
        src.stride(0),
        idx_base,
        tile_base,
        n_tiles_out,
        k,
        BLOCK=block,
        CAP=cap,
        G=TUNING["select_group"],
        KEY_BITS=key_bits,
        FROM_VALUES=src_idx is None,
        PREFILTER=prefilter,
        num_warps=TUNING["select_warps"],
    )


def _select_candidates(pre_chunks, B, F, k, key_bits, device):
    """Runs the first selection level over each pre-activation chunk; returns (keys, ids) [B, n]."""
    block, cap, prefilter = _tile_plan(k, F, TUNING["select_block"])
    n_tiles = sum(triton.cdiv(w, block) for _, w in pre_chunks.plan)
    keys = torch.empty(B, n_tiles, cap, device=device, dtype=torch.int32)
    ids = torch.empty_like(keys)
    tile_base = 0
    for f0, pre in pre_chunks:
        w = pre.shape[1]
        _launch_select(pre, None, keys, ids, w, f0, tile_base, k, block, cap, prefilter, key_bits)
        tile_base += triton.cdiv(w, block)
    return keys.view(B, -1), ids.view(B, -1)


def _merge_candidates(keys, ids, k, key_bits):
    """Reduces [B, n] candidates with the selection kernel until at most ``merge_final`` are left per row."""
    B = keys.shape[0]
    while keys.shape[1] > max(TUNING["merge_final"], 4 * next_pow2(k)):
        n = keys.shape[1]
        block, cap, prefilter = _tile_plan(k, n, TUNING["merge_block"])
        out_key = torch.empty(B, triton.cdiv(n, block), cap, device=keys.device, dtype=torch.int32)
        out_idx = torch.empty_like(out_key)
        _launch_select(keys, ids, out_key, out_idx, n, 0, 0, k, block, cap, prefilter, key_bits)
        keys, ids = out_key.view(B, -1), out_idx.view(B, -1)
    return keys, ids


def select_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection alone on a given [B, F] tensor: (values, int64 ids), [B, k], by the tie rule."""
    key_bits = _key_bits(pre.dtype)
    keys, ids = _select_candidates(_GivenChunk(pre), pre.shape[0], pre.shape[1], k, key_bits, pre.device)
    keys, ids = _merge_candidates(keys, ids, k, key_bits)
    return final_top_k(keys, ids, k, pre.dtype)


class _GivenChunk:
    """One chunk holding all of F: the selection over a pre-activation tensor that already exists."""

    def __init__(self, pre):
        self.plan = [(0, pre.shape[1])]
        self.pre = pre

    def __iter__(self):
        yield 0, self.pre


class _PreChunks:
    """Iterates (first latent, [B, w] pre-activations) over chunks of F, reusing one buffer."""

    def __init__(self, xc, W_enc, b_enc):
        B, F = xc.shape[0], W_enc.shape[0]
        per_col = max(1, B * xc.element_size())
        tile = TUNING["select_block"]
        width = max(tile, TUNING["chunk_bytes"] // per_col // tile * tile)
        self.width = min(F, width)
        self.plan = [(f0, min(F, f0 + self.width) - f0) for f0 in range(0, F, self.width)]
        self.xc, self.W_enc, self.b_enc = xc, W_enc, b_enc
        self.buf = torch.empty(B * self.width, device=xc.device, dtype=xc.dtype)

    def __iter__(self):
        B = self.xc.shape[0]
        for f0, w in self.plan:
            pre = self.buf[: B * w].view(B, w)
            torch.addmm(self.b_enc[f0 : f0 + w], self.xc, self.W_enc[f0 : f0 + w].T, out=pre)
            yield f0, pre


def final_top_k(keys: torch.Tensor, ids: torch.Tensor, k: int, dtype: torch.dtype):
    """The exact top-k of each row's candidates, ordered by the tie rule; (values, int64 ids).

    Packing (key, IDX_PAD - id) into one int64 makes every candidate distinct and
    orders it by value, then by lower id, so torch.topk over the few candidates
    left (sorted) is exact and settles the order in the same call.
    """
    packed = (keys.to(torch.int64) << 32) | (IDX_PAD - ids.to(torch.int64))
    top = torch.topk(packed, k, dim=1, sorted=True).values
    return keys_to_values((top >> 32).to(torch.int32), dtype), IDX_PAD - (top & 0xFFFFFFFF)


def topk_encode_fwd(x, W_enc, b_enc, k, b_dec):
    """Returns (vals [B, k] in x's dtype, indices [B, k] int64), in descending order."""
    B = x.shape[0]
    F = W_enc.shape[0]
    xc = x - b_dec if b_dec is not None else x
    if not use_triton(x):
        return _topk_encode_fwd_torch(xc, W_enc, b_enc, k)
    key_bits = _key_bits(x.dtype)
    keys, ids = _select_candidates(_PreChunks(xc, W_enc, b_enc), B, F, k, key_bits, x.device)
    keys, ids = _merge_candidates(keys, ids, k, key_bits)
    values, indices = final_top_k(keys, ids, k, x.dtype)
    return torch.relu(values), indices


def _topk_encode_fwd_torch(xc, W_enc, b_enc, k):
    """CPU path without the interpreter: the same chunked GEMM, then a running stable top-k merge."""
    best_v = best_i = None
    for f0, pre in _PreChunks(xc, W_enc, b_enc):
        v, i = torch.sort(pre, dim=1, descending=True, stable=True)
        v, i = v[:, :k], i[:, :k] + f0
        if best_v is not None:
            # Earlier chunks hold lower ids and come first, so the stable sort keeps the tie rule.
            v, j = torch.sort(torch.cat([best_v, v], 1), dim=1, descending=True, stable=True)
            v, i = v[:, :k], torch.cat([best_i, i], 1).gather(1, j[:, :k])
        best_v, best_i = v, i
    return torch.relu(best_v), best_i


def topk_encode_bwd(dvals, x, W_enc, b_dec, vals, indices, csr=None):
    """Returns (dx, dW_enc, db_enc, db_dec fp32 [D] or None); ``csr`` reuses a (perm, offsets)."""
    B, K = indices.shape
    F = W_enc.shape[0]
    dpre = torch.where(vals > 0, dvals.float(), 0.0)
    perm, offsets = csr if csr is not None else csr_transpose(indices, F)
    xc = x.float() - b_dec.float() if b_dec is not None else x
    dW_enc = torch.empty_like(W_enc)
    db_enc = torch.empty(F, device=x.device, dtype=torch.float32)
    segment_sum(perm, offsets, xc, K=K, out=dW_enc, element_rows=False, coef=dpre, coef_sum=db_enc)
    dx = sparse_decode_fwd(indices, dpre, W_enc, None, out_dtype=torch.float32)
    db_dec = -dx.sum(0) if b_dec is not None else None
    return dx, dW_enc, db_enc, db_dec


# Op registration ---------------------------------------------------------------


@torch.library.custom_op(add_op_namespace_prefix("topk_encode"), mutates_args=())
def _topk_encode_op(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, W_enc, b_enc, b_dec, k)


def _forward(x, W_enc, b_enc, b_dec, k):
    return topk_encode_fwd(x, W_enc, b_enc, k, b_dec)


@_topk_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, k):
    B = x.shape[0]
    return x.new_empty(B, k), x.new_empty(B, k, dtype=torch.int64)


@torch.library.custom_op(add_op_namespace_prefix("topk_encode_backward"), mutates_args=())
def _topk_encode_backward_op(
    dvals: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_dec: torch.Tensor | None,
    vals: torch.Tensor,
    indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dW_enc, db_enc, db_dec = topk_encode_bwd(dvals, x, W_enc, b_dec, vals, indices)
    if db_dec is None:
        db_dec = dx.new_zeros(x.shape[1])
    return dx.to(x.dtype), dW_enc, db_enc.to(W_enc.dtype), db_dec.to(x.dtype)


@_topk_encode_backward_op.register_fake
def _(dvals, x, W_enc, b_dec, vals, indices):
    return torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[0]), x.new_empty(x.shape[1])


# Autograd ----------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, _ = inputs
    vals, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, W_enc, b_dec, vals, indices)


def _backward(ctx, dvals, _dindices, bwd=None):
    if dvals is None:
        return None, None, None, None, None
    x, W_enc, b_dec, vals, indices = ctx.saved_tensors
    dx, dW_enc, db_enc, db_dec = (bwd or _topk_encode_backward_op)(dvals, x, W_enc, b_dec, vals, indices)
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dW_enc if need[1] else None,
        db_enc if need[2] else None,
        db_dec if b_dec is not None and need[3] else None,
        None,
    )


def _eager_backward_op(dvals, x, W_enc, b_dec, vals, indices):
    dx, dW_enc, db_enc, db_dec = topk_encode_bwd(dvals, x, W_enc, b_dec, vals, indices)
    return dx.to(x.dtype), dW_enc, db_enc.to(W_enc.dtype), db_dec.to(x.dtype) if db_dec is not None else None


_topk_encode_op.register_autograd(_backward, setup_context=_setup_context)
_topk_encode_eager = eager_function(
    "TopkEncode", _forward, _setup_context, lambda ctx, dv, di: _backward(ctx, dv, di, bwd=_eager_backward_op)
)


# Public function ---------------------------------------------------------------


def check_encoder_args(x, W_enc, b_enc, k, b_dec):
    """Shared argument checks of the encoder ops; returns (B, D, F)."""
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
        raise ValueError(f"W_enc must have shape (F, D={D}) to match x, got {tuple(W_enc.shape)}")
    if F == 0 or F >= 2**31:
        raise ValueError(f"W_enc must have 1 <= F < 2^31 rows, got F={F}")
    if tuple(b_enc.shape) != (F,):
        raise ValueError(f"b_enc must have shape ({F},), got {tuple(b_enc.shape)}")
    if b_dec is not None:
        check_tensor("b_dec", b_dec, 1)
        if tuple(b_dec.shape) != (D,):
            raise ValueError(f"b_dec must have shape ({D},), got {tuple(b_dec.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= F:
        raise ValueError(f"k must lie in [1, F={F}], got k={k}")
    if k > MAX_K:
        raise ValueError(f"k={k} is above the selection kernel's limit of {MAX_K}")
    check_same_dtype("x", x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)
    check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)
    return B, D, F


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_dec: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK SAE encoder: the k largest pre-activations of each row, through a ReLU.

    ``pre = (x - b_dec) @ W_enc.T + b_enc``; returns ``(vals, indices)`` with
    ``vals = relu(top-k of pre)``, both [B, k], sorted by descending value.

    Args:
        x: [B, D] inputs, fp32, bf16 or fp16.
        W_enc: [F, D] encoder rows (one per latent), x's dtype.
        b_enc: [F] encoder bias, x's dtype.
        k: active latents per row, 1 <= k <= min(F, 8192).
        b_dec: optional [D] decoder bias, subtracted from x first (the usual
            "centring"); x's dtype.

    Returns:
        vals [B, k] in x's dtype and indices [B, k] int64. Ties go to the lower
        latent id (see the module docstring). Differentiable in x, W_enc, b_enc
        and b_dec; the backward keeps only the [B, k] code and the inputs, is
        O(B*k*D) plus one write of dW_enc, and is deterministic.
    """
    check_encoder_args(x, W_enc, b_enc, k, b_dec)
    op = _topk_encode_op if torch.compiler.is_compiling() else _topk_encode_eager
    return op(
        x.contiguous(), W_enc.contiguous(), b_enc.contiguous(), b_dec.contiguous() if b_dec is not None else None, k
    )
