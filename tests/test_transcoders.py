"""The transcoder modules (TopK, BatchTopK, JumpReLU, standard; with and without the skip connection)
against the fp64 reference (``testing.reference.transcoder_step``).

A transcoder is an SAE module with a separate output width and target: x [B, D_in] is encoded as it
is, W_dec [F, D_out] predicts y [B, D_out], and with ``skip`` the step reconstructs y - x @ W_skip.T.
Checked here, at the module's own selection: the loss, mse, y's fvu and the gradient of every leaf
(x, y, W_enc, b_enc, W_dec, b_dec, the JumpReLU threshold, W_skip) under a random upstream gradient,
on drawn shapes (D_in != D_out, odd widths, B = 1, tiny F) in fp32, bf16 and fp16, by the parity rule
of ``parity.py``; ``forward`` against the dense formula; determinism; the bad inputs each named in a
ValueError. The peers (SAELens, circuit-tracer, sparsify) are in ``test_transcoder_peers.py``.
"""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_parity, torch_baseline

KINDS = ("topk", "batchtopk", "jumprelu", "standard")
BANDWIDTH, L0_COEF, L1_COEF = 0.3, 0.1, 0.3


@st.composite
def transcoder_shapes(draw):
    """(B, K, F, D_in, D_out): odd widths, D_in != D_out mostly, K not a power of 2 often, tiny F."""
    B = draw(st.integers(1, 8))
    K = draw(st.integers(1, 5))
    F = K + draw(st.integers(0, 30))
    return B, K, F, draw(st.integers(1, 24)), draw(st.integers(1, 24))


def build(fs, kind, shape, dtype, device, *, skip, seed=0, sparse=True, **kwargs):
    """The ``kind`` transcoder for ``shape`` with random, trained-looking parameters (W_skip nonzero)."""
    B, K, F, D_in, D_out = shape
    common = dict(d_out=D_out, skip=skip, dtype=dtype, device=device, seed=seed, **kwargs)
    if kind == "topk":
        m = fs.TopKTranscoder(D_in, F, K, **common)
    elif kind == "batchtopk":
        m = fs.BatchTopKTranscoder(D_in, F, K, **common)
    elif kind == "jumprelu":
        m = fs.JumpReLUTranscoder(D_in, F, bandwidth=BANDWIDTH, l0_coefficient=L0_COEF, **common)
    else:
        path = dict(dense_above=1.0, capacity_per_row=F) if sparse else dict(dense_above=0.0)
        m = fs.StandardTranscoder(D_in, F, l1_coefficient=L1_COEF, **path, **common)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        m.W_enc.copy_(torch.randn(F, D_in, generator=g) / D_in**0.5)
        m.b_enc.copy_(torch.randn(F, generator=g) * 0.1)
        m.W_dec.copy_(torch.randn(F, D_out, generator=g) / D_out**0.5)
        m.b_dec.copy_(torch.randn(D_out, generator=g) * 0.1)
        if kind == "jumprelu":
            m.threshold.copy_(torch.rand(F, generator=g) * 0.6)
        if skip:
            m.W_skip.copy_(torch.randn(D_out, D_in, generator=g) / D_in**0.5)
    return m


def pair(shape, dtype, device, seed):
    B, _, _, D_in, D_out = shape
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(B, D_in, generator=g).to(device=device, dtype=dtype).requires_grad_()
    y = (torch.randn(B, D_out, generator=g) * 0.7).to(device=device, dtype=dtype).requires_grad_()
    return x, y


def leaves(m):
    """The module's parameters by name (W_skip and the threshold where it has them)."""
    return dict(m.named_parameters())


def _code_rows(code, B):
    return torch.repeat_interleave(torch.arange(B, device=code.indices.device), code.row_offsets.diff())


