"""Many SAEs from one model forward: ``examples/train_sae.py --multi-layers`` and ``--sweep``.

    python examples/train_sae.py --multi-layers 0,1,2,3,4,5 --k 32 --out runs     # one SAE per layer
    python examples/train_sae.py --layer 3 --sweep k=16,32,64 --out sweep         # one SAE per k at layer 3

The model runs once per batch of sequences; the activation buffer holds every layer's activations ([rows, L, D],
harvested by one forward that stops after the deepest layer) or, for a sweep, the one layer's ([rows, D]). Its
shuffle serves the same rows to every SAE, the rows a single run with the same ``--seed`` would read. Each SAE
is a whole single run otherwise: its own module, master weights, Adam, learning-rate schedule, dead-latent
state, activation scaling, log, plot and checkpoint, in its own subfolder of ``--out`` (``layer_3/``, ``k_16/``,
``d_sae_4096/``, ``arch_batchtopk/``), written by ``train_sae.py``'s own functions (``make_trainer``,
``train_step``, ``save_checkpoint``, ``evaluate``). Each subfolder's checkpoint is a single run's checkpoint too
(its buffer is that SAE's layer), so ``--resume <out>/layer_3/checkpoint`` continues that SAE alone;
``--resume <out>`` continues them all (``multi.json`` names them). On a GPU all N training iterations are
captured in ONE CUDA graph (``flash_sae.graph_training_step`` over every module and optimizer), replayed once
per batch.
"""

import argparse
import json
import signal
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

MULTI_FILE = "multi.json"  # in a multi run's --out: the arguments and the members' names
SWEEP_AXES = ("k", "d_sae", "arch")


class Member(NamedTuple):
    """One SAE of a multi run: its subfolder ``name``, its single-run arguments, and ``column``: its layer's index
    in the buffer's rows ([rows, L, D]; None for a sweep's [rows, D])."""

    name: str
    args: argparse.Namespace
    column: int | None


def is_multi(args) -> bool:
    """Whether ``args`` ask for many SAEs: ``--multi-layers``, ``--sweep``, or ``--resume`` of a multi run."""
    resumed = args.resume is not None and (Path(args.resume) / MULTI_FILE).exists()
    return bool(args.multi_layers or args.sweep or resumed)


def parse_layers(text):
    """``--multi-layers`` as a tuple of ints (ValueError on a part that is not one)."""
    return tuple(int(part) for part in text.split(",") if part.strip())


def parse_sweep(text):
    """``--sweep axis=v1,v2,...`` -> (axis, [values as text]) (ValueError without an ``=``)."""
    axis, values = text.split("=", 1)
    return axis.strip().replace("-", "_"), [v.strip() for v in values.split(",") if v.strip()]


def sweep_value(axis, text):
    """A sweep value in the type of its argument: k a number, d_sae an int, arch a name."""
    return {"k": float, "d_sae": int, "arch": str}[axis](text)


def check_multi_args(args, error, archs):
    """``--multi-layers`` and ``--sweep``: well formed, one of them, an SAE (family "sae") each; ``error``
    (argparse's) names the flag."""
    if args.multi_layers is not None and args.sweep is not None:
        error("--multi-layers and --sweep are exclusive: one axis per run")
    multi = args.multi_layers is not None or args.sweep is not None
    if multi and archs[args.arch].family != "sae":
        error(f"--multi-layers and --sweep train SAEs; --arch {args.arch} is a {archs[args.arch].family}")
    if args.multi_layers is not None:
        try:
            layers = parse_layers(args.multi_layers)
        except ValueError:
            error(f"--multi-layers must be comma-separated integers, got {args.multi_layers!r}")
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            error(f"--multi-layers must be distinct layers >= 0, got {args.multi_layers!r}")
    if args.sweep is None:
        return
    try:
        axis, texts = parse_sweep(args.sweep)
    except ValueError:
        error(f"--sweep must read axis=v1,v2,... with axis in {SWEEP_AXES}, got {args.sweep!r}")
    if axis not in SWEEP_AXES:
        error(f"--sweep's axis must be one of {SWEEP_AXES}, got {axis!r}")
    try:
        values = [sweep_value(axis, t) for t in texts]
    except ValueError:
        error(f"--sweep {axis}= takes {'integers' if axis == 'd_sae' else 'numbers'}, got {args.sweep!r}")
    if not values or len(set(values)) != len(values):
        error(f"--sweep needs distinct values, got {args.sweep!r}")
    if axis == "arch":
        saes = sorted(n for n, a in archs.items() if a.family == "sae")
        for name in values:
            if name not in saes:
                error(f"--sweep arch= takes SAE architectures ({saes}), got {name!r}")
    elif axis == "k":
        integer = args.arch == "topk" or args.arch.startswith("topk_")
        if archs[args.arch].sparsity != "k":
            error(f"--sweep k= needs an --arch with a k; --arch {args.arch} has {archs[args.arch].sparsity}")
        if any(v < 1 or (integer and v != int(v)) for v in values):
            kind = "integers" if integer else "numbers"
            error(f"--sweep k= takes {kind} >= 1 for --arch {args.arch}, got {args.sweep!r}")
    elif any(v < 1 for v in values):
        error(f"--sweep d_sae= takes integers >= 1, got {args.sweep!r}")


