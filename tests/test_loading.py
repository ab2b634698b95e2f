"""The loaders (``load_saelens``, ``load_sparsify``, ``load_gemma_scope``, ``load_circuit_tracer``) on files
written by the real packages: SAELens's ``save_model`` / ``save_inference_model``, sparsify's
``SparseCoder.save_to_disk``, circuit-tracer's ``to_safetensors``, numpy's ``savez`` for Gemma Scope's
documented layout. The loaded module's code (dense, [B, F]) and reconstruction equal the original
package's on the same random activations, in fp32; then the error cases.

The modules run flash-sae's plain-torch path here (the kernels' own tests cover the interpreter).
"""

import json
import sys

import pytest
import torch
from peers import require, saelens_training_sae, sparsify_coder

D, F, DOUT, B, K = 11, 24, 7, 16, 5
GEMMA_ORDER = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")  # reference.gemma_scope_jumprelu's arguments
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def torch_path(fs, monkeypatch):
    monkeypatch.setattr(sys.modules[fs.__name__ + "._launch"], "CPU_RUNS_TRITON", False)


def _x(d=D, seed=3):
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize(sae, x, seed=0):
    """Parameters that look trained (decoder rows of varied norms, nonzero biases), thresholds that split the
    code about in half."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sae.named_parameters():
        if name != "threshold":
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name in ("r_mag", "W_skip") else 0.3))
    sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1, generator=g) * 2 + 0.3)
    pre = sae.process_sae_in(x) @ sae.W_enc + (sae.b_gate if hasattr(sae, "b_gate") else sae.b_enc)
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(pre.abs().median(0).values * 0.5)
    if hasattr(sae, "topk_threshold"):  # SAELens's BatchTopK rule ranks pre * ||W_dec[f]||
        scaled = torch.relu(pre * sae.W_dec.norm(dim=1)).flatten()
        sae.topk_threshold = scaled[scaled > 0].median().double()


def _dense(fs, module, x):
    """The module's code of x, dense: [B, F]."""
    with torch.no_grad():
        return fs.SparseCode(*module.encode(x)).to_dense(module.n_features)


def _assert_same(ours, theirs, what):
    assert torch.equal(ours != 0, theirs != 0), f"{what}: other active latents"
    torch.testing.assert_close(ours, theirs, **TOL, msg=what)


def _save_saelens(sae, path):
    sae.save_model(str(path))
    return path


# SAELens -------------------------------------------------------------------------------------------------

INFERENCE = {
    "standard": ("standard", {}, "StandardSparseAutoencoder"),
    "standard-uncentred": ("standard", {"apply_b_dec_to_input": False}, "StandardSparseAutoencoder"),
    "gated": ("gated", {}, "GatedSparseAutoencoder"),
    "gated-uncentred": ("gated", {"apply_b_dec_to_input": False}, "GatedSparseAutoencoder"),
    "topk": ("topk", {"k": K}, "SparseAutoencoder"),
    "topk-rescaled": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}, "SparseAutoencoder"),
    "jumprelu": ("jumprelu", {}, "JumpReLUSparseAutoencoder"),
    "jumprelu-uncentred": ("jumprelu", {"apply_b_dec_to_input": False}, "JumpReLUSparseAutoencoder"),
}


@pytest.mark.parametrize("case", list(INFERENCE))
def test_saelens_inference_saes_load_with_the_same_code_and_reconstruction(fs, tmp_path, case):
    sae_lens = require("sae_lens")
    arch, cfg, cls = INFERENCE[case]
    theirs = sae_lens.SAE.from_dict({"architecture": arch, "d_in": D, "d_sae": F, **cfg})
    x = _x()
    _randomize(theirs, x)
    ours = fs.load_saelens(_save_saelens(theirs, tmp_path))
    assert type(ours).__name__ == cls and ours.W_dec.dtype == torch.float32
    with torch.no_grad():
        _assert_same(_dense(fs, ours, x), theirs.encode(x), case)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
    fired = (theirs.encode(x) > 0).float().mean()
    assert 0.05 < fired < 0.95, "the test should exercise a partial code"


