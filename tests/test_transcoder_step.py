"""The TopK and BatchTopK steps with a separate ``target`` (a transcoder): x [B, D_in] is encoded as it is,
the decoder [F, D_out] reconstructs target [B, D_out].

Checked against a plain-torch fp64 reference on the code the step selected (the selection itself is
checked to be a top-k of the same-dtype pre-activations), every output and gradient (x, the four
parameters and the target) under a random upstream gradient, in fp32, bf16 and fp16, by the parity
rule of ``parity.py``; the dead-latent loss with a target against the SAE step it must equal when
the target is x and b_dec is 0.

The JumpReLU, standard (sparse and dense), Gated (sparse and dense) and both Matryoshka steps with a
target: every output and gradient (the target's included) vs the fp64 reference (``testing.reference``
with ``target=``) at the step's own selection, in fp32, bf16 and fp16; the SAE step recovered exactly
from a transcoder fed x - b_dec that reconstructs target = x; bad targets, W_dec and b_dec named in
ValueErrors; opcheck of each registered op with a target."""

import sys

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


# The JumpReLU, standard, Gated and Matryoshka steps with a target -----------------------------------

FAMILY_STEPS = ("jumprelu", "standard", "standard_dense", "gated", "gated_dense", "matryoshka_topk",
                "matryoshka_batchtopk")  # fmt: skip
BANDWIDTH, L0_COEF, L1_COEF = 0.3, 0.1, 0.3
_SAE = ("x", "W_enc", "b_enc", "W_dec", "b_dec")