def forced_selection(fs, kind, m, x, out):
    """The reference's arguments for the module's own selection (and, for JumpReLU and the dense standard
    step, the same-dtype pre-activations' rule, as those steps' own tests take it)."""
    ref = fs.testing.reference
    B, F = x.shape[0], m.n_features
    if kind == "topk":
        return dict(indices=out.code.indices)
    if kind == "batchtopk":
        n = int(out.code.row_offsets[-1])
        return dict(selection=(_code_rows(out.code, B), out.code.indices[:n]))
    z = ref.encoder_preacts(x.detach(), m.W_enc.detach(), m.b_enc.detach())
    if kind == "jumprelu":
        active, band = ref.jumprelu_masks(z, m.threshold.detach().to(z.dtype), BANDWIDTH)
        return dict(masks=(active, band))
    if out.code is None or out.code.indices is None:  # the dense formulation
        return dict(active=z > 0)
    n = int(out.code.row_offsets[-1])
    active = torch.zeros(B, F, dtype=torch.bool, device=x.device)
    active[_code_rows(out.code, B)[:n], out.code.indices[:n]] = True
    return dict(active=active)


def reference_step(fs, kind, m, x, y, p, forced):
    """``reference.transcoder_step`` of ``kind`` on x, y and the parameters ``p`` (by name)."""
    ref = fs.testing.reference
    enc_dec = [p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]]
    W_skip = p.get("W_skip")
    if kind == "topk":
        return ref.transcoder_step(ref.topk_transcoder_step, x, y, [*enc_dec, m.k], W_skip, **forced)
    if kind == "batchtopk":
        return ref.transcoder_step(ref.batchtopk_sae_step, x, y, [*enc_dec, m.k, True], W_skip, **forced)
    if kind == "jumprelu":
        params = [*enc_dec, p["threshold"], BANDWIDTH, L0_COEF]
        return ref.transcoder_step(ref.jumprelu_sae_step, x, y, params, W_skip, **forced)
    return ref.transcoder_step(ref.standard_sae_step, x, y, [*enc_dec, L1_COEF], W_skip, **forced)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("kind", KINDS)
@given(shape=transcoder_shapes(), dtype=st.sampled_from(DTYPES), skip=st.booleans(), seed=st.integers(0, 2**16))
@example(shape=(5, 3, 17, 9, 4), dtype=torch.float32, skip=True, seed=1)
@example(shape=(4, 3, 12, 7, 11), dtype=torch.bfloat16, skip=True, seed=2)
@example(shape=(3, 5, 9, 13, 6), dtype=torch.float16, skip=False, seed=3)
@example(shape=(1, 1, 1, 1, 1), dtype=torch.float32, skip=True, seed=4)
def test_transcoder_module_parity(fs, device, kind, shape, dtype, skip, seed):
    """loss(x, y): loss, mse, y's fvu and every gradient (x, y and each parameter, W_skip's included) vs
    the fp64 reference at the module's selection, by the parity rule: torch's error is the larger of
    its same-dtype one and that of exact arithmetic at the dtype's roundings (the pre-activations and
    the skip target)."""
    B = shape[0]
    m = build(fs, kind, shape, dtype, device, skip=skip, seed=seed, sparse=seed % 2 == 0)
    x, y = pair(shape, dtype, device, seed)
    out = m.loss(x, y)
    assert isinstance(out, fs.ARCHITECTURES[f"{kind}_transcoder"].result)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    names = ["x", "y", *leaves(m)]
    tensors = [x, y, *leaves(m).values()]
    g = torch.Generator().manual_seed(seed + 3)
    upstream = ((torch.rand((), generator=g) + 0.5) * (1 if seed % 2 else -1)).to(device)
    ours = torch.autograd.grad(out.loss, tensors, upstream)
    forced = forced_selection(fs, kind, m, x, out)

    def run(ts, **extra):
        named = dict(zip(names, ts))
        return reference_step(fs, kind, m, named["x"], named["y"], named, dict(forced, **extra))

    same = run(tensors)
    same_grads = torch.autograd.grad(same.loss, tensors, upstream.to(same.loss.dtype))
    p64 = [t.detach().double().requires_grad_() for t in tensors]
    r = run(p64)
    r_grads = torch.autograd.grad(r.loss, p64, upstream.double())
    p_sh = [t.detach().double().requires_grad_() for t in tensors]
    sh = run(p_sh, round_preacts=dtype)
    sh_grads = torch.autograd.grad(sh.loss, p_sh, upstream.double())

    for what in ("loss", "mse", "fvu") if B > 1 else ("loss", "mse"):
        a, b, c = (getattr(o, what) for o in (same, r, sh))
        assert_parity(f"{kind} {what}", getattr(out, what), torch_baseline(a, b, c), b, dtype)
    for name, o, s, r_, h, t in zip(names, ours, same_grads, r_grads, sh_grads, tensors):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert_parity(f"{kind} d{name}", o, torch_baseline(s, r_, h), r_, dtype)


