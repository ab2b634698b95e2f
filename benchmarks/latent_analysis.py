#!/usr/bin/env python3
"""Latent analysis over a corpus: flash_sae.LatentAnalysis against sae-dashboard's runner and the dense formulation.

    python benchmarks/latent_analysis.py [--features 65536] [--tokens 262144] [--sae-dashboard /tmp/sdd]
    python benchmarks/latent_analysis.py --smoke    # tiny shapes on the CPU: checks the script runs and agrees

The corpus: random token ids through a random-weight GPT-2-shaped TransformerLens ``HookedTransformer`` (12
layers' worth of width, ``--d-model``, 2 blocks; offline), the residual stream entering block 1
(``blocks.1.hook_resid_pre``), sequences of ``--context`` tokens. The SAE: a TopK SAE with ``--features``
latents and ``--k``, unit-norm decoder rows and no decoder bias, built once as SAELens's ``TopKSAE`` (with
``rescale_acts_by_decoder_norm``, which sae-dashboard's runner needs to fold the decoder norms, a no-op at
unit norm) and as flash-sae's ``SparseAutoencoder`` with the same weights: both give the same code.

Each contender, in the same process, over the same tokens:

- ``flash-sae LatentAnalysis``: both passes (top 20, 10 bands of 5 samples, 50-bin histograms, 5 + 5 context
  tokens) over the codes of ``flash_sae.SparseAutoencoder.encode``, the model forward included; all latents;
- ``flash-sae LatentAnalysis (updates only)``: the same two passes over the codes computed beforehand (the
  analysis's own cost);
- ``dense torch``: the activations of every token kept as one [tokens, F] fp32 tensor, then the first pass's
  statistics and the histogram computed over it column block by column block (``dense_statistics``), model
  and encode included, and the statistics alone; over ``--dense-tokens`` tokens (it needs tokens * F * 4
  bytes);
- ``sae-dashboard SaeVisRunner``: sae-dashboard 0.8.0's own runner (its default layout: top 20, 10 quantile
  groups of 5, histograms, logit tables) on ``--dashboard-features`` latents. sae-dashboard pins
  transformers<4.57 and transformer-lens<3, so it is not installed with the test set: install it with
  ``pip install --no-deps --target DIR sae-dashboard==0.8.0 dataclasses-json marshmallow typing-inspect
  mypy-extensions eindex-callum`` and pass ``--sae-dashboard DIR``. It imports and runs with transformer-lens 3
  and transformers 5 on a ``HookedTransformer`` built from a config.

Checks in the same run: the streamed statistics equal the dense ones where both read the same tokens
(``--dense-tokens`` = ``--tokens``, as in ``--smoke``), and sae-dashboard's density and maximum of each latent
it analysed (from its titles, to their 3 decimals) are LatentAnalysis's.

Time is wall clock (the device synchronised at the end), peak memory is the most allocated above the model and
the SAE (CUDA only). Rows: ``benchmarks/results/<gpu>/latent_analysis.jsonl``.
"""

import argparse
import contextlib
import importlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_schema import append_rows, environment, make_row, result_path, write_rows  # noqa: E402

HOOK = "blocks.1.hook_resid_pre"
OPTIONS = dict(top_n=20, n_quantile_bands=10, samples_per_band=5, histogram_bins=50, context=(5, 5))
SMOKE = dict(d_model=32, features=96, k=4, tokens=256, context=32, dense_tokens=256, dashboard_features=16)


def load_kernel():
    sys.path.insert(0, str(ROOT))
    import build_local

    return build_local.load_kernel()


