"""Loss-based balancers and GradNorm: hand-computed cases from each paper's equations, their
stated properties, state_dict round trips, determinism and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from polytask import balance
from polytask.balance._loss_state import BufferOptimizer, last_shared_weight
from polytask.errors import ConfigError

LOSS_BALANCERS = ["ew", "uw", "dwa", "rlw", "gls", "imtl_l", "famo", "db_mtl", "stch", "gradnorm"]
NEEDS_SHARED = {"db_mtl", "gradnorm"}


def leaf_losses(values, names=None):
    """Losses that are entries of a leaf vector: after backward, ``leaf.grad`` is the weights used."""
    leaf = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    names = names or [f"t{i}" for i in range(len(values))]
    return {n: leaf[i] * 1.0 for i, n in enumerate(names)}, leaf


class Problem(nn.Module):
    """Shared trunk (two linear layers) and one linear head per task; regression tasks of different scales."""

    def __init__(self, tasks: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        self.heads = nn.ModuleList(nn.Linear(3, 1).double() for _ in range(tasks))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
        self.scales = [1.0 + 2.0 * t for t in range(tasks)]
        self.z: torch.Tensor | None = None

    def shared(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def losses(self, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(16, 4, generator=g, dtype=torch.float64)
        self.z = self.trunk(x)
        out = {}
        for t, (head, s) in enumerate(zip(self.heads, self.scales)):
            y = s * torch.randn(16, 1, generator=g, dtype=torch.float64)
            out[f"t{t}"] = ((head(self.z) - y) ** 2).mean()
        return out

    def zero(self) -> None:
        for p in self.parameters():
            p.grad = None

    def grads(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.parameters()])


def run_step(b, model: Problem, seed: int, sgd_lr: float | None = None) -> torch.Tensor:
    """One full training step with ``b`` (post-step losses and end of epoch included)."""
    model.zero()
    w = b.backward(model.losses(seed), shared=model.shared(), features=model.z)
    if sgd_lr is not None:
        with torch.no_grad():
            for p in model.parameters():
                p -= sgd_lr * p.grad
    if b.needs_post_step_losses:
        with torch.no_grad():
            b.post_step(model.losses(seed))
    return w


# ------------------------------------------------------------------------------------ registry
def test_every_method_is_registered_and_builds():
    for name in LOSS_BALANCERS:
        assert isinstance(balance.get(name), balance.Balancer), name
    assert isinstance(balance.get("IMTL-L"), balance.get("imtl_l").__class__)


def test_unknown_parameter_and_method_are_refused():
    with pytest.raises(ConfigError, match="temprature"):
        balance.get("dwa", temprature=2.0)
    with pytest.raises(ConfigError, match="gradnrom"):
        balance.get("gradnrom")
    with pytest.raises(ConfigError, match="optimizer"):
        balance.get("uw", optimizer="lbfgs")
    with pytest.raises(ConfigError, match="mu"):
        balance.get("stch", mu=0.0)


@pytest.mark.parametrize("name", LOSS_BALANCERS)
def test_non_scalar_loss_names_the_task(name):
    model = Problem(2)
    losses = model.losses(0)
    losses["t1"] = losses["t1"].expand(3)
    with pytest.raises(ConfigError, match="'t1'"):
        balance.get(name).backward(losses, shared=model.shared(), features=model.z)


@pytest.mark.parametrize("name", ["db_mtl", "gradnorm"])
def test_task_without_gradient_to_shared_parameters_names_the_task(name):
    model = Problem(2)
    losses = model.losses(0)
    losses["t1"] = model.heads[1].weight.square().sum()  # depends on its head only
    with pytest.raises(ConfigError, match="'t1'"):
        balance.get(name).backward(losses, shared=model.shared(), features=model.z)


@pytest.mark.parametrize("name", ["db_mtl", "gradnorm"])
def test_gradient_methods_need_the_shared_parameters(name):
    losses, _ = leaf_losses([1.0, 2.0])
    with pytest.raises(ConfigError, match="shared"):
        balance.get(name).backward(losses)


@pytest.mark.parametrize("name", ["uw", "dwa", "imtl_l", "famo", "gradnorm", "db_mtl"])
def test_changed_tasks_are_refused_by_stateful_balancers(name):
    model = Problem(3)
    b = balance.get(name)
    run_step(b, model, 0)
    losses = model.losses(1)
    del losses["t2"]
    with pytest.raises(ConfigError, match="'t2'"):
        b.backward(losses, shared=model.shared(), features=model.z)


# ---------------------------------------------------------------------- the balancers' optimizer
def test_buffer_adam_matches_torch_adam_and_skips_non_finite_or_masked_entries():
    torch.manual_seed(0)
    ours = torch.randn(4, dtype=torch.float64)
    ref = nn.Parameter(ours.clone())
    opt = BufferOptimizer("adam", lr=0.05, weight_decay=0.01)
    torch_opt = torch.optim.Adam([ref], lr=0.05, weight_decay=0.01)
    for _ in range(5):
        g = torch.randn(4, dtype=torch.float64)
        opt.step(ours, g)
        ref.grad = g
        torch_opt.step()
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-12)
    # entry 1 has a NaN gradient, entry 3 is masked out: both keep value, moments and step count;
    # entries 0 and 2 take the step a 2-entry Adam with their own history takes
    sub = BufferOptimizer("adam", lr=0.05, weight_decay=0.01)
    sub.load_state_dict({k: v[[0, 2]] for k, v in opt.state_dict().items()})
    sub_value = ours[[0, 2]].clone()
    before = ours.clone(), opt.exp_avg.clone(), opt.steps.clone()
    g = torch.tensor([1.0, float("nan"), -0.5, 2.0], dtype=torch.float64)
    opt.step(ours, g, mask=torch.tensor([True, True, True, False]))
    sub.step(sub_value, g[[0, 2]])
    for i in (1, 3):
        assert ours[i] == before[0][i] and opt.exp_avg[i] == before[1][i] and opt.steps[i] == before[2][i]
    torch.testing.assert_close(ours[[0, 2]], sub_value, rtol=0, atol=0)
    assert torch.isfinite(opt.exp_avg).all() and torch.isfinite(opt.exp_avg_sq).all()


# ------------------------------------------------------------------------------------------ UW
def test_uw_objective_weights_and_log_variance_step_follow_kendall():
    b = balance.get("uw", optimizer="sgd", lr=0.1)
    losses, _ = leaf_losses([1.0, 1.0])
    b.backward(losses)  # binds the tasks; s = 0 -> s_t -= 0.1 * 0.5 * (1 - 1) = 0
    b.log_var.copy_(torch.tensor([0.0, math.log(2.0)]))
    vec = torch.tensor([1.0, 4.0], dtype=torch.float64)
    # 1/(2σ²) L + log σ with σ² = e^s: 0.5*1 + 0 + 0.25*4 + 0.5*log 2
    assert b.objective(vec).item() == pytest.approx(0.5 + 1.0 + 0.5 * math.log(2.0))
    losses, leaf = leaf_losses([1.0, 4.0])
    w = b.backward(losses)
    torch.testing.assert_close(leaf.grad, torch.tensor([0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(w.double(), leaf.grad)
    # ∂/∂s = 0.5 (1 - e^{-s} L) = [0, -0.5]; SGD step of 0.1
    torch.testing.assert_close(b.log_var.double(), torch.tensor([0.0, math.log(2.0) + 0.05], dtype=torch.float64))


def test_uw_gradient_in_log_variance_equals_autograd_and_drives_s_to_log_loss():
    b = balance.get("uw", optimizer="sgd", lr=0.5)
    values = [0.3, 2.0, 5.0]
    for _ in range(300):
        losses, _ = leaf_losses(values)
        b.backward(losses)
    torch.testing.assert_close(b.log_var.double(), torch.log(torch.tensor(values, dtype=torch.float64)),
                               rtol=0, atol=1e-6)
    s = b.log_var.clone().double().requires_grad_()
    L = torch.tensor(values, dtype=torch.float64)
    (0.5 * torch.exp(-s) * L + 0.5 * s).sum().backward()
    assert s.grad.abs().max() < 1e-6  # the stationary point of the paper's objective


def test_uw_nan_or_absent_task_keeps_its_log_variance():
    b = balance.get("uw", optimizer="sgd", lr=0.1)
    b.backward(leaf_losses([1.0, 2.0, 4.0])[0])
    before = b.log_var.clone()
    b.backward(leaf_losses([3.0, 0.0, 4.0])[0])  # 0.0: no labelled row in the batch
    assert b.log_var[1] == before[1]
    # the present tasks still step: s -= 0.1 * 0.5 * (1 - e^{-s} L)
    expected = before[[0, 2]] - 0.05 * (1 - torch.exp(-before[[0, 2]]) * torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(b.log_var[[0, 2]], expected)
    # a NaN loss: the whole step is skipped (issue 18), every log-variance kept
    before = b.log_var.clone()
    b.backward(leaf_losses([float("nan"), 1.0, 4.0])[0])
    assert torch.equal(b.log_var, before) and int(b.skipped_steps) == 1


# ----------------------------------------------------------------------------------------- DWA
def test_dwa_weights_are_the_softmax_of_epoch_loss_ratios():
    b = balance.get("dwa", temperature=2.0)
    epochs = [[[0.5, 2.0], [1.5, 2.0]],   # averages [1, 2]
              [[0.4, 3.0], [0.6, 1.0]],   # averages [0.5, 2]
              [[1.0, 1.0]]]
    seen = []
    for batches in epochs:
        for values in batches:
            losses, leaf = leaf_losses(values)
            b.backward(losses)
            seen.append(leaf.grad.clone())
        b.end_epoch()
    ones = torch.ones(2, dtype=torch.float64)
    for w in seen[:4]:
        torch.testing.assert_close(w, ones)  # λ = 1 in the first two epochs
    r = [0.5 / 1.0, 2.0 / 2.0]
    e = [math.exp(x / 2.0) for x in r]
    expected = torch.tensor([2 * e[0] / sum(e), 2 * e[1] / sum(e)], dtype=torch.float64)
    torch.testing.assert_close(seen[4], expected)
    assert expected[0] < 1 < expected[1]  # the task whose loss fell faster gets less weight


def test_dwa_temperature_flattens_the_weights():
    def third_epoch_weights(temperature):
        b = balance.get("dwa", temperature=temperature)
        for values in ([1.0, 1.0], [0.2, 1.0]):
            b.backward(leaf_losses(values)[0])
            b.end_epoch()
        return b.weights_now.clone()

    sharp, flat = third_epoch_weights(0.5), third_epoch_weights(50.0)
    assert (sharp[1] - sharp[0]) > (flat[1] - flat[0]) > 0
    torch.testing.assert_close(flat.sum(), torch.tensor(2.0, dtype=flat.dtype))


# ----------------------------------------------------------------------------------------- RLW
def test_rlw_is_seeded_and_draws_softmax_of_normal():
    a, b, c = balance.get("rlw", seed=7), balance.get("rlw", seed=7), balance.get("rlw", seed=8)
    ref = torch.Generator().manual_seed(7)
    draws_a, draws_b, draws_c = [], [], []
    for _ in range(4):
        for bal, out in ((a, draws_a), (b, draws_b), (c, draws_c)):
            losses, leaf = leaf_losses([1.0, 2.0, 3.0])
            bal.backward(losses)
            out.append(leaf.grad.clone())
        expected = torch.softmax(torch.randn(3, generator=ref, dtype=torch.float64), dim=0)
        torch.testing.assert_close(draws_a[-1], expected)
        assert draws_a[-1].sum().item() == pytest.approx(1.0)
    assert all(torch.equal(x, y) for x, y in zip(draws_a, draws_b))
    assert not any(torch.equal(x, y) for x, y in zip(draws_a, draws_c))


# ----------------------------------------------------------------------------------------- GLS
def test_gls_gradient_is_the_geometric_mean_gradient():
    losses, leaf = leaf_losses([1.0, 4.0])
    balance.get("gls").backward(losses)
    # G = 2, w_t = G / (T L_t) = [1, 0.25]
    torch.testing.assert_close(leaf.grad, torch.tensor([1.0, 0.25], dtype=torch.float64))
    values = [0.3, 1.7, 2.2, 0.9]
    losses, leaf = leaf_losses(values)
    balance.get("gls").backward(losses)
    ref = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    ref.prod().pow(1 / 4).backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


# -------------------------------------------------------------------------------------- IMTL-L
def test_imtl_l_scale_update_and_scaled_losses_tend_to_one():
    b = balance.get("imtl_l", optimizer="sgd", lr=0.1)
    losses, leaf = leaf_losses([2.0, 0.5])
    b.backward(losses)
    torch.testing.assert_close(leaf.grad, torch.ones(2, dtype=torch.float64))
    # s ← s − lr (e^s L − 1) = [−0.1, 0.05]
    torch.testing.assert_close(b.log_scale.double(), torch.tensor([-0.1, 0.05], dtype=torch.float64))
    losses, leaf = leaf_losses([2.0, 0.5])
    b.backward(losses)
    torch.testing.assert_close(leaf.grad, torch.exp(torch.tensor([-0.1, 0.05], dtype=torch.float64)))
    for _ in range(300):
        b.backward(leaf_losses([2.0, 0.5])[0])
    torch.testing.assert_close(torch.exp(b.log_scale.double()) * torch.tensor([2.0, 0.5], dtype=torch.float64),
                               torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- FAMO
def test_famo_weights_and_logit_update_follow_the_paper_on_two_tasks():
    beta, gamma = 0.5, 0.1
    b = balance.get("famo", optimizer="sgd", lr=beta, gamma=gamma)
    losses, leaf = leaf_losses([1.0, 4.0])
    b.backward(losses)
    # z = [.5, .5], c = 1 / (0.5/1 + 0.5/4) = 1.6, w = c z / L = [0.8, 0.2]
    torch.testing.assert_close(leaf.grad, torch.tensor([0.8, 0.2], dtype=torch.float64))
    b.post_step(leaf_losses([0.5, 3.0])[0])
    d = [math.log(1 / 0.5), math.log(4 / 3)]
    mean = 0.5 * d[0] + 0.5 * d[1]
    xi = torch.tensor([-beta * 0.5 * (d[0] - mean), -beta * 0.5 * (d[1] - mean)], dtype=torch.float64)
    torch.testing.assert_close(b.logits.double(), xi)
    assert xi[0] < 0 < xi[1]  # task 0 improved more: it loses weight
    # second step: ξ ≠ 0, so the decay term γξ and the full softmax Jacobian enter
    losses, leaf = leaf_losses([0.5, 3.0])
    b.backward(losses)
    z = torch.softmax(xi, 0)
    inv = z / torch.tensor([0.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(leaf.grad, inv / inv.sum())
    b.post_step(leaf_losses([0.45, 2.0])[0])
    delta = torch.log(torch.tensor([0.5, 3.0], dtype=torch.float64)) - torch.log(torch.tensor([0.45, 2.0], dtype=torch.float64))
    J = torch.autograd.functional.jacobian(lambda v: torch.softmax(v, 0), xi)
    torch.testing.assert_close(b.logits.double(), xi - beta * (J.T @ delta + gamma * xi))


def test_famo_adam_update_equals_torch_adam_on_the_logits():
    b = balance.get("famo")  # Adam, lr 0.025, weight decay 0.01 (the authors' defaults)
    ref = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.Adam([ref], lr=0.025, weight_decay=0.01)
    pairs = [([1.0, 2.0, 3.0], [0.9, 1.5, 2.9]), ([0.9, 1.5, 2.9], [0.5, 1.4, 2.0]), ([2.0, 1.0, 0.5], [1.9, 0.7, 0.45])]
    for before, after in pairs:
        b.backward(leaf_losses(before)[0])
        b.post_step(leaf_losses(after)[0])
        delta = torch.log(torch.tensor(before, dtype=torch.float64)) - torch.log(torch.tensor(after, dtype=torch.float64))
        opt.zero_grad()
        (torch.softmax(ref, 0) * delta).sum().backward()
        opt.step()
        torch.testing.assert_close(b.logits.double(), ref.detach())


def test_famo_post_step_without_backward_is_an_error():
    with pytest.raises(RuntimeError, match="post_step"):
        balance.get("famo").post_step(leaf_losses([1.0, 2.0])[0])


# -------------------------------------------------------------------------------------- DB-MTL
def per_task_shared_grads(model: Problem, losses: dict, eps: float = 1e-8) -> torch.Tensor:
    rows = []
    for loss in losses.values():
        g = torch.autograd.grad(torch.log(loss + eps), model.shared(), retain_graph=True)
        rows.append(torch.cat([x.reshape(-1) for x in g]))
    return torch.stack(rows)


def test_db_mtl_balances_log_loss_gradient_magnitudes():
    model = Problem(3)
    b = balance.get("db_mtl", beta=0.9, beta_sigma=0.5)
    n_shared = sum(p.numel() for p in model.shared())
    ema = None
    for step in range(3):
        model.zero()
        losses = model.losses(step)
        g = per_task_shared_grads(model, losses)
        head_grads = [torch.autograd.grad(torch.log(losses[f"t{t}"] + 1e-8), list(model.heads[t].parameters()),
                                          retain_graph=True) for t in range(3)]
        beta_k = 0.0 if step == 0 else 0.9 / step**0.5
        ema = g if ema is None else beta_k * ema + (1 - beta_k) * g
        norms = ema.norm(dim=1)
        alpha = norms.max() / (norms + 1e-8)
        w = b.backward(losses, shared=model.shared())
        torch.testing.assert_close(w, alpha)
        torch.testing.assert_close(model.grads()[:n_shared], alpha @ ema)
        for t in range(3):
            for p, expected in zip(model.heads[t].parameters(), head_grads[t]):
                torch.testing.assert_close(p.grad, expected)
        scaled = (alpha[:, None] * ema).norm(dim=1)
        torch.testing.assert_close(scaled, scaled.max().expand(3))  # equal magnitudes after balancing


# ---------------------------------------------------------------------------------------- STCH
def test_stch_weights_are_the_gradient_of_the_smooth_tchebycheff_scalarisation():
    values = [0.5, 2.0, 1.2]
    for kwargs in ({}, {"mu": 0.3, "preference": [1.0, 0.5, 2.0], "ideal": [0.1, 0.2, 0.0]},
                   {"mu": 0.7, "log_losses": True}):
        b = balance.get("stch", **kwargs)
        losses, leaf = leaf_losses(values)
        b.backward(losses)
        ref = torch.tensor(values, dtype=torch.float64, requires_grad=True)
        lam = torch.tensor(kwargs.get("preference", [1.0] * 3), dtype=torch.float64)
        z = torch.tensor(kwargs.get("ideal", [0.0] * 3), dtype=torch.float64)
        mu = kwargs.get("mu", 1.0)
        f = torch.log(ref) if kwargs.get("log_losses") else ref
        (mu * torch.log(torch.exp(lam * (f - z) / mu).sum())).backward()
        torch.testing.assert_close(leaf.grad, ref.grad)


def test_stch_limits_tchebycheff_and_linear_scalarisation():
    L = torch.tensor([1.0, 2.0, 1.5], dtype=torch.float64)
    lam = [1.0, 0.5, 1.0]  # λ (L − z) = [1, 1, 1.5]: task 2 is the worst weighted objective
    sharp = balance.get("stch", mu=1e-3, preference=lam)
    torch.testing.assert_close(sharp.weights(L), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-6)
    smooth = balance.get("stch", mu=1e6, preference=lam)
    torch.testing.assert_close(smooth.weights(L), torch.tensor(lam, dtype=torch.float64) / 3, rtol=0, atol=1e-6)
    for mu in (1e-2, 0.5, 3.0):
        g = balance.get("stch", mu=mu, preference=lam).objective(L).item()
        assert 1.5 <= g <= 1.5 + mu * math.log(3) + 1e-12


# ------------------------------------------------------------------------------------ GradNorm
def last_layer_grad_norms(model: Problem, losses: dict) -> torch.Tensor:
    W = model.trunk[2].weight
    return torch.stack([torch.autograd.grad(l, W, retain_graph=True)[0].norm() for l in losses.values()])


def test_gradnorm_weight_update_follows_the_paper():
    model = Problem(3)
    lr, alpha = 0.05, 1.5
    b = balance.get("gradnorm", alpha=alpha, lr=lr, optimizer="sgd")
    w = torch.ones(3, dtype=torch.float64)
    L0 = None
    for step in range(3):
        model.zero()
        losses = model.losses(step)
        vec = torch.stack(list(losses.values())).detach()
        L0 = vec if L0 is None else L0
        n = last_layer_grad_norms(model, losses)
        expected_heads = torch.cat([w[t] * torch.autograd.grad(losses[f"t{t}"], model.heads[t].weight,
                                                               retain_graph=True)[0].reshape(-1) for t in range(3)])
        used = b.backward(losses, shared=model.shared())
        torch.testing.assert_close(used, w)
        heads_grad = torch.cat([model.heads[t].weight.grad.reshape(-1) for t in range(3)])
        torch.testing.assert_close(heads_grad, expected_heads)
        G = w * n
        r = (vec / L0) / (vec / L0).mean()
        target = G.mean() * r**alpha
        w = w - lr * torch.sign(G - target) * n
        w = w.clamp_min(1e-4) * 3 / w.clamp_min(1e-4).sum()
        torch.testing.assert_close(b.loss_weights, w)


def test_gradnorm_target_uses_the_relative_inverse_training_rate_to_the_power_alpha():
    # w = 1, ‖∇_W L‖ = [0.75, 1.25] -> G = [0.75, 1.25], Ḡ = 1; L/L(0) = [1.6, 2.4] -> r = [0.8, 1.2]
    norms = torch.tensor([0.75, 1.25], dtype=torch.float64)
    losses = torch.tensor([1.6, 2.4], dtype=torch.float64)
    expected = {2.0: [0.75, -1.25],   # targets [0.64, 1.44]: G above, below
                1.0: [-0.75, 1.25],   # targets [0.8, 1.2]: G below, above
                0.0: [-0.75, 1.25]}   # targets [1, 1]
    for alpha, grad in expected.items():
        b = balance.get("gradnorm", alpha=alpha)
        b.loss_weights = torch.ones(2, dtype=torch.float64)
        b.initial_losses = torch.ones(2, dtype=torch.float64)
        torch.testing.assert_close(b.weight_gradient(losses, norms), torch.tensor(grad, dtype=torch.float64))


def test_gradnorm_alpha_zero_equalises_gradient_norms():
    model = Problem(3)
    b = balance.get("gradnorm", alpha=0.0, lr=1e-2, optimizer="adam")
    n = last_layer_grad_norms(model, model.losses(0))
    assert n.max() / n.min() > 10  # the tasks start far from balanced
    G_sum = torch.zeros(3, dtype=torch.float64)
    for step in range(400):
        model.zero()
        b.backward(model.losses(0), shared=model.shared())  # model frozen: norms stay n
        if step >= 250:  # the |·| objective makes w oscillate by ~lr around its target: average
            G_sum += b.loss_weights * n
    G = G_sum / 150
    assert (G.max() - G.min()) / G.mean() < 0.05
    torch.testing.assert_close(b.loss_weights.sum(), torch.tensor(3.0, dtype=torch.float64))


def test_gradnorm_last_shared_layer_is_found_from_the_features():
    torch.manual_seed(0)
    first, last = nn.Linear(4, 6), nn.Linear(6, 3)
    shared = [*last.parameters(), *first.parameters()]  # parameter order does not tell the last layer
    x = torch.randn(5, 4)
    z = last(torch.relu(first(x)))
    assert last_shared_weight(shared, z) is last.weight
    assert last_shared_weight(shared) is first.weight  # without features: the last matrix in order
    # stacked expert weights (E, in, out) are the layer's weight, their (E, 1, out) biases are not
    w, b = nn.Parameter(torch.randn(3, 4, 6)), nn.Parameter(torch.randn(3, 1, 6))
    assert last_shared_weight([w, b], torch.baddbmm(b, x.expand(3, 5, 4), w)) is w


def test_gradnorm_feature_layer_uses_the_shared_representation():
    model = Problem(2)
    b = balance.get("gradnorm", layer="features", optimizer="sgd", lr=0.1, alpha=0.0)
    with pytest.raises(ConfigError, match="features"):
        b.backward(model.losses(0), shared=model.shared())
    model.zero()
    losses = model.losses(0)
    n = torch.stack([torch.autograd.grad(l, model.z, retain_graph=True)[0].norm() for l in losses.values()])
    b.backward(losses, shared=model.shared(), features=model.z)
    step = -0.1 * torch.sign(n - n.mean()) * n
    expected = (1 + step) * 2 / (1 + step).sum()
    torch.testing.assert_close(b.loss_weights, expected)


# ------------------------------------------------------------------------------- state round trip
STATE_CASES = [("uw", {}), ("dwa", {}), ("rlw", {"seed": 3}), ("imtl_l", {}), ("famo", {}),
               ("db_mtl", {}), ("gradnorm", {}), ("stch", {"mu": 0.5}), ("gls", {})]


@pytest.mark.parametrize("name,kwargs", STATE_CASES)
def test_state_dict_round_trip_restores_identical_behaviour(name, kwargs):
    model_a, model_b = Problem(3, seed=1), Problem(3, seed=1)
    a = balance.get(name, **kwargs)
    for step in range(4):
        run_step(a, model_a, step, sgd_lr=0.01)
        run_step(a, model_a, step + 10, sgd_lr=0.01)
        a.end_epoch()
    model_b.load_state_dict(model_a.state_dict())
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors-friendly
    b = balance.get(name, **kwargs)
    b.load_state_dict({k: v.clone() for k, v in state.items()})
    for step in range(4, 7):
        wa = run_step(a, model_a, step, sgd_lr=0.01)
        wb = run_step(b, model_b, step, sgd_lr=0.01)
        torch.testing.assert_close(wa, wb, rtol=0, atol=0)
        torch.testing.assert_close(model_a.grads(), model_b.grads(), rtol=0, atol=0)
        a.end_epoch()
        b.end_epoch()
    if set(state) - {"skipped_steps"}:  # the state matters: a fresh balancer behaves differently
        fresh = balance.get(name, **kwargs)
        model_c = Problem(3, seed=1)
        model_c.load_state_dict(model_a.state_dict())
        wc, wa = run_step(fresh, model_c, 99), run_step(a, model_a, 99)
        assert not torch.equal(wa, wc)


def test_loaded_state_for_other_task_count_is_refused():
    a = balance.get("uw")
    a.backward(leaf_losses([1.0, 2.0, 3.0])[0])
    b = balance.get("uw")
    b.load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match="3 tasks"):
        b.backward(leaf_losses([1.0, 2.0])[0])


# ------------------------------------------------------------------------------------ no host sync
@pytest.mark.parametrize("name", LOSS_BALANCERS)
def test_backward_makes_no_host_sync(name, monkeypatch):
    model = Problem(3)
    b = balance.get(name, **({"seed": 0} if name == "rlw" else {}))
    run_step(b, model, 0)  # first step: binding, graph checks

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation inside a training step")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    for step in range(1, 3):
        run_step(b, model, step)
        b.end_epoch()


@pytest.mark.parametrize("name", ["dwa", "db_mtl", "famo", "gradnorm", "imtl_l"])
def test_a_non_finite_loss_does_not_poison_the_state(name):
    model = Problem(2)
    b = balance.get(name)
    run_step(b, model, 0)
    run_step(b, model, 1)
    b.end_epoch()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    model.zero()
    losses = model.losses(2)
    losses["t1"] = losses["t1"] * float("nan")
    b.backward(losses, shared=model.shared(), features=model.z)
    if b.needs_post_step_losses:
        b.post_step({k: v.detach() for k, v in losses.items()})
    b.end_epoch()
    for key, value in b.state_dict().items():
        if key == "log_losses_before":  # this step's record, replaced at the next backward
            continue
        assert torch.isfinite(value.double()).all(), key
        if value.ndim and value.shape[0] == 2:  # per-task state: the NaN task's entry is kept
            assert torch.equal(value[1], before[key][1]), key


def test_gradnorm_matches_torch_rechub_where_both_follow_the_paper():
    """torch-rechub's ``gradnorm`` targets ``Ḡ · mean(L̃)^α`` for every task (not the paper's
    per-task ``r_t^α``); with ``α = 0`` both are the paper's ``Ḡ``: same weight gradient, same model gradient."""
    rechub = pytest.importorskip("torch_rechub.utils.mtl")
    model_ours, model_peer = Problem(3, seed=4), Problem(3, seed=4)
    ours = balance.get("gradnorm", alpha=0.0)
    ours.backward(model_ours.losses(0), shared=model_ours.shared())  # L(0) and binding
    start = torch.tensor([1.3, 0.4, 1.3], dtype=torch.float64)
    ours.loss_weights.copy_(start)
    peer_weights = nn.ParameterList(nn.Parameter(w.reshape(1).clone()) for w in start)
    initial = ours.initial_losses.tolist()

    model_ours.zero()
    losses = model_ours.losses(1)
    vec = torch.stack(list(losses.values())).detach()
    norms = ours.gradient_norms(torch.stack(list(losses.values())), model_ours.shared(), None)
    expected_w_grad = ours.weight_gradient(vec, norms)
    ours.backward(losses, shared=model_ours.shared())

    model_peer.zero()
    peer_losses = list(model_peer.losses(1).values())
    rechub.gradnorm(peer_losses, peer_weights, model_peer.trunk[2].weight, initial, 0.0)
    torch.testing.assert_close(torch.cat([w.grad for w in peer_weights]), expected_w_grad)
    torch.testing.assert_close(model_ours.grads(), model_peer.grads())


