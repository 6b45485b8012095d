"""MetaBalance (He et al., WWW 2022): equal to torch-rechub 0.9.0's optimizer over several steps,
a hand-computed step, and the relax factor's effect."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from polytask import balance
from polytask.balance import aggregators as agg

rechub_mtl = pytest.importorskip("torch_rechub.utils.mtl")


class _Tiny(nn.Module):
    """A shared bottom (two layers: four parameter tensors of different norms) and one head per task."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(n_tasks))

    def losses(self, x: torch.Tensor, ys: torch.Tensor) -> list[torch.Tensor]:
        z = self.bottom(x)
        # Task-dependent scales: the gradient magnitudes differ by orders, which MetaBalance evens out.
        return [((head(z).squeeze(1) - ys[:, t]) ** 2).mean() * 10.0 ** (1 - t) for t, head in enumerate(self.heads)]


@pytest.mark.parametrize("relax_factor,beta", [(0.7, 0.9), (0.3, 0.5)])
def test_matches_torch_rechub_over_steps(relax_factor: float, beta: float) -> None:
    torch.manual_seed(0)
    ours = _Tiny(3).double()
    theirs = copy.deepcopy(ours)
    balancer = balance.get("metabalance", relax_factor=relax_factor, beta=beta)
    meta = rechub_mtl.MetaBalance(list(theirs.bottom.parameters()), relax_factor=relax_factor, beta=beta)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05)
    for step in range(6):
        x = torch.randn(8, 5, dtype=torch.float64)
        ys = torch.randn(8, 3, dtype=torch.float64)
        opt_ours.zero_grad(set_to_none=True)
        opt_theirs.zero_grad(set_to_none=True)
        losses = ours.losses(x, ys)
        balancer.backward({f"t{t}": loss for t, loss in enumerate(losses)}, shared=list(ours.bottom.parameters()))
        meta.step(theirs.losses(x, ys))
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14), (step, name)
        opt_ours.step()
        opt_theirs.step()
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    # The moving averages are per parameter tensor (4 of them), not one norm over the flat vector.
    assert balancer.aggregator.norms.shape == (3, 4)


def test_two_steps_by_hand() -> None:
    # One parameter tensor of 2 elements, r = 0.5, beta = 0.5; target g0, auxiliary g1.
    # Step 1: g0 = (3, 4) (norm 5), g1 = (0, 10) (norm 10).
    #   m0 = 0.5 * 0 + 0.5 * 5 = 2.5, m1 = 0.5 * 10 = 5.
    #   f0 = 0.5 * 2.5 / (2.5 + 1e-5) + 0.5, f1 = 0.5 * 2.5 / (5 + 1e-5) + 0.5 (~0.75)
    #   update = f0 * (3, 4) + f1 * (0, 10) ~ (3, 4 + 7.5) = (3, 11.5).
    # Step 2: g0 = (0, 1) (norm 1), g1 = (6, 8) (norm 10).
    #   m0 = 0.5 * 2.5 + 0.5 * 1 = 1.75, m1 = 0.5 * 5 + 0.5 * 10 = 7.5.
    #   f1 = 0.5 * 1.75 / (7.5 + 1e-5) + 0.5 (~0.61667); update ~ (0, 1) + f1 * (6, 8) = (3.7, 5.9333).
    m = agg.MetaBalance(relax_factor=0.5, beta=0.5)
    update, weights = m.aggregate(torch.tensor([[3.0, 4.0], [0.0, 10.0]], dtype=torch.float64))
    f0, f1 = 0.5 * 2.5 / (2.5 + 1e-5) + 0.5, 0.5 * 2.5 / (5 + 1e-5) + 0.5
    assert torch.allclose(update, torch.tensor([3 * f0, 4 * f0 + 10 * f1], dtype=torch.float64), rtol=1e-14)
    assert torch.allclose(update, torch.tensor([3.0, 11.5], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(weights, torch.tensor([f0, f1], dtype=torch.float64), rtol=1e-14)
    update, _ = m.aggregate(torch.tensor([[0.0, 1.0], [6.0, 8.0]], dtype=torch.float64))
    f0, f1 = 0.5 * 1.75 / (1.75 + 1e-5) + 0.5, 0.5 * 1.75 / (7.5 + 1e-5) + 0.5
    assert torch.allclose(update, torch.tensor([6 * f1, f0 + 8 * f1], dtype=torch.float64), rtol=1e-14)
    assert torch.allclose(update, torch.tensor([3.7, 5.93333], dtype=torch.float64), atol=1e-4)


def test_per_parameter_split_from_sizes() -> None:
    # Two tensors of one element each: per tensor, the auxiliary's norm is rescaled to the target's.
    jac = torch.tensor([[1.0, 100.0], [4.0, 1.0]], dtype=torch.float64)
    split, whole = agg.MetaBalance(relax_factor=0.9, beta=0.0), agg.MetaBalance(relax_factor=0.9, beta=0.0)
    split.parameter_sizes = [1, 1]
    per_tensor, _ = split.aggregate(jac)
    flat, _ = whole.aggregate(jac)
    f = lambda target, aux: 0.9 * target / (aux + 1e-5) + 0.1  # noqa: E731
    assert torch.allclose(per_tensor, torch.tensor([1 * f(1, 1) + 4 * f(1, 4), 100 * f(100, 100) + 1 * f(100, 1)],
                                                   dtype=torch.float64), rtol=1e-12)
    assert not torch.allclose(per_tensor, flat)


@pytest.mark.parametrize("relax_factor", [0.0, 0.4, 0.9])
def test_relax_factor_is_applied(relax_factor: float) -> None:
    # The auxiliary row is 10x the target's norm: factor r * 1/10 (+eps) + (1 - r) on it, (close to) 1 on the target.
    jac = torch.tensor([[1.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    update, _ = agg.MetaBalance(relax_factor=relax_factor, beta=0.9).aggregate(jac)
    expected_aux = 10.0 * (relax_factor * 0.1 * 1.0 / (1.0 + 1e-6)) + 10.0 * (1 - relax_factor)
    assert update[1].item() == pytest.approx(expected_aux, rel=1e-5)
    assert update[0].item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("kwargs", [{"relax_factor": 1.0}, {"relax_factor": -0.1}, {"beta": 1.0}])
def test_bad_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(Exception, match="metabalance"):
        agg.MetaBalance(**kwargs)


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(1)
    a = agg.MetaBalance()
    a.parameter_sizes = [3, 2]
    a.aggregate(torch.randn(2, 5, dtype=torch.float64))
    b = agg.MetaBalance()
    b.parameter_sizes = [3, 2]
    b.load_state_dict(a.state_dict())
    jac = torch.randn(2, 5, dtype=torch.float64)
    assert torch.equal(a.aggregate(jac)[0], b.aggregate(jac)[0])
