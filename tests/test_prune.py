"""polytask.prune: FLOPs counts against hand counts, torch-pruning surgery that changes nothing it
should not, Taylor scores against their formula, PAGCP's schedule and task-aware choice on a
hand-built model, the task floor, and ``polytask prune``'s run directories and bad input."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from polytask import nn as pnn
from polytask.data.dataset import MultiTaskDataset
from polytask.errors import ConfigError, PolytaskError
from polytask.prune import PruneContext, PruneOptions, UnreachableBudget, apply_plan, count, prune_model, prune_run
from polytask.prune import importance
from polytask.prune.pagcp import task_aware_saliency, threshold_growth
from polytask.tasks import Task

TASKS = [Task("a", "regression"), Task("b", "regression")]


# ----------------------------------------------------------------------------- FLOPs
def test_flops_and_params_of_an_mlp_match_a_hand_count():
    model = pnn.build_model("shared_bottom", 7, TASKS, bottom=(16, 8), tower=(4,))
    cost = count(model, (torch.randn(3, 7),))
    # Linear 7->16: 7*16 MACs + 16 bias; ReLU 16; Linear 16->8: 128 + 8; ReLU 8;
    # towers (2 maps) 8->4: 2*8*4 + 2*4 bias; ReLU 2*4; 4->1: 2*4 + 2 bias  => 376 per row
    assert cost.flops == 112 + 16 + 16 + 128 + 8 + 8 + 64 + 8 + 8 + 8 + 2
    assert cost.params == (7 * 16 + 16) + (16 * 8 + 8) + (2 * 8 * 4 + 2 * 4) + (2 * 4 + 2)


def test_flops_of_a_small_cnn_match_a_hand_count():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3))
    cost = count(model, (torch.randn(2, 1, 8, 8),))
    conv1 = 9 * 1 * 4 * 64 + 4 * 64  # k*k*Cin*Cout per position over 8x8 outputs, bias per output
    bn, relu1, pool = 2 * 4 * 64, 4 * 64, 4 * 64  # affine BN: 2 per element; pool: per input element
    conv2, relu2 = 9 * 4 * 6 * 16, 6 * 16  # no bias, 4x4 outputs
    linear = 96 * 3 + 3
    assert cost.flops == conv1 + bn + relu1 + pool + conv2 + relu2 + linear
    assert cost.params == (9 * 4 + 4) + 8 + 9 * 4 * 6 + (96 * 3 + 3)


class _DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(torch.cat([x["u"], x["v"], x["w"]], dim=1))


def test_flops_of_a_model_fed_a_dict_of_features_are_per_row():
    # torch-pruning takes len(first argument) as the batch: 3 for this dict; Linear 3->2 is 6 + 2 per row
    cost = count(_DictInput(), ({"u": torch.randn(5, 1), "v": torch.randn(5, 1), "w": torch.randn(5, 1)},))
    assert cost.flops == 8 and cost.params == 8


def test_pruned_model_has_the_counts_of_the_model_built_at_its_widths():
    torch.manual_seed(0)
    model = pnn.build_model("mmoe", 7, TASKS, num_experts=3, expert=(6, 5), tower=(4,))
    x = torch.randn(4, 7)
    pruned = apply_plan(model, ["experts.layers.0", "experts.layers.2"],
                        {"experts.layers.0": [1, 3, 4], "experts.layers.2": [0, 2]}, (x,))
    fresh = pnn.build_model("mmoe", 7, TASKS, num_experts=3, expert=(3, 2), tower=(4,))
    assert count(pruned, (x,)) == count(fresh, (x,))
    fresh.load_state_dict(pruned.state_dict())  # same shapes: the config's widths rebuild it
    torch.testing.assert_close(fresh(x)["a"], pruned(x)["a"])


# ----------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("arch,params,layers", [
    ("shared_bottom", dict(bottom=(16, 8), tower=(4,)), ["bottom.0", "bottom.2"]),
    ("mmoe", dict(num_experts=3, expert=(6, 5), tower=(4,)), ["experts.layers.0", "experts.layers.2"]),
    ("omoe", dict(num_experts=3, expert=(6, 5), tower=(4,)), ["experts.layers.0", "experts.layers.2"]),
])
def test_keep_ratio_one_changes_nothing(arch, params, layers):
    torch.manual_seed(0)
    model = pnn.build_model(arch, 7, TASKS, **params).eval()
    x = torch.randn(9, 7)
    widths = {n: m.weight.shape[-1] if m.weight.ndim == 3 else m.weight.shape[0]
              for n, m in model.named_modules() if n in layers}
    pruned = apply_plan(model, layers, {n: list(range(w)) for n, w in widths.items()}, (x,))
    out, ref = pruned(x), model(x)
    assert all(torch.equal(out[t], ref[t]) for t in ref)
    assert count(pruned, (x,)) == count(model, (x,))
    half = apply_plan(model, layers, {n: list(range(0, w, 2)) for n, w in widths.items()}, (x,))
    assert [p.shape for n, p in half.named_parameters() if "gate" in n] == \
        [p.shape for n, p in model.named_parameters() if "gate" in n]  # gates keep one output per expert
    assert all(half(x)[t].shape == ref[t].shape for t in ref)


def test_removing_dead_expert_units_keeps_the_outputs():
    """Units whose outgoing weights are zero in every expert carry nothing: removing them through the
    dependency graph (next expert layer's inputs, towers' inputs) must leave the outputs as they were;
    a wrong index mapping in the BatchedLinear pruner changes them."""
    torch.manual_seed(1)
    model = pnn.build_model("mmoe", 7, TASKS, num_experts=3, expert=(6, 5), tower=(4,)).eval()
    with torch.no_grad():
        model.experts.layers[2].weight[:, [0, 4], :] = 0  # hidden units 0, 4 of layer 0 feed nothing
        model.heads.towers.layers[0].weight[:, [1], :] = 0  # mixture channel 1 feeds no tower
    x = torch.randn(9, 7)
    pruned = apply_plan(model, ["experts.layers.0", "experts.layers.2"],
                        {"experts.layers.0": [1, 2, 3, 5], "experts.layers.2": [0, 2, 3, 4]}, (x,))
    assert pruned.experts.layers[0].weight.shape == (3, 7, 4)
    assert pruned.experts.layers[2].weight.shape == (3, 4, 4)
    assert pruned.heads.towers.layers[0].weight.shape == (2, 4, 4)
    assert pruned.gates.weight.shape == (2, 7, 3)  # the gates keep one output per expert
    ref = model(x)
    for t in ref:
        torch.testing.assert_close(pruned(x)[t], ref[t], rtol=1e-6, atol=1e-6)
    wrong = apply_plan(model, ["experts.layers.0"], {"experts.layers.0": [0, 1, 2, 3]}, (x,))  # unit 5 is live
    assert not torch.allclose(wrong(x)["a"], ref["a"], atol=1e-4)


# ----------------------------------------------------------------------------- PLE / CGC experts
PLE_PARAMS = {"ple": dict(num_levels=2, specific_experts=2, shared_experts=1, expert=(6, 5, 4), tower=(3,)),
              "cgc": dict(specific_experts=2, shared_experts=2, expert=(6, 4), tower=(3,))}


def _ple(arch: str, seed: int = 0, **override) -> nn.Module:
    torch.manual_seed(seed)
    return pnn.build_model(arch, 7, TASKS, **{**PLE_PARAMS[arch], **override}).eval()


def _untouched(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything but the experts' hidden layers and the layer after each: gates, towers, and the
    expert output layers' outputs (their weights lose input rows, so only their bias is compared)."""
    last = str(len(model.levels[0].specific_experts.layers) - 2)  # the last linear (a ReLU follows it)
    return {n: p for n, p in model.state_dict().items()
            if "experts" not in n or n.endswith(".bias") and n.split(".")[-2] == last}


