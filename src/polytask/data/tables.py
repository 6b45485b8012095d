"""Streaming tables: Parquet (or CSV) files read with pyarrow in record batches, beyond memory.

A :class:`TableSource` reads a list of files or a folder with a declared :class:`TableSchema`
(dense columns, categorical id columns, one label column per task) and yields polytask's batch
convention ``(inputs, targets, mask)``: ``inputs`` is ``{"dense": float32 (B, n_dense), <id
column>: int64 (B,), ...}``, ``targets`` ``{task: float32 (B,)}`` and ``mask`` ``{task: bool (B,)}``
(False where the label is missing: a null or NaN label is an unlabelled row, as everywhere in polytask).

How it reads, and what it guarantees:

* **Units.** The work is cut into units: one Parquet *row group*, or one CSV file, or for a CSV
  file larger than ``CsvOptions.block_bytes`` (``data.params.csv_block_bytes``, 64 MiB) one
  :class:`ByteRange` of it, cut at line starts after the header and read with the header's names
  and the types pyarrow infers from the file's first block (:class:`CsvOptions`): the rows and
  types of all ranges together are the rows and types of the whole-file read. Each epoch the
  unit list is permuted with ``(seed, epoch)`` and dealt round-robin to the ``world_size * num_workers`` shards (shard =
  ``rank * num_workers + worker``), so shards are disjoint and together complete; the granularity
  of sharding is a row group (write files with several row groups per shard). Shards can differ
  by up to one unit of rows: under DDP a trainer must stop all ranks together (later work).
* **Shuffle.** A bounded window buffer: a shard reads units until ``shuffle_rows`` rows are held
  (plus at most one unit), permutes them (seeded by seed, epoch, shard and window) and emits them
  in batches; the last batch of a window may be short (never empty). Memory is bounded by two
  buffers (the window served and the next, read ahead by a thread: ``read_ahead``) plus one row
  group, not by the data. ``shuffle_rows=0`` keeps file order.
* **Splits** (:class:`Split`): by file (pass the files), by a column's value, or a seeded fraction
  of a stable 64-bit hash of a row key (FNV-1a of the key's text, not Python's salted ``hash``),
  so a row falls in the same part on every machine and every run.
* **Resume.** :class:`TableLoader` wraps a DataLoader and records, per shard, the window it is in
  and how many batches of it were consumed; ``state_dict()``/``load_state_dict()`` resume
  mid-epoch so each row is seen exactly once. Resuming re-reads only the current window of each
  shard and needs the same ``world_size`` and ``num_workers``.
* **Ids** (:class:`Vocabulary`, :class:`HashBuckets`): a vocabulary is built in one streaming pass
  (:func:`build_vocabularies`; min count, index 0 is the out-of-vocabulary bucket, order by count
  then value, saved as JSON; over several processes each counts a share of the units,
  :func:`count_ids`, and each value's counts are summed by one rank, :mod:`polytask.data.vocab_ranks`);
  hashing maps ids to a fixed number of buckets. Both work on the
  distinct values of a batch: Parquet string columns are read as dictionary arrays (as Parquet
  stores them), other columns are ``dictionary_encode``-d; each distinct value gets its 64-bit
  FNV-1a hash (:func:`stable_hash`), then a bucket, or its id by binary search in the vocabulary's
  sorted hashes; a ``take`` brings the ids back to the rows. Lists of ids
  (:class:`SequenceIds`) become a padded ``(N, max_len)`` matrix.
* **Cost per batch.** A shuffle window is encoded once into four row-major blocks (ids, dense,
  labels, masks; each column written contiguously, then transposed into place per record batch),
  never concatenated nor permuted as a whole: batch ``k`` gathers rows ``perm[kB:(k+1)B]`` of each
  block (four row gathers per batch, not one per column), which are the rows and the order of
  the permuted window; without shuffling, batches are views. The columns of a batch are views of
  its blocks (an id column is a strided ``(B,)`` view).
* **Ranks.** :meth:`TableSource.rank_batches` gives every rank's batch count from the Parquet
  footers, so that ranks whose shards differ can still run the same number of steps.

Bad input (missing column, a non-numeric or null dense value, a binary label outside {0, 1}, an
empty or corrupt file) is one :class:`~polytask.errors.DataError` naming the file and the column.

Id encoders live in :mod:`polytask.data.encoders` (re-exported here). pyarrow is an optional
dependency (``pip install polytask[tables]``), imported only when used.
"""

from __future__ import annotations

import functools
import math
import queue
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from polytask.data.encoders import (  # noqa: F401  (re-exported: the encoders were defined here first)
    HashBuckets, SequenceIds, Vocabulary, _pa, _uniform, id_feature, load_vocabularies, save_vocabularies,
    stable_hash)
from polytask.errors import ConfigError, DataError, PolytaskError


# ----------------------------------------------------------------------------- vocabularies from files
def vocabulary_units(paths: Any, columns: Sequence[str],
                     csv: CsvOptions | None = None) -> list[tuple[Path, int | ByteRange | None, int]]:
    """The units of a vocabulary pass, as the loader cuts them, with their sizes: ``(file, row
    group, bytes)`` per non-empty Parquet row group (its uncompressed bytes, from the footer),
    ``(file, ByteRange, bytes)`` per range of a CSV file larger than ``csv.block_bytes`` and
    ``(file, None, bytes)`` per other CSV file (its size); every file's ``columns`` checked
    (DataError naming it)."""
    csv = csv or CsvOptions()
    units: list[tuple[Path, int | ByteRange | None, int]] = []
    for f in _list_files(paths):
        _check_columns(f, _file_schema(f, csv), columns)
        units += [(f, part, size) for part, _, size in _file_parts(f, csv)]
    return units


