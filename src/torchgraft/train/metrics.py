"""Accuracy, per-class precision and recall, confusion matrices, and the run's plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchgraft.io.write import atomic_write

__all__ = ["confusion_matrix", "classification_report", "confusion_figure", "curves_figure", "plot_confusion",
           "plot_curves"]


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


def _figure(**kwargs):
    """A figure drawn by matplotlib's object API: no pyplot (a second's import, and a global registry of open
    figures to close), no display backend; `savefig` renders it with Agg."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def plot_curves(rows: list[dict[str, Any]], path: Path, best_epoch: int | None = None) -> None:
    """curves.png: `curves_figure`, written atomically."""
    _save(curves_figure(rows, best_epoch), path)


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: Path, title: str = "") -> None:
    """confusion.png: `confusion_figure`, written atomically."""
    _save(confusion_figure(confusion, classes, title), path)


def _save(fig, path: Path) -> None:
    with atomic_write(path) as f:  # a killed run never leaves half a PNG
        fig.savefig(f, dpi=110, format="png")


def curves_figure(rows: list[dict[str, Any]], best_epoch: int | None = None):
    """Loss and accuracy per epoch (numbered from 1; the linear probe is epoch 0), train and validation; each
    phase shaded and named, the kept (best) epoch marked."""
    epochs = [r["epoch"] for r in rows]
    fig = _figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 2)
    for ax, metric, label in zip(axes, ("loss", "acc"), ("loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in rows], marker="o", label="train")
        validated = [r for r in rows if r.get(f"val_{metric}") is not None]  # some epochs skip validation
        ax.plot([r["epoch"] for r in validated], [r[f"val_{metric}"] for r in validated], marker="o",
                label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per epoch")
        for start, end, phase, shade in _phases(rows):
            ax.axvspan(start - 0.5, end + 0.5, color="0.5", alpha=0.08 if shade else 0.0, lw=0)
            ax.text((start + end) / 2, 0.02, f"phase: {phase}", transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=7, color="0.35")
        if best_epoch in epochs:
            ax.axvline(best_epoch, color="green", ls="--", lw=1, label=f"kept (epoch {best_epoch})")
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _phases(rows: list[dict[str, Any]]) -> list[tuple[int, int, str, bool]]:
    """(first epoch, last epoch, phase name, shaded) for each run of epochs in one phase; every other one shaded."""
    spans: list[tuple[int, int, str, bool]] = []
    for r in rows:
        if spans and spans[-1][2] == r.get("phase", ""):
            spans[-1] = (spans[-1][0], r["epoch"], spans[-1][2], spans[-1][3])
        else:
            spans.append((r["epoch"], r["epoch"], r.get("phase", ""), len(spans) % 2 == 0))
    return spans


def confusion_figure(confusion: torch.Tensor, classes: Sequence[str], title: str = ""):
    """The confusion matrix (rows true, columns predicted) and, beside it, each class's accuracy (its recall)."""
    n = len(classes)
    size = min(3 + 0.45 * n, 14)
    fig = _figure(figsize=(size * 1.45, size))
    ax, ax_acc = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.2]})
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion (validation)")
    if n <= 30:
        peak = int(confusion.max()) or 1
        for i in range(n):
            for j in range(n):
                value = int(confusion[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                            color="white" if value > peak / 2 else "black")
    support = confusion.sum(1).clamp(min=1).double()
    accuracy = (confusion.diag().double() / support).tolist()
    ax_acc.barh(range(n), accuracy, color="tab:blue")
    ax_acc.set_yticks(range(n), classes)
    ax_acc.set_ylim(n - 0.5, -0.5)  # the matrix's row order
    ax_acc.set_xlim(0, 1)
    ax_acc.set_xlabel("accuracy (recall)")
    ax_acc.set_title("per class")
    ax_acc.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
