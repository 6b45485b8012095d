"""Streaming table data in a training run, and batch scoring with a trained run.

A run config names the table source with ``data: {name: table, params: ...}``::

    data:
      name: table
      params:
        train: data/train/        # a file, a glob or a folder of .parquet/.csv files (or a list)
        val: data/val.parquet
        test: data/test.parquet
        # or one source cut by a seeded hash of a key column:
        # path: data/log/, split: {key: request_id, fractions: [0.8, 0.1, 0.1], seed: 0}
        dense: [price, hour]
        ids: {user_id: {min_count: 2}, item_id: {hash: 1000000, sparse: true}, category: {},
              recent_items: {hash: 1000000, sequence: {max_len: 50, pooling: mean}}}
        labels: {click: click, conversion: conversion}    # task: label column (binary tasks)
        group: user_id                                      # optional: adds GAUC per task
        embed_dim: 16
        shuffle_rows: 65536                                 # the shuffle buffer bounds memory
        read_ahead: 1                                       # windows read by a background thread
        workers: 0                                          # DataLoader workers
        csv_block_bytes: 67108864                           # a larger CSV file: several units (byte ranges)

Training streams the train split through :class:`~polytask.data.tables.TableSource` (shuffled
per epoch with ``(seed, epoch)``, so a resumed run repeats the uninterrupted one); val and test
are read in file order and every task is evaluated on the whole split (outputs, labels and group
keys are kept, 4-12 bytes per row and task: the metrics are exact). Vocabularies are built in one
streaming pass over the train files (with a fraction split: over the whole source; ids seen only in
val/test then get an untrained row instead of the OOV one) and saved as ``vocab.json`` in the run
directory; a run that finds a ``vocab.json`` made for the same id columns reuses it (resume).

An id column may hold lists of ids (``sequence``: padded to ``max_len``, embedded and pooled,
:class:`~polytask.data.tables.SequenceIds`), and may train its embedding with sparse gradients
(``sparse: true``: :class:`SparseDenseOptimizer`, SparseAdam or SGD on the touched rows only, or
``sparse: rowwise_adagrad``; with loss balancers and gradient balancers at feature level on one
process or several, with gradient balancers at parameter level on one process through the rows
each batch touches: :func:`use_sparse_embeddings`). The embedding tables' memory is printed before
training.
``polytask export`` writes the trained model with its id lookups as a ``torch.export`` program
(:mod:`polytask.export`).

More than one process (``--nproc N``): each rank counts the ids of its share of the units (row
groups, CSV files, byte ranges of CSV files larger than ``csv_block_bytes``: 64 MiB; shares of
about equal bytes) of the vocabulary pass, each value's counts go to
one rank (picked by a hash of the value), which sums them and sends the kept values to all, and
every rank builds the same vocabularies as one process (``build_encoders``);
each rank reads its own units (row groups) of the train files, ``train.batch_size / N`` rows a
batch; the ranks' shards differ by up to a row group, so a rank that runs out first takes empty
batches (a masked mean over no rows is 0: it adds nothing to the step's global loss) until every
rank has read its last row - each row is trained on once per epoch, and every rank runs the same
number of steps. The step count comes from the Parquet footers (:meth:`TableSource.rank_batches`);
for CSV files (no footer) and fraction splits (a filter) the rows of each unit are counted once by
reading one column (the split's key), each rank counting a share of the units, then exchanged. A CSV file
larger than ``csv_block_bytes`` is cut at line starts into byte ranges read with the header's names and
the file's first-block types (:class:`~polytask.data.tables.CsvOptions`), so one big file is shared by
the ranks; ``newlines_in_values: true`` (values with line breaks) keeps every CSV file whole, one unit
each: then write at least as many CSV files as ranks, or ranks sit idle.
Evaluation: each rank scores its own units of val/test, and the outputs, labels and group keys
are gathered to every rank, where the metrics are computed over the whole split: exactly one
process's numbers.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor

from polytask.data.dataset import Batch, Splits
from polytask.errors import CheckpointError, ConfigError, DataError
from polytask.tasks import Task

VOCAB_FILE = "vocab.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SequenceSpec(_Strict):
    """A column of id lists: the first ``max_len`` ids, embedded and pooled (mean, sum or max)."""

    max_len: int = Field(50, ge=1)
    pooling: Literal["mean", "sum", "max"] = "mean"


#: ``ids.<column>.sparse`` values naming a row-wise rule (``true``: the rule that follows ``optim.name``).
SPARSE_RULES = ("adam", "sgd", "rowwise_adagrad")


class IdColumn(_Strict):
    """One categorical column: a vocabulary (ids seen ``min_count`` times) or ``hash`` buckets;
    ``sequence``: the column holds lists of ids (:class:`~polytask.data.tables.SequenceIds`);
    ``sparse``: its embedding gets sparse gradients and a row-wise optimiser (:class:`SparseDenseOptimizer`):
    ``true`` (SparseAdam, or SGD with ``optim.name: sgd``) or a rule by name (:data:`SPARSE_RULES`)."""

    min_count: int = Field(1, ge=1)
    hash: int | None = Field(None, ge=1)
    sequence: SequenceSpec | None = None
    sparse: bool | str = False

    @field_validator("sparse", mode="before")
    @classmethod
    def _sparse_rule(cls, v: Any) -> Any:
        if isinstance(v, bool) or v in SPARSE_RULES:
            return v
        raise ValueError(f"must be true, false or one of {', '.join(map(repr, SPARSE_RULES))}, got {v!r}")


class FractionSplit(_Strict):
    key: str
    fractions: tuple[float, float, float]
    seed: int = 0

    @model_validator(mode="after")
    def _sum(self) -> FractionSplit:
        if min(self.fractions) < 0 or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(self.fractions)}")
        return self


Paths = str | list[str]


class TableParams(_Strict):
    """``data.params`` of ``data.name: table`` (see the module docstring)."""

    train: Paths | None = None
    val: Paths | None = None
    test: Paths | None = None
    path: Paths | None = None
    split: FractionSplit | None = None
    dense: list[str] = Field(default_factory=list)
    ids: dict[str, IdColumn] = Field(default_factory=dict)
    labels: dict[str, str]
    group: str | None = None
    embed_dim: int = Field(16, ge=1)
    shuffle_rows: int = Field(65536, ge=0)
    workers: int = Field(0, ge=0)
    read_rows: int = Field(65536, ge=1)
    read_ahead: int = Field(1, ge=0)  # train windows read ahead by a background thread (0: none)
    csv_block_bytes: int = Field(64 << 20, ge=1)  # a larger CSV file is cut into byte ranges (units)
    newlines_in_values: bool = False  # CSV values may hold line breaks: files read whole (not cut)

    def csv_options(self) -> Any:
        from polytask.data.tables import CsvOptions

        return CsvOptions(self.csv_block_bytes, self.newlines_in_values)

    @model_validator(mode="after")
    def _source(self) -> TableParams:
        by_file = [self.train, self.val, self.test]
        if self.path is not None:
            if any(p is not None for p in by_file) or self.split is None:
                raise ValueError("give either train/val/test, or path with split")
        elif any(p is None for p in by_file) or self.split is not None:
            raise ValueError("needs train, val and test (or path with split)")
        if not self.labels:
            raise ValueError("labels needs at least one task: column")
        return self


def parse_params(params: dict[str, Any]) -> TableParams:
    try:
        return TableParams.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        where = f"data.params.{key}" if key else "data.params"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {msg}") from None


def expand(paths: Paths) -> list[str]:
    """Files and folders, with globs expanded (a glob matching nothing is a DataError)."""
    out = []
    for p in [paths] if isinstance(paths, str) else paths:
        if glob.has_magic(p):
            hits = sorted(glob.glob(p, recursive=True))
            if not hits:
                raise DataError(f"{p}: no file matches")
            out += hits
        else:
            out.append(p)
    return out


def feature_spec(dense: Sequence[str], encoders: dict[str, Any], embed_dim: int) -> Any:
    from polytask.data.features import DenseFeature, FeatureSpec
    from polytask.data.encoders import id_feature

    head = (DenseFeature("dense", len(dense)),) if dense else ()
    return FeatureSpec(head + tuple(id_feature(c, enc, embed_dim) for c, enc in encoders.items()))


def _encoder(spec: IdColumn, vocab: Any) -> Any:
    """The column's encoder: hash buckets or its vocabulary, inside SequenceIds for a list column."""
    from polytask.data.encoders import HashBuckets, SequenceIds

    enc = HashBuckets(spec.hash) if spec.hash is not None else vocab
    return enc if spec.sequence is None else SequenceIds(enc, spec.sequence.max_len, spec.sequence.pooling)