def topk_weights(D, F, seed, device):
    """W_enc [F, D], b_enc [F], W_dec [F, D] with unit-norm rows: one TopK SAE for every contender."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(F, D, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return dict(
        W_enc=W_dec.clone().to(device), b_enc=(torch.randn(F, generator=g) * 0.1).to(device), W_dec=W_dec.to(device)
    )


def flash_sae(fs, w, k, device):
    D = w["W_enc"].shape[1]
    sae = fs.SparseAutoencoder(D, w["W_enc"].shape[0], k).to(device)
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"])
        sae.b_enc.copy_(w["b_enc"])
        sae.W_dec.copy_(w["W_dec"])
        sae.b_dec.zero_()
    return sae.eval()


def source(args, device):
    """(activations of a [n, context] id batch -> [n * context, D], the token ids [tokens / context, context])."""
    torch.manual_seed(args.seed)
    n_seq = -(-args.tokens // args.context)
    ids = torch.randint(0, args.vocab, (n_seq, args.context))
    model = None
    if not args.random_acts:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=2, d_model=args.d_model, n_ctx=args.context, d_head=args.d_model // 4,
                                      n_heads=4, d_vocab=args.vocab, act_fn="gelu", normalization_type="LN",
                                      device=str(device))  # fmt: skip
        model = HookedTransformer(cfg).eval()

    @torch.no_grad()
    def acts(batch):
        if model is None:
            g = torch.Generator().manual_seed(int(batch[0, 0]) * 7919 + int(batch[0, -1]))
            return torch.randn(batch.numel(), args.d_model, generator=g).to(device)
        return model(batch.to(device), stop_at_layer=1).reshape(-1, args.d_model)

    return model, acts, ids


def dense_statistics(keys, acts, top_n, bins, block=4096):
    """The first pass's statistics and the histogram over all tokens' activations [T, F] at once, column block
    by column block: fire counts, fp64 mean, max, min, the top ``top_n`` (packed keys: larger value, then
    earlier token), histograms over [min, max]. ``keys``: flash-sae's ``primitives.select.keys``."""
    KEY_NONE, pack, sortable_keys, unpack = keys.KEY_NONE, keys.pack, keys.sortable_keys, keys.unpack
    T, F = acts.shape
    out = {k: [] for k in ("fire_counts", "mean_activation", "top_values", "top_positions", "histogram")}
    positions = torch.arange(T, device=acts.device)[:, None]
    for s in range(0, F, block):
        a = acts[:, s : s + block]
        fires = a > 0
        counts = fires.sum(0)
        packed = torch.where(fires, pack(sortable_keys(a), positions), KEY_NONE)
        top = packed.topk(min(top_n, T), dim=0).values.t()
        vals, pos = unpack(top, a.dtype)
        hi = a.max(0).values
        lo = torch.where(fires, a, float("inf")).min(0).values
        b = torch.floor((a - lo) * bins / (hi - lo)).nan_to_num(0.0).clamp(0, bins - 1).long()
        hist = torch.zeros(a.shape[1], bins, dtype=torch.int64, device=a.device)
        hist.scatter_add_(1, b.t(), fires.t().long())
        out["fire_counts"].append(counts)
        out["mean_activation"].append(torch.where(fires, a.double(), 0.0).sum(0) / counts.clamp_min(1))
        out["top_values"].append(torch.where(top == KEY_NONE, 0, vals))
        out["top_positions"].append(torch.where(top == KEY_NONE, -1, pos))
        out["histogram"].append(hist)
    return {k: torch.cat(v) for k, v in out.items()}


