"""Scalarisations of the loss vector that torchjd 0.18 ships and polytask lacked: constant weights,
the mean, PBI and COSMOS.

Each is a :class:`~polytask.balance.base.LossWeighting`: the step back-propagates ``Σ_t w_t L_t``
with ``w = ∂f/∂L`` at this step's (detached, global under a process group) losses, which is the
gradient of the scalarisation ``f(L)`` itself (``objective``). ``ew`` is torchjd's ``Sum``, ``rlw``
its ``Random``, ``gls`` its ``GeometricMean``, ``stch`` its ``STCH``. Preferences are fixed per
balancer: to trace a Pareto front, build one balancer per preference (or set ``preference``
between steps, e.g. to a Dirichlet draw as the COSMOS paper does per batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from polytask.balance.base import LossWeighting
from polytask.balance.registry import BALANCERS
from polytask.errors import ConfigError

__all__ = ["COSMOS", "ConstantWeighting", "MeanWeighting", "PBI"]


def _vector(values: Sequence[float] | None, like: Tensor, default: float, key: str, who: str) -> Tensor:
    """``values`` as a tensor like ``like`` (``default`` everywhere if None); ConfigError on a length mismatch."""
    if values is None:
        return torch.full_like(like, default)
    if len(values) != like.shape[0]:
        raise ConfigError(f"balancer.params.{key}: {who} has {len(values)} entries for {like.shape[0]} tasks")
    return torch.tensor(list(values), dtype=like.dtype, device=like.device)


def _non_negative(value: float, key: str, who: str) -> float:
    if not value >= 0:
        raise ConfigError(f"balancer.params.{key}: {who} needs {key} >= 0, got {value!r}")
    return float(value)


@BALANCERS.register("constant", "fixed_weights")
class ConstantWeighting(LossWeighting):
    """Constant weights: the update minimises ``Σ_t w_t L_t`` with ``w`` fixed (linear scalarisation
    with a preference; torchjd 0.18's ``scalarization.Constant`` and, applied to the Jacobian,
    ``aggregation.Constant``: the same update, so one loss-level balancer serves both).

    Args:
        weights: ``w``, one per task in the losses' order (default 1 each, ``ew``).
    """

    def __init__(self, weights: Sequence[float] | None = None, nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        self.weights_ = None if weights is None else [float(w) for w in weights]

    def extra_repr(self) -> str:
        return f"weights={self.weights_!r}"

    def weights(self, losses: Tensor) -> Tensor:
        return _vector(self.weights_, losses, 1.0, "weights", "constant")


@BALANCERS.register("mean")
class MeanWeighting(LossWeighting):
    """The mean of the losses, ``(1/T) Σ_t L_t`` (torchjd 0.18's ``scalarization.Mean``; ``ew`` is the sum)."""

    def weights(self, losses: Tensor) -> Tensor:
        return torch.full_like(losses, 1.0 / losses.shape[0])


@BALANCERS.register("pbi")
class PBI(LossWeighting):
    """Penalty-based boundary intersection (PBI): distance along a preference plus a penalty off it.

    Zhang & Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition", IEEE
    Transactions on Evolutionary Computation 11(6), 2007 (the PBI decomposition):
    ``f(L) = d_1 + theta d_2`` with ``d_1 = (L - z*)^T w^``, ``d_2 = ||(L - z*) - d_1 w^||`` and
    ``w^ = w / ||w||``. Its gradient weights are ``w^ + theta (I - w^ w^^T) p / d_2`` with
    ``p = (L - z*) - d_1 w^``; they may be negative (the penalty pulls the losses towards the
    preference ray). As torchjd 0.18 (``scalarization.PBI``): ``1e-12`` under the square root of
    ``d_2`` keeps the gradient finite on the ray. Default ``theta = 5`` is the paper's.

    Args:
        theta: penalty on the distance to the preference ray (>= 0; 0: the projection ``d_1``).
        preference: ``w`` (non-negative; default 1 each).
        reference: the ideal point ``z*``, a lower bound on the losses (default 0).
    """

    def __init__(self, theta: float = 5.0, preference: Sequence[float] | None = None,
                 reference: Sequence[float] | None = None, nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        self.theta = _non_negative(theta, "theta", "pbi")
        self.preference = None if preference is None else [float(p) for p in preference]
        self.reference = None if reference is None else [float(r) for r in reference]

    def extra_repr(self) -> str:
        return f"theta={self.theta}, preference={self.preference!r}, reference={self.reference!r}"

    def _parts(self, losses: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(w^, d_1, p)`` for a ``(T,)`` loss vector."""
        shifted = losses - _vector(self.reference, losses, 0.0, "reference", "pbi")
        direction = _vector(self.preference, losses, 1.0, "preference", "pbi")
        direction = direction / direction.norm()
        d1 = shifted @ direction
        return direction, d1, shifted - d1 * direction

    def objective(self, losses: Tensor) -> Tensor:
        """``d_1 + theta d_2`` of a ``(T,)`` loss vector."""
        _, d1, perpendicular = self._parts(losses)
        return d1 + self.theta * torch.sqrt(perpendicular @ perpendicular + 1e-12)

    def weights(self, losses: Tensor) -> Tensor:
        direction, _, perpendicular = self._parts(losses)
        d2 = torch.sqrt(perpendicular @ perpendicular + 1e-12)
        projected = perpendicular - (perpendicular @ direction) * direction  # (I - w^ w^^T) p: p is ⊥ w^ up to rounding
        return direction + self.theta * projected / d2


@BALANCERS.register("cosmos")
class COSMOS(LossWeighting):
    """COSMOS: linear scalarisation rewarded for the losses' alignment with the preference.

    Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective Learning",
    ICDM 2021: ``f(L) = r^T L - lambda cos(r, L)``. Its gradient weights are
    ``r - lambda (r / (||r|| ||L||) - (r^T L) L / (||r|| ||L||^3))``. The paper also draws ``r``
    from a Dirichlet distribution per batch and feeds it to the model as an input; that is the
    model's business (set ``preference`` between steps), this balancer is the objective, as in
    torchjd 0.18's ``scalarization.COSMOS``. torchjd computes the cosine with
    ``torch.nn.functional.cosine_similarity`` (norms clamped at 1e-8); we clamp ``||L||`` at
    1e-8 too, so the two agree except for losses all within 1e-8 of zero.

    Args:
        lambda_: weight of the cosine reward (>= 0; 0: linear scalarisation). The paper uses 0.01
            to 8 depending on the data; default 1.
        preference: ``r`` (default 1/T each).
    """

    def __init__(self, lambda_: float = 1.0, preference: Sequence[float] | None = None,
                 nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        self.lambda_ = _non_negative(lambda_, "lambda_", "cosmos")
        self.preference = None if preference is None else [float(p) for p in preference]

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, preference={self.preference!r}"

    def _preference(self, losses: Tensor) -> Tensor:
        return _vector(self.preference, losses, 1.0 / losses.shape[0], "preference", "cosmos")

    def objective(self, losses: Tensor) -> Tensor:
        """``r^T L - lambda cos(r, L)`` of a ``(T,)`` loss vector."""
        r = self._preference(losses)
        return r @ losses - self.lambda_ * (r @ losses) / (r.norm() * losses.norm()).clamp_min(1e-8)

    def weights(self, losses: Tensor) -> Tensor:
        r = self._preference(losses)
        r_norm, l_norm = r.norm(), losses.norm().clamp_min(1e-8)
        cosine_grad = r / (r_norm * l_norm) - (r @ losses) * losses / (r_norm * l_norm ** 3)
        return r - self.lambda_ * cosine_grad
