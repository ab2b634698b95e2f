"""AuxK over the global dead set of a latent-sharded TopK SAE: the one-process ``DeadLatentLoss`` AuxK
(``ops/_dead.py``) with its latents split over the ranks of the latent group.

The dead set is global: each rank counts its own latents' tokens since they fired (from fire counts summed
over the data replicas, exact int64), and the [F] dead mask is their concatenation (``gather_latents``: one
all-gather of F bytes). Every rank takes the same window of ``capacity`` dead latents from the same offset
(``primitives.dead_set.dead_slots`` on the whole mask), so the slots are the one-process module's.

One AuxK term, on every rank of the latent group (the main step's residual e = x_hat - x is known there):

1. Each rank computes the pre-activations of the slots it owns, ``(x - b_dec) W_enc[f]^T + b_enc[f]``, and
   zeros elsewhere; one all-reduce (sum) of [B, C] in x's dtype gives every rank the whole [B, C] (one
   non-zero term per entry, so the sum is exact). C = capacity, 2 * k_aux by default: B * C * 2 bytes in
   16-bit, fewer than an all-gather of per-shard packed top-k_aux keys (W * B * k_aux * 8 bytes).
2. Every rank ranks the slots identically (``row_top``: each row's k_aux best, the one-process tie rule).
3. Each rank decodes its own selected slots into an fp32 partial [B, D]; one all-reduce gives e_hat, and
   aux_loss = min(n_dead / k_aux, 1) * mean over B*D of (e_hat + e)^2, as in one process.

Backward: dE = d aux / d e_hat is known everywhere; each rank's own slots' dW_dec = A^T dE, dpre =
gate * dE W_dec^T, dW_enc = dpre^T (x - b_dec), db_enc = sum_b dpre; the encoder's share of dx (and of
b_dec's gradient) is one more all-reduce of [B, D] fp32 (its column sum [D] when x needs no gradient).
Nothing [B, F]; no host sync; deterministic for a given world size.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from ..primitives.dead_set import add_rows_, dead_slots, mm_f32, slot_rows
from ..primitives.select.row_topk import row_top
from ._sharded_mse import all_gather_single


def gather_latents(t: torch.Tensor, group, n_features: int) -> torch.Tensor:
    """The [F] concatenation over the latent group of each rank's per-latent [F_r] ``t`` (one all-gather;
    bool travels as uint8). Shards are contiguous blocks of ceil(F / W), the last one shorter."""
    world = dist.get_world_size(group)
    chunk = -(-n_features // world)
    flag = t.dtype == torch.bool
    src = t.to(torch.uint8) if flag else t
    padded = src.new_zeros(chunk)
    padded[: src.numel()] = src
    out = src.new_empty(world * chunk)
    all_gather_single(out, padded, group=group)
    out = out[:n_features]
    return out.bool() if flag else out


class ShardedDeadSlots(NamedTuple):
    """The dead set's window, the same on every rank: global ids [C] int64 (F in empty slots), valid [C]
    bool, n_dead [] (all dead latents), the next window's offset [] int64."""

    ids: torch.Tensor
    valid: torch.Tensor
    n_dead: torch.Tensor
    next_offset: torch.Tensor


class ShardedAuxK(NamedTuple):
    """A sharded step's AuxK: the latent ``group``, this rank's first latent ``f0`` and its ``n_local``
    latents, the window ``slots``, ``k_aux``, ``relu`` and ``encoder_grad`` (``DeadLatentLoss``'s)."""

    group: dist.ProcessGroup
    f0: int
    n_local: int
    slots: ShardedDeadSlots
    k_aux: int
    relu: bool
    encoder_grad: bool


def sharded_dead_slots(dead_mask: torch.Tensor, capacity: int, offset: torch.Tensor) -> ShardedDeadSlots:
    """``dead_slots`` on the global [F] mask (the same on every rank)."""
    return ShardedDeadSlots(*dead_slots(dead_mask, capacity, offset))


def _own(spec: ShardedAuxK):
    """(own [C] bool: valid slots this rank holds, local ids [C] int64, 0 elsewhere)."""
    ids, valid = spec.slots.ids, spec.slots.valid
    own = valid & (ids >= spec.f0) & (ids < spec.f0 + spec.n_local)
    return own, torch.where(own, ids - spec.f0, 0)


class _ShardedAuxKLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, residual, spec: ShardedAuxK):
        B, D = residual.shape
        own, lid = _own(spec)
        xc = x - b_dec
        rows = slot_rows(W_enc, lid, own)
        pre = (mm_f32(xc, rows.t()) + torch.where(own, b_enc[lid].float(), 0)).to(x.dtype)
        pre = torch.where(own, pre, 0)
        dist.all_reduce(pre, group=spec.group)
        A, gate = row_top(pre, spec.slots.valid, spec.slots.ids, spec.k_aux, None, spec.relu)
        A_own = torch.where(own, A, 0)
        e_hat = mm_f32(A_own, slot_rows(W_dec, lid, own))
        dist.all_reduce(e_hat, group=spec.group)
        diff = e_hat.add_(residual)  # e_hat - e
        scale = torch.clamp(spec.slots.n_dead / (spec.k_aux * B * D), max=1.0 / (B * D))
        aux = scale * diff.square().sum()
        ctx.save_for_backward(xc, W_enc, W_dec, A_own, gate, diff.mul_(2 * scale), own, lid)
        ctx.spec = spec
        return aux

    @staticmethod
    def backward(ctx, g_aux):
        xc, W_enc, W_dec, A_own, gate, dE1, own, lid = ctx.saved_tensors
        spec = ctx.spec
        dtype = W_dec.dtype
        dE = (dE1 * g_aux.float()).to(dtype)
        dW_dec = torch.zeros(W_dec.shape, dtype=torch.float32, device=W_dec.device)
        add_rows_(dW_dec, lid, own, mm_f32(A_own.t(), dE))
        if not spec.encoder_grad:
            return None, None, None, dW_dec.to(dtype), None, None, None
        dA = mm_f32(dE, slot_rows(W_dec, lid, own).t())
        dpre = torch.where(gate & own, dA, 0)
        dpre_c = dpre.to(dtype)
        dW_enc = torch.zeros(W_enc.shape, dtype=torch.float32, device=W_enc.device)
        add_rows_(dW_enc, lid, own, mm_f32(dpre_c.t(), xc))
        db_enc = torch.zeros(W_enc.shape[0], dtype=torch.float32, device=W_enc.device)
        add_rows_(db_enc, lid, own, dpre.sum(0))
        dx = mm_f32(dpre_c, slot_rows(W_enc, lid, own))
        if ctx.needs_input_grad[0]:
            dist.all_reduce(dx, group=spec.group)
            db_dec = -dx.sum(0)
            dx = dx.to(dtype)
        else:
            db_dec = -dx.sum(0)
            dist.all_reduce(db_dec, group=spec.group)
            dx = None
        return dx, dW_enc.to(dtype), db_enc.to(dtype), dW_dec.to(dtype), db_dec.to(dtype), None, None


def sharded_auxk_loss(x, W_enc, b_enc, W_dec, b_dec, residual, spec: ShardedAuxK) -> torch.Tensor:
    """The AuxK loss [] fp32 (before its coefficient) of the residual [B, D] fp32 (x_hat - x, detached),
    the same on every rank; differentiable in x, this rank's W_enc, b_enc, W_dec, and b_dec."""
    return _ShardedAuxKLoss.apply(x, W_enc, b_enc, W_dec, b_dec, residual.detach(), spec)
