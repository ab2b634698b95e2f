#!/usr/bin/env python3
"""The standard (ReLU + L1) or Gated SAE step at densities from sparse to dense: where the sparse step
stops paying, the crossover ``StandardSparseAutoencoder`` / ``GatedSparseAutoencoder`` switch at
(their ``DENSE_ABOVE``).

For each shape and target L0 (active latents per row), b_enc (the Gated SAE's b_gate) is set so
that each pre-activation is positive with probability L0 / F (the inputs are standard normal and
the encoder rows unit-norm, so each pre-activation is about N(0, 1)); the row prints the L0
measured. Gated: r_mag = b_mag = 0, so every open gate has a positive magnitude (L0 = open gates).
Rows, forward + backward, bf16, in one run:
- flash-sae ``<arch>_sae_step`` (sparse; capacity sized as the module sizes it: 1.5x the count per
  row, rounded up to a power of two);
- flash-sae ``<arch>_sae_step_dense`` (the dense formulation the module runs while the code is dense);
- torch.compile of that dense formulation (F <= 2^18);
- SAELens's own ``StandardTrainingSAE`` / ``GatedTrainingSAE`` (default config), its training forward
  pass and backward.
Each prints eager ms, CUDA-graph ms (SAELens: eager only), peak GiB above the inputs and % of the
step's floor (the encoder GEMM at the tensor-core peak, or the unavoidable bytes at copy bandwidth,
``side_by_side.step_floor_ms`` with K = L0).

Usage: python benchmarks/standard_sae_step.py [--arch standard|gated] [--quick] [--out benchmarks/results]
       [--stem standard_sae_step]
"""

import argparse
import datetime
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_schema import git_commit, result_path, write_rows  # noqa: E402
from side_by_side import ROOT, copy_bandwidth, load_kernel, make_step_problem, measure_call, step_floor_ms  # noqa: E402

SHAPES = [(2048, 2304, 65536), (4096, 2048, 262144)]
QUICK = [(64, 40, 512)]
L0S = [32, 64, 128, 512, 2048, 8192, 32768]
L1 = 1.0


def problem(B, D, F, l0, device, arch="standard"):
    """x, W_enc, b_enc, W_dec, b_dec (bf16, requiring grad) with P(pre > 0) = l0 / F per entry; gated:
    x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec with r_mag = b_mag = 0."""
    params = make_step_problem(B, D, F, 1, torch.bfloat16, device)
    with torch.no_grad():
        p = torch.tensor(min(l0 / F, 0.999), dtype=torch.float64)
        params[2].fill_(float(-torch.special.ndtri(1 - p)))
    if arch == "gated":
        zeros = [torch.zeros_like(params[2]).requires_grad_() for _ in range(2)]
        params = [*params[:3], *zeros, *params[3:]]
    return params


def saelens_standard(params):
    try:
        from sae_lens.saes import (
            GatedTrainingSAE,
            GatedTrainingSAEConfig,
            StandardTrainingSAE,
            StandardTrainingSAEConfig,
        )
        from sae_lens.saes.sae import TrainStepInput
    except Exception as e:
        return None, f"sae-lens not importable: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    if len(params) == 7:  # gated
        x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec = (p.detach() for p in params)
        names = dict(b_gate=b_gate, r_mag=r_mag, b_mag=b_mag)
        cls, cfg_cls = GatedTrainingSAE, GatedTrainingSAEConfig
    else:
        x, W_enc, b_enc, W_dec, b_dec = (p.detach() for p in params)
        names = dict(b_enc=b_enc)
        cls, cfg_cls = StandardTrainingSAE, StandardTrainingSAEConfig
    F, D = W_enc.shape
    sae = cls(cfg_cls(d_in=D, d_sae=F, dtype="bfloat16", device="cuda"))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc.T)
        for name, t in names.items():
            getattr(sae, name).copy_(t)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)

    def call():
        step = TrainStepInput(
            sae_in=x, coefficients={"l1": L1}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
        )
        return sae.training_forward_pass(step).loss

    return (
        call,
        [p for p in sae.parameters() if p is not getattr(sae, "b_enc", None) or len(params) == 5],
        False,
    ), None


