#!/usr/bin/env python3
"""Scaling of the latent-sharded TopK step (``flash_sae.distributed``) over GPUs, launched with torchrun.

    torchrun --nproc-per-node W benchmarks/sharded_topk_sae_step.py --features 2097152,8388608 [--data-world R]
        [--B 4096 --D 2048 --k 64] [--out benchmarks/results] [--stem sharded_scaling]

Each rank holds its shard of W_enc, b_enc, W_dec (bf16, drawn on its GPU: unit-norm decoder rows, tied
encoder) and b_dec; the latent group shares one batch (x ~ N(0, 1), seeded by replica). Per F, every
rank runs in lockstep (fixed iteration counts, no adaptive benchmarking, since the ranks must issue
the same collectives) and rank 0 prints and appends a row (``results_schema``) to
``--out/<gpu>/<stem>.jsonl`` with the slowest rank's numbers:
- step ms: ``sharded_topk_sae_step`` forward + backward, eager (median of CUDA-event timings) and
  captured in a CUDA graph;
- adam ms: the same plus ``torch.optim.Adam``'s step (fused), eager;
- collectives ms: the step's collectives alone, with its sizes (one all-gather of the [B, min(k, c)]
  int64 candidates, two all-reduces of [B, D] fp32 in the backward when x needs no gradient: the
  second is [D]), eager;
- peak GiB: the most any rank allocated through a whole training step (weights, gradients, Adam's
  two moments, the step's workspace), beside the target (params + grads + Adam) / W + 2 GiB;
- with one rank, also the single-GPU ``topk_sae_step`` on the same tensors (the baseline).
Output stem ``sharded_scaling`` (the name this script had when the committed results were measured).
"""

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_schema import append_rows, git_commit, make_row, result_path  # noqa: E402


def schema_row(benchmark, row, triton=None, commit=None):
    """One measured row (the dict run_one builds) -> a results_schema row. Step ms eager -> eager_ms."""
    env = dict(gpu=row["gpu"], torch=row.get("torch"), triton=triton, commit=commit, date=row.get("date"))
    shape = dict(
        B=row["B"], D=row["D"], F=row["F"], K=row["k"], world=row["world"], data_world=row["data_world"],
        latent_world=row["latent_world"],
    )  # fmt: skip
    return make_row(
        benchmark, "flash-sae sharded_topk_sae_step", shape, dtype=row["dtype"], eager_ms=row["step_ms"],
        graph_ms=row["graph_ms"], peak_gib=row["peak_gib"], env=env, adam_ms=row["adam_ms"],
        collectives_ms=row["collectives_ms"], memory_target_gib=row["memory_target_gib"],
        single_gpu_topk_sae_step_ms=row["single_gpu_topk_sae_step_ms"],
    )  # fmt: skip


