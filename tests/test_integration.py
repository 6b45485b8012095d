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


def _fit(tmp_path, balancer="ew", arch="shared_bottom", epochs=5, lr=0.005):
    cfg = parse_config({
        "name": f"{arch}-{balancer}", "seed": 0, "device": "cpu", "out_dir": str(tmp_path / "{name}"),
        "data": {"name": "synthetic", "params": {"num_tasks": 3, "num_rows": 500, "input_dim": 12,
                                                  "correlation": 0.5}},
        "balancer": {"name": balancer},
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