@pytest.mark.parametrize("arch", ["cgc", "ple"])
def test_ple_expert_layers_are_the_hidden_ones_tied_over_banks_and_levels(arch):
    from polytask.prune import prunable_layers

    model = _ple(arch)
    layers = prunable_layers(model, arch)
    depths = [0, 2] if arch == "ple" else [0]  # expert (6, 5, 4): hidden 6 and 5; (6, 4): hidden 6
    assert [layer.name for layer in layers] == [f"levels.*.*_experts.layers.{d}" for d in depths]
    banks = 4 if arch == "ple" else 2  # (specific, shared) per level
    assert all(len(layer.members) == banks for layer in layers)
    with pytest.raises(ConfigError, match=r"model.params.expert: ple experts have one layer \(width 8\)"):
        prunable_layers(_ple("ple", expert=(8,)), "ple")


@pytest.mark.parametrize("arch", ["cgc", "ple"])
def test_ple_keep_ratio_one_changes_nothing_and_halving_leaves_gates_towers_and_outputs(arch):
    from polytask.prune import prunable_layers

    model = _ple(arch)
    x = torch.randn(9, 7)
    layers = prunable_layers(model, arch)
    names = [layer.name for layer in layers]
    same = apply_plan(model, names, {layer.name: list(range(layer.width)) for layer in layers}, (x,))
    ref = model(x)
    assert all(torch.equal(same(x)[t], ref[t]) for t in ref)
    assert count(same, (x,)) == count(model, (x,))
    half = apply_plan(model, names, {layer.name: list(range(0, layer.width, 2)) for layer in layers}, (x,))
    kept = _untouched(half)
    assert kept.keys() == _untouched(model).keys()
    assert all(torch.equal(kept[n], p) for n, p in _untouched(model).items())  # gates, towers, output biases
    for level in half.levels:  # the expert output width and the next level's input width stay
        for bank in (level.specific_experts, level.shared_experts):
            assert bank.layers[-2].out_features == 4 and bank.layers[0].in_features in (7, 4)
    assert count(half, (x,)).flops < count(model, (x,)).flops