def balanced_shares(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Unit indices of each of ``count`` shares, balanced by size: largest unit first, each to the
    least loaded share (ties: the lower share; Graham's LPT rule, SIAM J. Appl. Math. 1969: the
    largest share is at most 4/3 of the best possible). Round-robin dealing can put all the big
    files in one share; a share's pass time, not the average, is what the other ranks wait for.
    Deterministic: every rank computes the same shares from the same footers."""
    import heapq

    shares: list[list[int]] = [[] for _ in range(count)]
    loads = [(0, s) for s in range(count)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, s = heapq.heappop(loads)
        shares[s].append(i)
        heapq.heappush(loads, (load + sizes[i], s))
    return [sorted(share) for share in shares]


def count_ids(paths: Any, columns: Sequence[str], batch_rows: int = 65536,
              shard: tuple[int, int] = (0, 1), csv: CsvOptions | None = None) -> dict[str, Any]:
    """Occurrences of each distinct non-null value of ``columns`` (list columns: of their items) in
    the units of ``shard = (index, count)``: share ``index`` of :func:`balanced_shares` over
    :func:`vocabulary_units`, so that ranks count disjoint shares of about equal bytes that
    together cover the files. Returns per column a pyarrow table ``{v, n}`` (distinct values,
    counts), or None when the share holds no value. pyarrow counts (``value_counts`` per batch);
    the partial tables are merged when they hold as many rows as the merged one (amortised: each
    value is re-grouped O(log) times, not once per batch). ``csv``: how CSV files are cut and parsed."""
    pa, pc, _, _ = _pa()
    index, count = shard
    merged: dict[str, Any] = {c: None for c in columns}
    pending: dict[str, list] = {c: [] for c in columns}
    held = dict.fromkeys(columns, 0)
    types: dict[str, Any] = {}  # per column: the value type of the first values counted
    units = vocabulary_units(paths, columns, csv)
    for f, part, _ in (units[i] for i in balanced_shares([u[2] for u in units], count)[index]):
        for rb in _iter_file(f, columns, batch_rows, part, csv=csv):
            for c in columns:
                col = rb.column(c)
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):  # a sequence column
                    col = pc.list_flatten(col)
                vc = pc.value_counts(col.drop_null())
                if len(vc) and types.setdefault(c, vc.type.field("values").type) != vc.type.field("values").type:
                    raise DataError(f"{f}: id column {c!r} holds {vc.type.field('values').type}, "
                                    f"earlier files {types[c]}")
                pending[c].append(pa.table({"v": vc.field("values"), "n": vc.field("counts")}))
                held[c] += len(vc)
                if held[c] >= max(batch_rows, 0 if merged[c] is None else merged[c].num_rows):
                    merged[c] = merge_counts(c, [merged[c], *pending[c]])
                    pending[c], held[c] = [], 0
    return {c: merge_counts(c, [merged[c], *pending[c]]) for c in columns}


def merge_counts(column: str, parts: Sequence[Any]) -> Any:
    """Count tables ``{v, n}`` summed per value (None parts skipped; None if none is left). Parts of
    one column must hold one value type (DataError naming the column: CSV files may infer int64
    in one file and strings in another)."""
    pa, _, _, _ = _pa()
    parts = [t for t in parts if t is not None]
    if not parts:
        return None
    types = {str(t.schema.field("v").type) for t in parts if t.num_rows}
    if len(types) > 1:
        raise DataError(f"id column {column!r} holds different types in different files: {', '.join(sorted(types))}")
    parts = [t for t in parts if t.num_rows] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    g = pa.concat_tables(parts).group_by("v").aggregate([("n", "sum")])
    # one chunk each: the group-by's chunks may share buffers, which pickling (the ranks' exchange) copies whole
    return pa.table({"v": g["v"], "n": g["n_sum"]}).combine_chunks()


def vocabularies_from_counts(counts: Sequence[Mapping[str, Any]], columns: Sequence[str],
                             min_count: int | Mapping[str, int] = 1) -> dict[str, Vocabulary]:
    """A :class:`Vocabulary` per column from count tables (:func:`count_ids`, one per rank or
    share): the counts are summed, values seen at least ``min_count`` times kept (per column if a
    mapping), most frequent first, ties by the value's text (:func:`order_counts`)."""
    out = {}
    for c in columns:
        k = min_count[c] if isinstance(min_count, Mapping) else min_count
        t = merge_counts(c, [part[c] for part in counts])
        out[c] = Vocabulary(c, [] if t is None else order_counts(t, k)["v"].to_pylist(), k)
    return out


def order_counts(counts: Any, min_count: int) -> Any:
    """The rows of a count table ``{v, n}`` (distinct values) seen at least ``min_count`` times, most
    frequent first, ties by the value's text. The order is a total order on ``(count, text)``, so
    any split of the units into shares, or of the values into ranges, gives the same vocabulary."""
    pa, pc, _, _ = _pa()
    if counts is None or counts.num_rows == 0:
        return counts
    t = counts.select(["v", "n"]).filter(pc.greater_equal(counts["n"], min_count))
    t = t.append_column("k", pc.cast(t["v"], pa.string())).sort_by([("n", "descending"), ("k", "ascending")])
    return t.select(["v", "n"])


def build_vocabularies(paths: Any, columns: Sequence[str], min_count: int | Mapping[str, int] = 1,
                       batch_rows: int = 65536, ranks: Any = None,
                       csv: CsvOptions | None = None) -> dict[str, Vocabulary]:
    """One streaming pass over the files: a :class:`Vocabulary` per column, values seen at least
    ``min_count`` times (an int, or one per column), most frequent first (ties by value).
    Counting is done by pyarrow (:func:`count_ids`), never one Python step per row.

    Over several processes, pass ``ranks``, a :class:`~polytask.data.vocab_ranks.RankGroup`: each
    rank counts its share ``(rank, size)`` of the units, each value's counts are summed by one
    rank (a hash of the value picks it) and the kept values sent to all
    (:func:`~polytask.data.vocab_ranks.sharded_vocabularies`): no rank holds every rank's counts,
    every rank returns one process's vocabularies, and a user error of any rank's share is raised
    by every rank alike. ``csv``: how CSV files are cut into units and parsed (:class:`CsvOptions`;
    the vocabularies do not depend on the cut)."""
    if ranks is None or ranks.size == 1:
        return vocabularies_from_counts([count_ids(paths, columns, batch_rows, csv=csv)], columns, min_count)
    from polytask.data.vocab_ranks import sharded_vocabularies

    try:
        mine: Any = count_ids(paths, columns, batch_rows, (ranks.rank, ranks.size), csv)
    except PolytaskError as exc:
        mine = exc
    return sharded_vocabularies(mine, columns, min_count, ranks)


# ----------------------------------------------------------------------------- schema and split
@dataclass(frozen=True)
class TableSchema:
    """Which columns are what. ``categorical`` maps an id column to its encoder (a
    :class:`Vocabulary` or :class:`HashBuckets`); ``labels`` maps a task to its label column;
    ``binary`` lists the tasks whose labels must be 0 or 1 (default: every task)."""

    dense: tuple[str, ...] = ()
    categorical: Mapping[str, Vocabulary | HashBuckets | SequenceIds] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    binary: tuple[str, ...] | None = None
    keep: tuple[str, ...] = ()  # extra columns only read (split keys)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense", tuple(self.dense))
        if not self.labels:
            raise ConfigError("table schema: labels needs at least one task: column")
        if not self.dense and not self.categorical:
            raise ConfigError("table schema: needs at least one dense or categorical column")

    @property
    def columns(self) -> list[str]:
        cols = [*self.dense, *self.categorical, *self.labels.values(), *self.keep]
        return list(dict.fromkeys(cols))

    @property
    def binary_tasks(self) -> tuple[str, ...]:
        return tuple(self.labels) if self.binary is None else tuple(self.binary)


@dataclass(frozen=True)
class Split:
    """Which rows a source keeps: ``column`` in ``values``, and/or the rows whose stable hash of
    ``key`` (with ``seed``) falls in ``[fraction[0], fraction[1])``. Split by file: pass the files."""

    column: str | None = None
    values: tuple = ()
    key: str | None = None
    fraction: tuple[float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fraction is not None:
            lo, hi = self.fraction
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError(f"split.fraction must be 0 <= lo <= hi <= 1, got {self.fraction}")
            if self.key is None:
                raise ConfigError("split.fraction needs split.key (the row key column to hash)")

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c for c in (self.column, self.key if self.fraction else None) if c)

    def mask(self, rb: Any) -> Any:
        pa, pc, _, _ = _pa()
        keep = None
        if self.column is not None:
            keep = pc.is_in(rb.column(self.column), value_set=pa.array(list(self.values)))
        if self.fraction is not None:
            u = _uniform(rb.column(self.key), self.seed)
            f = pa.array((u >= self.fraction[0]) & (u < self.fraction[1]))
            keep = f if keep is None else pc.and_(keep, f)
        return keep


# ----------------------------------------------------------------------------- file access
def _list_files(paths: Any) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for p in map(Path, items):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".parquet", ".csv"))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not out:
        raise DataError(f"no .parquet or .csv files in {', '.join(map(str, items))}")
    return out


