#!/usr/bin/env python3
"""An experiment: the selection's group pass in the encoder GEMM's epilogue, against the shipped path.

Timed in one process with CUDA graphs, bf16:

1. the cuBLAS path (the package's where the fused GEMM does not fit): ``torch.addmm`` writes the
   pre-activations, ``select.groups._group_best_kernel`` reads them whole for the group keys,
   ``select.row_topk._row_select_kernel`` picks the top k;
2. a Triton GEMM whose epilogue writes the pre-activations and the group keys, then the same
   ``_row_select_kernel`` (its ``gkeys`` argument), so the whole-tensor read goes.

    python benchmarks/preacts_gemm.py [--configs all|first]   # the design sweep (kernels below)
    python benchmarks/preacts_gemm.py --ab N                   # the package's fused GEMM, A/B

The sweep's two GEMMs, defined here (the package ships the second's final form as
``primitives/preacts_gemm.py``, on by default where it fits): ``_preacts_gemm_kernel`` (pointer
loads, one program per tile) and ``_preacts_gemm_tma_kernel`` (persistent, TMA loads and stores;
flattened tile loop or not, warp-specialized or not, the keys from the rounded tile or from the fp32
group maxima, or no keys at all to time the epilogue's share). For each shape: cuBLAS and each stage
alone, each variant's ms and TFLOP/s per launch configuration (tile, K step, warps, stages,
M-grouping), and how its output compares with cuBLAS's: entries that differ, whether its keys equal
``_group_best_kernel``'s on its own output, and rows whose selected ids differ. Results and
conclusions: docs/design/encoder-gemm.md.
"""

import argparse
import importlib
import sys
from datetime import date
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import graph_ms, load_kernel  # noqa: E402


def package_module(fs, name):
    return importlib.import_module(f"{fs.__name__}.{name}")


FS = load_kernel()
tile_coords = package_module(FS, "primitives.preacts_gemm").tile_coords  # the kernels below share it


