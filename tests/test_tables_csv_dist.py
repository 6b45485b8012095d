"""``--nproc N`` with CSV files and with a fraction split: two gloo ranks against one process (as the
Parquet case of test_tables_dist.py): every row of an epoch once over the ranks, the same step count on
every rank, the rows of each unit counted by the ranks in shares and exchanged, metrics equal to one process's."""

from __future__ import annotations

import collections

import pytest

pa = pytest.importorskip("pyarrow")
pcsv = pytest.importorskip("pyarrow.csv")
pq = pytest.importorskip("pyarrow.parquet")

from polytask.train.tables import write_synthetic_splits  # noqa: E402
from test_tables_dist import _config, _run  # noqa: E402


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    """The synthetic log as CSV: train in 5 files of uneven sizes (a CSV file is one unit), val and test one each."""
    root = tmp_path_factory.mktemp("csv")
    parquet = write_synthetic_splits(root / "pq", 1500, row_group_rows=500)
    train = pq.read_table(parquet[0])
    (root / "train").mkdir()
    edges = [0, 100, 380, 500, 900, train.num_rows]
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        pcsv.write_csv(train.slice(lo, hi - lo), root / "train" / f"part{i}.csv")
    out = [root / "train"]
    for name, src in (("val", parquet[1]), ("test", parquet[2])):
        pcsv.write_csv(pq.read_table(src), root / f"{name}.csv")
        out.append(root / f"{name}.csv")
    return out, train.num_rows


def _same_rows_and_steps(one, two, rows_per_epoch):
    assert collections.Counter(two[0]["rows"] + two[1]["rows"]) == collections.Counter(one["rows"])
    assert len(one["rows"]) == 2 * rows_per_epoch  # two epochs
    assert two[0]["steps"] == two[1]["steps"]
    per_rank = [collections.Counter(r[0] for r in res["rows"]) for res in two]
    assert per_rank[0] != per_rank[1]  # the shards differ: the shorter rank was padded to the same steps
    assert all(len(res["rows"]) > 0 for res in two)


def _same_metrics(one, two):
    for got in (two[0]["metrics"], two[1]["metrics"]):
        for split_one, split_two in zip(one["metrics"], got):
            for task, m in split_one.items():
                for key, value in m.items():
                    assert split_two[task][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (task, key)


def test_two_ranks_on_csv_files_see_every_row_once_in_the_same_steps(csv_data, tmp_path):
    paths, rows = csv_data
    cfg = _config(paths, tmp_path / "r")
    (one,) = _run(tmp_path, cfg, 1)
    two = _run(tmp_path, cfg, 2)
    _same_rows_and_steps(one, two, rows)
    assert two[0]["vocab_json"] == two[1]["vocab_json"] == one["vocab_json"]  # counted in shares, one vocabulary
    assert two[0]["counted"] and two[1]["counted"] and not set(two[0]["counted"]) & set(two[1]["counted"])
    _same_metrics(one, two)


def test_two_ranks_on_a_fraction_split_see_every_row_of_their_part_once(csv_data, tmp_path):
    paths, _ = csv_data
    cfg = _config(paths, tmp_path / "r")
    params = cfg["data"]["params"]
    for k in ("train", "val", "test"):
        del params[k]
    params.update(path=str(paths[0]), split={"key": "user_id", "fractions": [0.7, 0.15, 0.15], "seed": 4})
    (one,) = _run(tmp_path, cfg, 1)
    two = _run(tmp_path, cfg, 2)
    from polytask.data.tables import Split, TableSchema, TableSource

    # the train part's size, counted independently of the loader (the split's mask over the whole file set)
    src = TableSource(paths[0], TableSchema(dense=("price",), labels={"click": "click"}),
                      split=Split(key="user_id", fraction=(0.0, 0.7), seed=4))
    counted = src.count_rows()
    assert 0 < sum(counted) < sum(pcsv.read_csv(f).num_rows for f in sorted(paths[0].iterdir()))
    _same_rows_and_steps(one, two, sum(counted))
    _same_metrics(one, two)


def test_count_rows_gives_rank_batches_for_csv(csv_data):
    from polytask.data.tables import TableSchema, TableSource

    paths, rows = csv_data
    src = TableSource(paths[0], TableSchema(dense=("price",), labels={"click": "click"}), batch_size=64,
                      shuffle_rows=300, world_size=2)
    assert src.rank_batches() is None  # no footer: unknown until counted
    assert src.count_rows() == [100, 280, 120, 400, rows - 900]
    want = []
    for rank in range(2):  # what the loader yields on each rank
        src.rank = rank
        want.append(sum(1 for _ in src))
    assert src.rank_batches() == want and want[0] != want[1]


@pytest.mark.slow
def test_polytask_train_nproc_2_on_csv_with_sparse_tables_matches_one_process_at_epoch_0(csv_data, tmp_path):
    # the CLI end to end: rows counted by the ranks in shares, sparse tables reduced by the balancer, evaluation gathered;
    # the untrained model (rank 0's initialisation, broadcast) scores the same on 1 and 2 processes
    from test_tables_dist import _config, train_nproc

    paths, _ = csv_data
    runs = {}
    for n in (1, 2):
        cfg = _config(paths, tmp_path / f"n{n}")
        cfg["data"]["params"]["ids"]["user_id"]["sparse"] = "rowwise_adagrad"
        cfg["data"]["params"]["ids"]["item_id"]["sparse"] = True
        cfg["balancer"] = {"name": "mgda", "params": {"mode": "features"}}
        lines = train_nproc(cfg, tmp_path, n)
        runs[n] = [r for r in lines if r["epoch"] == 0]
        assert any(r["epoch"] == 1 for r in lines)
    assert len(runs[1]) == len(runs[2]) > 0
    for a, b in zip(runs[1], runs[2]):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a, b)


