"""Faults found after issue 18 (session 13): failed starts that left a run directory behind,
Auto-Lambda's held-out position across a kill and resume, and the commands added this session
(prune, predict, export, merge tokenizers, bench qm9 --protocol, adapters) under bad input and
kills mid-write.

The tests of a fix fail on the code before it (checked); four are guards of behaviour that already
held when checked (a failed start in an existing folder, a failed run after its first epoch, the
--overwrite restore on a refused config, an adapters run's kill and resume).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from polytask.errors import ConfigError, DataError
from polytask.train import Trainer, parse_config
from polytask.train import rundir

from test_faults_train import TINY, assert_one_line_exit_2, cli, model_weights, partials, snapshot
from test_faults_train import _dict as train_dict


def _dict(tmp_path, out="runs/{name}", **over):
    return train_dict(tmp_path, TINY["name"], out, **over)


def _yaml(tmp_path, out="runs/{name}", **over):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_dict(tmp_path, out, **over)))
    return path


def _tree(root):
    """Every path under ``root`` (folders and files), relative."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


# ----------------------------------------------------------------------------- 1. failed starts
BAD_STARTS = {  # a ConfigError raised while the Trainer is built, after the run directory was claimed
    "unknown task": {"data.tasks": ["task0", "nope"]},
    "unknown balancer parameter": {"balancer": {"name": "pcgrad", "params": {"bogus": 1}}},
    "model without a head": {"model.arch": "nope"},
}


@pytest.mark.parametrize("command", ["train", "analyze"])
def test_failed_start_leaves_no_new_directory(tmp_path, monkeypatch, capsys, command):
    """runs/ did not exist: neither runs/ nor runs/run (with its .lock) may stay after exit 2."""
    extra = ["--what", "conflict", "--every", "1"] if command == "analyze" else []
    for why, over in BAD_STARTS.items():
        config = _yaml(tmp_path, **over)
        before = _tree(tmp_path)
        assert_one_line_exit_2(cli(monkeypatch, capsys, command, config, *extra))
        assert _tree(tmp_path) == before, why


def test_failed_start_in_an_existing_folder_keeps_the_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "run" / "notes.txt").write_text("mine")
    config = _yaml(tmp_path, **BAD_STARTS["unknown task"])
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", config), "data.tasks")
    assert _tree(tmp_path / "runs") == ["run", "run/.lock", "run/notes.txt"]  # the lock file is a run's


def test_trainer_fit_failing_before_its_first_epoch_leaves_no_new_directory(tmp_path, monkeypatch):
    """Python API: the run directory is claimed in fit; a start that fails there (here the epoch-0
    evaluation refusing the data) removes what it created, config.yaml included."""
    trainer = Trainer(parse_config(_dict(tmp_path)), progress=False)

    def refuse():
        raise DataError("val: bad rows")

    monkeypatch.setattr(trainer, "_evaluate", refuse)
    with pytest.raises(DataError):
        trainer.fit()
    assert _tree(tmp_path) == []


def test_failed_run_after_its_first_epoch_is_kept(tmp_path):
    """What a run wrote once it trained (metrics of an epoch, best model) is its record: kept."""

    def fail(trainer, step):
        if step == 5:  # epoch 2 (4 batches an epoch): epoch 1 is in metrics.jsonl and best/
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Trainer(parse_config(_dict(tmp_path)), callbacks=[fail], progress=False).fit()
    run = tmp_path / "runs" / "run"
    assert {r["epoch"] for r in rundir.read_jsonl(run / "metrics.jsonl")} == {0, 1}
    assert (run / "best" / "model.safetensors").is_file()


def test_overwrite_whose_trainer_is_refused_puts_the_previous_run_back(tmp_path, monkeypatch, capsys):
    config = _yaml(tmp_path)
    assert cli(monkeypatch, capsys, "train", config)[0] == 0
    run = tmp_path / "runs" / "run"
    before = snapshot(run)
    bad = _yaml(tmp_path, **BAD_STARTS["unknown balancer parameter"])
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", bad, "--overwrite"), "balancer.params.bogus")
    assert snapshot(run) == before and not rundir.aside_path(run).exists() and not partials(tmp_path)
    bad = _yaml(tmp_path, **BAD_STARTS["unknown task"])
    assert_one_line_exit_2(cli(monkeypatch, capsys, "analyze", bad, "--what", "conflict", "--every", "1",
                               "--overwrite"), "data.tasks")
    assert snapshot(run) == before and not rundir.aside_path(run).exists()