def _same_data(run_dir: Path, data: dict[str, Any]) -> bool:
    """Whether ``run_dir/config.yaml`` names the same ``data`` section (then its vocab.json is reusable)."""
    import yaml

    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(old, dict) and old.get("data") == data


def _saved_vocabularies(run_dir: Path, vocab_cols: dict[str, int], data: dict[str, Any] | None) -> dict[str, Any]:
    """The vocabularies of ``run_dir/vocab.json`` when the run there had the same ``data`` section and
    the file holds the same columns with the same ``min_count`` (resume), else none."""
    from polytask.data.tables import load_vocabularies

    saved = run_dir / VOCAB_FILE
    if vocab_cols and saved.is_file() and (data is None or _same_data(run_dir, data)):
        old = load_vocabularies(saved)
        if {c: v.min_count for c, v in old.items()} == vocab_cols:
            return old
    return {}


def build_encoders(p: TableParams, run_dir: Path, data: dict[str, Any] | None = None, ctx: Any = None,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """Hash buckets and vocabularies per id column; vocabularies reused from ``run_dir/vocab.json``
    (:func:`_saved_vocabularies`), else built in one pass over the train files for all columns.

    With a process group (``ctx``), rank 0 decides on reuse (its answer broadcast, so that no rank
    counts alone); to build, each rank counts its share of the units (row groups, CSV files;
    balanced by bytes: :func:`~polytask.data.tables.balanced_shares`) and one all-gather of the
    count tables gives every rank the counts of the whole pass, from which each builds the same
    vocabularies as one process: the pass takes about 1/N of the time, and no rank waits in a
    collective while another reads everything."""
    from polytask.data.tables import build_vocabularies

    vocab_cols = {c: spec.min_count for c, spec in p.ids.items() if spec.hash is None}
    shared = ctx is not None and ctx.world_size > 1
    if shared:
        from polytask.train.dist import on_main

        vocabs = on_main(lambda: _saved_vocabularies(run_dir, vocab_cols, data), ctx, torch.device(device))
    else:
        vocabs = _saved_vocabularies(run_dir, vocab_cols, data)
    if vocab_cols and not vocabs:
        from polytask.data.vocab_ranks import RankGroup
        from polytask.train.dist import collective

        files = expand(p.train if p.path is None else p.path)
        ranks = RankGroup(ctx.group, device, collective) if shared else None
        vocabs = build_vocabularies(files, list(vocab_cols), vocab_cols, batch_rows=p.read_rows, ranks=ranks,
                                    csv=p.csv_options())
    return {c: _encoder(spec, vocabs.get(c)) for c, spec in p.ids.items()}


class StreamSplit:
    """One split of a table source, in the trainer's dataset interface: ``batches()`` streams
    :class:`~polytask.data.dataset.Batch` es (train: shuffled by ``(seed, epoch)``), ``to()``
    picks the device they go to."""

    def __init__(self, paths: Paths, schema: Any, p: TableParams, seed: int, split: Any = None,
                 train: bool = False, device: torch.device | str = "cpu", ctx: Any = None) -> None:
        from polytask.data.tables import TableSource
        from polytask.train.dist import DistContext

        self.p, self.seed, self.train, self.device = p, seed, train, torch.device(device)
        self.ctx = ctx or DistContext()
        self.source = TableSource(expand(paths), schema, batch_size=1, shuffle_rows=p.shuffle_rows if train else 0,
                                  seed=seed, split=split, read_rows=p.read_rows, rank=self.ctx.rank,
                                  world_size=self.ctx.world_size, read_ahead=p.read_ahead if train else 0,
                                  csv=p.csv_options())
        if train and self.ctx.world_size > 1 and self.source.rank_batches() is None:
            self.source.counted_rows = _count_across_ranks(self.source, self.ctx)
        self.epoch = 0

    def __len__(self) -> int:
        """An upper bound on the rows (Parquet footers, before a split's filter; a CSV's size in
        bytes): the trainer only needs one with ``train.accumulate: 1``."""
        import pyarrow.parquet as pq

        files = self.source.files
        return sum(f.stat().st_size if f.suffix.lower() == ".csv" else pq.ParquetFile(f).metadata.num_rows
                   for f in files)

    def to(self, device: torch.device | str) -> StreamSplit:
        self.device = torch.device(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _move(self, inputs: dict, targets: dict, mask: dict) -> Batch:
        d = self.device
        return Batch({k: v.to(d) for k, v in inputs.items()}, {k: v.to(d) for k, v in targets.items()},
                     {k: v.to(d) for k, v in mask.items()})

    def batches(self, batch_size: int, shuffle: bool = False, generator: Any = None, drop_last: bool = False,
                shard: Any = None) -> Iterator[Batch]:
        from polytask.data.tables import TableLoader

        world = self.ctx.world_size
        self.source.batch_size = batch_size // world if shard is not None else batch_size
        workers = self.p.workers if self.train else 0
        loader = TableLoader(self.source, num_workers=workers)
        loader.epoch = self.epoch
        steps = max(self.source.rank_batches(workers, self.epoch)) if world > 1 else None
        done = 0
        for inputs, targets, mask in loader:
            done += 1
            yield self._move(inputs, targets, mask)
        for _ in range(steps - done if steps is not None else 0):  # this rank ran out first: empty batches
            yield self._move(*self._empty())

    def _empty(self) -> tuple[dict, dict, dict]:
        """A batch of no rows (the shapes and dtypes of the source's batches)."""
        sch = self.source.schema
        inputs = {"dense": torch.zeros(0, len(sch.dense))} if sch.dense else {}
        inputs.update({c: torch.zeros((0, e.max_len) if hasattr(e, "max_len") else 0, dtype=torch.int64)
                       for c, e in sch.categorical.items()})
        return (inputs, {t: torch.zeros(0) for t in sch.labels}, {t: torch.zeros(0, dtype=torch.bool) for t in sch.labels})

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Batch, np.ndarray | None]]:
        """Batches in file order with the stable 64-bit hash of each row's group key (or None)."""
        from polytask.data.encoders import stable_hash

        src, group = self.source, self.p.group
        for unit in src.shard_units(self.ctx.rank, self.ctx.world_size):  # file order, dealt to the ranks
            for rb in src._read_unit(unit):
                for start in range(0, rb.num_rows, batch_size):
                    part = rb.slice(start, batch_size)
                    g = stable_hash(part.column(group)) if group else None
                    yield self._move(*src._to_batch(part, src.files[unit[0]])), g


