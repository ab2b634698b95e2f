"""Input drawing and checks shared by the encoder and full-step tests."""

import sys

import torch
from parity import ATOL, assert_parity, grads


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
    return sys.modules[fs.__name__ + "._common"].TUNING


def check_selection(fs, x, W_enc, b_enc, k, b_dec, vals, indices):
    """The code is exactly the reference's top-k of the same-dtype pre-activations, tie rule included,
    and a valid top-k of the exact (fp64) pre-activations up to the dtype's rounding of them."""
    ref = fs.reference
    with torch.no_grad():
        pre = ref.encoder_preacts(x, W_enc, b_enc, b_dec)
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
    ref = fs.reference
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


__all__ = ["ATOL", "check_encoder_grads", "check_selection", "make_sae", "tuning"]
