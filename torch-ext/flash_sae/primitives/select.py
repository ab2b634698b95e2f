"""Exact top-k selection over the columns of pre-activation chunks, and the chunked encoder GEMM.

The rule (deterministic; ``reference.topk_select`` states it as a stable
descending sort): larger value first; equal values go to the lower latent id;
-0.0 equals +0.0. NaN compares by its bits (a positive NaN is above +inf, a
negative NaN below -inf). The selection is exact on the pre-activations as
computed in the input dtype.

How, in one read of each chunk. Order a row's entries by (value, then lower
id) and cut the row into groups of G consecutive latents. ``_group_best_kernel``
reads the chunk once and writes each group's best entry as one int64 key,
(sortable value bits << 32) | (2^31 - 1 - id), so [B, F_chunk / G] keys, G
times fewer than entries. The row's top-k entries all lie in the k groups with
the best keys: if an entry's group were not among them, k better groups would
each hold an entry better than it. So torch.topk over the group keys, a gather
of those k*G entries and a torch.topk over their packed keys give the chunk's
exact top-k, which a last torch.topk merges across chunks, sorted. Nothing
ever ties, because the packed keys are distinct. For bf16/fp16 (16-bit value
keys) both calls use int32 keys, (value key << 16) | (65535 - position), with
positions in id order, whenever the chunk has < 2^16 groups and k*G < 2^16.

The encoder GEMM (``pre_chunks``) runs in cuBLAS (``torch.addmm``) over chunks
of F whose [B, F_chunk] output stays within ``TUNING["chunk_bytes"]``; no
[B, F] tensor survives. Bytes (bf16, B=4096, D=2048, F=262144): the GEMM writes
2 GiB of pre-activations, the selection reads them once plus k*G entries per
row gathered again.
"""

import torch
import triton
import triton.language as tl

from .._launch import TUNING, use_triton

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
    n,
    stride_pb,
    idx_base,  # latent id of the chunk's column 0
    n_groups,
    G: tl.constexpr,
    GROUPS: tl.constexpr,  # groups per program
    KEY_BITS: tl.constexpr,
    PACK32: tl.constexpr,  # 16-bit keys and < 2^16 groups: (max key << 16) | (65535 - group)
):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    offs = grp[:, None] * G + tl.arange(0, G)[None, :]
    mask = offs < n
    v = tl.load(pre_ptr + row * stride_pb + offs, mask=mask, other=0.0)
    if PACK32:
        # Groups with equal maxima rank by lower group index, which is the lower best id.
        key = tl.where(mask, _sortable_key(v, KEY_BITS), -32768)
        best = (tl.max(key, axis=1) << 16) | (65535 - grp)
    else:
        packed = (_sortable_key(v, KEY_BITS).to(tl.int64) << 32) | (2147483647 - (idx_base + offs)).to(tl.int64)
        best = tl.max(tl.where(mask, packed, -9223372036854775808), axis=1)
    tl.store(best_ptr + row * n_groups + grp, best, mask=grp < n_groups)


# Host launchers ----------------------------------------------------------------


def _key_bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16


def sortable_keys(v: torch.Tensor) -> torch.Tensor:
    """``_sortable_key`` in torch: float -> int32 keys in the same order (-0.0 as +0.0)."""
    if _key_bits(v.dtype) == 16:
        b = v.view(torch.int16).to(torch.int32)
        s = b ^ ((b >> 15) & 0x7FFF)
    else:
        b = v.view(torch.int32)
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


