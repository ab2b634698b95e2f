#!/usr/bin/env python3
"""Side-by-side benchmark of flash-sae's decoder ops against plain PyTorch, in one run.

For each op (forward + backward, gradients for every float input) and each
shape and dtype it times, in the same process:
- flash-sae, loaded through ``kernels.get_kernel`` as a user does;
- the plain-torch reference (``reference.py``, the gather formula) in eager mode;
- the same reference under ``torch.compile``;
- for ``topk_sae_loss``, the dense formulation most trainers use: scatter the
  code into [B, F] and multiply by the [F, D] decoder.
It prints two times, both medians of forward + backward: ``ms`` as launched
from Python each step (with the 20th/80th percentiles), and ``graph ms``, the
same step captured once in a CUDA graph and replayed, which removes host
launch overhead and is the GPU time. Then peak memory above the inputs
(gradients included) and the % of the bandwidth floor reached in graph time:
the fewest bytes the op must move (``floor_bytes``) over the device's copy
bandwidth, measured in the same run.

Usage: python benchmarks/side_by_side.py [--quick] [--out benchmarks/results]
"""

import argparse
import datetime
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_schema import git_commit, result_path, write_rows  # noqa: E402

SHAPES = [  # (B, D, F, K)
    (1024, 4096, 65536, 64),
    (2048, 2304, 65536, 32),
    (2048, 2304, 65536, 64),
    (2048, 2304, 65536, 128),
    (4096, 2048, 262144, 64),
]
QUICK_SHAPES = [(8, 40, 64, 6)]
OPS = ("topk_sae_step", "topk_sae_loss", "hierarchical_topk_sae_loss", "sparse_decode")
FAMILY_OPS = ("batchtopk_sae_step", "jumprelu_sae_step", "matryoshka_batchtopk_sae_step", "matryoshka_topk_sae_step")
# The BatchTopK / JumpReLU step tables: the two shapes and F = 2^21 (B = 4096, D = 2048).
FAMILY_SHAPES = [("bf16", 2048, 2304, 65536, 64), ("bf16", 4096, 2048, 262144, 64), ("bf16", 4096, 2048, 2**21, 64)]
# The full training step (encoder GEMM + top-k + decode + loss, forward + backward).
STEP_SHAPES = [(dname, *shape) for shape in SHAPES for dname in ("bf16",)] + [("fp32", 1024, 768, 24576, 32)]
STEP_SCALE = [("bf16", 4096, 2048, 2**p, 64) for p in (19, 20, 21)]
PEAK_FLOPS = {"bf16": 989e12, "fp32": 67e12}  # H100 SXM dense bf16 tensor cores; fp32 without TF32
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUANTILES = [0.5, 0.2, 0.8]


def load_kernel():
    """flash-sae through ``get_kernel``, from this checkout (``build_local.load_kernel``)."""
    sys.path.insert(0, str(ROOT))
    import build_local

    return build_local.load_kernel()


