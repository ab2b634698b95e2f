"""The Matryoshka SAE step on a per-row TopK code (Nabeshima 2024's TopK variant), on the sparse path.

    vals, indices = topk_encode(x, W_enc, b_enc, k, b_dec)     (each row's k largest, relu'd)
    loss          = sum over the nested levels m_1 < ... < m_G = F of the level's MSE

The selection is ``topk_sae_step``'s (same tie rule). The code is reordered by latent id inside
each row and handed to the shared nested-levels forward and backward (``ops._matryoshka``)
as a variable-length code with k entries per row: all G levels in one decoder pass, one
CSR transpose in the backward.

A transcoder (``target``): x is encoded as it is and every level reconstructs the target
(``ops._matryoshka``).

Precision: fp32 accumulation; losses in fp32; gradients in the parameters' dtype.
Deterministic; no host sync; nothing [B, F] kept (the G residuals are [G, B, D] fp32).
"""

from typing import NamedTuple

import torch

from ..._registry import register_op
from ..._validation import as_count, check_prefix_sizes
from ...primitives.select.preacts import topk_preacts
from ...results import MatryoshkaSAEStep
from .._matryoshka import (
    MATRYOSHKA_OUTPUTS,
    MATRYOSHKA_SAVED,
    matryoshka_levels_bwd,
    matryoshka_levels_bwd_fake,
    matryoshka_levels_fwd,
    matryoshka_levels_fwd_fake,
    matryoshka_result,
    min_positive,
)
from .._step import checked_step_args, reconstructed

# Host launchers ----------------------------------------------------------------


class MatryoshkaTopkSaeStepInputs(NamedTuple):
    """``matryoshka_topk_sae_step``'s arguments, in the registered op's order."""

    x: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    target: torch.Tensor | None
    k: int
    prefix_sizes: list[int]


def matryoshka_topk_sae_step_fwd(i: MatryoshkaTopkSaeStepInputs) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Returns (loss, level_losses, fvu, fire_counts, vals, indices, row_offsets, min_act, residuals [G, B, D])."""
    x, k = i.x, i.k
    B = x.shape[0]
    y, centre = reconstructed(x, i.b_dec, i.target)
    values, ids = topk_preacts(x, i.W_enc, i.b_enc, k, centre, relu=True)
    ids, order = ids.sort(dim=1)  # by latent id inside each row: each level is a prefix of the row
    vals = values.gather(1, order).view(-1)
    indices = ids.view(-1)
    row_offsets = torch.arange(B + 1, device=x.device) * k
    loss, level_losses, fvu, counts, residuals = matryoshka_levels_fwd(
        y, i.W_dec, i.b_dec, vals, indices, row_offsets, i.prefix_sizes
    )
    return loss, level_losses, fvu, counts, vals, indices, row_offsets, min_positive(vals), residuals


def matryoshka_topk_sae_step_fwd_fake(i: MatryoshkaTopkSaeStepInputs):
    x, k = i.x, i.k
    loss, level_losses, fvu, counts, residuals = matryoshka_levels_fwd_fake(x, i.W_dec, len(i.prefix_sizes))
    B, i64 = x.shape[0], torch.int64
    code = (x.new_empty(B * k), x.new_empty(B * k, dtype=i64), x.new_empty(B + 1, dtype=i64))
    return loss, level_losses, fvu, counts, *code, x.new_empty((), dtype=torch.float32), residuals


# Op registration and autograd ----------------------------------------------------

_matryoshka_topk_sae_step = register_op(
    "matryoshka_topk_sae_step",
    inputs=MatryoshkaTopkSaeStepInputs,
    launchers=(
        matryoshka_topk_sae_step_fwd,
        matryoshka_topk_sae_step_fwd_fake,
        matryoshka_levels_bwd,
        matryoshka_levels_bwd_fake,
    ),  # fmt: skip
    saved=MATRYOSHKA_SAVED,
    outputs=MATRYOSHKA_OUTPUTS,
    differentiable=("loss",),
    grad_inputs=("x", "W_enc", "b_enc", "W_dec", "b_dec", "target"),
)


# Public function ---------------------------------------------------------------


def matryoshka_topk_sae_step(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    prefix_sizes,
    *,
    target: torch.Tensor | None = None,
) -> MatryoshkaSAEStep:
    """One Matryoshka SAE step on a per-row TopK code: the summed losses of nested prefix dictionaries.

    Args:
        x, W_enc, b_enc, W_dec, b_dec, k: as ``topk_sae_step`` (k latents per row, 1 <= k <= F).
        prefix_sizes: the nested dictionaries' sizes m_1 < ... < m_G, ending at F.
        target: None (an SAE), or [B, D_out] (a transcoder), as ``topk_sae_step``'s: every level
            reconstructs the target (each level's loss a mean over B*D_out), x is encoded as it is,
            and the loss is differentiable in ``target`` too.

    Returns:
        ``MatryoshkaSAEStep(loss, mse, fvu, l0, fire_counts, code, level_losses, min_act)``:
        ``loss`` (0-d fp32, the sum of the G level losses, each a mean over B*D) is
        differentiable in every tensor argument; the code is [B * k] by row, then latent id
        (``row_offsets`` = arange(B + 1) * k); ``min_act`` is the smallest positive value of the
        code. No host sync; nothing [B, F] kept; deterministic.
    """
    k = as_count(k)
    B, _, _ = checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, k)
    sizes = check_prefix_sizes(prefix_sizes, W_enc.shape[0])
    target = target.contiguous() if target is not None else None
    params = (x, W_enc, b_enc, W_dec, b_dec)
    out = _matryoshka_topk_sae_step.named(
        _matryoshka_topk_sae_step(*(t.contiguous() for t in params), target, k, sizes)
    )
    return matryoshka_result(out, B)
