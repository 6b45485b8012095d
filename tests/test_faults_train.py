"""Faults around run directories (issue 18): train, analyze and report under existing runs,
--overwrite and --resume, concurrent commands, torn metrics, full and read-only disks, kills at
every checkpoint-write point, umask, one-line errors, tasks without labels.

Each test states the promise it checks, on the CLI (``cli.main``, exit status and stderr) and on
the Python API; kills are real (``os._exit`` inside a forked run), the full disk is a real tmpfs
where one can be mounted, and a monkeypatched ENOSPC everywhere. All of them fail on 68ee488
(checked with stubs for the names they import from the new modules).
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from polytask.errors import CheckpointError, ConfigError, DataError, TrainingError
from polytask.train import Trainer, parse_config
from polytask.train import checkpoint as ckpt
from polytask.train import rundir

TINY = {
    "name": "run", "seed": 1, "device": "cpu",
    "data": {"name": "synthetic", "params": {"num_tasks": 2, "num_rows": 240, "input_dim": 8}},
    "model": {"params": {"bottom": [8], "tower": [4]}},
    "train": {"epochs": 2, "batch_size": 64, "early_stopping": None},
}


def _dict(tmp_path, name="run", out="{name}", **over):
    """TINY named ``name``, its runs under ``tmp_path / out``, with dotted keys overridden."""
    cfg = json.loads(json.dumps(TINY))
    cfg["name"], cfg["out_dir"] = name, str(tmp_path / out)
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def _cfg(tmp_path, name="run", **over):
    return parse_config(_dict(tmp_path, name, **over))


def _yaml(tmp_path, name="run", **over):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_dict(tmp_path, name, **over)))
    return path


def cli(monkeypatch, capsys, *args):
    """Run ``polytask ARGS`` in this process through ``cli.main`` (exit status, stdout, stderr)."""
    from polytask import cli as cli_mod

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["polytask", *map(str, args)])
    code = 0
    try:
        cli_mod.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_exit_2(result, *needles):
    code, _, err = result
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("polytask: ")]  # warnings are logged apart
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(run_dir):
    """Relative path -> sha256 of every file of a run directory (the lock file aside)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != rundir.LOCK_NAME}


def partials(root):
    """Our temporary files/folders anywhere under ``root`` (names ending in .partial, .tmp-*)."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                  if p.name.endswith(ckpt.PARTIAL) or p.name.startswith(".tmp-") or p.name.endswith(".tmp"))


def model_weights(run_dir):
    return ckpt.load_checkpoint(run_dir / "checkpoints")[1]["model"]


# ----------------------------------------------------------------------------- 1. claim
def test_analyze_config_refuses_a_finished_run_like_train(tmp_path, monkeypatch, capsys):
    """The README's order (train, then analyze with the same config) must not replace the run."""
    config = _yaml(tmp_path)
    assert cli(monkeypatch, capsys, "train", config)[0] == 0
    run = tmp_path / "run"
    before = snapshot(run)
    line = assert_one_line_exit_2(cli(monkeypatch, capsys, "analyze", config, "--what", "conflict", "--every", "1"),
                                  str(run), "already holds a run", "--overwrite", "polytask analyze")
    assert "--resume" not in line  # analyze cannot resume: it does not offer it
    assert snapshot(run) == before
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", config), "already holds a run", "--resume")
    assert snapshot(run) == before

    from polytask.analyze.runner import AnalyzeOptions, analyze, parse_what

    with pytest.raises(ConfigError, match="already holds a run"):
        analyze(config, AnalyzeOptions(what=parse_what("conflict"), every=1, progress=False))
    assert snapshot(run) == before
    code, out, err = cli(monkeypatch, capsys, "analyze", config, "--what", "conflict", "--every", "1", "--overwrite")
    assert code == 0, err
    assert (run / "analysis" / "conflict.json").exists() and not rundir.aside_path(run).exists()


