"""GO4Align, NTKMTL and Auto-Lambda (balance/recent.py): no pinned peer ships them, so every value is
recomputed here from the papers' equations with plain torch (float64), step by step, including the
hard cases (zero, nearly opposite and badly scaled gradients, an absent task, NaN at step 1) and the
state carried from one step to the next. 2 ranks == 1 process is tests/test_balance_dist.py's
registry-wide check (GO4Align and NTKMTL take part; Auto-Lambda runs in one process only)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from polytask import balance
from polytask.balance.recent import NTKMTL, HeldOut, kmeans_1d
from polytask.errors import ConfigError

D64 = torch.float64


def _best_partition_brute_force(values: list[float], k: int) -> float:
    """Least within-group sum of squares over EVERY assignment of the values to k labels (no sorting trick)."""
    best = math.inf
    for labels in itertools.product(range(k), repeat=len(values)):
        sse = 0.0
        for g in range(k):
            members = [v for v, lab in zip(values, labels) if lab == g]
            if members:
                mean = sum(members) / len(members)
                sse += sum((v - mean) ** 2 for v in members)
        best = min(best, sse)
    return best


def _sse(values: torch.Tensor, groups: torch.Tensor) -> float:
    return float(sum(((values[groups == g] - values[groups == g].mean()) ** 2).sum() for g in groups.unique()))


# ------------------------------------------------------------------------------------- kmeans_1d
def test_kmeans_1d_hand_case():
    # sorted: 0.5 1 2 | 10 11 -> centroids 3.5/3 = 7/6 and 10.5
    centroids, groups = kmeans_1d(torch.tensor([1.0, 10.0, 2.0, 11.0, 0.5], dtype=D64), 2)
    torch.testing.assert_close(centroids, torch.tensor([7 / 6, 10.5, 7 / 6, 10.5, 7 / 6], dtype=D64))
    assert groups.tolist() == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_1d_is_the_optimum_over_every_assignment(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(6, generator=g, dtype=D64).exp()  # positive, of different scales
    for k in (1, 2, 3):
        centroids, groups = kmeans_1d(values, k)
        assert _sse(values, groups) == pytest.approx(_best_partition_brute_force(values.tolist(), k), rel=1e-12, abs=1e-12)
        for grp in groups.unique():  # each task's weight is its group's mean
            torch.testing.assert_close(centroids[groups == grp], values[groups == grp].mean().expand((groups == grp).sum()))


def test_kmeans_1d_values_over_sixteen_orders_of_magnitude():
    # with prefix sums of x^2 the large pair's cost (~1e16 - 1e16) cancels to noise; here K = 3 must split it
    values = torch.tensor([1e-8, 1e8, 2e-8, 1e8 + 1], dtype=D64)
    centroids, groups = kmeans_1d(values, 3)
    assert groups[1] != groups[3] and groups[0] == groups[2]
    torch.testing.assert_close(centroids, torch.tensor([1.5e-8, 1e8, 1.5e-8, 1e8 + 1], dtype=D64), rtol=1e-15, atol=0)
    g = torch.Generator().manual_seed(9)
    spread = torch.randn(7, generator=g, dtype=D64).mul(8).exp()
    for k in (2, 4):
        _, groups = kmeans_1d(spread, k)
        assert _sse(spread, groups) == pytest.approx(_best_partition_brute_force(spread.tolist(), k), rel=1e-9, abs=1e-300)


def test_kmeans_1d_mask_and_more_groups_than_values():
    values = torch.tensor([1.0, 50.0, 2.0, 10.0], dtype=D64)
    centroids, groups = kmeans_1d(values, 2, torch.tensor([True, False, True, True]))
    torch.testing.assert_close(centroids, torch.tensor([1.5, 0.0, 1.5, 10.0], dtype=D64))  # 50 takes no part
    assert groups[1] == -1
    centroids, _ = kmeans_1d(values, 7)  # each value its own group
    torch.testing.assert_close(centroids, values)


# ------------------------------------------------------------------------------- a small problem
class Problem(nn.Module):
    """Shared trunk, one linear head per task, float64."""

    def __init__(self, tasks: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        self.heads = nn.ModuleList(nn.Linear(3, 1).double() for _ in range(tasks))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=D64) * 0.7)
        self.z = None

    def forward(self, x):
        self.z = self.trunk(x)
        return [h(self.z)[:, 0] for h in self.heads]


def batch(step: int, tasks: int = 3, scales=(1.0, 3.0, 5.0)):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 4, generator=g, dtype=D64)
    y = torch.randn(8, tasks, generator=g, dtype=D64) * torch.tensor(scales[:tasks], dtype=D64)
    return x, y


def losses_of(model, x, y):
    return {f"t{t}": ((out - y[:, t]) ** 2).mean() for t, out in enumerate(model(x))}


def per_task_grads(model, losses):
    """``{task: [grad of each parameter]}`` by plain autograd, one task at a time."""
    params = list(model.parameters())
    return {k: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True, materialize_grads=True)
            for k, v in losses.items()}


def weighted_grad(model, losses, weights):
    grads = per_task_grads(model, losses)
    return [sum(w * grads[k][i] for k, w in zip(losses, weights)) for i in range(len(list(model.parameters())))]


def grads_of(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


# -------------------------------------------------------------------------------------- GO4Align
def go4align_by_hand(steps_losses: list[list[float]], k: int, eta: float) -> list[list[float]]:
    """The weights of the authors' rule, step by step, with the best grouping found by brute force."""
    n = len(steps_losses[0])
    p = [1.0 / n] * n
    out = []
    for L in steps_losses:
        p = [pi * math.exp(-eta * li) for pi, li in zip(p, L)]
        p = [pi / sum(p) for pi in p]
        gamma = [sum(L) / li * pi for li, pi in zip(L, p)]
        best, best_labels = math.inf, None
        for labels in itertools.product(range(k), repeat=n):
            sse = 0.0
            for g in range(k):
                members = [v for v, lab in zip(gamma, labels) if lab == g]
                if members:
                    sse += sum((v - sum(members) / len(members)) ** 2 for v in members)
            if sse < best - 1e-15:
                best, best_labels = sse, labels
        out.append([sum(v for v, lab in zip(gamma, best_labels) if lab == best_labels[t])
                    / sum(1 for lab in best_labels if lab == best_labels[t]) for t in range(n)])
    return out


