"""A small name -> class registry shared by :mod:`polytask.nn`, :mod:`polytask.balance` and
:mod:`polytask.merge`.

``Registry.build(name, **params)`` checks the name and the parameters against the class's
signature, so that a typo in a config gives one clear line instead of a ``TypeError`` deep inside.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from polytask.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names (and aliases) to classes or factory functions of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str, *aliases: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``obj`` under ``name`` and ``aliases``."""

        def decorate(obj: Callable[..., T]) -> Callable[..., T]:
            for key in (name, *aliases):
                key = key.lower()
                if key in self._entries and self._entries[key] is not obj:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
                self._entries[key] = obj
            return obj

        return decorate

    def names(self) -> list[str]:
        """All registered names, aliases included, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def lookup(self, name: str) -> Callable[..., T]:
        """The class registered under ``name``; ConfigError naming close matches if unknown."""
        key = str(name).lower().replace("-", "_")
        if key not in self._entries:
            close = difflib.get_close_matches(key, self._entries, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}"
            )
        return self._entries[key]

    def build(self, name: str, /, **params: Any) -> T:
        """Instantiate ``name`` with ``params``, rejecting parameters the class does not take."""
        factory = self.lookup(name)
        check_params(factory, params, f"{self.kind} {name!r}")
        return factory(**params)


def check_params(factory: Callable[..., Any], params: dict[str, Any], what: str) -> None:
    """Raise ConfigError if ``params`` has a key that ``factory`` does not accept."""
    sig = inspect.signature(factory)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = {
        n
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"{what} has no parameter {key!r}; it takes: {', '.join(sorted(accepted)) or 'none'}"
            )
