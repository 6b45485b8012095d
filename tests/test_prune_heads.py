"""Pruning whole attention heads of the task-token model: HeadAttention against torch's
nn.MultiheadAttention (outputs, attention weights, torch-pruning's FLOPs count), counts against a
fresh model built at the pruned ``attention_heads`` and a hand count, dead heads removed without a
change, head importance against its definitions (L1 of the head's slices, Michel et al.'s gate
gradient), checkpoints of the nn.MultiheadAttention model, and ``polytask prune`` on a task-token run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from polytask import nn as pnn
from polytask.data.dataset import MultiTaskDataset
from polytask.errors import ConfigError
from polytask.nn.task_token import HeadAttention
from polytask.prune import apply_plan, count, importance, prunable_layers
from polytask.prune import heads
from polytask.tasks import Task

TASKS = [Task("a", "regression"), Task("b", "regression")]
PARAMS = dict(d_model=8, num_heads=4, num_layers=2, ffn=8, tower=())
COMPAT = Path(__file__).parent / "data" / "prune_compat"


def _model(seed=0, **override):
    torch.manual_seed(seed)
    return pnn.build_model("task_token", 5, TASKS, **{**PARAMS, **override}).eval()


def _headed(seed=0):
    return heads.with_head_attention(_model(seed), lambda a: _model(attention_heads=a)).eval()


@pytest.mark.parametrize("lq,lk", [(3, 3), (2, 6)])
def test_head_attention_with_every_head_is_torchs_multihead_attention(lq, lk):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    ours = HeadAttention(8, 2, 4).eval()
    ours.load_state_dict(mha.state_dict())
    q, kv = torch.randn(5, lq, 8), torch.randn(5, lk, 8)
    ref_out, ref_w = mha(q, kv, kv, need_weights=True)
    out, w = ours(q, kv, kv, need_weights=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)  # averaged over heads, as torch's
    # torch-pruning's count of nn.MultiheadAttention is our count at every head
    assert count(ours, (q, kv, kv)) == count(mha, (q, kv, kv))


def test_the_model_with_head_attention_computes_and_counts_what_the_original_does():
    model, headed = _model(seed=2), _headed(seed=2)
    x = torch.randn(6, 5)
    for t in ("a", "b"):
        torch.testing.assert_close(headed(x)[t], model(x)[t], rtol=1e-5, atol=1e-6)
    assert count(headed, (x,)) == count(model, (x,))


def test_flops_of_a_pruned_attention_match_a_hand_count():
    # d_model 8, heads of width 2, 1 head kept of 4: inner 2; query length 3, key length 5, one row
    module = HeadAttention(8, 2, 4)
    heads.prune_heads(module, [0, 2, 3])
    q, kv = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    scaling = 3 * 2
    projections = (3 + 5 + 5) * 8 * 2 + (3 + 5 + 5) * 2  # q, k, v maps 8 -> 2 and their biases
    per_head = 3 * 5 * 2 + 3 * 5 + 3 * 5 * 2  # QK^T, softmax, AV
    output = 3 * 8 * (2 + 1)  # 2 -> 8 with bias
    assert count(module, (q, kv, kv)).flops == scaling + projections + per_head + output
    assert count(module, (q, kv, kv)).params == 3 * 2 * 8 + 3 * 2 + 8 * 2 + 8


def test_pruned_heads_keep_ratio_one_and_counts_of_the_model_built_at_its_heads():
    model = _headed(seed=3)
    x = torch.randn(4, 5)
    layers = prunable_layers(model, "task_token")
    assert [(l.name, l.width) for l in layers] == [("layers.0.self_attn", 4), ("layers.0.cross_attn", 4),
                                                   ("layers.1.self_attn", 4), ("layers.1.cross_attn", 4)]
    names = [l.name for l in layers]
    same = apply_plan(model, names, {n: [0, 1, 2, 3] for n in names}, (x,))
    ref = model(x)
    assert all(torch.equal(same(x)[t], ref[t]) for t in ref)
    plan = {names[0]: [0, 2], names[1]: [3], names[3]: [0, 1, 2]}
    pruned = apply_plan(model, names, plan, (x,))
    assert heads.head_counts(pruned) == [[2, 1], [4, 3]]
    fresh = _model(attention_heads=[[2, 1], [4, 3]])
    assert count(pruned, (x,)) == count(fresh, (x,))
    assert count(pruned, (x,)).params == sum(p.numel() for p in pruned.parameters())
    # 6 heads removed (2 + 3 + 0 + 1), each 3 * (2 * 8 + 2) q/k/v parameters and 2 * 8 output weights
    assert count(model, (x,)).params - count(pruned, (x,)).params == 6 * (3 * (2 * 8 + 2) + 2 * 8)
    fresh.load_state_dict(pruned.state_dict())
    for t in ref:
        torch.testing.assert_close(fresh(x)[t], pruned(x)[t], rtol=0, atol=0)


def test_removing_dead_heads_keeps_the_outputs_and_live_ones_change_them():
    """A head whose output-projection columns are zero writes nothing: removing it (its q/k/v rows and
    those columns) leaves every output as it was; a wrong slice would remove a live head's rows."""
    model = _headed(seed=4)
    with torch.no_grad():
        model.layers[0].cross_attn.out_proj.weight[:, 2:4] = 0  # head 1 (columns 2, 3)
        model.layers[1].self_attn.out_proj.weight[:, 6:8] = 0  # head 3
    x = torch.randn(7, 5)
    ref = model(x)
    plan = {"layers.0.cross_attn": [0, 2, 3], "layers.1.self_attn": [0, 1, 2]}
    pruned = apply_plan(model, list(plan), plan, (x,))
    for t in ref:
        torch.testing.assert_close(pruned(x)[t], ref[t], rtol=1e-6, atol=1e-6)
    live = apply_plan(model, ["layers.0.cross_attn"], {"layers.0.cross_attn": [1, 2, 3]}, (x,))
    assert not torch.allclose(live(x)["a"], ref["a"], atol=1e-4)


