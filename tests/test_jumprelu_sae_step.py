"""jumprelu_sae_step: the collected code (active and band entries), loss, L0, statistics and every
gradient (the threshold's straight-through one included) vs fp64; capacity and overflow; and SAELens's
own JumpReLU training SAE with its default config (determinism, opcheck, compile, chunking, CUDA graphs
and bad input: test_op_contract.py)."""

import pytest
import torch
from encoder_inputs import STEP_NAMES, make_sae, step_shapes, step_upstream
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_parity, grads, rel_err
from peers import assert_saelens_latents, saelens_step, saelens_training_sae

NAMES = (*STEP_NAMES, "threshold")


def make_jumprelu(B, D, F, dtype, device, *, seed, integer=False):
    """x, W_enc, b_enc, W_dec, b_dec (dtype) and an fp32 threshold spread around the pre-activations'
    scale, so some entries are active, some in the band and some neither."""
    params = list(make_sae(B, D, F, 1, dtype, device, seed=seed, integer=integer))
    g = torch.Generator().manual_seed(seed + 7)
    threshold = (torch.rand(F, generator=g) * (1.0 if integer else 0.6)).to(device).requires_grad_()
    return params + [threshold]


def collected(fs, params, bandwidth):
    """The same-dtype masks (active, band) the step must use, from the reference's formulas."""
    x, W_enc, b_enc, _, b_dec, threshold = params
    with torch.no_grad():
        z = fs.testing.reference.encoder_preacts(x, W_enc, b_enc, b_dec)
        return fs.testing.reference.jumprelu_masks(z, threshold.to(z.dtype), bandwidth)


def check_jumprelu_step(fs, shape, dtype, device, *, seed, bandwidth, l0_coefficient, integer=False):
    B, D, F = shape
    params = make_jumprelu(B, D, F, dtype, device, seed=seed, integer=integer)
    active, band = collected(fs, params, bandwidth)
    need = int((active | band).sum())
    cap = min(need + 3, B * F)
    out = fs.jumprelu_sae_step(*params, capacity=cap, bandwidth=bandwidth, l0_coefficient=l0_coefficient)
    assert int(out.count) == need and not bool(out.overflow)
    # The code: every active or band entry, row-major, value z where active and 0 in the band only.
    rows = torch.repeat_interleave(torch.arange(B, device=device), out.code.row_offsets.diff())
    n = int(out.code.row_offsets[-1])
    assert n == need and (out.code.indices[n:] == -1).all() and (out.code.vals[n:] == 0).all()
    mask = torch.zeros(B, F, dtype=torch.bool, device=device)
    mask[rows, out.code.indices[:n]] = True
    assert torch.equal(mask, active | band), "the collected entries differ from active | band"
    assert torch.equal(torch.sort(rows * F + out.code.indices[:n]).values, rows * F + out.code.indices[:n]), (
        "not row-major"
    )
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)

    ref = fs.testing.reference
    masks = (active, band)
    kw = dict(bandwidth=bandwidth, l0_coefficient=l0_coefficient, masks=masks)
    same = ref.jumprelu_sae_step(*params, **kw)
    dense = out.code.to_dense(F)
    assert torch.equal(dense, same.code.vals.detach()), "code values differ from z * H(z - theta)"
    same_grads = grads(same.loss, params, up.to(same.loss.dtype))
    p64 = [p.detach().double().requires_grad_() for p in params]
    r = ref.jumprelu_sae_step(*p64, **kw)
    r_grads = grads(r.loss, p64, up.double())
    assert_parity("jumprelu loss", out.loss, same.loss, r.loss, dtype)
    assert_parity("jumprelu mse", out.mse, same.mse, r.mse, dtype)
    assert out.l0.item() == pytest.approx(float(active.sum()) / B, rel=1e-6)
    assert torch.equal(out.fire_counts, active.sum(0))
    # The roundings of x - b_dec, z and theta to the dtype are shared by every same-dtype implementation
    # (SAELens casts theta too): torch's error is at least that of exact arithmetic at those roundings.
    p_sh = [p.detach().double().requires_grad_() for p in params]
    sh = ref.jumprelu_sae_step(*p_sh, **kw, round_preacts=dtype)
    sh_grads = grads(sh.loss, p_sh, up.double())
    for name, a, b, c, d, p in zip(NAMES, ours, same_grads, r_grads, sh_grads, params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_parity(f"jumprelu d{name}", a, b if rel_err(b, c) >= rel_err(d, c) else d, c, dtype)


@given(
    shape=step_shapes(),
    dtype=st.sampled_from(DTYPES),
    bandwidth=st.sampled_from([0.05, 0.3, 1.0]),
    l0_coefficient=st.sampled_from([0.0, 0.1, 1.0]),
    seed=st.integers(0, 2**16),
)
@example(shape=(1, 1, 1), dtype=torch.float16, bandwidth=0.05, l0_coefficient=0.1, seed=5)  # theta's fp16 rounding
# pinned, with the example(s) above: each dtype runs in every tier, whatever the draw
@example(shape=(3, 24, 40), dtype=torch.float32, bandwidth=0.3, l0_coefficient=0.1, seed=1)
@example(shape=(4, 33, 110), dtype=torch.bfloat16, bandwidth=0.05, l0_coefficient=1.0, seed=2)
def test_jumprelu_sae_step_parity(fs, device, shape, dtype, bandwidth, l0_coefficient, seed):
    check_jumprelu_step(fs, shape, dtype, device, seed=seed, bandwidth=bandwidth, l0_coefficient=l0_coefficient)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES)
