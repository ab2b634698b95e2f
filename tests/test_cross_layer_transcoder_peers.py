"""Cross-layer transcoders against the installed peers: circuit-tracer (its CLT file format, loader, encode and
decode) and decode-clt (its ``CrossLayerTranscoder`` forward and its training loss), default configurations."""

import pytest
import torch
from peers import require

B, L, D, F = 6, 3, 7, 10


def _clt(fs, rule, seed=0):
    if rule == "jumprelu":
        m = fs.JumpReLUCrossLayerTranscoder(D, F, n_layers=L, seed=seed, dtype=torch.float32, bandwidth=1.0)
    else:
        m = fs.TopKCrossLayerTranscoder(D, F, 3, n_layers=L, seed=seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        m.b_enc.copy_(torch.randn(L, F, generator=g) * 0.1)
        m.b_dec.copy_(torch.randn(L, D, generator=g) * 0.1)
        if rule == "jumprelu":
            m.log_threshold.copy_((torch.rand(L, F, generator=g) * 0.3 + 0.05).log())
    xs = torch.randn(B, L, D, generator=g)
    ys = torch.randn(B, L, D, generator=g) * 0.5
    return m, xs, ys


def _write(files: dict, path) -> None:
    save_file = require("safetensors.torch").save_file
    for name, tensors in files.items():
        save_file(tensors, str(path / name))


def _load(path, lazy_decoder):
    ct = require("circuit_tracer.transcoder.cross_layer_transcoder")
    return ct.load_clt(str(path), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=lazy_decoder)


@pytest.mark.parametrize("lazy_decoder", [False, True])
def test_jumprelu_clt_loads_in_circuit_tracer_and_computes_the_same(fs, tmp_path, lazy_decoder):
    """Our files load through circuit-tracer's ``load_clt`` (a JumpReLU CLT: the threshold files make it one);
    its ``encode`` equals our code and its ``decode`` / ``forward`` our ``forward``."""
    m, xs, _ = _clt(fs, "jumprelu")
    _write(m.to_circuit_tracer(), tmp_path)
    theirs = _load(tmp_path, lazy_decoder)
    assert theirs.n_layers == L and theirs.d_transcoder == F and theirs.d_model == D
    acts = theirs.encode(xs.transpose(0, 1))  # [L, B, F]
    ours = m.encode(xs).to_dense(L * F).view(B, L, F).transpose(0, 1)
    assert torch.equal(acts > 0, ours > 0)  # the same active set; values up to the GEMM's summation order
    torch.testing.assert_close(acts, ours, rtol=1e-6, atol=1e-6)
    for layer in range(L):
        torch.testing.assert_close(theirs.encode_layer(xs[:, layer], layer), ours[layer], rtol=1e-6, atol=1e-6)
    recon = theirs.decode(acts.to_sparse())  # [L, B, D]
    torch.testing.assert_close(recon.transpose(0, 1), m(xs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs(xs.transpose(0, 1)).transpose(0, 1), m(xs), rtol=1e-5, atol=1e-6)


def test_topk_clt_decodes_in_circuit_tracer(fs, tmp_path):
    """circuit-tracer has no TopK rule (its CLTs are ReLU or JumpReLU), so a TopK CLT's files load as a ReLU CLT:
    its pre-activations at our code's entries are our values, and its ``decode`` of our code is our ``forward``."""
    m, xs, _ = _clt(fs, "topk")
    _write(m.to_circuit_tracer(), tmp_path)
    theirs = _load(tmp_path, False)
    code = m.encode(xs)
    dense = code.to_dense(L * F).view(B, L, F)
    for layer in range(L):
        pre = theirs.encode_layer(xs[:, layer], layer, apply_activation_function=False)
        mask = dense[:, layer] > 0
        torch.testing.assert_close(pre[mask], dense[:, layer][mask], rtol=1e-6, atol=1e-6)
    recon = theirs.decode(dense.transpose(0, 1).to_sparse())
    torch.testing.assert_close(recon.transpose(0, 1), m(xs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["topk", "jumprelu"])
def test_from_circuit_tracer_round_trips(fs, tmp_path, rule):
    """``from_circuit_tracer`` takes the files' tensors or circuit-tracer's module state_dict, and gives the
    same parameters back (the threshold through its log, to fp32 rounding)."""
    m, xs, _ = _clt(fs, rule)
    files = m.to_circuit_tracer()
    _write(files, tmp_path)
    args = () if rule == "jumprelu" else (3,)
    flat = {k: v for tensors in files.values() for k, v in tensors.items()}
    for source in (flat, _load(tmp_path, False).state_dict()):
        back = type(m).from_circuit_tracer(source, *args, dtype=torch.float32)
        for (name, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
            if name == "log_threshold":
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            elif name != "tokens_since_fired":
                assert torch.equal(a, b), name
        torch.testing.assert_close(back(xs), m(xs))


def _decode_clt(m, **config):
    """decode-clt's ``CrossLayerTranscoder`` (its default config: untied decoders, one per (l -> t) pair, each
    with a bias) holding our parameters: W[l -> t] = W_dec[l].view(F, L - l, D)[:, t - l].T, the (t -> t)
    decoder's bias b_dec[t] and the others' zero, log_threshold ours."""
    cfg = require("clt.config").CLTConfig(num_features=F, num_layers=L, d_model=D, **config)
    theirs = require("clt.models.clt").CrossLayerTranscoder(cfg, process_group=None, device=torch.device("cpu"))
    with torch.no_grad():
        for layer in range(L):
            enc = theirs.encoder_module.encoders[layer]
            enc.weight.copy_(m.W_enc[layer])
            enc.bias_param.copy_(m.b_enc[layer])
            for t in range(layer, L):
                dec = theirs.decoder_module.decoders[f"{layer}->{t}"]
                dec.weight.copy_(m.W_dec[layer].view(F, L - layer, D)[:, t - layer].T)
                dec.bias_param.copy_(m.b_dec[t] if t == layer else torch.zeros(D))
        if hasattr(m, "log_threshold"):
            theirs.theta_manager.log_threshold.copy_(m.log_threshold)
    return theirs


def test_decode_clt_forward_and_loss_equal_ours(fs):
    """decode-clt's JumpReLU CLT forward equals ours; its training loss (reconstruction: nn.MSELoss per layer,
    summed; the tanh penalty on ||W_dec||-weighted activations) equals ours with its pre-activation loss off
    (``preactivation_coef=0``), at the end of its lambda schedule, and with our coefficient B times its lambda:
    it sums the penalty over the batch where we average it. The encoder and decoder gradients agree; the
    threshold's do not (decode-clt's estimator is -z / bandwidth on |u| <= 1/2, ours and circuit-tracer's
    -theta / bandwidth on |u| < 1/2; see docs/architectures/clt.md)."""
    m, xs, ys = _clt(fs, "jumprelu")
    lam, c = 2e-2, 1.5
    m.sparsity_coefficient, m.tanh_scale = lam * B, c
    theirs = _decode_clt(m, activation_fn="jumprelu")
    inputs = {layer: xs[:, layer] for layer in range(L)}
    targets = {layer: ys[:, layer] for layer in range(L)}
    recon = theirs(inputs)
    torch.testing.assert_close(torch.stack([recon[t] for t in range(L)], 1), m(xs), rtol=1e-5, atol=1e-6)
    config = require("clt.config").TrainingConfig(
        learning_rate=1e-3, training_steps=1, normalization_method="none", sparsity_lambda=lam, sparsity_c=c,
        preactivation_coef=0.0, activation_path="unused",  # a path the config requires; nothing reads it here
    )  # fmt: skip
    manager = require("clt.training.losses").LossManager(config)
    total, parts = manager.compute_total_loss(theirs, inputs, targets, current_step=1, total_steps=1)
    ours = m.loss(xs, ys)
    torch.testing.assert_close(ours.loss, total, rtol=1e-5, atol=1e-6)
    assert parts["sparsity"] == pytest.approx(float(ours.sparsity_loss.detach()), rel=1e-5)
    total.backward()
    ours.loss.backward()
    for layer in range(L):
        enc = theirs.encoder_module.encoders[layer]
        torch.testing.assert_close(enc.weight.grad, m.W_enc.grad[layer], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(enc.bias_param.grad, m.b_enc.grad[layer], rtol=1e-4, atol=1e-6)
        for t in range(layer, L):
            dec = theirs.decoder_module.decoders[f"{layer}->{t}"]
            want = m.W_dec[layer].grad
            torch.testing.assert_close(dec.weight.grad, want.view(F, L - layer, D)[:, t - layer].T, rtol=1e-4,
                                       atol=1e-6)  # fmt: skip
        torch.testing.assert_close(theirs.decoder_module.decoders[f"{layer}->{layer}"].bias_param.grad,
                                   m.b_dec.grad[layer], rtol=1e-4, atol=1e-6)  # fmt: skip
