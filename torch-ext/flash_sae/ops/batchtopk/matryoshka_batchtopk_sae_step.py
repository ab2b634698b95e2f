"""The Matryoshka BatchTopK SAE training step (Bussmann et al. 2025; Nabeshima 2024), on the sparse path.

    code   = BatchTopK's (``batchtopk_sae_step``: the int(k * B) largest of relu(pre (* ||W_dec||)))
    loss   = sum over the nested levels m_1 < ... < m_G = F of the level's MSE (``ops._matryoshka``)

What is fused: all G levels in one decoder pass and one backward (``ops._matryoshka``).

A transcoder (``target``): x is encoded as it is and every level reconstructs the target
(``ops._matryoshka``).

Precision: fp32 accumulation; losses in fp32; gradients in the parameters' dtype.
Deterministic; no host sync; nothing [B, F] kept (the G residuals are [G, B, D] fp32).
"""

from typing import NamedTuple

import torch

from ..._registry import register_op
from ..._validation import check_batch_k, check_prefix_sizes
from ...primitives.select.preacts import batch_topk_preacts
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


class MatryoshkaBatchtopkSaeStepInputs(NamedTuple):
    """``matryoshka_batchtopk_sae_step``'s arguments, in the registered op's order."""

    x: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    target: torch.Tensor | None
    n: int
    prefix_sizes: list[int]
    rescale_acts_by_decoder_norm: bool


def matryoshka_batchtopk_sae_step_fwd(i: MatryoshkaBatchtopkSaeStepInputs) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Returns (loss, level_losses, fvu, fire_counts, vals, indices, row_offsets, min_act, residuals [G, B, D])."""
    x, W_dec, b_dec = i.x, i.W_dec, i.b_dec
    scale = W_dec.detach().norm(dim=1) if i.rescale_acts_by_decoder_norm else None
    y, centre = reconstructed(x, b_dec, i.target)
    acts, vals, indices, row_offsets = batch_topk_preacts(x, i.W_enc, i.b_enc, i.n, centre, scale)
    loss, level_losses, fvu, counts, residuals = matryoshka_levels_fwd(
        y, W_dec, b_dec, vals, indices, row_offsets, i.prefix_sizes
    )
    return loss, level_losses, fvu, counts, vals, indices, row_offsets, min_positive(acts), residuals


def matryoshka_batchtopk_sae_step_fwd_fake(i: MatryoshkaBatchtopkSaeStepInputs):
    x, n = i.x, i.n
    loss, level_losses, fvu, counts, residuals = matryoshka_levels_fwd_fake(x, i.W_dec, len(i.prefix_sizes))
    i64 = torch.int64
    code = (x.new_empty(n), x.new_empty(n, dtype=i64), x.new_empty(x.shape[0] + 1, dtype=i64))
    return loss, level_losses, fvu, counts, *code, x.new_empty((), dtype=torch.float32), residuals


# Op registration and autograd ----------------------------------------------------

_matryoshka_batchtopk_sae_step = register_op(
    "matryoshka_batchtopk_sae_step",
    inputs=MatryoshkaBatchtopkSaeStepInputs,
    launchers=(
        matryoshka_batchtopk_sae_step_fwd,
        matryoshka_batchtopk_sae_step_fwd_fake,
        matryoshka_levels_bwd,
        matryoshka_levels_bwd_fake,
    ),  # fmt: skip
    saved=MATRYOSHKA_SAVED,
    outputs=MATRYOSHKA_OUTPUTS,
    differentiable=("loss",),
    grad_inputs=("x", "W_enc", "b_enc", "W_dec", "b_dec", "target"),
)


# Public function ---------------------------------------------------------------


def matryoshka_batchtopk_sae_step(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: float,
    prefix_sizes,
    *,
    target: torch.Tensor | None = None,
    rescale_acts_by_decoder_norm: bool = False,
) -> MatryoshkaSAEStep:
    """One Matryoshka BatchTopK SAE step: the BatchTopK code, and the summed losses of nested prefixes.

    Args:
        x, W_enc, b_enc, W_dec, b_dec, k, rescale_acts_by_decoder_norm: as ``batchtopk_sae_step``.
        prefix_sizes: the nested dictionaries' sizes m_1 < ... < m_G, ending at F (SAELens's
            ``matryoshka_widths``).
        target: None (an SAE), or [B, D_out] (a transcoder), as ``batchtopk_sae_step``'s: every level
            reconstructs the target (each level's loss a mean over B*D_out), x is encoded as it is,
            and the loss is differentiable in ``target`` too.

    Returns:
        ``MatryoshkaSAEStep(loss, mse, fvu, l0, fire_counts, code, level_losses, min_act)``:
        ``loss`` (0-d fp32, the sum of the G level losses, each a mean over B*D) is
        differentiable in every tensor argument. No host sync; nothing [B, F] kept; deterministic.
    """
    B, _, F = checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, 1)
    n = check_batch_k(k, B, F)
    sizes = check_prefix_sizes(prefix_sizes, F)
    if not isinstance(rescale_acts_by_decoder_norm, bool):
        raise ValueError(f"rescale_acts_by_decoder_norm must be a bool, got {rescale_acts_by_decoder_norm!r}")
    target = target.contiguous() if target is not None else None
    params = (x, W_enc, b_enc, W_dec, b_dec)
    out = _matryoshka_batchtopk_sae_step.named(
        _matryoshka_batchtopk_sae_step(*(t.contiguous() for t in params), target, n, sizes,
                                       rescale_acts_by_decoder_norm)
    )  # fmt: skip
    return matryoshka_result(out, B)
