"""Task grouping from an inter-task affinity matrix.

Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021,
§3.2 ("network selection"). With ``Z[i, j] = Z_{i→j}``, a task j trained in group G receives the
mean affinity of the other members onto it,

    s(j | G) = 1/(|G| − 1) · Σ_{i ∈ G, i ≠ j} Z_{i→j},

and a set of groups is scored by the sum over tasks of the best score each task gets from a group
that contains it. A task alone in a group receives no affinity: ``s(j | {j}) = 0`` (our choice,
the paper leaves singletons implicit).

Two schemes:

- ``overlap=True`` (the paper): choose ``k`` distinct groups, which may overlap, such that every
  task is in at least one; each task is served by its best group. Exact by branch-and-bound over
  all 2^T − 1 candidate groups (bound: each task's best score among the candidates not yet
  considered), for T ≤ ``EXACT_OVERLAP_MAX`` by default.
- ``overlap=False`` (our documented variant): a partition into exactly ``k`` disjoint groups.
  Exact by dynamic programming over subsets (O(k·3^T)), for T ≤ ``EXACT_PARTITION_MAX``.

Beyond those sizes (or with ``method="greedy"``) an approximate search: agglomerative merging
from singletons (merge the two groups whose union raises the total most, or lowers it least)
down to k groups, then local search moving one task at a time while the total improves; for
``overlap=True`` each task is then also added to any other group where that raises the total.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from polytask.analyze.io import analysis_path, read_json, write_json
from polytask.errors import ConfigError

EXACT_OVERLAP_MAX = 7
EXACT_PARTITION_MAX = 12

Group = tuple[int, ...]


@dataclass
class Grouping:
    """Chosen groups (task names), each task's predicted score and the total.

    ``serving[task]``: index of the group that serves the task (its best group);
    ``group_totals[g]``: ``Σ_{j∈G} s(j | G)``, the predicted score of group g on its own.
    """

    tasks: list[str]
    groups: list[list[str]]
    task_scores: dict[str, float]
    total: float
    overlap: bool
    method: str
    serving: dict[str, int]
    group_totals: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "grouping", "tasks": self.tasks, "groups": self.groups, "task_scores": self.task_scores,
                "total": self.total, "overlap": self.overlap, "method": self.method, "serving": self.serving,
                "group_totals": self.group_totals}

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> Grouping:
        return cls(list(p["tasks"]), [list(g) for g in p["groups"]], dict(p["task_scores"]), float(p["total"]),
                   bool(p["overlap"]), str(p["method"]), {k: int(v) for k, v in p["serving"].items()},
                   [float(v) for v in p["group_totals"]])

    def save(self, run_dir: Path, name: str = "grouping") -> Path:
        return write_json(analysis_path(run_dir, name), self.to_json())

    def describe(self) -> str:
        groups = "  ".join("{" + ", ".join(g) + "}" for g in self.groups)
        return f"{groups}  (predicted total affinity {self.total:.4g}, {self.method})"


def group_scores(affinity: Tensor, members: Group) -> dict[int, float]:
    """``s(j | G)`` for every task j of ``members``."""
    if len(members) == 1:
        return {members[0]: 0.0}
    idx = torch.tensor(members)
    sub = affinity[idx][:, idx]
    onto = (sub.sum(0) - sub.diagonal()) / (len(members) - 1)  # column j: affinity of the others onto j
    return {j: float(v) for j, v in zip(members, onto)}


def grouping_score(affinity: Tensor, groups: list[Group]) -> tuple[float, dict[int, float], dict[int, int]]:
    """Total score of a set of groups (each task served by its best group), per-task scores and
    the index of each task's serving group. Raises ConfigError if a task is in no group."""
    t = affinity.shape[0]
    best: dict[int, float] = {}
    serving: dict[int, int] = {}
    for gi, g in enumerate(groups):
        for j, s in group_scores(affinity, g).items():
            if j not in best or s > best[j]:
                best[j], serving[j] = s, gi
    if len(best) != t:
        missing = sorted(set(range(t)) - set(best))
        raise ConfigError(f"grouping: task index(es) {missing} are in no group")
    return sum(best.values()), best, serving