def make_problem(B, D, F, K, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    pre = torch.rand(B, F, device=device, generator=g) if B * F <= 2**28 else None
    if pre is not None:
        vals, indices = pre.topk(K, dim=1)  # sorted, distinct per row, like a real code
        del pre
    else:
        indices = torch.randint(0, F, (B, K), device=device, generator=g)
        vals = torch.rand(B, K, device=device, generator=g)
    weight = torch.randn(F, D, device=device, generator=g, dtype=torch.float32).div_(D**0.5).to(dtype)
    bias = (torch.randn(D, device=device, generator=g) * 0.1).to(dtype)
    target = (torch.randn(B, D, device=device, generator=g) * 0.5).to(dtype)
    params = [weight, vals.to(dtype), bias, target]
    return indices, [p.requires_grad_() for p in params]


def dense_topk_sae_loss(indices, weight, vals, bias, target):
    """The usual trainer formulation: a dense [B, F] code times the decoder."""
    code = torch.zeros(indices.shape[0], weight.shape[0], dtype=vals.dtype, device=vals.device)
    code = code.scatter(1, indices, vals)
    return ((code @ weight + bias) - target).float().pow(2).mean()


def make_step_problem(B, D, F, K, dtype, device, seed=0):
    """x and a tied-init TopK SAE (unit-norm decoder rows, W_enc = W_dec, zero biases)."""
    g = torch.Generator(device=device).manual_seed(seed)
    W_dec = torch.randn(F, D, device=device, generator=g, dtype=dtype)
    W_dec /= W_dec.float().norm(dim=1, keepdim=True).to(dtype)
    x = torch.randn(B, D, device=device, generator=g, dtype=dtype)
    params = [
        x,
        W_dec.clone(),
        torch.zeros(F, device=device, dtype=dtype),
        W_dec,
        torch.zeros(D, device=device, dtype=dtype),
    ]
    return [p.requires_grad_() for p in params]


def dense_topk_sae_step(x, W_enc, b_enc, W_dec, b_dec, k):
    """The usual trainer step: dense pre-activations, torch.topk, a dense [B, F] code times the decoder."""
    pre = torch.addmm(b_enc, x - b_dec, W_enc.T)
    vals, indices = pre.topk(k, dim=1, sorted=False)
    code = torch.zeros_like(pre).scatter(1, indices, torch.relu(vals))
    return ((code @ W_dec + b_dec) - x).float().pow(2).mean()


def step_floor_ms(B, D, F, K, dname, es, bw):
    """The encoder GEMM at the tensor-core peak, or the unavoidable bytes at copy bandwidth, whichever is longer.

    Bytes: read W_enc and x, gather the K active decoder and encoder rows of every input (forward decode,
    backward dx), write dW_enc and dW_dec once each.
    """
    flops_ms = 2 * B * F * D / PEAK_FLOPS[dname] * 1e3
    byts = (F * D + B * D + 2 * B * K * D + 2 * F * D) * es
    return max(flops_ms, byts / bw * 1e3)


def bench_steps(fs, args, bw, rows, quick):
    """The full-step table: flash-sae, dense eager and torch.compile of it, the installed rivals (sparsify,
    SAELens; ``rival_steps``), plus the bare encoder GEMM."""
    shapes = [("bf16", *QUICK_SHAPES[0])] if quick else STEP_SHAPES + STEP_SCALE
    compiled = None if args.no_compile else torch.compile(dense_topk_sae_step, dynamic=False)
    for dname, B, D, F, K in shapes:
        dtype = DTYPES[dname]
        scale_row = (dname, B, D, F, K) in STEP_SCALE
        try:
            params = make_step_problem(B, D, F, K, dtype, "cuda")
        except torch.OutOfMemoryError:
            print(f"topk_sae_step {dname} {B},{D},{F},{K}: inputs do not fit")
            continue
        x, W_enc, b_enc = (p.detach() for p in params[:3])
        gemm = bench(lambda: torch.addmm(b_enc, x, W_enc.T))
        fl = step_floor_ms(B, D, F, K, dname, params[0].element_size(), bw)
        impls = {
            "flash-sae": lambda *a: fs.topk_sae_step(*a).loss,
            "torch eager (dense)": dense_topk_sae_step,
        }
        # torch.compile recompiles per shape (minutes at the scale rows); run it on the main table.
        if compiled is not None and not scale_row:
            impls["torch.compile (dense)"] = compiled
        jobs = [(name, lambda fn=fn: fn(*params, K), params, None) for name, fn in impls.items()]
        if not (quick or args.no_rivals):  # built one at a time, after ours, each freed before the next
            jobs = itertools.chain(jobs, rival_steps(params, K, skip_saelens=scale_row))
        for name, call, call_params, err in jobs:
            ms = lo = hi = peak = gms = float("nan")
            try:
                if err is None:
                    (ms, lo, hi), peak, gms = measure_call(call, call_params)
            except torch.OutOfMemoryError as e:
                err = f"OOM: {str(e).splitlines()[0][:60]}"
            call = call_params = None
            torch.cuda.empty_cache()
            row = dict(
                op="topk_sae_step",
                dtype=dname,
                B=B,
                D=D,
                F=F,
                K=K,
                impl=name,
                ms=ms,
                p20=lo,
                p80=hi,
                graph_ms=gms,
                peak_gib=peak,
                floor_ms=fl,
                pct_floor=100 * fl / gms,
                gemm_ms=gemm,
                x_gemm=gms / gemm,
                error=err,
            )
            rows.append(row)
            print(
                f"{'topk_sae_step':28s} {dname:5s} {f'{B},{D},{F},{K}':24s} {name:22s} "
                f"{ms:8.3f} ({lo:.3f}-{hi:.3f}) {gms:8.3f} {peak:9.2f} {row['pct_floor']:7.0f}%"
                f"  {gms / gemm:5.2f}x GEMM ({gemm:.3f} ms)" + (f"  {err}" if err else ""),
                flush=True,
            )
        params = x = W_enc = b_enc = impls = jobs = None  # free before the next shape
        torch.cuda.empty_cache()


def rival_steps(params, K, skip_saelens=False, device="cuda"):
    """Yields (name, call, its parameters, None) for one training step of each installed rival, built with
    its default configuration and holding a copy of this problem's weights, one at a time (each is freed
    when the caller moves on); (name, None, None, error) where building one runs out of memory.
    sparsify: ``SparseCoder`` (its fused encoder + Triton embedding-bag decoder, under its own bf16
    autocast), loss = its ``fvu``. SAELens: ``TopKTrainingSAE`` through ``training_forward_pass``, loss =
    its ``loss`` (MSE summed over D, mean over B). A rival that is not installed is left out with a note."""
    x, W_enc, b_enc, W_dec, b_dec = (p.detach() for p in params)
    F, D = W_enc.shape
    dtype = x.dtype
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as e:
        print(f"    (sparsify not installed: {e})")
    else:
        name = "sparsify (installed)"
        try:
            coder = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K), device=device, dtype=dtype)
            with torch.no_grad():
                coder.encoder.weight.copy_(W_enc)
                coder.encoder.bias.copy_(b_enc)
                coder.W_dec.copy_(W_dec)
                coder.b_dec.copy_(b_dec)
            xs = x.clone().requires_grad_()
        except torch.OutOfMemoryError as e:
            coder = xs = None
            yield name, None, None, f"OOM: {str(e).splitlines()[0][:60]}"
        else:
            yield name, lambda: coder(xs).fvu, [xs, *coder.parameters()], None
        coder = xs = None
        if device == "cuda":
            torch.cuda.empty_cache()
    if skip_saelens:
        return
    try:
        from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError as e:
        print(f"    (sae-lens not installed: {e})")
        return
    names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
    name = "SAELens TopK (installed)"
    try:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K, device=device, dtype=names[dtype]))
        with torch.no_grad():
            sae.W_enc.copy_(W_enc.T)
            sae.b_enc.copy_(b_enc)
            sae.W_dec.copy_(W_dec)
            sae.b_dec.copy_(b_dec)
        xl = x.clone().requires_grad_()
    except torch.OutOfMemoryError as e:
        yield name, None, None, f"OOM: {str(e).splitlines()[0][:60]}"
        return

    def saelens_call():
        step = TrainStepInput(
            sae_in=xl, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
        )
        return sae.training_forward_pass(step).loss

    yield name, saelens_call, [xl, *sae.parameters()], None


