#!/usr/bin/env python3
"""Two builds of flash-sae, timed side by side in one process: did a change move the numbers?

    python benchmarks/compare_builds.py --before <checkout of the earlier commit> [--out DIR]

Builds both checkouts (each with its own ``build_local.py``), loads both with
``kernels.get_local_kernel`` (each build has its own op namespace, so they
coexist), and times ``topk_sae_loss``, ``hierarchical_topk_sae_loss`` and
``topk_sae_step`` (forward + backward, every float input requiring grad) on
the same inputs with side_by_side.py's ``measure_call``: eager ms and CUDA-graph
ms (``--scale`` adds the step at F = 2^20). The two builds alternate, before / after / before / after, so drift of the
GPU's clocks hits both; each cell reports the better of its two runs.

    python benchmarks/compare_builds.py --toggle KEY [--steps-only] [--scale]

compares one build (this checkout) with ``TUNING[KEY]`` off ("before") and on
("after") instead, set around each call (and so inside each captured graph).

Rows (``results_schema``, one per build and case: the better of its runs) go to
``<out>/<gpu>/compare_builds.jsonl``, by default under the current directory: an A/B is a check
of one change, not a result kept in benchmarks/results.
"""

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_schema import git_commit, result_path, write_rows  # noqa: E402
from side_by_side import (  # noqa: E402
    DTYPES,
    SHAPES,
    STEP_SHAPES,
    load_kernel,
    make_problem,
    make_step_problem,
    measure_call,
)

LOSS_OPS = ("topk_sae_loss", "hierarchical_topk_sae_loss", "sparse_decode")


# --family: each case's loss (one backward through everything it returns), by name; ``dead``: a quarter
# of the latents counted dead (AuxK over a fixed-capacity dead set) or None.
def dead_kwargs(fs, dead) -> dict:
    """The AuxK arguments of a build's steps: a ``DeadLatentLoss`` where the build has one, else the keyword
    ``dead_mask`` (builds from before the options object)."""
    return dict(dead_loss=fs.DeadLatentLoss(dead)) if hasattr(fs, "DeadLatentLoss") else dict(dead_mask=dead)


FAMILY_CALLS = {
    "topk_sae_step+auxk": lambda fs, p, K, dead: fs.topk_sae_step(*p, K, **dead_kwargs(fs, dead)).loss,
    "batchtopk_sae_step": lambda fs, p, K, dead: fs.batchtopk_sae_step(*p, K).loss,
    "batchtopk_sae_step+auxk": lambda fs, p, K, dead: fs.batchtopk_sae_step(*p, K, **dead_kwargs(fs, dead)).loss,
    "matryoshka_topk_sae_step": lambda fs, p, K, dead: fs.matryoshka_topk_sae_step(*p, K, nested(p)).loss,
    "matryoshka_batchtopk_sae_step": lambda fs, p, K, dead: fs.matryoshka_batchtopk_sae_step(*p, K, nested(p)).loss,
    # the threshold steps on problems whose codes hold about K entries a row (``threshold_problem``)
    "jumprelu_sae_step": lambda fs, p, K, dead: fs.jumprelu_sae_step(*p, capacity=capacity(p, K)).loss,
    "standard_sae_step": lambda fs, p, K, dead: fs.standard_sae_step(*p, capacity=capacity(p, K)).loss,
    "gated_sae_step": lambda fs, p, K, dead: fs.gated_sae_step(*p, capacity=capacity(p, K)).loss,
}
THRESHOLD_STEPS = ("jumprelu_sae_step", "standard_sae_step", "gated_sae_step")


