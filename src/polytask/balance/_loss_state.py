"""Shared machinery of the stateful loss-based balancers (UW, DWA, IMTL-L, FAMO, DB-MTL, GradNorm).

* :class:`LazyBuffers` — buffers whose size (the number of tasks) is known only at the first
  step; ``load_state_dict`` into a fresh balancer resizes them to the saved shapes.
* :class:`TaskStateBalancer` — binds a balancer to the task names of its first step, creates its
  per-task state then, and refuses a later step with other tasks.
* :class:`BufferOptimizer` — the small Adam/SGD with which a balancer trains its own learnable
  quantities (log-variances, loss weights, logits). Those quantities and the optimizer's moments
  are *buffers*: they are saved by ``state_dict()``, moved by ``.to(device)``, and are invisible to
  ``balancer.parameters()``, so no model optimizer can step them a second time.
* :func:`task_jacobian` — per-task gradients w.r.t. a list of tensors as one ``(T, D)`` matrix.

None of them synchronises with the host: every decision taken on tensor values is a
``torch.where``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polytask.balance.base import LossWeighting
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
    them for ``T`` tasks from the first step's detached losses) and name one buffer of shape
    ``(T, ...)`` in ``_state_buffer`` so that a loaded state can be checked against the tasks.
    The learnable quantities are trained by the balancer itself (``optimizes_itself``).
    """

    optimizes_itself: bool = True
    _state_buffer: str = ""

    def __init__(self) -> None:
        super().__init__()
        self._task_names: tuple[str, ...] | None = None
        self._reach_checked = False  # graph check of check_reaches() done (once per balancer)

    def _init_state(self, losses: Tensor) -> None:
        raise NotImplementedError

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


def check_reaches(losses: Mapping[str, Tensor], targets: Sequence[Tensor], who: str) -> None:
    """ConfigError naming the first task whose loss does not depend on any of ``targets``.

    Walks each loss's autograd graph in Python, so balancers call it once (at their first step),
    not at every step.
    """
    leaf_ids = {id(t) for t in targets if t.grad_fn is None}
    target_nodes = {t.grad_fn for t in targets if t.grad_fn is not None}
    for name, loss in losses.items():
        seen: set = set()  # autograd nodes keep one Python object each: identity hashing is safe
        stack = [loss.grad_fn]
        found = False
        while stack and not found:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            found = node in target_nodes or (variable is not None and id(variable) in leaf_ids)
            stack.extend(fn for fn, _ in node.next_functions)
        if not found:
            raise ConfigError(f"{who}: loss of task {name!r} does not depend on the shared parameters")


def task_jacobian(vec: Tensor, inputs: Sequence[Tensor], names: Sequence[str], who: str) -> Tensor:
    """The ``(T, D)`` matrix whose row ``t`` is ``∂ vec[t] / ∂ inputs`` flattened (graph retained).

    One batched backward (``is_grads_batched``, vmap over the backward graph) computes all rows;
    if an operation of the graph has no batching rule, a loop of ``T`` backward passes does.
    Raises ConfigError naming the task when a loss does not reach ``inputs`` at all.
    """
    T = vec.shape[0]
    eye = torch.eye(T, dtype=vec.dtype, device=vec.device)
    try:
        grads = torch.autograd.grad(vec, list(inputs), grad_outputs=eye, retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        rows = [g.reshape(T, -1) if g is not None else None for g in grads]
        if all(r is None for r in rows):
            raise ConfigError(f"{who}: no task loss ({', '.join(map(repr, names))}) reaches the shared parameters")
    except RuntimeError:
        rows = _jacobian_loop(vec, inputs, names, who)
    return torch.cat([r if r is not None else torch.zeros(T, x.numel(), dtype=vec.dtype, device=vec.device)
                      for r, x in zip(rows, inputs)], dim=1)


def _jacobian_loop(vec: Tensor, inputs: Sequence[Tensor], names: Sequence[str], who: str) -> list[Tensor | None]:
    per_task = []
    for t, name in enumerate(names):
        grads = torch.autograd.grad(vec[t], list(inputs), retain_graph=True, allow_unused=True)
        if all(g is None for g in grads):
            raise ConfigError(f"{who}: loss of task {name!r} does not reach the shared parameters")
        per_task.append(grads)
    rows: list[Tensor | None] = []
    for i, x in enumerate(inputs):
        col = [g[i] for g in per_task]
        if all(g is None for g in col):
            rows.append(None)
        else:
            rows.append(torch.stack([(g if g is not None else torch.zeros_like(x)).reshape(-1) for g in col]))
    return rows


def add_to_grads(params: Sequence[Tensor], flat: Tensor) -> None:
    """Accumulate the flat vector ``flat`` (concatenated in ``params`` order) into ``.grad``."""
    offset = 0
    for p in params:
        n = p.numel()
        piece = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.add_(piece)
