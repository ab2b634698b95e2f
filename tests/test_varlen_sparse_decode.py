"""varlen_sparse_decode: the variable-length code's decode, its output and every gradient vs fp64 (rows
of different lengths, empty rows, repeats, padding past the end), int32 codes, unvalidated offsets,
bad codes (the contract checks: test_op_contract.py). The code generator and the bad-input cases are shared with
test_varlen_sae_loss."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_parity, grads

MAX_F_EXTRA = 30000 if torch.cuda.is_available() else 300
NAMES = ("vals", "weight", "bias", "target")


@st.composite
def varlen_problems(draw):
    """(counts per row, F, D, padding): B = 1 included, empty rows, tiny F, odd D, padding entries."""
    B = draw(st.integers(1, 8))
    F = draw(st.one_of(st.integers(1, 9), st.integers(100, 100 + MAX_F_EXTRA)))
    D = draw(st.one_of(st.integers(1, 40), st.integers(250, 300)))
    counts = draw(st.lists(st.integers(0, 12), min_size=B, max_size=B))
    pad = draw(st.integers(0, 5))
    return counts, F, D, pad


def make_code(counts, F, D, pad, dtype, device, *, seed):
    """vals, indices (repeats allowed; padding holds -1 or any id), row_offsets, weight, bias, target."""
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    indices = torch.randint(0, F, (n + pad,), generator=g)
    indices[n:] = torch.where(torch.rand(pad, generator=g) < 0.5, -1, indices[n:])
    vals = torch.randn(n + pad, generator=g)
    weight = torch.randn(F, D, generator=g) / D**0.5
    bias = torch.randn(D, generator=g) * 0.1
    target = torch.randn(len(counts), D, generator=g)
    offsets = torch.tensor([0] + counts).cumsum(0)
    params = [t.to(dtype).to(device).requires_grad_() for t in (vals, weight, bias, target)]
    return params[0], indices.to(device), offsets.to(device), params[1], params[2], params[3]


def check_varlen_decode(fs, problem, dtype, device, seed):
    counts, F, D, pad = problem
    vals, indices, offsets, weight, bias, _ = make_code(counts, F, D, pad, dtype, device, seed=seed)
    ref = fs.testing.reference
    p64 = [t.detach().double().requires_grad_() for t in (vals, weight, bias)]
    g = torch.Generator().manual_seed(seed + 1)
    up = torch.randn(len(counts), D, generator=g).to(device)
    x_hat = fs.varlen_sparse_decode(vals, indices, offsets, weight, bias)
    assert x_hat.shape == (len(counts), D) and x_hat.dtype == dtype
    same = ref.varlen_sparse_decode(vals, indices, offsets, weight, bias)
    r = ref.varlen_sparse_decode(p64[0], indices, offsets, p64[1], p64[2])
    assert_parity("varlen_sparse_decode", x_hat, same, r, dtype)
    params = [vals, weight, bias]
    ours = grads(x_hat, params, up.to(dtype))
    for name, a, b, c, p in zip(NAMES, ours, grads(same, params, up.to(dtype)), grads(r, p64, up.double()), params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_parity(f"varlen_sparse_decode d{name}", a, b, c, dtype)
    assert (ours[0][sum(counts) :] == 0).all(), "padding entries must get no gradient"


@pytest.mark.parametrize("op", ["varlen_sparse_decode", "varlen_sae_loss"])
@given(problem=varlen_problems(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
# pinned: each dtype (and a code with repeated latents) runs in every tier, whatever the draw
@example(problem=([3, 0, 5], 40, 33, 2), dtype=torch.float32, seed=1)
@example(problem=([4, 6], 120, 260, 1), dtype=torch.bfloat16, seed=2)
@example(problem=([1, 7, 2, 0], 9, 17, 3), dtype=torch.float16, seed=3)
@example(problem=([6, 5, 4], 3, 24, 0), dtype=torch.bfloat16, seed=4)
def test_varlen_parity(fs, device, op, problem, dtype, seed):
    """Both variable-length ops (the decode, and the loss: ``test_varlen_sae_loss.check_varlen_loss``) on the
    same draws."""
    if op == "varlen_sae_loss":
        from test_varlen_sae_loss import check_varlen_loss

        check_varlen_loss(fs, problem, dtype, device, seed)
    else:
        check_varlen_decode(fs, problem, dtype, device, seed)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_sparse_decode_edge_codes(fs, device, dtype):
    """All rows empty; one row holding everything with repeats; an int32 code decodes as the int64 one."""
    check_varlen_decode(fs, ([0, 0, 0], 7, 5, 2), dtype, device, 1)
    check_varlen_decode(fs, ([0, 30, 0], 4, 33, 0), dtype, device, 2)
    vals, indices, offsets, weight, bias, _ = make_code([3, 1, 4], 50, 9, 1, dtype, device, seed=3)
    a = fs.varlen_sparse_decode(vals, indices, offsets, weight, bias)
    b = fs.varlen_sparse_decode(vals, indices.int(), offsets.int(), weight, bias)
    assert torch.equal(a, b)


def test_varlen_sparse_decode_unvalidated_offsets_stay_inside(fs, device):
    """validate=False (a GPU's default): offsets past N or decreasing are clamped on the device, so
    the decode reads nothing outside the code."""
    code = make_code([2, 3], 9, 5, 0, torch.float32, device, seed=7)
    vals, indices, _, weight, bias, _ = (t.detach() for t in code)
    for bad, good in (([0, 4, 99], [0, 4, 5]), ([0, 4, 2], [0, 4, 4])):
        bad, good = (torch.tensor(o, device=device) for o in (bad, good))
        out = fs.varlen_sparse_decode(vals, indices, bad, weight, bias, validate=False)
        assert torch.equal(out, fs.varlen_sparse_decode(vals, indices, good, weight, bias))


# (change to a valid code, the message's key words): run against both variable-length ops.
BAD_CODES = [
    (dict(row_offsets=[1, 2, 5]), "start at 0"),
    (dict(row_offsets=[0, 3, 2]), "non-decreasing"),
    (dict(row_offsets=[0, 3, 9]), "end at most"),
    (dict(indices_value=99), r"\[0, F=9\)"),
    (dict(vals_dtype=torch.float64), "dtype"),
    (dict(vals_2d=True), "vals"),
    (dict(row_offsets=[]), "row_offsets"),
    (dict(indices_float=True), "indices"),
]


def bad_code(change):
    """A valid CPU code ([2, 3] entries, F = 9, D = 5) with one thing broken; + bias and target."""
    vals, indices, offsets, weight, bias, target = (
        t.detach() for t in make_code([2, 3], 9, 5, 0, torch.float32, "cpu", seed=8)
    )
    if "row_offsets" in change:
        offsets = torch.tensor(change["row_offsets"], dtype=torch.int64)
    if "indices_value" in change:
        indices = indices.clone()
        indices[1] = change["indices_value"]
    if "vals_dtype" in change:
        vals = vals.to(change["vals_dtype"])
    if change.get("vals_2d"):
        vals = vals.unsqueeze(0)
    if change.get("indices_float"):
        indices = indices.float()
    return vals, indices, offsets, weight, bias, target


@pytest.mark.kernels_ci
@pytest.mark.parametrize("change,match", BAD_CODES)
def test_varlen_sparse_decode_rejects(fs, change, match):
    vals, indices, offsets, weight, bias, _ = bad_code(change)
    with pytest.raises(ValueError, match=match):
        fs.varlen_sparse_decode(vals, indices, offsets, weight, bias)
