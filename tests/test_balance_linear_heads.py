"""The Gramian-only source of the gradient engine (feature mode, heads whose first layer is linear).

Reference: the per-task path of feature mode (one ``autograd.grad`` per task to the shared
features, the aggregator on that ``T x (B d)`` Jacobian, one trunk backward), in float64.
"""

from __future__ import annotations

import pytest
import torch

from polytask import balance
from polytask.balance import aggregators as agg
from polytask.balance.engine import GradientBalancer, linear_head_gramian
from polytask.errors import TrainingError
from polytask.nn import build_model
from polytask.nn.base import _CopiesLinear
from polytask.tasks import Task

# Every registered method whose update is J^T weights(J J^T): the ones the fast path serves.
ROUTED = ["mgda", "mgda_ub", "pcgrad", "gradvac", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "dualproj",
          "config", "fairgrad"]


def _problem(seed: int, widths: list[int], tower: tuple[int, ...] = ()):
    """A shared-bottom model with random sizes (batch, trunk width), one task per entry of ``widths``."""
    g = torch.Generator().manual_seed(seed)
    # sizes where the Gramian-only source is the cheaper one for outputs up to 3 wide (9 (B + d) <= B d)
    batch = int(torch.randint(30, 50, (), generator=g))
    width = int(torch.randint(16, 24, (), generator=g))
    inputs = int(torch.randint(3, 9, (), generator=g))
    tasks = [Task(f"t{i}", "regression", num_outputs=w) for i, w in enumerate(widths)]
    torch.manual_seed(seed)
    model = build_model("shared_bottom", inputs, tasks, bottom=(9, width), tower=tower).double().expose_task_features()
    x = torch.randn(batch, inputs, generator=g, dtype=torch.float64)
    y = {t.name: torch.randn(batch, t.output_dim, generator=g, dtype=torch.float64) for t in tasks}
    return model, tasks, x, y


def _step(model, tasks, x, y, balancer, one_pass: bool, seed: int = 7):
    model.zero_grad(set_to_none=True)
    out = model(x)
    losses = {t.name: t.loss(out[t.name], y[t.name]) for t in tasks}
    extra = {"task_features": model.task_features} if one_pass else {}
    torch.manual_seed(seed)  # PCGrad / GradVac draw their orders from the global generator
    w = balancer.backward(losses, shared=model.shared_parameters(), features=model.shared_features, **extra)
    return w, [p.grad.clone() for p in model.parameters()]


def _spy_fast_path(monkeypatch) -> list[int]:
    """Count calls of the Gramian-only path; make the per-copy backward it must avoid fail loudly."""
    calls: list[int] = []
    original = GradientBalancer._backward_linear_heads

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    def refuse(ctx, grad):
        raise AssertionError("the per-copy backward ran on the Gramian-only path")

    monkeypatch.setattr(GradientBalancer, "_backward_linear_heads", spy)
    monkeypatch.setattr(_CopiesLinear, "backward", staticmethod(refuse))
    return calls


@pytest.mark.parametrize("name", ROUTED)
def test_fast_path_equals_per_task_path(name, monkeypatch):
    for seed, widths in [(0, [1, 1, 1, 1]), (1, [2, 1, 3]), (2, [1] * 7), (3, [1, 2])]:
        model, tasks, x, y = _problem(seed, widths)
        w_ref, ref = _step(model, tasks, x, y, balance.get(name, mode="features"), one_pass=False)
        with monkeypatch.context() as m:
            calls = _spy_fast_path(m)
            w_new, new = _step(model, tasks, x, y, balance.get(name, mode="features"), one_pass=True)
        assert calls == [1], "the Gramian-only path was not taken"
        assert torch.allclose(w_new, w_ref, rtol=1e-9, atol=1e-12)
        for a, b in zip(new, ref):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
        assert any(torch.count_nonzero(g) > 0 for g in ref)  # something was written: the test can fail


