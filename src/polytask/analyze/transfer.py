"""Measured transfer: train tasks alone, in pairs and in proposed groups, on the same budget.

- :func:`pairwise_transfer`, in the spirit of TaskWeb (Kim, Jang, Lee, Ye and Seo, "TaskWeb:
  Selecting Better Source Tasks for Multi-task NLP", EMNLP 2023): train every task alone and every
  pair jointly with the same config and budget; ``gain[i, j]`` is the relative improvement (in %)
  of task j's main test metric when trained together with task i, signed so that positive means
  i helps j (the negative of Δm% of Maninis et al. 2019 restricted to task j).
- :func:`rank_agreement`: Spearman rank correlation between a cheap estimate (lookahead affinity,
  gradient cosine) and the measured gains over the off-diagonal pairs, so users know how far the
  estimate can be trusted.
- :func:`check_grouping`: train each proposed group and report its measured Δm% against the
  single-task runs next to the predicted affinity score.

Every run is a normal run directory under ``out_dir`` (test metrics at the best validation epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.analyze.grouping import Grouping
from polytask.analyze.io import analysis_path, from_jsonable, read_json, write_json
from polytask.errors import ConfigError, DataError
from polytask.tasks import HIGHER_IS_BETTER, Task, delta_m

Metrics = dict[str, dict[str, float]]


def _train(config: Any, name: str, tasks: Sequence[str], out_dir: Path, epochs: int | None,
           progress: bool | None) -> Metrics:
    """Train ``config`` restricted to ``tasks`` into ``out_dir/name``; test metrics of the best epoch.

    A run that already finished there with the same config is reused (``done.json``), so the
    single-task runs are shared by :func:`pairwise_transfer` and :func:`check_grouping`, and an
    interrupted study resumes.
    """
    import json

    from polytask.train import Trainer
    from polytask.train.config import dump_config

    cfg = config.model_copy(deep=True)
    cfg.name = name
    cfg.out_dir = str(Path(out_dir) / "{name}")
    cfg.data.tasks = list(tasks)
    if epochs is not None:
        cfg.train.epochs = epochs
    done = cfg.run_dir / "done.json"
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("config") == dump_config(cfg):
            return record["test"]
    test = Trainer(cfg, progress=progress).fit(overwrite=True).test  # a run without done.json is stale
    write_json(done, {"config": dump_config(cfg), "test": test})
    return test


def run_name(tasks: Sequence[str]) -> str:
    """Directory name of the run of a task set (shared by transfer and grouping checks)."""
    kind = {1: "single", 2: "pair"}.get(len(tasks), "group")
    return f"{kind}-{'-'.join(tasks)}"


def relative_gain(task: Task, together: Metrics, alone: Metrics) -> float:
    """% improvement of ``task``'s main metric when trained together (positive: better)."""
    m = task.main_metric
    ours, base = float(together[task.name][m]), float(alone[task.name][m])
    if base == 0:
        raise DataError(f"transfer: single-task {m} of task {task.name!r} is 0; relative gain undefined")
    sign = 1.0 if HIGHER_IS_BETTER[m] else -1.0
    return 100.0 * sign * (ours - base) / abs(base)


@dataclass
class TransferResult:
    """``gain[i, j]``: % gain of task j's main metric when trained jointly with task i (NaN on the
    diagonal). ``single`` and ``pairs`` hold the test metrics of every run."""

    tasks: list[str]
    gain: Tensor
    single: Metrics
    pairs: dict[str, Metrics]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "transfer", "tasks": self.tasks, "convention": "gain[i][j] = % gain of task j's main "
                "test metric when trained jointly with task i", "matrices": {"gain": self.gain},
                "single": self.single, "pairs": self.pairs}

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> TransferResult:
        return cls(list(p["tasks"]), from_jsonable(p["matrices"]["gain"]), p["single"], p["pairs"])

    def save(self, run_dir: Path, plot: bool = True) -> Path:
        path = write_json(analysis_path(run_dir, "transfer"), self.to_json())
        if plot:
            from polytask.report.heatmap import save_heatmap

            save_heatmap(self.gain, self.tasks, Path(run_dir) / "plots" / "transfer.png",
                         title="measured pairwise gain (%)", ylabel="trained with task i", xlabel="gain of task j",
                         fmt="{:.1f}")
        return path


