"""flash-sae's transcoders against the installed peers.

- The transcoder modules' files: ``to_saelens`` loaded by SAELens's ``SAE.load_from_disk`` (its
  ``Transcoder``, ``SkipTranscoder``, ``JumpReLUTranscoder``, ``JumpReLUSkipTranscoder``) and
  ``to_circuit_tracer`` / ``circuit_tracer_transcoder_set`` loaded by circuit-tracer's
  ``load_relu_transcoder`` / ``load_transcoder_set``: the same code, decode and prediction on raw
  activations; ``from_saelens`` reads the export back.
- ``TopKTranscoder.loss(x, y)`` (with and without W_skip, with and without AuxK) against sparsify's
  ``SparseCoder`` with ``transcode=True`` (and ``skip_connection=True``): selection, FVU, loss and every
  gradient, by the parity rule with sparsify in fp64 the ground truth.

The TopK step with a target against the installed sparsify's transcoder (``SparseCoderConfig(transcode=True)``,
its defaults otherwise): the same selection, FVU and gradients of its training loss (the FVU).

sparsify's transcoder encodes x without centring and reconstructs y, as ``target=`` does. Its loss is
sum (y - y_hat)^2 / total variance of y; flash-sae's step loss is the mean over B * D of the same squared
error, so the gradients agree after the factor B * D / total variance. Run on CPU tensors (sparsify's
forward autocasts CUDA tensors to bf16; see ``peers.sparsify_coder``).
"""

import json
import sys

import pytest
import torch
from parity import assert_parity, fast_tier_keeps, rel_err
from peers import require, sparsify_coder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_transcoder_matches_sparsify(fs, dtype):
    B, D, F, k = 16, 24, 96, 5
    coder, _ = sparsify_coder(D, "cpu", dtype, num_latents=F, k=k, transcode=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.randn(F, D, generator=g) / D**0.5)
        coder.encoder.bias.copy_(torch.randn(F, generator=g) * 0.1)
        coder.W_dec.copy_(torch.randn(F, D, generator=g) / D**0.5)  # its transcoder starts at 0; drawn here
        coder.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
    x = torch.randn(B, D, generator=g).to(dtype)
    y = (torch.randn(B, D, generator=g) * 0.7).to(dtype)
    params = [coder.encoder.weight, coder.encoder.bias, coder.W_dec, coder.b_dec]

    theirs = coder(x, y)
    their_grads = torch.autograd.grad(theirs.fvu, params)

    ours_params = [p.detach().clone().requires_grad_() for p in params]
    ours = fs.topk_sae_step(x, *ours_params, k, target=y)
    total_variance = (y.float() - y.float().mean(0)).pow(2).sum()
    our_grads = torch.autograd.grad(ours.loss * (B * D) / total_variance, ours_params)

    theirs_sorted = theirs.latent_indices.sort(dim=1).values
    assert torch.equal(ours.code.indices.sort(dim=1).values, theirs_sorted), "a different selection"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.fvu, theirs.fvu.float(), rtol=tol, atol=0)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), our_grads, their_grads):
        assert rel_err(a, b) <= tol, f"d{name}: {rel_err(a, b):.2e} from sparsify's"


def test_saelens_transcoders_load_but_do_not_train():
    """The README's architecture table: the installed SAELens has transcoder classes (to load and run them)
    and no training class for any of them."""
    import inspect

    transcoder = require("sae_lens.saes.transcoder")
    training_sae = require("sae_lens.saes.sae").TrainingSAE
    classes = [c for _, c in inspect.getmembers(transcoder, inspect.isclass) if c.__module__ == transcoder.__name__]
    assert any(c.__name__ == "Transcoder" for c in classes)
    assert not [c.__name__ for c in classes if issubclass(c, training_sae)]


# The transcoder modules: SAELens's and circuit-tracer's files, sparsify's training loss ---------------

D_IN, D_OUT, F = 12, 9, 20
IN_SCALE, OUT_SCALE = 1.7, 0.6  # the module read x * IN_SCALE and predicted y * OUT_SCALE in training
MODULES = {  # name: (class, constructor options, SAELens architecture without / with skip)
    "standard": ("StandardTranscoder", {}, ("transcoder", "skip_transcoder")),
    "jumprelu": ("JumpReLUTranscoder", {}, ("jumprelu_transcoder", "jumprelu_skip_transcoder")),
    "jumprelu-log": ("JumpReLUTranscoder", dict(threshold_parameterization="log"),
                     ("jumprelu_transcoder", "jumprelu_skip_transcoder")),
    "batchtopk": ("BatchTopKTranscoder", dict(k=4), ("jumprelu_transcoder", "jumprelu_skip_transcoder")),
}  # fmt: skip


