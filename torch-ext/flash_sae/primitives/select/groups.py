"""The group pass both selections start from: each group of G consecutive columns' best key.

``_group_best_kernel`` reads a [B, w] pre-activation chunk once and writes one key per (row, group):
for the per-row TopK selection (``row_topk``) the group's best entry packed with its id (int64),
16-bit-packed with its group index (``pack32``) or its best sortable key alone (``keys_only``, the
candidate kernel's input); for BatchTopK (``batch_topk``) the group's best key of relu(pre * scale),
in flat (row-major) group order.
"""

import torch
import triton
import triton.language as tl

from ..._launch import TUNING, use_triton
from ..triton_utils import cast_rtne
from .keys import KEY_NONE, key_bits, pack, scaled, sortable_key, sortable_keys

# Kernels -----------------------------------------------------------------------


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
        best = tl.max(tl.where(mask, tl.maximum(sortable_key(v, KEY_BITS), 0), -1), axis=1)
    elif KEYS_ONLY:
        best = tl.max(tl.where(mask, sortable_key(v, KEY_BITS), -2147483648), axis=1)
    elif PACK32:
        # Groups with equal maxima rank by lower group index, which is the lower best id.
        key = tl.where(mask, sortable_key(v, KEY_BITS), -32768)
        best = (tl.max(key, axis=1) << 16) | (65535 - grp)
    else:
        packed = (sortable_key(v, KEY_BITS).to(tl.int64) << 32) | (2147483647 - (idx_base + offs)).to(tl.int64)
        best = tl.max(tl.where(mask, packed, -9223372036854775808), axis=1)
    tl.store(best_ptr + row * n_groups + grp, best, mask=grp < n_groups)


# Host launchers ----------------------------------------------------------------


def group_best(pre: torch.Tensor, f0: int, G: int) -> torch.Tensor:
    """Each group of G consecutive columns' best entry of a [B, w] chunk whose column 0 is latent f0,
    as int64 ``pack(key, id)``; [B, ceil(w / G)]."""
    return _group_best(pre, f0, G, pack32=False, keys_only=False)


def group_best_pack32(pre: torch.Tensor, f0: int, G: int) -> torch.Tensor:
    """``group_best`` in half the bytes for torch.topk (16-bit dtypes, fewer than 2^16 groups): int32
    ``(max key << 16) | (65535 - group)``; [B, ceil(w / G)]."""
    return _group_best(pre, f0, G, pack32=True, keys_only=False)


def group_max_keys(pre: torch.Tensor, f0: int, G: int) -> torch.Tensor:
    """Each group's max sortable key alone, int32 [B, ceil(w / G)] (``_row_select_kernel``'s input)."""
    return _group_best(pre, f0, G, pack32=False, keys_only=True)


def _group_best(pre: torch.Tensor, f0: int, G: int, *, pack32: bool, keys_only: bool) -> torch.Tensor:
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
    _launch_group_best(pre, best, None, f0, G, pack32=pack32, batch=False, keys_only=keys_only)
    return best


def batch_key_dtype(dtype: torch.dtype) -> torch.dtype:
    """BatchTopK's relu'd keys fit the value's width: int16 for 16-bit dtypes, int32 for fp32."""
    return torch.int32 if key_bits(dtype) == 32 else torch.int16


def group_best_batch(pre: torch.Tensor, f0: int, G: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """BatchTopK's group keys: each group's best key of relu(pre * scale); [B * ceil(w / G)].

    Flat (row-major) group order, so a group's position ranks equal maxima by the
    lower flat position, which is the order of the groups' best entries. int16 keys
    for 16-bit dtypes, int32 for fp32.
    """
    B, w = pre.shape
    n_groups = triton.cdiv(w, G)
    kdt = batch_key_dtype(pre.dtype)
    if not use_triton(pre):
        keys = torch.full((B, n_groups * G), -1, dtype=torch.int32, device=pre.device)
        s = scale[f0 : f0 + w] if scale is not None else None
        keys[:, :w] = sortable_keys(scaled(pre, s)).clamp_min(0)
        return keys.view(B, n_groups, G).amax(2).to(kdt).view(-1)
    best = torch.empty(B * n_groups, dtype=kdt, device=pre.device)
    _launch_group_best(pre, best, scale, f0, G, pack32=False, batch=True, keys_only=False)
    return best


def _launch_group_best(pre, best, scale, f0: int, G: int, *, pack32: bool, batch: bool, keys_only: bool) -> None:
    """``_group_best_kernel`` over the [B, w] chunk ``pre`` into ``best`` (one key per (row, group))."""
    B, w = pre.shape
    n_groups = triton.cdiv(w, G)
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
        KEY_BITS=key_bits(pre.dtype),
        PACK32=pack32,
        BATCH=batch,
        KEYS_ONLY=keys_only,
        HAS_SCALE=scale is not None,
        num_warps=TUNING["select_warps"],
    )
