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

import torch

from ..._validation import as_count, check_prefix_sizes
from ...primitives.select.preacts import topk_preacts
from ...results import MatryoshkaSAEStep
from .._matryoshka import matryoshka_result, matryoshka_step_fwd, matryoshka_step_fwd_fake, register_matryoshka_step
from .._step import checked_step_args, step_inputs, step_tensors

# Host launchers ----------------------------------------------------------------


MatryoshkaTopkSaeStepInputs = step_inputs("MatryoshkaTopkSaeStepInputs", k=int, prefix_sizes=list[int])


def matryoshka_topk_sae_step_fwd(i: MatryoshkaTopkSaeStepInputs) -> tuple[torch.Tensor, ...]:
    """``matryoshka_step_fwd`` with each row's k largest, reordered by latent id (each level a prefix of the row)."""

    def select(centre):
        values, ids = topk_preacts(i.x, i.W_enc, i.b_enc, i.k, centre, relu=True)
        ids, order = ids.sort(dim=1)
        vals = values.gather(1, order).view(-1)
        return vals, ids.view(-1), torch.arange(i.x.shape[0] + 1, device=i.x.device) * i.k, vals

    return matryoshka_step_fwd(i, select)


def matryoshka_topk_sae_step_fwd_fake(i: MatryoshkaTopkSaeStepInputs):
    return matryoshka_step_fwd_fake(i, i.x.shape[0] * i.k)


_matryoshka_topk_sae_step = register_matryoshka_step(
    "matryoshka_topk_sae_step", MatryoshkaTopkSaeStepInputs, matryoshka_topk_sae_step_fwd,
    matryoshka_topk_sae_step_fwd_fake,
)  # fmt: skip


# Public function ---------------------------------------------------------------


def matryoshka_topk_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int,
    prefix_sizes, *, target: torch.Tensor | None = None,
) -> MatryoshkaSAEStep:  # fmt: skip
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
    tensors = step_tensors(x, W_enc, b_enc, W_dec, b_dec, target)
    out = _matryoshka_topk_sae_step.named(_matryoshka_topk_sae_step(*tensors, k, sizes))
    return matryoshka_result(out, B)
