"""Shared-bottom (hard parameter sharing) model.

Caruana, "Multitask Learning", Machine Learning 28 (1997): one trunk shared by all tasks and a
small tower per task. A single-task baseline is the same model built with one task.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from polytask.errors import ConfigError
from polytask.nn.base import MultiTaskModel, TaskHeads
from polytask.nn.layers import mlp
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


@ARCHITECTURES.register("shared_bottom", "hps", "single_task")
class SharedBottom(MultiTaskModel):
    """Shared MLP trunk ``bottom`` followed by one MLP tower per task.

    Args:
        input_dim: width of the dense input.
        tasks: the tasks; one head each.
        bottom: hidden widths of the shared trunk; its last width is ``shared_features``' width
            (``task_features``: its per-head copies ``(T, B, H)``, after
            :meth:`~polytask.nn.base.MultiTaskModel.expose_task_features`).
        tower: hidden widths of each task tower (may be empty: a linear head).
        activation: activation name; dropout: dropout after each hidden layer.
    """

    def __init__(self, input_dim: int, tasks: Sequence[Task], bottom: Sequence[int] = (128, 64),
                 tower: Sequence[int] = (32,), activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__(tasks)
        if not bottom:
            raise ConfigError("model.params.bottom: shared_bottom needs at least one shared layer")
        self.bottom = mlp(input_dim, bottom, activation, dropout)
        self.heads = TaskHeads(tasks, bottom[-1], tower, activation, dropout)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.bottom(x)
        self.shared_features = z
        out = self.heads(z)
        self.task_features = self.heads.task_features  # z expanded to (T, B, H) if exposed, else None
        return out
