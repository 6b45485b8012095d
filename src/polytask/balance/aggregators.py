"""Gradient aggregators: the ``T x D`` matrix of task gradients -> one update direction.

Each aggregator is a small ``nn.Module``. ``aggregator(J)`` returns the aggregated ``D``-vector;
``aggregator.aggregate(J)`` returns ``(vector, weights)``. Most methods only need the Gramian
``G = J J^T`` (:class:`GramianWeighting`: ``weights(G)``, update ``J^T w``); the others read the
Jacobian itself (:class:`GradDrop`, :class:`ExcessMTL`, :class:`MoCo`, :class:`MetaBalance`).

All solvers run in torch on the Jacobian's device with fixed iteration counts (no scipy, no host
synchronisation), in float64 on the ``T x T`` problem for accuracy; on CUDA their loops (and PCGrad's
and GradVac's) replay CUDA graphs (:func:`~polytask.balance.solvers.cuda_graphed`). Exceptions, documented per
class: :class:`IMTLG`, :class:`AlignedMTL` and :class:`ConFIG` need an eigendecomposition or
pseudo-inverse, which synchronises on CUDA.

State (GradVac's targets, Nash-MTL's warm start, MoCo's tracking, ExcessMTL's statistics, MetaBalance's norms) lives in
buffers only, step counters included, so ``state_dict()`` saves and restores it and the engine's
guard can undo a skipped step (:class:`_LazyStateMixin`).

Non-finite input: every aggregator returns a non-finite update (NaN/inf in, NaN/inf out), without
raising and without a host synchronisation, so the engine skips the step. The methods that
decompose the Gramian (eigh, pinv would raise) solve on the identity instead and return NaN
weights (:func:`_finite_or_identity`).
"""

from __future__ import annotations

import inspect
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from polytask.balance import solvers as _solvers
from polytask.balance.solvers import (
    cagrad_dual,
    cuda_graphed,
    frank_wolfe_min_norm,
    min_norm_simplex,
    nonneg_qp,
    power_fair_weights,
    project_simplex,
)
from polytask.balance.registry import register_aggregator
from polytask.errors import ConfigError

__all__ = [
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "GramianWeighting",
    "IMTLG",
    "MGDA",
    "MetaBalance",
    "MoCo",
    "NashMTL",
    "PCGrad",
    "UPGrad",
]

