"""Loaders for recommendation-style multi-task tables: Census-Income (KDD), AliExpress, Ali-CCP.

They read the preprocessed CSV format that torch-rechub distributes (categorical columns already
label-encoded as integers, numeric columns min-max scaled): the small ``*_sample.csv`` files and
the full files in the same format alike. Each loader returns :class:`~polytask.data.Splits` whose
inputs are a dict of feature tensors and whose ``input_spec`` is a
:class:`~polytask.data.features.FeatureSpec` (dense columns stacked into one ``dense`` feature, one
categorical feature per id column), so ``build_model(arch, splits.input_spec, splits.tasks)``
works unchanged. Embedding-table sizes are ``max id + 1`` over all the splits read.

Files are found in ``root`` as ``{prefix}_{split}.csv`` or ``{prefix}_{split}_sample.csv``
(``split`` in train / val / test); a data set without a validation file gets one cut from the
training rows (``val_fraction``, seeded). Without ``root`` the loaders read the small samples that
ship inside the package (:data:`SAMPLES_DIR`, MIT-licensed rows from torch-rechub; see the
``README.md`` and ``LICENSE`` there).

Features are validated when read: an empty, NaN or infinite value in a feature column is a
:class:`~polytask.errors.DataError` naming the file, the line and the column (it would otherwise
surface later as a NaN loss). An empty or NaN value in a label column marks that row unlabelled
for that task, as everywhere in polytask.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polytask.data.builtin import DATASETS
from polytask.data.dataset import MultiTaskDataset, Splits
from polytask.errors import ConfigError, DataError
from polytask.data.features import DenseFeature, FeatureSpec, SparseFeature
from polytask.tasks import Task

#: The small samples shipped with the package (read when a loader gets no ``root``).
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

CENSUS_DENSE = (
    "age", "wage per hour", "capital gains", "capital losses", "divdends from stocks",
    "num persons worked for employer", "weeks worked in year",
)


@dataclass(frozen=True)
class TableFormat:
    """How to read one data set's CSV columns.

    ``tasks`` maps a task name to its 0/1 label column; ``is_dense`` says whether a feature column
    is numeric (else it holds integer ids); ``ignore`` lists columns that are neither.
    """

    prefix: str
    tasks: dict[str, str]
    is_dense: Callable[[str], bool]
    ignore: tuple[str, ...] = ()


FORMATS = {
    "census_income": TableFormat("census_income", {"income": "income", "marital": "marital status"},
                                 lambda c: c in CENSUS_DENSE),
    "aliexpress": TableFormat("aliexpress", {"click": "click", "conversion": "conversion"},
                              lambda c: c.startswith("numerical"), ignore=("search_id",)),
    "ali_ccp": TableFormat("ali_ccp", {"click": "click", "purchase": "purchase"}, lambda c: c.startswith("D")),
}


def _find(root: Path, prefix: str, split: str) -> Path | None:
    for name in (f"{prefix}_{split}.csv", f"{prefix}_{split}_sample.csv"):
        if (root / name).is_file():
            return root / name
    return None


def read_table(path: Path) -> tuple[list[str], np.ndarray]:
    """Header and ``(rows, columns)`` float64 values of a numeric CSV; DataError naming the file.

    Empty cells become NaN (a missing label, or a missing feature that the caller refuses); a cell
    that is not a number is a DataError naming the file, its line and its column.
    """
    try:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), None)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not header:
        raise DataError(f"{path}: empty file (expected a header row)")
    try:  # the fast parser; it refuses empty cells, which the slow one below reads as NaN
        values = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError:
        values = _read_cells(path, header)
    if values.shape[0] == 0 or values.shape[1] != len(header):
        raise DataError(f"{path}: {values.shape[1] if values.size else 0} values per row, header has {len(header)}")
    return header, values


def _read_cells(path: Path, header: list[str]) -> np.ndarray:
    """Cell-by-cell parse of a CSV that numpy refused: empty cells are NaN, anything else that is
    not a number is a DataError naming the line and the column."""
    rows = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}: line {line} has {len(row)} values, header has {len(header)}")
            out = []
            for column, cell in zip(header, row):
                cell = cell.strip()
                try:
                    out.append(float(cell) if cell else math.nan)
                except ValueError:
                    raise DataError(f"{path}: line {line}, column {column!r}: {cell!r} is not a number") from None
            rows.append(out)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(header))


def _check_features(path: Path, header: list[str], values: np.ndarray, features: Sequence[str]) -> None:
    """DataError naming the file, line and column of the first missing/NaN/inf feature value."""
    idx = [header.index(c) for c in features]
    bad = ~np.isfinite(values[:, idx])
    if bad.any():
        j = int(bad.any(axis=0).argmax())  # the first bad column, its first bad row
        column, first, count = features[j], int(bad[:, j].argmax()), int(bad[:, j].sum())
        raise DataError(f"{path}: feature column {column!r} has {count} missing, NaN or infinite value(s) "
                        f"(first on line {first + 2}); only label columns may be empty (unlabelled rows)")


def load_table_splits(fmt: TableFormat, root: str | Path | None = None, embed_dim: int = 16,
                      val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Read train / (val) / test tables of ``fmt`` from ``root`` (default: the shipped samples,
    :data:`SAMPLES_DIR`) into Splits with a FeatureSpec."""
    root = SAMPLES_DIR if root is None else Path(root)
    paths = {s: _find(root, fmt.prefix, s) for s in ("train", "val", "test")}
    for split in ("train", "test"):
        if paths[split] is None:
            raise DataError(f"{fmt.prefix}: no {split} file in {root} "
                            f"(expected {fmt.prefix}_{split}.csv or {fmt.prefix}_{split}_sample.csv)")
    tables = {s: read_table(p) for s, p in paths.items() if p is not None}
    header = tables["train"][0]
    for split, (cols, _) in tables.items():
        if cols != header:
            raise DataError(f"{paths[split]}: columns differ from {paths['train'].name}")
    missing = [c for c in fmt.tasks.values() if c not in header]
    if missing:
        raise DataError(f"{paths['train']}: no label column(s) {', '.join(map(repr, missing))}")
    labels = set(fmt.tasks.values())
    features = [c for c in header if c not in labels and c not in fmt.ignore]
    dense = [c for c in features if fmt.is_dense(c)]
    sparse = [c for c in features if not fmt.is_dense(c)]
    col = {c: i for i, c in enumerate(header)}
    for split, (cols, values) in tables.items():
        _check_features(paths[split], cols, values, features)
    vocab = {}
    for c in sparse:
        for split, (_, values) in tables.items():
            ids = values[:, col[c]]
            if (ids < 0).any() or (ids != np.round(ids)).any():
                raise DataError(f"{paths[split]}: column {c!r} should hold label-encoded ids (integers >= 0)")
        vocab[c] = int(max(v[:, col[c]].max() for _, v in tables.values())) + 1
    spec = FeatureSpec(((DenseFeature("dense", len(dense)),) if dense else ())
                       + tuple(SparseFeature(c, vocab[c], embed_dim) for c in sparse))
    tasks = [Task(name, "binary", metrics=("auc", "logloss")) for name in fmt.tasks]

    def dataset(values: np.ndarray) -> MultiTaskDataset:
        inputs = {c: torch.as_tensor(values[:, col[c]].astype(np.int64)) for c in sparse}
        if dense:
            inputs = {"dense": torch.as_tensor(values[:, [col[c] for c in dense]].astype(np.float32)), **inputs}
        targets = {name: values[:, col[c]] for name, c in fmt.tasks.items()}
        for name, y in targets.items():
            if not np.isin(y[~np.isnan(y)], (0.0, 1.0)).all():
                raise DataError(f"{fmt.prefix}: label column {fmt.tasks[name]!r} of task {name!r} must be 0/1")
        return MultiTaskDataset.from_numpy(inputs, targets, tasks=tasks)

    train = dataset(tables["train"][1])
    if "val" in tables:
        val = dataset(tables["val"][1])
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.params.val_fraction must lie in (0, 1), got {val_fraction}")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(val_fraction * len(train))))
        train, val = train.subset(order[n_val:]), train.subset(order[:n_val])
    return Splits(fmt.prefix, tasks, train, val, dataset(tables["test"][1]), spec)


