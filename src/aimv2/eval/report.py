"""A probe's report on disk: the JSON (result, grid table, confusion matrix) and a confusion-matrix PNG."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

MAX_LABELLED_CLASSES = 50  # above this, the PNG shows the matrix without class names


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike) -> None:
    """Row-normalized confusion matrix (true class down, predicted across) as a PNG, class names on the axes for
    up to 50 classes. Uses matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(classes)
    named = n <= MAX_LABELLED_CLASSES
    side = min(16.0, max(4.0, 0.3 * n + 2.5)) if named else 10.0
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if named:
        size = 10 if n <= 20 else 8 if n <= 35 else 7  # a row is >= 0.3 inch: 7 pt still fits
        ax.set_xticks(range(n), labels=list(classes), rotation=90, fontsize=size)
        ax.set_yticks(range(n), labels=list(classes), fontsize=size)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        colour = "white" if frac[i, j] > 0.5 else "black"
                        ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix ({n} classes)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(path: str | os.PathLike, report: dict, classes: Sequence[str]) -> Path:
    """Write ``report`` (must hold ``confusion``) as JSON at ``path`` and its confusion matrix as a PNG next to it
    (same name, ``.png``); returns the PNG's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    png = path.with_suffix(".png") if path.suffix != ".png" else path.with_name(path.name + ".png")
    plot_confusion(report["confusion"], classes, png)
    return png
