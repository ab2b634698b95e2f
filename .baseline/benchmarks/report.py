#!/usr/bin/env python3
"""Turns side_by_side.py's JSON into the markdown table and PNG plot the README shows.

Usage: python benchmarks/report.py benchmarks/results/side_by_side_h100.json
Writes <stem>.md and <stem>.png beside the JSON. Needs matplotlib.
"""

import json
import sys
from pathlib import Path

IMPL_ORDER = [
    "flash-sae",
    "torch eager",
    "torch.compile",
    "torch dense [B,F]@W",
    "torch eager (dense)",
    "torch.compile (dense)",
    "SAELens",
    "sparsify (installed)",
    "SAELens TopK (installed)",
]


def shape_key(r):
    return f"{r['B']},{r['D']},{r['F']},{r['K']}"


def markdown(data) -> str:
    meta, rows = data["meta"], data["rows"]
    lines = [
        f"Measured on {meta['gpu']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}; "
        f"device copy bandwidth {meta['copy_bandwidth_tbps']:.2f} TB/s. Forward + backward, gradients for every "
        "float input. `ms`: launched from Python each step; `graph`: the same step replayed from a CUDA graph "
        '(GPU time, no host launch overhead; "no graph": the step cannot be captured); '
        "`GiB`: peak memory above the inputs, gradients included; "
        "`floor`: % of the floor reached in graph time, the floor in ms, eager over graph time, and (steps) graph "
        "time over the bare encoder GEMM's measured in the same run (flash-sae rows).",
        "",
    ]
    for op in dict.fromkeys(r["op"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows if r["op"] == op):
            sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
            impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in sel)]
            lines.append(f"**`{op}`, {dtype}** (B, D, F, K)")
            lines.append("")
            head = "| shape | " + " | ".join(f"{i} ms / graph / GiB" for i in impls) + " | flash-sae floor |"
            lines += [head, "|" + "---|" * (len(impls) + 2)]
            for shape in dict.fromkeys(shape_key(r) for r in sel):
                cells = []
                floor = ""
                for impl in impls:
                    r = next((r for r in sel if shape_key(r) == shape and r["impl"] == impl), None)
                    if r is None:  # not run at this shape (torch.compile skips the scale rows)
                        cells.append("not run")
                        continue
                    graph = (
                        "no graph" if r["graph_ms"] != r["graph_ms"] else f"{r['graph_ms']:.3f}"
                    )  # NaN: capture failed
                    cell = f"{r['ms']:.3f} / {graph} / {r['peak_gib']:.2f}"
                    cells.append(cell if not r.get("error") else r["error"][:40])
                    if impl == "flash-sae":
                        floor = f"{r['pct_floor']:.0f}% of {r['floor_ms']:.3f} ms"
                        floor += f"; eager/graph {r['ms'] / r['graph_ms']:.2f}"
                        if "gemm_ms" in r:
                            floor += f"; {r['x_gemm']:.2f}x the GEMM ({r['gemm_ms']:.3f} ms)"
                lines.append(f"| ({shape}) | " + " | ".join(cells) + f" | {floor} |")
            lines.append("")
    return "\n".join(lines)


def plot(data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["dtype"] == "bf16"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    n_shapes = max(len({shape_key(r) for r in rows if r["op"] == op}) for op in ops)
    fig, axes = plt.subplots(1, len(ops), figsize=(max(6, 1.1 * n_shapes) * len(ops), 4.8), squeeze=False)
    for ax, op in zip(axes[0], ops):
        sel = [r for r in rows if r["op"] == op]
        shapes = list(dict.fromkeys(shape_key(r) for r in sel))
        impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in sel)]
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            cells = [next((r for r in sel if shape_key(r) == s and r["impl"] == impl), None) for s in shapes]
            # CUDA-graph time; eager time (hatched) where the step cannot be captured (a host sync in it)
            ys = [float("nan") if c is None else c["graph_ms"] for c in cells]
            eager = [c is not None and ys[i] != ys[i] and c["ms"] == c["ms"] for i, c in enumerate(cells)]
            ys = [c["ms"] if e else y for c, e, y in zip(cells, eager, ys)]
            xs = [i + j * width for i in range(len(shapes))]
            bars = ax.bar(xs, ys, width, label=impl)
            for bar, e in zip(bars, eager):
                if e:
                    bar.set_hatch("//")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        ax.set_xticklabels([s.replace(",", "\n", 1) for s in shapes], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("forward + backward, ms (CUDA graph; hatched: eager, not capturable)", fontsize=8)
        ax.set_title(f"{op} (bf16)")
        ax.legend(fontsize=7)
    meta = data["meta"]
    fig.suptitle(f"flash-sae vs PyTorch and the installed rivals, {meta['gpu']}, {meta['date']}  (x: B,D / F,K)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    src.with_suffix(".md").write_text(markdown(data) + "\n")
    plot(data, src.with_suffix(".png"))
    print(f"wrote {src.with_suffix('.md')} and {src.with_suffix('.png')}")


if __name__ == "__main__":
    main()
