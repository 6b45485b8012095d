"""Balancers against LibMTL 1.1.5's weighting classes, driven through a small harness, over several
consecutive SGD steps in float64 (same model, same batches; every parameter's gradient compared).

LibMTL's package ``__init__`` imports its ResNets, which import
``torchvision.models.utils.load_state_dict_from_url``; torchvision is not installed (nor needed by
the weightings), so the fixture below registers a stand-in for that one import while LibMTL is
imported, and removes it afterwards. A test harness only.

The harness gives a weighting what LibMTL's ``Trainer`` and ``AbsArchitecture`` would: ``task_num``,
``device``, ``rep_grad``, ``task_name``, ``get_share_params``, ``zero_grad_share_params``,
``epoch``, ``train_loss_buffer`` and, for representation gradients, ``rep`` and ``rep_tasks``
(the heads read a detached copy of the shared features per task, as ``_prepare_rep`` does).

Where LibMTL departs from the paper the comparison pins what is common and a hand case pins the
paper (each departure is stated in our class's docstring):

- GradVac: LibMTL updates the target ``rho_T`` only for pairs it corrected; Wang et al.'s
  Algorithm 1 updates every pair's EMA. Compared step by step from LibMTL's targets.
- PCGrad: LibMTL's inner loop also visits ``j = i``; equal here as long as no ``g_i^PC . g_i < 0``.
- MGDA: LibMTL runs Frank-Wolfe (250 iterations, stop at a 1e-5 change), we solve exactly: compared
  to 1e-3, each step from the same parameters.
- CAGrad: LibMTL's objective is written for three tasks (``x.reshape(1, 3)``) and solved with
  SLSQP (default tolerance: ~1e-3 off in the weights); compared at ``T = 3``, ``rescale=0`` (no
  ``1/(1+c^2)``), with SLSQP's ``tol=1e-14``.
- GradDrop: LibMTL sums ``sign(rep) * grad`` over the batch before the sign purity (the paper's
  batch-reduced form); we take the purity per coordinate of the feature Jacobian. Equal for one
  sample with positive features.
- GradNorm: LibMTL parameterises ``w = T softmax(s)``, takes ``G_t`` over all shared parameters,
  ``L_t(0)`` as the first epoch's mean loss, and runs EW for the whole first epoch; the paper
  (and we) renormalise ``w`` after a step on the last shared layer from the first step. No equal
  case: the paper's update is hand-checked in test_balance_loss.py and torch-rechub's GradNorm
  compared in test_balance_peer_rechub.py.
- MGDA and IMTL with ``rep_grad=True``: LibMTL sums the feature gradients over the batch before
  the Gramian (``per_grads.reshape(T, B, -1).sum(1)``); compared at parameter level only.
"""

from __future__ import annotations

import copy
import functools
import random
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from polytask import balance
from polytask.balance import aggregators as agg

T = 3
LR = 0.05


@pytest.fixture(scope="module")
def libmtl():
    """``LibMTL.weighting``, imported with a stand-in for the torchvision import of its ResNets."""
    import importlib.util

    if importlib.util.find_spec("LibMTL") is None:
        pytest.skip("LibMTL is not installed")
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("torchvision") is None:
            utils = types.ModuleType("torchvision.models.utils")
            utils.load_state_dict_from_url = lambda *args, **kwargs: None
            models = types.ModuleType("torchvision.models")
            models.utils = utils
            vision = types.ModuleType("torchvision")
            vision.models = models
            for name, module in (("torchvision", vision), ("torchvision.models", models),
                                 ("torchvision.models.utils", utils)):
                mp.setitem(sys.modules, name, module)
        import LibMTL.weighting as weighting
    return weighting


