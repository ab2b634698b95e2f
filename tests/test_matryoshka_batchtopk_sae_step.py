"""matryoshka_batchtopk_sae_step: every prefix level's loss and every gradient vs fp64 at the same
BatchTopK code; one level equals batchtopk_sae_step; prefix-size messages; SAELens's own Matryoshka
BatchTopK training SAE with its default config (the contract checks: test_op_contract.py)."""

import pytest
import torch
from encoder_inputs import STEP_NAMES, make_sae, step_upstream
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_gradient_parity, assert_parity, grads, torch_baseline
from peers import saelens_step, saelens_training_sae
from test_batchtopk_sae_step import _saelens_problem, batch_shapes, check_selection


@st.composite
def matryoshka_problems(draw):
    B, D, F, k = draw(batch_shapes())
    inner = sorted(draw(st.sets(st.integers(1, F - 1), max_size=min(4, F - 1)))) if F > 1 else []
    return (B, D, F, k), inner + [F]


def check_matryoshka(fs, shape, sizes, dtype, device, *, rescale, seed):
    B, D, F, k = shape
    params = list(make_sae(B, D, F, 1, dtype, device, seed=seed))
    out = fs.matryoshka_batchtopk_sae_step(*params, k, sizes, rescale_acts_by_decoder_norm=rescale)
    assert out.level_losses.shape == (len(sizes),) and out.loss.dtype == torch.float32
    selection = check_selection(fs, *params, k, rescale, out)
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)
    ref = fs.testing.reference
    same = ref.matryoshka_batchtopk_sae_step(*params, k, sizes, rescale, selection=selection)
    same_grads = grads(same.loss, params, up.to(same.loss.dtype))
    p64 = [p.detach().double().requires_grad_() for p in params]
    r = ref.matryoshka_batchtopk_sae_step(*p64, k, sizes, rescale, selection=selection)
    r_grads = grads(r.loss, p64, up.double())
    # The rounding of x - b_dec and of the pre-activations is shared by every same-dtype implementation:
    # torch's error is at least that of exact arithmetic at those roundings (as in the TopK step's test).
    p_sh = [p.detach().double().requires_grad_() for p in params]
    sh = ref.matryoshka_batchtopk_sae_step(*p_sh, k, sizes, rescale, selection=selection, round_preacts=dtype)
    sh_grads = grads(sh.loss, p_sh, up.double())

    for g in range(len(sizes)):
        lvl = (same.level_losses[g], r.level_losses[g], sh.level_losses[g])
        assert_parity(f"matryoshka level {g} loss", out.level_losses[g], torch_baseline(*lvl), r.level_losses[g], dtype)
    assert_parity("matryoshka loss", out.loss, torch_baseline(same.loss, r.loss, sh.loss), r.loss, dtype)
    assert_gradient_parity("matryoshka", STEP_NAMES, ours, same_grads, r_grads, sh_grads, params, dtype)


@given(problem=matryoshka_problems(), dtype=st.sampled_from(DTYPES), rescale=st.booleans(), seed=st.integers(0, 2**16))
@example(problem=((6, 1, 1, 1), [1]), dtype=torch.bfloat16, rescale=False, seed=6)  # D = 1: the shared rounding
# pinned, with the example(s) above: each dtype runs in every tier, whatever the draw
@example(problem=((3, 24, 40, 5), [8, 20, 40]), dtype=torch.float32, rescale=True, seed=1)
@example(problem=((2, 17, 9, 3), [4, 9]), dtype=torch.float16, rescale=True, seed=3)
def test_matryoshka_parity(fs, device, problem, dtype, rescale, seed):
    shape, sizes = problem
    check_matryoshka(fs, shape, sizes, dtype, device, rescale=rescale, seed=seed)


@pytest.mark.kernels_ci
def test_matryoshka_one_level_is_batchtopk(fs, device):
    """With the single size F the step is the BatchTopK step: the same code, loss and gradients, bitwise."""
    params = list(make_sae(6, 19, 50, 1, torch.float32, device, seed=4))
    a = fs.matryoshka_batchtopk_sae_step(*params, 5, [50], rescale_acts_by_decoder_norm=True)
    b = fs.batchtopk_sae_step(*params, 5, rescale_acts_by_decoder_norm=True)
    assert torch.equal(a.code.indices, b.code.indices) and torch.equal(a.loss, b.loss)
    up = torch.tensor(0.9, device=device)
    for x, y in zip(grads(a.loss, params, up), grads(b.loss, params, up)):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "sizes,match",
    [
        ([], "non-empty"),
        ((4, 4, 13), "strictly increasing"),
        ([5, 3, 13], "strictly increasing"),
        ([0, 13], "positive ints"),
        ([4, 12], "must end at F=13"),
        ([4, 14], "must end at F=13"),
        ("13", "non-empty list"),
        ([4.0, 13], "positive ints"),
    ],
)
def test_matryoshka_rejects(fs, device, sizes, match):
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(*s, generator=g).to(device) for s in ((4, 9), (13, 9), (13,), (13, 9), (9,))]
    with pytest.raises(ValueError, match=match):
        fs.matryoshka_batchtopk_sae_step(*args, 3, sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matryoshka_matches_saelens(fs, device, dtype):
    """SAELens's MatryoshkaBatchTopKTrainingSAE (default config, these widths): its total loss (the sum of
    every level's MSE summed over d_in: D x ours) and every gradient, by the parity rule against fp64."""
    B, D, F, k = 8, 24, 64, 5.5
    widths = [8, 24, 64]
    extra = dict(matryoshka_widths=list(widths))
    sae, x = _saelens_problem(dtype, device, B, D, F, k, seed=17, architecture="matryoshka_batchtopk", extra=extra)
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    theirs = saelens_step(sae, x)
    their_grads = torch.autograd.grad(theirs.loss, [getattr(sae, n) for n in names])
    p = [getattr(sae, n).detach().clone().requires_grad_() for n in names]
    out = fs.matryoshka_batchtopk_sae_step(x, p[0].T, p[1], p[2], p[3], k, widths, rescale_acts_by_decoder_norm=True)
    our_grads = torch.autograd.grad(D * out.loss, p)
    cfg = dict(d_in=D, d_sae=F, k=k, **extra)
    sae64 = saelens_training_sae("matryoshka_batchtopk", dtype="float64", device=device, **cfg)
    with torch.no_grad():
        for n in names:
            getattr(sae64, n).copy_(getattr(sae, n).double())
    ref = saelens_step(sae64, x.double())
    ref_grads = torch.autograd.grad(ref.loss, [getattr(sae64, n) for n in names])
    assert_parity("saelens matryoshka loss", D * out.loss, theirs.loss, ref.loss, dtype)
    for g, w in enumerate(widths[:-1]):
        assert_parity(f"saelens level {w}", D * out.level_losses[g], theirs.losses[f"inner_mse_loss_{w}"],
                      ref.losses[f"inner_mse_loss_{w}"], dtype)  # fmt: skip
    for n, a, b, c in zip(names, our_grads, their_grads, ref_grads):
        assert a.shape == b.shape, f"d{n} has the wrong layout"
        assert_parity(f"saelens matryoshka d{n}", a, b, c, dtype)
