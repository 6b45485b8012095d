"""Validation of input features where data are loaded.

A NaN or infinite input feature would otherwise show up steps later as a NaN loss, blamed on the
loss; here it is a :class:`~polytask.errors.DataError` naming where it is. Only inputs are
checked: a NaN *target* marks an unlabelled row (see :meth:`MultiTaskDataset.from_numpy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polytask.errors import DataError


def check_finite_inputs(inputs: Any, where: str = "inputs") -> None:
    """DataError naming the input, column and first row of a NaN or infinite feature value.

    ``inputs``: a tensor ``(N, ...)`` (named ``where``) or a ``{name: tensor}`` dict (each named
    ``input 'name'``). Integer and boolean tensors (ids, masks) and non-tensors are not checked.
    Runs once per data set at load time (one device sync if the data already sit on a GPU).
    """
    if isinstance(inputs, Mapping):
        for name, value in inputs.items():
            check_finite_inputs(value, f"input {name!r}")
        return
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.numel() == 0:
        return
    finite = torch.isfinite(inputs)
    if bool(finite.all()):
        return
    bad = ~finite.reshape(inputs.shape[0], -1).cpu().numpy()  # (N, features)
    column = int(bad.any(axis=0).argmax())
    row, count = int(bad[:, column].argmax()), int(bad[:, column].sum())
    if inputs.ndim == 1:
        place = where
    elif inputs.ndim == 2:
        place = f"{where} column {column}"
    else:
        place = f"{where} feature {tuple(int(i) for i in np.unravel_index(column, inputs.shape[1:]))}"
    raise DataError(f"{place} has {count} NaN or infinite value(s) (first in row {row}); "
                    "input features must be finite (only NaN targets mean 'unlabelled')")


def check_feature_ids(inputs: Any, spec: Any) -> None:
    """DataError naming the feature, row and id when a categorical or sequence id lies outside
    ``[0, vocab_size)`` of the :class:`~polytask.data.features.FeatureSpec` (an embedding lookup
    would fail there with an index error on the CPU, a device assert on CUDA). Sequence features
    may hold their ``padding_idx``. Checked once, at load time; a missing feature is left to the
    model's input layer, which names it."""
    from polytask.data.features import FeatureSpec

    if not isinstance(spec, FeatureSpec) or not isinstance(inputs, Mapping):
        return
    for f in spec.embedded:
        ids = inputs.get(f.name)
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.numel() == 0:
            continue
        bad = (ids < 0) | (ids >= f.vocab_size)
        if bool(bad.any()):
            flat = bad.reshape(ids.shape[0], -1).any(dim=1)
            row = int(flat.to(torch.uint8).argmax())
            value = int(ids.reshape(ids.shape[0], -1)[row][bad.reshape(ids.shape[0], -1)[row]][0])
            raise DataError(f"feature {f.name!r}: id {value} in row {row} is outside its vocabulary "
                            f"[0, {f.vocab_size}) ({int(flat.sum())} row(s) affected)")
