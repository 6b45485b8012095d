"""Pruning MTAN's trunk: the channel group (trunk conv, batch norm, next convs, every task's
attention input, mask and attended features), counts against a fresh model built at the pruned
widths, dead channels removed without a change, the coupled L1 score by hand, checkpoints of the
one-width MTAN, and ``polytask prune`` on an MTAN run (resume, predict)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polytask import nn as pnn
from polytask.prune import apply_plan, count, importance, prunable_layers
from polytask.prune import mtan as prune_mtan
from polytask.tasks import Task

TASKS = [Task("a", "regression"), Task("b", "regression"), Task("c", "regression")]
COMPAT = Path(__file__).parent / "data" / "prune_compat"


def _mtan(seed: int = 0, **params):
    torch.manual_seed(seed)
    return pnn.build_model("mtan", 2, TASKS, **{"channels": (4, 6, 5), "tower": (), **params}).eval()


def _randomise_batch_norms(model):
    """Non-trivial running statistics and affine terms, so that a BN shift left behind shows; the
    small variances undo the shrinking of the signal by the default init (the outputs vary by row)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.1 + 0.05)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)


PLAN = {"trunk_u.0.0": [0, 2, 3], "trunk_p.0.0": [1, 3], "trunk_u.1.0": [0, 1, 2, 5],
        "trunk_p.1.0": [0, 2, 3, 4], "trunk_u.2.0": [1, 4], "trunk_p.2.0": [0, 1, 4]}


def test_prunable_layers_are_both_convs_of_every_block():
    model = _mtan()
    layers = prunable_layers(model, "mtan")
    assert [(l.name, l.width) for l in layers] == [("trunk_u.0.0", 4), ("trunk_p.0.0", 4), ("trunk_u.1.0", 6),
                                                   ("trunk_p.1.0", 6), ("trunk_u.2.0", 5), ("trunk_p.2.0", 5)]
    assert importance.activation_site(model, model.trunk_p[1][0]) is model.trunk_p[1][1]  # Taylor after the BN


def test_keep_ratio_one_changes_nothing():
    model = _mtan()
    _randomise_batch_norms(model)
    x = torch.randn(3, 2, 9, 9)
    layers = prunable_layers(model, "mtan")
    same = apply_plan(model, [l.name for l in layers], {l.name: list(range(l.width)) for l in layers}, (x,))
    ref = model(x)
    assert all(torch.equal(same(x)[t], ref[t]) for t in ref)
    assert count(same, (x,)) == count(model, (x,))


def test_pruned_mtan_has_the_counts_and_outputs_of_the_model_built_at_its_widths():
    model = _mtan()
    _randomise_batch_norms(model)
    x = torch.randn(3, 2, 9, 9)
    pruned = apply_plan(model, list(PLAN), PLAN, (x,))
    widths = prune_mtan.widths(pruned)
    # p_j and u_j keep the plan's counts; the task-specific widths stay those of channels=(4, 6, 5)
    assert widths == {"channels": [2, 4, 3], "u_channels": [3, 4, 2], "attention_channels": [4, 6, 5],
                      "transfer_channels": [6, 5, 5]}
    fresh = _mtan(**widths)
    assert count(pruned, (x,)) == count(fresh, (x,))
    assert count(pruned, (x,)).params == sum(p.numel() for p in pruned.parameters())
    fresh.load_state_dict(pruned.state_dict())
    for t in ("a", "b", "c"):
        torch.testing.assert_close(fresh(x)[t], pruned(x)[t], rtol=0, atol=0)
    # a hand count of what pruning p_0 from 4 to 2 channels saves in block 0's layers (9x9 positions,
    # 3 tasks): trunk_p conv 3*3*u_0*2 MACs + 2 bias per position less, BN 2*2, ReLU 2;
    # mask conv (1x1, groups 3, 4 -> 4 per task) 3 tasks * 2 channels * (4 MACs + 1 bias), BN 2 per
    # element (the sigmoid is not counted: torch-pruning's counter counts the ReLU family only);
    # f_0 (3x3, groups 3, 6 out per task) loses 2 input channels: 3 * 6 * 9 * 2 MACs
    only_p0 = apply_plan(model, ["trunk_p.0.0"], {"trunk_p.0.0": [1, 3]}, (x,))
    block0 = 81 * ((9 * 4 * 2 + 2) + 2 * 2 + 2 + 3 * 2 * (4 + 1) + 3 * 2 * 2 + 3 * 6 * 9 * 2)
    # next block: its u conv reads 2 fewer channels of the pooled 5x5 map (6 filters of 3x3)
    block1 = 25 * 6 * 9 * 2
    # the pooling of p_0 (and of the masked features: f_0's outputs do not change) per input element
    pool = 81 * 2
    assert count(model, (x,)).flops - count(only_p0, (x,)).flops == block0 + block1 + pool


