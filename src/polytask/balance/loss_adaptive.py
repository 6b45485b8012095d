"""Adaptive loss balancers with a second signal: the loss after the step (FAMO) or per-task
gradient norms (DB-MTL, GradNorm).

Like every stateful balancer of :mod:`polytask.balance.loss_weighting`, they own their learnable
quantities as buffers and step them with their own :class:`BufferOptimizer`; a training loop only
moves the balancer to the device, saves its ``state_dict()``, and — for FAMO — calls
:meth:`~polytask.balance.base.Balancer.post_step` with the same batch's losses after
``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polytask.balance._loss_state import (
    BufferOptimizer,
    TaskStateBalancer,
    check_paths,
    flat_jacobian,
    last_shared_weight,
    present_tasks,
    require_grad_fn,
)
from polytask.balance.base import accumulate_grads, all_finite, stack_losses
from polytask.balance.graph import find_task_parameters, task_jacobian
from polytask.balance.loss_weighting import _positive
from polytask.balance.registry import BALANCERS
from polytask.errors import ConfigError


def _shared_list(shared: Iterable[nn.Parameter] | None, who: str) -> list[nn.Parameter]:
    params = [p for p in (shared or ()) if p.requires_grad]
    if not params:
        raise ConfigError(f"balancer {who!r} needs the shared parameters: pass shared=model.shared_parameters()")
    return params


# ----------------------------------------------------------------------------------------- FAMO
@BALANCERS.register("famo")
class FAMO(TaskStateBalancer):
    """Fast Adaptive Multitask Optimization (FAMO), Liu, Feng, Stone & Liu, NeurIPS 2023.

    Task logits ``ξ`` give ``z = softmax(ξ)``; the update direction is
    ``d = c Σ_t (z_t / L_t) ∇L_t`` with ``c = (Σ_t z_t / L_t)^{-1}`` — the gradient of
    ``Σ_t z_t log L_t`` rescaled — so the weights are ``w_t = c z_t / L_t``. After the model's step,
    with the same batch's new losses ``L⁺``, the logits move by

        ``ξ ← ξ − β (Jᵀ δ + γ ξ)``,  ``δ_t = log L_t − log L⁺_t``,  ``J = ∂z/∂ξ``,

    i.e. ``(Jᵀ δ)_t = z_t (δ_t − Σ_i z_i δ_i)``: a task whose loss fell more than the weighted
    average loses weight. ``optimizer="sgd"`` is exactly this rule; the default ``"adam"`` (with
    ``γ`` as L2 weight decay) is what the authors' code uses. Losses are clamped at ``eps``. A task
    absent from the batch (loss exactly 0: no labelled row) gets weight 0 and keeps its logit at
    that step (its ``δ`` is 0); a NaN/inf loss skips the whole step, and its :meth:`post_step` then
    changes nothing.

    The second loss evaluation is explicit: ``needs_post_step_losses = True``; the training loop
    re-evaluates the batch under ``torch.no_grad()`` after ``optimizer.step()`` and calls
    :meth:`post_step`. Without it the logits never move (FAMO is then equal-``z`` weighting).

    Args:
        lr: ``β``, step size of the logits (authors' default 0.025).
        gamma: ``γ``, weight decay of the logits (authors' default 0.01).
        optimizer: ``"adam"`` or ``"sgd"``.
        eps: lower clamp of the losses.
    """

    needs_post_step_losses = True
    _state_buffer = "logits"

    def __init__(self, lr: float = 0.025, gamma: float = 0.01, optimizer: Literal["adam", "sgd"] = "adam",
                 eps: float = 1e-8, nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        if gamma < 0:
            raise ConfigError(f"balancer 'famo': gamma must be >= 0, got {gamma!r}")
        self.eps = _positive(eps, "eps", "famo")
        self.register_buffer("logits", torch.zeros(0))
        self.register_buffer("log_losses_before", torch.zeros(0))
        self.opt = BufferOptimizer(optimizer, lr=_positive(lr, "lr", "famo"), weight_decay=gamma)
        self._awaiting_post_step = False

    def _init_state(self, losses: Tensor) -> None:
        self.logits = torch.zeros_like(losses)
        self.log_losses_before = torch.zeros_like(losses)

    def weights(self, losses: Tensor) -> Tensor:
        z = torch.softmax(self.logits, dim=0)
        inv = torch.where(present_tasks(losses), z / losses.clamp_min(self.eps), torch.zeros_like(z))
        return inv / inv.sum().clamp_min(torch.finfo(inv.dtype).tiny)

    def _log_losses(self, losses: Tensor) -> Tensor:
        """``log L`` of the tasks present, NaN for the others."""
        logs = torch.log(losses.clamp_min(self.eps))
        return torch.where(present_tasks(losses), logs, torch.full_like(logs, float("nan")))

    def after_backward(self, losses: Tensor, weights: Tensor) -> None:
        self.log_losses_before.copy_(self._log_losses(losses))
        self._awaiting_post_step = True

    def logit_gradient(self, log_before: Tensor, log_after: Tensor) -> Tensor:
        """``Jᵀ δ`` of the paper for the current logits: ``z ⊙ (δ − zᵀδ)``, ``δ = log_before − log_after``
        (0 where either is NaN)."""
        z = torch.softmax(self.logits, dim=0)
        delta = log_before - log_after
        delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
        return z * (delta - (z * delta).sum())

    @torch.no_grad()
    def post_step(self, losses: Mapping[str, Tensor], *, process_group: Any = None,
                  counts: Tensor | Sequence[float] | Mapping[str, Any] | None = None) -> None:
        """Update the logits from this batch's losses after the optimizer step (the global losses
        under a process group: one all-reduce of ``2T + R`` numbers). Nothing after a skipped step."""
        if not self._awaiting_post_step:
            raise RuntimeError("FAMO.post_step() must follow a backward() of the same batch")
        vec = stack_losses(losses).detach()
        self._bind(losses, vec)
        if process_group is not None:
            from polytask.balance import dist

            vec = dist.sync_losses(vec, dist.task_counts(counts, list(losses), vec), process_group).losses
        after = self._log_losses(vec).to(self.logits.dtype)
        both = torch.isfinite(self.log_losses_before) & torch.isfinite(after) & self._last_ok
        self.opt.step(self.logits, self.logit_gradient(self.log_losses_before, after), mask=both)
        self._awaiting_post_step = False


# --------------------------------------------------------------------------------------- DB-MTL
@BALANCERS.register("db_mtl", "dbmtl")
class DBMTL(TaskStateBalancer):
    """Dual-balancing multi-task learning (DB-MTL), Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok,
    "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, 2023.

    1. Loss-scale balancing: each task minimises ``log(L_t + eps)`` instead of ``L_t``.
    2. Gradient-magnitude balancing on the shared parameters: with ``g_t = ∇ log(L_t + eps)``, an
       exponential moving average ``ĝ_t ← β_k ĝ_t + (1 − β_k) g_t`` with ``β_k = β / k^σ`` (k the
       step, from 1; ``ĝ = g`` at the first step), and the shared update
       ``Σ_t α_t ĝ_t`` with ``α_t = max_i ‖ĝ_i‖ / ‖ĝ_t‖`` — every task's gradient is scaled up to
       the largest norm.

    Task-specific parameters receive ``∇ log(L_t + eps)`` of their own task. The per-task
    gradients come from one backward per task (through the shared and the task-specific
    parameters, whose gradients are summed over the tasks); the moving average is a ``(T, D)`` buffer (D = number of shared
    parameters) saved in the ``state_dict()``. The returned weights are ``α``. A task absent from
    the batch (loss exactly 0) keeps its ``ĝ_t`` at that step; a NaN/inf loss or gradient skips the
    whole step (state kept, ``skipped_steps`` counted).

    Args:
        beta: ``β`` (paper: 0.9); beta_sigma: ``σ`` (paper: 0.5); eps: added inside the log.
    """

    _state_buffer = "grad_ema"
    supports_external_reduction = False  # per-task gradients w.r.t. the shared parameters

    #: ``grad_ema`` and ``steps`` are replaced at each step, never changed in place (no copy for the guard).
    _state_updated_in_place = ()

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.5, eps: float = 1e-8,
                 nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        if not 0 <= beta < 1:
            raise ConfigError(f"balancer 'db_mtl': beta must be in [0, 1), got {beta!r}")
        if beta_sigma < 0:
            raise ConfigError(f"balancer 'db_mtl': beta_sigma must be >= 0, got {beta_sigma!r}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.eps = _positive(eps, "eps", "db_mtl")
        self.register_buffer("grad_ema", torch.zeros(0))
        self.register_buffer("steps", torch.zeros(()))
        self._heads: list[Tensor] = []
        self._heads_key: tuple | None = None

    def _init_state(self, losses: Tensor) -> None:
        self.grad_ema = torch.zeros(losses.shape[0], 0, dtype=losses.dtype, device=losses.device)
        self.steps = torch.zeros((), dtype=losses.dtype, device=losses.device)

    def backward(self, losses: Mapping[str, Tensor], shared: Iterable[nn.Parameter] | None = None,
                 features: Tensor | None = None, *, task_features: Tensor | None = None, process_group: Any = None,
                 counts: Any = None, loss_scale: Tensor | None = None, parameters: Any = None,
                 reduce_gradients: bool = True) -> Tensor:
        done = self._begin_backward(losses, shared, features, task_features=task_features, process_group=process_group,
                                    counts=counts, loss_scale=loss_scale, parameters=parameters,
                                    reduce_gradients=reduce_gradients)
        if done is not None:
            return done
        vec = stack_losses(losses)
        self._bind(losses, vec)
        require_grad_fn(losses, "balancer 'db_mtl'")
        params = _shared_list(shared, "db_mtl")
        key = (tuple(losses), tuple(id(p) for p in params))
        if self._heads_key != key:  # a graph walk (and the path check): once per task and parameter set
            self._heads = find_task_parameters(losses, params)  # the leaves other than ``params``
            self._heads_key = key
        n_shared, n = len(params), vec.shape[0]
        if process_group is None:
            global_vec = vec.detach()
            log_losses = torch.log(vec + self.eps)
            # one backward per task gives the rows of J and, summed, the task-specific gradients
            grads = task_jacobian(list(log_losses.unbind()), [*params, *self._heads], batched=False)
            jac = torch.cat([g.reshape(n, -1) for g in grads[:n_shared]], dim=1)  # (T, D)
            head_grads = [g.sum(0) for g in grads[n_shared:]]
        else:  # ∇ log(L_t + eps) = ∇L_t / (L_t + eps) with the global L_t: each rank's share, then one all-reduce
            from polytask.balance import dist

            sync = dist.sync_losses(vec, dist.task_counts(counts, list(losses), vec), process_group)
            global_vec = sync.losses
            factor = sync.scale / (global_vec + self.eps)
            grads = task_jacobian(list((vec * factor).unbind()), [*params, *self._heads], batched=False)
            local = torch.cat([g.reshape(n, -1) for g in grads[:n_shared]], dim=1)
            jac, *head_grads = dist.all_reduce_sum([local, *(g.sum(0) for g in grads[n_shared:])], process_group)
        if self.grad_ema.shape != jac.shape:
            if self.grad_ema.shape[1] != 0:
                raise ConfigError(f"balancer 'db_mtl': its state is for {self.grad_ema.shape[1]} shared values, "
                                  f"but the shared parameters have {jac.shape[1]}")
            self.grad_ema = torch.zeros_like(jac)
        before = self._snapshot()
        with torch.no_grad():
            k = self.steps
            beta_k = torch.where(k > 0, self.beta / k.clamp_min(1) ** self.beta_sigma, torch.zeros_like(k))
            # a task absent from the batch keeps its average (a non-finite step is skipped whole)
            rows = (torch.isfinite(jac).all(dim=1) & present_tasks(global_vec))[:, None]
            # replaced, not changed in place: the guard then restores them without a copy of the (T, D) average
            self.grad_ema = torch.where(rows, beta_k * self.grad_ema + (1 - beta_k) * jac, self.grad_ema)
            self.steps = self.steps + rows.any().to(self.steps.dtype)
            norms = self.grad_ema.norm(dim=1)
            alpha = norms.max() / (norms + self.eps)
            shared_update = alpha @ self.grad_ema
        ok = all_finite(global_vec, jac, *head_grads)
        self._check_finite(ok, lambda: torch.cat([global_vec[:, None], jac], dim=1), list(losses))
        self._commit(ok, before)
        if loss_scale is not None:  # .grad as a GradScaler expects (scaled); the statistics stay unscaled
            shared_update = shared_update * loss_scale
            head_grads = [g * loss_scale for g in head_grads]
        fill = 0.0 if loss_scale is None else float("nan")
        accumulate_grads(params, [g.view(p.shape) for p, g in zip(params, shared_update.split([p.numel() for p in params]))],
                         ok, fill)
        accumulate_grads(self._heads, [g.reshape(p.shape) for p, g in zip(self._heads, head_grads)], ok, fill)
        return torch.where(ok, alpha, torch.zeros_like(alpha))


# ------------------------------------------------------------------------------------- GradNorm
@BALANCERS.register("gradnorm", "grad_norm")
class GradNorm(TaskStateBalancer):
    """GradNorm, Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.

    Learned loss weights ``w_t`` (start at 1). At each step, with ``W`` the last shared layer:
    ``G_t = ‖∇_W w_t L_t‖``, ``Ḡ = mean_t G_t``, ``L̃_t = L_t / L_t(0)`` (``L_t(0)``: the first
    step's loss), ``r_t = L̃_t / mean(L̃)``, and

        ``L_grad = Σ_t | G_t − Ḡ · r_t^α |``

    with the target ``Ḡ r_t^α`` held constant. The model is trained on ``Σ_t w_t L_t``; the weights
    take one optimizer step along ``∂L_grad/∂w_t = sign(G_t − Ḡ r_t^α) ‖∇_W L_t‖`` and are then
    renormalised to ``Σ_t w_t = T`` (kept ≥ ``min_weight`` first, so they stay positive).
    ``α = 0`` drives all ``G_t`` to the same norm; a larger ``α`` favours slow tasks. A task absent
    from the batch (loss exactly 0: no labelled row) is left out of the means and its weight takes
    no optimizer step (the renormalisation still rescales it); its ``L_t(0)`` is its first present
    loss. A NaN/inf loss skips the whole step.

    ``W`` is the weight of the last shared layer: the first matrix-shaped shared parameter met
    walking back from the shared features the heads read (the largest one at that depth, e.g. the
    stacked expert weights of an MMoE), or the last matrix-shaped shared parameter when the model
    gives no features (see :func:`~polytask.balance._loss_state.last_shared_weight`). With
    ``layer="features"`` it is the representation itself (``features=model.shared_features``;
    cheaper, same idea). The ``T`` per-task gradients at ``W`` are one batched backward through
    the heads and that layer only.

    Training of ``w``: owned by the balancer (a buffer) and stepped by its own optimizer inside
    :meth:`backward`; ``balancer.parameters()`` is empty.

    LibMTL 1.1.5 departs from the paper: ``w = T softmax(s)`` instead of renormalised weights,
    ``G_t`` over all shared parameters, ``L_t(0)`` the first epoch's mean loss and plain EW during
    that epoch. torch-rechub 0.9.0's ``gradnorm`` gives every task one target ``Ḡ mean(L̃)^α``
    instead of ``Ḡ r_t^α``; equal at ``α = 0`` (``tests/test_balance_peer_rechub.py``).

    Args:
        alpha: asymmetry ``α`` (paper: 0.12 to 3; 1.5 is a common choice).
        lr: step size of the optimizer of ``w``.
        optimizer: ``"adam"`` or ``"sgd"``.
        layer: ``"last_shared"`` or ``"features"``.
        min_weight: floor of a weight before renormalisation.
    """

    _state_buffer = "loss_weights"
    supports_external_reduction = False  # per-task gradients w.r.t. a shared weight (FSDP shards it)

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, optimizer: Literal["adam", "sgd"] = "adam",
                 layer: Literal["last_shared", "features"] = "last_shared", min_weight: float = 1e-4,
                 nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        if alpha < 0:
            raise ConfigError(f"balancer 'gradnorm': alpha must be >= 0, got {alpha!r}")
        if layer not in ("last_shared", "features"):
            raise ConfigError(f"balancer 'gradnorm': layer must be 'last_shared' or 'features', got {layer!r}")
        self.alpha = float(alpha)
        self.layer = layer
        self.min_weight = _positive(min_weight, "min_weight", "gradnorm")
        self.register_buffer("loss_weights", torch.zeros(0))
        self.register_buffer("initial_losses", torch.zeros(0))
        self.opt = BufferOptimizer(optimizer, lr=_positive(lr, "lr", "gradnorm"))
        self._last_layer: tuple[tuple[int, ...], Tensor] | None = None
        self._norms: Tensor | None = None

    def _init_state(self, losses: Tensor) -> None:
        self.loss_weights = torch.ones_like(losses)
        self.initial_losses = torch.zeros_like(losses)  # L_t(0): set at the task's first present loss

    def _layer(self, shared: Iterable[nn.Parameter] | None, features: Tensor | None) -> Tensor:
        if self.layer == "features":
            if features is None or not features.requires_grad:
                raise ConfigError("balancer 'gradnorm' with layer='features' needs features=model.shared_features")
            return features
        params = _shared_list(shared, "gradnorm")
        key = tuple(id(p) for p in params)
        if self._last_layer is None or self._last_layer[0] != key:  # a graph walk: once, not every step
            self._last_layer = (key, last_shared_weight(params, features))
        return self._last_layer[1]

    def gradient_norms(self, vec: Tensor, shared: Iterable[nn.Parameter] | None, features: Tensor | None) -> Tensor:
        """``‖∇_W L_t‖`` for every task (detached, ``(T,)``)."""
        return flat_jacobian(vec, [self._layer(shared, features)]).norm(dim=1).detach()

    def weight_gradient(self, losses: Tensor, norms: Tensor) -> Tensor:
        """``∂L_grad/∂w`` given the detached losses and ``‖∇_W L_t‖`` (means over the tasks present)."""
        present = present_tasks(losses)
        count = present.sum().clamp_min(1).to(losses.dtype)
        G = torch.where(present, self.loss_weights * norms, torch.zeros_like(norms))
        ratio = torch.where(present, losses / self.initial_losses.clamp_min(torch.finfo(losses.dtype).tiny),
                            torch.zeros_like(losses))
        r = ratio / (ratio.sum() / count).clamp_min(torch.finfo(losses.dtype).tiny)
        target = G.sum() / count * r**self.alpha
        return torch.where(present, torch.sign(G - target) * norms, torch.zeros_like(norms))

    def prepare(self, losses: Mapping[str, Tensor], vec: Tensor, sync: Any, shared: Iterable[nn.Parameter] | None,
                features: Tensor | None) -> None:
        """``‖∇_W L_t‖`` of the (global) losses, kept for :meth:`after_backward`."""
        require_grad_fn(losses, "balancer 'gradnorm'")
        shared = None if shared is None else list(shared)
        layer = self._layer(shared, features)
        if not self._reach_checked:
            if self.layer == "features":
                check_paths(losses, [], stop=layer)
            else:
                check_paths(losses, [layer])
            self._reach_checked = True
        if sync is None:
            self._norms = self.gradient_norms(vec, shared, features)
            return
        from polytask.balance import dist

        rows = flat_jacobian(vec, [layer]).detach() * sync.scale[:, None]  # this rank's share of ∇_W L_t
        if self.layer == "features":  # rank batches are disjoint: squared norms add up
            self._norms = dist.all_reduce_sum([rows.pow(2).sum(1)], sync.group)[0].sqrt()
        else:
            self._norms = dist.all_reduce_sum([rows], sync.group)[0].norm(dim=1)

    def weights(self, losses: Tensor) -> Tensor:
        return self.loss_weights.clone()

    def _check_accumulable(self) -> None:
        if self.layer == "features":
            raise ConfigError("balancer 'gradnorm': layer='features' cannot accumulate micro-batches "
                              "(use layer='last_shared', or one batch per step)")

    def after_backward(self, losses: Tensor, weights: Tensor) -> None:
        norms = self._norms.to(weights.dtype)
        present = present_tasks(losses)
        # L_t(0) is the task's first loss that was present (a batch may lack its labels)
        missing_start = ~(torch.isfinite(self.initial_losses) & (self.initial_losses > 0))
        self.initial_losses.copy_(torch.where(present & missing_start, losses, self.initial_losses))
        self.opt.step(self.loss_weights, self.weight_gradient(losses, norms), mask=present)
        with torch.no_grad():
            clamped = self.loss_weights.clamp_min(self.min_weight)
            self.loss_weights.copy_(clamped * (clamped.shape[0] / clamped.sum()))
