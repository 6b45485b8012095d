"""Hand-computed checks of the architectures' equations and stated properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polytask.nn import AITM, CGC, ESMM, CrossStitch, DSelectK, MMoE, OMoE, TaskMoE, expert_usage
from polytask.nn.dselect_k import binary_codes, smooth_step
from polytask.nn.task_moe import load_balance_loss, route
from polytask.tasks import Task

TASKS = [Task("a", "binary"), Task("b", "regression"), Task("c", "multiclass", num_classes=3)]
D, B = 5, 9


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def _expert(model_bank, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of a BatchedMLP bank, computed layer by layer with plain matmuls."""
    h = x
    for layer in model_bank.layers:
        if hasattr(layer, "weight") and layer.weight.ndim == 3:
            h = h @ layer.weight[e] + layer.bias[e, 0]
        else:
            h = layer(h)
    return h


def test_mmoe_equals_the_gate_weighted_sum_of_experts():
    torch.manual_seed(0)
    model = MMoE(D, TASKS, num_experts=3, expert=(4,), tower=())
    x = _x()
    out = model(x)
    experts = [_expert(model.experts, e, x) for e in range(3)]
    for t, task in enumerate(TASKS):
        gate = torch.softmax(x @ model.gates.weight[t] + model.gates.bias[t, 0], dim=1)
        mix = sum(gate[:, e : e + 1] * experts[e] for e in range(3))
        head = model.heads.towers.layers[0]
        expected = (mix @ head.weight[t] + head.bias[t, 0])[:, : task.output_dim]
        torch.testing.assert_close(out[task.name], expected)
        torch.testing.assert_close(model.gate_weights[task.name], gate)


def test_omoe_uses_one_gate_for_all_tasks():
    torch.manual_seed(0)
    model = OMoE(D, TASKS, num_experts=3, expert=(4,))
    x = _x()
    model(x)
    gate = torch.softmax(model.gate(x), dim=1)
    mix = sum(gate[:, e : e + 1] * _expert(model.experts, e, x) for e in range(3))
    torch.testing.assert_close(model.shared_features, mix)
    assert all(torch.equal(w, gate) for w in model.gate_weights.values())


def test_cgc_task_gate_mixes_only_own_and_shared_experts():
    torch.manual_seed(0)
    model = CGC(D, TASKS, specific_experts=2, shared_experts=1, expert=(4,), tower=())
    x = _x()
    model(x)
    level = model.levels[0]
    for t in range(len(TASKS)):
        own = [_expert(level.specific_experts, 2 * t + j, x) for j in range(2)]
        shared = [_expert(level.shared_experts, 0, x)]
        gate = torch.softmax(x @ level.task_gates.weight[t] + level.task_gates.bias[t, 0], dim=1)
        mix = sum(gate[:, i : i + 1] * e for i, e in enumerate(own + shared))
        torch.testing.assert_close(model.shared_features[t], mix)


def test_cross_stitch_at_identity_is_independent_networks():
    torch.manual_seed(0)
    model = CrossStitch(D, TASKS, hidden=(6, 4), tower=(), stitch_self=1.0)
    x = _x()
    out = model(x)
    for t, task in enumerate(TASKS):
        h = x
        for layer in model.columns:
            h = torch.relu(h @ layer.weight[t] + layer.bias[t, 0])
        head = model.heads.towers.layers[0]
        torch.testing.assert_close(out[task.name], (h @ head.weight[t] + head.bias[t, 0])[:, : task.output_dim])
    # ... and task a's loss leaves the other columns untouched, until the stitches move
    out["a"].sum().backward()
    first = model.columns[0].weight.grad
    assert first[0].abs().sum() > 0 and first[1:].abs().sum() == 0
    assert model.stitches[0].grad.abs().sum() > 0  # the stitches themselves learn


def test_cross_stitch_default_init_follows_the_paper():
    model = CrossStitch(D, TASKS[:2], hidden=(4,))
    torch.testing.assert_close(model.stitches[0].data, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))


def test_esmm_ctcvr_is_ctr_times_cvr():
    torch.manual_seed(0)
    tasks = [Task("click", "binary"), Task("purchase", "binary"), Task("repurchase", "binary")]
    model = ESMM(D, tasks, tower=(8,))
    out = model(_x())
    p_ctr = torch.sigmoid(out["click"])
    p_cvr = torch.sigmoid(model.conditional_logits["purchase"])
    torch.testing.assert_close(torch.sigmoid(out["purchase"]), p_ctr * p_cvr, rtol=1e-5, atol=1e-7)
    p_next = torch.sigmoid(model.conditional_logits["repurchase"])
    torch.testing.assert_close(torch.sigmoid(out["repurchase"]), p_ctr * p_cvr * p_next, rtol=1e-5, atol=1e-7)
    assert torch.equal(model.conditional_logits["click"], out["click"])


def test_esmm_logit_is_stable_for_tiny_probabilities():
    from polytask.nn.esmm import log_sigmoid_to_logit

    logits = torch.tensor([-60.0, -5.0, 0.0, 5.0])
    torch.testing.assert_close(log_sigmoid_to_logit(F.logsigmoid(logits)), logits, rtol=1e-4, atol=1e-4)


def test_aitm_attention_and_calibrator():
    torch.manual_seed(0)
    tasks = [Task("click", "binary"), Task("buy", "binary")]
    model = AITM(D, tasks, tower=(8, 4), calibrator_weight=0.6)
    out = model(_x())
    w = model.attention_weights["buy"]
    assert w.shape == (B, 2) and torch.allclose(w.sum(1), torch.ones(B))
    p = [torch.sigmoid(out[n][:, 0]) for n in ("click", "buy")]
    torch.testing.assert_close(model.aux_loss, 0.6 * torch.relu(p[1] - p[0]).mean())


