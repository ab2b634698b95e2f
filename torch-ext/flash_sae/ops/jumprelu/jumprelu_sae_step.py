"""The whole JumpReLU SAE training step (Rajamanoharan et al. 2024), on the sparse path.

    z     = (x - b_dec) @ W_enc.T + b_enc,  theta = threshold (cast to x's dtype, as SAELens does)
    f     = z * H(z - theta)
    loss  = sum over D of (b_dec + f @ W_dec - x)^2, mean over B  +  l0_coefficient * mean_b sum_f H(z - theta)

That is the paper's loss and SAELens's default JumpReLU training config ("step" sparsity
loss, l0_coefficient 1, bandwidth 0.05, the threshold trained directly and kept in fp32,
no gradient from the L0 term to z). Straight-through estimators with the rectangle kernel
R(u) = 1{|u| < 1/2}, u = (z - theta) / bandwidth:

    df/dz = H(z - theta)
    df/dtheta = -(theta / bandwidth) R(u)        dH/dtheta = -(1 / bandwidth) R(u)

So the threshold's gradient needs dL/df at every entry with R(u) = 1, active or not, and
nothing else: dtheta[f] = sum over those entries of R(u) * (-(theta/bw) dL/df - l0_coefficient
* grad / (B * bw)).

What is fused:
- one collection per pre-activation chunk (``primitives.select.preacts.threshold_preacts``) gathers
  the active entries and the band's into one variable-length code of fixed capacity; band-only
  entries carry the value 0, so they change no reconstruction and no weight gradient, but
  the decoder's segmented pass computes their dL/df with everyone else's;
- decode and MSE: the row gather over the code; backward: ``primitives.step_backward`` (one
  CSR transpose, gate H(z - theta)), and the threshold's gradient as a deterministic
  segmented sum over the same CSR.

Capacity: the code holds at most ``capacity`` entries (a static size, so no host sync). The
step returns how many qualified (``count``) and ``overflow = count > capacity``; then the
result is missing entries. ``JumpReLUSparseAutoencoder`` grows its capacity from the counts
it sees, without a sync, so a later step is exact again.

A transcoder (``target``): x is encoded as it is (no ``x - b_dec``) and the decode reconstructs
the target [B, D_out] (W_dec [F, D_out], b_dec [D_out]); the L0 term and the threshold's estimator
are unchanged, and the loss is differentiable in the target too.

Precision: fp32 accumulation; the loss in fp32; gradients in the parameters' dtypes (the
threshold's in the threshold's dtype). Deterministic. Nothing [B, F] is kept.
"""

import torch

from ..._registry import register_op
from ..._validation import as_count, check_jumprelu_args
from ...primitives.gather import gather_residual
from ...primitives.select.preacts import threshold_preacts
from ...primitives.step_backward import step_backward_with_da
from ...results import JumpReLUSAEStep, fire_counts, total_variance
from .._step import (
    capacity_step_fakes,
    checked_step_args,
    reconstructed,
    saved_step_tensors,
    step_grads_fake,
    step_head,
    step_inputs,
    step_tensors,
    target_grad_fake,
    target_grad_for,
)

# Host launchers ----------------------------------------------------------------


def _active(vals, indices, threshold, dtype):
    """Active entries: z > theta (theta in the activations' dtype); unused slots are never active."""
    theta = threshold.to(dtype)[indices.clamp_min(0)]
    return (vals > theta) & (indices >= 0), theta


JumpreluSaeStepInputs = step_inputs(
    "JumpreluSaeStepInputs", threshold=torch.Tensor, bandwidth=float, l0_coefficient=float, capacity=int
)


def jumprelu_sae_step_fwd(
    i: JumpreluSaeStepInputs,
) -> tuple[torch.Tensor, ...]:
    """Returns (loss, mse, l0, fvu, fire_counts, vals, indices, row_offsets, count, overflow, z, residual);
    z, the collected pre-activations, and the residual are kept for the backward."""
    y, centre = reconstructed(i.x, i.b_dec, i.target)
    B, D = y.shape
    z, indices, row_offsets, count = threshold_preacts(
        i.x, i.W_enc, i.b_enc, centre, i.threshold, i.bandwidth, i.capacity
    )
    active, _ = _active(z, indices, i.threshold, i.x.dtype)
    vals = torch.where(active, z, 0)
    residual, sq = gather_residual(vals, indices, i.W_dec, i.b_dec, y, row_offsets=row_offsets)
    l0 = active.sum().float() / B
    counts = fire_counts(active, indices.clamp_min(0), i.W_dec.shape[0])
    loss = sq / B + i.l0_coefficient * l0
    return (loss, sq / (B * D), l0, sq / total_variance(y), counts, vals, indices, row_offsets, count,
            count > i.capacity, z, residual)  # fmt: skip


def jumprelu_sae_step_fwd_fake(i: JumpreluSaeStepInputs):
    B, D = i.x.shape[0], i.W_dec.shape[1]
    return capacity_step_fakes(i, 4, i.x.new_empty(i.capacity), i.x.new_empty(B, D, dtype=torch.float32))