@pytest.mark.parametrize("arch", ["cgc", "ple"])
def test_removing_dead_ple_units_keeps_the_outputs(arch):
    """Hidden units whose outgoing weights are zero in every expert of every bank and level feed
    nothing: removing them must leave every output as it was; a group that reached the gates or the
    next level's inputs, or a wrong index mapping, would change the outputs or the shapes."""
    model = _ple(arch, seed=3)
    with torch.no_grad():
        for level in model.levels:
            for bank in (level.specific_experts, level.shared_experts):
                bank.layers[2].weight[:, [0, 4], :] = 0  # units 0 and 4 of the first hidden layer
    x = torch.randn(11, 7)
    name = "levels.*.*_experts.layers.0"
    pruned = apply_plan(model, [name], {name: [1, 2, 3, 5]}, (x,))
    ref = model(x)
    for t in ref:
        torch.testing.assert_close(pruned(x)[t], ref[t], rtol=1e-6, atol=1e-6)
    for level in pruned.levels:
        for bank in (level.specific_experts, level.shared_experts):
            assert bank.layers[0].out_features == 4 and bank.layers[2].in_features == 4
    wrong = apply_plan(model, [name], {name: [0, 1, 2, 3]}, (x,))  # drops live unit 5, keeps dead 0
    assert not torch.allclose(wrong(x)["a"], ref["a"], atol=1e-4)


@pytest.mark.parametrize("arch", ["cgc", "ple"])
def test_pruned_ple_has_the_counts_of_the_model_built_at_its_widths(arch):
    from polytask.prune import prunable_layers

    model = _ple(arch)
    x = torch.randn(4, 7)
    names = [layer.name for layer in prunable_layers(model, arch)]
    plan = dict(zip(names, ([1, 3, 4], [0, 2])))  # ple: 6 -> 3, 5 -> 2; cgc: 6 -> 3
    pruned = apply_plan(model, names, plan, (x,))
    fresh = _ple(arch, expert=(3, 2, 4) if arch == "ple" else (3, 4))
    assert count(pruned, (x,)) == count(fresh, (x,))
    fresh.load_state_dict(pruned.state_dict())  # same shapes: the config's widths rebuild it
    torch.testing.assert_close(fresh(x)["b"], pruned(x)["b"])


def test_tied_layer_scores_sum_their_members():
    """L1: Σ over members and experts of |incoming weights|. Taylor: Σ_rows |Σ_members Σ_experts a·∂L/∂a|
    / rows (hand-computed with hooks and autograd here); a unit that feeds nothing anywhere scores exactly 0."""
    model = _ple("cgc", seed=4)
    with torch.no_grad():
        for bank in (model.levels[0].specific_experts, model.levels[0].shared_experts):
            bank.layers[2].weight[:, 3, :] = 0  # unit 3 feeds nothing
    members = [model.levels[0].specific_experts.layers[0], model.levels[0].shared_experts.layers[0]]
    l1 = importance.l1([members])[0]
    expected = sum(m.weight.detach().abs().sum((0, 1)) for m in members)
    torch.testing.assert_close(l1, expected)
    x, ya, yb = torch.randn(10, 7), torch.randn(10), torch.randn(10)
    data = MultiTaskDataset(x, {"a": ya, "b": yb})
    scores = importance.taylor_per_task(model, [members], data, TASKS, rows=10, batch_size=10)[0]
    acts = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out)) for m in members]
    out = model(x)
    for h in hooks:
        h.remove()
    for t, (task, y) in enumerate(zip(TASKS, (ya, yb))):
        grads = torch.autograd.grad(task.loss(out[task.name], y, None), acts, retain_graph=True)
        per_row = sum((a * g).sum(0) for a, g in zip(acts, grads))  # (B, C): over members and experts
        torch.testing.assert_close(scores[t], per_row.abs().sum(0).detach() / 10)
    assert (scores[:, 3] == 0).all() and (scores[:, [0, 1, 2, 4, 5]] > 0).all()