def test_smooth_step_matches_its_definition():
    gamma = 2.0
    t = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    cubic = lambda v: -2 / gamma**3 * v**3 + 3 / (2 * gamma) * v + 0.5  # noqa: E731
    expected = torch.tensor([0.0, 0.0, cubic(-0.5), 0.5, cubic(0.5), 1.0, 1.0])
    torch.testing.assert_close(smooth_step(t, gamma), expected)
    assert torch.equal(binary_codes(5).int(), torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]]))


@pytest.mark.parametrize("target", [0, 3, 6])
def test_dselect_k_binary_selector_picks_the_encoded_expert(target):
    torch.manual_seed(0)
    model = DSelectK(D, TASKS[:1], num_experts=8, k=1, gamma=1.0, expert=(4,))
    bits = [(target >> j) & 1 for j in range(3)]
    with torch.no_grad():  # z = ±1 for every row: outside [-γ/2, γ/2], so the selector is binary
        model.selectors.weight.zero_()
        model.selectors.bias.copy_(torch.tensor([[[1.0 if b else -1.0 for b in bits]]]))
    x = _x()
    model(x)
    q = model.gate_weights["a"]
    assert torch.equal(q, F.one_hot(torch.full((B,), target), 8).float())
    assert model.aux_loss == 0  # a binary selector has zero entropy
    torch.testing.assert_close(model.shared_features[0], _expert(model.experts, target, x))


def test_task_moe_topk_routing_and_balance_term():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 2.0]])
    w = route(logits, "topk", 2)
    assert ((w > 0).sum(1) == 2).all() and torch.allclose(w.sum(1), torch.ones(2))
    torch.testing.assert_close(w[0, :2], torch.softmax(torch.tensor([2.0, 1.0]), 0))
    probs = torch.softmax(logits, -1)
    f = torch.tensor([1.0, 2.0, 0.0, 1.0]) / 4  # slots: task0 -> {0,1}, task1 -> {1,3}
    torch.testing.assert_close(load_balance_loss(probs, w, "topk"), 4 * (f * probs.mean(0)).sum())
    uniform = torch.full((3, 4), 0.25)
    torch.testing.assert_close(load_balance_loss(uniform, uniform, "soft"), torch.tensor(1.0))
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 3)
    assert load_balance_loss(skewed, skewed, "soft") > 1.0


def test_task_moe_routes_per_task_not_per_example():
    torch.manual_seed(0)
    model = TaskMoE(D, TASKS, num_layers=2, num_experts=4, hidden=6, routing="topk", k=1)
    x = _x()
    out = model(x)
    for name, w in model.gate_weights.items():
        assert w.shape == (2, 4) and ((w > 0).sum(1) == 1).all()
    # with k=1 the first layer of task t is exactly its chosen expert
    e = int(model.gate_weights["a"][0].argmax())
    first = torch.relu(x @ model.weights[0][e] + model.biases[0][e])
    e2 = int(model.gate_weights["a"][1].argmax())
    second = torch.relu(first @ model.weights[1][e2] + model.biases[1][e2])
    torch.testing.assert_close(model.shared_features[0], second)
    assert set(out) == {"a", "b", "c"}


def test_expert_usage_summary_by_hand():
    gates = {"a": torch.tensor([[1.0, 0.0], [0.5, 0.5]]), "b": torch.tensor([[0.25, 0.75], [0.25, 0.75]])}
    usage = expert_usage(gates, threshold=1e-3)
    torch.testing.assert_close(usage.mean, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    torch.testing.assert_close(usage.near_zero, torch.tensor([[0.0, 0.5], [0.0, 0.0]]))
    h_b = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(usage.entropy, torch.tensor([math.log(2) / 2, h_b]))
    assert len(usage.rows()) == 4 and usage.rows()[1]["near_zero_share"] == 0.5
    # batches are concatenated; narrower gates are padded with NaN
    usage = expert_usage([{"a": gates["a"][:1], "b": torch.ones(1, 1)}, {"a": gates["a"][1:], "b": torch.ones(1, 1)}])
    torch.testing.assert_close(usage.mean[0], torch.tensor([0.75, 0.25]))
    assert torch.isnan(usage.mean[1, 1])


def test_mix_experts_paths_agree_with_einsum(monkeypatch):
    from polytask.nn import layers

    g = torch.Generator().manual_seed(0)
    w, ex = torch.rand(3, 5, 4, generator=g), torch.randn(4, 5, 6, generator=g)
    ref = torch.einsum("tbe,ebh->tbh", w, ex)
    torch.testing.assert_close(layers.mix_experts(w, ex), ref)
    torch.testing.assert_close(layers.mix_experts(w[0], ex), ref[0])
    monkeypatch.setattr(layers, "MIX_BROADCAST_LIMIT", 0)
    torch.testing.assert_close(layers.mix_experts(w, ex), ref)


def test_batched_linear_shared_input_equals_each_map():
    from polytask.nn.layers import BatchedLinear

    torch.manual_seed(0)
    layer = BatchedLinear(3, 5, 4)
    x = torch.randn(7, 5)
    expected = torch.stack([x @ layer.weight[i] + layer.bias[i] for i in range(3)])
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x.expand(3, 7, 5).contiguous()), expected)
