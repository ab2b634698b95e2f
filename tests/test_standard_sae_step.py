"""standard_sae_step (ReLU code, MSE + the decoder-norm-weighted L1 penalty): the collected code, loss,
L1, statistics and every gradient vs fp64; capacity and overflow; zero decoder rows; and SAELens's own
standard training SAE with its default config (determinism, opcheck, compile, chunking, CUDA graphs and
bad input: test_op_contract.py)."""

import pytest
import torch
from encoder_inputs import STEP_NAMES, make_sae, step_shapes, step_upstream
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_gradient_parity, assert_parity, grads, torch_baseline
from peers import assert_saelens_latents, saelens_fp64_step, saelens_step, saelens_training_sae


def active_mask(fs, params):
    """The same-dtype active entries (z > 0), from the reference's pre-activations."""
    x, W_enc, b_enc, _, b_dec = params
    with torch.no_grad():
        return fs.testing.reference.encoder_preacts(x, W_enc, b_enc, b_dec) > 0


def dense_code(out, B, F):
    rows = torch.repeat_interleave(torch.arange(B, device=out.code.vals.device), out.code.row_offsets.diff())
    n = int(out.code.row_offsets[-1])
    return out.code.to_dense(F), rows, n


def check_standard_step(fs, shape, dtype, device, *, seed, l1_coefficient, zero_rows=0):
    B, D, F = shape
    params = list(make_sae(B, D, F, 1, dtype, device, seed=seed))
    if zero_rows:
        with torch.no_grad():
            params[3][:zero_rows] = 0
    active = active_mask(fs, params)
    need = int(active.sum())
    cap = min(need + 3, B * F)
    out = fs.standard_sae_step(*params, capacity=max(cap, 1), l1_coefficient=l1_coefficient)
    assert int(out.count) == need and not bool(out.overflow)
    dense, rows, n = dense_code(out, B, F)
    assert n == need and (out.code.indices[n:] == -1).all() and (out.code.vals[n:] == 0).all()
    assert torch.equal(dense != 0, active), "the collected entries differ from z > 0"
    assert torch.equal(torch.sort(rows * F + out.code.indices[:n]).values, rows * F + out.code.indices[:n]), (
        "not row-major"
    )
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)

    ref = fs.testing.reference
    same = ref.standard_sae_step(*params, l1_coefficient=l1_coefficient, active=active)
    assert torch.equal(dense, same.code.vals.detach()), "code values differ from relu(z)"
    same_grads = grads(same.loss, params, up.to(same.loss.dtype))
    p64 = [p.detach().double().requires_grad_() for p in params]
    r = ref.standard_sae_step(*p64, l1_coefficient=l1_coefficient, active=active)
    r_grads = grads(r.loss, p64, up.double())
    # x - b_dec and z are rounded by every same-dtype implementation: exact arithmetic at those
    # roundings is a second measure of the error they alone cause (as the other steps' tests use).
    p_sh = [p.detach().double().requires_grad_() for p in params]
    sh = ref.standard_sae_step(*p_sh, l1_coefficient=l1_coefficient, active=active, round_preacts=dtype)
    sh_grads = grads(sh.loss, p_sh, up.double())

    for what in ("loss", "mse", "l1"):
        b, c, d = getattr(same, what), getattr(r, what), getattr(sh, what)
        assert_parity(f"standard {what}", getattr(out, what), torch_baseline(b, c, d.detach()), c, dtype)
    if B > 1:
        assert_parity("standard fvu", out.fvu, torch_baseline(same.fvu, r.fvu, sh.fvu), r.fvu, dtype)
    assert out.l0.item() == pytest.approx(need / B, rel=1e-6)
    assert torch.equal(out.fire_counts, active.sum(0))
    assert_gradient_parity("standard", STEP_NAMES, ours, same_grads, r_grads, sh_grads, params, dtype)


@given(
    shape=step_shapes(),
    dtype=st.sampled_from(DTYPES),
    l1_coefficient=st.sampled_from([0.0, 0.05, 1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
@example(shape=(4, 4, 2), dtype=torch.float16, l1_coefficient=0.05, seed=4)  # a GPU draw: dW_dec's one rounding
@example(shape=(8, 16, 1), dtype=torch.float16, l1_coefficient=0.0, seed=16)  # a GPU draw: z's fp16 rounding
@example(shape=(2, 1, 1), dtype=torch.bfloat16, l1_coefficient=0.0, seed=1049)  # a GPU draw: fvu of one column
# pinned, with the example(s) above: each dtype runs in every tier, whatever the draw
@example(shape=(3, 24, 40), dtype=torch.float32, l1_coefficient=1.0, seed=1)
def test_standard_sae_step_parity(fs, device, shape, dtype, l1_coefficient, seed):
    check_standard_step(fs, shape, dtype, device, seed=seed, l1_coefficient=l1_coefficient)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7, 5), (6, 19, 37), (8, 33, 150)])
