"""Exact BatchTopK selection: the n largest entries of a whole batch of pre-activation chunks.

The rule: rank every entry of relu(pre * scale) over the batch by value, larger first, and
equal values by the lower flat position b * F + f (a stable descending sort of the flattened
batch); keep the first n. The group argument of ``row_topk`` holds over the flattened chunk too: the
chunk's top n entries lie in its n best groups (groups compared by their best entry, equal
maxima by flat position). So ``compact.top_positions`` over the [B * F_chunk / G] group keys
(``groups.group_best_batch``) picks those groups (in flat order), ``group_keys_batch`` keys their
n * G entries (still in flat order, since a group's columns are consecutive), and ``top_positions``
over those keys gives the chunk's exact top n, already in row-major order. The global top n lies
among the chunks' top n; ``batch_merged`` picks it by (value, flat position) when F spans several
chunks.
"""

import torch
import triton
import triton.language as tl

from ..._launch import TUNING, use_triton
from ..compact import top_positions
from ..triton_utils import cast_rtne
from .groups import batch_key_dtype, group_best_batch
from .keys import key_bits, scaled, sortable_key, sortable_keys

# Kernels -----------------------------------------------------------------------


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
    key = tl.where(mask, tl.maximum(sortable_key(v, KEY_BITS), 0), -1)
    tl.store(keys_ptr + i[:, None] * G + tl.arange(0, G)[None, :], key, mask=live_g[:, None])


# Host launchers ----------------------------------------------------------------


def group_keys_batch(pre: torch.Tensor, f0: int, G: int, groups: torch.Tensor, scale: torch.Tensor | None):
    """The keys (as ``group_best_batch``'s) of every entry of the given flat groups; [m * G], -1 past the end."""
    B, w = pre.shape
    n_groups = triton.cdiv(w, G)
    m = groups.numel()
    kdt = batch_key_dtype(pre.dtype)
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
        pre, groups, scale if scale is not None else pre, keys, m, w, pre.stride(0), f0, n_groups,
        G=G, GROUPS=per, KEY_BITS=key_bits(pre.dtype), HAS_SCALE=scale is not None, num_warps=4,
    )  # fmt: skip
    return keys


def batch_chunk_top_n(pre: torch.Tensor, f0: int, n: int, scale: torch.Tensor | None):
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


def batch_merged(parts: list[tuple], n: int, F: int) -> tuple[torch.Tensor, ...]:
    """The batch's top n from the chunks' (``batch_chunk_top_n``'s, each in flat order): value keys,
    rows, latent ids and raw values, each [n], in row-major order. One chunk is returned as it is;
    several merge by value descending, then flat position row * F + id ascending."""
    keys, rows, ids, raw = (torch.cat(t) for t in zip(*parts)) if len(parts) > 1 else parts[0]
    if len(parts) > 1:  # merge: value descending, then flat position ascending; then row-major
        flat = rows * F + ids
        order = torch.sort(flat, stable=True).indices
        order = order[torch.sort(keys[order], descending=True, stable=True).indices[:n]]
        order = order[torch.argsort(flat[order])]
        keys, rows, ids, raw = keys[order], rows[order], ids[order], raw[order]
    return keys, rows, ids, raw
