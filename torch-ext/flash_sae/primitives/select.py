"""Exact top-k selection over the columns of pre-activation chunks, and the chunked encoder GEMM.

The rule (deterministic; ``reference.topk_select`` states it as a stable
descending sort): larger value first; equal values go to the lower latent id;
-0.0 equals +0.0. NaN compares by its bits (a positive NaN is above +inf, a
negative NaN below -inf). The selection is exact on the pre-activations as
computed in the input dtype.

How, in one read of each chunk. Order a row's entries by (value, then lower
id) and cut the row into groups of G consecutive latents. The row's top-k
entries all lie in the k groups with the best best-entries: if an entry's group
were not among them, k better groups would each hold an entry better than it.
``_group_best_kernel`` reads the chunk once and writes each group's best value
key (int32); ``_row_select_kernel``, one program per row, finds the k best
groups by a bitwise search over those keys (equal maxima: the lower group,
whose best entry has the lower id), the exact top k of their k*G entries by a
second search (equal keys: the lower position, which is the lower id), and
sorts those k. G follows the chunk (``topk_group``: about sqrt(w / k), which
balances the two searches). Chunks merge by a last torch.topk over packed
int64 keys, (sortable value bits << 32) | (2^31 - 1 - id), which never tie.
Past ``ROW_SELECT_MAX`` group keys or candidates per row, and on the CPU's
plain-torch path, the candidate stage is torch.topk over packed group keys,
a gather and a torch.topk over the candidates' packed keys (int32 packing for
bf16/fp16 when the chunk has < 2^16 groups and k*G < 2^16).

The encoder GEMM (``pre_chunks``) runs in cuBLAS (``torch.addmm``) over chunks
of F whose [B, F_chunk] output stays within ``TUNING["chunk_bytes"]``; no
[B, F] tensor survives. Where ``preacts_gemm.fits`` (bf16 / fp16 on Hopper; on by
default, ``TUNING["preacts_gemm"]``), a TopK selection's
chunks come from ``preacts_gemm``'s Triton GEMM instead, whose epilogue writes the
group keys, so ``_group_best_kernel``'s read of the chunk goes. Bytes (bf16, B=4096, D=2048, F=262144): the GEMM writes
2 GiB of pre-activations, the selection reads them once plus k*G entries per
row gathered again.
"""

import functools

import torch
import triton
import triton.language as tl

from .._launch import TUNING, use_triton
from . import preacts_gemm
from .compact import top_positions
from .triton_utils import cast_rtne

# Constants ---------------------------------------------------------------------

IDX_PAD = 2**31 - 1  # ids are packed as IDX_PAD - id, so a lower id packs larger
KEY_NONE = -(2**63)  # the packed key of no entry (a group past the chunk's end)

# Kernels -----------------------------------------------------------------------


@triton.jit
def _sortable_key(v, KEY_BITS: tl.constexpr):
    """Float -> int32 whose signed order is the float order; -0.0 gets +0.0's key.

    A float's bits are sign-magnitude: flipping the magnitude bits of negative
    numbers makes them two's-complement ordered.
    """
    if KEY_BITS == 16:
        b = v.to(tl.int16, bitcast=True).to(tl.int32)
        s = b ^ ((b >> 15) & 0x7FFF)
    else:
        b = v.to(tl.int32, bitcast=True)
        s = b ^ ((b >> 31) & 0x7FFFFFFF)
    return tl.where(s == -1, 0, s)


@triton.jit
def _group_best_kernel(
    pre_ptr,  # [B, n] float pre-activations of one chunk (row stride stride_pb)
    best_ptr,  # [B, n_groups] out: each group's best entry, packed (int64, or int32 if PACK32)
    scale_ptr,  # [F] float per-latent factor applied before keying (HAS_SCALE)
    n,
    stride_pb,
    idx_base,  # latent id of the chunk's column 0
    n_groups,
    G: tl.constexpr,
    GROUPS: tl.constexpr,  # groups per program
    KEY_BITS: tl.constexpr,
    PACK32: tl.constexpr,  # 16-bit keys and < 2^16 groups: (max key << 16) | (65535 - group)
    BATCH: tl.constexpr,  # BatchTopK: the group's max key of relu(v) alone (positions are implicit)
    KEYS_ONLY: tl.constexpr,  # the group's max key alone, int32 (``_row_select_kernel``'s input)
    HAS_SCALE: tl.constexpr,  # key v * scale[latent], rounded to the chunk's dtype as torch's multiply does
):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    offs = grp[:, None] * G + tl.arange(0, G)[None, :]
    mask = offs < n
    v = tl.load(pre_ptr + row * stride_pb + offs, mask=mask, other=0.0)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + idx_base + offs, mask=mask, other=1.0).to(tl.float32)
        v = cast_rtne(v.to(tl.float32) * sc, pre_ptr.dtype.element_ty)
    if BATCH:  # the group's best key of relu(v), stored as int16 (16-bit dtypes) or int32
        best = tl.max(tl.where(mask, tl.maximum(_sortable_key(v, KEY_BITS), 0), -1), axis=1)
    elif KEYS_ONLY:
        best = tl.max(tl.where(mask, _sortable_key(v, KEY_BITS), -2147483648), axis=1)
    elif PACK32:
        # Groups with equal maxima rank by lower group index, which is the lower best id.
        key = tl.where(mask, _sortable_key(v, KEY_BITS), -32768)
        best = (tl.max(key, axis=1) << 16) | (65535 - grp)
    else:
        packed = (_sortable_key(v, KEY_BITS).to(tl.int64) << 32) | (2147483647 - (idx_base + offs)).to(tl.int64)
        best = tl.max(tl.where(mask, packed, -9223372036854775808), axis=1)
    tl.store(best_ptr + row * n_groups + grp, best, mask=grp < n_groups)