def dense_batchtopk_step(x, W_enc, b_enc, W_dec, b_dec, k):
    """BatchTopK written the way SAELens's training SAE runs it (default config: decoder-norm rescaling)."""
    norm = W_dec.norm(dim=-1)
    acts = torch.relu(((x - b_dec) @ W_enc.T + b_enc) * norm)
    top = torch.topk(acts.flatten(), int(k * x.shape[0]))
    code = torch.zeros_like(acts.flatten()).scatter(-1, top.indices, top.values).view(acts.shape)
    x_hat = (code * (1 / norm)) @ W_dec + b_dec
    return (x_hat - x).float().pow(2).sum(-1).mean()


def prefix_sizes(F):
    """Five nested dictionaries for the Matryoshka rows: F/16, F/8, F/4, F/2, F."""
    return [F // 16, F // 8, F // 4, F // 2, F]


def dense_matryoshka_step(x, W_enc, b_enc, W_dec, b_dec, k, sizes):
    """Matryoshka BatchTopK written the way SAELens's training SAE runs it: one decode per level."""
    norm = W_dec.norm(dim=-1)
    acts = torch.relu(((x - b_dec) @ W_enc.T + b_enc) * norm)
    top = torch.topk(acts.flatten(), int(k * x.shape[0]))
    code = torch.zeros_like(acts.flatten()).scatter(-1, top.indices, top.values).view(acts.shape) * (1 / norm)
    loss, decoded, prev = 0.0, b_dec, 0
    for m in sizes:
        decoded = code[:, prev:m] @ W_dec[prev:m] + decoded
        loss = loss + (decoded - x).float().pow(2).sum(-1).mean()
        prev = m
    return loss


def dense_matryoshka_topk_step(x, W_enc, b_enc, W_dec, b_dec, k, sizes):
    """Matryoshka on a per-row TopK code, densely: one decode per level (SAELens has no such SAE)."""
    pre = (x - b_dec) @ W_enc.T + b_enc
    top = torch.topk(pre, k, dim=1)
    code = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    loss, decoded, prev = 0.0, b_dec, 0
    for m in sizes:
        decoded = code[:, prev:m] @ W_dec[prev:m] + decoded
        loss = loss + (decoded - x).float().pow(2).mean()
        prev = m
    return loss


def saelens_step_fn(arch, params, k, threshold=None):
    """SAELens's own training SAE (default config) holding ``params``; None (and why) if it is not installed."""
    try:
        from sae_lens.saes import (
            BatchTopKTrainingSAE,
            BatchTopKTrainingSAEConfig,
            JumpReLUTrainingSAE,
            JumpReLUTrainingSAEConfig,
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )
        from sae_lens.saes.sae import TrainStepInput
    except Exception as e:  # reported in the table, not hidden
        return None, f"sae-lens not importable: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    x, W_enc, b_enc, W_dec, b_dec = (p.detach() for p in params)
    D, F = x.shape[1], W_enc.shape[0]
    dtype = str(x.dtype).replace("torch.", "")
    try:
        if arch == "batchtopk":
            sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=k, dtype=dtype, device="cuda"))
        elif arch == "matryoshka_batchtopk":
            cfg = MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=D, d_sae=F, k=k, matryoshka_widths=prefix_sizes(F), dtype=dtype, device="cuda"
            )
            sae = MatryoshkaBatchTopKTrainingSAE(cfg)
        else:
            sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D, d_sae=F, dtype=dtype, device="cuda"))
        with torch.no_grad():
            sae.W_enc.copy_(W_enc.T)
            sae.b_enc.copy_(b_enc)
            sae.W_dec.copy_(W_dec)
            sae.b_dec.copy_(b_dec)
            if threshold is not None:
                sae.threshold.copy_(threshold)
    except Exception as e:  # reported in the table (OOM at the largest F included), not hidden
        torch.cuda.empty_cache()
        return None, f"SAELens's SAE could not be built: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    coefficients = {"l0": sae.cfg.l0_coefficient} if arch == "jumprelu" else {}

    def call():
        step = TrainStepInput(
            sae_in=x, coefficients=coefficients, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
        )
        return sae.training_forward_pass(step).loss

    return (call, list(sae.parameters())), None


