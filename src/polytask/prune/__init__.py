"""Task-aware structural pruning of multi-task models: PAGCP and task-agnostic baselines.

``polytask prune RUN_DIR --target flops=0.5 --method pagcp`` (or :func:`prune_run`) prunes a
finished run's shared trunk (shared-bottom MLP layers, MMoE/OMoE expert units, PLE/CGC expert
hidden units with a width per bank (:mod:`polytask.prune.banks`), MTAN's trunk channels with every
task's attention path (:mod:`polytask.prune.mtan`), the task-token model's attention heads
(:mod:`polytask.prune.heads`)) to a FLOPs budget, optionally fine-tunes it with the run's balancer,
and writes a new run directory with a table of parameters, FLOPs, latency, metrics and Δm%.
Methods (:data:`PRUNERS`):

- ``pagcp`` -- Ye et al., "Performance-aware Approximation of Global Channel Pruning for Multitask
  CNNs", TPAMI 2023 (:mod:`polytask.prune.pagcp`);
- ``taylor`` -- first-order Taylor of the summed loss, Molchanov et al., ICLR 2017;
- ``l1`` -- weight L1 norm, Li et al., ICLR 2017;
- ``random``.

The shape surgery is torch-pruning's dependency graph (:mod:`polytask.prune.graph`); FLOPs are its
op counter's (:mod:`polytask.prune.flops`).
"""

from polytask.prune.core import PruneContext, UnreachableBudget, apply_plan
from polytask.prune.flops import Cost, count, latency_ms
from polytask.prune.graph import SUPPORTED, prunable_layers
from polytask.prune.methods import PRUNERS, check_target, prune_model
from polytask.prune.pagcp import PAGCP
from polytask.prune.run import PruneOptions, PruneResult, load_run, prune_run

__all__ = ["PAGCP", "PRUNERS", "SUPPORTED", "Cost", "PruneContext", "PruneOptions", "PruneResult",
           "UnreachableBudget", "apply_plan", "check_target", "count", "latency_ms", "load_run", "prunable_layers",
           "prune_model", "prune_run"]
