#!/usr/bin/env python3
"""Inference encode of a TopK SAE: flash-sae's ``sparse_code`` beside SAELens's ``SAE.encode``, dense torch and
torch.compile, in one process.

    python benchmarks/inference_encode.py [--B 4096] [--D 2048] [--features 1048576] [--k 64] [--out benchmarks/results]
    python benchmarks/inference_encode.py --smoke    # tiny shapes on the CPU: checks the script runs and agrees

What each computes from x [B, D] bf16 and the same weights (an SAE of 2^20 latents by default):

- ``flash-sae sparse_code``: the module's inference encode, the chunked encoder GEMM with the per-row
  top-k selected chunk by chunk; returns vals and indices [B, k]; no [B, F] tensor exists;
- ``SAELens SAE.encode (installed)``: ``SAE.from_dict`` of the module's ``to_saelens`` config (its
  defaults otherwise) holding the same weights; returns the dense [B, F] code;
- ``dense torch``: relu(topk((x - b_dec) @ W_enc.T + b_enc)) -> (vals, indices), the [B, F]
  pre-activations materialised;
- ``torch.compile (dense)``: the same function compiled.

Each row: eager ms (median, p20, p80), CUDA-graph ms, tokens/s (B over the graph time, else the eager
time), peak memory above the inputs, and the floor: the larger of the encoder GEMM (2 B F D FLOPs) at the
tensor-core peak and reading W_enc once at the copy bandwidth measured in the same run.
"""

import argparse
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_schema import environment, make_row, result_path, write_rows  # noqa: E402

SMOKE = dict(B=8, D=16, F=64, k=4)
QUANTILES = [0.5, 0.2, 0.8]


def load_kernel():
    sys.path.insert(0, str(ROOT))
    import build_local

    return build_local.load_kernel()


def dense_encode(x, W_enc, b_enc, b_dec, k):
    """The textbook TopK encode, with the [B, F] pre-activations materialised."""
    vals, indices = torch.topk((x - b_dec) @ W_enc.T + b_enc, k, dim=-1)
    return torch.relu(vals), indices


def saelens_sae(sae):
    """SAELens's inference SAE (``SAE.from_dict``, defaults otherwise) holding ``sae``'s weights; (None, why)
    if sae-lens is not importable."""
    try:
        from sae_lens import SAE
    except Exception as e:
        return None, f"sae-lens not importable: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    cfg, tensors = sae.to_saelens()
    cfg.update(dtype=str(sae.W_dec.dtype).replace("torch.", ""), device=str(sae.W_dec.device))
    rival = SAE.from_dict(cfg)
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(rival, name).copy_(t)
    return rival, None


def contenders(fs, sae, k):
    """(name, fn of x) for each implementation, and the errors of those that could not be built."""
    W_enc, b_enc, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    out = [
        ("flash-sae sparse_code", lambda x: sae.sparse_code(x)),
        ("dense torch", lambda x: dense_encode(x, W_enc, b_enc, b_dec, k)),
    ]
    errors = {}
    rival, why = saelens_sae(sae)
    if rival is None:
        errors["SAELens SAE.encode (installed)"] = why
    else:
        out.append(("SAELens SAE.encode (installed)", rival.encode))
    compiled = torch.compile(dense_encode)
    out.append(("torch.compile (dense)", lambda x: compiled(x, W_enc, b_enc, b_dec, k)))
    return out, errors


def smoke(fs):
    """Tiny shapes on the CPU: every contender runs and gives the same code (no timing, nothing written)."""
    B, D, F, k = SMOKE["B"], SMOKE["D"], SMOKE["F"], SMOKE["k"]
    sae = fs.SparseAutoencoder(D, F, k, seed=0).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(2))
    code = sae.sparse_code(x)
    want = code.to_dense(F)
    funcs, errors = contenders(fs, sae, k)
    for name, fn in funcs:
        if name.startswith("torch.compile"):
            continue  # compiling needs a C compiler on the CPU; the GPU run times it
        with torch.no_grad():
            got = fn(x)
        dense = got if isinstance(got, torch.Tensor) else want.new_zeros(B, F).scatter_(1, got[1], got[0])
        torch.testing.assert_close(dense.float(), want.float(), rtol=1e-5, atol=1e-5)
        print(f"smoke {name}: the same code")
    for name, why in errors.items():
        print(f"smoke {name}: not run ({why})")
    return 0


def measure(fn, x):
    """(eager ms quantiles, CUDA-graph ms or NaN, peak GiB above the inputs) of fn(x) without gradients."""
    from side_by_side import graph_ms
    from triton.testing import do_bench

    def call():
        with torch.no_grad():
            return fn(x)

    call()  # warm-up and compile
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = do_bench(call, warmup=10, rep=100, quantiles=QUANTILES)
    return ms, graph_ms(call), peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=4096)
    parser.add_argument("--D", type=int, default=2048)
    parser.add_argument("--features", default=str(2**20), help="comma-separated F values")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; nothing timed or written")
    parser.add_argument("--stem", default="inference_encode", help="the results file's name")
    args = parser.parse_args(argv)
    fs = load_kernel()
    if args.smoke:
        return smoke(fs)
    if not torch.cuda.is_available():
        sys.exit("inference_encode.py needs a CUDA GPU (or --smoke)")
    from side_by_side import PEAK_FLOPS, copy_bandwidth

    env, bw = environment(), copy_bandwidth()
    B, D, k = args.B, args.D, args.k
    print(f"# {env['gpu']}, {datetime.date.today()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print("# bf16, no gradients; eager ms (p50 [p20, p80]), graph ms, tokens/s, peak GiB above the inputs")
    rows = []
    for F in sorted(map(int, args.features.split(","))):
        shape = dict(B=B, D=D, F=F, K=k)
        floor = max(2 * B * F * D / PEAK_FLOPS["bf16"], F * D * 2 / bw) * 1e3
        print(f"F = {F}: floor {floor:.2f} ms")
        sae = fs.SparseAutoencoder(D, F, k, dtype=torch.bfloat16, device="cuda", seed=0).eval()
        x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
        funcs, errors = contenders(fs, sae, k)
        common = dict(env=env, dtype="bf16", params={"saelens_config": "SAE.from_dict, defaults"})
        for name, why in errors.items():
            rows.append(make_row("inference_encode", name, shape, error=why, **common))
        for name, fn in funcs:
            try:
                (p50, p20, p80), graph, peak = measure(fn, x)
            except torch.OutOfMemoryError as err:
                torch.cuda.empty_cache()
                print(f"  {name:32s} out of memory")
                error = f"out of memory: {str(err).splitlines()[0][:120]}"
                rows.append(make_row("inference_encode", name, shape, error=error, **common))
                continue
            best = graph if graph == graph else p50
            tokens = B / (best / 1e3)
            print(f"  {name:32s} {p50:8.3f} [{p20:.3f}, {p80:.3f}] ms  graph {graph:8.3f} ms  "
                  f"{tokens:12.0f} tok/s  peak {peak:6.2f} GiB  {best / floor:5.2f}x floor")  # fmt: skip
            rows.append(make_row("inference_encode", name, shape, eager_ms=p50, eager_p20_ms=p20, eager_p80_ms=p80,
                                 graph_ms=graph, peak_gib=peak, tokens_per_s=tokens, floor_ms=floor,
                                 copy_bandwidth_tbps=bw / 1e12, **common))  # fmt: skip
            torch.cuda.empty_cache()
        del sae, funcs
        torch.cuda.empty_cache()
    path = write_rows(result_path(env["gpu"], args.stem, args.out), rows)
    print(f"# rows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