def _count_across_ranks(source: Any, ctx: Any) -> list[int]:
    """Every unit's row count (CSV files, a split's filter: :meth:`~polytask.data.tables.TableSource.count_rows`),
    each rank counting every ``world_size``-th unit, then one all-gather: the pass is shared, and no
    rank waits in a collective while one rank reads everything. A user error on any rank (a bad
    file) is raised on every rank alike."""
    from polytask.errors import PolytaskError
    from polytask.errors import error_from_name
    from polytask.train.dist import gather_objects

    mine = list(range(ctx.rank, len(source.units), ctx.world_size))
    try:
        got: tuple = ("ok", dict(zip(mine, source.count_rows(mine))))
    except PolytaskError as exc:
        got = ("error", type(exc).__name__, str(exc))
    counts: dict[int, int] = {}
    for part in gather_objects(got, ctx):
        if part[0] == "error":
            raise error_from_name(part[1], part[2])
        counts.update(part[1])
    return [counts[i] for i in range(len(source.units))]


class TableSplits(Splits):
    """Splits of a table source; ``save(run_dir)`` writes the vocabularies."""

    encoders: dict[str, Any]
    sparse: tuple[str, ...] = ()
    sparse_rules: tuple = ()  # per sparse column: True (from optim.name) or a rule of SPARSE_RULES

    def save(self, run_dir: Path) -> None:
        from polytask.data.encoders import Vocabulary, save_vocabularies

        inner = {c: getattr(e, "inner", e) for c, e in self.encoders.items()}  # a sequence column's vocabulary
        vocabs = {c: e for c, e in inner.items() if isinstance(e, Vocabulary)}
        if vocabs:
            save_vocabularies(vocabs, Path(run_dir) / VOCAB_FILE)


