#!/usr/bin/env python3
"""Every results page and plot, from the committed result rows.

Reads ``benchmarks/results/<gpu>/<benchmark>.jsonl`` (rows of ``results_schema``) and writes

- ``docs/results/<benchmark>_<gpu>.md`` (tables) and ``.png`` (plots, matplotlib) for each file,
- ``docs/results/index.md``, listing them,
- the README's headline table, between ``<!-- results:headline -->`` and ``<!-- /results:headline -->``
  (README.md is left untouched when it lacks the markers).

Usage:
    python benchmarks/report.py            # regenerate everything
    python benchmarks/report.py --check    # exit 1 if a generated file (or the README block) differs

PNGs are compared byte for byte when the committed one was written by the same matplotlib version
(recorded in the PNG); otherwise only their presence is checked, and the script says so.
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from results_schema import RESULTS_DIR, read_rows  # noqa: E402

DOCS = ROOT / "docs" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:headline -->", "<!-- /results:headline -->"
HEADLINE = ("h100", "side_by_side_step")

# How each benchmark's rows are produced (shown on its page and in benchmarks/results/README.md).
COMMANDS = {
    "side_by_side_step": "python benchmarks/side_by_side.py --ops topk_sae_step --stem side_by_side_step",
    "side_by_side_family": "python benchmarks/side_by_side.py --ops batchtopk_sae_step,jumprelu_sae_step,"
    "matryoshka_batchtopk_sae_step,matryoshka_topk_sae_step --stem side_by_side_family",
    "side_by_side_losses": "python benchmarks/side_by_side.py --ops topk_sae_loss,hierarchical_topk_sae_loss "
    "--stem side_by_side_losses",
    "dead_latents": "python benchmarks/dead_latents.py",
    "decoder_geometry": "python benchmarks/decoder_geometry.py",
    "standard_sae_step": "python benchmarks/standard_sae_step.py --arch standard",
    "gated_sae_step": "python benchmarks/standard_sae_step.py --arch gated",
    "trainers_side_by_side": "python benchmarks/trainers_side_by_side.py prepare; "
    "python benchmarks/trainers_side_by_side.py run --out benchmarks/results",
    "sharded_scaling": "torchrun --nproc-per-node W benchmarks/sharded_topk_sae_step.py --features ... "
    "[--data-world R]",
    "fp8_prune_bound": "python benchmarks/fp8_prune_bound.py --out benchmarks/results",
    "tune": "python benchmarks/tune.py [--only select,segment,...]",
    "hierarchical_buffer_precision": "python benchmarks/hierarchical_buffer_precision.py --out benchmarks/results",
    "train_sae_example": "python examples/train_sae.py --model minilm --layer 3 --dataset pydoc --tokens 300_000 "
    "--batch-size 1024 (its log.jsonl, converted to these rows)",
    "transcoders": "python benchmarks/transcoders.py",
    "latent_analysis": "python benchmarks/latent_analysis.py [--sae-dashboard <folder>]",
    "training_iteration": "python benchmarks/training_iteration.py --out benchmarks/results",
}

TITLES = {
    "side_by_side_step": "The full TopK SAE training step",
    "side_by_side_family": "BatchTopK, JumpReLU and Matryoshka steps",
    "side_by_side_losses": "The decoder losses",
    "dead_latents": "Dead-latent losses (AuxK, ghost grads)",
    "decoder_geometry": "Decoder geometry",
    "standard_sae_step": "The standard (ReLU + L1) SAE step",
    "gated_sae_step": "The Gated SAE step",
    "trainers_side_by_side": "Training loops: SAELens, sparsify and flash-sae",
    "sharded_scaling": "The latent-sharded step on several GPUs",
    "fp8_prune_bound": "FP8 pruning of the TopK selection: the bound",
    "tune": "Launch-policy sweeps",
    "hierarchical_buffer_precision": "Precision of the hierarchical loss's bf16 buffer",
    "train_sae_example": "The training example (examples/train_sae.py)",
    "transcoders": "Transcoders, skip transcoders, CLTs and crosscoders",
    "latent_analysis": "Latent analysis over a corpus (LatentAnalysis, the dense formulation, sae-dashboard)",
    "training_iteration": "The whole training iteration: step, Adam, decoder-norm steps, master copies",
}
ORDER = list(TITLES)

IMPL_ORDER = [
    "flash-sae",
    "torch eager",
    "torch.compile",
    "torch dense [B,F]@W",
    "torch eager (dense)",
    "torch.compile (dense)",
    "sparsify (installed)",
    "SAELens",
    "SAELens TopK (installed)",
]

GPU_NAMES = {"cpu": "CPU"}


# ----------------------------------------------------------------------------------------- formatting


def num(v, digits=3):
    """3 significant digits, no exponent for ms-sized values; '' for None."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 10 ** (digits - 1):
        return f"{v:,.0f}"
    if a < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:#.{digits}g}"


