"""topk_encode: the selection (exact, tie rule, every merge level) and every gradient vs the fp64 reference."""

import pytest
import torch
from encoder_inputs import check_encode_parity, check_selection, encoder_upstream, make_sae, tuning
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, fast_tier_keeps, grads, package_module

# The interpreter runs one backward program per latent at ~1 ms each, so CPU draws keep F in the
# hundreds; on a GPU F reaches tens of thousands. (A forward-only test below covers group sizes
# and F chunks on the CPU too.)
MAX_F_EXTRA = 30000 if torch.cuda.is_available() else 300


@st.composite
def encoder_shapes(draw):
    """(B, D, F, K): B = 1 included, odd D, K not a power of 2 often, F from K (tiny) up."""
    B = draw(st.integers(1, 8))
    K = draw(st.one_of(st.integers(1, 12), st.sampled_from([31, 64, 100])))
    F = K + draw(st.one_of(st.integers(0, 8), st.integers(100, MAX_F_EXTRA)))
    D = draw(st.one_of(st.integers(1, 40), st.integers(250, 300)))
    return B, D, F, K


@given(shape=encoder_shapes(), dtype=st.sampled_from(DTYPES), centred=st.booleans(), seed=st.integers(0, 2**16))
# pinned: each dtype runs in every tier, whatever the draw
@example(shape=(3, 24, 40, 5), dtype=torch.float32, centred=True, seed=1)
@example(shape=(4, 33, 110, 7), dtype=torch.bfloat16, centred=True, seed=2)
@example(shape=(2, 17, 12, 6), dtype=torch.float16, centred=False, seed=3)
def test_topk_encode_parity(fs, device, shape, dtype, centred, seed):
    check_encode_parity(fs, shape, dtype, device, centred=centred, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,D,F,K",
    [(6, 5, 300, 64), (3, 4, 2000, 9), (2, 3, 50, 50), (4, 2, 700, 1)],
)
def test_topk_encode_ties(fs, device, dtype, B, D, F, K):
    """Exactly tied pre-activations (small integers): the lower latent id wins, as the reference's stable sort."""
    x, W_enc, b_enc, _, _ = make_sae(B, D, F, K, dtype, device, seed=B * F + K, integer=True)
    vals, indices = fs.topk_encode(x, W_enc, b_enc, K)
    check_selection(fs, x, W_enc, b_enc, K, None, vals, indices)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_encode_all_tied_and_signed_zero(fs, device, dtype):
    """Every pre-activation equal (ids 0..K-1 win); and -0.0 ties with +0.0 rather than ranking below it."""
    F, K = 40, 7
    x = torch.zeros(3, 4, device=device, dtype=dtype)
    W_enc = torch.zeros(F, 4, device=device, dtype=dtype)
    b_enc = torch.zeros(F, device=device, dtype=dtype)
    _, indices = fs.topk_encode(x, W_enc, b_enc, K)
    assert indices.tolist() == [list(range(K))] * 3
    b_enc = torch.full((F,), -1.0, device=device, dtype=dtype)
    b_enc[[3, 9, 20]] = torch.tensor([-0.0, 0.0, -0.0], device=device, dtype=dtype)
    _, indices = fs.topk_encode(x, W_enc, b_enc, 3)
    assert indices.tolist() == [[3, 9, 20]] * 3


