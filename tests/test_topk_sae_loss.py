"""topk_sae_loss and hierarchical_topk_sae_loss: parity with the fp64 reference (drawn shapes, pinned dtypes)
and int32 indices; their contract checks (determinism, compile, opcheck) are in test_op_contract.py."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from parity import (
    DTYPES,
    LOSS_OPS,
    check_loss_parity,
    problem_shapes,
)

OP = "topk_sae_loss"


@pytest.mark.parametrize("op", LOSS_OPS)
@given(shape=problem_shapes(), dtype=st.sampled_from(DTYPES), dup=st.booleans(), seed=st.integers(0, 2**16))
# pinned: each dtype (and a code with repeated latents) runs in every tier, whatever the draw
@example(shape=(3, 5, 17, 24), dtype=torch.float32, dup=False, seed=1)
@example(shape=(4, 6, 110, 260), dtype=torch.bfloat16, dup=False, seed=2)
@example(shape=(2, 7, 9, 33), dtype=torch.float16, dup=False, seed=3)
@example(shape=(5, 6, 12, 20), dtype=torch.bfloat16, dup=True, seed=4)
def test_loss_parity(fs, device, op, shape, dtype, dup, seed):
    check_loss_parity(fs, op, shape, dtype, device, seed=seed, duplicates=dup)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_topk_sae_loss_int32_indices(fs, device, index_dtype):
    check_loss_parity(fs, OP, (5, 9, 30, 77), torch.float32, device, seed=9, index_dtype=index_dtype)