def check_multiprocess(config: Any) -> None:
    """ConfigError (before any process starts) when ``data.params`` is not valid. Every table source
    trains on several ranks: Parquet files by their footers, CSV files and fraction splits by one
    counting pass shared by the ranks (:meth:`~polytask.data.tables.TableSource.count_rows`)."""
    parse_params(dict(config.data.params))


def table_splits(config: Any, ctx: Any = None, device: torch.device | str = "cpu") -> TableSplits:
    """The train/val/test :class:`StreamSplit` s of ``config.data`` (``name: table``); with a
    process group (``ctx``), each rank's shards; the vocabularies counted by the ranks in shares."""
    from polytask.data.tables import Split, TableSchema

    p = parse_params(dict(config.data.params))
    if config.train.accumulate != 1:
        raise ConfigError("train.accumulate: table data trains with 1 (the batches of a streamed epoch are "
                          "not counted ahead)")
    labels = dict(p.labels)
    if config.data.tasks is not None:
        unknown = [t for t in config.data.tasks if t not in labels]
        if unknown:
            raise ConfigError(f"data.tasks: unknown task(s) {', '.join(map(repr, unknown))}; "
                              f"the table has {', '.join(labels)}")
        labels = {t: c for t, c in labels.items() if t in config.data.tasks}
    data = config.data.model_dump(mode="json")
    encoders = build_encoders(p, config.run_dir, data, ctx, device)
    keep = tuple(c for c in (p.group, p.split.key if p.split else None) if c)
    schema = TableSchema(dense=tuple(p.dense), categorical=encoders, labels=labels, keep=keep)
    if p.path is None:
        parts = [(p.train, None), (p.val, None), (p.test, None)]
    else:
        edges = np.cumsum([0.0, *p.split.fractions])
        edges[-1] = 1.0
        parts = [(p.path, Split(key=p.split.key, fraction=(float(edges[i]), float(edges[i + 1])), seed=p.split.seed))
                 for i in range(3)]
    train, val, test = (StreamSplit(paths, schema, p, config.seed, split, train=i == 0, device=device, ctx=ctx)
                        for i, (paths, split) in enumerate(parts))
    tasks = [Task(t, "binary", metrics=("auc", "logloss")) for t in labels]
    out = TableSplits("table", tasks, train, val, test, feature_spec(p.dense, encoders, p.embed_dim))
    out.encoders = encoders
    out.sparse = tuple(c for c, spec in p.ids.items() if spec.sparse)
    out.sparse_rules = tuple(p.ids[c].sparse for c in out.sparse)
    return out


@torch.no_grad()
def evaluate_stream(model: torch.nn.Module, split: StreamSplit, tasks: Sequence[Task], batch_size: int,
                    autocast: Any = None) -> dict[str, dict[str, float]]:
    """Every metric of every task over the whole split, plus ``gauc`` when a group column is set."""
    from contextlib import nullcontext

    from polytask.metrics import gauc

    was = model.training
    model.eval()
    outs: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
    tgts: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
    masks: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
    groups: list[np.ndarray] = []
    for batch, g in split.eval_batches(batch_size):
        with (autocast() if autocast else nullcontext()):
            out = model(batch.inputs)
        for t in tasks:
            outs[t.name].append(out[t.name].float().reshape(-1).cpu())
            tgts[t.name].append(batch.targets[t.name].cpu())
            masks[t.name].append(batch.mask[t.name].cpu())
        if g is not None:
            groups.append(g)
    model.train(was)
    if split.ctx.world_size > 1:  # every rank's rows, gathered: the metrics are one process's
        from polytask.train.dist import gather_objects

        def cat(v: list[Tensor], dtype: torch.dtype) -> Tensor:  # a rank may hold no unit of a small split
            return torch.cat(v) if v else torch.zeros(0, dtype=dtype)

        mine = ({k: cat(v, torch.float32) for k, v in outs.items()}, {k: cat(v, torch.float32) for k, v in tgts.items()},
                {k: cat(v, torch.bool) for k, v in masks.items()}, np.concatenate(groups) if groups else None)
        parts = gather_objects(mine, split.ctx)
        outs, tgts, masks = ({t.name: [q[i][t.name] for q in parts] for t in tasks} for i in range(3))
        groups = [q[3] for q in parts if q[3] is not None]
    result = {}
    for t in tasks:
        o, y, m = torch.cat(outs[t.name]), torch.cat(tgts[t.name]), torch.cat(masks[t.name])
        result[t.name] = t.evaluate(o, y, m)
        if groups:
            result[t.name]["gauc"] = gauc(o.numpy(), y.numpy(), np.concatenate(groups), m.numpy())
    return result


