#!/usr/bin/env python3
"""The whole training iteration of a TopK SAE, not only the step: where the time goes and how far it is
from its floor.

    python benchmarks/training_iteration.py [--features 65536,262144,524288,1048576,2097152] [--out benchmarks/results]
    python benchmarks/training_iteration.py --smoke    # tiny shapes on the CPU: checks the script runs

The iteration is the one ``examples/train_sae.py`` runs (its ``train_step`` and ``MasterWeights``):
bf16 compute, fp32 master weights and fp32 Adam moments, the TopK module's decoder-norm steps:

    step        sae.loss(x) + backward                       (bf16 module)
    pull        bf16 gradients -> fp32 master gradients      (MasterWeights.pull_grads)
    project     the decoder gradient's component along each row removed (before_optimizer_step)
    adam        torch.optim.Adam(capturable=True).step() on the fp32 master weights
    renorm      unit-norm decoder rows (after_optimizer_step)
    push        fp32 master -> bf16 module                   (MasterWeights.push)

Each row times the step alone and the whole iteration captured in one CUDA graph
(``flash_sae.graph_training_step``), and each part after the step alone (graph-captured, on the
gradients a step left), at B = 4096, D = 2048, k = 64 by default. Peak memory is the most allocated
through an iteration, above nothing (the whole training state). Two floors, each the larger of the
encoder GEMM at the tensor-core peak and the bytes at the copy bandwidth measured in the same run:

- step floor: ``side_by_side.step_floor_ms`` (read W_enc and x, gather 2 * B * k rows, write dW_enc and dW_dec);
- fused-iteration floor: the step's bytes without the two [F, D] gradient writes, plus every
  optimizer-state byte read and written once, per element of W_enc and W_dec: the fp32 master read and
  written (8 B), both fp32 moments read and written (16 B), the bf16 weight written (2 B).

The largest F one GPU trains this way is extrapolated from the peaks (a straight line in F through the
two largest measured) to the device's total memory, and said so.
"""

import argparse
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from results_schema import append_rows, environment, make_row, result_path, write_rows  # noqa: E402

FEATURES = (2**16, 2**18, 2**19, 2**20, 2**21)
SMOKE = dict(B=16, D=24, F=(64, 128), k=4)
# Bytes per element of W_enc and W_dec that a fused iteration must move: fp32 master read + written,
# two fp32 moments read + written, the bf16 compute copy written.
OPTIMIZER_BYTES_PER_ELEMENT = 8 + 16 + 2
PARTS = ("pull", "project", "adam", "renorm", "push")


def load_kernel():
    sys.path.insert(0, str(ROOT))
    import build_local

    return build_local.load_kernel()


def fused_iteration_floor_ms(B, D, F, k, bw, peak_flops):
    """The floor of an iteration that applies Adam and the norm steps inside the backward (no gradient tensor)."""
    gemm_ms = 2 * B * F * D / peak_flops * 1e3
    step_bytes = (F * D + B * D + 2 * B * k * D) * 2  # bf16: W_enc, x, the gathered rows; no dW writes
    state_bytes = 2 * F * D * OPTIMIZER_BYTES_PER_ELEMENT
    return max(gemm_ms, (step_bytes + state_bytes) / bw * 1e3)


class Iteration:
    """examples/train_sae.py's iteration, split into its parts so each can be timed alone."""

    def __init__(self, fs, D, F, k, device):
        import train_sae

        args = train_sae.parse_args(["--arch=topk"])  # its defaults (the dead-latent loss included)
        args.k, args.d_sae, args.seed = k, F, 0
        graphed = str(device).startswith("cuda")  # capturable Adam: its state and lr on the device
        self.sae, self.master, self.opt = train_sae.make_trainer(fs, args, D, torch.bfloat16, device, graphed)
        self.train_step = train_sae.train_step
        self.trained = self.master.master if self.master else self.sae
        self.parts = dict(
            pull=self.master.pull_grads,
            project=self.trained.before_optimizer_step,
            adam=self.opt.step,
            renorm=self.trained.after_optimizer_step,
            push=self.master.push,
        )

    def step(self, x):
        for p in self.sae.parameters():
            p.grad = None
        self.sae.loss(x).loss.backward()

    def iteration(self, x):
        return self.train_step(self.sae, self.master, self.opt, x)

    def modules(self):
        return [self.sae, self.trained]


def graph_time(fn):
    """Median ms of ``fn`` captured in a CUDA graph (``side_by_side.graph_ms``: three warm-up calls on a side
    stream, one capture, ``do_bench`` on the replays; NaN where the capture fails)."""
    from side_by_side import graph_ms

    return graph_ms(fn)


def part_times(it, x):
    """ms of each part after the step, alone (graph-captured on the gradients one step left)."""
    out = {}
    for name in PARTS:
        it.step(x)
        if name != "pull":
            it.master.pull_grads()
        fn = repull(it) if name == "pull" else it.parts[name]
        out[name] = graph_time(fn)
    return out


def repull(it):
    """pull_grads moves the bf16 gradients away: a call that puts them back first, so it repeats."""
    grads = [p.grad for p in it.sae.parameters()]

    def fn():
        for p, gr in zip(it.sae.parameters(), grads, strict=True):
            p.grad = gr
        it.master.pull_grads()

    return fn