def test_go4align_three_steps_against_the_rule_by_hand():
    model, b = Problem(), balance.get("go4align", num_groups=2, robust_step_size=0.3)  # η large: p visibly moves
    seen, got = [], []
    for step in range(3):
        x, y = batch(step)
        losses = losses_of(model, x, y)
        seen.append([float(v.detach()) for v in losses.values()])
        model.zero_grad()
        w = b.backward(losses, shared=list(model.trunk.parameters()))
        got.append(w.tolist())
        expected_grad = weighted_grad(model, losses_of(model, x, y), w.tolist())
        for g, e in zip(grads_of(model), expected_grad):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
    expected = go4align_by_hand(seen, 2, 0.3)
    torch.testing.assert_close(torch.tensor(got, dtype=D64), torch.tensor(expected, dtype=D64), rtol=1e-10, atol=1e-12)
    assert len({round(v, 9) for v in got[-1]}) <= 2  # two groups: at most two distinct weights


def test_go4align_scale_balance_with_badly_scaled_losses():
    # K >= T: w = γ, so w_t L_t = (Σ L) p_t: the weighted losses are equal up to the risk history p
    b = balance.get("go4align", num_groups=3, robust_step_size=0.0)
    vec = torch.tensor([1e-8, 1.0, 1e8], dtype=D64)
    w = b.weights(vec) if b.before_weights({"a": vec[0], "b": vec[1], "c": vec[2]}, vec) is None else None
    torch.testing.assert_close(w * vec, torch.full((3,), float(vec.sum()) / 3, dtype=D64), rtol=1e-12, atol=0)


