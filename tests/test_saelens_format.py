"""The modules' SAELens format: ``to_saelens()`` -> (cfg, tensors) and ``from_saelens(cfg, tensors)``.

For every architecture the export supports (TopK, JumpReLU in both threshold parameterisations,
standard, Gated, and BatchTopK / Matryoshka, which SAELens, like flash-sae, exports as its JumpReLU):
the export loads back into flash-sae with the same reconstruction, and into the installed SAELens
(``SAE.load_from_disk``) with the same reconstruction, the activation scaling folded in. The loader
checks every tensor's shape against the cfg (SAELens's W_enc is [d_in, d_sae], flash-sae's [F, D]), so a
file in the wrong layout is a ValueError; a square SAE, whose shapes cannot tell, round-trips exactly.

The modules run flash-sae's plain-torch path here (the kernels' own tests cover the interpreter).
"""

import json
import sys

import pytest
import torch
from peers import require

D, F = 12, 20
FACTOR = 1.7  # the module read x * FACTOR in training; the export reads raw x
ARCHS = {
    "topk": ("SparseAutoencoder", dict(k=4), "topk"),
    "jumprelu": ("JumpReLUSparseAutoencoder", dict(), "jumprelu"),
    "jumprelu-log": ("JumpReLUSparseAutoencoder", dict(threshold_parameterization="log"), "jumprelu"),
    "standard": ("StandardSparseAutoencoder", dict(), "standard"),
    "vanilla": ("VanillaSparseAutoencoder", dict(), "standard"),  # the standard step, unit-norm rows
    "gated": ("GatedSparseAutoencoder", dict(), "gated"),
    "batchtopk": ("BatchTopKSparseAutoencoder", dict(k=4), "jumprelu"),
    "matryoshka": ("MatryoshkaBatchTopKSparseAutoencoder", dict(k=4, prefix_sizes=[5, 20]), "jumprelu"),
}
LOADS_AS = {"topk": "SparseAutoencoder", "jumprelu": "JumpReLUSparseAutoencoder",
            "standard": "StandardSparseAutoencoder", "gated": "GatedSparseAutoencoder"}  # fmt: skip


@pytest.fixture(autouse=True)
def torch_path(fs, monkeypatch):
    monkeypatch.setattr(sys.modules[fs.__name__ + "._launch"], "CPU_RUNS_TRITON", False)


def trained_like(fs, arch, d=D, f=F):
    """A module whose parameters look trained: decoder rows of varied norm, nonzero biases, a threshold
    that splits the code."""
    name, kwargs, _ = ARCHS[arch]
    sae = getattr(fs, name)(d, f, **kwargs, seed=1).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(f, 1, generator=g) * 2 + 0.3)
        sae.W_enc.add_(torch.randn(f, d, generator=g) * 0.2)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        for p in sae.latent_vectors():
            p.copy_(torch.randn(f, generator=g) * 0.1)
        x = torch.randn(64, d, generator=g) * FACTOR
        pre = (x - sae.b_dec) @ sae.W_enc.T
        if arch.startswith("jumprelu"):
            theta = pre.abs().median(0).values * 0.5
            if arch == "jumprelu":
                sae.threshold.copy_(theta)
            else:
                sae.log_threshold.copy_(theta.log())
        if arch in ("batchtopk", "matryoshka"):
            scaled = ((pre + sae.b_enc) * sae.W_dec.norm(dim=1)).flatten().sort().values
            scaled = scaled[scaled > 0]
            n = scaled.numel() // 2  # between two entries: none sits on the threshold (a rounding coin flip)
            sae.threshold.fill_(((scaled[n] + scaled[n + 1]) / 2).item())
            sae.threshold_updates.fill_(sae.threshold_warmup_steps())  # set by hand: counts as warm
    return sae, x / FACTOR


def loader_kwargs(arch):
    """The constructor options beyond the cfg (TopK's k is cfg['k'])."""
    return {k: v for k, v in ARCHS[arch][1].items() if k != "k"}


