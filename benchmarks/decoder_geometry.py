#!/usr/bin/env python3
"""Decoder geometry steps side by side: flash-sae's fused row kernels, the torch formulas of
``SAEBase`` (what the plain-torch twins and most trainers run), and torch.compile of them.

One timed call = ``remove_parallel_(W_dec, grad)`` then ``unit_norm_rows_(W_dec)`` (the two steps
around an optimiser step), bf16, eager ms and CUDA-graph ms, peak memory above the inputs, and %
of the bandwidth floor: W and the gradient read once, the gradient written once (first step), W
read and written once (second step), 5 * F * D * 2 bytes.

Usage: python benchmarks/decoder_geometry.py [--out DIR]   (needs a CUDA GPU)
"""

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark script
from results_schema import git_commit, result_path, write_rows  # noqa: E402
from side_by_side import ROOT, copy_bandwidth, graph_ms, load_kernel  # noqa: E402

SHAPES = [(65536, 2304), (262144, 2048), (2**21, 2048)]
TINY = torch.finfo(torch.float32).tiny


def torch_remove_parallel(W, G):
    w, g = W.float(), G.float()
    g -= (g * w).sum(1, keepdim=True) * w / w.pow(2).sum(1, keepdim=True).clamp_min(1e-30)
    G.copy_(g.to(G.dtype))


def torch_unit_norm(W):
    norm = W.float().norm(dim=1, keepdim=True).clamp_min(TINY)
    W.copy_((W.float() / norm).to(W.dtype))


def schema_rows(benchmark, meta, rows):
    """This script's measured rows -> results_schema rows (bf16 W and G, as measured above)."""
    from results_schema import make_row

    env = {k: meta.get(k) for k in ("gpu", "torch", "triton", "commit", "date")}
    return [
        make_row(
            benchmark,
            r["impl"],
            dict(F=r["F"], D=r["D"]),
            dtype="bf16",
            eager_ms=r["ms"],
            graph_ms=r["graph_ms"],
            peak_gib=r["peak_gib"],
            env=env,
            error=r.get("error"),
            floor_ms=r["floor_ms"],
            pct_of_floor=r["pct_floor"],
            copy_bandwidth_tbps=meta.get("copy_bandwidth_tbps"),
        )  # fmt: skip
        for r in rows
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decoder_geometry.py needs a CUDA GPU")
    from triton.testing import do_bench

    fs = load_kernel()
    geo = sys.modules[f"{fs.__name__}.primitives.decoder_geometry"]
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, {datetime.date.today()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    c_remove = torch.compile(torch_remove_parallel)
    c_unit = torch.compile(torch_unit_norm)
    impls = {
        "flash-sae": lambda W, G: (geo.remove_parallel_(W, G), geo.unit_norm_rows_(W)),
        "torch eager": lambda W, G: (torch_remove_parallel(W, G), torch_unit_norm(W)),
        "torch.compile": lambda W, G: (c_remove(W, G), c_unit(W)),
    }
    rows = []
    for F, D in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        W = torch.randn(F, D, device="cuda", dtype=torch.bfloat16, generator=g)
        G = torch.randn(F, D, device="cuda", dtype=torch.bfloat16, generator=g)
        floor = 5 * F * D * 2 / bw * 1e3
        for name, fn in impls.items():
            err = None

            def call(fn=fn, W=W, G=G):
                fn(W, G)

            try:
                call()  # warm-up and compile
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                call()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                ms = do_bench(call, warmup=10, rep=100, quantiles=[0.5])
                gms = graph_ms(call)
            except (torch.OutOfMemoryError, RuntimeError) as e:  # reported, not hidden
                ms = gms = peak = float("nan")
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
                torch.cuda.empty_cache()
            row = dict(F=F, D=D, impl=name, ms=ms, graph_ms=gms, peak_gib=peak, floor_ms=floor, error=err)
            row["pct_floor"] = 100 * floor / gms if gms == gms else float("nan")
            rows.append(row)
            print(
                f"decoder_geometry bf16 F={F:8d} D={D:5d} {name:14s} {ms:8.3f} ms {gms:8.3f} graph "
                f"{peak:7.2f} GiB {row['pct_floor']:5.0f}% floor ({floor:.3f} ms)" + (f"  {err}" if err else ""),
                flush=True,
            )
        W = G = call = None
        torch.cuda.empty_cache()
    meta = dict(
        gpu=gpu, date=str(datetime.date.today()), torch=torch.__version__, triton=__import__("triton").__version__,
        commit=git_commit(), copy_bandwidth_tbps=bw / 1e12,
    )  # fmt: skip
    path = write_rows(result_path(gpu, "decoder_geometry", args.out), schema_rows("decoder_geometry", meta, rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
