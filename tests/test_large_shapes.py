"""int64 safety at sizes only a GPU holds: F = 2^24 latents, and B*D past 2^31 elements."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs tens of GiB of CUDA memory"),
]


@pytest.mark.parametrize("op", ["topk_sae_loss", "hierarchical_topk_sae_loss"])
def test_f_2_24_latents(fs, op):
    """Latent ids near 2^24 with D = 256 put idx*D past 2^31 in the gather and the scatter."""
    F, D, B, K = 2**24, 256, 64, 7
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(F, D, device="cuda", generator=g) / 16).bfloat16().requires_grad_()
    indices = F - 1 - torch.randint(0, 4096, (B, K), device="cuda", generator=g)
    vals = torch.rand(B, K, device="cuda", generator=g).bfloat16().requires_grad_()
    bias = torch.zeros(D, device="cuda").bfloat16().requires_grad_()
    target = torch.randn(B, D, device="cuda", generator=g).bfloat16().requires_grad_()
    loss = getattr(fs, op)(indices, weight, vals, bias, target)
    dweight, dvals = torch.autograd.grad(loss, [weight, vals])
    # Reference on the touched rows only (fp64): remap the ids into a small table.
    uniq, local = torch.unique(indices, return_inverse=True)
    w64 = weight.detach()[uniq].double().requires_grad_()
    v64 = vals.detach().double().requires_grad_()
    ref = getattr(fs.testing.reference, op)(local, w64, v64, bias.detach().double(), target.detach().double())
    rw, rv = torch.autograd.grad(ref, [w64, v64])
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(dweight[uniq].double(), rw, rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(dvals.double(), rv, rtol=1e-2, atol=1e-6)
    untouched = torch.ones(F, dtype=torch.bool, device="cuda")
    untouched[uniq] = False
    assert not dweight[untouched].any()


def test_batch_times_d_past_2_31(fs):
    """B*D = 2^31 + 3*1024 elements: output offsets b*D pass int32."""
    B, D, F, K = 2**21 + 3, 1024, 96, 3
    g = torch.Generator(device="cuda").manual_seed(1)
    weight = torch.randn(F, D, device="cuda", generator=g).bfloat16().requires_grad_()
    indices = torch.randint(0, F, (B, K), device="cuda", generator=g)
    vals = torch.rand(B, K, device="cuda", generator=g).bfloat16().requires_grad_()
    x_hat = fs.sparse_decode(vals, indices, weight)
    rows = torch.tensor([0, 12345, B // 2, B - 2, B - 1], device="cuda")
    ref = fs.testing.reference.sparse_decode(vals.detach()[rows].double(), indices[rows], weight.detach().double())
    torch.testing.assert_close(x_hat[rows].double(), ref, rtol=1e-2, atol=1e-2)
    upstream = torch.zeros_like(x_hat)
    upstream[B - 1] = 1.0
    dvals, dweight = torch.autograd.grad(x_hat, [vals, weight], upstream)
    expect = (weight.detach()[indices[B - 1]].float().sum(1)).bfloat16()
    torch.testing.assert_close(dvals[B - 1], expect, rtol=1e-2, atol=1e-2)
    assert not dvals[: B - 1].any()
    ones = torch.zeros(F, D, device="cuda", dtype=torch.float64)
    ones.index_add_(0, indices[B - 1], vals.detach()[B - 1].double()[:, None].expand(K, D))
    torch.testing.assert_close(dweight.double(), ones, rtol=1e-2, atol=1e-2)
