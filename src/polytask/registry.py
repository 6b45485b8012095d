"""A small name -> class registry shared by :mod:`polytask.nn`, :mod:`polytask.data`,
:mod:`polytask.balance` and :mod:`polytask.merge`.

``Registry.build(name, **params)`` checks the name and the parameters against the class's
signature -- names and types -- once, for every method of every registry, so that a typo or a
wrong-typed value in a config gives one clear line instead of a ``TypeError`` (or a silently wrong
run) deep inside. Each registry knows the config path its parameters come from (``prefix``:
``model.params``, ``data.params``, ``balancer.params``, ``parameters``), and every message starts
with the key as the user typed it: ``model.params.num_experts: expected int, got 'abc'``.

Types understood (from the constructor's annotations): ``int``, ``float`` (an int is accepted),
``bool``, ``str``, ``None``, ``Literal[...]``, ``Optional``/unions, sequences (``Sequence[int]``,
``list[float]``, ``tuple[int, ...]``), mappings and classes (``isinstance``); anything else (or an
annotation that cannot be resolved) is not checked. Two lax conversions keep YAML configs
natural: a whole float (``4.0``) for an ``int`` becomes ``4``, and a string that YAML 1.1 leaves
unparsed but is a float in exponent form (``1e-3``) becomes a float where a float is expected.
Range checks (``>= 1``, ``in (0, 1]``) stay in the constructors.
"""

from __future__ import annotations

import builtins
import collections.abc as cabc
import difflib
import inspect
import keyword
import numbers
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar, Union

from polytask.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names (and aliases) to classes or factory functions of one kind.

    ``prefix`` is the config path of the parameters (``"model.params"``): error messages name
    ``<prefix>.<parameter>``.
    """

    def __init__(self, kind: str, prefix: str = "") -> None:
        self.kind = kind
        self.prefix = prefix
        self._entries: dict[str, Callable[..., T]] = {}
        self._lazy: dict[str, str] = {}  # name -> module that registers it when imported

    def register_lazy(self, module: str, name: str, *aliases: str) -> None:
        """Say that importing ``module`` registers ``name`` (and ``aliases``): the module is imported
        on the first lookup of one of them, so that a name whose module is heavy (or imports this
        registry's own package) is known from the start without being imported at start-up."""
        for key in (name, *aliases):
            self._lazy[key.lower()] = module

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
        return sorted({*self._entries, *self._lazy})

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries or name.lower() in self._lazy

    def lookup(self, name: str) -> Callable[..., T]:
        """The class registered under ``name``; ConfigError naming close matches if unknown."""
        key = str(name).lower().replace("-", "_")
        if key not in self._entries and key in self._lazy:
            self._import_lazy(name, self._lazy[key])
        if key not in self._entries:
            close = difflib.get_close_matches(key, self.names(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}"
            )
        return self._entries[key]

    def _import_lazy(self, name: str, module: str) -> None:
        """Import the module that registers ``name``; ConfigError naming it when that fails (a missing
        optional dependency) or when the module does not register it."""
        import importlib

        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"{self.kind} {name!r} needs {module}, which cannot be imported: {exc}") from None
        if str(name).lower().replace("-", "_") not in self._entries:
            raise ConfigError(f"{self.kind} {name!r}: importing {module} did not register it")

    def build(self, name: str, /, **params: Any) -> T:
        """Instantiate ``name`` with ``params``, after :func:`check_params` (names and types)."""
        factory = self.lookup(name)
        params = check_params(factory, params, f"{self.kind} {name!r}", prefix=self.prefix)
        return factory(**params)


def config_key(prefix: str, name: str) -> str:
    """``prefix.name`` as a config spells it: a keyword escaped for Python (``lambda_``) loses its
    trailing underscore (PEP 8's convention), as in mergekit configs."""
    if name.endswith("_") and keyword.iskeyword(name[:-1]):
        name = name[:-1]
    return f"{prefix}.{name}" if prefix else name


def check_params(factory: Callable[..., Any], params: dict[str, Any], what: str,
                 prefix: str = "") -> dict[str, Any]:
    """Check ``params`` against ``factory``'s signature: every key must be a parameter it takes,
    every value must fit the parameter's annotation. Returns the parameters to call it with (the
    two lax conversions of the module docstring applied). ConfigError naming ``prefix.key``."""
    sig = inspect.signature(factory)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    accepted = {
        n: p
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    hints = _type_hints(factory, accepted)
    out = dict(params)
    for key, value in params.items():
        if key not in accepted:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, accepted, n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"{config_key(prefix, key)}: {what} has no parameter {key!r}{hint}; "
                f"it takes: {', '.join(sorted(accepted)) or 'none'}"
            )
        tp = hints.get(key)
        if tp is None:
            continue
        ok, converted = _fit(value, tp)
        if not ok:
            raise ConfigError(f"{config_key(prefix, key)}: expected {describe_type(tp)}, got {_show(value)}")
        out[key] = converted
    return out