def jumprelu_sae_step_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dx, dW_enc, db_enc, dW_dec, db_dec, dtarget, dthreshold): the MSE step's backward gated by
    H(z - theta), and the threshold's straight-through gradient as a segmented sum over the same CSR
    transpose."""
    B = saved.x.shape[0]
    active, theta = _active(saved.z, saved.indices, saved.threshold, saved.x.dtype)
    vals = torch.where(active, saved.z, 0)
    step = saved_step_tensors(saved, vals=vals)
    *step_grads, da, (perm, offsets) = step_backward_with_da(
        grads.loss, step, gate=active, centred=saved.target is None
    )
    # R(u), u = (z - theta) / bandwidth in the activations' dtype, as the reference computes it.
    u = (saved.z - theta) / saved.bandwidth
    band = (u > -0.5) & (u < 0.5) & (saved.indices >= 0)
    theta32 = theta.float()
    per_entry = -(theta32 / saved.bandwidth) * da - saved.l0_coefficient * grads.loss.float() / (B * saved.bandwidth)
    q = torch.where(band, per_entry, 0.0)
    dthreshold = torch.segment_reduce(q[perm], "sum", offsets=offsets, unsafe=True)
    dtarget = target_grad_for(needs[5], grads.loss, saved.residual, saved.target, saved.x, per_row=True)
    return (*step_grads, dtarget, dthreshold.to(saved.threshold.dtype))


def jumprelu_sae_step_bwd_fake(grads, saved, needs: list[bool]):
    *step_grads, dthreshold = step_grads_fake(saved.x, saved.W_enc, saved.W_dec, saved.b_dec, saved.threshold)
    return (*step_grads, target_grad_fake(needs[5], saved.target, saved.x), dthreshold)


# Op registration and autograd ----------------------------------------------------

_jumprelu_sae_step = register_op(
    "jumprelu_sae_step",
    inputs=JumpreluSaeStepInputs,
    launchers=(jumprelu_sae_step_fwd, jumprelu_sae_step_fwd_fake, jumprelu_sae_step_bwd, jumprelu_sae_step_bwd_fake),
    saved=tuple("x W_enc W_dec b_dec target threshold z indices row_offsets residual bandwidth l0_coefficient".split()),
    outputs=tuple("loss mse l0 fvu fire_counts vals indices row_offsets count overflow z residual".split()),
    differentiable=("loss",),
    grad_inputs=("x", "W_enc", "b_enc", "W_dec", "b_dec", "target", "threshold"),
)


# Public function ---------------------------------------------------------------


def jumprelu_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
    threshold: torch.Tensor, *, capacity: int, bandwidth: float = 0.05, l0_coefficient: float = 1.0,
    target: torch.Tensor | None = None,
) -> JumpReLUSAEStep:  # fmt: skip
    """One JumpReLU SAE step: the sparse code above a learned per-latent threshold, MSE + L0.

    Args:
        x: [B, D] activations, the parameters' dtype.
        W_enc: [F, D]; b_enc: [F]; W_dec: [F, D]; b_dec: [D] (W_enc's dtype).
        threshold: [F] per-latent threshold theta (any float dtype; SAELens keeps it in fp32),
            compared in x's dtype. A module that trains log(theta) passes ``log_threshold.exp()``.
        capacity: the code's fixed size (entries over the batch: active, or within half a
            bandwidth of the threshold). More than that sets ``overflow``; see the module docstring.
        bandwidth: the rectangle kernel's width epsilon (> 0).
        l0_coefficient: lambda, the weight of the L0 term (>= 0).
        target: None (an SAE: reconstruct x), or [B, D_out] in x's dtype (a transcoder: reconstruct
            ``target`` from x). With a target, W_dec is [F, D_out] and b_dec [D_out]; x is encoded
            as it is (no ``x - b_dec``), the MSE term is the sum over D_out of ``(b_dec + decode -
            target)^2`` (mean over B), ``mse`` and ``fvu`` are the target's, the L0 term and the
            threshold's estimator are unchanged, and the loss is differentiable in ``target`` too.

    Returns:
        ``JumpReLUSAEStep(loss, mse, fvu, l0, fire_counts, code, count, overflow)``;
        ``loss`` (0-d fp32) is differentiable in x, the four weights, the
        threshold (and the target). No host sync; nothing [B, F] kept; deterministic.
    """
    B, _, _ = checked_step_args(x, W_enc, b_enc, W_dec, b_dec, target, 1)
    capacity = as_count(capacity)
    check_jumprelu_args(threshold, W_enc.shape[0], capacity, bandwidth, l0_coefficient, x)
    tensors = (*step_tensors(x, W_enc, b_enc, W_dec, b_dec, target), threshold.contiguous())
    out = _jumprelu_sae_step.named(_jumprelu_sae_step(*tensors, float(bandwidth), float(l0_coefficient), capacity))
    return JumpReLUSAEStep(**step_head(out, B), count=out.count, overflow=out.overflow)
