"""primitives/preacts_gemm: the encoder GEMM whose epilogue writes the selection's group keys.

Its pre-activations are torch's ``addmm`` up to the summation order, its group keys are exactly
``select.groups._group_best_kernel``'s on the values it stored (NaNs of both signs, infinities, signed zeros,
columns past the edge of a tile), on drawn shapes with several tiles per persistent program; it is taken
exactly where ``fits`` says, and the TopK selection gives the same code with it or without it where
every summation order gives the same sums (small integers), across one chunk of F and several.
"""

import os

import pytest
import torch
from encoder_inputs import assert_gemm_close, make_sae, tuning
from hypothesis import given
from hypothesis import strategies as st
from parity import package_module

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def fused_on(fs, monkeypatch):
    """These tests need the fused GEMM on (``TUNING["preacts_gemm"]``, the default), whatever
    ``FLASH_SAE_TUNING`` says."""
    monkeypatch.setitem(tuning(fs), "preacts_gemm", True)


def fused_gemm_expected(device) -> bool:
    """Where the fused GEMM must be taken for operands it fits: a CUDA device of compute capability >= 9
    (TMA; the pinned Triton has tensor descriptors), or the CPU under Triton's interpreter (conftest sets
    ``TRITON_INTERPRET=1`` there without a GPU)."""
    if device == "cuda":
        return torch.cuda.get_device_capability()[0] >= 9
    return os.environ.get("TRITON_INTERPRET") == "1"


def require_fused(device, fits: bool) -> None:
    """``fits`` is the function under test, so its False cannot skip a test where the fused GEMM should run:
    there it fails; it skips only on a GPU of compute capability < 9 (or the CPU without the interpreter)."""
    if fits:
        return
    if fused_gemm_expected(device):
        pytest.fail("preacts_gemm.fits is False for operands it takes, on a device where the fused GEMM runs")
    pytest.skip("the fused GEMM needs TMA (a GPU of compute capability >= 9) or Triton's interpreter")


def draw_operands(B, D, w, dtype, device, seed, special):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    W = torch.randn(w, D, generator=g) / D**0.5
    b = torch.randn(w, generator=g) * 0.1
    if special:  # a NaN of each sign, infinities, a zero row with a -0.0 bias, a row of one repeated value
        W[torch.randint(0, w, (1,), generator=g)] = float("nan")
        W[torch.randint(0, w, (1,), generator=g), 0] = -float("nan")
        b[torch.randint(0, w, (1,), generator=g)] = float("inf")
        b[torch.randint(0, w, (1,), generator=g)] = -float("inf")
        z = torch.randint(0, w, (1,), generator=g)
        W[z], b[z] = 0.0, -0.0
        x[torch.randint(0, B, (1,), generator=g)] = 0.5
    return tuple(t.to(device=device, dtype=dtype) for t in (x, W, b))


