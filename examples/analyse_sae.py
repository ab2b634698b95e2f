# /// script
# requires-python = ">=3.11"
# dependencies = [
#   "torch==2.13.0",
#   "triton==3.7.1",
#   "kernels==0.17.2",
#   "transformers>=4.45",
#   "datasets>=2.20",
#   "safetensors",
#   "tqdm",
# ]
# ///
"""Analyse an SAE's latents over a corpus: statistics, top and band examples, a dashboard JSON and an HTML browser.

    python examples/analyse_sae.py --checkpoint runs/sae/checkpoint --model gpt2 --layer 6 --tokens 2_000_000
    python examples/analyse_sae.py --model minilm --dataset pydoc --tokens 20_000 --d-sae 512 --k 8   # offline

The text, the model and the hookpoint are ``examples/train_sae.py``'s (``--model``, ``--dataset``, ``--layer``,
``--context-size``; its helpers read them): sequences of ``--context-size`` tokens, each starting with the
BOS / CLS token, and the residual stream entering block ``--layer`` without that first position. The SAE is a
SAELens-format checkpoint folder (``--checkpoint``, what ``train_sae.py`` writes to ``<out>/checkpoint``: the
TopK, standard, Gated and JumpReLU formats); without one, an untrained TopK SAE of ``--d-sae`` latents and
``--k`` (a smoke run of the pipeline). ``flash_sae.LatentAnalysis`` reads the codes in two passes over the same
tokens (the first: counts, means, the exact top ``--top-n`` tokens; the second: the ``--bands`` activation bands'
samples, the histograms and the context activations), with a tqdm bar. Token positions number the harvested
tokens in order; the token ids are kept on the host (4 bytes a token) to print the contexts.

Written to ``--out``: ``statistics.pt`` (the ``LatentStatistics`` fields as CPU tensors), ``dashboard.json``
(Neuronpedia's dashboard layout, as sae-dashboard's converter writes it, for ``--html-latents`` latents) and
``latents.html`` (a self-contained page: the index sorted by density, one card per latent).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_sae  # noqa: E402  (the training pipeline's model, text and harvest helpers)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--checkpoint", default=None, help="a SAELens-format SAE folder (cfg.json, sae_weights.safetensors)")
    a("--model", default="gpt2", help="HF id or folder, 'minilm' (offline) or 'random-gpt2' (offline)")
    a("--layer", type=int, default=6, help="hidden_states[layer]: the residual stream entering block --layer")
    a("--dataset", default="Skylion007/openwebtext", help="a datasets id, 'pydoc' (offline) or a .txt file")
    a("--text-column", default="text")
    a("--context-size", type=int, default=128, help="tokens per sequence, the BOS / CLS token included")
    a("--tokens", type=int, default=1_000_000, help="tokens to analyse (whole sequences, rounded up)")
    a("--model-batch", type=int, default=32, help="sequences per model forward")
    a("--d-sae", type=int, default=4096, help="latents of the untrained TopK SAE used without --checkpoint")
    a("--k", type=int, default=32, help="k of the untrained TopK SAE used without --checkpoint")
    a("--top-n", type=int, default=20, help="top activating tokens per latent")
    a("--bands", type=int, default=10, help="activation bands per latent (sae-dashboard's n_quantiles)")
    a("--samples-per-band", type=int, default=5)
    a("--bins", type=int, default=50, help="bins of each latent's activation histogram")
    a("--window", default="5,5", help="context tokens shown before,after each token")
    a("--html-latents", type=int, default=200, help="latents 0..N-1 in the JSON and the HTML; 0: all")
    a("--out", default="analysis")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--seed", type=int, default=0)
    a("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.context_size < 2 or args.model_batch < 1:
        ap.error("--tokens and --model-batch must be >= 1, --context-size >= 2")
    try:
        args.window = tuple(int(w) for w in args.window.split(","))
    except ValueError:
        ap.error(f"--window must be two ints 'before,after', got {args.window!r}")
    return args


def load_sae(fs, args, D, device):
    if args.checkpoint is not None:
        sae = train_sae.load_saelens_checkpoint(fs, args.checkpoint)
        if sae.W_enc.shape[1] != D:
            raise SystemExit(f"--checkpoint reads d_in={sae.W_enc.shape[1]}, layer {args.layer} has {D}")
        return sae.to(device)
    return fs.SparseAutoencoder(D, args.d_sae, args.k, seed=args.seed).to(device)


def corpus(tok, args):
    """[n, context] token ids: whole sequences, at least --tokens analysed tokens (the first of each dropped)."""
    seqs = train_sae.Sequences(tok, args.dataset, args.text_column, args.context_size, args.seed)
    n = -(-args.tokens // (args.context_size - 1))
    parts = []
    while n > 0:
        ids = seqs.next_batch(min(n, 256))
        if ids is None:
            break
        parts.append(ids)
        n -= ids.shape[0]
    return torch.cat(parts)


def token_strings(tok) -> list[str]:
    """Each id's text as it reads inside a sentence: WordPiece's (BERT, MiniLM) pieces get a leading space
    unless they continue a word ("##ing"); byte-level BPE's (GPT-2) decode with their own spaces."""
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    if any(p.startswith("##") for p in pieces if p):
        return [p[2:] if p.startswith("##") else " " + p for p in pieces]
    return [tok.decode([i]) for i in range(len(tok))]


