"""Stateful methods that read the Jacobian itself, not only its Gramian: ExcessMTL, MoCo, MetaBalance."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.balance.aggregators._base import _check, _LazyStateMixin, _least_squares_weights, Aggregator
from polytask.balance.registry import register_aggregator
from polytask.balance.solvers import project_simplex


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
