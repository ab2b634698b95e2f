"""Sortable keys: the order every selection ranks by, as integers.

A float's sortable key is an int32 whose signed order is the float order (-0.0 keyed as +0.0; a
positive NaN above +inf, a negative NaN below -inf): ``sortable_key`` in Triton, ``sortable_keys``
in torch, ``keys_to_values`` back. ``pack`` puts a key above a latent id in one int64,
(key << 32) | (2^31 - 1 - id), which orders by value, then by lower id, and never ties;
``unpack`` takes it apart.
"""

import torch
import triton
import triton.language as tl

# Constants ---------------------------------------------------------------------


IDX_PAD = 2**31 - 1  # ids are packed as IDX_PAD - id, so a lower id packs larger


KEY_NONE = -(2**63)  # the packed key of no entry (a group past the chunk's end)


# Kernels -----------------------------------------------------------------------


@triton.jit
def sortable_key(v, KEY_BITS: tl.constexpr):
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


# Host launchers ----------------------------------------------------------------


def key_bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16


def sortable_keys(v: torch.Tensor) -> torch.Tensor:
    """``sortable_key`` in torch: float -> int32 keys in the same order (-0.0 as +0.0)."""
    return _keys_of_bits(v.view(torch.int16 if key_bits(v.dtype) == 16 else torch.int32))


def sortable_keys_at(v: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``sortable_keys(v.gather(1, cols))``, read through the integer view: torch's CPU ``gather`` of a
    bf16 NaN does not keep its bits (0x7FC0 comes back 0xFFFF, a negative NaN), which moved positive NaNs
    from the top of the order to its bottom."""
    return _keys_of_bits(v.view(torch.int16 if key_bits(v.dtype) == 16 else torch.int32).gather(1, cols))


def _keys_of_bits(b: torch.Tensor) -> torch.Tensor:
    if b.dtype == torch.int16:
        b = b.to(torch.int32)
        s = b ^ ((b >> 15) & 0x7FFF)
    else:
        s = b ^ ((b >> 31) & 0x7FFFFFFF)
    return torch.where(s == -1, 0, s)


def keys_to_values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``sortable_keys``: int32 keys -> the floats they came from."""
    if key_bits(dtype) == 16:
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


def scaled(v: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``v * scale`` in v's dtype, as torch rounds it (and as the kernels do); ``v`` without a scale."""
    return v if scale is None else v * scale
