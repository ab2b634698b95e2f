"""The BatchTopK and Matryoshka BatchTopK SAE steps with their latents sharded over ranks.

The selection is the exact global batch top-n (n = int(k * B)) of the one-process
``batchtopk_sae_step``, made over shards as the sharded TopK step makes its per-row one:

1. Local candidates: the chunked encoder GEMM over the rank's rows and the one-process batch selection
   (``primitives.select.batch_topk``: ``batch_chunk_top_n`` per chunk, ``batch_merged`` across them),
   keyed by *global* latent id: the shard's best min(n, B * F_r) entries of the whole batch as (value
   key, row, id, raw pre-activation), padded to n with keys that rank below every real entry.
2. One all-gather of those [4, n] int64 rows (W * 4 * n * 8 bytes).
3. The global top n from the gathered candidates with ``batch_merged``, the merge the one-process step
   makes across its chunks (value descending, then the flat position b * F + f): the same entries in
   the same row-major order. Why the candidates suffice: an entry among the batch's top n has fewer
   than n entries above it, so fewer than n in its own shard.
4. Decode, loss and backward: ``_sharded_mse.py`` (each rank decodes its own entries, one all-reduce of
   the [B, D] fp32 partials, [G, B, D] with Matryoshka's G levels; the backward all-reduces the
   encoder's share of dx, or its column sum).

``min_act``, the smallest positive ranked activation (the inference threshold's input), comes from the
whole code, so every rank of the latent group computes the same one.

With ``rescale_acts_by_decoder_norm`` each shard ranks its own latents by pre * ||W_dec[f]|| from its own
rows: nothing more is exchanged. Deterministic for a given world size; no host sync beyond the
collectives.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from .._validation import check_batch_k, check_prefix_sizes
from ..ops._matryoshka import min_positive
from ..ops.batchtopk.batchtopk_sae_step import ranking_scale
from ..primitives.select.batch_topk import batch_chunk_top_n, batch_merged
from ..primitives.select.keys import keys_to_values
from ..primitives.select.preacts import pre_chunks
from ..results import BatchTopKSAEStep, MatryoshkaSAEStep, SparseCode, code_l0
from ._sharded_mse import ShardedCode, ShardedLoss, all_gather_single, sharded_mse
from .sharded_topk_sae_step import check_shard_args


def _batch_candidates(x, W_enc, b_enc, b_dec, scale, n, f0, n_features):
    """This shard's best entries of the whole batch as [4, n] int64: value keys, rows, global ids and the
    raw pre-activations (as fp64 bits), padded with key -1 past the shard's min(n, B * F_r)."""
    xc = x - b_dec
    parts = []
    for c0, pre, _ in pre_chunks(xc, W_enc, b_enc):
        keys, rows, ids, raw = batch_chunk_top_n(pre, c0, n, scale)
        parts.append((keys, rows, ids + f0, raw))
    keys, rows, ids, raw = batch_merged(parts, n, n_features)
    packed = torch.stack([keys.to(torch.int64), rows, ids, raw.double().view(torch.int64)])
    pad = n - packed.shape[1]
    if pad:
        fill = packed.new_zeros(4, pad)
        fill[0] = -1
        packed = torch.cat([packed, fill], dim=1)
    return packed


class _Checked(NamedTuple):
    """A sharded BatchTopK step's checked arguments: the entries the batch keeps (n), the rank's first latent
    and what the loss needs (``ShardedLoss``)."""

    n: int
    f0: int
    loss: ShardedLoss


def _check(x, W_enc, b_enc, W_dec, b_dec, k, group, n_features, rescale, prefix_sizes=None) -> _Checked:
    f0, _, _ = check_shard_args(x, W_enc, b_enc, W_dec, b_dec, group, n_features)
    n = check_batch_k(k, x.shape[0], n_features)
    if not isinstance(rescale, bool):
        raise ValueError(f"rescale_acts_by_decoder_norm must be a bool, got {rescale!r}")
    sizes = tuple(check_prefix_sizes(prefix_sizes, n_features)) if prefix_sizes is not None else ()
    return _Checked(n, f0, ShardedLoss(group, f0, n_features, sizes))


@torch.no_grad()
def _select(x, W_enc, b_enc, W_dec, b_dec, rescale: bool, c: _Checked):
    """The whole BatchTopK code over every shard: (ranked activations [n] in x's dtype, ``ShardedCode``
    (relu'd values, global ids, row_offsets [B + 1])), row-major and by id inside each row; the same on
    every rank of the group."""
    B, n, group, F = x.shape[0], c.n, c.loss.group, c.loss.n_features
    world = dist.get_world_size(group)
    local = _batch_candidates(x, W_enc, b_enc, b_dec, ranking_scale(W_dec, rescale, 1), n, c.f0, F)
    gathered = local.new_empty(world * 4, n)
    all_gather_single(gathered, local, group=group)
    parts = [
        (keys.to(torch.int32), rows, ids, raw.view(torch.float64).to(x.dtype))
        for keys, rows, ids, raw in gathered.view(world, 4, n)
    ]
    keys, rows, ids, raw = batch_merged(parts, n, F)
    bounds = torch.arange(B + 1, device=x.device, dtype=rows.dtype)
    return keys_to_values(keys, x.dtype), ShardedCode(torch.relu(raw), ids, torch.searchsorted(rows, bounds))


