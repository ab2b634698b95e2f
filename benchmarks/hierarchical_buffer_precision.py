"""What the bf16 contribution buffer of ``hierarchical_topk_sae_loss`` costs in precision.

For bf16 weights the backward stores each contribution vals_k * S_k in bf16 before the fp32 segmented
sum (``TUNING["hierarchical_bf16_buffer"]``). This prints, per problem, the relative error of the
weight gradient against the fp64 reference with bf16 contributions, with fp32 contributions, and of
plain torch computing the loss in bf16 (the parity rule's yardstick). Problems: the three of
``test_hierarchical_topk_sae_loss_bf16_buffer`` and two larger ones.

    python benchmarks/hierarchical_buffer_precision.py [--out benchmarks/results]
        (CPU: the kernels under TRITON_INTERPRET; or a GPU. With --out, rows go to
        <out>/<gpu or cpu>/hierarchical_buffer_precision.jsonl, ``results_schema``.)
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from parity import call_op, grads, make_inputs, package_module, rel_err  # noqa: E402

import build_local  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from results_schema import environment, make_row, result_path, write_rows  # noqa: E402

OP = "hierarchical_topk_sae_loss"
PROBLEMS = [  # (B, K, F, D, duplicate latents)
    (64, 32, 256, 200, False),
    (32, 16, 40, 300, True),
    (9, 13, 20, 77, True),
    (128, 64, 1024, 128, False),
    (256, 32, 4096, 96, False),
]


def schema_row(benchmark, problem, errs, torch_err, env, backend):
    """One problem's errors -> a results_schema row (bf16 weights; ``errs`` maps bf16 buffer on/off)."""
    B, K, F, D, dup = problem
    return make_row(
        benchmark, f"flash-sae {OP}", dict(B=B, K=K, F=F, D=D), dtype="bf16", env=env,
        params={"duplicate_latents": dup, "backend": backend}, error_bf16_buffer=errs[True],
        error_fp32_buffer=errs[False], error_ratio=errs[True] / errs[False], error_torch_bf16=torch_err,
    )  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="results root; rows are only printed without it")
    args = ap.parse_args()
    env = environment()
    rows = []
    fs = build_local.load_kernel()
    tuning = package_module(fs, "_launch").TUNING
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"# {OP}: weight-gradient error vs fp64, bf16 weights; {name}, torch {torch.__version__}")
    print(f"{'(B, K, F, D, dup)':28s} {'bf16 buffer':>12s} {'fp32 buffer':>12s} {'ratio':>6s} {'torch bf16':>11s}")
    upstream = -1.7
    for *bkfd, dup in PROBLEMS:
        inputs = make_inputs(*bkfd, torch.bfloat16, device, seed=11, duplicates=dup)
        errs = {}
        indices, *params = inputs
        p64 = [p.detach().double().requires_grad_() for p in params]
        ref = grads(
            fs.testing.reference.hierarchical_topk_sae_loss(indices, *p64), p64, torch.tensor(upstream).double()
        )
        for flag in (True, False):
            tuning["hierarchical_bf16_buffer"] = flag
            _, g = call_op(fs, OP, inputs)  # call_op's upstream is -1.7 too
            errs[flag] = rel_err(g[0], ref[0])
        tuning["hierarchical_bf16_buffer"] = True
        pb = [p.detach().clone().requires_grad_() for p in params]
        same = grads(
            fs.testing.reference.hierarchical_topk_sae_loss(indices, *pb), pb, torch.tensor(upstream).bfloat16()
        )
        torch_err = rel_err(same[0], ref[0])
        print(
            f"{str((*bkfd, dup)):28s} {errs[True]:12.2e} {errs[False]:12.2e} {errs[True] / errs[False]:6.2f} "
            f"{torch_err:11.2e}",
            flush=True,
        )
        rows.append(schema_row("hierarchical_buffer_precision", (*bkfd, dup), errs, torch_err, env, name))
    if args.out is not None:
        print(f"wrote {write_rows(result_path(env['gpu'], 'hierarchical_buffer_precision', args.out), rows)}")


if __name__ == "__main__":
    main()
