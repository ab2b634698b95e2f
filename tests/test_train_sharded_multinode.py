"""examples/train_sharded.py under torchrun on several "nodes" of this CPU host (gloo, c10d rendezvous).

Each node is one ``torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d`` subprocess rendezvousing
on a free localhost port, under a timeout (a hang fails the test). The script runs flash-sae's plain-torch
path (as on a CPU without ``TRITON_INTERPRET``; the sharded ops' own tests cover the kernels). Checked:
2 nodes x 2 processes of latent shards follow the one-process ``SparseAutoencoder`` trained in this
process from the same checkpoint on the same batches, and their checkpoint resumes on 1 node x 3
(optimizer state and step count included) on the same curve; on a 2 x 2 ("data", "latent") mesh, 2 nodes
x 2 give the same losses as 1 node x 4 (and, with the replicas inside the nodes, the same curve), and
their checkpoint resumes on 1 node x 3 (one replica of the whole batch) on the same curve; every
architecture gives the same losses on 2 nodes x 2 as on 1 node x 4; the one-process module loaded from
each run's checkpoint gives the run's held-out loss. Bad layouts fail the launch within the timeout:
every rank raises the same ValueError before its first training collective, and each node's torchrun
exits with an error (the first failure tears down the other ranks, so the output need not hold every
rank's message).
"""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_sharded.py"
TIMEOUT = 150  # seconds a launch may take on the 2-core CPU before it counts as a hang
TINY = [
    "--device", "cpu", "--d-model", "9", "--n-features", "23", "--k", "3", "--batch", "8",
    "--true-features", "40", "--true-k", "3", "--lr", "1e-2", "--log-every", "1", "--seed", "3",
]  # fmt: skip


@pytest.fixture(autouse=True)
def torch_path(fs, monkeypatch):
    """The plain-torch path in this process; the launched ranks get it by running without TRITON_INTERPRET."""
    monkeypatch.setattr(sys.modules[fs.__name__ + "._launch"], "CPU_RUNS_TRITON", False)


