"""Registry of balancers by name (``balancer.name`` in configs), and :func:`register_aggregator`, the class
decorator that registers a gradient aggregator as a balancer where the aggregator is defined."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from polytask.registry import Registry

BALANCERS: Registry = Registry("balancer", prefix="balancer.params")

#: Where a gradient balancer takes the per-task gradients: shared parameters, or shared features.
Mode = Literal["parameters", "features"]

_A = TypeVar("_A", bound=type)


def register_aggregator(name: str, *aliases: str, default_mode: Mode = "parameters") -> Callable[[_A], _A]:
    """Class decorator: register balancer ``name`` (and ``aliases``) as a
    :class:`~polytask.balance.engine.GradientBalancer` around the decorated aggregator.

    The factory's keywords -- the config schema ``Registry.build`` checks -- are the aggregator's own
    (``generator`` aside) plus ``mode`` (``default_mode`` unless given), ``nan_policy`` and, for a random
    method (one that takes a ``generator``), ``seed``. Stack two decorators to register one aggregator
    under two defaults (``mgda`` and ``mgda_ub``)."""

    def decorate(cls: _A) -> _A:
        BALANCERS.register(name, *aliases)(_balancer_factory(name, cls, default_mode))
        return cls

    return decorate


def _balancer_factory(name: str, cls: type, default_mode: Mode) -> Callable[..., Any]:
    sig = inspect.signature(cls.__init__)
    hints = _resolved_annotations(cls.__init__)  # evaluated where the aggregator is defined
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
           for p in list(sig.parameters.values())[1:] if p.name != "generator"]
    extra = [inspect.Parameter("mode", inspect.Parameter.KEYWORD_ONLY, default=default_mode, annotation=Mode),
             inspect.Parameter("nan_policy", inspect.Parameter.KEYWORD_ONLY, default="skip", annotation=str)]
    if "generator" in sig.parameters:  # a random method: its draws come from a generator seeded with ``seed``
        extra.append(inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=None,
                                       annotation=int | None))

    def factory(*, mode: Mode = default_mode, nan_policy: Literal["skip", "raise"] = "skip", seed: int | None = None,
                **method_params: Any) -> Any:
        from polytask.balance.engine import GradientBalancer  # the engine imports the aggregators

        return GradientBalancer(cls(**method_params), mode=mode, nan_policy=nan_policy, seed=seed)

    factory.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=own + extra, return_annotation="GradientBalancer")
    factory.__name__ = f"{name}_balancer"
    factory.__doc__ = (f"``{name}``: :class:`GradientBalancer` with :class:`~{cls.__module__}.{cls.__name__}` "
                       f"(mode {default_mode!r} by default).\n\n{cls.__doc__}")
    return factory


def _resolved_annotations(init: Callable[..., Any]) -> dict[str, Any]:
    """``init``'s annotations evaluated in its own module (they are strings under ``from __future__ import
    annotations``); one that does not resolve is left out (its parameter keeps the string, which
    ``Registry.build`` then evaluates or leaves unchecked, as for any hand-built signature)."""
    module = getattr(init, "__globals__", {})
    out: dict[str, Any] = {}
    for key, ann in getattr(init, "__annotations__", {}).items():
        try:
            out[key] = eval(ann, dict(module)) if isinstance(ann, str) else ann  # noqa: S307 - our own annotations
        except Exception:  # noqa: BLE001
            continue
    return out