def bench_family_steps(fs, args, bw, rows, quick):
    """BatchTopK, JumpReLU and Matryoshka (5 levels) steps: flash-sae beside a dense step written as SAELens runs it and
    SAELens's own training SAE (installed package, default config), with flash-sae's TopK step at
    the same shape for the ratio targets. JumpReLU's threshold is set so that L0 is about K."""
    shapes = [("bf16", *QUICK_SHAPES[0])] if quick else FAMILY_SHAPES
    ops = [op for op in args.ops.split(",") if op in FAMILY_OPS]
    only_compile = args.family_compile_only
    compiled = {}
    if not args.no_compile:  # torch.compile of the dense steps, shapes where the dense step fits
        compiled = {
            "batchtopk_sae_step": torch.compile(dense_batchtopk_step),
            "matryoshka_batchtopk_sae_step": torch.compile(dense_matryoshka_step),
            "matryoshka_topk_sae_step": torch.compile(dense_matryoshka_topk_step),
            "jumprelu_sae_step": torch.compile(lambda *a: fs.testing.reference.jumprelu_sae_step(*a).loss),
        }
    for dname, B, D, F, K in shapes:
        dtype = DTYPES[dname]
        try:
            params = make_step_problem(B, D, F, K, dtype, "cuda")
        except torch.OutOfMemoryError:
            print(f"family steps {dname} {B},{D},{F},{K}: inputs do not fit")
            continue
        x, W_enc, b_enc = (p.detach() for p in params[:3])
        gemm = bench(lambda: torch.addmm(b_enc, x, W_enc.T))
        fl = step_floor_ms(B, D, F, K, dname, params[0].element_size(), bw)
        with torch.no_grad():
            probe = fs.batchtopk_sae_step(*params, K)
        threshold = torch.full((F,), probe.min_act.item(), device="cuda")  # L0 ~ K
        count = int(fs.jumprelu_sae_step(*[p.detach() for p in params], threshold, capacity=B * min(F, 4 * K)).count)
        capacity = 1 << (int(1.25 * count) - 1).bit_length()
        impls = {("topk_sae_step", "flash-sae"): (lambda: fs.topk_sae_step(*params, K).loss, params)}
        with_compile = bool(compiled) and F <= 2**18
        if only_compile and not with_compile:
            continue
        for op in ops:
            if op == "batchtopk_sae_step":
                impls[(op, "flash-sae")] = (
                    lambda: fs.batchtopk_sae_step(*params, K, rescale_acts_by_decoder_norm=True).loss,
                    params,
                )
                impls[(op, "torch eager (dense)")] = (lambda: dense_batchtopk_step(*params, K), params)
                impls[(op, "SAELens")] = ("batchtopk", None)  # built when its turn comes, freed after
            elif op == "matryoshka_batchtopk_sae_step":
                sizes = prefix_sizes(F)
                impls[(op, "flash-sae")] = (
                    lambda: fs.matryoshka_batchtopk_sae_step(*params, K, sizes, rescale_acts_by_decoder_norm=True).loss,
                    params,
                )
                impls[(op, "torch eager (dense)")] = (lambda: dense_matryoshka_step(*params, K, sizes), params)
                impls[(op, "SAELens")] = ("matryoshka_batchtopk", None)
            elif op == "matryoshka_topk_sae_step":
                sizes = prefix_sizes(F)
                impls[(op, "flash-sae")] = (lambda: fs.matryoshka_topk_sae_step(*params, K, sizes).loss, params)
                impls[(op, "torch eager (dense)")] = (lambda: dense_matryoshka_topk_step(*params, K, sizes), params)
            else:
                thr = threshold.clone().requires_grad_()
                jp = params + [thr]
                impls[(op, "flash-sae")] = (lambda jp=jp: fs.jumprelu_sae_step(*jp, capacity=capacity).loss, jp)
                impls[(op, "torch eager (dense)")] = (
                    lambda jp=jp: fs.testing.reference.jumprelu_sae_step(*jp).loss,
                    jp,
                )
                impls[(op, "SAELens")] = ("jumprelu", threshold)
        if with_compile:
            for op in ops:
                fn = compiled[op]
                if op == "jumprelu_sae_step":
                    jp = impls[(op, "flash-sae")][1]
                    impls[(op, "torch.compile (dense)")] = (lambda fn=fn, jp=jp: fn(*jp), jp)
                elif op.startswith("matryoshka"):
                    sizes = prefix_sizes(F)
                    impls[(op, "torch.compile (dense)")] = (lambda fn=fn: fn(*params, K, sizes), params)
                else:
                    impls[(op, "torch.compile (dense)")] = (lambda fn=fn: fn(*params, K), params)
        if only_compile:
            impls = {key: v for key, v in impls.items() if key[1] in ("flash-sae", "torch.compile (dense)")}
        for (op, name), (call, ps) in impls.items():
            err = None
            if name == "SAELens":
                theirs, err = saelens_step_fn(call, params, K, ps)
                call, ps = theirs if theirs is not None else (None, None)
            try:
                if call is None:
                    raise RuntimeError(err)
                (ms, lo, hi), peak, gms = measure_call(call, ps)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                ms = lo = hi = peak = gms = float("nan")
                err = err or f"OOM: {str(e).splitlines()[0][:60]}"
            call = ps = theirs = None
            torch.cuda.empty_cache()
            row = dict(
                op=op, dtype=dname, B=B, D=D, F=F, K=K, impl=name, ms=ms, p20=lo, p80=hi, graph_ms=gms,
                peak_gib=peak, floor_ms=fl, pct_floor=100 * fl / gms, gemm_ms=gemm, x_gemm=gms / gemm, error=err,
                jumprelu_capacity=capacity if op == "jumprelu_sae_step" else None,
            )  # fmt: skip
            rows.append(row)
            print(
                f"{op:28s} {dname:5s} {f'{B},{D},{F},{K}':24s} {name:22s} "
                f"{ms:8.3f} ({lo:.3f}-{hi:.3f}) {gms:8.3f} {peak:9.2f} {row['pct_floor']:7.0f}%"
                f"  {gms / gemm:5.2f}x GEMM ({gemm:.3f} ms)" + (f"  {err}" if err else ""),
                flush=True,
            )
        impls = params = x = W_enc = b_enc = probe = threshold = None
        torch.cuda.empty_cache()


def bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=100, quantiles=[0.5])


def floor_bytes(op, B, D, F, K, es):
    """Fewest bytes each op's forward + backward must move through device memory."""
    gather = B * K * D * es  # the K active rows of every input, read once
    dweight = F * D * es  # the dense [F, D] gradient, written once
    rows = B * D * es  # target (losses) or output / upstream grad (decode)
    if op == "topk_sae_loss":
        return gather + dweight + rows * 2  # read target, write dtarget
    if op == "hierarchical_topk_sae_loss":
        return gather + dweight + rows * 2
    return gather + dweight + rows * 2  # write x_hat, read its gradient


def measure(fn, indices, params, op):
    def call():
        if op == "sparse_decode":
            weight, vals, bias, _ = params
            return fn(vals, indices, weight, bias)
        return fn(indices, *params)

    return measure_call(call, params)


def measure_call(call, params, graph=True):
    """(ms quantiles, peak GiB above the inputs with gradients, CUDA-graph ms) of call() and its backward.

    ``graph`` False skips the CUDA graph (NaN): for steps with a host sync, whose failed capture can
    leave the CUDA RNG unusable for what follows."""
    from triton.testing import do_bench

    upstream = None

    def step():
        nonlocal upstream
        for p in params:
            p.grad = None
        out = call()
        if out.ndim and upstream is None:
            upstream = torch.randn_like(out)
        out.backward(torch.ones_like(out) if out.ndim == 0 else upstream)

    step()  # warm-up and compile
    torch.cuda.synchronize()
    for p in params:
        p.grad = None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(step, warmup=25, rep=200, quantiles=QUANTILES)
    graph = graph_ms(step) if graph else float("nan")
    for p in params:
        p.grad = None
    return ms, peak / 2**30, graph


