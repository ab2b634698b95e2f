#!/usr/bin/env python3
"""The whole training iteration of a TopK SAE, not only the step: where the time goes, how far it is from
its floor, and what applying Adam inside the backward (``flash_sae.FusedAdam``) changes.

    python benchmarks/training_iteration.py [--features 65536,262144,524288,1048576,2097152] [--out benchmarks/results]
    python benchmarks/training_iteration.py --smoke    # tiny shapes on the CPU: checks the script runs

The iteration is the one ``examples/train_sae.py`` runs (its ``make_trainer`` and ``train_step``): bf16
compute, fp32 master weights and fp32 Adam moments, the TopK module's decoder-norm steps, AuxK on. Four
ways to run it, each timed in the same process:

- ``torch Adam, foreach (before)``: the module's backward writes bf16 gradients; then
    pull     bf16 gradients -> fp32 master gradients      (MasterWeights.pull_grads)
    project  the decoder gradient's component along each row removed (before_optimizer_step)
    adam     torch.optim.Adam(capturable=True).step() (its multi-tensor form) on the fp32 master weights
    renorm   unit-norm decoder rows (after_optimizer_step)
    push     fp32 master -> bf16 module                   (MasterWeights.push)
  (each part is also timed alone, graph-captured, on the gradients one step left);
- ``torch Adam, fused``: the same with ``Adam(fused=True)`` (the pipeline's torch optimizer on a GPU);
- ``FusedAdam``: W_enc's and W_dec's rows updated inside the backward's segmented passes, projection
  and renormalisation included; no [F, D] gradient exists (the pipeline's default);
- ``FusedAdam, lazy``: only the rows that got a gradient in the step are read and written.

Each row is the whole iteration captured in one CUDA graph (``flash_sae.graph_training_step``) at B = 4096,
D = 2048, k = 64 by default, and the step alone (loss + backward, bf16 gradients). Peak memory is the
most allocated through an iteration, above nothing (the whole training state). Floors, each the larger of
the encoder GEMM at the tensor-core peak and the bytes at the copy bandwidth measured in the same run:

- step floor: ``side_by_side.step_floor_ms`` (read W_enc and x, gather 2 * B * k rows, write dW_enc and dW_dec);
- fused-iteration floor: the step's bytes without the two [F, D] gradient writes, plus every
  optimizer-state byte read and written once, per element of W_enc and W_dec: the fp32 master read and
  written (8 B), both fp32 moments read and written (16 B), the bf16 weight written (2 B);
- lazy floor: the same with the state bytes of the touched rows only (the fraction measured on the step).

The largest F each way trains on one GPU is extrapolated from its peaks (a straight line in F through
the two largest measured) to the device's total memory, and said so.
"""

import argparse
import datetime
import sys
from pathlib import Path
from typing import NamedTuple

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
BEFORE = "torch Adam, foreach (before)"
# each way to run the iteration: (train_sae.py's --optimizer, --lazy-adam, torch Adam's fused flag)
VARIANTS = {
    BEFORE: ("adam", False, False),
    "torch Adam, fused": ("adam", False, True),
    "FusedAdam": ("fused-adam", False, None),
    "FusedAdam, lazy": ("fused-adam", True, None),
}


def load_kernel():
    sys.path.insert(0, str(ROOT))
    import build_local

    return build_local.load_kernel()


def fused_iteration_floor_ms(B, D, F, k, bw, peak_flops, touched=1.0):
    """The floor of an iteration that applies Adam and the norm steps inside the backward (no gradient tensor);
    ``touched``: the fraction of rows whose state it reads and writes (1: exact Adam; lazy: those with a gradient)."""
    gemm_ms = 2 * B * F * D / peak_flops * 1e3
    step_bytes = (F * D + B * D + 2 * B * k * D) * 2  # bf16: W_enc, x, the gathered rows; no dW writes
    state_bytes = 2 * F * D * OPTIMIZER_BYTES_PER_ELEMENT * touched
    return max(gemm_ms, (step_bytes + state_bytes) / bw * 1e3)


