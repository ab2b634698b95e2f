"""sparse_decode: parity with the fp64 reference and edge shapes (the contract checks: test_op_contract.py)."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from parity import (
    DTYPES,
    check_decode_parity,
    grads,
    make_inputs,
    problem_shapes,
)

OP = "sparse_decode"


@given(
    shape=problem_shapes(),
    dtype=st.sampled_from(DTYPES),
    dup=st.booleans(),
    with_bias=st.booleans(),
    index_dtype=st.sampled_from([torch.int64, torch.int32]),
    seed=st.integers(0, 2**16),
)
# pinned: each dtype (and a code with repeated latents) runs in every tier, whatever the draw
@example(shape=(3, 5, 17, 24), dtype=torch.float32, dup=False, with_bias=True, index_dtype=torch.int64, seed=1)
@example(shape=(4, 6, 110, 260), dtype=torch.bfloat16, dup=False, with_bias=False, index_dtype=torch.int32, seed=2)
@example(shape=(2, 7, 9, 33), dtype=torch.float16, dup=False, with_bias=True, index_dtype=torch.int64, seed=3)
@example(shape=(5, 6, 12, 20), dtype=torch.bfloat16, dup=True, with_bias=True, index_dtype=torch.int64, seed=4)
def test_sparse_decode_parity(fs, device, shape, dtype, dup, with_bias, index_dtype, seed):
    check_decode_parity(
        fs, shape, dtype, device, seed=seed, duplicates=dup, with_bias=with_bias, index_dtype=index_dtype
    )


@pytest.mark.kernels_ci
def test_sparse_decode_empty_batch(fs, device):
    indices, weight, vals, bias, _ = make_inputs(0, 3, 10, 7, torch.float32, device, seed=0)
    out = fs.sparse_decode(vals, indices, weight, bias)
    assert out.shape == (0, 7)
    dvals, dweight, dbias = grads(out, [vals, weight, bias], torch.ones_like(out))
    assert dvals.shape == (0, 3)
    assert torch.equal(dweight, torch.zeros_like(weight))
    assert torch.equal(dbias, torch.zeros_like(bias))


@pytest.mark.kernels_ci
def test_sparse_decode_zero_k_is_bias(fs, device):
    indices, weight, vals, bias, _ = make_inputs(4, 0, 10, 7, torch.float32, device, seed=0)
    out = fs.sparse_decode(vals, indices, weight, bias)
    assert torch.equal(out, bias.detach().expand(4, 7))
    assert torch.equal(fs.sparse_decode(vals, indices, weight), torch.zeros(4, 7, device=device))
    upstream = torch.randn(4, 7, generator=torch.Generator().manual_seed(1)).to(device)
    dvals, dweight, dbias = grads(out, [vals, weight, bias], upstream)
    assert dvals.shape == (4, 0)
    assert torch.equal(dweight, torch.zeros_like(weight))
    torch.testing.assert_close(dbias, upstream.sum(0))
