#!/usr/bin/env python3
"""The dead-latent losses' cost: flash-sae's TopK step with AuxK / ghost grads beside the plain step,
the same step computed the way sparsify computes it, sparsify's and SAELens's own, and dense torch
(eager and torch.compile), in one run.

Rows per shape (forward + backward, bf16; ms as launched and as a CUDA graph, peak memory, % of the
step's floor as in ``side_by_side.step_floor_ms``):
- flash-sae, plain TopK step (the reference for the ratio column);
- flash-sae + AuxK, k_aux = 512, at several dead counts (the dead set: the first dead_capacity = 4096
  dead latents by id; its cost is O(B * 4096 * D) whatever the count), k_aux = D // 2, and ghost grads;
- "sparsify-style": sparsify's installed pieces (its fused encoder: the dense ReLU'd [B, F]
  pre-activations and torch.topk; its decoder kernel) and its AuxK as its SparseCoder.forward writes it
  (torch.where over [B, F], torch.topk of k_aux, a second decode), with k_aux = 512; FVU + alpha * AuxK;
- sparsify's own SparseCoder.forward (its k_aux is fixed at D // 2), with and without a dead mask;
- SAELens's TopK training SAE (default config), with a dead mask;
- dense torch, eager and torch.compile (F <= 2^18): the TopK step with AuxK over dense [B, F] tensors.
sparsify and SAELens count the dead latents with ``int(mask.sum())``, a host sync, so their steps
cannot be captured in a CUDA graph (the row says so).

Usage: python benchmarks/dead_latents.py [--quick] [--out benchmarks/results] [--stem dead_latents]
"""

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_schema import git_commit, result_path, write_rows  # noqa: E402
from side_by_side import ROOT, copy_bandwidth, load_kernel, make_step_problem, measure_call, step_floor_ms  # noqa: E402

SHAPES = [(2048, 2304, 65536, 64), (4096, 2048, 262144, 64)]
QUICK = [(64, 40, 512, 6)]
K_AUX = 512
ALPHA = 1 / 32


def dead_mask_of(F, n_dead, device):
    g = torch.Generator(device=device).manual_seed(n_dead)
    mask = torch.zeros(F, dtype=torch.bool, device=device)
    mask[torch.randperm(F, device=device, generator=g)[:n_dead]] = True
    return mask


def dense_topk_auxk_step(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux):
    """The TopK step with AuxK over dense [B, F] tensors (the paper's loss, mean-normalised as flash-sae's)."""
    pre = torch.addmm(b_enc, x - b_dec, W_enc.T)
    vals, indices = pre.topk(k, dim=1, sorted=False)
    code = torch.zeros_like(pre).scatter(1, indices, torch.relu(vals))
    x_hat = code @ W_dec + b_dec
    e = (x - x_hat).detach()
    aux_vals, aux_idx = torch.where(dead, pre, float("-inf")).topk(k_aux, dim=1, sorted=False)
    aux_code = torch.zeros_like(pre).scatter(1, aux_idx, torch.relu(aux_vals))
    scale = (dead.sum() / k_aux).clamp(max=1)
    aux = scale * ((aux_code @ W_dec) - e).float().pow(2).mean()
    return (x_hat - x).float().pow(2).mean() + ALPHA * aux


def sparsify_pieces():
    try:
        from sparsify.config import SparseCoderConfig
        from sparsify.fused_encoder import fused_encoder
        from sparsify.sparse_coder import SparseCoder
        from sparsify.utils import decoder_impl
    except Exception as e:  # reported in the table, not hidden
        return None, f"sparsify not importable: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    return (fused_encoder, decoder_impl, SparseCoder, SparseCoderConfig), None


