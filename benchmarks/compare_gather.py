#!/usr/bin/env python3
"""Two builds' row gather and its segmented adjoint, timed alone in one process (CUDA graphs).

    python benchmarks/compare_gather.py --before <checkout of the earlier commit>

A narrower look than compare_builds.py when a change touches only ``primitives/gather.py`` or
``primitives/csr.py``: ``gather_residual`` (decode with residual and squared error) and
``gather_rows_backward`` (the segmented pass with the dots) at (2048, 2304, 65536, 64) bf16, the two
builds alternating. With ``$OUT`` set it also writes each build's compiled ``_segment_sum_kernel`` PTX
there, to diff what the compiler made of a change.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_builds import load_build  # noqa: E402
from side_by_side import graph_ms, load_kernel, make_problem  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    builds = [("before", load_build(args.before)), ("after", load_kernel())]
    B, D, F, K = 2048, 2304, 65536, 64
    indices, params = make_problem(B, D, F, K, torch.bfloat16, "cuda")
    weight, vals, bias, target = (p.detach() for p in params)
    scale = torch.ones((), device="cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; (B, D, F, K) = {(B, D, F, K)} bf16")
    for _ in range(args.reps):
        for name, fs in builds:
            g = sys.modules[fs.__name__ + ".primitives.gather"]
            residual = getattr(g, "gather_residual", None) or g.gather_rows  # earlier builds: gather_rows(..., target)
            r, _ = residual(vals, indices, weight, bias, target)
            fwd = graph_ms(lambda residual=residual: residual(vals, indices, weight, bias, target))
            bwd = graph_ms(
                lambda g=g, r=r: g.gather_rows_backward(r, vals, indices, weight, scale=scale, scale_const=1e-3)
            )
            print(f"{name}: gather fwd {fwd * 1e3:.1f} us, gather_rows_backward {bwd * 1e3:.1f} us", flush=True)
    out = os.environ.get("OUT")
    if out:
        for name, fs in builds:
            kernel = sys.modules[fs.__name__ + ".primitives.csr"]._segment_sum_kernel
            for caches in kernel.device_caches.values():
                for i, compiled in enumerate(caches[0].values()):
                    Path(out, f"segment_sum_{name}_{i}.ptx").write_text(compiled.asm["ptx"])


if __name__ == "__main__":
    main()
