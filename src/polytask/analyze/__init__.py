"""Diagnostics: how tasks help or hurt each other.

- :class:`GradientConflictMonitor` / :func:`gradient_conflict`: pairwise cosine, conflict rate and
  magnitude similarity of task gradients on the shared parameters (overall and per layer group).
- :class:`AffinityMonitor` / :func:`task_affinity` / :func:`lookahead_affinity`: inter-task
  affinity by lookahead (Fifty et al., NeurIPS 2021).
- :func:`group_tasks`: the best k task groups from an affinity matrix.
- :func:`pairwise_transfer`, :func:`check_grouping`, :func:`rank_agreement`: measured transfer and
  how far the cheap estimates agree with it.
- :func:`collect_expert_usage`: gate usage of routed architectures.
- :func:`task_vector_cosine`, :func:`tsv_interference`: interference of task vectors for merges.
"""

from polytask.analyze.affinity import AffinityMonitor, AffinityResult, lookahead_affinity, task_affinity
from polytask.analyze.conflict import ConflictResult, GradientConflictMonitor, gradient_conflict
from polytask.analyze.experts import collect_expert_usage, load_expert_usage, save_expert_usage
from polytask.analyze.grouping import Grouping, group_tasks, grouping_score
from polytask.analyze.interference import (
    SubspaceInterference,
    TaskVectorCosine,
    singular_task_interference,
    subspace_overlap,
    task_vector_cosine,
    task_vectors,
    tsv_interference,
)
from polytask.analyze.transfer import (
    GroupCheck,
    TransferResult,
    check_grouping,
    pairwise_transfer,
    rank_agreement,
    spearman,
)

__all__ = [
    "AffinityMonitor", "AffinityResult", "ConflictResult", "GradientConflictMonitor", "GroupCheck", "Grouping",
    "SubspaceInterference", "TaskVectorCosine", "TransferResult", "check_grouping", "collect_expert_usage",
    "gradient_conflict", "group_tasks", "grouping_score", "load_expert_usage", "lookahead_affinity",
    "pairwise_transfer", "rank_agreement", "save_expert_usage", "singular_task_interference", "spearman",
    "subspace_overlap", "task_affinity", "task_vector_cosine", "task_vectors", "tsv_interference",
]
