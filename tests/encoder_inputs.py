"""Input drawing and checks shared by the encoder and full-step tests."""

import torch
from hypothesis import strategies as st
from parity import ATOL, assert_parity, grads, package_module, rel_err

# The interpreter runs one backward program per latent, so CPU draws keep F in the hundreds.
MAX_F_EXTRA = 30000 if torch.cuda.is_available() else 300


@st.composite
def step_shapes(draw):
    """(B, D, F): B = 1 included, odd D, tiny F (drawn in the order B, F, D)."""
    B = draw(st.integers(1, 8))
    F = draw(st.one_of(st.integers(1, 9), st.integers(100, 100 + MAX_F_EXTRA)))
    D = draw(st.one_of(st.integers(1, 40), st.integers(250, 300)))
    return B, D, F


def make_sae(B, D, F, K, dtype, device, *, seed, integer=False):
    """x, W_enc, b_enc, W_dec, b_dec (requires_grad), scaled like a trained SAE.

    ``integer`` draws small integers instead, so pre-activations tie exactly
    (every dtype represents them, and every summation order gives the same sum).
    """
    g = torch.Generator().manual_seed(seed)
    if integer:
        x = torch.randint(-2, 3, (B, D), generator=g).float()
        W_enc = torch.randint(-1, 2, (F, D), generator=g).float()
        b_enc = torch.randint(-3, 3, (F,), generator=g).float()
        b_dec = torch.zeros(D)
    else:
        x = torch.randn(B, D, generator=g)
        W_enc = torch.randn(F, D, generator=g) / D**0.5
        b_enc = torch.randn(F, generator=g) * 0.1
        b_dec = torch.randn(D, generator=g) * 0.1
    W_dec = torch.randn(F, D, generator=g) / D**0.5
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return cast(x), cast(W_enc), cast(b_enc), cast(W_dec), cast(b_dec)


def tuning(fs):
    """The live TUNING dict of the loaded kernel (tests shrink tiles to reach every merge level)."""
    return package_module(fs, "_launch").TUNING


def assert_gemm_close(pre, xc, W, b):
    """``pre`` [B, w] (a dtype) is torch's ``addmm(b, xc, W.T)`` up to the summation order: equal, or apart by
    at most one unit in the last place of the dtype plus both fp32 accumulations' error bound,
    D * 2^-24 * sum |x_i w_i| each (a sum in another order rounds differently only that far)."""
    theirs = torch.addmm(b, xc, W.T)
    a, r = pre.double(), theirs.double()
    top = torch.maximum(a.abs(), r.abs()).clamp_min(torch.finfo(pre.dtype).tiny)
    ulp = torch.finfo(pre.dtype).eps * torch.exp2(torch.floor(torch.log2(top)))
    absum = xc.double().abs() @ W.double().abs().T + b.double().abs()
    bound = ulp + 2 * xc.shape[1] * 2.0**-24 * absum
    close = (a == r) | (a.isnan() & r.isnan()) | ((a - r).abs() <= bound)
    assert close.all(), f"not torch's addmm up to the summation order at {int((~close).sum())} entries"


def selected_preacts(fs, x, W_enc, b_enc, k, b_dec):
    """The same-dtype pre-activations a TopK selection of ``k`` ran on, [B, F]: the package's GEMM output
    chunk by chunk (``select.preacts.pre_chunks`` as ``topk_preacts`` calls it: torch's ``addmm``, or where it
    applies the fused GEMM of ``primitives/preacts_gemm.py``, which sums in its own order), checked to be
    torch's up to the summation order (``assert_gemm_close``)."""
    sel = package_module(fs, "primitives.select.preacts")
    with torch.no_grad():
        xc = x - b_dec if b_dec is not None else x
        pre = torch.cat([p.clone() for _, p, _ in sel.pre_chunks(xc, W_enc, b_enc, k)], dim=1)
        assert_gemm_close(pre, xc, W_enc, b_enc)
    return pre


def check_selection(fs, x, W_enc, b_enc, k, b_dec, vals, indices):
    """The code is exactly the reference's top-k of the same-dtype pre-activations it was selected from
    (``selected_preacts``), tie rule included, and a valid top-k of the exact (fp64) pre-activations up
    to the dtype's rounding of them."""
    ref = fs.testing.reference
    with torch.no_grad():
        pre = selected_preacts(fs, x, W_enc, b_enc, k, b_dec)
        r_vals, r_idx = ref.topk_select(pre, k)
        assert torch.equal(indices.cpu(), r_idx.cpu()), "selection differs from the reference tie rule"
        assert torch.equal(vals.cpu(), torch.relu(r_vals).cpu())
        pre64 = ref.encoder_preacts(*(t.double() if t is not None else None for t in (x, W_enc, b_enc, b_dec)))
        chosen = pre64.gather(1, indices)
        rest = pre64.scatter(1, indices, float("-inf"))
        slack = 4 * torch.finfo(x.dtype).eps * pre64.abs().amax(1) + 1e-12
        assert (chosen.amin(1) >= rest.amax(1) - slack).all(), "a latent outside the code beats one inside"