def pow2(n):
    return f"2^{n.bit_length() - 1}" if n >= 2**19 and n & (n - 1) == 0 else str(n)


def shape_text(shape, keys=None):
    keys = keys or list(shape)
    return "(" + ", ".join(pow2(shape[k]) for k in keys if k in shape) + ")"


def shape_head(shape, keys=None):
    keys = keys or list(shape)
    return "(" + ", ".join(k for k in keys if k in shape) + ")"


def err_text(row):
    e = row.get("error") or ""
    return "out of memory" if "out of memory" in e.lower() or e.startswith("OOM") else "error"


def table(head, rows, align=None):
    align = align or ["---"] * len(head)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def env_line(rows):
    """The GPU, dates, versions and commits the rows record (every distinct value)."""

    def vals(k):
        got = list(dict.fromkeys(r[k] for r in rows if r.get(k)))
        return ", ".join(got) if got else "not recorded"

    return (
        f"Measured on {vals('gpu')}, {vals('date')}; torch {vals('torch')}, triton {vals('triton')}, "
        f"commit {vals('commit')}."
    )


def impl_key(name):
    return (IMPL_ORDER.index(name) if name in IMPL_ORDER else len(IMPL_ORDER), name)


# --------------------------------------------------------------------------------------- side_by_side


def groups(rows):
    """(op, dtype) -> rows, in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault(((r.get("params") or {}).get("op", r["benchmark"]), r["dtype"]), []).append(r)
    return out


def step_cell(r):
    if r is None:
        return "not run"
    if r.get("error"):
        return err_text(r)
    g, e = r["graph_ms"], r["eager_ms"]
    return f"{num(g) if g is not None else 'no graph'} / {num(e)} ({num(r['peak_gib'])} GiB)"


def side_by_side_md(rows):
    out = [
        "Forward + backward, gradients for every float input. Each cell: CUDA-graph ms (GPU time) / "
        "ms launched eagerly from Python each step (median), and in brackets the peak memory above the "
        'inputs, gradients included. "no graph": the step cannot be captured; "not run": not measured '
        "at that shape. % of floor: the floor over flash-sae's graph time. The floor of a step is the longer of "
        "its encoder GEMM at the tensor-core peak and its unavoidable bytes at the measured copy bandwidth; "
        "the floor of a loss is its unavoidable bytes at that bandwidth (`PEAK_FLOPS`, `step_floor_ms` and "
        "`floor_bytes` in benchmarks/side_by_side.py).",
        "",
    ]
    bws = list(dict.fromkeys(r["copy_bandwidth_tbps"] for r in rows if r.get("copy_bandwidth_tbps")))
    if bws:
        out[0] += " Measured copy bandwidth: " + ", ".join(f"{b:.2f} TB/s" for b in bws) + "."
    for (op, dtype), sel in groups(rows).items():
        impls = sorted(dict.fromkeys(r["implementation"] for r in sel), key=impl_key)
        shapes = list(dict.fromkeys(tuple(r["shape"].items()) for r in sel))
        out += [f"### `{op}`, {dtype}", ""]
        body = []
        for shp in shapes:
            cells = {r["implementation"]: r for r in sel if tuple(r["shape"].items()) == shp}
            mine = cells.get("flash-sae")
            floor = ""
            if mine and mine.get("pct_of_floor") is not None:
                floor = f"{mine['pct_of_floor']:.0f} % of {num(mine['floor_ms'])}"
            body.append([shape_text(dict(shp))] + [step_cell(cells.get(i)) for i in impls] + [floor])
        out += table([shape_head(dict(shapes[0]))] + impls + ["flash-sae: % of floor (ms)"], body)
        out.append("")
    return out


def side_by_side_plot(rows, plt):
    gs = groups(rows)
    fig, axes = plt.subplots(len(gs), 1, figsize=(10, 3.2 * len(gs)), squeeze=False)
    for ax, ((op, dtype), sel) in zip(axes[:, 0], gs.items()):
        impls = sorted(dict.fromkeys(r["implementation"] for r in sel), key=impl_key)
        shapes = list(dict.fromkeys(tuple(r["shape"].items()) for r in sel))
        width = 0.8 / len(impls)
        lo, hi = float("inf"), 0.0
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, shp in enumerate(shapes):
                r = next((r for r in sel if r["implementation"] == impl and tuple(r["shape"].items()) == shp), None)
                t = None if r is None else (r["graph_ms"] if r["graph_ms"] is not None else r["eager_ms"])
                if t is not None:
                    xs.append(j + i * width)
                    ys.append(t)
                    lo, hi = min(lo, t), max(hi, t)
            ax.bar(xs, ys, width, label=impl)
        ax.set_yscale("log")
        ax.set_ylim(lo / 2, hi * 3)
        ax.set_xlim(-0.5, max(len(shapes), 4) - 0.3)
        labels = [shape_text(dict(s)) for s in shapes]
        labels = [", ".join(t.split(", ")[:2]) + ",\n" + ", ".join(t.split(", ")[2:]) for t in labels]
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], labels)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("ms (graph, else eager)")
        ax.set_title(f"{op}, {dtype}", fontsize=10)
        ax.legend(fontsize=7, ncol=3)
    return fig


# --------------------------------------------------------------------------------------------- trainers


def trainers_md(rows):
    out = [
        "The same harvested activations and batches for every trainer; tokens/s between the starts of step 10 "
        "and of the last step; peak memory above the resident activations; FVU, L0 and dead fraction on the "
        "held-out rows at the end. `setting` is what the script records for the trainer (dtype, learning "
        "rate, CUDA graph or eager). The ratios are tokens/s over the named trainer's at the same F.",
        "",
    ]
    body = []
    for r in rows:
        same = {x["implementation"]: x for x in rows if x["shape"]["F"] == r["shape"]["F"] and not x.get("error")}

        def ratio(other):
            o = same.get(other)
            if r.get("error") or not o or not o.get("tokens_per_s"):
                return ""
            return f"{r['tokens_per_s'] / o['tokens_per_s']:.2f}×"

        if r.get("error"):
            body.append([r["implementation"], pow2(r["shape"]["F"]), "", r["steps"], err_text(r)] + [""] * 7)
            continue
        body.append(
            [
                r["implementation"],
                pow2(r["shape"]["F"]),
                (r.get("params") or {}).get("setting", r["dtype"] or ""),
                r["steps"],
                f"{r['tokens_per_s']:,.0f}",
                num(r["ms_per_step"]),
                num(r["peak_gib"]),
                num(r.get("fvu")),
                num(r.get("l0")),
                num(r.get("dead_fraction")),
                ratio("SAELens"),
                ratio("sparsify"),
            ]
        )
    s = rows[0]["shape"]
    out.append(f"D = {s.get('D')}, batch {s.get('B')} rows, k = {s.get('K')}.")
    out.append("")
    head = ["trainer", "F", "setting", "steps", "tokens/s", "ms/step", "peak GiB", "FVU", "L0", "dead",
            "vs SAELens", "vs sparsify"]  # fmt: skip
    out += table(
        head, body, ["---", "---:", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]
    )
    out.append("")
    return out


def trainers_plot(rows, plt):
    rows = [r for r in rows if r.get("fvu") is not None and "lr=" not in r["implementation"]]
    features = sorted({r["shape"]["F"] for r in rows})
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        got = {r["shape"]["F"]: r for r in rows if r["implementation"] == name}
        xs = [j + i * width for j, F in enumerate(features) if F in got]
        axes[0].bar(xs, [got[F]["tokens_per_s"] / 1e3 for F in features if F in got], width, label=name)
        axes[1].bar(xs, [got[F]["fvu"] for F in features if F in got], width, label=name)
    for ax, title in zip(axes, ("tokens/s (thousands)", "held-out FVU at the end (lower is better)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(features))], [f"F = {F:,}" for F in features])
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------- sharded


def sharded_latest(rows):
    """The last row of each layout and F (the file appends every call)."""
    got = {}
    for r in rows:
        s = r["shape"]
        got[(s["data_world"], s["latent_world"], s["F"])] = r
    return [got[k] for k in sorted(got)]


def sharded_md(rows):
    rows = sharded_latest(rows)
    base = next((r for r in rows if r["shape"]["world"] == 1), None)
    s = rows[0]["shape"]
    out = [
        f"B = {s['B']}, D = {s['D']}, k = {s['K']}, {rows[0]['dtype']}, forward + backward; the slowest rank's "
        "median; collectives timed alone at the step's sizes; peak memory through a whole step with fused "
        "Adam, beside the target (parameters + gradients + Adam state) / shards + 2 GiB. Where a layout and F "
        'were measured more than once, the last row counts. "n/a": no CUDA-graph time (the capture did '
        "not fit).",
        "",
    ]
    if base and base.get("single_gpu_topk_sae_step_ms") is not None:
        out += [f"One GPU's plain `topk_sae_step` at F = {pow2(base['shape']['F'])}: "
                f"{num(base['single_gpu_topk_sae_step_ms'])} ms.", ""]  # fmt: skip
    body = []
    for r in rows:
        t = r["shape"]
        ratio = f"{r['eager_ms'] / base['eager_ms']:.2f}×" if base else ""
        body.append(
            [
                f"{t['data_world']} × {t['latent_world']}",
                pow2(t["F"]),
                f"{num(r['eager_ms'])} / {num(r['graph_ms']) if r['graph_ms'] is not None else 'n/a'}",
                num(r["adam_ms"]),
                num(r["collectives_ms"]),
                f"{num(r['peak_gib'])} ({num(r['memory_target_gib'])})",
                ratio,
            ]
        )
    head = ["replicas × shards", "F", "step ms (eager / graph)", "+ Adam ms", "collectives ms",
            "peak GiB per GPU (target)", "eager time vs one GPU"]  # fmt: skip
    out += table(head, body)
    out.append("")
    return out


def sharded_plot(rows, plt):
    rows = sharded_latest(rows)
    base = next((r for r in rows if r["shape"]["world"] == 1), None)
    if base is None:
        return None
    fig, ax = plt.subplots(1, 1, figsize=(6, 4))
    one = [r for r in rows if r["shape"]["data_world"] == 1]
    for F in sorted({r["shape"]["F"] for r in one}):
        pts = sorted((r["shape"]["latent_world"], r["eager_ms"]) for r in one if r["shape"]["F"] == F)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"F = {pow2(F)}")
    ax.set(xlabel="GPUs (latent shards)", ylabel="eager ms per step")
    ax.set_xticks(sorted({r["shape"]["latent_world"] for r in one}))
    ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------ standard


def standard_md(rows):
    out = [
        "Forward + backward at drawn L0s (density = L0 / F). Each cell: CUDA-graph ms / eager ms (peak GiB "
        "above the inputs).",
        "",
    ]
    impls = list(dict.fromkeys(r["implementation"] for r in rows))
    for shp in dict.fromkeys(tuple(r["shape"].items()) for r in rows):
        sel = [r for r in rows if tuple(r["shape"].items()) == shp]
        out += [f"### {shape_head(dict(shp))} = {shape_text(dict(shp))}, bf16", ""]
        body = []
        for l0 in dict.fromkeys(r["l0"] for r in sel):
            cells = {r["implementation"]: r for r in sel if r["l0"] == l0}
            body.append([num(l0)] + [step_cell(cells.get(i)) for i in impls])
        out += table(["L0"] + impls, body)
        out.append("")
    return out


def standard_plot(rows, plt):
    shapes = list(dict.fromkeys(tuple(r["shape"].items()) for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 3.8), squeeze=False)
    for ax, shp in zip(axes[0], shapes):
        sel = [r for r in rows if tuple(r["shape"].items()) == shp]
        for impl in dict.fromkeys(r["implementation"] for r in sel):
            pts = [(r["l0"], r["graph_ms"] if r["graph_ms"] is not None else r["eager_ms"])
                   for r in sel if r["implementation"] == impl and (r["graph_ms"] or r["eager_ms"])]  # fmt: skip
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl, markersize=3)
        ax.set(xscale="log", yscale="log", xlabel="L0", ylabel="ms (graph, else eager)", title=shape_text(dict(shp)))
        ax.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------------------ transcoders

TRANSCODER_GROUPS = {
    "transcoder": "Transcoder step (D_in = D_out) beside the TopK SAE step",
    "skip_transcoder": "Skip transcoder beside the transcoder plus one dense [D, D] GEMM",
    "clt": "Cross-layer transcoder (CLT)",
    "crosscoder": "Crosscoder",
}


def transcoders_md(rows):
    """One table per row group and shape; the CLT's largest-F probes as a list."""
    out = [
        "One training step, forward + backward, every encoder GEMM included, gradients for every parameter. "
        "Each flash-sae module was verified against the dense formulation (fp32, a small shape) before timing "
        "(`verified`). Columns: CUDA-graph ms (GPU time; none where the step cannot be captured) / eager ms "
        "(median, launched from Python), peak GiB above the inputs (gradients included), GiB kept from the "
        "forward for the backward beside one dense [B, L·F] code, % of the row's floor (benchmarks/transcoders.py "
        "`floor_*`: the GEMM FLOPs at the tensor-core peak or the unavoidable bytes at the measured copy "
        "bandwidth, the longer), and the time over the row's baseline (graph / eager; `vs` names it).",
        "",
    ]
    bws = list(dict.fromkeys(r["copy_bandwidth_tbps"] for r in rows if r.get("copy_bandwidth_tbps")))
    if bws:
        out[0] += " Measured copy bandwidth: " + ", ".join(f"{b:.2f} TB/s" for b in bws) + "."
    timed = [r for r in rows if (r.get("params") or {}).get("op") in TRANSCODER_GROUPS]
    for op, title in TRANSCODER_GROUPS.items():
        sel = [r for r in timed if r["params"]["op"] == op]
        for shp in dict.fromkeys(tuple(r["shape"].items()) for r in sel):
            cells = [r for r in sel if tuple(r["shape"].items()) == shp]
            out += [f"### {title}: {shape_head(dict(shp))} = {shape_text(dict(shp))}, {cells[0]['dtype']}", ""]
            body = []
            for r in cells:
                ratio = ""
                if r.get("x_baseline_graph") is not None or r.get("x_baseline_eager") is not None:
                    ratio = f"{num(r.get('x_baseline_graph'))}× / {num(r.get('x_baseline_eager'))}×"
                kept = num(r.get("saved_gib"))
                if kept and r.get("dense_code_gib") is not None:
                    kept += f" (a [B, L·F] code: {num(r['dense_code_gib'])})"
                floor = f"{r['pct_of_floor']:.0f} % of {num(r['floor_ms'])}" if r.get("pct_of_floor") else ""
                body.append([r["implementation"], step_cell(r), kept, floor, ratio,
                             (r.get("params") or {}).get("baseline", ""), num(r.get("verified"))])  # fmt: skip
            out += table(["implementation", "graph / eager ms (peak GiB)", "kept GiB", "% of floor (ms)",
                          "× baseline", "vs", "verified"], body)  # fmt: skip
            out.append("")
    probes = [r for r in rows if (r.get("params") or {}).get("op") == "clt_fit"]
    if probes:
        out += ["### The largest F per layer the CLT fits", ""]
        for r in probes:
            res = f"fits (one step {num(r['eager_ms'])} ms, peak {num(r['peak_gib'])} GiB)"
            out.append(f"- {r['implementation']}, F = {pow2(r['shape']['F'])}: " + (r["error"] or res))
        out.append("")
    return out


