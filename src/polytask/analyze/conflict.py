"""Gradient conflict between tasks on the shared parameters.

For task gradients ``g_i = ∇_θs L_i`` on the shared parameters ``θs`` the monitor records, every
``every`` steps,

- the pairwise cosine ``cos(g_i, g_j)``: negative means a step on task i undoes progress on task j
  (the "conflicting gradients" of Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS
  2020), overall and per layer group;
- the conflict rate: the share of samples with ``cos(g_i, g_j) < 0``;
- the gradient magnitude similarity ``2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²)`` of the same paper (1 for
  equal norms, near 0 when one gradient dominates) and the mean norm of each task's gradient (the
  ratio matrix ``‖g_i‖ / ‖g_j‖`` follows).

Everything is computed from the Gramian ``J Jᵀ`` of the per-task Jacobian, per layer group, and
accumulated on the model's device; the host sees the numbers only in :meth:`result`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polytask.analyze._grads import (
    batch_parts,
    group_names,
    grouped_gramians,
    measuring,
    per_task_gradients,
    shared_named_parameters,
    task_losses,
)
from polytask.analyze.io import analysis_path, from_jsonable, read_json, write_json
from polytask.errors import ConfigError
from polytask.tasks import Task

_TINY = 1e-20


@dataclass
class ConflictResult:
    """Gradient-conflict statistics, averaged over the sampled steps.

    ``cosine``, ``conflict_rate``, ``magnitude_similarity``: ``(T, T)`` over all shared
    parameters; ``group_*``: ``(G, T, T)`` per layer group (names in ``groups``); ``norm``: ``(T,)``
    mean gradient norm per task (``group_norm``: ``(G, T)``). A pair never measured with both
    gradients non-zero is NaN. ``history``: ``(S, T, T)`` overall cosine of each sample, at
    ``steps``.
    """

    tasks: list[str]
    groups: list[str]
    cosine: Tensor
    conflict_rate: Tensor
    magnitude_similarity: Tensor
    norm: Tensor
    group_cosine: Tensor
    group_conflict_rate: Tensor
    group_norm: Tensor
    samples: int
    steps: list[int] = field(default_factory=list)
    history: Tensor | None = None

    @property
    def norm_ratio(self) -> Tensor:
        """``(T, T)``: mean gradient norm of task i over that of task j."""
        return self.norm[:, None] / self.norm[None, :]

    def mean_conflict_rate(self) -> float:
        """Conflict rate averaged over the off-diagonal pairs."""
        t = len(self.tasks)
        off = ~torch.eye(t, dtype=torch.bool)
        vals = self.conflict_rate[off]
        vals = vals[~vals.isnan()]
        return float(vals.mean()) if vals.numel() else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "conflict", "tasks": self.tasks, "groups": self.groups, "samples": self.samples,
            "steps": self.steps,
            "matrices": {"cosine": self.cosine, "conflict_rate": self.conflict_rate,
                         "magnitude_similarity": self.magnitude_similarity, "norm_ratio": self.norm_ratio},
            "norm": self.norm,
            "per_group": {g: {"cosine": self.group_cosine[k], "conflict_rate": self.group_conflict_rate[k],
                              "norm": self.group_norm[k]} for k, g in enumerate(self.groups)},
            "history": self.history if self.history is not None else [],
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ConflictResult:
        m, per = payload["matrices"], payload["per_group"]
        groups = list(payload["groups"])
        t = len(payload["tasks"])
        def stack(key: str, shape: tuple[int, ...]) -> Tensor:
            return torch.stack([from_jsonable(per[g][key]) for g in groups]) if groups else torch.empty(shape)
        hist = payload.get("history") or []
        return cls(list(payload["tasks"]), groups, from_jsonable(m["cosine"]), from_jsonable(m["conflict_rate"]),
                   from_jsonable(m["magnitude_similarity"]), from_jsonable(payload["norm"]),
                   stack("cosine", (0, t, t)), stack("conflict_rate", (0, t, t)), stack("norm", (0, t)),
                   int(payload["samples"]), list(payload.get("steps", [])),
                   from_jsonable(hist) if hist else None)

    def save(self, run_dir: Path, plot: bool = True) -> Path:
        """Write ``analysis/conflict.json`` (and ``plots/conflict.png``) into ``run_dir``."""
        path = write_json(analysis_path(run_dir, "conflict"), self.to_json())
        if plot:
            from polytask.report.heatmap import save_heatmap

            save_heatmap(self.cosine, self.tasks, Path(run_dir) / "plots" / "conflict.png",
                         title=f"gradient cosine (mean of {self.samples} samples)")
        return path

    @classmethod
    def load(cls, run_dir: Path) -> ConflictResult:
        return cls.from_json(read_json(analysis_path(run_dir, "conflict"), "conflict"))


class GradientConflictMonitor:
    """Samples gradient conflict every ``every`` steps; a Trainer callback or used by hand.

    As a callback it measures, after the optimizer step of every ``every``-th step, the gradients
    of the step's batch (``trainer.last_batch``) at the updated parameters, and writes
    ``analysis/conflict.json`` and ``plots/conflict.png`` at the end of ``fit``. By hand, call
    :meth:`measure` with a model, its tasks and a batch, then :meth:`result`.

    Cost per sample: one forward and one batched backward of the T losses, in eval mode (the
    training trajectory is unchanged: no dropout draws, no BatchNorm updates, ``.grad`` untouched).
    Nothing is copied to the host until :meth:`result`.

    Args:
        every: sample every N optimizer steps.
        groups: layer groups for the per-group statistics: ``module`` (top-level child),
            ``layer`` (owning module) or ``tensor``.
        history: keep each sample's overall cosine matrix (``T²`` floats per sample, on device).
        write: write the JSON and heatmap into the run directory at the end of ``fit``.
    """

    def __init__(self, every: int = 10, groups: str = "layer", history: bool = True, write: bool = True) -> None:
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"conflict monitor: every must be a positive integer, got {every!r}")
        group_names([], groups)  # validates the name
        self.every, self.groups_by, self.keep_history, self.write = every, groups, history, write
        self._reset()

    def _reset(self) -> None:
        self._tasks: list[str] | None = None
        self._params: list[nn.Parameter] | None = None
        self._group_list: list[str] = []
        self._group_of: Tensor | None = None
        self._sums: dict[str, Tensor] = {}
        self._history: list[Tensor] = []
        self._steps: list[int] = []
        self.samples = 0

    def _setup(self, model: nn.Module, tasks: Sequence[Task]) -> None:
        named = shared_named_parameters(model)
        self._tasks = [t.name for t in tasks]
        self._params = [p for _, p in named]
        self._group_list, idx = group_names([n for n, _ in named], self.groups_by)
        device = self._params[0].device
        self._group_of = torch.tensor(idx, dtype=torch.long, device=device)
        t, g = len(tasks), len(self._group_list) + 1  # slot 0: all shared parameters
        z = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        self._sums = {"cos": z(g, t, t), "conflict": z(g, t, t), "gms": z(g, t, t), "pairs": z(g, t, t),
                      "norm": z(g, t), "norm_count": z(g, t)}

    def measure(self, model: nn.Module, tasks: Sequence[Task], batch: Any, step: int | None = None) -> None:
        """Add one sample: the gradients of ``tasks``' losses on ``batch`` (no host sync)."""
        if self._tasks is None:
            self._setup(model, tasks)
        elif [t.name for t in tasks] != self._tasks:
            raise ConfigError("conflict monitor: the tasks changed between samples; use a new monitor")
        inputs, targets, mask = batch_parts(batch)
        with measuring(model), torch.enable_grad():
            losses = task_losses(model(inputs), tasks, targets, mask)
            jac = per_task_gradients(losses, self._params)
        gram = grouped_gramians(jac, self._group_of, len(self._group_list))
        self._accumulate(torch.cat([gram.sum(0, keepdim=True), gram]))
        self.samples += 1
        self._steps.append(self.samples if step is None else step)

    def _accumulate(self, gram: Tensor) -> None:
        s = self._sums
        sq = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0)
        norm = sq.sqrt()
        outer = norm[..., :, None] * norm[..., None, :]
        valid = outer > _TINY
        cos = torch.where(valid, gram / outer.clamp_min(_TINY), torch.zeros_like(gram))
        gms = torch.where(valid, 2 * outer / (sq[..., :, None] + sq[..., None, :]).clamp_min(_TINY),
                          torch.zeros_like(gram))
        s["cos"] += cos
        s["conflict"] += (cos < 0).float()
        s["gms"] += gms
        s["pairs"] += valid.float()
        s["norm"] += norm
        s["norm_count"] += (norm > 0).float()
        if self.keep_history:
            self._history.append(torch.where(valid[0], cos[0], torch.full_like(cos[0], float("nan"))))

    # ------------------------------------------------------------------ callback hooks
    def on_step(self, trainer: Any, step: int) -> None:
        if step % self.every == 0 and trainer.last_batch is not None:
            self.measure(trainer.model, trainer.tasks, trainer.last_batch, step)

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        if self.write and self.samples:
            self.result().save(trainer.run_dir)

    # ------------------------------------------------------------------ read out
    def result(self) -> ConflictResult:
        """The statistics so far (this is where the host synchronises)."""
        if not self.samples or self._tasks is None:
            raise ConfigError("conflict monitor: no sample was taken (fewer steps than 'every'?)")
        s = {k: v.detach().double().cpu() for k, v in self._sums.items()}
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        pairs = s["pairs"]
        mean = lambda x: torch.where(pairs > 0, x / pairs.clamp_min(1), nan)  # noqa: E731
        cos, conflict, gms = mean(s["cos"]), mean(s["conflict"]), mean(s["gms"])
        norm = torch.where(s["norm_count"] > 0, s["norm"] / s["norm_count"].clamp_min(1), nan)
        history = torch.stack(self._history).double().cpu() if self._history else None
        return ConflictResult(list(self._tasks), list(self._group_list), cos[0], conflict[0], gms[0], norm[0],
                              cos[1:], conflict[1:], norm[1:], self.samples, list(self._steps), history)


def gradient_conflict(model: nn.Module, tasks: Sequence[Task], batches: Iterable[Any],
                      groups: str = "layer") -> ConflictResult:
    """Gradient-conflict statistics of ``model`` over ``batches`` (one sample per batch), at the
    current parameters. See :class:`GradientConflictMonitor`."""
    monitor = GradientConflictMonitor(every=1, groups=groups, write=False)
    for batch in batches:
        monitor.measure(model, tasks, batch)
    return monitor.result()