def test_train_and_analyze_share_one_claim(tmp_path, monkeypatch, capsys):
    """One function decides for both commands (a spy on it sees both)."""
    seen = []
    real = rundir.claim_run_dir

    def spy(run_dir, config=None, mode="new", *args, **kwargs):
        seen.append((Path(run_dir).name, mode))
        return real(run_dir, config, mode, *args, **kwargs)

    monkeypatch.setattr(rundir, "claim_run_dir", spy)
    assert cli(monkeypatch, capsys, "train", _yaml(tmp_path, "a"))[0] == 0
    assert cli(monkeypatch, capsys, "analyze", _yaml(tmp_path, "b"), "--what", "conflict", "--every", "1")[0] == 0
    assert ("a", "new") in seen and ("b", "new") in seen
    assert cli(monkeypatch, capsys, "analyze", tmp_path / "a", "--what", "conflict", "--every", "1")[0] == 0
    assert ("a", "use") in seen


def test_run_dir_that_is_a_file_or_has_a_bad_placeholder(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", _yaml(tmp_path)), str(tmp_path / "run"), "is a file")
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", _yaml(tmp_path, "x"), "--set", "out_dir=runs/{nme}"),
                           "out_dir", "{nme}")
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", _yaml(tmp_path, "x"), "--set", "out_dir=runs/{"),
                           "out_dir")
    with pytest.raises(ConfigError, match=r"out_dir.*\{0\}"):
        parse_config({"out_dir": "runs/{0}"})
    assert parse_config({"out_dir": "runs/{{x}}-{name}"}).run_dir == Path("runs/{x}-run")


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume and --overwrite"):
        Trainer(_cfg(tmp_path), progress=False).fit(resume=True, overwrite=True)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 2. --overwrite
def test_overwrite_that_fails_before_its_first_checkpoint_keeps_the_previous_run(tmp_path):
    Trainer(_cfg(tmp_path), progress=False).fit()
    run = tmp_path / "run"
    before = snapshot(run)

    def fail(trainer, step):
        if step == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Trainer(_cfg(tmp_path, seed=7), callbacks=[fail], progress=False).fit(overwrite=True)
    assert snapshot(run) == before  # the old run, whole: config, metrics, best, summary, plots, checkpoints
    assert not rundir.aside_path(run).exists() and not partials(tmp_path)


def test_overwrite_leaves_only_the_new_run(tmp_path):
    Trainer(_cfg(tmp_path), progress=False).fit()
    run = tmp_path / "run"
    (run / "analysis").mkdir()
    (run / "analysis" / "conflict.json").write_text("{}")  # a diagnostic of the old run
    seen_aside = []

    def look(trainer, step):  # during the new run's first epoch the old run waits aside, whole
        if step == 1:
            seen_aside.append(sorted(p.name for p in rundir.aside_path(run).iterdir()))

    Trainer(_cfg(tmp_path, seed=5, **{"train.epochs": 3}), callbacks=[look], progress=False).fit(overwrite=True)
    assert "best" in seen_aside[0] and "analysis" in seen_aside[0] and "summary.md" in seen_aside[0]
    assert not rundir.aside_path(run).exists()
    assert not (run / "analysis").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 5
    assert {r["epoch"] for r in rundir.read_jsonl(run / "metrics.jsonl")} == {0, 1, 2, 3}
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["epoch"] == 3


def test_files_that_are_not_a_run_are_never_moved_or_deleted(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    Trainer(_cfg(tmp_path, **{"train.epochs": 1}), progress=False).fit()  # a folder of other files: used in place
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "summary.md").exists()
    before = snapshot(folder)
    with pytest.raises(ConfigError, match=r"files that are not a polytask run's \('notes.txt'\)"):
        Trainer(_cfg(tmp_path), progress=False).fit(overwrite=True)  # a run beside them cannot move aside alone
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(_cfg(tmp_path), progress=False).fit()
    assert snapshot(folder) == before and not rundir.aside_path(folder).exists()


