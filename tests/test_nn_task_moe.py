"""Task-level MoE trains every task (issue 18): after a short fixed-seed run on the synthetic
generator each task beats predicting the mean, as shared-bottom and MMoE do; the old start
(independent experts of 64) left tasks at or above the mean on the same run."""

from __future__ import annotations

import pytest
import torch

from polytask import balance, data, nn


def _test_mse_over_variance(**params) -> list[float]:
    # the setting: 5 tasks, correlation 0.5, 6,000 rows, EW, Adam 3e-3, 10 epochs of 256
    splits = data.load("synthetic", num_tasks=5, correlation=0.5, num_rows=6000, seed=0)
    torch.manual_seed(0)
    model = nn.build_model("task_moe", splits.input_spec, splits.tasks, **params)
    balancer = balance.get("ew")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(10):
        for x, y, _mask in splits.train.batches(256, shuffle=True, generator=order):
            out = model(x)
            losses = {t.name: t.loss(out[t.name], y[t.name]) for t in splits.tasks}
            opt.zero_grad()
            model.aux_loss.backward(retain_graph=True)
            balancer.backward(losses, shared=model.shared_parameters())
            opt.step()
    model.eval()
    with torch.no_grad():
        x, y, _ = splits.test.full()
        out = model(x)
        return [float(((out[t.name].squeeze(-1) - y[t.name]) ** 2).mean() / y[t.name].var()) for t in splits.tasks]


def test_every_task_beats_the_mean():
    ratios = _test_mse_over_variance()
    assert max(ratios) < 0.8, ratios  # measured 0.27-0.54; predicting the mean gives 1


def test_the_old_start_leaves_tasks_behind_on_the_same_run():
    # proof that the test above can fail: independent experts of 64 (the defaults before) leave
    # three of the five tasks at the mean or worse on exactly this run (measured 0.99, 0.99, 1.03)
    ratios = _test_mse_over_variance(expert_init="independent", hidden=64)
    assert sum(r > 0.9 for r in ratios) >= 2, ratios


@pytest.mark.parametrize("init", ["shared", "independent"])
def test_initial_experts(init):
    torch.manual_seed(0)
    tasks = data.load("synthetic", num_tasks=3, num_rows=40).tasks
    model = nn.build_model("task_moe", 6, tasks, num_experts=4, hidden=5, expert_init=init)
    for w in list(model.weights) + list(model.biases):
        spread = (w - w.mean(0, keepdim=True)).abs().amax() / w.abs().amax()
        # shared: one draw plus a tenth of an independent one (the routers need a gradient at once)
        assert (spread < 0.25) if init == "shared" else (spread > 0.5), (init, float(spread))
    x = torch.randn(16, 6)
    out = model(x)
    sum(o.pow(2).mean() for o in out.values()).backward()
    assert all(r.weight.grad.abs().sum() > 0 for r in model.routers)  # routing learns from step 1