def transcoders_plot(rows, plt):
    timed = [r for r in rows if (r.get("params") or {}).get("op") in TRANSCODER_GROUPS]
    return side_by_side_plot(timed, plt) if timed else None


# ------------------------------------------------------------------------------------------- generic

CORE = ("eager_ms", "graph_ms", "peak_gib")
DIM_ORDER = ("B", "D", "F", "K")
LABELS = {
    "eager_ms": "eager ms", "graph_ms": "graph ms", "peak_gib": "peak GiB", "eager_p20_ms": "eager p20 ms",
    "eager_p80_ms": "eager p80 ms", "floor_ms": "floor ms", "pct_of_floor": "% of floor", "gemm_ms": "GEMM ms",
    "x_gemm": "× GEMM", "x_baseline_eager": "× baseline (eager)", "x_baseline_graph": "× baseline (graph)",
    "tokens_per_s": "tokens/s", "ms_per_step": "ms/step", "dead_fraction": "dead fraction",
    "quantize_w_ms": "quantize W ms", "max_error_over_bound": "max |error| / bound",
    "bound_over_spread": "bound / spread", "rows_settled_at_4k": "rows settled at 4k",
    "error_bf16_buffer": "error, bf16 buffer", "error_fp32_buffer": "error, fp32 buffer",
    "error_ratio": "ratio", "error_torch_bf16": "error, torch bf16", "explained_variance": "explained variance",
    "duplicate_latents": "duplicate latents",
}  # fmt: skip
SKIP = set(("benchmark", "implementation", "shape", "dtype", "gpu", "torch", "triton", "commit", "date", "params",
            "note", "error", "copy_bandwidth_tbps"))  # fmt: skip


