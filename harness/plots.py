"""The learning curves of a run as a PNG (`<output_dir>/metrics.png`), drawn from metrics.jsonl."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on rented machines
import matplotlib.pyplot as plt  # noqa: E402

from harness.tracking import read_metrics  # noqa: E402

SKIPPED = ("train/lr", "train/samples_per_s", "train/skipped_batches")


def plot_metrics(run_dir: str | Path) -> Path:
    """One panel per metric name (train and val curves of the same name share a panel), x = step."""
    run_dir = Path(run_dir)
    series = defaultdict(lambda: ([], []))
    for row in read_metrics(run_dir):
        for key, value in row.items():
            if "/" in key and key not in SKIPPED and isinstance(value, (int, float)):
                series[key][0].append(row["step"])
                series[key][1].append(value)
    panels = defaultdict(list)
    for key in series:
        panels[key.split("/", 1)[1]].append(key)
    names = sorted(panels, key=lambda n: (n != "loss", n))
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for key in sorted(panels[name]):
            steps, values = series[key]
            ax.plot(steps, values, marker="o" if not key.startswith("train/") else None, markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if name == "loss" and all(v > 0 for key in panels[name] for v in series[key][1]):
            ax.set_yscale("log")
    fig.suptitle(run_dir.name)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.16, top=0.82, wspace=0.25)  # tight_layout costs 0.2 s
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
