"""The vocabulary pass over R processes, each value's count summed by one rank: its owner.

Each rank counts the ids of its share of the units (:func:`polytask.data.tables.count_ids`). The
owner of a value is ``fmix64(FNV-1a(text)) mod R``: the stable hash the encoders use
(:func:`~polytask.data.encoders.stable_hash`), mixed as :class:`~polytask.data.encoders.HashBuckets`
mixes it (FNV-1a's low bits depend on the bytes' low bits only, so ``mod R`` of the raw hash splits
structured ids unevenly). Then:

1. one all-gather of a few bytes per rank: the error its share raised (every rank raises the first
   one, in rank order) or the value type of each column (different types in different files are
   refused on every rank, as when the tables were all-gathered);
2. R - 1 rounds of point-to-point messages (round ``k``: to rank ``rank + k``, from ``rank - k``;
   sizes, then bytes): each rank sends each owner the (value, count) rows it owns, as Arrow IPC
   streams, cut from its tables one owner at a time. gloo and nccl both have
   ``all_to_all_single`` with uneven splits, but it needs every outgoing part at once: a second
   copy of the rank's table;
3. each owner sums its rows, keeps the values seen ``min_count`` times and orders them;
4. every rank receives every owner's kept rows (one all-gather of sizes, then one broadcast per
   owner of exactly its bytes: no padding) and orders them all by (count descending, text), the
   total order of :func:`~polytask.data.tables.order_counts`: the vocabulary, and ``vocab.json``,
   are one process's byte for byte.

Bytes per rank: the all-gather of the count tables it replaces made every rank hold every rank's
table, about 18 bytes (text, a 4-byte offset, an 8-byte count) times the distinct ids of each
rank, times R. Here a rank holds its own table (2 more bytes per value: its owner) and one
outgoing part while it receives what the ranks send it (the distinct ids of its range in each
rank's share, about its own table's size when ids spread over the ranks), then those and their
sums, then the kept vocabulary: independent of R.
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

from polytask.data.encoders import Vocabulary, _fnv1a, _mix, _pa
from polytask.errors import DataError, PolytaskError, error_from_name


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

    def _swap(self, out: torch.Tensor | None, dst: int, into: torch.Tensor | None, src: int) -> None:
        """Send ``out`` to ``dst`` while receiving ``into`` from ``src`` (None: nothing that way)."""
        import torch.distributed as dist

        ops = [] if out is None else [dist.P2POp(dist.isend, out, group=self.group, group_peer=dst)]
        ops += [] if into is None else [dist.P2POp(dist.irecv, into, group=self.group, group_peer=src)]
        if ops:
            self._run(lambda: [work.wait() for work in dist.batch_isend_irecv(ops)])

    def all_to_all(self, part_for: Callable[[int], tuple[np.ndarray, np.ndarray]],
                   holding: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """Personalised exchange of bytes in R - 1 rounds: in round ``k`` this rank sends
        ``part_for(rank + k)`` (bytes, and their ``(C,)`` sizes per part) to rank ``rank + k`` and
        receives rank ``rank - k``'s part for it (sizes first), so one outgoing part is built at a
        time (an ``all_to_all_single`` needs every part at once: a copy of all that is sent).
        Returns every rank's part for this one, in rank order (its own from ``part_for``), and
        records what it holds at each round, ``holding`` (the caller's tables) included."""
        parts: list[Any] = [None] * self.size
        parts[self.rank] = part_for(self.rank)
        held = holding + parts[self.rank][0].nbytes
        for k in range(1, self.size):  # rounds: one peer each way at a time
            dst, src = (self.rank + k) % self.size, (self.rank - k) % self.size
            data, sizes = part_for(dst)
            got_sizes = torch.empty(len(sizes), dtype=torch.int64, device=self.device)
            self._swap(self._tensor(sizes), dst, got_sizes, src)
            got = torch.empty(int(got_sizes.sum()), dtype=torch.uint8, device=self.device)
            self._swap(self._tensor(data) if data.nbytes else None, dst, got if got.numel() else None, src)
            parts[src] = (got.cpu().numpy(), got_sizes.cpu().numpy())
            self.hold(held + data.nbytes + got.numel())
            held += got.numel()
            self.sent += data.nbytes + sizes.nbytes
            self.received += got.numel() + sizes.nbytes
        return parts

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
    None}``, dropped from ``mine`` once sent, so that they are freed; or the user error its share
    raised), every value's counts summed by its owner rank (module docstring). Every rank returns
    the same vocabularies, equal to one process's."""
    from polytask.data.tables import order_counts

    _agree(mine, columns, ranks)  # raises any rank's error on every rank: past it, mine holds tables
    owned = _sum_at_owners(mine, columns, ranks)  # type: ignore[arg-type]
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
            raise error_from_name(part[1], part[2])
    for c in columns:
        types = {part[1][c] for part in parts} - {None}
        if len(types) > 1:
            raise DataError(f"id column {c!r} holds different types in different files: {', '.join(sorted(types))}")


def owners(values: Any, size: int) -> np.ndarray:
    """The rank that sums each value's counts: ``fmix64(FNV-1a(text)) mod size`` (uint16), the hash
    of :func:`~polytask.data.encoders.stable_hash` taken chunk by chunk: the values of a count table
    are distinct already, so it skips stable_hash's dictionary encoding (a copy and a hash table)."""
    pa, pc, _, _ = _pa()
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    text = [c if pa.types.is_string(c.type) or pa.types.is_large_string(c.type) else pc.cast(c, pa.string())
            for c in chunks]
    h = np.concatenate([_fnv1a(c, 0) for c in text]) if text else np.zeros(0, np.uint64)
    return (_mix(h) % np.uint64(size)).astype(np.uint16)


def _sum_at_owners(mine: dict[str, Any], columns: Sequence[str], ranks: RankGroup) -> dict[str, Any]:
    """Each (value, count) row sent to its owner (:meth:`RankGroup.all_to_all`, one owner's rows
    cut from the tables at a time); returns per column the summed counts of the values this rank
    owns (None: none). ``mine``'s tables are dropped once sent."""
    from polytask.data.tables import merge_counts

    pa, _, _, _ = _pa()
    own = {c: owners(t["v"], ranks.size) for c, t in mine.items() if t is not None and t.num_rows}

    def part_for(rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``rank``'s range, column after column, as Arrow IPC streams."""
        sink, sizes = pa.BufferOutputStream(), np.zeros(len(columns), np.int64)
        for j, c in enumerate(columns):
            if c in own:
                rows = mine[c].filter(pa.array(own[c] == rank))
                if rows.num_rows:
                    start = sink.tell()
                    _write(sink, rows)
                    sizes[j] = sink.tell() - start
        return np.frombuffer(sink.getvalue(), np.uint8), sizes

    tables = sum(t.nbytes for t in mine.values() if t is not None) + sum(o.nbytes for o in own.values())
    parts = ranks.all_to_all(part_for, holding=tables)
    for c in columns:
        mine.pop(c, None)
    got = {c: [] for c in columns}
    for data, sizes in parts:
        for c, tabs in _read(data, sizes[None], columns).items():
            got[c] += tabs
    owned = {c: merge_counts(c, got[c]) for c in columns}
    ranks.hold(sum(data.nbytes for data, _ in parts) + sum(t.nbytes for t in owned.values() if t is not None))
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