# ------------------------------------------------------------------ annotations
_FALLBACK_NS: dict[str, Any] = {
    **vars(builtins), **{n: getattr(typing, n) for n in typing.__all__},
    **{n: getattr(cabc, n) for n in cabc.__all__},
}


def _type_hints(factory: Callable[..., Any], params: dict[str, inspect.Parameter]) -> dict[str, Any]:
    """Resolved annotations of ``params`` (string annotations evaluated in the defining module);
    a parameter whose annotation cannot be resolved is left out (not checked)."""
    target = factory.__init__ if isinstance(factory, type) else factory
    target = inspect.unwrap(target)
    module_ns = dict(getattr(target, "__globals__", {}))
    try:  # the common case: the real annotations of the function
        resolved = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - an unresolvable hint leaves that parameter unchecked
        resolved = {}
    hints: dict[str, Any] = {}
    for name, p in params.items():
        ann = p.annotation
        if ann is inspect.Parameter.empty:
            continue
        if isinstance(ann, str):  # a signature built by hand, or an annotation get_type_hints missed
            if name in resolved and getattr(target, "__signature__", None) is None:
                hints[name] = resolved[name]
                continue
            try:
                for _ in range(2):  # twice: a quoted annotation under ``from __future__ import annotations``
                    if isinstance(ann, str):
                        ann = eval(ann, {**_FALLBACK_NS, **module_ns})  # noqa: S307 - our own annotations
            except Exception:  # noqa: BLE001
                continue
            if isinstance(ann, str):
                continue
        hints[name] = ann
    return hints


def describe_type(tp: Any) -> str:
    """A short English name of an annotation, for messages (``a list of int``, ``int or None``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None) or tp is None:
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or None" if type(None) in args else "")
    if origin in _SEQUENCES:
        inner = [a for a in args if a is not Ellipsis]
        return "a list of " + (" or ".join(dict.fromkeys(describe_type(a) for a in inner)) if inner else "values")
    if origin in _MAPPINGS:
        return "a mapping"
    if origin is cabc.Callable:
        return "a callable"
    return getattr(tp, "__name__", str(tp))


_SEQUENCES = (list, tuple, cabc.Sequence, cabc.MutableSequence, cabc.Iterable, cabc.Collection)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _fit(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits annotation ``tp``, and the value to use (lax conversions applied)."""
    if tp is Any or tp is object:
        return True, value
    if tp is None or tp is type(None):
        return value is None, value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args), value
    if origin in (Union, types.UnionType):
        for a in args:  # unconverted fits first, so that 4.0 stays a float for ``int | float``
            ok, converted = _fit(value, a)
            if ok and converted is value:
                return True, value
        for a in args:
            ok, converted = _fit(value, a)
            if ok:
                return True, converted
        return False, value
    if origin in _SEQUENCES:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return _is_array(value), value
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False, value
            fits = [_fit(v, a) for v, a in zip(value, args)]
        else:
            inner = args[0] if args else Any
            fits = [_fit(v, inner) for v in value]
        if not all(ok for ok, _ in fits):
            return False, value
        if all(v is orig for (_, v), orig in zip(fits, value)):
            return True, value
        return True, type(value)(v for _, v in fits)
    if origin in _MAPPINGS:
        if not isinstance(value, cabc.Mapping):
            return False, value
        if len(args) == 2 and not all(_fit(k, args[0])[0] and _fit(v, args[1])[0] for k, v in value.items()):
            return False, value
        return True, value
    if origin is cabc.Callable or tp is cabc.Callable:
        return callable(value), value
    if tp is bool:
        return isinstance(value, (bool, _np_bool())), value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, numbers.Integral):  # a NumPy integer becomes a Python int
            return True, value if type(value) is int else int(value)
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, numbers.Real) or _is_scalar_tensor(value):
            return True, value
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value  # TypeVar, ForwardRef, Protocol...: not checked


def _np_bool() -> type:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return bool
    return np.bool_


def _is_scalar_tensor(value: Any) -> bool:
    shape = getattr(value, "shape", None)
    return shape is not None and tuple(shape) == () and hasattr(value, "dtype")


def _is_array(value: Any) -> bool:
    """A tensor or NumPy array passed for a sequence parameter (from Python): accepted as is."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and len(getattr(value, "shape")) >= 1


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