@triton.jit
def _group_keys_kernel(
    pre_ptr,  # [B, n] float pre-activations of one chunk (row stride stride_pb)
    groups_ptr,  # [m] int64 flat group indices (row * n_groups + group), the chosen groups
    scale_ptr,  # [F] float per-latent factor applied before keying (HAS_SCALE)
    keys_ptr,  # [m, G] out: relu'd sortable keys of the groups' entries; -1 past the chunk's end
    m,
    n,
    stride_pb,
    idx_base,
    n_groups,
    G: tl.constexpr,
    GROUPS: tl.constexpr,
    KEY_BITS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """BatchTopK's candidates: every entry of the chosen groups, keyed as ``_group_best_kernel`` keys them."""
    i = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    live_g = i < m
    g = tl.load(groups_ptr + i, mask=live_g, other=0)
    row = g // n_groups
    cols = (g % n_groups)[:, None] * G + tl.arange(0, G)[None, :]
    mask = live_g[:, None] & (cols < n)
    v = tl.load(pre_ptr + row[:, None] * stride_pb + cols, mask=mask, other=0.0)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + idx_base + cols, mask=mask, other=1.0).to(tl.float32)
        v = cast_rtne(v.to(tl.float32) * sc, pre_ptr.dtype.element_ty)
    key = tl.where(mask, tl.maximum(_sortable_key(v, KEY_BITS), 0), -1)
    tl.store(keys_ptr + i[:, None] * G + tl.arange(0, G)[None, :], key, mask=live_g[:, None])


@triton.jit
def _collected(pre_ptr, theta_ptr, scale_ptr, row, offs, live, stride_pb, idx_base, bandwidth, HAS_SCALE, HAS_BAND):
    """(raw pre values, int32 0/1 collected) of one block: key > theta, or (with a band)
    |(key - theta) / bandwidth| < 1/2, key = pre (* scale), every intermediate rounded to the
    chunk's dtype as torch rounds it."""
    dtype = pre_ptr.dtype.element_ty
    raw = tl.load(pre_ptr + row * stride_pb + offs, mask=live, other=0.0)
    theta = tl.load(theta_ptr + idx_base + offs, mask=live, other=0.0).to(tl.float32)
    key = raw
    if HAS_SCALE:
        sc = tl.load(scale_ptr + idx_base + offs, mask=live, other=1.0).to(tl.float32)
        key = cast_rtne(key.to(tl.float32) * sc, dtype)
    key = key.to(tl.float32)
    hit = key > theta
    if HAS_BAND:
        diff = cast_rtne(key - theta, dtype).to(tl.float32)
        u = cast_rtne(diff / bandwidth, dtype).to(tl.float32)
        hit = hit | ((u > -0.5) & (u < 0.5))
    return raw, (hit & live).to(tl.int32)


@triton.jit
def _threshold_collect_kernel(
    pre_ptr,  # [B, n] float pre-activations of one chunk (row stride stride_pb)
    theta_ptr,  # [F] float threshold, in the chunk's dtype
    scale_ptr,  # [F] float per-latent factor (HAS_SCALE)
    count_ptr,  # [B * n_blocks]: out, each block's count (int32); in (WRITE), their inclusive prefix sums (int64)
    flat_ptr,  # [capacity] int64 out (WRITE): flat position row * F + latent of each collected entry
    raw_ptr,  # [capacity] out (WRITE): its pre-activation, the chunk's dtype
    n,
    stride_pb,
    idx_base,  # latent id of the chunk's column 0
    F,
    capacity,
    slot0_ptr,  # [] int64: slots before this chunk's first (entries of earlier chunks)
    bandwidth,
    BLOCK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BAND: tl.constexpr,
    WRITE: tl.constexpr,
):
    """The counting pass writes each block's count of collected entries (``_collected``); after a
    scan, the WRITE pass recomputes the set in the blocks that have any and writes it at its
    row-major slots (those below ``capacity``)."""
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    block = row * tl.num_programs(1) + pid
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    if WRITE:  # the block's count from the inclusive prefix sums; most blocks have none and stop there
        end = tl.load(count_ptr + block)
        n_hit = end - tl.load(count_ptr + block - 1, mask=block > 0, other=0)
        if n_hit > 0:
            raw, hit = _collected(
                pre_ptr, theta_ptr, scale_ptr, row, offs, live, stride_pb, idx_base, bandwidth, HAS_SCALE, HAS_BAND
            )
            slot = tl.load(slot0_ptr) + end - n_hit + tl.cumsum(hit, axis=0) - hit
            ok = (hit != 0) & (slot < capacity)
            tl.store(flat_ptr + slot, row * F + idx_base + offs, mask=ok)
            tl.store(raw_ptr + slot, raw, mask=ok)
    else:
        _, hit = _collected(
            pre_ptr, theta_ptr, scale_ptr, row, offs, live, stride_pb, idx_base, bandwidth, HAS_SCALE, HAS_BAND
        )
        tl.store(count_ptr + block, tl.sum(hit, axis=0))


