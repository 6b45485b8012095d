"""Training and batch scoring on streamed Parquet tables (data.name: table; polytask.train.tables)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("pyarrow.csv")

from typer.testing import CliRunner  # noqa: E402

from polytask.cli import app  # noqa: E402
from polytask.errors import ConfigError, DataError  # noqa: E402
from polytask.metrics import gauc  # noqa: E402
from polytask.tasks import Task  # noqa: E402
from polytask.train import Trainer  # noqa: E402
from polytask.train.config import parse_config  # noqa: E402
from polytask.train.tables import evaluate_stream, table_splits, write_synthetic_splits  # noqa: E402


def _config(paths, out, epochs=1, **params):
    p = {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "dense": ["price", "hour"],
         "ids": {"user_id": {"min_count": 2}, "item_id": {"hash": 256}, "category": {}},
         "labels": {"click": "click", "conversion": "conversion"}, "group": "user_id", "embed_dim": 4,
         "shuffle_rows": 700}
    p.update(params)
    return {"name": "t", "out_dir": str(out), "device": "cpu", "seed": 3, "data": {"name": "table", "params": p},
            "model": {"arch": "mmoe", "params": {"num_experts": 2}},
            "train": {"epochs": epochs, "batch_size": 128, "eval_batch_size": 250, "early_stopping": None}}


def _cfg(paths, out, epochs=1, **params):
    return parse_config(_config(paths, out, epochs, **params))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_splits(tmp_path_factory.mktemp("log"), 4000, row_group_rows=500)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    trainer = Trainer(_cfg(data, out, epochs=1), progress=False)
    result = trainer.fit()
    return trainer, result, out


def _rows(path, columns):
    return pq.read_table(path, columns=columns)


def test_train_evaluates_whole_splits_with_gauc_and_saves_vocab(data, run):
    trainer, result, out = run
    from polytask.data.tables import build_vocabularies, load_vocabularies

    # vocabularies: one streaming pass over the train file, saved in the run directory
    saved = load_vocabularies(out / "vocab.json")
    assert set(saved) == {"user_id", "category"}  # item_id is hashed
    want = build_vocabularies(data[0], ["user_id"], min_count=2)["user_id"]
    assert saved["user_id"].values == want.values and saved["user_id"].min_count == 2
    # the reported test metrics are those of the whole test file, computed by hand
    t = _rows(data[2], None)
    model = trainer.model.eval()
    enc = trainer.splits.encoders
    inputs = {"dense": torch.from_numpy(np.stack([t["price"].to_numpy(), t["hour"].to_numpy()], 1).astype(np.float32)),
              **{c: torch.from_numpy(e.encode(t[c])) for c, e in enc.items()}}
    with torch.no_grad():
        outs = model(inputs)
    from polytask.data.tables import stable_hash

    groups = stable_hash(t["user_id"])
    assert len(t) == 400
    for task in ("click", "conversion"):
        y = t[task].to_numpy(zero_copy_only=False)
        mask = ~np.isnan(y)
        assert 0 < mask.sum() < len(y)  # missing labels are unlabelled rows
        target = torch.from_numpy(np.nan_to_num(y).astype(np.float32))
        want = Task(task, "binary", metrics=("auc", "logloss")).evaluate(outs[task], target, torch.from_numpy(mask))
        got = result.test[task]
        assert got["auc"] == pytest.approx(want["auc"], abs=1e-6)
        assert got["logloss"] == pytest.approx(want["logloss"], rel=1e-5)
        assert got["gauc"] == pytest.approx(gauc(outs[task].numpy(), y, groups, mask), abs=1e-6)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "test" and r["task"] == "click" and "gauc" in r for r in lines)


@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_trains_on_the_known_signal(data, tmp_path, arch):
    cfg = _config(data, tmp_path / "r", epochs=3)
    cfg["model"] = {"arch": arch, "params": {}}
    trainer = Trainer(parse_config(cfg), progress=False)
    result = trainer.fit()
    assert result.test["click"]["auc"] > 0.6  # user and item biases drive clicks
    assert result.test["click"]["logloss"] < result.history[0].test["click"]["logloss"]


def test_resume_reuses_vocabularies_and_repeats_the_uninterrupted_run(data, tmp_path, monkeypatch):
    full = Trainer(_cfg(data, tmp_path / "full", epochs=2), progress=False).fit()
    Trainer(_cfg(data, tmp_path / "part", epochs=1), progress=False).fit()
    import polytask.data.tables as tables

    def refuse(*a, **k):
        raise AssertionError("vocabularies rebuilt on resume")

    monkeypatch.setattr(tables, "build_vocabularies", refuse)
    resumed = Trainer(_cfg(data, tmp_path / "part", epochs=2), progress=False).fit(resume=True)
    assert resumed.history[-1].epoch == 2
    for task in ("click", "conversion"):
        assert resumed.history[-1].test[task]["auc"] == pytest.approx(full.history[-1].test[task]["auc"], abs=1e-6)
    monkeypatch.undo()
    # a run with other data in the same directory builds its own (min_count 1: more ids)
    other = Trainer(_cfg(data, tmp_path / "part", epochs=1, train=str(data[1])), progress=False)
    assert other.splits.encoders["user_id"].min_count == 2
    assert other.splits.encoders["user_id"].values == tables.build_vocabularies(
        data[1], ["user_id"], min_count=2)["user_id"].values


def test_predict_scores_equal_the_trained_model(data, run, tmp_path):
    trainer, _, out = run
    # an input with an id the vocabulary never saw, and a row order unlike the test file's
    t = _rows(data[2], None).slice(0, 300)
    users = t["user_id"].to_pylist()
    users[5] = "never-seen"
    t = t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array(users)).drop(["click", "conversion"])
    src = tmp_path / "in.parquet"
    pq.write_table(t, src, row_group_size=70)
    res = CliRunner().invoke(app, ["predict", str(out), str(src), str(tmp_path / "p.parquet"), "--keep",
                                   "user_id,item_id", "--batch-size", "64"])
    assert res.exit_code == 0, res.output
    known = set(trainer.splits.encoders["user_id"].values)
    unseen = sum(u not in known for u in users)
    assert "never-seen" not in known and unseen >= 1
    assert f"user_id {unseen}," in res.output  # unseen (and rarer than min_count) ids, counted
    got = pq.read_table(tmp_path / "p.parquet")
    assert got.column_names == ["user_id", "item_id", "click", "conversion"]
    assert got["user_id"].to_pylist() == users and got["item_id"].to_pylist() == t["item_id"].to_pylist()
    # the trainer's own streamed batches of the same rows, through the trained model
    from polytask.train.tables import StreamSplit

    from polytask.data.tables import TableSchema

    schema = TableSchema(dense=("price", "hour"), categorical=trainer.splits.encoders, labels={"x": "price"},
                         binary=())  # no label columns in the input: any numeric column stands in
    split = StreamSplit(str(src), schema, trainer.splits.test.p.model_copy(update={"group": None}), seed=0)
    model = trainer.model.eval()
    with torch.no_grad():
        outs = [model(b.inputs) for b, _ in split.eval_batches(1000)]
    for task in ("click", "conversion"):
        want = torch.sigmoid(torch.cat([o[task].reshape(-1) for o in outs])).numpy()
        np.testing.assert_allclose(got[task].to_numpy(), want, rtol=1e-5, atol=1e-6)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_predict_bad_input_one_line_exit_2_nothing_written(data, run, tmp_path):
    _, _, out = run
    runner = CliRunner()
    t = _rows(data[2], None).drop(["category"])
    bad = tmp_path / "bad.parquet"
    pq.write_table(t, bad)
    res = runner.invoke(app, ["predict", str(out), str(bad), str(tmp_path / "o.parquet")])
    assert res.exit_code != 0 and isinstance(res.exception, DataError)
    assert "bad.parquet" in str(res.exception) and "'category'" in str(res.exception)
    # a bad value in the second file, after the first was scored: no OUT, no temporary file left
    folder = tmp_path / "in"
    folder.mkdir()
    good = _rows(data[2], None)
    pq.write_table(good, folder / "a.parquet")
    price = good["price"].to_pylist()
    price[7] = None
    pq.write_table(good.set_column(good.schema.get_field_index("price"), "price", pa.array(price, pa.float32())),
                   folder / "b.parquet")
    res = runner.invoke(app, ["predict", str(out), str(folder), str(tmp_path / "o.parquet"), "--batch-size", "100"])
    assert isinstance(res.exception, DataError) and "b.parquet" in str(res.exception)
    assert "'price'" in str(res.exception)
    assert not list(tmp_path.glob("o.parquet*"))
    # a vocabulary that no longer fits the checkpoint (one id dropped): names the file and column
    import shutil

    run2 = tmp_path / "run2"
    shutil.copytree(out, run2)
    vocab = json.loads((run2 / "vocab.json").read_text())
    vocab["user_id"]["values"] = vocab["user_id"]["values"][:-1]
    (run2 / "vocab.json").write_text(json.dumps(vocab))
    res = runner.invoke(app, ["predict", str(run2), str(data[2]), str(tmp_path / "o.parquet")])
    msg = str(res.exception)
    assert res.exit_code != 0 and "vocab.json" in msg and "'user_id'" in msg and "\n" not in msg
    assert not list(tmp_path.glob("o.parquet*"))
    # the real entry point: one line, exit 2
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from polytask.cli import main; main()", "predict", str(run2),
                           str(data[2]), str(tmp_path / "o.parquet")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'user_id'" in proc.stderr


def test_fraction_split_is_disjoint_and_complete(data, tmp_path):
    cfg = _config(data, tmp_path / "r")
    p = cfg["data"]["params"]
    for k in ("train", "val", "test"):
        p.pop(k)
    p.update(path=str(data[0]), split={"key": "user_id", "fractions": [0.6, 0.2, 0.2], "seed": 1})
    splits = table_splits(parse_config(cfg))
    seen = []
    for part in (splits.train, splits.val, splits.test):
        users = set()
        for unit in part.source.units:
            for rb in part.source._read_unit(unit):
                users.update(rb.column("user_id").to_pylist())
        seen.append(users)
    everyone = set(_rows(data[0], ["user_id"])["user_id"].to_pylist())
    assert seen[0] | seen[1] | seen[2] == everyone
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert all(seen)


def test_bad_configs_and_multiprocess_refused(data, tmp_path):
    base = _config(data, tmp_path / "r")
    both = json.loads(json.dumps(base))
    both["data"]["params"]["path"] = str(data[0])
    with pytest.raises(ConfigError, match="data.params: give either train/val/test"):
        table_splits(parse_config(both))
    typo = json.loads(json.dumps(base))
    typo["data"]["params"]["ids"]["user_id"] = {"min_cnt": 2}
    with pytest.raises(ConfigError, match="data.params.ids.user_id.min_cnt: unknown key"):
        table_splits(parse_config(typo))
    missing = json.loads(json.dumps(base))
    missing["data"]["params"]["dense"] = ["price", "weight"]
    with pytest.raises(DataError, match=r"train\.parquet: no column 'weight'"):
        table_splits(parse_config(missing))
    import yaml

    # several processes: a bad data.params is refused before any process starts (a fraction split, or CSV
    # files, are accepted: tests/test_tables_csv_dist.py)
    split = json.loads(json.dumps(base))
    for k in ("train", "val", "test"):
        del split["data"]["params"][k]
    split["data"]["params"].update(path=str(data[0]), split={"key": "user_id", "fractions": [0.8, 0.1, 0.3]})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(split))
    res = CliRunner().invoke(app, ["train", str(path), "--nproc", "2"])
    assert isinstance(res.exception, ConfigError) and "data.params.split: fractions must be" in str(res.exception)
    assert not (tmp_path / "r").exists()


def test_example_config_parses():
    from pathlib import Path

    from polytask.train.config import load_config
    from polytask.train.tables import parse_params

    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "parquet_mmoe.yaml")
    assert cfg.data.name == "table" and cfg.model.arch == "mmoe"
    assert parse_params(cfg.data.params).group == "user_id"


@pytest.mark.parametrize("name, header", [
    ("census_income_table", "census_income_train_sample.csv"),
    ("aliexpress_table", "aliexpress_train_sample.csv"),
    ("ali_ccp_table", "ali_ccp_train_sample.csv"),
])
def test_public_data_set_examples_run_a_step_on_files_of_their_format(name, header, tmp_path):
    """Each example names the columns of the public release (the shipped samples have the same
    header); a tiny CSV with exactly those columns trains one epoch and scores every split."""
    import csv
    from pathlib import Path

    import yaml

    from polytask.data.recsys import SAMPLES_DIR
    from polytask.train.tables import parse_params

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / f"{name}.yaml").read_text())
    p = parse_params(raw["data"]["params"])
    columns = next(csv.reader(open(SAMPLES_DIR / header)))
    named = [*p.dense, *p.ids, *p.labels.values(), *([p.group] if p.group else [])]
    assert set(named) <= set(columns), set(named) - set(columns)  # the public header, nothing invented
    rng = np.random.default_rng(0)
    n = 300
    first = rng.integers(0, 2, n).astype(float)  # funnel: the second label only after the first
    cols = {c: rng.random(n) for c in p.dense}
    cols.update({c: rng.integers(0, 7, n) for c in p.ids})
    if p.group and p.group not in cols:
        cols[p.group] = rng.integers(0, 20, n)
    (a, b) = p.labels.values()
    cols[a], cols[b] = first, first * rng.integers(0, 2, n)
    table = pa.table({c: cols[c] for c in columns if c in cols})
    for split in ("train", "val", "test"):
        pa.csv.write_csv(table, tmp_path / f"{split}.csv")
        raw["data"]["params"][split] = str(tmp_path / f"{split}.csv")
    raw.update(out_dir=str(tmp_path / "{name}"), device="cpu")
    raw["train"].update(epochs=1, batch_size=128, eval_batch_size=128, early_stopping=None)
    raw["data"]["params"]["shuffle_rows"] = 200
    result = Trainer(parse_config(raw), progress=False).fit()
    for task in p.labels:
        assert np.isfinite(result.test[task]["logloss"]), (name, task)
    if p.group:
        assert "gauc" in result.test[a]


def test_data_synth_cuts_one_log_in_row_order(tmp_path):
    from polytask.data.tables import write_synthetic_log

    res = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "s"), "--rows", "1000", "--seed", "4"])
    assert res.exit_code == 0, res.output
    parts = [pq.read_table(tmp_path / "s" / f"{n}.parquet") for n in ("train", "val", "test")]
    assert [len(t) for t in parts] == [800, 100, 100]
    whole = pq.read_table(write_synthetic_log(tmp_path / "w.parquet", 1000, seed=4))
    assert pa.concat_tables(parts).equals(whole)  # the same log, cut by row position
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["test.parquet", "train.parquet", "val.parquet"]
    res = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "t"), "--rows", "5"])
    assert isinstance(res.exception, ConfigError) and "split empty" in str(res.exception)
    assert not (tmp_path / "t").exists()  # refused before writing anything


# ----------------------------------------------------------------------------- sparse embeddings
def _sparse_pair(data, tmp_path, name: str):
    """The same model twice (same seed): dense tables, and user_id/item_id with sparse gradients."""
    from polytask.nn import build_model
    from polytask.train.config import OptimConfig
    from polytask.train.tables import SparseDenseOptimizer

    cfg = _cfg(data, tmp_path / "r", ids={"user_id": {"min_count": 2, "sparse": True},
                                           "item_id": {"hash": 256, "sparse": True}, "category": {}})
    splits = table_splits(cfg)
    assert splits.sparse == ("user_id", "item_id")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model("mmoe", splits.input_spec, splits.tasks, num_experts=2).double())
    o = OptimConfig(name=name, lr=0.05, momentum=0.9)
    dense_opt = (torch.optim.SGD(models[0].parameters(), lr=o.lr, momentum=o.momentum) if name == "sgd"
                 else torch.optim.Adam(models[0].parameters(), lr=o.lr))
    tables = models[1].input.tables
    for c in splits.sparse:
        tables[c].sparse = True
    sparse_opt = SparseDenseOptimizer([{"params": list(models[1].parameters())}],
                                      [tables[c].weight for c in splits.sparse], o)
    batches = [b for _, b in zip(range(2), splits.train.batches(64))]
    return splits, models, (dense_opt, sparse_opt), batches


def _step(model, opt, batch, tasks):
    x = {k: v.double() if v.is_floating_point() else v for k, v in batch.inputs.items()}
    out = model(x)
    loss = sum(t.loss(out[t.name], batch.targets[t.name].double(), batch.mask[t.name]) for t in tasks)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def test_sparse_and_dense_embeddings_take_the_same_first_sgd_step(data, tmp_path):
    splits, models, opts, batches = _sparse_pair(data, tmp_path, "sgd")
    for m, opt in zip(models, opts):
        _step(m, opt, batches[0], splits.tasks)
    assert models[1].input.tables["user_id"].weight.grad.is_sparse
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


def test_sparse_adam_moves_only_the_rows_of_the_batch(data, tmp_path):
    splits, models, opts, batches = _sparse_pair(data, tmp_path, "adam")
    for m, opt in zip(models, opts):
        _step(m, opt, batches[0], splits.tasks)
    before = [m.input.tables["item_id"].weight.detach().clone() for m in models]
    for m, opt in zip(models, opts):
        _step(m, opt, batches[1], splits.tasks)
    second = torch.zeros(256, dtype=torch.bool)
    second[batches[1].inputs["item_id"]] = True
    first_only = torch.zeros(256, dtype=torch.bool)
    first_only[batches[0].inputs["item_id"]] = True
    first_only &= ~second
    assert first_only.any() and second.any()
    moved = [(m.input.tables["item_id"].weight.detach() != b).any(1) for m, b in zip(models, before)]
    # sparse: exactly the rows of the second batch moved; dense Adam also moves the first batch's
    # rows through its moments (the variant the row-wise optimiser must differ from)
    assert torch.equal(moved[1], second)
    assert moved[0][first_only].all()


def test_sparse_columns_train_and_refuse_what_cannot_take_sparse_gradients(data, tmp_path, capsys):
    ids = {"user_id": {"min_count": 2, "sparse": True}, "item_id": {"hash": 256}, "category": {}}
    result = Trainer(_cfg(data, tmp_path / "ok", ids=ids), progress=False).fit()
    assert np.isfinite(result.test["click"]["auc"])
    err = capsys.readouterr().err
    assert "embedding tables: 3," in err and "with sparse gradients" in err
    bad = _config(data, tmp_path / "mgda", ids=ids)
    bad["balancer"] = {"name": "excessmtl"}  # state per shared coordinate (mgda is accepted: test_tables_sparse_dist)
    with pytest.raises(ConfigError, match="ids.user_id.sparse: the gradient balancer 'excessmtl' keeps state"):
        Trainer(parse_config(bad), progress=False)
    # train.grad_clip is taken since sparse tables clip as on dense ones: tests/test_tables_clip.py


def test_sequence_column_trains_predicts_and_saves_its_vocabulary(data, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for src in data:  # the log plus a list column: each row's recent items (0-6 ids, some unseen later)
        t = pq.read_table(src)
        items = t["item_id"].to_pylist()
        hist = [None if k == 0 else [items[j] for j in rng.integers(0, len(items), k)]
                for k in rng.integers(0, 7, t.num_rows)]
        out = tmp_path / src.name
        pq.write_table(t.append_column("history", pa.array(hist, pa.list_(pa.string()))), out, row_group_size=500)
        paths.append(out)
    ids = {"user_id": {"min_count": 2}, "item_id": {"hash": 256}, "category": {},
           "history": {"min_count": 2, "sequence": {"max_len": 4, "pooling": "sum"}}}
    trainer = Trainer(_cfg(paths, tmp_path / "r", ids=ids), progress=False)
    result = trainer.fit()
    assert np.isfinite(result.test["click"]["auc"])
    hist_vocab = trainer.splits.encoders["history"].inner
    saved = json.loads((tmp_path / "r" / "vocab.json").read_text())
    assert saved["history"]["values"] == hist_vocab.values and len(hist_vocab.values) > 10
    assert trainer.model.input.tables["history"].num_embeddings == len(hist_vocab.values) + 2
    t = pq.read_table(paths[2]).slice(0, 50)
    h = t["history"].to_pylist()
    h[0] = ["never-seen", "never-seen"]
    t = t.set_column(t.schema.get_field_index("history"), "history", pa.array(h, pa.list_(pa.string())))
    pq.write_table(t, tmp_path / "in.parquet")
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "r"), str(tmp_path / "in.parquet"),
                                   str(tmp_path / "p.parquet")])
    assert res.exit_code == 0, res.output
    assert "history " in res.output  # its unseen ids counted
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 50


def test_summary_table_shows_gauc_when_a_group_column_is_declared(run):
    from polytask.report.summary import fmt, metrics_table

    trainer, result, _ = run
    table = metrics_table(trainer.tasks, {"val (best)": result.val, "test (best)": result.test})
    for t in ("click", "conversion"):
        assert f"| {t} | gauc ↑ | {fmt(result.val[t]['gauc'])} | {fmt(result.test[t]['gauc'])} |" in table
    no_group = {k: {t: {m: v for m, v in ms.items() if m != "gauc"} for t, ms in d.items()}
                for k, d in {"test": result.test}.items()}
    assert "gauc" not in metrics_table(trainer.tasks, no_group)


def test_sparse_run_resumes_like_the_uninterrupted_run(data, tmp_path):
    # both optimisers' states (SparseAdam's row moments included) go through the checkpoint
    ids = {"user_id": {"min_count": 2, "sparse": True}, "item_id": {"hash": 256, "sparse": True}, "category": {}}
    full = Trainer(_cfg(data, tmp_path / "full", epochs=2, ids=ids), progress=False).fit()
    Trainer(_cfg(data, tmp_path / "part", epochs=1, ids=ids), progress=False).fit()
    resumed = Trainer(_cfg(data, tmp_path / "part", epochs=2, ids=ids), progress=False).fit(resume=True)
    for task in ("click", "conversion"):
        assert resumed.history[-1].test[task]["auc"] == pytest.approx(full.history[-1].test[task]["auc"], abs=1e-6)
    # a checkpoint saved without sparse tables does not load into the sparse optimiser: one line
    dense_ids = {**ids, "user_id": {"min_count": 2}, "item_id": {"hash": 256}}
    Trainer(_cfg(data, tmp_path / "dense", epochs=1, ids=dense_ids), progress=False).fit()
    from polytask.errors import CheckpointError

    with pytest.raises((CheckpointError, ConfigError)):
        Trainer(_cfg(data, tmp_path / "dense", epochs=2, ids=ids), progress=False).fit(resume=True)
