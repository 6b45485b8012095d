"""Checks of merge parameters, with one message style.

Every failed check raises :class:`~polytask.errors.ConfigError` whose message starts with the key
as a merge config spells it (``parameters.lambda``, ``parameters.density``; a Python keyword
``lambda_`` is ``lambda`` in YAML) and ends with ``got ...``. Numbers must be real numbers (not
strings, except a float in exponent form such as ``1e-3``, which YAML 1.1 leaves a string;
not booleans) and finite; ranges are checked where the method defines one.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

import torch

from polytask.errors import ConfigError

__all__ = ["key", "number", "integer", "flag", "choice", "model_param", "MODEL_PARAM_RANGES"]

# YAML 1.1 (PyYAML) reads 1e-3 as a string; the registry reads it as a float where one is expected
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

_FLOAT32_MAX = torch.finfo(torch.float32).max

#: Ranges of the per-model parameters: (low, high, low_open). ``weight`` may be any finite number
#: (negative weights subtract a task vector).
MODEL_PARAM_RANGES: dict[str, tuple[float, float, bool]] = {
    "weight": (-math.inf, math.inf, False),
    "density": (0.0, 1.0, True),  # the kept fraction: 0 would keep nothing
    "gamma": (0.0, 1.0, False),
    "epsilon": (0.0, 1.0, False),  # DELLA's spread of keep probabilities around density
}


def key(name: str) -> str:
    """The config key of a method keyword: ``parameters.<name>`` without Python's trailing ``_``."""
    return f"parameters.{name.rstrip('_')}"


def _interval(low: float, high: float, low_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}]"


def number(where: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where}: must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{where}: must be a finite number, got {v}")
    if v < low or v > high or (low_open and v == low):
        raise ConfigError(f"{where}: must be in {_interval(low, high, low_open)}, got {v:g}")
    return v


def integer(where: str, value: Any, *, low: int = 0) -> int:
    """``value`` as an int ``>= low`` (an integral float such as ``2.0`` is accepted)."""
    v = number(where, value, low=low)
    if not v.is_integer():
        raise ConfigError(f"{where}: must be a whole number, got {value!r}")
    return int(v)


def flag(where: str, value: Any) -> bool:
    """``value`` as a bool; only ``true``/``false`` (a string such as ``"no"`` is refused)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    return value


def choice(where: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``allowed`` (compared by type and value, so ``1`` is not ``true``)."""
    for a in allowed:
        if type(value) is type(a) and value == a:
            return value
    names = ", ".join("null" if a is None else str(a).lower() if isinstance(a, bool) else repr(a) for a in allowed)
    raise ConfigError(f"{where}: must be one of {names}, got {value!r}")


def model_param(where: str, name: str, value: Any) -> float:
    """A per-model parameter (``weight``, ``density``, ``gamma``) checked against its range."""
    low, high, low_open = MODEL_PARAM_RANGES.get(name, (-math.inf, math.inf, False))
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: must be a number here (per-layer lists and filters are resolved from "
                          f"a merge config's parameters, per tensor), got {value!r}")
    v = number(where, value, low=low, high=high, low_open=low_open)
    if abs(v) > _FLOAT32_MAX:  # per-model values are float32 tensors: 1e39 would become inf
        raise ConfigError(f"{where}: must fit in float32 (magnitude at most {_FLOAT32_MAX:.4g}), got {v:g}")
    return v
