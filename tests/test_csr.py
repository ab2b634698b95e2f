"""primitives/csr.segment_sum_dots: the kernel and the plain-torch path agree on latents no element touches."""

import pytest
import torch
from parity import package_module


@pytest.mark.kernels_ci
@pytest.mark.parametrize("by_coef", [True, False])
def test_segment_sum_untouched_latent_row_term(fs, device, by_coef):
    """An untouched latent's gradient row is its row term alone: 0 when the term is scaled by the (empty)
    sum of its coefficients, whatever its row of W holds (the kernel does not read that row), and
    row_term * W[f] otherwise. The Triton kernel (GPU or interpreter) and the plain-torch path agree."""
    csr = package_module(fs, "primitives.csr")
    B, K, F, D = 3, 2, 6, 5
    indices = torch.tensor([[0, 1], [1, 4], [4, 0]], device=device)  # latents 2, 3 and 5 untouched
    perm, offsets = csr.csr_transpose(indices, F)
    g = torch.Generator().manual_seed(0)
    src = torch.randn(B, D, generator=g).to(device)
    coef = torch.randn(B * K, generator=g).to(device)
    weight = torch.randn(F, D, generator=g).to(device)
    weight[3] = float("inf")
    weight[5, 2] = float("nan")
    row_term = torch.rand(F, generator=g).to(device) + 0.5
    rows = csr.SegmentRows(src=src, K=K)
    term = csr.RowTerm(row_term, by_coef=by_coef)
    out_kernel = torch.empty(F, D, device=device)
    csr.segment_sum_dots(
        perm, offsets, rows, out=out_kernel, coef=coef, weight=weight, scale_const=0.5, row_out=csr.RowOut(term=term)
    )
    out_torch = torch.empty(F, D, device=device)
    same_pass = csr.SegmentPass(out=out_torch, coef=coef, scale_const=0.5, weight=weight, row_term=term)
    csr._segment_sum_torch(perm, offsets, rows, same_pass)
    untouched = [2, 3, 5]
    if by_coef:
        assert torch.equal(out_kernel[untouched], torch.zeros(3, D, device=device))
    else:
        want = row_term[untouched, None] * weight[untouched]
        torch.testing.assert_close(out_kernel[untouched], want, equal_nan=True)
    torch.testing.assert_close(out_torch, out_kernel, equal_nan=True, rtol=1e-6, atol=1e-6)