def timed(device):
    """A context giving (seconds, peak GiB above the start) once it exits."""
    result = {}

    @contextlib.contextmanager
    def run():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        yield result
        if device.type == "cuda":
            torch.cuda.synchronize()
            result["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        result["s"] = time.perf_counter() - t0

    return run()


def run_ours(fs, sae, acts, ids, args, device):
    analysis = fs.LatentAnalysis(sae.W_enc.shape[0], **OPTIONS, device=device)
    with torch.no_grad():
        for p in range(2):
            for s in range(0, ids.shape[0], args.batch_sequences):
                analysis.update(sae.encode(acts(ids[s : s + args.batch_sequences])))
            if p == 0:
                analysis.begin_second_pass()
    return analysis.result()


def encode_all(sae, acts, ids, args):
    """Every batch's code, kept (B * k values and ids a batch): the input of the updates-only timing."""
    with torch.no_grad():
        return [
            sae.encode(acts(ids[s : s + args.batch_sequences])) for s in range(0, ids.shape[0], args.batch_sequences)
        ]


def run_ours_cached(fs, F, codes, device):
    """Both passes over codes already computed: the analysis alone, without the model and the encoder."""
    analysis = fs.LatentAnalysis(F, **OPTIONS, device=device)
    for p in range(2):
        for code in codes:
            analysis.update(code)
        if p == 0:
            analysis.begin_second_pass()
    return analysis.result()


def run_dense(fs, sae, acts, ids, args):
    F = sae.W_enc.shape[0]
    n = -(-args.dense_tokens // args.context)
    dense = []
    with torch.no_grad():
        for s in range(0, n, args.batch_sequences):
            vals, indices = sae.encode(acts(ids[s : min(s + args.batch_sequences, n)]))
            dense.append(vals.new_zeros(vals.shape[0], F).scatter_(1, indices, vals).float())
    keys = importlib.import_module(fs.__name__ + ".primitives.select.keys")
    dense = torch.cat(dense)
    with timed(dense.device) as r:
        stats = dense_statistics(keys, dense, OPTIONS["top_n"], OPTIONS["histogram_bins"])
    return stats, r


def run_dashboard(model, w, ids, args, device):
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    D, F = w["W_enc"].shape[1], w["W_enc"].shape[0]
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=args.k, rescale_acts_by_decoder_norm=True, device=str(device)))
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"].t())
        sae.b_enc.copy_(w["b_enc"])
        sae.W_dec.copy_(w["W_dec"])
        sae.b_dec.zero_()
    sae.cfg.metadata.hook_name = HOOK
    cfg = SaeVisConfig(hook_point=HOOK, features=list(range(args.dashboard_features)), device=str(device),
                       minibatch_size_tokens=args.batch_sequences)  # fmt: skip
    return SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=ids.to(device))


def check_agreement(ours, dense, T_dense, T):
    """Over the same tokens the streamed and the dense statistics are equal (checked where both saw them)."""
    if T_dense != T:
        return
    for name in dense:
        got = getattr(ours, name)
        if name == "mean_activation":
            ok = torch.allclose(got, dense[name], rtol=1e-9, atol=0)
        else:
            ok = torch.equal(got, dense[name])
        if not ok:
            raise SystemExit(f"the streamed {name} differs from the dense computation's")


