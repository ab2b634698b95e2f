#!/usr/bin/env python3
"""Sweeps the launch policy in ``_common.TUNING`` (and the hierarchical window size)
and times each stage of the decoder ops separately, so every choice in
benchmarks/NOTES.md has a measurement behind it.

Usage: python benchmarks/tune.py [--out DIR]   (needs a CUDA GPU)
"""

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark script
from side_by_side import load_kernel, make_problem  # noqa: E402

SHAPES = [(2048, 2304, 65536, 64), (4096, 2048, 262144, 64)]


def bench(fn):
    return do_bench(fn, warmup=10, rep=100, quantiles=[0.5, 0.2, 0.8])[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--only", default="stage,gather,segment,window", help="comma-separated sweeps to run")
    args = parser.parse_args()
    fs = load_kernel()
    pkg = fs.__name__
    common = sys.modules[pkg + "._common"]
    csr = sys.modules[pkg + "._csr"]
    dec = sys.modules[pkg + ".sparse_decode"]
    topk = sys.modules[pkg + ".topk_sae_loss"]
    hier = sys.modules[pkg + ".hierarchical_topk_sae_loss"]
    default = dict(common.TUNING)
    rows = []

    def record(**kw):
        rows.append(kw)
        print(json.dumps(kw), flush=True)

    for B, D, F, K in SHAPES:
        shape = dict(B=B, D=D, F=F, K=K)
        indices, (weight, vals, bias, target) = make_problem(B, D, F, K, torch.bfloat16, "cuda")
        w, v, b, t = (x.detach() for x in (weight, vals, bias, target))
        grad = torch.tensor(1.0, device="cuda")
        # Stage times at the default policy.
        common.TUNING.update(default)
        _, residual = topk.topk_sae_loss_fwd(indices, w, v, b, t)
        stages = {
            "topk_fwd": lambda: topk.topk_sae_loss_fwd(indices, w, v, b, t),
            "csr_transpose": lambda: csr.csr_transpose(indices, F),
            "topk_bwd": lambda: topk.topk_sae_loss_bwd(grad, indices, w, v, residual),
            "decode_fwd": lambda: dec.sparse_decode_fwd(indices, v, w, b),
            "decode_bwd": lambda: dec.sparse_decode_bwd(t, indices, v, w),
            "hier_fwd": lambda: hier.hierarchical_topk_sae_loss_fwd(indices, w, v, b, t),
            "hier_bwd": lambda: hier.hierarchical_topk_sae_loss_bwd(grad, indices, w, v, residual),
            "zero_fill_dweight": lambda: torch.zeros_like(w),
            "torch_sort_BK": lambda: torch.sort(indices.reshape(-1).int(), stable=True),
        }
        only = args.only.split(",")
        for name, fn in stages.items() if "stage" in only else []:
            record(kind="stage", stage=name, ms=bench(fn), **shape)
        # Gather kernels: D-block, warps, K unroll (timed on the topk forward).
        for bd, nw, un in itertools.product([128, 256, 512], [1, 2, 4], [1, 4, 8]) if "gather" in only else []:
            common.TUNING.update(default, gather_block_d=bd, gather_warps=nw, gather_unroll=un)
            record(
                kind="gather",
                gather_block_d=bd,
                gather_warps=nw,
                gather_unroll=un,
                ms=bench(stages["topk_fwd"]),
                **shape,
            )
        # Segmented sum: D-block, warps, segment unroll (timed on the topk backward).
        for sd, nw, un in itertools.product([512, 1024, 2048], [1, 2, 4], [1, 2]) if "segment" in only else []:
            common.TUNING.update(default, segment_block_d=sd, segment_warps=nw, segment_unroll=un)
            record(
                kind="segment",
                segment_block_d=sd,
                segment_warps=nw,
                segment_unroll=un,
                ms=bench(stages["topk_bwd"]),
                **shape,
            )
        common.TUNING.update(default)
        # Hierarchical window.
        saved = hier.BUFFER_BYTES
        for mb in [32, 128, 512, 4096] if "window" in only else []:
            hier.BUFFER_BYTES = mb * 2**20
            record(kind="window", buffer_mib=mb, ms=bench(stages["hier_bwd"]), **shape)
        hier.BUFFER_BYTES = saved
        del indices, weight, vals, bias, target, w, v, b, t, residual
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), date=str(datetime.date.today()), torch=torch.__version__)
    (args.out / "tune.json").write_text(json.dumps(dict(**meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
