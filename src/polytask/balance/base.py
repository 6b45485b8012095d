"""Balancer interface: per-task losses (and, if needed, per-task gradients) -> one update.

A balancer is an ``nn.Module`` so that its state (learned log-variances, moving averages, warm
starts) travels with ``state_dict()`` into checkpoints. It is usable in any training loop::

    balancer = balance.get("ew")
    losses = {t: task.loss(out[t], y[t], mask[t]) for t, task in tasks.items()}
    balancer.backward(losses, shared=model.shared_parameters(), features=model.shared_features)
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError


def stack_losses(losses: Mapping[str, Tensor]) -> Tensor:
    """Stack a ``{task: scalar}`` mapping into a ``(T,)`` tensor, naming a non-scalar loss."""
    if not losses:
        raise ConfigError("balancer.backward: no task losses were given")
    for name, value in losses.items():
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(f"balancer.backward: loss of task {name!r} must be a scalar tensor, got {shape}")
    return torch.stack([v if v.ndim == 0 else v.reshape(()) for v in losses.values()])


class Balancer(nn.Module):
    """Base class of every balancer.

    Subclasses implement :meth:`backward`, which must fill ``.grad`` of every parameter that the
    losses depend on (accumulating, like ``Tensor.backward``) and return the task weights it
    used as a detached ``(T,)`` tensor on the losses' device (no host synchronisation).

    Methods that need the losses of the same batch re-evaluated after ``optimizer.step()``
    (FAMO) set ``needs_post_step_losses = True``; the training loop then makes that extra
    forward pass explicitly and calls :meth:`post_step` with the new losses.
    """

    needs_post_step_losses: bool = False
    #: With ``process_group=`` given, ``backward`` leaves ``.grad`` reduced over the ranks (the
    #: global batch's gradient): a training loop runs it under DDP's ``no_sync()`` and must not
    #: reduce again (see :mod:`polytask.balance.dist`).
    reduces_gradients: bool = True

    def post_step(self, losses: Mapping[str, Tensor], *, process_group: Any = None,
                  counts: Tensor | Sequence[float] | Mapping[str, Any] | None = None) -> None:
        """Receive the losses of the same batch after the optimizer step (default: ignore).

        Under ``torch.distributed`` pass the same ``process_group`` and ``counts`` as to ``backward``.
        """

    def end_epoch(self) -> None:
        """Called by the training loop after each training epoch (default: ignore).

        Methods defined on per-epoch quantities (DWA's epoch-average losses) close their
        running record here.
        """

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter] | None = None,
        features: Tensor | None = None,
        *,
        task_features: Tensor | None = None,
        process_group: Any = None,
        counts: Tensor | Sequence[float] | Mapping[str, Any] | None = None,
        loss_scale: Tensor | None = None,
        parameters: Iterable[Tensor] | None = None,
    ) -> Tensor:
        """Fill ``.grad`` with the balanced update of ``losses``; return the detached ``(T,)`` weights.

        Args:
            losses: ``{task: scalar loss}`` of this step (this rank's micro-batch under a group).
            shared: the model's shared parameters (gradient methods, DB-MTL, GradNorm).
            features: the shared representation the heads read (feature-level methods).
            task_features: the model's per-task copies of ``features`` (one-pass engine paths).
            process_group: a ``torch.distributed`` group: the update of the global batch on every
                rank (:mod:`polytask.balance.dist`); None: this process alone.
            counts: labelled rows per task on this rank (exact global losses under masks).
            loss_scale: a mixed-precision loss scale (device tensor); ``.grad`` ends up scaled.
            parameters: every parameter to reduce over the ranks (default: those the losses reach).
        """
        raise NotImplementedError


class LossWeighting(Balancer):
    """A balancer that needs loss values only: ``backward`` of ``Σ_t w_t L_t`` (cost: one backward).

    Subclasses implement :meth:`weights`, given the detached ``(T,)`` losses of this step.
    """

    def weights(self, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def backward(self, losses, shared=None, features=None) -> Tensor:
        vec = stack_losses(losses)
        w = self.weights(vec.detach())
        (w * vec).sum().backward()
        return w.detach()