def members(args):
    """The run's SAEs: one per ``--multi-layers`` layer or per ``--sweep`` value, each with the arguments of
    the single run it equals."""
    base = {**vars(args), "multi_layers": None, "sweep": None, "resume": None}
    if args.multi_layers is not None:
        return [Member(f"layer_{layer}", argparse.Namespace(**{**base, "layer": layer}), i)
                for i, layer in enumerate(parse_layers(args.multi_layers))]  # fmt: skip
    axis, texts = parse_sweep(args.sweep)
    out = []
    for text in texts:
        value = sweep_value(axis, text)
        if axis == "k" and value == int(value):
            value = int(value) if args.arch == "topk" or args.arch.startswith("topk_") else value
        label = f"{value:g}" if axis == "k" else str(value)
        out.append(Member(f"{axis}_{label}", argparse.Namespace(**{**base, axis: value}), None))
    return out


class MemberBuffer:
    """A member's view of the shared buffer for its checkpoint: the single run's buffer state, with only its
    layer's rows (a multi-layer buffer) or the whole buffer (a sweep's)."""

    def __init__(self, buffer, column):
        self.buffer, self.column = buffer, column

    def state(self):
        state = self.buffer.state() if self.column is None else {
            "buf": self.buffer.buf[:, self.column].cpu().contiguous(), "pos": self.buffer.pos,
            "rng": self.buffer.g.get_state(), "served": self.buffer.seqs.served,
        }  # fmt: skip
        return state


def rows_of(batch, column):
    """A member's rows [B, D] of the shared buffer's batch ([B, L, D] or [B, D])."""
    return batch if column is None else batch[:, column].contiguous()


class Trainer(NamedTuple):
    """One member's training state: module, MasterWeights or None, optimizer, activation scaling, out folder."""

    member: Member
    sae: torch.nn.Module
    master: object
    opt: torch.optim.Optimizer
    factor: float
    folder: Path


def iteration(ts, fs, trainers, dtype, graph_example=None):
    """``f(batch)``: every SAE's training iteration (``ts``: train_sae.py; its ``train_step``) on its rows of the shared
    batch, scaled by its factor and cast to ``dtype``; returns their step results. With ``graph_example`` (a
    batch on a CUDA device) all N iterations are captured in ONE CUDA graph (``flash_sae.graph_training_step``
    over every module, master copy and optimizer) and ``f`` replays it."""

    def step(batch):
        return [ts.train_step(t.sae, t.master, t.opt, (rows_of(batch, t.member.column) * t.factor).to(dtype))
                for t in trainers]  # fmt: skip

    if graph_example is None:
        return step
    modules = [t.sae for t in trainers] + [t.master.master for t in trainers if t.master]
    return fs.graph_training_step(step, graph_example, modules, [t.opt for t in trainers])


def load_resumed(args):
    """(arguments, {member name: saved state}) of ``--resume <multi run folder>``."""
    folder = Path(args.resume)
    meta = json.loads((folder / MULTI_FILE).read_text())
    states = {}
    for name in meta["members"]:
        path = folder / name / "checkpoint" / "flash_sae_state.pt"
        if not path.exists():
            raise SystemExit(f"--resume {folder}: {path} is missing")
        states[name] = torch.load(path, map_location="cpu", weights_only=False)
    steps = {s["step"] for s in states.values()}
    if len(steps) != 1:
        raise SystemExit(f"--resume {folder}: the members' checkpoints are at different steps {sorted(steps)}")
    return meta["args"], states