def generic_md(rows):
    """One table per kind of row (rows that record the same fields), every recorded field a column."""
    out = []
    cmds = list(
        dict.fromkeys((r.get("params") or {}).get("command") for r in rows if (r.get("params") or {}).get("command"))
    )
    out += [f"Run: `{c}`" for c in cmds] + ([""] if cmds else [])
    kinds = {}
    for r in rows:
        sig = tuple(k for k in r if r[k] is not None and k not in ("params", "error", "note")) + tuple(
            k for k, v in (r.get("params") or {}).items() if v is not None
        )
        kinds.setdefault(sig, []).append(r)
    for sel in kinds.values():
        out += generic_table(sel)
    return out


def generic_table(rows):
    metrics = [k for k in CORE if any(r.get(k) is not None for r in rows)]
    metrics += [k for k in dict.fromkeys(k for r in rows for k in r) if k not in SKIP and k not in CORE
                and any(r.get(k) is not None for r in rows)]  # fmt: skip
    params = list(dict.fromkeys(k for r in rows for k in (r.get("params") or {}) if k != "command"))
    dims = list(dict.fromkeys(k for r in rows for k in r["shape"]))
    dims = [d for d in DIM_ORDER if d in dims] + [d for d in dims if d not in DIM_ORDER]
    has_dtype = any(r["dtype"] for r in rows)
    has_error = any(r.get("error") for r in rows)
    head = ["implementation", "(" + ", ".join(dims) + ")"] + (["dtype"] if has_dtype else [])
    head += [LABELS.get(k, k.replace("_", " ")) for k in params + metrics]
    head += ["error"] if has_error else []
    body = []
    for r in rows:
        p = r.get("params") or {}
        line = [
            r["implementation"],
            "(" + ", ".join(pow2(r["shape"][d]) if d in r["shape"] else "" for d in dims) + ")",
        ]
        line += [r["dtype"] or ""] if has_dtype else []
        line += [num(p.get(k)) if not isinstance(p.get(k), str) else p[k] for k in params]
        line += [num(r.get(k)) for k in metrics]
        line += [err_text(r) if r.get("error") else ""] if has_error else []
        body.append(line)
    out = table(head, body)
    out.append("")
    return out


