"""The pruning methods by name (:data:`PRUNERS`) and :func:`prune_model`, the Python entry point.

- ``pagcp``: :class:`~polytask.prune.pagcp.PAGCP` (Ye et al., TPAMI 2023), layer by layer under
  every task's loss constraint;
- ``taylor``, ``l1``, ``random``: task-agnostic one-shot baselines, the same keep ratio in every
  layer (:func:`~polytask.prune.core.uniform_search`), channels ranked by the first-order Taylor
  score of the summed loss (Molchanov et al., ICLR 2017), the L1 norm of their weights (Li et al.,
  ICLR 2017) or at random.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from polytask.errors import ConfigError
from polytask.prune import importance
from polytask.prune.core import PRUNERS, PruneContext, uniform_search
from polytask.prune.pagcp import PAGCP  # noqa: F401  (registers "pagcp")


@dataclass
class _Uniform:
    """A task-agnostic baseline: one importance score per channel, the same ratio in every layer."""

    seed: int = 0
    rows: int = 1024

    def scores(self, ctx: PruneContext) -> list:
        raise NotImplementedError

    def prune(self, ctx: PruneContext, target: float) -> nn.Module:
        return uniform_search(ctx, self.scores(ctx), target)[0]


@PRUNERS.register("l1", "magnitude")
@dataclass
class L1(_Uniform):
    """L1 norm of each channel's weights (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017)."""

    def scores(self, ctx: PruneContext) -> list:
        return importance.l1(ctx.modules(ctx.model))


@PRUNERS.register("taylor")
@dataclass
class Taylor(_Uniform):
    """First-order Taylor score of the summed task loss (Molchanov et al., ICLR 2017)."""

    def scores(self, ctx: PruneContext) -> list:
        return importance.taylor_summed(ctx.model, ctx.modules(ctx.model), ctx.score_data, ctx.tasks, self.rows)


@PRUNERS.register("random")
@dataclass
class Random(_Uniform):
    """Channels drawn at random (seeded)."""

    def scores(self, ctx: PruneContext) -> list:
        return importance.random(ctx.modules(ctx.model), self.seed)


def check_target(target: float) -> float:
    """ConfigError unless the FLOPs target is a ratio in (0, 1)."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise ConfigError(f"--target: flops must be a number in (0, 1), got {target!r}") from None
    if not 0 < value < 1:
        raise ConfigError(f"--target: flops must be in (0, 1) (the FLOPs left, as a fraction of the model's), "
                          f"got {value:g}")
    return value


def prune_model(ctx: PruneContext, method, target: float, **params) -> nn.Module:
    """A pruned copy of ``ctx.model`` with at most ``target`` of its FLOPs (``ctx.model`` is untouched).
    ``method``: a name of :data:`PRUNERS` (built with ``params``) or a pruner object."""
    target = check_target(target)
    if ctx.floor is not None and not ctx.floor >= 0:
        raise ConfigError(f"--keep-task-floor must be a percentage >= 0, got {ctx.floor!r}")
    pruner = PRUNERS.build(method, **params) if isinstance(method, str) else method
    return pruner.prune(ctx, target)


def names() -> Sequence[str]:
    return PRUNERS.names()
