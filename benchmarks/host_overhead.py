#!/usr/bin/env python3
"""Where an eager step's host time goes: unit costs, then a per-primitive breakdown.

Eager mode pays, per step, the Python of our launchers, torch's dispatch of each small op,
Triton's launcher and the driver's launch calls. When that sum exceeds the GPU's work the
step is host-bound (the goal: eager <= 1.1x the CUDA-graph time). This script
measures, on the device it runs on:

1. unit costs: one small torch elementwise op, one ``torch.zeros``, one Triton launch (a
   trivial kernel with a launcher-sized argument list), one ``autograd.Function`` forward +
   backward with empty bodies; each launched back to back without a sync (host time);
2. the step's host time per call (forward + backward, launched back to back, synchronized
   once at the end: the host is the bottleneck when this exceeds the GPU time) and its
   CUDA-graph GPU time, and the kernels it launches per step (torch.profiler's count of
   driver launch calls and memsets);
3. host time inside each primitive the step calls (wrapped with timers, no sync), and
   the rest (autograd, the op's own Python).

Usage: python benchmarks/host_overhead.py [OP] [B D F K] [dtype]   (default topk_sae_step 1024 768 24576 32 fp32)
(``FLASH_SAE_TUNING="key=value,..."`` sets TUNING entries first, as in the tests.)
Runs on CPU too (plain-torch path; host and device time are then the same thing).
"""

import collections
import functools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import DTYPES, apply_tuning, graph_ms, load_kernel, make_step_problem  # noqa: E402

WRAPPED = (  # (module suffix, function): the primitives a step calls, timed where they are looked up
    ("_validation", "check_step_args"),
    ("primitives.select.preacts", "topk_preacts"),
    ("primitives.select.preacts", "pre_chunks"),
    ("primitives.select.groups", "group_max_keys"),
    ("primitives.select.row_topk", "row_select_values"),
    ("primitives.select.row_topk", "topk_group"),
    ("primitives.select.row_topk", "row_select_fits"),
    ("primitives.gather", "gather_residual"),
    ("primitives.gather", "gather_rows"),
    ("results", "fire_counts"),
    ("results", "total_variance"),
    ("primitives.step_backward", "mse_step_backward"),
    ("primitives.csr", "csr_transpose"),
    ("primitives.csr", "segment_sum_dots"),
    ("primitives.csr", "segment_sum_weighted"),
    ("primitives.gather", "gather_rows_backward_gated"),
    ("primitives.encoder", "encoder_backward"),
)


def host_us(fn, n, sync):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    sync()
    return host


def unit_costs(device, sync):
    a = torch.randn(1024, 768, device=device)
    b = torch.randn(1024, 768, device=device)
    rows = [
        ("torch a - b [1024, 768] fp32", lambda: a - b),
        ("torch.zeros(24576, int64)", lambda: torch.zeros(24576, dtype=torch.int64, device=device)),
    ]

    class Nothing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    leaf = torch.zeros((), device=device, requires_grad=True)
    rows.append(("autograd.Function fwd + bwd, empty bodies", lambda: Nothing.apply(leaf).backward()))
    if device != "cpu":
        import triton
        import triton.language as tl

        @triton.jit
        def touch(p0, p1, p2, p3, p4, p5, n0, n1, n2, s0, s1, BLOCK: tl.constexpr, FLAG: tl.constexpr):
            if tl.program_id(0) == 0:
                tl.store(p0, n0 + n1 + n2 + s0 + s1)

        ptrs = [torch.zeros(8, device=device) for _ in range(6)]
        rows.append(
            ("Triton launch, 11 args + 2 constexpr", lambda: touch[(1,)](*ptrs, 1, 2, 3, 4, 5, BLOCK=64, FLAG=True))
        )
    return [(name, host_us(fn, 2000, sync)) for name, fn in rows]


def step_fn(fs, op, params, K):
    def step():
        getattr(fs, op)(*params, K).loss.backward()
        for p in params:
            p.grad = None

    return step


