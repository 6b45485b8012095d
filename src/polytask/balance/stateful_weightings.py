"""Gramian weightings whose weights carry over from step to step: SDMGrad, MoDo, CR-MOGM, PCD.

SDMGrad and MoDo run a few steps of projected (stochastic) gradient descent on the task weights
per training step, warm-started from the last step's weights; CR-MOGM smooths the weights of any
other Gramian method with a moving average; PCD keeps a moving average of the squared gradient
norms. All four need only the ``T x T`` Gramian, so they run at feature level through the engine's
Gramian path, and all keep their state in buffers (``_LazyStateMixin``): ``state_dict()`` saves it
and the engine's guard undoes a skipped non-finite step.

torchjd 0.18 ships all four (``SDMGradWeighting``, ``MoDoWeighting``, ``CRMOGMWeighting``,
``PCD``); ``tests/test_balance_jd_recent.py`` checks equality over consecutive steps.

One batch, not two. SDMGrad's and MoDo's analyses (and torchjd's examples) feed the weight update
``A = J_1 J_2^T`` from two independent mini-batches, so that it is an unbiased estimate of
``J J^T``. The engine sees one batch per step and passes ``G = J J^T`` (a biased estimate of it,
so the papers' convergence guarantees do not carry over as stated). Where two batches are at hand,
call ``weights(J_1 @ J_2.T)`` directly: it takes any ``T x T`` matrix, as torchjd's weightings do
(``tests/test_balance_jd_recent.py`` checks that case too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polytask.balance.aggregators._base import _SOLVE_DTYPE, GramianWeighting, _LazyStateMixin, _preference, gramian_only
from polytask.balance.compiled import compiled_for
from polytask.balance.registry import register_aggregator
from polytask.balance.solvers import cuda_graphed, nonneg_qp, project_simplex
from polytask.errors import ConfigError

__all__ = ["CRMOGM", "MoDo", "PCD", "SDMGrad", "pcd_weights", "sdmgrad_inner"]


def _in_range(ok: bool, key: str, who: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"balancer.params.{key}: {who} needs {rule}, got {value!r}")


class _WeightState(_LazyStateMixin):
    """A ``(T,)`` float64 buffer ``task_weights``, fresh (uniform ``1/T``) at the first step for ``T`` tasks."""

    def _init_weight_state(self) -> None:
        self.register_buffer("task_weights", torch.zeros(0, dtype=_SOLVE_DTYPE))  # type: ignore[attr-defined]
        self._init_steps()

    def reset(self) -> None:
        """Forget the state: the next step starts afresh, as torchjd's ``reset()``."""
        self.tasks = torch.zeros_like(self.tasks)  # type: ignore[has-type]

    def _previous(self, like: Tensor) -> Tensor:
        """Last step's weights, or ``1/T`` where fresh; counts this step."""
        n = like.shape[0]
        resized = self.task_weights.shape != (n,)  # type: ignore[has-type]
        if resized:
            self.task_weights = torch.zeros(n, dtype=like.dtype, device=like.device)
        fresh = self._fresh(n, resized)
        self._advance(fresh, n)
        return torch.where(fresh, 1.0 / n, self.task_weights.to(like))  # type: ignore[has-type]