def _is_csv(f: Path) -> bool:
    return f.suffix.lower() == ".csv"


def _file_schema(f: Path, csv: CsvOptions | None = None) -> Any:
    pa, _, pcsv, pq = _pa()
    if f.stat().st_size == 0:
        raise DataError(f"{f}: the file is empty")
    try:
        if _is_csv(f):
            with pcsv.open_csv(f, parse_options=(csv or CsvOptions()).parse_options()) as r:
                return r.schema
        return pq.ParquetFile(f).schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{f}: cannot read the {'CSV' if _is_csv(f) else 'Parquet'} file "
                        f"({str(exc).splitlines()[0]})") from None


def _check_columns(f: Path, schema: Any, columns: Sequence[str]) -> None:
    missing = [c for c in columns if schema.get_field_index(c) < 0]
    if missing:
        raise DataError(f"{f}: no column {', '.join(map(repr, missing))} (columns: {', '.join(schema.names)})")


def _iter_file(f: Path, columns: Sequence[str], batch_rows: int, part: int | ByteRange | None = None,
               dictionary: Sequence[str] = (), csv: CsvOptions | None = None) -> Iterator[Any]:
    """Record batches of ``columns`` (one unit: a row group, a CSV file's :class:`ByteRange`, or the
    whole file when ``part`` is None); DataError naming the file (and the range).

    ``dictionary``: Parquet string columns read as dictionary arrays (as Parquet stores them), so
    encoders see each distinct value once instead of decoding and re-hashing every row's string.
    A CSV file's blocks are joined into batches of about ``batch_rows`` rows; ``csv``: its parse
    options (:class:`CsvOptions`).
    """
    pa, _, pcsv, pq = _pa()
    try:
        if isinstance(part, ByteRange):
            yield from _coalesce(_open_range(f, columns, part), batch_rows)
        elif _is_csv(f):
            reader = pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=_CSV_BLOCK),
                                   parse_options=(csv or CsvOptions()).parse_options(),
                                   convert_options=pcsv.ConvertOptions(include_columns=list(columns)))
            yield from _coalesce(reader, batch_rows)
        else:
            pf = pq.ParquetFile(f, read_dictionary=list(dictionary) or None)
            groups = None if part is None else [part]
            yield from pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        msg = str(exc).splitlines()[0]
        m = re.search(r"CSV column #(\d+)", msg)
        if m and _is_csv(f):
            names = _file_schema(f).names
            j = int(m.group(1))
            msg = f"column {names[j]!r}: {msg}" if j < len(names) else msg
        where, hint = "", ""
        if isinstance(part, ByteRange):  # a cut inside a quoted value with a line break reads as a bad row or value
            where = f" (bytes {part.start}-{part.end})"
            hint = "; if values hold line breaks, set data.params.newlines_in_values: true"
        raise DataError(f"{f}{where}: cannot read ({msg}){hint}") from None