@triton.jit
def _gather_columns_kernel(
    pre_ptr,  # [B, n] float pre-activations of one chunk (row stride stride_pb)
    ids_ptr,  # [C] int64 latent ids (ascending; F marks an empty slot)
    out_ptr,  # [B, C] out: out[b, j] = pre[b, ids[j] - idx_base] where that column is in this chunk
    n,
    stride_pb,
    idx_base,
    C,
    BLOCK: tl.constexpr,
):
    """Copies the columns of a fixed id list that fall in this chunk (the dead set's pre-activations)."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col = tl.load(ids_ptr + j, mask=j < C, other=-1) - idx_base
    live = (j < C) & (col >= 0) & (col < n)
    v = tl.load(pre_ptr + row * stride_pb + col, mask=live, other=0.0)
    tl.store(out_ptr + row * C + j, v, mask=live)


@triton.jit
def _kth_largest(key, live, kk, KEY_BITS: tl.constexpr):
    """The kk-th largest of ``key`` where ``live`` (int32 sortable keys, kk <= the live entries), by a
    bitwise search from the top bit: the largest t with count(key >= t) >= kk (kk = 0: the largest
    possible key, so ``_first_kk`` chooses nothing)."""
    t = tl.full((), -(1 << (KEY_BITS - 1)), tl.int64)
    k64 = key.to(tl.int64)
    for bit in tl.static_range(KEY_BITS - 1, -1, -1):
        cand = t + (1 << bit)
        cnt = tl.sum((live & (k64 >= cand)).to(tl.int32), axis=0)
        t = tl.where(cnt >= kk, cand, t)
    return t


@triton.jit
def _first_kk(key, live, t, kk):
    """The kk best live entries given the kk-th largest key t: all above t, then those equal to t
    in position order (the lower position first)."""
    k64 = key.to(tl.int64)
    gt = live & (k64 > t)
    eq = (live & (k64 == t)).to(tl.int32)
    need = kk - tl.sum(gt.to(tl.int32), axis=0)
    return gt | ((eq != 0) & (tl.cumsum(eq, axis=0) <= need))


@triton.jit
def _row_top_kernel(
    pre_ptr,  # [B, C] float: a row's candidates (the dead set's pre-activations), slot order = id order
    valid_ptr,  # [C] bool: slots that hold a candidate
    ids_ptr,  # [C] int64: their latent ids (for the scale)
    scale_ptr,  # [n_ids] float: per-latent factor applied before keying (HAS_SCALE)
    act_ptr,  # [B, C] out: the selected values (relu'd if RELU), 0 elsewhere; pre's dtype
    gate_ptr,  # [B, C] out int8: 1 where the value passes gradient (selected, and > 0 if RELU)
    C,
    k,
    n_ids,
    BLOCK: tl.constexpr,
    KEY_BITS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
):
    """Each row's k best valid slots (larger key, then lower slot), by the candidate kernel's bitwise
    search for the k-th largest key and positional tie-break: one program per row, the row in registers."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    live = j < C
    v = tl.load(pre_ptr + row * C + j, mask=live, other=0.0)
    ok = live & (tl.load(valid_ptr + j, mask=live, other=0) != 0)
    kv = v
    if HAS_SCALE:
        ids = tl.load(ids_ptr + j, mask=live, other=0)
        sc = tl.load(scale_ptr + tl.minimum(ids, n_ids - 1), mask=live, other=1.0).to(tl.float32)
        kv = cast_rtne(v.to(tl.float32) * sc, pre_ptr.dtype.element_ty)
    key = _sortable_key(kv, KEY_BITS)
    n_sel = tl.minimum(tl.sum(ok.to(tl.int32), axis=0), k)
    chosen = _first_kk(key, ok, _kth_largest(key, ok, n_sel, KEY_BITS), n_sel)
    gate = chosen & (v.to(tl.float32) > 0) if RELU else chosen  # compared in fp32: the interpreter's bf16 is not
    tl.store(act_ptr + row * C + j, tl.where(gate, v, 0.0), mask=live)
    tl.store(gate_ptr + row * C + j, gate.to(tl.int8), mask=live)


@triton.jit
def _row_select_kernel(
    pre_ptr,  # [B, n] float pre-activations of one chunk (row stride stride_pb)
    gkey_ptr,  # [B, n_groups] int32: each group's max sortable key (``_group_best_kernel``, KEYS_ONLY)
    groups_ptr,  # [B, KG] int32 scratch: the row's chosen groups, ascending (written, then read back)
    out_ptr,  # [B, KS] int64 out: the chunk's top min(k, n) entries packed, descending; KEY_NONE after
    vals_ptr,  # [B, k] out (UNPACK): their values, pre's dtype (a -0.0 comes back as +0.0, its key's value)
    ids_ptr,  # [B, k] int64 out (UNPACK): their latent ids
    n,
    stride_pb,
    idx_base,  # latent id of the chunk's column 0
    n_groups,
    k,
    G: tl.constexpr,
    NG_BLOCK: tl.constexpr,  # >= n_groups, a power of two
    KG: tl.constexpr,  # >= k, a power of two
    KS: tl.constexpr,  # output width, >= k, a power of two
    KEY_BITS: tl.constexpr,
    UNPACK: tl.constexpr,  # write (values, ids) [B, k] instead of the sorted packed keys (needs k <= n)
    RELU: tl.constexpr,  # (UNPACK) write relu(value): a negative value becomes +0.0, a NaN stays NaN
):
    """The candidate stage of the selection in one program per row: the k best groups by a bitwise
    search over their max keys (equal maxima: the lower group, whose best entry has the lower id),
    then the k best of their k*G entries by a second search (equal keys: the lower position, which
    is the lower id, since chosen groups are kept in ascending order), then a sort of those k."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, NG_BLOCK)
    live_g = g < n_groups
    gk = tl.load(gkey_ptr + row * n_groups + g, mask=live_g, other=0)
    kk = tl.minimum(k, n_groups)
    chosen = _first_kk(gk, live_g, _kth_largest(gk, live_g, kk, KEY_BITS), kk)
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(groups_ptr + row * KG + slot, g, mask=chosen)
    tl.debug_barrier()  # the stores above are read back below by other threads of this program
    c = tl.arange(0, KG * G)
    s = c // G
    grp = tl.load(groups_ptr + row * KG + s, mask=s < kk, other=0)
    col = grp * G + c % G
    live = (s < kk) & (col < n)
    key = _sortable_key(tl.load(pre_ptr + row * stride_pb + col, mask=live, other=0.0), KEY_BITS)
    k2 = tl.minimum(k, n)
    top = _first_kk(key, live, _kth_largest(key, live, k2, KEY_BITS), k2)
    packed = (key.to(tl.int64) << 32) | (2147483647 - (idx_base + col)).to(tl.int64)
    at = tl.cumsum(top.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + row * KS + at, packed, mask=top)
    tl.debug_barrier()
    j = tl.arange(0, KS)
    picked = tl.load(out_ptr + row * KS + j, mask=j < k2, other=-9223372036854775808)
    ranked = tl.sort(picked, descending=True)
    if UNPACK:
        vkey = (ranked >> 32).to(tl.int32)
        if KEY_BITS == 16:
            bits = tl.where(vkey >= 0, vkey, vkey ^ 0x7FFF).to(tl.int16)
        else:
            bits = tl.where(vkey >= 0, vkey, vkey ^ 0x7FFFFFFF)
        if RELU:  # on the bits, compared in fp32 (the interpreter's bf16 compare is not reliable)
            neg = bits.to(vals_ptr.dtype.element_ty, bitcast=True).to(tl.float32) < 0
            bits = tl.where(neg, 0, bits).to(bits.dtype)
        val = bits.to(vals_ptr.dtype.element_ty, bitcast=True)
        tl.store(vals_ptr + row * k + j, val, mask=j < k)
        tl.store(ids_ptr + row * k + j, 2147483647 - (ranked & 0xFFFFFFFF), mask=j < k)
    else:
        tl.store(out_ptr + row * KS + j, ranked)


# Host launchers ----------------------------------------------------------------


def _key_bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16


def sortable_keys(v: torch.Tensor) -> torch.Tensor:
    """``_sortable_key`` in torch: float -> int32 keys in the same order (-0.0 as +0.0)."""
    return _keys_of_bits(v.view(torch.int16 if _key_bits(v.dtype) == 16 else torch.int32))


def sortable_keys_at(v: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``sortable_keys(v.gather(1, cols))``, read through the integer view: torch's CPU ``gather`` of a
    bf16 NaN does not keep its bits (0x7FC0 comes back 0xFFFF, a negative NaN), which moved positive NaNs
    from the top of the order to its bottom."""
    return _keys_of_bits(v.view(torch.int16 if _key_bits(v.dtype) == 16 else torch.int32).gather(1, cols))