@cuda_graphed
def sdmgrad_inner(matrix: Tensor, w: Tensor, w_tilde: Tensor, lr: float, momentum: float, lambda_: float,
                  n_iter: int) -> Tensor:
    """SDMGrad's inner solver: ``n_iter`` steps of projected SGD with heavy-ball momentum on
    ``1/2 ||J^T (w + lambda w_tilde)||^2`` over the simplex, ``A`` scaled by the mean gradient norm
    (``mean_i sqrt(A_ii)``; authors' code and torchjd) so that ``lr`` does not depend on the scale.

    Every step is needed (the iterate is the method, not an approximation of a fixed point: with the
    default ``lr`` it moves between faces of the simplex at almost every step, so no early stop and
    no closed form over a fixed face), so each step is kept to eight small operations: the constant
    pull ``A lambda w_tilde`` is formed once (one ``addmv`` per step, where the product was formed
    from ``w + lambda w_tilde``), and the projection reads its threshold as the largest running
    mean of the sorted values (:func:`~polytask.balance.solvers.project_simplex`), all means in
    one ``addmv`` with a triangular matrix. On the CPU with numba (:mod:`polytask.balance.compiled`)
    the same steps run as one compiled loop (``SDMGrad.weights`` at ``T = 16``: 264 -> 38 torch operations)."""
    kernels = compiled_for(matrix, w, w_tilde)
    if kernels is not None:
        return torch.from_numpy(kernels.sdmgrad_inner(matrix.contiguous().numpy(), w.contiguous().numpy(),
                                                      w_tilde.contiguous().numpy(), float(lr), float(momentum),
                                                      float(lambda_), int(n_iter)))
    scale = matrix.diagonal().clamp_min(0.0).sqrt().mean()
    a = matrix / (scale * scale + 1e-8)
    pull = a @ (lambda_ * w_tilde)
    n = w.shape[-1]
    inv_ks = 1.0 / torch.arange(1, n + 1, dtype=w.dtype, device=w.device)
    running_means = torch.ones(n, n, dtype=w.dtype, device=w.device).tril() * inv_ks.unsqueeze(1)  # row j: 1/j (k <= j)
    minus_inv_ks = -inv_ks
    velocity = torch.zeros_like(w)
    for _ in range(n_iter):  # sequential by construction: each step starts where the last ended
        velocity = torch.add(torch.addmv(pull, a, w), velocity, alpha=momentum)  # A (w + lambda w~) + m v
        y = torch.add(w, velocity, alpha=-lr)
        theta = torch.addmv(minus_inv_ks, running_means, torch.topk(y, n).values).max()  # topk: sorted, decreasing
        w = (y - theta).clamp_min(0.0)
    return w


@register_aggregator("sdmgrad")
class SDMGrad(_WeightState, GramianWeighting):
    """SDMGrad: a direction close to MGDA's, pulled towards a preferred direction (the mean).

    Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023, Algorithm 1: the weights ``w`` on the simplex minimise
    ``1/2 ||J^T (w + lambda w~)||^2`` (Eq. 6; ``w~`` the preference, default ``1/T``), by ``n_iter``
    steps of projected SGD warm-started from the last step's ``w``; the update is ``J^T (w + lambda
    w~) / (1 + lambda)``. ``lambda = 0`` approaches MGDA, large ``lambda`` the mean gradient.
    As the authors' code and torchjd 0.18 (``SDMGradWeighting``): heavy-ball momentum in the inner
    SGD, the matrix scaled by its mean gradient norm first (Section 6.1), ``lambda = 0.3`` (their
    experiments' value; their class default is 0.6). Differences: the engine passes ``J J^T`` of
    one batch, where the paper's unbiased version uses ``J_1 J_2^T`` of two independent ones
    (module docstring); the state restarts when the number of tasks changes (torchjd restarts too).
    The inner loop runs on the device (replayed as a CUDA graph); no host synchronisation.

    Args:
        lr: step size of the inner SGD (> 0).
        momentum: its momentum, in [0, 1).
        n_iter: inner steps per training step (>= 1).
        lambda_: pull towards the preference (>= 0).
        pref_vector: ``w~`` (default ``1/T`` each).
    """

    def __init__(self, lr: float = 10.0, momentum: float = 0.5, n_iter: int = 20, lambda_: float = 0.3,
                 pref_vector: list[float] | None = None) -> None:
        super().__init__()
        _in_range(lr > 0, "lr", "sdmgrad", "lr > 0", lr)
        _in_range(0 <= momentum < 1, "momentum", "sdmgrad", "momentum in [0, 1)", momentum)
        _in_range(n_iter >= 1, "n_iter", "sdmgrad", "n_iter >= 1", n_iter)
        _in_range(lambda_ >= 0, "lambda_", "sdmgrad", "lambda_ >= 0", lambda_)
        self.lr, self.momentum, self.n_iter, self.lambda_ = lr, momentum, n_iter, lambda_
        self.pref_vector = None if pref_vector is None else list(pref_vector)
        self._init_weight_state()

    def weights(self, gramian: Tensor) -> Tensor:
        w_tilde = _preference(self.pref_vector, gramian.shape[0], gramian, "balancer.params.pref_vector: sdmgrad")
        w = sdmgrad_inner(gramian, self._previous(gramian), w_tilde, self.lr, self.momentum, self.lambda_, self.n_iter)
        self.task_weights = w
        return (w + self.lambda_ * w_tilde) / (1.0 + self.lambda_)