def _family_problem(step, shape, dtype, device, seed):
    """(tensors, names): the step's tensor arguments in its order (the threshold after b_dec for JumpReLU;
    b_gate = b_enc, r_mag, b_mag for Gated), the target last."""
    x, W_enc, b_enc, W_dec, b_dec, target = _problem(shape, dtype, device, seed)
    F = W_enc.shape[0]
    g = torch.Generator().manual_seed(seed + 7)
    if step == "jumprelu":
        threshold = (torch.rand(F, generator=g) * 0.6).to(device).requires_grad_()
        return [x, W_enc, b_enc, W_dec, b_dec, threshold, target], (*_SAE, "threshold", "target")
    if step.startswith("gated"):
        r_mag = (torch.randn(F, generator=g) * 0.3).to(device=device, dtype=dtype).requires_grad_()
        b_mag = (torch.randn(F, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_()
        names = ("x", "W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec", "target")
        return [x, W_enc, b_enc, r_mag, b_mag, W_dec, b_dec, target], names
    return [x, W_enc, b_enc, W_dec, b_dec, target], (*_SAE, "target")


def _sizes(F):
    return sorted({max(1, F // 3), F})


def _options(step, seed):
    """The step's non-tensor options, drawn from the seed: Gated's freeze_aux_decoder, the rescaling."""
    return dict(freeze=(seed // 2) % 2 == 0, rescale=seed % 3 == 0)


def _run_family(fs, step, tensors, K, seed, target):
    """The flash-sae step on ``tensors`` (its arguments without the target) with ``target``."""
    B, F = tensors[0].shape[0], tensors[1].shape[0]
    opts = _options(step, seed)
    if step == "jumprelu":
        return fs.jumprelu_sae_step(*tensors, capacity=B * F, bandwidth=BANDWIDTH, l0_coefficient=L0_COEF,
                                    target=target)  # fmt: skip
    if step == "standard":
        return fs.standard_sae_step(*tensors, capacity=B * F, l1_coefficient=L1_COEF, target=target)
    if step == "standard_dense":
        return fs.standard_sae_step_dense(*tensors, l1_coefficient=L1_COEF, target=target)
    if step == "gated":
        return fs.gated_sae_step(*tensors, capacity=B * F, l1_coefficient=L1_COEF,
                                 freeze_aux_decoder=opts["freeze"], target=target)  # fmt: skip
    if step == "gated_dense":
        return fs.gated_sae_step_dense(*tensors, l1_coefficient=L1_COEF, freeze_aux_decoder=opts["freeze"],
                                       target=target)  # fmt: skip
    if step == "matryoshka_topk":
        return fs.matryoshka_topk_sae_step(*tensors, K, _sizes(F), target=target)
    return fs.matryoshka_batchtopk_sae_step(*tensors, K, _sizes(F), target=target,
                                           rescale_acts_by_decoder_norm=opts["rescale"])  # fmt: skip


def _collected(out, B, F):
    """The variable-length code as a dense [B, F] (values) and the [B, F] mask of its entries."""
    n = int(out.code.row_offsets[-1])
    rows = torch.repeat_interleave(torch.arange(B, device=out.code.indices.device), out.code.row_offsets.diff())
    ids = out.code.indices[:n]
    dense = torch.zeros(B, F, device=ids.device, dtype=out.code.vals.dtype).index_put((rows, ids), out.code.vals[:n])
    return dense, torch.zeros(B, F, device=ids.device, dtype=torch.bool).index_put((rows, ids), torch.tensor(True))


def _forced(fs, step, tensors, out, K):
    """The reference's forced selection: flash-sae's code (or, for the dense steps and JumpReLU's band,
    the same-dtype pre-activations' rule, as those steps' own tests take it)."""
    ref = fs.testing.reference
    x, W_enc, b_enc = (t.detach() for t in tensors[:3])
    B, F = x.shape[0], W_enc.shape[0]
    if step == "jumprelu":
        z = ref.encoder_preacts(x, W_enc, b_enc)
        active, band = ref.jumprelu_masks(z, tensors[5].detach().to(z.dtype), BANDWIDTH)
        assert int(out.count) == int((active | band).sum()) and torch.equal(_collected(out, B, F)[1], active | band)
        return dict(masks=(active, band))
    if step == "standard":
        return dict(active=_collected(out, B, F)[1])
    if step == "standard_dense":
        return dict(active=torch.addmm(b_enc, x, W_enc.T) > 0)
    if step == "gated":
        code, opened = _collected(out, B, F)
        return dict(masks=(opened, code > 0))
    if step == "gated_dense":
        r_mag, b_mag = tensors[3].detach(), tensors[4].detach()
        P = x.float() @ W_enc.float().T
        return dict(
            masks=((P + b_enc.float()).to(x.dtype) > 0, (P * r_mag.float().exp() + b_mag.float()).to(x.dtype) > 0)
        )
    if step == "matryoshka_topk":
        return dict(indices=out.code.indices.view(B, K))
    rows = torch.repeat_interleave(torch.arange(B, device=x.device), out.code.row_offsets.diff())
    return dict(selection=(rows, out.code.indices))


def _reference_family(fs, step, tensors, K, seed, forced):
    """The fp64-able plain-torch reference of ``step`` on ``tensors`` (the target last), at ``forced``."""
    ref = fs.testing.reference
    *args, target = tensors
    F = args[1].shape[0]
    opts = _options(step, seed)
    if step == "jumprelu":
        return ref.jumprelu_sae_step(*args, BANDWIDTH, L0_COEF, target=target, **forced)
    if step.startswith("standard"):
        return ref.standard_sae_step(*args, L1_COEF, target=target, **forced)
    if step.startswith("gated"):
        return ref.gated_sae_step(*args, L1_COEF, opts["freeze"], target=target, **forced)
    if step == "matryoshka_topk":
        return ref.matryoshka_topk_sae_step(*args, K, _sizes(F), target=target, **forced)
    return ref.matryoshka_batchtopk_sae_step(*args, K, _sizes(F), opts["rescale"], target=target, **forced)


@pytest.mark.parametrize("step", FAMILY_STEPS)
@given(shape=transcoder_shapes(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(shape=(5, 3, 17, 9, 4), dtype=torch.float32, seed=1)
@example(shape=(4, 3, 12, 7, 11), dtype=torch.bfloat16, seed=2)
@example(shape=(3, 5, 9, 13, 6), dtype=torch.float16, seed=3)
@example(shape=(1, 1, 1, 1, 1), dtype=torch.float32, seed=4)
@example(shape=(1, 2, 23, 31, 33), dtype=torch.bfloat16, seed=363)
def test_family_transcoder_step_parity(fs, device, step, shape, dtype, seed):
    """Loss, mse, fvu and every gradient (the target's included) under a random upstream gradient vs the
    fp64 reference at the step's own selection, by the parity rule: torch's error is the larger of its
    same-dtype one and that of exact arithmetic at the dtype's roundings of the pre-activations."""
    B, K = shape[:2]
    tensors, names = _family_problem(step, shape, dtype, device, seed)
    out = _run_family(fs, step, tensors[:-1], K, seed, tensors[-1])
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    g = torch.Generator().manual_seed(seed + 1)
    upstream = ((torch.rand((), generator=g) + 0.5) * (1 if seed % 2 else -1)).to(device)
    ours = torch.autograd.grad(out.loss, tensors, upstream)
    forced = _forced(fs, step, tensors, out, K)

    same = _reference_family(fs, step, tensors, K, seed, forced)
    same_grads = torch.autograd.grad(same.loss, tensors, upstream.to(same.loss.dtype))
    p64 = [t.detach().double().requires_grad_() for t in tensors]
    r = _reference_family(fs, step, p64, K, seed, forced)
    r_grads = torch.autograd.grad(r.loss, p64, upstream.double())
    p_sh = [t.detach().double().requires_grad_() for t in tensors]
    sh = _reference_family(fs, step, p_sh, K, seed, dict(forced, round_preacts=dtype))
    sh_grads = torch.autograd.grad(sh.loss, p_sh, upstream.double())

    def base(s, h, r_):
        return s if rel_err(s, r_) >= rel_err(h, r_) else h

    assert_parity(f"{step} loss", out.loss, base(same.loss, sh.loss, r.loss), r.loss, dtype)
    assert_parity(f"{step} mse", out.mse, base(same.mse, sh.mse, r.mse), r.mse, dtype)
    if B > 1:
        assert_parity(f"{step} fvu", out.fvu, base(same.fvu, sh.fvu, r.fvu), r.fvu, dtype)
    for name, o, s, r_, h, t in zip(names, ours, same_grads, r_grads, sh_grads, tensors):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert_parity(f"{step} d{name}", o, base(s, h, r_), r_, dtype)


@pytest.mark.parametrize("step", FAMILY_STEPS)
def test_target_x_with_the_centring_folded_in_equals_the_sae_step(fs, device, step):
    """A transcoder fed x - b_dec (the SAE's centring, done by torch and differentiated through) that
    reconstructs target = x is the SAE step itself: the same loss, statistics and code, and the same
    gradient of every leaf (x's is the encoder's share through x - b_dec plus the target's; b_dec's
    the decoder's minus the centring's)."""
    shape, seed = (6, 3, 40, 10, 10), 5
    tensors, names = _family_problem(step, shape, torch.float32, device, seed)
    leaves = tensors[:-1]
    x, b_dec = leaves[0], leaves[names.index("b_dec")]
    sae = _run_family(fs, step, leaves, shape[1], seed, None)
    g_sae = torch.autograd.grad(sae.loss, leaves)
    folded = [x - b_dec, *leaves[1:]]
    tc = _run_family(fs, step, folded, shape[1], seed, x)
    g_tc = torch.autograd.grad(tc.loss, leaves)
    if sae.code is not None:
        assert torch.equal(sae.code.indices, tc.code.indices)
        torch.testing.assert_close(tc.code.vals, sae.code.vals, rtol=1e-5, atol=1e-6, msg="vals")
    assert torch.equal(sae.fire_counts, tc.fire_counts)
    for what in ("loss", "mse", "fvu", "l0"):
        torch.testing.assert_close(getattr(tc, what), getattr(sae, what), rtol=1e-5, atol=1e-6, msg=what)
    for name, a, b in zip(names, g_tc, g_sae):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("step", FAMILY_STEPS)
def test_family_target_is_validated_by_name(fs, device, step):
    shape = (4, 2, 8, 6, 5)
    tensors, names = _family_problem(step, shape, torch.float32, device, 0)
    *args, target = (t.detach() for t in tensors)
    i_w, i_b = names.index("W_dec"), names.index("b_dec")

    def run(**swap):
        new = [swap.get(n, t) for n, t in zip(names[:-1], args)]
        return _run_family(fs, step, new, shape[1], 0, swap["target"] if "target" in swap else target)

    cases = [
        (dict(target=target[:, :-1]), "target must be"),
        (dict(target=target[:-1]), "target must be"),
        (dict(target=target.half()), "target has dtype"),
        (dict(target=target.tolist()), "target must be a torch.Tensor"),
        (dict(target=target.to("meta")), "target is on meta"),
        (dict(b_dec=torch.zeros(shape[3], device=device)), "b_dec must be"),
        (dict(b_dec=args[i_b].half()), "b_dec has dtype"),
        (dict(b_dec=args[i_b].to("meta")), "b_dec is on meta"),
        (dict(W_dec=args[i_w][:-1]), "W_dec must have"),
        (dict(W_dec=args[i_w].half()), "W_dec has dtype"),
        (dict(W_dec=args[i_w].to("meta")), "W_dec is on meta"),
    ]
    for swap, match in cases:
        with pytest.raises(ValueError, match=match):
            run(**swap)
    # without a target the decoder must have W_enc's shape, as before
    with pytest.raises(ValueError, match="W_dec must have W_enc's shape"):
        run(target=None, b_dec=torch.zeros(shape[3], device=device))


def _op_inputs(step, tensors, names, K):
    """The registered op's inputs by name, for a transcoder problem."""
    B, F = tensors[0].shape[0], tensors[1].shape[0]
    named = {n: t.detach() for n, t in zip(names, tensors)}
    if step == "jumprelu":
        return dict(named, bandwidth=BANDWIDTH, l0_coefficient=L0_COEF, capacity=B * F)
    if step in ("standard", "gated"):
        extra = dict(freeze_aux_decoder=False) if step == "gated" else {}
        rows = dict(decoder_norm_groups=1, l2_loss_groups=0) if step == "standard" else {}  # not a crosscoder
        return dict(named, l1_coefficient=L1_COEF, capacity=B * F, **extra, **rows)
    no_dead = dict(dead_mask=None, dead_offset=None, dead=[0, 0, 0, 1, 1], aux_coef=0.0)  # DeadLossSpec().to_op()
    if step == "matryoshka_topk":  # the TopK op with Matryoshka's levels
        return dict(named, k=K, prefix_sizes=_sizes(F), **no_dead)
    rows = dict(decoder_norm_groups=1, l2_loss_groups=0)  # not a crosscoder
    return dict(named, n=K * B, prefix_sizes=_sizes(F), rescale_acts_by_decoder_norm=True, **rows, **no_dead)


@pytest.mark.parametrize("step", ("jumprelu", "standard", "gated", "matryoshka_topk", "matryoshka_batchtopk"))
def test_family_transcoder_opcheck(fs, device, step):
    """The registered op and its backward with a target: fakes, schema and autograd agree (opcheck), the
    target's gradient needed or not."""
    registry = sys.modules[fs.__name__ + "._registry"]
    op = registry.REGISTERED[step.removeprefix("matryoshka_") + "_sae_step"]
    tensors, names = _family_problem(step, (4, 3, 13, 7, 5), torch.float32, device, 11)
    inputs = _op_inputs(step, tensors, names, 3)
    args = tuple(inputs[n] for n in op.inputs)
    torch.library.opcheck(op.op, args)
    named = dict(zip(op.outputs, op.op(*args)))
    grads_ = [torch.full_like(named[n], 0.7) for n in op.differentiable]
    saved = [inputs[n] if n in inputs else named[n] for n in op.saved]
    for need_target in (True, False):
        needs = [n != "target" or need_target for n in op.grad_inputs]
        torch.library.opcheck(op.backward_op, (*grads_, *saved, needs))