RENDER = {
    "side_by_side_step": (side_by_side_md, side_by_side_plot),
    "side_by_side_family": (side_by_side_md, side_by_side_plot),
    "side_by_side_losses": (side_by_side_md, side_by_side_plot),
    "trainers_side_by_side": (trainers_md, trainers_plot),
    "sharded_scaling": (sharded_md, sharded_plot),
    "standard_sae_step": (standard_md, standard_plot),
    "gated_sae_step": (standard_md, standard_plot),
    "transcoders": (transcoders_md, transcoders_plot),
    "transcoders_smoke": (transcoders_md, transcoders_plot),
}


# ------------------------------------------------------------------------------------------ pages


def gpu_title(slug, rows):
    return GPU_NAMES.get(slug, rows[0]["gpu"])


def page(slug, bench, rows, png_name):
    md_fn, _ = RENDER.get(bench, (generic_md, None))
    title = TITLES.get(bench, bench)
    lines = [f"# {title}: {gpu_title(slug, rows)}", "", env_line(rows), ""]
    if bench in COMMANDS:
        lines += [f"Produced by `{COMMANDS[bench]}`; rows in `benchmarks/results/{slug}/{bench}.jsonl`, "
                  "this page by `python benchmarks/report.py`.", ""]  # fmt: skip
    if png_name:
        lines += [f"![{title}, {gpu_title(slug, rows)}]({png_name})", ""]
    lines += md_fn(rows)
    return "\n".join(lines).rstrip("\n") + "\n"


