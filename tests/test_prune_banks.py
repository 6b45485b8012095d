"""PLE/CGC banks that keep their own widths: the banked form computes what the stacked one does,
one tied layer per bank and depth, counts against a fresh model built at the pruned ``bank_widths``,
dead units removed without a change, a bank cut alone (task a's prediction in CGC stays), PAGCP
cutting a bank whose units are dead, checkpoints of the stacked PLE, and ``bank_widths`` errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polytask import nn as pnn
from polytask.data.dataset import MultiTaskDataset
from polytask.errors import ConfigError
from polytask.prune import PruneContext, apply_plan, count, prunable_layers, prune_model
from polytask.prune import banks
from polytask.tasks import Task

TASKS = [Task("a", "regression"), Task("b", "regression")]
PARAMS = {"ple": dict(num_levels=2, specific_experts=2, shared_experts=1, expert=(6, 5, 4), tower=()),
          "cgc": dict(specific_experts=2, shared_experts=2, expert=(6, 4), tower=())}
COMPAT = Path(__file__).parent / "data" / "prune_compat"


def _build(arch, seed=0, **override):
    torch.manual_seed(seed)
    return pnn.build_model(arch, 7, TASKS, **{**PARAMS[arch], **override}).eval()


def _banked(arch, seed=0):
    return banks.banked_copy(_build(arch, seed), lambda w: _build(arch, **{"bank_widths": w})).eval()


@pytest.mark.parametrize("arch", ["cgc", "ple"])
def test_the_banked_form_computes_what_the_stacked_one_does(arch):
    stacked, banked = _build(arch, seed=1), _banked(arch, seed=1)
    x = torch.randn(9, 7)
    ref, out = stacked(x), banked(x)
    for t in ref:
        torch.testing.assert_close(out[t], ref[t], rtol=1e-6, atol=1e-6)
    assert count(banked, (x,)) == count(stacked, (x,))
    level = banked.levels[0]
    assert level.specific_experts is None and [bank.layers[0].n for bank in level.task_experts] == [2, 2]


@pytest.mark.parametrize("arch", ["cgc", "ple"])
def test_each_bank_and_depth_is_one_layer_tied_over_the_levels(arch):
    model = _banked(arch)
    depths = [0, 2] if arch == "ple" else [0]
    names = [layer.name for layer in prunable_layers(model, arch)]
    assert names == [f"levels.*.{bank}.layers.{k}" for bank in ("task_experts.0", "task_experts.1", "shared_experts")
                     for k in depths]
    levels = 2 if arch == "ple" else 1
    assert all(len(layer.members) == levels for layer in prunable_layers(model, arch))


@pytest.mark.parametrize("arch", ["cgc", "ple"])
def test_pruned_banks_have_the_counts_and_outputs_of_the_model_built_at_their_widths(arch):
    model = _banked(arch, seed=2)
    x = torch.randn(6, 7)
    layers = prunable_layers(model, arch)
    names = [layer.name for layer in layers]
    same = apply_plan(model, names, {layer.name: list(range(layer.width)) for layer in layers}, (x,))
    ref = model(x)
    assert all(torch.equal(same(x)[t], ref[t]) for t in ref)
    plan = {names[0]: [0, 1, 2], names[-1]: [3]} if arch == "cgc" else {names[0]: [0, 1, 2], names[3]: [1, 3],
                                                                         names[4]: [5]}
    pruned = apply_plan(model, names, plan, (x,))
    widths = banks.bank_widths(pruned)
    expected = {"cgc": {"a": [3], "b": [6], "shared": [1]}, "ple": {"a": [3, 5], "b": [6, 2], "shared": [1, 5]}}
    assert widths == expected[arch]
    fresh = _build(arch, bank_widths=widths)
    assert count(pruned, (x,)) == count(fresh, (x,))
    # the experts' MACs by hand (CGC): banks a 2x(7*3 + 3*4), b 2x(7*6 + 6*4), shared 2x(7*1 + 1*4)
    if arch == "cgc":
        experts = lambda m: sum(p.numel() for n, p in m.named_parameters() if "experts" in n and "weight" in n)
        assert experts(pruned) == 2 * (7 * 3 + 3 * 4) + 2 * (7 * 6 + 6 * 4) + 2 * (7 * 1 + 1 * 4)
    fresh.load_state_dict(pruned.state_dict())
    for t in ref:
        torch.testing.assert_close(fresh(x)[t], pruned(x)[t], rtol=0, atol=0)


def test_a_bank_is_cut_alone():
    """In CGC task b's specific experts feed task b's gate only: removing units of b's bank (dead ones:
    every output the same; a live one: b's output changes) never changes task a's prediction."""
    model = _banked("cgc", seed=3)
    with torch.no_grad():
        model.levels[0].task_experts[1].layers[2].weight[:, [1, 4], :] = 0  # b's units 1, 4 feed nothing
    x = torch.randn(8, 7)
    ref = model(x)
    name = "levels.*.task_experts.1.layers.0"
    dead = apply_plan(model, [name], {name: [0, 2, 3, 5]}, (x,))
    for t in ref:
        torch.testing.assert_close(dead(x)[t], ref[t], rtol=1e-6, atol=1e-6)
    live = apply_plan(model, [name], {name: [1, 2, 3, 4, 5]}, (x,))  # unit 0 is live
    torch.testing.assert_close(live(x)["a"], ref["a"], rtol=0, atol=0)
    assert not torch.allclose(live(x)["b"], ref["b"], atol=1e-4)
    assert live.levels[0].task_experts[0].layers[0].out_features == 6  # a's bank untouched
    assert live.levels[0].shared_experts.layers[0].out_features == 6


def test_pagcp_cuts_the_bank_whose_units_are_dead_harder():
    """Task a's bank has only 1 live unit of 6: PAGCP's saliency is 0 on the other 5 (removing them
    changes no loss), so that bank loses them; the other banks, whose units carry the tasks, lose
    fewer. L1's one keep ratio gives every bank the same width."""
    model = _banked("cgc", seed=4)
    with torch.no_grad():
        model.levels[0].task_experts[0].layers[2].weight[:, 1:, :] = 0
    x = torch.randn(400, 7)
    with torch.no_grad():
        out = model(x)
    data = MultiTaskDataset(x, {"a": out["a"][:, 0] + 0.01 * torch.randn(400),
                                "b": out["b"][:, 0] + 0.01 * torch.randn(400)})
    names = [layer.name for layer in prunable_layers(model, "cgc")]
    ctx = PruneContext(model, names, (x[:4],), TASKS, data, data)
    pruned = prune_model(ctx, "pagcp", 0.7)
    widths = banks.bank_widths(pruned)
    assert widths["a"] == [1]  # only the live unit stays
    assert widths["b"][0] >= 4 and widths["shared"][0] >= 4
    assert ctx.flops_ratio(pruned) <= 0.7
    uniform = banks.bank_widths(prune_model(ctx, "l1", 0.7))  # one keep ratio: every bank the same width
    assert uniform["a"] == uniform["b"] == uniform["shared"] and uniform["a"][0] > 1


