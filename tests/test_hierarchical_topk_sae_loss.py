"""hierarchical_topk_sae_loss: parity with the fp64 reference, determinism, compile and opcheck."""

import sys

import pytest
import torch
from encoder_inputs import tuning
from hypothesis import given
from hypothesis import strategies as st
from parity import (
    DTYPES,
    OPCHECK_DTYPES,
    call_op,
    check_compile,
    check_deterministic,
    check_loss_parity,
    check_opcheck,
    make_inputs,
    problem_shapes,
)

OP = "hierarchical_topk_sae_loss"


@pytest.mark.kernels_ci
@given(shape=problem_shapes(), dtype=st.sampled_from(DTYPES), dup=st.booleans(), seed=st.integers(0, 2**16))
def test_hierarchical_topk_sae_loss_parity(fs, device, shape, dtype, dup, seed):
    check_loss_parity(fs, OP, shape, dtype, device, seed=seed, duplicates=dup)


@pytest.mark.kernels_ci
def test_hierarchical_topk_sae_loss_windows(fs, device, monkeypatch):
    """The backward walks D in column windows whose buffer fits TUNING["hierarchical_buffer_bytes"].
    Several windows (a ragged last one included) must give bitwise the gradients of one window:
    each column's sums run in the same order either way."""
    module = sys.modules[fs.hierarchical_topk_sae_loss.__module__]
    B, K, F, D = 5, 7, 40, 600
    inputs = make_inputs(B, K, F, D, torch.float32, device, seed=3, duplicates=True)
    out_one, grads_one = call_op(fs, OP, inputs)
    assert module.window_columns(B, K, D, 256) >= D, "the default cap should give one window here"
    monkeypatch.setitem(tuning(fs), "hierarchical_buffer_bytes", B * K * 4 * 256)  # 256-column windows
    assert module.window_columns(B, K, D, 256) == 256
    out_many, grads_many = call_op(fs, OP, inputs)
    assert torch.equal(out_one, out_many)
    for a, b in zip(grads_one, grads_many):
        assert torch.equal(a, b), "three windows give other gradients than one"
    check_loss_parity(fs, OP, (B, K, F, D), torch.float32, device, seed=3)


@pytest.mark.kernels_ci
def test_hierarchical_topk_sae_loss_deterministic(fs, device):
    check_deterministic(fs, OP, device)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_hierarchical_topk_sae_loss_int32_indices(fs, device, index_dtype):
    check_loss_parity(fs, OP, (5, 9, 30, 77), torch.float32, device, seed=9, index_dtype=index_dtype)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES)
def test_hierarchical_topk_sae_loss_opcheck(fs, device, dtype):
    check_opcheck(fs, OP, device, dtype)


@pytest.mark.slow
def test_hierarchical_topk_sae_loss_compile(fs, device):
    check_compile(fs, OP, device)