@pytest.mark.parametrize("dtype", fast_tier_keeps(1, DTYPES))
@pytest.mark.parametrize("integer", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("K", fast_tier_keeps(1, [5, 1, 33]))
def test_topk_encode_groups_and_chunks(fs, device, dtype, integer, K, monkeypatch):
    """Group sizes from 1 to past F/K, partial last groups, groups per program, and many F chunks
    (each with its own candidates, merged at the end); distinct and exactly tied values. The code
    must not change."""
    B, D, F = 3, 5, 2500
    x, W_enc, b_enc, _, b_dec = make_sae(B, D, F, K, dtype, device, seed=K, integer=integer)
    for group, groups, chunk_bytes in ((1, 64, 2**30), (4, 16, 2500), (32, 64, 3000), (128, 2, 2**30)):
        monkeypatch.setitem(tuning(fs), "topk_select_group", group)
        monkeypatch.setitem(tuning(fs), "select_groups", groups)
        monkeypatch.setitem(tuning(fs), "chunk_bytes", chunk_bytes)  # 2500, 3000: 4 to 12 chunks
        vals, indices = fs.topk_encode(x, W_enc, b_enc, K, b_dec)
        check_selection(fs, x, W_enc, b_enc, K, b_dec, vals, indices)


def test_topk_encode_non_contiguous(fs, device):
    """Transposed views (SAELens keeps W_enc as [D, F]) give the same code and gradients as contiguous copies."""
    x, W_enc, b_enc, _, b_dec = make_sae(5, 17, 60, 4, torch.float32, device, seed=8)
    W_t = W_enc.detach().T.contiguous().requires_grad_()  # [D, F], the other layout
    vals, indices = fs.topk_encode(x, W_t.T, b_enc, 4, b_dec)
    ref_vals, ref_indices = fs.topk_encode(x, W_enc, b_enc, 4, b_dec)
    assert torch.equal(vals, ref_vals) and torch.equal(indices, ref_indices)
    up = encoder_upstream(vals, 8)
    (g,) = grads(vals, [W_t], up)
    (ref_g,) = grads(ref_vals, [W_enc], up)
    assert torch.equal(g.T, ref_g)


@st.composite
def selection_rows(draw):
    """(B, F, k, G, kind): F from k up to a few group counts past k * G, k not a power of 2 often."""
    B = draw(st.integers(1, 4))
    k = draw(st.one_of(st.integers(1, 9), st.sampled_from([31, 33, 64])))
    G = draw(st.sampled_from([1, 4, 32]))
    F = k + draw(st.one_of(st.integers(0, 40), st.integers(200, 3000)))
    return B, F, k, G, draw(st.sampled_from(["random", "few values", "one value", "signed zeros, infs, NaNs"]))


def _selection_input(B, F, kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(B, F, generator=g).to(dtype)
    if kind == "few values":  # many exact ties at the k-th value and across groups
        return torch.randint(-2, 3, (B, F), generator=g).to(dtype)
    if kind == "one value":
        return torch.full((B, F), -1.5, dtype=dtype)
    pool = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0, float("nan"), -float("nan")], dtype=dtype)
    return pool[torch.randint(0, len(pool), (B, F), generator=g)]


@given(shape=selection_rows(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), one_kernel=st.booleans())
# torch's CPU gather of a bf16 NaN flips its sign bits: the fall-back once ranked positive NaNs last
@example(shape=(1, 31, 31, 1, "signed zeros, infs, NaNs"), dtype=torch.bfloat16, seed=0, one_kernel=False)
def test_select_topk_tie_rule(fs, device, shape, dtype, seed, one_kernel):
    """The selection primitive alone, on adversarial rows (ties within and across groups, one value
    everywhere, +-0.0, +-inf and NaNs of both signs), by the one-kernel candidate stage and by the torch.topk fall-back
    (``ROW_SELECT_MAX`` shrunk so no chunk fits): equal to the reference stable sort, values and ids."""
    B, F, k, G, kind = shape
    select = package_module(fs, "primitives.select.row_topk")
    pre = _selection_input(B, F, kind, dtype, seed).to(device)
    with pytest.MonkeyPatch.context() as mp:  # per example: hypothesis reuses function-scoped fixtures
        mp.setitem(tuning(fs), "topk_select_group", G)
        if not one_kernel:
            mp.setattr(select, "ROW_SELECT_MAX", 0)
        vals, ids = select.select_topk(pre, k)
    ref_vals, ref_ids = fs.testing.reference.topk_select(pre, k)
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    same = (vals.cpu() == ref_vals.cpu()) | (vals.cpu().isnan() & ref_vals.cpu().isnan())
    assert same.all()  # as floats: a -0.0 comes back as +0.0, its key's value


@pytest.mark.kernels_ci
def test_candidate_kernel_takes_wide_chunks_and_select_checks_k(fs):
    """The per-chunk group size keeps wide chunks (up to 2^22 latents, k up to 256) inside the candidate
    kernel's limits rather than on the torch.topk fall-back; and the selection primitive rejects k
    outside [1, F] with a ValueError naming k."""
    select = package_module(fs, "primitives.select.row_topk")
    for w, k in [(65536, 64), (262144, 64), (699040, 256), (786432, 200), (10**6, 250), (2**21 + 1, 32), (2**22, 64)]:
        assert select.row_select_fits(w, k, select.topk_group(w, k)), (w, k)
    with pytest.raises(ValueError, match="k must be"):
        select.select_topk(torch.zeros(2, 5), 6)
