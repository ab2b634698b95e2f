"""The whole Gated SAE training step (Rajamanoharan et al. 2024), on the sparse path.

    xc       = x - b_dec
    pi_gate  = xc @ W_enc.T + b_gate
    pi_mag   = exp(r_mag) * (xc @ W_enc.T) + b_mag           (the magnitude path's tied weights)
    f        = [pi_gate > 0] * relu(pi_mag)
    loss     = sum over D of (b_dec + f @ W_dec - x)^2, mean over B                   (mse)
               + l1_coefficient * mean over B of sum_f relu(pi_gate) * ||W_dec[f]||   (l1)
               + sum over D of (b_dec + relu(pi_gate) @ W_dec - x)^2, mean over B     (aux)

In SAELens's units (its ``gated`` training SAE with the default config: ``apply_b_dec_to_input``,
``l1_coefficient`` 1.0; an L1 warm-up is the caller's). The gate is a step: no gradient passes
through it; pi_mag gets the reconstruction's, pi_gate the penalty's and the auxiliary loss's.
``freeze_aux_decoder`` (the paper's rule) stops the auxiliary loss's gradient into W_dec and b_dec
(it trains the gate path only); False lets it reach them, as SAELens's implementation does.

What is fused:
- one collection per pre-activation chunk (``threshold_preacts`` at 0 over pi_gate) gathers the
  open gates into a variable-length code; pi_mag is computed at those entries only, from fp32
  dots of xc with the encoder rows (``gather.row_dots``), rounded once to the dtype;
- two row gathers over the same code (f for the reconstruction, relu(pi_gate) for the auxiliary
  one) give both residuals and their squared sums; the penalty from the code and the rows' norms;
- backward: one segmented pass over the code taken twice (the reconstruction's rows, then the
  auxiliary one's) gives dW_dec, with the penalty's term along each row before its one rounding,
  and each entry's two dots (over the doubled code's own CSR transpose); one CSR transpose of the
  code gives dW_enc from both paths' gradients
  (pi_gate's plus exp(r_mag) times pi_mag's) and the per-latent sums of b_gate, b_mag and r_mag.

A transcoder (``target``): both paths read x as it is (xc = x, no ``x - b_dec``), and both
reconstructions, f's and the auxiliary relu(pi_gate)'s, are of the target [B, D_out] (W_dec
[F, D_out], b_dec [D_out]); the penalty is unchanged, ``freeze_aux_decoder`` still stops only the
auxiliary loss's gradient into W_dec and b_dec, and the loss is differentiable in the target
(through both reconstructions, as an SAE's is in x).

Capacity as ``standard_sae_step``'s (``count`` gates open; ``overflow = count > capacity``).
Precision: fp32 accumulation, the losses in fp32, gradients in the parameters' dtype.
Deterministic (segmented sums over a CSR transpose, no float atomics). Nothing [B, F] is kept.
"""

from typing import NamedTuple

import torch

from ..._registry import placeholder, register_op
from ..._validation import as_count, check_gated_args, check_same_device, check_same_dtype, check_shape, check_tensor
from ...primitives.csr import RowOut, RowTerm, csr_transpose
from ...primitives.dead_set import mm_f32
from ...primitives.decoder_geometry import add_scaled_rows_
from ...primitives.encoder import encoder_backward
from ...primitives.gather import gather_residual, gather_rows_backward, row_dots, row_ids
from ...primitives.select.preacts import threshold_preacts
from ...results import GatedSAEStep, total_variance
from .._step import (
    at_entries,
    capacity_step_fakes,
    checked_step_args,
    cuda_fused,
    reconstructed,
    step_head,
    target_grad_fake,
)

TINY = torch.finfo(torch.float32).tiny

# Host launchers ----------------------------------------------------------------


