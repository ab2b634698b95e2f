"""primitives/gather.gather_rows: the work it does in its walk beside the decode.

``counts`` (the steps' per-latent fire counts, integer atomics in the kernel's first D-block) and
``minus`` (dx = dx_enc - s * r, the MSE step's encoder gather). The kernel (GPU or interpreter) and
the plain-torch path (``CPU_RUNS_TRITON`` off) are both checked against plain formulas, on [B, K]
and variable-length codes with empty slots (id -1), out-of-range ids, zeros, negative values,
duplicates and unused entries past the last row.
"""

from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity import DTYPES, package_module


def make_code(B, K, F, D, dtype, device, seed, varlen):
    g = torch.Generator().manual_seed(seed)
    N = B * K
    ids = torch.randint(-1, F + 1, (N + 3,), generator=g)  # -1: an empty slot; F: out of range
    vals = torch.randn(N + 3, generator=g)
    vals[torch.rand(N + 3, generator=g) < 0.2] = 0.0
    weight = torch.randn(F, D, generator=g)
    bias = torch.randn(D, generator=g)
    if varlen:  # rows of uneven length; three unused entries (valid ids, positive values) past the end
        cuts = torch.sort(torch.randint(0, N + 1, (B - 1,), generator=g)).values
        row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.full((1,), N)])
        ids[N:] = 0
        vals[N:] = 1.0
        code = (vals, ids, row_offsets)
    else:
        code = (vals[:N].view(B, K), ids[:N].view(B, K), None)
    vals, ids, row_offsets = code
    to = dict(device=device)
    return (
        vals.to(dtype=dtype, **to),
        ids.to(**to),
        weight.to(dtype=dtype, **to),
        bias.to(dtype=dtype, **to),
        None if row_offsets is None else row_offsets.to(**to),
    )


def counts_formula(vals, ids, row_offsets, F):
    n = ids.numel() if row_offsets is None else int(row_offsets[-1])
    v, i = vals.reshape(-1)[:n].float().cpu(), ids.reshape(-1)[:n].cpu()
    want = torch.zeros(F, dtype=torch.int64)
    for f, x in zip(i.tolist(), v.tolist()):
        if 0 <= f < F and x > 0:
            want[f] += 1
    return want


class CodeProblem(NamedTuple):
    B: int
    K: int
    F: int
    D: int
    dtype: torch.dtype
    varlen: bool


# the drawn codes: B = 1, K = 1, tiny F, odd D and D past one 256-wide block, all dtypes
CODES = st.builds(
    CodeProblem,
    B=st.integers(1, 5),
    K=st.integers(1, 9),
    F=st.integers(1, 40),
    D=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    varlen=st.booleans(),
)


@pytest.fixture(params=["kernel", "torch"])
def path(request, fs, device, monkeypatch):
    if request.param == "torch":
        if device != "cpu":
            pytest.skip("the plain-torch path runs CPU tensors")
        monkeypatch.setattr(package_module(fs, "_launch"), "CPU_RUNS_TRITON", False)
    return request.param


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # `path` holds for every example
@given(code=CODES, seed=st.integers(0, 2**16))
def test_gather_rows_counts(fs, device, path, code, seed):
    """counts[f] += 1 per walked entry with id f in [0, F) and a value > 0; the outputs are unchanged."""
    B, K, F, D, dtype, varlen = code
    gather = package_module(fs, "primitives.gather")
    vals, ids, weight, bias, row_offsets = make_code(B, K, F, D, dtype, device, seed, varlen)
    target = torch.randn(B, D, device=device).to(dtype)
    counts = torch.full((F,), 5, dtype=torch.int64, device=device)  # added to, not overwritten
    residual, sq = gather.gather_residual(vals, ids, weight, bias, target, row_offsets=row_offsets, counts=counts)
    assert torch.equal(counts.cpu(), counts_formula(vals, ids, row_offsets, F) + 5)
    plain_r, plain_sq = gather.gather_residual(vals, ids, weight, bias, target, row_offsets=row_offsets)
    torch.testing.assert_close(residual, plain_r, rtol=0, atol=0, equal_nan=True)  # bit for bit
    torch.testing.assert_close(sq, plain_sq, rtol=0, atol=0, equal_nan=True)
    counts = torch.zeros(F, dtype=torch.int64, device=device)
    gather.gather_rows(vals, ids, weight, bias, row_offsets=row_offsets, counts=counts)  # a plain decode counts too
    assert torch.equal(counts.cpu(), counts_formula(vals, ids, row_offsets, F))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # `path` holds for every example
@given(code=CODES, const=st.sampled_from([1.0, -0.5, 2.0 / 3.0]), seed=st.integers(0, 2**16))
def test_gather_rows_minus(fs, device, path, code, const, seed):
    """out = bias + sum - scale * const * t, subtracted in fp32 before the one rounding."""
    B, K, F, D, dtype, varlen = code
    gather = package_module(fs, "primitives.gather")
    vals, ids, weight, bias, row_offsets = make_code(B, K, F, D, dtype, device, seed, varlen)
    ids = ids.clamp(0, F - 1)  # no poisoned (NaN) rows here: the subtraction is what is checked
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randn(B, D, generator=g).to(device)
    scale = torch.rand((), generator=g).to(device) + 0.5
    for out_dtype in (torch.float32, dtype):
        got = gather.gather_rows(
            vals, ids, weight, bias, out_dtype=out_dtype, row_offsets=row_offsets, minus=(t, scale, const)
        )
        acc = gather.gather_rows(vals, ids, weight, bias, out_dtype=torch.float32, row_offsets=row_offsets)
        want = (acc - (scale * const) * t).to(out_dtype)
        assert got.dtype == out_dtype
        # The torch path runs the same fp32 operations: bit for bit. The kernel may fuse the multiply
        # and the subtraction (one fp32 rounding apart), which can move the final rounding by one step.
        step = 2**-23 if out_dtype == torch.float32 else torch.finfo(out_dtype).eps
        tol = dict(rtol=0, atol=0) if path == "torch" else dict(rtol=2 * step, atol=1e-5)
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.kernels_ci
def test_gather_rows_rejects_bad_combinations(fs, device):
    """The walk's options that do not go together: ``gather_residual`` takes no ``minus`` and
    ``gather_level_residuals`` no ``counts`` (TypeError), and their shared launcher raises ValueError."""
    gather = package_module(fs, "primitives.gather")
    vals, ids, weight, bias, _ = make_code(2, 3, 5, 4, torch.float32, device, 0, False)
    t = torch.zeros(2, 4, device=device)
    one = torch.ones((), device=device)
    with pytest.raises(TypeError):
        gather.gather_residual(vals, ids, weight, bias, t, minus=(t, one, 1.0))
    with pytest.raises(ValueError, match="minus"):
        gather._gather(vals, ids.clamp(-1, 4), weight, bias, target=t, minus=(t, one, 1.0))
    offsets = torch.tensor([0, 3, 6], device=device)
    ends = torch.tensor([[3], [6]], device=device)
    counts = torch.zeros(5, dtype=torch.int64, device=device)
    flat_vals, flat_ids = vals.reshape(-1), ids.reshape(-1)
    with pytest.raises(TypeError):
        gather.gather_level_residuals(
            flat_vals, flat_ids, weight, bias, t, row_offsets=offsets, level_ends=ends, counts=counts
        )
    with pytest.raises(ValueError, match="counts"):
        gather._gather(flat_vals, flat_ids, weight, bias, target=t, row_offsets=offsets, level_ends=ends, counts=counts)