def _keys_of_bits(b: torch.Tensor) -> torch.Tensor:
    if b.dtype == torch.int16:
        b = b.to(torch.int32)
        s = b ^ ((b >> 15) & 0x7FFF)
    else:
        s = b ^ ((b >> 31) & 0x7FFFFFFF)
    return torch.where(s == -1, 0, s)


def keys_to_values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``sortable_keys``: int32 keys -> the floats they came from."""
    if _key_bits(dtype) == 16:
        bits = torch.where(keys >= 0, keys, keys ^ 0x7FFF).to(torch.int16)
    else:
        bits = torch.where(keys >= 0, keys, keys ^ 0x7FFFFFFF)
    return bits.view(dtype)


def pack(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(value key, id) -> one int64 that orders by value, then by lower id; distinct per id."""
    return (keys.to(torch.int64) << 32) | (IDX_PAD - ids.to(torch.int64))


def unpack(packed: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 packed keys -> (values in ``dtype``, int64 ids)."""
    return keys_to_values((packed >> 32).to(torch.int32), dtype), IDX_PAD - (packed & 0xFFFFFFFF)


def group_best(pre: torch.Tensor, f0: int, G: int, pack32: bool = False, keys_only: bool = False) -> torch.Tensor:
    """Each group of G consecutive columns' best entry, packed; [B, ceil(w / G)].

    int64 ``pack(key, id)`` by default; with ``pack32`` (16-bit dtypes, fewer than
    2^16 groups) int32 ``(max key << 16) | (65535 - group)``, half the bytes for torch.topk;
    with ``keys_only`` the int32 max key alone (``_row_select_kernel``'s input).
    """
    B, w = pre.shape
    n_groups = triton.cdiv(w, G)
    if not use_triton(pre):
        keys = torch.full((B, n_groups * G), -32768 if pack32 else 0, dtype=torch.int64, device=pre.device)
        keys[:, :w] = sortable_keys(pre) if pack32 or keys_only else pack(sortable_keys(pre), torch.arange(f0, f0 + w))
        if keys_only:
            keys[:, w:] = -(2**31)
            return keys.view(B, n_groups, G).amax(2).to(torch.int32)
        if not pack32:
            keys[:, w:] = KEY_NONE
            return keys.view(B, n_groups, G).amax(2)
        gmax = keys.view(B, n_groups, G).amax(2).to(torch.int32)
        return (gmax << 16) | (65535 - torch.arange(n_groups, dtype=torch.int32, device=pre.device))
    narrow = pack32 or keys_only
    best = torch.empty(B, n_groups, dtype=torch.int32 if narrow else torch.int64, device=pre.device)
    groups = max(1, min(TUNING["select_groups"], triton.next_power_of_2(n_groups)))
    _group_best_kernel[(B, triton.cdiv(n_groups, groups))](
        pre,
        best,
        pre,
        w,
        pre.stride(0),
        f0,
        n_groups,
        G=G,
        GROUPS=groups,
        KEY_BITS=_key_bits(pre.dtype),
        PACK32=pack32,
        BATCH=False,
        KEYS_ONLY=keys_only,
        HAS_SCALE=False,
        num_warps=TUNING["select_warps"],
    )
    return best


def scaled(v: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``v * scale`` in v's dtype, as torch rounds it (and as the kernels do); ``v`` without a scale."""
    return v if scale is None else v * scale


def _batch_key_dtype(dtype: torch.dtype) -> torch.dtype:
    """BatchTopK's relu'd keys fit the value's width: int16 for 16-bit dtypes, int32 for fp32."""
    return torch.int32 if _key_bits(dtype) == 32 else torch.int16


def group_best_batch(pre: torch.Tensor, f0: int, G: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """BatchTopK's group keys: each group's best key of relu(pre * scale); [B * ceil(w / G)].

    Flat (row-major) group order, so a group's position ranks equal maxima by the
    lower flat position, which is the order of the groups' best entries. int16 keys
    for 16-bit dtypes, int32 for fp32.
    """
    B, w = pre.shape
    n_groups = triton.cdiv(w, G)
    kdt = _batch_key_dtype(pre.dtype)
    if not use_triton(pre):
        keys = torch.full((B, n_groups * G), -1, dtype=torch.int32, device=pre.device)
        s = scale[f0 : f0 + w] if scale is not None else None
        keys[:, :w] = sortable_keys(scaled(pre, s)).clamp_min(0)
        return keys.view(B, n_groups, G).amax(2).to(kdt).view(-1)
    best = torch.empty(B * n_groups, dtype=kdt, device=pre.device)
    groups = max(1, min(TUNING["select_groups"], triton.next_power_of_2(n_groups)))
    _group_best_kernel[(B, triton.cdiv(n_groups, groups))](
        pre,
        best,
        scale if scale is not None else pre,
        w,
        pre.stride(0),
        f0,
        n_groups,
        G=G,
        GROUPS=groups,
        KEY_BITS=_key_bits(pre.dtype),
        PACK32=False,
        BATCH=True,
        KEYS_ONLY=False,
        HAS_SCALE=scale is not None,
        num_warps=TUNING["select_warps"],
    )
    return best


def group_keys_batch(pre: torch.Tensor, f0: int, G: int, groups: torch.Tensor, scale: torch.Tensor | None):
    """The keys (as ``group_best_batch``'s) of every entry of the given flat groups; [m * G], -1 past the end."""
    B, w = pre.shape
    n_groups = triton.cdiv(w, G)
    m = groups.numel()
    kdt = _batch_key_dtype(pre.dtype)
    if not use_triton(pre):
        cols = ((groups % n_groups) * G).unsqueeze(1) + torch.arange(G, device=pre.device)
        inside = cols < w
        cols = cols.clamp(max=w - 1)
        raw = pre[(groups // n_groups).unsqueeze(1), cols]
        keys = sortable_keys(scaled(raw, scale[f0 + cols] if scale is not None else None)).clamp_min(0)
        return torch.where(inside, keys, -1).to(kdt).view(-1)
    keys = torch.empty(m * G, dtype=kdt, device=pre.device)
    per = 64
    _group_keys_kernel[(triton.cdiv(m, per),)](
        pre,
        groups,
        scale if scale is not None else pre,
        keys,
        m,
        w,
        pre.stride(0),
        f0,
        n_groups,
        G=G,
        GROUPS=per,
        KEY_BITS=_key_bits(pre.dtype),
        HAS_SCALE=scale is not None,
        num_warps=4,
    )
    return keys


ROW_SELECT_MAX = 16384  # group keys, and candidates, that one program of ``_row_select_kernel`` holds


def _row_select(pre: torch.Tensor, f0: int, k: int, G: int, unpack: bool = False, relu: bool = False, gkeys=None):
    """The chunk's exact top-k with the candidate stage in one kernel: [B, KS] packed int64, sorted
    descending, KEY_NONE past min(k, w); with ``unpack`` (k <= w), (values [B, k] in pre's dtype,
    int64 ids [B, k]) instead, also sorted, the values through a ReLU with ``relu``. ``gkeys``: the
    chunk's group keys when the GEMM's epilogue wrote them (``preacts_gemm``), else computed here."""
    B, w = pre.shape
    n_groups = triton.cdiv(w, G)
    if gkeys is None:
        gkeys = group_best(pre, f0, G, keys_only=True)
    NG = triton.next_power_of_2(n_groups)
    KG = triton.next_power_of_2(min(k, n_groups))
    KS = triton.next_power_of_2(k)
    scratch = torch.empty(B, KG, dtype=torch.int32, device=pre.device)
    out = torch.empty(B, KS, dtype=torch.int64, device=pre.device)
    vals = pre.new_empty(B, k) if unpack else out
    ids = torch.empty(B, k, dtype=torch.int64, device=pre.device) if unpack else out
    width = max(NG, KG * G)
    _row_select_kernel[(B,)](
        pre, gkeys, scratch, out, vals, ids, w, pre.stride(0), f0, n_groups, k,
        G=G, NG_BLOCK=NG, KG=KG, KS=KS, KEY_BITS=_key_bits(pre.dtype), UNPACK=unpack, RELU=relu,
        num_warps=max(4, min(TUNING["row_select_max_warps"], width // 512)),
    )  # fmt: skip
    return (vals, ids) if unpack else out


def row_select_fits(w: int, k: int, G: int) -> bool:
    """Whether ``_row_select_kernel`` takes a [*, w] chunk at this k and group size."""
    return _row_select_fits(w, k, G, ROW_SELECT_MAX)


@functools.lru_cache(maxsize=4096)  # pure in its ints (the limit included); cached because each step asks twice
def _row_select_fits(w: int, k: int, G: int, limit: int) -> bool:
    n_groups = triton.cdiv(w, G)
    return triton.next_power_of_2(n_groups) <= limit and triton.next_power_of_2(min(k, n_groups)) * G <= limit


def topk_group(w: int, k: int) -> int:
    """The TopK selection's group size G for a chunk of width w: ``TUNING["topk_select_group"]``, or when
    that is 0, the power of two nearest below sqrt(w / k), within [8, 128], which balances the candidate
    kernel's two searches (w / G group keys, k * G candidates; measured in docs/design/selection.md)."""
    return _topk_group(w, k, TUNING["topk_select_group"], ROW_SELECT_MAX)


@functools.lru_cache(maxsize=4096)  # keyed by everything it reads, so a changed limit or pin is never served stale
def _topk_group(w: int, k: int, pinned: int, limit: int) -> int:
    if pinned:
        return pinned
    G = 1 << min(7, max(3, (max(1, w // max(1, k))).bit_length() - 1 >> 1))
    # Past 16384 groups the candidate kernel cannot hold a row's keys: widen G (beyond 128 if need be)
    # so the chunk still fits, when its k*G candidates then fit too (``row_select_fits``).
    wide = max(G, triton.next_power_of_2(triton.cdiv(w, max(1, limit))))
    return wide if _row_select_fits(w, k, wide, limit) else G


def chunk_top_k(pre: torch.Tensor, f0: int, k: int, gkeys: torch.Tensor | None = None) -> torch.Tensor:
    """The exact top-k entries of a [B, w] chunk whose column 0 is latent f0, packed; [B, >= min(k, w)],
    KEY_NONE in any further slots. Sorted descending when ``_row_select_kernel`` ran (``row_select_fits``).
    ``gkeys``: the chunk's group keys for ``topk_group(w, k)`` when the GEMM wrote them (``pre_chunks``)."""
    B, w = pre.shape
    G = topk_group(w, k)
    if use_triton(pre) and row_select_fits(w, k, G):
        return _row_select(pre, f0, k, G, gkeys=gkeys)
    if _key_bits(pre.dtype) == 16 and triton.cdiv(w, G) <= 65536 and k * G < 65536:
        return _chunk_top_k_32(pre, f0, k, G)
    best = group_best(pre, f0, G)
    top_groups = torch.topk(best, min(k, best.shape[1]), dim=1, sorted=False).values
    first = ((IDX_PAD - (top_groups & 0xFFFFFFFF)) - f0) // G * G  # first column of each chosen group
    cols = (first.unsqueeze(2) + torch.arange(G, device=pre.device)).view(B, -1)
    inside = cols < w
    keys = sortable_keys_at(pre, cols.clamp(max=w - 1))
    packed = torch.where(inside, pack(keys, cols + f0), KEY_NONE)
    return torch.topk(packed, min(k, packed.shape[1]), dim=1, sorted=False).values


def _chunk_top_k_32(pre: torch.Tensor, f0: int, k: int, G: int) -> torch.Tensor:
    """``chunk_top_k`` for 16-bit dtypes with int32 packed keys: 16-bit value key above a 16-bit
    position, so both torch.topk calls run a 32-bit radix select instead of a 64-bit one."""
    B, w = pre.shape
    best = group_best(pre, f0, G, pack32=True)
    kg = min(k, best.shape[1])
    groups = torch.topk(best, kg, dim=1, sorted=False).values
    groups = torch.sort(65535 - (groups & 0xFFFF), dim=1).values  # ascending, so position order is id order
    cols = (groups.unsqueeze(2) * G + torch.arange(G, device=pre.device, dtype=groups.dtype)).view(B, -1)
    inside = cols < w
    keys = sortable_keys_at(pre, cols.clamp(max=w - 1).long())
    pos = torch.arange(cols.shape[1], device=pre.device, dtype=torch.int32)
    packed = torch.where(inside, (keys << 16) | (65535 - pos), torch.iinfo(torch.int32).min)
    top = torch.topk(packed, min(k, packed.shape[1]), dim=1, sorted=False).values
    ids = cols.gather(1, (65535 - (top & 0xFFFF)).clamp(max=cols.shape[1] - 1).long()) + f0
    return torch.where(top == torch.iinfo(torch.int32).min, KEY_NONE, pack(top >> 16, ids))


def select_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection alone on a given [B, F] tensor: (values, int64 ids), [B, k], by the tie rule."""
    if not 1 <= k <= pre.shape[1]:
        raise ValueError(f"k must be in [1, {pre.shape[1]}] (the number of columns), got {k}")
    G = topk_group(pre.shape[1], k)
    if use_triton(pre) and row_select_fits(pre.shape[1], k, G):
        return _row_select(pre, 0, k, G, unpack=True)
    return merged([chunk_top_k(pre, 0, k)], k, pre.dtype)


def merged(parts: list[torch.Tensor], k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of the chunks' packed candidates (``chunk_top_k``'s), sorted and unpacked in ``dtype``."""
    return unpack(torch.topk(torch.cat(parts, dim=1), k, dim=1, sorted=True).values, dtype)


def gather_columns(pre: torch.Tensor, f0: int, ids: torch.Tensor, out: torch.Tensor) -> None:
    """out[:, j] <- pre[:, ids[j] - f0] for the ids inside this [B, w] chunk (others untouched)."""
    B, w = pre.shape
    C = ids.numel()
    if not use_triton(pre):
        inside = (ids >= f0) & (ids < f0 + w)
        cols = (ids - f0).clamp(0, w - 1)
        out.copy_(torch.where(inside, pre[:, cols], out))
        return
    BLOCK = 256
    _gather_columns_kernel[(B, triton.cdiv(C, BLOCK))](pre, ids, out, w, pre.stride(0), f0, C, BLOCK=BLOCK, num_warps=4)


ROW_TOP_MAX = 16384  # slots one program of ``_row_top_kernel`` holds in registers


def row_top(pre: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor, k: int, scale, relu: bool):
    """Each row's k best valid slots of ``pre`` [B, C] (ranked by pre * scale[ids] when ``scale`` is
    given; larger first, equal keys to the lower slot; fewer where fewer are valid). Returns
    (values [B, C]: the chosen ones, relu'd if ``relu``, else 0; gate [B, C] bool: where they pass
    gradient: chosen, and > 0 with ``relu``)."""
    B, C = pre.shape
    if not use_triton(pre) or C > ROW_TOP_MAX:
        key = scaled(pre, scale[ids.clamp(max=scale.numel() - 1)] if scale is not None else None)
        slots = torch.arange(C, device=pre.device)
        packed = torch.where(valid, pack(sortable_keys(key), slots), KEY_NONE)
        top = torch.topk(packed, min(k, C), dim=1, sorted=False).values
        chosen = top != KEY_NONE
        at = torch.where(chosen, IDX_PAD - (top & 0xFFFFFFFF), C)  # unchosen picks write a spare column
        sel = torch.zeros(B, C + 1, dtype=torch.bool, device=pre.device).scatter_(1, at, True)[:, :C]
        gate = (sel & (pre > 0) if relu else sel).contiguous()
        return torch.where(gate, pre, 0), gate
    act = torch.empty_like(pre)
    gate = torch.empty(B, C, dtype=torch.int8, device=pre.device)
    BLOCK = triton.next_power_of_2(C)
    s = scale if scale is not None else pre
    _row_top_kernel[(B,)](
        pre, valid, ids, s, act, gate, C, k, s.numel(),
        BLOCK=BLOCK, KEY_BITS=_key_bits(pre.dtype), HAS_SCALE=scale is not None, RELU=relu,
        num_warps=max(1, min(16, BLOCK // 256)),
    )  # fmt: skip
    return act, gate.view(torch.bool)


def pre_chunks(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int | None = None):
    """Yields (first latent, [B, w] pre-activations, group keys or None) over chunks of F, reusing one
    buffer. With ``k`` (a TopK selection's), a chunk that ``preacts_gemm.fits`` comes from the GEMM
    whose epilogue also wrote its group keys for G = ``topk_group(w, k)`` (``_row_select``'s
    ``gkeys``); otherwise cuBLAS writes it and the keys are None."""
    B, F = xc.shape[0], W_enc.shape[0]
    G = TUNING["select_group"]
    width = max(G, TUNING["chunk_bytes"] // max(1, B * xc.element_size()) // G * G)
    width = min(F, width)
    buf = torch.empty(B * width, device=xc.device, dtype=xc.dtype)
    for f0 in range(0, F, width):
        w = min(F, f0 + width) - f0
        pre = buf[: B * w].view(B, w)
        W, b = W_enc[f0 : f0 + w], b_enc[f0 : f0 + w]
        Gk = topk_group(w, k) if k is not None else 0
        if Gk and row_select_fits(w, k, Gk) and preacts_gemm.fits(xc, W, pre, Gk):
            yield f0, pre, preacts_gemm.preacts_group_keys(xc, W, b, Gk, pre)
            continue
        torch.addmm(b, xc, W.T, out=pre)
        yield f0, pre, None


def topk_preacts(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    b_dec: torch.Tensor | None,
    columns: tuple[torch.Tensor, torch.Tensor] | None = None,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest pre-activations ``(x - b_dec) @ W_enc.T + b_enc`` of each row, by the rule above.

    Returns (values [B, k] in x's dtype, before any activation, or through ``torch.relu`` with
    ``relu`` (in the selection kernel where one chunk holds F); ids [B, k] int64), in descending
    order. Runs the chunked GEMM; keeps nothing [B, F].
    ``columns`` = (ids [C], out [B, C]): also copies those latents' pre-activations into
    ``out`` from the same chunks (``gather_columns``; the dead set of ``ops/_dead.py``).
    """
    xc = x - b_dec if b_dec is not None else x
    F = W_enc.shape[0]
    G = topk_group(F, k)
    parts = []
    for f0, pre, gkeys in pre_chunks(xc, W_enc, b_enc, k):
        if columns is not None:
            gather_columns(pre, f0, *columns)
        if pre.shape[1] == F and use_triton(pre) and row_select_fits(F, k, G):  # one chunk: values and ids
            return _row_select(pre, f0, k, G, unpack=True, relu=relu, gkeys=gkeys)  # from the kernel, sorted
        parts.append(chunk_top_k(pre, f0, k, gkeys))
    values, ids = merged(parts, k, x.dtype)
    return (torch.relu(values) if relu else values), ids


# BatchTopK: the n largest entries of a whole batch ----------------------------------
#
# The rule: rank every entry of relu(pre * scale) over the batch by value, larger first, and
# equal values by the lower flat position b * F + f (a stable descending sort of the flattened
# batch); keep the first n. The group argument above holds over the flattened chunk too: the
# chunk's top n entries lie in its n best groups (groups compared by their best entry, equal
# maxima by flat position). So ``compact.top_positions`` over the [B * F_chunk / G] group keys
# picks those groups (in flat order), ``group_keys_batch`` keys their n * G entries (still in
# flat order, since a group's columns are consecutive), and ``top_positions`` over those keys
# gives the chunk's exact top n, already in row-major order. The global top n lies among the
# chunks' top n; a merge by (value, flat position) picks it when F spans several chunks.


def _batch_chunk_top_n(pre: torch.Tensor, f0: int, n: int, scale: torch.Tensor | None):
    """The chunk's exact top-n entries in flat order: (value keys, rows, latent ids, raw pre values), each [m]."""
    B, w = pre.shape
    G = TUNING["select_group"]
    n_groups = triton.cdiv(w, G)
    m = min(n, B * w)
    best = group_best_batch(pre, f0, G, scale)
    groups = top_positions(best, min(m, best.numel()))
    keys = group_keys_batch(pre, f0, G, groups, scale)
    at = top_positions(keys, m)  # positions among the candidates, ascending = flat order
    g = groups[at // G]
    rows = g // n_groups
    cols = (g % n_groups) * G + at % G
    return keys[at].to(torch.int32), rows, f0 + cols, pre[rows, cols]


def batch_topk_preacts(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    n: int,
    b_dec: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    columns: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """The n largest entries of relu(((x - b_dec) @ W_enc.T + b_enc) * scale) over the whole batch.

    Returns a variable-length code in row-major order (by row, then latent id): ``acts`` [n]
    (the ranked values relu(pre * scale), x's dtype), ``raw`` [n] (relu(pre), x's dtype),
    ``indices`` [n] int64 and ``row_offsets`` [B + 1] int64. Runs the chunked GEMM; keeps
    nothing [B, F]; no host sync. ``columns``: as ``topk_preacts``'s.
    """
    B, F = x.shape[0], W_enc.shape[0]
    xc = x - b_dec if b_dec is not None else x
    parts = []
    for f0, pre, _ in pre_chunks(xc, W_enc, b_enc):
        parts.append(_batch_chunk_top_n(pre, f0, n, scale))
        if columns is not None:
            gather_columns(pre, f0, *columns)
    keys, rows, ids, raw = (torch.cat(t) for t in zip(*parts)) if len(parts) > 1 else parts[0]
    if len(parts) > 1:  # merge: value descending, then flat position ascending; then row-major
        flat = rows * F + ids
        order = torch.sort(flat, stable=True).indices
        order = order[torch.sort(keys[order], descending=True, stable=True).indices[:n]]
        order = order[torch.argsort(flat[order])]
        keys, rows, ids, raw = keys[order], rows[order], ids[order], raw[order]
    acts = keys_to_values(keys, x.dtype)
    bounds = torch.arange(B + 1, device=x.device, dtype=rows.dtype)
    return acts, torch.relu(raw), ids, torch.searchsorted(rows, bounds)


# JumpReLU: every entry above a per-latent threshold, and those near it ------------------


def threshold_collect(pre, f0, F, theta, bandwidth, scale, flat, raw, slot0):
    """Collects a chunk's entries (see ``threshold_preacts``) into ``flat``/``raw`` from slot ``slot0`` on.

    ``slot0`` is a 0-d int64 tensor (the entries of earlier chunks); returns ``slot0`` plus this
    chunk's count. Slots at or past ``capacity`` are not written. No host sync.
    """
    B, w = pre.shape
    capacity = flat.numel()
    if not use_triton(pre):
        t = theta[f0 : f0 + w]
        key = scaled(pre, scale[f0 : f0 + w] if scale is not None else None)
        mask = key > t
        if bandwidth > 0:
            u = (key - t) / bandwidth
            mask |= (u > -0.5) & (u < 0.5)
        at = torch.nonzero_static(mask, size=capacity, fill_value=-1)
        slots = slot0 + torch.arange(capacity, device=pre.device)
        keep = (at[:, 0] >= 0) & (slots < capacity)
        slots = torch.where(keep, slots, capacity)  # a dump slot past the end
        flat_ext = torch.cat([flat, flat.new_empty(1)])
        raw_ext = torch.cat([raw, raw.new_empty(1)])
        flat_ext[slots] = at[:, 0] * F + f0 + at[:, 1]
        raw_ext[slots] = pre[at[:, 0].clamp_min(0), at[:, 1].clamp_min(0)]
        flat.copy_(flat_ext[:capacity])
        raw.copy_(raw_ext[:capacity])
        return slot0 + mask.sum()
    BLOCK = 1024
    n_blocks = triton.cdiv(w, BLOCK)
    counts = torch.empty(B * n_blocks, dtype=torch.int32, device=pre.device)
    scale_arg = scale if scale is not None else theta
    args = (pre, theta, scale_arg)
    common = dict(BLOCK=BLOCK, HAS_SCALE=scale is not None, HAS_BAND=bandwidth > 0, num_warps=4)
    _threshold_collect_kernel[(B, n_blocks)](
        *args, counts, flat, raw, w, pre.stride(0), f0, F, capacity, slot0, float(bandwidth), WRITE=False, **common
    )
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    _threshold_collect_kernel[(B, n_blocks)](
        *args, ends, flat, raw, w, pre.stride(0), f0, F, capacity, slot0, float(bandwidth), WRITE=True, **common
    )
    return slot0 + ends[-1]


def threshold_preacts(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor | None,
    threshold: torch.Tensor,
    bandwidth: float,
    capacity: int,
    scale: torch.Tensor | None = None,
):
    """The entries a JumpReLU step needs, as a variable-length code of fixed capacity.

    With pre = (x - b_dec) @ W_enc.T + b_enc and theta = threshold in x's dtype, an entry is
    collected when it is active (pre > theta) or in the estimators' band
    (|(pre - theta) / bandwidth| < 1/2, computed in x's dtype as the reference does).
    Returns (pre values [capacity] x's dtype, latent ids [capacity] int64, row_offsets
    [B + 1] int64, count [] int64 of entries that qualified), in row-major order; slots past
    the last collected entry hold id -1 and value 0. ``count > capacity`` means entries were
    dropped (the caller reports it; which ones is then unspecified: those past the capacity
    in chunk-then-row-major order). ``bandwidth`` 0 collects the active entries only; with
    ``scale`` the comparison is pre * scale > theta (BatchTopK's inference rule), and the values
    returned are still pre. Runs the chunked GEMM; no host sync.
    """
    B, F = x.shape[0], W_enc.shape[0]
    xc = x - b_dec if b_dec is not None else x
    theta = threshold.to(x.dtype)
    flat = torch.full((capacity,), B * F, dtype=torch.int64, device=x.device)  # empty slots sort last
    raw = torch.zeros(capacity, dtype=x.dtype, device=x.device)
    count = torch.zeros((), dtype=torch.int64, device=x.device)
    chunks = 0
    for f0, pre, _ in pre_chunks(xc, W_enc, b_enc):
        count = threshold_collect(pre, f0, F, theta, bandwidth, scale, flat, raw, count)
        chunks += 1
    if chunks > 1:  # each chunk filled its slots in row-major order; the code wants (row, latent) order
        order = torch.argsort(flat)
        flat, raw = flat[order], raw[order]
    rows = flat // F
    ids = torch.where(rows < B, flat % F, -1)
    bounds = torch.arange(B + 1, device=x.device, dtype=rows.dtype)
    return raw, ids, torch.searchsorted(rows, bounds), count
