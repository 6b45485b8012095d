"""Token-level task heads on the adapters path (polytask.token_tasks, train/backbone.py, data/sequences.py).

Checked against independent computations: torch's cross-entropy with ignore_index (what
transformers' token classification heads use), scikit-learn's metrics on the flattened valid
tokens, the towers applied by hand to the backbone's hidden states under the adapters API, a
Python loop over tokens for the generated tags, per-task autograd for the task features, and a
re-evaluation of a trained run's best checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from polytask import adapters, data
from polytask.errors import ConfigError, DataError
from polytask.tasks import Task
from polytask.token_tasks import IGNORE_INDEX, TokenTask

transformers = pytest.importorskip("transformers")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

from polytask.nn import build_model  # noqa: E402
from polytask.train import Trainer, evaluate, predict  # noqa: E402
from polytask.train.config import parse_config  # noqa: E402

BERT = {"model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 16, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
LLAMA = {"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 16}


def splits(**kw):
    return data.load("sequence_tasks", **{"num_tasks": 2, "num_rows": 60, "vocab_size": 40, "max_length": 8,
                                          "token_tasks": 1, **kw})


def build(tasks, method="lora", backbone=BERT, targets=("query", "value"), **kw):
    torch.manual_seed(0)
    model = build_model("adapters", None, tasks, backbone={"config": backbone}, method=method,
                        target_modules=list(targets), rank=2, **kw)
    g = torch.Generator().manual_seed(1)  # B is zero at init: random adapters make the check meaningful
    with torch.no_grad():
        for p in adapters.shared_parameters(model.backbone) + adapters.task_parameters(model.backbone):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# ------------------------------------------------------------------------------------ loss
def test_token_loss_is_cross_entropy_with_ignore_index_over_valid_tokens():
    g = torch.Generator().manual_seed(0)
    task = TokenTask("tags", "multiclass", num_classes=4)
    for scale in (1.0, 1e-8, 1e4):  # badly scaled logits too
        logits = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64) * scale).requires_grad_()
        labels = torch.randint(0, 4, (3, 5), generator=g)
        labels[0, 3:] = IGNORE_INDEX            # padding
        labels[1, 1] = IGNORE_INDEX             # a real token without a label
        rows = torch.tensor([True, True, False])  # row 2 unlabelled for this task
        loss = task.loss(logits, labels, rows)
        ref_labels = labels.clone()
        ref_labels[2] = IGNORE_INDEX
        ref = F.cross_entropy(logits.reshape(-1, 4), ref_labels.reshape(-1), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        grad, = torch.autograd.grad(loss, logits)
        ref_grad, = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
        assert grad[2].abs().sum() == 0 and grad[0, 3:].abs().sum() == 0
    # not the mean of per-sequence means: 1 valid token in row 0, 3 in row 1
    logits = torch.zeros(2, 3, 2, dtype=torch.float64)
    logits[1, :, 0] = 2.0
    labels = torch.tensor([[0, -100, -100], [0, 0, 0]])
    per_token = [F.cross_entropy(logits[0, :1], labels[0, :1]), F.cross_entropy(logits[1], labels[1])]
    assert task.loss(logits, labels) == pytest.approx(float(per_token[0] * 1 + per_token[1] * 3) / 4, rel=1e-12)


def test_binary_and_regression_token_losses_by_hand():
    out = torch.tensor([[[0.5], [-1.0], [2.0]]], dtype=torch.float64)
    binary = TokenTask("b", "binary")
    labels = torch.tensor([[1, -100, 0]])
    # (softplus(-0.5) + softplus(2.0)) / 2: BCE-with-logits of the two labelled tokens
    expect = F.softplus(torch.tensor([-0.5, 2.0], dtype=torch.float64)).mean()
    torch.testing.assert_close(binary.loss(out, labels), expect)
    reg = TokenTask("r", "regression")
    target = torch.tensor([[1.5, float("nan"), 0.0]], dtype=torch.float64)
    out = out.clone().requires_grad_()
    loss = reg.loss(out, target)
    assert float(loss.detach()) == pytest.approx(((0.5 - 1.5) ** 2 + 2.0 ** 2) / 2)  # NaN token left out
    grad, = torch.autograd.grad(loss, out)
    assert torch.isfinite(grad).all() and grad[0, 1, 0] == 0  # NaN placeholder: no NaN in the gradient


def test_a_batch_without_labelled_tokens_gives_zero_loss_and_zero_gradient():
    task = TokenTask("tags", "multiclass", num_classes=3)
    logits = torch.randn(2, 4, 3, requires_grad=True)
    for labels, rows in [(torch.full((2, 4), IGNORE_INDEX), None),
                         (torch.randint(0, 3, (2, 4)), torch.tensor([False, False]))]:
        loss = task.loss(logits, labels, rows)
        grad, = torch.autograd.grad(loss, logits)
        assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(v != v for v in task.evaluate(logits, torch.full((2, 4), IGNORE_INDEX)).values())  # NaN, no error


def test_token_target_shapes_and_pooled_outputs_are_refused():
    task = TokenTask("tags", "multiclass", num_classes=3)
    with pytest.raises(DataError, match=r"task 'tags' \(token-level multiclass\): target has shape \(4,\)"):
        task.check_target(torch.zeros(4, dtype=torch.long), rows=4)
    with pytest.raises(DataError, match="expected 4 rows"):
        task.check_target(torch.zeros(3, 2, dtype=torch.long), rows=4)
    with pytest.raises(ConfigError, match=r"task 'tags' is token-level: its output must have shape \(rows, tokens"):
        task.loss(torch.zeros(4, 3), torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ConfigError, match="must be binary, multiclass or regression"):
        TokenTask("m", "multilabel", num_classes=3)


# ------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_metrics_equal_sklearn_on_flattened_valid_tokens(seed):
    g = torch.Generator().manual_seed(seed)
    task = TokenTask("tags", "multiclass", num_classes=5)
    logits = torch.randn(7, 6, 5, generator=g)
    labels = torch.randint(0, 4, (7, 6), generator=g)        # class 4 never a label: maybe only predicted
    labels[torch.rand(7, 6, generator=g) < 0.3] = IGNORE_INDEX
    rows = torch.rand(7, generator=g) > 0.2
    got = task.evaluate(logits, labels, rows)
    valid = (labels != IGNORE_INDEX) & rows[:, None]
    y, p = labels[valid].numpy(), logits[valid].argmax(-1).numpy()
    assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, p, average="macro"), abs=1e-12)
    probs = torch.softmax(logits[valid].double(), -1).numpy()
    assert got["logloss"] == pytest.approx(sklearn_metrics.log_loss(y, probs, labels=range(5)), rel=1e-5)
    reg = TokenTask("r", "regression")
    out, target = torch.randn(7, 6, 1, generator=g), torch.randn(7, 6, generator=g)
    target[~valid] = float("nan")
    got = reg.evaluate(out, target)
    assert got["mse"] == pytest.approx(sklearn_metrics.mean_squared_error(target[valid], out[valid, 0]), rel=1e-5)


def test_macro_f1_hard_cases_against_sklearn():
    task = Task("c", "multiclass", num_classes=4, metrics=("macro_f1",))
    cases = [([0, 0, 0], [0, 0, 0]),            # one class, all right
             ([0, 1, 2, 3], [1, 1, 1, 1]),      # a predicted-only class... and three never predicted
             ([2, 2, 3], [0, 0, 0]),            # nothing right
             ([1], [3])]
    for y, p in cases:
        out = F.one_hot(torch.tensor(p), 4).float()
        got = task.evaluate(out, torch.tensor(y))["macro_f1"]
        assert got == pytest.approx(sklearn_metrics.f1_score(y, p, average="macro", zero_division=0), abs=1e-12)
    binary = TokenTask("b", "binary")
    out, y = torch.tensor([[[1.0], [-1.0], [2.0], [0.5]]]), torch.tensor([[1, 1, 0, -100]])
    assert binary.evaluate(out, y)["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score([1, 1, 0], [1, 0, 1], average="macro"))


# ------------------------------------------------------------------------------------ data
def test_generated_tags_are_the_running_key_count_and_leave_the_binary_tasks_alone():
    s = splits(num_rows=80, token_tasks=2)
    plain = data.load("sequence_tasks", num_tasks=2, num_rows=80, vocab_size=40, max_length=8)
    assert [t.name for t in s.tasks] == ["task0", "task1", "tag0", "tag1"]
    assert isinstance(s.tasks[2], TokenTask) and s.tasks[2].num_classes == 3
    for name in ("task0", "task1"):
        assert torch.equal(s.train.targets[name], plain.train.targets[name])
    # relatedness 1: every key set is the same 3 ids (tag1's set drawn beyond num_tasks too)
    one = data.load("sequence_tasks", num_tasks=1, num_rows=80, vocab_size=40, max_length=8, token_tasks=2,
                    relatedness=1.0, key_tokens=3)
    ids, mask, tags = one.train.inputs["input_ids"], one.train.inputs["attention_mask"], one.train.targets["tag0"]
    assert torch.equal(tags, one.train.targets["tag1"])
    # the key tokens are where the count goes up; the loop below checks the count at every token
    keys = {int(i) for i in ids[tags.clamp_min(0).diff(dim=1, prepend=torch.zeros(len(ids), 1, dtype=torch.long)) > 0]}
    assert len(keys) == 3
    for r in range(len(ids)):  # by hand: count key tokens up to each position, cap 2; padding -100
        seen = 0
        for i in range(ids.shape[1]):
            if mask[r, i] == 0:
                assert tags[r, i] == IGNORE_INDEX
                continue
            seen += int(ids[r, i]) in keys
            assert tags[r, i] == min(seen, 2)
    with pytest.raises(ConfigError, match="data.params.token_tasks: .*cannot be mixed"):
        splits(mixed=True)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ROWS = [{"input_ids": [5, 6, 7], "labels.tags": [0, 2, -100], "labels.sent": 1, "labels.score": [0.5, None, 1.0]},
        {"input_ids": [5, 6], "labels.tags": [1, None], "labels.sent": None, "labels.score": None},
        {"input_ids": [8, 9, 10, 11], "labels.tags": None, "labels.sent": 0, "labels.score": [1, 2, 3, 4.5]},
        {"input_ids": [3, 4], "labels.tags": [2, 1], "labels.sent": 1, "labels.score": [0.0, 1.0]}]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_token_file_table_with_per_token_label_lists(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, ROWS)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(ROWS)  # ids as a large_list of int32, as other writers store them
        table = table.set_column(0, "input_ids", table.column("input_ids").cast(pa.large_list(pa.int32())))
        pq.write_table(table, path)
    s = data.load("token_file", path=str(path), split=[0.5, 0.25, 0.25], seed=0)
    full = {t.name: t for t in s.tasks}
    assert isinstance(full["tags"], TokenTask) and full["tags"].num_classes == 3
    assert type(full["sent"]) is Task and full["sent"].kind == "binary"
    assert isinstance(full["score"], TokenTask) and full["score"].kind == "regression"
    allrows = [s.train, s.val, s.test]
    ids = torch.cat([d.inputs["input_ids"] for d in allrows])
    order = [next(i for i, r in enumerate(ROWS) if r["input_ids"] == [int(x) for x in row if x != 0]) for row in ids]
    tags = torch.cat([d.targets["tags"] for d in allrows])
    expect = {0: [0, 2, -100, -100], 1: [1, -100, -100, -100], 2: [-100] * 4, 3: [2, 1, -100, -100]}
    for row, i in zip(tags.tolist(), order):
        assert row == expect[i]
    masks = torch.cat([d.masks.get("tags", torch.ones(len(d), dtype=torch.bool)) for d in allrows])
    assert masks.tolist() == [i != 2 for i in order]  # the row with no tag list is unlabelled
    score = torch.cat([d.targets["score"] for d in allrows])
    for row, i in zip(score, order):
        given = ROWS[i]["labels.score"] or []
        want = [float("nan") if v is None else v for v in given] + [float("nan")] * (4 - len(given))
        torch.testing.assert_close(row, torch.tensor(want), equal_nan=True)


def test_label_list_length_mismatch_names_file_row_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [{"input_ids": [5, 6, 7], "labels.tags": [0, 1, 1]},
                        {"input_ids": [5, 6], "labels.tags": [1, None]},
                        {"input_ids": [5, 6], "labels.tags": [1, 0, 1]}])
    with pytest.raises(DataError, match=rf"^{path}: column 'labels.tags', row 2: 3 labels for 2 tokens \(input_ids\)"):
        data.load("token_file", path=str(path))
    tensors = tmp_path / "t.pt"
    torch.save({"input_ids": torch.ones(4, 6, dtype=torch.long), "labels.tags": torch.zeros(4, 5, dtype=torch.long)},
               tensors)
    with pytest.raises(DataError, match=r"tensor 'labels.tags' has shape \(4, 5\), input_ids \(4, 6\): a token-level"):
        data.load("token_file", path=str(tensors), tasks={"tags": {"kind": "multiclass", "level": "token"}})
    torch.save({"input_ids": torch.ones(4, 6, dtype=torch.long),
                "labels.tags": torch.tensor([[0, 1, 2, 0, 1, 2]] * 3 + [[0, 1, -1, 0, 1, 2]])}, tensors)
    with pytest.raises(DataError, match=r"tensor 'labels.tags', row 3: negative class label -1 \(classes are 0..C-1"):
        data.load("token_file", path=str(tensors))
    with pytest.raises(ConfigError, match="data.params.tasks.tags: unknown key"):
        data.load("token_file", path=str(tensors), tasks={"tags": {"kind": "multiclass", "levl": "token"}})


def test_token_file_tensors_padding_gets_no_label(tmp_path):
    ids = torch.tensor([[4, 5, 6, 0], [7, 8, 0, 0]] * 5)
    mask = (ids != 0).long()
    labels = torch.tensor([[1, 0, 2, 2], [0, 1, 1, 1]] * 5)   # the file labels padding: ignored
    torch.save({"input_ids": ids, "attention_mask": mask, "labels.tags": labels}, tmp_path / "t.pt")
    s = data.load("token_file", path=str(tmp_path / "t.pt"), split=[0.6, 0.2, 0.2])
    t = s.train.targets["tags"]
    assert (t[s.train.inputs["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert isinstance(s.tasks[0], TokenTask) and s.tasks[0].num_classes == 3


# ------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("method, backbone, pooling, targets, order", [
    ("lora", BERT, "cls", ("query", "value"), (0, 1, 2)),          # once per task: block t under task t
    ("lora", BERT, "mean", ("query", "value"), (2, 0, 1)),         # token task first: its block is 0
    ("molora", BERT, "mean", ("query", "value"), (0, 1, 2)),       # one forward for all tasks
    ("mtlora", LLAMA, "last", ("q_proj", "v_proj"), (0, 2, 1)),    # pooled blocks 0 and 2: not a slice
])
def test_token_towers_read_every_hidden_state_under_the_task(method, backbone, pooling, targets, order):
    s = splits()
    s.tasks = [s.tasks[i] for i in order]
    model = build(s.tasks, method, backbone, targets, pooling=pooling).eval()
    batch = s.train.batch(torch.arange(6))
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    out = model(batch.inputs)
    for i, task in enumerate(s.tasks):  # the plain adapters API, one task at a time
        adapters.set_task(model.backbone, i)
        adapters.set_token_mask(model.backbone, mask)
        with torch.no_grad():
            hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        if isinstance(task, TokenTask):
            layer = model.token_heads.towers.layers[0]
            expect = hidden @ layer.weight[0] + layer.bias[0]          # a linear tower on each token
            assert out[task.name].shape == (6, 8, 3)
        else:
            m = mask.double()[..., None]
            pooled = {"cls": hidden[:, 0], "mean": (hidden * m).sum(1) / m.sum(1),
                      "last": hidden[torch.arange(6), mask.sum(1) - 1]}[pooling]
            j = [t.name for t in s.tasks if not isinstance(t, TokenTask)].index(task.name)
            layer = model.heads.towers.layers[0]
            expect = pooled.float() @ layer.weight[j] + layer.bias[j]
        torch.testing.assert_close(out[task.name], expect, rtol=1e-5, atol=1e-5)
    loss = next(t for t in s.tasks if t.name == "tag0").loss(out["tag0"], batch.targets["tag0"])
    ref = F.cross_entropy(out["tag0"].reshape(-1, 3), batch.targets["tag0"].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref)
    assert (batch.targets["tag0"][mask == 0] == IGNORE_INDEX).all()  # padding carries no label


@pytest.mark.parametrize("method", ["molora", "mtlora"])
def test_task_features_give_each_task_its_own_feature_gradient(method):
    s = splits()
    model = build(s.tasks, method).expose_task_features()
    batch = s.train.batch(torch.arange(8))
    out = model(batch.inputs)
    losses = [t.loss(out[t.name], batch.targets[t.name]) for t in s.tasks]
    tf = model.task_features
    assert tf.shape == (3, 8, 8, 16)
    together, = torch.autograd.grad(sum(losses), tf, retain_graph=True)
    for i, loss in enumerate(losses):  # slice i of one backward = task i's own gradient, alone
        own, = torch.autograd.grad(loss, tf, retain_graph=True)
        torch.testing.assert_close(together[i], own[i])
        assert all(own[j].abs().sum() == 0 for j in range(3) if j != i)


@pytest.mark.parametrize("balancer", ["ew", "pcgrad", "mgda"])
def test_no_labelled_token_in_a_batch_zero_head_gradient_no_nan(balancer):
    from polytask import balance

    s = splits()
    model = build(s.tasks, "molora")
    bal = balance.get(balancer)
    from polytask.balance.engine import GradientBalancer

    gradient = isinstance(bal, GradientBalancer)
    if gradient:
        model.expose_task_features()
    batch = s.train.batch(torch.arange(8))
    targets = dict(batch.targets, tag0=torch.full_like(batch.targets["tag0"], IGNORE_INDEX))
    out = model(batch.inputs)
    losses = {t.name: t.loss(out[t.name], targets[t.name]) for t in s.tasks}
    assert float(losses["tag0"]) == 0.0
    model.zero_grad()
    extra = {"task_features": model.task_features} if gradient else {}
    bal.backward(losses, shared=model.shared_parameters(), features=model.shared_features, **extra)
    tower = model.token_heads.towers.layers[0]
    assert tower.weight.grad is None or torch.equal(tower.weight.grad, torch.zeros_like(tower.weight))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.heads.towers.layers[0].weight.grad.abs().sum() > 0  # the pooled tasks still learn


@pytest.mark.parametrize("method, params", [("molora", {"num_experts": 3, "top_k": 2}),
                                            ("smora", {"top_k": 1}),
                                            ("loramoe", {"num_experts": 4})])
def test_padding_tokens_stay_out_of_routing_statistics(method, params):
    """Padding hidden states depend on the padding ids; real tokens' do not (attention masks them):
    a balancing loss or usage that counted padding would change with them."""
    s = splits()
    model = build(s.tasks, method, method_params=params, aux_weight=1.0).eval()
    batch = s.train.batch(torch.arange(8))
    mask = batch.inputs["attention_mask"]
    assert (mask == 0).any()
    other = dict(batch.inputs, input_ids=batch.inputs["input_ids"].where(mask.bool(), torch.full_like(mask, 17)))
    with torch.no_grad():
        out = model(batch.inputs)
        aux, usage = model.aux_loss.clone(), model.gate_weights
        out2 = model(other)
        aux2, usage2 = model.aux_loss.clone(), model.gate_weights
    torch.testing.assert_close(aux, aux2)
    for name in usage:
        assert usage[name].shape[0] == int(mask.sum())  # real tokens only
        torch.testing.assert_close(usage[name], usage2[name])
    real = mask.bool()
    torch.testing.assert_close(out["tag0"][real], out2["tag0"][real])
    assert not torch.allclose(out["tag0"][~real], out2["tag0"][~real])  # padding did change: the test can fail


def test_token_task_on_an_architecture_without_token_outputs_is_refused():
    s = splits()
    with pytest.raises(ConfigError, match=r"^model.arch: task 'tag0' is token-level .* 'mmoe' gives one output"):
        build_model("mmoe", 8, s.tasks)


def test_adapters_arch_found_from_a_fresh_process_without_importing_train():
    code = ("import sys; from polytask.nn import ARCHITECTURES; assert 'polytask.train' not in sys.modules; "
            "assert 'adapters' in ARCHITECTURES; f = ARCHITECTURES.lookup('adapters'); print(f.__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "build_adapter_model"


# ------------------------------------------------------------------------------------ end to end
def _config(tmp_path, **data_params):
    return {"name": "tok", "seed": 0, "device": "cpu", "out_dir": str(tmp_path / "run"),
            "data": {"name": "sequence_tasks", "params": {"num_tasks": 1, "num_rows": 120, "vocab_size": 40,
                                                          "max_length": 8, "token_tasks": 1, **data_params}},
            "model": {"arch": "adapters", "params": {"backbone": {"config": BERT}, "method": "mtlora",
                                                     "target_modules": ["query", "value"], "rank": 2}},
            "balancer": {"name": "pcgrad"}, "optim": {"lr": 0.01}, "train": {"epochs": 2, "batch_size": 32}}


def test_cli_train_pooled_and_token_task_metrics_match_a_reevaluation(tmp_path):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path)))
    res = subprocess.run([sys.executable, "-m", "polytask.cli", "train", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "tag0" in res.stdout and "macro_f1" in res.stdout
    saved = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())
    from polytask.train.checkpoint import load_model_file, load_state_checked
    from polytask.train.config import load_config

    trainer = Trainer(load_config(tmp_path / "run" / "config.yaml"), progress=False)
    best = tmp_path / "run" / "best" / "model.safetensors"
    load_state_checked(trainer.model, load_model_file(best), best)
    again = evaluate(trainer.model, trainer.test_set, trainer.tasks, batch_size=7)  # other batches, same numbers
    for task, values in saved["test"].items():
        for metric, value in values.items():
            assert again[task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)
    out = predict(trainer.model, trainer.test_set, 5)["tag0"]
    y = trainer.test_set.targets["tag0"]
    valid = y != IGNORE_INDEX
    p = out.argmax(-1)[valid].numpy()
    assert saved["test"]["tag0"]["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y[valid], p), rel=1e-6)
    assert saved["test"]["tag0"]["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(y[valid], p, average="macro"), rel=1e-6)


def test_cli_token_task_on_a_pooled_architecture_exits_2_in_one_line(tmp_path):
    import yaml

    cfg = _config(tmp_path)
    cfg["model"] = {"arch": "mmoe", "params": {}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    _write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [5, 6, 7], "labels.tags": [0, 1]}] * 4)
    bad_data = _config(tmp_path)
    bad_data["data"] = {"name": "token_file", "params": {"path": str(tmp_path / "bad.jsonl")}}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(bad_data))
    for name, message in [("c.yaml", "model.arch: task 'tag0' is token-level"),
                          ("d.yaml", "column 'labels.tags', row 0: 2 labels for 3 tokens")]:
        res = subprocess.run([sys.executable, "-m", "polytask.cli", "train", str(tmp_path / name)],
                             capture_output=True, text=True)
        assert res.returncode == 2, res.stderr
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()


def test_checkpoint_round_trip_keeps_token_towers(tmp_path):
    s = splits()
    model = build(s.tasks, "hydralora")
    with torch.no_grad():
        model.token_heads.towers.layers[0].weight.normal_()
    state = model.state_dict()
    assert any(k.startswith("token_heads.") for k in state)
    fresh = build(s.tasks, "hydralora")
    fresh.load_state_dict(state)
    batch = s.train.batch(torch.arange(4))
    torch.testing.assert_close(fresh.eval()(batch.inputs)["tag0"], model.eval()(batch.inputs)["tag0"])


@pytest.mark.parametrize("method, copies", [("molora", True), ("molora", False), ("mtlora", False)])
def test_token_towers_and_loss_make_no_host_sync(method, copies, monkeypatch):
    """Our part of a step (towers, token losses, a loss balancer's backward) never synchronises; the
    transformers backbone itself does (its mask helpers test ``padding_mask.all()``), so it runs
    unguarded, and so does the gradient engine (which reads ``bool(ok)`` on the CPU on purpose):
    with per-task copies (a gradient balancer's path) only the forward and the losses are guarded."""
    from polytask import balance

    s = splits()
    model = build(s.tasks, method)
    bal = balance.get("ew")
    if copies:
        model.expose_task_features()
    batch = s.train.batch(torch.arange(8))

    def step():
        out = model(batch.inputs)
        losses = {t.name: t.loss(out[t.name], batch.targets[t.name], None) for t in s.tasks}
        if copies:
            assert model.task_features.shape[0] == 3
        else:
            bal.backward(losses, shared=model.shared_parameters())

    step()
    allowed = {"on": False}
    backbone_forward = model.backbone.forward

    def unguarded(*args, **kwargs):
        allowed["on"] = True
        try:
            return backbone_forward(*args, **kwargs)
        finally:
            allowed["on"] = False

    monkeypatch.setattr(model.backbone, "forward", unguarded)
    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, attr)

        def guarded(self, *args, _original=original, **kwargs):
            if not allowed["on"]:
                raise AssertionError("host synchronisation inside a training step")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, attr, guarded)
    step()


