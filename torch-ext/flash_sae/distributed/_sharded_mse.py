"""What the latent-sharded MSE steps share (TopK, BatchTopK, Matryoshka BatchTopK): the decode of a whole
code selected over every shard, its loss and its backward.

The code comes in with *global* latent ids, the same on every rank of the latent group: [B, k] (TopK) or
variable-length (``row_offsets`` [B + 1], BatchTopK). Each rank keeps the entries it owns (others weigh
0 and join no CSR segment, ``own_entries``) and decodes them into an fp32 partial reconstruction; one
all-reduce (sum) gives every rank the whole reconstruction, the residual and the loss. With Matryoshka's
prefix levels the partials are [G, B, D] (one per level, ``gather_level_residuals`` over the rank's own
entries: a level is a range of global ids, so a shard holds part of it or none) and the one all-reduce
carries all G.

Backward (every rank holds the same residual): the rank's own rows of dW_dec, dW_enc and db_enc from the
one-process passes over its own entries (one CSR transpose, the decoder's segmented pass, the
encoder's; with levels, latent f reads the suffix sum of its level, as ``ops/_matryoshka.py`` does); the
one exchange is an all-reduce of the encoder's share of dx ([B, D] fp32 when x needs a gradient, else
its column sum [D], which is all b_dec needs).
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from ..ops._matryoshka import level_sizes
from ..primitives.csr import RowOut, csr_transpose
from ..primitives.encoder import encoder_backward
from ..primitives.gather import LevelRows, gather_level_residuals, gather_rows, gather_rows_backward, row_ids
from ..primitives.row_update import ClaimedUpdate, claimed
from ..results import fire_counts, total_variance

# torch 2.13 renamed the tensor all-gather; older versions (2.11 on our GPU machines) have the old name only
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def own_entries(vals, ids, f0, n_local):
    """This rank's share of a global code: (values, 0 elsewhere), (local ids, 0 elsewhere, for
    gathers), (local ids, n_local elsewhere: outside every CSR segment)."""
    mine = (ids >= f0) & (ids < f0 + n_local)
    local = ids - f0
    return torch.where(mine, vals, 0), torch.where(mine, local, 0), torch.where(mine, local, n_local)


class ShardedCode(NamedTuple):
    """A whole code with global ids, the same on every rank: ``vals`` (after the ReLU) and ``ids``, [B, k]
    or flat [N] with ``row_offsets`` [B + 1] (row-major, by id inside each row when levels are used)."""

    vals: torch.Tensor
    ids: torch.Tensor
    row_offsets: torch.Tensor | None = None


class ShardedLoss(NamedTuple):
    """Where the rank's latents sit and what the loss sums: the latent ``group``, the rank's first latent
    ``f0``, F over all shards, and Matryoshka's ``prefix_sizes`` (empty: one level, plain MSE)."""

    group: dist.ProcessGroup
    f0: int
    n_features: int
    prefix_sizes: tuple[int, ...] = ()


def level_ends(code: ShardedCode, spec: ShardedLoss, B: int) -> torch.Tensor:
    """[B, G] int64: where each level of each row ends in a row-major code sorted by id inside each row
    (global ids, so the same on every rank)."""
    flat = row_ids(code.row_offsets, code.ids.numel()) * spec.n_features + code.ids
    sizes = level_sizes(list(spec.prefix_sizes), code.ids.device)
    return torch.searchsorted(flat, torch.arange(B, device=flat.device).unsqueeze(1) * spec.n_features + sizes)


