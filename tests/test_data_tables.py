"""Streaming tables (polytask.data.tables) and ranking metrics (polytask.metrics), on small generated files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pcsv = pytest.importorskip("pyarrow.csv")
pc = pytest.importorskip("pyarrow.compute")

from polytask.data.tables import (  # noqa: E402
    HashBuckets, Split, TableLoader, TableSchema, TableSource, Vocabulary, build_vocabularies, load_vocabularies,
    save_vocabularies, stable_hash, write_synthetic_log,
)
from polytask.errors import ConfigError, DataError  # noqa: E402
from polytask.metrics import calibration, gauc, group_auc  # noqa: E402


def _table(n: int, start: int = 0, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rid = np.arange(start, start + n)
    click = rng.integers(0, 2, n).astype(np.float64)
    conv = click * rng.integers(0, 2, n)
    return pa.table({
        "rid": rid.astype(np.int64),
        "price": rng.random(n),
        "user": pa.array([f"u{j}" for j in rng.zipf(1.5, n) % 40]),
        "item": rng.integers(0, 30, n),
        "day": rid % 3,
        "click": pa.array(click, mask=rng.random(n) < 0.1),
        "conv": pa.array(conv, mask=rng.random(n) < 0.2),
    })


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "log"
    d.mkdir()
    pq.write_table(_table(300, 0, 1), d / "a.parquet", row_group_size=37)
    pq.write_table(_table(200, 300, 2), d / "b.parquet", row_group_size=50)
    return d


def _schema(**kw) -> TableSchema:
    return TableSchema(dense=("rid", "price"), categorical={"user": HashBuckets(64), "item": HashBuckets(16)},
                       labels={"click": "click", "conversion": "conv"}, **kw)


def _rows(batches) -> dict[int, tuple]:
    """rid -> (price, user id, click target, click mask, conv target, conv mask); fails on a repeated row."""
    out: dict[int, tuple] = {}
    for x, t, m in batches:
        for i in range(len(t["click"])):
            rid = int(x["dense"][i, 0])
            assert rid not in out, f"row {rid} seen twice"
            out[rid] = (float(x["dense"][i, 1]), int(x["user"][i]), float(t["click"][i]), bool(m["click"][i]),
                        float(t["conversion"][i]), bool(m["conversion"][i]))
    return out


def _memory_rows(folder, split: Split | None = None) -> dict[int, tuple]:
    t = pa.concat_tables([pq.read_table(folder / "a.parquet"), pq.read_table(folder / "b.parquet")])
    if split is not None:
        t = t.filter(split.mask(t))
    users = HashBuckets(64).encode(t["user"])
    d = t.to_pydict()
    return {r: (np.float32(d["price"][i]).item(), int(users[i]),
                0.0 if d["click"][i] is None else d["click"][i], d["click"][i] is not None,
                0.0 if d["conv"][i] is None else d["conv"][i], d["conv"][i] is not None)
            for i, r in enumerate(d["rid"])}


# ----------------------------------------------------------------------------- reading
def test_streaming_read_equals_in_memory_read(folder):
    src = TableSource(folder, _schema(), batch_size=32, shuffle_rows=120, seed=3)
    batches = list(src)
    x, t, m = batches[0]
    assert x["dense"].dtype == torch.float32 and x["user"].dtype == torch.int64
    assert t["click"].dtype == torch.float32 and m["click"].dtype == torch.bool
    assert all(len(b[1]["click"]) <= 32 for b in batches)
    got = _rows(batches)
    assert got == _memory_rows(folder)
    assert not all(v[3] for v in got.values())  # some rows are unlabelled for click
    # the shuffle moves rows, deterministically for a seed; another epoch is another order
    order = [int(r) for b in batches for r in b[0]["dense"][:, 0]]
    assert order != sorted(order)
    assert order == [int(r) for b in TableSource(folder, _schema(), batch_size=32, shuffle_rows=120, seed=3)
                     for r in b[0]["dense"][:, 0]]
    src.set_epoch(1)
    assert [int(r) for b in src for r in b[0]["dense"][:, 0]] != order


def test_csv_reads_like_parquet(folder, tmp_path):
    d = tmp_path / "csv"
    d.mkdir()
    for name in ("a", "b"):
        pcsv.write_csv(pq.read_table(folder / f"{name}.parquet"), d / f"{name}.csv")
    got = _rows(TableSource(d, _schema(), batch_size=64, shuffle_rows=100, seed=0))
    want = _memory_rows(folder)
    assert got.keys() == want.keys()
    for r in want:  # CSV text round-trips floats to within float32
        assert got[r][1:] == want[r][1:] and got[r][0] == pytest.approx(want[r][0], rel=1e-6)


def _shard_rows(folder, rank, world, workers, **kw):
    src = TableSource(folder, _schema(), batch_size=16, shuffle_rows=80, seed=5, rank=rank, world_size=world, **kw)
    return set(_rows(TableLoader(src, num_workers=workers)))


def test_shards_disjoint_and_complete_two_workers_two_ranks(folder):
    parts = [_shard_rows(folder, rank, 2, 2) for rank in range(2)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(range(500))
    # each of the 4 shards (rank * workers + worker) holds whole row groups, none shared
    src = TableSource(folder, _schema(), shuffle_rows=80, seed=5)
    units = [u for s in range(4) for u in src.shard_units(s, 4)]
    assert sorted(units) == sorted(src.units) and len(src.units) == 9 + 4
    assert all(src.shard_units(s, 4) for s in range(4))


def test_resume_mid_epoch_sees_each_row_once(folder):
    def loader():
        src = TableSource(folder, _schema(), batch_size=16, shuffle_rows=70, seed=9, split=Split("day", (0, 1)))
        return TableLoader(src, num_workers=2)

    first = loader()
    seen = []
    for i, b in enumerate(first):
        seen.append(b)
        if i == 11:
            break
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 0 and state["shards"]
    second = loader()
    second.load_state_dict(state)
    rest = list(second)
    rows = _rows(seen + rest)  # fails on a row seen twice
    assert len(seen) == 12 and rest
    assert rows == _memory_rows(folder, Split("day", (0, 1)))
    assert second.state_dict()["epoch"] == 1  # the next iter is the next epoch, from its start
    assert len(_rows(second)) == len(rows)
    other = TableLoader(TableSource(folder, _schema(), batch_size=16, shuffle_rows=70, seed=9), num_workers=1)
    with pytest.raises(ConfigError, match="num_workers"):
        other.load_state_dict(state)


def test_resume_at_a_window_boundary_and_without_workers(folder):
    src = TableSource(folder, _schema(), batch_size=37, shuffle_rows=0)  # one window per row group
    first = TableLoader(src)
    it = iter(first)
    seen = [next(it) for _ in range(3)]  # exactly the first 3 row groups of a.parquet
    second = TableLoader(TableSource(folder, _schema(), batch_size=37, shuffle_rows=0))
    second.load_state_dict(first.state_dict())
    assert _rows(seen + list(second)).keys() == set(range(500))


def test_splits_by_column_and_by_hashed_fraction(folder):
    by_day = [set(_rows(TableSource(folder, _schema(), split=Split("day", (d,))))) for d in range(3)]
    assert by_day[1] == {r for r in range(500) if r % 3 == 1}
    train = set(_rows(TableSource(folder, _schema(), split=Split(key="user", fraction=(0.0, 0.7), seed=1))))
    test = set(_rows(TableSource(folder, _schema(), split=Split(key="user", fraction=(0.7, 1.0), seed=1))))
    assert not train & test and train | test == set(range(500)) and train and test
    # a key's rows stay together: the split is by the hash of the key, not by row
    users = dict(zip(*[pa.concat_tables([pq.read_table(folder / f) for f in ("a.parquet", "b.parquet")])[c]
                       .to_pylist() for c in ("rid", "user")]))
    assert not {users[r] for r in train} & {users[r] for r in test}
    with pytest.raises(ConfigError, match="split.key"):
        Split(fraction=(0.0, 0.5))


# ----------------------------------------------------------------------------- ids
def test_stable_hash_is_fnv1a_and_buckets_are_stable():
    # published FNV-1a 64-bit values: "" -> offset basis, "a" -> 0xaf63dc4c8601ec8c
    assert stable_hash(pa.array(["", "a"])).tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C]
    assert stable_hash(pa.array([5, 17])).tolist() == stable_hash(pa.array(["5", "17"])).tolist()
    assert stable_hash(pa.array(["x"]), seed=1).tolist() != stable_hash(pa.array(["x"])).tolist()
    # a child process (with another hash salt) gives the same buckets
    code = ("import pyarrow as pa; from polytask.data.tables import HashBuckets; "
            "print(HashBuckets(1000).encode(pa.array(['u1','u22','item-x', None])).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert json.loads(out) == HashBuckets(1000).encode(pa.array(["u1", "u22", "item-x", None])).tolist()
    ids = HashBuckets(7).encode(pa.array([f"v{i}" for i in range(500)]))
    assert ids.min() >= 0 and ids.max() < 7 and len(set(ids.tolist())) == 7


def test_vocabulary_one_pass_min_count_oov_saved(tmp_path):
    pq.write_table(pa.table({"c": ["b", "a", "b", "z", "a", "b", None, "q"], "n": [3, 1, 3, 3, 2, 1, 1, 9]}),
                   tmp_path / "v.parquet", row_group_size=3)
    v = build_vocabularies(tmp_path / "v.parquet", ["c", "n"], min_count=2, batch_rows=2)
    assert v["c"].values == ["b", "a"]  # counts 3, 2; z and q seen once; nulls not counted
    assert v["n"].values == [1, 3]  # 3 x3, 1 x3: a tie, broken by the value's text ("1" < "3")
    assert v["c"].encode(pa.array(["a", "b", "zz", None])).tolist() == [2, 1, 0, 0]
    assert v["c"].oov_count == 2 and v["c"].size == 3
    save_vocabularies(v, tmp_path / "vocab.json")
    again = load_vocabularies(tmp_path / "vocab.json")
    assert again["n"].values == [1, 3] and again["c"].encode(pa.array(["b", "q"])).tolist() == [1, 0]
    assert build_vocabularies(tmp_path / "v.parquet", ["c"], min_count=1)["c"].values == ["b", "a", "q", "z"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="bad.json"):
        load_vocabularies(tmp_path / "bad.json")


def test_vocabulary_lookup_equals_pyarrow_index_in_and_dictionary_reads():
    # peer: pyarrow's index_in (what the hashed searchsorted lookup replaced), on ids with OOV and nulls
    rng = np.random.default_rng(0)
    known = [f"id{j}" for j in rng.permutation(5000)]
    v = Vocabulary("c", known)
    raw = pa.array([f"id{j}" if j < 6000 else None for j in rng.integers(0, 6500, 20000)])
    idx = pc.index_in(raw, value_set=pa.array(known))
    expected = pc.fill_null(pc.add(idx, 1), 0).to_numpy(zero_copy_only=False)
    assert (v.encode(raw) == expected).all() and v.oov_count == int((expected == 0).sum()) > 0
    # the same column read as a dictionary array (as Parquet stores it) encodes the same, nulls too
    dict_arr = pc.dictionary_encode(raw)
    assert (Vocabulary("c", known).encode(dict_arr) == expected).all()
    assert (HashBuckets(97).encode(dict_arr) == HashBuckets(97).encode(raw)).all()
    assert (stable_hash(dict_arr) == stable_hash(raw)).all()
    # an exported model looks hashes up in the same sorted table
    keys, ids = v.lookup_table()
    assert (np.diff(keys) > 0).all() and sorted(ids.tolist()) == list(range(1, 5001))
    assert (v.encode_hashes(stable_hash(raw)) == np.where(raw.is_null().to_numpy(zero_copy_only=False), 0,
                                                             expected)).all()


def test_synthetic_log_has_zipf_ids_missing_labels_and_signal(tmp_path):
    path = write_synthetic_log(tmp_path / "log.parquet", 20000, users=200, items=300, row_group_rows=4096, seed=0)
    f = pq.ParquetFile(path)
    assert f.metadata.num_rows == 20000 and f.metadata.num_row_groups == 5
    t = f.read()
    assert pa.types.is_string(t.schema.field("user_id").type)
    counts = np.sort(np.array(t["user_id"].value_counts().field("counts")))[::-1]
    assert counts[0] > 20 * 20000 / 200  # the most frequent user is far above a uniform share
    click, conv = t["click"].to_numpy(zero_copy_only=False), t["conversion"].to_numpy(zero_copy_only=False)
    assert 0.02 < np.isnan(click).mean() < 0.08 and 0.02 < np.isnan(conv).mean() < 0.08
    both = ~np.isnan(click) & ~np.isnan(conv)
    assert (conv[both] <= click[both]).all() and conv[both].sum() > 0
    # the signal: a user's click rate in one half of the log predicts it in the other half
    users = np.array(t["user_id"].to_pylist())
    half = np.arange(len(users)) < 10000
    rates = []
    for part in (half, ~half):
        ok = part & ~np.isnan(click)
        rates.append({u: click[ok & (users == u)].mean() for u in ("u0", "u1", "u2", "u3", "u4", "u5", "u6")})
    a, b = (np.array(list(r.values())) for r in rates)
    assert np.corrcoef(a, b)[0, 1] > 0.8
    v = build_vocabularies(path, ["user_id"])
    assert v["user_id"].values[0] == "u0"  # Zipf: rank 1 is the most frequent


# ----------------------------------------------------------------------------- bad input
def _bad(tmp_path, name, table=None, data=None):
    p = tmp_path / name
    if table is not None:
        (pq.write_table(table, p) if name.endswith(".parquet") else pcsv.write_csv(table, p))
    else:
        p.write_bytes(data)
    return p


@pytest.mark.parametrize("case, col", [
    ("missing", "conv"), ("label2", "click"), ("strings", "price"), ("strings_csv", "price"), ("null_dense", "price"),
    ("string_label", "conv"),
])
def test_bad_columns_name_file_and_column(tmp_path, case, col):
    t = _table(20)
    if case == "missing":
        t = t.drop_columns(["conv"])
    elif case == "label2":
        t = t.set_column(t.schema.get_field_index("click"), "click", pa.array([0.0, 1.0, 2.0] + [1.0] * 17))
    elif case.startswith("strings"):
        t = t.set_column(1, "price", pa.array(["1.5", "cheap"] + ["2"] * 18))
    elif case == "string_label":
        t = t.set_column(t.schema.get_field_index("conv"), "conv", pa.array(["yes"] * 20))
    elif case == "null_dense":
        t = t.set_column(1, "price", pa.array([1.0, None] + [2.0] * 18))
    p = _bad(tmp_path, f"{case}.{'csv' if case.endswith('csv') else 'parquet'}", table=t)
    with pytest.raises(DataError) as e:
        list(TableSource(p, _schema()))
    msg = str(e.value)
    assert str(p) in msg and repr(col) in msg and "\n" not in msg


def test_empty_and_corrupt_files_name_the_file(tmp_path):
    empty = _bad(tmp_path, "empty.parquet", data=b"")
    with pytest.raises(DataError, match="empty.parquet: the file is empty"):
        TableSource(empty, _schema())
    good = _bad(tmp_path, "good.parquet", table=_table(50))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(good.read_bytes()[:-12] + b"\0" * 12)  # footer length and magic destroyed
    with pytest.raises(DataError, match="corrupt.parquet: cannot read the Parquet file"):
        TableSource([good, corrupt], _schema())
    no_rows = _bad(tmp_path, "none.parquet", table=_table(5).slice(0, 0))
    with pytest.raises(DataError, match="none.parquet: no rows"):
        TableSource(no_rows, _schema())
    with pytest.raises(DataError, match="nothere"):
        TableSource(tmp_path / "nothere", _schema())


def test_pyarrow_is_not_imported_by_the_cli():
    code = ("import sys; sys.argv = ['polytask', '--help']\nfrom polytask.cli import main\nimport polytask.data\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'pyarrow' not in sys.modules, 'pyarrow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ----------------------------------------------------------------------------- metrics
def test_gauc_and_calibration_by_hand():
    scores = [0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.7, 0.4, 0.4]
    labels = [1, 0, 0, 1, 0, 1, 1, 1, 0]
    groups = ["a", "a", "a", "b", "b", "c", "c", "d", "d"]
    # a: 1.0 (3 rows); b: 0.0 (2 rows); c: one class, skipped; d: a tie, 0.5 (2 rows)
    assert gauc(scores, labels, groups) == pytest.approx((3 * 1.0 + 2 * 0.0 + 2 * 0.5) / 7)
    per = group_auc(scores, labels, groups)
    assert per["groups"].tolist() == ["a", "b", "c", "d"] and np.isnan(per["auc"][2])
    assert per["count"].tolist() == [3, 2, 2, 2]
    mask = torch.tensor([True, True, False, True, True, True, True, True, True])  # a's 0.5 negative unlabelled
    assert gauc(torch.tensor(scores), torch.tensor(labels), groups, mask) == pytest.approx((2 + 0 + 1) / 6)
    assert np.isnan(gauc([0.1, 0.2], [1, 1], [0, 1]))
    assert calibration([0.2, 0.4, 0.6], [0, 1, 1]) == pytest.approx(0.6)
    assert calibration(torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0.0, 1.0, 1.0]),
                       torch.tensor([True, True, False])) == pytest.approx(0.6 / 1)
    assert np.isnan(calibration([0.3], [0]))


def test_gauc_matches_sklearn_per_group():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(0)
    n = 3000
    groups = rng.zipf(1.3, n) % 97
    labels = (rng.random(n) < 0.3).astype(int)
    scores = np.round(rng.random(n) + 0.3 * labels, 1)  # rounded: many ties
    num, den = 0.0, 0
    skipped = 0
    for g in np.unique(groups):
        sel = groups == g
        if labels[sel].min() == labels[sel].max():
            skipped += 1
            continue
        num += roc_auc_score(labels[sel], scores[sel]) * sel.sum()
        den += sel.sum()
    assert skipped > 0
    assert gauc(scores, labels, groups) == pytest.approx(num / den, abs=1e-12)
    per = group_auc(scores, labels, groups)
    g0 = per["groups"][np.nanargmax(per["count"] * ~np.isnan(per["auc"]))]
    assert per["auc"][per["groups"] == g0][0] == pytest.approx(roc_auc_score(labels[groups == g0],
                                                                             scores[groups == g0]))


def test_nan_label_is_unlabelled(tmp_path):
    t = _table(6)
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array([1.0, float("nan"), 0.0, None, 1.0, 0.0]))
    p = _bad(tmp_path, "nan.parquet", table=t)
    (_, tgt, mask), = list(TableSource(p, _schema(), batch_size=10))
    assert mask["click"].tolist() == [True, False, True, False, True, True]
    assert tgt["click"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_vocabulary_in_a_source_and_oov(folder):
    vocab = build_vocabularies(folder, ["user"], min_count=3)["user"]
    schema = TableSchema(dense=("rid",), categorical={"user": vocab}, labels={"click": "click"})
    x = {}
    for xb, _, _ in TableSource(folder, schema, batch_size=1000):
        for r, u in zip(xb["dense"][:, 0].tolist(), xb["user"].tolist()):
            x[int(r)] = u
    d = pa.concat_tables([pq.read_table(folder / f) for f in ("a.parquet", "b.parquet")]).to_pydict()
    want = Vocabulary("user", vocab.values).encode(pa.array(d["user"])).tolist()
    assert [x[r] for r in d["rid"]] == want and 0 in want and max(want) == vocab.size - 1


def test_batches_train_an_mmoe(folder):
    from polytask.nn import build_model
    from polytask.tasks import Task

    tasks = [Task("click", "binary"), Task("conversion", "binary")]
    src = TableSource(folder, _schema(), batch_size=64, shuffle_rows=100)
    model = build_model("mmoe", src.feature_spec(embed_dim=4), tasks)
    x, t, m = next(iter(src))
    out = model(x)
    loss = sum(task.loss(out[task.name], t[task.name], m[task.name]) for task in tasks)
    loss.backward()
    assert torch.isfinite(loss) and set(out) == {"click", "conversion"} and out["click"].shape[0] == 64



def test_sequence_ids_pad_truncate_shift_and_count_oov():
    from polytask.data.tables import SequenceIds

    v = Vocabulary("h", ["a", "b", "c"])  # ids a=1, b=2, c=3; in a sequence +1 (0 = padding, 1 = OOV)
    seq = SequenceIds(v, max_len=3)
    lists = pa.array([["a", "b"], None, ["z", "a", "b", "c"], [], ["c", None]])
    got = seq.encode(lists)
    # by hand: [a, b] -> 2 3 pad; null list -> all pad; [z, a, b, c] -> OOV a b (c cut at max_len 3);
    # [] -> pad; [c, null] -> 4, OOV
    assert got.tolist() == [[2, 3, 0], [0, 0, 0], [1, 2, 3], [0, 0, 0], [4, 1, 0]]
    assert seq.size == 5 and v.oov_count == 2
    # a sliced array (offsets not at 0) and a hashed inner encoder
    h = SequenceIds(HashBuckets(11), max_len=2)
    part = lists.slice(2, 3)
    want = [[b + 1 for b in HashBuckets(11).encode(pa.array(r))[:2].tolist()] + [0] * (2 - min(len(r), 2))
            for r in part.to_pylist()]
    assert h.encode(part).tolist() == want
    with pytest.raises(DataError, match="lists of ids"):
        seq.encode(pa.array(["a"]))


def test_sequence_column_in_a_source_and_its_vocabulary(tmp_path):
    from polytask.data.tables import SequenceIds

    t = pa.table({"x": [0.5, 1.0, 2.0], "hist": pa.array([["i1", "i2"], ["i2"], None]), "y": [1.0, 0.0, 1.0]})
    pq.write_table(t, tmp_path / "s.parquet")
    vocab = build_vocabularies(tmp_path / "s.parquet", ["hist"])["hist"]
    assert vocab.values == ["i2", "i1"]  # i2 twice, i1 once: counted over the flattened lists
    schema = TableSchema(dense=("x",), categorical={"hist": SequenceIds(vocab, max_len=2)}, labels={"y": "y"})
    (x, _, _), = list(TableSource(tmp_path / "s.parquet", schema, batch_size=10))
    assert x["hist"].tolist() == [[3, 2], [2, 0], [0, 0]]
    spec = TableSource(tmp_path / "s.parquet", schema).feature_spec(4)
    assert spec.features[1].vocab_size == 4 and spec.features[1].padding_idx == 0
    bad = TableSchema(dense=("x",), categorical={"y": SequenceIds(vocab)}, labels={"t": "x"}, binary=())
    with pytest.raises(DataError, match="sequence column 'y' holds double, not lists"):
        TableSource(tmp_path / "s.parquet", bad)
    lists_as_ids = TableSchema(dense=("x",), categorical={"hist": HashBuckets(8)}, labels={"y": "y"})
    with pytest.raises(DataError, match=r"s.parquet: id column 'hist' holds list<.*ids.hist.sequence"):
        TableSource(tmp_path / "s.parquet", lists_as_ids)