@pytest.fixture
def torch_path(fs, monkeypatch):
    """The modules on flash-sae's plain-torch path (the kernels' own tests cover the interpreter)."""
    monkeypatch.setattr(sys.modules[fs.__name__ + "._launch"], "CPU_RUNS_TRITON", False)


def trained_like(fs, name, skip, d_in=D_IN, d_out=D_OUT):
    """An eval-mode transcoder whose parameters look trained (decoder rows of varied norm, nonzero biases
    and W_skip, a threshold that splits the code), and raw inputs x [64, d_in]."""
    cls, kwargs, _ = MODULES[name]
    m = getattr(fs, cls)(d_in, F, **kwargs, d_out=d_out, skip=skip, seed=1).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        m.W_enc.copy_(torch.randn(F, d_in, generator=g) / d_in**0.5)
        m.W_dec.copy_(torch.randn(F, d_out, generator=g) * (torch.rand(F, 1, generator=g) + 0.3))
        m.b_enc.copy_(torch.randn(F, generator=g) * 0.1)
        m.b_dec.copy_(torch.randn(d_out, generator=g) * 0.1)
        if skip:
            m.W_skip.copy_(torch.randn(d_out, d_in, generator=g) / d_in**0.5)
        x = torch.randn(64, d_in, generator=g) * IN_SCALE
        pre = x @ m.W_enc.T + m.b_enc
        if name.startswith("jumprelu"):
            theta = pre.abs().median(0).values * 0.5
            if name == "jumprelu":
                m.threshold.copy_(theta)
            else:
                m.log_threshold.copy_(theta.log())
        if name == "batchtopk":
            scaled = (pre * m.W_dec.norm(dim=1)).flatten().sort().values
            scaled = scaled[scaled > 0]
            n = scaled.numel() // 2  # between two entries: none sits on the threshold
            m.threshold.fill_(((scaled[n] + scaled[n + 1]) / 2).item())
            m.threshold_updates.fill_(m.threshold_warmup_steps())
    return m, x / IN_SCALE


def dense_code(fs, m, x):
    """The module's eval-mode code of x as a dense [B, F]."""
    with torch.no_grad():
        vals, indices, row_offsets = m.encode(x)
    return torch.relu(fs.SparseCode(vals, indices, row_offsets).to_dense(m.n_features))


