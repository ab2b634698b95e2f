"""batchtopk_sae_step: the exact whole-batch selection, loss, statistics and every gradient vs fp64;
ties, chunks and groups against the reference selection; and SAELens's own BatchTopK training SAE
(determinism, opcheck, compile, chunking, CUDA graphs and bad input: test_op_contract.py)."""

import pytest
import torch
from encoder_inputs import STEP_NAMES, make_sae, step_shapes, step_upstream, tuning
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_parity, fast_tier_keeps, grads, rel_err
from peers import assert_saelens_latents, require, saelens_step, saelens_training_sae


@st.composite
def batch_shapes(draw):
    """(B, D, F, k): step_shapes's, and k an int or a float (SAELens's k is a float)."""
    B, D, F = draw(step_shapes())
    k = draw(st.one_of(st.integers(1, min(F, 12)), st.floats(0.5, min(F, 12.0))))
    if int(k * B) < 1:
        k = 1
    return B, D, F, k


def check_selection(fs, x, W_enc, b_enc, W_dec, b_dec, k, rescale, out):
    """The code is exactly the reference's stable-sort selection of the same-dtype activations."""
    ref = fs.testing.reference
    with torch.no_grad():
        pre = ref.encoder_preacts(x, W_enc, b_enc, b_dec)
        acts = torch.relu(pre * W_dec.norm(dim=1) if rescale else pre)
        rows, ids = ref.batch_topk_select(acts, int(k * x.shape[0]))
    assert torch.equal(out.code.indices.cpu(), ids.cpu()), "selection differs from the reference tie rule"
    assert torch.equal(out.code.row_offsets.cpu(), ref.row_offsets_of(rows, x.shape[0]).cpu())
    assert torch.equal(out.code.vals.cpu(), torch.relu(pre[rows, ids]).cpu())
    picked = acts[rows, ids]
    expect_min = picked[picked > 0].min().float() if (picked > 0).any() else torch.tensor(float("inf"))
    assert torch.equal(out.min_act.cpu(), expect_min.cpu())
    return rows, ids