@torch.no_grad()
def analyse(fs, sae, model, ids, args):
    from tqdm import tqdm

    analysis = fs.LatentAnalysis(
        sae.W_enc.shape[0], top_n=args.top_n, n_quantile_bands=args.bands, samples_per_band=args.samples_per_band,
        histogram_bins=args.bins, context=args.window, seed=args.seed, device=args.device,
    )  # fmt: skip
    passes = 2 if analysis.needs_second_pass else 1
    chunks = range(0, ids.shape[0], args.model_batch)
    bar = tqdm(total=passes * ids.shape[0] * (args.context_size - 1), unit="tok", disable=args.no_progress)
    for p in range(passes):
        bar.set_description(f"pass {p + 1}/{passes}")
        for s in chunks:
            x = train_sae.harvest(model, ids[s : s + args.model_batch], args.layer, args.device, sae.W_enc.dtype)
            analysis.update(sae.encode(x))
            bar.update(x.shape[0])
        if p == 0 and passes == 2:
            analysis.begin_second_pass()
    bar.close()
    return analysis.result()


def main(argv=None):
    args = parse_args(argv)
    fs = train_sae.load_flash_sae()
    tok, model, causal, _ = train_sae.load_model(args.model, args.device, torch.float32)
    ids = corpus(tok, args)
    D = train_sae.harvest(model, ids[:1], args.layer, args.device).shape[1]
    sae = load_sae(fs, args, D, args.device).eval()
    stats = analyse(fs, sae, model, ids, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in stats._asdict().items()}
    torch.save(fields, out / "statistics.pt")
    tokens = ids[:, 1:].reshape(-1)
    strings = token_strings(tok)
    F = stats.fire_counts.shape[0]
    latents = range(min(args.html_latents, F) if args.html_latents > 0 else F)
    cpu = stats._replace(**{k: v for k, v in fields.items() if isinstance(v, torch.Tensor)})
    meta = train_sae.run_metadata(args, model, causal)
    data = cpu.to_dashboard_json(tokens, strings, sequence_length=args.context_size - 1, latents=latents,
                                 model_id=meta["model_name"], layer=args.layer, dataset=args.dataset,
                                 sae_set=str(args.checkpoint or "untrained"))  # fmt: skip
    (out / "dashboard.json").write_text(json.dumps(data))
    title = f"{meta['model_name']} {meta['hook_name']}: {F} latents over {stats.n_tokens} tokens"
    cpu.write_html(out / "latents.html", tokens, strings, sequence_length=args.context_size - 1, latents=latents,
                   title=title)  # fmt: skip
    dead = int((stats.fire_counts == 0).sum())
    print(
        f"{stats.n_tokens} tokens, {F} latents ({dead} never fired): {out}/statistics.pt, dashboard.json, latents.html"
    )


if __name__ == "__main__":
    main()