def raw_prediction(m, x_raw):
    """The module's prediction of raw y from raw x (it was trained on scaled activations)."""
    with torch.no_grad():
        return m(x_raw * IN_SCALE) / OUT_SCALE


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("name", list(MODULES))
def test_saelens_loads_the_export_with_the_same_code_and_prediction(fs, torch_path, tmp_path, name, skip):
    """The files SAELens's ``SAE.load_from_disk`` reads: its transcoder class of the right architecture,
    with the same code (encode), decode and prediction (forward, W_skip's term included) on raw
    activations, the input and output scalings folded in."""
    sae_lens = require("sae_lens")
    save_file = require("safetensors.torch").save_file
    m, x_raw = trained_like(fs, name, skip)
    cfg, tensors = m.to_saelens(activation_scale=IN_SCALE, output_scale=OUT_SCALE, metadata={"hook_name": "h"})
    assert cfg["architecture"] == MODULES[name][2][skip] and cfg["d_out"] == D_OUT
    assert tensors["W_enc"].shape == (D_IN, F) and tensors["W_dec"].shape == (F, D_OUT)
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    classes = {
        "transcoder": "Transcoder",
        "skip_transcoder": "SkipTranscoder",
        "jumprelu_transcoder": "JumpReLUTranscoder",
        "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder",
    }
    assert type(theirs).__name__ == classes[cfg["architecture"]]
    with torch.no_grad():
        acts = theirs.encode(x_raw)
        ours = dense_code(fs, m, x_raw * IN_SCALE)
        assert torch.equal(acts != 0, ours != 0), "other active latents than SAELens's"
        assert 0.05 < float((acts != 0).float().mean()) < 0.95, "the test should exercise a partial code"
        torch.testing.assert_close(acts, ours, rtol=1e-5, atol=1e-5)
        want = raw_prediction(m, x_raw)
        torch.testing.assert_close(theirs(x_raw), want, rtol=1e-5, atol=1e-5)
        skip_raw = x_raw @ tensors["W_skip"].T if skip else 0
        torch.testing.assert_close(theirs.decode(acts) + skip_raw, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("name", list(MODULES))
def test_saelens_export_loads_back(fs, torch_path, name, skip):
    """from_saelens reads the export back (BatchTopK's as the JumpReLU transcoder it exports): the same
    prediction; unscaled, the same parameters exactly."""
    m, x_raw = trained_like(fs, name, skip)
    cfg, tensors = m.to_saelens(activation_scale=IN_SCALE, output_scale=OUT_SCALE)
    loads_as = fs.JumpReLUTranscoder if name == "batchtopk" else type(m)
    kwargs = {k: v for k, v in MODULES[name][1].items() if k != "k"}
    back = loads_as.from_saelens(cfg, tensors, **kwargs).eval()
    assert (back.d_in, back.d_out, back.skip) == (D_IN, D_OUT, skip)
    with torch.no_grad():
        torch.testing.assert_close(back(x_raw), raw_prediction(m, x_raw), rtol=1e-5, atol=1e-5)
    if name != "batchtopk":
        again = type(m).from_saelens(*m.to_saelens(), **kwargs)
        for (n, p), (_, q) in zip(m.named_parameters(), again.named_parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-6 if n == "log_threshold" else 0, atol=0, msg=n)


def test_saelens_format_is_checked_and_topk_has_none(fs, torch_path):
    m, _ = trained_like(fs, "jumprelu", True)
    cfg, tensors = m.to_saelens()
    load = fs.JumpReLUTranscoder.from_saelens
    with pytest.raises(ValueError, match=r"missing \['W_skip'\]"):
        load(cfg, {k: v for k, v in tensors.items() if k != "W_skip"})
    with pytest.raises(ValueError, match=r"tensors\['W_dec'\] has shape \(9, 20\)"):
        load(cfg, {**tensors, "W_dec": tensors["W_dec"].T})
    with pytest.raises(ValueError, match=r"cfg\['apply_b_dec_to_input'\] must be False"):
        load({**cfg, "apply_b_dec_to_input": True}, tensors)
    with pytest.raises(ValueError, match=r"cfg\['d_out'\]"):
        load({**cfg, "d_out": None}, tensors)
    with pytest.raises(
        ValueError, match=r"cfg\['architecture'\] is 'jumprelu_skip_transcoder', but StandardTranscoder"
    ):
        fs.StandardTranscoder.from_saelens(cfg, tensors)
    with pytest.raises(ValueError, match="load it with JumpReLUTranscoder"):
        fs.BatchTopKTranscoder.from_saelens(cfg, tensors)
    with pytest.raises(ValueError, match="d_out: a SAELens transcoder's d_out is read from cfg"):
        load(cfg, tensors, d_out=3)
    with pytest.raises(ValueError, match="output_scale"):
        m.to_saelens(output_scale=-1.0)
    with pytest.raises(ValueError, match="SAELens has no transcoder class that computes a per-row TopK code"):
        fs.TopKTranscoder(D_IN, F, 3, d_out=D_OUT).to_saelens()


def test_saelens_has_no_topk_transcoder():
    """What the TopK export's ValueError says: the installed SAELens's transcoder classes are ReLU or JumpReLU."""
    transcoder = require("sae_lens.saes.transcoder")
    names = {n for n in dir(transcoder) if n.endswith("Transcoder")}
    assert names == {"Transcoder", "SkipTranscoder", "JumpReLUTranscoder", "JumpReLUSkipTranscoder"}


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("name", ["standard", "jumprelu", "batchtopk"])
def test_circuit_tracer_loads_the_layer_file(fs, torch_path, tmp_path, name, skip):
    """circuit-tracer's ``load_relu_transcoder`` (what ``load_transcoder_set`` calls for safetensors files)
    reads ``to_circuit_tracer``'s file: its ReLU or JumpReLU activation, the same code (its
    ``encode``), and the same prediction (its ``decode`` with the input, which adds W_skip's term)."""
    slt = require("circuit_tracer.transcoder.single_layer_transcoder")
    save_file = require("safetensors.torch").save_file
    m, x_raw = trained_like(fs, name, skip, d_out=D_IN)
    path = tmp_path / "layer_0.safetensors"
    save_file(m.to_circuit_tracer(activation_scale=IN_SCALE, output_scale=OUT_SCALE), str(path))
    theirs = slt.load_relu_transcoder(str(path), 0, device=torch.device("cpu"), lazy_encoder=False,
                                      lazy_decoder=False)  # fmt: skip
    assert (theirs.W_skip is not None) == skip
    assert isinstance(
        theirs.activation_function, require("circuit_tracer.transcoder.activation_functions").JumpReLU
    ) == (name != "standard")
    with torch.no_grad():
        acts = theirs.encode(x_raw)
        ours = dense_code(fs, m, x_raw * IN_SCALE)
        assert torch.equal(acts != 0, ours != 0), "other active latents than circuit-tracer's"
        torch.testing.assert_close(acts, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(acts, x_raw), raw_prediction(m, x_raw), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x_raw), raw_prediction(m, x_raw), rtol=1e-5, atol=1e-5)


