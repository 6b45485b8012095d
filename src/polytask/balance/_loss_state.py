"""Shared machinery of the stateful loss-based balancers (UW, DWA, IMTL-L, FAMO, DB-MTL, GradNorm).

* :class:`LazyBuffers` — buffers whose size (the number of tasks) is known only at the first
  step; ``load_state_dict`` into a fresh balancer resizes them to the saved shapes.
* :class:`TaskStateBalancer` — binds a balancer to the task names of its first step, creates its
  per-task state then, and refuses a later step with other tasks.
* :class:`BufferOptimizer` — the small Adam/SGD with which a balancer trains its own learnable
  quantities (log-variances, loss weights, logits). Those quantities and the optimizer's moments
  are *buffers*: they are saved by ``state_dict()``, moved by ``.to(device)``, and are invisible to
  ``balancer.parameters()``, so no model optimizer can step them a second time.
* :func:`flat_jacobian` — per-task gradients w.r.t. a list of tensors as one ``(T, D)`` matrix
  (from the gradient engine).

None of them synchronises with the host: every decision taken on tensor values is a
``torch.where``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polytask.balance.base import LossWeighting
from polytask.balance.graph import find_task_parameters, task_jacobian
from polytask.errors import ConfigError


class LazyBuffers(nn.Module):
    """A module whose buffers may be created empty and sized later.

    ``load_state_dict`` replaces a buffer whose saved shape or dtype differs (e.g. a fresh balancer
    that has not seen a step yet) by one of the saved shape and dtype, on the buffer's device.
    """

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if buf is not None and isinstance(saved, Tensor) and (saved.shape != buf.shape or saved.dtype != buf.dtype):
                self._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BufferOptimizer(LazyBuffers):
    """Adam (Kingma & Ba, ICLR 2015) or plain SGD on one tensor, with its state in buffers.

    The Adam update is the one of ``torch.optim.Adam`` (bias-corrected moments, L2
    ``weight_decay`` added to the gradient), with one step count per entry: an entry whose
    gradient is NaN/infinite, or that ``mask`` leaves out (a task absent from the batch), keeps its
    value, moments and step count, decided with ``torch.where`` (no host sync).

    Args:
        kind: ``"adam"`` or ``"sgd"``.
        lr: step size.
        betas, eps: Adam's moment decay rates and denominator guard.
        weight_decay: L2 coefficient added to the gradient (FAMO's γ).
    """

    def __init__(self, kind: Literal["adam", "sgd"] = "adam", lr: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__()
        if kind not in ("adam", "sgd"):
            raise ConfigError(f"balancer optimizer must be 'adam' or 'sgd', got {kind!r}")
        if not lr > 0:
            raise ConfigError(f"balancer lr must be > 0, got {lr!r}")
        if weight_decay < 0:
            raise ConfigError(f"balancer weight_decay must be >= 0, got {weight_decay!r}")
        self.kind, self.lr, self.betas, self.eps, self.weight_decay = kind, lr, betas, eps, weight_decay
        self.register_buffer("exp_avg", torch.zeros(0))
        self.register_buffer("exp_avg_sq", torch.zeros(0))
        self.register_buffer("steps", torch.zeros(0))

    @torch.no_grad()
    def step(self, value: Tensor, grad: Tensor, mask: Tensor | None = None) -> None:
        """Update ``value`` in place by one step along ``-grad`` (only where ``mask``, if given)."""
        if self.weight_decay:
            grad = grad + self.weight_decay * value
        active = torch.isfinite(grad) if mask is None else torch.isfinite(grad) & mask
        grad = torch.where(active, grad, torch.zeros_like(grad))
        if self.kind == "sgd":
            value.sub_(self.lr * grad)
            return
        if self.exp_avg.shape != value.shape:
            self.exp_avg = torch.zeros_like(value)
            self.exp_avg_sq = torch.zeros_like(value)
            self.steps = torch.zeros_like(value)
        b1, b2 = self.betas
        steps = self.steps + active.to(self.steps.dtype)
        m = torch.where(active, b1 * self.exp_avg + (1 - b1) * grad, self.exp_avg)
        v = torch.where(active, b2 * self.exp_avg_sq + (1 - b2) * grad * grad, self.exp_avg_sq)
        safe_steps = steps.clamp_min(1)
        bias1 = 1 - b1**safe_steps
        bias2 = 1 - b2**safe_steps
        update = (self.lr / bias1) * m / (v.sqrt() / bias2.sqrt() + self.eps)
        value.sub_(torch.where(active, update, torch.zeros_like(update)))
        self.exp_avg.copy_(m)
        self.exp_avg_sq.copy_(v)
        self.steps.copy_(steps)


def present_tasks(losses: Tensor) -> Tensor:
    """``(T,)`` bool: tasks whose loss is finite and not exactly 0.

    polytask's masked losses are exactly 0 for a task with no labelled row in the batch (and then
    have no gradient); such a task, like one with a NaN loss, takes no part in a balancer's
    per-task state update at that step.
    """
    return torch.isfinite(losses) & (losses != 0)


class TaskStateBalancer(LossWeighting, LazyBuffers):
    """A loss-based balancer with per-task state, created at the first step.

    Subclasses create their buffers empty in ``__init__``, implement :meth:`_init_state` (fill
    them for ``T`` tasks with values that do not depend on the losses' values -- a skipped first
    step must leave the state as fresh) and name one buffer of shape ``(T, ...)`` in
    ``_state_buffer`` so that a loaded state can be checked against the tasks. They update their
    state in :meth:`~polytask.balance.base.LossWeighting.after_backward` from the (global) losses;
    the template ``backward`` undoes it on a skipped step. The learnable quantities are trained by
    the balancer itself (``optimizes_itself``).
    """

    optimizes_itself: bool = True
    _state_buffer: str = ""

    def __init__(self, nan_policy: str = "skip") -> None:
        super().__init__(nan_policy)
        self._task_names: tuple[str, ...] | None = None
        self._reach_checked = False  # check_paths() done (a graph walk: once per balancer)

    def _init_state(self, losses: Tensor) -> None:
        raise NotImplementedError

    def before_weights(self, losses: Mapping[str, Tensor], vec: Tensor) -> None:
        self._bind(losses, vec)

    def _bind(self, losses: Mapping[str, Tensor], vec: Tensor) -> None:
        """Check the tasks against the state (creating it at the first step); move state to the losses' device."""
        names = tuple(losses)
        state = getattr(self, self._state_buffer)
        if self._task_names is None:
            if state.numel() == 0:
                self._init_state(vec.detach())
            elif state.shape[0] != len(names):
                raise ConfigError(
                    f"balancer {type(self).__name__}: its loaded state is for {state.shape[0]} tasks, "
                    f"but the losses name {len(names)}: {', '.join(names)}"
                )
            self._task_names = names
        elif names != self._task_names:
            missing = [n for n in self._task_names if n not in names]
            extra = [n for n in names if n not in self._task_names]
            detail = "; ".join(
                part for part in (
                    f"missing task(s) {', '.join(map(repr, missing))}" if missing else "",
                    f"unexpected task(s) {', '.join(map(repr, extra))}" if extra else "",
                    "tasks in another order" if not (missing or extra) else "",
                ) if part
            )
            raise ConfigError(f"balancer {type(self).__name__}: the losses do not match its tasks: {detail}")
        if getattr(self, self._state_buffer).device != vec.device:
            self.to(vec.device)


