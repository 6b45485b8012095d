"""Diagnostics on constructed cases with known answers: gradient conflict, lookahead affinity,
grouping against brute force, rank correlation, task-vector interference, expert usage."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from polytask.analyze import (
    AffinityMonitor,
    GradientConflictMonitor,
    collect_expert_usage,
    gradient_conflict,
    group_tasks,
    grouping_score,
    lookahead_affinity,
    rank_agreement,
    singular_task_interference,
    spearman,
    subspace_overlap,
    task_vector_cosine,
    tsv_interference,
)
from polytask.data import Batch, MultiTaskDataset
from polytask.errors import ConfigError, MergeError
from polytask.nn import MMoE, MultiTaskModel, SharedBottom
from polytask.tasks import Task

N, D = 64, 4


class LinearTrunk(MultiTaskModel):
    """Every task reads the same shared linear map ``x @ w``; an optional task ``own`` reads only
    its own parameter (no shared dependence)."""

    def __init__(self, tasks, init=None):
        super().__init__(tasks)
        self.trunk = nn.Linear(D, 1, bias=False)
        with torch.no_grad():
            self.trunk.weight.copy_(torch.zeros(1, D) if init is None else init)
        self.heads = nn.ParameterDict({"own": nn.Parameter(torch.tensor([0.5]))})

    def forward(self, x):
        z = self.trunk(x).squeeze(-1)
        self.shared_features = z
        return {t: (self.heads["own"].expand(x.shape[0]) if t == "own" else z) for t in self.task_names}


def _orthogonal_inputs():
    q, _ = torch.linalg.qr(torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return (q * math.sqrt(N)).float()  # columns orthogonal, XᵀX = N·I


def _case(targets):
    tasks = [Task(n, "regression") for n in targets]
    return tasks, LinearTrunk(tasks), Batch(_X, targets, None)


_X = _orthogonal_inputs()


def test_identical_tasks_have_maximal_cosine_and_affinity():
    y = _X @ torch.tensor([1.0, -2.0, 0.5, 1.0])
    tasks, model, batch = _case({"a": y, "b": y.clone()})
    conflict = gradient_conflict(model, tasks, [batch])
    assert conflict.cosine[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert conflict.conflict_rate[0, 1].item() == 0
    assert conflict.magnitude_similarity[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    z = lookahead_affinity(model, tasks, batch, lr=0.01)
    assert z[0, 1] > 0
    assert torch.allclose(z, z[0, 0].expand(2, 2), rtol=1e-5)  # helping b as much as a helps itself


def test_opposite_tasks_have_negative_cosine_and_affinity():
    y = _X @ torch.tensor([1.0, -2.0, 0.5, 1.0])
    tasks, model, batch = _case({"a": y, "b": -y})
    conflict = gradient_conflict(model, tasks, [batch])
    assert conflict.cosine[0, 1].item() == pytest.approx(-1.0, abs=1e-6)
    assert conflict.conflict_rate[0, 1].item() == 1.0
    lr = 0.01
    z = lookahead_affinity(model, tasks, batch, lr=lr)
    # by hand: L(w) = |w - w*|² for XᵀX/N = I, g_a = -2w*, so the step on a moves w to 2ηw*;
    # L_b = |2ηw* + w*|² = (1+2η)²|w*|²  ->  Z_{a→b} = 1 - (1+2η)²
    assert z[0, 1].item() == pytest.approx(1 - (1 + 2 * lr) ** 2, rel=1e-4)
    assert z[0, 0].item() == pytest.approx(1 - (1 - 2 * lr) ** 2, rel=1e-4)


def test_orthogonal_and_independent_tasks_are_near_zero():
    tasks, model, batch = _case({"a": _X[:, 0] * 2, "b": _X[:, 1] * 2, "own": torch.ones(N)})
    conflict = gradient_conflict(model, tasks, [batch])
    assert abs(conflict.cosine[0, 1].item()) < 1e-6
    assert math.isnan(conflict.cosine[0, 2].item())  # task `own` has no gradient on shared weights
    z = lookahead_affinity(model, tasks, batch, lr=1e-3)
    assert abs(z[0, 1].item()) < 1e-2 * z[0, 0].item()  # second order only: O(η²) vs O(η)
    assert z[0, 2].item() == 0 and z[2, 0].item() == 0 and z[2, 2].item() == 0


def _shared_bottom(tasks, seed=0):
    torch.manual_seed(seed)
    return SharedBottom(6, tasks, bottom=(8, 5), tower=(4,), dropout=0.2)


def _random_batch(tasks, seed=1, rows=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=g)
    y = {t.name: torch.randn(rows, generator=g) for t in tasks}
    mask = {t.name: torch.rand(rows, generator=g) > 0.3 for t in tasks}
    return Batch(x, y, mask)


def test_conflict_matches_per_task_autograd_per_layer():
    tasks = [Task(n, "regression") for n in ("a", "b", "c")]
    model, batch = _shared_bottom(tasks), _random_batch(tasks)
    res = gradient_conflict(model, tasks, [batch], groups="layer")
    assert res.groups == ["bottom.0", "bottom.3"]  # Linear, ReLU, Dropout, Linear
    model.eval()
    out = model(batch.inputs)
    grads = [torch.autograd.grad(t.loss(out[t.name], batch.targets[t.name], batch.mask[t.name]),
                                 list(model.bottom.parameters()), retain_graph=True) for t in tasks]
    def cos(parts):
        flat = torch.stack([torch.cat([g.reshape(-1) for g in p]) for p in parts])
        return nn.functional.normalize(flat, dim=1) @ nn.functional.normalize(flat, dim=1).T
    assert torch.allclose(res.cosine.float(), cos(grads), atol=1e-5)
    assert torch.allclose(res.group_cosine[1].float(), cos([g[2:] for g in grads]), atol=1e-5)
    norms = torch.stack([torch.cat([g.reshape(-1) for g in p]).norm() for p in grads])
    assert torch.allclose(res.norm.float(), norms, rtol=1e-5)


def test_lookahead_matches_a_step_of_each_task_and_leaves_the_model_alone():
    tasks = [Task(n, "regression") for n in ("a", "b", "c")]
    model, batch = _shared_bottom(tasks), _random_batch(tasks)
    before = copy.deepcopy(model.state_dict())
    lr = 0.05
    z = lookahead_affinity(model, tasks, batch, lr)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ref = torch.empty(3, 3)
    model.eval()
    def losses(m):
        out = m(batch.inputs)
        return torch.stack([t.loss(out[t.name], batch.targets[t.name], batch.mask[t.name]) for t in tasks])
    base = losses(model)
    for i in range(3):  # the paper's definition, one deep copy and one SGD step per task
        model.shared_features = None  # a non-leaf tensor cannot be deep-copied
        m = copy.deepcopy(model)
        g = torch.autograd.grad(losses(m)[i], list(m.bottom.parameters()))
        with torch.no_grad():
            for p, gi in zip(m.bottom.parameters(), g):
                p -= lr * gi
            ref[i] = 1 - losses(m) / base
    assert torch.allclose(z, ref, atol=1e-5)


def test_monitors_as_callbacks_do_not_change_training(tmp_path):
    from polytask.train import Trainer, parse_config

    def cfg(name):
        return parse_config({"name": name, "seed": 3, "device": "cpu", "out_dir": str(tmp_path / "{name}"),
                             "data": {"name": "synthetic", "params": {"num_tasks": 3, "num_rows": 300,
                                                                      "input_dim": 8}},
                             "model": {"params": {"bottom": [8], "tower": [4], "dropout": 0.2}},
                             "train": {"epochs": 1, "batch_size": 32, "early_stopping": None}})
    plain = Trainer(cfg("plain"), progress=False)
    plain.fit()
    conflict, affinity = GradientConflictMonitor(every=2), AffinityMonitor(every=3)
    watched = Trainer(cfg("watched"), callbacks=[conflict, affinity], progress=False)
    watched.fit()
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, watched.model.state_dict()[k]), k
    steps = watched.step
    assert conflict.samples == steps // 2 and affinity.samples == steps // 3
    assert affinity.result().lr == pytest.approx(1e-3)
    run = tmp_path / "watched"
    for f in ("analysis/conflict.json", "analysis/affinity.json", "plots/conflict.png", "plots/affinity.png"):
        assert (run / f).exists(), f
    from polytask.analyze import AffinityResult, ConflictResult

    back = ConflictResult.load(run)
    assert torch.allclose(back.cosine, conflict.result().cosine, equal_nan=True)
    assert back.history.shape == (steps // 2, 3, 3)
    assert torch.allclose(AffinityResult.load(run).affinity, affinity.result().affinity)


def test_monitor_errors_are_user_errors():
    with pytest.raises(ConfigError, match="every"):
        GradientConflictMonitor(every=0)
    with pytest.raises(ConfigError, match="groups"):
        GradientConflictMonitor(groups="blocks")
    with pytest.raises(ConfigError, match="no sample"):
        AffinityMonitor().result()


# ----------------------------------------------------------------------------- grouping
def _score(a, groups):
    """Independent reading of Fifty et al.'s score: each task takes its best group's mean
    affinity from the other members (0 alone)."""
    best = {}
    for g in groups:
        for j in g:
            others = [i for i in g if i != j]
            s = sum(a[i][j] for i in others) / len(others) if others else 0.0
            best[j] = max(best.get(j, -math.inf), s)
    return sum(best.values()) if len(best) == len(a) else -math.inf


def _brute_partition(a, k):
    t = len(a)
    best = -math.inf
    for labels in itertools.product(range(k), repeat=t):
        if len(set(labels)) == k:
            best = max(best, _score(a, [[j for j in range(t) if labels[j] == c] for c in range(k)]))
    return best


def _brute_overlap(a, k):
    t = len(a)
    subsets = [s for r in range(1, t + 1) for s in itertools.combinations(range(t), r)]
    return max(_score(a, list(c)) for c in itertools.combinations(subsets, k))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("t, k", [(4, 2), (5, 2), (5, 3)])
def test_grouping_matches_brute_force(seed, t, k):
    a = torch.randn(t, t, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = a.tolist()
    part = group_tasks(a, k, overlap=False)
    assert len(part.groups) == k and sorted(sum(part.groups, [])) == sorted(part.tasks)  # a partition
    assert part.total == pytest.approx(_brute_partition(rows, k))
    assert part.total == pytest.approx(_score(rows, [[int(n[4:]) for n in g] for g in part.groups]))
    over = group_tasks(a, k, overlap=True)
    assert len({tuple(g) for g in over.groups}) == k
    assert over.total == pytest.approx(_brute_overlap(rows, k))
    assert over.total >= part.total - 1e-12


def test_greedy_recovers_clear_clusters_beyond_exact_size():
    t, clusters = 14, [list(range(0, 5)), list(range(5, 9)), list(range(9, 14))]
    a = torch.full((t, t), -0.5, dtype=torch.float64)
    for c in clusters:
        a[torch.tensor(c)[:, None], torch.tensor(c)] = 1.0
    a += 0.05 * torch.randn(t, t, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    names = [f"t{j}" for j in range(t)]
    for overlap in (False, True):
        g = group_tasks(a, 3, names, overlap=overlap)
        assert g.method == "greedy"
        assert sorted(map(sorted, g.groups)) == sorted(sorted(names[j] for j in c) for c in clusters)


def test_greedy_is_valid_and_not_better_than_exact():
    a = torch.randn(7, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for overlap in (False, True):
        exact = group_tasks(a, 3, overlap=overlap, method="exact")
        greedy = group_tasks(a, 3, overlap=overlap, method="greedy")
        assert greedy.total <= exact.total + 1e-12
        assert greedy.total == pytest.approx(grouping_score(a, [tuple(int(n[4:]) for n in g)
                                                                for g in greedy.groups])[0])


def test_grouping_rejects_bad_input():
    with pytest.raises(ConfigError, match="k must be"):
        group_tasks(torch.zeros(3, 3), 4)
    with pytest.raises(ConfigError, match="square"):
        group_tasks(torch.zeros(3, 2), 2)


# ----------------------------------------------------------------------------- rank correlation
def test_spearman_against_scipy_and_off_diagonal_agreement():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, generator=g)
    y = x + 0.5 * torch.randn(30, generator=g)
    y[3] = y[4]  # a tie
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-10)
    est = torch.randn(4, 4, generator=g)
    measured = 3 * est + 1
    measured.fill_diagonal_(float("nan"))
    assert rank_agreement(est, measured) == pytest.approx(1.0)
    assert rank_agreement(est, -measured) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- task vectors
def test_task_vector_cosine_known_directions():
    base = {"w": torch.zeros(3, 4), "b": torch.zeros(4), "steps": torch.tensor(3)}
    v = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    u = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    u -= (u * v).sum() / (v * v).sum() * v  # orthogonal to v
    models = {"same1": {"w": v, "b": torch.ones(4)}, "same2": {"w": 2 * v, "b": torch.ones(4)},
              "opposite": {"w": -v, "b": -torch.ones(4)}, "ortho": {"w": u, "b": torch.zeros(4)}}
    for m in models.values():
        m["steps"] = torch.tensor(5)
    res = task_vector_cosine(base, models)
    c = res.per_tensor["w"]
    assert c[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert c[0, 2].item() == pytest.approx(-1.0, abs=1e-6)
    assert abs(c[0, 3].item()) < 1e-6
    assert res.overall[0, 2].item() == pytest.approx(-1.0, abs=1e-6)
    assert "steps" not in res.per_tensor  # integer buffers are not task-vector entries
    with pytest.raises(MergeError, match="'w'"):
        task_vector_cosine(base, {"a": {"b": torch.ones(4)}, "c": models["same1"]})


def test_tsv_overlap_and_sti_hand_computed():
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    d1 = torch.outer(q1[:, 0], q2[:, 0])
    ortho = torch.outer(q1[:, 1], q2[:, 1])
    stacked = torch.stack([d1, ortho])
    assert subspace_overlap(stacked, 0.25)[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert singular_task_interference(stacked, 0.25).item() == pytest.approx(0.0, abs=1e-12)
    # Δ2 = 2Δ1: U = [u, ±u], Σ = diag(1, 2), V = [v, ±v]; (UᵀU−I)Σ(VᵀV−I) = diag(2, 1) -> STI = 3
    same = torch.stack([d1, 2 * d1])
    assert subspace_overlap(same, 0.25)[0, 1].item() == pytest.approx(1.0, abs=1e-12)
    assert singular_task_interference(same, 0.25).item() == pytest.approx(3.0, abs=1e-10)
    base = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    res = tsv_interference(base, {"x": {"w": d1.float(), "b": torch.ones(4)},
                                  "y": {"w": ortho.float(), "b": torch.ones(4)}}, fraction=0.25)
    assert list(res.overlap) == ["w"] and res.sti["w"] == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- experts
def test_expert_usage_over_a_split_matches_one_full_forward():
    tasks = [Task("a", "regression"), Task("b", "binary")]
    torch.manual_seed(0)
    model = MMoE(5, tasks, num_experts=3, expert=(6,), tower=(4,))
    data = MultiTaskDataset(torch.randn(50, 5), {"a": torch.randn(50), "b": (torch.rand(50) > 0.5).float()})
    usage = collect_expert_usage(model, data, batch_size=16)
    model.eval()
    with torch.no_grad():
        model(data.inputs)
    for i, t in enumerate(usage.tasks):
        assert torch.allclose(usage.mean[i], model.gate_weights[t].mean(0), atol=1e-6)
    assert torch.allclose(usage.mean.sum(1), torch.ones(2), atol=1e-5)
    with pytest.raises(ConfigError, match="gate_weights"):
        collect_expert_usage(_shared_bottom(tasks), MultiTaskDataset(torch.randn(4, 6), {"a": torch.randn(4),
                                                                                      "b": torch.ones(4)}))


# ----------------------------------------------------------------------------- measured transfer
def _fake_runs(monkeypatch, tmp_path):
    """Replace training by a table of test metrics: task j's mse is 1.0 alone, 0.8 with a cluster
    mate (a 20% gain) and 1.1 with a task of the other cluster (a 10% loss)."""
    from polytask.analyze import transfer as transfer_mod
    from polytask.train import parse_config

    cluster = {"task0": 0, "task1": 0, "task2": 1, "task3": 1}
    trained = []

    def fake_train(config, name, tasks, out_dir, epochs, progress):
        trained.append(name)
        out = {}
        for t in tasks:
            mates = [u for u in tasks if u != t]
            mse = 1.0 if not mates else (0.8 if all(cluster[u] == cluster[t] for u in mates) else 1.1)
            out[t] = {"mse": mse, "mae": mse}
        return out

    monkeypatch.setattr(transfer_mod, "_train", fake_train)
    cfg = parse_config({"data": {"name": "synthetic", "params": {"num_tasks": 4, "num_rows": 50, "input_dim": 8}}})
    return cfg, trained


def test_pairwise_transfer_gain_matrix_and_agreement(monkeypatch, tmp_path):
    from polytask.analyze import pairwise_transfer

    cfg, trained = _fake_runs(monkeypatch, tmp_path)
    res = pairwise_transfer(cfg, tmp_path)
    assert len(trained) == 4 + 6
    expected = torch.tensor([[math.nan, 20, -10, -10], [20, math.nan, -10, -10],
                             [-10, -10, math.nan, 20], [-10, -10, 20, math.nan]], dtype=torch.float64)
    assert torch.allclose(res.gain, expected, equal_nan=True)
    affinity = torch.tensor([[1.0, 0.5, -0.1, -0.2], [0.4, 1.0, -0.3, 0.0],
                             [-0.2, -0.1, 1.0, 0.6], [0.1, -0.2, 0.3, 1.0]])
    rho = rank_agreement(affinity, res.gain)
    assert rho > 0.7  # cluster mates rank above the rest
    assert rank_agreement(-affinity, res.gain) == pytest.approx(-rho)


def test_check_grouping_reports_measured_delta_m(monkeypatch, tmp_path):
    from polytask.analyze import check_grouping

    cfg, trained = _fake_runs(monkeypatch, tmp_path)
    good = group_tasks(torch.tensor([[0, 1, -1, -1], [1, 0, -1, -1], [-1, -1, 0, 1], [-1, -1, 1, 0.0]]), 2,
                       ["task0", "task1", "task2", "task3"], overlap=False)
    assert sorted(good.groups) == [["task0", "task1"], ["task2", "task3"]]
    check = check_grouping(cfg, good, tmp_path)
    assert check.measured_delta_m == pytest.approx([-20.0, -20.0])  # Δm% is a drop: gains are negative
    assert check.overall_delta_m == pytest.approx(-20.0)
    assert check.predicted == pytest.approx([2.0, 2.0])
    assert "| task0, task1 | 2 | -20.00 |" in check.table()


@pytest.mark.parametrize("arch", ["mmoe", "ple", "cross_stitch"])
def test_routed_models_batched_lookahead_equals_per_task_loop(arch, monkeypatch):
    from polytask.analyze import affinity as affinity_mod
    from polytask.nn import build_model

    tasks = [Task("a", "regression"), Task("b", "binary"), Task("c", "multiclass", num_classes=3)]
    torch.manual_seed(0)
    model = build_model(arch, 6, tasks)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(12, 6, generator=g), {"a": torch.randn(12, generator=g),
                                                   "b": (torch.rand(12, generator=g) > 0.5).float(),
                                                   "c": torch.randint(0, 3, (12,), generator=g)}, None)
    batched = lookahead_affinity(model, tasks, batch, 0.05)
    def no_vmap(*args, **kwargs):
        raise RuntimeError("vmap unavailable")
    monkeypatch.setattr(affinity_mod, "vmap", no_vmap)
    looped = lookahead_affinity(model, tasks, batch, 0.05)
    assert torch.allclose(batched, looped, atol=1e-6)
    assert (batched.diagonal() > 0).all()  # a small step on a task lowers its own loss
    conflict = gradient_conflict(model, tasks, [batch])
    assert torch.allclose(conflict.cosine.diagonal(), torch.ones(3, dtype=torch.float64))
    assert len(conflict.groups) >= 1
