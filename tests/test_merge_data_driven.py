"""Data-driven merging: Fisher merging, RegMean, AdaMerging."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polytask.errors import ConfigError
from polytask.merge.data_driven import adamerging, fisher_diagonal, fisher_merge, regmean_merge


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(seed: int, n: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=g), torch.zeros(size)) for _ in range(n)]


def test_fisher_matches_per_example_autograd():
    model = _mlp(0)
    batches = _batches(1, n=2, size=6)
    fisher = fisher_diagonal(model, batches, generator=torch.Generator().manual_seed(3))
    # brute force: same sampled labels, one backward per example
    g = torch.Generator().manual_seed(3)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for x, _ in batches:
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(model(x), -1), 1, generator=g).squeeze(1)
        for i in range(x.shape[0]):
            model.zero_grad()
            torch.log_softmax(model(x[i : i + 1]), -1)[0, y[i]].backward()
            for n, p in model.named_parameters():
                expected[n] += p.grad**2
            count += 1
    for n in expected:
        assert torch.allclose(fisher[n], expected[n] / count, atol=1e-6), n


def test_fisher_merge_weights_by_fisher():
    a, b = _mlp(0), _mlp(1)
    fa = {n: torch.ones_like(p) for n, p in a.named_parameters()}
    fb = {n: torch.ones_like(p) for n, p in b.named_parameters()}
    fb["0.weight"] = torch.zeros_like(fb["0.weight"])  # b is insensitive to these entries
    fa["2.bias"] = 3 * fa["2.bias"]
    merged = fisher_merge([a, b], [fa, fb], eps=0.0)
    assert torch.allclose(merged["0.weight"], a.state_dict()["0.weight"])
    assert torch.allclose(merged["0.bias"], (a.state_dict()["0.bias"] + b.state_dict()["0.bias"]) / 2)
    assert torch.allclose(merged["2.bias"], (3 * a.state_dict()["2.bias"] + b.state_dict()["2.bias"]) / 4)


def test_regmean_is_least_squares_over_all_tasks():
    models = [nn.Linear(6, 4) for _ in range(3)]
    for i, m in enumerate(models):
        torch.manual_seed(i)
        nn.init.normal_(m.weight)
    data = [[torch.randn(32, 6, generator=torch.Generator().manual_seed(10 + i))] for i in range(3)]
    merged = regmean_merge(models, data, alpha=1.0)
    # argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 (Grams per example: rows scaled by 1/sqrt(n_i))
    xs = torch.cat([d[0] for d in data])
    ys = torch.cat([d[0] @ m.weight.detach().T for d, m in zip(data, models)])
    expected = torch.linalg.lstsq(xs, ys).solution.T
    assert torch.allclose(merged["weight"], expected, atol=1e-4)
    # alpha = 0: only the diagonal of each Gram, i.e. a per-input-feature weighted average
    merged0 = regmean_merge(models, data, alpha=0.0)
    d = torch.stack([(x[0] ** 2).mean(0) for x in data])  # (N, in)
    w = torch.stack([m.weight.detach() for m in models])  # (N, out, in)
    assert torch.allclose(merged0["weight"], (w * d[:, None, :]).sum(0) / d.sum(0), atol=1e-5)
    assert torch.allclose(merged["bias"], torch.stack([m.bias.detach() for m in models]).mean(0))


def test_adamerging_lowers_entropy_and_keeps_coefficients_in_range():
    base = _mlp(0)
    models = []
    for seed in (1, 2):
        m = _mlp(0)
        with torch.no_grad():
            for p, q in zip(m.parameters(), _mlp(seed).parameters()):
                p.add_(0.5 * q)
        models.append(m)
    data = [_batches(5, n=2), _batches(6, n=2)]

    def entropy(state, k):
        out = torch.func.functional_call(base, state, (data[k][0][0],))
        p = torch.softmax(out, -1)
        return float(-(p * p.log()).sum(-1).mean())

    start = {n: p.detach() + 0.3 * sum(dict(m.named_parameters())[n].detach() - p.detach() for m in models)
             for n, p in base.named_parameters()}
    state, lam = adamerging(base, models, data, granularity="layer", steps=60, lr=0.05)
    assert lam.shape == (2, 4) and bool(((lam >= 0) & (lam <= 1)).all())
    assert entropy(state, 0) + entropy(state, 1) < entropy(start, 0) + entropy(start, 1)
    state_t, lam_t = adamerging(base, models, data, granularity="task", steps=5)
    assert lam_t.shape == (2,)
    with pytest.raises(ConfigError, match="granularity"):
        adamerging(base, models, data, granularity="neuron")


def test_regmean_single_model_is_identity_even_with_dead_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.rand(64, 6)
    x[:, 2] = 0.0  # an input that never varies: its weights stay as they are
    x[:, 4] = 3 * x[:, 0]  # collinear inputs make the Gram singular
    merged = regmean_merge([model], [[x]], alpha=0.9)
    for k, v in model.state_dict().items():
        assert torch.allclose(merged[k], v, atol=1e-4), k


def test_wemoe_starts_as_task_arithmetic_and_mixes_weights_per_sample():
    from polytask.merge import merge_state_dicts
    from polytask.merge.data_driven import WeightEnsemblingMoE, wemoe

    base = nn.Sequential(_mlp(0), nn.Linear(3, 2))
    models = []
    for seed in (1, 2):
        m = nn.Sequential(_mlp(0), nn.Linear(3, 2))
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p, q in zip(m.parameters(), nn.Sequential(_mlp(seed), nn.Linear(3, 2)).parameters()):
                p.add_(0.3 * q)
        models.append(m)
    data = [_batches(5, n=2), _batches(6, n=2)]
    x = data[0][0][0]
    moe_model = wemoe(base, models, data, ["0"], steps=0)
    assert isinstance(moe_model[0], WeightEnsemblingMoE)
    ta = nn.Sequential(_mlp(0), nn.Linear(3, 2))
    ta.load_state_dict(merge_state_dicts("task_arithmetic", [m.state_dict() for m in models], base.state_dict(),
                                         lambda_=0.3))
    with torch.no_grad():
        assert torch.allclose(moe_model(x), ta(x), atol=1e-5)
    # a router that depends on the input: each sample runs with its own mixed weights
    moe = moe_model[0]
    with torch.no_grad():
        nn.init.normal_(moe.router[2].weight)
        r = moe.routing(x)
        out = moe(x)
        i = 3
        mixed = _mlp(0)
        mixed.load_state_dict({k: base[0].state_dict()[k] + sum(r[i, j] * (models[j][0].state_dict()[k] - base[0].state_dict()[k])
                                                                for j in range(2)) for k in base[0].state_dict()})
        assert torch.allclose(out[i], mixed(x[i : i + 1])[0], atol=1e-5)
    trained = wemoe(base, models, data, ["0"], steps=30, lr=0.05)

    def entropy(model):
        with torch.no_grad():
            p = torch.softmax(model(x), -1)
            return float(-(p * p.log()).sum(-1).mean())

    assert entropy(trained) < entropy(moe_model)
