"""Tables and plots of small pretraining experiments (``aimv2 demo``, ``aimv2 ablate``): a run's loss curves, probe
top-1 of a pretrained encoder against its random init, and ablation points as mean +- std over seeds.

Plots use matplotlib's Agg backend (no display needed) and are imported only when drawn.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The logged steps of a run: one dict per line of its ``metrics.jsonl``."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(rows: list[dict], png: str | os.PathLike) -> None:
    """loss, image_loss and text_loss against step, side by side."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    for a, key in zip(ax, ("loss", "image_loss", "text_loss"), strict=True):
        a.plot(steps, [r[key] for r in rows])
        a.set_title(key)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_probe_comparison(probes: dict[str, dict], png: str | os.PathLike) -> None:
    """Grouped bars: per task ``{pretrained, random_init, chance}`` top-1, chance as a tick."""
    plt = _pyplot()
    tasks = list(probes)
    x = range(len(tasks))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.2))
    ax.bar([i - 0.2 for i in x], [probes[t]["pretrained"] for t in tasks], 0.4, label="pretrained")
    ax.bar([i + 0.2 for i in x], [probes[t]["random_init"] for t in tasks], 0.4, label="random init")
    ax.scatter(list(x), [probes[t]["chance"] for t in tasks], marker="_", s=600, color="k", label="chance", zorder=3)
    ax.set_xticks(list(x), tasks)
    ax.set_ylabel("attentive probe top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# --- ablations: points x seeds ---------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: dict[str, list[dict]], tasks: list[str]) -> dict[str, dict]:
    """{point: {task: {mean, std, values}, loss: {...}, seeds: [...]}} from per-seed results
    ``{"seed", "top1": {task: percent}, "loss"}``."""
    table = {}
    for name, runs in results.items():
        row = {"seeds": [r["seed"] for r in runs]}
        for key in [*tasks, "loss"]:
            values = [r["top1"][key] if key in tasks else r["loss"] for r in runs]
            mean, std = _mean_std(values)
            row[key] = {"mean": mean, "std": std, "values": values}
        table[name] = row
    return table


def to_markdown(table: dict[str, dict], tasks: list[str]) -> str:
    head = ["point", *[f"{t} top-1 (%)" for t in tasks], "final loss", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, row in table.items():
        cells = [name, *[f"{row[t]['mean']:.1f} ± {row[t]['std']:.1f}" for t in tasks]]
        cells += [f"{row['loss']['mean']:.4f} ± {row['loss']['std']:.4f}", str(len(row["seeds"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ablation(table: dict[str, dict], tasks: list[str], png: str | os.PathLike) -> None:
    """Grouped bars: per task, one bar per point (mean top-1), error bars = std over seeds."""
    plt = _pyplot()
    names = list(table)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(tasks) * max(1, len(names)) / 2, 3.4))
    for i, name in enumerate(names):
        xs = [t + (i - (len(names) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, [table[name][t]["mean"] for t in tasks], width, yerr=[table[name][t]["std"] for t in tasks])
        ax.containers[-1].set_label(name)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("attentive probe top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
