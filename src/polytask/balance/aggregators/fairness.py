"""Fair shares of one update: equal projections (IMTL-G), aligned singular values (Aligned-MTL), equal
cosines (ConFIG), Nash bargaining (Nash-MTL) and alpha-fair utilities (FairGrad)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from polytask.balance import solvers as _solvers
from polytask.balance.aggregators._base import (
    _check,
    _finite_or_identity,
    _LazyStateMixin,
    _nan_unless,
    _preference,
    _SOLVE_DTYPE,
    GramianWeighting,
)
from polytask.balance.registry import register_aggregator
from polytask.balance.solvers import power_fair_weights


@register_aggregator("imtl_g", "imtlg")
class IMTLG(GramianWeighting):
    """IMTL-G: the update has equal projections on every task's unit gradient.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (gradient part); in the
    generalised form of Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    ``w = G^+ d / sum(G^+ d)`` with ``d_i = ||g_i||``, valid for linearly dependent gradients.
    Uses a pseudo-inverse (synchronises on CUDA).
    """

    def __init__(self) -> None:  # no hyperparameters (and the registry's signature says so)
        super().__init__()

    def weights(self, gramian: Tensor) -> Tensor:
        gramian, finite = _finite_or_identity(gramian)
        d = gramian.diagonal().clamp_min(0.0).sqrt()
        v = torch.linalg.pinv(gramian) @ d
        total = v.sum()
        return _nan_unless(finite, torch.where(total.abs() < 1e-12, torch.zeros_like(v), v / torch.where(total == 0, 1.0, total)))


@register_aggregator("aligned_mtl", "alignedmtl")
class AlignedMTL(GramianWeighting):
    """Aligned-MTL: align the principal components of the gradient matrix before summing.

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
    Algorithm 1: with ``G = V diag(lambda) V^T`` (rank ``r``), weights
    ``sqrt(lambda_scale) V_r diag(lambda_r^-1/2) V_r^T w0`` where ``w0`` is the mean (or
    ``pref_vector``) and ``lambda_scale`` is the smallest (``min``), median or mean (``rmse``)
    non-zero eigenvalue. Uses an eigendecomposition (synchronises on CUDA).
    """

    def __init__(self, scale_mode: Literal["min", "median", "rmse"] = "min", pref_vector: list[float] | None = None) -> None:
        super().__init__()
        _check(scale_mode in ("min", "median", "rmse"), f"aligned_mtl: scale_mode must be min, median or rmse, got {scale_mode!r}")
        self.scale_mode = scale_mode
        self.pref_vector = None if pref_vector is None else list(pref_vector)

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        w0 = _preference(self.pref_vector, n, gramian, "aligned_mtl")
        gramian, finite = _finite_or_identity(gramian)
        lam, vec = torch.linalg.eigh(gramian)
        tol = lam.max() * n * torch.finfo(gramian.dtype).eps
        kept = lam > tol
        inv_sqrt = torch.where(kept, lam.clamp_min(torch.finfo(gramian.dtype).tiny).rsqrt(), torch.zeros_like(lam))
        count = kept.sum()
        if self.scale_mode == "min":
            scale = torch.where(kept, lam, torch.full_like(lam, float("inf"))).min()
        elif self.scale_mode == "rmse":
            scale = torch.where(kept, lam, torch.zeros_like(lam)).sum() / count.clamp_min(1)
        else:  # lower median of the kept eigenvalues (eigh sorts ascending; kept ones are last)
            idx = (n - count) + (count - 1) // 2
            scale = lam[idx.clamp(0, n - 1)]
        balance = scale.clamp_min(0.0).sqrt() * (vec * inv_sqrt) @ vec.T
        balance = torch.where(count == 0, torch.eye(n, dtype=gramian.dtype, device=gramian.device), balance)
        return _nan_unless(finite, balance @ w0)


@register_aggregator("config")
class ConFIG(GramianWeighting):
    """ConFIG: the conflict-free direction with equal cosine to every task gradient.

    Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025, Eq. 2: ``d = U^+ w`` for the unit gradients ``U`` (``w = 1`` or ``pref_vector``),
    normalised, scaled by ``sum_i g_i . d_unit``. Since ``U^+ = U^T (U U^T)^+`` this needs only
    the Gramian. Uses a pseudo-inverse (synchronises on CUDA).
    """

    def __init__(self, pref_vector: list[float] | None = None) -> None:
        super().__init__()
        self.pref_vector = None if pref_vector is None else list(pref_vector)

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        pref = torch.ones(n, dtype=gramian.dtype, device=gramian.device) if self.pref_vector is None else _preference(self.pref_vector, n, gramian, "config")
        gramian, finite = _finite_or_identity(gramian)
        norms = gramian.diagonal().clamp_min(0.0).sqrt()
        inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(gramian.dtype).tiny), torch.zeros_like(norms))
        unit_gram = inv.unsqueeze(1) * gramian * inv.unsqueeze(0)
        rtol = max(n, 1) * torch.finfo(gramian.dtype).eps
        coef = inv * (torch.linalg.pinv(unit_gram, rtol=rtol, hermitian=True) @ pref)  # d = J^T coef
        sq_norm = coef @ gramian @ coef
        length = (gramian @ coef).sum()
        coef = torch.where(sq_norm > 0, coef * length / sq_norm.clamp_min(torch.finfo(gramian.dtype).tiny), torch.zeros_like(coef))
        return _nan_unless(finite, coef)


@register_aggregator("nash_mtl", "nashmtl")
class NashMTL(_LazyStateMixin, GramianWeighting):
    """Nash-MTL: the Nash bargaining solution, weights with ``G w = 1 / w``.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022: the update ``J^T w``
    with ``w > 0`` solving ``(G w)_i = 1 / w_i`` (every task gets the same log-utility gain;
    Theorem 5.1). Solved to machine precision by Newton's method with a line search on a convex
    potential (:func:`~polytask.balance.solvers.power_fair_weights`): warm-started from the
    previous solution (a buffer), with a cold start in the same batched solve, keeping the one with
    the smaller residual; a warm start from a step with nearly opposite gradients (huge weights) or
    from a non-finite step therefore never leaves the solution unconverged. The authors' code
    (and torchjd 0.18) run up to ``optim_niter`` convex-concave cvxpy solves instead, which stop at
    a residual of ~1e-7 and synchronise. Weights are recomputed every ``update_weights_every``
    steps and the update is scaled down to norm ``max_norm`` if longer (0 disables the clipping).
    A task whose gradient is 0 gets weight 0 (the condition has no solution for it). No host
    synchronisation: on an accelerator the solve runs at every step and ``torch.where`` keeps the
    stored weights between updates (on the CPU the solve is skipped there).

    Args:
        max_norm: the largest norm of the update ``J^T w`` (0: no clipping).
        update_weights_every: solve every this many steps, reuse the weights in between.
        optim_niter: Newton iterations (plus 10); the line search converges in ~15 on the hard cases
            of ``tests/test_balance_aggregators.py`` (nearly opposite, zero, 1e-6 vs 1e6 gradients).
    """

    _legacy_counter = "step"

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20) -> None:
        super().__init__()
        _check(max_norm >= 0, f"nash_mtl: max_norm must be >= 0, got {max_norm}")
        _check(update_weights_every > 0, "nash_mtl: update_weights_every must be > 0")
        _check(optim_niter > 0, "nash_mtl: optim_niter must be > 0")
        self.max_norm, self.update_weights_every, self.optim_niter = max_norm, update_weights_every, optim_niter
        self.register_buffer("prev_weights", torch.zeros(0, dtype=_SOLVE_DTYPE))
        self._init_steps()

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        resized = self.prev_weights.shape != (n,)
        if resized:
            self.prev_weights = torch.zeros(n, dtype=_SOLVE_DTYPE, device=gramian.device)
        fresh = self._fresh(n, resized)
        prev = torch.where(fresh, 0.0, self.prev_weights.to(gramian))  # 0: no warm start (cold only)
        due = self._advance(fresh, n) % self.update_weights_every == 0
        if self.update_weights_every > 1 and _solvers._early_exit(gramian) and not bool(due):  # CPU: reading it is free
            solved = prev
        else:
            solved = power_fair_weights(gramian, 1.0, init=prev, iters=self.optim_niter + 10)
        w = torch.where(due, solved, prev)
        self.prev_weights = w
        if self.max_norm > 0:
            norm = (w @ gramian @ w).clamp_min(0.0).sqrt()
            w = torch.where(norm > self.max_norm, w * self.max_norm / norm.clamp_min(torch.finfo(w.dtype).tiny), w)
        return w


@register_aggregator("fairgrad")
class FairGrad(GramianWeighting):
    """FairGrad: alpha-fair resource allocation among tasks, weights with ``G w = w^(-1/alpha)``.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024 (Eq. 4). ``alpha = 0``
    is linear scalarisation (mean weights); ``alpha = 1`` is proportional fairness (Nash-MTL's
    condition). Solved in torch by :func:`~polytask.balance.solvers.power_fair_weights` (a task
    whose gradient is 0 has no solution and gets weight 0).

    Args:
        alpha: the fairness parameter (0: mean, 1: proportional fairness, large: max-min).
        max_iters: Newton iterations.
    """

    def __init__(self, alpha: float = 1.0, max_iters: int = 30) -> None:
        super().__init__()
        _check(alpha >= 0, f"fairgrad: alpha must be >= 0, got {alpha}")
        self.alpha, self.max_iters = alpha, max_iters

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        if self.alpha == 0:
            return torch.full((n,), 1.0 / n, dtype=gramian.dtype, device=gramian.device)
        return power_fair_weights(gramian, self.alpha, iters=self.max_iters)