# ----------------------------------------------------------------------------- importance
def test_taylor_per_task_matches_its_formula():
    """score_t[c] = Σ_rows |z_c · relu'(z_c) · w_tc · 2 (y_t - target_t) / B| / rows for a linear head."""
    torch.manual_seed(2)
    model = pnn.build_model("shared_bottom", 5, TASKS, bottom=(6,), tower=())
    x, ya, yb = torch.randn(10, 5), torch.randn(10), torch.randn(10)
    data = MultiTaskDataset(x, {"a": ya, "b": yb})
    scores = importance.taylor_per_task(model, [model.bottom[0]], data, TASKS, rows=10, batch_size=10)[0]
    z = model.bottom[0](x).detach()
    h = z.clamp_min(0)
    w = model.heads.towers.layers[0].weight.detach()  # (2, 6, 1)
    b = model.heads.towers.layers[0].bias.detach()
    for t, y in enumerate((ya, yb)):
        pred = h @ w[t, :, 0] + b[t, 0, 0]
        g = (z > 0) * w[t, :, 0] * (2 * (pred - y) / 10).unsqueeze(1)
        torch.testing.assert_close(scores[t], (z * g).abs().sum(0) / 10)
    summed = importance.taylor_summed(model, [model.bottom[0]], data, TASKS, rows=10, batch_size=10)[0]
    preds = [h @ w[t, :, 0] + b[t, 0, 0] for t in range(2)]
    g_sum = sum((z > 0) * w[t, :, 0] * (2 * (preds[t] - y) / 10).unsqueeze(1) for t, y in enumerate((ya, yb)))
    torch.testing.assert_close(summed, (z * g_sum).abs().sum(0) / 10)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        z = self.trunk(x).mean(dim=(2, 3))
        y = self.head(z)
        return {"a": y[:, 0], "b": y[:, 1]}


def test_taylor_of_a_conv_is_taken_after_its_batch_norm():
    """Removing a filter removes its normalised channel, shift β included: the score is
    |Σ_positions y · ∂L/∂y| on the BN output y (on the conv output it would differ, β ≠ 0)."""
    torch.manual_seed(4)
    model = _ConvNet().eval()
    with torch.no_grad():
        model.trunk[1].bias.copy_(torch.tensor([0.5, -0.3, 0.2]))
        model.trunk[1].running_mean.copy_(torch.tensor([0.1, 0.0, -0.2]))
    x, ya, yb = torch.randn(6, 1, 5, 5), torch.randn(6), torch.randn(6)
    data = MultiTaskDataset(x, {"a": ya, "b": yb})
    assert importance.activation_site(model, model.trunk[0]) is model.trunk[1]
    scores = importance.taylor_per_task(model, [model.trunk[0]], data, TASKS, rows=6, batch_size=6)[0]
    y = model.trunk[1](model.trunk[0](x)).detach().requires_grad_(True)
    out = model.head(torch.relu(y).mean(dim=(2, 3)))
    for t, target in enumerate((ya, yb)):
        (g,) = torch.autograd.grad(((out[:, t] - target) ** 2).mean(), y, retain_graph=True)
        torch.testing.assert_close(scores[t], (y * g).sum((2, 3)).abs().sum(0).detach() / 6)


def test_l1_scores_sum_each_channels_incoming_weights():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.25, -0.25]]))
    bl = pnn.BatchedLinear(2, 3, 2)
    with torch.no_grad():
        bl.weight.copy_(torch.tensor([[[1.0, 0.0], [-1.0, 2.0], [0.0, 0.0]], [[0.5, 0.0], [0.0, -1.0], [1.0, 0.0]]]))
    assert importance.l1([lin])[0].tolist() == [3.5, 0.5]
    assert importance.l1([bl])[0].tolist() == [3.5, 3.0]  # both maps: |1|+|-1|+|.5|+|1| and |2|+|-1|