def require_grad_fn(losses: Mapping[str, Tensor], who: str) -> None:
    """ConfigError naming the first task whose loss does not depend on any trainable tensor."""
    for name, value in losses.items():
        if not value.requires_grad:
            raise ConfigError(f"{who}: loss of task {name!r} has no gradient (it does not depend on any trainable tensor)")


def check_paths(losses: Mapping[str, Tensor], targets: Sequence[Tensor], stop: Tensor | None = None) -> None:
    """ConfigError naming the first task whose loss reaches none of ``targets`` (or ``stop``).

    Walks the autograd graph in Python (the gradient engine's walk), so balancers call it once,
    at their first step.
    """
    find_task_parameters(losses, targets, stop)


def _is_matrix(p: Tensor) -> bool:
    """A weight matrix (or a stack of them), not a bias: the last two dimensions both exceed 1."""
    return p.ndim >= 2 and min(p.shape[-2:]) > 1


def last_shared_weight(shared: Sequence[Tensor], features: Tensor | None = None) -> Tensor:
    """The weight of the last shared layer.

    With ``features`` (the shared representation the heads read): the first matrix-shaped shared
    parameter met walking its autograd graph back level by level, the largest one if a level has
    several. Otherwise (or if the walk finds none): the last matrix-shaped parameter of
    ``shared``, else its last parameter.
    """
    if features is not None and features.grad_fn is not None:
        by_id = {id(p): p for p in shared}
        level, seen = [features.grad_fn], set()
        while level:
            found, below = [], []
            for node in level:
                if node is None or node in seen:
                    continue
                seen.add(node)
                variable = getattr(node, "variable", None)
                if variable is not None:  # a leaf
                    if id(variable) in by_id and _is_matrix(variable):
                        found.append(by_id[id(variable)])
                    continue
                below.extend(fn for fn, _ in node.next_functions)
            if found:
                return max(found, key=lambda p: p.numel())
            level = below
    matrices = [p for p in shared if _is_matrix(p)]
    return (matrices or list(shared))[-1]


def flat_jacobian(vec: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """The ``(T, D)`` matrix whose row ``t`` is ``∂ vec[t] / ∂ inputs`` flattened; graph retained.

    The gradient engine's :func:`~polytask.balance.engine.task_jacobian` with one backward per
    task, as the engine's default: the vectorised backward (``is_grads_batched``) measured slower
    on a CPU (QM9 MPNN, 11 targets, batch 120, 1 thread: 4.3-5.7 s vs 3.5 s per Jacobian).
    """
    grads = task_jacobian(list(vec.unbind()), list(inputs), batched=False)
    return torch.cat([g.reshape(vec.shape[0], -1) for g in grads], dim=1)