def measure(fs, B, D, F, k, bw, peak_flops):
    """One row: step, iteration, parts, peak memory, floors."""
    from side_by_side import step_floor_ms

    device = "cuda"
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    it = Iteration(fs, D, F, k, device)
    x = torch.randn(B, D, device=device, dtype=torch.bfloat16)
    step_ms = graph_time(lambda: it.step(x))
    parts = part_times(it, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run = fs.graph_training_step(it.iteration, x, it.modules(), it.opt)
    run(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    from triton.testing import do_bench

    iter_ms = do_bench(lambda: run(x), warmup=10, rep=100, quantiles=[0.5])  # one copy + one replay per call
    step_floor = step_floor_ms(B, D, F, k, "bf16", 2, bw)
    fused_floor = fused_iteration_floor_ms(B, D, F, k, bw, peak_flops)
    return dict(
        step_ms=step_ms, iter_ms=iter_ms, parts=parts, peak_gib=peak, step_floor_ms=step_floor,
        fused_floor_ms=fused_floor,
    )  # fmt: skip


def smoke(fs):
    """CPU: the iteration and its parts run and change the weights; nothing timed."""
    B, D, k = SMOKE["B"], SMOKE["D"], SMOKE["k"]
    for F in SMOKE["F"]:
        it = Iteration(fs, D, F, k, "cpu")
        x = torch.randn(B, D, dtype=torch.bfloat16)
        before = it.sae.W_dec.detach().clone()
        out = it.iteration(x)
        if not torch.isfinite(out.loss):
            raise SystemExit(f"F={F}: a non-finite loss")
        if torch.equal(before, it.sae.W_dec):
            raise SystemExit(f"F={F}: the iteration did not change W_dec")
        floor = fused_iteration_floor_ms(B, D, F, k, 3e12, 989e12)
        print(f"smoke F={F}: loss {float(out.loss.detach()):.4f}, fused floor at 3 TB/s {floor * 1e3:.3f} us")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default=",".join(map(str, FEATURES)))
    parser.add_argument("--B", type=int, default=4096)
    parser.add_argument("--D", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; nothing timed or written")
    args = parser.parse_args(argv)
    fs = load_kernel()
    if args.smoke:
        return smoke(fs)
    if not torch.cuda.is_available():
        sys.exit("training_iteration.py needs a CUDA GPU (or --smoke)")
    from side_by_side import PEAK_FLOPS, copy_bandwidth

    bw = copy_bandwidth()
    env = environment()
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"# {env['gpu']}, {datetime.date.today()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print("# bf16 compute, fp32 master weights and Adam moments (examples/train_sae.py's iteration); graph ms")
    head = f"{'F':>8s} {'step':>7s} {'iter':>7s} " + " ".join(f"{p:>7s}" for p in PARTS)
    print(head + f" {'peak GiB':>8s} {'step floor':>10s} {'fused floor':>11s} {'iter/fused floor':>16s}")
    peaks = []
    B, D, k = args.B, args.D, args.k
    path = write_rows(result_path(env["gpu"], "training_iteration", args.out), [])  # rows appended per F
    for F in sorted(map(int, args.features.split(","))):
        shape = dict(B=B, D=D, F=F, K=k)
        try:
            r = measure(fs, B, D, F, k, bw, PEAK_FLOPS["bf16"])
        except torch.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            print(f"{F:8d} out of memory (larger F not tried)")
            append_rows(path, [make_row("training_iteration", "flash-sae + torch Adam (today)", shape, env=env,
                        dtype="bf16", error=f"out of memory: {str(err).splitlines()[0][:120]}")])  # fmt: skip
            break
        torch.cuda.empty_cache()
        peaks.append((F, r["peak_gib"]))
        parts = " ".join(f"{r['parts'][p]:7.2f}" for p in PARTS)
        ratio = r["iter_ms"] / r["fused_floor_ms"]
        print(
            f"{F:8d} {r['step_ms']:7.2f} {r['iter_ms']:7.2f} {parts} {r['peak_gib']:8.1f} "
            f"{r['step_floor_ms']:10.2f} {r['fused_floor_ms']:11.2f} {ratio:16.2f}"
        )
        common = dict(env=env, dtype="bf16", params={"optimizer": "Adam", "master_weights": "fp32"})
        rows = [make_row("training_iteration", "flash-sae step", shape, graph_ms=r["step_ms"],
                             floor_ms=r["step_floor_ms"], copy_bandwidth_tbps=bw / 1e12, **common)]  # fmt: skip
        rows.append(
            make_row(
                "training_iteration", "flash-sae + torch Adam (today)", shape, graph_ms=r["iter_ms"],
                peak_gib=r["peak_gib"], floor_ms=r["fused_floor_ms"], ms_per_step=r["iter_ms"],
                adam_ms=r["parts"]["adam"], copy_bandwidth_tbps=bw / 1e12,
                note="parts (graph ms): " + ", ".join(f"{p} {r['parts'][p]:.3f}" for p in PARTS), **common,
            )
        )  # fmt: skip
        append_rows(path, rows)
    if len(peaks) >= 2:
        (f0, p0), (f1, p1) = peaks[-2], peaks[-1]
        per_latent = (p1 - p0) / (f1 - f0)
        f_max = f1 + (total_gib - p1) / per_latent
        print(f"# largest F with this iteration on {total_gib:.0f} GiB: about {f_max / 2**20:.2f} Mi latents "
              f"(extrapolated: {per_latent * 2**30 / D:.1f} B per latent per model dim)")  # fmt: skip
    print(f"# rows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
