"""Walks of the autograd graph the balancers share: per-task Jacobians (:func:`task_jacobian`), the parameters
only some tasks reach (:func:`find_task_parameters`), and the linear-head shortcut of the gradient engine (the
path to a :class:`~polytask.nn.base.TaskHeads` first layer, :func:`linear_head_path`, and the Gramian of its
feature gradients without forming them, :func:`linear_head_gramian`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polytask.errors import ConfigError

__all__ = ["find_task_parameters", "linear_head_gramian", "linear_head_path", "task_jacobian"]


def linear_head_gramian(head_grads: Tensor, weights: Tensor, n_tasks: int) -> Tensor:
    """The ``(T, T)`` Gramian of the feature gradients ``g_t = U_t W_t^T`` of linear heads, without forming them.

    ``head_grads``: ``(B, T*o)``, columns ``t*o:(t+1)*o`` hold ``U_t = ∂L_t/∂y_t``, the gradient at
    head ``t``'s output ``y_t = z W_t (+ b_t)``; ``weights``: ``(T*o, d)``, rows ``t*o:(t+1)*o``
    hold ``W_t^T``. ``G_st = Σ_b (U_s[b] W_s^T) . (U_t[b] W_t^T) = Σ_ij (U_s^T U_t)_ij (W_s^T W_t)_ij``:
    ``O((B + d) (T o)^2)`` instead of ``O(T^2 B d)`` for the ``T x (B d)`` Jacobian's Gramian.
    """
    width = head_grads.shape[1] // n_tasks
    blocks = (head_grads.T @ head_grads) * (weights @ weights.T)  # (To, To): block (s, t) sums to G_st
    if width == 1:
        return blocks
    return blocks.view(n_tasks, width, n_tasks, width).sum((1, 3))


def linear_head_path(losses: Sequence[Tensor], task_features: Tensor) -> tuple[type, tuple[int, ...], set[int]] | None:
    """Where the losses' graph reads ``task_features`` through one :class:`~polytask.nn.base.TaskHeads`
    first linear layer (``_CopiesLinear``) and nothing else: ``(node class, path, leaves)`` with ``path``
    the ``next_functions`` indices from the first loss's ``grad_fn`` to that node and ``leaves`` the ids
    of the parameters above it (the layer's own included); ``None`` otherwise.

    Checked once per task set (graphs repeat from step to step): no loss reaches ``task_features``
    or the layer's weight and bias but through that node.
    """
    from polytask.nn.base import _CopiesLinear  # lazily: balance does not need nn otherwise

    cls = _CopiesLinear._backward_cls
    found: set[Any] = set()
    leaves: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn for loss in losses]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, cls):
            found.add(node)
            continue
        if node is task_features.grad_fn:
            return None
        var = getattr(node, "variable", None)
        if var is not None:
            leaves.add(id(var))
        stack.extend(child for child, _ in node.next_functions)
    if len(found) != 1:
        return None
    layer = next(iter(found))
    if layer.next_functions[0][0] is not task_features.grad_fn or task_features.grad_fn is None:
        return None
    params = [child.variable for child, _ in layer.next_functions[1:] if child is not None and hasattr(child, "variable")]
    if any(id(p) in leaves for p in params):
        return None
    return cls, _path_to(losses[0].grad_fn, layer), leaves | {id(p) for p in params}


def _path_to(root: Any, target: Any) -> tuple[int, ...]:
    """``next_functions`` indices leading from ``root`` to ``target`` (breadth-first: the shortest)."""
    frontier: list[tuple[Any, tuple[int, ...]]] = [(root, ())]
    seen = {root}
    while frontier:
        nxt = []
        for node, path in frontier:
            if node is target:
                return path
            for i, (child, _) in enumerate(node.next_functions):
                if child is not None and child not in seen:
                    seen.add(child)
                    nxt.append((child, (*path, i)))
        frontier = nxt
    raise AssertionError("target node not below root")


def task_jacobian(losses: Sequence[Tensor], inputs: Sequence[Tensor], *, batched: bool = True) -> list[Tensor]:
    """Gradients of each of the ``T`` scalar losses w.r.t. each input: one ``(T, *input.shape)`` tensor each.

    ``batched=True`` computes all rows in one vectorised backward (``is_grads_batched``; falls
    back to the loop if an op of the graph has no batching rule); ``batched=False`` runs one
    ``autograd.grad`` per loss, each visiting only that loss's part of the graph. Inputs a loss
    does not depend on get zero rows. The graph is kept (``retain_graph=True``).
    """
    n = len(losses)
    if batched:
        vec = torch.stack([loss.reshape(()) for loss in losses])
        eye = torch.eye(n, dtype=vec.dtype, device=vec.device)
        try:
            return list(torch.autograd.grad(vec, inputs, grad_outputs=eye, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True, materialize_grads=True))
        except RuntimeError as err:  # an op without a vmap rule: per-task fallback below
            if "vmap" not in str(err).lower() and "batch" not in str(err).lower():
                raise
    rows = [torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True, materialize_grads=True)
            for loss in losses]
    return [torch.stack(r) for r in zip(*rows)]


def find_task_parameters(losses: Mapping[str, Tensor], targets: Sequence[Tensor], stop: Tensor | None = None) -> list[Tensor]:
    """Walk the autograd graph of the losses: check paths and collect task-specific leaves.

    Every loss must reach one of ``targets`` (the shared parameters, or the shared features in
    feature mode; the walk does not go below ``stop``): otherwise a ConfigError names the task.
    Returns the other leaves requiring grad (the task-specific parameters).
    """
    target_ids = {id(t) for t in targets}
    stop_fn = None if stop is None else stop.grad_fn
    if stop is not None:
        target_ids.add(id(stop))
    reach: dict[Any, bool] = {}
    leaves: dict[int, Tensor] = {}
    for name, loss in losses.items():
        root = loss.grad_fn
        if root is None:
            raise ConfigError(f"balancer.backward: loss of task {name!r} has no gradient (it does not depend on any parameter)")
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in reach and not expanded:
                continue
            if stop_fn is not None and node is stop_fn:
                reach[node] = True
                continue
            var = getattr(node, "variable", None)
            if var is not None:  # AccumulateGrad: a leaf
                hit = id(var) in target_ids
                if not hit:
                    leaves.setdefault(id(var), var)
                reach[node] = hit
                continue
            children = [c for c, _ in node.next_functions if c is not None]
            if expanded:
                reach[node] = any(reach.get(c, False) for c in children)
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in reach)
        if not reach.get(root, False):
            what = "the shared features" if stop is not None else "any shared parameter"
            raise ConfigError(f"balancer.backward: loss of task {name!r} has no gradient path to {what}")
    return list(leaves.values())

