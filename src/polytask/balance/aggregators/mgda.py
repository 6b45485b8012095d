"""The MGDA family: a common descent direction from the minimum-norm point of a (possibly constrained)
convex hull of the task gradients -- MGDA, CAGrad, UPGrad, DualProj."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from polytask.balance import solvers as _solvers
from polytask.balance.aggregators._base import _check, _normalize, _preference, GramianWeighting
from polytask.balance.registry import register_aggregator
from polytask.balance.solvers import cagrad_dual, frank_wolfe_min_norm, min_norm_simplex, nonneg_qp


@register_aggregator("mgda_ub", default_mode="features")
@register_aggregator("mgda")
class MGDA(GramianWeighting):
    """MGDA: the minimum-norm point of the convex hull of the task gradients.

    Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
    Comptes Rendus Mathématique 2012; as used for multi-task learning by Sener & Koltun,
    "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.

    Args:
        solver: ``"active_set"`` (default): the exact minimiser by
            :func:`~polytask.balance.solvers.min_norm_simplex` (few iterations);
            ``"frank_wolfe"``: Algorithm 2 of Sener & Koltun (approximate; what torchjd runs).
            LibMTL 1.1.5 also runs Frank-Wolfe (stop at a 1e-5 change) and, with representation
            gradients, sums them over the batch before the Gramian (``tests/test_balance_peer_libmtl.py``).
        epsilon: Frank-Wolfe stops once its step falls below this value.
        max_iters: at most this many Frank-Wolfe iterations (fixed unrolled loop).
    """

    def __init__(self, solver: Literal["active_set", "frank_wolfe"] = "active_set", epsilon: float = 1e-3,
                 max_iters: int = 100) -> None:
        super().__init__()
        _check(solver in ("active_set", "frank_wolfe"), f"mgda: solver must be active_set or frank_wolfe, got {solver!r}")
        _check(epsilon > 0, f"mgda: epsilon must be > 0, got {epsilon}")
        _check(max_iters > 0, f"mgda: max_iters must be > 0, got {max_iters}")
        self.solver, self.epsilon, self.max_iters = solver, epsilon, max_iters

    def weights(self, gramian: Tensor) -> Tensor:
        if self.solver == "frank_wolfe":
            return frank_wolfe_min_norm(gramian, self.epsilon, self.max_iters)
        return min_norm_simplex(gramian)


@register_aggregator("cagrad")
class CAGrad(GramianWeighting):
    """CAGrad: maximise the worst task improvement within a ball around the mean gradient.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021, Eq. 2:
    ``max_d min_i g_i.d`` subject to ``||d - g0|| <= c ||g0||`` (``g0`` the mean gradient). Through
    the dual (Algorithm 1), ``d = g0 + (c ||g0|| / ||g_w||) g_w`` with
    ``w = argmin_{simplex} g_w.g0 + c||g0|| ||g_w||``, solved in torch by
    :func:`~polytask.balance.solvers.cagrad_dual`. ``c = 0`` gives the mean gradient.

    When that minimiser has ``g_w = 0`` (numerically ``||g_w|| < norm_eps``), the dual value is 0
    and the formula is ``0/0``. That happens whenever a task's gradient is zero (a batch without
    labels for it: ``w = e_k`` costs 0) or 0 is in the convex hull of the gradients and the ball
    holds a direction that conflicts with none. By strong duality every ``d`` of the ball with
    ``J d >= 0`` is then optimal; we return the one closest to ``g0``, the projection of ``g0`` on
    the cone ``{d : J d >= 0}`` (:meth:`_stationary_weights`), which lies in the ball since some
    point of the cone does. Where ``g0`` conflicts with no task it is ``g0`` itself; at a
    Pareto-stationary point with ``c >= 1`` it is 0. torchjd 0.18 (and this class before) returns 0
    in all these cases, a point outside the ball when ``c < 1``; the authors' code returns
    ``g0 + c ||g0|| g_w / (||g_w|| + 1e-8)`` for whatever tiny ``g_w`` its SLSQP stops at.
    torchjd also returns 0 whenever ``||J||_F^2 < norm_eps`` (small gradients, late in training);
    here ``J`` is normalised at every scale, so the update of ``s J`` is ``s`` times that of ``J``.
    LibMTL 1.1.5 solves the dual with SLSQP (its objective is written for three tasks only; ~1e-3
    off in ``w`` at scipy's default tolerance) and by default divides the update by ``1 + c^2``
    (``rescale=1``, as the authors' code does).

    Args:
        c: radius of the ball, relative to ``||g0||`` (the paper uses 0.4-0.5).
        norm_eps: threshold on ``||g_w||`` (with ``J`` normalised to unit Frobenius norm).
    """

    def __init__(self, c: float = 0.4, norm_eps: float = 1e-4) -> None:
        super().__init__()
        _check(c >= 0, f"cagrad: c must be >= 0, got {c}")
        self.c, self.norm_eps = c, norm_eps

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        mean = torch.full((n,), 1.0 / n, dtype=gramian.dtype, device=gramian.device)
        if self.c == 0:
            return mean
        g = _normalize(gramian, 0.0)  # scale-invariant: CAGrad's update is homogeneous in J
        v, solved = cagrad_dual(g, self.c)
        w = v / v.sum().clamp_min(torch.finfo(g.dtype).tiny)
        gw_norm = (w @ g @ w).clamp_min(0.0).sqrt()
        regular = solved & (gw_norm >= self.norm_eps)
        if _solvers._early_exit(g) and bool(regular):  # CPU: reading it is free, the projection not needed
            return mean + v
        return torch.where(regular, mean + v, self._stationary_weights(g, mean))

    @staticmethod
    def _stationary_weights(g: Tensor, mean: Tensor) -> Tensor:
        """Weights of the projection of ``g0 = J^T mean`` on ``{d : J d >= 0}``: ``mean + lambda`` with
        ``lambda = argmin_{lambda >= 0} 1/2 ||g0 + J^T lambda||^2`` (the projection's dual, a
        non-negative QP on the Gramian). ``1e-12 diag(G)`` keeps it definite when gradients are
        dependent; relative to each task's own scale, so a 1e-6 gradient beside a 1e6 one still
        constrains the update (the cone does not depend on the rows' scales)."""
        reg = 1e-12 * g.diagonal().clamp_min(torch.finfo(g.dtype).tiny)
        return mean + nonneg_qp(g + torch.diag_embed(reg), mean @ g)


class _DualCone(GramianWeighting):
    """What UPGrad and DualProj share (torchjd's two projections onto the dual cone): their keywords, checked,
    and the Gramian they project on, normalised by its trace and regularised by ``reg_eps I``."""

    _name: str = ""

    def __init__(self, norm_eps: float = 0.0, reg_eps: float = 1e-4, pref_vector: list[float] | None = None) -> None:
        super().__init__()
        _check(norm_eps >= 0 and reg_eps >= 0, f"{self._name}: norm_eps and reg_eps must be >= 0")
        self.norm_eps, self.reg_eps = norm_eps, reg_eps
        self.pref_vector = None if pref_vector is None else list(pref_vector)

    def _regularized(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        return _normalize(gramian, self.norm_eps) + self.reg_eps * torch.eye(n, dtype=gramian.dtype, device=gramian.device)


@register_aggregator("upgrad")
class UPGrad(_DualCone):
    """UPGrad: project each task gradient onto the dual cone of all gradients, then average.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv:2406.16232):
    the update ``J^T w`` with ``w = sum_i v_i``, ``v_i = argmin_{v >= u_i} v^T G v`` and
    ``u_i = e_i / T`` (or ``pref_vector_i e_i``), i.e. Proposition 1's dual form. The Gramian is
    normalised by its trace and regularised by ``reg_eps I`` as in torchjd; the ``T``
    non-negative QPs are solved together by :func:`~polytask.balance.solvers.nonneg_qp`.
    The update never conflicts with any task gradient (non-negative inner products).

    Args:
        norm_eps: ``||J||_F^2`` below which the Jacobian counts as zero (then the weights are
            ``u``, the mean). 0 (default): every scale is normalised, so the update of ``s J`` is
            ``s`` times that of ``J``. torchjd's default 1e-4 turns UPGrad into the mean gradient,
            which conflicts, as soon as the gradients are that small.
        reg_eps: ``reg_eps I`` added to the normalised Gramian (torchjd's default).
        pref_vector: ``u`` (default ``1/T`` each).
    """

    _name = "upgrad"

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        g = self._regularized(gramian)
        u = torch.diag(_preference(self.pref_vector, n, gramian, "upgrad"))
        return (u + nonneg_qp(g, u @ g)).sum(0)


@register_aggregator("dualproj")
class DualProj(_DualCone):
    """DualProj: project the mean gradient onto the dual cone of the task gradients.

    The projection of Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017 (Eq. 11), as used by Quinton & Rey, "Jacobian Descent for Multi-Objective
    Optimization", 2024: ``w = argmin_{v >= u} v^T G v`` with ``u = 1/T`` (or ``pref_vector``).
    Same normalisation/regularisation as :class:`UPGrad`, and the same ``Args``.
    """

    _name = "dualproj"

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        g = self._regularized(gramian)
        u = _preference(self.pref_vector, n, gramian, "dualproj")
        return u + nonneg_qp(g, u @ g)