def schema_rows(benchmark, meta, rows):
    """This script's measured rows -> results_schema rows (bf16 steps; L0 and density as drawn)."""
    from results_schema import make_row

    env = {k: meta.get(k) for k in ("gpu", "torch", "triton", "commit", "date")}
    return [
        make_row(
            benchmark,
            r["impl"],
            dict(B=r["B"], D=r["D"], F=r["F"]),
            dtype="bf16",
            eager_ms=r["ms"],
            graph_ms=r["graph_ms"],
            peak_gib=r["peak_gib"],
            env=env,
            error=r.get("error"),
            eager_p20_ms=r["p20"],
            eager_p80_ms=r["p80"],
            floor_ms=r["floor_ms"],
            pct_of_floor=r["pct_floor"],
            x_baseline_eager=r["x_sparse_eager"],
            x_baseline_graph=r["x_sparse_graph"],
            l0=r["l0"],
            density=r["density"],
            copy_bandwidth_tbps=meta.get("copy_bandwidth_tbps"),
            params=dict(
                arch=meta.get("arch"),
                l1_coefficient=meta.get("l1_coefficient"),
                capacity=r["capacity"],
                baseline=f"flash-sae {meta.get('arch')}_sae_step (sparse)",
            ),
        )  # fmt: skip
        for r in rows
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--arch", choices=["standard", "gated"], default="standard")
    parser.add_argument("--stem", default=None)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("standard_sae_step.py needs a CUDA GPU")
    fs = load_kernel()
    arch = args.arch
    sparse_step, dense_step = getattr(fs, f"{arch}_sae_step"), getattr(fs, f"{arch}_sae_step_dense")
    saelens_name = "SAELens " + ("GatedTrainingSAE" if arch == "gated" else "StandardTrainingSAE")
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(
        f"# {arch} SAE step; {gpu}, {datetime.date.today()}, torch {torch.__version__}, "
        f"copy bandwidth {bw / 1e12:.2f} TB/s"
    )
    print(
        f"{'B,D,F':20s} {'L0':>7s} {'impl':34s} {'ms (p20-p80)':>24s} {'graph ms':>9s} {'peak GiB':>9s} "
        f"{'% floor':>8s} {'x sparse':>9s}"
    )
    rows = []
    for B, D, F in QUICK if args.quick else SHAPES:
        compiled = None
        if not args.no_compile and F <= 2**18:
            compiled = torch.compile(dense_step, dynamic=False)
        for target in [t for t in L0S if t < F] if not args.quick else [8, 128]:
            params = problem(B, D, F, target, "cuda", arch)
            with torch.no_grad():
                probe = dense_step(*params, l1_coefficient=L1)
            l0 = int(probe.count) / B
            per_row = min(F, 1 << max(0, math.ceil(math.log2(max(1.0, 1.5 * l0)))))
            capacity = min(B * F, per_row * B)
            fl = step_floor_ms(B, D, F, max(1, round(l0)), "bf16", 2, bw)
            impls = {
                f"flash-sae {arch}_sae_step": lambda: (
                    (lambda: sparse_step(*params, capacity=capacity, l1_coefficient=L1).loss, params, True),
                    None,
                ),
                "flash-sae dense formulation": lambda: (
                    (lambda: dense_step(*params, l1_coefficient=L1).loss, params, True),
                    None,
                ),
            }
            if compiled is not None:
                impls["torch.compile (dense formulation)"] = lambda: (
                    (lambda: compiled(*params, l1_coefficient=L1).loss, params, True),
                    None,
                )
            impls[saelens_name] = lambda: saelens_standard(params)
            sparse = None
            for name, impl in impls.items():
                built = None
                err = None
                try:
                    built, why = impl()
                    if built is None:
                        print(f"{f'{B},{D},{F}':20s} {l0:7.1f} {name}: not run ({why})")
                        continue
                    (ms, lo, hi), peak, gms = measure_call(*built)
                except torch.OutOfMemoryError as e:
                    ms = lo = hi = peak = gms = float("nan")
                    err = f"OOM: {str(e).splitlines()[0][:60]}"
                built = None
                torch.cuda.empty_cache()
                if sparse is None:
                    sparse = (ms, gms)
                best = gms if gms == gms else ms
                row = dict(
                    B=B, D=D, F=F, l0=l0, density=l0 / F, capacity=capacity, impl=name, ms=ms, p20=lo, p80=hi,
                    graph_ms=gms, peak_gib=peak, floor_ms=fl, pct_floor=100 * fl / best,
                    x_sparse_eager=ms / sparse[0], x_sparse_graph=gms / sparse[1], error=err,
                )  # fmt: skip
                rows.append(row)
                print(
                    f"{f'{B},{D},{F}':20s} {l0:7.1f} {name:34s} {ms:9.3f} ({lo:.3f}-{hi:.3f}) {gms:9.3f} "
                    f"{peak:9.2f} {row['pct_floor']:7.0f}% {ms / sparse[0]:5.2f}/{gms / sparse[1]:.2f}"
                    + (f"  {err}" if err else ""),
                    flush=True,
                )
            params = probe = None
            torch.cuda.empty_cache()
    crossover = {}
    for B, D, F in QUICK if args.quick else SHAPES:
        mine = [r for r in rows if r["F"] == F and r["impl"].startswith("flash-sae")]
        faster_dense = sorted(
            s["density"]
            for s in mine
            if s["impl"].endswith("formulation")
            and any(
                t["density"] == s["density"] and t["impl"].endswith("step") and s["graph_ms"] < t["graph_ms"]
                for t in mine
            )
        )
        crossover[f"{B},{D},{F}"] = dict(dense_faster_at=faster_dense)
        print(f"# {B},{D},{F}: dense formulation faster (CUDA graph) at densities {faster_dense}")
    meta = dict(
        gpu=gpu,
        date=str(datetime.date.today()),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        commit=git_commit(),
        copy_bandwidth_tbps=bw / 1e12,
        arch=arch,
        l1_coefficient=L1,
    )
    stem = args.stem or f"{arch}_sae_step"
    stem = f"{stem}_quick" if args.quick else stem
    path = write_rows(result_path(gpu, stem, args.out), schema_rows(stem, meta, rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