def test_removing_dead_trunk_channels_keeps_every_output_and_live_ones_change_them():
    """p_1's channel 2 feeds nothing once block 2's u conv ignores it and every task's f_1 ignores
    it; u_0's channel 1 feeds nothing once p_0's conv and every task's attention input ignore it.
    Removing them (and their BN, masks, attended features) must leave every output as it was."""
    model = _mtan(seed=2)
    _randomise_batch_norms(model)
    t = 3
    with torch.no_grad():
        model.trunk_u[2][0].weight[:, 2] = 0
        model.transfer[1][0].weight[:, 2] = 0  # in-group index 2: in every task's group
        model.trunk_p[0][0].weight[:, 1] = 0
        model.attention[0][0][0].weight[:, 1] = 0  # u_0's channels come first in each group (block 0: u only)
    x = torch.randn(4, 2, 9, 9)
    ref = model(x)
    plan = {"trunk_p.1.0": [0, 1, 3, 4, 5], "trunk_u.0.0": [0, 2, 3]}
    pruned = apply_plan(model, list(plan), plan, (x,))
    assert pruned.attention[1][1][0].out_channels == t * 5 and pruned.transfer[1][0].in_channels == t * 5
    assert pruned.attention[0][0][0].in_channels == t * 3
    for name in ref:
        torch.testing.assert_close(pruned(x)[name], ref[name], rtol=1e-5, atol=1e-5)
    live = apply_plan(model, ["trunk_p.1.0"], {"trunk_p.1.0": [0, 1, 2, 3, 4]}, (x,))  # channel 5 is live
    assert not torch.allclose(live(x)["a"], ref["a"], atol=1e-4)


