"""The aggregator bases (:class:`Aggregator`, :class:`GramianWeighting`) and the helpers the families share:
the solve dtype, argument checks, Gramian normalisation, the non-finite fallbacks, the lazily sized state
of stateful methods, preference vectors and least-squares weights for logging."""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError


_SOLVE_DTYPE = torch.float64


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class Aggregator(nn.Module):
    """Base class: aggregate a ``(T, D)`` Jacobian (one row per task) into a ``(D,)`` update.

    ``parameter_space_only`` is True for methods whose state is indexed by the coordinates of the
    Jacobian (MoCo, ExcessMTL, MetaBalance): they need the same ``D`` coordinates at every step, i.e.
    gradients w.r.t. parameters, not w.r.t. a batch of features.
    """

    parameter_space_only: ClassVar[bool] = False
    #: Numbers of elements of the shared parameter tensors whose flattened gradients make up the
    #: Jacobian's columns, in order; set by the engine in parameter mode (``None``: unknown).
    parameter_sizes: list[int] | None = None

    def extra_repr(self) -> str:
        """The constructor's keywords and their values (a printed balancer shows its hyperparameters)."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n not in ("self", "generator")]
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in names if hasattr(self, n))

    def aggregate(self, jacobian: Tensor) -> tuple[Tensor, Tensor]:
        """``(update, weights)``; ``weights`` (``(T,)``) are such that ``update = J^T weights``
        where the method's update lies in the span of the task gradients (else a least-squares
        fit, for logging)."""
        raise NotImplementedError

    def forward(self, jacobian: Tensor) -> Tensor:
        """The aggregated ``(D,)`` update."""
        if jacobian.ndim != 2:
            raise ValueError(f"expected a (T, D) Jacobian, got shape {tuple(jacobian.shape)}")
        return self.aggregate(jacobian)[0]


class GramianWeighting(Aggregator):
    """An aggregator whose update is ``J^T w`` with ``w`` a function of ``G = J J^T`` only."""

    def weights(self, gramian: Tensor) -> Tensor:
        """The ``(T,)`` weights, given the ``(T, T)`` Gramian of the task gradients."""
        raise NotImplementedError

    def solve(self, gramian: Tensor) -> Tensor:
        """:meth:`weights` solved in float64, returned in the Gramian's dtype: the one entry for every
        source of the Gramian (the Jacobian here; the engine's linear heads and all-reduced Gramians)."""
        return self.weights(gramian.to(_SOLVE_DTYPE)).to(gramian.dtype)

    def aggregate(self, jacobian: Tensor) -> tuple[Tensor, Tensor]:
        w = self.solve(jacobian @ jacobian.T)
        return w @ jacobian, w


def gramian_only(aggregator: Aggregator) -> bool:
    """Whether ``aggregator``'s update is ``J^T weights(J J^T)``: a :class:`GramianWeighting` that keeps the base
    ``aggregate``. Such a method needs the Gramian only, which the engine can form without the Jacobian
    (feature level, linear heads, micro-batches, one exchange under a process group)."""
    return isinstance(aggregator, GramianWeighting) and type(aggregator).aggregate is GramianWeighting.aggregate


def _normalize(gramian: Tensor, eps: float) -> Tensor:
    """``G / trace(G)`` (the Gramian of the Frobenius-normalised Jacobian); 0 if the trace < eps."""
    trace = gramian.diagonal().sum()
    return torch.where(trace < eps, torch.zeros_like(gramian), gramian / trace.clamp_min(torch.finfo(gramian.dtype).tiny))


def _finite_or_identity(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """``(G, True)`` when every entry of ``G`` is finite, else ``(I, False)``, as tensors (no host sync).

    For the methods that decompose ``G`` (eigh, pinv): those raise on NaN/inf. They solve on the
    identity instead and return :func:`_nan_unless` the flag, which the engine's guard skips."""
    finite = torch.isfinite(gramian).all()
    eye = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    return torch.where(finite, gramian, eye), finite


def _nan_unless(finite: Tensor, weights: Tensor) -> Tensor:
    """``weights`` where ``finite``, else NaN (a non-finite input gives a non-finite result)."""
    return torch.where(finite, weights, torch.full_like(weights, float("nan")))


class _LazyStateMixin:
    """State whose shape is only known at the first step (number of tasks, parameters), in buffers.

    The buffers start empty; loading a state dict resizes them first, so save/restore works. Two
    0-d buffers say what the state is worth: ``tasks``, the number of tasks it belongs to (0 before
    the first applied step), and ``steps``, the steps applied to it. The state is fresh where
    ``tasks != T`` (or a buffer was just resized), decided on the device with ``torch.where``, never
    from a buffer's shape alone: a skipped non-finite step leaves both counters as they were (the
    engine restores every buffer that kept its shape, :mod:`polytask.balance.engine`), so whatever
    that step created lazily -- at the first step, or the first with another task set -- is
    ignored by the next one, and a NaN there cannot poison the method. State dicts written before
    the counters were buffers (``steps`` was in ``get_extra_state``, under ``_legacy_counter``)
    still load.
    """

    _legacy_counter: ClassVar[str | None] = None
    #: None: these methods replace their buffers at each step (``self.x = f(...)``), never change them in place,
    #: so the engine's non-finite guard keeps a reference to the old tensors instead of copies (a ``T x D``
    #: buffer, MoCo's or ExcessMTL's, is not copied every step).
    _state_updated_in_place: ClassVar[tuple[str, ...]] = ()

    def _init_steps(self) -> None:
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # type: ignore[attr-defined]
        self.register_buffer("tasks", torch.zeros((), dtype=torch.long))  # type: ignore[attr-defined]

    def _fresh(self, n: int, resized: bool = False) -> Tensor:
        """0-d bool: no state for these ``n`` tasks yet (``resized``: a buffer was just reallocated)."""
        return (self.tasks != n) | resized  # type: ignore[attr-defined]

    def _advance(self, fresh: Tensor, n: int) -> Tensor:
        """Count this step (for ``n`` tasks); returns the number of steps applied before it (0 if fresh)."""
        before = torch.where(fresh, 0, self.steps)  # type: ignore[attr-defined]
        self.steps, self.tasks = before + 1, torch.full_like(self.tasks, n)  # type: ignore[attr-defined]
        return before

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        legacy = state_dict.pop(prefix + "_extra_state", None)
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k[len(prefix):] in self._buffers}  # type: ignore[attr-defined]
        if "steps" not in own:  # saved before the counters were buffers
            if self._legacy_counter:
                count = int(legacy.get(self._legacy_counter, 0)) if isinstance(legacy, dict) else 0
            else:  # no counter saved: any saved state means steps were taken
                count = int(any(v.numel() > 0 for v in own.values()))
            sizes = [v.shape[0] for v in own.values() if v.ndim >= 1 and v.numel() > 0]
            state_dict[prefix + "steps"] = torch.tensor(count)
            state_dict[prefix + "tasks"] = torch.tensor(sizes[0] if sizes and count else 0)
        for name, buf in self._buffers.items():  # type: ignore[attr-defined]
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)  # type: ignore[attr-defined]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


def _preference(pref: list[float] | None, n: int, like: Tensor, who: str) -> Tensor:
    if pref is None:
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    if len(pref) != n:
        raise ConfigError(f"{who}: pref_vector has {len(pref)} entries but there are {n} tasks")
    return torch.tensor(pref, dtype=like.dtype, device=like.device)


def _least_squares_weights(jacobian: Tensor, update: Tensor) -> Tensor:
    """Weights ``w`` minimising ``||J^T w - update||`` (for logging methods not in the span)."""
    gram, finite = _finite_or_identity((jacobian @ jacobian.T).to(_SOLVE_DTYPE))
    w = torch.linalg.pinv(gram, hermitian=True) @ (jacobian @ update).to(_SOLVE_DTYPE)
    return _nan_unless(finite, w).to(jacobian.dtype)
