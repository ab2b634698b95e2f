"""Shared test helpers: the tolerance table, the parity rule and input drawing.

The rule (one place, every test): for each output and gradient,

    err(flash-sae) <= 2 * err(plain torch in the same dtype) + ATOL[dtype]

where err(x) = ||x - ref||_2 / ||ref||_2 against the fp64 reference computed
on the same inputs. ATOL only absorbs the case where torch happens to be
(nearly) exact: about one unit roundoff of the output rounding for bf16 and
fp16. For fp32 it is 1e-5: outputs that are sums with cancellation (dbias =
s * sum_b r_b with tiny B*D, say) amplify the harmless difference between two
fp32 summation orders (and the GPU's fused multiply-adds) far past 2x; one
H100 run hit 2.9e-6 against torch's 7.7e-7 at B=6, D=1. A real bug (a wrong
row, bf16 accumulation) is 1e-3 or worse, so 1e-5 still catches it.
"""

import sys

import pytest
import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fast_tier_keeps(n, values, ids=None, *, unpack=False):
    """``parametrize`` values of which the fast tier runs the first ``n`` and the full tier (``--full``) all:
    the rest are marked ``slow``. For the heaviest parametrizations, whose every case the full tier keeps.
    ``unpack``: each value is a tuple of several argument values (``parametrize("a,b", ...)``)."""
    ids = ids if ids is not None else [None] * len(values)
    return [
        v
        if i < n and ids[i] is None
        else pytest.param(*(v if unpack else (v,)), marks=() if i < n else pytest.mark.slow, id=ids[i])
        for i, v in enumerate(values)
    ]


# opcheck runs an op a dozen times; the fast tier keeps fp32 and leaves bf16/fp16 to the full one.
OPCHECK_DTYPES = fast_tier_keeps(1, DTYPES, ids=[None, "bfloat16", "float16"])

