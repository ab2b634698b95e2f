"""sparse_decode: parity with the fp64 reference, edge shapes, determinism, compile and opcheck."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from parity import (
    DTYPES,
    assert_parity,
    check_compile,
    check_deterministic,
    check_opcheck,
    grads,
    make_inputs,
    problem_shapes,
)

OP = "sparse_decode"


@pytest.mark.kernels_ci
@given(
    shape=problem_shapes(),
    dtype=st.sampled_from(DTYPES),
    dup=st.booleans(),
    with_bias=st.booleans(),
    index_dtype=st.sampled_from([torch.int64, torch.int32]),
    seed=st.integers(0, 2**16),
)
def test_sparse_decode_parity(fs, device, shape, dtype, dup, with_bias, index_dtype, seed):
    B, K, F, D = shape
    indices, weight, vals, bias, _ = make_inputs(
        B, K, F, D, dtype, device, seed=seed, duplicates=dup, index_dtype=index_dtype
    )
    bias = bias if with_bias else None
    params = [vals, weight] + ([bias] if with_bias else [])
    # The upstream gradient has x_hat's dtype; the reference sees the same rounded values.
    upstream = torch.randn(B, D, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)

    ours = fs.sparse_decode(indices, vals, weight, bias)
    assert ours.dtype == dtype and ours.shape == (B, D)
    ours_grads = grads(ours, params, upstream)

    same = fs.reference.sparse_decode(indices, vals, weight, bias)
    same_grads = grads(same, params, upstream)

    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = fs.reference.sparse_decode(indices, p64[0], p64[1], p64[2] if with_bias else None)
    ref_grads = grads(ref, p64, upstream.double())

    assert_parity("x_hat", ours, same, ref, dtype)
    for name, a, b, c in zip(("vals", "weight", "bias"), ours_grads, same_grads, ref_grads):
        assert a.dtype == dtype
        assert_parity(f"d{name}", a, b, c, dtype)


@pytest.mark.kernels_ci
def test_sparse_decode_empty_batch(fs, device):
    indices, weight, vals, bias, _ = make_inputs(0, 3, 10, 7, torch.float32, device, seed=0)
    out = fs.sparse_decode(indices, vals, weight, bias)
    assert out.shape == (0, 7)
    dvals, dweight, dbias = grads(out, [vals, weight, bias], torch.ones_like(out))
    assert dvals.shape == (0, 3)
    assert torch.equal(dweight, torch.zeros_like(weight))
    assert torch.equal(dbias, torch.zeros_like(bias))


@pytest.mark.kernels_ci
def test_sparse_decode_zero_k_is_bias(fs, device):
    indices, weight, vals, bias, _ = make_inputs(4, 0, 10, 7, torch.float32, device, seed=0)
    out = fs.sparse_decode(indices, vals, weight, bias)
    assert torch.equal(out, bias.detach().expand(4, 7))
    assert torch.equal(fs.sparse_decode(indices, vals, weight), torch.zeros(4, 7, device=device))
    upstream = torch.randn(4, 7, generator=torch.Generator().manual_seed(1)).to(device)
    dvals, dweight, dbias = grads(out, [vals, weight, bias], upstream)
    assert dvals.shape == (4, 0)
    assert torch.equal(dweight, torch.zeros_like(weight))
    torch.testing.assert_close(dbias, upstream.sum(0))


@pytest.mark.kernels_ci
def test_sparse_decode_deterministic(fs, device):
    check_deterministic(fs, OP, device)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_decode_opcheck(fs, device, dtype):
    check_opcheck(fs, OP, device, dtype)


def test_sparse_decode_compile(fs, device):
    check_compile(fs, OP, device)
