"""Inter-task affinity by lookahead (TAG).

Fifty, Amid, Zhao, Yu, Anil and Finn, "Efficiently Identifying Task Groupings for Multi-Task
Learning", NeurIPS 2021, §3.1: take a step of the shared parameters on task i's gradient alone,

    θs' = θs − η ∇_θs L_i(θs, θi; batch),

and measure how task j's loss on the *same* batch changes (its own task-specific parameters are
left as they are):

    Z_{i→j} = 1 − L_j(θs', θj; batch) / L_j(θs, θj; batch).

Positive: a step for i also lowers j's loss (i helps j); negative: it raises it. The matrix is
averaged over the sampled training steps. The T lookahead models are evaluated at once with
``torch.func.functional_call`` under ``vmap`` over the T updated copies of the shared parameters
(a loop over tasks only for models that vmap cannot batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from polytask.analyze._grads import batch_parts, measuring, per_task_gradients, shared_named_parameters, task_losses
from polytask.analyze.io import analysis_path, from_jsonable, read_json, write_json
from polytask.errors import ConfigError
from polytask.tasks import Task


@dataclass
class AffinityResult:
    """``affinity[i, j] = Z_{i→j}``, the mean lookahead affinity of task i onto task j.

    ``lr`` is the lookahead step size η; ``samples`` the number of steps averaged.
    """

    tasks: list[str]
    affinity: Tensor
    lr: float
    samples: int
    steps: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "affinity", "tasks": self.tasks, "lr": self.lr, "samples": self.samples,
                "steps": self.steps, "convention": "affinity[i][j] = Z_{i->j}: effect of a step on task i "
                "on task j's loss (Fifty et al. 2021)", "matrices": {"affinity": self.affinity}}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> AffinityResult:
        return cls(list(payload["tasks"]), from_jsonable(payload["matrices"]["affinity"]), float(payload["lr"]),
                   int(payload["samples"]), list(payload.get("steps", [])))

    def save(self, run_dir: Path, plot: bool = True) -> Path:
        """Write ``analysis/affinity.json`` (and ``plots/affinity.png``) into ``run_dir``."""
        path = write_json(analysis_path(run_dir, "affinity"), self.to_json())
        if plot:
            from polytask.report.heatmap import save_heatmap

            save_heatmap(self.affinity, self.tasks, Path(run_dir) / "plots" / "affinity.png",
                         title=f"inter-task affinity Z(i→j), lr={self.lr:g}", ylabel="step on task i",
                         xlabel="loss of task j", fmt="{:.2g}")
        return path

    @classmethod
    def load(cls, run_dir: Path) -> AffinityResult:
        return cls.from_json(read_json(analysis_path(run_dir, "affinity"), "affinity"))


def lookahead_affinity(model: nn.Module, tasks: Sequence[Task], batch: Any, lr: float,
                       chunk_size: int | None = None) -> Tensor:
    """The ``(T, T)`` lookahead affinity ``Z_{i→j}`` of one batch at the current parameters.

    Runs in eval mode (no dropout, frozen BatchNorm statistics) and leaves the model unchanged.
    Stays on the device: no host synchronisation. ``chunk_size`` bounds how many of the T
    lookahead copies of the shared parameters vmap holds at once (memory).
    """
    if not lr > 0:
        raise ConfigError(f"affinity: the lookahead learning rate must be positive, got {lr!r}")
    inputs, targets, mask = batch_parts(batch)
    named = shared_named_parameters(model)
    shared_names = [n for n, _ in named]
    with measuring(model):
        with torch.enable_grad():
            base = task_losses(model(inputs), tasks, targets, mask)
            jac = per_task_gradients(base, [p for _, p in named])
        base = base.detach()
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        state = {k: v.detach() for k, v in state.items() if k not in shared_names}
        stepped = {n: p.detach().unsqueeze(0) - lr * g for (n, p), g in zip(named, jac)}  # (T, *shape)

        def losses_after(shared: dict[str, Tensor]) -> Tensor:
            return task_losses(functional_call(model, {**state, **shared}, (inputs,)), tasks, targets, mask)

        with torch.no_grad():
            try:
                after = vmap(losses_after, chunk_size=chunk_size)(stepped)  # (T_step, T_loss)
            except RuntimeError:  # an operation vmap cannot batch: one lookahead per task
                after = torch.stack([losses_after({n: v[i] for n, v in stepped.items()})
                                     for i in range(len(tasks))])
    ratio = after / base.unsqueeze(0)
    return torch.where(base.unsqueeze(0) > 0, 1 - ratio, torch.zeros_like(ratio))


class AffinityMonitor:
    """Averages the lookahead affinity (TAG) over training; a Trainer callback or used by hand.

    As a callback it measures every ``every``-th step on the step's batch, after the optimizer
    step, with the lookahead step size ``lr`` (default: the optimizer's current learning rate of
    its first parameter group; the lookahead is the paper's plain gradient step
    ``θs − η ∇L_i`` even when training uses Adam), and writes ``analysis/affinity.json`` and
    ``plots/affinity.png`` at the end of ``fit``. By hand: :meth:`measure`, then :meth:`result`.

    Cost per sample: one forward, one batched backward and one vmapped forward of T models.
    """

    def __init__(self, every: int = 10, lr: float | None = None, chunk_size: int | None = None,
                 write: bool = True) -> None:
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"affinity monitor: every must be a positive integer, got {every!r}")
        if lr is not None and not lr > 0:
            raise ConfigError(f"affinity monitor: lr must be positive, got {lr!r}")
        self.every, self.lr, self.chunk_size, self.write = every, lr, chunk_size, write
        self._sum: Tensor | None = None
        self._tasks: list[str] | None = None
        self._steps: list[int] = []
        self._lr_used: float | None = lr
        self.samples = 0

    def measure(self, model: nn.Module, tasks: Sequence[Task], batch: Any, lr: float | None = None,
                step: int | None = None) -> None:
        """Add the affinity of one batch at the current parameters (no host sync)."""
        lr = lr if lr is not None else self.lr
        if lr is None:
            raise ConfigError("affinity monitor: give lr (no optimizer to take it from)")
        names = [t.name for t in tasks]
        if self._tasks is None:
            self._tasks = names
        elif names != self._tasks:
            raise ConfigError("affinity monitor: the tasks changed between samples; use a new monitor")
        z = lookahead_affinity(model, tasks, batch, lr, self.chunk_size)
        self._sum = z if self._sum is None else self._sum + z
        self._lr_used = lr
        self.samples += 1
        self._steps.append(self.samples if step is None else step)

    def on_step(self, trainer: Any, step: int) -> None:
        if step % self.every == 0 and trainer.last_batch is not None:
            lr = self.lr if self.lr is not None else float(trainer.optimizer.param_groups[0]["lr"])
            self.measure(trainer.model, trainer.tasks, trainer.last_batch, lr, step)

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        if self.write and self.samples:
            self.result().save(trainer.run_dir)

    def result(self) -> AffinityResult:
        """The mean affinity so far (host synchronisation happens here)."""
        if self._sum is None or self._tasks is None:
            raise ConfigError("affinity monitor: no sample was taken (fewer steps than 'every'?)")
        return AffinityResult(list(self._tasks), (self._sum / self.samples).detach().double().cpu(),
                              float(self._lr_used), self.samples, list(self._steps))


def task_affinity(model: nn.Module, tasks: Sequence[Task], batches: Iterable[Any], lr: float,
                  chunk_size: int | None = None) -> AffinityResult:
    """Mean lookahead affinity of ``model`` over ``batches`` at the current parameters."""
    monitor = AffinityMonitor(every=1, lr=lr, chunk_size=chunk_size, write=False)
    for batch in batches:
        monitor.measure(model, tasks, batch)
    return monitor.result()
