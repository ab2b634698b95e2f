"""Small Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even, bit-exact with torch's casts.

    bf16 is rounded by integer arithmetic on the fp32 bits: the GPU's own
    conversion is already RTNE, but Triton's CPU interpreter truncates, and CI
    runs the kernels there. The cost is a few integer ops per stored element.
    """
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
