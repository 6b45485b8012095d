"""Matplotlib figures of a run (imported lazily; the Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polytask.tasks import Task


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 90) -> Path:
    """Save a figure as PNG through the atomic writer (umask kept, no partial file on a full
    disk) and close it."""
    import io

    from polytask.train.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        _pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buf.getvalue())


def plot_task_curves(history: Sequence[Any], tasks: Sequence[Task], path: Path) -> Path:
    """One panel per task: its main metric on val and test, and its train/val loss, per epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 5.2), squeeze=False)
    for j, task in enumerate(tasks):
        m = task.main_metric
        top, bottom = axes[0, j], axes[1, j]
        for split in ("val", "test"):
            pts = [(r.epoch, getattr(r, split)[task.name][m]) for r in history if task.name in getattr(r, split)]
            top.plot([e for e, _ in pts], [v for _, v in pts], marker=".", label=split)
        top.set_title(f"{task.name}: {m}")
        for split in ("train", "val"):
            pts = [(r.epoch, getattr(r, split)[task.name]["loss"]) for r in history if task.name in getattr(r, split)]
            bottom.plot([e for e, _ in pts], [v for _, v in pts], marker=".", label=split)
        bottom.set_title(f"{task.name}: loss")
        bottom.set_xlabel("epoch")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_task_weights(history: Sequence[Any], tasks: Sequence[Task], path: Path) -> Path:
    """Mean task weight used by the balancer in each epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for task in tasks:
        pts = [(r.epoch, r.train[task.name]["weight"]) for r in history if task.name in r.train]
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker=".", label=task.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean weight")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
