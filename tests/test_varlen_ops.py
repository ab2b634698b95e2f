"""varlen_sparse_decode and varlen_sae_loss: the variable-length code's decode and fused loss, every
output and gradient vs fp64 (rows of different lengths, empty rows, repeats, padding past the end);
the steps' own codes; bad input; determinism; opcheck."""

import pytest
import torch
from encoder_inputs import make_sae
from hypothesis import given
from hypothesis import strategies as st
from parity import DTYPES, OPCHECK_DTYPES, assert_parity, grads, raw_op

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


def check_varlen(fs, problem, dtype, device, seed):
    counts, F, D, pad = problem
    vals, indices, offsets, weight, bias, target = make_code(counts, F, D, pad, dtype, device, seed=seed)
    n = sum(counts)
    ref = fs.reference
    p64 = [t.detach().double().requires_grad_() for t in (vals, weight, bias, target)]
    g = torch.Generator().manual_seed(seed + 1)
    up = torch.randn(len(counts), D, generator=g).to(device)

    x_hat = fs.varlen_sparse_decode(vals, indices, offsets, weight, bias)
    assert x_hat.shape == (len(counts), D) and x_hat.dtype == dtype
    same = ref.varlen_sparse_decode(vals, indices, offsets, weight, bias)
    r = ref.varlen_sparse_decode(p64[0], indices, offsets, p64[1], p64[2])
    assert_parity("varlen_sparse_decode", x_hat, same, r, dtype)
    params = [vals, weight, bias]
    ours = grads(x_hat, params, up.to(dtype))
    for name, a, b, c, p in zip(NAMES, ours, grads(same, params, up.to(dtype)), grads(r, p64[:3], up.double()), params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_parity(f"varlen_sparse_decode d{name}", a, b, c, dtype)
    assert (ours[0][n:] == 0).all(), "padding entries must get no gradient"

    loss = fs.varlen_sae_loss(vals, indices, offsets, weight, bias, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    same = ref.varlen_sae_loss(vals, indices, offsets, weight, bias, target)
    r = ref.varlen_sae_loss(p64[0], indices, offsets, *p64[1:])
    assert_parity("varlen_sae_loss", loss, same, r, dtype)
    params = [vals, weight, bias, target]
    s = torch.tensor(-1.7 if seed % 2 else 0.6, device=device)
    ours = grads(loss, params, s)
    for name, a, b, c, p in zip(NAMES, ours, grads(same, params, s.to(dtype)), grads(r, p64, s.double()), params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_parity(f"varlen_sae_loss d{name}", a, b, c, dtype)
    assert (ours[0][n:] == 0).all(), "padding entries must get no gradient"


@pytest.mark.kernels_ci
@given(problem=varlen_problems(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_varlen_parity(fs, device, problem, dtype, seed):
    check_varlen(fs, problem, dtype, device, seed)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_edge_codes(fs, device, dtype):
    """All rows empty; one row holding everything with repeats; an int32 code."""
    check_varlen(fs, ([0, 0, 0], 7, 5, 2), dtype, device, 1)
    check_varlen(fs, ([0, 30, 0], 4, 33, 0), dtype, device, 2)
    vals, indices, offsets, weight, bias, _ = make_code([3, 1, 4], 50, 9, 1, dtype, device, seed=3)
    a = fs.varlen_sparse_decode(vals, indices, offsets, weight, bias)
    b = fs.varlen_sparse_decode(vals, indices.int(), offsets.int(), weight, bias)
    assert torch.equal(a, b)


@pytest.mark.kernels_ci
def test_varlen_codes_of_the_steps(fs, device):
    """The BatchTopK and JumpReLU steps' codes (padding with id -1 included) decode to the steps' own
    reconstruction: the loss equals the BatchTopK step's loss and the JumpReLU step's MSE bitwise."""
    params = list(make_sae(6, 33, 120, 1, torch.float32, device, seed=4))
    x, _, _, W_dec, b_dec = params
    step = fs.batchtopk_sae_step(*params, 5.5)
    loss = fs.varlen_sae_loss(step.vals, step.indices, step.row_offsets, W_dec, b_dec, x)
    assert torch.equal(loss, step.loss)
    threshold = torch.full((120,), 0.2, device=device)
    jump = fs.jumprelu_sae_step(*params, threshold, capacity=6 * 120)
    assert int(jump.row_offsets[-1]) < 6 * 120  # the code is padded
    loss = fs.varlen_sae_loss(jump.vals, jump.indices, jump.row_offsets, W_dec, b_dec, x)
    assert torch.equal(loss, jump.mse)


@pytest.mark.kernels_ci
def test_varlen_deterministic(fs, device):
    code = make_code([5, 0, 9, 3], 20, 17, 2, torch.float32, device, seed=5)
    runs = []
    for _ in range(2):
        loss = fs.varlen_sae_loss(*code)
        runs.append(grads(loss, [code[0], code[3]], torch.tensor(1.0, device=device)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES)
def test_varlen_opcheck(fs, device, dtype):
    vals, indices, offsets, weight, bias, target = (
        t.detach() for t in make_code([2, 0, 3], 11, 7, 1, dtype, device, seed=6)
    )
    torch.library.opcheck(raw_op(fs, "varlen_sparse_decode"), (vals, indices, offsets, weight, bias))
    torch.library.opcheck(raw_op(fs, "varlen_sae_loss"), (vals, indices, offsets, weight, bias, target))


@pytest.mark.kernels_ci
def test_varlen_unvalidated_offsets_stay_inside(fs, device):
    """validate=False (a GPU's default): offsets past N or decreasing are clamped on the device, so
    the decode reads nothing outside the code."""
    code = make_code([2, 3], 9, 5, 0, torch.float32, device, seed=7)
    vals, indices, _, weight, bias, _ = (t.detach() for t in code)
    for bad, good in (([0, 4, 99], [0, 4, 5]), ([0, 4, 2], [0, 4, 4])):
        bad, good = (torch.tensor(o, device=device) for o in (bad, good))
        out = fs.varlen_sparse_decode(vals, indices, bad, weight, bias, validate=False)
        assert torch.equal(out, fs.varlen_sparse_decode(vals, indices, good, weight, bias))


@pytest.mark.kernels_ci
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(row_offsets=[1, 2, 5]), "start at 0"),
        (dict(row_offsets=[0, 3, 2]), "non-decreasing"),
        (dict(row_offsets=[0, 3, 9]), "end at most"),
        (dict(indices_value=99), r"\[0, F=9\)"),
        (dict(vals_dtype=torch.float64), "dtype"),
        (dict(vals_2d=True), "vals"),
        (dict(row_offsets=[]), "row_offsets"),
        (dict(indices_float=True), "indices"),
    ],
)
def test_varlen_rejects(fs, change, match):
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
    with pytest.raises(ValueError, match=match):
        fs.varlen_sparse_decode(vals, indices, offsets, weight, bias)
    with pytest.raises(ValueError, match=match):
        fs.varlen_sae_loss(vals, indices, offsets, weight, bias, target)


@pytest.mark.kernels_ci
def test_varlen_loss_rejects_target_and_empty_batch(fs):
    vals, indices, offsets, weight, bias, target = (
        t.detach() for t in make_code([2, 3], 9, 5, 0, torch.float32, "cpu", seed=9)
    )
    with pytest.raises(ValueError, match="target"):
        fs.varlen_sae_loss(vals, indices, offsets, weight, bias, target[:1])
    with pytest.raises(ValueError, match="target"):
        fs.varlen_sae_loss(vals, indices, offsets, weight, bias, target.double())
    with pytest.raises(ValueError, match="B = 0"):
        fs.varlen_sae_loss(vals, indices, torch.tensor([0]), weight, bias, target[:0])
