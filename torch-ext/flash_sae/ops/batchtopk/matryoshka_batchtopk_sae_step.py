"""The Matryoshka BatchTopK SAE training step (Bussmann et al. 2025; Nabeshima 2024), on the sparse path.

    code   = BatchTopK's (``batchtopk_sae_step``: the int(k * B) largest of relu(pre (* ||W_dec||)))
    loss   = sum over the nested levels m_1 < ... < m_G = F of the level's MSE (``ops._matryoshka``)

What is fused: all G levels in one decoder pass and one backward (``ops._matryoshka``).

A transcoder (``target``): x is encoded as it is and every level reconstructs the target
(``ops._matryoshka``).

Precision: fp32 accumulation; losses in fp32; gradients in the parameters' dtype.
Deterministic; no host sync; nothing [B, F] kept (the G residuals are [G, B, D] fp32).
"""

import torch

from ..._validation import check_batch_k, check_prefix_sizes
from ...primitives.select.preacts import batch_topk_preacts
from ...results import MatryoshkaSAEStep
from .._matryoshka import matryoshka_result, matryoshka_step_fwd, matryoshka_step_fwd_fake, register_matryoshka_step
from .._step import checked_step_args, step_inputs, step_tensors

# Host launchers ----------------------------------------------------------------


MatryoshkaBatchtopkSaeStepInputs = step_inputs(
    "MatryoshkaBatchtopkSaeStepInputs", n=int, prefix_sizes=list[int], rescale_acts_by_decoder_norm=bool
)


def matryoshka_batchtopk_sae_step_fwd(i: MatryoshkaBatchtopkSaeStepInputs) -> tuple[torch.Tensor, ...]:
    """``matryoshka_step_fwd`` with the batch rule (its code is row-major by latent id already)."""
    scale = i.W_dec.detach().norm(dim=1) if i.rescale_acts_by_decoder_norm else None

    def select(centre):
        acts, vals, indices, row_offsets = batch_topk_preacts(i.x, i.W_enc, i.b_enc, i.n, centre, scale)
        return vals, indices, row_offsets, acts

    return matryoshka_step_fwd(i, select)


def matryoshka_batchtopk_sae_step_fwd_fake(i: MatryoshkaBatchtopkSaeStepInputs):
    return matryoshka_step_fwd_fake(i, i.n)


_matryoshka_batchtopk_sae_step = register_matryoshka_step(
    "matryoshka_batchtopk_sae_step", MatryoshkaBatchtopkSaeStepInputs, matryoshka_batchtopk_sae_step_fwd,
    matryoshka_batchtopk_sae_step_fwd_fake,
)  # fmt: skip


# Public function ---------------------------------------------------------------


def matryoshka_batchtopk_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: float,
    prefix_sizes, *, target: torch.Tensor | None = None, rescale_acts_by_decoder_norm: bool = False,
) -> MatryoshkaSAEStep:  # fmt: skip
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
    tensors = step_tensors(x, W_enc, b_enc, W_dec, b_dec, target)
    out = _matryoshka_batchtopk_sae_step.named(
        _matryoshka_batchtopk_sae_step(*tensors, n, sizes, rescale_acts_by_decoder_norm)
    )
    return matryoshka_result(out, B)
