#!/usr/bin/env python3
"""torch.profiler table of one flash-sae forward + backward: where host and device time go.

Usage: python benchmarks/profile_step.py OP B D F K [dtype]   (needs a CUDA GPU; PROFILE_ROWS=N rows;
PROFILE_HOST=1 adds the host side: ops by CPU time, host vs wall time per step, a cProfile of 20 steps;
PROFILE_NCU=1 runs one step between cudaProfilerStart/Stop instead, for Nsight Compute's --profile-from-start off)
OP: a decoder op (topk_sae_loss, ...) or a whole step (topk_sae_step, topk_sae_step+auxk or +ghost
with 4096 dead latents and k_aux = 512, batchtopk_sae_step,
jumprelu_sae_step with its threshold set so that L0 is about K, matryoshka_*_sae_step with
side_by_side's five levels, standard_sae_step / gated_sae_step and their _dense formulations with
L0 about K (standard_sae_step.py's problem), a "+compile" suffix on a dense one for torch.compile of it).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark script
from side_by_side import DTYPES, load_kernel, make_problem, make_step_problem, prefix_sizes  # noqa: E402


def step_call(fs, op, B, D, F, K, dtype):
    params = make_step_problem(B, D, F, K, dtype, "cuda")
    if op.startswith("topk_sae_step+"):  # +auxk or +ghost: 4096 random dead latents, k_aux = 512
        dead = torch.zeros(F, dtype=torch.bool, device="cuda")
        dead[torch.randperm(F, device="cuda")[: min(F, 4096)]] = True
        mode = op.split("+")[1]
        dead_loss = fs.DeadLatentLoss(dead, kind=mode, k_aux=min(512, F))
        return lambda: fs.topk_sae_step(*params, K, dead_loss=dead_loss).loss, params
    if op == "topk_sae_step":
        return lambda: fs.topk_sae_step(*params, K).loss, params
    if op == "batchtopk_sae_step":
        return lambda: fs.batchtopk_sae_step(*params, K, rescale_acts_by_decoder_norm=True).loss, params
    if op == "matryoshka_batchtopk_sae_step":
        sizes = prefix_sizes(F)
        step = fs.matryoshka_batchtopk_sae_step
        return lambda: step(*params, K, sizes, rescale_acts_by_decoder_norm=True).loss, params
    if op == "matryoshka_topk_sae_step":
        sizes = prefix_sizes(F)
        return lambda: fs.matryoshka_topk_sae_step(*params, K, sizes).loss, params
    if op == "jumprelu_sae_step":
        with torch.no_grad():
            probe = fs.batchtopk_sae_step(*params, K)
        threshold = torch.full((F,), probe.min_act.item(), device="cuda", requires_grad=True)
        count = int(fs.jumprelu_sae_step(*[p.detach() for p in params], threshold, capacity=B * min(F, 4 * K)).count)
        capacity = 1 << (int(1.25 * count) - 1).bit_length()
        jp = params + [threshold]
        return lambda: fs.jumprelu_sae_step(*jp, capacity=capacity).loss, jp
    if op.startswith(("standard_sae_step", "gated_sae_step")):
        from standard_sae_step import problem

        arch = op.split("_")[0]
        params = problem(B, D, F, K, "cuda", arch)
        fn = getattr(fs, op.split("+")[0])
        if op.endswith("+compile"):
            fn = torch.compile(fn, dynamic=False)
        if "_dense" in op:
            return lambda: fn(*params).loss, params
        with torch.no_grad():
            count = int(getattr(fs, f"{arch}_sae_step_dense")(*params).count)
        capacity = min(B * F, 1 << (int(1.5 * count) - 1).bit_length())
        return lambda: fn(*params, capacity=capacity).loss, params
    raise SystemExit(f"unknown step op {op}")


def main():
    op, B, D, F, K = sys.argv[1], *map(int, sys.argv[2:6])
    dtype = DTYPES[sys.argv[6] if len(sys.argv) > 6 else "bf16"]
    fs = load_kernel()
    if "_sae_step" in op:
        call, params = step_call(fs, op, B, D, F, K, dtype)
    else:
        indices, params = make_problem(B, D, F, K, dtype, "cuda")
        fn = getattr(fs, op)

        def call():
            return fn(indices, *params)

    def step():
        for p in params:
            p.grad = None
        call().backward()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    if os.environ.get("PROFILE_NCU"):  # one step between cudaProfilerStart/Stop, for `ncu --profile-from-start off`
        torch.cuda.profiler.start()
        step()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(f"{op} B={B} D={D} F={F} K={K} {dtype}: 10 steps")
    rows = int(os.environ.get("PROFILE_ROWS", "30"))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows))
    if os.environ.get("PROFILE_HOST"):  # where the host's time goes in eager mode: torch ops, then Python
        import cProfile
        import pstats
        import time

        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        host = (time.perf_counter() - t0) / 20
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 20
        print(f"host time per step (launching only) {host * 1e3:.3f} ms; wall per step {wall * 1e3:.3f} ms")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            step()
        pr.disable()
        torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