def _coalesce(batches: Iterator[Any], rows: int) -> Iterator[Any]:
    """Record batches joined into batches of at least ``rows`` rows (the last may be shorter)."""
    pa, _, _, _ = _pa()
    held, n = [], 0
    for rb in batches:
        held.append(rb)
        n += rb.num_rows
        if n >= rows:
            yield pa.Table.from_batches(held).combine_chunks().to_batches()[0]
            held, n = [], 0
    if n:
        yield pa.Table.from_batches(held).combine_chunks().to_batches()[0]


# ----------------------------------------------------------------------------- CSV files cut into byte ranges
@dataclass(frozen=True)
class CsvOptions:
    """How CSV files are parsed and cut into units (``data.params.csv_block_bytes`` and
    ``data.params.newlines_in_values``).

    A file larger than ``block_bytes`` is cut into about ``size / block_bytes`` byte ranges of
    near-equal size (:func:`csv_ranges`), so several ranks (or workers) share it, and the vocabulary
    pass and row counting are balanced by bytes rather than by files. A cut is placed just after a
    ``\\n``: that is a line start only when no value holds a newline, which is what pyarrow's reader
    assumes too by default (``ParseOptions(newlines_in_values=False)``: its own blocks are cut at
    newlines). With ``newlines_in_values=True`` (quoted values with line breaks) a newline says
    nothing about where a row starts without reading from the top, so files stay whole (one unit
    each, read by one rank) and pyarrow is told to track quotes across its blocks."""

    block_bytes: int = 64 << 20
    newlines_in_values: bool = False

    def __post_init__(self) -> None:
        if self.block_bytes < 1:
            raise ConfigError(f"data.params.csv_block_bytes must be >= 1, got {self.block_bytes}")

    def parse_options(self) -> Any:
        _, _, pcsv, _ = _pa()
        return pcsv.ParseOptions(newlines_in_values=self.newlines_in_values)


class ByteRange(NamedTuple):
    """Bytes ``[start, end)`` of a CSV file: whole lines after the header (a unit of its rows)."""

    start: int
    end: int


_CSV_BLOCK = 1 << 20  # pyarrow's default block: the types of a whole-file read are inferred from the first one


@functools.lru_cache(maxsize=256)
def _csv_head(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, ...], Any, int] | None:
    """``(column names, schema, offset of the first data line)`` of a CSV file, or None when the file's
    first line is not its header as pyarrow reads it (empty lines above it, no ``\\n`` line ends): such
    a file is not cut. The schema holds the types pyarrow infers from the first block, the types of
    the whole-file read; ``size`` and ``mtime_ns`` key the cache (a rewritten file is read again)."""
    pa, _, pcsv, _ = _pa()
    schema = _file_schema(Path(path))
    with open(path, "rb") as fh:
        first = fh.readline(_CSV_BLOCK)
    if not first.endswith(b"\n"):
        return None
    try:
        names = tuple(pcsv.read_csv(pa.BufferReader(first)).schema.names)
    except pa.ArrowException:
        return None
    return (names, schema, len(first)) if names == tuple(schema.names) else None


def _head_of(f: Path) -> tuple[tuple[str, ...], Any, int] | None:
    st = f.stat()
    return _csv_head(str(f), st.st_size, st.st_mtime_ns)