_SOLVE_DTYPE = torch.float64


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class Aggregator(nn.Module):
    """Base class: aggregate a ``(T, D)`` Jacobian (one row per task) into a ``(D,)`` update.

    ``parameter_space_only`` is True for methods whose state is indexed by the coordinates of the
    Jacobian (MoCo, ExcessMTL, MetaBalance): they need the same ``D`` coordinates at every step, i.e.
    gradients w.r.t. parameters, not w.r.t. a batch of features.
    """

    parameter_space_only: ClassVar[bool] = False
    #: Numbers of elements of the shared parameter tensors whose flattened gradients make up the
    #: Jacobian's columns, in order; set by the engine in parameter mode (``None``: unknown).
    parameter_sizes: list[int] | None = None

    def extra_repr(self) -> str:
        """The constructor's keywords and their values (a printed balancer shows its hyperparameters)."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n not in ("self", "generator")]
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in names if hasattr(self, n))

    def aggregate(self, jacobian: Tensor) -> tuple[Tensor, Tensor]:
        """``(update, weights)``; ``weights`` (``(T,)``) are such that ``update = J^T weights``
        where the method's update lies in the span of the task gradients (else a least-squares
        fit, for logging)."""
        raise NotImplementedError

    def forward(self, jacobian: Tensor) -> Tensor:
        """The aggregated ``(D,)`` update."""
        if jacobian.ndim != 2:
            raise ValueError(f"expected a (T, D) Jacobian, got shape {tuple(jacobian.shape)}")
        return self.aggregate(jacobian)[0]


class GramianWeighting(Aggregator):
    """An aggregator whose update is ``J^T w`` with ``w`` a function of ``G = J J^T`` only."""

    def weights(self, gramian: Tensor) -> Tensor:
        """The ``(T,)`` weights, given the ``(T, T)`` Gramian of the task gradients."""
        raise NotImplementedError

    def solve(self, gramian: Tensor) -> Tensor:
        """:meth:`weights` solved in float64, returned in the Gramian's dtype: the one entry for every
        source of the Gramian (the Jacobian here; the engine's linear heads and all-reduced Gramians)."""
        return self.weights(gramian.to(_SOLVE_DTYPE)).to(gramian.dtype)

    def aggregate(self, jacobian: Tensor) -> tuple[Tensor, Tensor]:
        w = self.solve(jacobian @ jacobian.T)
        return w @ jacobian, w


def _normalize(gramian: Tensor, eps: float) -> Tensor:
    """``G / trace(G)`` (the Gramian of the Frobenius-normalised Jacobian); 0 if the trace < eps."""
    trace = gramian.diagonal().sum()
    return torch.where(trace < eps, torch.zeros_like(gramian), gramian / trace.clamp_min(torch.finfo(gramian.dtype).tiny))


def _finite_or_identity(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """``(G, True)`` when every entry of ``G`` is finite, else ``(I, False)``, as tensors (no host sync).

    For the methods that decompose ``G`` (eigh, pinv): those raise on NaN/inf. They solve on the
    identity instead and return :func:`_nan_unless` the flag, which the engine's guard skips."""
    finite = torch.isfinite(gramian).all()
    eye = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    return torch.where(finite, gramian, eye), finite


def _nan_unless(finite: Tensor, weights: Tensor) -> Tensor:
    """``weights`` where ``finite``, else NaN (a non-finite input gives a non-finite result)."""
    return torch.where(finite, weights, torch.full_like(weights, float("nan")))


def _random_orders(n: int, device: torch.device, generator: torch.Generator | None, exclude_self: bool) -> Tensor:
    """``(n, n)`` (or ``(n, n-1)`` without self) rows of independent random permutations."""
    keys = torch.rand(n, n, device=device, generator=generator)
    if exclude_self:
        keys = keys + torch.eye(n, device=device) * 2.0  # self sorts last, then dropped
        return keys.argsort(dim=1)[:, : n - 1]
    return keys.argsort(dim=1)


class _LazyStateMixin:
    """State whose shape is only known at the first step (number of tasks, parameters), in buffers.

    The buffers start empty; loading a state dict resizes them first, so save/restore works. Two
    0-d buffers say what the state is worth: ``tasks``, the number of tasks it belongs to (0 before
    the first applied step), and ``steps``, the steps applied to it. The state is fresh where
    ``tasks != T`` (or a buffer was just resized), decided on the device with ``torch.where``, never
    from a buffer's shape alone: a skipped non-finite step leaves both counters as they were (the
    engine restores every buffer that kept its shape, :mod:`polytask.balance.engine`), so whatever
    that step created lazily -- at the first step, or the first with another task set -- is
    ignored by the next one, and a NaN there cannot poison the method. State dicts written before
    the counters were buffers (``steps`` was in ``get_extra_state``, under ``_legacy_counter``)
    still load.
    """

    _legacy_counter: ClassVar[str | None] = None
    #: None: these methods replace their buffers at each step (``self.x = f(...)``), never change them in place,
    #: so the engine's non-finite guard keeps a reference to the old tensors instead of copies (a ``T x D``
    #: buffer, MoCo's or ExcessMTL's, is not copied every step).
    _state_updated_in_place: ClassVar[tuple[str, ...]] = ()

    def _init_steps(self) -> None:
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # type: ignore[attr-defined]
        self.register_buffer("tasks", torch.zeros((), dtype=torch.long))  # type: ignore[attr-defined]

    def _fresh(self, n: int, resized: bool = False) -> Tensor:
        """0-d bool: no state for these ``n`` tasks yet (``resized``: a buffer was just reallocated)."""
        return (self.tasks != n) | resized  # type: ignore[attr-defined]

    def _advance(self, fresh: Tensor, n: int) -> Tensor:
        """Count this step (for ``n`` tasks); returns the number of steps applied before it (0 if fresh)."""
        before = torch.where(fresh, 0, self.steps)  # type: ignore[attr-defined]
        self.steps, self.tasks = before + 1, torch.full_like(self.tasks, n)  # type: ignore[attr-defined]
        return before

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        legacy = state_dict.pop(prefix + "_extra_state", None)
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k[len(prefix):] in self._buffers}  # type: ignore[attr-defined]
        if "steps" not in own:  # saved before the counters were buffers
            if self._legacy_counter:
                count = int(legacy.get(self._legacy_counter, 0)) if isinstance(legacy, dict) else 0
            else:  # no counter saved: any saved state means steps were taken
                count = int(any(v.numel() > 0 for v in own.values()))
            sizes = [v.shape[0] for v in own.values() if v.ndim >= 1 and v.numel() > 0]
            state_dict[prefix + "steps"] = torch.tensor(count)
            state_dict[prefix + "tasks"] = torch.tensor(sizes[0] if sizes and count else 0)
        for name, buf in self._buffers.items():  # type: ignore[attr-defined]
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)  # type: ignore[attr-defined]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Gramian-based methods
# ---------------------------------------------------------------------------------------------


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