# ----------------------------------------------------------------------------- PAGCP pieces
def test_threshold_growth_solves_the_product_constraint():
    # two layers: (1 + 0.06)(1 + 0.06 λ) = 6  =>  λ = (6 / 1.06 - 1) / 0.06
    assert threshold_growth(0.06, 2, 6.0) == pytest.approx((6 / 1.06 - 1) / 0.06, rel=1e-9)
    lam = threshold_growth(0.06, 40, 6.0)  # many layers: growth below 1 (the code's YOLO regime)
    prod = 1.0
    for i in range(40):
        prod *= 1 + 0.06 * lam ** i
    assert prod == pytest.approx(6.0, rel=1e-9) and lam < 1
    assert threshold_growth(0.06, 1, 6.0) == 1.0


def test_task_aware_saliency_keeps_what_any_task_needs():
    per_task = torch.tensor([[10.0, 10.0, 0.0, 0.0],   # task 0: channels 0, 1 (large scale)
                             [0.0, 0.0, 0.01, 0.0]])   # task 1: channel 2 only (tiny scale)
    # shares: task 0 [.5, .5, 0, 0], task 1 [0, 0, 1, 0]; max over tasks
    assert task_aware_saliency(per_task).tolist() == [0.5, 0.5, 1.0, 0.0]
    assert task_aware_saliency(torch.zeros(2, 3)).tolist() == [0.0, 0.0, 0.0]  # no task reaches: no NaN


def _hand_model():
    """bottom: 8 units of 4 inputs. Units 0, 1 have small weights (L1 0.1) and are all task b reads
    (head weight 10); task a reads units 2, 3; units 4..7 have large weights and feed no task."""
    torch.manual_seed(3)
    model = pnn.build_model("shared_bottom", 4, TASKS, bottom=(8,), tower=()).eval()
    with torch.no_grad():
        w = torch.zeros(8, 4)
        for c in range(8):
            w[c, c % 4] = 0.1 if c < 2 else 1.0
        model.bottom[0].weight.copy_(w)
        model.bottom[0].bias.zero_()
        head = torch.zeros(2, 8, 1)
        head[0, [2, 3], 0] = 1.0
        head[1, [0, 1], 0] = 10.0
        model.heads.towers.layers[0].weight.copy_(head)
        model.heads.towers.layers[0].bias.zero_()
    x = torch.randn(400, 4)
    with torch.no_grad():
        out = model(x)
    noise = 0.01 * torch.randn(400, 2)
    data = MultiTaskDataset(x, {"a": out["a"][:, 0] + noise[:, 0], "b": out["b"][:, 0] + noise[:, 1]})
    return model, data


def _context(model, data, floor=None):
    return PruneContext(model, ["bottom.0"], (data.inputs[:4],), TASKS, data, data, floor)


def test_pagcp_keeps_the_channels_one_task_needs_where_l1_drops_them():
    model, data = _hand_model()
    # FLOPs per row with k units: 4k + k + k (linear, bias, relu) + 2k + 2 (heads) = 8k + 2: 66 at k = 8,
    # 34 at k = 4 (ratio .515), 42 at k = 5 (.636): target .55 keeps exactly 4
    kept = {}
    for method in ("pagcp", "l1"):
        ctx = _context(model, data)
        pruned = prune_model(ctx, method, 0.55)
        rows = pruned.bottom[0].weight.detach()
        assert rows.shape == (4, 4)
        kept[method] = sorted(int(torch.nonzero(r).flatten()[0]) + (0 if float(r.abs().max()) < 0.5 else 10)
                              for r in rows)
        kept[method + "_drop_b"] = ctx.drops(ctx.metrics(pruned))["b"]
    # rows with weight 0.1 are units 0, 1 (coded 0, 1); weight-1 rows coded 10 + input index
    assert kept["pagcp"] == [0, 1, 12, 13]  # units 0, 1 (task b) and 2, 3 (task a)
    assert 0 not in kept["l1"] and 1 not in kept["l1"]  # L1 keeps four weight-1 units
    assert kept["pagcp_drop_b"] < 1.0 < kept["l1_drop_b"]


def test_pagcp_counts_a_nan_loss_as_breaking_the_constraint():
    from polytask.prune import PAGCP

    model, data = _hand_model()
    ctx = _context(model, data)
    real = ctx.losses
    ctx.losses = lambda m: real(m) if m is model else torch.full((2,), float("nan"))  # every pruned copy
    with pytest.raises(UnreachableBudget, match=r"PAGCP's loss constraint in 2 rounds and 3 relaxed ones \(limits "
                                               r"up to x8\): the best reachable is flops=1\.000"):
        prune_model(ctx, PAGCP(rounds=2, relax_rounds=3), 0.55)  # no limit lets a NaN through