def eager_gpu(step, n=50):
    """(GPU timeline us per eager step, from events; kernel us per step, summed by torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    step()
    torch.cuda.synchronize()
    events[0].record()
    for _ in range(n):
        step()
    events[1].record()
    torch.cuda.synchronize()
    span = events[0].elapsed_time(events[1]) / n * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 5
    counts = collections.Counter()
    for e in prof.events():
        if e.name.startswith(("cudaLaunch", "cuLaunch", "cudaMemset", "cudaMemcpy", "cudaStreamSynchronize")):
            counts[e.name] += 1
    return span, kernel_us, {k: v / 5 for k, v in counts.items()}


def breakdown(fs, step, n):
    """Host us per step inside each wrapped primitive (outermost call only) and in total."""
    pkg = fs.__name__
    spent = collections.Counter()
    depth = [0]
    originals = []
    for suffix, name in WRAPPED:
        mod = sys.modules[f"{pkg}.{suffix}"]
        orig = getattr(mod, name)

        @functools.wraps(orig)
        def timed(*a, _orig=orig, _name=name, **kw):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return _orig(*a, **kw)
            finally:
                spent[(_name, depth[0])] += time.perf_counter() - t
                depth[0] -= 1

        for m in list(sys.modules.values()):  # every module that imported it by name
            if m is not None and getattr(m, "__name__", "").startswith(pkg) and getattr(m, name, None) is orig:
                originals.append((m, name, orig))
                setattr(m, name, timed)
    try:
        total = host_us(step, n, torch.cuda.synchronize if torch.cuda.is_available() else lambda: None)
        spent.clear()
        for _ in range(n):
            step()
    finally:
        for m, name, orig in originals:
            setattr(m, name, orig)
    return total, {key: v / n * 1e6 for key, v in spent.items()}


def main():
    args = sys.argv[1:]
    op = args.pop(0) if args and not args[0].isdigit() else "topk_sae_step"
    B, D, F, K = map(int, args[:4]) if len(args) >= 4 else (1024, 768, 24576, 32)
    dname = args[4] if len(args) > 4 else "fp32"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fs = load_kernel()
    tuning = os.environ.get("FLASH_SAE_TUNING", "")
    apply_tuning(fs, tuning, "FLASH_SAE_TUNING")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"host_overhead on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
          + (f", TUNING {tuning}" if tuning else ""))  # fmt: skip
    print("\nunit costs (host us per call, launched back to back):")
    for label, us in unit_costs(device, sync):
        print(f"  {label:45s} {us:8.1f}")
    params = make_step_problem(B, D, F, K, DTYPES[dname], device)
    step = step_fn(fs, op, params, K)
    print(f"\n{op} ({B}, {D}, {F}, {K}) {dname}:")
    wall = host_us(step, 50, sync)
    sync()
    t = time.perf_counter()
    for _ in range(50):
        step()
    sync()
    wall_synced = (time.perf_counter() - t) / 50 * 1e6
    print(f"  host us per step (launch only) {wall:.0f}; wall us per step, synced at the end {wall_synced:.0f}")
    if device == "cuda":
        span, kernel_us, calls = eager_gpu(step)
        print(f"  eager: GPU timeline us per step {span:.0f}, of which in kernels {kernel_us:.0f} (profiled)")
        print(f"  CUDA-graph GPU us per step {graph_ms(step) * 1e3:.0f}")  # the step clears grads: replays repeat
        print(f"  driver calls per step {calls}")
    total, parts = breakdown(fs, step, 50)
    print(f"\n  host breakdown, us per step (total {total:.0f}, wrapped calls timed at their outermost level):")
    for (fn, depth), us in sorted(parts.items(), key=lambda kv: (kv[0][1], -kv[1])):
        print(f"  {'  ' * depth}{fn:30s} {us:8.1f}")
    outer = sum(us for (fn, depth), us in parts.items() if depth == 1)
    print(f"    the rest (autograd, the op's own Python, its casts) {total - outer:8.1f}")


if __name__ == "__main__":
    main()
