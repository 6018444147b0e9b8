"""Pictures shared by the analysis toolkit (cnn/analyze.py) and classification scoring (cnn/predict.py)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on rented machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) counts: row = true class, column = predicted class."""
    return torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def save_heatmap(path: Path, values: np.ndarray, rows: list[str], columns: list[str], title: str, xlabel: str,
                 ylabel: str, colorbar: str, annotations: np.ndarray | None = None, cmap: str = "viridis") -> Path:
    """A (rows x columns) heat map, each cell annotated (with `annotations`, default the value) when it fits."""
    height, width = values.shape
    fig, ax = plt.subplots(figsize=(min(max(5.0, 2.5 + 0.55 * width), 16), min(2.2 + 0.4 * height, 16)))
    image = ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, label=colorbar)
    if height * width <= 400:
        annotations = annotations if annotations is not None else np.vectorize(lambda v: f"{v:.2f}")(values)
        colours = plt.get_cmap(cmap)(np.nan_to_num(values))
        for (i, j), text in np.ndenumerate(annotations):
            dark = colours[i, j, :3] @ np.array([0.299, 0.587, 0.114]) < 0.5  # text that stays readable on its cell
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(width), columns if width <= 40 else [""] * width, rotation=90 if width > 8 else 0, fontsize=7)
    ax.set_yticks(range(height), rows if height <= 60 else [""] * height, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_confusion(path: Path, matrix: np.ndarray, names: list[str], title: str) -> Path:
    """A confusion matrix (rows = true class, columns = predicted) as a heat map of each row's fractions
    (the recall on the diagonal), annotated with the counts up to 20 classes."""
    recall = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    return save_heatmap(path, recall, names, names, title, "predicted", "true", "fraction of the true class",
                        annotations=matrix.astype(str) if len(names) <= 20 else None, cmap="Blues")