class Iteration:
    """examples/train_sae.py's iteration for one of ``VARIANTS``, split into its parts where it has them."""

    def __init__(self, fs, shape, device, variant):
        import train_sae

        D, F, k = shape
        optimizer, lazy, torch_fused = VARIANTS[variant]
        args = train_sae.parse_args(["--arch=topk", f"--optimizer={optimizer}"] + ["--lazy-adam"] * lazy)
        args.k, args.d_sae, args.seed = k, F, 0  # its defaults otherwise (the dead-latent loss included)
        graphed = str(device).startswith("cuda")  # capturable Adam: its state and lr on the device
        self.sae, self.master, self.opt = train_sae.make_trainer(fs, args, D, torch.bfloat16, device, graphed)
        if torch_fused is False and graphed:  # the multi-tensor Adam the pipeline ran before
            self.opt = torch.optim.Adam(
                self.master.parameters(), lr=torch.tensor(args.lr, device=device), capturable=True
            )
        self.train_step = train_sae.train_step
        self.parts = None
        if self.master is not None:
            trained = self.master.master
            self.parts = dict(pull=self.master.pull_grads, project=trained.before_optimizer_step, adam=self.opt.step,
                              renorm=trained.after_optimizer_step, push=self.master.push)  # fmt: skip

    def step(self, x):
        for p in self.sae.parameters():
            p.grad = None
        return self.sae.loss(x).loss.backward()

    def iteration(self, x):
        return self.train_step(self.sae, self.master, self.opt, x)

    def modules(self):
        return [self.sae] + ([self.master.master] if self.master else [])


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


def measure(fs, shape, variant, x):
    """One way's row at one shape: iteration ms (graph), peak GiB, parts (torch's ways), touched fraction."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    it = Iteration(fs, shape, "cuda", variant)
    row = {}
    if it.parts is not None and variant == BEFORE:
        row["parts"] = part_times(it, x)
        row["step_ms"] = graph_time(lambda: it.step(x))
    if variant == "FusedAdam":  # the share of rows with a gradient, for the lazy floor (one sync, untimed)
        with torch.no_grad():
            row["touched"] = float((it.sae.loss(x).fire_counts > 0).float().mean())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run = fs.graph_training_step(it.iteration, x, it.modules(), it.opt)
    run(x)
    torch.cuda.synchronize()
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["iter_ms"] = do_bench(lambda: run(x), warmup=10, rep=100, quantiles=[0.5])  # one copy + one replay per call
    return row


class Measured(NamedTuple):
    """What a row is set beside: its floor (ms), the before way's ms (or None), the copy bandwidth (B/s)."""

    floor_ms: float
    before_ms: float | None
    bandwidth: float


def iteration_row(variant, shape, r, measured: Measured, common) -> dict:
    """One way's results row (the schema of ``results_schema``) from ``measure``'s dict."""
    note = ("parts (graph ms): " + ", ".join(f"{p} {r['parts'][p]:.3f}" for p in PARTS)) if "parts" in r else None
    metrics = dict(graph_ms=r["iter_ms"], peak_gib=r["peak_gib"], floor_ms=measured.floor_ms, ms_per_step=r["iter_ms"],
                   copy_bandwidth_tbps=measured.bandwidth / 1e12,
                   x_baseline_graph=measured.before_ms / r["iter_ms"] if measured.before_ms else None)  # fmt: skip
    if variant == "FusedAdam, lazy" and r.get("touched") is not None:
        metrics["touched_rows"] = r["touched"]
    return make_row("training_iteration", variant, shape, note=note, **metrics, **common)


def smoke(fs):
    """CPU: every way's iteration runs and changes the weights; nothing timed."""
    B, D, k = SMOKE["B"], SMOKE["D"], SMOKE["k"]
    smoke_common = dict(env=environment(), dtype="bf16", params={"optimizer": "Adam"})  # rows built, not written
    for F in SMOKE["F"]:
        for variant in VARIANTS:
            it = Iteration(fs, (D, F, k), "cpu", variant)
            x = torch.randn(B, D, dtype=torch.bfloat16)
            before = it.sae.W_dec.detach().clone()
            out = it.iteration(x)
            if not torch.isfinite(out.loss):
                raise SystemExit(f"F={F} {variant}: a non-finite loss")
            if torch.equal(before, it.sae.W_dec):
                raise SystemExit(f"F={F} {variant}: the iteration did not change W_dec")
            fake = dict(iter_ms=1.0, peak_gib=1.0, touched=0.5, parts=dict.fromkeys(PARTS, 0.1), step_ms=0.5)
            iteration_row(variant, dict(B=B, D=D, F=F, K=k), fake, Measured(1.0, 2.0, 3e12), smoke_common)
        floor = fused_iteration_floor_ms(B, D, F, k, 3e12, 989e12)
        print(f"smoke F={F}: {len(VARIANTS)} ways ran, fused floor at 3 TB/s {floor * 1e3:.3f} us")
    return 0