def nested(p) -> list[int]:
    F = p[1].shape[0]
    return [F // 4, F // 2, F]


def capacity(p, K) -> int:
    """Room for four times the expected K entries a row (the draws' counts stay far below)."""
    return 4 * p[0].shape[0] * K


def threshold_problem(op, B, D, F, K, dtype):
    """``make_step_problem``'s SAE with the threshold a pre-activation (about N(0, 1) there) passes with
    probability K / F: JumpReLU's threshold, or the standard and Gated encoders' bias shifted down by it.
    Returns the step's tensor arguments, in its order, each requiring grad."""
    x, W_enc, _, W_dec, b_dec = make_step_problem(B, D, F, K, dtype, "cuda")
    theta = float(torch.special.ndtri(torch.tensor(1 - K / F, dtype=torch.float64)))
    shifted = torch.full((F,), -theta, device="cuda", dtype=dtype, requires_grad=True)
    zeros = [torch.zeros(F, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2)]
    if op == "jumprelu_sae_step":
        threshold = torch.full((F,), theta, device="cuda", dtype=torch.float32, requires_grad=True)
        return [x, W_enc, zeros[0], W_dec, b_dec, threshold]
    if op == "standard_sae_step":
        return [x, W_enc, shifted, W_dec, b_dec]
    return [x, W_enc, shifted, zeros[0], zeros[1], W_dec, b_dec]  # gated: b_gate, r_mag, b_mag


def load_build(checkout: Path):
    from kernels import get_local_kernel

    subprocess.run([sys.executable, str(checkout / "build_local.py")], check=True, capture_output=True)
    return get_local_kernel(checkout / "build")


class Toggled:
    """``fs`` with one TUNING entry set to ``value`` around every op call."""

    def __init__(self, fs, table, key, value):
        self.fs, self.table, self.key, self.value = fs, table, key, value
        self.__name__ = f"{fs.__name__}[{key}={value}]"

    def __getattr__(self, name):
        op = getattr(self.fs, name)

        def call(*args, **kwargs):
            saved = self.table[self.key]
            self.table[self.key] = self.value
            try:
                return op(*args, **kwargs)
            finally:
                self.table[self.key] = saved

        return call


def schema_rows(benchmark, meta, rows):
    """The A/B's rows -> results_schema rows: per case, one row per build (its best eager and graph ms)."""
    from results_schema import make_row

    env = {k: meta.get(k) for k in ("gpu", "torch", "triton", "commit", "date")}
    out = []
    for r in rows:
        for name, runs in r["runs"].items():
            out.append(
                make_row(
                    benchmark, f"{name}: {meta['builds'][list(r['runs']).index(name)]}",
                    {k: r[k] for k in "BDFK"}, dtype=r["dtype"], eager_ms=min(m for m, _ in runs),
                    graph_ms=min(g for _, g in runs), env=env, params={"op": r["op"], "runs": len(runs)},
                )
            )  # fmt: skip
    return out


def main():
    parser = argparse.ArgumentParser()
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", type=Path, help="checkout of the earlier commit")
    which.add_argument("--toggle", help="a boolean TUNING entry: this build with it off, then on")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--scale", action="store_true", help="also the step at F = 2^20 (B = 4096, D = 2048, K = 64, bf16)"
    )
    parser.add_argument("--steps-only", action="store_true", help="only topk_sae_step (not the decoder losses)")
    parser.add_argument(
        "--family", action="store_true",
        help="also every other step (BatchTopK, both Matryoshka steps, JumpReLU, standard, Gated) and the TopK "
        "and BatchTopK steps with the AuxK loss, at two step shapes",
    )  # fmt: skip
    args = parser.parse_args()
    if args.toggle:
        fs = load_kernel()
        table = sys.modules[fs.__name__ + "._launch"].TUNING
        if not isinstance(table.get(args.toggle), bool):
            raise ValueError(f"--toggle: {args.toggle!r} is not a boolean TUNING entry")
        builds = {"before": Toggled(fs, table, args.toggle, False), "after": Toggled(fs, table, args.toggle, True)}
    else:
        builds = {"before": load_build(args.before), "after": load_kernel()}
    gpu = torch.cuda.get_device_name()
    print(
        f"# {gpu}, {datetime.date.today()}, torch {torch.__version__}; builds: {[m.__name__ for m in builds.values()]}"
    )
    cases = []
    for op in LOSS_OPS if not args.steps_only else ():
        for B, D, F, K in SHAPES:
            cases.append((op, "bf16", B, D, F, K))
    cases += [("topk_sae_step", *shape) for shape in STEP_SHAPES]
    if args.scale:
        cases.append(("topk_sae_step", "bf16", 4096, 2048, 2**20, 64))
    if args.family:
        cases += [(op, *shape) for op in FAMILY_CALLS for shape in (STEP_SHAPES[1], STEP_SHAPES[-1])]
    rows = []
    print(
        f"{'op':28s} {'dtype':5s} {'B,D,F,K':24s} {'before ms':>10s} {'after ms':>9s} {'before graph':>13s} "
        f"{'after graph':>12s} {'graph after/before':>19s}"
    )
    for op, dname, B, D, F, K in cases:
        dtype = DTYPES[dname]
        if op == "topk_sae_step":
            params = make_step_problem(B, D, F, K, dtype, "cuda")
            calls = {name: (lambda fs=fs, p=params: fs.topk_sae_step(*p, K).loss) for name, fs in builds.items()}
        elif op in FAMILY_CALLS:
            threshold = op in THRESHOLD_STEPS
            params = (
                threshold_problem(op, B, D, F, K, dtype) if threshold else make_step_problem(B, D, F, K, dtype, "cuda")
            )
            dead = (torch.arange(F, device="cuda") % 4 == 0) if op.endswith("+auxk") else None
            calls = {name: (lambda fs=fs, p=params, op=op, dead=dead: FAMILY_CALLS[op](fs, p, K, dead))
                     for name, fs in builds.items()}  # fmt: skip
        elif op == "sparse_decode":  # (vals, indices, weight, bias); the problem holds (weight, vals, bias, target)
            indices, params = make_problem(B, D, F, K, dtype, "cuda")
            params = params[:3]
            calls = {name: (lambda fs=fs, p=params, i=indices: fs.sparse_decode(p[1], i, p[0], p[2]))
                     for name, fs in builds.items()}  # fmt: skip
        else:
            indices, params = make_problem(B, D, F, K, dtype, "cuda")
            calls = {name: (lambda fs=fs, p=params, i=indices: getattr(fs, op)(i, *p)) for name, fs in builds.items()}
        got = {name: [] for name in builds}
        for _ in range(args.runs):
            for name, call in calls.items():
                (ms, _, _), peak, graph = measure_call(call, params)
                got[name].append((ms, graph))
        best = {name: (min(m for m, _ in v), min(g for _, g in v)) for name, v in got.items()}
        ratio = best["after"][1] / best["before"][1]
        row = dict(op=op, dtype=dname, B=B, D=D, F=F, K=K, runs=got, graph_ratio=ratio)
        rows.append(row)
        print(
            f"{op:28s} {dname:5s} {f'{B},{D},{F},{K}':24s} {best['before'][0]:10.3f} {best['after'][0]:9.3f} "
            f"{best['before'][1]:13.3f} {best['after'][1]:12.3f} {ratio:19.3f}",
            flush=True,
        )
        del params, calls
        torch.cuda.empty_cache()
    worst = max(r["graph_ratio"] for r in rows)
    print(f"worst graph ratio after/before: {worst:.3f}")
    names = [m.__name__ for m in builds.values()]
    meta = dict(
        gpu=gpu, date=str(datetime.date.today()), torch=torch.__version__, triton=__import__("triton").__version__,
        commit=git_commit(), builds=names,
    )  # fmt: skip
    print(
        f"wrote {write_rows(result_path(gpu, 'compare_builds', args.out), schema_rows('compare_builds', meta, rows))}"
    )


if __name__ == "__main__":
    main()
