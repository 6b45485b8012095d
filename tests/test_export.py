"""`polytask export`: the served program (torch.export, with the id lookups inside) equals `polytask predict`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from typer.testing import CliRunner  # noqa: E402

from polytask.cli import app  # noqa: E402
from polytask.data.tables import HashBuckets, Vocabulary, stable_hash  # noqa: E402
from polytask.errors import ConfigError  # noqa: E402
from polytask.export import (  # noqa: E402
    BucketLookup, VocabularyLookup, fmix64, load_serving, serving_inputs, unsigned_mod)
from polytask.train import Trainer  # noqa: E402
from polytask.train.config import parse_config  # noqa: E402
from polytask.train.tables import write_synthetic_splits  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    paths = write_synthetic_splits(tmp_path_factory.mktemp("log"), 3000, row_group_rows=500)
    out = tmp_path_factory.mktemp("runs") / "r"
    p = {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "dense": ["price", "hour"],
         "ids": {"user_id": {"min_count": 2}, "item_id": {"hash": 256}, "category": {}},
         "labels": {"click": "click", "conversion": "conversion"}, "embed_dim": 4, "shuffle_rows": 700}
    cfg = parse_config({"name": "t", "out_dir": str(out), "device": "cpu", "seed": 1,
                        "data": {"name": "table", "params": p}, "model": {"arch": "ple", "params": {}},
                        "train": {"epochs": 1, "batch_size": 128, "eval_batch_size": 500, "early_stopping": None}})
    Trainer(cfg, progress=False).fit()
    return paths, out


def test_int64_fmix_and_unsigned_mod_equal_hash_buckets():
    # hard cases: hashes with the top bit set (negative as int64), the empty string, long keys, 1 bucket
    vals = pa.array([f"v{i}" for i in range(3000)] + ["", "x" * 50, "é"])
    h = torch.from_numpy(stable_hash(vals).view(np.int64))
    assert (h < 0).any() and (h > 0).any()
    for buckets in (1, 2, 7, 1000, 1 << 18, (1 << 31) - 1):
        want = HashBuckets(buckets).encode(vals)
        assert (unsigned_mod(fmix64(h), buckets).numpy() == want).all(), buckets
        assert (BucketLookup(buckets)(h).numpy() == want).all()
    # hand case: fmix64(0) = 0, and uint64 2**64 - 1 (int64 -1) % 10 = 5 (18446744073709551615 ends in 5)
    assert fmix64(torch.tensor([0])).item() == 0
    assert unsigned_mod(torch.tensor([-1]), 10).item() == 5


def test_vocabulary_lookup_module_equals_encode_with_oov_and_empty():
    v = Vocabulary("c", ["b", "a", "zz", "7"])
    vals = pa.array(["a", "nope", "7", "zz", "", "b", "a"])
    got = VocabularyLookup(*v.lookup_table())(torch.from_numpy(stable_hash(vals).view(np.int64)))
    assert got.tolist() == [2, 0, 4, 3, 0, 1, 2] == v.encode(vals).tolist()
    empty = Vocabulary("c", [])
    assert VocabularyLookup(*empty.lookup_table())(torch.tensor([1, -5])).tolist() == [0, 0]


def test_exported_program_equals_predict_with_unseen_ids(run, tmp_path):
    paths, out = run
    t = pq.read_table(paths[2]).slice(0, 257).drop(["click", "conversion"])
    users, items = t["user_id"].to_pylist(), t["item_id"].to_pylist()
    users[3], users[4], items[5] = "never-seen", None, "new-item"  # OOV, a missing id, an unseen hashed id
    t = t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array(users))
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(items))
    src = tmp_path / "in.parquet"
    pq.write_table(t, src)
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(out), str(src), str(tmp_path / "p.parquet")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(out), str(tmp_path / "m.pt2")])
    assert res.exit_code == 0, res.output
    program, meta = load_serving(tmp_path / "m.pt2")
    assert meta["dense"] == ["price", "hour"] and meta["ids"] == ["user_id", "item_id", "category"]
    assert meta["tasks"] == ["click", "conversion"]
    dense, ids = serving_inputs(t, meta["dense"], meta["ids"])
    module = program.module()
    got = module(dense, ids)
    want = pq.read_table(tmp_path / "p.parquet")
    for task in meta["tasks"]:
        np.testing.assert_allclose(got[task].numpy(), want[task].to_numpy(), rtol=1e-6, atol=1e-7)
    # other batch sizes (dynamic N), one row included; the OOV rows really differ from a known id's
    one = module(dense[3:4], ids[3:4])
    np.testing.assert_allclose(one["click"].numpy(), want["click"].to_numpy()[3:4], rtol=1e-6, atol=1e-7)
    known = ids.clone()
    known[3, 0] = ids[0, 0]
    assert not torch.allclose(module(dense, known)["click"][3], got["click"][3])
    assert not any(".tmp" in p.name for p in tmp_path.iterdir())


def test_export_refuses_a_non_table_run_and_writes_nothing(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\ndata: {name: synthetic}\nmodel: {arch: mmoe}\n")
    res = CliRunner().invoke(app, ["export", str(tmp_path), str(tmp_path / "m.pt2")])
    assert isinstance(res.exception, ConfigError) and "data.name is 'synthetic'" in str(res.exception)
    assert not (tmp_path / "m.pt2").exists()
    res = CliRunner().invoke(app, ["export", str(tmp_path), str(tmp_path / "no" / "m.pt2")])
    assert isinstance(res.exception, ConfigError) and "no folder" in str(res.exception)


def test_exported_sequence_columns_equal_predict(tmp_path):
    # a run with a list column (hashed and vocabulary-encoded lists), exported and compared with predict
    paths = write_synthetic_splits(tmp_path / "log", 1500, row_group_rows=500)
    rng = np.random.default_rng(1)
    for path in paths:
        t = pq.read_table(path)
        items = t["item_id"].to_pylist()
        hist = [None if k == 0 else [items[j] for j in rng.integers(0, len(items), k)]
                for k in rng.integers(0, 8, t.num_rows)]
        t = t.append_column("hist", pa.array(hist, pa.list_(pa.string())))
        pq.write_table(t.append_column("hist_h", t["hist"]), path)
    p = {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "dense": ["price"],
         "ids": {"user_id": {"min_count": 2}, "hist": {"min_count": 2, "sequence": {"max_len": 5}},
                 "hist_h": {"hash": 97, "sequence": {"max_len": 3, "pooling": "sum"}}},
         "labels": {"click": "click"}, "embed_dim": 4, "shuffle_rows": 500}
    cfg = parse_config({"name": "s", "out_dir": str(tmp_path / "r"), "device": "cpu", "seed": 2,
                        "data": {"name": "table", "params": p}, "model": {"arch": "mmoe", "params": {}},
                        "train": {"epochs": 1, "batch_size": 128, "early_stopping": None}})
    Trainer(cfg, progress=False).fit()
    t = pq.read_table(paths[2]).slice(0, 90)
    h = t["hist"].to_pylist()
    h[0], h[1] = ["never-seen", None, h[2][0] if h[2] else "x"], []
    t = t.set_column(t.schema.get_field_index("hist"), "hist", pa.array(h, pa.list_(pa.string())))
    pq.write_table(t, tmp_path / "in.parquet")
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(tmp_path / "r"), str(tmp_path / "in.parquet"), str(tmp_path / "p.parquet")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(tmp_path / "r"), str(tmp_path / "m.pt2")])
    assert res.exit_code == 0, res.output
    program, meta = load_serving(tmp_path / "m.pt2")
    assert meta["ids"] == ["user_id"] and meta["sequences"] == {"hist": 5, "hist_h": 3}
    got = program.module()(*serving_inputs(t, meta["dense"], meta["ids"], meta["sequences"]))
    want = pq.read_table(tmp_path / "p.parquet")["click"].to_numpy()
    np.testing.assert_allclose(got["click"].numpy(), want, rtol=1e-6, atol=1e-7)
