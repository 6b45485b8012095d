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
from polytask.nn.embedding import DenseFeature, FeatureEmbedding, FeatureSpec, SequenceFeature, SparseFeature
from polytask.nn.moe import CGC, MMoE, OMoE, PLE
from polytask.nn.dselect_k import DSelectK
from polytask.nn.adatt import AdaTT
from polytask.nn.home import HoME
from polytask.nn.cross_stitch import CrossStitch
from polytask.nn.mtan import MTAN
from polytask.nn.esmm import AITM, ESMM
from polytask.nn.task_moe import TaskMoE
from polytask.nn.task_token import TaskTokenAttention
from polytask.nn.mpnn import MPNN, EdgeNetworkConv  # needs torch_geometric only when built
from polytask.nn.diagnostics import ExpertUsage, expert_usage
from polytask.tasks import Task
from polytask.token_tasks import check_token_outputs


def build_model(arch: str, input_dim: int | FeatureSpec, tasks: Sequence[Task], **params: Any) -> MultiTaskModel:
    """Build the architecture registered as ``arch`` for ``tasks`` (params are checked by name); ConfigError
    for a token-level task on an architecture with pooled outputs only."""
    check_token_outputs(arch, ARCHITECTURES.lookup(arch), tasks)
    return ARCHITECTURES.build(arch, input_dim=input_dim, tasks=list(tasks), **params)


__all__ = [
    "AITM", "CGC", "DSelectK", "AdaTT", "CrossStitch", "DenseFeature", "ESMM", "ExpertUsage", "FeatureEmbedding",
    "FeatureSpec", "HoME", "MMoE", "MTAN", "OMoE", "PLE", "SequenceFeature", "SparseFeature", "TaskMoE",
    "TaskTokenAttention", "expert_usage",
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
