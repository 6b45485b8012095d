"""Expert usage of routed architectures (MMoE, CGC/PLE, DSelect-k, ...) over a data split.

A routed model exposes ``gate_weights: {task: (B, E_task)}`` after each forward; the summary
(mean gate weight per task and expert, per-row gate entropy, share of near-zero weights) is
:func:`polytask.nn.diagnostics.expert_usage`. This module runs the model over a split, writes the
summary as JSON and draws it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from polytask.analyze._grads import measuring
from polytask.analyze.io import analysis_path, from_jsonable, read_json, write_json
from polytask.errors import ConfigError
from polytask.nn.diagnostics import ExpertUsage, expert_usage


def is_routed(model: nn.Module) -> bool:
    """Whether ``model`` exposes gate weights (checked by one attribute, without a forward)."""
    return hasattr(model, "gate_weights")


@torch.no_grad()
def collect_expert_usage(model: nn.Module, dataset: Any, batch_size: int = 4096,
                         threshold: float = 1e-3) -> ExpertUsage:
    """Gate weights of ``model`` over every row of ``dataset`` (a MultiTaskDataset), in eval mode."""
    gates = []
    with measuring(model):
        for batch in dataset.batches(batch_size):
            model(batch.inputs)
            weights = getattr(model, "gate_weights", None)
            if not weights:
                raise ConfigError(f"expert usage: model {type(model).__name__} has no gate_weights "
                                  "(not a routed architecture)")
            gates.append({k: v.detach() for k, v in weights.items()})
    return expert_usage(gates, threshold)


def usage_to_json(usage: ExpertUsage) -> dict[str, Any]:
    return {"kind": "experts", "tasks": usage.tasks, "threshold": usage.threshold,
            "matrices": {"mean_weight": usage.mean, "near_zero_share": usage.near_zero},
            "entropy": usage.entropy}


def usage_from_json(p: dict[str, Any]) -> ExpertUsage:
    m = p["matrices"]
    return ExpertUsage(list(p["tasks"]), from_jsonable(m["mean_weight"]).float(),
                       from_jsonable(m["near_zero_share"]).float(), from_jsonable(p["entropy"]).float(),
                       float(p["threshold"]))


def save_expert_usage(usage: ExpertUsage, run_dir: Path, plot: bool = True) -> Path:
    """Write ``analysis/experts.json`` (and ``plots/experts.png``) into ``run_dir``."""
    path = write_json(analysis_path(run_dir, "experts"), usage_to_json(usage))
    if plot:
        from polytask.report.heatmap import save_heatmap

        experts = [f"expert {e}" for e in range(usage.mean.shape[1])]
        save_heatmap(usage.mean, usage.tasks, Path(run_dir) / "plots" / "experts.png", cols=experts,
                     title="mean gate weight", diverging=False, ylabel="task", xlabel="expert",
                     scale_off_diagonal=False)
    return path


def load_expert_usage(run_dir: Path) -> ExpertUsage:
    return usage_from_json(read_json(analysis_path(run_dir, "experts"), "experts"))
