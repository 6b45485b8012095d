"""GradNorm (Chen et al., ICML 2018) against torch-rechub 0.9.0's ``gradnorm`` (``torch_rechub.utils.mtl``)
over several SGD steps, and where the two differ.

torch-rechub's step, as its ``MTLTrainer`` runs it: ``Σ w_t L_t`` back-propagated, the weights'
gradient ``∂/∂w_t Σ_i |w_i ‖∇_W L_i‖ − c|`` with ``c`` held constant, one optimizer step of the model
and the weights together, then ``w ← T w / Σ w``. Its constant is ``c = Ḡ · mean_t(L̃_t)^α``, one value
for every task, where the paper (Eq. 6) has ``Ḡ · r_t^α`` with ``r_t = L̃_t / mean(L̃)`` per task: the two
agree exactly at ``α = 0`` (both ``Ḡ``), which the multi-step test uses; a hand case at ``α = 1`` shows
the difference (our update is the paper's). MetaBalance against torch-rechub is in
``test_balance_metabalance.py``. (torch-rechub's ``MTLTrainer`` also picks ``share_layers[-0]``, the
*first* shared matrix, for "the last shared layer"; the function tested here takes the layer given.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from polytask import balance

rechub_mtl = pytest.importorskip("torch_rechub.utils.mtl")

T = 3


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(T))

    def losses(self, x: torch.Tensor, ys: torch.Tensor) -> list[torch.Tensor]:
        z = self.bottom(x)
        # Scales 10, 1, 0.1: the gradient norms differ by orders, so the weights move far from 1.
        return [((head(z).squeeze(1) - ys[:, t]) ** 2).mean() * 10.0 ** (1 - t) for t, head in enumerate(self.heads)]


@pytest.mark.parametrize("lr", [0.01, 0.05])
def test_gradnorm_matches_torch_rechub_at_alpha_zero(lr: float) -> None:
    torch.manual_seed(0)
    ours = _Tiny().double()
    theirs = copy.deepcopy(ours)
    weights = nn.ParameterList(nn.Parameter(torch.ones(1, dtype=torch.float64)) for _ in range(T))
    balancer = balance.get("gradnorm", alpha=0.0, lr=lr, optimizer="sgd")
    opt_ours = torch.optim.SGD(ours.parameters(), lr=lr)
    opt_theirs = torch.optim.SGD([*theirs.parameters(), *weights], lr=lr)  # the trainer's one optimizer
    initial = None
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        x = torch.randn(16, 5, dtype=torch.float64, generator=gen)
        ys = torch.randn(16, T, dtype=torch.float64, generator=gen)
        opt_ours.zero_grad(set_to_none=True)
        opt_theirs.zero_grad(set_to_none=True)
        returned = balancer.backward({f"t{t}": loss for t, loss in enumerate(ours.losses(x, ys))},
                                     shared=list(ours.bottom.parameters()))
        losses = theirs.losses(x, ys)
        if initial is None:
            initial = [loss.item() for loss in losses]
        rechub_mtl.gradnorm(losses, weights, theirs.bottom[2].weight, initial, 0.0)
        # The weights that scaled this step's losses, then every model gradient.
        torch.testing.assert_close(returned, torch.cat([w.detach() for w in weights]), rtol=1e-12, atol=0)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-11, atol=1e-13, msg=lambda m: f"step {step}, {name}: {m}")
        opt_ours.step()
        opt_theirs.step()
        with torch.no_grad():  # the trainer's renormalisation
            total = sum(w.item() for w in weights)
            for w in weights:
                w.mul_(T / total)
        torch.testing.assert_close(balancer.loss_weights, torch.cat([w.detach() for w in weights]), rtol=1e-12, atol=0)
    assert balancer.loss_weights.max() / balancer.loss_weights.min() > 1.02  # the weights did move apart


def test_gradnorm_target_differs_from_rechub_by_hand() -> None:
    # Two tasks on one 1x1 shared weight W = 1: L_1 = W + 1 (L = 2, ‖∇_W L_1‖ = 1), L_2 = 1.5 W - 1
    # (L = 0.5, ‖∇_W L_2‖ = 1.5); L(0) = (1, 1), w = (1, 1), α = 1. Ḡ = 1.25, L̃ = (2, 0.5), mean 1.25.
    # Paper: r = L̃ / 1.25 = (1.6, 0.4); targets Ḡ r = (2, 0.5); G − target = (−1, 1):
    #   ∂L_grad/∂w = sign(G − target) ‖∇L‖ = (−1, +1.5).
    # torch-rechub: one target Ḡ · 1.25 = 1.5625; G − target = (−0.5625, −0.0625): (−1, −1.5).
    W = nn.Parameter(torch.ones(1, 1, dtype=torch.float64))
    losses = [W.sum() + 1.0, 1.5 * W.sum() - 1.0]
    weights = nn.ParameterList(nn.Parameter(torch.ones(1, dtype=torch.float64)) for _ in range(2))
    rechub_mtl.gradnorm(losses, weights, W, [1.0, 1.0], 1.0)
    assert [w.grad.item() for w in weights] == [-1.0, -1.5]

    ours = balance.get("gradnorm", alpha=1.0)
    ours.loss_weights = torch.ones(2, dtype=torch.float64)
    ours.initial_losses = torch.ones(2, dtype=torch.float64)
    grad = ours.weight_gradient(torch.tensor([2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 1.5], dtype=torch.float64))
    assert grad.tolist() == [-1.0, 1.5]