def _loss_one_per_removed_unit(ctx, model):
    """Every task's validation loss is 1 + the number of hidden units removed from ``model``'s 8."""
    ctx.losses = lambda m: torch.full((2,), 1.0 + 8 - m.bottom[0].weight.shape[0])


def test_pagcp_relaxes_its_limits_geometrically_when_the_authors_rounds_stall():
    from polytask.prune import PAGCP

    model, data = _hand_model()
    ctx = _context(model, data)
    _loss_one_per_removed_unit(ctx, model)
    # One layer (λ = 1). Removing one unit doubles the loss: θ_0 = .06, .12 (the two authors' rounds) and
    # .12 x 2, 4, 8 (.24, .48, .96) refuse it; x16 (θ 1.92) keeps 7 (loss 2 <= 2.92, 6 units: 3 > 2.92);
    # x32 (θ 3.84, base 2): 6, 5, 4 units give 3, 4, 5 <= 9.68 and 4 units meet .55 (FLOPs 8k + 2 of 66).
    with pytest.raises(UnreachableBudget, match=r"in 2 rounds and 0 relaxed ones \(limits up to x1\): the best "
                                               r"reachable is flops=1\.000"):
        prune_model(ctx, PAGCP(rounds=2, relax_rounds=0), 0.55)  # the authors' schedule alone: nothing goes
    pagcp = PAGCP(rounds=2)
    pruned = prune_model(ctx, pagcp, 0.55)
    assert pruned.bottom[0].weight.shape == (4, 4)
    assert pagcp.limit == {"round": 6, "theta0": pytest.approx(0.12), "scale": 32.0}
    kept = [(d["round"], d["scale"], d["kept"]) for d in pagcp.log]
    assert kept == [(0, 1.0, 8), (1, 1.0, 8), (2, 2.0, 8), (3, 4.0, 8), (4, 8.0, 8), (5, 16.0, 7), (6, 32.0, 4)]
    for d in pagcp.log:  # the (relaxed) oracle criterion held in every decision
        assert max(d["loss_ratio"]) <= 1 + d["theta"] + 1e-9
        assert d["theta"] == pytest.approx(0.12 * d["scale"] if d["round"] else 0.06)


def test_pagcp_never_relaxes_the_task_floor():
    from polytask.prune import PAGCP

    model, data = _hand_model()
    ctx = _context(model, data, floor=5.0)
    _loss_one_per_removed_unit(ctx, model)
    ctx.within_floor = lambda m: m is model  # any pruned copy breaks the floor
    with pytest.raises(UnreachableBudget, match=r"unreachable under --keep-task-floor 5: the best reachable is "
                                               r"flops=1\.000") as err:
        prune_model(ctx, PAGCP(rounds=2, relax_rounds=4), 0.55)
    assert err.value.best == 1.0


def test_random_method_is_seeded():
    model, data = _hand_model()
    ctx = _context(model, data)
    rows = {seed: prune_model(ctx, "random", 0.55, seed=seed).bottom[0].weight.detach() for seed in (0, 0, 1, 2, 3)}
    assert torch.equal(prune_model(ctx, "random", 0.55, seed=0).bottom[0].weight, rows[0])
    assert any(not torch.equal(rows[s], rows[0]) for s in (1, 2, 3))  # 70 possible choices of 4 units in 8


def test_floor_is_respected_on_validation_or_the_best_reachable_is_named():
    model, data = _hand_model()
    ctx = _context(model, data, floor=5.0)
    with pytest.raises(UnreachableBudget, match=r"unreachable with --keep-task-floor 5: the best reachable is "
                                               r"flops=1\.000") as err:
        prune_model(ctx, "l1", 0.55)  # L1's first unit to go is one of task b's (weight 0.1)
    assert err.value.best == 1.0
    pruned = prune_model(ctx, "pagcp", 0.55)
    assert max(ctx.drops(ctx.metrics(pruned)).values()) <= 5.0
    assert ctx.flops_ratio(pruned) <= 0.55