def test_go4align_absent_task_gets_zero_and_keeps_its_history():
    b = balance.get("go4align", num_groups=2, robust_step_size=0.5)
    model = Problem()
    x, y = batch(0)
    losses = losses_of(model, x, y)
    losses["t1"] = losses["t1"] * 0.0  # no labelled row: exactly 0
    w = b.backward(losses, shared=list(model.trunk.parameters()))
    assert w[1] == 0 and torch.isfinite(w).all()
    L = [float(losses["t0"].detach()), float(losses["t2"].detach())]
    q = [math.exp(-0.5 * L[0]) / 3, 1 / 3, math.exp(-0.5 * L[1]) / 3]
    torch.testing.assert_close(b.adv_probs, torch.tensor(q, dtype=D64) / sum(q))


def test_go4align_nan_at_step_one_skips_and_keeps_fresh_state_then_continues():
    b = balance.get("go4align", robust_step_size=0.3)
    model = Problem()
    x, y = batch(0)
    losses = losses_of(model, x, y)
    losses["t2"] = losses["t2"] * float("nan")
    w = b.backward(losses, shared=list(model.trunk.parameters()))
    assert int(b.skipped_steps) == 1 and torch.equal(w, torch.zeros(3, dtype=D64))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_of(model))
    torch.testing.assert_close(b.adv_probs, torch.full((3,), 1 / 3, dtype=D64))
    # the next step is the rule's first step
    model.zero_grad()
    losses = losses_of(model, x, y)
    w = b.backward(losses, shared=list(model.trunk.parameters()))
    expected = go4align_by_hand([[float(v.detach()) for v in losses.values()]], 2, 0.3)[0]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=D64), rtol=1e-10, atol=1e-12)


def test_go4align_state_dict_round_trip_continues_identically():
    a = balance.get("go4align", robust_step_size=0.3)
    model = Problem()
    for step in range(2):
        x, y = batch(step)
        a.backward(losses_of(model, x, y), shared=list(model.trunk.parameters()))
    b = balance.get("go4align", robust_step_size=0.3)
    b.load_state_dict(a.state_dict())
    x, y = batch(5)
    torch.testing.assert_close(b.backward(losses_of(model, x, y)), a.backward(losses_of(model, x, y)), rtol=0, atol=0)


def test_go4align_refuses_bad_parameters():
    with pytest.raises(ConfigError, match="num_groups"):
        balance.get("go4align", num_groups=0)
    with pytest.raises(ConfigError, match="robust_step_size"):
        balance.get("go4align", robust_step_size=-1.0)


# ---------------------------------------------------------------------------------------- NTKMTL
def test_ntkmtl_hand_case():
    # G = diag(9, 16), tr G = 25: w = (25/9)^0.5, (25/16)^0.5 = 5/3, 5/4; J^T w = (5, 5)
    J = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=D64)
    update, w = NTKMTL().aggregate(J)
    torch.testing.assert_close(w, torch.tensor([5 / 3, 5 / 4], dtype=D64))
    torch.testing.assert_close(update, torch.tensor([5.0, 5.0], dtype=D64))


@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0), (1e-6, 1.0, 1e6), (1e-10, 1e-10, 1e10)])
def test_ntkmtl_weighted_gradients_have_equal_norms(scales):
    # n = 1/2: w_t^2 G_tt = tr G for every task -- every weighted gradient has norm sqrt(tr G)
    g = torch.Generator().manual_seed(0)
    J = torch.randn(3, 7, generator=g, dtype=D64) * torch.tensor(scales, dtype=D64)[:, None]
    _, w = NTKMTL().aggregate(J)
    G = J @ J.T
    torch.testing.assert_close(w * w * G.diagonal(), G.diagonal().sum().expand(3), rtol=1e-10, atol=0)


