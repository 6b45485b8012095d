"""model.arch 'adapters' (train/backbone.py), the sequence data sources and LoRAMoE.

Checked against independent computations: the model's per-task block forward against the plain
adapters API on the same backbone (one task at a time), LoRAMoE's balancing loss and mixture by
hand (Dou et al. 2024, eq. 5-9), resume against the uninterrupted run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polytask import adapters, data
from polytask.errors import CheckpointError, ConfigError, DataError

transformers = pytest.importorskip("transformers")

from polytask.train import Trainer  # noqa: E402
from polytask.train.backbone import AdapterModel, build_adapter_model  # noqa: E402
from polytask.train.config import parse_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BERT = {"model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 16, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
LLAMA = {"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 16}


def seq_splits(**kw):
    return data.load("sequence_tasks", **{"num_tasks": 2, "num_rows": 60, "vocab_size": 40, "max_length": 8, **kw})


def build(method="lora", backbone=BERT, targets=("query", "value"), tasks=None, **kw):
    torch.manual_seed(0)
    tasks = tasks or seq_splits().tasks
    return build_adapter_model(None, tasks, {"config": backbone}, method, list(targets), rank=2, **kw)


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.shared_parameters(model.backbone) + adapters.task_parameters(model.backbone):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def config(tmp_path, method="lora", epochs=2, balancer="ew", **model):
    return parse_config({
        "name": "t", "seed": 0, "device": "cpu", "out_dir": str(tmp_path / "run"),
        "data": {"name": "sequence_tasks", "params": {"num_tasks": 2, "num_rows": 120, "vocab_size": 40,
                                                      "max_length": 8}},
        "model": {"arch": "adapters", "params": {"backbone": {"config": BERT}, "method": method,
                                                 "target_modules": ["query", "value"], "rank": 2, **model}},
        "balancer": {"name": balancer}, "optim": {"lr": 0.01}, "train": {"epochs": epochs, "batch_size": 32},
    })


# ------------------------------------------------------------------------------------ data
def test_sequence_tasks_signal_is_the_key_token_count():
    s = data.load("sequence_tasks", num_tasks=3, relatedness=1.0, num_rows=400, vocab_size=40, key_tokens=4)
    ids, mask = s.train.inputs["input_ids"], s.train.inputs["attention_mask"]
    assert torch.equal(ids == 0, mask == 0)                       # padding exactly where the mask says
    assert (mask.sum(1) >= 8).all() and (mask.sum(1) <= 16).all()  # lengths in [L/2, L], max_length 16
    y = torch.stack([s.train.targets[t.name] for t in s.tasks])
    assert torch.equal(y[0], y[1]) and torch.equal(y[1], y[2])    # relatedness 1: the same key set, one task
    unrelated = data.load("sequence_tasks", num_tasks=2, relatedness=0.0, num_rows=2000, vocab_size=40)
    y = torch.stack([unrelated.train.targets[t.name] for t in unrelated.tasks])
    assert abs(torch.corrcoef(y)[0, 1]) < 0.15 and 0.35 < y.mean() < 0.65
    mixed = data.load("sequence_tasks", num_tasks=2, num_rows=100, mixed=True)
    owner = mixed.train.inputs["task_ids"]
    assert torch.equal(mixed.train.masks["task1"], owner == 1) and torch.equal(mixed.train.masks["task0"], owner == 0)
    with pytest.raises(ConfigError, match="data.params.vocab_size must be at least 17"):
        data.load("sequence_tasks", num_tasks=2, key_tokens=8, relatedness=0.0, vocab_size=10)


def test_token_file_reads_labels_masks_and_kinds(tmp_path):
    from safetensors.torch import save_file

    ids = torch.randint(1, 30, (50, 6))
    ids[:, 4:] = 0
    mask = (ids != 0).long()
    reg = torch.randn(50)
    reg[3] = float("nan")                                   # unlabelled row of a float task
    cls = torch.randint(0, 3, (50,))
    cls[7] = -100                                            # unlabelled row of an integer task
    save_file({"input_ids": ids, "attention_mask": mask, "labels.score": reg, "labels.topic": cls,
               "labels.flag": torch.randint(0, 2, (50,))}, str(tmp_path / "d.safetensors"))
    s = data.load("token_file", path=str(tmp_path / "d.safetensors"), split=[0.6, 0.2, 0.2])
    kinds = {t.name: t.kind for t in s.tasks}
    assert kinds == {"score": "regression", "topic": "multiclass", "flag": "binary"}
    allrows = torch.cat([getattr(s, p).masks["score"] for p in ("train", "val", "test")])
    assert int((~allrows).sum()) == 1 and int((~torch.cat([getattr(s, p).masks["topic"] for p in
                                                          ("train", "val", "test")])).sum()) == 1
    assert "flag" not in s.train.masks
    torch.save({"input_ids": ids, "labels.flag": torch.ones(49)}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="tensor 'labels.flag' has 49 rows, input_ids 50"):
        data.load("token_file", path=str(tmp_path / "bad.pt"))
    with pytest.raises(DataError, match="no tensor 'labels.nope'"):
        data.load("token_file", path=str(tmp_path / "d.safetensors"), tasks={"nope": "binary"})
    (tmp_path / "torn.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="torn.pt: cannot read tensors"):
        data.load("token_file", path=str(tmp_path / "torn.pt"))


# ------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("method,pooling", [("lora", "cls"), ("mtlora", "mean")])
def test_block_forward_equals_one_task_at_a_time_through_the_adapters_api(method, pooling):
    model = build(method, pooling=pooling).eval()
    randomize(model)
    s = seq_splits()
    batch = s.train.batch(torch.arange(5))
    out = model(batch.inputs)
    assert model.task_features.shape == (2, 5, 16)                # the towers read one block each
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    for t, name in enumerate(model.task_names):                   # independent: set the task, run the backbone
        with adapters.task_context(model.backbone, name):
            h = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = h[:, 0] if pooling == "cls" else (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        w, b = model.heads.towers.layers[0].weight[t], model.heads.towers.layers[0].bias[t]
        assert torch.allclose(out[name], pooled @ w + b, atol=1e-5)
    assert not torch.allclose(out[model.task_names[0]], out[model.task_names[1]])


def test_mixed_task_ids_run_each_row_once_under_its_own_task():
    model = build("lora").eval()
    randomize(model)
    s = seq_splits(mixed=True)
    batch = s.train.batch(torch.arange(6))
    owner = batch.inputs["task_ids"]
    out = model(batch.inputs)
    assert model.shared_features.shape == (6, 16)                 # one forward of the 6 rows
    full = model({k: v for k, v in batch.inputs.items() if k != "task_ids"})     # every row under every task
    for i in range(6):
        name = model.task_names[int(owner[i])]
        assert torch.allclose(out[name][i], full[name][i], atol=1e-5)
    assert model.shared_features.shape == (2, 6, 16)


def test_last_token_pooling_on_a_llama_backbone_reads_the_last_real_token():
    model = build("hydralora", backbone=LLAMA, targets=("q_proj", "v_proj"), method_params={"num_experts": 2},
                  pooling="last").eval()
    ids = torch.randint(1, 40, (3, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    model({"input_ids": ids * mask, "attention_mask": mask})
    h = model.backbone(input_ids=ids * mask, attention_mask=mask).last_hidden_state
    assert torch.allclose(model.shared_features, h[torch.arange(3), torch.tensor([5, 2, 0])], atol=1e-6)


def test_parameters_split_shared_task_and_frozen():
    model = build("mtlora")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    shared = {id(p) for p in model.shared_parameters()}
    specific = {id(p) for p in model.task_specific_parameters()}
    assert shared and specific and not shared & specific and shared | specific == trainable
    assert all(not p.requires_grad for n, p in model.backbone.named_parameters() if ".base." in n
               or "embeddings" in n)
    lora = build("lora")
    assert lora.shared_parameters() == []                    # one LoRA per task: nothing shared to balance


def test_checkpoint_holds_adapters_and_towers_not_the_backbone_and_refuses_another_backbone():
    model = build("molora", method_params={"num_experts": 2, "top_k": 1})
    state = model.state_dict()
    assert "backbone_digest" in state and not any(".base." in k or "embeddings" in k for k in state)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(state)
    randomize(model)
    again = build("molora", method_params={"num_experts": 2, "top_k": 1})
    again.load_state_dict(model.state_dict())
    x = seq_splits().train.batch(torch.arange(4)).inputs
    assert torch.allclose(model.eval()(x)["task0"], again.eval()(x)["task0"])
    torch.manual_seed(5)                                      # another random backbone: refused by its digest
    other = build_adapter_model(None, seq_splits().tasks, {"config": {**BERT, "hidden_size": 16}}, "molora",
                                ["query", "value"], rank=2, method_params={"num_experts": 2, "top_k": 1})
    with pytest.raises(CheckpointError, match="backbone_digest: .*different backbone"):
        other.load_state_dict(model.state_dict())


def test_routed_model_gate_weights_per_task_skip_padding():
    model = build("molora", method_params={"num_experts": 2, "top_k": 1}).eval()
    assert hasattr(model, "gate_weights") and not hasattr(build("lora"), "gate_weights")
    ids = torch.randint(1, 40, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    model({"input_ids": ids, "attention_mask": mask, "task_ids": torch.tensor([1, 0])})
    gates = model.gate_weights
    assert gates["task1"].shape == (3, 2) and gates["task0"].shape == (5, 2)   # real tokens of each task's rows
    layers = [m.gate_weights for m in adapters.adapter_layers(model.backbone).values()]
    mean = torch.stack(layers).mean(0)
    assert torch.allclose(gates["task1"], mean[:3]) and torch.allclose(gates["task0"], mean[5:])


# ------------------------------------------------------------------------------------ LoRAMoE
def test_localized_balancing_loss_by_hand():
    # 2 experts in groups (0, 1), 2 samples of types (0, 1), one token each, gates (0.7, 0.3), (0.4, 0.6).
    # Q = [[0.7, 0.4], [0.3, 0.6]] (expert x sample); delta 0.1: I = [[1.1, 0.9], [0.9, 1.1]];
    # Z = [[0.77, 0.36], [0.27, 0.66]]; mean 2.06 / 4 = 0.515; E[Z^2] = 1.231 / 4 = 0.30775;
    # var = 0.30775 - 0.265225 = 0.042525; L = 0.042525 / 0.515 = 0.0825728...
    g = torch.tensor([[[0.7, 0.3]], [[0.4, 0.6]]], dtype=torch.double)
    loss = adapters.localized_balancing_loss(g, torch.tensor([0, 1]), torch.tensor([0, 1]), 0.1)
    assert loss.item() == pytest.approx(0.042525 / 0.515, rel=1e-12)
    # padding: a second token per sample masked out leaves the loss unchanged
    g2 = torch.cat([g, torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]], dtype=torch.double)], 1)
    masked = adapters.localized_balancing_loss(g2, torch.tensor([0, 1]), torch.tensor([0, 1]), 0.1,
                                               torch.tensor([[1, 0], [1, 0]]))
    assert masked.item() == pytest.approx(loss.item(), rel=1e-12)
    # one group, delta 0: the coefficient of variation form sigma^2(Q) / mu(Q) of the importance;
    # Q = [[0.7, 0.4], [0.3, 0.6]] -> mean 0.5, var (0.04 + 0.01 + 0.04 + 0.01) / 4 = 0.025 -> 0.05
    plain = adapters.localized_balancing_loss(g, torch.tensor([0, 0]), torch.tensor([0, 0]), 0.0)
    assert plain.item() == pytest.approx(0.05, rel=1e-12)
    # the authors' code form: unbiased var / mean^2 of Z = 0.042525 * 4/3 / 0.265225 = 0.213782...
    authors = adapters.localized_balancing_loss(g, torch.tensor([0, 1]), torch.tensor([0, 1]), 0.1, form="authors")
    assert authors.item() == pytest.approx(0.0567 / (0.265225 + 1e-10), rel=1e-9)
    # the minimum: Q proportional to 1 / I makes Z uniform, loss 0 (either form)
    q = torch.tensor([[[1 / 1.1, 1 / 0.9]], [[1 / 0.9, 1 / 1.1]]], dtype=torch.double)
    for form in ("paper", "authors"):
        zero = adapters.localized_balancing_loss(q, torch.tensor([0, 1]), torch.tensor([0, 1]), 0.1, form=form)
        assert zero.item() == pytest.approx(0.0, abs=1e-15)


def test_loramoe_layer_is_a_dense_mixture_and_forms_its_loss_from_task_groups():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8)).double()
    model = adapters.apply(base, "loramoe", ["a", "b", "c"], ["0"], rank=2, alpha=4, num_experts=4,
                           delta=0.2, task_groups=[0, 1, 1])
    lay = model[0]
    assert lay.expert_group.tolist() == [0, 0, 1, 1] and lay.task_group.tolist() == [0, 1, 1]
    with torch.no_grad():
        for p in (lay.lora_A, lay.lora_B, lay.router):
            p.copy_(torch.randn(p.shape, dtype=torch.double))
    x = torch.randn(3, 5, 6, dtype=torch.double)                 # 3 samples x 5 tokens
    adapters.set_task(model, torch.tensor([2, 0, 1]))
    got = model(x)
    g = torch.softmax(x @ lay.router.T, -1)                       # dense router, eq. 5 (no top-k)
    want = lay.base(x) + 2.0 * sum(g[..., e:e + 1] * (x @ lay.lora_A[e].T @ lay.lora_B[e].T) for e in range(4))
    assert torch.allclose(got, want, atol=1e-12)
    q = g.sum(1).T                                                # (E, B): summed over each sample's tokens
    types = torch.tensor([1, 0, 1])                                 # groups of tasks c, a, b
    coeff = torch.where(torch.tensor([0, 0, 1, 1])[:, None] == types[None], torch.tensor(1.2, dtype=torch.double),
                        torch.tensor(0.8, dtype=torch.double))
    z = coeff * q
    assert lay.aux_loss.item() == pytest.approx((z.var(unbiased=False) / z.mean()).item(), rel=1e-12)
    adapters.set_task(model, None)
    model(x)
    assert lay.aux_loss is None                                   # no task: no sample types, no constraint
    untouched = torch.nn.Sequential(torch.nn.Linear(6, 8))
    with pytest.raises(ConfigError, match="adapters.task_groups: need one group index >= 0 per task \\(3\\)"):
        adapters.apply(untouched, "loramoe", ["a", "b", "c"], ["0"], rank=2, task_groups=[0, 1])
    assert all(p.requires_grad for p in untouched.parameters())    # refused before anything was frozen
    with pytest.raises(ConfigError, match="adapters.expert_groups"):
        adapters.apply(torch.nn.Sequential(torch.nn.Linear(6, 8)), "loramoe", ["a"], ["0"], rank=2, num_experts=3,
                       expert_groups=[0, 0, 2])


# ------------------------------------------------------------------------------------ training
def test_trainer_trains_adapters_and_towers_only_and_resume_repeats_the_run(tmp_path):
    cfg = config(tmp_path, "mtlora", epochs=2, balancer="mgda")
    trainer = Trainer(cfg, progress=False)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    full = trainer.fit()
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
    (tmp_path / "run").rename(tmp_path / "full")
    Trainer(config(tmp_path, "mtlora", epochs=1, balancer="mgda"), progress=False).fit()
    resumed = Trainer(cfg, progress=False).fit(resume=True)
    assert resumed.history[-1].val == full.history[-1].val        # resume repeats the uninterrupted run exactly
    weights = (tmp_path / "run" / "best" / "model.safetensors").stat().st_size
    assert weights < 40_000                                       # adapters and towers, not the backbone


def test_trainer_with_a_router_loss_and_analyze_on_the_run_dir(tmp_path):
    from polytask.analyze.runner import AnalyzeOptions, analyze

    cfg = config(tmp_path, "loramoe", epochs=1, balancer="pcgrad",
                 method_params={"num_experts": 4, "task_groups": [0, 1]}, aux_weight=0.5)
    seen = []
    trainer = Trainer(cfg, callbacks=[lambda tr, step: seen.append(tr.model.aux_loss.detach())], progress=False)
    trainer.fit()
    assert seen and all(torch.isfinite(a) and a > 0 for a in seen)
    _, notes = analyze(tmp_path / "run", AnalyzeOptions(what=["conflict", "experts"], max_batches=2, progress=False))
    usage = json.loads((tmp_path / "run" / "analysis" / "experts.json").read_text())
    assert usage["tasks"] == ["task0", "task1"] and len(usage["matrices"]["mean_weight"][0]) == 4
    assert (tmp_path / "run" / "analysis" / "conflict.json").exists()


BAD = [({"target_modules": ["nope"]}, "model.params.target_modules: ['nope'] matches no nn.Linear"),
       ({"balancer": "mgda"}, "balancer.name: a gradient balancer needs adapter parameters shared by the tasks"),
       ({"rank": 64}, "model.params.rank: 64 is larger than module"),
       ({"method": "molora", "method_params": {"num_experts": 2, "top_k": 3}}, "model.params.method_params.top_k: must be between 1 and"),
       ({"method": "lorra"}, "unknown method 'lorra'"),
       ({"pooling": "max"}, "model.params.pooling"),
       ({"backbone": {"config": {"model_type": "nosuchmodel"}}},
        "model.params.backbone.config: cannot build model_type"),
       ({"method_params": {"top_k": 1}}, "model.params.method_params.top_k: method 'lora' takes no such parameter")]


@pytest.mark.parametrize("params,message", BAD)
def test_bad_adapter_config_is_one_config_error(tmp_path, params, message):
    params = dict(params)
    balancer = params.pop("balancer", "ew")
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace("[", "\\[")):
        Trainer(config(tmp_path, balancer=balancer, **params), progress=False)


def test_cli_bad_adapter_config_exits_2_with_one_line_and_writes_nothing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: sequence_tasks, params: {num_tasks: 2, num_rows: 60, vocab_size: 40, max_length: 8}}\n"
                   "model: {arch: adapters, params: {backbone: {config: {model_type: bert, vocab_size: 40, "
                   "hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}, "
                   "target_modules: [nope]}}\n")
    res = subprocess.run([sys.executable, "-m", "polytask.cli", "train", str(cfg), "--set",
                          f"out_dir={tmp_path}/run", "--device", "cpu"], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert "model.params.target_modules: ['nope'] matches no nn.Linear" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_backbone_from_a_local_folder(tmp_path):
    torch.manual_seed(0)
    cfg = dict(BERT)
    cfg.pop("model_type")
    transformers.BertModel(transformers.BertConfig(**cfg)).save_pretrained(tmp_path / "m")
    model = build_adapter_model(None, seq_splits().tasks, {"path": str(tmp_path / "m")}, "lora", ["query"], rank=2)
    ref = transformers.BertModel.from_pretrained(tmp_path / "m")
    assert torch.equal(model.backbone.embeddings.word_embeddings.weight, ref.embeddings.word_embeddings.weight)
    with pytest.raises(ConfigError, match="model.params.backbone.path: no such folder"):
        build_adapter_model(None, seq_splits().tasks, {"path": str(tmp_path / "none")}, "lora", ["query"], rank=2)
    with pytest.raises(ConfigError, match="give exactly one of 'path'"):
        build_adapter_model(None, seq_splits().tasks, {"path": "a", "config": {}}, "lora", ["query"], rank=2)
    assert isinstance(model, AdapterModel)


def test_one_adapter_serves_every_task_with_all_its_parameters_shared():
    model = build("lora", one_adapter=True).eval()
    randomize(model)
    lay = next(iter(adapters.adapter_layers(model.backbone).values()))
    assert lay.lora_A.shape[0] == 1                                # one LoRA, not one per task
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in adapters.task_parameters(model.backbone)}
    x = seq_splits().train.batch(torch.arange(4)).inputs
    out = model(x)
    assert model.shared_features.shape == (4, 16)                  # one forward, shared by the towers
    with adapters.task_context(model.backbone, 0):
        h = model.backbone(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state[:, 0]
    w, b = model.heads.towers.layers[0].weight, model.heads.towers.layers[0].bias
    for t, name in enumerate(model.task_names):
        assert torch.allclose(out[name], h @ w[t] + b[t], atol=1e-5)


def _peft_adapter(folder, hidden):
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    cfg = {k: v for k, v in {**BERT, "hidden_size": hidden}.items() if k != "model_type"}
    model = peft.get_peft_model(transformers.BertModel(transformers.BertConfig(**cfg)),
                                peft.LoraConfig(r=2, lora_alpha=2, target_modules=["query", "value"],
                                                init_lora_weights=False))
    model.save_pretrained(folder)
    return model


def test_peft_adapters_start_the_named_tasks_lora_and_a_different_base_is_refused(tmp_path):
    theirs = _peft_adapter(tmp_path / "a16", hidden=16)
    model = build("arrow", tasks=seq_splits().tasks, peft_adapters={"task1": str(tmp_path / "a16")},
                  method_params={"top_k": 1})
    lay = adapters.adapter_layers(model.backbone)["encoder.layer.1.attention.self.value"]
    want = theirs.base_model.model.encoder.layer[1].attention.self.value.lora_B["default"].weight
    assert torch.equal(lay.lora_B[1], want) and lay.lora_B[0].abs().max() == 0   # task1's row only
    _peft_adapter(tmp_path / "a24", hidden=24)
    with pytest.raises(CheckpointError, match="adapters.load_peft: tensor .*query.lora_A.* has shape \\(2, 24\\)"):
        build("lora", peft_adapters={"task0": str(tmp_path / "a24")})
    with pytest.raises(ConfigError, match="model.params.peft_adapters: unknown task 'nope'"):
        build("lora", peft_adapters={"nope": str(tmp_path / "a16")})


def test_token_file_task_ids_out_of_range_is_a_data_error(tmp_path):
    ids = torch.randint(1, 30, (20, 4))
    torch.save({"input_ids": ids, "labels.a": torch.zeros(20), "labels.b": torch.ones(20),
                "task_ids": torch.full((20,), 2)}, tmp_path / "t.pt")
    with pytest.raises(DataError, match="t.pt: tensor 'task_ids' must hold one task index in 0..1 per row"):
        data.load("token_file", path=str(tmp_path / "t.pt"))


@pytest.mark.parametrize("method,kw", [
    ("lora", {"pooling": "mean"}), ("loramoe", {"method_params": {"num_experts": 2}}),
    ("molora", {"method_params": {"num_experts": 2, "top_k": 1}, "pooling": "last"})])
def test_training_step_makes_no_host_sync_in_polytask_code(method, kw, monkeypatch):
    # transformers' own mask code synchronises (padding_mask.all()); only a sync called from polytask fails
    model = build(method, **kw).train()
    x = seq_splits().train.batch(torch.arange(4)).inputs
    model(x)
    calls = []
    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, attr)

        def spy(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/polytask/" in caller.replace("\\", "/"):
                calls.append(caller)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, attr, spy)
    out = model(x)
    aux = model.aux_loss
    (sum(v.sum() for v in out.values()) + (0 if aux is None else aux)).backward()
    monkeypatch.undo()
    assert calls == []                     # fails with a float(mask.sum()) put into AdapterModel._pool (checked)


def test_arrow_library_stays_frozen_and_the_digest_ignores_it(tmp_path):
    _peft_adapter(tmp_path / "a16", hidden=16)
    model = build("arrow", peft_adapters={"task1": str(tmp_path / "a16")}, method_params={"top_k": 1})
    assert not any(p.requires_grad for p in adapters.task_parameters(model.backbone))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.heads.parameters()}
    plain = build("arrow", method_params={"top_k": 1})              # same backbone, empty library
    assert torch.equal(plain.backbone_digest, model.backbone_digest)
    x = seq_splits().train.batch(torch.arange(4)).inputs
    plain.eval()(x)                                               # prototypes cached for the empty library
    plain.load_state_dict(model.state_dict())                     # the library travels in the checkpoint
    assert torch.allclose(plain(x)["task0"], model.eval()(x)["task0"])   # and the prototypes follow it
    lay = adapters.adapter_layers(plain.backbone)["encoder.layer.0.attention.self.query"]
    theirs = adapters.adapter_layers(model.backbone)["encoder.layer.0.attention.self.query"]
    assert torch.equal(lay.lora_A, theirs.lora_A)


def test_export_adapters_writes_a_peft_lora_that_peft_loads_onto_the_backbone(tmp_path):
    import copy

    peft = pytest.importorskip("peft")
    from polytask.train.backbone import export_adapters

    trainer = Trainer(config(tmp_path, "lora", epochs=1), progress=False)
    trainer.fit()
    res = subprocess.run([sys.executable, "-m", "polytask.cli", "export-adapters", str(tmp_path / "run"),
                          str(tmp_path / "peft1"), "--peft", "--task", "task1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    model = trainer.model.eval()
    x = seq_splits().train.batch(torch.arange(3)).inputs
    ids, mask = x["input_ids"], x["attention_mask"]
    with adapters.task_context(model.backbone, "task1"):
        ours = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    base = adapters.unwrap(copy.deepcopy(model.backbone))
    plain = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(plain, ours, atol=1e-5)                        # the trained LoRA changes it
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft1")(input_ids=ids, attention_mask=mask)
    assert torch.allclose(theirs.last_hidden_state, ours, atol=1e-5)
    out = export_adapters(tmp_path / "run", tmp_path / "ours")                  # polytask's format + towers
    assert (out / "adapters.safetensors").exists() and (out / "heads.safetensors").exists()
    with pytest.raises(ConfigError, match="exists; give a new folder"):
        export_adapters(tmp_path / "run", tmp_path / "ours")
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        export_adapters(tmp_path / "run", tmp_path / "x", peft_task="nope")
