"""Exact per-row top-k: the k best entries of each row of a pre-activation chunk, by the tie rule.

How, in one read of each chunk. Order a row's entries by (value, then lower
id) and cut the row into groups of G consecutive latents. The row's top-k
entries all lie in the k groups with the best best-entries: if an entry's group
were not among them, k better groups would each hold an entry better than it.
``groups._group_best_kernel`` reads the chunk once and writes each group's best value
key (int32); ``_row_select_kernel``, one program per row, finds the k best
groups by a bitwise search over those keys (equal maxima: the lower group,
whose best entry has the lower id), the exact top k of their k*G entries by a
second search (equal keys: the lower position, which is the lower id), and
sorts those k. G follows the chunk (``topk_group``: about sqrt(w / k), which
balances the two searches). Chunks merge by a last torch.topk over packed
int64 keys (``keys.pack``), which never tie.
Past ``ROW_SELECT_MAX`` group keys or candidates per row, and on the CPU's
plain-torch path, the candidate stage is torch.topk over packed group keys,
a gather and a torch.topk over the candidates' packed keys (int32 packing for
bf16/fp16 when the chunk has < 2^16 groups and k*G < 2^16).

``row_top`` is the same search over a small [B, C] buffer in one program per row (the AuxK
selection over the dead set's slots).
"""

import functools

import torch
import triton
import triton.language as tl

from ..._launch import TUNING, use_triton
from ..triton_utils import cast_rtne
from .groups import group_best, group_best_pack32, group_max_keys
from .keys import IDX_PAD, KEY_NONE, key_bits, pack, scaled, sortable_key, sortable_keys, sortable_keys_at, unpack

# Kernels -----------------------------------------------------------------------


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
    key = sortable_key(kv, KEY_BITS)
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
    key = sortable_key(tl.load(pre_ptr + row * stride_pb + col, mask=live, other=0.0), KEY_BITS)
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


ROW_SELECT_MAX = 16384  # group keys, and candidates, that one program of ``_row_select_kernel`` holds


def row_select_packed(pre: torch.Tensor, f0: int, k: int, G: int, gkeys: torch.Tensor | None = None) -> torch.Tensor:
    """The [B, w] chunk's exact top-k with the candidate stage in one kernel: [B, KS] packed int64
    (KS = next power of two >= k), sorted descending, KEY_NONE past min(k, w). ``gkeys``: the chunk's
    group keys when the GEMM's epilogue wrote them (``preacts_gemm``), else computed here."""
    return _row_select(pre, f0, k, G, unpack=False, relu=False, gkeys=gkeys)


def row_select_values(
    pre: torch.Tensor, f0: int, k: int, G: int, relu: bool = False, gkeys: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_select_packed`` unpacked in the kernel (k <= w): (values [B, k] in pre's dtype, through a
    ReLU with ``relu``; int64 ids [B, k]), sorted descending by the tie rule."""
    return _row_select(pre, f0, k, G, unpack=True, relu=relu, gkeys=gkeys)


def _row_select(pre: torch.Tensor, f0: int, k: int, G: int, *, unpack: bool, relu: bool, gkeys):
    """``_row_select_kernel`` over the chunk: the packed keys, or with ``unpack`` (values, ids)."""
    B, w = pre.shape
    n_groups = triton.cdiv(w, G)
    if gkeys is None:
        gkeys = group_max_keys(pre, f0, G)
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
        G=G, NG_BLOCK=NG, KG=KG, KS=KS, KEY_BITS=key_bits(pre.dtype), UNPACK=unpack, RELU=relu,
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
        return row_select_packed(pre, f0, k, G, gkeys=gkeys)
    if key_bits(pre.dtype) == 16 and triton.cdiv(w, G) <= 65536 and k * G < 65536:
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
    best = group_best_pack32(pre, f0, G)
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
        return row_select_values(pre, 0, k, G)
    return merged([chunk_top_k(pre, 0, k)], k, pre.dtype)


def merged(parts: list[torch.Tensor], k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of the chunks' packed candidates (``chunk_top_k``'s), sorted and unpacked in ``dtype``."""
    return unpack(torch.topk(torch.cat(parts, dim=1), k, dim=1, sorted=True).values, dtype)


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
        BLOCK=BLOCK, KEY_BITS=key_bits(pre.dtype), HAS_SCALE=scale is not None, RELU=relu,
        num_warps=max(1, min(16, BLOCK // 256)),
    )  # fmt: skip
    return act, gate.view(torch.bool)
