"""The JumpReLU and standard SAE steps with their latents sharded over ranks.

No global selection: a latent's entry depends on its own pre-activation only, so each rank encodes its
own latents into its own fixed-capacity code (sized per shard, from the shard's own count, without a host
sync: ``modules/_capacity.py``). The steps compose the one-process ones:

1. Each rank's partial reconstruction (its code decoded through its rows, fp32 [B, D]); one all-reduce
   (sum) gives the whole; ``others = whole - own`` is what the other shards reconstruct.
2. The one-process step (``jumprelu_sae_step`` / ``standard_sae_step``) on the rank's shard, as a transcoder
   (``target=``): it reads the centred input x - b_dec as it is and reconstructs ``x - others``, so its
   residual is the whole SAE's residual, its MSE the whole SAE's, and its gradients of the shard's
   weights (and the JumpReLU threshold's straight-through one) the whole loss's; the penalty term is
   the shard's own latents', whose sum over ranks is the whole penalty (one all-reduce of the scalars).
3. The centred input enters through an identity whose backward all-reduces its gradient (the encoder's
   share of dx, [B, D] fp32, summed over the shards); the residual's share of x's and b_dec's gradients
   is each rank's own (equal up to the order of fp32 sums), so x and b_dec enter through an identity
   whose backward averages over the group: the replicated gradients, and so b_dec, stay bitwise the
   same on every rank. The loss, MSE and penalties are averaged or summed in one all-reduce of three
   scalars, so they are the same on every rank too.

Cost per rank and step: the encoder GEMM over the rank's F / W latents twice (once for the partial, once
in the step: a fused sharded step would run it once), the decodes over its own entries; collectives:
B * D * 4 bytes all-reduced in the forward, twice that in the backward when x needs a gradient (the
encoder's share, then the average), else B * D * 4 + D * 4, and three scalars. Exactness: the
code equals the one-process code's entries of the shard's latents (the pre-activations are the same
GEMM); the loss and gradients differ by the order of the fp32 sums and, in bf16 or fp16, by the rounding
of ``x - others`` to the activations' dtype. Deterministic for a given world size.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from .._validation import as_count
from ..ops.jumprelu.jumprelu_sae_step import jumprelu_sae_step
from ..ops.standard.standard_sae_step import standard_sae_step
from ..primitives.gather import gather_rows
from ..primitives.select.preacts import threshold_preacts
from ..results import JumpReLUSAEStep, SparseCode, StandardSAEStep, total_variance
from .sharded_topk_sae_step import check_shard_args


class LatentShards(NamedTuple):
    """The latent group a sharded step runs over and F, its latents over all shards."""

    group: dist.ProcessGroup
    n_features: int


class _ReduceOverShards(torch.autograd.Function):
    """The identity whose backward sums (``mean=False``) or averages the gradient over the latent group, in
    fp32. Averaged: x's and b_dec's gradients, which each rank computes from its own (equal up to the order
    of fp32 sums) residual, come out the same on every rank, so the replicated b_dec stays replicated."""

    @staticmethod
    def forward(ctx, t, group, mean):
        ctx.group, ctx.mean = group, mean
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        total = g.float()
        dist.all_reduce(total, group=ctx.group)
        if ctx.mean:
            total.div_(dist.get_world_size(ctx.group))
        return total.to(g.dtype), None, None


class _Prepared(NamedTuple):
    """A sharded threshold step's inputs to the one-process step: the centred input (its gradient summed
    over the shards), the target ``x - others``, b_dec (its gradient averaged), and the rank's first latent."""

    centred: torch.Tensor
    target: torch.Tensor
    b_dec: torch.Tensor
    f0: int


def _prepare(x, W_enc, b_enc, W_dec, b_dec, theta, shards: LatentShards, collect) -> _Prepared:
    """Checks the arguments; the centred input and the target. ``collect = (bandwidth, capacity)``: the
    collection the step makes (its code's active entries, z > theta, are this rank's partial)."""
    if not isinstance(shards, LatentShards):
        raise ValueError(f"shards must be a LatentShards(group, n_features), got {type(shards).__name__}")
    f0, _, _ = check_shard_args(x, W_enc, b_enc, W_dec, b_dec, shards.group, shards.n_features)
    bandwidth, capacity = collect
    capacity = as_count(capacity)
    centred = x - b_dec
    with torch.no_grad():
        if theta.shape == (W_enc.shape[0],) and 1 <= capacity:
            z, ids, offsets, _ = threshold_preacts(centred, W_enc, b_enc, None, theta, bandwidth, capacity)
            active = (z > theta.to(x.dtype)[ids.clamp_min(0)]) & (ids >= 0)
            own = gather_rows(torch.where(active, z, 0), ids.clamp_min(0), W_dec, out_dtype=torch.float32,
                              row_offsets=offsets)  # fmt: skip
        else:  # bad arguments: the one-process step names them
            own = x.new_zeros(x.shape, dtype=torch.float32)
        whole = own.clone()
        dist.all_reduce(whole, group=shards.group)
        others = whole.sub_(own)
    group = shards.group
    x, b_dec = _ReduceOverShards.apply(x, group, True), _ReduceOverShards.apply(b_dec, group, True)
    target = (x.float() - others).to(x.dtype)
    return _Prepared(_ReduceOverShards.apply(x - b_dec, group, False), target, b_dec, f0)