def test_head_l1_sums_the_heads_qkv_rows_and_output_columns():
    module = HeadAttention(4, 2, 2)
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.arange(48.0).reshape(12, 4) - 20)
        module.out_proj.weight.copy_(torch.arange(16.0).reshape(4, 4) - 5)
    w, o = module.in_proj_weight.detach().abs(), module.out_proj.weight.detach().abs()
    # rows: q = 0..3, k = 4..7, v = 8..11; head 0 owns rows 0, 1 of each block and output columns 0, 1
    head0 = w[[0, 1, 4, 5, 8, 9]].sum() + o[:, [0, 1]].sum()
    head1 = w[[2, 3, 6, 7, 10, 11]].sum() + o[:, [2, 3]].sum()
    assert importance.l1([module])[0].tolist() == [head0.item(), head1.item()]


def test_head_taylor_is_the_gradient_of_a_per_row_head_gate():
    """Michel et al. (NeurIPS 2019): head importance |∂L/∂ξ_h| for a gate ξ_h on the head's output.
    Per row: gates ξ (B, heads) of ones, score_t[h] = Σ_b |∂L_t/∂ξ_bh| / B."""
    model = _headed(seed=5)
    x, ya, yb = torch.randn(10, 5), torch.randn(10), torch.randn(10)
    data = MultiTaskDataset(x, {"a": ya, "b": yb})
    layer = model.layers[1].cross_attn
    scores = importance.taylor_per_task(model, [layer], data, TASKS, rows=10, batch_size=10)[0]
    gate = torch.ones(10, 4, requires_grad=True)
    hook = layer.head_output.register_forward_hook(lambda _m, _i, out: out * gate[:, :, None, None])
    out = model(x)
    hook.remove()
    for t, (task, y) in enumerate(zip(TASKS, (ya, yb))):
        (g,) = torch.autograd.grad(task.loss(out[task.name], y, None), gate, retain_graph=True)
        torch.testing.assert_close(scores[t], g.abs().sum(0) / 10)
    assert (scores > 0).all()