TRAINING = {
    "topk": ("topk", {"k": K}, "SparseAutoencoder"),  # SAELens trains with rescale_acts_by_decoder_norm=True
    "jumprelu": ("jumprelu", {}, "JumpReLUSparseAutoencoder"),
    "standard": ("standard", {}, "StandardSparseAutoencoder"),
    "gated": ("gated", {}, "GatedSparseAutoencoder"),
    "batchtopk": ("batchtopk", {"k": 4}, "BatchTopKSparseAutoencoder"),
    "matryoshka": ("matryoshka_batchtopk", {"k": 4, "matryoshka_widths": [6, F]},
                   "MatryoshkaBatchTopKSparseAutoencoder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TRAINING))
def test_saelens_training_checkpoints_load_with_the_same_code_and_reconstruction(fs, tmp_path, case):
    """``save_model`` of SAELens's training SAEs (its trainer's checkpoints): the training cfg's options load too.
    A BatchTopK SAE encodes with the batch rule in training mode, as SAELens's training SAE does; its values are
    relu(pre) where SAELens's are relu(pre * ||W_dec[f]||) (both decode to the same)."""
    arch, cfg, cls = TRAINING[case]
    theirs = saelens_training_sae(arch, d_in=D, d_sae=F, **cfg)
    x = _x()
    _randomize(theirs, x)
    ours = fs.load_saelens(_save_saelens(theirs, tmp_path))
    assert type(ours).__name__ == cls
    scale = theirs.W_dec.detach().norm(dim=1) if arch in ("batchtopk", "matryoshka_batchtopk") else 1.0
    with torch.no_grad():
        _assert_same(_dense(fs, ours, x) * scale, theirs.encode(x), case)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
    if arch == "jumprelu":
        assert (ours.bandwidth, ours.l0_coefficient) == (theirs.cfg.jumprelu_bandwidth, theirs.cfg.l0_coefficient)
    if arch == "matryoshka_batchtopk":
        assert ours.prefix_sizes == [6, F]
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        assert ours.k == 4 and ours.rescale_acts_by_decoder_norm and ours.threshold == theirs.topk_threshold


def test_saelens_batchtopk_inference_export_loads_as_jumprelu(fs, tmp_path):
    """SAELens's trainer saves a BatchTopK SAE with ``save_inference_model``, as a JumpReLU SAE (decoder norms
    folded, the scalar threshold per latent): it loads as ``JumpReLUSparseAutoencoder`` and equals what SAELens
    loads from the same files; the training checkpoint's module in eval mode (the threshold rule) agrees."""
    sae_lens = require("sae_lens")
    theirs = saelens_training_sae("batchtopk", d_in=D, d_sae=F, k=4)
    x = _x()
    _randomize(theirs, x)
    theirs.save_inference_model(str(tmp_path / "inference"))
    exported = sae_lens.SAE.load_from_disk(str(tmp_path / "inference"))
    ours = fs.load_saelens(tmp_path / "inference")
    assert type(ours).__name__ == "JumpReLUSparseAutoencoder"
    checkpoint = fs.load_saelens(_save_saelens(theirs, tmp_path / "checkpoint")).eval()
    n = theirs.W_dec.detach().norm(dim=1)
    with torch.no_grad():
        _assert_same(_dense(fs, ours, x), exported.encode(x), "inference export")
        torch.testing.assert_close(ours(x), exported(x), **TOL)
        _assert_same(_dense(fs, checkpoint, x) * n, exported.encode(x), "checkpoint, eval mode")
        torch.testing.assert_close(checkpoint(x), exported(x), **TOL)


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_transcoders_load_with_the_same_code_and_prediction(fs, tmp_path, arch):
    sae_lens = require("sae_lens")
    theirs = sae_lens.SAE.from_dict(
        {"architecture": arch, "d_in": D, "d_sae": F, "d_out": DOUT, "apply_b_dec_to_input": False}
    )
    x = _x()
    _randomize(theirs, x)
    ours = fs.load_saelens(_save_saelens(theirs, tmp_path))
    want = "JumpReLUTranscoder" if arch.startswith("jumprelu") else "StandardTranscoder"
    assert type(ours).__name__ == want and ours.d_out == DOUT and ours.skip == ("skip" in arch)
    with torch.no_grad():
        _assert_same(_dense(fs, ours, x), theirs.encode(x), arch)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_saelens_checkpoint_with_its_activation_scale_loads_folded(fs, tmp_path):
    """A training checkpoint with ``normalize_activations="expected_average_only_in"`` holds weights for scaled
    inputs and, beside them, the factor (``activation_scaler.json``): the loaded module reads raw activations,
    as SAELens's SAE after ``fold_activation_norm_scaling_factor``."""
    scaler = require("sae_lens.training.activation_scaler")
    theirs = saelens_training_sae("standard", d_in=D, d_sae=F, normalize_activations="expected_average_only_in")
    x = _x() * 3.0
    _randomize(theirs, x / 3.0)
    _save_saelens(theirs, tmp_path)
    with pytest.raises(ValueError, match=r"cfg\['normalize_activations'\] is 'expected_average_only_in'"):
        fs.load_saelens(tmp_path)  # no factor beside the weights
    scaler.ActivationScaler(scaling_factor=1 / 3.0).save(str(tmp_path / "activation_scaler.json"))
    ours = fs.load_saelens(tmp_path)
    theirs.fold_activation_norm_scaling_factor(1 / 3.0)
    with torch.no_grad():
        _assert_same(_dense(fs, ours, x), theirs.encode(x), "folded")
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_saelens_errors_name_the_field(fs, tmp_path):
    sae_lens = require("sae_lens")
    with pytest.raises(ValueError, match="path: .* does not exist"):
        fs.load_saelens(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"path: .* holds no cfg\.json"):
        fs.load_saelens(tmp_path)
    with pytest.raises(ValueError, match="^path must be a str"):
        fs.load_saelens(3)
    sae = sae_lens.SAE.from_dict({"architecture": "abstopk", "d_in": D, "d_sae": F, "k": K})
    with pytest.raises(ValueError, match=r"cfg\['architecture'\] is 'abstopk'"):
        fs.load_saelens(_save_saelens(sae, tmp_path / "abstopk"))
    sae = sae_lens.SAE.from_dict(
        {"architecture": "standard", "d_in": D, "d_sae": F, "normalize_activations": "layer_norm"}
    )
    with pytest.raises(ValueError, match=r"cfg\['normalize_activations'\] is 'layer_norm'"):
        fs.load_saelens(_save_saelens(sae, tmp_path / "layer_norm"))
    tc_cfg = {"architecture": "transcoder", "d_in": D, "d_sae": F, "d_out": DOUT, "apply_b_dec_to_input": False}
    tc = sae_lens.SAE.from_dict({**tc_cfg, "normalize_activations": "expected_average_only_in"})
    _save_saelens(tc, tmp_path / "tc")
    scaler = require("sae_lens.training.activation_scaler")
    scaler.ActivationScaler(scaling_factor=2.0).save(str(tmp_path / "tc" / "activation_scaler.json"))
    with pytest.raises(ValueError, match=r"cfg\['normalize_activations'\]: a transcoder's input scale"):
        fs.load_saelens(tmp_path / "tc")
    path = _save_saelens(
        sae_lens.SAE.from_dict({"architecture": "topk", "d_in": D, "d_sae": F, "k": K}), tmp_path / "k"
    )
    (path / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="path: .* is not a safetensors file"):
        fs.load_saelens(path)


# sparsify ------------------------------------------------------------------------------------------------


def _sparsify(seed=0, **cfg):
    coder, _ = sparsify_coder(D, "cpu", torch.float32, k=K, num_latents=F, **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name == "W_skip" else 0.3))
    return coder


@pytest.mark.parametrize("cfg", [{}, {"transcode": True}, {"transcode": True, "skip_connection": True}])
def test_sparsify_coders_load_with_the_same_code_and_output(fs, tmp_path, cfg):
    """sparsify keeps topk(relu(pre)), flash-sae relu(topk(pre)): the same values; indices compared where a value
    is positive (a zero entry decodes to nothing)."""
    coder = _sparsify(**cfg)
    coder.save_to_disk(tmp_path)
    ours = fs.load_sparsify(tmp_path)
    assert type(ours).__name__ == ("TopKTranscoder" if cfg else "SparseAutoencoder")
    x = _x()
    with torch.no_grad():
        theirs = coder.encode(x)
        vals, indices = ours.encode(x)
        dense = torch.zeros(B, F).scatter_(1, theirs.top_indices, theirs.top_acts)
        _assert_same(_dense(fs, ours, x), dense, "code")
        torch.testing.assert_close(ours.decode(vals, indices), coder.decode(theirs.top_acts, theirs.top_indices), **TOL)
        torch.testing.assert_close(ours(x), coder(x).sae_out, **TOL)
    if cfg.get("skip_connection"):
        assert torch.equal(ours.W_skip, coder.W_skip)


def test_sparsify_run_directory_loads_every_hookpoint_or_one(fs, tmp_path):
    for i, name in enumerate(["layers.10.mlp", "layers.2.mlp"]):
        _sparsify(seed=i).save_to_disk(tmp_path / name)
    every = fs.load_sparsify(tmp_path)
    assert list(every) == ["layers.2.mlp", "layers.10.mlp"]  # natural order
    one = fs.load_sparsify(tmp_path, hookpoint="layers.10.mlp")
    assert torch.equal(one.W_enc, every["layers.10.mlp"].W_enc)
    with pytest.raises(ValueError, match=r"hookpoint 'layers.3.mlp' is not a coder's folder"):
        fs.load_sparsify(tmp_path, hookpoint="layers.3.mlp")
    with pytest.raises(ValueError, match="path: .* is not a directory"):
        fs.load_sparsify(tmp_path / "layers.2.mlp" / "sae.safetensors")


def test_sparsify_errors_name_the_field(fs, tmp_path):
    _sparsify(activation="groupmax").save_to_disk(tmp_path / "groupmax")
    with pytest.raises(ValueError, match=r"cfg\['activation'\] is 'groupmax'"):
        fs.load_sparsify(tmp_path / "groupmax")
    _sparsify(skip_connection=True).save_to_disk(tmp_path / "skip")
    with pytest.raises(ValueError, match=r"cfg\['skip_connection'\]"):
        fs.load_sparsify(tmp_path / "skip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="path: .* holds neither cfg.json nor hookpoint folders"):
        fs.load_sparsify(tmp_path / "empty")


# Gemma Scope ---------------------------------------------------------------------------------------------


def _gemma_params(seed=0):
    """Gemma Scope's layout: W_enc [D, F], W_dec [F, D] (rows not unit norm), b_enc, b_dec, threshold."""
    g = torch.Generator().manual_seed(seed)
    p = {"W_enc": torch.randn(D, F, generator=g) * 0.3, "W_dec": torch.randn(F, D, generator=g) * 0.7,
         "b_enc": torch.randn(F, generator=g) * 0.1, "b_dec": torch.randn(D, generator=g) * 0.2}  # fmt: skip
    p["threshold"] = (_x() @ p["W_enc"] + p["b_enc"]).abs().median(0).values * 0.5
    return p


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_gemma_scope_params_load_as_jumprelu(fs, tmp_path, fmt):
    """The formula of Gemma Scope's release (``reference.gemma_scope_jumprelu``) and SAELens's JumpReLU SAE
    holding the same parameters with ``apply_b_dec_to_input=False`` (as its Gemma Scope loader sets)."""
    np = require("numpy")
    sae_lens = require("sae_lens")
    p = _gemma_params()
    if fmt == "npz":
        np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in p.items()})
        ours = fs.load_gemma_scope(tmp_path)
    else:
        require("safetensors.torch").save_file(p, str(tmp_path / "params.safetensors"))
        ours = fs.load_gemma_scope(tmp_path / "params.safetensors")
    assert type(ours).__name__ == "JumpReLUSparseAutoencoder"
    assert torch.equal(ours.W_dec, p["W_dec"]) and torch.equal(ours.threshold, p["threshold"])  # as stored
    x = _x()
    acts, x_hat = fs.testing.reference.gemma_scope_jumprelu(x.double(), *(p[k].double() for k in GEMMA_ORDER))
    theirs = sae_lens.SAE.from_dict({"architecture": "jumprelu", "d_in": D, "d_sae": F, "apply_b_dec_to_input": False})
    theirs.load_state_dict(p)
    with torch.no_grad():
        dense = _dense(fs, ours, x)
        _assert_same(dense, acts.float(), "reference")
        _assert_same(dense, theirs.encode(x), "SAELens")
        torch.testing.assert_close(ours(x), x_hat.float(), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert 0.05 < (acts > 0).float().mean() < 0.95


def test_gemma_scope_errors_name_the_field(fs, tmp_path):
    np = require("numpy")
    p = _gemma_params()
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in p.items() if k != "threshold"})
    with pytest.raises(ValueError, match=r"missing \['threshold'\]"):
        fs.load_gemma_scope(tmp_path / "params.npz")
    (tmp_path / "params.txt").write_text("")
    with pytest.raises(ValueError, match=r"path: .* must be an \.npz or a \.safetensors file"):
        fs.load_gemma_scope(tmp_path / "params.txt")
    with pytest.raises(ValueError, match=r"path: .* holds no params\.npz"):
        fs.load_gemma_scope(tmp_path / "..")


