"""Pruning each task's MTAN attention units (Liu, Johns, Davison, CVPR 2019: task t's g_j conv):
the per-task form computes what the grouped form does, a unit goes with its batch norm and its
task's mask-conv inputs only (a dead unit: no change; a live unit of task a: only a's prediction
changes), counts equal torch-pruning's counter on a fresh model built at the pruned widths, the
per-task Taylor score is zero for every task but the owner, old checkpoints load, and
``polytask prune`` on a digits MTAN run records ``attention_widths`` and meets its FLOPs target."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from polytask import nn as pnn
from polytask.prune import apply_plan, count, importance, prunable_layers
from polytask.prune import mtan as prune_mtan
from polytask.tasks import Task

TASKS = [Task("a", "regression"), Task("b", "regression"), Task("c", "regression")]
COMPAT = Path(__file__).parent / "data" / "prune_compat"
CHANNELS = (4, 6, 5)


def _grouped(seed: int = 0, **params):
    torch.manual_seed(seed)
    model = pnn.build_model("mtan", 2, TASKS, **{"channels": CHANNELS, "tower": (), **params}).double().eval()
    _randomise_batch_norms(model)
    return model


def _build(params: dict, tasks=TASKS, **base):
    base = {"channels": CHANNELS, "tower": (), **base}
    return pnn.build_model("mtan", 2, tasks, **{**base, **params}).double().eval()


def _per_task(seed: int = 0):
    return prune_mtan.per_task_copy(_grouped(seed), _build).eval()


def _randomise_batch_norms(model):
    """Non-trivial running statistics and affine terms, so that a batch norm left behind shows."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) * 0.1 + 0.05)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.3)


def _x(rows: int = 4, seed: int = 1):
    return torch.randn(rows, 2, 9, 9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _names(model):
    return [layer.name for layer in prunable_layers(model, "mtan")]


def test_the_per_task_form_computes_the_grouped_one_in_eval_and_in_training():
    grouped = _grouped(seed=3)
    per_task = prune_mtan.per_task_copy(grouped, _build)
    x = _x()
    ref, out = grouped(x), per_task(x)
    for t in "abc":
        torch.testing.assert_close(out[t], ref[t], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ref["a"], ref["b"])  # the tasks' attention differs: the slicing is seen
    grouped.train(), per_task.train()
    ref, out = grouped(x), per_task(x)  # batch statistics, running averages updated per channel
    for t in "abc":
        torch.testing.assert_close(out[t], ref[t], rtol=1e-10, atol=1e-10)
    stats = prune_mtan.per_task_state(grouped.state_dict(), 3)
    for key, value in per_task.state_dict().items():
        torch.testing.assert_close(value, stats[key], rtol=1e-12, atol=1e-12)


def test_every_tasks_attention_unit_is_a_prunable_layer_with_its_own_width():
    model = _per_task()
    attention = [(l.name, l.width) for l in prunable_layers(model, "mtan") if l.name.startswith("attention.")]
    assert attention == [(f"attention.{j}.tasks.{i}.0.0", c) for j, c in enumerate(CHANNELS) for i in range(3)]
    conv = model.attention[1].tasks[2][0][0]
    assert importance.activation_site(model, conv) is model.attention[1].tasks[2][0][1]  # Taylor after the BN
    assert _names(_grouped()) == prune_mtan.trunk_layer_names(_grouped())  # the grouped form: the trunk only


def test_removing_a_dead_unit_keeps_every_output_and_a_live_one_of_task_a_changes_only_a():
    model = _per_task(seed=2)
    with torch.no_grad():  # task b's unit 3 of block 1: BN scale and shift 0, so ReLU outputs 0 everywhere
        bn = model.attention[1].tasks[1][0][1]
        bn.weight[3] = 0
        bn.bias[3] = 0
        bn.running_mean[3] = 0
    x = _x()
    ref = model(x)
    dead = apply_plan(model, _names(model), {"attention.1.tasks.1.0.0": [0, 1, 2, 4, 5]}, (x,))
    task_b = dead.attention[1].tasks[1]
    assert (task_b[0][0].out_channels, task_b[0][1].num_features, task_b[1][0].in_channels) == (5, 5, 5)
    assert dead.attention[1].tasks[0][0][0].out_channels == 6  # the other tasks keep theirs
    out = dead(x)
    for t in "abc":
        torch.testing.assert_close(out[t], ref[t], rtol=1e-12, atol=1e-12)
    live = apply_plan(model, _names(model), {"attention.1.tasks.0.0.0": [0, 2, 3, 4, 5]}, (x,))(x)
    assert torch.equal(live["b"], ref["b"]) and torch.equal(live["c"], ref["c"])  # bit for bit: not a's modules
    assert not torch.allclose(live["a"], ref["a"], atol=1e-6)


def _ragged(seed: int = 7):
    """A per-task MTAN with different attention widths per task (task c's block-2 width 1)."""
    model = _per_task(seed)
    plan = {"attention.0.tasks.0.0.0": [1, 3], "attention.1.tasks.1.0.0": [0, 1, 5], "attention.2.tasks.2.0.0": [4]}
    return apply_plan(model, _names(model), plan, (_x(),))


def _grads(model, x):
    model.zero_grad()
    out = model(x)
    sum((out[t] * (i + 1)).sum() for i, t in enumerate("abc")).backward()  # every task's path
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("training", [False, True])
def test_padded_attention_equals_the_tasks_run_one_by_one(training, monkeypatch):
    """The batched forward (tasks' parameters gathered into one padded grouped conv) against the
    looped reference on ragged widths: outputs, every parameter's gradient, and in training the
    running statistics written back to each task's batch norm over three steps."""
    import copy

    from polytask.nn.mtan import TaskAttention

    batched = _ragged().train(training)
    looped = copy.deepcopy(batched)
    for block in looped.attention:  # the reference: each task's modules in turn
        block.forward = block.looped
    calls = []  # a spy: the batched model must not fall back to the loop
    monkeypatch.setattr(TaskAttention, "looped", lambda self, x: calls.append(1) or _loop(self, x))
    for step in range(3):
        x = _x(seed=10 + step)
        out, grads = _grads(batched, x)
        ref, ref_grads = _grads(looped, x)
        for t in "abc":
            torch.testing.assert_close(out[t], ref[t], rtol=1e-12, atol=1e-12)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-12)
        for (name, buf), ref_buf in zip(batched.named_buffers(), looped.buffers()):
            torch.testing.assert_close(buf, ref_buf, rtol=1e-12, atol=1e-12, msg=name)
    assert calls == []  # the batched path ran, not the loop
    assert training == (int(batched.attention[2].tasks[2][0][1].num_batches_tracked) == 3)