def test_ntkmtl_zero_and_nearly_opposite_gradients():
    J = torch.tensor([[1.0, 0.0], [-1.0, 1e-7], [0.0, 0.0]], dtype=D64)
    update, w = NTKMTL(ntk_exp=1.0).aggregate(J)
    tr = 2.0 + 1e-14
    torch.testing.assert_close(w, torch.tensor([tr / 1.0, tr / (1.0 + 1e-14), 0.0], dtype=D64))  # zero row: weight 0
    assert torch.isfinite(update).all()
    assert torch.isnan(NTKMTL().weights(torch.full((2, 2), float("nan"), dtype=D64))).all()
    torch.testing.assert_close(NTKMTL().weights(torch.zeros(2, 2, dtype=D64)), torch.zeros(2, dtype=D64))


@pytest.mark.parametrize("mode", ["parameters", "features"])
def test_ntkmtl_through_the_engine_two_steps_by_hand(mode):
    model, b = Problem(), balance.get("ntkmtl", mode=mode)
    shared = list(model.trunk.parameters())
    for step in range(2):
        x, y = batch(step)
        losses = losses_of(model, x, y)
        # by hand: the rows of J (w.r.t. the shared parameters or the features), w from the paper's rule
        source = shared if mode == "parameters" else [model.z]
        rows = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, source, retain_graph=True)])
                            for v in losses.values()])
        diag = (rows * rows).sum(1)
        w_hand = (diag.sum() / diag).sqrt()
        combined = w_hand @ rows
        if mode == "parameters":
            expected_trunk = list(combined.split([p.numel() for p in shared]))
        else:
            expected_trunk = torch.autograd.grad(model.z, shared, grad_outputs=combined.view_as(model.z), retain_graph=True)
        heads = [torch.autograd.grad(v, list(model.heads[t].parameters()), retain_graph=True)
                 for t, v in enumerate(losses.values())]
        model.zero_grad()
        w = b.backward(losses, shared=shared, features=model.z)
        torch.testing.assert_close(w, w_hand, rtol=1e-10, atol=1e-12)
        for p, e in zip(shared, expected_trunk):
            torch.testing.assert_close(p.grad.reshape(-1), e.reshape(-1), rtol=1e-9, atol=1e-12)
        for t, head in enumerate(model.heads):  # each head: its own task's plain gradient
            for p, e in zip(head.parameters(), heads[t]):
                torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad


def test_ntkmtl_nan_at_step_one_is_skipped():
    model, b = Problem(), balance.get("ntkmtl")
    x, y = batch(0)
    losses = losses_of(model, x, y)
    losses["t0"] = losses["t0"] + torch.sqrt(model.z.sum() * 0.0 - 1.0)  # a NaN gradient under a NaN loss
    w = b.backward(losses, shared=list(model.trunk.parameters()))
    assert int(b.skipped_steps) == 1 and torch.equal(w, torch.zeros(3, dtype=D64))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_of(model))


def test_ntkmtl_is_not_imtl_or_equal_weighting():
    # proof the checks above can fail: a wrong variant (EW's weights) is rejected by the hand rule
    J = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=D64)
    _, w = NTKMTL().aggregate(J)
    assert not torch.allclose(w, torch.ones(2, dtype=D64))
    assert "ntk_exp=0.5" in repr(balance.get("ntkmtl"))


def ntkmtl_sr_by_hand(model, x, y, mask, exp=0.5):
    """The authors' NTKMTL-SR: one backward per sample and task to the representation, the largest eigenvalue
    of each task's B x B kernel (eigvalsh), w_t = (Σ λ / λ_t)^n."""
    outputs = model(x)
    lams = []
    for t, out in enumerate(outputs):
        rows = [torch.autograd.grad((out[b] - y[b, t]) ** 2, model.z, retain_graph=True)[0].reshape(-1)
                for b in range(x.shape[0]) if mask[b, t]]
        J = torch.stack(rows)
        lams.append(torch.linalg.eigvalsh(J @ J.T)[-1])
    lam = torch.stack(lams)
    return (lam.sum() / lam) ** exp


