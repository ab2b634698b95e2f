"""Small Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even, bit-exact with torch's casts.

    bf16 is rounded by integer arithmetic on the fp32 bits: the GPU's own
    conversion is already RTNE, but Triton's CPU interpreter truncates, and CI
    runs the kernels there. The cost is a few integer ops per stored element. A NaN stays a
    NaN of its sign (torch's cast gives one too).
    """
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        # A NaN becomes the quiet NaN of its sign first: on the GPU arithmetic on a NaN gives the
        # payload 0x7FFFFFFF, which the rounding below would carry into the sign bit (-0.0).
        u = tl.where(x != x, (u & 0x80000000) | 0x7FC00000, u)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def load_latent(idx_ptr, vals_ptr, offset, live, F):
    """Loads one (latent id, value) of the code at ``offset`` (masked by ``live``).

    An id outside [0, F) is replaced by 0, so the row it addresses is always in
    bounds, and its value by NaN, so whatever it feeds is visibly poisoned
    rather than silently wrong. Returns (int64 id, fp32 value); both are 0 when
    not ``live``.
    """
    idx = tl.load(idx_ptr + offset, mask=live, other=0).to(tl.int64)
    v = tl.load(vals_ptr + offset, mask=live, other=0.0).to(tl.float32)
    bad = live & ((idx < 0) | (idx >= F))
    return tl.where(bad, 0, idx), tl.where(bad, float("nan"), v)
