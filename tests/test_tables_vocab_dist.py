"""Vocabularies counted in shares (issue 13: ``--nproc N`` with no rank idle in a collective through the pass):
every share of the units counted apart, the counts combined (in one process here; over gloo ranks, each value
summed by its owner rank: test_tables_vocab_shard.py), the vocabulary equal to one process's and to an
independent count (collections.Counter over the rows read whole); ties and min-count across shares by hand; a
bad file found by one rank stops both gloo ranks with the same line."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pcsv = pytest.importorskip("pyarrow.csv")

from polytask.data.tables import (  # noqa: E402
    balanced_shares, build_vocabularies, count_ids, save_vocabularies, vocabularies_from_counts, vocabulary_units)
from polytask.errors import DataError  # noqa: E402


def _expected(rows, min_count: int) -> list:
    """The vocabulary by its definition: non-null values seen ``min_count`` times, count descending, then text."""
    counts = collections.Counter(v for v in rows if v is not None)
    return sorted((v for v, n in counts.items() if n >= min_count), key=lambda v: (-counts[v], str(v)))


def _in_shares(paths, columns, min_count, shares: int, batch_rows: int = 7) -> dict:
    parts = [count_ids(paths, columns, batch_rows, shard=(i, shares)) for i in range(shares)]
    return vocabularies_from_counts(parts, columns, min_count)


def _json(vocabs, path) -> bytes:
    save_vocabularies(vocabs, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def zipf_files(tmp_path_factory):
    """Zipf ids with nulls: one Parquet file of 9 row groups (a string, an int and a list column) and 3 CSV files."""
    root = tmp_path_factory.mktemp("zipf")
    rng = np.random.default_rng(3)
    n = 900
    user = [None if rng.random() < 0.05 else f"u{int(k)}" for k in rng.zipf(1.3, n) % 60]
    item = [int(k) for k in rng.zipf(1.2, n) % 40]
    hist = [[f"i{int(k)}" for k in rng.zipf(1.4, int(m)) % 25] for m in rng.integers(0, 4, n)]
    table = pa.table({"user": user, "item": item, "hist": hist})
    pq.write_table(table, root / "log.parquet", row_group_size=100)
    (root / "csv").mkdir()
    for i, (lo, hi) in enumerate([(0, 200), (200, 550), (550, n)]):
        pcsv.write_csv(table.select(["user", "item"]).slice(lo, hi - lo), root / "csv" / f"p{i}.csv")
    return root, user, item, hist


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_any_number_of_shares_gives_the_one_process_vocabulary(zipf_files, tmp_path, fmt):
    root, user, item, hist = zipf_files
    path = root / "log.parquet" if fmt == "parquet" else root / "csv"
    columns = ["user", "item", "hist"] if fmt == "parquet" else ["user", "item"]
    min_count = {"user": 2, "item": 3, "hist": 1}
    if fmt == "csv":  # as pyarrow reads CSV: an empty field of a string column is the id "", not a null
        whole = pa.concat_tables([pcsv.read_csv(f) for f in sorted(path.iterdir())])
        user, item = whole["user"].to_pylist(), whole["item"].to_pylist()
        assert "" in user
    want = {"user": _expected(user, 2), "item": _expected(item, 3), "hist": _expected(sum(hist, []), 1)}
    one = build_vocabularies(path, columns, min_count, batch_rows=7)
    assert {c: v.values for c, v in one.items()} == {c: want[c] for c in columns}
    assert len(one["user"].values) > 10 and len(one["item"].values) > 5  # not a trivial vocabulary
    one_json = _json(one, tmp_path / "one.json")
    units = len(vocabulary_units(path, columns))
    assert units == (9 if fmt == "parquet" else 3)
    for shares in (2, 3, 5):  # 5 CSV shares: two of them hold no unit
        got = _in_shares(path, columns, min_count, shares)
        assert _json(got, tmp_path / f"{shares}.json") == one_json, shares
        assert {c: v.min_count for c, v in got.items()} == {c: min_count[c] for c in columns}


def test_ties_and_min_count_are_decided_on_the_combined_counts(tmp_path):
    # two shares' count tables: every value but e is seen once in each share or twice in one; a filter by
    # min_count within a share would drop c and d
    parts = [{"s": pa.table({"v": ["b", "c", "d", "e"], "n": pa.array([2, 1, 1, 1], pa.int64())})},
             {"s": pa.table({"v": ["d", "a", "c"], "n": pa.array([1, 2, 1], pa.int64())})},
             {"s": None}]  # a rank with no unit
    assert vocabularies_from_counts(parts, ["s"], 2)["s"].values == ["a", "b", "c", "d"]  # all twice: by text
    assert vocabularies_from_counts(parts, ["s"], 1)["s"].values == ["a", "b", "c", "d", "e"]
    assert vocabularies_from_counts(parts[2:], ["s"], 1)["s"].values == []
    # from a file, in 1 to 4 shares of its row groups (2 rows each)
    pq.write_table(pa.table({"s": ["b", "b", "a", "a", "c", "d", "d", "c", "e", None],
                             "n": [9, 9, 10, 10, 100, 3, 3, 100, 7, None]}), tmp_path / "t.parquet", row_group_size=2)
    for shares in (1, 2, 3, 4):
        v = _in_shares(tmp_path / "t.parquet", ["s", "n"], 2, shares, batch_rows=2)
        assert v["s"].values == ["a", "b", "c", "d"]  # e once; a null is never counted
        assert v["n"].values == [10, 100, 3, 9]  # all seen twice: by text, "10" < "100" < "3" < "9"


def test_shares_are_balanced_by_bytes_largest_unit_first():
    assert balanced_shares([10] + [1] * 10, 2) == [[0], list(range(1, 11))]  # round-robin would give 15 and 5
    # by hand: 0->s0, 1->s1, 2->s2, 3->s2 (4 < 5), 4->s0, 5->s1 (all 8), 6->s0 (the lower share of a tie)
    assert balanced_shares([5, 5, 4, 4, 3, 3, 3], 3) == [[0, 4, 6], [1, 5], [2, 3]]
    assert balanced_shares([2, 2], 4) == [[0], [1], [], []]  # more ranks than units: some count nothing
    units = 9
    for count in (1, 2, 5):
        got = balanced_shares([7] * units, count)
        assert sorted(sum(got, [])) == list(range(units))  # disjoint and complete


def test_one_value_type_per_column_across_files_and_shares(tmp_path):
    (tmp_path / "a.csv").write_text("u\n1\n2\n")
    (tmp_path / "b.csv").write_text("u\nx\ny\n")
    with pytest.raises(DataError, match=r"b\.csv: id column 'u' holds string"):
        build_vocabularies(tmp_path, ["u"])
    parts = [count_ids(tmp_path, ["u"], shard=(i, 2)) for i in range(2)]  # each share alone is fine
    with pytest.raises(DataError, match="id column 'u' holds different types"):
        vocabularies_from_counts(parts, ["u"])


class _OneOfTwoRanks:
    """Rank ``rank`` of 2 whose peer hands over ``peer`` in the first exchange (the status all-gather)."""

    def __init__(self, rank: int, peer: tuple) -> None:
        self.rank, self.size, self.peer, self.seen = rank, 2, peer, []

    def objects(self, obj):
        self.seen.append(obj)
        return [obj, self.peer] if self.rank == 0 else [self.peer, obj]


def test_a_share_error_goes_to_the_exchange_not_up_the_stack(tmp_path):
    (tmp_path / "a.csv").write_text("u\nx\n")
    # past the first block (which every rank reads for the schema): a row with a field too many
    (tmp_path / "b.csv").write_text("u\n" + "xxxxxxx\n" * 200_000 + "y,1\n")
    first = _OneOfTwoRanks(0, ("ok", {"u": "string"}))
    with pytest.raises(DataError, match=r"b\.csv"):  # b.csv, the larger, is share 0's
        build_vocabularies(tmp_path, ["u"], ranks=first)
    second = _OneOfTwoRanks(1, ("error", "DataError", "peer"))
    with pytest.raises(DataError, match="^peer$"):  # the peer's error, as its class, before any count is sent
        build_vocabularies(tmp_path, ["u"], ranks=second)
    assert first.seen[0][:2] == ("error", "DataError") and "b.csv" in first.seen[0][2]
    assert second.seen == [("ok", {"u": "string"})]


def test_a_bad_file_in_one_ranks_share_stops_both_gloo_ranks_with_its_line(tmp_path):
    from test_tables_csv_dist import ERROR_WORKER
    from test_tables_dist import _config

    from polytask.train.tables import write_synthetic_splits

    parquet = write_synthetic_splits(tmp_path / "pq", 600, row_group_rows=200)
    train = tmp_path / "train"
    train.mkdir()
    table = pq.read_table(parquet[0])
    pcsv.write_csv(table.slice(0, 150), train / "p0.csv")
    body = (train / "p0.csv").read_text().splitlines()
    good = "\n".join(body[1:]) + "\n"
    (train / "p0.csv").write_text(body[0] + "\n" + good * (1 + (3 << 20) // len(good)))  # the largest: rank 0's
    # counted by rank 1 alone: a good first block, then a row with one field too many at the end
    (train / "p1.csv").write_text(body[0] + "\n" + good * (1 + (2 << 20) // len(good)) + body[1] + ",1\n")
    pcsv.write_csv(table.slice(150, 150), train / "p2.csv")
    assert balanced_shares([f.stat().st_size for f in sorted(train.iterdir())], 2) == [[0], [1, 2]]
    cfg = _config([train, parquet[1], parquet[2]], tmp_path / "r")  # user_id and category: vocabularies
    script, conf = tmp_path / "w.py", tmp_path / "c.pkl"
    script.write_text(ERROR_WORKER)
    conf.write_bytes(pickle.dumps(cfg))
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), STORE=str(tmp_path / "store"),
                   POLYTASK_DIST_TIMEOUT="60")
        procs.append(subprocess.Popen([sys.executable, str(script), str(conf), str(tmp_path / f"o{rank}")], env=env,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    msgs = [pickle.loads((tmp_path / f"o{rank}").read_bytes()) for rank in range(2)]
    assert msgs[0] == msgs[1] and msgs[0] is not None and "p1.csv" in msgs[0] and "\n" not in msgs[0], msgs
    assert ": cannot read (" in msgs[0]  # found in the counting pass (not by the schema read every rank makes)


def test_two_ranks_reuse_the_saved_vocabulary_as_rank_0_decides(tmp_path):
    # a resumed run: rank 0 finds vocab.json of the same data section and broadcasts it; no rank counts
    import yaml

    from test_tables_dist import _config, _run

    from polytask.data.encoders import Vocabulary
    from polytask.train.config import parse_config
    from polytask.train.tables import write_synthetic_splits

    paths = write_synthetic_splits(tmp_path / "pq", 600, row_group_rows=200)
    cfg = _config(paths, tmp_path / "r")
    run_dir = parse_config(cfg).run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": parse_config(cfg).data.model_dump(mode="json")}))
    saved = {"user_id": Vocabulary("user_id", ["u_saved", "u1"], 2), "category": Vocabulary("category", ["c0"], 1)}
    save_vocabularies(saved, run_dir / "vocab.json")
    two = _run(tmp_path, cfg, 2)
    for res in two:
        assert res["vocab_builds"] == 0 and res["counted"] == [] and res["vocab"] == ["u_saved", "u1"]
        assert res["vocab_json"] == (run_dir / "vocab.json").read_bytes()


def test_what_a_rank_sends_is_its_distinct_values_and_counts(tmp_path):
    # the exchange's size: ids' text + a 4-byte offset + an 8-byte count per distinct value, whatever the rows;
    # 70000 distinct values: the group-by answers in chunks, which pickle would copy with their whole buffers
    ids = np.random.default_rng(0).permutation(np.repeat(np.arange(70_000), 3))
    pq.write_table(pa.table({"u": [f"u{k}" for k in ids]}), tmp_path / "t.parquet", row_group_size=30_000)
    for shard in ((0, 1), (1, 3)):
        t = count_ids(tmp_path / "t.parquet", ["u"], shard=shard)["u"]
        text = sum(len(v.encode()) for v in t["v"].to_pylist())
        assert t.num_rows > 30_000 and sum(t["n"].to_pylist()) >= 60_000
        assert len(pickle.dumps(t)) < text + 12 * t.num_rows + 4096, shard