def resumed_buffer_state(states, names, layered):
    """The shared buffer's state from the members' checkpoints: their layers' rows stacked ([rows, L, D]),
    or a sweep's one buffer."""
    first = states[names[0]]["buffer"]
    if not layered:
        return first
    return {**first, "buf": torch.stack([states[n]["buffer"]["buf"] for n in names], dim=1)}


def main_multi(args, ts):
    """Trains the SAEs of ``--multi-layers`` or ``--sweep`` from one forward per batch; ``ts``: train_sae.py's
    functions (the script passes its own). Returns the output folder."""
    states = {}
    if args.resume:
        saved_args, states = load_resumed(args)
        args = ts.resumed_args(args, saved_args)
    args = ts.with_defaults(args)
    fs = ts.load_flash_sae()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else torch.float32
    group = members(args)
    capturable = all(fs.ARCHITECTURES[m.args.arch].capturable for m in group)
    graphed = args.cuda_graph == "on" or (args.cuda_graph == "auto" and on_gpu and capturable)
    if graphed and not (on_gpu and capturable):
        raise SystemExit("--cuda-graph on needs a CUDA device and capturable architectures for every SAE")
    torch.manual_seed(args.seed)
    tok, model, causal, blocks = ts.load_model(args.model, device, model_dtype)
    n_blocks = model.config.num_hidden_layers
    layered = args.multi_layers is not None
    for m in group:
        if not 0 <= m.args.layer <= n_blocks:
            flag = "--multi-layers" if layered else "--layer"
            raise SystemExit(f"{flag} must lie in [0, {n_blocks}] for {args.model} ({n_blocks} blocks), got "
                             f"{args.multi_layers if layered else args.layer}")  # fmt: skip
    if layered and blocks is None:
        raise SystemExit(f"--multi-layers: no list of {n_blocks} blocks found in {type(model).__name__}")
    D = model.config.hidden_size
    made = [ts.make_trainer(fs, m.args, D, dtype, device, graphed) for m in group]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    held = ts.Sequences(tok, args.dataset, args.text_column, args.context_size, args.seed, "eval").next_batch(
        args.eval_sequences
    )
    seqs = ts.Sequences(tok, args.dataset, args.text_column, args.context_size, args.seed)
    rows = args.buffer_batches * args.batch_size
    total_steps = max(1, args.tokens // args.batch_size)
    layers = tuple(m.args.layer for m in group)
    source = ts._replacement.Source("crosscoder", blocks, layers) if layered else args.layer
    names = [m.name for m in group]
    if states:
        first = states[names[0]]
        step, tokens_seen, t_prev = first["step"], first["tokens_seen"], first["elapsed"]
        seqs.skip(first["buffer"]["served"])
        state = resumed_buffer_state(states, names, layered)
        buffer = ts.ActivationBuffer(
            model, seqs, source, rows, args.batch_size, args.model_batch_size, device, 0, state
        )  # fmt: skip
    else:
        step, tokens_seen, t_prev = 0, 0, 0.0
        buffer = ts.ActivationBuffer(
            model, seqs, source, rows, args.batch_size, args.model_batch_size, device, args.seed
        )  # fmt: skip
    if buffer.buf.shape[0] < args.batch_size * 2:
        raise SystemExit("the dataset gave too few activations for one buffer (use more text or smaller batches)")
    trainers = []
    for m, (sae, master, opt) in zip(group, made, strict=True):
        folder = out_dir / m.name
        folder.mkdir(exist_ok=True)
        log_path = folder / "log.jsonl"
        if m.name in states:
            ts.restore_trainer(states[m.name], sae, master, opt, graphed)
            factor = states[m.name]["factor"]
            kept = [r for r in log_path.read_text().splitlines() if json.loads(r)["step"] <= step] if (
                log_path.exists()) else []  # fmt: skip
            log_path.write_text("".join(r + "\n" for r in kept))
        else:
            head = rows_of(buffer.buf[: min(rows, 8 * args.batch_size)], m.column)
            factor = ts.activation_factor(m.args, head, D)
            log_path.write_text("")
        trainers.append(Trainer(m, sae, master, opt, factor, folder))
    meta = {"args": {**vars(args), "resume": None}, "members": names}
    (out_dir / MULTI_FILE).write_text(json.dumps(meta, indent=1))

    ts.check_warmup(total_steps, args)
    metadata = {t.member.name: ts.run_metadata(t.member.args, model, causal) for t in trainers}
    logs = {t.member.name: (t.folder / "log.jsonl").open("a") for t in trainers}
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=args.no_progress, unit="step")
    t0 = time.perf_counter()
    last = min(total_steps, args.max_steps) if args.max_steps else total_steps
    run = None
    saved_at = {"step": None, "time": time.monotonic()}
    final = {}

    def checkpoint():
        elapsed = t_prev + time.perf_counter() - t0
        for t in trainers:
            progress = dict(step=step, factor=t.factor, buffer=MemberBuffer(buffer, t.member.column),
                            tokens_seen=tokens_seen, elapsed=elapsed)  # fmt: skip
            ts.save_checkpoint(t.folder / "checkpoint", t.sae, t.master, t.opt, t.member.args, progress,
                               metadata[t.member.name])  # fmt: skip
        saved_at.update(step=step, time=time.monotonic())

    stop, previous = [], {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        while step < last and not stop:
            for t in trainers:
                ts.set_lr(t.opt, ts.lr_at(step, total_steps, t.member.args))
            batch = buffer.next()  # the one harvest (a model forward per --model-batch-size sequences, on refill)
            if run is None:  # captured on the first batch (its warm-up steps are undone)
                run = iteration(ts, fs, trainers, dtype, batch if graphed else None)
            outs = run(batch)
            step += 1
            tokens_seen += batch.shape[0]
            bar.update(1)
            if step % args.log_every == 0 or step == last:
                elapsed = t_prev + time.perf_counter() - t0
                for t, out in zip(trainers, outs, strict=True):
                    row = {
                        "kind": "train", "step": step, "tokens": tokens_seen, "loss": out.loss.item(),
                        "fvu": out.fvu.item(), "l0": out.l0.item(), "dead_fraction": t.sae.dead_fraction().item(),
                        "lr": float(t.opt.param_groups[0]["lr"]), "tokens_per_s": tokens_seen / elapsed,
                    }  # fmt: skip
                    logs[t.member.name].write(json.dumps(row) + "\n")
                    logs[t.member.name].flush()
                bar.set_postfix(tok_s=f"{tokens_seen / elapsed:,.0f}", sae=len(trainers))
            if step % args.eval_every == 0 or step == last:
                for t in trainers:
                    t.sae.eval()
                    ev = ts.evaluate(t.sae, model, causal, blocks, held, t.member.args.layer, t.factor, device, dtype)
                    logs[t.member.name].write(json.dumps({"kind": "eval", "step": step, "tokens": tokens_seen,
                                                          **ev}) + "\n")  # fmt: skip
                    logs[t.member.name].flush()
                    final[t.member.name] = ev
                    bar.write(f"step {step} {t.member.name}: " + ", ".join(f"{k} {ts.fmt(v)}" for k, v in ev.items()))
                checkpoint()
                for t in trainers:
                    ts.plot(t.folder / "log.jsonl", t.folder / "curves.png", ts.plot_title(t.member.args, t.sae))
            elif args.checkpoint_minutes and time.monotonic() - saved_at["time"] >= 60 * args.checkpoint_minutes:
                checkpoint()
        if stop and saved_at["step"] != step and step > 0:
            checkpoint()
            for t in trainers:
                if (t.folder / "log.jsonl").stat().st_size:
                    ts.plot(t.folder / "log.jsonl", t.folder / "curves.png", ts.plot_title(t.member.args, t.sae))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
        for f in logs.values():
            f.close()
    if stop:
        name = signal.Signals(stop[0]).name
        where = f"checkpoints at step {step} in {out_dir}/*/; continue with --resume {out_dir}"
        print(f"stopped by {name}: {where if step else 'no step ran'}", flush=True)
        raise SystemExit(128 + stop[0])
    write_summary(out_dir, final, step, tokens_seen, t_prev + time.perf_counter() - t0)
    return out_dir


def write_summary(out_dir, final, step, tokens, elapsed):
    """The final per-SAE summary: printed as a table and written to ``summary.json``."""
    summary = {"step": step, "tokens": tokens, "seconds": elapsed,
               "saes": {name: {k: ev[k] for k in ("fvu", "l0", "dead_fraction") if k in ev}
                        for name, ev in final.items()}}  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    width = max([len(n) for n in final] + [3])
    print(f"{'SAE':<{width}}  {'FVU':>8}  {'L0':>8}  {'dead':>6}   (held out, step {step}, {tokens:,} tokens per SAE)")
    for name, ev in final.items():
        print(f"{name:<{width}}  {ev['fvu']:>8.4f}  {ev['l0']:>8.2f}  {ev['dead_fraction']:>6.3f}")