def check_encoder_grads(fs, params, k, indices, upstream, dtype):
    """Gradients of <upstream, vals> to x, W_enc, b_enc (and b_dec, when ``params`` holds it) vs the
    fp64 reference at the same code."""
    ref = fs.testing.reference
    x, W_enc, b_enc, *rest = params
    b_dec = rest[0] if rest else None
    vals, _ = fs.topk_encode(x, W_enc, b_enc, k, b_dec)
    ours = grads(vals, params, upstream)
    same_vals, _ = ref.topk_encode(x, W_enc, b_enc, k, b_dec, indices=indices)
    same = grads(same_vals, params, upstream)
    p64 = [p.detach().double().requires_grad_() for p in params]
    r_vals, _ = ref.topk_encode(*p64[:3], k, p64[3] if rest else None, indices=indices)
    r = grads(r_vals, p64, upstream.double())
    assert_parity("topk_encode vals", vals, same_vals, r_vals, dtype)
    for name, a, b, c, p in zip(("x", "W_enc", "b_enc", "b_dec"), ours, same, r, params):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert_parity(f"topk_encode d{name}", a, b, c, dtype)


def encoder_upstream(vals, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(vals.shape, generator=g).to(vals)


def step_upstream(seed):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand((), generator=g) + 0.5) * (1 if seed % 2 else -1)


STEP_NAMES = ("x", "W_enc", "b_enc", "W_dec", "b_dec")


def check_encode_parity(fs, shape, dtype, device, *, centred, seed):
    """topk_encode's code (exact selection, tie rule) and every gradient under a random upstream gradient."""
    B, D, F, K = shape
    x, W_enc, b_enc, _, b_dec = make_sae(B, D, F, K, dtype, device, seed=seed)
    b_dec = b_dec if centred else None
    vals, indices = fs.topk_encode(x, W_enc, b_enc, K, b_dec)
    assert vals.shape == (B, K) and vals.dtype == dtype and indices.dtype == torch.int64
    assert (vals[:, :-1] >= vals[:, 1:]).all(), "the code is not in descending order"
    check_selection(fs, x, W_enc, b_enc, K, b_dec, vals, indices)
    params = [x, W_enc, b_enc] + ([b_dec] if b_dec is not None else [])
    check_encoder_grads(fs, params, K, indices, encoder_upstream(vals, seed), dtype)


def check_step_parity(fs, shape, dtype, device, *, seed):
    """topk_sae_step's loss, FVU, fire counts, code and all five gradients against the fp64 reference."""
    B, D, F, K = shape
    params = list(make_sae(B, D, F, K, dtype, device, seed=seed))
    out = fs.topk_sae_step(*params, K)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert out.fire_counts.shape == (F,) and out.fire_counts.dtype == torch.int64
    check_selection(fs, params[0], params[1], params[2], K, params[4], out.code.vals, out.code.indices)
    up = step_upstream(seed).to(device)
    ours = grads(out.loss, params, up)

    ref = fs.testing.reference
    same = ref.topk_sae_step(*params, K, indices=out.code.indices)
    same_grads = grads(same.loss, params, up.to(same.loss.dtype))
    p64 = [p.detach().double().requires_grad_() for p in params]
    r = ref.topk_sae_step(*p64, K, indices=out.code.indices)
    r_grads = grads(r.loss, p64, up.double())

    # The encoder GEMM's output rounding (to the dtype) is part of every implementation in that dtype,
    # ours included (the same cuBLAS call), and with K >> D it can dominate the loss through cancellation.
    # So torch's error for the loss is the larger of torch's own and that shared rounding's alone:
    # exact arithmetic on the dtype-rounded code (``out.code.vals`` equals it bitwise; check_selection checked).
    x64, W_dec64, b_dec64 = (t.detach().double() for t in (params[0], params[3], params[4]))
    shared = ref.sparse_decode(out.code.vals.double(), out.code.indices, W_dec64, b_dec64) - x64
    shared_loss = shared.pow(2).mean()
    shared_fvu = shared.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()
    loss_base = same.loss if rel_err(same.loss, r.loss) >= rel_err(shared_loss, r.loss) else shared_loss
    assert_parity("topk_sae_step loss", out.loss, loss_base, r.loss, dtype)
    if B > 1:  # the FVU of one row divides by a zero variance
        fvu_base = same.fvu if rel_err(same.fvu, r.fvu) >= rel_err(shared_fvu, r.fvu) else shared_fvu
        assert_parity("topk_sae_step fvu", out.fvu, fvu_base, r.fvu, dtype)
    # Fire counts are of the same-dtype code (an entry fires when its value in the dtype is > 0; in fp64 a
    # pre-activation near 0 can have the other sign), so the same-dtype reference is the exact comparison.
    assert torch.equal(out.fire_counts, same.fire_counts)
    assert int(out.fire_counts.sum()) == int((out.code.vals > 0).sum())
    # Gradients too carry the code's shared rounding: torch's error for each is at least that of exact
    # arithmetic at the dtype-rounded x - b_dec and pre-activations (values rounded, gradients exact).
    p_sh = [p.detach().double().requires_grad_() for p in params]
    sh = ref.topk_sae_step(*p_sh, K, indices=out.code.indices, round_preacts=dtype)
    sh_grads = grads(sh.loss, p_sh, up.double())
    for name, a, b, c, d, p in zip(STEP_NAMES, ours, same_grads, r_grads, sh_grads, params):
        assert a.dtype == p.dtype and a.shape == p.shape
        base = b if rel_err(b, c) >= rel_err(d, c) else d
        assert_parity(f"topk_sae_step d{name}", a, base, c, dtype)


__all__ = [
    "ATOL",
    "STEP_NAMES",
    "assert_gemm_close",
    "check_encode_parity",
    "check_encoder_grads",
    "check_selection",
    "selected_preacts",
    "check_step_parity",
    "encoder_upstream",
    "make_sae",
    "step_shapes",
    "step_upstream",
    "tuning",
]