def test_a_channel_goes_from_every_tasks_attention_path():
    """Channel 2 of p_1 is read by task a's attended features only (f_1's other groups ignore it)
    and not by the next block: removing it changes task a's prediction, not b's or c's, which would
    not hold if the cut reached the wrong task's group or index."""
    model = _mtan(seed=3)
    _randomise_batch_norms(model)
    w = model.transfer[1][0].weight  # (3 * 5, 6, 3, 3): task-major groups of 5 outputs
    with torch.no_grad():
        model.trunk_u[2][0].weight[:, 2] = 0
        w[5:, 2] = 0  # tasks b and c
    x = torch.randn(4, 2, 9, 9)
    ref = model(x)
    pruned = apply_plan(model, ["trunk_p.1.0"], {"trunk_p.1.0": [0, 1, 3, 4, 5]}, (x,))
    out = pruned(x)
    torch.testing.assert_close(out["b"], ref["b"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["c"], ref["c"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["a"], ref["a"], atol=1e-4)


def test_l1_of_a_block_output_channel_adds_every_tasks_mask_filter():
    model = _mtan(seed=4)
    layer = prunable_layers(model, "mtan")[3]  # trunk_p.1.0, width 6
    scores = importance.l1([layer.target])[0]
    own = model.trunk_p[1][0].weight.detach().abs().sum((1, 2, 3))
    mask = model.attention[1][1][0].weight.detach().abs().sum((1, 2, 3))  # (3 * 6,), task-major
    torch.testing.assert_close(scores, own + mask[0:6] + mask[6:12] + mask[12:18])
    u_layer = prunable_layers(model, "mtan")[2]  # u_j: no task-stacked output goes with it
    torch.testing.assert_close(importance.l1([u_layer.target])[0], model.trunk_u[1][0].weight.detach().abs()
                               .sum((1, 2, 3)))


def test_a_checkpoint_of_the_one_width_mtan_loads_and_predicts_as_before():
    from safetensors.torch import load_file

    saved = load_file(COMPAT / "mtan.safetensors")  # written by the MTAN before per-block widths
    model = pnn.build_model("mtan", 2, TASKS[:2], channels=[3, 4], tower=[2]).eval()
    model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
    out = model(saved["input"])
    for t in ("a", "b"):
        torch.testing.assert_close(out[t], saved[f"output.{t}"], rtol=0, atol=0)


def test_per_block_widths_are_checked():
    from polytask.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.params.u_channels needs one width per block \(3\), got \[4, 4\]"):
        _mtan(u_channels=[4, 4])
    with pytest.raises(ConfigError, match=r"model.params.transfer_channels must be a list of positive integers"):
        _mtan(transfer_channels=[4, 0, 2])


# ----------------------------------------------------------------------------- a pruned MTAN run
def _digit_images(split=(0.6, 0.2, 0.2), seed=0):
    """scikit-learn's digits as 1x8x8 images with two of the built-in data set's tasks."""
    from polytask.data import builtin
    from polytask.data.dataset import MultiTaskDataset

    flat = builtin.load("digits", seed=seed)
    keep = [t for t in flat.tasks if t.name in ("odd", "value")]
    parts = []
    for part in (flat.train, flat.val, flat.test):
        parts.append(MultiTaskDataset(part.inputs.reshape(-1, 1, 8, 8), {t.name: part.targets[t.name] for t in keep}))
    return builtin.Splits("digit_images", keep, *parts, 1)


@pytest.fixture(scope="module")
def mtan_run(tmp_path_factory):
    from polytask.data.builtin import DATASETS
    from polytask.train import Trainer
    from polytask.train.config import parse_config

    if "digit_images" not in DATASETS.names():
        DATASETS.register("digit_images")(_digit_images)
    root = tmp_path_factory.mktemp("prune_mtan")
    cfg = parse_config({"name": "mtan", "out_dir": str(root / "mtan"), "device": "cpu", "seed": 0,
                        "data": {"name": "digit_images"}, "model": {"arch": "mtan", "params": {"channels": [6, 8]}},
                        "train": {"epochs": 2, "batch_size": 128}})
    Trainer(cfg, progress=False).fit()
    yield root / "mtan"


def test_pruned_mtan_run_loads_resumes_and_predicts(mtan_run, tmp_path):
    import json

    from polytask.prune import PruneOptions, prune_run
    from polytask.prune.run import load_run
    from polytask.train import Trainer
    from polytask.train.config import load_config
    from polytask.train.trainer import predict

    result = prune_run(mtan_run, PruneOptions("pagcp", 0.6, finetune_epochs=1, out=tmp_path / "p"))
    config, splits, model = load_run(result.out_dir)
    params = config.model.params
    assert params["attention_channels"] is None and params["transfer_channels"] == [8, 8]
    attention = params["attention_widths"]  # each task's own widths (tests/test_prune_mtan_attention.py)
    assert set(attention) == {"odd", "value"} and all(w <= c for ws in attention.values() for w, c in zip(ws, (6, 8)))
    assert sum(params["channels"]) + sum(params["u_channels"]) + sum(map(sum, attention.values())) < 28 + 2 * 14
    x = (splits.val.inputs[:1],)
    assert count(model, x).flops == result.table[1]["flops"] <= 0.6 * result.table[0]["flops"]
    summary = json.loads((result.out_dir / "prune.json").read_text())
    for d in summary["decisions"]:  # PAGCP's per-task constraint on MTAN's layers
        assert max(d["loss_ratio"]) <= 1 + d["theta"] + 1e-6
    out = predict(model, splits.test, 256)
    assert set(out) == {"odd", "value"} and out["value"].shape[0] == len(splits.test)
    cfg = load_config(result.out_dir / "config.yaml", ["train.epochs=2"])
    resumed = Trainer(cfg, progress=False).fit(resume=True)  # the fine-tuning resumed on the pruned widths
    assert [r.epoch for r in resumed.history] == [0, 1, 2]
