"""Per-task losses and gradients on the shared parameters, for the diagnostics.

The diagnostics run *beside* training: they must not change its trajectory. So every measurement
runs the model in eval mode (no dropout draws from the global RNG, no BatchNorm statistics
updates), uses ``torch.autograd.grad`` (never touches ``.grad``) and restores the attributes a
forward pass leaves on the model (``shared_features``, ``gate_weights``, ``aux_loss``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError, DataError
from polytask.tasks import Task

#: attributes a polytask model sets during forward; restored after a diagnostic pass.
_FORWARD_ATTRIBUTES = ("shared_features", "gate_weights", "aux_loss")


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode and the forward attributes of ``model`` restored on exit."""
    saved = {a: model.__dict__[a] for a in _FORWARD_ATTRIBUTES if a in model.__dict__}
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for a in _FORWARD_ATTRIBUTES:
            if a in saved:
                model.__dict__[a] = saved[a]


def batch_parts(batch: Any) -> tuple[Any, Mapping[str, Tensor], Mapping[str, Tensor] | None]:
    """``(inputs, targets, mask)`` of a batch (a :class:`~polytask.data.Batch` or a 2/3-tuple)."""
    if isinstance(batch, Sequence) and len(batch) in (2, 3):
        inputs, targets = batch[0], batch[1]
        mask = batch[2] if len(batch) == 3 else None
        return inputs, targets, mask
    raise DataError("analyze: a batch must be (inputs, targets) or (inputs, targets, mask)")


def task_losses(outputs: Mapping[str, Tensor], tasks: Sequence[Task], targets: Mapping[str, Tensor],
                mask: Mapping[str, Tensor] | None) -> Tensor:
    """The ``(T,)`` stacked losses of ``tasks`` (masked means over labelled rows)."""
    missing = [t.name for t in tasks if t.name not in outputs or t.name not in targets]
    if missing:
        raise DataError(f"analyze: no model output or target for task(s) {', '.join(map(repr, missing))}")
    return torch.stack([t.loss(outputs[t.name], targets[t.name], None if mask is None else mask.get(t.name))
                        for t in tasks])


def shared_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the model's shared parameters (all parameters if it does not say)."""
    fn = getattr(model, "shared_parameters", None)
    shared = list(fn()) if callable(fn) else list(model.parameters())
    ids = {id(p) for p in shared if p.requires_grad}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    if not named:
        raise ConfigError("analyze: the model has no trainable shared parameters")
    return named


def per_task_gradients(losses: Tensor, params: Sequence[Tensor], batched: bool = True) -> list[Tensor]:
    """Jacobian of the ``(T,)`` losses w.r.t. ``params``: one ``(T, *p.shape)`` tensor per parameter.

    Delegates to the gradient engine's :func:`polytask.balance.engine.task_jacobian`: one batched
    backward (``is_grads_batched``) by default, or one backward per task (``batched=False``; the
    engine falls back to it for graphs vmap cannot batch). A parameter that a task does not reach
    gets zeros.
    """
    from polytask.balance.engine import task_jacobian

    return task_jacobian(list(losses.unbind(0)), list(params), batched=batched)


def group_names(param_names: Sequence[str], by: str) -> tuple[list[str], list[int]]:
    """Layer groups of the shared parameters and the group index of each parameter.

    ``by``: ``module`` (top-level child, e.g. ``bottom``, ``experts``), ``layer`` (the module that
    owns the tensor, e.g. ``bottom.0``) or ``tensor`` (each tensor alone).
    """
    if by not in ("module", "layer", "tensor"):
        raise ConfigError(f"analyze: groups must be 'module', 'layer' or 'tensor', got {by!r}")
    keys = []
    for name in param_names:
        parts = name.split(".")
        if by == "module":
            keys.append(parts[0])
        elif by == "layer":
            keys.append(".".join(parts[:-1]) or parts[0])
        else:
            keys.append(name)
    order = list(dict.fromkeys(keys))
    index = {k: i for i, k in enumerate(order)}
    return order, [index[k] for k in keys]


def grouped_gramians(jacobians: Sequence[Tensor], group_of: Tensor, num_groups: int) -> Tensor:
    """``(G, T, T)`` Gramians ``J_g J_gᵀ`` of each layer group (the whole model is their sum).

    A loop over parameter tensors (as optimizers do), never over tasks; no ``T×D`` matrix is built.
    """
    t = jacobians[0].shape[0]
    grams = torch.stack([j.reshape(t, -1).float() @ j.reshape(t, -1).float().T for j in jacobians])
    out = grams.new_zeros((num_groups, t, t))
    return out.index_add_(0, group_of, grams)  # group_of: (P,) long tensor on the grads' device