def _loop(block, x):
    parts = x.chunk(len(block.tasks), dim=1)
    return torch.cat([task(part) for task, part in zip(block.tasks, parts)], dim=1)


def test_padded_attention_makes_no_host_sync_and_a_hook_runs_the_tasks_modules(monkeypatch):
    model = _ragged().train()
    x = _x()
    seen = []
    handle = model.attention[1].tasks[1][0][1].register_forward_hook(lambda m, i, out: seen.append(out.shape[1]))
    model(x)
    handle.remove()
    assert seen == [3]  # the hook saw task b's own batch norm output (3 units left)

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation inside a forward")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    out = model(x)
    sum(v.sum() for v in out.values()).backward()


PLAN = {"trunk_u.0.0": [0, 2, 3], "trunk_p.1.0": [0, 2, 3, 4], "attention.0.tasks.0.0.0": [1, 3],
        "attention.1.tasks.1.0.0": [0, 1, 5], "attention.2.tasks.2.0.0": [4], "attention.2.tasks.0.0.0": [0, 1, 2]}


def test_pruned_model_has_the_counts_and_outputs_of_a_fresh_model_at_its_widths():
    import torch_pruning as tp

    model = _per_task(seed=4)
    x = _x()
    pruned = apply_plan(model, _names(model), PLAN, (x,))
    widths = prune_mtan.widths(pruned)
    assert widths["attention_channels"] is None
    assert widths["attention_widths"] == {"a": [2, 6, 3], "b": [4, 3, 5], "c": [4, 6, 1]}
    assert widths["channels"] == [4, 4, 5] and widths["u_channels"] == [3, 6, 5]
    fresh = _build(widths)
    assert count(pruned, (x,)) == count(fresh, (x,))
    flops, params = tp.utils.count_ops_and_params(fresh, x[:1])  # torch-pruning's counter, on one row
    # which does not know the towers' BatchedLinear (3 tasks' 5 -> 1 maps: 5 MACs and 1 bias each)
    assert count(pruned, (x,)).flops == flops + 3 * (5 + 1) and count(pruned, (x,)).params == params
    assert params == sum(p.numel() for p in pruned.parameters())
    fresh.load_state_dict(pruned.state_dict())  # strict: the same names and shapes
    ref = pruned(x)
    for t in "abc":
        torch.testing.assert_close(fresh(x)[t], ref[t], rtol=0, atol=0)


