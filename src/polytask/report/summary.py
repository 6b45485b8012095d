"""The Markdown summary of a run directory (with its PNG plots)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from polytask.tasks import HIGHER_IS_BETTER, Task


def fmt(v: float) -> str:
    """A metric value for a table."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4g}"


def metrics_table(tasks: Sequence[Task], columns: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per (task, metric), one column per named set of metrics."""
    head = "| task | metric | " + " | ".join(columns) + " |"
    sep = "|" + "---|" * (2 + len(columns))
    rows = [head, sep]
    for t in tasks:
        # gauc: added by table data with a group column (polytask.train.tables), not a Task metric
        extra = [m for m in ("gauc",) if columns and all(m in c.get(t.name, {}) for c in columns.values())]
        for m in (*t.metrics, *extra):
            arrow = "↑" if HIGHER_IS_BETTER.get(m, True) else "↓"
            rows.append(f"| {t.name} | {m} {arrow} | " + " | ".join(fmt(c[t.name][m]) for c in columns.values()) + " |")
    return "\n".join(rows)


def write_summary(result: Any, tasks: Sequence[Task], config: Any) -> None:
    """Write ``summary.md`` and ``plots/*.png`` into the run directory."""
    from polytask.report.plots import plot_task_curves, plot_task_weights

    run_dir = result.run_dir
    plots = run_dir / "plots"
    plot_task_curves(result.history, tasks, plots / "curves.png")
    plot_task_weights(result.history, tasks, plots / "weights.png")
    lines = [
        f"# Run `{config.name}`",
        "",
        f"Data `{config.data.name}`, architecture `{config.model.arch}`, balancer `{config.balancer.name}`, "
        f"seed {config.seed}.",
        f"Best epoch (chosen on validation): **{result.best_epoch}** of {result.history[-1].epoch}"
        + (" (stopped early)" if result.stopped_early else "") + ".",
        "",
        metrics_table(tasks, {"val (best)": result.val, "test (best)": result.test}),
        "",
        "![per-task curves](plots/curves.png)",
        "",
        "![task weights](plots/weights.png)",
        "",
    ]
    from polytask.train.checkpoint import atomic_write_text

    atomic_write_text(run_dir / "summary.md", "\n".join(lines))