def masked_losses(model, x, y, mask):
    return {f"t{t}": (((out - y[:, t]) ** 2) * mask[:, t]).sum() / mask[:, t].sum().clamp_min(1)
            for t, out in enumerate(model(x))}


@pytest.mark.parametrize("masked", [False, True])
def test_ntkmtl_sr_equals_the_authors_per_sample_kernels(masked):
    model, b = Problem(), balance.get("ntkmtl_sr")
    for step in range(2):
        x, y = batch(step, scales=(1.0, 1e-3, 1e3))  # badly scaled tasks
        mask = torch.ones(8, 3, dtype=torch.bool)
        if masked:
            mask[1:5, 2] = False
            mask[6, 0] = False
        mask = mask.to(D64)
        w_hand = ntkmtl_sr_by_hand(model, x, y, mask.bool())
        losses = masked_losses(model, x, y, mask)
        expected_grad = weighted_grad(model, losses, w_hand.tolist())
        model.zero_grad()
        losses = masked_losses(model, x, y, mask)
        w = b.backward(losses, shared=list(model.trunk.parameters()), features=model.z)
        torch.testing.assert_close(w, w_hand, rtol=1e-9, atol=1e-12)
        for g, e in zip(grads_of(model), expected_grad):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad


def test_ntkmtl_sr_absent_task_nan_and_missing_features():
    model, b = Problem(), balance.get("ntkmtl_sr")
    x, y = batch(0)
    mask = torch.ones(8, 3, dtype=D64)
    mask[:, 1] = 0.0  # task t1 has no labelled row: loss exactly 0, weight 0
    w = b.backward(masked_losses(model, x, y, mask), features=model.z)
    assert w[1] == 0 and torch.isfinite(w).all() and (w[[0, 2]] > 0).all()
    model.zero_grad()
    losses = losses_of(model, x, y)
    losses["t2"] = losses["t2"] * float("nan")
    w = b.backward(losses, features=model.z)
    assert int(b.skipped_steps) == 1 and torch.equal(w, torch.zeros(3, dtype=D64))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_of(model))
    with pytest.raises(ConfigError, match="'ntkmtl_sr' needs features="):
        b.backward(losses_of(model, x, y))


# ----------------------------------------------------------------------------------- Auto-Lambda
def heldout_for(model, x, y, xv, yv):
    params = [p for p in model.parameters() if p.requires_grad]
    return HeldOut(params, lambda: losses_of(model, x, y), lambda: losses_of(model, xv, yv), 0.1)


def auto_lambda_by_hand(model, x, y, xv, yv, lam, lr, primary=None, weight_decay=0.0, momentum=None):
    """The meta-gradient of Auto-Lambda at the model's parameters, on a functional copy (nothing in place);
    the virtual step θ' = θ − α (m + g + wd θ) as the authors' ``virtual_step``."""
    names = [f"t{t}" for t in range(len(lam))]
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}

    def losses(ps, xx, yy):
        out = torch.func.functional_call(model, ps, (xx,))
        return torch.stack([((o - yy[:, t]) ** 2).mean() for t, o in enumerate(out)])

    keys = list(params)
    train = losses(params, x, y)
    g = torch.autograd.grad((lam * train).sum(), [params[k] for k in keys], retain_graph=True)
    m = momentum or [0.0] * len(keys)
    virtual = {k: (params[k] - lr * (gi + weight_decay * params[k] + mi)).detach().requires_grad_(True)
               for k, gi, mi in zip(keys, g, m)}
    mask = torch.tensor([1.0 if primary is None or n in primary else 0.0 for n in names], dtype=D64)
    v = torch.autograd.grad((mask * losses(virtual, xv, yv)).sum(), [virtual[k] for k in keys])
    eps = 0.01 / torch.sqrt(sum((d * d).sum() for d in v))
    with torch.no_grad():
        plus = losses({k: params[k] + eps * d for k, d in zip(keys, v)}, x, y)
        minus = losses({k: params[k] - eps * d for k, d in zip(keys, v)}, x, y)
    fd = -lr * (plus - minus) / (2 * eps)
    # the exact second-order term of the paper: −α ∇_θ L_t(θ) · v
    rows = [torch.autograd.grad(train[t], [params[k] for k in keys], retain_graph=True) for t in range(len(lam))]
    exact = torch.stack([-lr * sum((a * b).sum() for a, b in zip(r, v)) for r in rows])
    return fd, exact