def test_flops_saved_by_two_attention_units_by_hand():
    """Task a's block-0 attention keeps 2 of 4 units. Per position of the 9x9 map (one row), each
    removed unit takes: its 1x1 filter over [u_0] (4 MACs) and bias (1), its batch norm (2 per
    element, as torch-pruning counts it), its ReLU (1), and one input of task a's mask conv (4
    output channels: 4 MACs). 2 units * 81 positions * (4 + 1 + 2 + 1 + 4) = 1944."""
    model = _per_task()
    x = _x()
    pruned = apply_plan(model, _names(model), {"attention.0.tasks.0.0.0": [1, 3]}, (x,))
    assert count(model, (x,)).flops - count(pruned, (x,)).flops == 2 * 81 * (4 + 1 + 2 + 1 + 4)


def test_importance_of_a_unit_belongs_to_its_task():
    from polytask.data.dataset import MultiTaskDataset

    model = _per_task(seed=5).float()
    g = torch.Generator().manual_seed(0)
    data = MultiTaskDataset(torch.randn(16, 2, 9, 9, generator=g), {t.name: torch.randn(16, generator=g)
                                                                      for t in TASKS})
    layer = prunable_layers(model, "mtan")[_names(model).index("attention.1.tasks.1.0.0")]
    per_task = importance.taylor_per_task(model, [layer.target], data, TASKS, rows=16, batch_size=8)[0]
    assert per_task.shape == (3, 6)
    assert torch.equal(per_task[0], torch.zeros(6)) and torch.equal(per_task[2], torch.zeros(6))
    assert (per_task[1] > 0).all()  # task b's loss reaches every one of its units
    conv = model.attention[1].tasks[1][0][0]  # (6, 4 + 6, 1, 1): over [u_1 ; â_0^b]
    by_hand = torch.stack([conv.weight[o].detach().abs().sum() for o in range(6)])
    torch.testing.assert_close(importance.l1([layer.target])[0], by_hand)
    # a trunk block output's L1 still adds each task's mask filter (now one conv per task)
    p_layer = prunable_layers(model, "mtan")[3]  # trunk_p.1.0
    masks = sum(task[1][0].weight.detach().abs().sum((1, 2, 3)) for task in model.attention[1].tasks)
    torch.testing.assert_close(importance.l1([p_layer.target])[0],
                               model.trunk_p[1][0].weight.detach().abs().sum((1, 2, 3)) + masks)


def test_trunk_channels_leave_the_per_task_form_as_they_leave_the_grouped_one():
    grouped = _grouped(seed=6)
    per_task = prune_mtan.per_task_copy(grouped, _build)
    x = _x()
    plan = {"trunk_u.0.0": [0, 2, 3], "trunk_p.0.0": [1, 3], "trunk_u.1.0": [0, 1, 2, 5], "trunk_p.1.0": [0, 2, 3, 4],
            "trunk_u.2.0": [1, 4], "trunk_p.2.0": [0, 1, 4]}
    a = apply_plan(grouped, list(plan), plan, (x,))
    b = apply_plan(per_task, list(plan), plan, (x,))
    ref = a(x)
    for t in "abc":
        torch.testing.assert_close(b(x)[t], ref[t], rtol=1e-12, atol=1e-12)
    assert count(a, (x,)).flops == count(b, (x,)).flops