def _check(affinity: Tensor, k: int) -> Tensor:
    a = torch.as_tensor(affinity, dtype=torch.float64).detach().cpu()
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ConfigError(f"grouping: the affinity matrix must be square, got shape {tuple(a.shape)}")
    if torch.isnan(a).any():
        raise ConfigError("grouping: the affinity matrix has NaN entries")
    if not 1 <= k <= a.shape[0]:
        raise ConfigError(f"grouping: k must be between 1 and the number of tasks ({a.shape[0]}), got {k}")
    return a


def _bits(mask: int, t: int) -> Group:
    return tuple(j for j in range(t) if mask >> j & 1)


def _subset_totals(a: Tensor) -> list[float]:
    """Σ_{j∈G} s(j | G) for every subset bitmask G (index 0 unused)."""
    t = a.shape[0]
    off = a - torch.diag(a.diagonal())
    totals = [0.0] * (1 << t)
    for mask in range(1, 1 << t):
        members = list(_bits(mask, t))
        if len(members) > 1:
            idx = torch.tensor(members)
            totals[mask] = float(off[idx][:, idx].sum()) / (len(members) - 1)
    return totals


def _partition_exact(a: Tensor, k: int) -> list[Group]:
    """Best partition into exactly k non-empty groups: DP over subsets, O(k·3^T)."""
    t = a.shape[0]
    full = (1 << t) - 1
    totals = _subset_totals(a)
    neg = float("-inf")
    # best[m][mask]: best total of a partition of `mask` into m groups; choice[m][mask]: its group
    best = [[neg] * (1 << t) for _ in range(k + 1)]
    choice = [[0] * (1 << t) for _ in range(k + 1)]
    best[0][0] = 0.0
    for m in range(1, k + 1):
        for mask in range(1, full + 1):
            low = mask & -mask
            rest = mask ^ low
            sub = rest
            while True:  # every submask of `mask` that holds its lowest task
                group = sub | low
                prev = best[m - 1][mask ^ group]
                if prev != neg and prev + totals[group] > best[m][mask]:
                    best[m][mask], choice[m][mask] = prev + totals[group], group
                if sub == 0:
                    break
                sub = (sub - 1) & rest
    groups, mask = [], full
    for m in range(k, 0, -1):
        g = choice[m][mask]
        groups.append(_bits(g, t))
        mask ^= g
    return sorted(groups)


def _overlap_exact(a: Tensor, k: int) -> list[Group]:
    """Best k distinct, possibly overlapping groups covering every task: branch-and-bound."""
    t = a.shape[0]
    neg = float("-inf")
    cands: list[tuple[int, list[float]]] = []
    for mask in range(1, 1 << t):
        row = [neg] * t
        for j, s in group_scores(a, _bits(mask, t)).items():
            row[j] = s
        cands.append((mask, row))
    cands.sort(key=lambda c: -sum(v for v in c[1] if v != neg))  # good groups first: early incumbents
    n = len(cands)
    suffix = [[neg] * t for _ in range(n + 1)]  # suffix[c][j]: best score of j among cands[c:]
    for c in range(n - 1, -1, -1):
        suffix[c] = [max(x, y) for x, y in zip(suffix[c + 1], cands[c][1])]
    best_val, best_sel = neg, None

    def search(start: int, chosen: list[int], cur: list[float]) -> None:
        nonlocal best_val, best_sel
        if len(chosen) == k:
            if all(v != neg for v in cur):
                val = sum(cur)
                if val > best_val:
                    best_val, best_sel = val, list(chosen)
            return
        for c in range(start, n - (k - len(chosen)) + 1):
            bound = [max(x, y) for x, y in zip(cur, suffix[c])]
            if neg in bound or sum(bound) <= best_val:
                return  # later candidates only have smaller suffix bounds
            row = cands[c][1]
            chosen.append(c)
            search(c + 1, chosen, [max(x, y) for x, y in zip(cur, row)])
            chosen.pop()

    search(0, [], [neg] * t)
    assert best_sel is not None
    return sorted(_bits(cands[c][0], t) for c in best_sel)