def test_jumprelu_ties_and_exact_boundaries(fs, device, dtype):
    """Integer data: pre-activations equal to the threshold (not active) and exactly half a bandwidth
    away (outside the open band) decide by the stated comparisons."""
    check_jumprelu_step(fs, (6, 5, 40), dtype, device, seed=3, bandwidth=1.0, l0_coefficient=0.5, integer=True)


@pytest.mark.kernels_ci
def test_jumprelu_overflow_is_reported(fs, device):
    """More qualifying entries than capacity: overflow is set and count says how many there were; with
    enough capacity the same call is exact (no overflow)."""
    params = [t.detach() for t in make_jumprelu(5, 9, 30, torch.float32, device, seed=4)]
    active, band = collected(fs, params, 0.05)
    need = int((active | band).sum())
    small = fs.jumprelu_sae_step(*params, capacity=need - 3)
    assert bool(small.overflow) and int(small.count) == need and int(small.code.row_offsets[-1]) == need - 3
    exact = fs.jumprelu_sae_step(*params, capacity=need)
    assert not bool(exact.overflow) and int(exact.code.row_offsets[-1]) == need


# SAELens's own JumpReLU training SAE, default training config -------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jumprelu_matches_saelens(fs, device, dtype):
    """Same parameters and inputs: SAELens's total loss (MSE summed over d_in + l0_coefficient * L0),
    its code and every gradient, the threshold's included, by the parity rule against SAELens in fp64."""
    B, D, F = 8, 24, 64
    g = torch.Generator().manual_seed(13)
    cfg = dict(d_in=D, d_sae=F, device=device)
    sae = saelens_training_sae("jumprelu", dtype="float32", **cfg)
    assert sae.cfg.jumprelu_sparsity_loss_mode == "step" and not sae.cfg.jumprelu_ste_to_input
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=g).to(device) / D**0.5)
        sae.b_enc.copy_(torch.randn(F, generator=g).to(device) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=g).to(device) * 0.1)
        sae.threshold.copy_(torch.rand(F, generator=g).to(device) * 0.4)
    sae = sae.to(dtype)
    assert sae.threshold.dtype == torch.float32, "SAELens keeps the threshold in fp32"
    x = (torch.randn(B, D, generator=g) * 0.8).to(device=device, dtype=dtype)
    names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    coef = sae.cfg.l0_coefficient
    theirs = saelens_step(sae, x, l0=coef)
    their_grads = torch.autograd.grad(theirs.loss, [getattr(sae, n) for n in names])

    p = [getattr(sae, n).detach().clone().requires_grad_() for n in names]
    out = fs.jumprelu_sae_step(
        x, p[0].T, p[1], p[2], p[3], p[4], capacity=B * F, bandwidth=sae.cfg.jumprelu_bandwidth, l0_coefficient=coef
    )
    our_grads = torch.autograd.grad(out.loss, p)

    sae64 = saelens_training_sae("jumprelu", dtype="float64", **cfg)
    with torch.no_grad():
        for n in names:
            getattr(sae64, n).copy_(getattr(sae, n).double())
    sae64.threshold.data = sae64.threshold.data.double()  # SAELens pins it to fp32; fp64 here for the truth
    ref = saelens_step(sae64, x.double(), l0=coef)
    ref_grads = torch.autograd.grad(ref.loss, [getattr(sae64, n) for n in names])

    dense = out.code.to_dense(F)
    assert_saelens_latents(dense, theirs, ref, dtype)
    # SAELens rounds its pre-activations twice (matmul, then the bias add) where flash-sae's addmm rounds
    # once (and cuBLAS may sum in another order even in fp32), so the values are compared by the parity rule.
    assert_parity("saelens jumprelu feature_acts", dense, theirs.feature_acts, ref.feature_acts, dtype)
    assert_parity("saelens jumprelu loss", out.loss, theirs.loss, ref.loss, dtype)
    for name, a, b, c in zip(names, our_grads, their_grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype, f"d{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert_parity(f"saelens jumprelu d{name}", a, b, c, dtype)
