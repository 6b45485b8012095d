"""Recommendation data at scale (issue 13): loader speed, peak memory of a long epoch, training speed.

Three measurements over one generated click/conversion log with 20 categorical columns (raw
string ids: 4 high-cardinality columns hashed into buckets, 16 with vocabularies of 10 to 50 000
ids, Zipf-distributed) and 32 dense float64 columns, written as Parquet by row group (bounded memory for
any size):

(a) loader rows/s over the same ``--loader-rows`` rows, each path reading and turning the rows into
    model inputs (id ints, dense float32, labels):
    - ``pyarrow raw``: ``ParquetFile.iter_batches`` of the needed columns, nothing more (the
      physical limit of reading the file here);
    - ``polytask tables``: :class:`polytask.data.tables.TableSource` (vocabularies and hashing,
      shuffle window, batches of ``--batch``), with its reader thread (``read_ahead=1``, the
      default) and without (``read_ahead=0``: reading and encoding in turn on one thread);
    - ``polytask csv``: the in-memory CSV path (``polytask.data.recsys.load_table_splits``: the whole
      CSV parsed by numpy, integer ids) then its shuffled batches;
    - ``torch-rechub pandas``: ``pandas.read_csv``, ``LabelEncoder`` per categorical column and
      ``df_to_dict`` as torch-rechub 0.9.0's ranking examples do, then its ``DataGenerator``'s
      DataLoader (one ``__getitem__`` per row). Capped at ``--rechub-rows`` rows (per-row Python).
    Targets: polytask tables >= 0.5x pyarrow raw, >= 5x polytask csv.
(b) peak resident memory (VmHWM and VmRSS of ``/proc/PID/status``, sampled every 0.2 s, the
    process and its children) of ``polytask train`` (MMoE, one epoch) over a log of ``--gb`` GB on
    disk (default 5). Target: under 3 GB.
(c) training samples/s of MMoE and PLE on batches from the log (a bare loop: forward, masked BCE
    of both tasks, backward, Adam), ``--train-steps`` steps after 5 warm-up steps.

Prints one table. Full run (the lead, on a quiet machine): ``.venv/bin/python benchmarks/recsys_scale.py``
(writes about 5 GB under ``--workdir``, default a temporary folder, removed at the end unless
``--keep``). Smoke test at toy size: ``--toy``. Timings taken on a shared machine mean nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import torch

N_DENSE = 32  # float64 on disk, as numerical features often are: ~330 bytes a row, ~15M rows in 5 GB
HASHED = {f"c{j}": 2_000_000 for j in range(4)}  # cardinality of the raw ids; embedded via hash buckets
VOCAB = {f"c{j}": int(c) for j, c in zip(range(4, 20), np.geomspace(10, 50_000, 16))}
HASH_BUCKETS = 1 << 18
CAT = [*HASHED, *VOCAB]
DENSE = [f"d{j}" for j in range(N_DENSE)]
LABELS = {"click": "click", "conversion": "conversion"}


# ----------------------------------------------------------------------------- the log
def _chunk(rng: np.random.Generator, n: int, bias: dict[str, np.ndarray]) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """``n`` rows: raw string ids (and their integer codes, for the CSV paths), dense, labels."""
    codes = {c: rng.integers(0, card, n) for c, card in HASHED.items()}  # uniform, as request/user ids
    codes.update({c: (rng.zipf(1.2, n) - 1) % card for c, card in VOCAB.items()})
    dense = rng.random((n, N_DENSE))
    logit = sum(bias[c][codes[c]] for c in list(VOCAB)[:4]) + dense[:, 0] - 1.0
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    conv = click * (rng.random(n) < 0.3)
    cols = {c: pc.binary_join_element_wise(f"{c}_", pa.array(v).cast(pa.string()), "") for c, v in codes.items()}
    cols.update({d: dense[:, j] for j, d in enumerate(DENSE)})
    cols["click"] = pa.array(click, mask=rng.random(n) < 0.05)
    cols["conversion"] = pa.array(conv.astype(np.float32), mask=rng.random(n) < 0.05)
    return pa.table(cols), codes


def write_log(folder: Path, *, rows: int | None = None, gb: float | None = None, file_rows: int = 4_000_000,
              group_rows: int = 131_072, seed: int = 0, csv: Path | None = None) -> int:
    """Parquet files ``part-*.parquet`` in ``folder`` until ``rows`` rows or ``gb`` GB on disk (one row
    group in memory at a time); with ``csv`` (a folder), the same rows with integer ids as
    ``csv/bench_train.csv``. Returns the rows written. A folder already written with the same
    arguments (``done.json``) is reused: with ``--keep`` the long generation happens once."""
    import json

    marker = folder / "done.json"
    args = {"rows": rows, "gb": gb, "file_rows": file_rows, "group_rows": group_rows, "seed": seed, "csv": str(csv)}
    if marker.is_file() and json.loads(marker.read_text())["args"] == args:
        return json.loads(marker.read_text())["written"]
    folder.mkdir(parents=True, exist_ok=True)
    written = _write_log(folder, rows=rows, gb=gb, file_rows=file_rows, group_rows=group_rows, seed=seed, csv=csv)
    marker.write_text(json.dumps({"args": args, "written": written}))
    return written


def _write_log(folder: Path, *, rows: int | None, gb: float | None, file_rows: int, group_rows: int, seed: int,
               csv: Path | None) -> int:
    rng = np.random.default_rng(seed)
    bias = {c: np.random.default_rng([seed, j]).normal(0, 1, card) for j, (c, card) in enumerate(VOCAB.items())}
    limit = None if gb is None else gb * 1e9
    done, part, writer, on_disk, csv_writer = 0, 0, None, 0, None
    try:
        while (rows is None or done < rows) and (limit is None or on_disk < limit):
            n = group_rows if rows is None else min(group_rows, rows - done)
            table, codes = _chunk(rng, n, bias)
            if writer is None:
                path = folder / f"part-{part:05d}.parquet"
                writer, in_file = pq.ParquetWriter(path, table.schema), 0
            writer.write_table(table, row_group_size=group_rows)
            in_file += n
            if csv:
                ints = pa.table({**{c: codes[c] for c in CAT}, **{d: table[d] for d in DENSE},
                                 **{c: table[c] for c in LABELS}})
                if csv_writer is None:
                    csv.mkdir(parents=True, exist_ok=True)
                    csv_writer = pcsv.CSVWriter(csv / "bench_train.csv", ints.schema)
                csv_writer.write_table(ints)
            done += n
            if in_file >= file_rows:
                writer.close()
                writer, part = None, part + 1
            on_disk = sum(f.stat().st_size for f in folder.glob("part-*.parquet"))
    finally:
        if writer is not None:
            writer.close()
        if csv_writer is not None:
            csv_writer.close()
    return done


# ----------------------------------------------------------------------------- (a) loaders
def _schema(folder: Path):
    from polytask.data.tables import HashBuckets, TableSchema, build_vocabularies

    vocabs = build_vocabularies(sorted(folder.glob("part-*.parquet")), list(VOCAB))
    enc = {**{c: HashBuckets(HASH_BUCKETS) for c in HASHED}, **vocabs}
    return TableSchema(dense=tuple(DENSE), categorical=enc, labels=LABELS)


def rate(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    rows = fn()
    return rows / (time.perf_counter() - t0), rows


def load_pyarrow_raw(folder: Path, batch: int) -> int:
    rows = 0
    for f in sorted(folder.glob("part-*.parquet")):
        for rb in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=[*CAT, *DENSE, *LABELS]):
            rows += rb.num_rows
    return rows


def load_polytask(folder: Path, batch: int, schema, read_ahead: int = 1) -> int:
    from polytask.data.tables import TableSource

    src = TableSource(folder, schema, batch_size=batch, shuffle_rows=262_144, seed=0, read_ahead=read_ahead)
    return sum(len(t["click"]) for _, t, _ in src)


def load_polytask_csv(folder: Path, batch: int) -> int:
    from polytask.data.recsys import TableFormat, load_table_splits

    shutil.copy(folder / "bench_train.csv", folder / "bench_test.csv")  # the path needs a test file
    fmt = TableFormat("bench", dict(LABELS), lambda c: c in DENSE)
    splits = load_table_splits(fmt, folder, val_fraction=0.01)
    g = torch.Generator().manual_seed(0)
    rows = sum(len(b.targets["click"]) for b in splits.train.batches(batch, shuffle=True, generator=g))
    return rows + len(splits.val)


def load_rechub(folder: Path, batch: int, max_rows: int) -> int:
    import pandas as pd
    from sklearn.preprocessing import LabelEncoder
    from torch_rechub.utils.data import DataGenerator, df_to_dict

    df = pd.read_csv(folder / "bench_train.csv", nrows=max_rows)
    for c in CAT:
        df[c] = LabelEncoder().fit_transform(df[c])
    y = df["click"].fillna(0).to_numpy()
    x = df_to_dict(df.drop(columns=list(LABELS)))
    train, _, _ = DataGenerator(x, y).generate_dataloader(x, y, x.copy(), y, batch_size=batch)
    return sum(len(yb) for _, yb in train)


# ----------------------------------------------------------------------------- (b) peak memory
def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in _children(int(k))]


def peak_rss_of(cmd: list[str], cwd: Path) -> tuple[float, float, int]:
    """(peak VmHWM of the process in GB, peak summed VmRSS of it and its children in GB, exit code)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"hwm": 0, "rss": 0}

    def sample() -> None:
        while proc.poll() is None:
            peak["hwm"] = max(peak["hwm"], _status_kb(proc.pid, "VmHWM"))
            peak["rss"] = max(peak["rss"], sum(_status_kb(p, "VmRSS") for p in [proc.pid, *_children(proc.pid)]))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return peak["hwm"] / 1e6, peak["rss"] / 1e6, proc.returncode