@register_aggregator("pcgrad")
class PCGrad(GramianWeighting):
    """PCGrad: project each task gradient on the normal plane of every gradient it conflicts with.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1: for each task
    ``i``, visit the other tasks ``j`` in a random order; if ``g_i^PC . g_j < 0`` set
    ``g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j``. The update is ``sum_i g_i^PC``. Tracked as
    coefficients ``g_i^PC = sum_k C_ik g_k`` so only the Gramian is needed; all tasks ``i`` are
    processed in parallel (one step per position in the random order). LibMTL 1.1.5's loop also
    visits ``j = i`` (projecting ``g_i^PC`` on its own ``g_i`` if they conflict after earlier
    projections); torchjd 0.18 and we skip it.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        return pcgrad_coefficients(gramian, _random_orders(n, gramian.device, self.generator, False)).sum(0)


@cuda_graphed
def pcgrad_coefficients(gramian: Tensor, orders: Tensor) -> Tensor:
    """PCGrad's projected gradients as coefficients ``C`` (``g_i^PC = sum_k C_ik g_k``).

    ``orders[i]`` is the order (a permutation of all tasks; ``i`` itself is skipped) in which
    task ``i`` is projected against the others.
    """
    n = gramian.shape[0]
    rows = torch.arange(n, device=gramian.device).unsqueeze(1)
    coef = torch.eye(n, dtype=gramian.dtype, device=gramian.device)
    # Everything that depends on the order only, gathered once: the Gramian rows met at each
    # position and the squared norms to divide by (inf for i itself, so its step is exactly 0).
    met = gramian[orders]  # met[i, k] = G[orders[i, k]]
    sq_norm = gramian.diagonal()[orders].clamp_min(torch.finfo(gramian.dtype).tiny)
    sq_norm = torch.where(orders == rows, torch.full_like(sq_norm, float("inf")), sq_norm)
    for met_k, norm_k, j in zip(met.unbind(1), sq_norm.unbind(1), orders.unsqueeze(-1).unbind(1)):
        inner = (coef * met_k).sum(1, keepdim=True)  # g_i^PC . g_j for every i
        # -inner / ||g_j||^2 where they conflict (inner < 0), else 0.
        coef.scatter_add_(1, j, (-inner).clamp_min(0.0) / norm_k.unsqueeze(1))
    return coef


@register_aggregator("gradvac")
class GradVac(_LazyStateMixin, GramianWeighting):
    """Gradient Vaccine: raise each pair's cosine similarity towards an EMA target.

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", ICLR 2021, Algorithm 1 (applied to the whole shared
    parameter vector). For each task ``i`` and the other tasks ``j`` in random order: if
    ``phi_ij = cos(g_i, g_j) < phi_hat_ij``, add
    ``||g_i|| (phi_hat sqrt(1-phi^2) - phi sqrt(1-phi_hat^2)) / (||g_j|| sqrt(1-phi_hat^2)) g_j``
    to ``g_i``; then ``phi_hat_ij <- (1-beta) phi_hat_ij + beta phi_ij``. ``phi_hat`` is a buffer.
    The EMA moves every visited pair's target, as in the paper; LibMTL 1.1.5 moves only the targets
    of the pairs it corrected (``tests/test_balance_peer_libmtl.py`` pins both).

    Args:
        beta: EMA rate of the similarity targets, in [0, 1].
        eps: added to denominators.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check(0.0 <= beta <= 1.0, f"gradvac: beta must be in [0, 1], got {beta}")
        _check(eps >= 0.0, f"gradvac: eps must be >= 0, got {eps}")
        self.beta, self.eps, self.generator = beta, eps, generator
        self.register_buffer("phi_hat", torch.zeros(0, 0, dtype=_SOLVE_DTYPE))
        self._init_steps()

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        resized = self.phi_hat.shape != (n, n)
        if resized:
            self.phi_hat = torch.zeros(n, n, dtype=_SOLVE_DTYPE, device=gramian.device)
        orders = _random_orders(n, gramian.device, self.generator, True)
        fresh = self._fresh(n, resized)
        phi_hat = torch.where(fresh, 0.0, self.phi_hat.to(gramian))
        coef, self.phi_hat = gradvac_coefficients(gramian, phi_hat, orders, self.beta, self.eps)
        self._advance(fresh, n)
        return coef.sum(0)