# ----------------------------------------------------------------------------- run directories and CLI
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from polytask.train import Trainer
    from polytask.train.config import parse_config

    root = tmp_path_factory.mktemp("prune")
    out = {}
    for arch, params in (("shared_bottom", {"bottom": [24, 12], "tower": [8]}),
                         ("mmoe", {"num_experts": 3, "expert": [12, 8], "tower": [8]}),
                         ("ple", {"num_levels": 2, "expert": [12, 8], "tower": [8]})):
        cfg = parse_config({"name": arch, "out_dir": str(root / arch), "device": "cpu", "seed": 0,
                            "data": {"name": "synthetic", "params": {"num_rows": 500, "input_dim": 10}},
                            "model": {"arch": arch, "params": params}, "train": {"epochs": 2, "batch_size": 64}})
        Trainer(cfg, progress=False).fit()
        out[arch] = root / arch
    return out


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch", ["shared_bottom", "mmoe", "ple"])
def test_pruned_run_loads_from_its_config_and_reports_its_counts(runs, tmp_path, arch):
    from polytask.prune.run import load_run

    before = _tree(runs[arch])
    result = prune_run(runs[arch], PruneOptions("taylor", 0.5, out=tmp_path / "p"))
    assert _tree(runs[arch]) == before
    config, splits, model = load_run(result.out_dir)  # rebuilt from the pruned widths in model.params
    pruned_row = result.table[1]
    x = (splits.val.inputs[:1],)
    assert count(model, x).params == pruned_row["params"] == sum(p.numel() for p in model.parameters())
    assert count(model, x).flops == pruned_row["flops"] <= 0.5 * result.table[0]["flops"]
    assert result.table[0]["delta_m_val"] == 0.0
    assert set(result.keep_ratios) and all(0 < r <= 1 for r in result.keep_ratios.values())
    if arch == "ple":  # each bank's hidden width is pruned, the experts' output width (8) stays
        banks = config.model.params["bank_widths"]
        assert config.model.params["expert"] == [12, 8] and sorted(banks) == ["shared", "task0", "task1"]
        assert all(len(w) == 1 and w[0] <= 12 for w in banks.values()) and min(w[0] for w in banks.values()) < 12
    assert (result.out_dir / "prune.md").read_text().count("\n") == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial left


def test_pruning_then_resuming_fine_tuning(runs, tmp_path):
    from polytask.train import Trainer
    from polytask.train.config import load_config

    result = prune_run(runs["mmoe"], PruneOptions("pagcp", 0.6, finetune_epochs=1, out=tmp_path / "p"))
    summary = json.loads((result.out_dir / "prune.json").read_text())
    decisions = summary["decisions"]
    assert any(d["kept"] < d["width"] for d in decisions)
    for d in decisions:  # the oracle criterion: no task's validation loss above (1 + θ) x its loss before the layer
        assert max(d["loss_ratio"]) <= 1 + d["theta"] + 1e-6
    last = decisions[-1]  # the limit recorded is the last round's
    assert (summary["limit"]["round"], summary["limit"]["scale"]) == (last["round"], last["scale"])
    cfg = load_config(result.out_dir / "config.yaml", ["train.epochs=2"])
    assert Path(cfg.run_dir) == result.out_dir
    resumed = Trainer(cfg, progress=False).fit(resume=True)
    assert [r.epoch for r in resumed.history] == [0, 1, 2]  # epoch 1 from the prune run, 2 resumed


def test_pagcp_prunes_ple_hidden_units_under_its_constraint(runs, tmp_path):
    from polytask.prune.run import load_run

    result = prune_run(runs["ple"], PruneOptions("pagcp", 0.7, finetune_epochs=1, out=tmp_path / "p"))
    summary = json.loads((result.out_dir / "prune.json").read_text())
    assert list(summary["widths"]) == ["levels.*.task_experts.0.layers.0", "levels.*.task_experts.1.layers.0",
                                       "levels.*.shared_experts.layers.0"]  # one tied layer per bank
    assert any(d["kept"] < d["width"] for d in summary["decisions"])
    for d in summary["decisions"]:  # the oracle criterion, on a tied layer too
        assert max(d["loss_ratio"]) <= 1 + d["theta"] + 1e-6
    config, _, model = load_run(result.out_dir)  # the fine-tuned weights load into the pruned widths
    assert config.model.params["bank_widths"] == {
        "task0": [summary["widths"]["levels.*.task_experts.0.layers.0"]],
        "task1": [summary["widths"]["levels.*.task_experts.1.layers.0"]],
        "shared": [summary["widths"]["levels.*.shared_experts.layers.0"]]}
    assert result.table[1]["flops"] <= 0.7 * result.table[0]["flops"]
    from polytask.train import Trainer
    from polytask.train.config import load_config

    resumed = Trainer(load_config(result.out_dir / "config.yaml", ["train.epochs=2"]), progress=False).fit(resume=True)
    assert [r.epoch for r in resumed.history] == [0, 1, 2]  # the banked widths resume their fine-tuning