def largest_f(peaks, total_gib, D):
    """The F at which a straight line through the two largest measured peaks reaches ``total_gib``, or None."""
    if len(peaks) < 2:
        return None
    (f0, p0), (f1, p1) = peaks[-2], peaks[-1]
    per_latent = (p1 - p0) / (f1 - f0)
    return f1 + (total_gib - p1) / per_latent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default=",".join(map(str, FEATURES)))
    parser.add_argument("--B", type=int, default=4096)
    parser.add_argument("--D", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated subset of the four ways")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; nothing timed or written")
    parser.add_argument("--tuning", default="", help="TUNING entries for this run: key=value,key=value")
    parser.add_argument("--stem", default="training_iteration", help="the results file's name")
    args = parser.parse_args(argv)
    fs = load_kernel()
    if args.tuning:
        from side_by_side import apply_tuning

        apply_tuning(fs, args.tuning, "--tuning")
    if args.smoke:
        return smoke(fs)
    if not torch.cuda.is_available():
        sys.exit("training_iteration.py needs a CUDA GPU (or --smoke)")
    from side_by_side import PEAK_FLOPS, copy_bandwidth, step_floor_ms

    asked = [v.strip() for v in args.variants.split(";")]
    unknown = [v for v in asked if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; the ways are {list(VARIANTS)} (';'-separated)")
    variants = [v for v in VARIANTS if v in asked]
    bw = copy_bandwidth()
    env = environment()
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"# {env['gpu']}, {datetime.date.today()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print("# bf16 compute, fp32 master weights and Adam moments (examples/train_sae.py's iteration); graph ms")
    B, D, k = args.B, args.D, args.k
    path = write_rows(result_path(env["gpu"], args.stem, args.out), [])  # rows appended per F
    peaks = {v: [] for v in variants}
    out_of_memory = set()
    params = {"optimizer": "Adam", "master_weights": "fp32", "dead_loss": "auxk", "tuning": args.tuning or None}
    common = dict(env=env, dtype="bf16", params=params)
    for F in sorted(map(int, args.features.split(","))):
        shape = dict(B=B, D=D, F=F, K=k)
        x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
        floors = dict(
            step=step_floor_ms(B, D, F, k, "bf16", 2, bw),
            fused=fused_iteration_floor_ms(B, D, F, k, bw, PEAK_FLOPS["bf16"]),
        )
        print(f"F = {F}: step floor {floors['step']:.2f} ms, fused-iteration floor {floors['fused']:.2f} ms")
        rows, base, touched = [], None, None
        for variant in variants:
            if variant in out_of_memory:
                continue
            try:
                r = measure(fs, (D, F, k), variant, x)
            except torch.OutOfMemoryError as err:
                torch.cuda.empty_cache()
                out_of_memory.add(variant)
                print(f"  {variant:30s} out of memory (larger F not tried)")
                error = f"out of memory: {str(err).splitlines()[0][:120]}"
                rows.append(make_row("training_iteration", variant, shape, error=error, **common))
                continue
            torch.cuda.empty_cache()
            peaks[variant].append((F, r["peak_gib"]))
            touched = r.get("touched", touched)
            floor = floors["fused"]
            if variant == "FusedAdam, lazy" and touched is not None:
                floor = fused_iteration_floor_ms(B, D, F, k, bw, PEAK_FLOPS["bf16"], touched)
                r["touched"] = touched
            if variant == BEFORE:
                base = r["iter_ms"]
            speedup = f" {base / r['iter_ms']:5.2f}x the before" if base else ""
            extra = ""
            if "parts" in r:
                extra = (
                    "  parts: "
                    + ", ".join(f"{p} {r['parts'][p]:.2f}" for p in PARTS)
                    + f"; step alone {r['step_ms']:.2f}"
                )
                rows.append(make_row("training_iteration", "flash-sae step", shape, graph_ms=r["step_ms"],
                                     floor_ms=floors["step"], copy_bandwidth_tbps=bw / 1e12, **common))  # fmt: skip
            print(f"  {variant:30s} {r['iter_ms']:8.2f} ms  peak {r['peak_gib']:6.1f} GiB  floor {floor:7.2f}  "
                  f"iter/floor {r['iter_ms'] / floor:5.2f}{speedup}{extra}")  # fmt: skip
            rows.append(iteration_row(variant, shape, r, Measured(floor, base, bw), common))
        append_rows(path, rows)
    for variant, pk in peaks.items():
        f_max = largest_f(pk, total_gib, D)
        if f_max is not None:
            print(f"# {variant}: largest F on {total_gib:.0f} GiB about {f_max / 2**20:.2f} Mi latents (extrapolated)")
    print(f"# rows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