def png_bytes(fig, plt) -> bytes:
    import matplotlib

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": f"matplotlib {matplotlib.__version__}"})
    plt.close(fig)
    return buf.getvalue()


def png_software(data: bytes):
    """The PNG's tEXt 'Software' value (the matplotlib version that wrote it), or None."""
    pos = 8
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"tEXt":
            key, _, val = data[pos + 8 : pos + 8 + n].partition(b"\0")
            if key == b"Software":
                return val.decode("latin-1")
        if kind == b"IEND":
            break
        pos += 12 + n
    return None


def discover(results=RESULTS_DIR):
    """(slug, benchmark) -> rows, in a stable order."""
    found = {}
    for path in sorted(Path(results).glob("*/*.jsonl")):
        found[(path.parent.name, path.stem)] = read_rows(path)
    return dict(
        sorted(found.items(), key=lambda kv: (ORDER.index(kv[0][1]) if kv[0][1] in ORDER else len(ORDER), kv[0]))
    )


def headline(rows) -> str:
    """The README's table: the TopK step, flash-sae against dense torch, torch.compile and the rivals."""
    cols = [
        ("flash-sae", "flash-sae graph / eager"),
        ("torch eager (dense)", "dense torch (eager)"),
        ("torch.compile (dense)", "torch.compile (dense)"),
        ("sparsify (installed)", "sparsify (eager)"),
        ("SAELens TopK (installed)", "SAELens (eager)"),
    ]
    body = []
    for shp in dict.fromkeys((tuple(r["shape"].items()), r["dtype"]) for r in rows):
        cells = {r["implementation"]: r for r in rows if (tuple(r["shape"].items()), r["dtype"]) == shp}
        line = [f"{shape_text(dict(shp[0]))} {shp[1]}"]
        for impl, _ in cols:
            r = cells.get(impl)
            if r is None:
                line.append("not run")
            elif r.get("error"):
                line.append(err_text(r))
            elif impl == "flash-sae":
                line.append(f"**{num(r['graph_ms'])}** / {num(r['eager_ms'])}")
            else:
                line.append(num(r["eager_ms"]))
        body.append(line)
    gpus = ", ".join(dict.fromkeys(r["gpu"] for r in rows))
    dates = ", ".join(dict.fromkeys(r["date"] for r in rows if r["date"]))
    torch_v = ", ".join(dict.fromkeys(r["torch"] for r in rows if r["torch"])) or "not recorded"
    lines = [
        f"TopK SAE training step (encoder GEMM, top-k, decode, MSE; forward + backward), ms, on an {gpus}, "
        f"{dates} (torch {torch_v}). flash-sae: CUDA graph / launched eagerly; the others eager (sparsify and "
        "SAELens are the installed packages, run in the same process). Full table with peak memory: "
        "[docs/results/side_by_side_step_h100.md](docs/results/side_by_side_step_h100.md).",
        "",
    ]
    lines += table(["(B, D, F, K) dtype"] + [c for _, c in cols], body)
    return "\n".join(lines)


