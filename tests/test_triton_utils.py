"""primitives/triton_utils.cast_rtne: fp32 -> bf16 / fp16 in a kernel, bit-exact with torch's cast,
NaN payloads included (on the GPU, arithmetic on a NaN yields 0x7FFFFFFF, the payload a bare
round-to-nearest-even on the integer bits would carry into -0.0)."""

import pytest
import torch
import triton
import triton.language as tl
from parity import package_module

_cast = None  # the package's cast_rtne, bound before the first launch


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, _cast(x, y_ptr.dtype.element_ty), mask=mask)


BITS = [
    0x7FFFFFFF,  # the GPU's NaN from arithmetic
    0xFFFFFFFF,  # its negative
    0x7FC00000,  # the canonical quiet NaN
    0xFFC00000,
    0x7F800001,  # a signalling NaN with a one-bit payload
    0x7FBFFFFF,  # a signalling NaN with the largest payload
    0x7F800000,  # +inf
    0xFF800000,  # -inf
    0x7F7FFFFF,  # the largest finite fp32 (rounds to +inf in bf16)
    0x3F808000,  # 1 + 2^-8: a tie, to even (1.0)
    0x3F818000,  # 1 + 3 * 2^-8: a tie, to even (up)
    0x3F808001,  # just above the tie
    0x00000001,  # the smallest subnormal
    0x80000000,  # -0.0
]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cast_rtne_matches_torch_and_keeps_nan(fs, device, dtype):
    global _cast
    _cast = package_module(fs, "primitives.triton_utils").cast_rtne
    g = torch.Generator().manual_seed(0)
    random = (torch.randn(200, generator=g) * 10 ** torch.randint(-30, 30, (200,), generator=g).float()).view(
        torch.int32
    )
    bits = torch.cat([torch.tensor(BITS, dtype=torch.int64).to(torch.int32), random])
    x = bits.view(torch.float32).to(device)
    y = torch.empty(x.numel(), dtype=dtype, device=device)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(dtype)
    nan = torch.isnan(x)
    assert torch.isnan(y[nan]).all(), "a NaN must stay a NaN"
    if dtype == torch.bfloat16:  # fp16 uses the hardware's cast, whose NaN is unsigned on the GPU
        assert (torch.signbit(y[nan]) == torch.signbit(x[nan])).all(), "a NaN keeps its sign"
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16)), "bit-exact with torch's cast"