def gated_code(x, W_enc, b_gate, r_mag, b_mag, b_dec, capacity):
    """The open gates as a variable-length code: (relu(pi_gate), pi_mag in x's dtype, indices,
    row_offsets, count, dots), pi_mag from fp32 dots of xc with the encoder rows, rounded once.
    ``b_dec`` None: xc = x (a transcoder's). Shared by the step and the module's encode."""
    zero = torch.zeros(W_enc.shape[0], dtype=x.dtype, device=x.device)
    gate, indices, row_offsets, count = threshold_preacts(x, W_enc, b_gate, b_dec, zero, 0.0, capacity)
    xc = x - b_dec if b_dec is not None else x
    dots = row_dots(xc, W_enc, row_ids(row_offsets, capacity), indices)  # xc . W_enc[f], fp32
    mag = (at_entries(r_mag.float().exp(), indices) * dots + at_entries(b_mag.float(), indices)).to(x.dtype)
    return gate, mag, indices, row_offsets, count, dots


class GatedSaeStepInputs(NamedTuple):
    """``gated_sae_step``'s arguments, in the registered op's order."""

    x: torch.Tensor
    W_enc: torch.Tensor
    b_gate: torch.Tensor
    r_mag: torch.Tensor
    b_mag: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    target: torch.Tensor | None
    l1_coefficient: float
    capacity: int
    freeze_aux_decoder: bool


def gated_sae_step_fwd(
    i: GatedSaeStepInputs,
) -> tuple[torch.Tensor, ...]:
    """Returns (loss, mse, l1, aux, l0, fvu, fire_counts, vals, indices, row_offsets, count, overflow,
    gate, mag, dots, residual, aux_residual, norms); the last six are kept for the backward."""
    y, centre = reconstructed(i.x, i.b_dec, i.target)
    B, D = y.shape
    F = i.W_dec.shape[0]
    gate, mag, indices, row_offsets, count, dots = gated_code(
        i.x, i.W_enc, i.b_gate, i.r_mag, i.b_mag, centre, i.capacity
    )
    vals = torch.relu(mag)  # 0 at the empty slots (their dot and bias are 0)
    counts = torch.zeros(F, dtype=torch.int64, device=i.x.device)  # fired, counted by the decode
    residual, sq = gather_residual(vals, indices, i.W_dec, i.b_dec, y, row_offsets=row_offsets, counts=counts)
    aux_residual, sq_aux = gather_residual(gate, indices, i.W_dec, i.b_dec, y, row_offsets=row_offsets)
    norms = torch.linalg.vector_norm(i.W_dec, dim=1, dtype=torch.float32)
    l1 = (gate.float() * at_entries(norms, indices)).sum() / B
    l0 = (vals > 0).sum().float() / B
    loss = (sq + sq_aux) / B + i.l1_coefficient * l1
    return (
        loss, sq / (B * D), l1, sq_aux / B, l0, sq / total_variance(y), counts,
        vals, indices, row_offsets, count, count > i.capacity,
        gate, mag, dots, residual, aux_residual, norms,
    )  # fmt: skip


def gated_sae_step_fwd_fake(i: GatedSaeStepInputs):
    x, (F, D), capacity, f32 = i.x, i.W_dec.shape, i.capacity, torch.float32
    residuals = (x.new_empty(x.shape[0], D, dtype=f32) for _ in range(2))
    kept = (x.new_empty(capacity), x.new_empty(capacity), x.new_empty(capacity, dtype=f32), *residuals)
    return capacity_step_fakes(i, 6, *kept, x.new_empty(F, dtype=f32))