@DATASETS.register("census_income", "census")
def census_income(root: str | None = None, embed_dim: int = 16, val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """UCI Census-Income (KDD) as in the MMoE (Ma et al., KDD 2018) and PLE (Tang et al., RecSys
    2020) papers: tasks ``income`` (over 50K) and ``marital`` (never married); 7 dense columns,
    the rest categorical. ``root``: folder of the CSV files (default: the shipped sample)."""
    return load_table_splits(FORMATS["census_income"], root, embed_dim, val_fraction, seed)


@DATASETS.register("aliexpress")
def aliexpress(root: str | None = None, embed_dim: int = 16, val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """AliExpress search logs (used by the PLE and AITM papers): tasks ``click`` and ``conversion``;
    ``categorical_*`` ids and ``numerical_*`` dense columns (``search_id`` is not a feature).
    ``root``: folder of the CSV files (default: the shipped sample)."""
    return load_table_splits(FORMATS["aliexpress"], root, embed_dim, val_fraction, seed)


@DATASETS.register("ali_ccp")
def ali_ccp(root: str | None = None, embed_dim: int = 16, val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Ali-CCP (Ma et al., ESMM, SIGIR 2018): tasks ``click`` and ``purchase`` (click-and-purchase
    over all impressions, the CTCVR label); ``D*`` columns dense, the others categorical ids.
    ``root``: folder of the CSV files (default: the shipped sample)."""
    return load_table_splits(FORMATS["ali_ccp"], root, embed_dim, val_fraction, seed)


__all__: Sequence[str] = ["FORMATS", "SAMPLES_DIR", "TableFormat", "ali_ccp", "aliexpress", "census_income",
                          "load_table_splits", "read_table"]