def sparsify_style_step(pieces, params, k, dead, k_aux):
    """sparsify's step, its AuxK as SparseCoder.forward writes it, with a chosen k_aux."""
    fused_encoder, decoder_impl, _, _ = pieces
    x, W_enc, b_enc, W_dec, b_dec = params

    def call():
        top_acts, top_indices, pre_acts = fused_encoder(x - b_dec, W_enc, b_enc, k, "topk")
        sae_out = decoder_impl(top_indices, top_acts, W_dec.mT) + b_dec
        e = x - sae_out
        total_variance = (x - x.mean(0)).pow(2).sum()
        num_dead = int(dead.sum())  # as sparsify: a host sync
        scale = min(num_dead / k_aux, 1.0)
        auxk_acts, auxk_indices = torch.where(dead[None], pre_acts, -torch.inf).topk(min(k_aux, num_dead), sorted=False)
        e_hat = decoder_impl(auxk_indices, auxk_acts, W_dec.mT)
        auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
        return e.pow(2).sum() / total_variance + ALPHA * auxk_loss

    return call


def sparsify_own(pieces, params, k, dead):
    """sparsify's SparseCoder.forward itself (default config, num_latents = F, k), holding ``params``:
    (call, its parameters, whether it can be captured)."""
    _, _, SparseCoder, SparseCoderConfig = pieces
    x, W_enc, b_enc, W_dec, b_dec = (p.detach() for p in params)
    F, D = W_enc.shape
    coder = SparseCoder(D, SparseCoderConfig(num_latents=F, k=k), device="cuda", dtype=x.dtype)
    with torch.no_grad():
        coder.encoder.weight.copy_(W_enc)
        coder.encoder.bias.copy_(b_enc)
        coder.W_dec.copy_(W_dec)
        coder.b_dec.copy_(b_dec)

    def call():
        out = coder(x, dead_mask=dead)
        return out.fvu + ALPHA * out.auxk_loss

    return call, list(coder.parameters()), dead is None  # with a dead mask it syncs: no CUDA graph


def saelens_topk(params, k, dead):
    try:
        from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except Exception as e:
        return None, f"sae-lens not importable: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    x, W_enc, b_enc, W_dec, b_dec = (p.detach() for p in params)
    F, D = W_enc.shape
    dtype = str(x.dtype).replace("torch.", "")
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=k, dtype=dtype, device="cuda"))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc.T)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)

    def call():
        step = TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
        )
        return sae.training_forward_pass(step).loss

    return (call, list(sae.parameters()), False), None  # int(mask.sum()) syncs: no CUDA graph