def test_next_command_restores_a_run_whose_overwrite_was_killed(tmp_path, caplog):
    """A kill between 'moved aside' and 'first checkpoint' (simulated by leaving the state such a
    kill leaves) is repaired by the next command: the previous run comes back whole."""
    Trainer(_cfg(tmp_path), progress=False).fit()
    run, aside = tmp_path / "run", rundir.aside_path(tmp_path / "run")
    before = snapshot(run)
    os.rename(run, aside)  # what a killed --overwrite leaves: the old run aside...
    run.mkdir()
    (run / "config.yaml").write_text("seed: 9\n")  # ...and a new run without a checkpoint
    (run / "metrics.jsonl").write_text('{"epoch": 0, "split": "val", "task": "*", "score": 1.0}\n')
    with pytest.raises(ConfigError, match="already holds a run"), caplog.at_level("WARNING", "polytask"):
        Trainer(_cfg(tmp_path), progress=False).fit()
    assert "restored the previous run" in caplog.text
    assert snapshot(run) == before and not aside.exists() and not partials(tmp_path)
    # and the other way round: the new run had its checkpoint, the old one is only deleted
    shutil.copytree(run, aside)
    Trainer(_cfg(tmp_path, **{"train.epochs": 3}), progress=False).fit(resume=True)
    assert not aside.exists()


def test_worker_of_a_claim_held_by_its_parent_neither_locks_nor_keeps_the_old_run(tmp_path):
    """``train --nproc N``: the launcher holds the claim; its workers (same run directory, told by
    the environment) do not lock again, and the first checkpoint still removes the old run."""
    Trainer(_cfg(tmp_path), progress=False).fit()
    run = tmp_path / "run"
    with rundir.claim_run_dir(run, mode="overwrite") as claim:  # the launcher
        assert claim.aside is not None and claim.aside.is_dir()
        assert os.path.realpath(run) in os.environ[rundir.HELD_ENV].split(os.pathsep)  # what children inherit
        _HELD, rundir._HELD = rundir._HELD, {}  # a child process: the environment only
        try:
            Trainer(_cfg(tmp_path), progress=False).fit(overwrite=True)  # would fail to lock if it tried
            assert not claim.aside.exists()
        finally:
            rundir._HELD = _HELD
    assert rundir.HELD_ENV not in os.environ
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["epoch"] == 2


# ----------------------------------------------------------------------------- 3. --resume
def test_resume_refuses_changed_settings_naming_every_key(tmp_path, monkeypatch, capsys):
    config = _yaml(tmp_path, **{"train.epochs": 1})
    assert cli(monkeypatch, capsys, "train", config)[0] == 0
    stored = (tmp_path / "run" / "config.yaml").read_bytes()
    line = assert_one_line_exit_2(
        cli(monkeypatch, capsys, "train", config, "--resume", "--set", "optim.lr=0.01", "--set", "seed=2",
            "--set", "model.params.bottom=[16]", "--set", "data.params.num_rows=300"),
        "--resume: config changed", "optim.lr 0.001 -> 0.01", "seed 1 -> 2", "model.params.bottom [8] -> [16]",
        "data.params.num_rows 240 -> 300", "--overwrite")
    assert line.count("->") == 4
    assert (tmp_path / "run" / "config.yaml").read_bytes() == stored  # not rewritten on refusal
    # fewer epochs, or more under a cosine schedule (its length), change the run too
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", _yaml(tmp_path, **{"train.epochs": 1,
                                                                                  "scheduler.name": "cosine"}),
                               "--resume", "--set", "train.epochs=3"), "scheduler.name none -> cosine")
    refused, safe = rundir.config_changes({"train": {"epochs": 4}, "scheduler": {"name": "cosine"}},
                                          {"train": {"epochs": 6}, "scheduler": {"name": "cosine"}})
    assert refused == ["train.epochs 4 -> 6"] and safe == []
    assert rundir.config_changes({"train": {"epochs": 4}}, {"train": {"epochs": 3}})[0] == ["train.epochs 4 -> 3"]
    assert rundir.config_changes({"model": {"params": {}}}, {"model": {"params": {"bottom": [4]}}})[0] == [
        "model.params.bottom (unset) -> [4]"]


def test_resume_applies_safe_changes_and_says_so(tmp_path, monkeypatch, capsys, caplog):
    config = _yaml(tmp_path, **{"train.epochs": 1})
    assert cli(monkeypatch, capsys, "train", config)[0] == 0
    with caplog.at_level("WARNING", "polytask"):
        code, out, err = cli(monkeypatch, capsys, "train", config, "--resume", "--set", "train.epochs=3",
                             "--set", "train.eval_batch_size=100")
    assert code == 0, err
    assert "--resume: applied train.epochs 1 -> 3, train.eval_batch_size 4096 -> 100" in caplog.text
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["train"]["epochs"] == 3 and stored["train"]["eval_batch_size"] == 100
    assert {r["epoch"] for r in rundir.read_jsonl(tmp_path / "run" / "metrics.jsonl")} == {0, 1, 2, 3}
    for key in ("train.epochs", "device"):
        assert key in rundir.SAFE_ON_RESUME