@cuda_graphed
def gradvac_coefficients(gramian: Tensor, phi_hat: Tensor, orders: Tensor, beta: float, eps: float) -> tuple[Tensor, Tensor]:
    """GradVac's corrected gradients as coefficients, and the updated targets ``phi_hat``.

    ``orders[i]``: the other tasks in the order task ``i`` visits them (``(T, T-1)``).
    """
    n = gramian.shape[0]
    rows = torch.arange(n, device=gramian.device)
    coef = torch.eye(n, dtype=gramian.dtype, device=gramian.device)
    cg = gramian.clone()  # cg[i] = (g_i^PC . g_k)_k
    diag = gramian.diagonal().clamp_min(0.0)
    phi_hat = phi_hat.clone()
    for k in range(orders.shape[1]):
        j = orders[:, k]
        dot = cg[rows, j]
        norm_i = (cg * coef).sum(1).clamp_min(0.0).sqrt()
        norm_j = diag[j].sqrt()
        phi = dot / (norm_i * norm_j + eps)
        hat = phi_hat[rows, j]
        sin_phi = (1.0 - phi * phi).clamp_min(0.0).sqrt()
        sin_hat = (1.0 - hat * hat).clamp_min(0.0).sqrt()
        w = norm_i * (hat * sin_phi - phi * sin_hat) / (norm_j * sin_hat + eps)
        w = torch.where(phi < hat, w, torch.zeros_like(w))
        coef = coef.index_put((rows, j), w, accumulate=True)
        cg = cg + w.unsqueeze(1) * gramian[j]
        phi_hat = phi_hat.index_put((rows, j), (1.0 - beta) * hat + beta * phi)
    return coef, phi_hat


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


def _preference(pref: list[float] | None, n: int, like: Tensor, who: str) -> Tensor:
    if pref is None:
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    if len(pref) != n:
        raise ConfigError(f"{who}: pref_vector has {len(pref)} entries but there are {n} tasks")
    return torch.tensor(pref, dtype=like.dtype, device=like.device)


@register_aggregator("upgrad")
class UPGrad(GramianWeighting):
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

    def __init__(self, norm_eps: float = 0.0, reg_eps: float = 1e-4, pref_vector: list[float] | None = None) -> None:
        super().__init__()
        _check(norm_eps >= 0 and reg_eps >= 0, "upgrad: norm_eps and reg_eps must be >= 0")
        self.norm_eps, self.reg_eps = norm_eps, reg_eps
        self.pref_vector = None if pref_vector is None else list(pref_vector)

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        g = _normalize(gramian, self.norm_eps) + self.reg_eps * torch.eye(n, dtype=gramian.dtype, device=gramian.device)
        u = torch.diag(_preference(self.pref_vector, n, gramian, "upgrad"))
        return (u + nonneg_qp(g, u @ g)).sum(0)


@register_aggregator("dualproj")
class DualProj(GramianWeighting):
    """DualProj: project the mean gradient onto the dual cone of the task gradients.

    The projection of Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017 (Eq. 11), as used by Quinton & Rey, "Jacobian Descent for Multi-Objective
    Optimization", 2024: ``w = argmin_{v >= u} v^T G v`` with ``u = 1/T`` (or ``pref_vector``).
    Same normalisation/regularisation as :class:`UPGrad`, and the same ``Args``.
    """

    def __init__(self, norm_eps: float = 0.0, reg_eps: float = 1e-4, pref_vector: list[float] | None = None) -> None:
        super().__init__()
        _check(norm_eps >= 0 and reg_eps >= 0, "dualproj: norm_eps and reg_eps must be >= 0")
        self.norm_eps, self.reg_eps = norm_eps, reg_eps
        self.pref_vector = None if pref_vector is None else list(pref_vector)

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        g = _normalize(gramian, self.norm_eps) + self.reg_eps * torch.eye(n, dtype=gramian.dtype, device=gramian.device)
        u = _preference(self.pref_vector, n, gramian, "dualproj")
        return u + nonneg_qp(g, u @ g)


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