def csv_ranges(f: Path, csv: CsvOptions) -> list[ByteRange] | None:
    """The byte ranges a CSV file is read in, or None when it is read whole (at most
    ``csv.block_bytes``, ``csv.newlines_in_values``, a header not on the first line, or data that
    makes one range only).

    The data after the header is cut into ``ceil(bytes / block_bytes)`` parts of near-equal size;
    each cut moves forward to just after the next ``\\n`` (a CRLF stays whole, a cut inside a quoted
    value without line break moves to that line's end; a line longer than a part merges two parts),
    so every range holds whole lines and the ranges in order are the file's lines."""
    size = f.stat().st_size
    if csv.newlines_in_values or size <= csv.block_bytes:
        return None
    head = _head_of(f)
    if head is None:
        return None
    start = head[2]
    parts = math.ceil((size - start) / csv.block_bytes)
    cuts = [start]
    with open(f, "rb") as fh:
        for k in range(1, parts):
            cut = _next_line_start(fh, start + (size - start) * k // parts, size)
            if cuts[-1] < cut < size:
                cuts.append(cut)
    return [ByteRange(a, b) for a, b in zip(cuts, [*cuts[1:], size])] if len(cuts) > 1 else None


def _next_line_start(fh: Any, at: int, size: int) -> int:
    """The first line start at or after byte ``at`` (just after a ``\\n``; ``size`` when none follows)."""
    fh.seek(at - 1)  # the byte before ``at`` is a \n when ``at`` already starts a line
    pos = at - 1
    while pos < size:
        chunk = fh.read(1 << 16)
        hit = chunk.find(b"\n")
        if hit >= 0:
            return pos + hit + 1
        pos += len(chunk)
    return size


def _file_parts(f: Path, csv: CsvOptions) -> list[tuple[int | ByteRange | None, int | None, int]]:
    """The units of one file: ``(part, rows or None, bytes)`` per non-empty Parquet row group (rows from
    the footer, its uncompressed bytes), per byte range of a cut CSV file, or one ``(None, None, size)``
    for a CSV file read whole."""
    _, _, _, pq = _pa()
    if _is_csv(f):
        ranges = csv_ranges(f, csv)
        return [(None, None, f.stat().st_size)] if ranges is None else [(r, None, r.end - r.start) for r in ranges]
    md = pq.ParquetFile(f).metadata
    return [(g, md.row_group(g).num_rows, md.row_group(g).total_byte_size) for g in range(md.num_row_groups)
            if md.row_group(g).num_rows > 0]


def _open_range(f: Path, columns: Sequence[str], part: ByteRange) -> Iterator[Any]:
    """A reader of one byte range's rows: the header's column names and the file's first-block types
    passed explicitly, so each range converts its values exactly as the whole-file read does (a range
    of only digits in a string column stays strings; a value the file's type cannot hold is refused
    in every range alike). The file is memory-mapped: the range is read, not the file."""
    pa, _, pcsv, _ = _pa()
    head = _head_of(f)
    if head is None or part.end > f.stat().st_size:
        raise DataError(f"{f}: changed while read (bytes {part.start}-{part.end} are no longer a range of its lines)")
    names, schema, _ = head
    mm = pa.memory_map(str(f))
    try:
        mm.seek(part.start)
        buf = mm.read_buffer(part.end - part.start)
        reader = pcsv.open_csv(pa.BufferReader(buf),
                               read_options=pcsv.ReadOptions(column_names=list(names), block_size=_CSV_BLOCK),
                               convert_options=pcsv.ConvertOptions(
                                   include_columns=list(columns),
                                   column_types={c: schema.field(c).type for c in columns}))
        yield from reader
    finally:
        mm.close()


# ----------------------------------------------------------------------------- the source
class TableSource(torch.utils.data.IterableDataset):
    """Batches ``(inputs, targets, mask)`` streamed from Parquet/CSV files (see the module docstring).

    Args:
        paths: a file, a folder (every ``.parquet``/``.csv`` under it, sorted) or a list of them.
        schema: the :class:`TableSchema`.
        batch_size: rows per batch (the last batch of each shuffle window may be shorter).
        shuffle_rows: size of the shuffle window in rows; 0 keeps file order.
        seed: seeds the unit order and the shuffle (with the epoch).
        split: a :class:`Split` (rows to keep); None keeps all.
        rank, world_size: this process's place among the ranks (workers are found from the
            DataLoader at iteration time).
        read_rows: rows per record batch read.
        read_ahead: shuffle windows read ahead by a background thread while the current one is
            encoded and served (pyarrow reads without the GIL, so reading overlaps the encoding
            where a core is free); 0 reads in the iterating thread. The batches are the same.
        csv: how CSV files are cut into units (byte ranges of large files) and parsed
            (:class:`CsvOptions`). The cut decides the units, hence the shuffle order: a run
            resumes only with the same cut (the unit count is checked).

    Files are opened (footers only) when the source is made: a missing column, a non-numeric
    dense column, an empty or corrupt file is a DataError then, before any training.
    """

    def __init__(self, paths: Any, schema: TableSchema, batch_size: int = 1024, shuffle_rows: int = 0,
                 seed: int = 0, split: Split | None = None, rank: int = 0, world_size: int = 1,
                 read_rows: int = 65536, read_ahead: int = 1, csv: CsvOptions | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if read_ahead < 0:
            raise ConfigError(f"read_ahead must be >= 0, got {read_ahead}")
        self.read_ahead, self.csv = read_ahead, csv or CsvOptions()
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        pa, _, _, _ = _pa()
        self.schema, self.batch_size, self.shuffle_rows, self.seed = schema, batch_size, shuffle_rows, seed
        self.split, self.rank, self.world_size, self.read_rows = split, rank, world_size, read_rows
        self.epoch = 0
        self.resume: dict[int, tuple[int, int]] = {}
        self.files = _list_files(paths)
        self._columns = list(dict.fromkeys([*schema.columns, *(split.columns if split else ())]))
        self.units: list[tuple[int, int | ByteRange | None]] = []  # (file index, row group / byte range / None)
        self.unit_rows: list[int | None] = []  # from the Parquet footers (before a split's filter); None for CSV
        self.counted_rows: list[int] | None = None  # by count_rows(): after the split's filter, CSV too
        self._dictionary: list[list[str]] = []  # per file: the string id columns read as dictionaries
        plain = set(split.columns) if split else set()
        for i, f in enumerate(self.files):
            sch = _file_schema(f, self.csv)
            _check_columns(f, sch, self._columns)
            self._dictionary.append([c for c in schema.categorical if c not in plain and (
                pa.types.is_string(sch.field(c).type) or pa.types.is_large_string(sch.field(c).type))])
            for c in schema.dense:
                t = sch.field(c).type
                if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                        or pa.types.is_null(t)):
                    raise DataError(f"{f}: dense column {c!r} holds {t}, not numbers")
            for c, enc in schema.categorical.items():
                t = sch.field(c).type
                if isinstance(enc, SequenceIds) and not (pa.types.is_list(t) or pa.types.is_large_list(t)):
                    raise DataError(f"{f}: sequence column {c!r} holds {t}, not lists of ids")
                if not isinstance(enc, SequenceIds) and pa.types.is_nested(t):
                    raise DataError(f"{f}: id column {c!r} holds {t}; a column of id lists needs "
                                    f"data.params.ids.{c}.sequence")
            for part, rows, _ in _file_parts(f, self.csv):
                self.units.append((i, part))
                self.unit_rows.append(rows)
        if not self.units:
            raise DataError(f"{', '.join(map(str, self.files))}: no rows")

    def feature_spec(self, embed_dim: int = 16) -> Any:
        """The :class:`~polytask.data.features.FeatureSpec` of the batches (``dense`` first, then one
        sparse feature per id column sized by its encoder), for ``build_model(arch, spec, tasks)``."""
        from polytask.data.features import DenseFeature, FeatureSpec

        dense = (DenseFeature("dense", len(self.schema.dense)),) if self.schema.dense else ()
        return FeatureSpec(dense + tuple(id_feature(c, enc, embed_dim) for c, enc in self.schema.categorical.items()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- sharding
    def _shard(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        return self.rank * workers + worker, self.world_size * workers

    def shard_units(self, shard: int, shards: int, epoch: int | None = None) -> list[tuple[int, Any]]:
        """The units of ``shard`` (of ``shards``) in ``epoch``: a seeded permutation, dealt round-robin."""
        epoch = self.epoch if epoch is None else epoch
        order = np.arange(len(self.units))
        if self.shuffle_rows > 0:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return [self.units[j] for j in order[shard::shards]]

    def count_rows(self, which: Sequence[int] | None = None) -> list[int]:
        """Rows of each unit (after the split's filter), counted by reading them: what the footers
        cannot tell (a CSV file has none; a split filters rows). Reads only the split's columns, or
        one column; pyarrow parses every row, so this costs a pass over those columns, once per
        run. ``which``: the indices of the units to count (default: all of them, then kept in
        ``counted_rows`` for :meth:`rank_batches`; ranks each count a share and exchange them)."""
        _, pc, _, _ = _pa()
        columns = list(self.split.columns) if self.split is not None else self._columns[:1]
        out = []
        for i in range(len(self.units)) if which is None else which:
            f, part = self.files[self.units[i][0]], self.units[i][1]
            n = 0
            for rb in _iter_file(f, columns, self.read_rows, part, csv=self.csv):
                n += rb.num_rows if self.split is None else int(pc.sum(self.split.mask(rb)).as_py() or 0)
            out.append(n)
        if which is None:
            self.counted_rows = out
        return out

    def rank_batches(self, num_workers: int = 0, epoch: int | None = None) -> list[int] | None:
        """Batches each rank gets in ``epoch`` (all its workers together), from the units' row
        counts (the Parquet footers, or :meth:`count_rows`) and the same window rule as reading;
        None when rows are known only by reading them (a CSV file, or a split's filter) and
        :meth:`count_rows` has not run. Ranks use it to run the same number of steps."""
        rows = self.counted_rows
        if rows is None and (self.split is not None or any(r is None for r in self.unit_rows)):
            return None
        rows_of = dict(zip(self.units, self.unit_rows if rows is None else rows))
        workers = max(num_workers, 1)
        out = []
        for rank in range(self.world_size):
            n = 0
            for w in range(workers):
                window = 0
                for unit in self.shard_units(rank * workers + w, self.world_size * workers, epoch):
                    window += rows_of[unit]
                    if window >= self.shuffle_rows:  # the window is full (every unit alone without shuffle)
                        n += math.ceil(window / self.batch_size)
                        window = 0
                n += math.ceil(window / self.batch_size)
            out.append(n)
        return out

    # -- reading
    def _read_unit(self, unit: tuple[int, Any]) -> Iterator[Any]:
        _, pc, _, _ = _pa()
        f = self.files[unit[0]]
        for rb in _iter_file(f, self._columns, self.read_rows, unit[1], self._dictionary[unit[0]], self.csv):
            if self.split is not None:
                rb = rb.filter(self.split.mask(rb))
            if rb.num_rows:
                self._check(f, rb)
                yield rb

    def _check(self, f: Path, rb: Any) -> None:
        """What the column types and null counts tell (no pass over the values); the values are checked
        by :meth:`_encode` on the blocks it fills (NaN/inf dense values, binary labels outside {0, 1})."""
        pa, _, _, _ = _pa()
        for c in self.schema.dense:
            col = rb.column(c)
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
                raise DataError(f"{f}: dense column {c!r} holds {col.type}, not numbers")
            if col.null_count:
                _bad_dense(f, c)
        for task, c in self.schema.labels.items():
            t = rb.column(c).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)):
                raise DataError(f"{f}: label column {c!r} (task {task!r}) holds {t}, not numbers")

    def _check_values(self, f: Any, dense_cols: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> None:
        """One record batch's values, as encoded: every dense value finite in float32 (NaN, inf, or beyond
        float32's range is refused), every labelled binary target 0 or 1. One numpy pass per block."""
        if dense_cols.size and not np.isfinite(dense_cols).all():
            _bad_dense(f, self.schema.dense[int(np.flatnonzero(~np.isfinite(dense_cols).all(axis=1))[0])])
        tasks = list(self.schema.labels)
        binary = [tasks.index(t) for t in self.schema.binary_tasks]
        bad = mask[:, binary] & (targets[:, binary] != 0) & (targets[:, binary] != 1)
        if bad.any():
            row, j = (int(v[0]) for v in np.nonzero(bad))
            task = tasks[binary[j]]
            raise DataError(f"{f}: label column {self.schema.labels[task]!r} of binary task {task!r} has a value "
                            f"outside {{0, 1}} (e.g. {targets[row, binary[j]].item()})")

    def _to_batch(self, rb: Any, file: Any = "input") -> tuple[dict, dict, dict]:
        """One record batch (of ``file``, named in errors) as ``(inputs, targets, mask)`` in file order."""
        return self._encode([rb], [file]).take(slice(None))

    def _encode(self, held: list, files: list) -> _Window:
        """The record batches of a window (read from ``files``, one per batch: named in errors), encoded
        into one preallocated block per kind (ids, dense, labels, masks): each column is cast or encoded
        straight into its place, so the window needs no concatenation, and a batch is one row gather per
        block (not one per column)."""
        _, pc, _, _ = _pa()
        sch = self.schema
        n = sum(rb.num_rows for rb in held)
        flat = [c for c, enc in sch.categorical.items() if not isinstance(enc, SequenceIds)]
        seqs = {c: np.empty((n, enc.max_len), np.int64) for c, enc in sch.categorical.items()
                if isinstance(enc, SequenceIds)}
        ids = np.empty((n, len(flat)), np.int64)
        dense = np.empty((n, len(sch.dense)), np.float32)
        targets = np.empty((n, len(sch.labels)), np.float32)
        mask = np.empty((n, len(sch.labels)), np.bool_)
        # columns are written contiguously into a column-major scratch block, then transposed into the
        # row-major window in one pass: a column written straight into a row-major block is a strided
        # write, several times the cost of both (and rows must be contiguous for the batches' gathers)
        longest = max(rb.num_rows for rb in held)
        dense_cols = np.empty((len(sch.dense), longest), np.float32)
        id_cols = np.empty((len(flat), longest), np.int64)
        lo = 0
        for rb, f in zip(held, files):
            hi = lo + rb.num_rows
            with np.errstate(over="ignore"):  # beyond float32's range: inf, refused by _check_values
                for j, c in enumerate(sch.dense):  # cast while copied into place (no per-column temporaries)
                    dense_cols[j, :hi - lo] = rb.column(c).to_numpy(zero_copy_only=False)
            dense[lo:hi] = dense_cols[:, :hi - lo].T
            for j, c in enumerate(flat):  # each encoder takes its ids back to the rows straight into place
                sch.categorical[c].encode(rb.column(c), out=id_cols[j, :hi - lo])
            ids[lo:hi] = id_cols[:, :hi - lo].T
            for c, out in seqs.items():
                out[lo:hi] = sch.categorical[c].encode(rb.column(c))
            for j, c in enumerate(sch.labels.values()):
                col = _labels(rb.column(c))
                mask[lo:hi, j] = col.is_valid().to_numpy(zero_copy_only=False)
                targets[lo:hi, j] = pc.fill_null(col, 0.0).to_numpy(zero_copy_only=False)
            self._check_values(f, dense_cols[:, :hi - lo], targets[lo:hi], mask[lo:hi])
            lo = hi
        return _Window(self.schema, flat, torch.from_numpy(ids), {c: torch.from_numpy(v) for c, v in seqs.items()},
                       torch.from_numpy(dense), torch.from_numpy(targets), torch.from_numpy(mask))

    def _windows(self, units: list, start: int) -> Iterator[tuple[int, list, list]]:
        """(index of the window's first unit, its record batches, the file of each), from unit ``start`` on."""
        i = start
        while i < len(units):
            first, held, files, rows = i, [], [], 0
            while i < len(units) and (not held or rows < self.shuffle_rows):
                for rb in self._read_unit(units[i]):
                    held.append(rb)
                    files.append(self.files[units[i][0]])
                    rows += rb.num_rows
                i += 1
                if self.shuffle_rows <= 0:
                    break
            if held:
                yield first, held, files

    def iter_positioned(self) -> Iterator[tuple[tuple, tuple[int, int, int, int]]]:
        """Batches with their position ``(shard, epoch, window start, batches of the window done)``.

        A window is encoded once (:meth:`_encode`: each record batch, of ``read_rows`` rows, through
        its distinct values, into blocks of the whole window), and shuffled by a seeded permutation
        that is never applied to the window: batch ``k`` gathers the rows ``perm[k B:(k + 1) B]`` of
        each block (one gather per block and batch; the same rows, in the same order, as permuting
        the window first), so rows are copied once, into the batch, and a DataLoader worker sends
        that copy (without shuffling, batches are views of the window; a worker sends a copy).
        """
        shard, shards = self._shard()
        units = self.shard_units(shard, shards)
        start, skip = self.resume.get(shard, (0, 0))
        in_worker = torch.utils.data.get_worker_info() is not None
        windows = self._windows(units, start)
        for first, held, files in _read_ahead(windows, self.read_ahead) if self.read_ahead else windows:
            window = self._encode(held, files)
            n = window.rows
            perm = None
            if self.shuffle_rows > 0:
                perm = torch.from_numpy(np.random.default_rng([self.seed, self.epoch, shard, first]).permutation(n))
            done = skip if first == start else 0
            for k in range(done, math.ceil(n / self.batch_size)):
                lo, hi = k * self.batch_size, min((k + 1) * self.batch_size, n)
                if perm is not None:
                    batch = window.take(perm[lo:hi])
                else:  # a worker sends its batch to the main process: a copy, so the window is not shared
                    batch = window.take(slice(lo, hi), copy=in_worker)
                yield batch, (shard, self.epoch, first, k + 1)

    def __iter__(self) -> Iterator[tuple]:
        for batch, _ in self.iter_positioned():
            yield batch


@dataclass
class _Window:
    """A shuffle window's rows as blocks: ``ids`` ``(n, C)`` (the flat id columns ``flat``, in schema
    order), ``seqs`` ``{column: (n, max_len)}``, ``dense`` ``(n, D)``, ``targets``/``mask`` ``(n, T)``.

    :meth:`take` gives polytask's batch dicts: each column a view of its block's rows (a column of
    ``ids`` is a strided ``(B,)`` view; embedding lookups and masks take strided tensors)."""

    schema: TableSchema
    flat: list[str]
    ids: torch.Tensor
    seqs: dict[str, torch.Tensor]
    dense: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return self.targets.shape[0]

    def take(self, rows: Any, copy: bool = False) -> tuple[dict, dict, dict]:
        """The batch of ``rows``: an index tensor (one gather per block) or a slice (views; ``copy``: cloned)."""
        if isinstance(rows, slice):
            pick = (lambda v: v[rows].clone()) if copy else (lambda v: v[rows])
        else:
            pick = lambda v: v.index_select(0, rows)  # noqa: E731
        ids, dense, targets, mask = pick(self.ids), pick(self.dense), pick(self.targets), pick(self.mask)
        inputs: dict[str, torch.Tensor] = {"dense": dense} if self.schema.dense else {}
        cols = {c: ids[:, j] for j, c in enumerate(self.flat)}
        cols.update({c: pick(v) for c, v in self.seqs.items()})
        inputs.update({c: cols[c] for c in self.schema.categorical})  # the schema's column order
        tasks = list(self.schema.labels)
        return inputs, {t: targets[:, j] for j, t in enumerate(tasks)}, {t: mask[:, j] for j, t in enumerate(tasks)}


def _read_ahead(items: Iterator, depth: int) -> Iterator:
    """``items``, produced by a background thread up to ``depth`` items ahead of the consumer.

    An exception of the producer (a DataError naming a file) is raised in the consumer, in order.
    When the consumer stops early (a closed generator), the producer stops at its next item and
    the thread is joined: nothing outlives the iteration."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((end, exc))

    thread = threading.Thread(target=produce, name="polytask-table-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = buffer.get()
            if exc is not None:
                raise exc
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _bad_dense(f: Any, column: str) -> None:
    raise DataError(f"{f}: dense column {column!r} has missing, NaN or infinite values "
                    "(only missing labels mean 'unlabelled')")


def _labels(col: Any) -> Any:
    """A label column as float32 with NaN turned into null (both mean 'unlabelled')."""
    pa, pc, _, _ = _pa()
    col = pc.cast(col, pa.float32())
    return pc.if_else(pc.is_nan(col), pa.scalar(None, pa.float32()), col)


class _Positioned(torch.utils.data.IterableDataset):
    def __init__(self, source: TableSource) -> None:
        super().__init__()
        self.source = source

    def __iter__(self):
        return self.source.iter_positioned()


class TableLoader:
    """A DataLoader over a :class:`TableSource` that knows its position (``state_dict``).

    Iterating gives one epoch of batches; the next ``iter`` starts the next epoch. After
    ``load_state_dict`` the first ``iter`` resumes the saved epoch where it stopped: each row of
    the epoch is seen exactly once across the interrupted and the resumed run.
    """

    def __init__(self, source: TableSource, num_workers: int = 0, **loader_kwargs: Any) -> None:
        self.source, self.num_workers = source, num_workers
        self.kwargs = loader_kwargs
        self.epoch = 0
        self._pos: dict[int, tuple[int, int]] = {}

    def __iter__(self) -> Iterator[tuple]:
        self.source.set_epoch(self.epoch)
        self.source.resume = dict(self._pos)
        loader = torch.utils.data.DataLoader(_Positioned(self.source), batch_size=None,
                                             num_workers=self.num_workers, **self.kwargs)
        for batch, (shard, epoch, first, done) in loader:
            self._pos[shard] = (first, done)
            yield batch
        self.epoch += 1
        self._pos = {}
        self.source.resume = {}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shards": {int(k): list(v) for k, v in self._pos.items()},
                "world_size": self.source.world_size, "num_workers": self.num_workers,
                "seed": self.source.seed, "units": len(self.source.units)}

    def load_state_dict(self, state: Mapping) -> None:
        for key, now in (("world_size", self.source.world_size), ("num_workers", self.num_workers),
                         ("seed", self.source.seed), ("units", len(self.source.units))):
            if state.get(key) != now:
                raise ConfigError(f"table loader state: {key} was {state.get(key)}, now {now}; "
                                  "resume mid-epoch needs the same data, seed, ranks and workers")
        self.epoch = int(state["epoch"])
        self._pos = {int(k): (int(v[0]), int(v[1])) for k, v in state["shards"].items()}


# ----------------------------------------------------------------------------- synthetic log
def write_synthetic_log(path: str | Path, rows: int, *, users: int = 1000, items: int = 5000,
                        zipf: float = 1.2, missing: float = 0.05, row_group_rows: int = 65536,
                        seed: int = 0) -> Path:
    """Write a click/conversion log as Parquet: raw string ids (Zipf-distributed), a known signal.

    Columns: ``user_id``, ``item_id``, ``category`` (strings), ``price``, ``hour`` (dense),
    ``click``, ``conversion`` (0/1). Click probability is ``sigmoid(2 * user_bias + 2 * item_bias
    - 1 + 0.5 * price)``, with per-id biases drawn once (the known signal); conversion happens only
    after a click, with ``sigmoid(item_bias - 1)``. A fraction ``missing`` of click labels and of
    conversion labels are null (unlabelled rows). Written in chunks of ``row_group_rows`` rows, so
    memory stays bounded for any ``rows``.
    """
    pa, _, _, pq = _pa()
    path = Path(path)
    rng = np.random.default_rng(seed)
    user_bias = rng.normal(0, 1, users)
    item_bias = rng.normal(0, 1, items)
    item_cat = rng.integers(0, 50, items)
    tmp = path.with_suffix(path.suffix + ".tmp")
    writer = None
    try:
        done = 0
        while done < rows or writer is None:
            n = min(row_group_rows, rows - done)
            u = (rng.zipf(zipf, n) - 1) % users
            it = (rng.zipf(zipf, n) - 1) % items
            price = rng.random(n).astype(np.float32)
            hour = rng.integers(0, 24, n).astype(np.float32)
            logit = 2 * user_bias[u] + 2 * item_bias[it] - 1 + 0.5 * price
            click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
            conv = click * (rng.random(n) < 1 / (1 + np.exp(1 - item_bias[it])))
            click_m = rng.random(n) < missing
            conv_m = rng.random(n) < missing
            t = pa.table({
                "user_id": pa.array(np.char.add("u", u.astype(str))),
                "item_id": pa.array(np.char.add("i", it.astype(str))),
                "category": pa.array(np.char.add("c", item_cat[it].astype(str))),
                "price": price, "hour": hour,
                "click": pa.array(click, mask=click_m),
                "conversion": pa.array(conv.astype(np.float32), mask=conv_m),
            })
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema)
            writer.write_table(t, row_group_size=row_group_rows)
            done += n
        writer.close()
        tmp.replace(path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = ["ByteRange", "CsvOptions", "HashBuckets", "SequenceIds", "Split", "TableLoader", "TableSchema",
           "TableSource", "Vocabulary", "balanced_shares", "build_vocabularies", "count_ids", "csv_ranges",
           "load_vocabularies", "merge_counts", "order_counts", "save_vocabularies", "stable_hash",
           "vocabularies_from_counts", "vocabulary_units", "write_synthetic_log"]