def test_resume_with_an_unreadable_stored_config_or_after_a_killed_overwrite(tmp_path, monkeypatch, capsys, caplog):
    config = _yaml(tmp_path, **{"train.epochs": 1})
    assert cli(monkeypatch, capsys, "train", config)[0] == 0
    run = tmp_path / "run"
    good = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text("train: [unclosed\n")
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", config, "--resume"), "config.yaml", "not valid YAML",
                           "--overwrite")
    (run / "config.yaml").unlink()
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", config, "--resume"), "cannot read", "config.yaml")
    (run / "config.yaml").write_text(good)
    # a killed --overwrite left the run aside and no checkpoint in place: --resume continues the old run
    os.rename(run, rundir.aside_path(run))
    with caplog.at_level("WARNING", "polytask"):
        code, _, err = cli(monkeypatch, capsys, "train", config, "--resume", "--set", "train.epochs=2")
    assert code == 0, err
    assert "restored the previous run" in caplog.text and not rundir.aside_path(run).exists()
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["epoch"] == 2


# ----------------------------------------------------------------------------- 4. lock
def _hold_lock(run_dir):
    """Another process holding the run directory's lock (as a running command would)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(run_dir / rundir.LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.ftruncate(fd, 0)\n"
            "os.pwrite(fd, str(os.getpid()).encode(), 0)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_command_on_a_locked_run_dir_exits_2(tmp_path, monkeypatch, capsys):
    config = _yaml(tmp_path, **{"train.epochs": 1})
    assert cli(monkeypatch, capsys, "train", config)[0] == 0
    run = tmp_path / "run"
    before = snapshot(run)
    holder = _hold_lock(run)
    try:
        for args in (["train", config, "--overwrite"], ["train", config, "--resume"],
                     ["analyze", config, "--overwrite"], ["analyze", run, "--what", "conflict", "--every", "1"]):
            assert_one_line_exit_2(cli(monkeypatch, capsys, *args), str(run), "in use by another polytask command",
                                   f"pid {holder.pid}")
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS releases the lock of a killed holder
        holder.wait()
    code, _, err = cli(monkeypatch, capsys, "train", config, "--resume", "--set", "train.epochs=2")
    assert code == 0, err


def test_lock_is_held_for_the_whole_run_and_released_after(tmp_path):
    run = tmp_path / "run"
    states = []

    def probe(trainer, step):
        fd = os.open(run / rundir.LOCK_NAME, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            states.append("free")
        except BlockingIOError:
            states.append("held")
        finally:
            os.close(fd)

    Trainer(_cfg(tmp_path), callbacks=[probe], progress=False).fit()
    assert states and set(states) == {"held"}
    probe(None, 0)
    assert states[-1] == "free"


# ----------------------------------------------------------------------------- 5. metrics.jsonl
def test_torn_last_metrics_line_is_absent_for_every_reader(tmp_path, monkeypatch, capsys):
    Trainer(_cfg(tmp_path), progress=False).fit()
    run = tmp_path / "run"
    path = run / "metrics.jsonl"
    whole = rundir.read_jsonl(path)
    with open(path, "a") as f:
        f.write('{"epoch": 3, "split": "val", "ta')  # a write cut by a kill
    assert rundir.read_jsonl(path) == whole
    code, out, err = cli(monkeypatch, capsys, "report", run)  # report reads it
    assert code == 0, err
    Trainer(_cfg(tmp_path, **{"train.epochs": 3}), progress=False).fit(resume=True)  # resume reads it
    rows = rundir.read_jsonl(path)
    assert {r["epoch"] for r in rows} == {0, 1, 2, 3} and path.read_text().endswith("\n")
    assert all(line.startswith("{") for line in path.read_text().splitlines())
    # a bad line before the last is corruption, not a torn write: named
    path.write_text('{"epoch": 0}\nnot json\n{"epoch": 1}\n')
    with pytest.raises(DataError, match="metrics.jsonl: line 2"):
        rundir.read_jsonl(path)


def test_metrics_epoch_is_one_append_write_of_whole_lines(tmp_path, monkeypatch):
    writes, flags = [], []
    real_write, real_open = os.write, os.open

    def spy_open(path, flag, *args, **kwargs):
        if str(path).endswith("metrics.jsonl"):
            flags.append(flag)
        return real_open(path, flag, *args, **kwargs)

    def spy_write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "write", spy_write)
    Trainer(_cfg(tmp_path), progress=False).fit()
    monkeypatch.undo()
    assert len(writes) == 3  # epochs 0, 1, 2: one write each
    assert all(f & os.O_APPEND for f in flags) and flags
    for data in writes:
        lines = data.decode().split("\n")
        assert lines[-1] == "" and all(json.loads(ln) for ln in lines[:-1])


def test_full_disk_while_appending_metrics_keeps_the_file_whole(tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, **{"train.epochs": 1}), progress=False)
    trainer.fit()
    path = tmp_path / "run" / "metrics.jsonl"
    before = path.read_bytes()
    real_write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            real_write(fd, bytes(data)[:7])  # part of it went to disk, then the disk was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*metrics.jsonl: No space left on device"):
        rundir.append_jsonl(path, [{"epoch": 9}])
    monkeypatch.undo()
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------- 6. full disk
def _safetensors_enospc(tensors, path):
    with open(path, "wb") as f:
        f.write(b"\0" * 64)
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_full_disk_while_checkpointing_one_line_previous_checkpoint_intact(tmp_path, monkeypatch, capsys):
    config = _yaml(tmp_path, **{"train.epochs": 1})
    assert cli(monkeypatch, capsys, "train", config)[0] == 0
    run = tmp_path / "run"
    weights = model_weights(run)
    monkeypatch.setattr(ckpt, "save_file", _safetensors_enospc)
    line = assert_one_line_exit_2(cli(monkeypatch, capsys, "train", config, "--resume", "--set", "train.epochs=2"),
                                  "cannot write", "No space left on device")
    in_checkpoint = "checkpoints/epoch-0002/" in line and "the checkpoint of epoch 1" in line
    assert in_checkpoint or "best/model.safetensors" in line
    monkeypatch.undo()
    epoch, parts = ckpt.load_checkpoint(run / "checkpoints")
    assert epoch == 1 and all(torch.equal(parts["model"][k], weights[k]) for k in weights)
    assert not partials(tmp_path)
    # the same through the model file and the text writer
    monkeypatch.setattr(ckpt, "save_file", _safetensors_enospc)
    with pytest.raises(CheckpointError, match=r"model.safetensors: No space left on device"):
        ckpt.save_model_file({"w": torch.zeros(3)}, run / "best" / "model.safetensors")
    monkeypatch.undo()
    assert not partials(tmp_path)


def _mount_tmpfs(path, size, *options):
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount command here")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()[:80]})")


@contextlib.contextmanager
def tmpfs(path, size="2m"):
    _mount_tmpfs(path, size)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_real_full_disk_on_a_small_tmpfs(tmp_path, monkeypatch, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs(tmp_path / "disk") as disk:
        config = _yaml(disk, **{"train.epochs": 1})
        assert cli(monkeypatch, capsys, "train", config)[0] == 0
        run = disk / "run"
        weights = model_weights(run)
        with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last block
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        line = assert_one_line_exit_2(cli(monkeypatch, capsys, "train", config, "--resume",
                                          "--set", "train.epochs=3"), "No space left on device")
        assert str(run) in line
        epoch, parts = ckpt.load_checkpoint(run / "checkpoints")
        assert epoch == 1 and all(torch.equal(parts["model"][k], weights[k]) for k in weights)
        assert not partials(disk)
        rundir.read_jsonl(run / "metrics.jsonl")  # still readable
        (disk / "filler").unlink()
        code, _, err = cli(monkeypatch, capsys, "train", config, "--resume", "--set", "train.epochs=3")
        assert code == 0, err


def test_read_only_run_directory(tmp_path, monkeypatch, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs(tmp_path / "disk") as disk:
        config = _yaml(disk, **{"train.epochs": 1})
        assert cli(monkeypatch, capsys, "train", config)[0] == 0
        (disk / "run" / rundir.LOCK_NAME).unlink()
        before = snapshot(disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert_one_line_exit_2(cli(monkeypatch, capsys, "train", config, "--resume", "--set", "train.epochs=2"),
                               str(disk / "run"), "not writable", "Read-only file system")
        assert_one_line_exit_2(cli(monkeypatch, capsys, "train", config, "--overwrite"), "not writable")
        assert snapshot(disk / "run") == before


def test_run_dir_that_cannot_be_created(tmp_path, monkeypatch, capsys):
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    assert_one_line_exit_2(cli(monkeypatch, capsys, "train", _yaml(tmp_path)), "cannot create run directory",
                           "Permission denied")


# ----------------------------------------------------------------------------- 7. kills
KILL_DRIVER = r"""
import json, os, sys
import torch  # imported once here; every run below is a forked child
torch.set_num_threads(1)
import hashlib
import polytask.data, polytask.nn, polytask.balance  # noqa: F401,E401
from polytask.errors import CheckpointError, PolytaskError
from polytask.report import plots
from polytask.train import Trainer, parse_config
from polytask.train import checkpoint as ck

