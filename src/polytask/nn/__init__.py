"""Multi-task architectures, task heads and batched expert layers.

Every architecture is registered by name in :data:`ARCHITECTURES`; :func:`build_model` builds one
from config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from polytask.nn.base import MultiTaskModel, TaskHeads, param_count
from polytask.nn.layers import BatchedLinear, BatchedMLP, mlp
from polytask.nn.registry import ARCHITECTURES
from polytask.nn.shared_bottom import SharedBottom
from polytask.tasks import Task


def build_model(arch: str, input_dim: int, tasks: Sequence[Task], **params: Any) -> MultiTaskModel:
    """Build the architecture registered as ``arch`` for ``tasks`` (params are checked by name)."""
    return ARCHITECTURES.build(arch, input_dim=input_dim, tasks=list(tasks), **params)


__all__ = [
    "ARCHITECTURES",
    "BatchedLinear",
    "BatchedMLP",
    "MultiTaskModel",
    "SharedBottom",
    "TaskHeads",
    "build_model",
    "mlp",
    "param_count",
]
