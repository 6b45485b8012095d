"""Balancers published 2022-2025 that no pinned peer ships (issue 16): GO4Align, NTKMTL, Auto-Lambda.

Each is checked against hand-computed cases from its paper's equations (``tests/test_balance_recent.py``);
the docstrings say where the code follows the paper and where the authors' public code differs.

- :class:`GO4Align` -- loss-based (no per-task gradient): risk-guided indicators, grouped by an
  exact one-dimensional k-means.
- :class:`NTKMTL` -- Gramian-only (``J J^T``), so it runs at parameter or feature level, including the
  engine's Gramian-only linear-head path.
- :class:`AutoLambda` -- loss weights meta-learned on a held-out batch (the Trainer feeds it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polytask.balance import aggregators as agg
from polytask.balance._loss_state import TaskStateBalancer, present_tasks
from polytask.balance.engine import _register
from polytask.balance.loss_weighting import _positive
from polytask.balance.registry import BALANCERS
from polytask.errors import ConfigError

__all__ = ["AutoLambda", "GO4Align", "NTKMTL", "kmeans_1d"]


# ------------------------------------------------------------------------------- 1-D k-means
_CUTS: dict[tuple[int, int, torch.device], Tensor] = {}


def _cut_points(n: int, k: int, device: torch.device) -> Tensor:
    """``(C, k + 1)``: every way to cut ``n`` sorted values into ``k`` contiguous (possibly empty) runs,
    as boundaries ``0 = c_0 <= c_1 <= ... <= c_k = n`` (built once per ``(n, k)``)."""
    key = (n, k, device)
    if key not in _CUTS:
        inner = list(itertools.combinations_with_replacement(range(n + 1), k - 1))
        _CUTS[key] = torch.tensor([[0, *c, n] for c in inner], dtype=torch.long, device=device).reshape(len(inner), k + 1)
    return _CUTS[key]


def kmeans_1d(values: Tensor, k: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact k-means of the scalars ``values`` (``(n,)``) into at most ``k`` groups: ``(centroid_of_each, group)``.

    In one dimension an optimal clustering is a partition of the SORTED values into contiguous runs,
    so every partition is scored at once (prefix sums of ``x`` and ``x^2``; ``C(n + k - 1, k - 1)``
    candidates, 17 for ``n = 16, k = 2``) and the first one of least within-group sum of squares is kept:
    deterministic, no random start, no host sync. Entries outside ``mask`` take no part (centroid 0,
    group -1). Runs may be empty, so fewer values than ``k`` give each value its own group.
    """
    n = values.shape[0]
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask
    x = torch.where(mask, values, torch.zeros_like(values))
    # the values taking part first, in increasing order; the others (sort key +inf) last
    order = torch.argsort(torch.where(mask, values, torch.full_like(values, float("inf"))), stable=True)
    xs, ms = x[order], mask[order].to(values.dtype)
    zero = values.new_zeros(1)
    s1, s2, cnt = (torch.cat([zero, c.cumsum(0)]) for c in (xs * ms, xs * xs * ms, ms))
    cuts = _cut_points(n, max(1, min(k, n)), values.device)  # (C, k+1)
    lo, hi = cuts[:, :-1], cuts[:, 1:]
    size, total, square = cnt[hi] - cnt[lo], s1[hi] - s1[lo], s2[hi] - s2[lo]
    safe = size.clamp_min(1)
    sse = (square - total * total / safe).sum(1)  # (C,)
    best = torch.argmin(sse)  # the first minimum: ties resolve alike on every rank
    centroids = total[best] / safe[best]  # (k,)
    # the group of sorted position i: how many inner boundaries are <= i
    positions = torch.arange(n, device=values.device)
    group_sorted = (cuts[best, 1:-1].unsqueeze(0) <= positions.unsqueeze(1)).sum(1)
    group = torch.empty_like(group_sorted).scatter_(0, order, group_sorted)
    return torch.where(mask, centroids[group], torch.zeros_like(values)), torch.where(mask, group, -1)