def problem(B, D, F):
    """x, W_enc, b_enc (bf16, scaled like a trained SAE) and an output buffer for the pre-activations."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=g).bfloat16()
    W = (torch.randn(F, D, device="cuda", generator=g) / D**0.5).bfloat16()
    b = (torch.randn(F, device="cuda", generator=g) * 0.1).bfloat16()
    return x, W, b, torch.empty(B, F, device="cuda", dtype=torch.bfloat16)


SHAPES = [(2048, 2304, 65536, 32), (1024, 4096, 65536, 64), (2048, 2304, 65536, 128), (4096, 2048, 262144, 64)]
# (BM, BN, BK, warps, stages, group_m); the pointer kernel's first sweep: results/preacts_gemm_pointer_h100.log
CONFIGS = [
    (128, 256, 64, 8, 3, 8),
    (128, 256, 64, 8, 4, 8),
    (128, 128, 64, 4, 4, 8),
    (256, 128, 64, 8, 3, 8),
    (128, 256, 32, 8, 5, 8),
]


# Kernels (the experiment's; the package ships the persistent TMA one's final form) ------------------------------


@triton.jit
def _sortable_key16(v):
    """A 16-bit float's int32 key whose signed order is the float order; -0.0 gets +0.0's key."""
    b = v.to(tl.int16, bitcast=True).to(tl.int32)
    s = b ^ ((b >> 15) & 0x7FFF)
    return tl.where(s == -1, 0, s)


@triton.jit
def _preacts_gemm_kernel(
    x_ptr,  # [M, K] the centred inputs (row stride stride_xm, unit column stride)
    w_ptr,  # [N, K] the chunk's encoder rows (row stride stride_wn, unit column stride)
    b_ptr,  # [N] the chunk's encoder bias
    pre_ptr,  # [M, N] out: pre-activations in the input dtype (row stride stride_pm)
    gkey_ptr,  # [M, n_groups] int32 out: each group of G columns' largest key
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_pm,
    n_groups,
    BM: tl.constexpr,
    BN: tl.constexpr,  # a multiple of G
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,  # tiles along M walked together, so W's tiles are reused from L2
    G: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BK == 0: no mask in the main loop
    KEYS: tl.constexpr,  # False: the GEMM alone (to time the epilogue's share)
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    pid_m, pid_n = tile_coords(pid, tiles_m, tiles_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # Rows past M and columns past N read row M-1 / N-1 again (stores are masked), so the loads need no mask.
    rm_in = tl.minimum(rm, M - 1).to(tl.int64)
    rn_in = tl.minimum(rn, N - 1).to(tl.int64)
    a_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :]
    b_ptrs = w_ptr + rn_in[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    bias = tl.load(b_ptr + rn_in).to(tl.float32)
    v = (acc + bias[None, :]).to(pre_ptr.dtype.element_ty)
    row_ok = rm < M
    col_ok = rn < N
    tl.store(pre_ptr + rm_in[:, None] * stride_pm + rn[None, :], v, mask=row_ok[:, None] & col_ok[None, :])
    if not KEYS:
        return
    key = tl.where(col_ok[None, :], _sortable_key16(v), -2147483648)
    gmax = tl.max(tl.reshape(key, (BM, BN // G, G)), axis=2)
    grp = pid_n * (BN // G) + tl.arange(0, BN // G)
    tl.store(
        gkey_ptr + rm_in[:, None] * n_groups + grp[None, :],
        gmax,
        mask=row_ok[:, None] & (grp < n_groups)[None, :],
    )


@triton.jit
def _preacts_gemm_tma_kernel(
    a_desc,  # TMA descriptor of xc [M, K], blocks [BM, BK]
    b_desc,  # TMA descriptor of the chunk's W [N, K], blocks [BN, BK]
    c_desc,  # TMA descriptor of pre [M, N], blocks [BM, BN]
    b_ptr,  # [N] the chunk's encoder bias
    gkey_ptr,  # [M, n_groups] int32 out
    M,
    N,
    K,
    n_groups,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    G: tl.constexpr,
    NUM_SMS: tl.constexpr,
    KEYS: tl.constexpr,  # False: the GEMM alone (to time the epilogue's share)
    FLATTEN: tl.constexpr,
    MAX_FIRST: tl.constexpr,  # group maxima of the fp32 sums, then round and key those (loses NaNs: timing only)
    WARP_SPECIALIZE: tl.constexpr,
):
    """``_preacts_gemm_kernel`` as a persistent kernel over TMA loads and stores: one program per SM
    walks output tiles; Triton pipelines the K loop (and, flattened, across tiles)."""
    start = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    for tile in tl.range(start, tiles_m * tiles_n, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = tile_coords(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BM, ki * BK])
            b = b_desc.load([pid_n * BN, ki * BK])
            acc = tl.dot(a, b.T, acc)
        rn = pid_n * BN + tl.arange(0, BN)
        col_ok = rn < N
        bias = tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
        s = acc + bias[None, :]
        v = s.to(c_desc.dtype)
        c_desc.store([pid_m * BM, pid_n * BN], v)
        if KEYS:
            rm = pid_m * BM + tl.arange(0, BM)
            if MAX_FIRST:  # rounding is monotone: the rounded group max is the max of the rounded values
                smax = tl.max(tl.reshape(tl.where(col_ok[None, :], s, float("-inf")), (BM, BN // G, G)), axis=2)
                gmax = _sortable_key16(smax.to(c_desc.dtype))
            else:
                key = tl.where(col_ok[None, :], _sortable_key16(v), -2147483648)
                gmax = tl.max(tl.reshape(key, (BM, BN // G, G)), axis=2)
            grp = pid_n * (BN // G) + tl.arange(0, BN // G)
            tl.store(
                gkey_ptr + rm.to(tl.int64)[:, None] * n_groups + grp[None, :],
                gmax,
                mask=(rm < M)[:, None] & (grp < n_groups)[None, :],
            )


def preacts_group_keys(xc, W, b, G, out, cfg, keys=True):
    """``out <- xc @ W.T + b`` ([B, w], bf16/fp16) and each row's group keys [B, ceil(w / G)] int32,
    by ``_preacts_gemm_kernel`` (pointer loads, one program per output tile)."""
    B, D = xc.shape
    w = W.shape[0]
    n_groups = triton.cdiv(w, G)
    gkeys = torch.empty(B, n_groups, dtype=torch.int32, device=xc.device)
    BM, BN, BK, warps, stages, group_m = cfg
    _preacts_gemm_kernel[(triton.cdiv(B, BM) * triton.cdiv(w, BN),)](
        xc, W, b, out, gkeys, B, w, D, xc.stride(0), W.stride(0), out.stride(0), n_groups,
        BM=BM, BN=BN, BK=BK, GROUP_M=group_m, G=G, EVEN_K=D % BK == 0, KEYS=keys,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return gkeys


def preacts_group_keys_tma(xc, W, b, G, out, cfg, keys=True, flatten=True, max_first=False, warp_specialize=False):
    """The same through ``_preacts_gemm_tma_kernel`` (persistent, TMA loads and stores)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, D = xc.shape
    w = W.shape[0]
    n_groups = triton.cdiv(w, G)
    gkeys = torch.empty(B, n_groups, dtype=torch.int32, device=xc.device)
    BM, BN, BK, warps, stages, group_m = cfg
    sms = torch.cuda.get_device_properties(xc.device).multi_processor_count
    _preacts_gemm_tma_kernel[(min(sms, triton.cdiv(B, BM) * triton.cdiv(w, BN)),)](
        TensorDescriptor.from_tensor(xc, [BM, BK]), TensorDescriptor.from_tensor(W, [BN, BK]),
        TensorDescriptor.from_tensor(out, [BM, BN]), b, gkeys, B, w, D, n_groups,
        BM=BM, BN=BN, BK=BK, GROUP_M=group_m, G=G, NUM_SMS=sms, KEYS=keys, FLATTEN=flatten,
        MAX_FIRST=max_first, WARP_SPECIALIZE=warp_specialize, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return gkeys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="all", choices=["all", "first"])
    parser.add_argument(
        "--ab", type=int, default=0, help="instead: N rounds alternating the shipped path and the fused one"
    )
    args = parser.parse_args()
    fs = FS
    sel = package_module(fs, "primitives.select.row_topk")
    groups = package_module(fs, "primitives.select.groups")
    configs = CONFIGS if args.configs == "all" else CONFIGS[:1]
    if args.ab:
        return alternate(fs, sel, args.ab)
    print(f"# preacts_gemm on {torch.cuda.get_device_name()}, torch {torch.__version__}, {date.today()}", flush=True)
    for B, D, F, K in SHAPES:
        x, W, b, pre = problem(B, D, F)
        G = sel.topk_group(F, K)
        flop = 2 * B * D * F
        print(f"\n## (B, D, F, K) = {(B, D, F, K)}, G = {G}", flush=True)
        t_mm = graph_ms(lambda: torch.addmm(b, x, W.T, out=pre))
        t_grp = graph_ms(lambda: groups.group_max_keys(pre, 0, G))
        gk = groups.group_max_keys(pre, 0, G)
        t_row = graph_ms(lambda: sel.row_select_values(pre, 0, K, G, relu=True, gkeys=gk))
        t_all = graph_ms(lambda: sel.row_select_values(torch.addmm(b, x, W.T, out=pre), 0, K, G, relu=True))
        print(f"cuBLAS addmm {t_mm:.3f} ms ({flop / t_mm / 1e9:.0f} TFLOP/s); group pass {t_grp:.3f}; "
              f"candidate kernel {t_row:.3f}; addmm + selection {t_all:.3f}", flush=True)  # fmt: skip
        _, ids_ref = sel.row_select_values(torch.addmm(b, x, W.T, out=pre), 0, K, G, relu=True)
        pre_ref = pre.clone()
        best = None
        variants = [
            ("pointer", preacts_group_keys, {}),
            ("tma", preacts_group_keys_tma, {}),
            ("tma, no keys", preacts_group_keys_tma, {"keys": False}),
            ("tma, not flattened", preacts_group_keys_tma, {"flatten": False}),
            ("tma, fp32 group max first", preacts_group_keys_tma, {"max_first": True}),
            ("tma, warp-specialized", preacts_group_keys_tma, {"warp_specialize": True, "flatten": False}),
        ]
        for label, gemm, kw in variants:
            for config in configs if label in ("tma", "tma, no keys") else configs[:1]:
                if config[1] % G:
                    continue
                args = dict(kw, cfg=config)
                cfg = f"{label} {config}"
                try:
                    t_f = graph_ms(lambda gemm=gemm, args=args: gemm(x, W, b, G, pre, **args))
                    if t_f != t_f:  # graph_ms printed why (a tile that does not fit the shared memory)
                        continue
                    if kw and "max_first" not in kw:  # timing variants: the GEMM alone
                        print(f"  {cfg}: {t_f:.3f} ms ({flop / t_f / 1e9:.0f} TFLOP/s)", flush=True)
                        continue
                    t_fs = graph_ms(
                        lambda gemm=gemm, args=args: sel.row_select_values(
                            pre, 0, K, G, relu=True, gkeys=gemm(x, W, b, G, pre, **args)
                        )
                    )
                except Exception as e:  # a tile that does not fit the SM's shared memory
                    print(f"  {cfg}: failed: {type(e).__name__}: {str(e)[:100]}")
                    continue
                gkf = gemm(x, W, b, G, pre, **args)
                same_keys = torch.equal(gkf, groups.group_max_keys(pre, 0, G))
                _, ids_f = sel.row_select_values(pre, 0, K, G, relu=True, gkeys=gkf)
                differ = (pre != pre_ref).sum().item()
                rows = (ids_f != ids_ref).any(1).sum().item()
                print(f"  {cfg}: GEMM + keys {t_f:.3f} ms ({flop / t_f / 1e9:.0f} TFLOP/s), "
                      f"+ candidate kernel {t_fs:.3f} ({t_fs / t_all:.3f}x addmm + selection); keys exact {same_keys}; "
                      f"entries != cuBLAS {differ} of {pre.numel()}; rows with other ids {rows}/{B}",
                      flush=True)  # fmt: skip
                if best is None or t_fs < best[0]:
                    best = (t_fs, cfg)
        if best:
            print(f"best: {best[1]} {best[0]:.3f} ms against {t_all:.3f} ({best[0] / t_all:.3f}x)", flush=True)