def test_pagcp_and_l1_prune_heads_to_the_budget():
    from polytask.prune import PruneContext, prune_model

    model = _headed(seed=6)
    x = torch.randn(300, 5)
    with torch.no_grad():
        out = model(x)
    noise = 0.3 * torch.randn(300, 2)  # losses far from zero: a relative limit can let a head go
    data = MultiTaskDataset(x, {"a": out["a"][:, 0] + noise[:, 0], "b": out["b"][:, 0] + noise[:, 1]})
    names = [l.name for l in prunable_layers(model, "task_token")]
    ctx = PruneContext(model, names, (x[:4],), TASKS, data, data)
    for method in ("pagcp", "l1"):
        pruned = prune_model(ctx, method, 0.8)
        assert ctx.flops_ratio(pruned) <= 0.8
        assert sum(sum(p) for p in heads.head_counts(pruned)) < 16


def test_a_multihead_attention_checkpoint_loads_and_predicts_as_before():
    from safetensors.torch import load_file

    saved = load_file(COMPAT / "task_token.safetensors")  # written before attention_heads existed
    params = dict(d_model=8, num_heads=2, num_layers=1, ffn=8, tower=[2])
    model = pnn.build_model("task_token", 3, TASKS, **params).eval()
    state = {k[6:]: v for k, v in saved.items() if k.startswith("model.")}
    model.load_state_dict(state)
    assert isinstance(model.layers[0].self_attn, nn.MultiheadAttention)  # the default is unchanged
    with torch.no_grad():  # as it was written: torch's MHA takes its fast path without autograd
        out = model(saved["input"])
    for t in ("a", "b"):
        torch.testing.assert_close(out[t], saved[f"output.{t}"], rtol=0, atol=0)
    headed = pnn.build_model("task_token", 3, TASKS, **params, attention_heads=[[2, 2]]).eval()
    headed.load_state_dict(state)  # the same names: a checkpoint loads into either form
    for t in ("a", "b"):
        torch.testing.assert_close(headed(saved["input"])[t], saved[f"output.{t}"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [[[4, 4]], [[4, 0], [4, 4]], [[4, 5], [1, 1]], [[4], [4]]])
def test_attention_heads_are_checked(value):
    with pytest.raises(ConfigError, match=r"model.params.attention_heads needs one \[self, cross\] pair of head "
                                          r"counts in 1..4 per layer \(2\)"):
        _model(attention_heads=value)


def test_pruned_task_token_run_records_its_heads_and_resumes(tmp_path):
    import json

    from polytask.prune import PruneOptions, prune_run
    from polytask.prune.run import load_run
    from polytask.train import Trainer
    from polytask.train.config import load_config, parse_config
    from polytask.train.trainer import predict

    cfg = parse_config({"name": "tt", "out_dir": str(tmp_path / "tt"), "device": "cpu", "seed": 0,
                        "data": {"name": "synthetic", "params": {"num_rows": 400, "input_dim": 6}},
                        "model": {"arch": "task_token", "params": {"d_model": 8, "num_heads": 4, "num_layers": 1,
                                                                    "ffn": 8, "tower": [4]}},
                        "train": {"epochs": 2, "batch_size": 64}})
    Trainer(cfg, progress=False).fit()
    result = prune_run(tmp_path / "tt", PruneOptions("taylor", 0.85, finetune_epochs=1, out=tmp_path / "p"))
    config, splits, model = load_run(result.out_dir)
    counts = config.model.params["attention_heads"]
    assert len(counts) == 1 and sum(counts[0]) < 8
    assert heads.head_counts(model) == counts
    x = (splits.val.inputs[:1],)
    assert count(model, x).flops == result.table[1]["flops"] <= 0.85 * result.table[0]["flops"]
    assert json.loads((result.out_dir / "prune.json").read_text())["widths"] == {
        "layers.0.self_attn": counts[0][0], "layers.0.cross_attn": counts[0][1]}
    assert predict(model, splits.test, 256)["task0"].shape[0] == len(splits.test)
    resumed = Trainer(load_config(result.out_dir / "config.yaml", ["train.epochs=2"]), progress=False).fit(resume=True)
    assert [r.epoch for r in resumed.history] == [0, 1, 2]