def test_circuit_tracer_loads_the_set(fs, torch_path, tmp_path):
    """``circuit_tracer_transcoder_set``'s files in a directory: circuit-tracer's ``load_transcoder_set``
    reads them into a ``TranscoderSet`` whose per-layer codes are ours; the config names its hooks."""
    slt = require("circuit_tracer.transcoder.single_layer_transcoder")
    save_file = require("safetensors.torch").save_file
    layers = [trained_like(fs, name, True, d_out=D_IN)[0] for name in ("jumprelu", "batchtopk", "jumprelu-log")]
    x = trained_like(fs, "jumprelu", True, d_out=D_IN)[1]
    config, files = fs.circuit_tracer_transcoder_set(
        layers, feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out", scan="test-scan"
    )
    assert config == {"model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid",
                      "feature_output_hook": "hook_mlp_out", "scan": "test-scan"}  # fmt: skip
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    for fname, tensors in files.items():
        save_file(tensors, str(tmp_path / fname))
    paths = {i: str(tmp_path / f"layer_{i}.safetensors") for i in range(len(layers))}
    theirs = slt.load_transcoder_set(paths, scan=config["scan"], feature_input_hook=config["feature_input_hook"],
                                     feature_output_hook=config["feature_output_hook"], device=torch.device("cpu"),
                                     lazy_encoder=False, lazy_decoder=False)  # fmt: skip
    assert len(theirs) == 3 and theirs.skip_connection and theirs.feature_output_hook == "hook_mlp_out"
    with torch.no_grad():
        acts = theirs.encode(torch.stack([x] * 3))
        for i, m in enumerate(layers):
            torch.testing.assert_close(acts[i], dense_code(fs, m, x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(theirs[i](x), m(x), rtol=1e-5, atol=1e-5)


def test_circuit_tracer_export_refuses_what_it_cannot_load(fs):
    with pytest.raises(ValueError, match="d_out: circuit-tracer's SingleLayerTranscoder reads and writes one width"):
        fs.JumpReLUTranscoder(D_IN, F, d_out=D_OUT).to_circuit_tracer()
    with pytest.raises(ValueError, match="ReLU or JumpReLU codes only"):
        fs.TopKTranscoder(D_IN, F, 3).to_circuit_tracer()
    a, b = fs.JumpReLUTranscoder(D_IN, F, skip=True), fs.JumpReLUTranscoder(D_IN, F)
    with pytest.raises(ValueError, match=r"transcoders\[1\] has \(d_in, n_features, skip\)"):
        fs.circuit_tracer_transcoder_set([a, b], feature_input_hook="in", feature_output_hook="out")
    with pytest.raises(ValueError, match="feature_output_hook"):
        fs.circuit_tracer_transcoder_set([a], feature_input_hook="in", feature_output_hook="")
    with pytest.raises(ValueError, match="transcoders must be a non-empty list"):
        fs.circuit_tracer_transcoder_set([], feature_input_hook="in", feature_output_hook="out")
    with pytest.raises(ValueError, match=r"transcoders\[0\] must be a transcoder module"):
        fs.circuit_tracer_transcoder_set([fs.SparseAutoencoder(D_IN, F, 3)], feature_input_hook="i",
                                         feature_output_hook="o")  # fmt: skip


def _sparsify_transcoder(dtype, D, F, k, skip, seed):
    """sparsify's transcoder (``SparseCoderConfig(transcode=True, skip_connection=skip)``, its defaults
    otherwise) with drawn values: its W_dec and W_skip start at zero, drawn here."""
    coder, train_cfg = sparsify_coder(D, "cpu", dtype, num_latents=F, k=k, transcode=True, skip_connection=skip)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.randn(F, D, generator=g) / D**0.5)
        coder.encoder.bias.copy_(torch.randn(F, generator=g) * 0.1)
        coder.W_dec.copy_(torch.randn(F, D, generator=g) / D**0.5)
        coder.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
        if skip:
            coder.W_skip.copy_(torch.randn(D, D, generator=g) / D**0.5)
    return coder, train_cfg


def _sparsify_params(coder):
    return [coder.encoder.weight, coder.encoder.bias, coder.W_dec, coder.b_dec] + (
        [coder.W_skip] if coder.W_skip is not None else []
    )


@pytest.mark.parametrize("dtype", fast_tier_keeps(1, [torch.float32, torch.bfloat16], ids=[None, "bfloat16"]))
@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip"])
@pytest.mark.parametrize("n_dead", [0, 5], ids=["no_auxk", "auxk"])
def test_topk_transcoder_module_matches_sparsify(fs, dtype, skip, n_dead):
    """``TopKTranscoder.loss(x, y)`` with sparsify's parameters and batch: its selection, its FVU (y's,
    W_skip's term included) and the gradients of its training loss (fvu, + alpha * auxk_loss with dead
    latents: AuxK's k_aux is D_out // 2 in both, ``relu=True``, ``encoder_grad=False``) by the parity rule,
    sparsify in fp64 the ground truth; flash-sae's losses are B * D / total variance of y times smaller.
    y's gradient is compared with the total variance held constant (sparsify's ``total_variance``
    argument): left to its forward, sparsify differentiates the FVU's denominator in y too."""
    B, D, F, k, alpha = 16, 24, 96, 5, 1 / 32
    coder, train_cfg = _sparsify_transcoder(dtype, D, F, k, skip, seed=3)
    assert train_cfg.auxk_alpha == 0.0 and coder.cfg.normalize_decoder  # (a transcoder's decoder is not normalised)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, D, generator=g).to(dtype)
    y = (torch.randn(B, D, generator=g) * 0.7).to(dtype)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=g)[:n_dead]] = True

    def theirs_of(c, xx, yy):
        xx, yy = xx.clone().requires_grad_(), yy.clone().requires_grad_()
        tv = (yy - yy.mean(0)).pow(2).sum().detach()  # as its chunked callers pass it: y is data, not a leaf
        out = c(xx, yy, dead_mask=dead if n_dead else None, total_variance=tv)
        total = out.fvu + alpha * out.auxk_loss
        return out, total, torch.autograd.grad(total, [xx, yy, *_sparsify_params(c)])

    out, total, their_grads = theirs_of(coder, x, y)
    coder64, _ = _sparsify_transcoder(torch.float64, D, F, k, skip, seed=3)
    ref, ref_total, ref_grads = theirs_of(coder64, x.double(), y.double())

    dead_loss = (
        fs.DeadLatentLoss(kind="auxk", relu=True, encoder_grad=False, coef=alpha, capacity=F) if n_dead else None
    )
    m = fs.TopKTranscoder(D, F, k, d_out=D, skip=skip, dtype=dtype, dead_loss=dead_loss)
    with torch.no_grad():
        for p, q in zip((m.W_enc, m.b_enc, m.W_dec, m.b_dec) + ((m.W_skip,) if skip else ()), _sparsify_params(coder)):
            p.copy_(q)
        m.tokens_since_fired.masked_fill_(dead, m.dead_window_tokens + 1)
    if n_dead:
        assert m.dead_loss.k_aux == D // 2 and torch.equal(m.dead_mask(), dead)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    ours = m.loss(xs, ys)
    our_grads = torch.autograd.grad(ours.loss, [xs, ys, *_sparsify_params_of(m)])
    assert torch.equal(ours.code.indices.sort(dim=1).values, out.latent_indices.sort(dim=1).values)
    y64 = y.double()
    factor = B * D / (y64 - y64.mean(0)).pow(2).sum()
    assert_parity("sparsify fvu", ours.fvu, out.fvu, ref.fvu, dtype)
    assert_parity("sparsify loss", factor * ours.loss, total, ref_total, dtype)
    if n_dead:
        assert float(ref.auxk_loss.detach()) > 0
        assert_parity("sparsify auxk_loss", factor * ours.aux_loss, out.auxk_loss, ref.auxk_loss, dtype)
    names = ("x", "y", "W_enc", "b_enc", "W_dec", "b_dec", "W_skip")
    for n, a, b, c in zip(names, our_grads, their_grads, ref_grads):
        assert_parity(f"sparsify d{n}", factor * a.double(), b, c, dtype)


def _sparsify_params_of(m):
    return [m.W_enc, m.b_enc, m.W_dec, m.b_dec] + ([m.W_skip] if m.skip else [])
