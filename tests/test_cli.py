"""The command line: exit status 2 and one line for user errors, fast start, train end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "polytask.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_import_does_not_load_torch():
    code = "import sys, polytask.cli; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_help_lists_commands():
    res = run("--help")
    assert res.returncode == 0
    for cmd in ("demo", "train", "analyze", "report", "merge", "bench"):
        assert cmd in res.stdout


@pytest.mark.parametrize("content, message", [
    ("train: {epochz: 2}\n", "unknown key 'train.epochz'"),
    ("model: {arch: nope}\n", "unknown architecture 'nope'"),
    ("data: {name: digits, tasks: [colour]}\n", "unknown task(s) 'colour'"),
    ("[1, 2\n", "not valid YAML"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, content, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    res = run("train", str(cfg), "--set", f"out_dir={tmp_path}/run", "--device", "cpu")
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_checkpoint_on_resume_exits_2(tmp_path):
    res = run("train", str(ROOT / "examples/digits_shared_bottom.yaml"), "--resume", "--device", "cpu",
              "--set", f"out_dir={tmp_path}/run")
    assert res.returncode == 2 and "latest.json" in res.stderr


def test_train_example_config_with_overrides(tmp_path):
    res = run("train", str(ROOT / "examples/digits_shared_bottom.yaml"), "--device", "cpu",
              "--set", "train.epochs=2", "--set", f"out_dir={tmp_path}/{{name}}")
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "digits-sb"
    assert "| digit | accuracy" in res.stdout and str(run_dir) in res.stdout
    epochs = {json.loads(l)["epoch"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert epochs == {0, 1, 2}


def test_train_refuses_to_overwrite_an_existing_run(tmp_path):
    args = ["train", str(ROOT / "examples/digits_shared_bottom.yaml"), "--device", "cpu",
            "--set", "train.epochs=1", "--set", f"out_dir={tmp_path}/run"]
    assert run(*args).returncode == 0
    latest = (tmp_path / "run/checkpoints/latest.json").read_text()
    res = run(*args)
    assert res.returncode == 2 and "--resume" in res.stderr and "--overwrite" in res.stderr
    assert (tmp_path / "run/checkpoints/latest.json").read_text() == latest  # nothing lost
    assert run(*args, "--overwrite").returncode == 0