def _dense_activation(kind, m):
    """The eval-mode code of ``m`` as a function of the pre-activations [B, F]."""
    if kind == "batchtopk":  # the inference threshold on pre * ||W_dec[f]||
        scale = m.W_dec.detach().double().norm(dim=1)
        return lambda z: torch.where(z * scale > m.threshold.double(), torch.relu(z), 0)
    if kind == "jumprelu":
        return lambda z: torch.where(z > m.threshold.detach().double(), z, 0)
    return torch.relu


@pytest.mark.parametrize("kind", ("batchtopk", "jumprelu", "standard"))
@pytest.mark.parametrize("skip", [False, True])
def test_forward_is_the_dense_prediction(fs, device, kind, skip):
    """Eval-mode forward(x) = b_dec + code(x @ W_enc.T + b_enc) @ W_dec (+ x @ W_skip.T), the fp64 formula."""
    shape = (6, 3, 20, 9, 5)
    m = build(fs, kind, shape, torch.float32, device, skip=skip).eval()
    if kind == "batchtopk":
        with torch.no_grad():
            m.threshold.fill_(0.05)
            m.threshold_updates.fill_(m.threshold_warmup_steps())
    x, _ = pair(shape, torch.float32, device, 0)
    x = x.detach()
    with torch.no_grad():
        ours = m(x)
    p = {n: t.detach().double() for n, t in leaves(m).items()}
    want = fs.testing.reference.transcoder_forward(
        x.double(), p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], _dense_activation(kind, m), p.get("W_skip")
    )
    assert ours.shape == (6, 5)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)


def test_topk_forward_and_its_gradient(fs, device):
    """TopK's forward (differentiable, as the SAE's) is the dense formula at its selection, W_skip's term included."""
    shape = (5, 3, 16, 7, 4)
    m = build(fs, "topk", shape, torch.float32, device, skip=True)
    x, _ = pair(shape, torch.float32, device, 1)
    out = m(x)
    vals, indices = m.encode(x)
    assert indices.shape == (5, 3)
    ref = fs.testing.reference
    p = [t.detach().double().requires_grad_() for t in (x, m.W_enc, m.b_enc, m.W_dec, m.b_dec, m.W_skip)]
    v64, _ = ref.topk_encode(p[0], p[1], p[2], 3, indices=indices)
    want = ref.sparse_decode(v64, indices, p[3], p[4]) + p[0] @ p[5].T
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).to(device)
    ours = torch.autograd.grad(out, [x, m.W_skip], upstream)
    theirs = torch.autograd.grad(want, [p[0], p[5]], upstream.double())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_skip_is_the_plain_transcoder(fs, device, kind):
    """At init W_skip is zero: the skip transcoder's step is the plain one's (loss, code, gradients)."""
    shape = (6, 3, 20, 9, 5)
    plain = build(fs, kind, shape, torch.float32, device, skip=False)
    skipped = build(fs, kind, shape, torch.float32, device, skip=True)
    with torch.no_grad():
        skipped.W_skip.zero_()
    x, y = (t.detach() for t in pair(shape, torch.float32, device, 0))
    a, b = plain.loss(x, y), skipped.loss(x, y)
    for what in ("loss", "mse", "fvu", "l0"):
        torch.testing.assert_close(getattr(b, what), getattr(a, what), rtol=1e-6, atol=1e-7, msg=what)
    ga = torch.autograd.grad(a.loss, list(plain.parameters()))
    gb = torch.autograd.grad(b.loss, [p for n, p in skipped.named_parameters() if n != "W_skip"])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_deterministic(fs, device, kind):
    shape = (7, 3, 24, 9, 6)
    x, y = pair(shape, torch.float32, device, 5)
    outs = []
    for _ in range(2):
        m = build(fs, kind, shape, torch.float32, device, skip=True)
        step = m.loss(x, y)
        outs.append((step.loss, *torch.autograd.grad(step.loss, [x, y, *m.parameters()])))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_training_loss_tracks_dead_latents_and_auxk_uses_the_output_width(fs, device):
    shape = (6, 3, 20, 9, 5)
    m = build(fs, "topk", shape, torch.float32, device, skip=True, dead_loss="auxk", dead_window_tokens=1)
    assert m.dead_loss.k_aux == 5 // 2  # sparsify's transcoder: y's width // 2
    x, y = (t.detach() for t in pair(shape, torch.float32, device, 0))
    first = m.loss(x, y)
    assert torch.equal(m.tokens_since_fired == 0, first.fire_counts > 0)
    second = m.loss(x, y)
    assert second.aux_loss is not None and torch.isfinite(second.aux_loss) and float(second.aux_loss.detach()) > 0
    m.eval()
    assert m.loss(x, y).aux_loss is None