# circuit-tracer ------------------------------------------------------------------------------------------


def _single_layer(layer, jumprelu, skip, seed):
    slt = require("circuit_tracer.transcoder.single_layer_transcoder")
    act = require("circuit_tracer.transcoder.activation_functions")
    g = torch.Generator().manual_seed(seed)
    fn = act.JumpReLU(torch.rand(F, generator=g) * 0.3 + 0.05, 0.1) if jumprelu else torch.relu
    t = slt.SingleLayerTranscoder(D, F, fn, layer, skip_connection=skip, device=torch.device("cpu"),
                                  dtype=torch.float32)  # fmt: skip
    with torch.no_grad():
        for name, p in t.named_parameters():
            if not name.startswith("activation_function"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name == "W_skip" else 0.3))
    return t


@pytest.mark.parametrize("jumprelu, skip", [(True, True), (False, False)])
def test_circuit_tracer_transcoder_file_loads_with_the_same_code_and_output(fs, tmp_path, jumprelu, skip):
    theirs = _single_layer(0, jumprelu, skip, seed=1)
    theirs.to_safetensors(str(tmp_path / "layer_0.safetensors"))
    ours = fs.load_circuit_tracer(tmp_path / "layer_0.safetensors")
    assert type(ours).__name__ == ("JumpReLUTranscoder" if jumprelu else "StandardTranscoder") and ours.skip == skip
    x = _x()
    with torch.no_grad():
        _assert_same(_dense(fs, ours, x), theirs.encode(x), "code")
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_circuit_tracer_transcoder_set_loads_as_a_list(fs, tmp_path):
    slt = require("circuit_tracer.transcoder.single_layer_transcoder")
    layers = {i: _single_layer(i, True, False, seed=i) for i in range(3)}
    slt.TranscoderSet(layers, feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out").to_safetensors(
        str(tmp_path)
    )
    ours = fs.load_circuit_tracer(tmp_path)
    assert isinstance(ours, list) and len(ours) == 3
    paths = {i: str(tmp_path / f"layer_{i}.safetensors") for i in range(3)}
    read = slt.load_transcoder_set(paths, scan="test", feature_input_hook="hook_resid_mid",
                                   feature_output_hook="hook_mlp_out", device=torch.device("cpu"),
                                   dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)  # fmt: skip
    x = _x()
    with torch.no_grad():
        for i, m in enumerate(ours):
            _assert_same(_dense(fs, m, x), layers[i].encode(x), f"layer {i}")
            torch.testing.assert_close(m(x), layers[i](x), **TOL)
            torch.testing.assert_close(m(x), read[i](x), **TOL)  # what circuit-tracer's own loader reads


