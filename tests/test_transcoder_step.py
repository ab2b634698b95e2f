"""The TopK and BatchTopK steps with a separate ``target`` (a transcoder): x [B, D_in] is encoded as it is,
the decoder [F, D_out] reconstructs target [B, D_out].

Checked against a plain-torch fp64 reference on the code the step selected (the selection itself is
checked to be a top-k of the same-dtype pre-activations), every output and gradient (x, the four
parameters and the target) under a random upstream gradient, in fp32, bf16 and fp16, by the parity
rule of ``parity.py``; the dead-latent loss with a target against the SAE step it must equal when
the target is x and b_dec is 0."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_parity, rel_err

STEPS = ("topk_sae_step", "batchtopk_sae_step")


@st.composite
def transcoder_shapes(draw):
    """(B, K, F, D_in, D_out): odd widths, D_in != D_out mostly, K not a power of 2 often, tiny F."""
    B = draw(st.integers(1, 8))
    K = draw(st.integers(1, 6))
    F = K + draw(st.integers(0, 40))
    return B, K, F, draw(st.integers(1, 40)), draw(st.integers(1, 40))


def _problem(shape, dtype, device, seed):
    B, K, F, D_in, D_out = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D_in, generator=g)
    target = torch.randn(B, D_out, generator=g)
    W_enc = torch.randn(F, D_in, generator=g) / D_in**0.5
    b_enc = torch.randn(F, generator=g) * 0.1
    W_dec = torch.randn(F, D_out, generator=g) / D_out**0.5
    b_dec = torch.randn(D_out, generator=g) * 0.1
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec, target)]


def _code_rows(out, B):
    """Per row, the selected latent ids (a [B, K] code, or the variable-length one)."""
    if out.code.indices.ndim == 2:
        return [out.code.indices[b] for b in range(B)]
    offsets = out.code.row_offsets.tolist()
    return [out.code.indices[offsets[b] : offsets[b + 1]] for b in range(B)]


def _reference_loss(x, W_enc, b_enc, W_dec, b_dec, target, rows, round_preacts=None):
    """mean over B*D_out of (b_dec + sum over the row's code of relu(pre) W_dec[f] - target)^2, the
    pre-activations computed at the code's entries only (x is not centred). ``round_preacts``: the
    pre-activations' values rounded to that dtype (gradients exact), the rounding every implementation
    in that dtype makes, as the encoder GEMM's output."""
    recon = []
    for b, ids in enumerate(rows):
        pre = W_enc[ids] @ x[b] + b_enc[ids]
        if round_preacts is not None:
            pre = pre + (pre.to(round_preacts).to(pre.dtype) - pre).detach()
        recon.append(b_dec + torch.relu(pre) @ W_dec[ids])
    return ((torch.stack(recon) - target) ** 2).mean()


def _check_selection(step, x, W_enc, b_enc, out, K, B):
    """The selected entries are a top-k (per row, or of the whole batch) of relu(pre), up to the rounding of
    two summation orders of the pre-activations."""
    pre = torch.relu(torch.addmm(b_enc, x, W_enc.t())).detach().double()
    tol = 1e-2 * float(pre.abs().max()) + 1e-6 if x.dtype != torch.float32 else 1e-5 * float(pre.abs().max()) + 1e-7
    chosen = torch.zeros_like(pre, dtype=torch.bool)
    for b, ids in enumerate(_code_rows(out, B)):
        chosen[b, ids] = True
    if step == "topk_sae_step":
        assert int(chosen.sum()) == B * K
        for b in range(B):
            if (~chosen[b]).any():
                assert pre[b][chosen[b]].min() >= pre[b][~chosen[b]].max() - tol
    else:
        assert int(chosen.sum()) == int(K * B)
        if (~chosen).any():
            assert pre[chosen].min() >= pre[~chosen].max() - tol


@pytest.mark.kernels_ci
@pytest.mark.parametrize("step", STEPS)
@given(shape=transcoder_shapes(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(shape=(5, 3, 17, 9, 4), dtype=torch.float32, seed=1)
@example(shape=(4, 3, 12, 7, 11), dtype=torch.bfloat16, seed=2)
@example(shape=(3, 5, 9, 13, 6), dtype=torch.float16, seed=3)
@example(shape=(1, 1, 1, 1, 1), dtype=torch.float32, seed=4)
@example(shape=(1, 1, 39, 31, 33), dtype=torch.bfloat16, seed=363)  # one entry: the rounding of pre dominates
def test_transcoder_step_parity(fs, device, step, shape, dtype, seed):
    B, K = shape[:2]
    inputs = _problem(shape, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = (torch.rand((), generator=g) + 0.5) * (1 if seed % 2 else -1)

    out = getattr(fs, step)(*inputs[:5], K, target=inputs[5])
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert out.aux_loss is None
    ours = torch.autograd.grad(out.loss, inputs, upstream.to(device))
    for t, gr in zip(inputs, ours):
        assert gr.dtype == t.dtype and gr.shape == t.shape
    _check_selection(step, *inputs[:3], out, K, B)

    rows = _code_rows(out, B)
    same = _reference_loss(*inputs, rows)
    same_grads = torch.autograd.grad(same, inputs, upstream.to(device=device, dtype=same.dtype))
    p64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = _reference_loss(*p64, rows)
    ref_grads = torch.autograd.grad(ref, p64, upstream.double().to(device))

    # torch's error is the larger of its own and that of exact arithmetic on the dtype-rounded
    # pre-activations (a rounding every implementation in the dtype makes; with one entry it can dominate)
    p_sh = [t.detach().double().requires_grad_() for t in inputs]
    shared = _reference_loss(*p_sh, rows, round_preacts=dtype)
    shared_grads = torch.autograd.grad(shared, p_sh, upstream.double().to(device))
    base = same if rel_err(same, ref) >= rel_err(shared, ref) else shared
    assert_parity(f"{step} loss", out.loss, base, ref, dtype)
    names = ("x", "W_enc", "b_enc", "W_dec", "b_dec", "target")
    for name, o, s, r, sh in zip(names, ours, same_grads, ref_grads, shared_grads):
        assert_parity(f"{step} d{name}", o, s if rel_err(s, r) >= rel_err(sh, r) else sh, r, dtype)
    y = p64[5].detach()
    fvu = ((ref.detach() * y.numel()) / ((y - y.mean(0)) ** 2).sum()).float().cpu()
    if B > 1:
        torch.testing.assert_close(out.fvu.cpu(), fvu, rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=0)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("dead_loss", ["auxk", "ghost"])
def test_target_equal_to_x_matches_the_sae_step_with_a_dead_loss(fs, device, step, dead_loss):
    """With b_dec = 0 the centring x - b_dec is x itself, so a step reconstructing target = x must give the
    SAE step's loss, aux_loss, code and weight gradients; x's gradient splits into dx (through the
    encoder) and dtarget (through the reconstruction's target), which add up to the SAE's dx."""
    torch.manual_seed(0)
    B, K, F, D = 6, 3, 40, 10
    x = torch.randn(B, D, device=device)
    W_enc = (torch.randn(F, D, device=device) / 3).requires_grad_()
    b_enc = (torch.randn(F, device=device) * 0.1).requires_grad_()
    W_dec = (torch.randn(F, D, device=device) / 3).requires_grad_()
    b_dec = torch.zeros(D, device=device, requires_grad=True)
    dead_mask = torch.zeros(F, dtype=torch.bool, device=device)
    dead_mask[::3] = True
    params = (W_enc, b_enc, W_dec)
    kw = dict(dead_loss=fs.DeadLatentLoss(dead_mask, kind=dead_loss, k_aux=4))

    x_sae = x.clone().requires_grad_()
    sae = getattr(fs, step)(x_sae, W_enc, b_enc, W_dec, b_dec, K, **kw)
    g_sae = torch.autograd.grad(sae.loss, (x_sae, *params))

    x_t, y_t = x.clone().requires_grad_(), x.clone().requires_grad_()
    tc = getattr(fs, step)(x_t, W_enc, b_enc, W_dec, b_dec, K, target=y_t, **kw)
    g_tc = torch.autograd.grad(tc.loss, (x_t, y_t, *params))

    assert torch.equal(sae.code.indices, tc.code.indices) and torch.equal(sae.fire_counts, tc.fire_counts)
    for what in ("loss", "aux_loss", "fvu", "mse", "l0"):
        torch.testing.assert_close(getattr(tc, what), getattr(sae, what), rtol=1e-5, atol=1e-6, msg=what)
    torch.testing.assert_close(tc.code.vals, sae.code.vals, rtol=1e-5, atol=1e-6, msg="vals")
    torch.testing.assert_close(g_tc[0] + g_tc[1], g_sae[0], rtol=1e-4, atol=1e-6, msg="dx + dtarget")
    for name, a, b in zip(("W_enc", "b_enc", "W_dec"), g_tc[2:], g_sae[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"d{name}")


@pytest.mark.parametrize("step", STEPS)
def test_target_is_validated_by_name(fs, device, step):
    B, K, F, D_in, D_out = 4, 2, 8, 6, 5
    x, W_enc, b_enc, W_dec, b_dec, target = (t.detach() for t in _problem((B, K, F, D_in, D_out), torch.float32,
                                                                           device, 0))  # fmt: skip
    run = getattr(fs, step)
    with pytest.raises(ValueError, match="target must be"):
        run(x, W_enc, b_enc, W_dec, b_dec, K, target=target[:, :-1])
    with pytest.raises(ValueError, match="target must be"):
        run(x, W_enc, b_enc, W_dec, b_dec, K, target=target[:-1])
    with pytest.raises(ValueError, match="b_dec must be"):
        run(x, W_enc, b_enc, W_dec, torch.zeros(D_in, device=device), K, target=target)
    with pytest.raises(ValueError, match="W_dec must have"):
        run(x, W_enc, b_enc, W_dec[:-1], b_dec, K, target=target)
    with pytest.raises(ValueError, match="target has dtype"):
        run(x, W_enc, b_enc, W_dec, b_dec, K, target=target.half())
    with pytest.raises(ValueError, match="target must be a torch.Tensor"):
        run(x, W_enc, b_enc, W_dec, b_dec, K, target=target.tolist())
    # without a target the decoder must have W_enc's shape, as before
    with pytest.raises(ValueError, match="W_dec must have W_enc's shape"):
        run(x, W_enc, b_enc, W_dec, torch.zeros(D_in, device=device), K)