def test_auto_lambda_two_steps_against_the_rule_by_hand():
    model = Problem()
    b = balance.get("auto_lambda", meta_lr=1e-2)
    lam = torch.full((3,), 0.1, dtype=D64, requires_grad=True)
    adam = torch.optim.Adam([lam], lr=1e-2)  # the meta optimizer, as the authors use it
    for step in range(2):
        x, y = batch(step)
        xv, yv = batch(50 + step)
        fd, exact = auto_lambda_by_hand(model, x, y, xv, yv, lam.detach(), 0.1)
        torch.testing.assert_close(fd, exact, rtol=2e-3, atol=1e-8)  # the central difference: O(ε²) off the paper's term
        lam.grad = fd.clone()
        adam.step()
        expected_grad = weighted_grad(model, losses_of(model, x, y), lam.detach().tolist())
        before = [p.detach().clone() for p in model.parameters()]
        model.zero_grad()
        b.heldout = heldout_for(model, x, y, xv, yv)
        w = b.backward(losses_of(model, x, y))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # θ restored bit for bit
        torch.testing.assert_close(w, lam.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.meta_weights, lam.detach(), rtol=1e-10, atol=1e-12)
        for g, e in zip(grads_of(model), expected_grad):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    assert b.heldout is None  # one held-out batch per step


def test_auto_lambda_virtual_step_takes_the_optimizers_momentum_and_weight_decay():
    model = Problem()
    x, y = batch(0)
    xv, yv = batch(50)
    g = torch.Generator().manual_seed(3)
    momentum = [torch.randn(p.shape, generator=g, dtype=D64) * 0.3 for p in model.parameters()]
    lam = torch.full((3,), 0.1, dtype=D64)
    fd, exact = auto_lambda_by_hand(model, x, y, xv, yv, lam, 0.1, weight_decay=0.05, momentum=momentum)
    plain, _ = auto_lambda_by_hand(model, x, y, xv, yv, lam, 0.1)
    assert not torch.allclose(fd, plain, rtol=1e-3)  # the terms matter: a plain SGD lookahead is another step
    torch.testing.assert_close(fd, exact, rtol=2e-3, atol=1e-8)
    b = balance.get("auto_lambda")
    b.heldout = HeldOut(list(model.parameters()), lambda: losses_of(model, x, y), lambda: losses_of(model, xv, yv),
                        0.1, 0.05, momentum)
    b.backward(losses_of(model, x, y))
    torch.testing.assert_close(b.opt.exp_avg / (1 - 0.9), fd, rtol=1e-10, atol=1e-14)


def test_trainer_passes_sgd_momentum_and_weight_decay(tmp_path):
    from polytask.train import Trainer, parse_config

    cfg = parse_config({"name": "al", "seed": 0, "device": "cpu", "out_dir": str(tmp_path / "{name}"),
                        "data": {"name": "synthetic", "params": {"num_tasks": 2, "num_rows": 100, "input_dim": 4}},
                        "balancer": {"name": "auto_lambda"}, "model": {"arch": "shared_bottom"},
                        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
                        "train": {"epochs": 1, "batch_size": 20, "early_stopping": None}})
    trainer = Trainer(cfg, progress=False)
    seen = []
    original = trainer.balancer.meta_gradient
    trainer.balancer.meta_gradient = lambda vec, held, names: (seen.append(held), original(vec, held, names))[1]
    trainer.fit()
    first, second = seen[0], seen[1]
    assert first.lr == 0.05 and first.weight_decay == 0.01
    assert first.momentum is None or all(m is None for m in first.momentum)  # no buffer before the first step
    state = trainer.optimizer.state
    assert second.momentum is not None and any(m is not None for m in second.momentum)
    assert all(m is None or m.shape == p.shape for m, p in zip(second.momentum, second.parameters))
    assert len(state) > 0


