"""Datasets, masks from NaN, built-in data sets (the synthetic generator's correlation)."""

import numpy as np
import pandas as pd
import pytest
import torch

from polytask import data
from polytask.data import MultiTaskDataset, task_weight_vectors
from polytask.errors import ConfigError, DataError
from polytask.tasks import Task


def _label_corr(p, rows=20000, seed=0):
    s = data.synthetic(num_tasks=2, correlation=p, num_rows=rows, seed=seed)
    y = torch.stack([torch.cat([s.train.targets[t], s.val.targets[t], s.test.targets[t]]) for t in ("task0", "task1")])
    return torch.corrcoef(y)[0, 1].item()


def test_synthetic_weight_vectors_have_the_requested_cosine():
    gen = torch.Generator().manual_seed(1)
    for p in (0.0, 0.3, 0.9):
        w = task_weight_vectors(5, p, 40, 1, gen)
        cos = torch.nn.functional.normalize(w, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
        off = cos[~torch.eye(5, dtype=torch.bool)]
        assert torch.allclose(off, torch.full_like(off, p), atol=1e-9)
    w = task_weight_vectors(2, -0.5, 10, 1, gen)
    assert torch.nn.functional.cosine_similarity(w[0], w[1], dim=0).item() == pytest.approx(-0.5)


def test_synthetic_label_correlation_follows_the_parameter():
    corr = [_label_corr(p) for p in (0.0, 0.5, 0.9, 1.0)]
    assert abs(corr[0]) < 0.05  # independent weight vectors -> uncorrelated labels
    assert corr[-1] > 0.97  # identical weight vectors -> labels equal up to noise
    assert all(a < b for a, b in zip(corr, corr[1:]))  # monotone in the parameter
    assert _label_corr(-0.9) < -0.5


def test_synthetic_clusters_are_correlated_within_and_not_across():
    s = data.synthetic(num_tasks=4, correlation=0.9, clusters=2, num_rows=20000)
    y = torch.stack([s.train.targets[f"task{i}"] for i in range(4)])
    c = torch.corrcoef(y)
    assert c[0, 1] > 0.6 and c[2, 3] > 0.6
    assert abs(c[0, 2]) < 0.05 and abs(c[1, 3]) < 0.05


def test_synthetic_is_seeded():
    a, b = data.synthetic(seed=3, num_rows=100), data.synthetic(seed=3, num_rows=100)
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert not torch.equal(a.train.inputs, data.synthetic(seed=4, num_rows=100).train.inputs)


def test_synthetic_bad_params():
    with pytest.raises(ConfigError, match="correlation"):
        data.synthetic(num_tasks=3, correlation=-0.2)
    with pytest.raises(ConfigError, match="input_dim"):
        data.synthetic(num_tasks=8, input_dim=5)
    with pytest.raises(ConfigError, match="no parameter 'rows'"):
        data.load("synthetic", rows=5)
    with pytest.raises(ConfigError, match="unknown dataset 'digit'"):
        data.load("digit")


def test_digits_tasks_are_consistent_and_split_is_fixed():
    a, b = data.load("digits"), data.load("digits")
    assert torch.equal(a.test.inputs, b.test.inputs)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    t = a.train.targets
    assert torch.equal(t["odd"], (t["digit"] % 2).float())
    assert torch.equal(t["ge5"], (t["digit"] >= 5).float())
    assert torch.equal(t["value"], t["digit"].float())


def test_from_numpy_marks_nan_targets_unlabelled():
    tasks = [Task("y", "regression"), Task("c", "multiclass", num_classes=3)]
    ds = MultiTaskDataset.from_numpy(np.ones((4, 2)), {"y": [1.0, np.nan, 3.0, np.nan], "c": [0, 1, 2, 1]}, tasks=tasks)
    assert ds.masks["y"].tolist() == [True, False, True, False]
    assert ds.targets["c"].dtype == torch.int64 and "c" not in ds.masks
    assert not torch.isnan(ds.targets["y"]).any()
    ds.validate(tasks)


def test_from_pandas_and_validation_errors():
    df = pd.DataFrame({"a": [1.0, 2, 3], "b": [0.0, 1, 0], "click": [0, 1, None]})
    tasks = [Task("click", "binary")]
    ds = MultiTaskDataset.from_pandas(df, ["a", "b"], {"click": "click"}, tasks=tasks)
    assert ds.inputs.shape == (3, 2) and ds.masks["click"].tolist() == [True, True, False]
    with pytest.raises(DataError, match="'buy'"):
        MultiTaskDataset.from_pandas(df, ["a"], {"click": "buy"})
    with pytest.raises(DataError, match="task 'conv' has no targets"):
        ds.validate(tasks + [Task("conv", "binary")])
    with pytest.raises(DataError, match="task .x.: target has 2 rows"):
        MultiTaskDataset(torch.ones(3, 2), {"x": torch.ones(2)})


def test_batches_cover_every_row_once_and_shuffle_is_seeded():
    ds = MultiTaskDataset(torch.arange(10).float()[:, None], {"y": torch.arange(10).float()})
    rows = torch.cat([b.inputs[:, 0] for b in ds.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(rows.tolist()) == list(range(10))
    again = torch.cat([b.inputs[:, 0] for b in ds.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(rows, again)
