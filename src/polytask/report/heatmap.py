"""Heatmaps of task × task matrices (conflict, affinity, transfer) with task names on the axes."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from polytask.report.plots import _pyplot


def heatmap_figure(matrix: Tensor, rows: Sequence[str], cols: Sequence[str] | None = None, title: str = "",
                   xlabel: str = "", ylabel: str = "", diverging: bool = True, fmt: str = "{:.2f}",
                   scale_off_diagonal: bool = True):
    """A matplotlib figure of ``matrix`` with every cell annotated (NaN cells left blank).

    ``diverging`` centres the colour scale on 0 (red: negative, blue: positive).
    ``scale_off_diagonal``: for a square matrix, fit the colour scale to the off-diagonal cells,
    so a dominant diagonal (self-affinity, cosine 1) does not wash out the pairs (it saturates).
    """
    plt = _pyplot()
    cols = list(rows) if cols is None else list(cols)
    m = matrix.detach().cpu().double()
    square = m.ndim == 2 and m.shape[0] == m.shape[1] and m.shape[0] > 1
    off = m[~torch.eye(m.shape[0], dtype=torch.bool)] if square and scale_off_diagonal else m.reshape(-1)
    finite = off[~off.isnan()]
    size = max(len(rows), len(cols))
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * size, 1.0 + 0.65 * size))
    if diverging:
        bound = float(finite.abs().max()) if finite.numel() else 1.0
        bound = bound if bound > 0 else 1.0
        im = ax.imshow(m.numpy(), cmap="RdBu", vmin=-bound, vmax=bound)
    else:
        lo = float(finite.min()) if finite.numel() else 0.0
        hi = float(finite.max()) if finite.numel() else 1.0
        im = ax.imshow(m.numpy(), cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = float(m[i, j])
            if not math.isnan(v):
                r, g, b, _ = im.cmap(im.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def save_heatmap(matrix: Tensor, tasks: Sequence[str], path: Path, **kwargs) -> Path:
    """Draw :func:`heatmap_figure` and save it as a PNG."""
    from polytask.report.plots import save_figure

    return save_figure(heatmap_figure(matrix, tasks, **kwargs), path)


def figure_png(fig) -> bytes:
    """PNG bytes of a figure (then closed)."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