def test_auto_lambda_primary_tasks_change_the_meta_objective():
    model = Problem()
    x, y = batch(0)
    xv, yv = batch(50)
    lam = torch.full((3,), 0.1, dtype=D64)
    fd_all, _ = auto_lambda_by_hand(model, x, y, xv, yv, lam, 0.1)
    fd_one, exact_one = auto_lambda_by_hand(model, x, y, xv, yv, lam, 0.1, primary=["t0"])
    assert not torch.allclose(fd_all, fd_one)
    b = balance.get("auto_lambda", primary=["t0"])
    b.heldout = heldout_for(model, x, y, xv, yv)
    b.backward(losses_of(model, x, y))
    m = b.opt.exp_avg / (1 - 0.9)  # Adam's first moment after one step is (1 - β1) g
    torch.testing.assert_close(m, fd_one, rtol=1e-10, atol=1e-14)
    with pytest.raises(ConfigError, match="primary"):
        c = balance.get("auto_lambda", primary=["nope"])
        c.heldout = heldout_for(model, x, y, xv, yv)
        c.backward(losses_of(model, x, y))


def test_auto_lambda_nan_in_the_heldout_batch_skips_the_step():
    model = Problem()
    x, y = batch(0)
    xv, yv = batch(50)
    yv[0, 1] = float("nan")
    b = balance.get("auto_lambda")
    b.heldout = heldout_for(model, x, y, xv, yv)
    w = b.backward(losses_of(model, x, y))
    assert int(b.skipped_steps) == 1 and torch.equal(w, torch.zeros(3, dtype=D64))
    torch.testing.assert_close(b.meta_weights, torch.full((3,), 0.1, dtype=D64))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_of(model))


def test_auto_lambda_zero_heldout_gradient_leaves_lambda():
    model = Problem()
    x, y = batch(0)
    b = balance.get("auto_lambda")
    zero = lambda: {k: v * 0.0 for k, v in losses_of(model, x, y).items()}  # noqa: E731
    b.heldout = HeldOut(list(model.parameters()), lambda: losses_of(model, x, y), zero, 0.1)
    w = b.backward(losses_of(model, x, y))
    torch.testing.assert_close(w, torch.full((3,), 0.1, dtype=D64))
    assert int(b.skipped_steps) == 0


def test_auto_lambda_without_heldout_data_is_one_clear_error():
    model = Problem()
    x, y = batch(0)
    b = balance.get("auto_lambda")
    with pytest.raises(ConfigError, match=r"'auto_lambda' needs a held-out batch: set balancer.heldout"):
        b.backward(losses_of(model, x, y))
    b.heldout = heldout_for(model, x, y, x, y)
    with pytest.raises(ConfigError, match="auto_lambda"):
        b.backward(losses_of(model, x, y), process_group=object())
    with pytest.raises(ConfigError, match="accumulate"):
        b.accumulate(losses_of(model, x, y))


def test_trainer_feeds_a_validation_batch_each_step(tmp_path):
    from polytask.train import Trainer, parse_config

    cfg = parse_config({"name": "al", "seed": 0, "device": "cpu", "out_dir": str(tmp_path / "{name}"),
                        "data": {"name": "synthetic", "params": {"num_tasks": 2, "num_rows": 200, "input_dim": 4}},
                        "balancer": {"name": "auto_lambda", "params": {"meta_lr": 0.01}},
                        "model": {"arch": "shared_bottom"},
                        "train": {"epochs": 2, "batch_size": 20, "early_stopping": None}})
    trainer = Trainer(cfg, progress=False)
    drawn, rows = [], []
    original = trainer.balancer.meta_gradient

    def spy(vec, held, names):
        drawn.append(held)
        return original(vec, held, names)

    trainer.balancer.meta_gradient = spy
    sources = {"train": trainer.train_set, "val": trainer.val_set}
    batches = {name: data.batches for name, data in sources.items()}
    for name, data in sources.items():  # which split the held-out batches come from (the Trainer's own pass too)
        data.batches = lambda *a, _n=name, **k: (rows.append(_n), batches[_n](*a, **k))[1]
    trainer.fit()
    assert len(drawn) == trainer.step and trainer.step > 0
    assert rows.count("train") > trainer.epoch  # the Trainer's passes over train, and the held-out passes
    assert not torch.allclose(trainer.balancer.meta_weights, torch.full((2,), 0.1))  # λ was learned


