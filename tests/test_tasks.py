"""Losses and metrics against scikit-learn / plain formulas; masks; Δm%."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from polytask.errors import ConfigError, DataError
from polytask.tasks import Task, delta_m, roc_auc, tasks_from_config

g = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_sklearn(ties):
    for _ in range(5):
        scores = torch.randn(300, generator=g)
        if ties:
            scores = (scores * 3).round()  # many tied scores
        labels = (torch.rand(300, generator=g) < 0.3).float()
        assert roc_auc(scores, labels).item() == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)


def test_auc_single_class_is_nan():
    assert math.isnan(roc_auc(torch.randn(10), torch.ones(10)).item())


def test_binary_metrics_match_sklearn():
    t = Task("ctr", "binary", metrics=("auc", "logloss", "accuracy"))
    logits = torch.randn(500, 1, generator=g)
    y = (torch.rand(500, generator=g) < torch.sigmoid(logits[:, 0])).float()
    res = t.evaluate(logits, y)
    p = torch.sigmoid(logits[:, 0]).double().numpy()
    assert res["auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-9)
    assert res["logloss"] == pytest.approx(skm.log_loss(y, p), rel=1e-5)
    assert res["accuracy"] == pytest.approx(skm.accuracy_score(y, p > 0.5))
    assert res["loss"] == pytest.approx(res["logloss"], rel=1e-6)


def test_multiclass_metrics_match_sklearn():
    t = Task("digit", "multiclass", num_classes=5)
    logits = torch.randn(400, 5, generator=g)
    y = torch.randint(0, 5, (400,), generator=g)
    res = t.evaluate(logits, y)
    p = torch.softmax(logits.double(), 1).numpy()
    assert res["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    assert res["logloss"] == pytest.approx(skm.log_loss(y, p, labels=range(5)), rel=1e-5)


def test_multilabel_macro_auc_matches_sklearn():
    t = Task("tags", "multilabel", num_classes=4)
    logits = torch.randn(300, 4, generator=g)
    y = (torch.rand(300, 4, generator=g) < 0.4).float()
    res = t.evaluate(logits, y)
    assert res["auc"] == pytest.approx(skm.roc_auc_score(y, logits, average="macro"), abs=1e-9)
    p = torch.sigmoid(logits).double().numpy()
    expected = -(y.numpy() * np.log(p) + (1 - y.numpy()) * np.log(1 - p)).mean()
    assert res["logloss"] == pytest.approx(expected, rel=1e-5)


def test_regression_metrics_match_sklearn():
    t = Task("price", "regression", metrics=("mae", "rmse"))
    pred, y = torch.randn(200, 1, generator=g), torch.randn(200, generator=g)
    res = t.evaluate(pred, y)
    assert res["mae"] == pytest.approx(skm.mean_absolute_error(y, pred[:, 0]), rel=1e-6)
    assert res["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, pred[:, 0])), rel=1e-6)
    assert res["loss"] == pytest.approx(skm.mean_squared_error(y, pred[:, 0]), rel=1e-6)


def test_masked_loss_equals_loss_on_labelled_rows_and_ignores_the_rest():
    t = Task("r", "regression")
    pred = torch.randn(50, 1, generator=g, requires_grad=True)
    y = torch.randn(50, generator=g)
    mask = torch.rand(50, generator=g) < 0.5
    y_nan = torch.where(mask, y, torch.full_like(y, float("nan")))  # unlabelled rows hold NaN
    loss = t.loss(pred, y_nan, mask)
    assert loss.item() == pytest.approx(((pred[mask, 0] - y[mask]) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask] != 0).all()


def test_masked_loss_with_no_labelled_row_is_zero_without_gradient():
    t = Task("b", "binary")
    logits = torch.randn(8, 1, requires_grad=True)
    loss = t.loss(logits, torch.ones(8), torch.zeros(8, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and (logits.grad == 0).all()


def test_evaluate_uses_only_labelled_rows():
    t = Task("b", "binary", metrics=("auc",))
    logits, y = torch.randn(100, 1, generator=g), (torch.rand(100, generator=g) < 0.5).float()
    mask = torch.arange(100) < 60
    assert t.evaluate(logits, y, mask)["auc"] == pytest.approx(skm.roc_auc_score(y[:60], logits[:60, 0]))


def test_delta_m_hand_computed():
    single = {"a": {"accuracy": 0.80}, "b": {"mae": 2.0}}
    mtl = {"a": {"accuracy": 0.88}, "b": {"mae": 2.5}}
    # accuracy up 10% (a gain: -10), MAE up 25% (a loss: +25) -> mean 7.5
    assert delta_m(mtl, single, metrics={"a": ["accuracy"], "b": ["mae"]}) == pytest.approx(7.5)
    assert delta_m(single, single, metrics={"a": ["accuracy"], "b": ["mae"]}) == 0.0


def test_delta_m_uses_each_tasks_metrics():
    tasks = [Task("a", "regression", metrics=("mae", "rmse"))]
    assert delta_m({"a": {"mae": 1.0, "rmse": 3.0}}, {"a": {"mae": 2.0, "rmse": 2.0}}, tasks) == pytest.approx(0.0)


def test_target_shape_checks_name_the_task():
    with pytest.raises(DataError, match="'digit'"):
        Task("digit", "multiclass", num_classes=3).check_target(torch.rand(5, 3))
    with pytest.raises(DataError, match="'tags'"):
        Task("tags", "multilabel", num_classes=3).check_target(torch.rand(5, 2))
    with pytest.raises(DataError, match="rows"):
        Task("x", "binary").check_target(torch.ones(4), rows=5)


def test_bad_task_configs():
    with pytest.raises(ConfigError, match="kind"):
        Task("a", "ranking")
    with pytest.raises(ConfigError, match="metric 'auc'"):
        Task("a", "regression", metrics=("auc",))
    with pytest.raises(ConfigError, match="unknown key"):
        tasks_from_config([{"name": "a", "kind": "binary", "weight": 2}])
    with pytest.raises(ConfigError, match="duplicate"):
        tasks_from_config([{"name": "a", "kind": "binary"}, {"name": "a", "kind": "binary"}])
