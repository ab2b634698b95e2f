"""The TopK SAE step with its latents sharded over ranks (torch.distributed: NCCL on GPUs, gloo on CPU).

Each rank of the latent group holds a contiguous block [f0, f0 + F_r) of the F latents
(``layout.shard_bounds``): its rows of W_enc, b_enc and W_dec. Every rank of the group sees
the same batch x and holds the same b_dec. One step:

1. Local candidates: the chunked encoder GEMM over the rank's rows and the exact selection
   (``primitives.select``), keyed by *global* latent id: each row's best min(k, c) entries as
   packed (value, id) keys, c = ceil(F / W). No [B, F] tensor.
2. One all-gather of those [B, min(k, c)] int64 keys (the only exchange of the selection).
3. The global top-k of each row from the gathered keys with one ``torch.topk`` on the packed keys:
   the same merge the single-GPU step makes across its chunks, so with the same pre-activations the
   same latents come out in the same order (values and ids bitwise). Why the candidates suffice:
   an entry among a row's global top k has fewer than k entries above it, so fewer than k in its
   own shard either, so it is among its shard's candidates (the tie rule is one total order).
4. Each rank decodes the entries it owns (others weigh 0) into an fp32 partial reconstruction;
   one all-reduce (sum) of [B, D] fp32 gives every rank the whole reconstruction, the residual
   and the loss (``_sharded_mse.py``, which the BatchTopK steps share).

Backward (every rank holds the same residual, so the loss's gradient is known everywhere): each
rank's own rows of dW_dec, dW_enc and db_enc come from the existing sparse kernels over its own
entries (one CSR transpose, the decoder's segmented pass, the encoder's); the only exchange is
one all-reduce of the encoder's contribution to dx ([B, D] fp32 when x needs a gradient, else
just its column sum [D] for b_dec). No host sync beyond the collectives themselves; no atomics;
deterministic for a given world size.

Exactness against one GPU: the selection is exact (above); the loss and the gradients differ
only by the order of the fp32 sums (partial reconstructions and dx are summed across ranks).

Cost per rank: the GEMM over F / W latents; gathers over the whole [B, k] code (entries of other
ranks weigh 0: O(B*k*D), small beside the GEMM); collectives: W * B * min(k, c) * 8 bytes
gathered, B * D * 4 bytes reduced in the forward, the same or D * 4 in the backward.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from .._validation import (
    INDEX_DTYPES,
    check_int,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_step_args,
    check_tensor,
)
from ..dead_latent_loss import DeadLatentLoss
from ..primitives.gather import gather_rows
from ..primitives.select.keys import KEY_NONE, unpack
from ..primitives.select.preacts import pre_chunks
from ..primitives.select.row_topk import chunk_top_k
from ..results import SparseCode, TopKSAEStep, code_l0
from ._sharded_mse import ShardedCode, ShardedLoss, all_gather_single, own_entries, sharded_mse_with_residual
from .layout import check_shardable, shard_bounds
from .sharded_auxk import ShardedAuxK, sharded_auxk_loss, sharded_dead_slots


def sharded_candidates(x, W_enc, b_enc, k, b_dec, f0, n_cand):
    """Each row's best ``n_cand`` local entries as packed (value, global id) int64 keys, [B, n_cand]
    (KEY_NONE where the shard holds fewer latents)."""
    xc = x - b_dec
    parts = [chunk_top_k(pre, f0 + c0, k, gkeys) for c0, pre, gkeys in pre_chunks(xc, W_enc, b_enc, k)]
    local = torch.cat(parts, dim=1)
    local = torch.topk(local, min(n_cand, local.shape[1]), dim=1, sorted=False).values
    if local.shape[1] < n_cand:
        local = torch.nn.functional.pad(local, (0, n_cand - local.shape[1]), value=KEY_NONE)
    return local


def sharded_select(x, W_enc, b_enc, k, b_dec, f0, n_cand, group, world):
    """(values [B, k] in x's dtype before the activation, global ids [B, k] int64), descending by the
    tie rule of ``primitives.select``: the exact top-k over all ranks' latents."""
    B = x.shape[0]
    local = sharded_candidates(x, W_enc, b_enc, k, b_dec, f0, n_cand)
    gathered = local.new_empty(world * B, n_cand)
    all_gather_single(gathered, local.contiguous(), group=group)
    cand = gathered.view(world, B, n_cand).permute(1, 0, 2).reshape(B, world * n_cand)
    return unpack(torch.topk(cand, k, dim=1, sorted=True).values, x.dtype)


class ShardPlan(NamedTuple):
    """Where this rank's latents sit and how the selection merges: k, the first latent f0, the candidates
    each shard sends (n_cand), the latent group and its size."""

    k: int
    f0: int
    n_cand: int
    group: dist.ProcessGroup
    world: int


def _group_bounds(group, n_features):
    """This rank's [f0, f1) in ``group``, after checking the group and n_features."""
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: call init_process_group (or torchrun) first")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    check_int("n_features", n_features, 1, 2**31 - 1)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    check_shardable(n_features, world)
    return shard_bounds(n_features, world, rank)


def check_shard_args(x, W_enc, b_enc, W_dec, b_dec, group, n_features, k_check=None):
    """Validates a sharded step's tensors against this rank's shard of ``n_features`` latents in ``group``
    (``k_check(F_r)``, when given, checks the sparsity argument first and returns the k the shard's encoder
    check takes); returns (f0, f1, world)."""
    f0, f1 = _group_bounds(group, n_features)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    k_local = k_check(f1 - f0) if k_check is not None else 1
    if isinstance(W_enc, torch.Tensor) and W_enc.ndim == 2 and W_enc.shape[0] != f1 - f0:
        raise ValueError(
            f"W_enc must hold this rank's {f1 - f0} latents (rank {rank} of {world}, latents [{f0}, {f1}) of "
            f"n_features={n_features}), got {W_enc.shape[0]} rows"
        )
    check_step_args(x, W_enc, b_enc, W_dec, b_dec, k_local)
    return f0, f1, world


def check_sharded_args(x, W_enc, b_enc, W_dec, b_dec, k, group, n_features):
    """Validates a sharded TopK step's arguments; returns (f0, n_cand, world)."""

    def k_check(n_local):
        check_int("k", k, 1, n_features)
        return min(k, n_local)

    f0, _, world = check_shard_args(x, W_enc, b_enc, W_dec, b_dec, group, n_features, k_check)
    return f0, min(k, -(-n_features // world)), world


def sharded_topk_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int, *,
    group: dist.ProcessGroup, n_features: int, dead_loss=None,
) -> TopKSAEStep:  # fmt: skip
    """``topk_sae_step`` with the latents sharded over the ranks of ``group``.

    Args:
        x: [B, D] activations, the same batch on every rank of ``group``.
        W_enc, b_enc, W_dec: this rank's shard, [F_r, D], [F_r], [F_r, D]: latents
            ``shard_bounds(n_features, group size, group rank)``.
        b_dec: [D], the same on every rank.
        k: active latents per row over all shards, 1 <= k <= n_features.
        group: the latent group (every rank of it calls the step with the same x).
        n_features: F, the latents over all shards.
        dead_loss: None, or a ``DeadLatentLoss`` of kind ``"auxk"`` whose ``mask`` is the global [F] bool
            dead set (the same on every rank; ``gather_latents`` of each rank's own): AuxK over all shards'
            dead latents, equal to the one-process step's (``sharded_auxk.py``). Ghost grads are refused.

    Returns:
        ``TopKSAEStep(loss, mse, fvu, l0, fire_counts, code, aux_loss)``: ``loss``, ``mse``, ``fvu`` and ``l0`` as
        the single-GPU step's (the same on every rank); ``fire_counts`` [F_r] for this rank's latents;
        ``code`` the whole [B, k] code with global ids (the same on every rank).
        The gradients reach this rank's shard and, summed over the group, x and b_dec (the same
        on every rank).
    """
    f0, n_cand, world = check_sharded_args(x, W_enc, b_enc, W_dec, b_dec, k, group, n_features)
    aux_spec = _auxk_spec(dead_loss, x, group, f0, W_enc.shape[0], n_features)
    x, W_enc, b_enc, W_dec, b_dec = (t.contiguous() for t in (x, W_enc, b_enc, W_dec, b_dec))
    with torch.no_grad():
        values, ids = sharded_select(x, W_enc, b_enc, k, b_dec, f0, n_cand, group, world)
    code = ShardedCode(torch.relu(values), ids)
    spec = ShardedLoss(group, f0, n_features)
    mse, fvu, counts, _, residual = sharded_mse_with_residual(x, W_enc, b_enc, W_dec, b_dec, code, spec)
    loss, aux = mse, None
    if aux_spec is not None:
        aux_spec, coef = aux_spec
        aux = sharded_auxk_loss(x, W_enc, b_enc, W_dec, b_dec, residual, aux_spec)
        loss = mse + coef * aux
    l0 = code_l0(code.vals, x.shape[0])
    return TopKSAEStep(loss, mse.detach(), fvu, l0, counts, SparseCode(*code[:2]), aux)


def _auxk_spec(dead_loss, x, group, f0, n_local, n_features):
    """(``ShardedAuxK``, coef) of a step's ``dead_loss``, validated as the one-process step does; None without one."""
    if dead_loss is None:
        return None
    if not isinstance(dead_loss, DeadLatentLoss):
        raise ValueError(f"dead_loss must be None or a DeadLatentLoss (with its global [F] mask), got {dead_loss!r}")
    if dead_loss.kind != "auxk":
        raise ValueError(f"dead_loss.kind must be 'auxk' for a sharded step (no ghost grads), got {dead_loss.kind!r}")
    d = dead_loss.checked(x, n_features)
    slots = sharded_dead_slots(d.mask, d.capacity, d.offset)
    return ShardedAuxK(group, f0, n_local, slots, d.k_aux, d.relu, d.encoder_grad), d.coef


@torch.no_grad()
def sharded_topk_encode(x, W_enc, b_enc, k, b_dec, *, group, n_features):
    """The whole code (vals [B, k] after the ReLU, global ids [B, k]) of a sharded TopK SAE, descending;
    the same on every rank of ``group``."""
    f0, n_cand, world = check_sharded_args(x, W_enc, b_enc, W_enc, b_dec, k, group, n_features)
    values, ids = sharded_select(x.contiguous(), W_enc.contiguous(), b_enc, k, b_dec, f0, n_cand, group, world)
    return torch.relu(values), ids


@torch.no_grad()
def sharded_decode(vals, indices, W_dec, b_dec, *, group, n_features, row_offsets=None):
    """x_hat [B, D] (W_dec's dtype) from a whole code with global ids; the same on every rank of ``group``.
    The code is [B, K] (vals, indices), or with ``row_offsets`` [B + 1] int64 a variable-length one (flat [N]
    vals and indices, row b's at row_offsets[b]:row_offsets[b + 1]: a BatchTopK code). Ids outside
    [0, n_features) belong to no shard and add nothing; they are not checked (that would be a host sync)."""
    ndim = 2 if row_offsets is None else 1
    check_tensor("vals", vals, ndim)
    check_tensor("indices", indices, ndim, INDEX_DTYPES)
    if row_offsets is not None:
        check_tensor("row_offsets", row_offsets, 1, (torch.int64,))
    if tuple(indices.shape) != tuple(vals.shape):
        raise ValueError(f"indices must have vals' shape {tuple(vals.shape)}, got {tuple(indices.shape)}")
    check_tensor("W_dec", W_dec, 2)
    check_tensor("b_dec", b_dec, 1)
    check_shape("b_dec", b_dec, (W_dec.shape[1],))
    check_same_dtype("W_dec", W_dec, vals=vals, b_dec=b_dec)
    check_same_device(W_dec=W_dec, vals=vals, indices=indices, b_dec=b_dec)
    f0, f1 = _group_bounds(group, n_features)
    if W_dec.shape[0] != f1 - f0:
        raise ValueError(f"W_dec must hold this rank's {f1 - f0} latents [{f0}, {f1}), got {W_dec.shape[0]} rows")
    lvals, lidx, _ = own_entries(vals, indices, f0, f1 - f0)
    partial = gather_rows(lvals, lidx, W_dec, out_dtype=torch.float32, row_offsets=row_offsets)
    dist.all_reduce(partial, group=group)
    return partial.add_(b_dec.float()).to(W_dec.dtype)