@given(
    B=st.integers(1, 40),
    D=st.integers(1, 9).map(lambda n: 8 * n),
    w=st.integers(1, 40).map(lambda n: 8 * n),
    G=st.sampled_from([16, 32, 64]),
    dtype=st.sampled_from(HALF),
    tile=st.sampled_from([(16, 64, 16), (64, 128, 32), None]),
    special=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_preacts_group_keys(fs, device, B, D, w, G, dtype, tile, special, seed):
    """Values within the summation-order bound of torch's addmm; keys bit for bit _group_best_kernel's."""
    pg = package_module(fs, "primitives.preacts_gemm")
    groups = package_module(fs, "primitives.select.groups")
    x, W, b = draw_operands(B, D, w, dtype, device, seed, special)
    with pytest.MonkeyPatch.context() as mp:  # per example: hypothesis reuses function-scoped fixtures
        if tile is not None:
            mp.setitem(tuning(fs), "preacts_gemm_tile", tile)
        out = torch.empty(B, w, dtype=dtype, device=device)
        require_fused(device, pg.fits(x, W, out, G))
        gkeys = pg.preacts_group_keys(x, W, b, G, out)
    assert gkeys.shape == (B, -(-w // G)) and gkeys.dtype == torch.int32
    assert torch.equal(gkeys.cpu(), groups.group_max_keys(out, 0, G).cpu())
    if not special:  # (with inf and NaN operands the bound says nothing; the keys above are the check)
        assert_gemm_close(out, x, W, b)


@pytest.mark.kernels_ci
def test_preacts_gemm_fits(fs, device):
    """Taken for bf16/fp16 operands with 16-byte aligned rows and G in [16, 64]; not for fp32, rows of
    D % 8 != 0 elements, a misaligned view, a G outside the measured sizes, or with the switch off."""
    pg = package_module(fs, "primitives.preacts_gemm")
    x, W, b = draw_operands(4, 64, 96, torch.bfloat16, device, 0, False)
    out = torch.empty(4, 96, dtype=torch.bfloat16, device=device)
    require_fused(device, pg.fits(x, W, out, 32))
    assert pg.fits(x, W, out, 16) and pg.fits(x, W, out, 64)
    assert not pg.fits(x, W, out, 8) and not pg.fits(x, W, out, 128)
    assert not pg.fits(x.float(), W.float(), out.float(), 32)
    assert not pg.fits(x[:, :60].contiguous(), W[:, :60].contiguous(), out, 32)  # rows of 120 bytes
    assert pg.fits(x[:, :60], W[:, :60], out, 32)  # views of rows of 128 bytes: TMA reads 60 and zero-fills
    assert not pg.fits(x[:, 1:], W[:, 1:], out, 32)  # a base address 2 bytes off
    assert not pg.fits(x, W, torch.empty(4 * 96 + 1, dtype=torch.bfloat16, device=device)[1:].view(4, 96), 32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tuning(fs), "preacts_gemm", False)
        assert not pg.fits(x, W, out, 32)


@pytest.mark.parametrize("dtype", HALF)
def test_topk_selection_with_and_without_fused_gemm(fs, device, dtype, monkeypatch):
    """Small-integer inputs (exact sums in any order): topk_encode and the TopK step give the same code and
    loss bit for bit with the fused GEMM and with cuBLAS + the group pass, in one chunk of F and in
    several (where the chunks' packed candidates merge), and with a ragged last chunk."""
    B, D, F, K = 9, 24, 2048, 2  # G = 32 over one chunk; 16 over chunks of 640, 8 (cuBLAS) over the last 128
    pg = package_module(fs, "primitives.preacts_gemm")
    x, W_enc, b_enc, W_dec, b_dec = (p.detach() for p in make_sae(B, D, F, K, dtype, device, seed=3, integer=True))
    require_fused(device, pg.fits(x, W_enc, torch.empty(B, F, dtype=dtype, device=device), 16))
    calls = []
    fused_gemm = pg.preacts_group_keys
    monkeypatch.setattr(pg, "preacts_group_keys", lambda *a: calls.append(a[1].shape[0]) or fused_gemm(*a))
    for chunk_bytes, widths in ((2**30, [F, F]), (B * 2 * 640, [640] * 6)):
        monkeypatch.setitem(tuning(fs), "chunk_bytes", chunk_bytes)
        outs = []
        for fused in (True, False):
            monkeypatch.setitem(tuning(fs), "preacts_gemm", fused)
            vals, ids = fs.topk_encode(x, W_enc, b_enc, K, b_dec)
            step = fs.topk_sae_step(x, W_enc, b_enc, W_dec, b_dec, K)
            outs.append((vals, ids, step.code.vals, step.code.indices, step.loss))
        for a, b in zip(*outs):
            assert torch.equal(a.cpu(), b.cpu())
        assert calls == widths, "the fused GEMM did not run on the chunks it fits"
        calls.clear()
