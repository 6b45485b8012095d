"""Loss-based balancers: they need only the loss values of each step (cost: one backward).

Each one computes detached task weights ``w`` from the detached losses and back-propagates
``Σ_t w_t L_t``; the gradient is the one of the method's objective. Balancers with learnable
quantities (UW's log-variances, IMTL-L's scales) keep them as buffers and train them with their
own small optimizer inside :meth:`backward` (see :mod:`polytask.balance._loss_state`): a training
loop only moves the balancer to the device and saves its ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from polytask.balance._loss_state import BufferOptimizer, TaskStateBalancer, present_tasks
from polytask.balance.base import LossWeighting
from polytask.balance.registry import BALANCERS
from polytask.errors import ConfigError


@BALANCERS.register("ew", "equal", "ls")
class EqualWeighting(LossWeighting):
    """Equal weighting (EW, "linear scalarisation"): the update minimises ``Σ_t L_t``.

    The baseline every multi-task optimisation paper compares with (e.g. Navon et al., ICML 2022,
    call it LS).
    """

    def weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses)


def _positive(value: float, name: str, who: str) -> float:
    if not value > 0:
        raise ConfigError(f"balancer {who!r}: {name} must be > 0, got {value!r}")
    return float(value)


class _LearnedLogScale(TaskStateBalancer):
    """A per-task log-scale ``s`` learned beside the model (UW, IMTL-L): a buffer of the balancer (``_state_buffer``),
    stepped by the balancer's own optimizer after each backward along :meth:`state_grad` (tasks absent from the
    batch keep theirs). Subclasses give :meth:`weights`, :meth:`objective` and :meth:`state_grad`; ``_name`` is the
    method's name in messages."""

    _name: str = ""

    def __init__(self, lr: float = 1e-2, optimizer: Literal["adam", "sgd"] = "adam",
                 nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        self.register_buffer(self._state_buffer, torch.zeros(0))
        self.opt = BufferOptimizer(optimizer, lr=_positive(lr, "lr", self._name))

    def _init_state(self, losses: Tensor) -> None:
        setattr(self, self._state_buffer, torch.zeros_like(losses))

    def objective(self, losses: Tensor) -> Tensor:
        """The method's objective in ``s`` for a ``(T,)`` loss vector (its gradient is :meth:`state_grad`)."""
        raise NotImplementedError

    def state_grad(self, losses: Tensor, weights: Tensor) -> Tensor:
        """``∂ objective / ∂ s`` at this step's detached ``(T,)`` losses and ``weights``."""
        raise NotImplementedError

    def after_backward(self, losses: Tensor, weights: Tensor) -> None:
        self.opt.step(getattr(self, self._state_buffer), self.state_grad(losses, weights), mask=present_tasks(losses))


# ------------------------------------------------------------------------------------------- UW
@BALANCERS.register("uw", "uncertainty")
class UncertaintyWeighting(_LearnedLogScale):
    """Uncertainty weighting (UW), Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

    With ``s_t = log σ_t²`` learned per task, the objective is the paper's (regression form)

        ``Σ_t  L_t / (2 σ_t²) + log σ_t  =  Σ_t  ½ exp(-s_t) L_t + ½ s_t``,

    so the task weights are ``w_t = ½ exp(-s_t)`` (½ at the start, ``s = 0``), and ``s_t`` moves
    towards ``log L_t`` (where ``∂/∂s_t = ½ (1 − exp(-s_t) L_t)`` vanishes).

    Training of ``s``: the balancer owns it (a buffer) and its optimizer (Adam by default): each
    :meth:`backward` uses the current ``s``, back-propagates ``Σ w_t L_t`` into the model and then
    takes one step on ``s`` along the gradient above. ``balancer.parameters()`` is empty; do not
    give ``s`` to the model's optimizer. LibMTL 1.1.5 starts ``s`` at -0.5 (weights ~0.82), not 0;
    torch-rechub 0.9.0's ``uwl`` minimises ``Σ_t 2 e^{-w_t} L_t + w_t`` with ``w_t`` clamped at 0.

    Args:
        lr: step size of the optimizer of ``s``.
        optimizer: ``"adam"`` or ``"sgd"``.
    """

    _state_buffer, _name = "log_var", "uw"

    def objective(self, losses: Tensor) -> Tensor:
        """The UW objective ``Σ_t ½ exp(-s_t) L_t + ½ s_t`` for a ``(T,)`` loss vector."""
        return (0.5 * torch.exp(-self.log_var) * losses + 0.5 * self.log_var).sum()

    def weights(self, losses: Tensor) -> Tensor:
        return 0.5 * torch.exp(-self.log_var)

    def state_grad(self, losses: Tensor, weights: Tensor) -> Tensor:
        return 0.5 * (1 - torch.exp(-self.log_var) * losses)


# ------------------------------------------------------------------------------------------ DWA
@BALANCERS.register("dwa", "dynamic_weight_average")
class DynamicWeightAverage(TaskStateBalancer):
    """Dynamic weight average (DWA), Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019.

    ``λ_k(t) = K exp(r_k(t−1)/τ) / Σ_i exp(r_i(t−1)/τ)`` with ``r_k(t−1) = L_k(t−1) / L_k(t−2)``,
    where ``L_k(t)`` is task k's loss averaged over epoch t; ``λ = 1`` in the first two epochs.

    Per-epoch averages: the balancer keeps its own running record — every :meth:`backward` adds
    the detached losses to an on-device sum (skipping a task absent from the batch, i.e. a loss of exactly 0)
    — and the training loop must call :meth:`end_epoch`
    after each epoch, which turns the sums into that epoch's averages and sets the weights of the
    next epoch. (polytask's Trainer calls it; in your own loop, call it yourself.)

    Args:
        temperature: ``τ`` (the paper uses 2); a larger one gives more even weights.
    """

    _state_buffer = "weights_now"

    def __init__(self, temperature: float = 2.0, nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        self.temperature = _positive(temperature, "temperature", "dwa")
        for name in ("weights_now", "epoch_sum", "last_avg", "before_last_avg"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("epoch_steps", torch.zeros(0))
        self.register_buffer("epochs_done", torch.zeros(()))

    def _init_state(self, losses: Tensor) -> None:
        self.weights_now = torch.ones_like(losses)
        self.epoch_sum = torch.zeros_like(losses)
        self.last_avg = torch.ones_like(losses)
        self.before_last_avg = torch.ones_like(losses)
        self.epoch_steps = torch.zeros_like(losses)
        self.epochs_done = torch.zeros((), dtype=losses.dtype, device=losses.device)

    def weights(self, losses: Tensor) -> Tensor:
        return self.weights_now.clone()

    def after_backward(self, losses: Tensor, weights: Tensor) -> None:
        present = present_tasks(losses)  # batches without labels do not count (a NaN step is skipped whole)
        self.epoch_sum.add_(torch.where(present, losses, torch.zeros_like(self.epoch_sum)))
        self.epoch_steps.add_(present.to(self.epoch_steps.dtype))

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Close the epoch: its average losses become ``L(t−1)``; set the next epoch's weights."""
        if self.weights_now.numel() == 0:  # no step seen yet: nothing to average
            return
        seen = (self.epoch_steps > 0).all()
        avg = self.epoch_sum / self.epoch_steps.clamp_min(1)
        self.before_last_avg.copy_(torch.where(seen, self.last_avg, self.before_last_avg))
        self.last_avg.copy_(torch.where(seen, avg, self.last_avg))
        self.epochs_done.add_(seen.to(self.epochs_done.dtype))
        self.weights_now.copy_(self.dwa_weights(self.last_avg, self.before_last_avg, self.epochs_done))
        self.epoch_sum.zero_()
        self.epoch_steps.zero_()

    def dwa_weights(self, last: Tensor, before_last: Tensor, epochs_done: Tensor) -> Tensor:
        """DWA's ``λ`` for the epoch after ``epochs_done`` epochs with averages ``L(t−1)``, ``L(t−2)``."""
        T = last.shape[0]
        ratio = last / before_last.clamp_min(torch.finfo(last.dtype).tiny)
        lam = T * torch.softmax(ratio / self.temperature, dim=0)
        return torch.where(epochs_done >= 2, lam, torch.ones_like(lam))


# ------------------------------------------------------------------------------------------ RLW
@BALANCERS.register("rlw", "random")
class RandomLossWeighting(LossWeighting):
    """Random loss weighting (RLW), Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.

    Every step draws ``λ̃ ~ p(λ̃)`` and weighs the losses with ``λ = softmax(λ̃)`` (the weights sum
    to 1, as in the paper). ``distribution`` is the paper's normal ``N(0, I)`` (default) or
    uniform ``U(0, 1)``.

    Randomness comes from the balancer's own ``torch.Generator`` seeded with ``seed`` (``None``:
    the global generator; under a process group, rank 0's seed broadcast once); its state is saved by ``state_dict()`` (key ``rng_state``) so that a
    resumed run draws the same weights as an uninterrupted one.
    """

    def __init__(self, distribution: Literal["normal", "uniform"] = "normal", seed: int | None = None,
                 nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        if distribution not in ("normal", "uniform"):
            raise ConfigError(f"balancer 'rlw': distribution must be 'normal' or 'uniform', got {distribution!r}")
        self.distribution = distribution
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.register_buffer("rng_state", torch.zeros(0, dtype=torch.uint8))

    def _generator_on(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None and self.rng_state.numel() == 0:
            return None
        if self._generator is None or self._generator.device != device:
            gen = torch.Generator(device=device)
            if self.rng_state.numel():
                try:
                    gen.set_state(self.rng_state.cpu())
                except RuntimeError as exc:
                    from polytask.errors import CheckpointError

                    raise CheckpointError(f"balancer 'rlw': saved rng_state does not fit a {device.type} generator") from exc
            else:
                gen.manual_seed(self.seed)
            self._generator = gen
        return self._generator

    def join_group(self, group, device: torch.device) -> None:  # noqa: ANN001
        """Under a process group every rank must draw the same weights: without ``seed``, rank 0's
        seed is broadcast once (:func:`~polytask.balance.dist.shared_seed`) and kept."""
        if self.seed is None and self.rng_state.numel() == 0 and self._generator is None:
            from polytask.balance import dist

            self.seed = dist.shared_seed(group, device)

    def weights(self, losses: Tensor) -> Tensor:
        gen = self._generator_on(losses.device)
        draw = torch.randn if self.distribution == "normal" else torch.rand
        raw = draw(losses.shape, generator=gen, device=losses.device, dtype=losses.dtype)
        return torch.softmax(raw, dim=0)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001
        if self._generator is not None:
            self.rng_state = self._generator.get_state()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        saved = state_dict.get(prefix + "rng_state")
        if isinstance(saved, Tensor) and saved.shape != self.rng_state.shape:
            self.rng_state = torch.zeros(saved.shape, dtype=torch.uint8)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._generator = None  # rebuilt from the loaded rng_state at the next step


# ------------------------------------------------------------------------------------------ GLS
@BALANCERS.register("gls", "geometric")
class GeometricLossStrategy(LossWeighting):
    """Geometric loss strategy (GLS), Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++:
    Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning",
    CVPR Workshops 2019.

    The objective is the geometric mean of the task losses, ``G = (Π_t L_t)^{1/T}``, whose
    gradient is ``Σ_t G / (T L_t) ∇L_t``: the weights are ``w_t = G / (T L_t)`` (computed in log
    space; losses are clamped at ``eps``). A task absent from the batch (loss exactly 0: no
    labelled row) is left out of the product for that step (weight 0), so that it does not zero
    the geometric mean of the others. A NaN/inf loss skips the whole step (:class:`~polytask.balance.base.Balancer`).
    """

    def __init__(self, eps: float = 1e-8, nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        self.eps = _positive(eps, "eps", "gls")

    def _log_mean(self, losses: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        present = present_tasks(losses)
        count = present.sum().clamp_min(1).to(losses.dtype)
        logs = torch.where(present, torch.log(losses.clamp_min(self.eps)), torch.zeros_like(losses))
        return logs.sum() / count, count, present

    def objective(self, losses: Tensor) -> Tensor:
        """``(Π_t L_t)^{1/T}`` of a ``(T,)`` loss vector (over the tasks present)."""
        return torch.exp(self._log_mean(losses)[0])

    def weights(self, losses: Tensor) -> Tensor:
        log_mean, count, present = self._log_mean(losses)
        w = torch.exp(log_mean) / (count * losses.clamp_min(self.eps))
        return torch.where(present, w, torch.zeros_like(w))


# --------------------------------------------------------------------------------------- IMTL-L
@BALANCERS.register("imtl_l", "imtll")
class IMTLL(_LearnedLogScale):
    """Loss balance of Impartial Multi-Task Learning (IMTL-L), Liu, Li, Kuang, Xue, Chen, Yang,
    Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021.

    Each task's loss is scaled by ``e^{s_t}`` with a learned ``s_t`` and regularised:
    ``Σ_t e^{s_t} L_t − s_t``. The model's weights are ``w_t = e^{s_t}``; ``s_t`` follows
    ``∂/∂s_t = e^{s_t} L_t − 1``, so the scaled losses are driven to 1 (scale invariance).

    Training of ``s``: owned by the balancer (a buffer) and stepped by its own optimizer after each
    :meth:`backward` (``s ← s − lr (e^s L − 1)`` with ``optimizer="sgd"``). ``balancer.parameters()``
    is empty; do not give ``s`` to the model's optimizer.

    Args:
        lr: step size of the optimizer of ``s``.
        optimizer: ``"adam"`` (default) or ``"sgd"``.
    """

    _state_buffer, _name = "log_scale", "imtl_l"

    def objective(self, losses: Tensor) -> Tensor:
        """``Σ_t e^{s_t} L_t − s_t`` for a ``(T,)`` loss vector."""
        return (torch.exp(self.log_scale) * losses - self.log_scale).sum()

    def weights(self, losses: Tensor) -> Tensor:
        return torch.exp(self.log_scale)

    def state_grad(self, losses: Tensor, weights: Tensor) -> Tensor:
        return weights * losses - 1


# ----------------------------------------------------------------------------------------- STCH
@BALANCERS.register("stch", "smooth_tchebycheff")
class SmoothTchebycheff(LossWeighting):
    """Smooth Tchebycheff scalarisation (STCH), Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth
    Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024.

    ``g_μ(L) = μ log Σ_t exp(λ_t (f_t − z_t) / μ)`` with preference ``λ`` (default all 1), ideal
    point ``z`` (default 0) and smoothing ``μ > 0``; ``f_t = L_t``, or ``log L_t`` when
    ``log_losses`` (scale-free, as in the authors' multi-task experiments; an ideal point
    ``z_t = log n_t`` then divides the losses by a nadir value ``n_t``). Its gradient weights are
    ``w = λ ⊙ softmax(λ (f − z) / μ)`` (times ``1/L_t`` under ``log_losses``). As ``μ → 0``,
    ``g_μ`` tends to the Tchebycheff scalarisation ``max_t λ_t (f_t − z_t)`` (all weight on the
    worst task; ``max ≤ g_μ ≤ max + μ log T``); as ``μ → ∞`` the weights tend to ``λ / T``, linear
    scalarisation.
    """

    def __init__(self, mu: float = 1.0, preference: Sequence[float] | None = None,
                 ideal: Sequence[float] | None = None, log_losses: bool = False, eps: float = 1e-8,
                 nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        self.mu = _positive(mu, "mu", "stch")
        self.eps = _positive(eps, "eps", "stch")
        self.log_losses = bool(log_losses)
        self.preference = None if preference is None else torch.as_tensor(preference, dtype=torch.float64)
        self.ideal = None if ideal is None else torch.as_tensor(ideal, dtype=torch.float64)
        if self.preference is not None and not bool((self.preference > 0).all()):
            raise ConfigError("balancer 'stch': every preference must be > 0")

    def _vector(self, value: Tensor | None, like: Tensor, default: float, name: str) -> Tensor:
        if value is None:
            return torch.full_like(like, default)
        if value.shape != like.shape:
            raise ConfigError(f"balancer 'stch': {name} has {value.numel()} entries for {like.numel()} tasks")
        return value.to(device=like.device, dtype=like.dtype)

    def _scaled(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        lam = self._vector(self.preference, losses, 1.0, "preference")
        z = self._vector(self.ideal, losses, 0.0, "ideal")
        f = torch.log(losses.clamp_min(self.eps)) if self.log_losses else losses
        return lam, lam * (f - z) / self.mu

    def objective(self, losses: Tensor) -> Tensor:
        """``g_μ`` of a ``(T,)`` loss vector."""
        _, scaled = self._scaled(losses)
        return self.mu * torch.logsumexp(scaled, dim=0)

    def weights(self, losses: Tensor) -> Tensor:
        lam, scaled = self._scaled(losses)
        w = lam * torch.softmax(scaled, dim=0)
        return w / losses.clamp_min(self.eps) if self.log_losses else w