def check_batchtopk_step(fs, shape, dtype, device, *, rescale, seed, integer=False):
    B, D, F, k = shape
    params = list(make_sae(B, D, F, 1, dtype, device, seed=seed, integer=integer))
    out = fs.batchtopk_sae_step(*params, k, rescale_acts_by_decoder_norm=rescale)
    N = int(k * B)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert out.code.vals.shape == (N,) and out.code.indices.shape == (N,) and out.code.row_offsets.shape == (B + 1,)
    selection = check_selection(fs, *params, k, rescale, out)
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)

    ref = fs.testing.reference
    same = ref.batchtopk_sae_step(*params, k, rescale, selection=selection)
    same_grads = grads(same.loss, params, up.to(same.loss.dtype))
    p64 = [p.detach().double().requires_grad_() for p in params]
    r = ref.batchtopk_sae_step(*p64, k, rescale, selection=selection)
    r_grads = grads(r.loss, p64, up.double())
    # As in the TopK step's test: the GEMM's output rounding is shared by every same-dtype implementation
    # (ours decodes those very values), so torch's loss error is at least that shared rounding's.
    x64, W_dec64, b_dec64 = (t.detach().double() for t in (params[0], params[3], params[4]))
    rows, ids = selection
    shared = (
        torch.zeros_like(x64).index_add(0, rows, out.code.vals.double().unsqueeze(1) * W_dec64[ids]) + b_dec64 - x64
    )
    shared_loss = shared.pow(2).mean()
    loss_base = same.loss if rel_err(same.loss, r.loss) >= rel_err(shared_loss, r.loss) else shared_loss
    assert_parity("batchtopk loss", out.loss, loss_base, r.loss, dtype)
    if B > 1:
        shared_fvu = shared.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()
        fvu_base = same.fvu if rel_err(same.fvu, r.fvu) >= rel_err(shared_fvu, r.fvu) else shared_fvu
        assert_parity("batchtopk fvu", out.fvu, fvu_base, r.fvu, dtype)
    # Fire counts are of the same-dtype code (an entry fires when its value in the dtype is > 0; in fp64 a
    # pre-activation near 0 can have the other sign), so the same-dtype reference is the exact comparison.
    assert torch.equal(out.fire_counts, same.fire_counts)
    # Gradients carry that shared rounding too: torch's error for each is at least that of exact arithmetic
    # at the dtype-rounded x - b_dec and pre-activations (as in the TopK step's test).
    p_sh = [p.detach().double().requires_grad_() for p in params]
    sh = ref.batchtopk_sae_step(*p_sh, k, rescale, selection=selection, round_preacts=dtype)
    sh_grads = grads(sh.loss, p_sh, up.double())
    for name, a, b, c, d, p in zip(STEP_NAMES, ours, same_grads, r_grads, sh_grads, params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_parity(f"batchtopk d{name}", a, b if rel_err(b, c) >= rel_err(d, c) else d, c, dtype)


@given(shape=batch_shapes(), dtype=st.sampled_from(DTYPES), rescale=st.booleans(), seed=st.integers(0, 2**16))
# pinned: each dtype runs in every tier, whatever the draw
@example(shape=(3, 24, 40, 5), dtype=torch.float32, rescale=True, seed=1)
@example(shape=(4, 33, 110, 2.5), dtype=torch.bfloat16, rescale=False, seed=2)
@example(shape=(2, 17, 9, 3), dtype=torch.float16, rescale=True, seed=3)
def test_batchtopk_sae_step_parity(fs, device, shape, dtype, rescale, seed):
    check_batchtopk_step(fs, shape, dtype, device, rescale=rescale, seed=seed)


@pytest.mark.parametrize("dtype", fast_tier_keeps(1, DTYPES))
@pytest.mark.parametrize("B,D,F,k", [(6, 5, 300, 7), (3, 4, 2000, 2.5), (4, 3, 50, 50), (5, 2, 700, 1)])
def test_batchtopk_ties(fs, device, dtype, B, D, F, k):
    """Exactly tied activations (small integers; most are relu'd to 0): the lower flat position wins."""
    check_batchtopk_step(fs, (B, D, F, k), dtype, device, rescale=False, seed=B * F, integer=True)


@pytest.mark.parametrize("dtype", fast_tier_keeps(1, DTYPES))
@pytest.mark.parametrize("integer", [False, True], ids=["distinct", "tied"])
def test_batchtopk_groups_and_chunks(fs, device, dtype, integer, monkeypatch):
    """Group sizes, partial groups and many F chunks (each chunk's top N, merged by value then flat
    position): the code must not change."""
    B, D, F, k = 3, 5, 2500, 33
    params = make_sae(B, D, F, 1, dtype, device, seed=7, integer=integer)
    for group, groups, chunk_bytes in ((1, 64, 2**30), (4, 16, 2500), (32, 64, 3000), (128, 2, 2**30)):
        monkeypatch.setitem(tuning(fs), "select_group", group)
        monkeypatch.setitem(tuning(fs), "select_groups", groups)
        monkeypatch.setitem(tuning(fs), "chunk_bytes", chunk_bytes)
        for rescale in (False, True):
            out = fs.batchtopk_sae_step(*params, k, rescale_acts_by_decoder_norm=rescale)
            check_selection(fs, *params, k, rescale, out)


@pytest.mark.kernels_ci
def test_batchtopk_rows_get_different_counts(fs, device):
    """One row with large activations takes most of the batch's budget; a row can get none."""
    params = [t.detach() for t in make_sae(4, 8, 30, 1, torch.float32, device, seed=3)]
    params[0][1] *= 20
    params[0][3] = -100  # far from everything: relu'd to zero mostly
    out = fs.batchtopk_sae_step(*params, 4)
    counts = out.code.row_offsets.diff()
    assert int(counts.sum()) == 16 and int(counts.max()) > 4 and int(counts.min()) < 4


# SAELens's own BatchTopK training SAE, default training config ------------------------------


def _saelens_problem(dtype, device, B, D, F, k, seed, architecture="batchtopk", extra=None):
    """SAELens's training SAE (default config, plus ``extra``) with drawn values, and x."""
    sae = saelens_training_sae(architecture, dtype="float32", device=device, d_in=D, d_sae=F, k=k, **(extra or {}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the tied init, decoder rows of varied norm (the rescaling matters)
        sae.W_dec.mul_(torch.rand(F, 1, generator=g).to(device) * 2 + 0.5)
        sae.W_enc.copy_(torch.randn(D, F, generator=g).to(device) / D**0.5)
        sae.b_enc.copy_(torch.randn(F, generator=g).to(device) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=g).to(device) * 0.1)
    sae = sae.to(dtype)
    x = (torch.randn(B, D, generator=g) * 0.8).to(device=device, dtype=dtype)
    return sae, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batchtopk_matches_saelens(fs, device, dtype):
    """Same parameters and inputs: SAELens's loss (MSE summed over d_in, mean over the batch: D x ours),
    code and every gradient, by the parity rule against SAELens in fp64; its threshold update too."""
    B, D, F, k = 8, 24, 64, 5.5
    sae, x = _saelens_problem(dtype, device, B, D, F, k, seed=11)
    assert sae.cfg.rescale_acts_by_decoder_norm, "SAELens's default rescales by the decoder norm"
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    theirs = saelens_step(sae, x)
    assert set(theirs.losses) == {"mse_loss", "auxiliary_reconstruction_loss"}
    their_grads = torch.autograd.grad(theirs.loss, [getattr(sae, n) for n in names])
    their_threshold = sae.topk_threshold.clone()

    params = [getattr(sae, n).detach().clone().requires_grad_() for n in names]
    W_enc_t = params[0]
    out = fs.batchtopk_sae_step(x, W_enc_t.T, params[1], params[2], params[3], k, rescale_acts_by_decoder_norm=True)
    ours = D * out.loss
    our_grads = torch.autograd.grad(ours, params)

    # SAELens in fp64 on the same values: the ground truth; ties have probability ~0 in this draw.
    sae64 = saelens_training_sae("batchtopk", d_in=D, d_sae=F, k=k, dtype="float64", device=device)
    with torch.no_grad():
        for n in names:
            getattr(sae64, n).copy_(getattr(sae, n).double())
    ref = saelens_step(sae64, x.double())
    ref_grads = torch.autograd.grad(ref.loss, [getattr(sae64, n) for n in names])
    code = out.code.to_dense(F)
    assert_saelens_latents(code, theirs, ref, dtype)
    assert_parity("saelens batchtopk loss", ours, theirs.loss, ref.loss, dtype)
    scaled = code * sae.W_dec.norm(dim=1)  # SAELens's feature_acts are the rescaled activations
    assert_parity("saelens batchtopk feature_acts", scaled, theirs.feature_acts, ref.feature_acts, dtype)
    for n, a, b, c in zip(names, our_grads, their_grads, ref_grads):
        assert a.shape == b.shape, f"d{n} has the wrong layout"
        assert_parity(f"saelens batchtopk d{n}", a, b, c, dtype)
    # SAELens's threshold after one step: 0.99 * 0 + 0.01 * (smallest positive rescaled activation).
    lr = sae.cfg.topk_threshold_lr
    expect = lr * out.min_act.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # SAELens's buffer takes the SAE's dtype under .to(dtype)
    torch.testing.assert_close(their_threshold.double(), expect, rtol=tol, atol=0)


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_saelens_default_adds_auxk_once_latents_die(fs, device, architecture):
    """SAELens's default BatchTopK and Matryoshka training configs carry aux_loss_coefficient 1.0, and with
    a dead-latent mask their loss gains an AuxK term. Without a mask the term is 0, which is what the parity
    tests above compare; ``test_dead_latent_peers.py`` compares the term with flash-sae's AuxK (BatchTopK;
    the Matryoshka steps have no dead-latent loss yet, as the README states)."""
    TrainStepInput = require("sae_lens.saes.sae").TrainStepInput
    B, D, F, k = 8, 24, 64, 5.5
    extra = {"matryoshka_widths": [16, 64]} if architecture == "matryoshka_batchtopk" else None
    sae, x = _saelens_problem(torch.float32, device, B, D, F, k, seed=3, architecture=architecture, extra=extra)
    assert sae.cfg.aux_loss_coefficient == 1.0
    assert float(saelens_step(sae, x).losses["auxiliary_reconstruction_loss"]) == 0.0
    dead = torch.zeros(F, dtype=torch.bool, device=device)
    dead[F // 2 :] = True
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
    assert float(sae.training_forward_pass(step).losses["auxiliary_reconstruction_loss"]) > 0.0
