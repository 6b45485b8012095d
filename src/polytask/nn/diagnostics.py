"""Expert-usage diagnostics for routed architectures (``model.gate_weights`` after a forward)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from polytask.errors import DataError


@dataclass
class ExpertUsage:
    """How each task uses the experts, from gate weights over a set of rows.

    ``mean[t, e]``: mean gate weight of expert ``e`` for task ``t``; ``near_zero[t, e]``: share of
    rows where that weight is below ``threshold``; ``entropy[t]``: mean per-row entropy of task
    ``t``'s gate (nats; ``log E`` is uniform use, 0 a single expert). Tasks whose gates are
    narrower than the widest (e.g. CGC: own + shared experts) are padded with NaN.
    """

    tasks: list[str]
    mean: Tensor
    near_zero: Tensor
    entropy: Tensor
    threshold: float

    def rows(self) -> list[dict[str, float | str | int]]:
        """One dict per (task, expert): for tables and the run report."""
        out = []
        for i, name in enumerate(self.tasks):
            for e in range(self.mean.shape[1]):
                if not torch.isnan(self.mean[i, e]):
                    out.append({"task": name, "expert": e, "mean_weight": float(self.mean[i, e]),
                                "near_zero_share": float(self.near_zero[i, e]), "entropy": float(self.entropy[i])})
        return out


@torch.no_grad()
def expert_usage(gate_weights: Mapping[str, Tensor] | Iterable[Mapping[str, Tensor]],
                 threshold: float = 1e-3) -> ExpertUsage:
    """Summarise gate weights ``{task: (N, E_task)}`` (or an iterable of such dicts, one per batch,
    which are concatenated) into an :class:`ExpertUsage`."""
    if isinstance(gate_weights, Mapping):
        gate_weights = [gate_weights]
    batches = list(gate_weights)
    if not batches or not batches[0]:
        raise DataError("expert_usage: no gate weights (run a forward pass of a routed model first)")
    names = list(batches[0])
    per_task = {n: torch.cat([b[n].detach().reshape(-1, b[n].shape[-1]).float() for b in batches]) for n in names}
    width = max(w.shape[1] for w in per_task.values())
    t = len(names)
    mean = torch.full((t, width), float("nan"))
    near = torch.full((t, width), float("nan"))
    entropy = torch.empty(t)
    for i, n in enumerate(names):  # reporting, not a training step: a loop over tasks is fine
        w = per_task[n].cpu()
        mean[i, : w.shape[1]] = w.mean(dim=0)
        near[i, : w.shape[1]] = (w < threshold).float().mean(dim=0)
        entropy[i] = -(w * torch.log(w.clamp_min(1e-12))).sum(dim=1).mean()
    return ExpertUsage(names, mean, near, entropy, threshold)
