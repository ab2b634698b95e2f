#!/usr/bin/env python3
"""Table and plot of ``sharded_topk_sae_step.py``'s JSON lines (the last row of each layout and F wins).

Usage: python benchmarks/plot_sharded.py benchmarks/results/sharded_scaling_h100.jsonl
Writes <stem>.md (the README's table) and <stem>.png beside the input.
"""

import json
import sys
from pathlib import Path


def main(path):
    path = Path(path)
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows[(r["data_world"], r["latent_world"], r["F"])] = r
    rows = sorted(rows.values(), key=lambda r: (r["data_world"], r["latent_world"], r["F"]))
    base = next(r for r in rows if r["world"] == 1)
    lines = [
        f"{base['gpu']}, {base['date']}, torch {base['torch']}; B={base['B']}, D={base['D']}, k={base['k']}, bf16, "
        "forward + backward (Adam: + fused Adam step). Baseline: one GPU's `topk_sae_step` "
        f"{base['single_gpu_topk_sae_step_ms']:.2f} ms at F={base['F']}.",
        "",
        "| replicas x shards | F | step ms (eager / graph) | + Adam ms | collectives ms | peak GiB per GPU (target) |"
        " vs one GPU's topk_sae_step at F=2^21 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        graph = "n/a" if r["graph_ms"] != r["graph_ms"] else f"{r['graph_ms']:.2f}"
        ratio = r["step_ms"] / base["single_gpu_topk_sae_step_ms"]
        lines.append(
            f"| {r['data_world']} x {r['latent_world']} | 2^{r['F'].bit_length() - 1} | {r['step_ms']:.2f} / {graph} | "
            f"{r['adam_ms']:.1f} | {r['collectives_ms']:.2f} | {r['peak_gib']:.1f} ({r['memory_target_gib']:.1f}) | "
            f"{ratio:.2f}x time |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    strong = [r for r in rows if r["F"] == base["F"] and r["data_world"] == 1]
    gpus = [r["latent_world"] for r in strong]
    a.plot(gpus, [r["step_ms"] for r in strong], "o-", label="flash-sae sharded step")
    a.plot(gpus, [base["step_ms"] / g for g in gpus], "k--", label="ideal (1 GPU / W)")
    title = f"strong scaling, F = 2^{base['F'].bit_length() - 1}"
    a.set(xlabel="GPUs (latent shards)", ylabel="ms per step", title=title)
    weak = [r for r in rows if r["F"] // r["latent_world"] == base["F"] and r["data_world"] == 1]
    b.plot([r["latent_world"] for r in weak], [r["step_ms"] for r in weak], "o-", label="flash-sae sharded step")
    b.axhline(base["step_ms"] * 1.1, color="k", ls="--", label="1.1 x one GPU")
    for r in weak:
        b.annotate(f"F=2^{r['F'].bit_length() - 1}", (r["latent_world"], r["step_ms"]), textcoords="offset points",
                   xytext=(0, -14), ha="center", fontsize=8)  # fmt: skip
    b.set(xlabel="GPUs (latent shards)", ylabel="ms per step", title="weak scaling, 2^21 latents per GPU")
    b.set_ylim(0, base["step_ms"] * 1.3)
    for ax in (a, b):
        ax.set_xticks(gpus)
        ax.legend(fontsize=8)
    fig.suptitle(f"latent-sharded TopK step, {base['gpu']}, B={base['B']} D={base['D']} k={base['k']} bf16")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