@pytest.fixture(autouse=True)
def float64():
    """LibMTL builds its gradient buffers with ``torch.zeros(dim)``: the default dtype decides their precision."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


class _Tiny(nn.Module):
    """A two-layer shared bottom and one linear head per task; task ``t``'s loss scaled by ``3^(1-t)``."""

    def __init__(self, positive: bool = False) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Sigmoid() if positive else nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(T))

    def losses(self, z: torch.Tensor, ys: torch.Tensor, reps: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        reps = reps or [z] * T
        return [((head(r).squeeze(1) - ys[:, t]) ** 2).mean() * 3.0 ** (1 - t)
                for t, (head, r) in enumerate(zip(self.heads, reps))]


def _harness(cls: type, model: _Tiny, rep_grad: bool = False) -> nn.Module:
    """A LibMTL weighting of class ``cls`` with the attributes its ``backward`` reads."""

    class Harness(cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.device, self.rep_grad = T, torch.device("cpu"), rep_grad
            self.task_name = [f"t{t}" for t in range(T)]
            self.epoch, self.train_loss_buffer = 0, np.zeros((T, 16))
            self.rep, self.rep_tasks = None, {}
            self._model = [model]  # a list: not registered as a submodule

        def get_share_params(self):
            return self._model[0].bottom.parameters()

        def zero_grad_share_params(self) -> None:
            self._model[0].bottom.zero_grad(set_to_none=False)

    harness = Harness()
    harness.init_param()
    return harness


def _their_losses(h: nn.Module, model: _Tiny, x: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    z = model.bottom(x)
    if not h.rep_grad:
        return torch.stack(model.losses(z, ys))
    h.rep = z  # _prepare_rep: every head reads its own detached copy of the shared features
    h.rep_tasks = {name: z.detach().clone().requires_grad_(True) for name in h.task_name}
    return torch.stack(model.losses(z, ys, [h.rep_tasks[name] for name in h.task_name]))


def _batches(steps: int, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 5, generator=gen), torch.randn(batch, T, generator=gen)) for _ in range(steps)]


def _assert_same_grads(ours: nn.Module, theirs: nn.Module, step: int, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert p.grad is not None and q.grad is not None, (step, name)
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m: f"step {step}, {name}: {m}")


def _run(libmtl, their_cls: str, ours: balance.Balancer, *, steps: int = 5, their_kwargs: dict | None = None,
         mode: str = "parameters", rep_grad: bool = False, positive: bool = False, batch: int = 8,
         before_step=None, rtol: float = 1e-10, atol: float = 1e-12,
         recorded: list | None = None, train_theirs: bool = True,
         resync: bool = False) -> tuple[balance.Balancer, nn.Module]:
    """``steps`` SGD steps of the same model with our balancer and with LibMTL's weighting; the
    gradients of every parameter equal after each step. ``before_step(step, h)`` runs before both
    backward passes (seeding, epochs, copying state); ``recorded`` collects LibMTL's loss vectors;
    ``train_theirs``: LibMTL's own parameters (UW's, IMTL's ``loss_scale``) take SGD steps too;
    ``resync``: our model restarts each step from LibMTL's (an approximate solver's error does not
    compound over the steps)."""
    torch.manual_seed(0)
    model = _Tiny(positive)
    theirs = copy.deepcopy(model)
    h = _harness(getattr(libmtl, their_cls), theirs, rep_grad)
    opt_ours = torch.optim.SGD(model.parameters(), lr=LR)
    opt_theirs = torch.optim.SGD([*theirs.parameters(), *(h.parameters() if train_theirs else ())], lr=LR)
    for step, (x, ys) in enumerate(_batches(steps, batch)):
        opt_ours.zero_grad(set_to_none=True)
        opt_theirs.zero_grad(set_to_none=True)
        if before_step is not None:
            before_step(step, h, "theirs")
        vec = _their_losses(h, theirs, x, ys)
        if recorded is not None:
            recorded.append(vec.detach().numpy().copy())
        h.backward(vec, **(their_kwargs or {}))
        if before_step is not None:
            before_step(step, h, "ours")
        z = model.bottom(x)
        losses = {f"t{t}": loss for t, loss in enumerate(model.losses(z, ys))}
        ours.backward(losses, shared=list(model.bottom.parameters()), features=z if mode == "features" else None)
        _assert_same_grads(model, theirs, step, rtol, atol)
        opt_ours.step()
        opt_theirs.step()
        if resync:
            model.load_state_dict(theirs.state_dict())
    return ours, h


# --------------------------------------------------------------------------- loss weightings


def test_ew(libmtl) -> None:
    _run(libmtl, "EW", balance.get("ew"))


def test_gls(libmtl) -> None:
    _run(libmtl, "GLS", balance.get("gls"))


def test_uw_with_libmtl_start(libmtl) -> None:
    # LibMTL starts log σ² at -0.5 (weights 1/(2 e^-0.5) ~ 0.82); the paper's code and we start at 0:
    # start ours at -0.5 to compare; both step s by SGD along ½ (1 − e^-s L).
    ours = balance.get("uw", lr=LR, optimizer="sgd")
    ours.log_var = torch.full((T,), -0.5)
    ours, h = _run(libmtl, "UW", ours)
    torch.testing.assert_close(ours.log_var, h.loss_scale.detach(), rtol=1e-12, atol=1e-14)


def test_dwa_over_epochs(libmtl) -> None:
    # Epochs of 2 steps: LibMTL reads train_loss_buffer[:, epoch-1] / [:, epoch-2] from epoch 2 on; the
    # buffer holds each epoch's mean loss, filled here as its Trainer does at the epoch's end.
    ours = balance.get("dwa", temperature=2.0)
    sums: list[np.ndarray] = []

    def epochs(step: int, h: nn.Module, side: str) -> None:
        if side == "theirs" and step % 2 == 0 and step:
            h.train_loss_buffer[:, step // 2 - 1] = np.mean(sums[-2:], axis=0)
            h.epoch = step // 2
        if side == "ours" and step % 2 == 0 and step:
            ours.end_epoch()

    ours, h = _run(libmtl, "DWA", ours, steps=8, their_kwargs={"T": 2.0}, before_step=epochs, recorded=sums)
    assert h.epoch == 3 and not torch.allclose(ours.weights_now, torch.ones(T))  # the weights did move


def test_rlw_normal_softmax(libmtl) -> None:
    # Both draw λ̃ ~ N(0, I) from the global generator and weigh with softmax(λ̃); same seed per step.
    _run(libmtl, "RLW", balance.get("rlw"), their_kwargs={"dist": "Normal"},
         before_step=lambda step, h, side: torch.manual_seed(100 + step))


# --------------------------------------------------------------------------- gradient methods


def test_mgda(libmtl) -> None:
    # LibMTL: Frank-Wolfe (stops at a 1e-5 change); ours: the exact min-norm point.
    _run(libmtl, "MGDA", balance.get("mgda"), their_kwargs={"mgda_gn": "none"}, rtol=1e-3, atol=1e-5, resync=True)


def test_imtl_gradient_part(libmtl) -> None:
    # LibMTL's IMTL also scales the losses by e^s (IMTL-L); with s kept at 0 (not stepped) it is IMTL-G.
    _, h = _run(libmtl, "IMTL", balance.get("imtl_g"), train_theirs=False)
    assert torch.equal(h.loss_scale.detach(), torch.zeros(T))


def _same_orders(exclude_self: bool, seed_base: int):
    """Python ``random`` orders as LibMTL draws them (one shuffle per task), fed to our PCGrad/GradVac."""
    state: dict[str, torch.Tensor] = {}

    def before(step: int, h: nn.Module, side: str) -> None:
        if side == "theirs":
            random.seed(seed_base + step)
            orders = []
            for i in range(T):
                idx = [j for j in range(T) if not (exclude_self and j == i)]
                random.shuffle(idx)
                orders.append(idx)
            state["orders"] = torch.tensor(orders)
            random.seed(seed_base + step)

    def fake_orders(n, device, generator, exclude):  # noqa: ANN001, ANN202
        assert exclude == exclude_self and n == T
        return state["orders"].to(device)

    return before, fake_orders


def test_pcgrad_same_orders(libmtl, monkeypatch) -> None:
    before, fake = _same_orders(False, 10)
    monkeypatch.setattr(agg.conflict, "_random_orders", fake)
    _run(libmtl, "PCGrad", balance.get("pcgrad"), before_step=before)


def test_gradvac_same_orders_and_targets(libmtl, monkeypatch) -> None:
    before_orders, fake = _same_orders(True, 20)
    monkeypatch.setattr(agg.conflict, "_random_orders", fake)
    beta = 0.5
    ours = balance.get("gradvac", beta=beta, eps=0.0)
    seen: dict[str, torch.Tensor] = {}

    def before(step: int, h: nn.Module, side: str) -> None:
        before_orders(step, h, side)
        if side == "theirs" and hasattr(h, "rho_T"):
            seen["targets"] = h.rho_T.clone()
        if side == "ours" and "targets" in seen:
            ours.aggregator.phi_hat = seen["targets"].clone()  # start each step from LibMTL's targets

    ours, h = _run(libmtl, "GradVac", ours, their_kwargs={"beta": beta}, before_step=before, steps=6)
    # LibMTL moved only the corrected pairs' targets; ours moved every off-diagonal one (the paper's EMA).
    assert (ours.aggregator.phi_hat != h.rho_T).any()


def test_gradvac_targets_follow_the_paper_by_hand() -> None:
    # g1 = (1, 0), g2 = (0, 1): cos = 0 >= phi_hat = 0, no correction, but the paper's EMA still moves:
    # phi_hat_12 = (1 - beta) * 0 + beta * 0 = 0. Then g1 = (1, 0), g2 = (1, 1)/√2·2: cos = 1/√2 ≈ 0.7071,
    # no correction (cos >= 0), phi_hat <- 0.5 * 0 + 0.5 * 0.7071 = 0.35355 (LibMTL would keep 0).
    m = agg.GradVac(beta=0.5, eps=0.0)
    m.weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    w = m.weights(torch.tensor([[1.0, 2 / 2**0.5], [2 / 2**0.5, 4.0]], dtype=torch.float64))  # G of (1,0), (√2, √2)
    torch.testing.assert_close(w, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(m.phi_hat, torch.tensor([[0.0, 0.5 ** 1.5], [0.5 ** 1.5, 0.0]], dtype=torch.float64))


def test_cagrad_three_tasks(libmtl, monkeypatch) -> None:
    # LibMTL: SLSQP on the dual (written for 3 tasks), c = calpha, no rescale; ours: the torch dual solver.
    # SLSQP at its default tolerance stops ~1e-3 from the optimum in w (its objective above ours at
    # step 4 here: 0.0265722965 vs 0.0265722359); at tol=1e-14 it reaches the exact minimiser.
    module = sys.modules[libmtl.CAGrad.__module__]
    monkeypatch.setattr(module, "minimize", functools.partial(module.minimize, tol=1e-14))
    _run(libmtl, "CAGrad", balance.get("cagrad", c=0.4), their_kwargs={"calpha": 0.4, "rescale": 0},
         rtol=1e-6, atol=1e-9, resync=True)


def test_graddrop_one_sample_positive_features(libmtl) -> None:
    # One sample and sigmoid features (sign +1): LibMTL's batch-summed purity is ours per coordinate;
    # both draw U = rand(d) from the global generator, seeded alike.
    _run(libmtl, "GradDrop", balance.get("graddrop"), their_kwargs={"leak": 0.0}, mode="features",
         rep_grad=True, positive=True, batch=1, before_step=lambda step, h, side: torch.manual_seed(200 + step))


def test_graddrop_batch_reduction_differs(libmtl) -> None:
    # With several samples LibMTL's mask is shared by the batch (the paper's batch-reduced form):
    # the comparison above must then fail, which shows it can.
    with pytest.raises(AssertionError):
        _run(libmtl, "GradDrop", balance.get("graddrop"), their_kwargs={"leak": 0.0}, mode="features",
             rep_grad=True, positive=False, batch=8, steps=2,
             before_step=lambda step, h, side: torch.manual_seed(300 + step))