def _step(x, W_enc, b_enc, W_dec, b_dec, rescale: bool, c: _Checked):
    """(the ``sharded_mse`` outputs, the code, min_act) of the checked arguments."""
    x, W_enc, b_enc, W_dec, b_dec = (t.contiguous() for t in (x, W_enc, b_enc, W_dec, b_dec))
    acts, code = _select(x, W_enc, b_enc, W_dec, b_dec, rescale, c)
    return sharded_mse(x, W_enc, b_enc, W_dec, b_dec, code, c.loss), code, min_positive(acts)


def sharded_batchtopk_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: float, *,
    group: dist.ProcessGroup, n_features: int, rescale_acts_by_decoder_norm: bool = False,
) -> BatchTopKSAEStep:  # fmt: skip
    """``batchtopk_sae_step`` with the latents sharded over the ranks of ``group``.

    Args:
        x: [B, D] activations, the same batch on every rank of ``group``.
        W_enc, b_enc, W_dec: this rank's shard, [F_r, D], [F_r], [F_r, D] (fp32, bf16 or fp16): latents
            ``shard_bounds(n_features, group size, group rank)``.
        b_dec: [D], the same on every rank.
        k: active latents per row on average over all shards (int or float): the batch keeps
            N = int(k * B) entries, 1 <= N <= B * n_features.
        group: the latent group; n_features: F over all shards.
        rescale_acts_by_decoder_norm: rank relu(pre * ||W_dec[f]||), as the one-process step's.

    Returns:
        ``BatchTopKSAEStep(loss, mse, fvu, l0, fire_counts, code, min_act, aux_loss=None)``: ``loss``,
        ``mse``, ``fvu``, ``l0``, ``min_act`` and the code (flat [N] values and global ids, ``row_offsets``
        [B + 1]) the same on every rank and as the one-process step's; ``fire_counts`` [F_r] for this
        rank's latents. The gradients reach this rank's shard and, summed over the group, x and b_dec.
    """
    c = _check(x, W_enc, b_enc, W_dec, b_dec, k, group, n_features, rescale_acts_by_decoder_norm)
    (loss, fvu, counts, _), code, min_act = _step(x, W_enc, b_enc, W_dec, b_dec, rescale_acts_by_decoder_norm, c)
    l0 = code_l0(code.vals, x.shape[0])
    return BatchTopKSAEStep(loss, loss.detach(), fvu, l0, counts, SparseCode(*code), min_act=min_act, aux_loss=None)


def sharded_matryoshka_batchtopk_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: float,
    prefix_sizes, *, group: dist.ProcessGroup, n_features: int, rescale_acts_by_decoder_norm: bool = False,
) -> MatryoshkaSAEStep:  # fmt: skip
    """``matryoshka_batchtopk_sae_step`` with the latents sharded over the ranks of ``group``.

    Args: as ``sharded_batchtopk_sae_step``'s, plus ``prefix_sizes``: the nested dictionaries' sizes
    m_1 < ... < m_G = n_features, global latent counts (a level may end inside a shard, and a shard may
    hold latents of several levels or of none but the last).

    Returns:
        ``MatryoshkaSAEStep(loss, mse, fvu, l0, fire_counts, code, level_losses, min_act)``, each as the
        one-process step's (the same on every rank), ``fire_counts`` [F_r] for this rank's latents. The one
        all-reduce of the forward carries the G levels' partial reconstructions, [G, B, D] fp32.
    """
    c = _check(x, W_enc, b_enc, W_dec, b_dec, k, group, n_features, rescale_acts_by_decoder_norm, prefix_sizes)
    (loss, fvu, counts, levels), code, min_act = _step(x, W_enc, b_enc, W_dec, b_dec, rescale_acts_by_decoder_norm, c)
    head = (loss, levels[-1], fvu, code_l0(code.vals, x.shape[0]), counts, SparseCode(*code))
    return MatryoshkaSAEStep(*head, level_losses=levels, min_act=min_act)


@torch.no_grad()
def sharded_batchtopk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: float, *,
    group: dist.ProcessGroup, n_features: int, rescale_acts_by_decoder_norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The whole BatchTopK code of a sharded SAE (the batch rule): (vals [N] after the ReLU, global ids [N],
    row_offsets [B + 1]), row-major and by id inside each row; the same on every rank of ``group``.
    Arguments as ``sharded_batchtopk_sae_step``'s (W_dec only for the rescaling's norms)."""
    c = _check(x, W_enc, b_enc, W_dec, b_dec, k, group, n_features, rescale_acts_by_decoder_norm)
    args = (t.contiguous() for t in (x, W_enc, b_enc, W_dec, b_dec))
    _, code = _select(*args, rescale_acts_by_decoder_norm, c)
    return code.vals, code.ids, code.row_offsets
