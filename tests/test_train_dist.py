"""More than one process (train/dist.py): gloo on 127.0.0.1, 2 processes, against 1 process.

Each multi-process run is a real ``polytask train --nproc 2`` (torchrun's elastic launcher) or two
``torchrun --nnodes 2`` processes; the reference is the same config in one process. Equality is
on the final parameters (float32, tight tolerance: the only difference is the order of the
gradient sums over ranks) and on the metrics over whole splits (AUC, log-loss, accuracy, MAE).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from polytask.errors import ConfigError
from polytask.train import dist as dist_lib
from polytask.train import parse_config
from polytask.train.checkpoint import load_checkpoint

TIMEOUT = 180


def _config(tmp_path: Path, name: str, **over) -> Path:
    cfg = {
        "name": name, "seed": 3, "device": "cpu", "out_dir": str(tmp_path / "{name}"),
        "data": {"name": "digits"},
        "model": {"arch": "shared_bottom", "params": {"bottom": [32], "tower": [16], "dropout": 0.0}},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.5},
        "train": {"epochs": 3, "batch_size": 64, "early_stopping": None},
    }
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", POLYTASK_DIST_TIMEOUT="60")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE"):
        env.pop(key, None)
    return env


def _train(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "polytask", "train", str(config), *args], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints")[1]["model"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path, atol: float = 2e-4) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=1e-3, msg=k)
    ma, mb = _metrics(a), _metrics(b)
    assert [(r["epoch"], r["split"], r["task"]) for r in ma] == [(r["epoch"], r["split"], r["task"]) for r in mb]
    for ra, rb in zip(ma, mb):
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (ra, rb)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 3 epochs: the run every multi-process run must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    _train(_config(tmp, "one"))
    return tmp / "one"


# ---------------------------------------------------------------------------- equality with one process
def test_two_processes_equal_one_process(reference, tmp_path):
    proc = _train(_config(tmp_path, "two"), "--nproc", "2")
    run = tmp_path / "two"
    _assert_same_run(reference, run)
    # the whole-split metrics really were computed (AUC of a binary task, accuracy of the 10-class one)
    last = {(r["split"], r["task"]): r for r in _metrics(run) if r["epoch"] == 3}
    assert 0.5 < last[("test", "odd")]["auc"] <= 1.0 and 0.0 <= last[("val", "digit")]["accuracy"] <= 1.0
    # rank 0 alone wrote the run directory and printed the table (once)
    assert proc.stdout.count("best epoch") == 1
    assert not list(run.glob("**/.tmp*"))


def test_resume_two_to_one_and_one_to_two(reference, tmp_path):
    # 2 processes for 2 epochs, then 1 process continues to 3
    _train(_config(tmp_path, "a", **{"train.epochs": 2}), "--nproc", "2")
    _train(_config(tmp_path, "a"), "--resume")
    _assert_same_run(reference, tmp_path / "a")
    # 1 process for 2 epochs, then 2 processes continue to 3
    _train(_config(tmp_path, "b", **{"train.epochs": 2}))
    _train(_config(tmp_path, "b"), "--resume", "--nproc", "2")
    _assert_same_run(reference, tmp_path / "b")


def test_torchrun_two_nodes_over_localhost(reference, tmp_path):
    """Two torchrun processes (--nnodes 2 --nproc-per-node 1) meeting through c10d on 127.0.0.1."""
    config = _config(tmp_path, "nodes")
    port = _free_port()
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "polytask-test",
            "--local-addr", "127.0.0.1", "--max-restarts", "0", "-m", "polytask", "train", str(config)]
    procs = [subprocess.Popen(base, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sum(o[0].count("best epoch") for o in outs) == 1  # only global rank 0 prints
    _assert_same_run(reference, tmp_path / "nodes")


def test_mismatched_configs_across_ranks_name_the_rank(tmp_path):
    config = _config(tmp_path, "mismatch", **{"train.epochs": 1})
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "polytask-mismatch",
           "--local-addr", "127.0.0.1", "--max-restarts", "0", "-m", "polytask", "train", str(config)]
    # the two "nodes" start with different overrides: whichever becomes rank 1 differs from rank 0
    procs = [subprocess.Popen(cmd + ["--set", f"optim.lr={lr}"], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for lr in (0.05, 0.01)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    errors = [line for o in outs for line in o[1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 1" in errors[0] and "differs from rank 0" in errors[0], errors
    assert not (tmp_path / "mismatch" / "checkpoints").exists()


# ---------------------------------------------------------------------------- precision, FSDP
def test_bf16_two_processes_finish_finite(tmp_path):
    _train(_config(tmp_path, "bf16", **{"train.precision": "bf16", "train.epochs": 2}), "--nproc", "2")
    rows = _metrics(tmp_path / "bf16")
    values = [v for r in rows for k, v in r.items() if k not in ("epoch", "split", "task")]
    assert values and all(v is not None and v == v for v in values)
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path / "bf16").values())


@pytest.mark.parametrize("balancer", [
    {"name": "famo"},                                   # loss-based, with state and a post-step pass
    {"name": "mgda", "params": {"mode": "features"}},  # Gramian at feature level
])
def test_fsdp_equals_one_process(balancer, tmp_path):
    over = {"balancer": balancer, "train.epochs": 2}
    _train(_config(tmp_path, "one", **over))
    _train(_config(tmp_path, "fsdp", **over, **{"train.strategy": "fsdp"}), "--nproc", "2")
    _assert_same_run(tmp_path / "one", tmp_path / "fsdp")


# ---------------------------------------------------------------------------- bad input
def test_world_size_must_divide_the_batch(tmp_path):
    proc = _train(_config(tmp_path, "odd", **{"train.batch_size": 63}), "--nproc", "2", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: train.batch_size: 63 is not divisible by the world size 2 (each rank reads batch_size / world "
        "size rows of every global batch)"]
    assert not (tmp_path / "odd").exists()


@pytest.mark.parametrize(("key", "value"), [("train.strategy", "zero3"), ("train.precision", "fp8"),
                                            ("train.accumulate", 0)])
def test_unknown_strategy_precision_accumulate_are_config_errors(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"^config: {key}: "):
        parse_config({section: {name: value}})


def test_fp16_without_cuda_and_unsupported_accumulation_are_refused(tmp_path):
    from polytask.train import Trainer

    cfg = parse_config(yaml.safe_load(_config(tmp_path, "fp16", **{"train.precision": "fp16"}).read_text()))
    with pytest.raises(ConfigError, match=r"^train\.precision: fp16 needs a CUDA device"):
        Trainer(cfg, progress=False)
    cfg = parse_config(yaml.safe_load(_config(tmp_path, "acc", **{"train.accumulate": 2}).read_text()))
    with pytest.raises(ConfigError, match=r"^train\.accumulate: 2 micro-batches"):
        Trainer(cfg, progress=False)


def test_a_rank_that_dies_stops_the_run_with_one_line_and_keeps_the_checkpoint(tmp_path):
    config = _config(tmp_path, "dies", **{"train.epochs": 200})
    launcher = subprocess.Popen([sys.executable, "-m", "polytask", "train", str(config), "--nproc", "2"],
                                env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "dies" / "checkpoints" / "latest.json"
    deadline = time.time() + TIMEOUT
    while not latest.exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.2)
    assert latest.exists(), launcher.communicate()[1][-2000:]
    victim = next(pid for pid in _children(launcher.pid) if _environ(pid).get("RANK") == "1")
    os.kill(victim, signal.SIGKILL)
    _, err = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 was killed by SIGKILL"), err[-2000:]
    epoch, parts = load_checkpoint(tmp_path / "dies" / "checkpoints")  # intact, loadable
    assert epoch >= 1 and "model" in parts


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(c) for c in text)
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


# ---------------------------------------------------------------------------- pieces
@pytest.mark.parametrize(("rows", "world"), [(64, 2), (7, 2), (5, 4), (1, 3), (0, 2)])
def test_shards_are_disjoint_contiguous_and_cover_the_batch(rows, world):
    bounds = [dist_lib.shard_bounds(rows, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_dataset_shard_slices_each_global_batch():
    from polytask.data.dataset import MultiTaskDataset

    ds = MultiTaskDataset(torch.arange(10.0).unsqueeze(1), {"t": torch.arange(10.0)})
    full = [b.inputs.squeeze(1).tolist() for b in ds.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0))]
    parts = [[b.inputs.squeeze(1).tolist() for b in ds.batches(4, shuffle=True, shard=(r, 2),
                                                               generator=torch.Generator().manual_seed(0))]
             for r in range(2)]
    assert [a + b for a, b in zip(*parts)] == full  # rank 0's slice then rank 1's: the global batch
    assert [len(p) for p in parts[0]] == [2, 2, 1] and [len(p) for p in parts[1]] == [2, 2, 1]