# ---------------------------------------------------------------------------------------- GO4Align
@BALANCERS.register("go4align", "go4_align")
class GO4Align(TaskStateBalancer):
    """GO4Align: group risk minimisation with risk-guided group indicators (loss-based).

    Shen, Wang, Zhen, Snoek, Worring, "GO4Align: Group Optimization for Multi-Task Alignment",
    NeurIPS 2024.

    At step ``k`` with losses ``L_t`` (detached):

    1. risk-guided indicator: a Group-DRO-like history ``p ← p ⊙ exp(−η L) / Σ(p ⊙ exp(−η L))``
       (``p`` starts at ``1/T``) times the scale balance ``s_t = Σ_i L_i / L_t``: ``γ_t = s_t p_t``;
    2. dynamical group assignment: k-means of the ``γ_t`` into ``K`` groups; each task's weight is its
       group's centroid, and the model minimises ``Σ_t w_t L_t``.

    The paper writes the update as adaptive group risk minimisation (its Eqs. 4-6); the numbers above
    are those of the authors' public ``GO4ALIGN`` weight method (``robust_step_size`` ``η = 1e-4``).
    Differences: the authors cluster with ``kmeans_pytorch`` (random initial centroids, iterated to a
    tolerance); here the clustering is exact (:func:`kmeans_1d`: the best partition of the sorted
    ``γ``), deterministic and without host sync. ``K = 1`` gives every task the mean ``γ`` (the
    authors' special case); ``K >= T`` gives ``w = γ``. A task absent from the batch (loss exactly 0)
    gets weight 0, keeps its ``p_t`` (factor 1) and takes no part in the sums or the clustering.
    ``num_groups`` has no single default in the paper (it is searched per benchmark; the authors'
    scripts default to 5 on 40-task CelebA); 2 here.

    Args:
        num_groups: ``K``, the number of groups (>= 1).
        robust_step_size: ``η``, step of the risk history (>= 0).
    """

    _state_buffer = "adv_probs"

    def __init__(self, num_groups: int = 2, robust_step_size: float = 1e-4,
                 nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ConfigError(f"balancer.params.num_groups: must be an integer >= 1, got {num_groups!r}")
        if not robust_step_size >= 0:
            raise ConfigError(f"balancer.params.robust_step_size: must be >= 0, got {robust_step_size!r}")
        self.num_groups, self.robust_step_size = num_groups, float(robust_step_size)
        self.register_buffer("adv_probs", torch.zeros(0))
        self._next_probs: Tensor | None = None

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, robust_step_size={self.robust_step_size}"

    def _init_state(self, losses: Tensor) -> None:
        self.adv_probs = torch.full_like(losses, 1.0 / losses.shape[0])

    def indicators(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """``(γ, p_next)``: the risk-guided indicators of this step and the updated history (not stored)."""
        present = present_tasks(losses)
        safe = torch.where(present, losses, torch.ones_like(losses))
        probs = self.adv_probs.to(losses) * torch.where(present, torch.exp(-self.robust_step_size * safe),
                                                        torch.ones_like(safe))
        probs = probs / probs.sum()
        scale = torch.where(present, losses, torch.zeros_like(losses)).sum() / safe
        return torch.where(present, scale * probs, torch.zeros_like(probs)), probs

    def weights(self, losses: Tensor) -> Tensor:
        gamma, self._next_probs = self.indicators(losses)
        return kmeans_1d(gamma, self.num_groups, present_tasks(losses))[0]

    def after_backward(self, losses: Tensor, weights: Tensor) -> None:
        self.adv_probs.copy_(self._next_probs)  # a skipped step is undone by the guard


# ------------------------------------------------------------------------------------------ NTKMTL
class NTKMTL(agg.GramianWeighting):
    """NTKMTL: balance the tasks' convergence speeds by the eigenvalues of their neural tangent kernels.

    Qin, Wang, Liao, Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from Neural Tangent
    Kernel Perspective", NeurIPS 2025.

    Under gradient flow the residual of task ``t`` decays at rates given by the eigenvalues of its NTK
    ``K_t = J_t J_t^T``; scaling task ``t``'s loss by ``w_t`` scales its kernel by ``w_t``, so the paper
    equalises the largest eigenvalues ``λ_t``: ``w_t = (Σ_i λ_i / λ_t)^{n}`` with exponent ``n = 1/2``.
    With one kernel sample per task (the setting of the paper's experiments, "NTKMTL (n=1)" in the
    authors' code) ``λ_t = ‖g_t‖^2 = G_tt`` and the update is ``J^T w`` with ``w_t = (tr G / G_tt)^{1/2}``:
    a function of the Gramian only, so it runs at parameter level (the method) or at feature level
    (gradients w.r.t. the shared representation; the engine's Gramian-only paths).

    Differences: the authors' code multiplies the update by ``T`` ("to match the sum loss") and clips
    the shared gradient to norm 1 (``max_norm``); neither is part of the method's weights, and
    polytask's Trainer has its own clipping option. Their NTKMTL-SR (per-sample kernels at the
    representation, largest eigenvalue of a ``B x B`` matrix per task) is not implemented here.
    A task whose gradient is exactly 0 (``G_tt = 0``: no labelled row) gets weight 0 instead of
    ``inf``; a zero Gramian gives zero weights.

    Args:
        ntk_exp: the exponent ``n`` (the paper's 0.5).
    """

    def __init__(self, ntk_exp: float = 0.5) -> None:
        super().__init__()
        if not ntk_exp >= 0:
            raise ConfigError(f"balancer.params.ntk_exp: must be >= 0, got {ntk_exp!r}")
        self.ntk_exp = float(ntk_exp)

    def weights(self, gramian: Tensor) -> Tensor:
        diag = gramian.diagonal()
        live = diag > 0
        ratio = diag.sum() / torch.where(live, diag, torch.ones_like(diag))
        w = torch.where(live, ratio.pow(self.ntk_exp), torch.zeros_like(diag))
        return torch.where(torch.isfinite(gramian).all(), w, torch.full_like(w, float("nan")))


_register("ntkmtl", NTKMTL, "ntk_mtl")