def test_tasks_from_config_level_token():
    from polytask.tasks import tasks_from_config

    tasks = tasks_from_config([{"name": "a", "kind": "binary"},
                               {"name": "t", "kind": "multiclass", "num_classes": 5, "level": "token"}])
    assert type(tasks[0]) is Task and isinstance(tasks[1], TokenTask)
    assert tasks[1].metrics == ("accuracy", "macro_f1", "logloss") and tasks[1].num_classes == 5
    with pytest.raises(ConfigError, match=r"tasks\[0\] \('t'\): level must be row or token, got 'word'"):
        tasks_from_config([{"name": "t", "kind": "binary", "level": "word"}])


def test_table_tasks_train_through_the_model_with_finite_gradients(tmp_path):
    """Rows without a list, null entries and padding (NaN / -100 placeholders) reach no gradient as NaN."""
    _write_jsonl(tmp_path / "d.jsonl", ROWS)
    s = data.load("token_file", path=str(tmp_path / "d.jsonl"), split=[0.5, 0.25, 0.25], seed=0)
    model = build(s.tasks, "molora")
    batch = s.train.full()
    out = model(batch.inputs)
    losses = {t.name: t.loss(out[t.name], batch.targets[t.name], (batch.mask or {}).get(t.name)) for t in s.tasks}
    score, y = out["score"][..., 0], batch.targets["score"]
    valid = ~torch.isnan(y)
    torch.testing.assert_close(losses["score"], ((score - y.nan_to_num()) ** 2)[valid].mean())  # masked MSE by hand
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
