#!/usr/bin/env python3
"""torch.profiler table of one flash-sae forward + backward: where host and device time go.

Usage: python benchmarks/profile_step.py OP B D F K [dtype]   (needs a CUDA GPU)
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark script
from side_by_side import DTYPES, load_kernel, make_problem  # noqa: E402


def main():
    op, B, D, F, K = sys.argv[1], *map(int, sys.argv[2:6])
    dtype = DTYPES[sys.argv[6] if len(sys.argv) > 6 else "bf16"]
    fs = load_kernel()
    indices, params = make_problem(B, D, F, K, dtype, "cuda")
    fn = getattr(fs, op)

    def step():
        for p in params:
            p.grad = None
        fn(indices, *params).backward()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