def test_shapes_and_the_constructor(fs):
    m = fs.TopKTranscoder(9, 20, 3, d_out=5, skip=True, seed=0)
    assert (m.d_in, m.d_out, m.n_features, m.skip) == (9, 5, 20, True)
    assert m.W_enc.shape == (20, 9) and m.W_dec.shape == (20, 5) and m.b_dec.shape == (5,)
    assert m.W_skip.shape == (5, 9) and not m.W_skip.any()
    torch.testing.assert_close(m.W_dec.norm(dim=1), torch.ones(20))  # TopK: unit-norm decoder rows
    assert fs.JumpReLUTranscoder(9, 20).d_out == 9 and fs.JumpReLUTranscoder(9, 20).W_skip is None
    half = fs.StandardTranscoder(9, 20, d_out=5, skip=True, dtype=torch.bfloat16)
    assert half.W_skip.dtype == torch.bfloat16
    assert "d_out=5, skip=True" in repr(half)


def test_bad_input_is_named(fs, device):
    m = build(fs, "topk", (4, 2, 10, 6, 5), torch.float32, device, skip=True)
    x, y = (t.detach() for t in pair((4, 2, 10, 6, 5), torch.float32, device, 0))
    cases = [
        ((x[:, :-1], y), "x must be"),  # D_in mismatch
        ((x, y[:, :-1]), "y must be"),  # D_out mismatch
        ((x, y[:-1]), "y must be"),  # other rows
        ((x, x), "y must be"),  # the input's width where the output's belongs
        ((x.unsqueeze(0), y), "x must be 2-D"),
        ((x, y.unsqueeze(0)), "y must be 2-D"),
        ((x, y.half()), "y has dtype"),
        ((x.half(), y), "x has dtype"),
        ((x, y.to("meta")), "y is on meta"),
        ((x, y.tolist()), "y must be a torch.Tensor"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            m.loss(*args)
    with pytest.raises(ValueError, match="x has D="):
        m(x[:, :-1])
    with pytest.raises(ValueError, match="d_out"):
        fs.TopKTranscoder(6, 10, 2, d_out=0)
    with pytest.raises(ValueError, match="d_in"):
        fs.JumpReLUTranscoder(0, 10)
    with pytest.raises(ValueError, match="skip"):
        fs.StandardTranscoder(6, 10, skip="yes")
    with pytest.raises(ValueError, match="skip_term"):
        build(fs, "topk", (4, 2, 10, 6, 5), torch.float32, device, skip=False).skip_term(x)
    with pytest.raises(NotImplementedError, match="resample_dead_"):
        m.resample_dead_(x)
