"""The FP8 error bound behind the FP8 result of docs/design/encoder-gemm.md (``benchmarks/fp8_prune_bound.py``), on
the CPU with e4m3 rounding emulated by torch's float8_e4m3fn casts: it is never exceeded, the exact top-k
always lies in the candidate set it gives, and it is attained on an adversarial input (so no bound built
from the same norms can be tighter, which is why it cannot prune)."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fp8_prune_bound as fb  # noqa: E402


@pytest.mark.kernels_ci
@given(
    B=st.integers(1, 6),
    D=st.sampled_from([1, 3, 17, 64, 301]),
    F=st.integers(1, 200),
    scale=st.sampled_from([1e-6, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_bound_holds_and_keeps_the_exact_top_k(B, D, F, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * scale
    x[:, : D // 3] *= 1e-3  # entries far below the row's largest: the subnormal range of the row's scale
    W = torch.randn(F, D, generator=g)
    b = torch.randn(F, generator=g) * scale
    k = int(torch.randint(1, F + 1, (), generator=g))
    row = fb.check(x, W, b, k, gpu=False, name="random")
    assert row["bound_holds"], row
    assert row["exact_topk_in_candidates"], row
    assert k <= row["candidates_median"] <= F


@pytest.mark.kernels_ci
def test_bound_is_attained_when_residuals_line_up_with_the_weights():
    """x's entries sit halfway between e4m3 values (each rounds by the same half step) and w is the sign of
    those residuals (exact in e4m3): the error is |r_x| |w|, the bound's first term, to within 0.5 %."""
    D = 257
    x = torch.full((1, D), 1.0625)
    x[0, 0] = 448.0  # the row's largest entry sets its scale to 1
    xq, sx = fb.quantize(x)
    residual = x - fb.dequantized(xq, sx)
    assert (residual[0, 1:].abs() == 0.0625).all()
    W = torch.sign(residual).repeat(3, 1)
    W[:, 0] = 1.0
    a, _, rows, cols, _ = fb.fp8_preacts(x, W, torch.zeros(3), gpu=False)
    error = (a - x.double() @ W.double().T).abs()
    ratio = (error / (rows @ cols)).max().item()
    assert 0.995 <= ratio <= 1.0