def pairwise_transfer(config: Any, out_dir: Path, tasks: Sequence[str] | None = None, epochs: int | None = None,
                      progress: bool | None = None) -> TransferResult:
    """Train each task alone and each pair jointly (same config and budget, ``epochs`` overriding
    the config's) into ``out_dir``; the measured gain matrix. Costs T + T(T−1)/2 runs."""
    from polytask import data as data_lib

    all_tasks = data_lib.load(config.data.name, **config.data.params).tasks
    by_name = {t.name: t for t in all_tasks}
    names = list(tasks) if tasks is not None else list(config.data.tasks or by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"transfer: unknown task(s) {', '.join(map(repr, unknown))}")
    if len(names) < 2:
        raise ConfigError("transfer: needs at least two tasks")
    single = {n: _train(config, run_name([n]), [n], out_dir, epochs, progress)[n] for n in names}
    t = len(names)
    gain = torch.full((t, t), float("nan"), dtype=torch.float64)
    pairs: dict[str, Metrics] = {}
    for i in range(t):
        for j in range(i + 1, t):
            a, b = names[i], names[j]
            both = _train(config, run_name([a, b]), [a, b], out_dir, epochs, progress)
            pairs[f"{a}+{b}"] = both
            gain[i, j] = relative_gain(by_name[b], both, single)
            gain[j, i] = relative_gain(by_name[a], both, single)
    return TransferResult(names, gain, single, pairs)


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of two 1-D samples (average ranks for ties)."""
    x, y = torch.as_tensor(x, dtype=torch.float64).reshape(-1), torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    if x.numel() != y.numel() or x.numel() < 2:
        raise DataError("spearman: needs two samples of the same size, at least 2")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return float(rx @ ry / denom) if denom > 0 else float("nan")


def _ranks(v: Tensor) -> Tensor:
    _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]  # 1-based average rank of each tie group


def rank_agreement(estimate: Tensor, measured: Tensor) -> float:
    """Spearman correlation between an estimate matrix and measured gains over the off-diagonal
    entries where both are finite."""
    e, m = torch.as_tensor(estimate, dtype=torch.float64), torch.as_tensor(measured, dtype=torch.float64)
    if e.shape != m.shape:
        raise DataError(f"rank_agreement: shapes differ, {tuple(e.shape)} vs {tuple(m.shape)}")
    keep = ~torch.eye(e.shape[0], dtype=torch.bool) & ~e.isnan() & ~m.isnan()
    return spearman(e[keep], m[keep])


@dataclass
class GroupCheck:
    """Measured Δm% of each proposed group (vs single-task runs) next to its predicted score."""

    groups: list[list[str]]
    predicted: list[float]
    measured_delta_m: list[float]
    overall_delta_m: float
    single: Metrics
    grouped: dict[str, Metrics]

    def table(self) -> str:
        rows = ["| group | predicted affinity score | measured Δm% (↓) |", "|---|---|---|"]
        for g, p, d in zip(self.groups, self.predicted, self.measured_delta_m):
            rows.append(f"| {', '.join(g)} | {p:.4g} | {d:+.2f} |")
        rows.append(f"| all tasks, each served by its group | | {self.overall_delta_m:+.2f} |")
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "grouping_check", "groups": self.groups, "predicted": self.predicted,
                "measured_delta_m": self.measured_delta_m, "overall_delta_m": self.overall_delta_m,
                "single": self.single, "grouped": self.grouped}

    def save(self, run_dir: Path) -> Path:
        return write_json(analysis_path(run_dir, "grouping_check"), self.to_json())


def check_grouping(config: Any, grouping: Grouping, out_dir: Path, epochs: int | None = None,
                   progress: bool | None = None) -> GroupCheck:
    """Train every group of ``grouping`` and every task alone (same config and budget); Δm% of
    each group against the single-task runs, and of the whole grouping (each task's metrics from
    the group that serves it). Groups of one task reuse the single-task run (Δm% = 0)."""
    from polytask import data as data_lib

    by_name = {t.name: t for t in data_lib.load(config.data.name, **config.data.params).tasks}
    single = {n: _train(config, run_name([n]), [n], out_dir, epochs, progress)[n] for n in grouping.tasks}
    grouped: dict[str, Metrics] = {}
    deltas = []
    for g in grouping.groups:
        key = "+".join(g)
        grouped[key] = ({g[0]: single[g[0]]} if len(g) == 1
                        else _train(config, run_name(g), g, out_dir, epochs, progress))
        deltas.append(delta_m(grouped[key], single, [by_name[n] for n in g]))
    served = {n: grouped["+".join(grouping.groups[grouping.serving[n]])][n] for n in grouping.tasks}
    overall = delta_m(served, single, [by_name[n] for n in grouping.tasks])
    return GroupCheck([list(g) for g in grouping.groups], list(grouping.group_totals), deltas, overall, single, grouped)