def test_fast_path_with_narrow_mlp_towers(monkeypatch):
    # Towers whose FIRST layer is linear and narrow (o = 2 <= B d / (B + d)): same path, and the
    # later tower layers get their own task's gradient from the same backward.
    model, tasks, x, y = _problem(4, [1, 2, 1], tower=(2,))
    model(x)
    batch, d = model.shared_features.shape
    assert 2 * 2 * (batch + d) <= batch * d  # the sizes drawn for this seed make the fast path the cheaper one
    w_ref, ref = _step(model, tasks, x, y, balance.get("upgrad", mode="features"), one_pass=False)
    with monkeypatch.context() as m:
        calls = _spy_fast_path(m)
        w_new, new = _step(model, tasks, x, y, balance.get("upgrad", mode="features"), one_pass=True)
    assert calls == [1]
    assert torch.allclose(w_new, w_ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(new, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["graddrop", "wide_tower", "parameters"])
def test_fallback_where_the_fast_path_does_not_apply(case, monkeypatch):
    # GradDrop reads the Jacobian's coordinates; a wide first tower layer makes the Gramian-only
    # source dearer than the Jacobian; parameter mode needs the feature-gradient rows themselves.
    model, tasks, x, y = _problem(5, [1, 2, 1], tower=(16,) if case == "wide_tower" else ())
    name, mode = {"graddrop": ("graddrop", "features"), "wide_tower": ("upgrad", "features"),
                  "parameters": ("upgrad", "parameters")}[case]
    w_ref, ref = _step(model, tasks, x, y, balance.get(name, mode=mode), one_pass=False)
    calls: list[int] = []
    original = GradientBalancer._backward_linear_heads
    monkeypatch.setattr(GradientBalancer, "_backward_linear_heads", lambda self, *a: calls.append(1) or original(self, *a))
    w_new, new = _step(model, tasks, x, y, balance.get(name, mode=mode), one_pass=True)
    assert calls == []
    assert torch.allclose(w_new, w_ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(new, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_linear_head_gramian_equals_jacobian_gramian():
    g = torch.Generator().manual_seed(0)
    for n, width, batch, d in [(1, 1, 4, 3), (5, 1, 7, 6), (4, 3, 5, 8)]:
        u = torch.randn(n, batch, width, generator=g, dtype=torch.float64)
        w = torch.randn(n, d, width, generator=g, dtype=torch.float64)  # TaskHeads layout (T, in, out)
        jac = torch.bmm(u, w.transpose(1, 2)).reshape(n, -1)  # g_t = U_t W_t^T, flattened
        got = linear_head_gramian(u.transpose(0, 1).reshape(batch, n * width), w.transpose(1, 2).reshape(n * width, d), n)
        assert torch.allclose(got, jac @ jac.T, rtol=1e-12, atol=1e-12)


def test_fast_path_nan_skips_and_raise_names_task():
    model, tasks, x, y = _problem(6, [1, 1, 1])
    y["t1"] = y["t1"] * float("nan")
    balancer = balance.get("cagrad", mode="features")
    _step(model, tasks, x, y, balancer, one_pass=True)
    assert int(balancer.skipped_steps) == 1
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    with pytest.raises(TrainingError, match="'t1'"):
        _step(model, tasks, x, y, balance.get("mgda", mode="features", nan_policy="raise"), one_pass=True)


def test_custom_gramian_weighting_subclass_with_own_aggregate_is_not_routed(monkeypatch):
    class Halved(agg.MGDA):  # changes aggregate(): the Gramian-only path would drop the change
        def aggregate(self, jacobian):
            update, w = super().aggregate(jacobian)
            return update / 2, w / 2

    model, tasks, x, y = _problem(7, [1, 1, 1])
    _, ref = _step(model, tasks, x, y, GradientBalancer(Halved(), mode="features"), one_pass=False)
    _, new = _step(model, tasks, x, y, GradientBalancer(Halved(), mode="features"), one_pass=True)
    for a, b in zip(new, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
