"""The chunked encoder pass: pre-activations chunk by chunk, and the selections run on them.

The encoder GEMM (``pre_chunks``) runs in cuBLAS (``torch.addmm``) over chunks
of F whose [B, F_chunk] output stays within ``TUNING["chunk_bytes"]``; no
[B, F] tensor survives. Where ``preacts_gemm.fits`` (bf16 / fp16 on Hopper; on by
default, ``TUNING["preacts_gemm"]``), a TopK selection's
chunks come from ``preacts_gemm``'s Triton GEMM instead, whose epilogue writes the
group keys, so ``groups._group_best_kernel``'s read of the chunk goes. Bytes (bf16,
B=4096, D=2048, F=262144): the GEMM writes 2 GiB of pre-activations, the selection reads
them once plus k*G entries per row gathered again.

Each selection over those chunks: ``topk_preacts`` (per row, ``row_topk``), ``batch_topk_preacts``
(whole batch, ``batch_topk``), ``threshold_preacts`` (above a threshold, ``threshold``); with
``columns`` the first two also copy a fixed set of latents' pre-activations out of the same chunks
(``gather_columns``).
"""

import torch
import triton
import triton.language as tl

from ..._launch import TUNING, use_triton
from .. import preacts_gemm
from .batch_topk import batch_chunk_top_n, batch_merged
from .keys import keys_to_values
from .row_topk import chunk_top_k, merged, row_select_fits, row_select_values, topk_group
from .threshold import threshold_collect

# Kernels -----------------------------------------------------------------------


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


# Host launchers ----------------------------------------------------------------


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


def pre_chunks(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int | None = None):
    """Yields (first latent, [B, w] pre-activations, group keys or None) over chunks of F, reusing one
    buffer. With ``k`` (a TopK selection's), a chunk that ``preacts_gemm.fits`` comes from the GEMM
    whose epilogue also wrote its group keys for G = ``topk_group(w, k)`` (``row_topk.row_select_values``'s
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
    """The k largest pre-activations ``(x - b_dec) @ W_enc.T + b_enc`` of each row, by the tie rule (``select``).

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
            return row_select_values(pre, f0, k, G, relu=relu, gkeys=gkeys)  # from the kernel, sorted
        parts.append(chunk_top_k(pre, f0, k, gkeys))
    values, ids = merged(parts, k, x.dtype)
    return (torch.relu(values) if relu else values), ids


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
        parts.append(batch_chunk_top_n(pre, f0, n, scale))
        if columns is not None:
            gather_columns(pre, f0, *columns)
    keys, rows, ids, raw = batch_merged(parts, n, F)
    acts = keys_to_values(keys, x.dtype)
    bounds = torch.arange(B + 1, device=x.device, dtype=rows.dtype)
    return acts, torch.relu(raw), ids, torch.searchsorted(rows, bounds)


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