def gated_sae_step_bwd(grads, saved, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    """(dx, dW_enc, db_gate, dr_mag, db_mag, dW_dec, db_dec, dtarget)."""
    B = saved.x.shape[0]
    F = saved.W_dec.shape[0]
    n = saved.indices.numel()
    dtype = saved.W_enc.dtype
    g = grads.loss.float()
    s = g * (2.0 / B)
    c = g * (saved.l1_coefficient / B)
    rows = row_ids(saved.row_offsets, n)
    valid = saved.indices >= 0
    perm, offsets = csr_transpose(saved.indices, F)

    def per_latent(entries: torch.Tensor) -> torch.Tensor:  # [n, m] fp32 -> [F, m] sums over each latent's entries
        return torch.segment_reduce(entries[perm], "sum", offsets=offsets, axis=0, unsafe=True)

    # The decoder: the code taken twice (the reconstruction's rows 0..B-1, the auxiliary one's B..2B-1).
    aux_coef = torch.zeros_like(saved.gate) if saved.freeze_aux_decoder else saved.gate
    gate_sum = per_latent(saved.gate.float()[:, None])[:, 0]
    row_term = torch.where(
        saved.norms > 0, c * gate_sum / saved.norms.clamp_min(TINY), 0.0
    )  # the penalty's d||w|| / dw
    ids2 = torch.cat([saved.indices, saved.indices])
    dW_dec, dots2 = gather_rows_backward(
        torch.cat([saved.residual, saved.aux_residual]),
        torch.cat([saved.vals, aux_coef]),
        ids2,
        saved.W_dec,
        scale=g,
        scale_const=2.0 / B,
        csr=csr_transpose(ids2, F),
        rows=torch.cat([rows, rows + B]),
        row_out=RowOut(term=RowTerm(row_term, by_coef=False)),
    )
    d_mag = torch.where(valid & (saved.mag > 0), dots2[:n] * s, 0.0)  # dL/dpi_mag
    d_gate = torch.where(
        valid, dots2[n:] * s + c * at_entries(saved.norms, saved.indices), 0.0
    )  # dL/dpi_gate (every gate is open)
    scale = saved.r_mag.float().exp()
    dz = d_gate + at_entries(scale, saved.indices) * d_mag  # both paths read W_enc[f]
    centred = saved.target is None
    dx_enc, dW_enc, _, db_dec_enc = encoder_backward(
        dz,
        saved.x,
        saved.W_enc,
        saved.b_dec if centred else None,
        saved.indices,
        csr=(perm, offsets),
        row_offsets=saved.row_offsets,
        rows=rows,
    )
    sums = per_latent(torch.stack([d_gate, d_mag, d_mag * saved.dots], 1))
    dtarget = placeholder(saved.x)
    if centred:
        dx = dx_enc - (saved.residual + saved.aux_residual) * s
        db_dec = saved.residual.sum(0) * s + db_dec_enc
    else:  # a transcoder: x only feeds the encoder; the target gets both reconstructions' -s * r
        dx = dx_enc
        db_dec = saved.residual.sum(0) * s
        if needs[7]:
            dtarget = ((saved.residual + saved.aux_residual) * -s).to(saved.target.dtype)
    if not saved.freeze_aux_decoder:
        db_dec = db_dec + saved.aux_residual.sum(0) * s
    return (
        dx.to(dtype), dW_enc, sums[:, 0].to(dtype, copy=True), (scale * sums[:, 2]).to(dtype),
        sums[:, 1].to(dtype, copy=True),
        dW_dec, db_dec.to(dtype), dtarget,
    )  # fmt: skip


def gated_sae_step_bwd_fake(grads, saved, needs: list[bool]):
    x, W_enc, W_dec, b_dec = saved.x, saved.W_enc, saved.W_dec, saved.b_dec
    F = W_enc.shape[0]
    return (
        torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(F), W_enc.new_empty(F), W_enc.new_empty(F),
        torch.empty_like(W_dec), torch.empty_like(b_dec), target_grad_fake(needs[7], saved.target, x),
    )  # fmt: skip


# Op registration and autograd ----------------------------------------------------

_gated_sae_step = register_op(
    "gated_sae_step",
    inputs=GatedSaeStepInputs,
    launchers=(gated_sae_step_fwd, gated_sae_step_fwd_fake, gated_sae_step_bwd, gated_sae_step_bwd_fake),
    saved=tuple(
        "x W_enc r_mag W_dec b_dec target vals indices row_offsets gate mag dots residual aux_residual norms "
        "l1_coefficient freeze_aux_decoder".split()
    ),
    outputs=tuple(
        "loss mse l1 aux l0 fvu fire_counts vals indices row_offsets count overflow gate mag dots residual "
        "aux_residual norms".split()
    ),
    differentiable=("loss",),
    grad_inputs=("x", "W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec", "target"),
)


# Public functions ---------------------------------------------------------------


def _check(params: tuple, target, capacity, l1_coefficient, freeze_aux_decoder):
    """``params``: (x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec)."""
    x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec = params
    check_tensor("x", x, 2)
    check_tensor("W_enc", W_enc, 2)
    for name, t in (("b_gate", b_gate), ("r_mag", r_mag), ("b_mag", b_mag)):  # named here, not as a b_enc
        check_tensor(name, t, 1)
        check_shape(name, t, (W_enc.shape[0],))
    check_same_dtype("W_enc", W_enc, b_gate=b_gate)
    check_same_device(W_enc=W_enc, b_gate=b_gate)
    checked_step_args(x, W_enc, b_gate, W_dec, b_dec, target, 1)
    capacity = as_count(capacity)
    check_gated_args(x, W_enc, r_mag, b_mag, capacity, l1_coefficient)
    if not isinstance(freeze_aux_decoder, bool):
        raise ValueError(f"freeze_aux_decoder must be a bool, got {freeze_aux_decoder!r}")


# ``gated_sae_step``'s keyword options beyond capacity and target, with their defaults.
GATED_OPTIONS = {"l1_coefficient": 1.0, "freeze_aux_decoder": True}


def _options(options: dict) -> tuple[float, bool]:
    """(l1_coefficient, freeze_aux_decoder) from ``gated_sae_step``'s keyword options, defaults filled in."""
    unknown = sorted(set(options) - set(GATED_OPTIONS))
    if unknown:
        raise ValueError(
            f"gated_sae_step got unknown keyword arguments {unknown}; its keyword arguments are capacity, "
            f"target and {', '.join(GATED_OPTIONS)}"
        )
    merged = {**GATED_OPTIONS, **options}
    return merged["l1_coefficient"], merged["freeze_aux_decoder"]


def gated_sae_step(
    x: torch.Tensor, W_enc: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor,
    W_dec: torch.Tensor, b_dec: torch.Tensor, *, capacity: int, target: torch.Tensor | None = None, **options,
) -> GatedSAEStep:  # fmt: skip
    """One Gated SAE step: the gated code, MSE + the gate's decoder-norm-weighted L1 + the gate path's
    auxiliary reconstruction loss.

    Args:
        x: [B, D] activations, the parameters' dtype.
        W_enc: [F, D] (shared by both paths); b_gate, r_mag, b_mag: [F]; W_dec: [F, D]; b_dec: [D].
        capacity: the code's fixed size (open gates over the batch, 1 <= capacity <= B * F); more
            sets ``overflow``.
        target: None (an SAE: reconstruct x), or [B, D_out] in x's dtype (a transcoder: reconstruct
            ``target`` from x). With a target, W_dec is [F, D_out] and b_dec [D_out]; both paths read
            x as it is (no ``x - b_dec``); the MSE and the auxiliary term both reconstruct the target
            (sums over D_out, mean over B), ``mse`` and ``fvu`` are the target's, the penalty is
            unchanged, and the loss is differentiable in ``target`` (through both terms) too.
        **options: ``l1_coefficient`` (float, default 1.0): the penalty's weight (>= 0); SAELens's
            default. ``freeze_aux_decoder`` (bool, default True, the paper's rule): the auxiliary loss
            trains the gate path only, not W_dec or b_dec; False: it reaches them too (SAELens's
            implementation). Keywords (the step takes at most ten parameters); any other name is a
            ValueError.

    Returns:
        ``GatedSAEStep(loss, mse, fvu, l0, fire_counts, code, l1, aux, count, overflow)``;
        ``loss`` (0-d fp32) is differentiable in x and the seven parameters (and the target). No
        host sync; nothing [B, F] kept; deterministic.
    """
    l1_coefficient, freeze_aux_decoder = _options(options)
    args = (x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec)
    _check(args, target, capacity, l1_coefficient, freeze_aux_decoder)
    target = target.contiguous() if target is not None else None
    out = _gated_sae_step.named(
        _gated_sae_step(*(t.contiguous() for t in args), target, float(l1_coefficient), capacity, freeze_aux_decoder)
    )
    head = step_head(out, x.shape[0])
    return GatedSAEStep(**head, l1=out.l1, aux=out.aux, count=out.count, overflow=out.overflow)


@cuda_fused
def _dense_codes(P, b_gate, scale, b_mag, norms, dtype: torch.dtype):
    """From the fp32 encoder product: relu(pi_gate), the code f, where f passes gradient (open gate and
    pi_mag > 0), each latent's count of f > 0, the open gates' count and each row's penalty
    sum_f relu(pi_gate) * ||W_dec[f]|| in fp32."""
    gate = (P + b_gate.float()).to(dtype)
    mag = (P * scale + b_mag.float()).to(dtype)
    mag_open = (gate > 0) & (mag > 0)
    a = torch.relu(gate)
    l1_rows = (a.float() * norms).sum(1)
    return a, torch.where(mag_open, mag, 0), mag_open, mag_open.sum(0), (gate > 0).sum(), l1_rows


@cuda_fused
def _dense_preact_grads(d_f, d_a, mag_open, a, scale, P):
    """From dL/df and dL/d relu(pi_gate): dL/d(the encoder product) in the dtype, and db_gate, db_mag,
    dr_mag in fp32."""
    d_mag = torch.where(mag_open, d_f.float(), 0.0)
    d_gate = torch.where(a > 0, d_a.float(), 0.0)
    dP = (d_gate + d_mag * scale).to(a.dtype)
    return dP, d_gate.sum(0), d_mag.sum(0), scale * (d_mag * P).sum(0)


class _DenseStep(torch.autograd.Function):
    """The dense formulation: cuBLAS products over [B, F] (one encoder product serves both paths, in
    fp32), the two decoder products, and their adjoints; the elementwise passes between them fused
    (``cuda_fused``); dW_dec in fp32 with the penalty's row term added in one rounding."""

    @staticmethod
    def forward(ctx, x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, target, options):
        """``options``: (l1_coefficient, freeze_aux_decoder); ``target`` None for an SAE."""
        l1_coefficient, freeze = options
        B = x.shape[0]
        dtype = x.dtype
        y = x if target is None else target
        xc = x - b_dec if target is None else x  # a transcoder's paths read x as it is
        P = mm_f32(xc, W_enc.t())  # xc . W_enc[f], fp32 [B, F]
        scale = r_mag.float().exp()
        norms = torch.linalg.vector_norm(W_dec, dim=1, dtype=torch.float32)
        a, f, mag_open, counts, gates, l1_rows = _dense_codes(P, b_gate, scale, b_mag, norms, dtype)
        residual = torch.addmm(b_dec, f, W_dec).float().sub_(y.float())
        aux_residual = torch.addmm(b_dec, a, W_dec).float().sub_(y.float())
        sq, sq_aux = residual.square().sum(), aux_residual.square().sum()
        l1 = l1_rows.sum() / B
        ctx.save_for_backward(xc, W_enc, W_dec, P, f, a, mag_open, residual, aux_residual, norms, scale)
        ctx.l1_coefficient, ctx.freeze = l1_coefficient, freeze
        ctx.target_dtype = None if target is None else target.dtype
        ctx.mark_non_differentiable(sq, sq_aux, l1, counts, gates)
        return (sq + sq_aux) / B + l1_coefficient * l1, sq, sq_aux, l1, counts, gates

    @staticmethod
    def backward(ctx, grad, *_):
        xc, W_enc, W_dec, P, f, a, mag_open, residual, aux_residual, norms, scale = ctx.saved_tensors
        B, dtype = xc.shape[0], xc.dtype
        g = grad.float()
        s = g * (2.0 / B)
        c = g * (ctx.l1_coefficient / B)
        d_xhat32, d_aux32 = residual * s, aux_residual * s
        d_xhat, d_aux = d_xhat32.to(dtype), d_aux32.to(dtype)
        d_f = d_xhat @ W_dec.t()
        d_a = torch.addmm((c * norms).to(dtype), d_aux, W_dec.t())  # + the penalty's code gradient
        dP, db_gate, db_mag, dr = _dense_preact_grads(d_f, d_a, mag_open, a, scale, P)
        dW_enc = dP.t() @ xc
        dxc = (dP @ W_enc).float()
        if ctx.freeze:
            base = mm_f32(f.t(), d_xhat)
        else:
            base = mm_f32(torch.cat([f, a]).t(), torch.cat([d_xhat, d_aux]))
        row_scale = torch.where(norms > 0, c * a.sum(0, dtype=torch.float32) / norms.clamp_min(TINY), 0.0)
        dW_dec = add_scaled_rows_(torch.empty_like(W_dec), W_dec, row_scale, base=base)
        dtarget = None
        if ctx.target_dtype is None:
            dx = (dxc - d_xhat32 - d_aux32).to(dtype)
            db_dec32 = d_xhat32.sum(0) - dxc.sum(0)
        else:  # a transcoder: x only feeds the encoder; the target gets both reconstructions' gradients
            dx = dxc.to(dtype)
            db_dec32 = d_xhat32.sum(0)
            if ctx.needs_input_grad[7]:
                dtarget = (-(d_xhat32 + d_aux32)).to(ctx.target_dtype)
        if not ctx.freeze:
            db_dec32 = db_dec32 + d_aux32.sum(0)
        grads = (dx, dW_enc, db_gate.to(dtype), dr.to(dtype), db_mag.to(dtype), dW_dec, db_dec32.to(dtype))
        return *grads, dtarget, None


def gated_sae_step_dense(
    x: torch.Tensor, W_enc: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor,
    W_dec: torch.Tensor, b_dec: torch.Tensor, *, l1_coefficient: float = 1.0, freeze_aux_decoder: bool = True,
    target: torch.Tensor | None = None,
) -> GatedSAEStep:  # fmt: skip
    """The same step in its dense formulation, for while the gates are mostly open (early in training).

    cuBLAS products over the dense [B, F] code (the backward keeps it, and the fp32 encoder
    product); the reconstructions are rounded to the dtype (as torch's own), the residuals and the
    losses' sums are fp32. Same losses and gradients as ``gated_sae_step`` by the
    parity rule; ``code`` is None (the code is dense), ``count`` is the number of
    open gates and ``overflow`` False. ``target``: as ``gated_sae_step``'s. No host sync.
    """
    args = (x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec)
    _check(args, target, 1, l1_coefficient, freeze_aux_decoder)
    y = x if target is None else target.contiguous()
    B, D = y.shape
    loss, sq, sq_aux, l1, counts, gates = _DenseStep.apply(
        *(t.contiguous() for t in args), None if target is None else y, (float(l1_coefficient), freeze_aux_decoder)
    )
    return GatedSAEStep(
        loss=loss, mse=sq / (B * D), fvu=sq / total_variance(y), l0=counts.sum().float() / B, fire_counts=counts,
        code=None, l1=l1, aux=sq_aux / B, count=gates, overflow=torch.zeros((), dtype=torch.bool, device=x.device),
    )  # fmt: skip