def test_a_stacked_ple_checkpoint_loads_and_predicts_as_before():
    from safetensors.torch import load_file

    saved = load_file(COMPAT / "ple.safetensors")  # written by the PLE before bank_widths
    model = pnn.build_model("ple", 4, TASKS, num_levels=2, specific_experts=2, shared_experts=1, expert=[5, 3],
                            tower=[2]).eval()
    model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
    out = model(saved["input"])
    for t in ("a", "b"):
        torch.testing.assert_close(out[t], saved[f"output.{t}"], rtol=0, atol=0)
    banked = banks.banked_copy(model, lambda w: pnn.build_model(
        "ple", 4, TASKS, num_levels=2, specific_experts=2, shared_experts=1, expert=[5, 3], tower=[2], bank_widths=w))
    for t in ("a", "b"):
        torch.testing.assert_close(banked.eval()(saved["input"])[t], saved[f"output.{t}"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("widths,message", [
    ({"a": [3], "b": [3]}, r"model.params.bank_widths needs exactly the banks \['a', 'b', 'shared'\]"),
    ({"a": [3], "b": [3], "shared": [3, 2]}, r"model.params.bank_widths.shared needs one width per hidden expert "
                                              r"layer \(1: every expert width but the output's\), got \[3, 2\]"),
    ({"a": [0], "b": [3], "shared": [3]}, r"model.params.bank_widths.a must be a list of positive integers"),
    ([3, 3], r"model.params.bank_widths: expected a mapping or None, got \[3, 3\]"),
])
def test_bank_widths_are_checked(widths, message):
    with pytest.raises(ConfigError, match=message):
        _build("cgc", bank_widths=widths)