def generate(results=RESULTS_DIR):
    """path -> bytes of every generated file; plus the README text (or None when it lacks the markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    index = [
        "# Benchmark results",
        "",
        "Every table and plot here is generated by `python benchmarks/report.py` from the result rows committed "
        "under `benchmarks/results/<gpu>/<benchmark>.jsonl` (one JSON object per measured cell; the fields are "
        "listed in `benchmarks/results_schema.py`). The GPU, date, versions and commit of each run are on its page.",
        "",
        "| benchmark | GPU | date | page |",
        "|---|---|---|---|",
    ]
    found = discover(results)
    for (slug, bench), rows in found.items():
        stem = f"{bench}_{slug}"
        _, plot_fn = RENDER.get(bench, (None, None))
        png = None
        if plot_fn is not None:
            fig = plot_fn(rows, plt)
            if fig is not None:
                fig.suptitle(f"{TITLES.get(bench, bench)}: {gpu_title(slug, rows)}", fontsize=10)
                fig.tight_layout()
                png = f"{stem}.png"
                files[DOCS / png] = png_bytes(fig, plt)
        files[DOCS / f"{stem}.md"] = page(slug, bench, rows, png).encode()
        dates = ", ".join(dict.fromkeys(r["date"] for r in rows if r["date"])) or "not recorded"
        index.append(f"| {TITLES.get(bench, bench)} | {gpu_title(slug, rows)} | {dates} | [{stem}]({stem}.md) |")
    files[DOCS / "index.md"] = ("\n".join(index) + "\n").encode()
    readme = None
    text = README.read_text() if README.exists() else ""
    if BEGIN in text and END in text and HEADLINE in found:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme = head + BEGIN + "\n" + headline(found[HEADLINE]) + "\n" + END + tail
    return files, readme


def rel(path):
    try:
        return path.relative_to(ROOT)
    except ValueError:
        return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = ap.parse_args(argv)
    files, readme = generate()
    stale = sorted(p for p in DOCS.glob("*") if p.is_file() and p not in files) if DOCS.exists() else []
    if readme is None:
        print(f"README.md has no {BEGIN} ... {END} block (or no {HEADLINE[1]} rows for {HEADLINE[0]}): left untouched")
    if args.check:
        import matplotlib

        bad = []
        for path, data in files.items():
            if not path.exists():
                bad.append(f"missing: {rel(path)}")
                continue
            old = path.read_bytes()
            if old == data:
                continue
            if path.suffix == ".png" and png_software(old) != f"matplotlib {matplotlib.__version__}":
                print(f"{rel(path)}: written by {png_software(old)}, not compared byte for byte")
                continue
            bad.append(f"differs: {rel(path)}")
        bad += [f"not generated (stale): {rel(p)}" for p in stale]
        if readme is not None and readme != README.read_text():
            bad.append("differs: README.md's results:headline block")
        for b in bad:
            print(b)
        print("report --check: " + ("out of date; run python benchmarks/report.py" if bad else "up to date"))
        return 1 if bad else 0
    DOCS.mkdir(parents=True, exist_ok=True)
    for p in stale:
        p.unlink()
        print(f"removed {rel(p)}")
    for path, data in files.items():
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
            print(f"wrote {rel(path)}")
    if readme is not None and readme != README.read_text():
        README.write_text(readme)
        print("wrote README.md's results:headline block")
    return 0


if __name__ == "__main__":
    sys.exit(main())
