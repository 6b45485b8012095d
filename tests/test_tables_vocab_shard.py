"""The vocabulary pass over R gloo ranks with each value's counts summed by one rank (data/vocab_ranks.py):
vocab.json byte-identical to one process's and equal to a collections.Counter over the rows read whole, at 1
to 4 ranks; ties and min-count by hand; ranks with no unit; a bad file or mixed types stopping every rank with
the same one line; and the bytes a rank sends, receives and holds bounded by its own distinct ids and those of
its range, not by R times the distinct ids (what the all-gather of every rank's counts held).

One gloo launch per rank count runs every case (file rendezvous, no port)."""

from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest
from _ranks import run_ranks

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pcsv = pytest.importorskip("pyarrow.csv")

from polytask.data.tables import HashBuckets, build_vocabularies, count_ids, order_counts, save_vocabularies  # noqa: E402
from polytask.data.vocab_ranks import _read, _write, owners  # noqa: E402

WORKER = r'''
import os, pickle, sys
import torch, torch.distributed as dist
from polytask.data.tables import HashBuckets, build_vocabularies, count_ids, save_vocabularies
from polytask.data.vocab_ranks import RankGroup
from polytask.errors import PolytaskError

cases, out = pickle.load(open(sys.argv[1], "rb")), sys.argv[2]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=rank, world_size=world)
wire = [0]  # bytes of the tensors the collectives filled (measured here, apart from RankGroup's own counts)


def counted(fn):
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        filled = args[0] if isinstance(args[0], list) else [args[0]]
        if fn is real_batch:  # point-to-point: the receives' tensors
            filled = [op.tensor for op in args[0] if op.op is dist.irecv]
        wire[0] += sum(t.numel() * t.element_size() for t in filled if isinstance(t, torch.Tensor))
        return out
    return run


real_batch = dist.batch_isend_irecv
for fn in ("all_to_all_single", "all_gather", "broadcast", "batch_isend_irecv"):
    setattr(dist, fn, counted(getattr(dist, fn)))
results = {}
for name, (path, columns, min_count, batch_rows) in cases.items():
    ranks = RankGroup(dist.group.WORLD)
    wire[0] = 0
    try:
        vocabs = build_vocabularies(path, columns, min_count, batch_rows, ranks=ranks)
    except PolytaskError as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    save_vocabularies(vocabs, out + f".{name}.json")
    results[name] = {"error": None, "vocab": {c: v.values for c, v in vocabs.items()},
                     "json": open(out + f".{name}.json", "rb").read(),
                     "sent": ranks.sent, "received": ranks.received, "held": ranks.held,
                     "wire": wire[0]}
pickle.dump(results, open(out, "wb"))
dist.barrier()
os._exit(0)  # gloo's teardown at interpreter exit can abort
'''


def _launch(tmp_path, cases: dict, world: int) -> list[dict]:
    """Every case on ``world`` gloo ranks; per rank, per case: the vocabularies, vocab.json, bytes (or the error)."""
    script, conf = tmp_path / "w.py", tmp_path / f"cases{world}.pkl"
    script.write_text(WORKER)
    conf.write_bytes(pickle.dumps(cases))
    return run_ranks(script, world, [str(conf)], tag="o")


def _expected(rows, min_count: int) -> list:
    """The vocabulary by its definition: non-null values seen ``min_count`` times, count descending, then text."""
    counts = collections.Counter(v for v in rows if v is not None)
    return sorted((v for v, n in counts.items() if n >= min_count), key=lambda v: (-counts[v], str(v)))