def test_a_checkpoint_of_the_grouped_mtan_loads_in_the_per_task_form_and_predicts_as_before():
    from safetensors.torch import load_file

    saved = load_file(COMPAT / "mtan.safetensors")  # written by the MTAN before per-block widths
    state = {k[6:]: v for k, v in saved.items() if k.startswith("model.")}
    grouped = pnn.build_model("mtan", 2, TASKS[:2], channels=[3, 4], tower=[2]).eval()
    grouped.load_state_dict(state)  # the old form, unchanged by attention_widths
    per_task = pnn.build_model("mtan", 2, TASKS[:2], channels=[3, 4], tower=[2],
                               attention_widths={"a": [3, 4], "b": [3, 4]}).eval()
    per_task.load_state_dict(prune_mtan.per_task_state(state, 2))
    for model in (grouped, per_task):
        out = model(saved["input"])
        for t in ("a", "b"):
            torch.testing.assert_close(out[t], saved[f"output.{t}"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("widths,message", [
    ({"a": [4, 6, 5], "b": [4, 6, 5]}, "model.params.attention_widths needs one entry per task ['a', 'b', 'c'], "
                                       "got ['a', 'b']"),
    ({"a": [4, 6, 5], "b": [4, 0, 5], "c": [1, 1, 1]}, "model.params.attention_widths.b must be a list of positive"),
    ({"a": [4, 6], "b": [4, 6, 5], "c": [1, 1, 1]}, "model.params.attention_widths.a needs one width per block (3)"),
])
def test_bad_attention_widths_are_one_config_error(widths, message):
    from polytask.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        _build({"attention_widths": widths})
    assert message in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="give it or attention_channels, not both"):
        _build({"attention_widths": {t.name: [1, 1, 1] for t in TASKS}, "attention_channels": [4, 6, 5]})


# ----------------------------------------------------------------------------- polytask prune, end to end
def _digit_images(split=(0.6, 0.2, 0.2), seed=0):
    """scikit-learn's digits as 1x8x8 images with two of the built-in data set's tasks."""
    from polytask.data import builtin
    from polytask.data.dataset import MultiTaskDataset

    flat = builtin.load("digits", seed=seed)
    keep = [t for t in flat.tasks if t.name in ("odd", "value")]
    parts = [MultiTaskDataset(p.inputs.reshape(-1, 1, 8, 8), {t.name: p.targets[t.name] for t in keep})
             for p in (flat.train, flat.val, flat.test)]
    return builtin.Splits("digit_images", keep, *parts, 1)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from polytask.data.builtin import DATASETS
    from polytask.train import Trainer
    from polytask.train.config import parse_config

    if "digit_images" not in DATASETS.names():
        DATASETS.register("digit_images")(_digit_images)
    root = tmp_path_factory.mktemp("prune_mtan_attention")
    cfg = parse_config({"name": "mtan", "out_dir": str(root / "mtan"), "device": "cpu", "seed": 0,
                        "data": {"name": "digit_images"},
                        "model": {"arch": "mtan", "params": {"channels": [6, 8], "attention_channels": [12, 16]}},
                        "train": {"epochs": 2, "batch_size": 128}})
    Trainer(cfg, progress=False).fit()
    yield root / "mtan"


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from polytask import cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["polytask", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prunes_attention_units_to_the_flops_target(digits_run, tmp_path, monkeypatch, capsys):
    from polytask.prune.run import load_run
    from polytask.train.trainer import predict

    out_dir = tmp_path / "p"
    code, out, err = _cli(monkeypatch, capsys, "prune", digits_run, "--method", "l1", "--target", "flops=0.5",
                          "--out", out_dir)
    assert code == 0, err
    summary = json.loads((out_dir / "prune.json").read_text())
    table = summary["table"]
    assert table[1]["flops"] <= 0.5 * table[0]["flops"]
    params = yaml.safe_load((out_dir / "config.yaml").read_text())["model"]["params"]
    assert params["attention_channels"] is None
    widths = params["attention_widths"]
    assert set(widths) == {"odd", "value"} and all(len(w) == 2 for w in widths.values())
    assert all(w < full for ws in widths.values() for w, full in zip(ws, (12, 16)))  # the units were cut
    assert summary["widths"]["attention.1.tasks.0.0.0"] == widths["odd"][1]
    config, splits, model = load_run(out_dir)  # the config alone rebuilds it; the weights load strictly
    x = (splits.val.inputs[:1],)
    assert count(model, x).flops == table[1]["flops"]
    predicted = predict(model, splits.test, 256)
    assert predicted["value"].shape[0] == len(splits.test)
    from polytask.analyze.runner import AnalyzeOptions, analyze

    _, lines = analyze(out_dir, AnalyzeOptions(what=["conflict"], progress=False))  # reads the pruned run
    assert any("gradient cosine" in line and "value" in line for line in lines)
    # a config whose attention widths name no task: one line, exit 2, nothing written
    broken = tmp_path / "broken"
    shutil.copytree(out_dir, broken)
    config_yaml = yaml.safe_load((broken / "config.yaml").read_text())
    config_yaml["model"]["params"]["attention_widths"] = {"odd": widths["odd"]}
    (broken / "config.yaml").write_text(yaml.safe_dump(config_yaml))
    code, _, err = _cli(monkeypatch, capsys, "prune", broken, "--method", "l1", "--out", tmp_path / "q")
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("polytask: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "model.params.attention_widths needs one entry per task ['odd', 'value'], got ['odd']" in lines[0]
    assert not (tmp_path / "q").exists()


def test_pagcp_holds_each_attention_unit_to_its_own_task(digits_run, tmp_path):
    from polytask.prune import PruneOptions, prune_run

    result = prune_run(digits_run, PruneOptions("pagcp", 0.7, out=tmp_path / "p"))
    assert result.table[1]["flops"] <= 0.7 * result.table[0]["flops"]
    summary = json.loads((result.out_dir / "prune.json").read_text())
    attention = [d for d in summary["decisions"] if d["layer"].startswith("attention.")]
    assert attention  # PAGCP visited the tasks' attention layers
    for d in attention:
        owner = int(d["layer"].split(".")[3])
        others = [r for i, r in enumerate(d["loss_ratio"]) if i != owner]
        assert all(r <= 1.0 for r in others)  # another task's loss cannot grow: its predictions are untouched
        assert d["loss_ratio"][owner] <= 1 + d["theta"] + 1e-6