def check_against_dashboard(data, ours, n):
    """sae-dashboard's density and maximum of each analysed latent (its titles, rounded to 3 decimals) are ours."""
    for f in range(n):
        feature = data.feature_data_dict[f]
        title = feature.acts_histogram_data.title
        density = float(title.split("= ")[1].rstrip("%")) / 100 if title else 0.0
        top = feature.sequence_data.seq_group_data[0].title
        peak = float(top.split("MAX = ")[1])
        if abs(density - float(ours.density[f])) > 5e-6 or abs(peak - float(ours.max_activation[f])) > 5e-4 + 1e-6:
            raise SystemExit(f"latent {f}: sae-dashboard's density {density}, max {peak}; ours "
                             f"{float(ours.density[f])}, {float(ours.max_activation[f])}")  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = ap.add_argument
    a("--features", type=int, default=2**16)
    a("--k", type=int, default=32)
    a("--d-model", type=int, default=768)
    a("--vocab", type=int, default=50257)
    a("--tokens", type=int, default=262_144)
    a("--context", type=int, default=128)
    a("--dense-tokens", type=int, default=32_768, help="tokens the dense formulation keeps ([tokens, F] fp32)")
    a("--dashboard-features", type=int, default=1024, help="latents sae-dashboard's runner analyses")
    a("--batch-sequences", type=int, default=64)
    a("--sae-dashboard", default=None, help="a folder holding sae-dashboard 0.8.0 and its extra deps (--no-deps)")
    a("--random-acts", action="store_true", help="random activations instead of the model (no transformer_lens)")
    a("--seed", type=int, default=0)
    a("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a("--smoke", action="store_true", help="tiny shapes on the CPU: runs every contender, checks them, writes nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.batch_sequences = 8
    if args.sae_dashboard:
        sys.path.insert(0, args.sae_dashboard)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    fs = load_kernel()
    w = topk_weights(args.d_model, args.features, args.seed, device)
    sae = flash_sae(fs, w, args.k, device)
    try:
        model, acts, ids = source(args, device)
    except ImportError as err:
        print(f"# transformer_lens missing ({err}): random activations")
        args.random_acts = True
        model, acts, ids = source(args, device)
    T = ids.numel()
    env = environment()
    shape = dict(D=args.d_model, F=args.features, K=args.k, tokens=T, context=args.context)
    rows = []
    with timed(device) as r:
        ours = run_ours(fs, sae, acts, ids, args, device)
    rows.append(("flash-sae LatentAnalysis (2 passes)", shape, r, None))
    print(f"flash-sae LatentAnalysis: {T} tokens, {args.features} latents, {r['s']:.2f} s, peak {r.get('peak_gib')}")
    codes = encode_all(sae, acts, ids, args)
    with timed(device) as r:
        run_ours_cached(fs, args.features, codes, device)
    del codes
    rows.append(("flash-sae LatentAnalysis (2 passes, updates only)", shape, r, None))
    print(f"  updates only (codes computed beforehand): {r['s']:.2f} s, peak {r.get('peak_gib')}")
    dense_shape = {**shape, "tokens": -(-args.dense_tokens // args.context) * args.context}
    try:
        with timed(device) as r:
            dense, r_stats = run_dense(fs, sae, acts, ids, args)
        check_agreement(ours, dense, dense_shape["tokens"], T)
        rows.append(("dense torch ([tokens, F] kept)", dense_shape, r, None))
        rows.append(("dense torch (statistics only)", dense_shape, r_stats, None))
        print(f"dense torch: {dense_shape['tokens']} tokens, {r['s']:.2f} s, peak {r.get('peak_gib')}; "
              f"statistics only {r_stats['s']:.2f} s")  # fmt: skip
    except torch.OutOfMemoryError as err:
        rows.append(("dense torch ([tokens, F] kept)", dense_shape, {}, f"out of memory: {str(err)[:100]}"))
    if model is not None:
        try:
            with timed(device) as r:
                data = run_dashboard(model, w, ids, args, device)
            check_against_dashboard(data, ours, args.dashboard_features)
            dash_shape = {**shape, "F_analysed": args.dashboard_features}
            rows.append(("sae-dashboard SaeVisRunner 0.8.0", dash_shape, r, None))
            print(f"sae-dashboard: {args.dashboard_features} of {args.features} latents, {r['s']:.2f} s")
        except ImportError as err:
            print(f"# sae-dashboard not importable ({err}); pass --sae-dashboard DIR (see the docstring)")
    if args.smoke:
        print("smoke: every contender ran; the streamed and dense statistics agree (and sae-dashboard's, if it ran)")
        return 0
    path = write_rows(result_path(env["gpu"], "latent_analysis", args.out), [])
    params = {k: str(v) for k, v in OPTIONS.items()}
    append_rows(path, [
        make_row("latent_analysis", name, sh, env=env, dtype="fp32", params=params, wall_s=r.get("s"),
                 tokens_per_s=(sh["tokens"] / r["s"]) if r.get("s") else None, peak_gib=r.get("peak_gib"),
                 eager_ms=r["s"] * 1e3 if r.get("s") else None, error=error)
        for name, sh, r, error in rows
    ])  # fmt: skip
    print(f"# rows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