def alternate(fs, sel, rounds):
    """The cuBLAS front end and the package's fused one (``primitives/preacts_gemm``),
    alternating in one process, since the chained times move by several percent between runs.
    (``results/preacts_gemm_ab_h100.log`` came from this script's own TMA kernel with the fp32 group
    maxima, before the package's kernel, which adds the NaN fall-back, existed.)"""
    import statistics

    pg = package_module(fs, "primitives.preacts_gemm")
    package_module(fs, "_launch").TUNING["preacts_gemm"] = True

    print(f"# preacts_gemm --ab {rounds} on {torch.cuda.get_device_name()}, torch {torch.__version__}, {date.today()}")
    for B, D, F, K in SHAPES:
        x, W, b, pre = problem(B, D, F)
        G = sel.topk_group(F, K)

        def shipped():
            return sel.row_select_values(torch.addmm(b, x, W.T, out=pre), 0, K, G, relu=True)

        assert pg.fits(x, W, pre, G), "the package's fused GEMM does not take this shape"

        def fused():
            gk = pg.preacts_group_keys(x, W, b, G, pre)
            return sel.row_select_values(pre, 0, K, G, relu=True, gkeys=gk)

        same = all(torch.equal(u, v) for u, v in zip(shipped(), fused()))
        ratios = []
        for r in range(rounds):
            a, f = graph_ms(shipped), graph_ms(fused)
            ratios.append(f / a)
            print(f"{(B, D, F, K)} round {r}: shipped {a:.3f} ms, fused {f:.3f} ms ({f / a:.3f}x)", flush=True)
        print(f"{(B, D, F, K)}: median fused / shipped {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}); same values and ids: {same}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