# the figures' drawing is not what is tested (their write is): the PNGs go through the same atomic
# writer with a fixed content, which keeps the ~20 runs below fast
def _png(history, tasks, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return ck.atomic_write_bytes(path, path.name.encode())


plots.plot_task_curves = plots.plot_task_weights = _png

root, base, plan = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
KILLED = 77


def cfg(name, seed=1):
    return parse_config({**base, "name": name, "seed": seed, "out_dir": os.path.join(root, "{name}")})


def patch(point, nth):
    count = [0]

    def hit():
        count[0] += 1
        return count[0] == nth

    if point == "tensors":  # a checkpoint's tensor file half written
        real = ck.save_file

        def save_file(tensors, path):
            if hit():
                with open(path, "wb") as f:
                    f.write(b"\0" * 100)
                os._exit(KILLED)
            return real(tensors, path)
        ck.save_file = save_file
    elif point == "checkpoint-rename":  # the checkpoint folder complete, not yet renamed
        real_rename = os.rename

        def rename(src, dst, *a, **k):
            if "epoch-" in str(dst) and hit():
                os._exit(KILLED)
            return real_rename(src, dst, *a, **k)
        os.rename = rename
    elif point == "metrics":  # the epoch's lines half written
        real_write = os.write

        def write(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl") and hit():
                real_write(fd, bytes(data)[: len(data) // 2])
                os._exit(KILLED)
            return real_write(fd, data)
        os.write = write
    else:  # a file's temporary copy complete, not yet renamed onto it
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if str(dst).endswith(point) and hit():
                os._exit(KILLED)
            return real_replace(src, dst, *a, **k)
        os.replace = replace


def child(fn):
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except PolytaskError as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            code = 2
        except BaseException as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            code = 3
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def next_command(name):  # what a user runs after a kill: --resume, or --overwrite when nothing to resume
    def run():
        try:
            Trainer(cfg(name), progress=False).fit(resume=True)
        except CheckpointError:
            Trainer(cfg(name), progress=False).fit(overwrite=True)
    return run


Trainer(cfg("warm-up"), progress=False).fit()  # lazy imports and first calls, once (1 thread: fork-safe)
out = {}
for step in plan:
    name, kind = step["name"], step["kind"]
    if kind == "snapshot":
        run = os.path.join(root, name)
        out[f"{name}-snapshot"] = {os.path.relpath(os.path.join(d, f), run): hashlib.sha256(
            open(os.path.join(d, f), "rb").read()).hexdigest() for d, _, fs in os.walk(run) for f in fs if f != ".lock"}
    elif kind == "fit":
        out[name] = child(lambda: Trainer(cfg(name, step.get("seed", 1)), progress=False).fit())
    elif kind == "kill":
        def killed():
            patch(step["point"], step["nth"])
            Trainer(cfg(name, step.get("seed", 1)), progress=False).fit(overwrite=step.get("overwrite", False))
        out[name] = {"killed": child(killed),
                     "left": sorted(os.listdir(root))}
        if step.get("then", "next") == "next":
            out[name]["next"] = child(next_command(name))
        else:
            out[name]["next"] = child(lambda: Trainer(cfg(name), progress=False).fit())
print(json.dumps(out))
"""

KILL_POINTS = [  # (point, nth call): every place a checkpointing run writes a file
    ("metrics", 2),  # epoch 1's lines torn, no checkpoint yet
    ("metrics", 3),  # epoch 2's lines torn, checkpoint 1 there
    ("tensors", 8),  # second checkpoint, a tensor file half written
    ("checkpoint-rename", 2),  # second checkpoint complete under its temporary name
    ("latest.json", 2),  # epoch-0002 in place, the pointer still at 1
    ("model.safetensors", 1),  # best model of epoch 1
    ("metrics.json", 2),  # best/metrics.json
    ("config.yaml", 1),  # the run's config, first thing written
    ("summary.md", 1),  # after the last checkpoint
    ("curves.png", 1),  # its figure
]


def test_kill_at_each_checkpoint_write_point_resumes_and_leaves_nothing(tmp_path):
    base = {k: v for k, v in TINY.items() if k != "name"}
    base["train"] = {**base["train"], "epochs": 3}
    plan = [{"name": "full", "kind": "fit"}]
    plan += [{"name": f"{p}-{n}", "kind": "kill", "point": p, "nth": n} for p, n in KILL_POINTS]
    # an --overwrite killed before its first checkpoint: the next plain command restores the old run
    plan += [{"name": "ow", "kind": "fit"}, {"name": "ow", "kind": "snapshot"},
             {"name": "ow", "kind": "kill", "point": "metrics", "nth": 1, "overwrite": True, "seed": 4,
              "then": "new"}]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(tmp_path), json.dumps(base), json.dumps(plan)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["full"] == 0
    full = rundir.read_jsonl(tmp_path / "full" / "metrics.jsonl")
    full_weights = model_weights(tmp_path / "full")
    for point, nth in KILL_POINTS:
        name = f"{point}-{nth}"
        run = tmp_path / name
        assert out[name]["killed"] == 77, (name, "the kill point was not reached")
        assert out[name]["next"] == 0, (name, res.stderr[-2000:])
        assert not partials(run), (name, partials(run))
        assert rundir.read_jsonl(run / "metrics.jsonl") == full, name  # same as the uninterrupted run
        weights = model_weights(run)
        assert all(torch.equal(weights[k], full_weights[k]) for k in full_weights), name
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0003", "latest.json"], name
    # killed --overwrite: the old run was aside (recoverable), then restored whole by the next command
    ow = tmp_path / "ow"
    assert out["ow"]["killed"] == 77 and ".ow.previous" in out["ow"]["left"]
    assert out["ow"]["next"] == 2 and "already holds a run" in res.stderr  # restored, then refused as a run
    assert out["ow-snapshot"] and snapshot(ow) == out["ow-snapshot"]
    assert not rundir.aside_path(ow).exists() and not partials(tmp_path)


def test_stale_partials_of_ours_are_cleaned_and_nothing_else(tmp_path):
    Trainer(_cfg(tmp_path, **{"train.epochs": 1}), progress=False).fit()
    run = tmp_path / "run"
    ours = [run / ".config.yaml.abc123.partial", run / "best" / ".model.safetensors.x1.partial",
            run / "checkpoints" / ".tmp-zz.partial", run / "checkpoints" / ".tmp-old"]
    theirs = [run / "notes.partial", run / "checkpoints" / "tmp-keep", run / ".hidden"]
    for p in ours + theirs:
        if "tmp-" in p.name:
            p.mkdir()
        else:
            p.write_text("x")
    Trainer(_cfg(tmp_path, **{"train.epochs": 2}), progress=False).fit(resume=True)
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs)


# ----------------------------------------------------------------------------- 8. umask
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_and_folders_get_the_process_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        Trainer(_cfg(tmp_path, **{"train.epochs": 1}), progress=False).fit()
    finally:
        os.umask(old)
    run = tmp_path / "run"
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    for rel in ("config.yaml", "metrics.jsonl", "summary.md", "best/model.safetensors", "best/metrics.json",
                "plots/curves.png", "checkpoints/latest.json", "checkpoints/epoch-0001/model.safetensors",
                "checkpoints/epoch-0001/trainer.json"):
        assert stat.S_IMODE((run / rel).stat().st_mode) == want_file, rel
    for rel in ("checkpoints/epoch-0001", "best", "plots"):
        assert stat.S_IMODE((run / rel).stat().st_mode) == want_dir, rel


# ----------------------------------------------------------------------------- 9. messages
def test_nan_message_says_when_no_checkpoint_exists(tmp_path):
    def poison(trainer, step):
        if step == 1:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.fill_(float("nan"))

    with pytest.raises(TrainingError) as exc:
        Trainer(_cfg(tmp_path), callbacks=[poison], progress=False).fit()
    message = str(exc.value)
    assert "no checkpoint has been written yet" in message and "last good checkpoint" not in message
    assert len(message.splitlines()) == 1


def test_state_dict_mismatch_names_the_tensors(tmp_path):
    Trainer(_cfg(tmp_path, **{"train.epochs": 1}), progress=False).fit()
    _, parts = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints")
    other = Trainer(_cfg(tmp_path, **{"model.params.bottom": [16]}), progress=False)
    with pytest.raises(CheckpointError) as exc:
        other.load_state(parts)
    message = str(exc.value)
    assert len(message.splitlines()) == 1
    assert "bottom" in message and "(16, 8)" in message and "(8, 8)" in message
    parts["model"]["extra.weight"] = torch.zeros(2)
    del parts["model"][next(iter(parts["model"]))]
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) .*unexpected tensor\(s\) extra.weight"):
        other.load_state(parts)


def test_analyze_run_dir_with_a_mismatching_best_model_names_the_tensor(tmp_path, monkeypatch, capsys):
    Trainer(_cfg(tmp_path, **{"train.epochs": 1}), progress=False).fit()
    run = tmp_path / "run"
    stored = yaml.safe_load((run / "config.yaml").read_text())
    stored["model"]["params"]["tower"] = [6]
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    assert_one_line_exit_2(cli(monkeypatch, capsys, "analyze", run, "--what", "conflict", "--every", "1"),
                           "model.safetensors", "does not fit the model", "shape of")


def test_report_out_errors_and_no_leftover(tmp_path, monkeypatch, capsys):
    Trainer(_cfg(tmp_path, **{"train.epochs": 1}), progress=False).fit()
    run = tmp_path / "run"
    folder = tmp_path / "somewhere"
    folder.mkdir()
    assert_one_line_exit_2(cli(monkeypatch, capsys, "report", run, "--out", folder), "is a folder")
    assert_one_line_exit_2(cli(monkeypatch, capsys, "report", run, "--out", tmp_path / "nope" / "r.html"),
                           "does not exist")
    real_write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(ckpt.PARTIAL):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    assert_one_line_exit_2(cli(monkeypatch, capsys, "report", run, "--out", folder / "r.html"), "r.html",
                           "No space left on device")
    monkeypatch.undo()
    assert list(folder.iterdir()) == []  # neither r.html nor r.html.tmp nor a partial
    code, _, err = cli(monkeypatch, capsys, "report", run, "--out", folder / "r.html")
    assert code == 0, err
    assert [p.name for p in folder.iterdir()] == ["r.html"]


# ----------------------------------------------------------------------------- 10. no labels
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_task_without_labelled_rows_in_a_split_is_refused(tmp_path, split):
    from polytask import data

    splits = data.load("synthetic", num_tasks=2, num_rows=240, input_dim=8)
    part = getattr(splits, split)
    part.masks["task1"] = torch.zeros(len(part), dtype=torch.bool)
    with pytest.raises(DataError, match=rf"no labelled rows for task 'task1' in the {split} split"):
        Trainer(_cfg(tmp_path), splits=splits, progress=False)
    part.masks["task1"][0] = True  # one labelled row is enough
    Trainer(_cfg(tmp_path), splits=splits, progress=False)