def test_a_failure_leaves_no_output_directory(runs, tmp_path, monkeypatch):
    import polytask.prune.run as run_mod

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(run_mod, "_table", boom)
    with pytest.raises(RuntimeError):
        prune_run(runs["shared_bottom"], PruneOptions("l1", 0.5, out=tmp_path / "p"))
    assert list(tmp_path.iterdir()) == []


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from polytask import cli

    monkeypatch.setattr(sys, "argv", ["polytask", "prune", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


def _esmm_run(tmp_path: Path) -> Path:
    run = tmp_path / "esmm"
    (run / "best").mkdir(parents=True)
    (run / "config.yaml").write_text("name: e\nmodel: {arch: esmm}\n")
    (run / "best" / "model.safetensors").write_bytes(b"x")
    return run


@pytest.mark.parametrize("case,args,message", [
    ("target", ["--target", "flops=1.5"], "--target: flops must be in (0, 1)"),
    ("target0", ["--target", "flops=0"], "--target: flops must be in (0, 1)"),
    ("key", ["--target", "params=0.5"], "--target: expected flops="),
    ("floor", ["--target", "flops=0.2", "--keep-task-floor", "0", "--method", "l1"],
     "unreachable with --keep-task-floor 0: the best reachable is flops="),
    ("pagcp_floor", ["--target", "flops=0.05", "--keep-task-floor", "0", "--method", "pagcp"],
     "unreachable under --keep-task-floor 0: the best reachable is flops="),  # relaxed limits, floor kept
    ("method", ["--method", "obs"], "unknown pruning method 'obs'"),
    ("device", ["--latency-device", "tpu"], "--latency-device: unknown device 'tpu'"),
    ("epochs", ["--finetune-epochs", "-1"], "--finetune-epochs must be >= 0"),
])
def test_cli_bad_input_exits_2_and_leaves_the_run_untouched(runs, tmp_path, monkeypatch, capsys, case, args, message):
    before = _tree(runs["shared_bottom"])
    code, err = _cli(monkeypatch, capsys, runs["shared_bottom"], *args, "--out", tmp_path / "p")
    assert code == 2 and message in err and err.count("\n") == 1
    assert _tree(runs["shared_bottom"]) == before
    assert not (tmp_path / "p").exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_runs_without_a_model_and_unprunable_architectures(runs, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((runs["mmoe"] / "config.yaml").read_text())
    code, err = _cli(monkeypatch, capsys, empty)
    assert code == 2 and "has no finished model" in err and "best/model.safetensors" in err
    esmm = _esmm_run(tmp_path)
    before = _tree(esmm)
    code, err = _cli(monkeypatch, capsys, esmm)
    assert code == 2 and "cannot prune architecture 'esmm'" in err and err.count("\n") == 1
    assert _tree(esmm) == before


def test_cli_writes_the_pruned_run(runs, tmp_path, monkeypatch, capsys):
    from polytask import cli

    monkeypatch.setattr(sys, "argv", ["polytask", "prune", str(runs["mmoe"]), "--target", "flops=0.5",
                                      "--method", "random", "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "| pruned |" in out and f"pruned run directory: {tmp_path / 'p'}" in out
    assert (tmp_path / "p" / "best" / "model.safetensors").is_file()


def test_unknown_layer_and_refused_architecture_are_config_errors():
    from polytask.prune import prunable_layers

    model = pnn.build_model("shared_bottom", 4, TASKS, bottom=(8,), tower=())
    with pytest.raises(ConfigError, match="no module named 'trunk.0'"):
        prunable_layers(model, names=["trunk.0"])
    with pytest.raises(PolytaskError, match="cannot prune architecture 'esmm': its CTCVR output is the product"):
        prunable_layers(model, "esmm")


def test_benchmark_table_names_an_unreachable_budget_instead_of_averaging_it():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prune.py"
    spec = importlib.util.spec_from_file_location("_prune_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    met = {"dm": 1.0, "worst": 2.0, "flops": 0.29, "latency": 0.5, "scale": 1.0}
    cells = bench.table_cells([met, {"unreachable": 0.913}, {"unreachable": 0.5}])
    assert cells == ["unreachable (best 0.913) in 2/3 seeds", "", "", "", ""]  # the worst seed's best
    cells = bench.table_cells([met, dict(met, dm=3.0, scale=4.0)])
    assert cells == ["+2.00 ± 1.41", "+2.00 ± 0.00", "0.290 ± 0.000", "0.500 ± 0.000", "2.5"]