def train_config(folder: Path, small: Path, batch: int) -> str:
    ids = "\n".join([*(f"      {c}: {{hash: {HASH_BUCKETS}}}" for c in HASHED), *(f"      {c}: {{}}" for c in VOCAB)])
    return f"""name: recsys-scale
seed: 0
out_dir: {folder.parent}/runs/{{name}}
data:
  name: table
  params:
    train: {folder}
    val: {small}/val.parquet
    test: {small}/test.parquet
    dense: [{', '.join(DENSE)}]
    ids:
{ids}
    labels: {{click: click, conversion: conversion}}
    embed_dim: 16
    shuffle_rows: 262144
model:
  arch: mmoe
  params: {{num_experts: 8}}
balancer: {{name: ew}}
optim: {{name: adam, lr: 0.001}}
train: {{epochs: 1, batch_size: {batch}, eval_batch_size: 65536, early_stopping: null}}
"""


# ----------------------------------------------------------------------------- (c) training
def train_rate(arch: str, folder: Path, schema, batch: int, steps: int) -> float:
    from polytask.nn import build_model
    from polytask.tasks import Task

    from polytask.data.tables import TableSource

    src = TableSource(folder, schema, batch_size=batch, shuffle_rows=262_144, seed=0)
    tasks = [Task(t, "binary") for t in LABELS]
    torch.manual_seed(0)
    model = build_model(arch, src.feature_spec(16), tasks, num_experts=8) if arch == "mmoe" else \
        build_model(arch, src.feature_spec(16), tasks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    it = iter(src)
    t0, seen = 0.0, 0
    for step in range(steps + 5):
        if step == 5:
            t0, seen = time.perf_counter(), 0
        x, y, m = next(it)
        out = model(x)
        loss = sum(t.loss(out[t.name], y[t.name], m[t.name]) for t in tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y["click"])
    return seen / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loader-rows", type=int, default=1_000_000)
    ap.add_argument("--rechub-rows", type=int, default=200_000)
    ap.add_argument("--gb", type=float, default=5.0, help="size of the log on disk for (b) and (c)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated files (a later run reuses them)")
    ap.add_argument("--skip-memory", action="store_true", help="skip (b), the long epoch")
    ap.add_argument("--parts", default="a,b,c",
                    help="which measurements: (b) is a peak memory and may run beside other jobs; "
                         "(a) and (c) are timings and need a quiet machine")
    ap.add_argument("--toy", action="store_true", help="tiny sizes: checks that the script runs")
    a = ap.parse_args(argv)
    if a.toy:
        a.loader_rows, a.rechub_rows, a.gb, a.train_steps = 60_000, 5_000, 0.02, 5
    parts = set(a.parts.split(",")) - ({"b"} if a.skip_memory else set())
    torch.set_num_threads(a.threads)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="recsys_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    rows_table: list[tuple[str, str, str, str]] = []
    try:
        if "a" in parts:
            rows_table += loader_rows(work, a)
        big = work / "log"
        t0 = time.perf_counter()
        n_big = write_log(big, gb=a.gb, seed=2)
        size = sum(f.stat().st_size for f in big.glob("*.parquet")) / 1e9
        rows_table.append(("log on disk", f"{size:.2f} GB",
                           f"{n_big:,} rows (written or reused in {time.perf_counter() - t0:.0f} s)", ""))
        if "b" in parts:
            rows_table.append(memory_row(work, big, a.batch))
        if "c" in parts:
            schema_big = _schema(big)
            for arch in ("mmoe", "ple"):
                r = train_rate(arch, big, schema_big, a.batch, a.train_steps)
                rows_table.append((f"(c) train {arch}, 20 cat cols", f"{r:,.0f} samples/s",
                                   f"batch {a.batch}, {a.threads} thread(s)", ""))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows_table)