# ----------------------------------------------------------------------------- large embeddings
def embedding_report(model: torch.nn.Module) -> str:
    """One line on the embedding tables' memory (parameters only; Adam keeps two more copies)."""
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    rows = sum(t.num_embeddings for t in tables)
    size = sum(t.weight.numel() * t.weight.element_size() for t in tables)
    sparse = sum(t.weight.numel() * t.weight.element_size() for t in tables if t.sparse)
    return (f"embedding tables: {len(tables)}, {rows:,} rows, {size / 2**20:,.1f} MiB of parameters"
            + (f" ({sparse / 2**20:,.1f} MiB with sparse gradients)" if sparse else ""))


def use_sparse_embeddings(model: torch.nn.Module, columns: Sequence[str], config: Any, balancer: Any,
                          world_size: int) -> list[torch.nn.Parameter]:
    """Switch the embedding tables of ``columns`` to sparse gradients; their weights.

    How sparse tables take part in a balanced step:

    - loss balancers (ew, uw, dwa, ...): the tables get the gradient of ``Σ_t w_t L_t``, as every
      parameter does (one backward; the gradient holds only the batch's rows);
    - gradient balancers at feature level (``balancer.params.mode: features``): the tables are part
      of the trunk below the shared features and get the backward of the aggregated feature
      gradient, the same rule as every trunk parameter (MGDA-UB's); identical to dense tables;
    - gradient balancers at parameter level (one process): the rows the batch touches take part
      in the ``T x D`` Jacobian, not the whole tables (:class:`TouchedRows`): exactly the method on
      dense tables, whose untouched rows have a zero gradient for every task. Refused: several
      processes (each rank touches other rows), and methods with state per shared coordinate
      (excessmtl, metabalance, moco; DB-MTL among the loss balancers): it would be a dense copy of
      each table per task.

    Several processes (``--nproc N``): the balancer reduces every gradient itself under DDP's
    ``no_sync`` (:mod:`polytask.balance.dist`); a sparse gradient is all-reduced as indices and
    values (gloo's sparse all-reduce; the dense sum on other backends), so the step equals one
    process's on the global batch. ``train.grad_clip`` clips as ``torch.nn.utils.clip_grad_norm_``
    would on dense tables (:func:`polytask.train.rowwise.clip_grad_norm`: a sparse gradient's norm
    on its coalesced rows; under ``--nproc N`` after the reduction). Refused: ``train.strategy:
    fsdp`` (FSDP2 shards dense parameters only).
    """
    from polytask.balance.engine import GradientBalancer

    key = f"data.params.ids.{columns[0]}.sparse"
    if isinstance(balancer, GradientBalancer) and balancer.mode != "features":
        if world_size > 1:
            raise ConfigError(f"{key}: the gradient balancer {config.balancer.name!r} at parameter level on "
                              f"{world_size} processes (each rank's batch touches other rows: their Jacobians do not "
                              "add up); use balancer.params.mode: features, a loss balancer, or --nproc 1")
        if balancer.aggregator.parameter_space_only:
            raise ConfigError(f"{key}: the gradient balancer {config.balancer.name!r} keeps state per shared "
                              "coordinate, and the rows of sparse tables change every batch; use a loss balancer or "
                              "dense tables")
    if config.balancer.name in ("db_mtl", "dbmtl"):  # a (T, D) average of the per-task gradients
        raise ConfigError(f"{key}: the balancer {config.balancer.name!r} keeps an average of every task's gradient "
                          "per shared coordinate (a dense copy of each table per task); use dense tables")
    if world_size > 1 and config.train.strategy == "fsdp":
        raise ConfigError(f"{key}: train.strategy: fsdp shards dense parameters only; use strategy: ddp")
    tables = getattr(getattr(model, "input", None), "tables", None)
    if tables is None or any(c not in tables for c in columns):
        raise ConfigError(f"data.params.ids: model {config.model.arch!r} has no embedding table for a sparse column")
    for c in columns:
        tables[c].sparse = True
    return [tables[c].weight for c in columns]


def shared_for_balancer(shared: Sequence[Tensor], sparse: Sequence[Tensor], touched: TouchedRows | None,
                        balancer: Any) -> list[Tensor]:
    """The shared parameters a balancer gets when some tables are sparse: with a parameter-level
    gradient balancer, the touched rows instead of the tables (:class:`TouchedRows`); with a
    gradient balancer at feature level, all of them (the tables get the trunk's backward); with a
    loss balancer, all but the sparse tables: of those, only GradNorm reads ``shared`` (for its
    layer, which must not be a sparse table: its per-task gradient norms need a dense gradient);
    the losses still reach the tables through the graph."""
    from polytask.balance.engine import GradientBalancer

    if touched is not None:
        return touched.shared(shared)
    if isinstance(balancer, GradientBalancer):
        return list(shared)
    ids = {id(p) for p in sparse}
    return [p for p in shared if id(p) not in ids]


def touched_rows(model: torch.nn.Module, columns: Sequence[str], balancer: Any) -> TouchedRows | None:
    """The :class:`TouchedRows` of the sparse tables when a gradient balancer works at parameter level, else None."""
    from polytask.balance.engine import GradientBalancer

    if not columns or not isinstance(balancer, GradientBalancer) or balancer.mode == "features":
        return None
    return TouchedRows([model.input.tables[c] for c in columns])


