"""gated_sae_step (gate and magnitude paths over one encoder, MSE + the gate's decoder-norm-weighted L1 +
the gate path's auxiliary reconstruction): the code, the losses, the statistics and every gradient vs
fp64, frozen and shared auxiliary decoder; the dense formulation; capacity and overflow; and SAELens's
own gated training SAE with its default config (determinism, opcheck, compile, chunking, CUDA graphs and
bad input: test_op_contract.py)."""

import pytest
import torch
from encoder_inputs import make_sae, step_shapes, step_upstream
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_gradient_parity, assert_parity, grads, torch_baseline
from peers import saelens_fp64_step, saelens_step, saelens_training_sae

NAMES = ("x", "W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")


def make_gated(B, D, F, dtype, device, *, seed, zero_rows=0):
    """x and the six parameters (requires_grad): make_sae's, with b_gate = b_enc and r_mag, b_mag drawn;
    the first ``zero_rows`` decoder rows zero."""
    x, W_enc, b_enc, W_dec, b_dec = make_sae(B, D, F, 1, dtype, device, seed=seed)
    if zero_rows:
        with torch.no_grad():
            W_dec[:zero_rows] = 0
    g = torch.Generator().manual_seed(seed + 7)
    r_mag = (torch.randn(F, generator=g) * 0.3).to(device=device, dtype=dtype).requires_grad_()
    b_mag = (torch.randn(F, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_()
    return [x, W_enc, b_enc, r_mag, b_mag, W_dec, b_dec]


def dense_code(out, B, F):
    rows = torch.repeat_interleave(torch.arange(B, device=out.code.indices.device), out.code.row_offsets.diff())
    n = int(out.code.row_offsets[-1])
    dense = out.code.to_dense(F)
    opened = torch.zeros(B, F, device=out.code.vals.device, dtype=torch.bool)
    opened[rows, out.code.indices[:n]] = True
    return dense, opened, n


def check_gated_step(fs, shape, dtype, device, *, seed, l1_coefficient, freeze, dense=False, zero_rows=0):
    B, D, F = shape
    params = make_gated(B, D, F, dtype, device, seed=seed, zero_rows=zero_rows)
    ref = fs.testing.reference
    kw = dict(l1_coefficient=l1_coefficient, freeze_aux_decoder=freeze)
    if dense:
        out = fs.gated_sae_step_dense(*params, **kw)
        assert out.code is None and not bool(out.overflow)
    else:
        out = fs.gated_sae_step(*params, capacity=B * F, **kw)
        assert not bool(out.overflow)
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)
    if dense:  # pi_gate and pi_mag as the dense step rounds them: one fp32 product, one rounding each
        x, W_enc, b_gate, r_mag, b_mag, _, b_dec = [p.detach() for p in params]
        P = (x - b_dec).float() @ W_enc.float().T
        masks = ((P + b_gate.float()).to(dtype) > 0, (P * r_mag.float().exp() + b_mag.float()).to(dtype) > 0)
    else:
        code, opened, n = dense_code(out, B, F)
        assert int(out.count) == n and (out.code.indices[n:] == -1).all() and (out.code.vals[n:] == 0).all()
        ids = out.code.indices[:n]
        rows = torch.repeat_interleave(torch.arange(B, device=device), out.code.row_offsets.diff())
        assert torch.equal(torch.sort(rows * F + ids).values, rows * F + ids), "not row-major"
        masks = (opened, code > 0)
        # the gates are pi_gate > 0 in the dtype, as the same-dtype product gives them
        xc = (params[0] - params[6]).detach()
        same_open = torch.addmm(params[2].detach(), xc, params[1].detach().T) > 0
        assert torch.equal(opened, same_open), "other open gates than pi_gate > 0"
        # f > 0 where pi_mag > 0: pi_mag from xc rounded to the dtype (as the step rounds it), in fp64; a
        # sign is settled where |pi_mag| exceeds what an fp32 dot's summation order can move
        x, W_enc, _, r_mag, b_mag, _, b_dec = [p.detach().double() for p in params]
        xc = (params[0] - params[6]).detach().double()
        mag64 = (xc @ W_enc.T) * r_mag.exp() + b_mag
        slack = 1e-5 * (xc.abs() @ W_enc.abs().T) * r_mag.exp() + 1e-30
        settled = opened & (mag64.abs() > slack)
        assert torch.equal((code > 0)[settled], (mag64 > 0)[settled]), "other magnitudes > 0 than pi_mag > 0"
    assert int(out.count) == int(masks[0].sum())
    assert torch.equal(out.fire_counts, (masks[0] & masks[1]).sum(0))

    same = ref.gated_sae_step(*params, l1_coefficient, freeze, masks=masks)
    same_grads = grads(same.loss, params, up.to(same.loss.dtype))
    p64 = [p.detach().double().requires_grad_() for p in params]
    r = ref.gated_sae_step(*p64, l1_coefficient, freeze, masks=masks)
    r_grads = grads(r.loss, p64, up.double())
    p_sh = [p.detach().double().requires_grad_() for p in params]
    sh = ref.gated_sae_step(*p_sh, l1_coefficient, freeze, masks=masks, round_preacts=dtype)
    sh_grads = grads(sh.loss, p_sh, up.double())

    if not dense:
        assert_parity(
            "gated code",
            code,
            torch_baseline(same.code.vals.detach(), r.code.vals.detach(), sh.code.vals.detach()),
            r.code.vals,
            dtype,
        )
    for what in ("loss", "mse", "l1", "aux"):
        b, c, d = getattr(same, what), getattr(r, what), getattr(sh, what)
        assert_parity(f"gated {what}", getattr(out, what), torch_baseline(b, c, d.detach()), c, dtype)
    if B > 1:
        assert_parity("gated fvu", out.fvu, torch_baseline(same.fvu, r.fvu, sh.fvu), r.fvu, dtype)
    assert out.l0.item() == pytest.approx(float(r.l0), rel=1e-6)
    assert_gradient_parity("gated", NAMES, ours, same_grads, r_grads, sh_grads, params, dtype)


@given(
    shape=step_shapes(),
    dtype=st.sampled_from(DTYPES),
    l1_coefficient=st.sampled_from([0.0, 0.05, 1.0, 5.0]),
    freeze=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(shape=(2, 255, 2), dtype=torch.bfloat16, l1_coefficient=0.0, freeze=False, seed=0)  # a GPU draw: the gate's
# same-dtype rounding (nn.Linear's one rounding, not the product's and the bias's two)
# pinned, with the example(s) above: each dtype runs in every tier, whatever the draw
@example(shape=(3, 24, 40), dtype=torch.float32, l1_coefficient=1.0, freeze=True, seed=1)
@example(shape=(2, 17, 9), dtype=torch.float16, l1_coefficient=5.0, freeze=False, seed=3)
def test_gated_sae_step_parity(fs, device, shape, dtype, l1_coefficient, freeze, seed):
    check_gated_step(fs, shape, dtype, device, seed=seed, l1_coefficient=l1_coefficient, freeze=freeze)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "shared"])
