"""Cross-layer transcoders (TopK, BatchTopK, JumpReLU per layer): every output and gradient against the fp64
reference (``reference.cross_layer_transcoder_step``), determinism, nothing [B, F] saved, bad input."""

import pytest
import torch
from encoder_inputs import make_sae, step_shapes
from hypothesis import example, given
from hypothesis import strategies as st
from parity import ATOL, DTYPES, assert_parity, fast_tier_keeps, grads, package_module, rel_err

RULES = ("topk", "batchtopk", "jumprelu")


def _module(fs, rule, D, F, k, L, dtype, device, seed, **kwargs):
    cls = {"topk": fs.TopKCrossLayerTranscoder, "batchtopk": fs.BatchTopKCrossLayerTranscoder,
           "jumprelu": fs.JumpReLUCrossLayerTranscoder}[rule]  # fmt: skip
    args = () if rule == "jumprelu" else (k,)
    if rule == "jumprelu":
        kwargs = {"sparsity_coefficient": 0.7, "tanh_scale": 1.3, "init_threshold": 0.2, "bandwidth": 0.5, **kwargs}
    m = cls(D, F, *args, n_layers=L, dtype=dtype, device=device, seed=seed, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # biases and thresholds away from their zero / constant init
        m.b_enc.copy_(torch.randn(L, F, generator=g) * 0.1)
        m.b_dec.copy_(torch.randn(L, D, generator=g) * 0.1)
        for w in m.W_dec:
            w.mul_(3.0)
        if rule == "jumprelu":
            m.log_threshold.copy_((torch.rand(L, F, generator=g) * 0.4 + 0.05).log())
    return m


def _data(B, L, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed + 2)
    xs = torch.randn(B, L, D, generator=g).to(device, dtype).requires_grad_()
    ys = (torch.randn(B, L, D, generator=g) * 0.5).to(device, dtype).requires_grad_()
    return xs, ys


def _forced(fs, rule, m, xs, code, dtype):
    """Each layer's selection as the module made it: the reference then computes at the same entries."""
    L, F, B = m.n_layers, m.n_features, xs.shape[0]
    ref = fs.testing.reference
    if rule == "topk":
        k = m.k
        return [code.indices[:, layer * k : (layer + 1) * k] - layer * F for layer in range(L)]
    if rule == "batchtopk":
        n = int(code.row_offsets[-1])
        rows = torch.repeat_interleave(torch.arange(B, device=xs.device), code.row_offsets.diff())
        ids = code.indices[:n]
        return [(rows[ids // F == layer], ids[ids // F == layer] - layer * F) for layer in range(L)]
    theta = m.log_threshold.detach().exp()
    out = []
    for layer in range(L):  # the masks from the same-dtype pre-activations the kernel compared
        z = ref.encoder_preacts(xs.detach()[:, layer], m.W_enc.detach()[layer], m.b_enc.detach()[layer])
        out.append(ref.jumprelu_masks(z, theta[layer].to(dtype), m.bandwidth))
    return out


def _reference(fs, rule, m, xs, ys, forced, cast):
    """The reference on ``cast`` copies of the module's parameters; returns (result dict, leaves)."""
    leaf = lambda t: cast(t.detach()).requires_grad_()  # noqa: E731
    W_enc, b_enc, b_dec = leaf(m.W_enc), leaf(m.b_enc), leaf(m.b_dec)
    W_dec = [leaf(w) for w in m.W_dec]
    xs_, ys_ = leaf(xs), leaf(ys)
    leaves = [xs_, ys_, W_enc, b_enc, *W_dec, b_dec]
    opts = {"k": getattr(m, "k", None)}
    if rule == "jumprelu":
        log_t = m.log_threshold.detach().clone().double().requires_grad_()
        if cast(torch.zeros(1)).dtype != torch.float64:
            log_t = m.log_threshold.detach().clone().requires_grad_()
        leaves.append(log_t)
        opts = dict(threshold=log_t.exp(), bandwidth=m.bandwidth, sparsity_coefficient=m.sparsity_coefficient,
                    tanh_scale=m.tanh_scale)  # fmt: skip
    ref = fs.testing.reference
    out = ref.cross_layer_transcoder_step(xs_, ys_, W_enc, b_enc, W_dec, b_dec, rule, forced, **opts)
    return out, leaves


def _params(m, xs, ys):
    extra = [m.log_threshold] if hasattr(m, "log_threshold") else []
    return [xs, ys, m.W_enc, m.b_enc, *m.W_dec, m.b_dec, *extra]


def check_clt_parity(fs, rule, shape, dtype, device, seed):
    B, L, D, F, k = shape
    m = _module(fs, rule, D, F, k, L, dtype, device, seed)
    xs, ys = _data(B, L, D, dtype, device, seed)
    out = m.loss(xs, ys)
    forced = _forced(fs, rule, m, xs, out.code, dtype)
    ref64, leaves64 = _reference(fs, rule, m, xs, ys, forced, lambda t: t.double())
    same, leaves_same = _reference(fs, rule, m, xs, ys, forced, lambda t: t.clone())
    up = torch.rand((), generator=torch.Generator().manual_seed(seed)) + 0.5
    names = ["xs", "ys", "W_enc", "b_enc", *[f"W_dec[{i}]" for i in range(L)], "b_dec"]
    if rule == "jumprelu":
        names.append("log_threshold")
        assert not bool(out.overflow)
    what = f"{rule} CLT {shape}"
    assert_parity(f"{what} loss", out.loss, same["loss"].float(), ref64["loss"], dtype)
    for name in ("mse", "l0", "layer_l0") + (("fvu", "layer_fvu") if B > 1 else ()):
        assert_parity(f"{what} {name}", getattr(out, name), same[name].float(), ref64[name], dtype)
    if rule == "jumprelu":
        assert_parity(f"{what} sparsity_loss", out.sparsity_loss, same["sparsity_loss"], ref64["sparsity_loss"], dtype)
    dense = out.code.to_dense(L * F)
    want = torch.cat([a.detach() for a in ref64["acts"]], 1)
    assert_parity(f"{what} code", dense, torch.cat([a.detach() for a in same["acts"]], 1), want, dtype)
    params = _params(m, xs, ys)
    ours = grads(out.loss, params, up.to(device))
    theirs = grads(same["loss"], leaves_same, up.to(device, same["loss"].dtype))
    exact = grads(ref64["loss"], leaves64, up.double().to(device))
    for name, a, b, c, p in zip(names, ours, theirs, exact, params):
        assert a.dtype == p.dtype and a.shape == p.shape, name
        assert_parity(f"{what} d{name}", a, b, c, dtype)


@st.composite
def clt_shapes(draw):
    """(B, L, D, F, k): B = 1 included, L in 1..4, odd D, tiny F, k not a power of 2 often."""
    k = draw(st.integers(1, 5))
    return (draw(st.integers(1, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 13)), k + draw(st.integers(0, 9)), k)


@pytest.mark.parametrize("rule", RULES)
@given(shape=clt_shapes(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
# pinned: each dtype, B = 1, L = 1 and L = 4, odd D, F = k
@example(shape=(5, 3, 7, 11, 3), dtype=torch.float32, seed=1)
@example(shape=(1, 4, 9, 6, 3), dtype=torch.bfloat16, seed=2)
@example(shape=(4, 1, 5, 3, 3), dtype=torch.float16, seed=3)
def test_clt_parity(fs, device, rule, shape, dtype, seed):
    check_clt_parity(fs, rule, shape, dtype, device, seed)


@pytest.mark.parametrize("rule", fast_tier_keeps(2, ("jumprelu", "topk", "batchtopk")))
def test_clt_is_deterministic(fs, device, rule):
    """Two steps on one input give bitwise equal losses, codes and gradients (B > F: segments repeat)."""
    runs = []
    for _ in range(2):
        m = _module(fs, rule, 5, 6, 2, 3, torch.float32, device, seed=4)
        xs, ys = _data(10, 3, 5, torch.float32, device, seed=4)
        out = m.loss(xs, ys)
        runs.append((out.loss, out.code.vals, out.code.indices, *grads(out.loss, _params(m, xs, ys), None)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", RULES)
def test_clt_keeps_nothing_batch_by_features(fs, device, rule):
    """No tensor autograd saves for the backward has B * F or more elements (nor B * L * F)."""
    B, L, D, F = 24, 2, 4, 16
    kwargs = {"capacity_per_row": 4} if rule == "jumprelu" else {}
    m = _module(fs, rule, D, F, 3, L, torch.float32, device, seed=5, **kwargs)
    xs, ys = _data(B, L, D, torch.float32, device, seed=5)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m.loss(xs, ys)
    assert sizes and max(sizes) < B * F, f"a saved tensor of {max(sizes)} elements (B * F = {B * F})"
    out.loss.backward()


@pytest.mark.parametrize("rule", fast_tier_keeps(2, ("jumprelu", "topk", "batchtopk")))
def test_clt_code_layout(fs, device, rule):
    """The code is over L * F ids (layer l's latent f at l * F + f): fire_counts and l0 are its counts,
    encode is loss's code and decode(encode(xs)) is forward(xs)."""
    B, L, D, F = 6, 3, 5, 9
    m = _module(fs, rule, D, F, 2, L, torch.float32, device, seed=6)
    xs, ys = _data(B, L, D, torch.float32, device, seed=6)
    out = m.loss(xs, ys)
    dense = out.code.to_dense(L * F)
    assert torch.equal((dense > 0).sum(0), out.fire_counts)
    assert float(out.l0) == pytest.approx(float((dense > 0).sum()) / B)
    per_layer = (dense > 0).view(B, L, F).sum((0, 2)).float() / B
    torch.testing.assert_close(out.layer_l0, per_layer)
    assert torch.equal(m.encode(xs).to_dense(L * F), dense)
    torch.testing.assert_close(m.decode(m.encode(xs)), m(xs))
    torch.testing.assert_close(out.mse, (m(xs).float() - ys.float()).pow(2).mean())


def test_jumprelu_clt_capacity_grows_and_reports_overflow(fs, device):
    """A capacity too small says so (overflow), and the next step sizes it from the count it saw."""
    m = _module(fs, "jumprelu", 5, 12, 0, 2, torch.float32, device, seed=7, capacity_per_row=1)
    xs, ys = _data(8, 2, 5, torch.float32, device, seed=7)
    first = m.loss(xs, ys)
    assert bool(first.overflow)
    second = m.loss(xs, ys)
    assert not bool(second.overflow)
    m.capacity_per_row = 1  # inference counts first: forward and encode drop nothing whatever the capacity
    ref, _ = _reference(fs, "jumprelu", m, xs, ys, None, lambda t: t.clone())
    torch.testing.assert_close(m(xs), ref["ys_hat"].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.encode(xs).to_dense(2 * 12), torch.cat([a.detach() for a in ref["acts"]], 1))


def test_clt_dead_latent_counts(fs, device):
    m = _module(fs, "topk", 5, 7, 2, 2, torch.float32, device, seed=8, dead_window_tokens=1)
    xs, ys = _data(3, 2, 5, torch.float32, device, seed=8)
    out = m.loss(xs, ys)
    assert m.tokens_since_fired.shape == (14,)
    assert torch.equal(m.tokens_since_fired == 0, out.fire_counts > 0)
    m.loss(xs, ys)
    assert torch.equal(m.dead_mask(), out.fire_counts == 0)


def test_clt_fp32_matches_reference_exactly_enough(fs, device):
    """A plain fp32 sanity check at one shape, outside hypothesis: loss to 1e-6 of the fp64 reference."""
    m = _module(fs, "topk", 7, 10, 3, 3, torch.float32, device, seed=9)
    xs, ys = _data(5, 3, 7, torch.float32, device, seed=9)
    out = m.loss(xs, ys)
    ref, _ = _reference(
        fs, "topk", m, xs, ys, _forced(fs, "topk", m, xs, out.code, torch.float32), lambda t: t.double()
    )
    assert rel_err(out.loss, ref["loss"]) < ATOL[torch.float32]


# Bad input -----------------------------------------------------------------------------


def _bad_cases(device):
    B, L, D = 3, 2, 5
    good = torch.randn(B, L, D)
    return [
        ("xs", dict(xs=torch.randn(B, L + 1, D))),  # a wrong layer count
        ("ys", dict(ys=torch.randn(B, L - 1, D))),
        ("xs", dict(xs=torch.randn(B, L, D + 1))),
        ("ys", dict(ys=torch.randn(B + 1, L * D))),
        ("xs", dict(xs=good.double())),  # dtypes
        ("ys", dict(ys=good.half())),
        ("xs", dict(xs=torch.randn(0, L, D))),
        ("ys", dict(ys=torch.empty(B, L, D, device="meta"))),  # another device
    ]


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("rule", RULES)
def test_clt_rejects_bad_input(fs, device, rule, case):
    name, override = _bad_cases(device)[case]
    m = _module(fs, rule, 5, 6, 2, 2, torch.float32, "cpu", seed=1)
    args = {"xs": torch.randn(3, 2, 5), "ys": torch.randn(3, 2, 5), **override}
    with pytest.raises(ValueError, match=name):
        m.loss(**args)


def test_clt_rejects_a_wrong_decoder_triangle(fs):
    m = _module(fs, "topk", 5, 6, 2, 3, torch.float32, "cpu", seed=1)
    m.W_dec[1] = torch.nn.Parameter(torch.randn(6, 3 * 5))  # layer 1 writes to 2 layers, not 3
    with pytest.raises(ValueError, match=r"W_dec\[1\]"):
        m.loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    m.W_dec[1] = torch.nn.Parameter(torch.randn(6, 2 * 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"W_dec\[1\]"):
        m.loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    tensors = {f"{k}": v for f in _module(fs, "topk", 5, 6, 2, 3, torch.float32, "cpu", seed=1)
               .to_circuit_tracer().values() for k, v in f.items()}  # fmt: skip
    tensors["W_dec_2"] = torch.randn(6, 2, 5)
    with pytest.raises(ValueError, match="W_dec_2"):
        fs.TopKCrossLayerTranscoder.from_circuit_tracer(tensors, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_layers=0), "n_layers"),
        (dict(n_layers=2.5), "n_layers"),
        (dict(n_layers=2, k=7), "k"),
        (dict(n_layers=2, k=0), "k"),
    ],
)
def test_topk_clt_rejects_bad_arguments(fs, kwargs, match):
    k = kwargs.pop("k", 2)
    with pytest.raises(ValueError, match=match):
        fs.TopKCrossLayerTranscoder(5, 6, k, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(sparsity_coefficient=-1.0), "sparsity_coefficient"), (dict(bandwidth=0.0), "bandwidth"),
     (dict(tanh_scale=-2.0), "tanh_scale"), (dict(capacity_per_row=0), "capacity_per_row")],
)  # fmt: skip
def test_jumprelu_clt_rejects_bad_arguments(fs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fs.JumpReLUCrossLayerTranscoder(5, 6, n_layers=2, **kwargs)


@pytest.mark.parametrize("name", fast_tier_keeps(1, ("jumprelu_clt", "topk_clt", "batchtopk_clt")))
def test_clt_registry_builds_and_trains(fs, device, name):
    """``arch.build(d_model, n_features, sparsity, n_layers=L)`` builds the module; three SGD steps run."""
    arch = fs.ARCHITECTURES[name]
    assert arch.family == "clt" and arch.result is fs.CrossLayerTranscoderStep
    m = arch.build(5, 8, 2 if arch.sparsity == "k" else 1e-3, n_layers=3, seed=0, device=device)
    assert isinstance(m, arch.module) and m.n_features == 8 and m.n_layers == 3
    xs, ys = _data(6, 3, 5, torch.float32, device, seed=3)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    for _ in range(3):
        step = m.loss(xs.detach(), ys.detach())
        assert type(step)._fields[: len(fs.STEP_FIELDS)] == fs.STEP_FIELDS
        assert step.layer_fvu.shape == (3,) and step.layer_l0.shape == (3,) and step.fire_counts.shape == (24,)
        step.loss.backward()
        m.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        m.after_optimizer_step()
    assert torch.isfinite(step.loss)


# The per-layer encode ops ----------------------------------------------------------------


def check_encode_op_parity(fs, rule, shape, dtype, device, seed):
    """``batchtopk_encode`` / ``jumprelu_encode``: the code (scattered to [B, F]) and every gradient under a
    random upstream gradient, against ``reference.clt_layer_acts`` at the op's own selection."""
    B, D, F, K = shape
    ref = fs.testing.reference
    x, W_enc, b_enc, _, _ = make_sae(B, D, F, K, dtype, device, seed=seed)
    params, opts = [x, W_enc, b_enc], {"k": K}
    if rule == "batchtopk":
        vals, ids, offsets = fs.batchtopk_encode(x, W_enc, b_enc, K)
        assert vals.shape == (B * K,) and int(offsets[-1]) == B * K
    else:
        g = torch.Generator().manual_seed(seed + 3)
        theta = (torch.rand(F, generator=g) * 0.3 + 0.01).to(device).requires_grad_()
        params.append(theta)
        vals, ids, offsets, count = fs.jumprelu_encode(x, W_enc, b_enc, theta, capacity=B * F, bandwidth=0.3)
        assert int(count) == int(offsets[-1]) <= B * F
    n = int(offsets[-1])
    rows = torch.repeat_interleave(torch.arange(B, device=device), offsets.diff())
    ours = torch.zeros(B, F, device=device, dtype=dtype).index_put((rows, ids[:n]), vals[:n])
    if rule == "batchtopk":
        forced = (rows, ids[:n])
    else:
        z = ref.encoder_preacts(x.detach(), W_enc.detach(), b_enc.detach())
        forced = ref.jumprelu_masks(z, theta.detach().to(dtype), 0.3)
        assert torch.equal(forced[0], ours.detach() > 0), "the active set is not the same-dtype z > theta"
        opts = {"threshold": theta, "bandwidth": 0.3}
    up = torch.randn(B, F, generator=torch.Generator().manual_seed(seed)).to(device)
    same = ref.clt_layer_acts(x, W_enc, b_enc, rule, forced, **opts)
    p64 = [p.detach().double().requires_grad_() for p in params]
    opts64 = dict(opts, threshold=p64[3]) if rule == "jumprelu" else opts
    exact = ref.clt_layer_acts(*p64[:3], rule, forced, **opts64)
    assert_parity(f"{rule}_encode code", ours, same, exact, dtype)
    names = ["x", "W_enc", "b_enc", "threshold"]
    ours_g = grads((ours.float() * up).sum(), params, None)
    same_g = grads((same.float() * up).sum(), params, None)
    exact_g = grads((exact * up.double()).sum(), p64, None)
    for name, a, b, c, p in zip(names, ours_g, same_g, exact_g, params):
        assert a.dtype == p.dtype and a.shape == p.shape, name
        assert_parity(f"{rule}_encode d{name}", a, b, c, dtype)


@pytest.mark.parametrize("rule", ["batchtopk", "jumprelu"])
@given(shape=step_shapes(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), k=st.integers(1, 5))
@example(shape=(1, 7, 3), dtype=torch.bfloat16, seed=1, k=3)
@example(shape=(5, 9, 11), dtype=torch.float16, seed=2, k=2)
@example(shape=(4, 13, 6), dtype=torch.float32, seed=3, k=5)
def test_encode_op_parity(fs, device, rule, shape, dtype, seed, k):
    B, D, F = shape
    if F > 40:  # the interpreter's per-latent programs: keep the op-level draws small
        F = 40
    check_encode_op_parity(fs, rule, (B, D, F, min(k, F)), dtype, device, seed)


# The hub layer ----------------------------------------------------------------------------


class HostCLT(torch.nn.Module):
    """A plain-torch TopK CLT host (the layout ``layers.TopKCrossLayerTranscoder`` reads): dense encode, top-k."""

    def __init__(self, clt):
        super().__init__()
        self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k = clt.W_enc, clt.b_enc, clt.W_dec, clt.b_dec, clt.k

    def forward(self, xs):
        L, D = self.b_dec.shape
        acts = [torch.relu(torch.topk(xs[:, i] @ self.W_enc[i].T + self.b_enc[i], self.k).values) for i in range(L)]
        ids = [torch.topk(xs[:, i] @ self.W_enc[i].T + self.b_enc[i], self.k).indices for i in range(L)]
        dense = [xs.new_zeros(xs.shape[0], self.W_enc.shape[1]).scatter(1, j, a) for a, j in zip(acts, ids)]
        return torch.stack(
            [self.b_dec[t] + sum(dense[i] @ self.W_dec[i].view(-1, L - i, D)[:, t - i] for i in range(t + 1))
             for t in range(L)], 1)  # fmt: skip


def test_topk_clt_hub_layer(fs, device):
    """kernels' validation accepts the layer; run as the host's forward it gives the module's ys_hat and the
    fp64 reference's gradients (it has a backward)."""
    from kernels.layer.layer import _validate_layer

    layer = fs.layers.TopKCrossLayerTranscoder
    _validate_layer(check_cls=HostCLT, cls=layer, repo="flash-sae layers.TopKCrossLayerTranscoder")
    assert layer.__init__ is torch.nn.Module.__init__ and layer.has_backward is True
    m = _module(fs, "topk", 5, 9, 3, 3, torch.float32, device, seed=11)
    xs, _ = _data(6, 3, 5, torch.float32, device, seed=11)
    host = HostCLT(m)
    ours = layer.forward(host, xs)
    assert torch.equal(ours, m(xs))
    torch.testing.assert_close(ours, host(xs), rtol=1e-5, atol=1e-6)
    up = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ours_g = grads((ours * up).sum(), [xs, m.W_enc, *m.W_dec], None)
    forced = _forced(fs, "topk", m, xs, m.encode(xs), torch.float32)
    out, leaves = _reference(fs, "topk", m, xs, xs, forced, lambda t: t.double())
    exact = grads((out["ys_hat"] * up.double()).sum(), [leaves[0], leaves[2], *leaves[4 : 4 + m.n_layers]], None)
    for a, b in zip(ours_g, exact):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
def test_clt_parity_on_the_torch_path(fs, rule, dtype, monkeypatch):
    """CPU tensors without the Triton interpreter (what a CPU user runs): the plain-torch branches of the
    same ops keep the parity rule for every output and gradient."""
    monkeypatch.setattr(package_module(fs, "_launch"), "CPU_RUNS_TRITON", False)
    check_clt_parity(fs, rule, (7, 3, 9, 13, 4), dtype, "cpu", seed=12)