class TouchedRows:
    """Sparse tables under a parameter-level gradient balancer: the rows of each batch as leaves.

    A forward hook on each sparse table (in training, with gradients on) replaces its lookup
    ``W[ids]`` by ``R[inverse]``, where the first ``U`` rows of a leaf ``R`` (one per table) are
    ``W[unique(ids)]``, copied in. The balancer gets the leaves among the shared parameters
    (:meth:`shared`), so its ``T x D`` Jacobian has ``|R|`` columns per table (``U`` ids in the
    batch, the leaf's other rows get no gradient) instead of the table's ``n x d``; :meth:`flush`
    then adds the first ``U`` rows of each leaf's gradient to ``W.grad`` as a sparse gradient.

    Exactly the method on dense tables: a row the batch does not touch has a zero gradient for
    every task, so its columns change no Gramian entry, no projection, no per-coordinate rule
    (aggregators that keep state per coordinate are refused by :func:`use_sparse_embeddings`;
    methods that draw per coordinate, GradDrop, draw other numbers for the smaller Jacobian: the
    same distribution, not the same draws). A leaf keeps its identity from step to step (the
    balancer walks the graph once per parameter set) and grows by doubling when a batch touches more rows than it holds (then the lists that
    :meth:`shared` returned are updated in place). Costs per table and step: one ``torch.unique``
    (on CUDA a host sync, for its size) and one more gather of ``U`` rows. One process only: each
    rank touches other rows.
    """

    def __init__(self, tables: Sequence[torch.nn.Embedding]) -> None:
        self.tables = list(tables)
        self.leaves = [torch.zeros(0, t.embedding_dim, dtype=t.weight.dtype, device=t.weight.device,
                                   requires_grad=True) for t in self.tables]
        self.rows: list[Tensor | None] = [None] * len(self.tables)
        self._lists: list[list[Tensor]] = []
        self._handles = [t.register_forward_hook(self._hook(i)) for i, t in enumerate(self.tables)]

    def _hook(self, i: int) -> Any:
        def lookup(module: torch.nn.Embedding, inputs: tuple, output: Tensor) -> Tensor | None:
            if not (module.training and torch.is_grad_enabled()):
                return None  # evaluation: the table's own lookup
            uniq, inverse = torch.unique(inputs[0], return_inverse=True)
            leaf = self._leaf(i, len(uniq))
            with torch.no_grad():
                leaf[:len(uniq)] = module.weight[uniq]
            leaf.grad = None
            self.rows[i] = uniq
            return torch.nn.functional.embedding(inverse, leaf)
        return lookup

    def _leaf(self, i: int, rows: int) -> Tensor:
        """Table ``i``'s leaf, replaced by one twice as large (or more) if it holds fewer than ``rows`` rows."""
        old = self.leaves[i]
        if rows <= old.shape[0]:
            return old
        new = torch.zeros(max(rows, 2 * old.shape[0]), old.shape[1], dtype=old.dtype, device=old.device,
                          requires_grad=True)
        self.leaves[i] = new
        for shared in self._lists:
            shared[:] = [new if p is old else p for p in shared]
        return new

    def shared(self, shared: Sequence[Tensor]) -> list[Tensor]:
        """``shared`` with the tables replaced by their leaves (a list kept up to date as leaves grow)."""
        ids = {id(t.weight) for t in self.tables}
        out = [p for p in shared if id(p) not in ids] + self.leaves
        self._lists = [out]  # the trainer's list of this epoch
        return out

    def flush(self) -> None:
        """Add each leaf's gradient (this step's balanced gradient of the touched rows) to its table's ``.grad``."""
        for table, leaf, uniq in zip(self.tables, self.leaves, self.rows):
            if leaf.grad is None or uniq is None:
                continue
            g = torch.sparse_coo_tensor(uniq.unsqueeze(0), leaf.grad[:len(uniq)], table.weight.shape,
                                        is_coalesced=True)
            table.weight.grad = g if table.weight.grad is None else table.weight.grad + g
            leaf.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class SparseDenseOptimizer(torch.optim.Optimizer):
    """Two kinds of optimiser behind one: row-wise ones for the sparse embedding tables and the run's
    optimiser for every other parameter. They share the param-group dicts, so an lr scheduler
    moves them all; the state dict holds both (``{"dense": ..., "sparse": ...}``).

    The row-wise rule of each table (``rules``, one per table; ``None``/``True``: from ``o.name``):
    ``sgd``, plain SGD (torch's SGD takes sparse gradients; momentum and weight decay are not
    applied to the sparse rows, so untouched rows stay as they are); ``adam`` (also for
    ``optim.name: adamw``), ``torch.optim.SparseAdam`` (Adam's moments updated only on the rows of
    the batch, the lazy Adam of TensorFlow's ``LazyAdamOptimizer``); ``rowwise_adagrad``,
    :class:`~polytask.train.rowwise.RowWiseAdagrad` (one accumulator per row). Tables that share a
    rule share one optimiser (one param group per rule, in the order of :data:`SPARSE_RULES`).
    """

    def __init__(self, groups: list[dict], sparse: list[torch.nn.Parameter], o: Any,
                 rules: Sequence[Any] | None = None) -> None:
        from polytask.train.rowwise import RowWiseAdagrad

        default = "sgd" if o.name == "sgd" else "adam"
        named = [default if r is None or r is True else r for r in (rules or [None] * len(sparse))]
        by_rule = {r: [p for p, q in zip(sparse, named) if q == r] for r in SPARSE_RULES if r in named}
        ids = {id(p) for p in sparse}
        dense_groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
        dense_groups = [g for g in dense_groups if g["params"]]
        super().__init__([*dense_groups, *({"params": ps} for ps in by_rule.values())], {"lr": o.lr})
        dense, rows = self.param_groups[:len(dense_groups)], self.param_groups[len(dense_groups):]
        if o.name == "sgd":
            self.dense = torch.optim.SGD(dense, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
            self.dense = cls(dense, lr=o.lr, weight_decay=o.weight_decay)
        make = {"sgd": lambda g: torch.optim.SGD(g, lr=o.lr), "adam": lambda g: torch.optim.SparseAdam(g, lr=o.lr),
                "rowwise_adagrad": lambda g: RowWiseAdagrad(g, lr=o.lr)}
        self.rules = list(by_rule)
        self.row_optimizers = [make[r]([g]) for r, g in zip(self.rules, rows)]

    @property
    def sparse(self) -> torch.optim.Optimizer:
        """The row-wise optimiser when there is one rule (all sparse tables alike)."""
        return self.row_optimizers[0]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self.dense.step(closure)
        for opt in self.row_optimizers:  # one per rule (at most three)
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        rows = [opt.state_dict() for opt in self.row_optimizers]
        sparse = rows[0] if len(rows) == 1 else {"rules": self.rules, "states": rows}
        return {"dense": self.dense.state_dict(), "sparse": sparse}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"dense", "sparse"}:
            raise CheckpointError("optimizer: the checkpoint was saved without sparse embeddings "
                                  "(data.params.ids.*.sparse changed)")
        rows = state["sparse"]
        states = rows["states"] if "rules" in rows else [rows]
        saved_rules = rows["rules"] if "rules" in rows else self.rules[:1]
        if list(saved_rules) != self.rules or len(states) != len(self.row_optimizers):
            raise CheckpointError(f"optimizer: the checkpoint's row-wise rules {list(saved_rules)} differ from the "
                                  f"run's {self.rules} (data.params.ids.*.sparse changed)")
        self.dense.load_state_dict(state["dense"])
        for opt, s in zip(self.row_optimizers, states):
            opt.load_state_dict(s)