def reconstruct(sae, x):
    with torch.no_grad():
        return sae(x)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_loads_back_with_the_same_reconstruction(fs, arch):
    sae, x_raw = trained_like(fs, arch)
    want = reconstruct(sae, x_raw * FACTOR) / FACTOR
    cfg, tensors = sae.to_saelens(activation_scale=FACTOR)
    assert cfg["architecture"] == ARCHS[arch][2] and (cfg["d_in"], cfg["d_sae"]) == (D, F)
    assert tensors["W_enc"].shape == (D, F) and tensors["W_dec"].shape == (F, D)
    json.dumps(cfg)  # cfg.json material
    back = getattr(fs, LOADS_AS[cfg["architecture"]]).from_saelens(cfg, tensors).eval()
    torch.testing.assert_close(reconstruct(back, x_raw), want, rtol=1e-5, atol=1e-5)
    if arch not in ("batchtopk", "matryoshka"):  # unscaled, the parameters come back exactly
        cfg, tensors = sae.to_saelens()
        again = type(sae).from_saelens(cfg, tensors, **loader_kwargs(arch))
        for (name, p), (_, q) in zip(sae.named_parameters(), again.named_parameters(), strict=True):
            exp_log = 1e-6 if name == "log_threshold" else 0  # SAELens keeps theta: exp, then log, rounds
            torch.testing.assert_close(p, q, rtol=exp_log, atol=0, msg=name)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_loads_in_saelens_with_the_same_reconstruction(fs, arch, tmp_path):
    sae_lens = require("sae_lens")
    save_file = require("safetensors.torch").save_file
    sae, x_raw = trained_like(fs, arch)
    meta = {"model_name": "gpt2", "hook_name": "blocks.0.hook_resid_pre", "context_size": 8, "dataset_path": "pydoc",
            "own_note": "kept in cfg['metadata'] only"}  # fmt: skip
    cfg, tensors = sae.to_saelens(activation_scale=FACTOR, metadata=meta)
    assert cfg["metadata"] == meta and "own_note" not in cfg and cfg["model_name"] == "gpt2"
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.architecture() == ARCHS[arch][2]
    for key in ("model_name", "hook_name", "context_size", "dataset_path"):  # SAELens reads the run's fields
        assert theirs.cfg.metadata[key] == meta[key], key
    want = reconstruct(sae, x_raw * FACTOR) / FACTOR
    with torch.no_grad():
        torch.testing.assert_close(theirs(x_raw), want, rtol=1e-5, atol=1e-5)
    fired = (theirs.encode(x_raw) > 0).float().mean()
    assert 0.05 < fired < 0.95, "the test should exercise a partial code"


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "standard", "gated"])
def test_a_square_sae_round_trips_untransposed(fs, arch):
    """d_in == d_sae: the shapes cannot tell W_enc from its transpose, so the loader transposes by rule;
    the loaded module's W_enc is the original, not its transpose."""
    sae, x_raw = trained_like(fs, arch, d=16, f=16)
    cfg, tensors = sae.to_saelens()
    back = type(sae).from_saelens(cfg, tensors, **loader_kwargs(arch))
    assert torch.equal(back.W_enc, sae.W_enc) and not torch.equal(back.W_enc, sae.W_enc.T)
    torch.testing.assert_close(reconstruct(back, x_raw), reconstruct(sae, x_raw), rtol=0, atol=0)


@pytest.mark.kernels_ci
def test_the_loader_checks_the_file_against_the_cfg(fs):
    sae, _ = trained_like(fs, "topk")
    cfg, tensors = sae.to_saelens()
    load = fs.SparseAutoencoder.from_saelens
    with pytest.raises(ValueError, match=r"tensors\['W_enc'\] has shape \(20, 12\) but cfg \(d_in=12, d_sae=20\)"):
        load(cfg, {**tensors, "W_enc": sae.W_enc.detach()})  # flash-sae's own layout
    with pytest.raises(ValueError, match=r"tensors\['W_dec'\] has shape \(12, 20\)"):
        load(cfg, {**tensors, "W_dec": tensors["W_dec"].T})
    with pytest.raises(ValueError, match=r"tensors must hold exactly .* missing \['b_enc'\]"):
        load(cfg, {k: v for k, v in tensors.items() if k != "b_enc"})
    with pytest.raises(ValueError, match=r"unexpected \['threshold'\]"):
        load(cfg, {**tensors, "threshold": torch.zeros(20)})
    with pytest.raises(ValueError, match=r"cfg\['architecture'\] is 'topk', but JumpReLUSparseAutoencoder loads"):
        fs.JumpReLUSparseAutoencoder.from_saelens(cfg, tensors)
    with pytest.raises(ValueError, match=r"cfg\['k'\]"):
        load({**cfg, "k": 21}, tensors)
    with pytest.raises(ValueError, match=r"cfg\['d_in'\]"):
        load({**cfg, "d_in": "12"}, tensors)
    with pytest.raises(ValueError, match=r"cfg\['normalize_activations'\]"):
        load({**cfg, "normalize_activations": "expected_average_only_in"}, tensors)
    with pytest.raises(ValueError, match=r"cfg\['rescale_acts_by_decoder_norm'\]"):
        load({**cfg, "rescale_acts_by_decoder_norm": True}, tensors)
    with pytest.raises(ValueError, match=r"k: a SAELens TopK SAE's k is cfg\['k'\]"):
        load(cfg, tensors, k=4)
    with pytest.raises(ValueError, match="^cfg must be a dict"):
        load(json.dumps(cfg), tensors)
    bt, _ = trained_like(fs, "batchtopk")
    bt_cfg, bt_tensors = bt.to_saelens()
    with pytest.raises(ValueError, match="load it with JumpReLUSparseAutoencoder.from_saelens"):
        fs.BatchTopKSparseAutoencoder.from_saelens(bt_cfg, bt_tensors)
    with pytest.raises(ValueError, match="activation_scale"):
        sae.to_saelens(activation_scale=0.0)