def test_tasks_absent_from_the_batch_take_no_part():
    """A task without labelled rows has a loss of exactly 0 (polytask's masked mean)."""
    # GLS: geometric mean over the present tasks, G = sqrt(1 * 4) = 2, w = G / (2 L)
    losses, leaf = leaf_losses([1.0, 0.0, 4.0])
    balance.get("gls").backward(losses)
    torch.testing.assert_close(leaf.grad, torch.tensor([1.0, 0.0, 0.25], dtype=torch.float64))
    # FAMO: z = 1/3 each; c z / L over the present tasks = [0.8, 0, 0.2]; the absent logit stays
    famo = balance.get("famo", optimizer="sgd", lr=0.5, gamma=0.0)
    losses, leaf = leaf_losses([1.0, 0.0, 4.0])
    famo.backward(losses)
    torch.testing.assert_close(leaf.grad, torch.tensor([0.8, 0.0, 0.2], dtype=torch.float64))
    famo.post_step(leaf_losses([0.5, 0.0, 3.0])[0])
    assert famo.logits[1] == 0 and famo.logits[0] < 0 < famo.logits[2]
    # DWA: the epoch average of a task counts only the batches where it is present
    dwa = balance.get("dwa")
    for epoch in ([[1.0, 2.0], [1.0, 0.0]], [[0.5, 0.0], [0.5, 1.0]]):
        for values in epoch:
            dwa.backward(leaf_losses(values)[0])
        dwa.end_epoch()
    torch.testing.assert_close(dwa.last_avg / dwa.before_last_avg, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # GradNorm: L_t(0) is the first present loss; an absent task keeps its weight
    model = Problem(2)
    gn = balance.get("gradnorm", optimizer="sgd", lr=0.1)
    losses = model.losses(0)
    losses["t1"] = losses["t1"] * 0.0
    gn.backward(losses, shared=model.shared())
    assert gn.initial_losses[1] == 0
    model.zero()
    losses = model.losses(1)
    gn.backward(losses, shared=model.shared())
    assert gn.initial_losses[1] == losses["t1"].detach()