# ----------------------------------------------------------------------------- batch scoring
def _encoders_for_run(run_dir: Path, p: TableParams) -> dict[str, Any]:
    from polytask.data.encoders import load_vocabularies

    path = run_dir / VOCAB_FILE
    need = [c for c, s in p.ids.items() if s.hash is None]
    vocabs = load_vocabularies(path) if need else {}
    missing = [c for c in need if c not in vocabs]
    if missing:
        raise DataError(f"{path}: no vocabulary for column {missing[0]!r}")
    return {c: _encoder(s, vocabs.get(c)) for c, s in p.ids.items()}


def load_run_model(run_dir: Path) -> tuple[Any, TableParams, dict[str, Any], list[Task], torch.nn.Module]:
    """The run's config, table parameters, encoders, tasks and best model (eval mode, CPU)."""
    from polytask.nn import build_model
    from polytask.train.checkpoint import load_model_file
    from polytask.train.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.data.name != "table":
        raise ConfigError(f"{run_dir}: predict needs a run trained on table data (data.name is {cfg.data.name!r})")
    p = parse_params(dict(cfg.data.params))
    encoders = _encoders_for_run(run_dir, p)
    labels = [t for t in p.labels if cfg.data.tasks is None or t in cfg.data.tasks]
    tasks = [Task(t, "binary", metrics=("auc", "logloss")) for t in labels]
    model = build_model(cfg.model.arch, feature_spec(p.dense, encoders, p.embed_dim), tasks, **cfg.model.params)
    weights = run_dir / "best" / "model.safetensors"
    state = load_model_file(weights)
    expected = model.state_dict()
    for c, enc in encoders.items():  # a vocabulary that does not fit the checkpoint: name the column
        key = f"input.tables.{c}.weight"
        if key in state and key in expected and state[key].shape[0] != enc.size:
            src = run_dir / VOCAB_FILE if c in p.ids and p.ids[c].hash is None else "data.params.ids"
            raise CheckpointError(f"{src}: column {c!r} has {enc.size} ids, the embedding in {weights} "
                                  f"has {state[key].shape[0]} rows")
    from polytask.train.checkpoint import load_state_checked

    load_state_checked(model, state, weights)
    model.eval()
    return cfg, p, encoders, tasks, model


def _dense_matrix(f: Path, rb: Any, dense: Sequence[str]) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = []
    for c in dense:
        col = rb.column(c)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
            raise DataError(f"{f}: dense column {c!r} holds {col.type}, not numbers")
        if col.null_count or (pa.types.is_floating(col.type) and not pc.all(pc.is_finite(col)).as_py()):
            raise DataError(f"{f}: dense column {c!r} has missing, NaN or infinite values")
        cols.append(col.to_numpy(zero_copy_only=False).astype(np.float32))
    return np.stack(cols, axis=1)