@pytest.mark.parametrize("shape", [(1, 7, 5), (6, 19, 37), (8, 33, 150)])
def test_gated_dense_formulation(fs, device, dtype, freeze, shape):
    """gated_sae_step_dense (the module's path while most gates are open): by the parity rule, as the sparse step."""
    check_gated_step(fs, shape, dtype, device, seed=sum(shape), l1_coefficient=0.4, freeze=freeze, dense=True)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_gated_frozen_aux_decoder(fs, device, dense):
    """Frozen or shared, the losses and every gradient but the decoder's are the same; the decoder's differ
    by exactly the auxiliary loss's gradient through W_dec and b_dec."""
    params = make_gated(6, 13, 40, torch.float32, device, seed=3)
    kw = dict(l1_coefficient=0.3)
    step = (lambda **k: fs.gated_sae_step_dense(*params, **k)) if dense else (
        lambda **k: fs.gated_sae_step(*params, capacity=240, **k)
    )  # fmt: skip
    frozen, shared = step(freeze_aux_decoder=True, **kw), step(freeze_aux_decoder=False, **kw)
    assert torch.equal(frozen.loss, shared.loss) and torch.equal(frozen.aux, shared.aux)
    up = torch.tensor(1.0, device=device)
    g_frozen, g_shared = grads(frozen.loss, params, up), grads(shared.loss, params, up)
    for name, a, b in zip(NAMES[:5], g_frozen, g_shared):
        assert torch.equal(a, b), f"d{name} depends on freeze_aux_decoder"
    x, W_enc, b_gate, *_ = params
    W_dec, b_dec = (t.detach().clone().requires_grad_() for t in params[5:])
    a = torch.relu(torch.addmm(b_gate, x - params[6], W_enc.T)).detach()
    aux = (a @ W_dec + b_dec - x.detach()).pow(2).sum(-1).mean()
    d_aux = torch.autograd.grad(aux, [W_dec, b_dec])
    for i, d in zip((5, 6), d_aux):
        torch.testing.assert_close(g_shared[i] - g_frozen[i], d, rtol=1e-4, atol=1e-6)
    assert d_aux[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_gated_zero_decoder_rows(fs, device, dtype, dense):
    """A zero decoder row has no norm gradient (torch's norm gives 0 there): finite, and by the rule."""
    check_gated_step(fs, (5, 11, 30), dtype, device, seed=4, l1_coefficient=1.0, freeze=False, dense=dense, zero_rows=3)


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "shared"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_gated_empty_code(fs, device, dense, freeze):
    """No open gate: the losses are b_dec's MSE twice (the reconstruction and the auxiliary one), the
    penalty 0, and only x and b_dec get gradients (b_dec the auxiliary loss's only if it is not frozen)."""
    params = make_gated(3, 7, 5, torch.float32, device, seed=8)
    with torch.no_grad():
        params[2].fill_(-100.0)
    kw = dict(l1_coefficient=0.5, freeze_aux_decoder=freeze)
    out = fs.gated_sae_step_dense(*params, **kw) if dense else fs.gated_sae_step(*params, capacity=1, **kw)
    assert int(out.count) == 0 and float(out.l1) == 0.0 and float(out.l0) == 0.0 and not bool(out.overflow)
    x, b_dec = params[0].detach(), params[6].detach()
    expect = (b_dec - x).pow(2).sum(1).mean()
    torch.testing.assert_close(out.loss, 2 * expect, rtol=1e-6, atol=0)
    g = grads(out.loss, params, torch.tensor(1.0, device=device))
    for name, d in zip(NAMES[1:6], g[1:6]):
        assert not d.any(), f"d{name} should be zero"
    aux_share = 1 if freeze else 2  # frozen: b_dec gets the reconstruction's gradient only
    torch.testing.assert_close(g[6], 2 * aux_share * (b_dec - x).sum(0) / 3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[0], -4 * (b_dec - x) / 3, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels_ci
def test_gated_overflow_is_reported(fs, device):
    params = [t.detach() for t in make_gated(5, 9, 30, torch.float32, device, seed=4)]
    need = int(fs.testing.reference.gated_sae_step(*params).count)
    small = fs.gated_sae_step(*params, capacity=need - 3)
    assert bool(small.overflow) and int(small.count) == need and int(small.code.row_offsets[-1]) == need - 3
    exact = fs.gated_sae_step(*params, capacity=need)
    assert not bool(exact.overflow) and int(exact.code.row_offsets[-1]) == need


# SAELens's own gated training SAE, default training config --------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_gated_matches_saelens(fs, device, dtype, dense):
    """Same parameters and inputs: SAELens's total loss (MSE + its gate L1 + its auxiliary reconstruction
    loss), its code and every gradient, by the parity rule against SAELens in fp64. SAELens lets the
    auxiliary loss train the decoder: ``freeze_aux_decoder=False`` is its rule."""
    B, D, F = 8, 24, 64
    g = torch.Generator().manual_seed(23)
    cfg = dict(d_in=D, d_sae=F, device=device)
    sae = saelens_training_sae("gated", dtype="float32", **cfg)
    assert sae.cfg.l1_coefficient == 1.0 and sae.cfg.apply_b_dec_to_input
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=g).to(device) / D**0.5)
        sae.b_gate.copy_(torch.randn(F, generator=g).to(device) * 0.1)
        sae.r_mag.copy_(torch.randn(F, generator=g).to(device) * 0.3)
        sae.b_mag.copy_(torch.randn(F, generator=g).to(device) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=g).to(device) * 0.1)
        sae.W_dec.mul_(torch.rand(F, 1, generator=g).to(device) * 2 + 0.5)
    sae = sae.to(dtype)
    x = (torch.randn(B, D, generator=g) * 0.8).to(device=device, dtype=dtype)
    names = ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")
    coef = sae.cfg.l1_coefficient
    theirs = saelens_step(sae, x, l1=coef)
    assert set(theirs.losses) == {"mse_loss", "l1_loss", "auxiliary_reconstruction_loss"}
    their_grads = torch.autograd.grad(theirs.loss, [getattr(sae, n) for n in names])

    p = [getattr(sae, n).detach().clone().requires_grad_() for n in names]
    ours = [p[0].T, *p[1:]]
    kw = dict(l1_coefficient=coef, freeze_aux_decoder=False)
    out = fs.gated_sae_step_dense(x, *ours, **kw) if dense else fs.gated_sae_step(x, *ours, capacity=B * F, **kw)
    our_grads = torch.autograd.grad(out.loss, p)

    ref, ref_grads = saelens_fp64_step("gated", sae, x, names, cfg, l1=coef)

    assert_parity("saelens gated loss", out.loss, theirs.loss, ref.loss, dtype)
    assert_parity("saelens gated l1", coef * out.l1, theirs.losses["l1_loss"], ref.losses["l1_loss"], dtype)
    aux_ref = ref.losses["auxiliary_reconstruction_loss"]
    assert_parity("saelens gated aux", out.aux, theirs.losses["auxiliary_reconstruction_loss"], aux_ref, dtype)
    if not dense:
        code, _, _ = dense_code(out, B, F)
        if dtype == torch.float32:
            assert torch.equal(code != 0, ref.feature_acts != 0), "other active latents than SAELens's in fp64"
        assert_parity("saelens gated feature_acts", code, theirs.feature_acts, ref.feature_acts, dtype)
    for name, a, b, c in zip(names, our_grads, their_grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype, f"d{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert_parity(f"saelens gated d{name}", a, b, c, dtype)
