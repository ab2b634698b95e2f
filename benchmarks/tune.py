#!/usr/bin/env python3
"""Sweeps the launch policy in ``_launch.TUNING`` (and the hierarchical window size)
and times each stage of the decoder ops separately, so every choice in
docs/design/selection.md has a measurement behind it.

Usage: python benchmarks/tune.py [--out benchmarks/results] [--only ...]   (needs a CUDA GPU)
Rows go to <out>/<gpu>/tune.jsonl (``results_schema``; one row per setting timed, the setting in params).
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark script
from results_schema import environment, result_path, write_rows  # noqa: E402
from side_by_side import load_kernel, make_problem  # noqa: E402

SHAPES = [(2048, 2304, 65536, 64), (4096, 2048, 262144, 64)]


def bench(fn):
    return do_bench(fn, warmup=10, rep=100, quantiles=[0.5, 0.2, 0.8])[0]


SELECT_SHAPES = [(1024, 65536, 64), (4096, 262144, 64), (2048, 65536, 128), (2048, 65536, 32)]


def encoder_sweeps(fs, common, default, only, record):
    """The top-k selection against torch.topk on the same [B, F] bf16 pre-activations, its stages,
    and a sweep of its policy (group size, groups per program, warps); then the encoder's stages
    (GEMM alone, GEMM + torch.topk, our forward and backward) at the default policy."""
    enc = sys.modules[fs.__name__ + ".primitives.select.row_topk"]
    groups = sys.modules[fs.__name__ + ".primitives.select.groups"]
    encode = sys.modules[fs.__name__ + ".ops.topk.topk_encode"]
    for B, F, K in SELECT_SHAPES if "select" in only else []:
        shape = dict(B=B, F=F, K=K)
        pre = torch.randn(B, F, device="cuda", dtype=torch.bfloat16)
        common.TUNING.update(default)
        ref_idx = torch.sort(pre, dim=1, descending=True, stable=True).indices[:, :K]
        assert torch.equal(enc.select_topk(pre, K)[1], ref_idx), "selection differs from the stable sort"
        record(kind="select", impl="torch.topk", ms=bench(lambda: torch.topk(pre, K, dim=1)), **shape)
        record(kind="select", impl="read once (pre.amax)", ms=bench(lambda: pre.amax(1)), **shape)
        stages = {
            "group_best": lambda: groups.group_best(pre, 0, enc.topk_group(F, K)),
            "chunk_top_k": lambda: enc.chunk_top_k(pre, 0, K),
            "select_topk": lambda: enc.select_topk(pre, K),
        }
        for name, fn in stages.items():
            record(kind="select_stage", stage=name, ms=bench(fn), **shape)
        fits = enc.ROW_SELECT_MAX
        enc.ROW_SELECT_MAX = 0  # the previous candidate stage (two torch.topk calls), same run
        record(
            kind="select_stage",
            stage="select_topk, torch.topk candidate stage",
            ms=bench(stages["select_topk"]),
            **shape,
        )
        enc.ROW_SELECT_MAX = fits
        space = itertools.product([16, 32, 64], [64, 256], [4, 8])
        if (B, F, K) not in SELECT_SHAPES[:2]:  # the other shapes: the default policy only
            space = [(enc.topk_group(F, K), default["select_groups"], default["select_warps"])]
        for grp, groups, nw in space:
            if grp * groups > 16384 or grp * groups < 256:
                continue
            common.TUNING.update(default, topk_select_group=grp, select_groups=groups, select_warps=nw)
            try:
                ms = bench(lambda: enc.select_topk(pre, K))
            except Exception as e:  # a config the compiler rejects is recorded, not fatal
                ms = float("nan")
                print(f"config {grp},{groups},{nw} failed: {type(e).__name__}", flush=True)
            record(
                kind="select", impl="flash-sae", select_group=grp, select_groups=groups, select_warps=nw, ms=ms, **shape
            )
        common.TUNING.update(default)
        del pre
        torch.cuda.empty_cache()
    for B, D, F, K in SHAPES if "encode" in only else []:
        shape = dict(B=B, D=D, F=F, K=K)
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16, generator=g)
        W = torch.randn(F, D, device="cuda", dtype=torch.bfloat16, generator=g) / D**0.5
        b = torch.zeros(F, device="cuda", dtype=torch.bfloat16)
        bd = torch.zeros(D, device="cuda", dtype=torch.bfloat16)
        vals, idx = encode.topk_encode_fwd(x, W, b, bd, K)
        dv = torch.randn_like(vals)
        stages = {
            "gemm_addmm": lambda: torch.addmm(b, x, W.T),
            "torch_addmm_topk": lambda: torch.topk(torch.addmm(b, x, W.T), K, dim=1),
            "encode_fwd": lambda: encode.topk_encode_fwd(x, W, b, bd, K),
            "encode_bwd": lambda: encode.topk_encode_bwd(dv, x, W, bd, vals, idx, [True] * 4),
        }
        for name, fn in stages.items():
            record(kind="encode_stage", stage=name, ms=bench(fn), **shape)
        del x, W, b, vals, idx, dv
        torch.cuda.empty_cache()


def schema_rows(benchmark, meta, rows):
    """The sweep's records (kind, the setting, ms, the shape) -> results_schema rows: implementation is
    the kind plus its impl or stage when it has one; every other key but the shape is a param."""
    from results_schema import make_row

    env = {k: meta.get(k) for k in ("gpu", "torch", "triton", "commit", "date")}
    out = []
    for r in rows:
        shape = {k: r[k] for k in "BDFK" if k in r}
        params = {k: v for k, v in r.items() if k not in shape and k not in ("ms", "impl", "kind")}
        name = r["kind"] + (f": {r['impl']}" if "impl" in r else "")
        out.append(make_row(benchmark, name, shape, dtype="bf16", env=env, params=params or None, ms=r["ms"]))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--only", default="stage,gather,segment,window,select,encode", help="comma-separated sweeps to run"
    )
    args = parser.parse_args()
    fs = load_kernel()
    pkg = fs.__name__
    common = sys.modules[pkg + "._launch"]
    csr = sys.modules[pkg + ".primitives.csr"]
    gather = sys.modules[pkg + ".primitives.gather"]
    topk = sys.modules[pkg + ".ops.decode.topk_sae_loss"]
    hier = sys.modules[pkg + ".ops.decode.hierarchical_topk_sae_loss"]
    default = dict(common.TUNING)
    rows = []

    def record(**kw):
        rows.append(kw)
        print(json.dumps(kw), flush=True)

    only = args.only.split(",")
    if "select" in only or "encode" in only:
        encoder_sweeps(fs, common, default, only, record)
    for B, D, F, K in SHAPES if set(only) & {"stage", "gather", "segment", "window"} else []:
        shape = dict(B=B, D=D, F=F, K=K)
        indices, (weight, vals, bias, target) = make_problem(B, D, F, K, torch.bfloat16, "cuda")
        w, v, b, t = (x.detach() for x in (weight, vals, bias, target))
        grad = torch.tensor(1.0, device="cuda")
        # Stage times at the default policy.
        common.TUNING.update(default)
        _, residual = topk.topk_sae_loss_fwd(indices, w, v, b, t, False)
        _, h_residual, h_esum = hier.hierarchical_topk_sae_loss_fwd(indices, w, v, b, t, False)
        needs = [True, True, False, False]  # dweight and dvals, as the segmented / scan passes compute them
        stages = {
            "topk_fwd": lambda: topk.topk_sae_loss_fwd(indices, w, v, b, t, False),
            "csr_transpose": lambda: csr.csr_transpose(indices, F),
            "topk_bwd": lambda: topk.topk_sae_loss_bwd(grad, indices, w, v, residual, needs),
            "decode_fwd": lambda: gather.gather_rows(v, indices, w, b),
            "decode_bwd": lambda: gather.gather_rows_backward(t, v, indices, w),
            "hier_fwd": lambda: hier.hierarchical_topk_sae_loss_fwd(indices, w, v, b, t, False),
            "hier_bwd": lambda: hier.hierarchical_topk_sae_loss_bwd(grad, indices, w, v, h_residual, h_esum, needs),
            "zero_fill_dweight": lambda: torch.zeros_like(w),
            "torch_sort_BK": lambda: torch.sort(indices.reshape(-1).int(), stable=True),
        }
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
        for mb in [32, 128, 512, 4096] if "window" in only else []:
            common.TUNING.update(default, hierarchical_buffer_bytes=mb * 2**20)
            record(kind="window", buffer_mib=mb, ms=bench(stages["hier_bwd"]), **shape)
        common.TUNING.update(default)
        del indices, weight, vals, bias, target, w, v, b, t, residual, h_residual, h_esum
        torch.cuda.empty_cache()
    meta = environment()
    path = write_rows(result_path(meta["gpu"], "tune", args.out), schema_rows("tune", meta, rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
