"""Multi-task datasets and the batch convention of docs/architecture.md.

A batch is ``(inputs, targets, mask)``: ``inputs`` a Tensor ``(B, ...)`` or a dict of such tensors,
``targets`` a ``{task: Tensor}`` dict, ``mask`` a ``{task: BoolTensor (B,)}`` dict (True where the
row is labelled for that task) or None when every row is labelled.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from polytask.data.checks import check_feature_ids, check_finite_inputs
from polytask.errors import DataError
from polytask.tasks import Task

Inputs = Tensor | dict[str, Tensor]


class Batch(NamedTuple):
    """One mini-batch: inputs, ``{task: target}``, ``{task: mask}`` (or None)."""

    inputs: Inputs
    targets: dict[str, Tensor]
    mask: dict[str, Tensor] | None


def _rows(inputs: Inputs) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    sizes = {k: v.shape[0] for k, v in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"input features have different numbers of rows: {sizes}")
    return next(iter(sizes.values()))


def _index(inputs: Inputs, idx: Tensor) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs[idx]
    return {k: v[idx] for k, v in inputs.items()}


def _to(inputs: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    return {k: v.to(device) for k, v in inputs.items()}


@dataclass
class MultiTaskDataset:
    """In-memory multi-task data: one input table, one target per task, optional label masks.

    Rows whose target is NaN are treated as unlabelled for that task when built with
    :meth:`from_numpy` / :meth:`from_pandas`.
    """

    inputs: Inputs
    targets: dict[str, Tensor]
    masks: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = _rows(self.inputs)
        for name, t in self.targets.items():
            if t.shape[0] != n:
                raise DataError(f"task {name!r}: target has {t.shape[0]} rows, inputs have {n}")
        for name, m in self.masks.items():
            if name not in self.targets:
                raise DataError(f"mask given for task {name!r}, which has no targets")
            if m.dtype != torch.bool or m.shape != (n,):
                raise DataError(f"task {name!r}: mask must be a bool tensor of shape ({n},), got "
                                f"{str(m.dtype).replace('torch.', '')} {tuple(m.shape)}")

    def __len__(self) -> int:
        return _rows(self.inputs)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_numpy(cls, inputs: Any, targets: Mapping[str, Any], masks: Mapping[str, Any] | None = None,
                   tasks: Sequence[Task] | None = None) -> MultiTaskDataset:
        """From arrays; NaN targets become unlabelled rows (mask False, target 0); a NaN or
        infinite input feature is a DataError naming the input and column.

        Targets of multiclass tasks become int64, others float32 (needs ``tasks`` to know kinds;
        without it integer arrays stay integer and float arrays stay float).
        """
        kinds = {t.name: t.kind for t in tasks} if tasks else {}
        if isinstance(inputs, Mapping):
            x: Inputs = {k: _tensor(v) for k, v in inputs.items()}
        else:
            x = _tensor(inputs)
        check_finite_inputs(x)
        tgt, msk = {}, {k: torch.as_tensor(np.asarray(v), dtype=torch.bool) for k, v in (masks or {}).items()}
        for name, values in targets.items():
            arr = np.asarray(values)
            if arr.dtype.kind == "f":
                nan = np.isnan(arr) if arr.ndim == 1 else np.isnan(arr).any(axis=tuple(range(1, arr.ndim)))
                if nan.any():
                    msk[name] = torch.as_tensor(~nan) & msk.get(name, torch.ones(len(arr), dtype=torch.bool))
                    arr = np.where(np.isnan(arr), 0.0, arr)
            if kinds.get(name) == "multiclass":
                tgt[name] = torch.as_tensor(arr.astype(np.int64))
            elif kinds.get(name) is not None or arr.dtype.kind == "f":
                tgt[name] = torch.as_tensor(arr.astype(np.float32))
            else:
                tgt[name] = torch.as_tensor(arr)
        return cls(x, tgt, msk)

    @classmethod
    def from_pandas(cls, frame: Any, features: Sequence[str], targets: Mapping[str, str | Sequence[str]],
                    tasks: Sequence[Task] | None = None) -> MultiTaskDataset:
        """From a DataFrame: ``features`` columns form the dense input, ``targets`` maps a task to
        its column (or list of columns for multi-output tasks). Missing values mark unlabelled rows.
        """
        missing = [c for c in list(features) + [c for v in targets.values() for c in _cols(v)]
                   if c not in frame.columns]
        if missing:
            raise DataError(f"DataFrame has no column(s) {', '.join(map(repr, missing))}")
        x = frame[list(features)].to_numpy(dtype=np.float32)
        bad = ~np.isfinite(x)
        if bad.any():
            j = int(bad.any(axis=0).argmax())
            raise DataError(f"DataFrame column {list(features)[j]!r} has {int(bad[:, j].sum())} missing, NaN or "
                            f"infinite value(s) (first in row {int(bad[:, j].argmax())}); features must be finite "
                            "(only missing targets mean 'unlabelled')")
        ys = {t: frame[_cols(c)].to_numpy(dtype=np.float64).squeeze(1) if isinstance(c, str)
              else frame[list(c)].to_numpy(dtype=np.float64) for t, c in targets.items()}
        return cls.from_numpy(x, ys, tasks=tasks)

    # ------------------------------------------------------------------ check
    def validate(self, tasks: Sequence[Task]) -> None:
        """Raise DataError if a task has no targets or its targets do not fit its kind, or if an
        input feature is NaN or infinite (naming the input and column)."""
        n = len(self)
        check_finite_inputs(self.inputs)
        for task in tasks:
            if task.name not in self.targets:
                raise DataError(f"task {task.name!r} has no targets in the data "
                                f"(targets present: {', '.join(self.targets) or 'none'})")
            task.check_target(self.targets[task.name], rows=n)

    # ------------------------------------------------------------------ use
    def subset(self, idx: Tensor | Sequence[int]) -> MultiTaskDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return MultiTaskDataset(_index(self.inputs, idx), {k: v[idx] for k, v in self.targets.items()},
                                {k: v[idx] for k, v in self.masks.items()})

    def to(self, device: torch.device | str) -> MultiTaskDataset:
        return MultiTaskDataset(_to(self.inputs, device), {k: v.to(device) for k, v in self.targets.items()},
                                {k: v.to(device) for k, v in self.masks.items()})

    def select_tasks(self, names: Sequence[str]) -> MultiTaskDataset:
        """The same rows with only the named tasks' targets (e.g. for a single-task baseline)."""
        return MultiTaskDataset(self.inputs, {k: self.targets[k] for k in names},
                                {k: v for k, v in self.masks.items() if k in names})

    def batch(self, idx: Tensor) -> Batch:
        masks = {k: v[idx] for k, v in self.masks.items()} or None
        return Batch(_index(self.inputs, idx), {k: v[idx] for k, v in self.targets.items()}, masks)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False, shard: tuple[int, int] | None = None) -> Iterator[Batch]:
        """Mini-batches in order, or shuffled with ``generator`` (indices drawn on the CPU).

        ``shard=(rank, world_size)``: ``batch_size`` is the global batch, and this yields rank's
        contiguous slice of each one (sizes differ by at most one row; the same generator on every
        rank gives every rank the same global order, so the slices are disjoint).
        """
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        device = self.device
        if order.device != device:
            order = order.to(device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            if shard is not None:
                rank, world = shard
                rows = idx.shape[0]
                idx = idx[rows * rank // world:rows * (rank + 1) // world]
            yield self.batch(idx)

    def full(self) -> Batch:
        """The whole dataset as one batch."""
        return Batch(self.inputs, dict(self.targets), dict(self.masks) or None)

    @property
    def device(self) -> torch.device:
        first = self.inputs if isinstance(self.inputs, Tensor) else next(iter(self.inputs.values()))
        return first.device


def _tensor(v: Any) -> Tensor:
    arr = np.asarray(v)
    return torch.as_tensor(arr.astype(np.float32) if arr.dtype.kind == "f" else arr)


def _cols(c: str | Sequence[str]) -> list[str]:
    return [c] if isinstance(c, str) else list(c)


@dataclass
class Splits:
    """Train / validation / test splits of one multi-task data set with its tasks.

    ``input_spec`` is what model constructors receive as ``input_dim``: an int (dense width) or a
    feature spec for categorical/sequence inputs.
    """

    name: str
    tasks: list[Task]
    train: MultiTaskDataset
    val: MultiTaskDataset
    test: MultiTaskDataset
    input_spec: Any

    def validate(self) -> None:
        """DataError naming the split for bad targets, non-finite features or, with a
        FeatureSpec, ids outside a feature's vocabulary."""
        for split in ("train", "val", "test"):
            try:
                getattr(self, split).validate(self.tasks)
                check_feature_ids(getattr(self, split).inputs, self.input_spec)
            except DataError as exc:
                raise DataError(f"{self.name} {split} split: {exc}") from None

    def select_tasks(self, names: Sequence[str]) -> Splits:
        keep = [t for t in self.tasks if t.name in names]
        return Splits(self.name, keep, self.train.select_tasks(names), self.val.select_tasks(names),
                      self.test.select_tasks(names), self.input_spec)