def test_auto_lambda_refused_on_table_data_leaves_no_directory(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pyarrow")
    from polytask.train.tables import write_synthetic_splits

    train, val, test = write_synthetic_splits(tmp_path / "log", 600, row_group_rows=200)
    params = {"train": str(train), "val": str(val), "test": str(test), "dense": ["price", "hour"],
              "ids": {"user_id": {}}, "labels": {"click": "click", "conversion": "conversion"}, "embed_dim": 4}
    config = tmp_path / "table.yaml"
    config.write_text(yaml.safe_dump({
        "name": "t", "out_dir": str(tmp_path / "runs" / "{name}"), "device": "cpu",
        "data": {"name": "table", "params": params}, "model": {"arch": "mmoe", "params": {"num_experts": 2}},
        "balancer": {"name": "auto_lambda"}, "train": {"epochs": 1, "batch_size": 128}}))
    before = _tree(tmp_path)
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", config), "balancer.name: 'auto_lambda'")
    assert _tree(tmp_path) == before


def test_claim_that_cannot_lock_removes_the_folders_it_created(tmp_path, monkeypatch):
    def refuse(run_dir):
        raise ConfigError("cannot lock")

    monkeypatch.setattr(rundir, "_lock", refuse)
    with pytest.raises(ConfigError, match="cannot lock"):
        with rundir.claim_run_dir(tmp_path / "a" / "b" / "run"):
            pass
    assert _tree(tmp_path) == []


# ----------------------------------------------------------------------------- 2. Auto-Lambda resume
@pytest.mark.parametrize("split, batch", [("train", 64), ("val", 16)])
def test_auto_lambda_killed_and_resumed_repeats_the_uninterrupted_run(tmp_path, split, batch):
    """The kill-and-resume promise of test_faults_train for a balancer that draws held-out batches:
    the held-out generator's position is in the checkpoint. 'val' with batch 16: 11 steps an epoch
    over passes of 3 held-out batches, so a checkpoint falls in the middle of a pass."""
    from test_faults_train import KILL_DRIVER

    base = {k: v for k, v in TINY.items() if k != "name"}
    base["train"] = {**base["train"], "epochs": 3, "batch_size": batch}
    base["balancer"] = {"name": "auto_lambda", "params": {"heldout_split": split, "meta_lr": 0.05}}
    points = [("metrics", 3), ("latest.json", 2)]  # resumed from checkpoint 1, then from 2
    plan = [{"name": "full", "kind": "fit"}]
    plan += [{"name": f"{p}-{n}", "kind": "kill", "point": p, "nth": n} for p, n in points]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(tmp_path), json.dumps(base), json.dumps(plan)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["full"] == 0, res.stderr[-2000:]
    full = rundir.read_jsonl(tmp_path / "full" / "metrics.jsonl")
    full_weights = model_weights(tmp_path / "full")
    from polytask.train import checkpoint as ckpt

    full_balancer = ckpt.load_checkpoint(tmp_path / "full" / "checkpoints")[1]["balancer"]
    for point, nth in points:
        name = f"{point}-{nth}"
        assert out[name]["killed"] == 77 and out[name]["next"] == 0, (name, res.stderr[-2000:])
        assert rundir.read_jsonl(tmp_path / name / "metrics.jsonl") == full, name
        weights = model_weights(tmp_path / name)
        assert all(torch.equal(weights[k], full_weights[k]) for k in full_weights), name
        balancer = ckpt.load_checkpoint(tmp_path / name / "checkpoints")[1]["balancer"]
        flat = ckpt.split_state(balancer)[1]
        assert flat and all(torch.equal(v, ckpt.split_state(full_balancer)[1][k]) for k, v in flat.items()), name


# ----------------------------------------------------------------------------- 3. commands of this session
def _fork(fn):
    """Run ``fn`` in a forked child; its exit status (77: killed by the test's os._exit)."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            code = 3
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_prune_killed_mid_write_leaves_nothing_after_the_next_prune(tmp_path, monkeypatch, capsys):
    """A prune killed before its rename leaves its temporary run directory (.OUT.<pid>.partial); the
    next prune into the same --out removes it (its process is gone), and leaves a live one's alone."""
    from polytask.prune import run as prune_run_mod

    Trainer(parse_config(_dict(tmp_path, **{"train.epochs": 1})), progress=False).fit()
    run, out = tmp_path / "runs" / "run", tmp_path / "runs" / "pruned"
    real = prune_run_mod.atomic_write_text

    def killed_at_prune_md(path, text):
        if str(path).endswith("prune.md"):
            os._exit(77)
        return real(path, text)

    def killed():
        monkeypatch.setattr(prune_run_mod, "atomic_write_text", killed_at_prune_md)
        prune_run_mod.prune_run(run, prune_run_mod.PruneOptions(method="l1", out=out))

    assert _fork(killed) == 77
    left = [p.name for p in out.parent.iterdir() if p.name.endswith(".partial")]
    assert len(left) == 1 and left[0].startswith(".pruned.")
    live = out.parent / f".pruned.{os.getppid()}.partial"  # a prune still running (a live process)
    live.mkdir()
    code, _, err = cli(monkeypatch, capsys, "prune", run, "--method", "l1", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == [live.name, "pruned", "run"]
    assert (out / "prune.md").is_file() and (out / "best" / "model.safetensors").is_file()


def test_prune_that_fails_leaves_no_new_folder(tmp_path, monkeypatch, capsys):
    """--out in folders that do not exist yet: a prune failing after its build started (here the
    table step) removes its build and the folders it created for --out."""
    from polytask.prune import run as prune_run_mod

    Trainer(parse_config(_dict(tmp_path, **{"train.epochs": 1})), progress=False).fit()
    before = _tree(tmp_path)

    def refuse(*args, **kwargs):
        raise ConfigError("--latency-device: refused")

    monkeypatch.setattr(prune_run_mod, "_table", refuse)
    for finetune in ("0", "1"):
        assert_one_line_exit_2(cli(monkeypatch, capsys, "prune", tmp_path / "runs" / "run", "--method", "l1",
                                   "--finetune-epochs", finetune, "--out", tmp_path / "new" / "sub" / "p"),
                               "refused")
        assert _tree(tmp_path) == before, finetune


def test_adapters_run_killed_and_resumed_repeats_the_uninterrupted_run(tmp_path):
    """model.arch adapters (MoLoRA: top-k routing and its load-balancing loss, PCGrad on the shared
    adapter parameters): the kill-and-resume promise of test_faults_train holds."""
    from test_faults_train import KILL_DRIVER

    base = yaml.safe_load((Path(__file__).parents[1] / "examples" / "adapters_molora.yaml").read_text())
    base.pop("name")
    base["data"]["params"]["num_rows"] = 160
    base["model"]["params"]["backbone"]["config"].update(hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    base["train"] = {"epochs": 2, "batch_size": 32, "early_stopping": None}
    plan = [{"name": "full", "kind": "fit"}, {"name": "k", "kind": "kill", "point": "metrics", "nth": 3}]
    res = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(tmp_path), json.dumps(base), json.dumps(plan)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["full"] == 0 and out["k"]["killed"] == 77 and out["k"]["next"] == 0, res.stderr[-2000:]
    assert rundir.read_jsonl(tmp_path / "k" / "metrics.jsonl") == rundir.read_jsonl(tmp_path / "full" / "metrics.jsonl")
    full, resumed = model_weights(tmp_path / "full"), model_weights(tmp_path / "k")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_failed_start_never_removes_a_previous_run_it_restored(tmp_path, monkeypatch, capsys):
    """A killed --overwrite left the previous run aside and no run directory; the next command puts
    the previous run back first. If that command then fails, the restored run is not its new folder."""
    run = tmp_path / "runs" / "run"
    aside = rundir.aside_path(run)
    aside.mkdir(parents=True)
    (aside / "config.yaml").write_text("seed: 1\n")  # a previous run with nothing but its config
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", _yaml(tmp_path, **BAD_STARTS["unknown task"])),
                           "data.tasks")
    assert (run / "config.yaml").read_text() == "seed: 1\n" and not aside.exists()