ERROR_WORKER = r'''
import os, pickle, sys
import torch.distributed as dist
from polytask.errors import DataError
from polytask.train.config import parse_config
from polytask.train.dist import DistContext
from polytask.train.tables import table_splits

cfg, out = pickle.load(open(sys.argv[1], "rb")), sys.argv[2]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=rank, world_size=2)
try:
    table_splits(parse_config(cfg), DistContext(rank=rank, world_size=2, group=dist.group.WORLD, backend="gloo"))
    msg = None
except DataError as exc:
    msg = str(exc)
pickle.dump(msg, open(out, "wb"))
dist.barrier()
os._exit(0)
'''


def test_a_bad_csv_counted_by_one_rank_stops_every_rank_with_its_message(csv_data, tmp_path):
    import os
    import pickle
    import shutil
    import subprocess
    import sys

    paths, _ = csv_data
    train = tmp_path / "train"
    shutil.copytree(paths[0], train)
    # unit 1 (counted by rank 1 alone): a CSV whose first block is fine and whose last row has one field too many
    lines = (paths[0] / "part3.csv").read_text().splitlines()
    body = "\n".join(lines[1:]) + "\n"
    bad = lines[0] + "\n" + body * (1 + (2 << 20) // len(body)) + lines[1] + ",1\n"
    (train / "part0b.csv").write_text(bad)
    cfg = _config([train, paths[1], paths[2]], tmp_path / "r")
    cfg["data"]["params"]["ids"] = {"item_id": {"hash": 64}}  # no vocabulary pass: the error is the count's
    script, conf = tmp_path / "w.py", tmp_path / "c.pkl"
    script.write_text(ERROR_WORKER)
    conf.write_bytes(pickle.dumps(cfg))
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), STORE=str(tmp_path / "store"))
        procs.append(subprocess.Popen([sys.executable, str(script), str(conf), str(tmp_path / f"o{rank}")], env=env,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    msgs = [pickle.loads((tmp_path / f"o{rank}").read_bytes()) for rank in range(2)]
    assert msgs[0] == msgs[1] and msgs[0] is not None and "part0b.csv" in msgs[0], msgs
