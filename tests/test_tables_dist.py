"""Table data on two gloo processes (one machine, a file rendezvous) against one process: every row once, same step
counts, vocabularies counted by the ranks in disjoint shares and equal to one process's (vocab.json byte for byte),
and evaluation metrics (AUC, log-loss, GAUC) equal to one process's over the whole split."""

from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from _ranks import run_ranks
import torch
import yaml

pytest.importorskip("pyarrow")

from polytask.train.config import parse_config  # noqa: E402
from polytask.train.tables import write_synthetic_splits  # noqa: E402

WORKER = r'''
import os, pickle, sys
import torch, torch.distributed as dist
import polytask.data.tables as tables
from polytask.nn import build_model
from polytask.train.config import parse_config
from polytask.train.dist import DistContext
from polytask.train.tables import evaluate_stream, table_splits

cfg_dict, out = pickle.load(open(sys.argv[1], "rb")), sys.argv[2]
calls, counted = [], []
real, real_count = tables.build_vocabularies, tables.count_ids
tables.build_vocabularies = lambda *a, **k: calls.append(1) or real(*a, **k)


def count_ids(paths, columns, batch_rows=65536, shard=(0, 1), csv=None):
    units = tables.vocabulary_units(paths, columns, csv)
    mine = tables.balanced_shares([u[2] for u in units], shard[1])[shard[0]]
    counted.extend((str(units[i][0]), units[i][1]) for i in mine)
    return real_count(paths, columns, batch_rows, shard, csv)


tables.count_ids = count_ids
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
ctx = DistContext()
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, group=dist.group.WORLD, backend="gloo")
cfg = parse_config(cfg_dict)
splits = table_splits(cfg, ctx)
rows, steps = [], []
for epoch in range(2):
    splits.train.set_epoch(epoch)
    n = 0
    for b in splits.train.batches(cfg.train.batch_size, shard=(rank, world) if world > 1 else None):
        n += 1
        for i in range(len(b.targets["click"])):
            rows.append((epoch, *b.inputs["dense"][i].tolist(), int(b.inputs["user_id"][i]),
                         int(b.inputs["item_id"][i]), float(b.targets["click"][i]), bool(b.mask["click"][i])))
    steps.append(n)
torch.manual_seed(0)
model = build_model("mmoe", splits.input_spec, splits.tasks, num_experts=2)
metrics = [evaluate_stream(model, s, splits.tasks, 97) for s in (splits.val, splits.test)]
vocab = splits.encoders["user_id"].values
os.makedirs(out + ".run")
splits.save(out + ".run")
vocab_json = open(out + ".run/vocab.json", "rb").read()
with open(out, "wb") as fh:
    pickle.dump({"rows": rows, "steps": steps, "metrics": metrics, "vocab_builds": len(calls), "vocab": vocab,
                 "vocab_json": vocab_json, "counted": counted}, fh)
if world > 1:
    dist.barrier()
    os._exit(0)  # as polytask's own workers: gloo's teardown at interpreter exit can abort (SIGABRT)
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # small row groups: about 9 train units, dealt unevenly to 2 ranks (their shards differ)
    return write_synthetic_splits(tmp_path_factory.mktemp("log"), 2000, row_group_rows=170)


def _config(paths, out) -> dict:
    p = {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "dense": ["price", "hour"],
         "ids": {"user_id": {"min_count": 2}, "item_id": {"hash": 64}, "category": {}},
         "labels": {"click": "click", "conversion": "conversion"}, "group": "user_id", "embed_dim": 4,
         "shuffle_rows": 300}
    return {"name": "d", "out_dir": str(out), "device": "cpu", "seed": 5, "data": {"name": "table", "params": p},
            "model": {"arch": "mmoe", "params": {"num_experts": 2}},
            "train": {"epochs": 1, "batch_size": 64, "eval_batch_size": 97, "early_stopping": None}}


def _run(tmp_path: Path, cfg: dict, world: int) -> list[dict]:
    script, conf = tmp_path / "worker.py", tmp_path / f"cfg{world}.pkl"
    script.write_text(WORKER)
    conf.write_bytes(pickle.dumps(cfg))
    return run_ranks(script, world, [str(conf)])


def test_two_ranks_see_every_row_once_and_evaluate_like_one_process(data, tmp_path):
    cfg = _config(data, tmp_path / "r")
    (one,) = _run(tmp_path, cfg, 1)
    two = _run(tmp_path, cfg, 2)
    # every row of each epoch once over the two ranks (a multiset: equal rows are counted)
    assert collections.Counter(two[0]["rows"] + two[1]["rows"]) == collections.Counter(one["rows"])
    assert len(one["rows"]) == 2 * pq_rows(data[0])
    # the ranks' shards differ, yet both ran the same number of steps (the shorter one padded)
    per_rank = [collections.Counter(r[0] for r in res["rows"]) for res in two]
    assert per_rank[0] != per_rank[1]
    assert two[0]["steps"] == two[1]["steps"]
    # every rank counted a disjoint share of the units (together all of them, one pass) and built the
    # vocabulary of one process, byte for byte in vocab.json
    assert one["vocab_builds"] == two[0]["vocab_builds"] == two[1]["vocab_builds"] == 1
    assert two[0]["counted"] and two[1]["counted"] and not set(two[0]["counted"]) & set(two[1]["counted"])
    assert sorted(two[0]["counted"] + two[1]["counted"]) == sorted(one["counted"])
    assert two[0]["vocab"] == two[1]["vocab"] == one["vocab"]
    assert two[0]["vocab_json"] == two[1]["vocab_json"] == one["vocab_json"]
    # the same model evaluated on 2 ranks: one process's metrics over the whole split
    for got in (two[0]["metrics"], two[1]["metrics"]):
        for split_one, split_two in zip(one["metrics"], got):
            for task, m in split_one.items():
                assert set(m) >= {"auc", "logloss", "gauc"}
                for key, value in m.items():
                    assert split_two[task][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (task, key)


def pq_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


@pytest.mark.slow
def train_nproc(cfg: dict, tmp_path, n: int) -> list[dict]:
    """``polytask train --nproc n`` on ``cfg`` (written to ``tmp_path/c<n>.yaml``); the lines of its
    run's metrics.jsonl (the run directory is ``tmp_path/n<n>``)."""
    path = tmp_path / f"c{n}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", POLYTASK_DIST_TIMEOUT="60")
    proc = subprocess.run([sys.executable, "-m", "polytask", "train", str(path), "--nproc", str(n)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in (tmp_path / f"n{n}" / "metrics.jsonl").read_text().splitlines()]


def test_polytask_train_nproc_2_on_tables_matches_one_process_at_epoch_0(data, tmp_path):
    # the untrained model (rank 0's initialisation, broadcast) scores the same on 1 and 2 processes
    runs = {}
    for n in (1, 2):
        cfg = _config(data, tmp_path / f"n{n}")
        lines = train_nproc(cfg, tmp_path, n)
        runs[n] = [r for r in lines if r["epoch"] == 0]
        assert (tmp_path / f"n{n}" / "vocab.json").is_file()
    assert len(runs[1]) == len(runs[2]) > 0
    for a, b in zip(runs[1], runs[2]):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a, b)
    parse_config(yaml.safe_load((tmp_path / "n2" / "config.yaml").read_text()))