@pytest.mark.parametrize("activation", ["jump_relu", "relu"])
def test_circuit_tracer_clt_loads_with_the_same_code_and_output(fs, tmp_path, activation):
    """A ReLU CLT loads as a JumpReLU CLT at threshold 0, which computes the same code."""
    ct = require("circuit_tracer.transcoder.cross_layer_transcoder")
    L = 3
    theirs = ct.CrossLayerTranscoder(L, F, D, activation_function=activation, lazy_decoder=False,
                                     device=torch.device("cpu"), dtype=torch.float32)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.startswith("activation_function"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.to_safetensors(str(tmp_path))
    ours = fs.load_circuit_tracer(tmp_path)
    assert type(ours).__name__ == "JumpReLUCrossLayerTranscoder" and ours.n_layers == L
    xs = torch.randn(B, L, D, generator=g)
    with torch.no_grad():
        acts = theirs.encode(xs.transpose(0, 1))  # [L, B, F]
        code = ours.encode(xs).to_dense(L * F).view(B, L, F).transpose(0, 1)
        _assert_same(code, acts, activation)
        torch.testing.assert_close(ours(xs), theirs(xs.transpose(0, 1)).transpose(0, 1), **TOL)
        read = ct.load_clt(str(tmp_path), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
        torch.testing.assert_close(ours(xs), read(xs.transpose(0, 1)).transpose(0, 1), **TOL)  # load_clt's reading


def test_circuit_tracer_errors_name_the_field(fs, tmp_path):
    theirs = _single_layer(0, True, False, seed=1)
    with torch.no_grad():
        theirs.activation_function.threshold[0] = -0.1
    theirs.to_safetensors(str(tmp_path / "negative.safetensors"))
    with pytest.raises(ValueError, match=r"activation_function.threshold'\] holds negative thresholds"):
        fs.load_circuit_tracer(tmp_path / "negative.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"path: .* holds neither W_enc_0\.safetensors"):
        fs.load_circuit_tracer(tmp_path / "empty")
    _single_layer(1, False, False, seed=2).to_safetensors(str(tmp_path / "empty" / "layer_1.safetensors"))
    with pytest.raises(ValueError, match="layer_0 .. layer_"):
        fs.load_circuit_tracer(tmp_path / "empty")


def test_loaded_modules_train(fs, tmp_path):
    """A loaded module is an ordinary flash-sae module: its step runs and its gradients reach every parameter."""
    coder = _sparsify()
    coder.save_to_disk(tmp_path)
    sae = fs.load_sparsify(tmp_path, dtype=torch.float32)
    sae.loss(_x()).loss.backward()
    assert all(p.grad is not None for p in sae.parameters())
    assert json.loads((tmp_path / "cfg.json").read_text())["k"] == sae.k


# The file readers and the dtype ----------------------------------------------------------------------------

READ_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool]


@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 5), (2, 1, 4)])
def test_read_safetensors_matches_safetensors(fs, tmp_path, shape):
    """flash-sae's standard-library reader against the safetensors package's writer, every dtype it reads."""
    st = require("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(shape, generator=g) * 4).to(dtype) for i, dtype in enumerate(READ_DTYPES)}
    st.save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"note": "kept out"})
    back = fs.loading.read_safetensors(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


@pytest.mark.parametrize("compressed", [False, True])
def test_read_npz_matches_numpy(fs, tmp_path, compressed):
    np = require("numpy")
    rng = np.random.default_rng(0)
    arrays = {"f4": rng.standard_normal((3, 5)).astype("f4"), "f8": rng.standard_normal(7),
              "f2": rng.standard_normal((2, 2)).astype("f2"), "i8": np.arange(6).reshape(2, 3),
              "fortran": np.asfortranarray(rng.standard_normal((4, 3)).astype("f4")), "scalar": np.float32(2.5),
              "empty": np.zeros((0, 3), "f4")}  # fmt: skip
    (np.savez_compressed if compressed else np.savez)(tmp_path / "a.npz", **arrays)
    back = fs.loading.read_npz(tmp_path / "a.npz")
    assert back.keys() == arrays.keys()
    for name, a in arrays.items():
        assert torch.equal(back[name], torch.from_numpy(np.array(a, order="C"))), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_casts_the_weights_and_keeps_the_thresholds(fs, tmp_path, dtype):
    """``dtype=`` casts the weights after the folds; a JumpReLU threshold stays fp32 and a BatchTopK one fp64."""
    np = require("numpy")
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in _gemma_params().items()})
    jumprelu = fs.load_gemma_scope(tmp_path, dtype=dtype)
    assert jumprelu.W_enc.dtype == dtype and jumprelu.threshold.dtype == torch.float32
    theirs = saelens_training_sae("batchtopk", d_in=D, d_sae=F, k=4)
    _randomize(theirs, _x())
    batchtopk = fs.load_saelens(_save_saelens(theirs, tmp_path / "bt"), dtype=dtype)
    assert batchtopk.W_dec.dtype == dtype and batchtopk.threshold.dtype == torch.float64
    sae_lens = require("sae_lens")
    topk_cfg = {"architecture": "topk", "d_in": D, "d_sae": F, "k": K, "rescale_acts_by_decoder_norm": True}
    stored = sae_lens.SAE.from_dict({**topk_cfg, "dtype": str(dtype).split(".")[1]})
    assert fs.load_saelens(_save_saelens(stored, tmp_path / "topk")).W_enc.dtype == dtype  # the file's, folded
    with torch.no_grad():  # the bf16/fp16 module reconstructs as its fp32 twin does, up to its rounding
        x = _x().to(dtype)
        ref = fs.load_gemma_scope(tmp_path)(x.float())
        torch.testing.assert_close(jumprelu(x).float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("d, f", [(1, 1), (3, 2), (13, 7)])
def test_small_and_odd_shapes_load(fs, tmp_path, d, f):
    """Gemma Scope and sparsify files of tiny and odd widths, F = 1 included."""
    np = require("numpy")
    g = torch.Generator().manual_seed(d * 10 + f)
    p = {"W_enc": torch.randn(d, f, generator=g), "W_dec": torch.randn(f, d, generator=g),
         "b_enc": torch.randn(f, generator=g), "b_dec": torch.randn(d, generator=g),
         "threshold": torch.rand(f, generator=g)}  # fmt: skip
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in p.items()})
    x = torch.randn(4, d, generator=g)
    acts, x_hat = fs.testing.reference.gemma_scope_jumprelu(x, *(p[k] for k in GEMMA_ORDER))
    with torch.no_grad():
        torch.testing.assert_close(fs.load_gemma_scope(tmp_path)(x), x_hat, **TOL)
    coder, _ = sparsify_coder(d, "cpu", torch.float32, k=1, num_latents=f)
    coder.save_to_disk(tmp_path / "coder")
    with torch.no_grad():
        torch.testing.assert_close(fs.load_sparsify(tmp_path / "coder")(x), coder(x).sae_out, **TOL)