def timed(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_timed(fn, iters):
    """Median ms of ``fn`` replayed from a CUDA graph (NaN if the capture fails)."""
    try:
        torch.cuda.empty_cache()  # the eager steps' freed blocks, so the graph's private pool fits
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timed(graph.replay, iters, warmup=2)
    except Exception as err:  # noqa: BLE001 (report and go on: the eager numbers still stand)
        print(f"rank {dist.get_rank()}: CUDA graph capture failed: {type(err).__name__}: {err}", flush=True)
        return float("nan")


def slowest(v: float) -> float:
    t = torch.tensor([v], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class Mesh(NamedTuple):
    """The run's layout: W latent shards x R replicas (world ranks), this rank's latent mesh, group and replica."""

    W: int
    R: int
    world: int
    latent: object
    group: object
    replica: int


def run_one(fs, args, F, mesh: Mesh, name, out_dir):
    W, R, world, latent, group, replica = mesh
    B, D, k, dtype = args.B, args.D, args.k, torch.bfloat16
    f0, f1 = fs.distributed.shard_bounds(F, W, latent.get_local_rank())
    n = f1 - f0
    torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(1 + f0)
    W_dec = torch.randn(n, D, device="cuda", dtype=dtype, generator=g)
    W_dec /= torch.linalg.vector_norm(W_dec, dim=1, keepdim=True, dtype=torch.float32).to(dtype)
    params = [
        W_dec.clone().requires_grad_(),  # W_enc (tied init)
        torch.zeros(n, device="cuda", dtype=dtype, requires_grad=True),
        W_dec.requires_grad_(),
        torch.zeros(D, device="cuda", dtype=dtype, requires_grad=True),
    ]
    del W_dec
    x = torch.randn(B, D, device="cuda", dtype=dtype, generator=torch.Generator(device="cuda").manual_seed(replica))
    W_enc, b_enc, W_dec, b_dec = params

    def fwd_bwd():
        for p in params:
            p.grad = None
        out = fs.distributed.sharded_topk_sae_step(x, W_enc, b_enc, W_dec, b_dec, k, group=group, n_features=F)
        out.loss.backward()

    opt = torch.optim.Adam(params, lr=1e-4, fused=True)  # fused: no parameter-sized temporaries

    def train_step():
        fwd_bwd()
        opt.step()

    train_step()  # Adam's state exists from here on
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    adam_ms = slowest(timed(train_step, args.iters))
    peak = slowest(torch.cuda.max_memory_allocated() / 2**30)  # before the graph's private pool exists
    step_ms = slowest(timed(fwd_bwd, args.iters))
    graph_ms = float("nan") if args.no_graph else slowest(graph_timed(fwd_bwd, args.iters))

    kc = min(k, -(-F // W))
    cand = torch.zeros(B, kc, device="cuda", dtype=torch.int64)
    gathered = torch.empty(W * B, kc, device="cuda", dtype=torch.int64)
    partial = torch.zeros(B, D, device="cuda", dtype=torch.float32)
    col = torch.zeros(D, device="cuda", dtype=torch.float32)

    def collectives():
        dist.all_gather_into_tensor(gathered, cand, group=group)
        dist.all_reduce(partial, group=group)
        dist.all_reduce(col, group=group)

    coll_ms = slowest(timed(collectives, args.iters)) if W > 1 else 0.0
    single_ms = float("nan")
    if world == 1:

        def single():
            for p in params:
                p.grad = None
            fs.topk_sae_step(x, W_enc, b_enc, W_dec, b_dec, k).loss.backward()

        single_ms = slowest(timed(single, args.iters))
    full_params = (2 * F * D + F + D) * 2  # bytes, bf16
    target = 4 * full_params / W / 2**30 + 2  # (params + grads + Adam's two moments) / W + 2 GiB
    row = dict(
        gpu=name, date=datetime.date.today().isoformat(), torch=torch.__version__, world=world, data_world=R,
        latent_world=W, B=B, D=D, F=F, k=k, dtype="bf16", step_ms=step_ms, graph_ms=graph_ms,
        adam_ms=adam_ms, collectives_ms=coll_ms, peak_gib=peak, memory_target_gib=target,
        single_gpu_topk_sae_step_ms=single_ms,
    )  # fmt: skip
    if dist.get_rank() == 0:
        print(
            f"{name} | {R} x {W} ranks | F={F:>9} | step {step_ms:7.2f} ms eager, {graph_ms:7.2f} graph | "
            f"+Adam {adam_ms:7.2f} | collectives {coll_ms:5.2f} | peak {peak:5.1f} GiB (target {target:5.1f})"
            + (f" | single-GPU topk_sae_step {single_ms:7.2f}" if world == 1 else ""),
            flush=True,
        )
        triton = getattr(sys.modules.get("triton"), "__version__", None)
        append_rows(result_path(name, args.stem, out_dir), [schema_row(args.stem, row, triton, git_commit())])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", default="2097152")
    ap.add_argument("--data-world", type=int, default=1)
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--D", type=int, default=2048)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--stem", default="sharded_scaling")
    args = ap.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    from torch.distributed.device_mesh import init_device_mesh

    import build_local

    fs = build_local.load_kernel()
    world = dist.get_world_size()
    R = args.data_world
    if world % R:
        raise SystemExit(f"--data-world {R} does not divide the world size {world}")
    W = world // R
    if R > 1:
        mesh = init_device_mesh("cuda", (R, W), mesh_dim_names=("data", "latent"))
        latent, data = mesh["latent"], mesh["data"]
    else:
        mesh = init_device_mesh("cuda", (W,), mesh_dim_names=("latent",))
        latent, data = mesh, None
    group = latent.get_group()
    replica = data.get_local_rank() if data is not None else 0
    name = torch.cuda.get_device_name()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    for F in [int(f) for f in args.features.split(",")]:
        run_one(fs, args, F, Mesh(W, R, world, latent, group, replica), name, out_dir)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
