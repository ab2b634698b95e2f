"""matryoshka_topk_sae_step: the per-row TopK code (exact selection, reordered by latent id), every
level's loss and every gradient vs fp64; one level equals the TopK step (the contract checks:
test_op_contract.py)."""

import pytest
import torch
from encoder_inputs import STEP_NAMES, make_sae, selected_preacts, step_shapes, step_upstream
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_gradient_parity, assert_parity, grads, torch_baseline


@st.composite
def problems(draw):
    """((B, D, F, K), prefix sizes): step_shapes's, K not a power of 2, 1..5 levels."""
    B, D, F = draw(step_shapes())
    K = draw(st.integers(1, min(F, 40)))
    inner = sorted(draw(st.sets(st.integers(1, F - 1), max_size=min(4, F - 1)))) if F > 1 else []
    return (B, D, F, K), inner + [F]


def check_code(fs, params, K, out):
    """The code is the reference's per-row top-K of the same-dtype pre-activations (those it was selected
    from: ``selected_preacts``), sorted by latent id."""
    x, W_enc, b_enc, _, b_dec = params
    B = x.shape[0]
    with torch.no_grad():
        pre = selected_preacts(fs, x, W_enc, b_enc, K, b_dec)
        r_vals, r_idx = fs.testing.reference.topk_select(pre, K)
    ids, order = r_idx.sort(dim=1)
    assert torch.equal(out.code.indices.view(B, K).cpu(), ids.cpu()), "selection differs from the reference tie rule"
    assert torch.equal(out.code.vals.view(B, K).cpu(), torch.relu(r_vals.gather(1, order)).cpu())
    assert torch.equal(out.code.row_offsets.cpu(), torch.arange(B + 1) * K)
    return r_idx


def check_matryoshka_topk(fs, shape, sizes, dtype, device, *, seed):
    B, D, F, K = shape
    params = list(make_sae(B, D, F, K, dtype, device, seed=seed))
    out = fs.matryoshka_topk_sae_step(*params, K, sizes)
    assert out.level_losses.shape == (len(sizes),) and out.loss.dtype == torch.float32
    indices = check_code(fs, params, K, out)
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)
    ref = fs.testing.reference
    same = ref.matryoshka_topk_sae_step(*params, K, sizes, indices=indices)
    same_grads = grads(same.loss, params, up.to(same.loss.dtype))
    p64 = [p.detach().double().requires_grad_() for p in params]
    r = ref.matryoshka_topk_sae_step(*p64, K, sizes, indices=indices)
    r_grads = grads(r.loss, p64, up.double())
    # As in the TopK step's test: the rounding of x - b_dec and of the pre-activations is shared by every
    # same-dtype implementation, so torch's error is at least that of exact arithmetic at those roundings.
    p_sh = [p.detach().double().requires_grad_() for p in params]
    sh = ref.matryoshka_topk_sae_step(*p_sh, K, sizes, indices=indices, round_preacts=dtype)
    sh_grads = grads(sh.loss, p_sh, up.double())

    for g in range(len(sizes)):
        lvl = (same.level_losses[g], r.level_losses[g], sh.level_losses[g])
        assert_parity(
            f"matryoshka_topk level {g} loss", out.level_losses[g], torch_baseline(*lvl), r.level_losses[g], dtype
        )
    assert_parity("matryoshka_topk loss", out.loss, torch_baseline(same.loss, r.loss, sh.loss), r.loss, dtype)
    # Fire counts are of the same-dtype code (an entry fires when its value in the dtype is > 0; in fp64 a
    # pre-activation near 0 can have the other sign), so the same-dtype reference is the exact comparison.
    assert torch.equal(out.fire_counts, same.fire_counts)
    assert torch.equal(out.min_act, same.min_act.to(out.min_act.device))
    assert_gradient_parity("matryoshka_topk", STEP_NAMES, ours, same_grads, r_grads, sh_grads, params, dtype)


@given(problem=problems(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
# pinned: each dtype runs in every tier, whatever the draw
@example(problem=((3, 24, 40, 5), [8, 20, 40]), dtype=torch.float32, seed=1)
@example(problem=((4, 33, 110, 7), [30, 110]), dtype=torch.bfloat16, seed=2)
@example(problem=((2, 17, 9, 3), [4, 9]), dtype=torch.float16, seed=3)
def test_matryoshka_topk_parity(fs, device, problem, dtype, seed):
    shape, sizes = problem
    check_matryoshka_topk(fs, shape, sizes, dtype, device, seed=seed)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES)
def test_matryoshka_topk_ties(fs, device, dtype):
    """Tied pre-activations (small integers): the lower latent id wins, as in topk_encode."""
    B, D, F, K = 5, 4, 60, 7
    params = list(make_sae(B, D, F, K, dtype, device, seed=11, integer=True))
    out = fs.matryoshka_topk_sae_step(*params, K, [5, 20, 60])
    check_code(fs, params, K, out)


def test_matryoshka_topk_one_level_is_topk_step(fs, device):
    """With the single level F, the loss and every gradient are topk_sae_step's, up to fp32 summation order
    (this code is walked by latent id, the TopK step's by value)."""
    params = list(make_sae(6, 33, 90, 9, torch.float32, device, seed=4))
    one = fs.matryoshka_topk_sae_step(*params, 9, [90])
    topk = fs.topk_sae_step(*params, 9)
    torch.testing.assert_close(one.loss, topk.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(one.fvu, topk.fvu, rtol=1e-6, atol=0)
    assert torch.equal(one.fire_counts, topk.fire_counts)
    up = torch.tensor(0.7, device=device)
    for a, b in zip(grads(one.loss, params, up), grads(topk.loss, params, up)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