def schema_rows(benchmark, meta, rows):
    """This script's measured rows -> results_schema rows (the steps are bf16: make_step_problem above)."""
    from results_schema import make_row

    env = {k: meta.get(k) for k in ("gpu", "torch", "triton", "commit", "date")}
    return [
        make_row(
            benchmark,
            r["impl"],
            {k: r[k] for k in "BDFK"},
            dtype="bf16",
            eager_ms=r["ms"],
            graph_ms=r["graph_ms"],
            peak_gib=r["peak_gib"],
            env=env,
            error=r.get("error"),
            eager_p20_ms=r["p20"],
            eager_p80_ms=r["p80"],
            floor_ms=r["floor_ms"],
            pct_of_floor=r["pct_floor"],
            x_baseline_eager=r["x_plain_eager"],
            x_baseline_graph=r["x_plain_graph"],
            copy_bandwidth_tbps=meta.get("copy_bandwidth_tbps"),
            params={"baseline": "flash-sae TopK step (no dead-latent loss)"},
        )  # fmt: skip
        for r in rows
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--stem", default="dead_latents")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("dead_latents.py needs a CUDA GPU")
    fs = load_kernel()
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, {datetime.date.today()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(
        f"{'B,D,F,K':22s} {'impl':44s} {'ms (p20-p80)':>22s} {'graph ms':>9s} {'peak GiB':>9s} "
        f"{'% floor':>8s} {'x plain':>8s}"
    )
    pieces, why_not_sparsify = sparsify_pieces()
    compiled = None if args.no_compile else torch.compile(dense_topk_auxk_step)
    rows = []
    for B, D, F, K in QUICK if args.quick else SHAPES:
        k_aux = min(K_AUX, F // 4)
        params = make_step_problem(B, D, F, K, torch.bfloat16, "cuda")
        fl = step_floor_ms(B, D, F, K, "bf16", 2, bw)
        counts = sorted({min(F, n) for n in (512, 4096, F // 4)})

        def ready(call, ps=params, graph=True):
            return lambda: ((call, ps, graph), None)

        # Each entry builds its step when its turn comes ((call, params), or None and why), so a peer's
        # module and its gradients are freed before the next one is built.
        impls = {"flash-sae TopK step (no dead-latent loss)": ready(lambda: fs.topk_sae_step(*params, K).loss)}
        for n in counts:
            dead = dead_mask_of(F, n, "cuda")
            impls[f"flash-sae + AuxK k_aux={k_aux}, {n} dead"] = ready(
                lambda dead=dead: fs.topk_sae_step(*params, K, dead_loss=fs.DeadLatentLoss(dead, k_aux=k_aux)).loss
            )
        dead = dead_mask_of(F, counts[-1], "cuda")
        n = counts[-1]
        impls[f"flash-sae + AuxK k_aux=D//2={D // 2}, {n} dead"] = ready(
            lambda: fs.topk_sae_step(*params, K, dead_loss=fs.DeadLatentLoss(dead)).loss
        )
        impls[f"flash-sae + ghost grads, {n} dead"] = ready(
            lambda: fs.topk_sae_step(*params, K, dead_loss=fs.DeadLatentLoss(dead, kind="ghost")).loss
        )
        if pieces is not None:
            impls[f"sparsify-style + AuxK k_aux={k_aux}, {n} dead"] = ready(
                sparsify_style_step(pieces, params, K, dead, k_aux), graph=False
            )
            impls["sparsify SparseCoder (no dead mask)"] = lambda: (sparsify_own(pieces, params, K, None), None)
            impls[f"sparsify SparseCoder + AuxK k_aux=D//2, {n} dead"] = lambda: (
                sparsify_own(pieces, params, K, dead),
                None,
            )
        else:
            impls["sparsify"] = lambda: (None, why_not_sparsify)
        impls[f"SAELens TopK + AuxK k_aux=D//2, {n} dead"] = lambda: saelens_topk(params, K, dead)
        impls[f"torch eager (dense) + AuxK k_aux={k_aux}, {n} dead"] = ready(
            lambda: dense_topk_auxk_step(*params, K, dead, k_aux)
        )
        if compiled is not None and F <= 2**18:
            impls[f"torch.compile (dense) + AuxK k_aux={k_aux}, {n} dead"] = ready(
                lambda: compiled(*params, K, dead, k_aux)
            )
        errors = {}
        plain = None
        for name, impl in impls.items():
            built = None
            try:
                built, why = impl()
                if built is None:
                    errors[name] = why
                    continue
                (ms, lo, hi), peak, gms = measure_call(*built)
                err = None
            except torch.OutOfMemoryError as e:
                ms = lo = hi = peak = gms = float("nan")
                err = f"OOM: {str(e).splitlines()[0][:60]}"
            built = None
            torch.cuda.empty_cache()
            if plain is None:
                plain = (ms, gms)
            row = dict(
                B=B, D=D, F=F, K=K, impl=name, ms=ms, p20=lo, p80=hi, graph_ms=gms, peak_gib=peak, floor_ms=fl,
                pct_floor=100 * fl / gms, x_plain_eager=ms / plain[0], x_plain_graph=gms / plain[1], error=err,
            )  # fmt: skip
            rows.append(row)
            ratio = f"{ms / plain[0]:.3f}/{gms / plain[1]:.3f}" if gms == gms else f"{ms / plain[0]:.3f}/-"
            print(
                f"{f'{B},{D},{F},{K}':22s} {name:44s} {ms:8.3f} ({lo:.3f}-{hi:.3f}) {gms:9.3f} {peak:9.2f} "
                f"{row['pct_floor']:7.0f}% {ratio:>12s}" + (f"  {err}" if err else ""),
                flush=True,
            )
        for who, why in errors.items():
            print(f"{f'{B},{D},{F},{K}':22s} {who}: not run ({why})")
        impls = params = dead = None
        torch.cuda.empty_cache()
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