ATOL = {
    torch.float32: 1e-5,  # fp32 in another summation order; see the docstring
    torch.bfloat16: 4e-3,  # one bf16 rounding of the output: 2^-8 relative at worst
    torch.float16: 5e-4,  # one fp16 rounding of the output: 2^-11 relative at worst
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    return (x - ref).norm().item() / denom if denom > 0 else (x - ref).norm().item()


def assert_same_across_shapes(what: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Two computations of one result over differently shaped pieces (F chunks, latent shards): equal bit
    for bit on a GPU, where the pre-activation tiles do not depend on the piece's width. On a CPU the
    pre-activations come from torch's CPU matmul, whose result for one entry can change in its last bit
    with the matrix's width (torch 2.13's AVX-512 kernels do, on the AMD EPYC machines this project has
    run on; its AVX2 ones did not): there floating results agree to 1e-5 (relative to the largest
    entry), integer ones (indices, counts) exactly."""
    if a.is_cuda or not a.is_floating_point():
        assert torch.equal(a, b), what
    else:
        scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=what)


def assert_parity(what: str, ours, same_dtype, ref64, dtype) -> None:
    e_ours = rel_err(ours, ref64)
    e_torch = rel_err(same_dtype, ref64)
    bound = 2 * e_torch + ATOL[dtype]
    assert e_ours <= bound, (
        f"{what} ({dtype}): flash-sae error {e_ours:.3e} > 2 x torch's {e_torch:.3e} + {ATOL[dtype]:.0e}"
    )


def torch_baseline(same, ref, shared):
    """What torch's error is measured from: of its same-dtype result and exact arithmetic at the dtype's
    shared roundings (``round_preacts``), the one further from the fp64 reference ``ref``."""
    return same if rel_err(same, ref) >= rel_err(shared, ref) else shared


def assert_gradient_parity(what, names, ours, same, ref, shared, params, dtype):
    """Each gradient has its parameter's dtype and shape, is finite, and keeps the parity rule against
    ``torch_baseline``."""
    for name, a, b, c, d, p in zip(names, ours, same, ref, shared, params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert torch.isfinite(a).all() or not torch.isfinite(c).all(), f"{what} d{name} is not finite"
        assert_parity(f"{what} d{name}", a, torch_baseline(b, c, d), c, dtype)


def make_inputs(B, K, F, D, dtype, device, *, seed, duplicates=False, index_dtype=torch.int64):
    """A random sparse code and decoder problem; values scaled like a trained SAE."""
    g = torch.Generator().manual_seed(seed)
    if duplicates:
        # Draw from a few latents only, so rows repeat latents.
        pool = torch.randint(0, F, (max(1, K // 2),), generator=g)
        indices = pool[torch.randint(0, pool.numel(), (B, K), generator=g)]
    else:
        rows = [torch.randperm(F, generator=g)[:K] for _ in range(B)]
        indices = torch.stack(rows) if B else torch.empty(0, K, dtype=torch.long)
    weight = torch.randn(F, D, generator=g) / D**0.5
    vals = torch.rand(B, K, generator=g) * 2 + 0.1
    bias = torch.randn(D, generator=g) * 0.1
    target = torch.randn(B, D, generator=g) * 0.5
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return (
        indices.to(device=device, dtype=index_dtype),
        cast(weight),
        cast(vals),
        cast(bias),
        cast(target),
    )


def grads(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream, allow_unused=False)


def problem_shapes(max_b=8, max_k=12, max_d=300):
    """(B, K, F, D): B >= 1, K not a power of 2 often, F from K (tiny) to a few hundred,
    D from 1 to past one 256-wide block, odd sizes included."""
    from hypothesis import strategies as st

    @st.composite
    def shapes(draw):
        B = draw(st.integers(1, max_b))
        K = draw(st.integers(1, max_k))
        F = K + draw(st.one_of(st.integers(0, 8), st.integers(100, 300)))
        D = draw(st.one_of(st.integers(1, 40), st.integers(250, max_d)))
        return B, K, F, D

    return shapes()


def check_loss_parity(fs, op, shape, dtype, device, *, seed, duplicates=False, index_dtype=torch.int64):
    """Loss and every gradient (weight, vals, bias, target) under a random upstream scalar."""
    reference = fs.testing.reference
    B, K, F, D = shape
    indices, weight, vals, bias, target = make_inputs(
        B, K, F, D, dtype, device, seed=seed, duplicates=duplicates, index_dtype=index_dtype
    )
    params = [weight, vals, bias, target]
    g = torch.Generator().manual_seed(seed + 1)
    upstream = (torch.rand((), generator=g) + 0.5) * (1 if seed % 2 else -1)

    ours = getattr(fs, op)(indices, *params)
    assert ours.dtype == torch.float32 and ours.shape == ()
    ours_grads = grads(ours, params, upstream.to(device))
    for p, gr in zip(params, ours_grads):
        assert gr.dtype == p.dtype and gr.shape == p.shape

    same = getattr(reference, op)(indices, *params)
    same_grads = grads(same, params, upstream.to(device=device, dtype=same.dtype))

    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = getattr(reference, op)(indices, *p64)
    ref_grads = grads(ref, p64, upstream.double().to(device))

    assert_parity(f"{op} loss", ours, same, ref, dtype)
    for name, a, b, c in zip(("weight", "vals", "bias", "target"), ours_grads, same_grads, ref_grads):
        assert_parity(f"{op} d{name}", a, b, c, dtype)


def check_decode_parity(fs, shape, dtype, device, *, seed, duplicates=False, with_bias=True, index_dtype=torch.int64):
    """sparse_decode's x_hat and its gradients (vals, weight, bias) under a random upstream gradient."""
    B, K, F, D = shape
    indices, weight, vals, bias, _ = make_inputs(
        B, K, F, D, dtype, device, seed=seed, duplicates=duplicates, index_dtype=index_dtype
    )
    bias = bias if with_bias else None
    params = [vals, weight] + ([bias] if with_bias else [])
    # The upstream gradient has x_hat's dtype; the reference sees the same rounded values.
    upstream = torch.randn(B, D, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)

    ours = fs.sparse_decode(vals, indices, weight, bias)
    assert ours.dtype == dtype and ours.shape == (B, D)
    ours_grads = grads(ours, params, upstream)

    same = fs.testing.reference.sparse_decode(vals, indices, weight, bias)
    same_grads = grads(same, params, upstream)

    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = fs.testing.reference.sparse_decode(p64[0], indices, p64[1], p64[2] if with_bias else None)
    ref_grads = grads(ref, p64, upstream.double())

    assert_parity("x_hat", ours, same, ref, dtype)
    for name, a, b, c in zip(("vals", "weight", "bias"), ours_grads, same_grads, ref_grads):
        assert a.dtype == dtype
        assert_parity(f"d{name}", a, b, c, dtype)


# Running the decode and loss ops (their determinism on the torch path; contract checks in test_op_contract.py)

LOSS_OPS = ("topk_sae_loss", "hierarchical_topk_sae_loss")


def call_op(fs, op, inputs):
    """Runs an op and its backward; returns (output, grads of the float inputs)."""
    indices, weight, vals, bias, target = inputs
    if op == "sparse_decode":
        params = [vals, weight, bias]
        out = fs.sparse_decode(vals, indices, weight, bias)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    else:
        params = [weight, vals, bias, target]
        out = getattr(fs, op)(indices, weight, vals, bias, target)
        upstream = torch.tensor(-1.7, device=out.device)
    return out, grads(out, params, upstream)


def check_deterministic(fs, op, device):
    inputs = make_inputs(33, 24, 50, 130, torch.float32, device, seed=11, duplicates=True)
    out1, g1 = call_op(fs, op, inputs)
    out2, g2 = call_op(fs, op, inputs)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b), "gradients differ between two identical calls"


def package_module(fs, name):
    """A submodule of the loaded package, e.g. ``package_module(fs, "_launch")``."""
    return sys.modules[f"{fs.__name__}.{name}"]