def test_auto_lambda_heldout_split_train_is_the_authors_and_val_is_an_option():
    assert balance.get("auto_lambda").heldout_split == "train"
    assert "heldout_split='val'" in repr(balance.get("auto_lambda", heldout_split="val"))
    with pytest.raises(ConfigError, match="heldout_split"):
        balance.get("auto_lambda", heldout_split="test")


def test_cli_auto_lambda_without_heldout_batches_is_exit_2_one_line(tmp_path):
    # streamed table data has no in-memory validation split to draw held-out batches from
    pytest.importorskip("pyarrow")
    import subprocess
    import sys

    import yaml

    from polytask.train.tables import write_synthetic_splits

    paths = write_synthetic_splits(tmp_path / "log", 600, row_group_rows=200)
    cfg = {"name": "t", "out_dir": str(tmp_path / "r"), "device": "cpu", "seed": 3,
           "data": {"name": "table", "params": {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]),
                                                "dense": ["price", "hour"], "ids": {"item_id": {"hash": 64}},
                                                "labels": {"click": "click"}, "embed_dim": 4}},
           "balancer": {"name": "auto_lambda"}, "model": {"arch": "mmoe", "params": {"num_experts": 2}},
           "train": {"epochs": 1, "batch_size": 128, "early_stopping": None}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "polytask.cli", "train", str(path)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "balancer.name: 'auto_lambda' needs held-out batches" in lines[0], res.stderr
    # nothing written but the run directory's lock, as for every ConfigError of the Trainer's construction
    assert not (tmp_path / "r").exists() or sorted(p.name for p in (tmp_path / "r").iterdir()) == [".lock"]


@pytest.mark.parametrize("name", ["go4align", "ntkmtl_sr", "auto_lambda"])
def test_the_step_makes_no_host_sync(name, monkeypatch):
    """After the first step (which binds the tasks), ``backward`` reads no tensor on the host."""
    model, b = Problem(), balance.get(name)

    def step(i):
        x, y = batch(i)
        if name == "auto_lambda":
            xv, yv = batch(50 + i)
            b.heldout = heldout_for(model, x, y, xv, yv)
        model.zero_grad()
        return b.backward(losses_of(model, x, y), shared=list(model.trunk.parameters()), features=model.z)

    step(0)

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation inside a training step")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    w = step(1)
    monkeypatch.undo()
    assert torch.isfinite(w).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["go4align", "ntkmtl", "ntkmtl_sr", "auto_lambda"])
def test_same_steps_on_gpu(name):
    runs = []
    for device in ("cpu", "cuda"):
        model, b = Problem().to(device), balance.get(name).to(device)
        grads = []
        for step in range(3):
            x, y = (t.to(device) for t in batch(step))
            if name == "auto_lambda":
                xv, yv = (t.to(device) for t in batch(50 + step))
                b.heldout = heldout_for(model, x, y, xv, yv)
            model.zero_grad()
            b.backward(losses_of(model, x, y), shared=list(model.trunk.parameters()), features=model.z)
            grads.append(torch.cat([g.reshape(-1) for g in grads_of(model)]).cpu())
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
        runs.append(grads)
    for cpu, gpu in zip(*runs):
        torch.testing.assert_close(gpu, cpu, rtol=1e-7, atol=1e-9)
