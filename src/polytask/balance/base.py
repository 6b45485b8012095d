"""Balancer interface: per-task losses (and, if needed, per-task gradients) -> one update.

A balancer is an ``nn.Module`` so that its state (learned log-variances, moving averages, warm
starts) travels with ``state_dict()`` into checkpoints. It is usable in any training loop::

    balancer = balance.get("ew")
    losses = {t: task.loss(out[t], y[t], mask[t]) for t, task in tasks.items()}
    balancer.backward(losses, shared=model.shared_parameters(), features=model.shared_features)
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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

    def post_step(self, losses: Mapping[str, Tensor]) -> None:
        """Receive the losses of the same batch after the optimizer step (default: ignore)."""

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
    ) -> Tensor:
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