@register_aggregator("modo")
class MoDo(_WeightState, GramianWeighting):
    """MoDo: one projected stochastic gradient step on the MGDA weights per training step.

    Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS 2023 (JMLR 2024), the weight update (Eq. 2.9a
    in torchjd's reference to the JMLR version):
    ``lambda <- Pi_simplex(lambda - gamma (J_1 J_2^T + rho I) lambda)``, starting from ``1/T``;
    the update is ``J^T lambda`` with the new ``lambda`` (Eq. 2.9b). Same as torchjd 0.18's
    ``MoDoWeighting``, which takes ``J_1 J_2^T`` from two independent batches; the engine passes
    ``J J^T`` of one (module docstring). The weights are not normalised, so ``gamma`` depends on the
    gradients' scale, as in the paper. No host synchronisation.

    Args:
        gamma: step size of the weight update (> 0).
        rho: ``l2`` regularisation of the weights (>= 0).
    """

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__()
        _in_range(gamma > 0, "gamma", "modo", "gamma > 0", gamma)
        _in_range(rho >= 0, "rho", "modo", "rho >= 0", rho)
        self.gamma, self.rho = gamma, rho
        self._init_weight_state()

    def weights(self, gramian: Tensor) -> Tensor:
        lam = self._previous(gramian)
        lam = project_simplex(lam - self.gamma * (gramian @ lam + self.rho * lam))
        self.task_weights = lam
        return lam