def _refuse_input_as_output(out: Path, files: Sequence[str]) -> None:
    """ConfigError when ``out`` is (or resolves to, through links) one of the files to score:
    writing it would replace the data with its scores."""
    real = os.path.realpath(out)
    for f in files:
        same = os.path.realpath(f) == real
        try:
            same = same or os.path.samefile(f, out)  # a hard link
        except OSError:
            pass  # out does not exist yet
        if same:
            raise ConfigError(f"predict: OUT {str(out)!r} is the input file {str(f)!r}; give another output path")


def predict_table(run_dir: str | Path, data: Paths, out: str | Path, keep: Sequence[str] = (),
                  batch_size: int = 65536, progress: bool = False) -> tuple[int, dict[str, int]]:
    """Score ``data`` with the run's best model into a Parquet file ``out``: the ``keep`` columns,
    then one probability column per task. Streams record batches; ``out`` appears only when
    complete (a temporary file, then a rename). Returns (rows, unseen ids per vocabulary column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from polytask.data.tables import Vocabulary, _check_columns, _file_schema, _iter_file, _list_files
    from polytask.train.checkpoint import atomic_write
    from polytask.train.rundir import remove_stale_builds

    _, p, encoders, tasks, model = load_run_model(Path(run_dir))
    clash = [c for c in keep if c in {t.name for t in tasks}]
    if clash:
        raise ConfigError(f"--keep: column {clash[0]!r} has the name of a task's score column")
    files = _list_files(expand(data))
    columns = list(dict.fromkeys([*p.dense, *p.ids, *keep]))
    for f in files:  # every file's columns before writing anything
        _check_columns(f, _file_schema(f, p.csv_options()), columns)
    counted = {c: e for c, e in encoders.items() if isinstance(getattr(e, "inner", e), Vocabulary)}
    for e in counted.values():
        e.oov_count = 0
    out = Path(out)
    _refuse_input_as_output(out, files)
    remove_stale_builds(out)  # the temporary files of a killed predict into the same OUT
    rows = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="rows", desc="predict", leave=False)

    def fill(tmp: str) -> None:
        nonlocal rows
        writer = None
        try:
            with torch.no_grad():
                for f in files:
                    for rb in _iter_file(f, columns, batch_size, csv=p.csv_options()):  # the run's parse options
                        inputs = {c: torch.from_numpy(enc.encode(rb.column(c))) for c, enc in encoders.items()}
                        if p.dense:
                            inputs = {"dense": torch.from_numpy(_dense_matrix(f, rb, p.dense)), **inputs}
                        scores = model(inputs)
                        cols = {c: rb.column(c) for c in keep}
                        cols.update({t.name: pa.array(torch.sigmoid(scores[t.name].float().reshape(-1)).numpy())
                                     for t in tasks})
                        table = pa.table(cols)
                        if writer is None:
                            writer = pq.ParquetWriter(tmp, table.schema)
                        writer.write_table(table)
                        rows += rb.num_rows
                        if bar is not None:
                            bar.update(rb.num_rows)
            if writer is None:
                raise DataError(f"{', '.join(map(str, files))}: no rows to score")
        finally:
            if writer is not None:
                writer.close()

    try:
        atomic_write(out, fill, error=DataError)  # a unique temporary name: two predicts never share it
    finally:
        if bar is not None:
            bar.close()
    oov = {c: e.oov_count for c, e in counted.items()}
    return rows, oov


def write_synthetic_splits(out_dir: str | Path, rows: int, seed: int = 0,
                           fractions: Sequence[float] = (0.8, 0.1, 0.1), row_group_rows: int = 65536) -> list[Path]:
    """One synthetic log (:func:`~polytask.data.tables.write_synthetic_log`, one known signal) cut
    into ``train``/``val``/``test.parquet`` in ``out_dir`` by row position, streamed by row group."""
    import pyarrow.parquet as pq

    from polytask.data.tables import write_synthetic_log

    names = ("train", "val", "test")
    edges = np.round(np.cumsum([0.0, *fractions]) * rows).astype(int)
    empty = [n for n, lo, hi in zip(names, edges[:-1], edges[1:]) if hi <= lo]
    if empty:
        raise ConfigError(f"data synth: --rows {rows} leaves the {empty[0]} split empty")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = write_synthetic_log(out_dir / "log.parquet.part", rows, row_group_rows=row_group_rows, seed=seed)
    paths = [out_dir / f"{n}.parquet" for n in names]
    writers: list[Any] = [None, None, None]
    try:
        start = 0
        for rb in pq.ParquetFile(log).iter_batches(batch_size=row_group_rows):
            for i in range(3):
                lo, hi = max(edges[i], start), min(edges[i + 1], start + rb.num_rows)
                if hi > lo:
                    if writers[i] is None:
                        writers[i] = pq.ParquetWriter(paths[i].with_suffix(".tmp"), rb.schema)
                    writers[i].write_batch(rb.slice(lo - start, hi - lo), row_group_size=row_group_rows)
            start += rb.num_rows
        for i, w in enumerate(writers):  # not None: every split has rows (checked above)
            w.close()
            writers[i] = None
        for path in paths:
            path.with_suffix(".tmp").replace(path)
    finally:
        for i, w in enumerate(writers):
            if w is not None:
                w.close()
            paths[i].with_suffix(".tmp").unlink(missing_ok=True)
        log.unlink(missing_ok=True)
    return paths


__all__ = ["StreamSplit", "TableParams", "TableSplits", "TouchedRows", "evaluate_stream", "load_run_model",
           "predict_table",
           "table_splits", "write_synthetic_splits"]