@pytest.mark.kernels_ci
def test_loaded_modules_run_the_kernels(fs, tmp_path, monkeypatch):
    """The loaders' modules on the Triton kernels (the interpreter here): SAELens's rescaled TopK SAE and a
    Gemma Scope JumpReLU SAE compute the same code and reconstruction as their packages."""
    monkeypatch.setattr(sys.modules[fs.__name__ + "._launch"], "CPU_RUNS_TRITON", True)
    sae_lens = require("sae_lens")
    np = require("numpy")
    theirs = sae_lens.SAE.from_dict(
        {"architecture": "topk", "d_in": D, "d_sae": F, "k": K, "rescale_acts_by_decoder_norm": True}
    )
    x = _x()
    _randomize(theirs, x)
    ours = fs.load_saelens(_save_saelens(theirs, tmp_path / "topk"))
    p = _gemma_params()
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in p.items()})
    gemma = fs.load_gemma_scope(tmp_path)
    acts, x_hat = fs.testing.reference.gemma_scope_jumprelu(x, *(p[k] for k in GEMMA_ORDER))
    with torch.no_grad():
        _assert_same(_dense(fs, ours, x), theirs.encode(x), "topk")
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        _assert_same(_dense(fs, gemma, x), acts, "gemma scope")
        torch.testing.assert_close(gemma(x), x_hat, **TOL)