def group_best(pre: torch.Tensor, f0: int, G: int, pack32: bool = False) -> torch.Tensor:
    """Each group of G consecutive columns' best entry, packed; [B, ceil(w / G)].

    int64 ``pack(key, id)`` by default; with ``pack32`` (16-bit dtypes, fewer than
    2^16 groups) int32 ``(max key << 16) | (65535 - group)``, half the bytes for torch.topk.
    """
    B, w = pre.shape
    n_groups = triton.cdiv(w, G)
    if not use_triton(pre):
        keys = torch.full((B, n_groups * G), -32768 if pack32 else 0, dtype=torch.int64, device=pre.device)
        keys[:, :w] = sortable_keys(pre) if pack32 else pack(sortable_keys(pre), torch.arange(f0, f0 + w))
        if not pack32:
            keys[:, w:] = KEY_NONE
            return keys.view(B, n_groups, G).amax(2)
        gmax = keys.view(B, n_groups, G).amax(2).to(torch.int32)
        return (gmax << 16) | (65535 - torch.arange(n_groups, dtype=torch.int32, device=pre.device))
    best = torch.empty(B, n_groups, dtype=torch.int32 if pack32 else torch.int64, device=pre.device)
    groups = max(1, min(TUNING["select_groups"], triton.next_power_of_2(n_groups)))
    _group_best_kernel[(B, triton.cdiv(n_groups, groups))](
        pre,
        best,
        w,
        pre.stride(0),
        f0,
        n_groups,
        G=G,
        GROUPS=groups,
        KEY_BITS=_key_bits(pre.dtype),
        PACK32=pack32,
        num_warps=TUNING["select_warps"],
    )
    return best


def chunk_top_k(pre: torch.Tensor, f0: int, k: int) -> torch.Tensor:
    """The exact top-k entries of a [B, w] chunk whose column 0 is latent f0, packed; [B, min(k, ...)]."""
    B, w = pre.shape
    G = TUNING["select_group"]
    if _key_bits(pre.dtype) == 16 and triton.cdiv(w, G) <= 65536 and k * G < 65536:
        return _chunk_top_k_32(pre, f0, k, G)
    best = group_best(pre, f0, G)
    top_groups = torch.topk(best, min(k, best.shape[1]), dim=1, sorted=False).values
    first = ((IDX_PAD - (top_groups & 0xFFFFFFFF)) - f0) // G * G  # first column of each chosen group
    cols = (first.unsqueeze(2) + torch.arange(G, device=pre.device)).view(B, -1)
    inside = cols < w
    keys = sortable_keys(pre.gather(1, cols.clamp(max=w - 1)))
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
    keys = sortable_keys(pre.gather(1, cols.clamp(max=w - 1).long()))
    pos = torch.arange(cols.shape[1], device=pre.device, dtype=torch.int32)
    packed = torch.where(inside, (keys << 16) | (65535 - pos), torch.iinfo(torch.int32).min)
    top = torch.topk(packed, min(k, packed.shape[1]), dim=1, sorted=False).values
    ids = cols.gather(1, (65535 - (top & 0xFFFF)).clamp(max=cols.shape[1] - 1).long()) + f0
    return torch.where(top == torch.iinfo(torch.int32).min, KEY_NONE, pack(top >> 16, ids))


def select_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection alone on a given [B, F] tensor: (values, int64 ids), [B, k], by the tie rule."""
    return unpack(torch.topk(chunk_top_k(pre, 0, k), k, dim=1, sorted=True).values, pre.dtype)


def pre_chunks(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor):
    """Yields (first latent, [B, w] pre-activations) over chunks of F, reusing one buffer."""
    B, F = xc.shape[0], W_enc.shape[0]
    G = TUNING["select_group"]
    width = max(G, TUNING["chunk_bytes"] // max(1, B * xc.element_size()) // G * G)
    width = min(F, width)
    buf = torch.empty(B * width, device=xc.device, dtype=xc.dtype)
    for f0 in range(0, F, width):
        w = min(F, f0 + width) - f0
        pre = buf[: B * w].view(B, w)
        torch.addmm(b_enc[f0 : f0 + w], xc, W_enc[f0 : f0 + w].T, out=pre)
        yield f0, pre


def topk_preacts(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, b_dec: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest pre-activations ``(x - b_dec) @ W_enc.T + b_enc`` of each row, by the rule above.

    Returns (values [B, k] in x's dtype, before any activation; ids [B, k]
    int64), in descending order. Runs the chunked GEMM; keeps nothing [B, F].
    """
    xc = x - b_dec if b_dec is not None else x
    best = torch.cat([chunk_top_k(pre, f0, k) for f0, pre in pre_chunks(xc, W_enc, b_enc)], dim=1)
    return unpack(torch.topk(best, k, dim=1, sorted=True).values, x.dtype)