def _whole(out, penalty_name: str, coefficient: float, prep: _Prepared, x: torch.Tensor, group) -> dict:
    """The fields of the whole SAE's result from the shard's step, the same on every rank: one all-reduce of
    (the penalty, the MSE, l0) sums the penalty and l0 over the shards and averages the MSE (each rank's is
    the whole SAE's, up to the order of fp32 sums); the loss's value is rebuilt from those (its gradient is
    the shard step's); fvu against x; the code with global ids."""
    stats = torch.stack([getattr(out, penalty_name).detach().float(), out.mse.detach().float(), out.l0.detach()])
    dist.all_reduce(stats, group=group)
    B, D = x.shape
    penalty, mse, l0 = stats[0], stats[1] / dist.get_world_size(group), stats[2]
    loss = out.loss - out.loss.detach() + (mse * D + coefficient * penalty)
    code = out.code
    ids = torch.where(code.indices >= 0, code.indices + prep.f0, code.indices)
    return dict(loss=loss, mse=mse, fvu=mse * (B * D) / total_variance(x), l0=l0, fire_counts=out.fire_counts,
                code=SparseCode(code.vals, ids, code.row_offsets), count=out.count, overflow=out.overflow,
                penalty=penalty)  # fmt: skip


def sharded_jumprelu_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
    threshold: torch.Tensor, *, capacity: int, shards: LatentShards, bandwidth: float = 0.05,
    l0_coefficient: float = 1.0,
) -> JumpReLUSAEStep:  # fmt: skip
    """``jumprelu_sae_step`` with the latents sharded over the ranks of ``shards.group``.

    Args:
        x: [B, D] activations, the same batch on every rank of the group; b_dec: [D], the same on every rank.
        W_enc, b_enc, W_dec, threshold: this rank's shard, [F_r, D], [F_r], [F_r, D], [F_r]: latents
            ``shard_bounds(shards.n_features, group size, group rank)``.
        capacity: this shard's code's fixed size (entries of its latents over the batch).
        shards: ``LatentShards(group, n_features)``.
        bandwidth, l0_coefficient: as ``jumprelu_sae_step``'s.

    Returns:
        ``JumpReLUSAEStep(loss, mse, fvu, l0, fire_counts, code, count, overflow)``: ``loss``, ``mse``,
        ``fvu`` and ``l0`` the whole SAE's (the same on every rank); ``fire_counts`` [F_r], the code (global
        ids), ``count`` and ``overflow`` this shard's. The gradients reach this rank's shard (the threshold's
        straight-through one included) and, summed over the group, x and b_dec.
    """
    prep = _prepare(x, W_enc, b_enc, W_dec, b_dec, threshold, shards, (bandwidth, capacity))
    out = jumprelu_sae_step(
        prep.centred, W_enc, b_enc, W_dec, prep.b_dec, threshold, capacity=capacity, bandwidth=bandwidth,
        l0_coefficient=l0_coefficient, target=prep.target,
    )  # fmt: skip
    head = _whole(out, "l0", l0_coefficient, prep, x, shards.group)
    head.pop("penalty")
    return JumpReLUSAEStep(**head)


def sharded_standard_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
    capacity: int, shards: LatentShards, l1_coefficient: float = 1.0,
) -> StandardSAEStep:  # fmt: skip
    """``standard_sae_step`` with the latents sharded over the ranks of ``shards.group``.

    Args: as ``sharded_jumprelu_sae_step``'s (no threshold: the ReLU code), ``l1_coefficient`` as
    ``standard_sae_step``'s.

    Returns:
        ``StandardSAEStep(loss, mse, fvu, l0, fire_counts, code, l1, count, overflow)``: ``loss``, ``mse``,
        ``fvu``, ``l0`` and ``l1`` the whole SAE's (the same on every rank); ``fire_counts`` [F_r], the code
        (global ids), ``count`` and ``overflow`` this shard's.
    """
    zero = W_enc.new_zeros(W_enc.shape[0]) if isinstance(W_enc, torch.Tensor) and W_enc.ndim == 2 else None
    theta = zero if zero is not None else torch.zeros(0)
    prep = _prepare(x, W_enc, b_enc, W_dec, b_dec, theta, shards, (0.0, capacity))
    out = standard_sae_step(
        prep.centred, W_enc, b_enc, W_dec, prep.b_dec, capacity=capacity, l1_coefficient=l1_coefficient,
        target=prep.target,
    )  # fmt: skip
    head = _whole(out, "l1", l1_coefficient, prep, x, shards.group)
    return StandardSAEStep(l1=head.pop("penalty"), **head)