def test_saelens_cfg_from_before_version_6_loads_as_saelens_reads_it(fs, tmp_path):
    """A cfg.json of SAELens 5 (no ``architecture``; a TopK SAE named by ``activation_fn_str`` and
    ``activation_fn_kwargs``; a ``scaling_factor`` of ones beside the weights): SAELens 6's ``load_from_disk`` reads
    a TopK SAE, and so does the loader."""
    sae_lens = require("sae_lens")
    st = require("safetensors.torch")
    template = sae_lens.SAE.from_dict({"architecture": "topk", "d_in": D, "d_sae": F, "k": K})
    x = _x()
    _randomize(template, x)
    tensors = {k: v.detach().contiguous() for k, v in template.state_dict().items()}
    st.save_file({**tensors, "scaling_factor": torch.ones(F)}, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "hook_point": "blocks.0.hook_resid_pre", "normalize_activations": False}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.architecture() == "topk"
    ours = fs.load_saelens(tmp_path)
    assert type(ours).__name__ == "SparseAutoencoder" and ours.k == K
    with torch.no_grad():
        _assert_same(_dense(fs, ours, x), theirs.encode(x), "pre-6 topk")
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize("name", ["SparseAutoencoder", "GatedSparseAutoencoder", "BatchTopKSparseAutoencoder"])
def test_flash_sae_exports_load_back(fs, tmp_path, name):
    """``to_saelens`` files (cfg.json without a SAELens version) load back with the same reconstruction; a
    BatchTopK SAE's export is its inference rule, a JumpReLU SAE."""
    st = require("safetensors.torch")
    sae = getattr(fs, name)(D, F, **({} if name.startswith("Gated") else {"k": 4}), seed=2).eval()
    x = _x()
    with torch.no_grad():
        for p in sae.latent_vectors():
            p.copy_(torch.randn(F, generator=torch.Generator().manual_seed(4)) * 0.1)
        if name.startswith("BatchTopK"):
            sae.threshold.fill_(0.05)
            sae.threshold_updates.fill_(sae.threshold_warmup_steps())
    cfg, tensors = sae.to_saelens()
    st.save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back = fs.load_saelens(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x), **TOL)