def script():
    spec = importlib.util.spec_from_file_location("train_sharded", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(nodes: int, per_node: int, args: list[str]) -> tuple[list[int], str]:
    """Runs the script on ``nodes`` torchrun agents of ``per_node`` processes each; their exit codes and
    output. A launch that outlives ``TIMEOUT`` is killed (its process groups) and fails the test."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # LOCAL_KERNELS: the fs fixture's
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(per_node)]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"test{port}"]
    cmd += ["--rdzv-conf", "join_timeout=60", "--max-restarts", "0", str(SCRIPT), *args]
    procs = [
        subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        for _ in range(nodes)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"torchrun on {nodes} x {per_node} hung past {TIMEOUT} s")
    return [p.returncode for p in procs], "\n".join(outs)


def train(nodes, per_node, args, losses: Path) -> dict[int, float]:
    """Each step's loss (rank 0's ``--losses`` file); the run must succeed, and the one-process module
    loaded from its checkpoint must give its held-out loss."""
    codes, out = launch(nodes, per_node, [*TINY, *args, "--losses", str(losses)])
    assert codes == [0] * nodes, out
    held_out = re.search(r"held-out loss sharded ([\d.]+), single-GPU module ([\d.]+)", out)
    assert held_out, out
    torch.testing.assert_close(float(held_out[1]), float(held_out[2]), rtol=1e-5, atol=1e-6)
    return {r["step"]: r["loss"] for r in map(json.loads, losses.read_text().splitlines())}


def test_two_nodes_of_latent_shards_follow_the_one_process_module_and_resume_on_one_node(fs, tmp_path):
    """4 latent shards on 2 nodes, started from a one-process module's checkpoint, against that module
    trained here on the same batches with the same Adam; their checkpoint at step 2 resumed on 1 node x 3
    continues the same curve."""
    ts = script()
    args = ts.parse_args([*TINY, "--steps", "4"])
    single = fs.SparseAutoencoder(args.d_model, args.n_features, args.k, seed=7)
    fs.distributed.save_checkpoint(single, tmp_path / "init")
    run = ["--steps", "4", "--save-every", "2", "--resume", str(tmp_path / "init"), "--out", str(tmp_path / "a")]
    sharded = train(2, 2, run, tmp_path / "two.jsonl")
    resume = ["--steps", "4", "--resume", str(tmp_path / "a" / "step_2"), "--out", str(tmp_path / "b")]
    resumed = train(1, 3, resume, tmp_path / "resumed.jsonl")
    assert sorted(sharded) == [0, 1, 2, 3] and sorted(resumed) == [2, 3]
    opt = torch.optim.Adam(single.parameters(), lr=args.lr)
    for step in range(args.steps):
        out = single.loss(ts.batch(args, step, "cpu", torch.float32))
        out.loss.backward()
        single.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        single.after_optimizer_step()
        for what, curve in (("2 x 2", sharded), ("resumed 1 x 3", resumed)):
            if step in curve:
                torch.testing.assert_close(curve[step], out.loss.item(), rtol=1e-5, atol=1e-7, msg=f"{what} {step}")
    for ck in ("a", "b"):
        trained = fs.SparseAutoencoder(args.d_model, args.n_features, args.k)
        fs.distributed.load_checkpoint(trained, tmp_path / ck)
        torch.testing.assert_close(trained.W_dec, single.W_dec, rtol=1e-4, atol=1e-6)


def test_a_mesh_that_does_not_divide_the_world_fails_on_every_rank():
    codes, out = launch(2, 2, [*TINY, "--data-parallel", "3", "--steps", "1"])
    assert all(c != 0 for c in codes), out
    assert "--data-parallel 3 must divide the number of processes (4)" in out, out


@pytest.mark.slow
def test_two_nodes_match_one_node_and_resume_on_another_layout(tmp_path):
    """A 2 x 2 ("data", "latent") mesh: 2 nodes x 2 processes and 1 node x 4 give the same losses, and
    2 nodes x 2 with the replicas inside the nodes (``--replicas-inner``) the same curve; the 2-node run's
    checkpoint at step 2 resumes on 1 node x 3 (3 latent shards, one replica of the whole batch) and
    continues the curve."""
    two = train(2, 2, ["--data-parallel", "2", "--steps", "4", "--save-every", "2", "--out", str(tmp_path / "a")],
                tmp_path / "two.jsonl")  # fmt: skip
    one = train(1, 4, ["--data-parallel", "2", "--steps", "4", "--out", str(tmp_path / "b")], tmp_path / "one.jsonl")
    assert sorted(two) == [0, 1, 2, 3]
    assert two == one
    inner = train(2, 2, ["--data-parallel", "2", "--replicas-inner", "--steps", "4", "--out", str(tmp_path / "d")],
                  tmp_path / "inner.jsonl")  # fmt: skip
    assert inner == pytest.approx(two, rel=1e-6)
    resumed = train(1, 3, ["--steps", "4", "--resume", str(tmp_path / "a" / "step_2"), "--out", str(tmp_path / "c")],
                    tmp_path / "resumed.jsonl")  # fmt: skip
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        torch.testing.assert_close(resumed[step], two[step], rtol=1e-5, atol=1e-7, msg=f"step {step}")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "jumprelu", "standard"])
def test_every_architecture_trains_on_two_nodes(tmp_path, arch):
    """Each architecture on 2 nodes x 2 latent shards gives the losses of 1 node x 4 (the same ranks)."""
    args = ["--arch", arch, "--steps", "2", "--prefix-sizes", "5,12,23"]
    two = train(2, 2, [*args, "--out", str(tmp_path / "a")], tmp_path / "two.jsonl")
    one = train(1, 4, [*args, "--out", str(tmp_path / "b")], tmp_path / "one.jsonl")
    assert sorted(two) == [0, 1] and two == one


@pytest.mark.slow
def test_too_few_latents_for_the_shards_fails_on_every_rank():
    codes, out = launch(2, 2, [*TINY, "--n-features", "3", "--k", "1", "--steps", "1"])
    assert all(c != 0 for c in codes), out
    assert "n_features=3 over 4 latent shards leaves the last shard empty" in out, out
