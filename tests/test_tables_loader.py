"""The fast paths of the table loader: FNV-1a over length-sorted strings against the byte-by-byte definition,
batches gathered from a window's blocks against the documented order (the window permuted by its seeded
permutation, then cut), and one gather per block (id columns of a batch share one storage)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from polytask.data.encoders import HashBuckets, SequenceIds, Vocabulary, _fnv1a, stable_hash  # noqa: E402
from polytask.data.tables import TableSchema, TableSource  # noqa: E402
from polytask.errors import ConfigError  # noqa: E402

_PRIME, _MASK = 0x100000001B3, (1 << 64) - 1


def _fnv1a_bytes(data: bytes, seed: int = 0) -> int:
    """FNV-1a 64 as published (Fowler, Noll, Vo): h = offset ^ seed; per byte h = (h xor b) * prime mod 2^64."""
    h = 0xCBF29CE484222325 ^ seed
    for b in data:
        h = ((h ^ b) * _PRIME) & _MASK
    return h


@pytest.mark.parametrize("seed", [0, 12345])
def test_vectorised_fnv1a_equals_the_byte_by_byte_definition(seed):
    rng = np.random.default_rng(0)
    words = ["", "a", "ab", "héllo", "日本語", "x" * 70_000, "zz",
             *(f"c0_{v}" for v in rng.integers(0, 10**7, 300))]
    got = _fnv1a(pa.array(words), seed)
    assert got.tolist() == [_fnv1a_bytes(w.encode(), seed) for w in words]
    # an array slice (a non-zero offset into the buffers), and no string at all
    part = pa.array(["skip", "ab", "abc", "tail"]).slice(1, 2)
    assert _fnv1a(part, seed).tolist() == [_fnv1a_bytes(b"ab", seed), _fnv1a_bytes(b"abc", seed)]
    assert _fnv1a(pa.array([], pa.string()), seed).tolist() == []
    # a dictionary column (as read from Parquet) hashes like its plain values
    values = pa.array(["u3", "u1", None, "u3", ""])
    assert stable_hash(values.dictionary_encode()).tolist() == stable_hash(values).tolist()


@pytest.fixture
def log(tmp_path):
    rng = np.random.default_rng(1)
    n = 700
    t = pa.table({"rid": np.arange(n, dtype=np.int64), "price": rng.random(n),
                  "user": pa.array([f"u{j}" for j in rng.zipf(1.4, n) % 50]), "item": rng.integers(0, 90, n),
                  "hist": pa.array([[f"i{k}" for k in rng.integers(0, 9, rng.integers(0, 4))] for _ in range(n)]),
                  "click": pa.array(rng.integers(0, 2, n).astype(np.float64), mask=rng.random(n) < 0.1)})
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=128)
    return tmp_path / "a.parquet", t


def _schema(t):
    vocab = Vocabulary("user", sorted(set(t["user"].to_pylist()))[:30])
    return TableSchema(dense=("rid", "price"), labels={"click": "click"},
                       categorical={"user": vocab, "item": HashBuckets(32), "hist": SequenceIds(HashBuckets(8), 3)})


def test_shuffled_batches_are_the_permuted_window_cut_in_order(log):
    path, t = log
    schema = _schema(t)
    src = TableSource(path, schema, batch_size=50, shuffle_rows=300, seed=7, read_rows=100)
    batches = list(src)
    # the documented order, computed from the whole table: units in the seeded unit order, windows of
    # >= 300 rows, each window's rows permuted by default_rng([seed, epoch, shard, first unit])
    units = src.shard_units(0, 1)
    order = []
    i = 0
    while i < len(units):
        first, rows = i, []
        while i < len(units) and (not rows or len(rows) < 300):
            g = units[i][1]
            rows += list(range(g * 128, min((g + 1) * 128, len(t))))
            i += 1
        perm = np.random.default_rng([7, 0, 0, first]).permutation(len(rows))
        window = [rows[p] for p in perm]
        order += [window[k:k + 50] for k in range(0, len(window), 50)]
    assert [b[0]["dense"][:, 0].long().tolist() for b in batches] == order
    want_user = schema.categorical["user"].encode(t["user"])
    want_item = schema.categorical["item"].encode(t["item"])
    want_hist = schema.categorical["hist"].encode(t["hist"])
    click = t["click"].to_numpy(zero_copy_only=False)
    for (x, y, m), rows in zip(batches, order):
        assert x["user"].tolist() == want_user[rows].tolist() and x["item"].tolist() == want_item[rows].tolist()
        assert torch.equal(x["hist"], torch.from_numpy(want_hist[rows]))
        assert torch.equal(x["dense"][:, 1], torch.tensor(t["price"].to_numpy()[rows], dtype=torch.float32))
        assert m["click"].tolist() == (~np.isnan(click[rows])).tolist()
        assert y["click"].tolist() == np.nan_to_num(click[rows]).tolist()
    # one gather per block: the id columns of a batch are views of one tensor
    x = batches[0][0]
    assert x["user"].untyped_storage().data_ptr() == x["item"].untyped_storage().data_ptr()
    assert list(x) == ["dense", "user", "item", "hist"]


def test_file_order_batches_are_views_and_worker_batches_copies(log):
    path, t = log
    src = TableSource(path, _schema(t), batch_size=64, shuffle_rows=0)
    batches = list(src)
    assert [r for b in batches for r in b[0]["dense"][:, 0].long().tolist()] == list(range(len(t)))
    a, b = batches[0][0], batches[1][0]  # two batches of one window (a row group of 128 rows): one storage
    assert a["user"].untyped_storage().data_ptr() == b["user"].untyped_storage().data_ptr()
    loader = torch.utils.data.DataLoader(src, batch_size=None, num_workers=1)
    via_worker = list(loader)
    assert [r for b in via_worker for r in b[0]["dense"][:, 0].long().tolist()] == list(range(len(t)))
    for (x, y, m), (x2, y2, m2) in zip(batches, via_worker):
        assert all(torch.equal(x[k], x2[k]) for k in x) and torch.equal(y["click"], y2["click"])


@pytest.mark.parametrize("value,column", [(float("nan"), "price"), (float("inf"), "price"), (1e40, "price"),
                                          (0.5, "click"), (-1.0, "click")])
def test_bad_values_are_found_in_the_encoded_blocks_and_name_file_and_column(tmp_path, value, column):
    from polytask.errors import DataError

    n = 300
    t = pa.table({"rid": np.arange(n, dtype=np.int64), "price": np.ones(n), "item": np.arange(n) % 7,
                  "click": pa.array(np.zeros(n), mask=np.arange(n) % 5 == 0)})
    col = t[column].to_numpy(zero_copy_only=False).copy()
    col[257] = value  # in the third record batch of 100 rows, a labelled row
    t = t.set_column(t.schema.get_field_index(column), column, pa.array(col))
    good = tmp_path / "good.parquet"
    pq.write_table(t.slice(0, 200), good)
    bad = tmp_path / "bad.parquet"
    pq.write_table(t, bad, row_group_size=100)
    schema = TableSchema(dense=("rid", "price"), categorical={"item": HashBuckets(8)}, labels={"click": "click"})
    assert len(list(TableSource(good, schema, batch_size=64, shuffle_rows=500))) == 4
    with pytest.raises(DataError) as err:
        list(TableSource([good, bad], schema, batch_size=64, shuffle_rows=1000, read_rows=100))
    msg = str(err.value)
    assert msg.startswith(f"{bad}: ") and repr(column) in msg and "\n" not in msg
    # an unlabelled row may hold anything: the same value where the label is missing passes
    if column == "click":
        col[257], col[255] = 0.0, value  # row 255 is unlabelled (255 % 5 == 0)
        t2 = t.set_column(t.schema.get_field_index("click"), "click", pa.array(col, mask=np.arange(n) % 5 == 0))
        pq.write_table(t2, bad, row_group_size=100)
        assert sum(len(b[1]["click"]) for b in TableSource(bad, schema, batch_size=64)) == n


def test_read_ahead_thread_gives_the_same_batches_raises_in_order_and_stops(log, tmp_path):
    import threading

    from polytask.errors import DataError

    path, t = log
    kw = dict(batch_size=50, shuffle_rows=200, seed=2, read_rows=64)
    plain = list(TableSource(path, _schema(t), read_ahead=0, **kw))
    ahead = list(TableSource(path, _schema(t), read_ahead=2, **kw))
    assert len(plain) == len(ahead) > 5
    for (x, y, m), (x2, y2, m2) in zip(plain, ahead):
        assert all(torch.equal(x[k], x2[k]) for k in x) and torch.equal(y["click"], y2["click"])
    # a bad file after a good one: the good file's batches come first, then its DataError
    bad = tmp_path / "z_bad.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("price"), "price",
                                pa.array(np.full(len(t), np.nan))), bad)
    got = []
    with pytest.raises(DataError, match="z_bad.parquet: dense column 'price'"):
        for b in TableSource([path, bad], _schema(t), batch_size=50, shuffle_rows=0, read_ahead=1):
            got.append(b)
    assert sum(len(b[1]["click"]) for b in got) == len(t)
    # stopping early leaves no reader thread behind
    it = iter(TableSource(path, _schema(t), read_ahead=1, **kw))
    next(it)
    it.close()
    assert not [th for th in threading.enumerate() if th.name == "polytask-table-reader"]
    with pytest.raises(ConfigError, match="read_ahead must be >= 0"):
        TableSource(path, _schema(t), read_ahead=-1)


def test_read_ahead_key_reaches_the_train_source_and_is_checked(tmp_path):
    from polytask.train.config import parse_config
    from polytask.train.tables import table_splits, write_synthetic_splits

    paths = write_synthetic_splits(tmp_path / "log", 300, row_group_rows=100)
    p = {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "dense": ["price"],
         "ids": {"user_id": {"hash": 16}}, "labels": {"click": "click"}, "read_ahead": 0}
    cfg = {"name": "t", "out_dir": str(tmp_path / "r"), "device": "cpu", "data": {"name": "table", "params": p},
           "model": {"arch": "mmoe", "params": {"num_experts": 2}}, "train": {"epochs": 1, "batch_size": 32}}
    splits = table_splits(parse_config(cfg))
    assert splits.train.source.read_ahead == 0 and splits.val.source.read_ahead == 0
    p["read_ahead"] = 2
    assert table_splits(parse_config(cfg)).train.source.read_ahead == 2
    p["read_ahead"] = -1
    with pytest.raises(ConfigError, match=r"^data\.params\.read_ahead: "):
        table_splits(parse_config(cfg))