def _total(a: Tensor, groups: list[Group]) -> float:
    return sum(sum(group_scores(a, g).values()) for g in groups)


def _greedy_partition(a: Tensor, k: int) -> list[Group]:
    t = a.shape[0]
    groups: list[Group] = [(j,) for j in range(t)]
    while len(groups) > k:
        best = None
        for x in range(len(groups)):
            for y in range(x + 1, len(groups)):
                merged = tuple(sorted(groups[x] + groups[y]))
                gain = _total(a, [merged]) - _total(a, [groups[x], groups[y]])
                if best is None or gain > best[0]:
                    best = (gain, x, y, merged)
        _, x, y, merged = best
        groups = [g for i, g in enumerate(groups) if i not in (x, y)] + [merged]
    improved = True
    while improved:  # local search: move one task to another group while the total rises
        improved = False
        current = _total(a, groups)
        for gi, g in enumerate(groups):
            if len(g) == 1:
                continue
            for j in g:
                for hi in range(len(groups)):
                    if hi == gi:
                        continue
                    trial = list(groups)
                    trial[gi] = tuple(x for x in g if x != j)
                    trial[hi] = tuple(sorted(groups[hi] + (j,)))
                    if _total(a, trial) > current + 1e-12:
                        groups, improved = trial, True
                        break
                if improved:
                    break
            if improved:
                break
    return sorted(groups)


def _greedy_overlap(a: Tensor, k: int) -> list[Group]:
    groups = _greedy_partition(a, k)
    t = a.shape[0]
    improved = True
    while improved:  # add a task to another group while that raises the (max-served) total
        improved = False
        current = grouping_score(a, groups)[0]
        for gi in range(len(groups)):
            for j in range(t):
                if j in groups[gi]:
                    continue
                trial = list(groups)
                trial[gi] = tuple(sorted(groups[gi] + (j,)))
                if len(set(trial)) == len(trial) and grouping_score(a, trial)[0] > current + 1e-12:
                    groups, improved = trial, True
                    break
            if improved:
                break
    return sorted(groups)


def group_tasks(affinity: Tensor, k: int, tasks: list[str] | None = None, overlap: bool = True,
                method: Literal["auto", "exact", "greedy"] = "auto") -> Grouping:
    """The best set of ``k`` task groups for the affinity matrix ``affinity[i, j] = Z_{i→j}``.

    See the module docstring for the score (Fifty et al., NeurIPS 2021), the two schemes
    (``overlap``) and the search methods; ``auto`` is exact up to ``EXACT_OVERLAP_MAX`` tasks
    (overlapping) or ``EXACT_PARTITION_MAX`` tasks (partition) and greedy beyond.
    """
    a = _check(affinity, k)
    t = a.shape[0]
    names = list(tasks) if tasks is not None else [f"task{j}" for j in range(t)]
    if len(names) != t:
        raise ConfigError(f"grouping: {len(names)} task names for a {t}×{t} affinity matrix")
    if method not in ("auto", "exact", "greedy"):
        raise ConfigError(f"grouping: method must be auto, exact or greedy, got {method!r}")
    if overlap and k > (1 << t) - 1:
        raise ConfigError(f"grouping: at most {(1 << t) - 1} distinct groups of {t} tasks")
    limit = EXACT_OVERLAP_MAX if overlap else EXACT_PARTITION_MAX
    exact = method == "exact" or (method == "auto" and t <= limit)
    if overlap:
        groups = _overlap_exact(a, k) if exact else _greedy_overlap(a, k)
    else:
        groups = _partition_exact(a, k) if exact else _greedy_partition(a, k)
    total, per_task, serving = grouping_score(a, groups)
    return Grouping(names, [[names[j] for j in g] for g in groups], {names[j]: per_task[j] for j in range(t)},
                    total, overlap, "exact" if exact else "greedy", {names[j]: serving[j] for j in range(t)},
                    [_total(a, [g]) for g in groups])