def test_standard_dense_formulation(fs, device, dtype, shape):
    """standard_sae_step_dense (the module's path while the code is dense): loss, statistics and every
    gradient vs fp64 by the parity rule, as the sparse step."""
    B, D, F = shape
    params = list(make_sae(B, D, F, 1, dtype, device, seed=B + F))
    active = active_mask(fs, params)
    out = fs.standard_sae_step_dense(*params, l1_coefficient=0.4)
    assert out.code is None and not bool(out.overflow) and int(out.count) == int(active.sum())
    assert torch.equal(out.fire_counts, active.sum(0))
    up = step_upstream(7).to(device)
    ours = grads(out.loss, params, up)
    same = fs.testing.reference.standard_sae_step(*params, l1_coefficient=0.4, active=active)
    same_grads = grads(same.loss, params, up.to(same.loss.dtype))
    p64 = [p.detach().double().requires_grad_() for p in params]
    r = fs.testing.reference.standard_sae_step(*p64, l1_coefficient=0.4, active=active)
    r_grads = grads(r.loss, p64, up.double())
    assert_parity("dense standard loss", out.loss, same.loss, r.loss, dtype)
    assert_parity("dense standard mse", out.mse, same.mse, r.mse, dtype)
    assert_parity("dense standard l1", out.l1, same.l1, r.l1, dtype)
    if B > 1:
        assert_parity("dense standard fvu", out.fvu, same.fvu, r.fvu, dtype)
    assert out.l0.item() == pytest.approx(float(active.sum()) / B, rel=1e-6)
    for name, a, b, c, p in zip(STEP_NAMES, ours, same_grads, r_grads, params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_parity(f"dense standard d{name}", a, b, c, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_standard_zero_decoder_rows(fs, device, dtype):
    """A zero decoder row has no norm gradient (torch's norm gives 0 there): finite, and by the rule."""
    check_standard_step(fs, (5, 11, 30), dtype, device, seed=4, l1_coefficient=1.0, zero_rows=3)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_standard_empty_code(fs, device, dense):
    """No active entry: the code is empty, the loss is the MSE of b_dec alone, and only x, b_dec (and
    nothing through the code) get gradients; the encoder's and W_dec's are exactly zero."""
    params = list(make_sae(3, 7, 5, 1, torch.float32, device, seed=8))
    with torch.no_grad():
        params[2].fill_(-100.0)
    kw = dict(l1_coefficient=0.5)
    out = fs.standard_sae_step_dense(*params, **kw) if dense else fs.standard_sae_step(*params, capacity=1, **kw)
    assert int(out.count) == 0 and float(out.l1) == 0.0 and not bool(out.overflow)
    x, b_dec = params[0], params[4]
    expect = (b_dec.detach() - x.detach()).pow(2).sum(1).mean()
    torch.testing.assert_close(out.loss, expect, rtol=1e-6, atol=0)
    dx, dW_enc, db_enc, dW_dec, db_dec = grads(out.loss, params, torch.tensor(1.0, device=device))
    assert not dW_enc.any() and not db_enc.any() and not dW_dec.any()
    torch.testing.assert_close(db_dec, 2 * (b_dec - x).detach().sum(0) / 3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, -2 * (b_dec - x).detach() / 3, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels_ci
def test_standard_overflow_is_reported(fs, device):
    params = [t.detach() for t in make_sae(5, 9, 30, 1, torch.float32, device, seed=4)]
    need = int(active_mask(fs, params).sum())
    small = fs.standard_sae_step(*params, capacity=need - 3)
    assert bool(small.overflow) and int(small.count) == need and int(small.code.row_offsets[-1]) == need - 3
    exact = fs.standard_sae_step(*params, capacity=need)
    assert not bool(exact.overflow) and int(exact.code.row_offsets[-1]) == need


# SAELens's own standard training SAE, default training config --------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_standard_matches_saelens(fs, device, dtype):
    """Same parameters and inputs: SAELens's total loss (MSE summed over d_in + l1_coefficient * its
    decoder-norm-weighted L1), its code and every gradient, by the parity rule against SAELens in fp64."""
    B, D, F = 8, 24, 64
    g = torch.Generator().manual_seed(17)
    cfg = dict(d_in=D, d_sae=F, device=device)
    sae = saelens_training_sae("standard", dtype="float32", **cfg)
    assert sae.cfg.lp_norm == 1.0 and sae.cfg.l1_coefficient == 1.0 and sae.cfg.apply_b_dec_to_input
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=g).to(device) / D**0.5)
        sae.b_enc.copy_(torch.randn(F, generator=g).to(device) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=g).to(device) * 0.1)
        sae.W_dec.mul_(torch.rand(F, 1, generator=g).to(device) * 2 + 0.5)  # varied row norms
    sae = sae.to(dtype)
    x = (torch.randn(B, D, generator=g) * 0.8).to(device=device, dtype=dtype)
    names = STEP_NAMES[1:]
    coef = sae.cfg.l1_coefficient
    theirs = saelens_step(sae, x, l1=coef)
    assert set(theirs.losses) == {"mse_loss", "l1_loss"}
    their_grads = torch.autograd.grad(theirs.loss, [getattr(sae, n) for n in names])

    p = [getattr(sae, n).detach().clone().requires_grad_() for n in names]
    out = fs.standard_sae_step(x, p[0].T, p[1], p[2], p[3], capacity=B * F, l1_coefficient=coef)
    our_grads = torch.autograd.grad(out.loss, p)

    ref, ref_grads = saelens_fp64_step("standard", sae, x, names, cfg, l1=coef)

    dense, _, _ = dense_code(out, B, F)
    assert_saelens_latents(dense, theirs, ref, dtype)
    assert_parity("saelens standard feature_acts", dense, theirs.feature_acts, ref.feature_acts, dtype)
    assert_parity("saelens standard loss", out.loss, theirs.loss, ref.loss, dtype)
    assert_parity("saelens standard l1", coef * out.l1, theirs.losses["l1_loss"], ref.losses["l1_loss"], dtype)
    for name, a, b, c in zip(names, our_grads, their_grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype, f"d{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert_parity(f"saelens standard d{name}", a, b, c, dtype)
