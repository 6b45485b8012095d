"""Loss weighting and gradient aggregation ("balancers"), usable in any training loop.

``balance.get(name, **params)`` builds a balancer by name; ``balance.names()`` lists them.
Every balancer's ``backward`` also runs under ``torch.distributed`` (``process_group=``: the step
of the global batch on every rank; :mod:`polytask.balance.dist`) and skips a non-finite step
(zero update, state kept, counted in ``skipped_steps``).
"""

from __future__ import annotations

from typing import Any

from polytask.balance import loss_weighting as _loss_weighting  # noqa: F401  (registers)
from polytask.balance import loss_adaptive as _loss_adaptive  # noqa: F401  (registers)
from polytask.balance import engine as _engine  # noqa: F401  (registers gradient balancers)
from polytask.balance import robust, scalarizers, stateful_weightings  # noqa: F401  (register torchjd 0.18's remaining methods)
from polytask.balance import recent as _recent  # noqa: F401  (registers GO4Align, NTKMTL, Auto-Lambda)
from polytask.balance import dist
from polytask.balance.base import Balancer, LossWeighting, stack_losses
from polytask.balance.engine import GradientBalancer
from polytask.balance.registry import BALANCERS, register_aggregator


def get(name: str, **params: Any) -> Balancer:
    """The balancer registered as ``name``, built with ``params`` (unknown ones are refused)."""
    return BALANCERS.build(name, **params)


def names() -> list[str]:
    """Names of every registered balancer."""
    return BALANCERS.names()


__all__ = ["BALANCERS", "Balancer", "dist", "GradientBalancer", "LossWeighting", "get", "names", "register_aggregator",
           "stack_losses"]
