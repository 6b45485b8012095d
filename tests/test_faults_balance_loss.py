"""Issue 18: a non-finite step is skipped and counted by EVERY registered balancer, in every position.

For each balancer (iterating the registry, so a new method is covered automatically; gradient
methods at parameter and at feature level) a NaN or infinite loss -- or a finite loss with a NaN
gradient -- at step 1, at step 2 and at a later step must: add nothing to ``.grad``, leave the
balancer's state as it was, count one ``skipped_steps``, and leave a run whose later steps equal,
to the last bit of float64 rounding, a run that never saw the bad batch (parameters and
``state_dict``). A skipped step still consumes that step's random draw (RLW's weights, PCGrad's
order, GradDrop's mask): the reference run makes the same draws on a throwaway copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from polytask import balance
from polytask.balance import GradientBalancer
from polytask.balance.registry import BALANCERS
from polytask.errors import TrainingError

TASKS = 3
STEPS = 5


def _methods() -> list[str]:
    """One name per registered balancer (aliases dropped)."""
    first: dict[object, str] = {}
    for name in balance.names():
        if getattr(balance.get(name), "needs_heldout", False):  # Auto-Lambda: tests/test_balance_recent.py
            continue
        first.setdefault(BALANCERS.lookup(name), name)
    return sorted(first.values())


def _cases() -> list[tuple[str, str | None]]:
    cases = []
    for name in _methods():
        b = balance.get(name)
        if isinstance(b, GradientBalancer):
            cases.append((name, "parameters"))
            if not b.aggregator.parameter_space_only:
                cases.append((name, "features"))
        else:
            cases.append((name, None))
    return cases


CASES = _cases()


def build(name: str, mode: str | None, **kwargs):
    return balance.get(name, **kwargs) if mode is None else balance.get(name, mode=mode, **kwargs)


class Problem(nn.Module):
    """A two-layer shared trunk and one linear head per task (float64); regression targets of different scales."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        self.heads = nn.ModuleList(nn.Linear(3, 1).double() for _ in range(TASKS))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
        self.z: torch.Tensor | None = None

    def losses(self, batch: int, fault: str | None = None) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + batch)
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        self.z = self.trunk(x)
        out = {}
        for t, head in enumerate(self.heads):
            y = (1.0 + 2.0 * t) * torch.randn(8, 1, generator=g, dtype=torch.float64)
            out[f"t{t}"] = ((head(self.z) - y) ** 2).mean()
        if fault == "nan":
            out["t1"] = out["t1"] * float("nan")
        elif fault == "inf":
            out["t1"] = out["t1"] * float("inf")
        elif fault == "grad":  # finite loss (sqrt(0) = 0), NaN gradient (inf * 0) through the shared features
            out["t1"] = out["t1"] + torch.sqrt(self.z.sum() * 0.0)
        return out


def step(b, model: Problem, batch: int, fault: str | None = None) -> None:
    """One training step: zero grads, balanced backward, SGD, FAMO's second look, end of an 'epoch'."""
    for p in model.parameters():
        p.grad = None
    losses = model.losses(batch, fault)
    b.backward(losses, shared=list(model.trunk.parameters()), features=model.z)
    grads = [p.grad for p in model.parameters()]
    if fault is not None:  # a skipped step writes zeros, never NaN
        assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
        if b.needs_post_step_losses:
            b.post_step(model.losses(batch, fault))
    b.end_epoch()


def _state(b) -> dict[str, torch.Tensor]:
    return {k: v for k, v in b.state_dict().items() if k != "skipped_steps" and isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("fault", ["nan", "inf", "grad"])
@pytest.mark.parametrize("bad", [0, 1, 3])
@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" if m else n for n, m in CASES])
def test_a_non_finite_step_is_skipped_counted_and_forgotten(name, mode, bad, fault):
    torch.manual_seed(0)
    faulty, model_a = build(name, mode), Problem()
    for i in range(STEPS):
        step(faulty, model_a, i, fault if i == bad else None)
    torch.manual_seed(0)
    clean, model_b = build(name, mode), Problem()
    for i in range(STEPS):
        if i == bad:  # the same random draws as the skipped step, on a throwaway copy
            model_b.z = None  # a non-leaf tensor: not deep-copyable
            step(*copy.deepcopy((clean, model_b)), i)
            continue
        step(clean, model_b, i)
    assert int(faulty.skipped_steps) == 1 and int(clean.skipped_steps) == 0
    params_a = torch.cat([p.detach().reshape(-1) for p in model_a.parameters()])
    params_b = torch.cat([p.detach().reshape(-1) for p in model_b.parameters()])
    assert torch.isfinite(params_a).all()
    torch.testing.assert_close(params_a, params_b, rtol=0, atol=1e-12)
    state_a, state_b = _state(faulty), _state(clean)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].shape == state_b[key].shape, key
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=1e-12, equal_nan=True, msg=key)


@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" if m else n for n, m in CASES])
def test_nan_policy_raise_names_the_task(name, mode):
    b, model = build(name, mode, nan_policy="raise"), Problem()
    step(b, model, 0)
    with pytest.raises(TrainingError, match="'t1'"):
        step(b, model, 1, "nan")


def test_the_guard_can_fail_a_balancer_that_applies_a_nan_step():
    """The comparison above catches a balancer that lets a NaN step through: the parameters go NaN."""
    model = Problem()
    for p in model.parameters():
        p.grad = None
    sum(model.losses(0, "nan").values()).backward()  # what every loss balancer did before issue 18
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    assert not torch.isfinite(torch.cat([p.reshape(-1) for p in model.parameters()])).all()


def test_learned_loss_weights_are_buffers_no_optimizer_steps_them():
    """UW's log-variances, IMTL-L's scales, GradNorm's weights: owned by the balancer (buffers, stepped
    only by its own guarded optimizer), so no model optimizer can apply a NaN gradient to them."""
    for name in ("uw", "imtl_l", "gradnorm", "famo"):
        b = balance.get(name)
        model = Problem()
        step(b, model, 0)
        assert list(b.parameters()) == [], name
        before = {k: v.clone() for k, v in b.state_dict().items()}
        step(b, model, 1, "nan")
        for key, value in b.state_dict().items():
            if key != "skipped_steps":
                assert torch.equal(value, before[key]), (name, key)