# ---------------------------------------------------------------------------------------------
# Jacobian-based methods
# ---------------------------------------------------------------------------------------------


def _least_squares_weights(jacobian: Tensor, update: Tensor) -> Tensor:
    """Weights ``w`` minimising ``||J^T w - update||`` (for logging methods not in the span)."""
    gram, finite = _finite_or_identity((jacobian @ jacobian.T).to(_SOLVE_DTYPE))
    w = torch.linalg.pinv(gram, hermitian=True) @ (jacobian @ update).to(_SOLVE_DTYPE)
    return _nan_unless(finite, w).to(jacobian.dtype)


@register_aggregator("graddrop", default_mode="features")
class GradDrop(Aggregator):
    """GradDrop: keep, per coordinate, only the gradients of one randomly chosen sign.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020, Algorithm 1 (lines 10-15): the sign purity ``P = 1/2 (1 + sum_i g_i / sum_i
    |g_i|)`` per coordinate, a uniform draw ``U``; task ``i`` keeps its coordinate if
    ``P > U`` and ``g_i > 0`` or ``P < U`` and ``g_i < 0``. ``leak`` (per task) lets a fraction
    through. The paper applies it to the gradients at the shared features (``mode="features"``).
    We take the purity per coordinate of the feature Jacobian (per sample and feature); the paper's
    batch-reduced form, which LibMTL 1.1.5 runs, first sums ``sign(z) * ∂L_i/∂z`` over the batch
    and draws one mask per feature for the whole batch (equal for a batch of one, ``z > 0``).
    Logged weights are a least-squares fit (the update is not in the span of the gradients).
    """

    def __init__(self, leak: list[float] | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.leak = None if leak is None else list(leak)
        self.generator = generator

    def aggregate(self, jacobian: Tensor) -> tuple[Tensor, Tensor]:
        n = jacobian.shape[0]
        leak = torch.zeros(n, dtype=jacobian.dtype, device=jacobian.device) if self.leak is None else _preference(self.leak, n, jacobian, "graddrop")
        purity = 0.5 * (1.0 + jacobian.sum(0) / jacobian.abs().sum(0))
        draw = torch.rand(purity.shape, dtype=jacobian.dtype, device=jacobian.device, generator=self.generator)
        keep = ((purity > draw) & (jacobian > 0)) | ((purity < draw) & (jacobian < 0))
        update = ((leak.unsqueeze(1) + (1.0 - leak.unsqueeze(1)) * keep) * jacobian).sum(0)
        return update, _least_squares_weights(jacobian, update)


@register_aggregator("excess_mtl", "excessmtl")
class ExcessMTL(_LazyStateMixin, Aggregator):
    """ExcessMTL: up-weight tasks with a large estimated excess risk.

    He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024: the excess risk of task
    ``i`` is estimated as ``g_i^T H_i^-1 g_i`` with an AdaGrad diagonal ``H_i = sqrt(sum_s g_i^2)``
    (Eqs. 6-7), divided by its value at the first step (Sec. 3.2), and the weights on the simplex
    follow an exponentiated-gradient step ``w <- w exp(eta E) / Z`` (Eq. 9). The update is
    ``J^T w``. The AdaGrad statistics are per parameter, so this method runs in parameter mode.
    The step that sets the baseline leaves the weights uniform (its normalised excess risks are all
    1; the authors' code skips the update there); applying the raw, unnormalised first-step excess
    risk instead (as torchjd 0.18 does) puts ``exp(eta * sum_k |g_ik|)`` on each task and collapses
    all weight onto one task at the first step. Weights stay on the simplex (the paper); the
    authors' code scales them to sum to ``T``.

    Args:
        robust_step_size: ``eta`` (default 0.01, the authors' code's default). The weights are
            ``softmax(eta * sum over steps of E_i)``: a large ``eta`` (torchjd's default is 1) puts all
            the weight on one task within a few hundred steps (benchmarks/balance_quality.py).
        n_warmup_steps: steps with uniform weights whose mean excess risk becomes the baseline
            (0: the first step's excess risk is the baseline).
    """

    parameter_space_only = True
    _legacy_counter = "steps"

    def __init__(self, robust_step_size: float = 1e-2, n_warmup_steps: int = 0) -> None:
        super().__init__()
        _check(robust_step_size > 0, f"excess_mtl: robust_step_size must be > 0, got {robust_step_size}")
        _check(n_warmup_steps >= 0, f"excess_mtl: n_warmup_steps must be >= 0, got {n_warmup_steps}")
        self.robust_step_size, self.n_warmup_steps = robust_step_size, n_warmup_steps
        self.register_buffer("task_weights", torch.zeros(0))
        self.register_buffer("sq_grad_sum", torch.zeros(0, 0))
        self.register_buffer("baseline", torch.zeros(0))
        self.register_buffer("warmup_sum", torch.zeros(0))
        self._init_steps()

    def aggregate(self, jacobian: Tensor) -> tuple[Tensor, Tensor]:
        n = jacobian.shape[0]
        resized = self.sq_grad_sum.shape != jacobian.shape
        if resized:
            self.sq_grad_sum = torch.zeros_like(jacobian)
            self.task_weights = torch.full((n,), 1.0 / n, dtype=jacobian.dtype, device=jacobian.device)
            self.warmup_sum = torch.zeros(n, dtype=jacobian.dtype, device=jacobian.device)
        if self.baseline.shape != (n,):  # (0,) in state dicts saved before the baseline was set
            self.baseline = torch.zeros(n, dtype=jacobian.dtype, device=jacobian.device)
        # Fresh state where no step was applied yet (not from the buffers: a skipped step may have filled them).
        fresh = self._fresh(n, resized)
        step = self._advance(fresh, n) + 1
        sq = jacobian.detach() ** 2
        self.sq_grad_sum = torch.where(fresh, sq, self.sq_grad_sum + sq)
        weights = torch.where(fresh, 1.0 / n, self.task_weights)
        warmup_sum = torch.where(fresh, 0.0, self.warmup_sum)
        excess = (sq / torch.sqrt(self.sq_grad_sum + 1e-7)).sum(1)
        warmup = self.n_warmup_steps
        # The baseline is set at step warmup + 1: the warm-up's mean excess risk, or (no warm-up) that
        # step's own, whose normalised excess risks are all 1 -- the weights stay uniform there (as in
        # the authors' code, which skips the update on that step).
        first = step == warmup + 1
        self.baseline = torch.where(first, warmup_sum / warmup if warmup else excess, self.baseline)
        self.warmup_sum = torch.where(step <= warmup, warmup_sum + excess, warmup_sum)
        # Exponentiated gradient in log space: a huge excess risk saturates instead of overflowing.
        moved = torch.softmax(torch.log(weights) + self.robust_step_size * excess / (self.baseline + 1e-7), dim=0)
        self.task_weights = torch.where((step > warmup) & ~(first & (warmup == 0)), moved, weights)
        return self.task_weights @ jacobian, self.task_weights


@register_aggregator("moco")
class MoCo(_LazyStateMixin, Aggregator):
    """MoCo: stochastic MGDA with a tracked (bias-corrected) gradient estimate.

    Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent
    Approach", ICLR 2023, Algorithm 1: track ``Y <- Y - beta (Y - J)``, update the weights by a
    projected gradient step on the regularised min-norm objective
    ``lambda <- Proj_simplex(lambda - gamma (Y Y^T + rho I) lambda)``, and return ``Y^T lambda``.
    ``Y`` is indexed by parameter, so this method runs in parameter mode. The logged weights are
    ``lambda`` (they weight the tracked gradients ``Y``, not this step's ``J``).

    Args:
        beta: tracking rate of ``Y`` (``alpha_k`` in the paper).
        gamma: step size of the weights (``gamma_k``).
        rho: regularisation of the weight sub-problem.
    """

    parameter_space_only = True

    def __init__(self, beta: float = 0.5, gamma: float = 0.1, rho: float = 0.0) -> None:
        super().__init__()
        _check(0 < beta <= 1, f"moco: beta must be in (0, 1], got {beta}")
        _check(gamma > 0 and rho >= 0, "moco: gamma must be > 0 and rho >= 0")
        self.beta, self.gamma, self.rho = beta, gamma, rho
        self.register_buffer("tracked", torch.zeros(0, 0))
        self.register_buffer("task_weights", torch.zeros(0))
        self._init_steps()

    def aggregate(self, jacobian: Tensor) -> tuple[Tensor, Tensor]:
        n = jacobian.shape[0]
        resized = self.tracked.shape != jacobian.shape
        if resized:
            self.tracked = torch.zeros_like(jacobian)
            self.task_weights = torch.zeros(n, dtype=jacobian.dtype, device=jacobian.device)
        # The first applied step starts from Y = J and uniform weights (see _LazyStateMixin).
        fresh, jac = self._fresh(n, resized), jacobian.detach()
        tracked = torch.where(fresh, jac, self.tracked)
        self.tracked = tracked - self.beta * (tracked - jac)
        weights = torch.where(fresh, 1.0 / n, self.task_weights)
        gram = self.tracked @ self.tracked.T + self.rho * torch.eye(n, dtype=jacobian.dtype, device=jacobian.device)
        self.task_weights = project_simplex(weights - self.gamma * gram @ weights)
        self._advance(fresh, n)
        return self.task_weights @ self.tracked, self.task_weights


@register_aggregator("metabalance", "meta_balance")
class MetaBalance(_LazyStateMixin, Aggregator):
    """MetaBalance: rescale the auxiliary tasks' gradients toward the target task's magnitude.

    He et al., "MetaBalance: Improving Multi-Task Recommendations via Adapting Gradient Magnitudes
    of Auxiliary Tasks", WWW 2022, Algorithm 1: the first task is the target, the others auxiliary.
    Per shared parameter tensor ``p`` and task ``t``, a moving average of the gradient norm
    ``m_tp <- beta m_tp + (1 - beta) ||g_tp||`` (from 0, no bias correction), and each task's
    gradient is rescaled as ``g_tp (r m_0p / (m_tp + 1e-5) + 1 - r)`` (the relax factor ``r``
    interpolates between the target's magnitude and the task's own; the target itself gets the
    factor up to the ``1e-5``); the update is the sum. As torch-rechub 0.9.0's ``MetaBalance``
    optimizer. The norms are per parameter tensor (the engine sets :attr:`parameter_sizes`; without
    them the whole Jacobian row is one tensor), so this method runs in parameter mode. Logged
    weights are the factors when there is one tensor, else a least-squares fit.

    Args:
        relax_factor: ``r`` in ``[0, 1)`` (0: plain sum of the gradients).
        beta: moving-average coefficient in ``[0, 1)``.
    """

    parameter_space_only = True

    def __init__(self, relax_factor: float = 0.7, beta: float = 0.9) -> None:
        super().__init__()
        _check(0 <= relax_factor < 1, f"metabalance: relax_factor must be in [0, 1), got {relax_factor}")
        _check(0 <= beta < 1, f"metabalance: beta must be in [0, 1), got {beta}")
        self.relax_factor, self.beta = relax_factor, beta
        self.register_buffer("norms", torch.zeros(0, 0))
        self._init_steps()

    def _sizes(self, dim: int) -> list[int]:
        sizes = self.parameter_sizes
        return list(sizes) if sizes and sum(sizes) == dim else [dim]

    def aggregate(self, jacobian: Tensor) -> tuple[Tensor, Tensor]:
        n, sizes = jacobian.shape[0], self._sizes(jacobian.shape[1])
        resized = self.norms.shape != (n, len(sizes))
        if resized:
            self.norms = torch.zeros(n, len(sizes), dtype=jacobian.dtype, device=jacobian.device)
        fresh, jac = self._fresh(n, resized), jacobian.detach()
        blocks = jac.split(sizes, dim=1)
        current = torch.stack([b.norm(dim=1) for b in blocks], dim=1)  # (T, P)
        self.norms = torch.where(fresh, 0.0, self.norms) * self.beta + (1.0 - self.beta) * current
        factors = self.relax_factor * self.norms[:1] / (self.norms + 1e-5) + (1.0 - self.relax_factor)  # (T, P)
        update = torch.cat([(f.unsqueeze(1) * b).sum(0) for f, b in zip(factors.T, blocks)])
        self._advance(fresh, n)
        weights = factors[:, 0] if len(sizes) == 1 else _least_squares_weights(jac, update)
        return update, weights
