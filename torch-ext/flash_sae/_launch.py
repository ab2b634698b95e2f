"""Launch policy, in one place: which path runs an op, and the one tuning table.

Path. Tensors on a GPU run the Triton kernels. CPU tensors run the same
Triton kernels under Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before this package was imported (triton reads the variable when it
decorates the kernels; that is how the tests check the real kernels without
a GPU). Otherwise CPU tensors run a plain-torch path with the same sparse
algorithm and fp32 accumulation: the interpreter runs about a millisecond
per program, far too slow for real use, so a CPU user who sets nothing gets
the fast path. ``use_triton`` reads ``CPU_RUNS_TRITON`` at call time, so the
tests can run both CPU paths in one run.

Tuning. Every launch parameter of every kernel lives in ``TUNING`` and is read
at launch time, never at import. Chosen by ``benchmarks/tune.py`` on an H100;
the measurements are in ``docs/design/`` (by topic).
"""

import os

import torch

CPU_RUNS_TRITON = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t``'s device runs the Triton kernels (a GPU, or the interpreter)."""
    return t.device.type != "cpu" or CPU_RUNS_TRITON


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


TUNING = {
    # Gather kernels (decode forward, hierarchical scans): one program per (row,
    # D-block), walking K one latent at a time with 1-D fp32 accumulators, so
    # registers stay few, occupancy high and many row loads are in flight per
    # SM; ``gather_unroll`` latents are issued back to back per loop step.
    "gather_block_d": 256,
    "gather_warps": 1,
    "gather_unroll": 1,
    # CSR segmented sum: one program per (latent, D-block).
    "segment_block_d": 512,
    "segment_warps": 1,
    "segment_unroll": 1,
    # ... and with an optimizer's row update that needs whole rows (a unit-norm decoder's: one program per
    # row, BLOCK_D = next_pow2(D)): its warps (0: BLOCK_D // 512, between 1 and 16).
    "segment_update_warps": 0,
    # Selection: BatchTopK's group size G (a power of two: F/G group keys and N*G candidates),
    # groups per program of the group-maximum kernel and its warps (both selections), then the
    # TopK candidate stage (``select.row_topk._row_select_kernel``, one program per row): its warps grow with
    # the row's group keys and candidates (one per 512) up to a cap, and its group size (0: chosen
    # per chunk width and k by ``select.row_topk.topk_group``). Last, the byte budget of one pre-activation
    # chunk (the encoder forward's transient GEMM output).
    "select_group": 32,
    "select_groups": 256,
    "select_warps": 4,
    "row_select_max_warps": 16,
    "topk_select_group": 0,
    "chunk_bytes": 2 * 2**30,
    # The encoder GEMM with the group pass in its epilogue (``primitives/preacts_gemm.py``; bf16 and
    # fp16 on Hopper): whether the TopK selection uses it where it fits instead of cuBLAS +
    # ``_group_best_kernel`` (on by default since its H100 run of 2026-11-28: the step 0.95-0.99x in
    # graph time, selections bit for bit; docs/design/encoder-gemm.md), its (BM, BN, BK) tile, M-grouping,
    # warps and pipeline stages (``benchmarks/preacts_gemm.py``).
    "preacts_gemm": True,
    "preacts_gemm_tile": (128, 256, 64),
    "preacts_gemm_group_m": 8,
    "preacts_gemm_warps": 8,
    "preacts_gemm_stages": 3,
    # hierarchical_topk_sae_loss: cap on the backward's contribution buffer
    # [B*K, window] (bf16 for bf16 weights, else fp32), which bounds its transient memory.
    "hierarchical_buffer_bytes": 512 * 2**20,
    # ... and whether a bf16 weight's buffer holds bf16 contributions (half the traffic, one
    # more bf16 rounding, at most 2^-8 relative, per contribution) instead of fp32 ones.
    "hierarchical_bf16_buffer": True,
}


def block_d(D: int) -> int:
    """Columns of D per program of the gather kernels (a power of two, at least 16)."""
    return min(TUNING["gather_block_d"], max(16, next_pow2(D)))


def segment_block_d(width: int) -> int:
    """Columns per program of the segmented sum over a window of ``width`` columns."""
    return min(TUNING["segment_block_d"], max(16, next_pow2(width)))
