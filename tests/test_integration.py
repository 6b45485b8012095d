"""The Trainer with every registered balancer and every dense-input architecture: training must
reduce the validation loss below the untrained model's and keep every number finite."""

import math

import pytest

from polytask import balance
from polytask.train import Trainer, parse_config

# one canonical name per balancer (aliases point at the same class)
BALANCERS = sorted({balance.BALANCERS.lookup(n): n for n in balance.names()}.values())
DENSE_ARCHS = ["shared_bottom", "omoe", "mmoe", "cgc", "ple", "dselect_k", "adatt", "home", "cross_stitch",
               "task_moe", "task_token"]


# PBI's paper penalty (theta = 5, MOEA/D) pulls the three losses onto the equal-loss ray and gives the
# lowest one a negative weight: the validation loss falls ~2% in 5 epochs, so this test uses a milder one
BALANCER_PARAMS = {"pbi": {"theta": 0.5}}


def _fit(tmp_path, balancer="ew", arch="shared_bottom", epochs=5, lr=0.005):
    cfg = parse_config({
        "name": f"{arch}-{balancer}", "seed": 0, "device": "cpu", "out_dir": str(tmp_path / "{name}"),
        "data": {"name": "synthetic", "params": {"num_tasks": 3, "num_rows": 500, "input_dim": 12,
                                                  "correlation": 0.5}},
        "balancer": {"name": balancer, "params": BALANCER_PARAMS.get(balancer, {})},
        "model": {"arch": arch},
        "train": {"epochs": epochs, "batch_size": 50, "early_stopping": None},
        "optim": {"lr": lr},
    })
    return Trainer(cfg, progress=False).fit()


@pytest.mark.parametrize("name", BALANCERS)
def test_every_balancer_trains(tmp_path, name):
    result = _fit(tmp_path, balancer=name)
    scores = [r.score for r in result.history]
    assert all(math.isfinite(s) for s in scores)
    assert min(scores[1:]) < 0.9 * scores[0]  # validation loss fell by at least 10% of the untrained model's
    weights = [r.train[t]["weight"] for r in result.history[1:] for t in r.train]
    assert all(math.isfinite(w) for w in weights)


def test_trainer_closes_epochs_for_dwa(tmp_path):
    # DWA weighs tasks by the ratio of their last two epoch losses: from epoch 3 on it is not EW
    result = _fit(tmp_path, balancer="dwa", epochs=4)
    late = [result.history[4].train[t]["weight"] for t in result.history[4].train]
    assert max(abs(w - 1.0) for w in late) > 1e-3
    assert sum(late) == pytest.approx(3.0, rel=1e-3)  # DWA's weights sum to T


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_every_dense_architecture_trains(tmp_path, arch):
    result = _fit(tmp_path, arch=arch, epochs=6, lr=0.01)  # gated models start slower
    scores = [r.score for r in result.history]
    assert all(math.isfinite(s) for s in scores)
    assert min(scores[1:]) < 0.95 * scores[0]  # an untrained or frozen model stays at 1.0


@pytest.mark.parametrize("arch", DENSE_ARCHS)
@pytest.mark.parametrize("method", ["mgda", "upgrad"])
def test_one_backward_task_features_match_the_per_task_path(arch, method):
    # the Trainer passes model.task_features to gradient balancers; the .grad it produces must equal
    # the per-task path's for every architecture that exposes them
    import torch

    from polytask import data, nn

    splits = data.load("synthetic", num_tasks=3, num_rows=60, input_dim=12)
    grads = []
    for use_task_features in (False, True):
        torch.manual_seed(0)
        model = nn.build_model(arch, splits.input_spec, splits.tasks)
        if use_task_features:
            model.expose_task_features()
        out = model(splits.train.inputs[:32])
        losses = {t.name: t.loss(out[t.name], splits.train.targets[t.name][:32]) for t in splits.tasks}
        extra = {"task_features": model.task_features} if use_task_features else {}
        if use_task_features:
            assert model.task_features is not None and model.task_features.shape[0] == 3
        balance.get(method).backward(losses, shared=list(model.shared_parameters()),
                                     features=model.shared_features, **extra)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