@register_aggregator("cr_mogm", "crmogm")
class CRMOGM(_WeightState, GramianWeighting):
    """CR-MOGM: the weights of another Gramian method, smoothed by a moving average across steps.

    Zhou, Zhang, Jiang, Zhong, Gu & Zhu, "On the Convergence of Stochastic Multi-Objective Gradient
    Manipulation and Beyond", NeurIPS 2022 (the correlation-reduced, "CR", weights):
    ``lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda^_k`` with ``lambda^_k`` the base method's
    weights at step ``k``; the update is ``J^T lambda_k``. ``lambda_0`` is ``initial_weights``, else
    ``lambda^_1`` (the first step returns the base's weights). The paper's Corollary 1 lets
    ``alpha_k`` grow towards 1 as the learning rate decays; here ``alpha`` is fixed (set the
    attribute between steps for a schedule), as in torchjd 0.18's ``CRMOGMWeighting``, which we
    match. The base is any polytask balancer that needs only the Gramian (``mgda``, ``pcgrad``,
    ``cagrad``, ``upgrad``, ...), built from ``base`` and ``base_params``; its own state, if any, is
    a submodule's buffers; a random base (``pcgrad``, ``gradvac``) draws from the generator the
    engine seeds with ``seed``, as that base does alone, so against torchjd's random bases the
    smoothed weights agree in distribution, not draw for draw. Differences from torchjd: a new
    number of tasks restarts the average (torchjd raises). No host synchronisation beyond the base
    method's.

    Args:
        base: the balancer whose weights are smoothed (a Gramian method).
        alpha: weight of the previous average, in [0, 1] (0: the base method itself).
        initial_weights: ``lambda_0`` (default: the base's first weights).
        base_params: the base balancer's parameters.
        generator: the draws of a random base (the engine passes one seeded with ``seed``).
    """

    def __init__(self, base: str = "mgda", alpha: float = 0.9, initial_weights: list[float] | None = None,
                 base_params: dict[str, Any] | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        from polytask.balance.registry import BALANCERS

        _in_range(0 <= alpha <= 1, "alpha", "cr_mogm", "alpha in [0, 1]", alpha)
        params = dict(base_params or {})
        for key in ("mode", "nan_policy", "seed"):
            _in_range(key not in params, f"base_params.{key}", "cr_mogm", "it set on cr_mogm itself, not on its base",
                      params.get(key))
        try:
            built = BALANCERS.build(base, **params)
        except ConfigError as err:  # name the key as the user typed it: base, or base_params.<key>
            message = str(err)
            nested = message.startswith("balancer.params.")
            raise ConfigError(message.replace("balancer.params.", "balancer.params.base_params.", 1) if nested
                              else f"balancer.params.base: {message}") from None
        inner = getattr(built, "aggregator", None)
        _in_range(inner is not None and gramian_only(inner), "base", "cr_mogm",
                  "a gradient balancer that needs only the Gramian", base)
        self.base, self.alpha, self.base_params = base, alpha, params
        self.initial_weights = None if initial_weights is None else list(initial_weights)
        self.inner = inner
        self.generator = generator
        self._init_weight_state()

    @property
    def generator(self) -> torch.Generator | None:
        """The base method's generator (random bases such as PCGrad); the engine seeds it. A deterministic
        base has none, and then neither has this (AttributeError: the engine keeps no generator state)."""
        if not hasattr(self.inner, "generator"):
            raise AttributeError("generator")
        return self.inner.generator

    @generator.setter
    def generator(self, value: torch.Generator | None) -> None:
        if hasattr(self.inner, "generator"):
            self.inner.generator = value

    def reset(self) -> None:
        """Forget the average, and the base method's state if it keeps one (as torchjd's ``reset()``)."""
        super().reset()
        if isinstance(getattr(self.inner, "tasks", None), Tensor):
            self.inner.tasks = torch.zeros_like(self.inner.tasks)

    def weights(self, gramian: Tensor) -> Tensor:
        current = self.inner.weights(gramian)
        n = gramian.shape[0]
        if self.initial_weights is not None and len(self.initial_weights) != n:
            raise ConfigError(f"balancer.params.initial_weights: cr_mogm has {len(self.initial_weights)} entries "
                              f"for {n} tasks")
        start = current if self.initial_weights is None else torch.tensor(self.initial_weights).to(gramian)
        resized = self.task_weights.shape != (n,)
        if resized:
            self.task_weights = torch.zeros(n, dtype=gramian.dtype, device=gramian.device)
        fresh = self._fresh(n, resized)
        self._advance(fresh, n)
        previous = torch.where(fresh, start, self.task_weights.to(gramian))
        self.task_weights = self.alpha * previous + (1.0 - self.alpha) * current
        return self.task_weights


def pcd_weights(normalized: Tensor, taus: Tensor, reg: float = 1e-12) -> Tensor:
    """PCD's QP on the Gramian ``G~`` of the normalised gradients (row 0 primary): ``[1, mu]`` with
    ``d~ = sum_i w_i g~_i``, or ``[1, 0, ..., 0]`` (``d~ = g~_1``) when the constraints are infeasible.

    The primal ``min_d 1/2 ||d - g~_1||^2`` s.t. ``g~_j^T d >= tau_j ||g~_j||^2`` has the dual
    ``min_{mu >= 0} 1/2 mu^T G~_ss mu - b^T mu`` with ``b_j = tau_j G~_jj - G~_j1`` and
    ``d = g~_1 + sum_j mu_j g~_j``; it is solved by :func:`~polytask.balance.solvers.nonneg_qp`
    with ``reg * max(diag) I`` added (the secondary Gramian may be singular: parallel gradients).
    Infeasible constraints make the dual unbounded; the regularised one then needs multipliers of
    order ``1/reg`` and leaves a constraint violated by ``reg * mu``: a violation above ``1e-6``
    of the largest squared norm declares infeasibility (torchjd's exact active-set solver detects
    it from a zero step).
    """
    n = normalized.shape[0]
    gs, cross = normalized[1:, 1:], normalized[1:, 0]
    b = taus * gs.diagonal() - cross
    top = normalized.diagonal().max().clamp_min(torch.finfo(normalized.dtype).tiny)
    eye = torch.eye(n - 1, dtype=normalized.dtype, device=normalized.device)
    mu = nonneg_qp(gs + reg * top * eye, -b)
    violation = (b - gs @ mu).max()
    feasible = violation <= 1e-6 * top
    ones = torch.ones(1, dtype=normalized.dtype, device=normalized.device)
    return torch.cat([ones, torch.where(feasible, mu, 0.0)])


@register_aggregator("pcd")
class PCD(_LazyStateMixin, GramianWeighting):
    """PCD (Priority-Constrained Descent): follow the first task, guarantee progress to the others.

    Varam & AlHajri, "Not All Objectives Are Born Equal: Priority-Constrained Descent for
    Hierarchical Multi-Objective Optimization", TMLR 2026 (arXiv:2606.29521), as torchjd 0.18
    (``PCD``) states it: with normalised gradients ``g~_i = g_i / sqrt(v^_i + eps)`` (``v^_i`` the bias-corrected
    moving average of ``||g_i||^2``, decay ``beta``),
    ``d~ = argmin_d 1/2 ||d - g~_1||^2`` s.t. ``g~_j^T d >= tau_j ||g~_j||^2`` for ``j >= 2``, and
    the update is ``d~`` rescaled to ``||g_1||``. (The paper gives closed forms for two and three
    objectives; any ``T`` is solved here as in torchjd.) The first task (the first loss given to the
    balancer) is the primary one. ``g_1 = 0`` or ``d~ = 0`` (up to rounding) give a zero update;
    infeasible constraints (e.g. two opposite secondary gradients) are dropped and the update is
    ``g_1``. torchjd solves the QP exactly with Goldfarb & Idnani's active-set method on the host
    (a loop with data-dependent branches); we solve its dual with the fixed-iteration
    :func:`~polytask.balance.solvers.nonneg_qp` on the device (:func:`pcd_weights`; regularised
    by ``1e-12`` of the largest squared norm: the update agrees with torchjd's to ~1e-9, the
    multipliers may split differently between parallel secondary gradients). The rounding
    threshold for ``d~ = 0`` is that of float64 (torchjd uses the input's dtype). No host
    synchronisation. On the CPU with numba, everything after the moving average (normalisation, QP,
    rescaling) runs as one compiled loop (:mod:`polytask.balance.compiled`; 329 -> 66 torch
    operations per step at ``T = 16``), the same steps to rounding.

    Args:
        tau: the fraction in [0, 1] of normalised first-order progress guaranteed to every
            secondary task, one value or one per secondary task.
        beta: decay of the moving average of the squared norms, in [0, 1).
        eps: added to the average before the inverse square root (>= 0).
    """

    def __init__(self, tau: float | list[float] = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__()
        taus = [tau] if isinstance(tau, (int, float)) else list(tau)
        _in_range(all(0 <= t <= 1 for t in taus), "tau", "pcd", "tau in [0, 1]", tau)
        _in_range(0 <= beta < 1, "beta", "pcd", "beta in [0, 1)", beta)
        _in_range(eps >= 0, "eps", "pcd", "eps >= 0", eps)
        self.tau, self.beta, self.eps = tau, beta, eps
        self.register_buffer("sq_norm_avg", torch.zeros(0, dtype=_SOLVE_DTYPE))
        self._init_steps()

    def reset(self) -> None:
        """Forget the moving average: the next step starts afresh, as torchjd's ``reset()``."""
        self.tasks = torch.zeros_like(self.tasks)

    def _taus(self, n: int, like: Tensor) -> Tensor:
        if isinstance(self.tau, (int, float)):
            return torch.full((n - 1,), float(self.tau), dtype=like.dtype, device=like.device)
        if len(self.tau) != n - 1:
            raise ConfigError(f"balancer.params.tau: pcd needs one tau per secondary task ({n - 1}), got {len(self.tau)}")
        return torch.tensor(self.tau, dtype=like.dtype, device=like.device)

    def _scales(self, sq_norms: Tensor) -> Tensor:
        """Update the moving average; ``1 / sqrt(v^ + eps)`` (0 where the average is 0)."""
        n = sq_norms.shape[0]
        resized = self.sq_norm_avg.shape != (n,)
        if resized:
            self.sq_norm_avg = torch.zeros_like(sq_norms)
        fresh = self._fresh(n, resized)
        steps = self._advance(fresh, n) + 1
        avg = self.beta * torch.where(fresh, 0.0, self.sq_norm_avg.to(sq_norms)) + (1.0 - self.beta) * sq_norms
        self.sq_norm_avg = avg
        denominators = (avg / (1.0 - self.beta ** steps.to(avg.dtype)) + self.eps).sqrt()
        return torch.where(denominators > 0, 1.0 / denominators.clamp_min(torch.finfo(avg.dtype).tiny), 0.0)

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        sq_norms = gramian.diagonal()
        scales = self._scales(sq_norms)
        if n == 1:  # no constraint: d = g_1 (0 if g_1 = 0)
            return (sq_norms > 0).to(sq_norms.dtype)
        kernels = compiled_for(gramian, scales)
        if kernels is not None:  # the rest as one compiled loop (float64 CPU, numba installed): same steps
            taus = self._taus(n, gramian)
            return torch.from_numpy(kernels.pcd_step_weights(gramian.contiguous().numpy(), scales.contiguous().numpy(),
                                                             taus.numpy(), 1e-12, 3 * (n - 1) // 2 + 10))
        normalized = gramian * torch.outer(scales, scales)
        w = pcd_weights(normalized, self._taus(n, gramian))
        direction_sq_norm = w @ normalized @ w
        magnitude = (w.abs() @ normalized.diagonal().clamp_min(0.0).sqrt()) ** 2
        precision = 10.0 * torch.finfo(gramian.dtype).eps
        keep = (sq_norms[0] > 0) & (direction_sq_norm > precision * magnitude)
        rescale = (sq_norms[0] / direction_sq_norm.clamp_min(torch.finfo(gramian.dtype).tiny)).sqrt()
        return torch.where(keep, w * scales * rescale, 0.0)
