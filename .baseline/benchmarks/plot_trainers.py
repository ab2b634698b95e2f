"""The README's plot of benchmarks/trainers_side_by_side.py: tokens/s and held-out FVU per trainer.

python benchmarks/plot_trainers.py benchmarks/results/trainers_side_by_side_h100.jsonl
"""

import json
import sys
from pathlib import Path


def main(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    rows = [r for r in rows if "fvu" in r and "lr=" not in r["trainer"]]
    features = sorted({r["F"] for r in rows})
    trainers = list(dict.fromkeys(r["trainer"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(trainers)
    for i, name in enumerate(trainers):
        got = {r["F"]: r for r in rows if r["trainer"] == name}
        xs = [j + i * width for j, F in enumerate(features) if F in got]
        axes[0].bar(xs, [got[F]["tokens_per_s"] / 1e3 for F in features if F in got], width, label=name)
        axes[1].bar(xs, [got[F]["fvu"] for F in features if F in got], width, label=name)
    for ax, title in zip(axes, ("SAE training tokens/s (thousands)", "held-out FVU at the end (lower is better)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(features))], [f"F = {F:,}" for F in features])
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    device, date = rows[0]["device"], rows[0]["date"]
    fig.suptitle(f"Same MiniLM-L6 activations, 3.3M tokens, k = 32 ({device}, {date})", fontsize=10)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
