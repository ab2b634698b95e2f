"""Decoder geometry on the fused row kernels (primitives.decoder_geometry): unit-norm rows and the
gradient's component along each row removed, vs fp64, in every dtype, odd D, zero rows, a row subset;
the modules' methods vs their plain-torch twins'; bad input."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from parity import ATOL, DTYPES, assert_parity, package_module


def geometry(fs):
    return package_module(fs, "primitives.decoder_geometry")


def make(F, D, dtype, device, seed, zero_rows=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(F, D, generator=g) * torch.rand(F, 1, generator=g) * 3
    G = torch.randn(F, D, generator=g)
    if zero_rows:
        W[::3] = 0
    return W.to(dtype).to(device), G.to(dtype).to(device)


def unit64(W):
    return W / W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def parallel_removed64(W, G):
    return G - (G * W).sum(1, keepdim=True) / W.pow(2).sum(1, keepdim=True).clamp_min(1e-30) * W


@pytest.mark.kernels_ci
@example(F=10, D=1, dtype=torch.bfloat16, zero_rows=False, subset=False, seed=0)  # D = 1: the result is 0
@given(
    F=st.integers(1, 40),
    D=st.one_of(st.integers(1, 40), st.integers(1000, 1100)),
    dtype=st.sampled_from(DTYPES),
    zero_rows=st.booleans(),
    subset=st.booleans(),
    seed=st.integers(0, 2**16),
)
# pinned, with the example above: each dtype runs in every tier, whatever the draw
@example(F=12, D=33, dtype=torch.float32, zero_rows=True, subset=False, seed=1)
@example(F=9, D=17, dtype=torch.float16, zero_rows=False, subset=True, seed=3)
def test_geometry_matches_fp64(fs, device, F, D, dtype, zero_rows, subset, seed):
    W, G = make(F, D, dtype, device, seed, zero_rows)
    rows = (torch.arange(F, device=device) % 2 == 0) if subset else None
    sel = rows if rows is not None else slice(None)
    W64, G64 = W.double(), G.double()
    # torch's same-dtype computation: the base class's formulas (fp32 arithmetic, one rounding).
    same_W = (W.float() / W.float().norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)).to(dtype)
    w, g = W.float(), G.float()
    same_G = (g - (g * w).sum(1, keepdim=True) / w.pow(2).sum(1, keepdim=True).clamp_min(1e-30) * w).to(dtype)

    G_out = G.clone()
    assert geometry(fs).remove_parallel_(W, G_out, rows) is G_out
    # The result is a difference (G minus its projection; exactly 0 when D = 1), so errors are measured
    # against the size of G, the terms' scale, not of the result: the parity rule's bound otherwise.
    ref = parallel_removed64(W64, G64)[sel]
    scale = G64[sel].norm().clamp_min(1e-30)
    e_ours, e_torch = ((t[sel].double() - ref).norm() / scale for t in (G_out, same_G))
    assert e_ours <= 2 * e_torch + ATOL[dtype], f"remove_parallel_ ({dtype}): {e_ours:.3e} vs torch's {e_torch:.3e}"
    if rows is not None:
        assert torch.equal(G_out[~rows], G[~rows]), "rows outside the subset must not change"

    W_out = W.clone()
    assert geometry(fs).unit_norm_rows_(W_out, rows) is W_out
    assert_parity("unit_norm_rows_", W_out[sel], same_W[sel], unit64(W64)[sel], dtype)
    if rows is not None:
        assert torch.equal(W_out[~rows], W[~rows]), "rows outside the subset must not change"
    if zero_rows:
        assert (W_out[::3] == 0).all(), "a zero row stays zero"


@pytest.mark.kernels_ci
@pytest.mark.parametrize(
    "name",
    [
        "SparseAutoencoder",
        "BatchTopKSparseAutoencoder",
        "JumpReLUSparseAutoencoder",
        "StandardSparseAutoencoder",
        "GatedSparseAutoencoder",
    ],
)
def test_module_methods_match_the_twins(fs, device, name):
    kwargs = {} if name.startswith(("JumpReLU", "Standard", "Gated")) else {"k": 4}
    flash = getattr(fs, name)(33, 40, **kwargs, dtype=torch.float32, device=device, seed=3)
    twin = getattr(fs.testing.reference, name)(33, 40, **kwargs, dtype=torch.float32, device=device, seed=3)
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(40, 33, generator=g).to(device)
    for m in (flash, twin):
        with torch.no_grad():
            m.W_dec.mul_(torch.linspace(0.5, 2.0, 40, device=device)[:, None])
        m.W_dec.grad = grad.clone()
        m.remove_gradient_parallel_to_decoder_directions()
        m.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(flash.W_dec.grad, twin.W_dec.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flash.W_dec, twin.W_dec, rtol=1e-6, atol=1e-7)
    assert torch.allclose(flash.W_dec.norm(dim=1), torch.ones(40, device=device), atol=1e-6)
    flash.W_dec.grad = None
    flash.remove_gradient_parallel_to_decoder_directions()  # no gradient: nothing to do


@pytest.mark.kernels_ci
def test_geometry_rejects(fs, device):
    geo = geometry(fs)
    W, G = make(5, 7, torch.float32, device, 0)
    with pytest.raises(ValueError, match="G must have shape"):
        geo.remove_parallel_(W, G[:4])
    with pytest.raises(ValueError, match="rows"):
        geo.unit_norm_rows_(W, torch.ones(4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="rows"):
        geo.remove_parallel_(W, G, torch.ones(5, device=device))
    with pytest.raises(ValueError, match="W must be 2-D"):
        geo.unit_norm_rows_(W[0])
    with pytest.raises(ValueError, match="W must have dtype"):
        geo.unit_norm_rows_(W.double())
    with pytest.raises(ValueError, match="unit stride"):
        geo.unit_norm_rows_(W.T)
