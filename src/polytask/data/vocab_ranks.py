"""The vocabulary pass over R processes, each value's count summed by one rank: its owner.

Each rank counts the ids of its share of the units (:func:`polytask.data.tables.count_ids`). The
owner of a value is ``fmix64(FNV-1a(text)) mod R``: the stable hash the encoders use
(:func:`~polytask.data.encoders.stable_hash`), mixed as :class:`~polytask.data.encoders.HashBuckets`
mixes it (FNV-1a's low bits depend on the bytes' low bits only, so ``mod R`` of the raw hash splits
structured ids unevenly). Then:

1. one all-gather of a few bytes per rank: the error its share raised (every rank raises the first
   one, in rank order) or the value type of each column (different types in different files are
   refused on every rank, as when the tables were all-gathered);
2. one ``all_to_all_single`` of byte buffers (and one of their sizes): each rank sends each owner
   the (value, count) rows it owns, as Arrow IPC streams; gloo and nccl both take uneven splits;
3. each owner sums its rows, keeps the values seen ``min_count`` times and orders them;
4. every rank receives every owner's kept rows (one all-gather of sizes, then one broadcast per
   owner of exactly its bytes: no padding) and orders them all by (count descending, text), the
   total order of :func:`~polytask.data.tables.order_counts`: the vocabulary, and ``vocab.json``,
   are one process's byte for byte.

Bytes per rank: the all-gather of the count tables it replaces made every rank hold every rank's
table, about 18 bytes (text, a 4-byte offset, an 8-byte count) times the distinct ids of each
rank, times R. Here a rank holds its own table (and its send buffer, a copy sorted by owner), then
what the ranks send it (the distinct ids of its range in each rank's share, about its own table's
size when ids spread over the ranks), then the kept vocabulary: independent of R.
:attr:`RankGroup.sent`, :attr:`RankGroup.received` count the bytes through the collectives and
:attr:`RankGroup.held` the largest sum of the tables and buffers the pass held at once (their
``nbytes``), which tests compare with that bound.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from polytask.data.encoders import Vocabulary, _mix, _pa, stable_hash
from polytask.errors import DataError, PolytaskError


class RankGroup:
    """The collectives of the sharded vocabulary pass over a ``torch.distributed`` group.

    Args:
        group: the process group (None: the default group).
        device: where the byte buffers go for the collectives (``cuda`` under nccl; ``cpu`` under gloo).
        call: runs each collective, ``call(fn, *args, **kwargs)`` (the trainer passes
            :func:`polytask.train.dist.collective`, which turns a lost peer into one line).
    """

    def __init__(self, group: Any = None, device: torch.device | str = "cpu", call: Callable | None = None) -> None:
        import torch.distributed as dist

        self.group, self.device, self._call = group, torch.device(device), call
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.sent = self.received = self.held = 0

    def _run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if self._call is None else self._call(fn, *args, **kwargs)

    def hold(self, nbytes: int) -> None:
        """Record that the pass holds ``nbytes`` at once now (:attr:`held` is the largest)."""
        self.held = max(self.held, int(nbytes))

    def _tensor(self, data: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # Arrow's buffers are read-only; the collectives only read them
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(data).to(self.device)

    def objects(self, obj: Any) -> list:
        """Every rank's small picklable ``obj``, in rank order."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self._run(dist.all_gather_object, out, obj, group=self.group)
        self.sent += len(pickle.dumps(obj))
        self.received += sum(len(pickle.dumps(o)) for i, o in enumerate(out) if i != self.rank)
        return out

    def all_to_all(self, data: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Personalised exchange of bytes: ``data`` (uint8) holds, rank after rank, ``sizes[d].sum()``
        bytes for rank ``d``, ``sizes`` being ``(R, C)`` bytes per rank and part. Returns the bytes the
        ranks sent this one, rank after rank, and their ``(R, C)`` sizes."""
        import torch.distributed as dist

        got = torch.empty(sizes.size, dtype=torch.int64, device=self.device)
        self._run(dist.all_to_all_single, got, self._tensor(sizes.reshape(-1)), group=self.group)
        got_sizes = got.cpu().numpy().reshape(sizes.shape)
        out = torch.empty(int(got_sizes.sum()), dtype=torch.uint8, device=self.device)
        self._run(dist.all_to_all_single, out, self._tensor(data), output_split_sizes=got_sizes.sum(1).tolist(),
                  input_split_sizes=sizes.sum(1).tolist(), group=self.group)
        self.sent += int(sizes.sum() - sizes[self.rank].sum()) + 8 * sizes.size
        self.received += int(got_sizes.sum() - got_sizes[self.rank].sum()) + 8 * sizes.size
        return out.cpu().numpy(), got_sizes

    def all_gather(self, data: np.ndarray, sizes: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Every rank's bytes ``data`` (``sizes``: ``(C,)`` bytes per part), in rank order, and the
        ``(R, C)`` sizes: one all-gather of the sizes, then one broadcast per rank of exactly its
        bytes (an all-gather would pad every rank's to the largest)."""
        import torch.distributed as dist

        parts = [torch.empty(len(sizes), dtype=torch.int64, device=self.device) for _ in range(self.size)]
        self._run(dist.all_gather, parts, self._tensor(sizes), group=self.group)
        all_sizes = np.stack([p.cpu().numpy() for p in parts])
        out = []
        for src in range(self.size):  # one broadcast per source rank, in turn
            n = int(all_sizes[src].sum())
            if src == self.rank:
                out.append(data)
                buf = self._tensor(data)
            else:
                buf = torch.empty(n, dtype=torch.uint8, device=self.device)
            if n:
                self._run(dist.broadcast, buf, group_src=src, group=self.group)
            if src != self.rank:
                out.append(buf.cpu().numpy())
        n_mine = int(sizes.sum())
        self.sent += n_mine * (self.size - 1) + 8 * len(sizes)
        self.received += int(all_sizes.sum()) - n_mine + 8 * len(sizes) * (self.size - 1)
        return out, all_sizes


def sharded_vocabularies(mine: Mapping[str, Any] | PolytaskError, columns: Sequence[str],
                         min_count: int | Mapping[str, int], ranks: RankGroup) -> dict[str, Vocabulary]:
    """The vocabularies of the whole pass from this rank's count tables (``{column: table {v, n} or
    None}``, taken out of ``mine`` as they are sent, so that they are freed; or the user error its
    share raised), every value's count summed by its owner rank
    (module docstring); every rank returns the same vocabularies, equal to one process's."""
    from polytask.data.tables import order_counts

    _agree(mine, columns, ranks)
    owned = _sum_at_owners(mine, columns, ranks)  # type: ignore[arg-type]  (an error was raised by _agree)
    kept = {c: order_counts(owned.pop(c), _min_count(min_count, c)) for c in columns}
    return _assemble(kept, columns, min_count, ranks)


def _min_count(min_count: int | Mapping[str, int], column: str) -> int:
    return min_count[column] if isinstance(min_count, Mapping) else min_count


def _agree(mine: Mapping[str, Any] | PolytaskError, columns: Sequence[str], ranks: RankGroup) -> None:
    """One small all-gather: the first rank's user error raised on every rank, else one value type
    per column across the ranks (DataError naming the column, as :func:`merge_counts` words it)."""
    if isinstance(mine, PolytaskError):
        status: tuple = ("error", type(mine).__name__, str(mine))
    else:
        status = ("ok", {c: None if t is None or not t.num_rows else str(t.schema.field("v").type) for c, t in
                         mine.items()})
    parts = ranks.objects(status)
    for part in parts:
        if part[0] == "error":
            raise _rebuild(part[1], part[2])
    for c in columns:
        types = {part[1][c] for part in parts} - {None}
        if len(types) > 1:
            raise DataError(f"id column {c!r} holds different types in different files: {', '.join(sorted(types))}")


def _rebuild(kind: str, message: str) -> PolytaskError:
    """A peer's user error as the same polytask error class (PolytaskError if unknown)."""
    todo: list[type[PolytaskError]] = [PolytaskError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == kind:
            try:
                return cls(message)
            except TypeError:
                break
        todo.extend(cls.__subclasses__())
    return PolytaskError(message)


def owners(values: Any, size: int) -> np.ndarray:
    """The rank that sums each value's counts: ``fmix64(FNV-1a(text)) mod size`` (uint16)."""
    return (_mix(stable_hash(values)) % np.uint64(size)).astype(np.uint16)


def _sum_at_owners(mine: dict[str, Any], columns: Sequence[str], ranks: RankGroup) -> dict[str, Any]:
    """Each (value, count) row sent to its owner in one all_to_all; returns per column the summed
    counts of the values this rank owns (None: none)."""
    from polytask.data.tables import merge_counts

    pa, _, _, _ = _pa()
    size = ranks.size
    by_owner, bounds = {}, {}
    for c in columns:  # each column's table sorted by owner (a radix sort of uint16), the original dropped
        t = mine.pop(c)
        if t is None or not t.num_rows:
            by_owner[c], bounds[c] = None, np.zeros(size + 1, np.int64)
            continue
        own = owners(t["v"], size)
        by_owner[c] = t.take(pa.array(np.argsort(own, kind="stable")))
        bounds[c] = np.concatenate([[0], np.cumsum(np.bincount(own, minlength=size))])
        ranks.hold(sum(x.nbytes for x in by_owner.values() if x is not None) + t.nbytes
                   + sum(x.nbytes for x in mine.values() if x is not None))
        del t
    sink, sizes = pa.BufferOutputStream(), np.zeros((size, len(columns)), np.int64)
    for d in range(size):  # rank after rank, column after column: the order all_to_all_single cuts
        for j, c in enumerate(columns):
            if bounds[c][d + 1] > bounds[c][d]:
                start = sink.tell()
                _write(sink, by_owner[c].slice(bounds[c][d], bounds[c][d + 1] - bounds[c][d]))
                sizes[d, j] = sink.tell() - start
    data = np.frombuffer(sink.getvalue(), np.uint8)
    ranks.hold(sum(x.nbytes for x in by_owner.values() if x is not None) + data.nbytes)
    del by_owner
    got, got_sizes = ranks.all_to_all(data, sizes)
    ranks.hold(data.nbytes + got.nbytes)
    del data
    parts = _read(got, got_sizes, columns)
    owned = {c: merge_counts(c, parts[c]) for c in columns}
    ranks.hold(got.nbytes + sum(t.nbytes for t in owned.values() if t is not None))
    return owned


def _assemble(kept: dict[str, Any], columns: Sequence[str], min_count: int | Mapping[str, int],
              ranks: RankGroup) -> dict[str, Vocabulary]:
    """Every owner's kept rows to every rank, ordered there: the vocabularies."""
    from polytask.data.tables import order_counts

    pa, _, _, _ = _pa()
    sink, sizes = pa.BufferOutputStream(), np.zeros(len(columns), np.int64)
    for j, c in enumerate(columns):
        if kept[c] is not None and kept[c].num_rows:
            start = sink.tell()
            _write(sink, kept[c])
            sizes[j] = sink.tell() - start
    data = np.frombuffer(sink.getvalue(), np.uint8)
    buffers, all_sizes = ranks.all_gather(data, sizes)
    ranks.hold(sum(b.nbytes for b in buffers) + sum(t.nbytes for t in kept.values() if t is not None))
    del kept
    parts = {c: [] for c in columns}
    for src, buf in enumerate(buffers):
        for c, tables in _read(buf, all_sizes[src:src + 1], columns).items():
            parts[c] += tables
    out = {}
    for c in columns:
        k = _min_count(min_count, c)
        t = order_counts(pa.concat_tables(parts[c]), k) if parts[c] else None
        out[c] = Vocabulary(c, [] if t is None else t["v"].to_pylist(), k)
    return out


def _write(sink: Any, table: Any) -> None:
    pa, _, _, _ = _pa()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _read(data: np.ndarray, sizes: np.ndarray, columns: Sequence[str]) -> dict[str, list]:
    """The tables in ``data``, laid out rank after rank and column after column with ``(R, C)`` byte
    ``sizes`` (empty parts skipped), per column; zero-copy views of ``data``."""
    pa, _, _, _ = _pa()
    buf = pa.py_buffer(data)
    out: dict[str, list] = {c: [] for c in columns}
    offsets = np.concatenate([[0], np.cumsum(sizes.reshape(-1))])
    for i, n in enumerate(sizes.reshape(-1).tolist()):
        if n:
            out[columns[i % len(columns)]].append(pa.ipc.open_stream(buf.slice(int(offsets[i]), n)).read_all())
    return out


__all__ = ["RankGroup", "owners", "sharded_vocabularies"]
