"""Trainer: run directory, model selection, determinism, resume after a kill, bad input."""

import json

import pytest
import torch

from polytask.errors import CheckpointError, ConfigError, DataError, TrainingError
from polytask.train import Trainer, parse_config
from polytask.train import checkpoint as ckpt


def _cfg(tmp_path, name="run", **over):
    base = {
        "name": name, "seed": 1, "device": "cpu", "out_dir": str(tmp_path / "{name}"),
        "data": {"name": "synthetic", "params": {"num_tasks": 2, "num_rows": 600, "input_dim": 20}},
        "model": {"params": {"bottom": [16], "tower": [8], "dropout": 0.1}},
        "train": {"epochs": 4, "batch_size": 64, "early_stopping": None},
    }
    for key, value in over.items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_config(base)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_run_directory_and_selection_on_validation(tmp_path):
    trainer = Trainer(_cfg(tmp_path), progress=False)
    result = trainer.fit()
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "best/model.safetensors", "best/metrics.json", "summary.md",
              "plots/curves.png", "plots/weights.png", "checkpoints/latest.json"):
        assert (run / f).exists(), f
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    # one line per epoch (0..4) per split per task (train has no epoch 0), plus a score line per epoch
    assert sum(r["split"] == "val" and r["task"] == "task0" for r in rows) == 5
    assert sum(r["split"] == "train" and r["task"] == "task1" for r in rows) == 4
    scores = {r["epoch"]: r["score"] for r in rows if r["task"] == "*"}
    assert result.best_epoch == min(scores, key=scores.get)  # chosen on validation only
    best = json.loads((run / "best/metrics.json").read_text())
    assert best["epoch"] == result.best_epoch and best["test"] == result.test
    # the saved best weights reproduce the reported test metrics
    from polytask.train import evaluate
    trainer.model.load_state_dict(ckpt.load_model_file(run / "best/model.safetensors"))
    again = evaluate(trainer.model, trainer.test_set, trainer.tasks)
    assert again["task0"]["mse"] == pytest.approx(result.test["task0"]["mse"], rel=1e-5)


def test_same_seed_same_weights(tmp_path):
    a, b = Trainer(_cfg(tmp_path, "a"), progress=False), Trainer(_cfg(tmp_path, "b"), progress=False)
    a.fit(), b.fit()
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    full = Trainer(_cfg(tmp_path, "full"), progress=False)
    full.fit()

    def kill(trainer, step):
        if step == 17:  # in the middle of epoch 3 (7 steps per epoch)
            raise KeyboardInterrupt

    killed = Trainer(_cfg(tmp_path, "killed"), callbacks=[kill], progress=False)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert json.loads((tmp_path / "killed/checkpoints/latest.json").read_text())["epoch"] == 2
    resumed = Trainer(_cfg(tmp_path, "killed"), progress=False)
    result = resumed.fit(resume=True)
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    rows = (tmp_path / "killed/metrics.jsonl").read_text().splitlines()
    assert len(rows) == len((tmp_path / "full/metrics.jsonl").read_text().splitlines())
    assert result.best_epoch >= 1


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, **{"train.epochs": 2}), progress=False)
    trainer.fit()
    calls = []

    def failing_save(tensors, path):
        calls.append(path)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path / "run/checkpoints", 3, trainer.state())
    monkeypatch.undo()
    epoch, parts = ckpt.load_checkpoint(tmp_path / "run/checkpoints")
    assert epoch == 2 and calls
    assert not list((tmp_path / "run/checkpoints").glob(".tmp-*"))


def test_nan_loss_stops_naming_task_and_step_and_keeps_last_checkpoint(tmp_path):
    def poison(trainer, step):
        if step == 15:
            with torch.no_grad():
                trainer.model.heads.towers.layers[-1].weight[1].fill_(float("nan"))

    trainer = Trainer(_cfg(tmp_path), callbacks=[poison], progress=False)
    with pytest.raises(TrainingError, match=r"task 'task1'.* step 15 \(epoch 3\)"):
        trainer.fit()
    epoch, parts = ckpt.load_checkpoint(tmp_path / "run/checkpoints")
    assert epoch == 2
    assert all(torch.isfinite(v).all() for v in parts["model"].values())


def test_resume_without_or_with_corrupt_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="latest.json"):
        Trainer(_cfg(tmp_path), progress=False).fit(resume=True)
    Trainer(_cfg(tmp_path, **{"train.epochs": 1}), progress=False).fit()
    weights = tmp_path / "run/checkpoints/epoch-0001/model.safetensors"
    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Trainer(_cfg(tmp_path), progress=False).fit(resume=True)


def test_bad_configs_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'train.epochz'"):
        parse_config({"train": {"epochz": 3}})
    with pytest.raises(ConfigError, match="optim.lr"):
        parse_config({"optim": {"lr": -1}})
    with pytest.raises(ConfigError, match="unknown architecture 'mmo'"):
        Trainer(parse_config({"model": {"arch": "mmo"}, "device": "cpu"}))
    with pytest.raises(ConfigError, match="shared_bottom' has no parameter 'layers'"):
        Trainer(parse_config({"model": {"params": {"layers": 3}}, "device": "cpu"}))
    with pytest.raises(ConfigError, match="unknown balancer"):
        Trainer(parse_config({"balancer": {"name": "nope"}, "device": "cpu"}))
    with pytest.raises(ConfigError, match="data.tasks: unknown task"):
        Trainer(parse_config({"data": {"name": "digits", "tasks": ["colour"]}, "device": "cpu"}))


def test_declared_task_without_targets(tmp_path):
    from polytask.data import load
    from polytask.tasks import Task

    splits = load("synthetic", num_tasks=2, num_rows=100, input_dim=10)
    splits.tasks.append(Task("extra", "binary"))
    with pytest.raises(DataError, match="task 'extra' has no targets"):
        Trainer(_cfg(tmp_path), splits=splits, progress=False)