def _bytes_of_distinct(values) -> int:
    """What a count table holds per distinct value: its UTF-8 text, a 4-byte offset, an 8-byte count."""
    return sum(len(str(v).encode()) + 12 for v in values)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Each case: (path, columns, min_count, batch_rows), and what one process must give (Counter over the rows)."""
    root = tmp_path_factory.mktemp("vocab")
    rng = np.random.default_rng(7)
    n = 1200
    user = [None if rng.random() < 0.05 else f"u{int(k)}" for k in rng.zipf(1.3, n) % 80]
    item = [int(k) for k in rng.zipf(1.2, n) % 50]
    hist = [[f"i{int(k)}" for k in rng.zipf(1.4, int(m)) % 30] for m in rng.integers(0, 4, n)]
    pq.write_table(pa.table({"user": user, "item": item, "hist": hist}), root / "zipf.parquet", row_group_size=100)
    # ties by hand: every value of s twice but e; n's values as text "10" < "100" < "3" < "9"
    pq.write_table(pa.table({"s": ["b", "b", "a", "a", "c", "d", "d", "c", "e", None],
                             "n": [9, 9, 10, 10, 100, 3, 3, 100, 7, None]}), root / "ties.parquet", row_group_size=2)
    # two CSV files: at 3 and 4 ranks, one or two ranks count nothing
    (root / "two").mkdir()
    (root / "two" / "a.csv").write_text("w\n" + "x\ny\nx\nz\n" * 3)
    (root / "two" / "b.csv").write_text("w\n" + "y\nq\n")
    # a bad file in one rank's share: the largest (share 0's) is good; b.csv (share 1's at 2 ranks) has a good
    # first block and a row with one field too many at its end
    (root / "bad").mkdir()
    (root / "bad" / "a.csv").write_text("u\n" + "good\n" * 600_000)
    (root / "bad" / "b.csv").write_text("u\n" + "fine\n" * 300_000 + "x,1\n")
    # one value type per column: ints in one file, strings in the other (each share alone is fine)
    (root / "types").mkdir()
    (root / "types" / "a.csv").write_text("u\n1\n2\n2\n")
    (root / "types" / "b.csv").write_text("u\nx\ny\n")
    run = {
        "zipf": (root / "zipf.parquet", ["user", "item", "hist"], {"user": 2, "item": 3, "hist": 1}, 7),
        "ties": (root / "ties.parquet", ["s", "n"], 2, 2),
        "two": (root / "two", ["w"], 1, 5),
        "bad": (root / "bad", ["u"], 1, 65536),
        "types": (root / "types", ["u"], 1, 100),
    }
    want = {
        "zipf": {"user": _expected(user, 2), "item": _expected(item, 3), "hist": _expected(sum(hist, []), 1)},
        "ties": {"s": ["a", "b", "c", "d"], "n": [10, 100, 3, 9]},  # e once; a null is never counted
        "two": {"w": ["x", "y", "z", "q"]},  # x 6, y 4, z 3, q 1
    }
    return run, want


@pytest.fixture(scope="module")
def one_process(cases, tmp_path_factory):
    """vocab.json of each good case in this one process."""
    run, _ = cases
    out = {}
    path = tmp_path_factory.mktemp("one") / "v.json"
    for name in ("zipf", "ties", "two"):
        save_vocabularies(build_vocabularies(*run[name]), path)
        out[name] = path.read_bytes()
    return out


def test_one_process_is_the_definition(cases):
    run, want = cases
    for name, cols in want.items():
        got = build_vocabularies(*run[name])
        assert {c: v.values for c, v in got.items()} == cols, name
    assert len(want["zipf"]["user"]) > 10 and len(want["zipf"]["item"]) > 5  # not a trivial vocabulary


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_give_one_process_vocab_json_and_the_same_error_line(cases, one_process, tmp_path, world):
    run, want = cases
    ties, two = run["ties"][0], run["two"][0]
    # c's two rows are in units counted by two ranks (min-count decided on the sums), and at 3 and 4 ranks some
    # rank counts no unit of the two CSV files
    assert sum("c" in count_ids(ties, ["s"], 2, (r, world))["s"]["v"].to_pylist() for r in range(world)) == 2
    assert sum(count_ids(two, ["w"], 5, (r, world))["w"] is None for r in range(world)) == world - 2
    results = _launch(tmp_path, run, world)
    for rank, res in enumerate(results):
        for name in ("zipf", "ties", "two"):
            assert res[name]["error"] is None, (rank, name, res[name]["error"])
            assert res[name]["vocab"] == want[name], (rank, name)
            assert res[name]["json"] == one_process[name], (rank, name)  # byte for byte
    # the bad row is in b.csv, counted by one rank alone: every rank stops with its one line
    bad = {res["bad"]["error"] for res in results}
    assert len(bad) == 1 and "\n" not in (line := bad.pop()), bad
    assert line.startswith("DataError: ") and "b.csv: cannot read (" in line
    types = {res["types"]["error"] for res in results}
    assert types == {"DataError: id column 'u' holds different types in different files: int64, string"}


def test_a_rank_holds_its_own_and_its_range_not_every_ranks_counts(tmp_path):
    # every rank's share: 3 row groups of 4000 ids seen once (its own) and 20 ids seen in every row group; per rank
    # the same data whatever R, so an all-gather of the count tables would hold R times a rank's table
    per_group, frequent = 4000, [f"f{k}" for k in range(20)]
    held, gathered = {}, {}
    for world in (2, 4):
        path = tmp_path / f"r{world}.parquet"
        groups = [pa.table({"u": [f"g{g}_{i}" for i in range(per_group)] + frequent}) for g in range(3 * world)]
        with pq.ParquetWriter(path, groups[0].schema) as w:
            for t in groups:
                w.write_table(t)
        shares = [count_ids(path, ["u"], shard=(r, world))["u"] for r in range(world)]
        own = [_bytes_of_distinct(t["v"].to_pylist()) for t in shares]
        # the distinct values of each rank's range in each rank's share, by the owner hash
        part = [[_bytes_of_distinct(np.array(t["v"].to_pylist())[owners(t["v"], world) == q]) for q in range(world)]
                for t in shares]  # part[r][q]: rank r's rows of rank q's range
        in_range = [sum(part[r][q] for r in range(world)) for q in range(world)]
        from_others = [in_range[q] - part[q][q] for q in range(world)]
        vocab = _bytes_of_distinct(frequent)
        os.makedirs(tmp_path / f"w{world}")
        results = _launch(tmp_path / f"w{world}", {"big": (path, ["u"], 2, 4096)}, world)
        for rank, res in enumerate(results):
            got = res["big"]
            assert got["error"] is None and got["vocab"]["u"] == sorted(frequent), got["error"]
            # sent: the rows of its table owned by others; received: those of its range, plus the kept vocabulary
            assert got["sent"] <= own[rank] * 1.1 + vocab * world + 4096 * world
            assert got["received"] <= from_others[rank] * 1.1 + vocab * world + 4096 * world
            # the same, as the tensors the collectives filled (its own broadcast of the kept values too)
            assert 0.9 * from_others[rank] <= got["wire"] <= from_others[rank] * 1.1 + vocab * world + 4096 * world
            # held at once: its table and what it received of its range, or that and its sums; plus the kept values
            assert got["held"] <= 1.4 * (own[rank] + in_range[rank]) + 2 * vocab * world + 4096 * world, (world, rank)
            assert got["held"] >= own[rank]  # it did hold its table: the count can fail
        held[world] = max(res["big"]["held"] for res in results)
        gathered[world] = sum(own)  # what each rank held after an all-gather of every rank's table
        # what it received there: the other ranks' tables, (R - 1) own sizes; here its range from the others,
        # about (R - 1) / R of one
        for rank, res in enumerate(results):
            assert res["big"]["received"] < 1.2 / world * (gathered[world] - own[rank]), (world, rank)
    assert gathered[4] > 1.9 * gathered[2]  # the old exchange grows with R ...
    assert held[4] < 1.25 * held[2]  # ... this one does not
    assert held[4] < 0.7 * gathered[4]


def test_order_counts_by_hand_and_an_ipc_round_trip():
    t = pa.table({"v": ["b", "a", "c", "d", "e"], "n": pa.array([2, 2, 5, 1, 2], pa.int64())})
    assert order_counts(t, 2)["v"].to_pylist() == ["c", "a", "b", "e"]  # 5 first, then the 2s by text; d once
    assert order_counts(t, 6).num_rows == 0
    ints = pa.table({"v": pa.array([9, 10, 100], pa.int64()), "n": pa.array([1, 1, 1], pa.int64())})
    assert order_counts(ints, 1)["v"].to_pylist() == [10, 100, 9]  # by text: "10" < "100" < "9"
    sink = pa.BufferOutputStream()
    _write(sink, t.slice(1, 3))
    n1 = sink.tell()
    _write(sink, ints)
    data = np.frombuffer(sink.getvalue(), np.uint8)
    got = _read(data, np.array([[n1, 0], [0, len(data) - n1]]), ["a", "b"])
    assert got["a"][0].equals(t.slice(1, 3)) and got["b"][0].equals(ints)


def test_owners_spread_values_and_match_on_every_call():
    values = pa.array([f"user{k}" for k in range(20_000)])
    for size in (2, 3, 4):
        own = owners(values, size)
        assert own.max() == size - 1 and np.array_equal(own, owners(values, size))
        assert np.bincount(own).min() > 0.9 * len(values) / size  # balanced ranges
    # the bucket of HashBuckets(R) (fmix64 of the encoders' FNV-1a); chunk by chunk; ints own like their text
    words = ["1", "22", "333", "", "h\u00e9", "user7"]
    chunks = pa.chunked_array([words[:2], words[2:]])
    for size in (3, 4):
        assert np.array_equal(owners(chunks, size), HashBuckets(size).encode(pa.array(words)))
    assert np.array_equal(owners(pa.chunked_array([pa.array([1, 22, 333])]), 4), owners(chunks, 4)[:3])