def graph_ms(step):
    """Median ms of the same step captured in a CUDA graph (no host launch overhead)."""
    from triton.testing import do_bench

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        ms = do_bench(g.replay, warmup=25, rep=200, quantiles=[0.5])
        del g
        return ms
    except Exception as e:  # some references cannot be captured; say so in the row
        torch.cuda.synchronize()
        print(f"    (graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:80]})")
        return float("nan")


def apply_tuning(fs, spec: str, where: str) -> None:
    """``build_local.apply_tuning``, exiting with its message on an unknown key."""
    import build_local  # on the path once load_kernel ran

    try:
        build_local.apply_tuning(fs, spec, where)
    except ValueError as err:
        sys.exit(str(err))


def copy_bandwidth():
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    from triton.testing import do_bench

    ms = do_bench(lambda: y.copy_(x), warmup=10, rep=100)
    return 2 * x.numel() / (ms * 1e-3)


def schema_rows(benchmark, meta, rows):
    """This script's measured rows (dicts as printed) -> results_schema rows for ``benchmark``."""
    from results_schema import make_row

    env = {k: meta.get(k) for k in ("gpu", "torch", "triton", "commit", "date")}
    renames = dict(
        p20="eager_p20_ms", p80="eager_p80_ms", floor_ms="floor_ms", pct_floor="pct_of_floor", gemm_ms="gemm_ms",
        x_gemm="x_gemm",
    )  # fmt: skip
    out = []
    for r in rows:
        params = {"op": r["op"]}
        if r.get("jumprelu_capacity") is not None:
            params["jumprelu_capacity"] = r["jumprelu_capacity"]
        metrics = {new: r[old] for old, new in renames.items() if old in r}
        out.append(
            make_row(
                benchmark, r["impl"], {k: r[k] for k in "BDFK"}, dtype=r["dtype"], eager_ms=r["ms"],
                graph_ms=r["graph_ms"], peak_gib=r["peak_gib"], env=env, params=params, error=r.get("error"),
                copy_bandwidth_tbps=meta.get("copy_bandwidth_tbps"), **metrics,
            )
        )  # fmt: skip
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one tiny shape, to check the script runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--no-rivals", action="store_true", help="step table without the installed sparsify and SAELens"
    )
    parser.add_argument(
        "--family-compile-only",
        action="store_true",
        help="family steps: only flash-sae and torch.compile of the dense steps (F <= 2^18), a shorter run",
    )
    parser.add_argument(
        "--stem", default="side_by_side", help="benchmark name: rows go to --out/<gpu>/<stem>.jsonl (results_schema)"
    )
    parser.add_argument(
        "--tuning", default="", help="KEY=VALUE,... entries of the kernel's TUNING to set (Python literals)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("side_by_side.py needs a CUDA GPU")
    fs = load_kernel()
    apply_tuning(fs, args.tuning, "--tuning")
    ref = fs.testing.reference
    shapes = QUICK_SHAPES if args.quick else SHAPES
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    compiled = {}
    rows = []
    print(
        f"# {gpu}, {datetime.date.today()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s"
        + (f", TUNING {args.tuning}" if args.tuning else "")
    )
    header = (
        f"{'op':28s} {'dtype':5s} {'B,D,F,K':24s} {'impl':22s} {'ms (p20-p80)':>20s} "
        f"{'graph ms':>8s} {'peak GiB':>9s} {'% floor':>8s}"
    )
    print(header)
    if any(op in FAMILY_OPS for op in args.ops.split(",")):
        bench_family_steps(fs, args, bw, rows, args.quick)
    for op in args.ops.split(","):
        if op in FAMILY_OPS:
            continue
        if op == "topk_sae_step":
            bench_steps(fs, args, bw, rows, args.quick)
            continue
        impls = {"flash-sae": getattr(fs, op), "torch eager": getattr(ref, op)}
        if not args.no_compile:
            compiled.setdefault(op, torch.compile(getattr(ref, op), dynamic=True))
            impls["torch.compile"] = compiled[op]
        if op == "topk_sae_loss":
            impls["torch dense [B,F]@W"] = dense_topk_sae_loss
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            for B, D, F, K in shapes:
                indices, params = make_problem(B, D, F, K, dtype, "cuda")
                fl = floor_bytes(op, B, D, F, K, params[0].element_size()) / bw * 1e3
                for name, fn in impls.items():
                    try:
                        (ms, lo, hi), peak, gms = measure(fn, indices, params, op)
                        err = None
                    except torch.OutOfMemoryError as e:  # reported, not hidden
                        ms = lo = hi = peak = gms = float("nan")
                        err = f"OOM: {str(e).splitlines()[0]}"
                        torch.cuda.empty_cache()
                    row = dict(
                        op=op,
                        dtype=dname,
                        B=B,
                        D=D,
                        F=F,
                        K=K,
                        impl=name,
                        ms=ms,
                        p20=lo,
                        p80=hi,
                        graph_ms=gms,
                        peak_gib=peak,
                        floor_ms=fl,
                        pct_floor=100 * fl / gms,
                        error=err,
                    )
                    rows.append(row)
                    print(
                        f"{op:28s} {dname:5s} {f'{B},{D},{F},{K}':24s} {name:22s} "
                        f"{ms:8.3f} ({lo:.3f}-{hi:.3f}) {gms:8.3f} {peak:9.2f} {row['pct_floor']:7.0f}%"
                        + (f"  {err}" if err else ""),
                        flush=True,
                    )
                del indices, params
                torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        gpu=gpu,
        date=str(datetime.date.today()),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        commit=git_commit(),
        copy_bandwidth_tbps=bw / 1e12,
    )
    stem = f"{args.stem}_quick" if args.quick else args.stem
    path = write_rows(result_path(gpu, stem, args.out), schema_rows(stem, meta, rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