class _ShardedMSEStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, code: ShardedCode, spec: ShardedLoss):
        B, D = x.shape
        n_local = W_enc.shape[0]
        lvals, lidx, lidx_csr = own_entries(code.vals, code.ids, spec.f0, n_local)
        if spec.prefix_sizes:  # [G, B, D] partials: the level residuals' walk against a zero target
            ends = level_ends(code, spec, B)
            zero = x.new_zeros((B, D), dtype=torch.float32)
            partial, _ = gather_level_residuals(
                lvals, lidx, W_dec, None, zero, row_offsets=code.row_offsets, level_ends=ends
            )  # fmt: skip
        else:
            partial = gather_rows(lvals, lidx, W_dec, out_dtype=torch.float32, row_offsets=code.row_offsets)
        dist.all_reduce(partial, group=spec.group)
        residual = partial.add_(b_dec.float()).sub_(x.float())
        sq = (residual * residual).sum((-2, -1))
        level_losses = sq / (B * D)
        loss = level_losses.sum()
        fvu = sq.reshape(-1)[-1] / total_variance(x)
        counts = fire_counts(lvals, lidx, n_local)
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, lvals, lidx, lidx_csr, residual, code.row_offsets)
        ctx.spec = spec
        ctx.mark_non_differentiable(fvu, counts, level_losses, residual)
        return loss, fvu, counts, level_losses, residual

    @staticmethod
    def backward(ctx, g_loss, *_):
        x, W_enc, W_dec, b_dec, lvals, lidx, lidx_csr, residual, row_offsets = ctx.saved_tensors
        spec = ctx.spec
        B, D = residual.shape[-2:]
        n_local = W_dec.shape[0]
        s_const = 2.0 / (B * D)
        s = g_loss.float() * s_const
        levels, stacked = None, residual
        if spec.prefix_sizes:  # latent f reads the suffix sum over the levels from its own on
            stacked = residual.flip(0).cumsum(0).flip(0).contiguous()
            sizes = level_sizes(list(spec.prefix_sizes), x.device)
            ids = torch.arange(spec.f0, spec.f0 + n_local, device=x.device)
            levels = LevelRows(ids=torch.searchsorted(sizes, ids, right=True).to(torch.int32), stride=B)
            residual, stacked = stacked[0], stacked.reshape(-1, D)
        rows = row_ids(row_offsets, lidx.numel()) if row_offsets is not None else None
        csr = csr_transpose(lidx_csr, n_local)
        # an optimizer's claim on this rank's rows (flash_sae.FusedAdam): applied in the passes, nothing exchanged
        dec, enc = (ClaimedUpdate(u) if (u := claimed(w)) is not None else None for w in (W_dec, W_enc))
        dW_dec, dots = gather_rows_backward(
            stacked, lvals, lidx_csr, W_dec, scale=g_loss.float(), scale_const=s_const, csr=csr, rows=rows,
            levels=levels, row_out=RowOut(update=dec),
        )  # fmt: skip
        dpre = torch.where(lvals > 0, dots * s, 0.0)
        dx_enc, dW_enc, db_enc, _ = encoder_backward(
            dpre, x, W_enc, b_dec, lidx, csr=csr, row_offsets=row_offsets, rows=rows, update=enc
        )  # fmt: skip
        if ctx.needs_input_grad[0]:
            dist.all_reduce(dx_enc, group=spec.group)
            db_dec_enc = -dx_enc.sum(0)
        else:
            db_dec_enc = -dx_enc.sum(0)
            dist.all_reduce(db_dec_enc, group=spec.group)
        dtype = W_enc.dtype
        dx = (dx_enc - residual * s).to(dtype) if ctx.needs_input_grad[0] else None
        db_dec = (residual.sum(0) * s + db_dec_enc).to(dtype)
        return dx, dW_enc, db_enc.to(dtype), dW_dec, db_dec, None, None


def sharded_mse(x, W_enc, b_enc, W_dec, b_dec, code: ShardedCode, spec: ShardedLoss):
    """(loss, fvu, fire_counts [F_r], level_losses [G] or [1]) of the whole code's decode: loss differentiable
    in x, this rank's W_enc, b_enc, W_dec and b_dec (b_enc's gradient is the encoder's at the code)."""
    return _ShardedMSEStep.apply(x, W_enc, b_enc, W_dec, b_dec, code, spec)[:4]


def sharded_mse_with_residual(x, W_enc, b_enc, W_dec, b_dec, code: ShardedCode, spec: ShardedLoss):
    """``sharded_mse``'s outputs and the residual x_hat - x ([B, D] fp32, or [G, B, D] with levels; not
    differentiable), the same on every rank: what a dead-latent loss reads."""
    return _ShardedMSEStep.apply(x, W_enc, b_enc, W_dec, b_dec, code, spec)