def loader_rows(work: Path, a: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(a): the four loaders over the same ``--loader-rows`` rows."""
    small, csv_dir = work / "loader", work / "loader_csv"
    write_log(small, rows=a.loader_rows, csv=csv_dir, group_rows=65_536, seed=1)
    schema = _schema(small)
    raw, n = rate(lambda: load_pyarrow_raw(small, a.batch))
    ours, _ = rate(lambda: load_polytask(small, a.batch, schema))
    serial, _ = rate(lambda: load_polytask(small, a.batch, schema, read_ahead=0))
    csv_rate, _ = rate(lambda: load_polytask_csv(csv_dir, a.batch))
    rechub, n_rechub = rate(lambda: load_rechub(csv_dir, a.batch, a.rechub_rows))
    return [
        ("(a) pyarrow raw read", f"{raw:,.0f} rows/s", f"{n:,} rows", ""),
        ("(a) polytask tables", f"{ours:,.0f} rows/s", f"{ours / raw:.2f}x raw", ">= 0.5x raw"),
        ("(a) tables, read_ahead=0", f"{serial:,.0f} rows/s", f"{serial / raw:.2f}x raw (no reader thread)", ""),
        ("(a) polytask csv (recsys.py)", f"{csv_rate:,.0f} rows/s", f"tables {ours / csv_rate:.1f}x",
         "tables >= 5x"),
        ("(a) torch-rechub pandas", f"{rechub:,.0f} rows/s", f"{n_rechub:,} rows; tables {ours / rechub:.1f}x", ""),
    ]


def memory_row(work: Path, big: Path, batch: int) -> tuple[str, str, str, str]:
    """(b): peak resident memory of a one-epoch ``polytask train`` (MMoE) over the big log."""
    evals = work / "eval"
    evals.mkdir(exist_ok=True)
    for name, seed in (("val", 3), ("test", 4)):
        if not (evals / f"{name}.parquet").is_file():
            write_log(evals / name, rows=50_000, seed=seed)
            (evals / name / "part-00000.parquet").replace(evals / f"{name}.parquet")
    cfg = work / "scale.yaml"
    cfg.write_text(train_config(big, evals, batch))
    shutil.rmtree(work / "runs", ignore_errors=True)  # a kept workdir: the previous epoch's run
    cmd = [sys.executable, "-m", "polytask.cli", "train", str(cfg)]
    t0 = time.perf_counter()
    hwm, rss, rc = peak_rss_of(cmd, work)
    note = f"one epoch, {time.perf_counter() - t0:.0f} s" + ("" if rc == 0 else f", EXIT {rc}")
    return ("(b) peak RSS, MMoE epoch", f"{hwm:.2f} GB", f"{note}; with children {rss:.2f} GB", "< 3 GB")


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    head = ("measurement", "value", "detail", "target")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(4)]
    for r in (head, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
