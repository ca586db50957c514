"""Accuracy, per-class precision and recall, confusion matrices, and the run's plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchgraft.io.write import atomic_write

__all__ = ["confusion_matrix", "classification_report", "plot_curves", "plot_confusion"]


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    index = targets.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """The `graft evaluate --json` object: accuracy, per-class precision/recall/support, the matrix."""
    c = confusion.double()
    tp = c.diag()
    support = c.sum(1)
    predicted = c.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    total = int(c.sum())
    return {
        "accuracy": float(tp.sum() / max(total, 1)),
        "num_samples": total,
        "per_class": {name: {"precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
                             "support": int(support[i])} for i, name in enumerate(classes)},
        "confusion": confusion.tolist(),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], marker="o", label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], marker="o", label="train")
    ax_acc.plot(epochs, [r["val_acc"] for r in rows], marker="o", label="val")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:  # a killed run never leaves half a PNG
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: Path) -> None:
    plt = _pyplot()
    n = len(classes)
    size = min(3 + 0.45 * n, 14)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        peak = int(confusion.max()) or 1
        for i in range(n):
            for j in range(n):
                value = int(confusion[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                            color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    with atomic_write(path) as f:  # a killed run never leaves half a PNG
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
