"""Id encoders for table data: stable 64-bit hashing, hash buckets, vocabularies, id lists.

Every encoder maps a pyarrow array of raw ids (strings or integers; a dictionary array as read
from Parquet too) to int64 ids, working on the distinct values of the array: each gets its 64-bit
FNV-1a hash (:func:`stable_hash`: the same on every machine and run, unlike Python's salted
``hash``), then a bucket (:class:`HashBuckets`) or its id by binary search in the vocabulary's
sorted hashes (:class:`Vocabulary`); a ``take`` brings the result back to the rows.
:class:`SequenceIds` encodes lists of ids into a padded matrix. Vocabularies are built from files
by :func:`polytask.data.tables.build_vocabularies` and saved as JSON here.

pyarrow is an optional dependency (``pip install polytask[tables]``), imported only when used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polytask.errors import ConfigError, DataError

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError("streaming tables need pyarrow: pip install 'polytask[tables]'") from None
    return pa, pc, pcsv, pq


# ----------------------------------------------------------------------------- stable hashing
def stable_hash(values: Any, seed: int = 0) -> np.ndarray:
    """64-bit FNV-1a of each value's text (ints hash like their decimal string), as uint64.

    Vectorised: the distinct values of the array are hashed with one numpy pass per byte
    position, then taken back to the rows. Nulls hash like the empty string.
    """
    uniq, idx = _distinct_hashes(values, seed)
    return uniq[idx]


def _distinct_hashes(values: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes of the distinct values, index of each row's value)``: encoders work on the distinct
    values (a few thousand per batch for Zipf ids) and take the result back to the rows."""
    pa, pc, _, _ = _pa()
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):  # read as Parquet stores it: its dictionary holds distinct values
        words = arr.dictionary
        if not (pa.types.is_string(words.type) or pa.types.is_large_string(words.type)):
            words = pc.cast(words, pa.string())
        h = _fnv1a(pc.fill_null(words, "") if words.null_count else words, seed)
        if not arr.null_count:  # the indices as they are (zero-copy)
            return h, arr.indices.to_numpy(zero_copy_only=False)
        h = np.append(h, _empty_hash(seed))  # last: null, hashed as the empty string
        return h, pc.fill_null(arr.indices, len(arr.dictionary)).to_numpy(zero_copy_only=False)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.string())
    enc = pc.dictionary_encode(pc.fill_null(arr, "") if arr.null_count else arr)
    return _fnv1a(enc.dictionary, seed), enc.indices.to_numpy(zero_copy_only=False)


def _empty_hash(seed: int) -> np.uint64:
    """FNV-1a of no byte: the offset basis (xor the seed)."""
    return _FNV_OFFSET ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)


def _fnv1a(words: Any, seed: int) -> np.ndarray:
    """FNV-1a (64-bit) of each string's UTF-8 bytes, vectorised over the strings: one numpy pass per
    byte position.

    The strings are ordered longest first (a stable radix sort of their lengths), so the strings that
    have a byte at position ``pos`` are a prefix of that order: each pass works on a contiguous slice,
    with no mask and no fancy-indexed write, and one scatter puts the hashes back in place."""
    pa, _, _, _ = _pa()
    wide = pa.types.is_large_string(words.type) or pa.types.is_large_binary(words.type)
    plain = wide or pa.types.is_string(words.type) or pa.types.is_binary(words.type)
    uniq = words if plain else words.cast(pa.binary())
    buffers = uniq.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64 if wide else np.int32)[uniq.offset:uniq.offset + len(uniq) + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if len(uniq) and buffers[2] else np.zeros(0, np.uint8)
    n, lengths = len(uniq), np.diff(offsets).astype(np.int64)
    longest = int(lengths.max(initial=0))
    key = lengths.astype(np.uint16) if longest < 1 << 16 else lengths  # 16 bits: numpy sorts by radix
    order = np.argsort(key, kind="stable")[::-1]
    at = offsets[:-1].astype(np.int64)[order]  # where each string's next byte is, in that order
    longer = n - np.cumsum(np.bincount(lengths, minlength=longest))[:longest]  # strings longer than pos
    h = np.full(n, _empty_hash(seed), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for m in longer.tolist():  # one pass per byte position, over the m strings that have it
            part = h[:m]
            part ^= data[at[:m]]
            part *= _FNV_PRIME
            at[:m] += 1
    out = np.empty_like(h)
    out[order] = h
    return out


def _mix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (fmix64): spreads FNV-1a's poorly mixed high bits of short keys."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def _uniform(values: Any, seed: int) -> np.ndarray:
    """A number in [0, 1) per value, from its mixed stable hash (53 high bits)."""
    return (_mix(stable_hash(values, seed)) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# ----------------------------------------------------------------------------- id encoders
@dataclass(frozen=True)
class HashBuckets:
    """Feature hashing of an id column into ``buckets`` ids (stable across runs and machines):
    FNV-1a of the value's text, mixed by MurmurHash3's fmix64, modulo ``buckets``."""

    buckets: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.buckets < 1:
            raise ConfigError(f"hash buckets must be >= 1, got {self.buckets}")

    @property
    def size(self) -> int:
        return self.buckets

    def encode(self, values: Any, out: np.ndarray | None = None) -> np.ndarray:
        """int64 bucket ids of ``values`` (written into ``out``, a 1-D int64 array of their length, if given)."""
        uniq, idx = _distinct_hashes(values, self.seed)
        return np.take((_mix(uniq) % np.uint64(self.buckets)).astype(np.int64), idx, out=out)


@dataclass
class Vocabulary:
    """Ids of one column: index 0 is the out-of-vocabulary bucket, known values are 1..n.

    ``values`` are in a deterministic order (count descending, then value). ``oov_count`` counts
    values encoded to the OOV bucket since the vocabulary was made (scoring-time unknowns); a null
    is OOV too.

    Lookup is by the values' 64-bit :func:`stable_hash`, sorted once: ``np.searchsorted`` per
    batch costs O(batch log n), where pyarrow's ``index_in`` would rebuild a hash table of all n
    values for every batch. The same two tensors (:meth:`lookup_table`) make the lookup of an
    exported model. A value outside the vocabulary whose hash equals a known value's is taken for
    it: with n known values that happens with probability n / 2^64 per unseen value (5e-14 for a
    million ids); two known values with one hash are refused when the table is made.
    """

    column: str
    values: list
    min_count: int = 1
    oov_count: int = 0
    _table: Any = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.values) + 1

    def lookup_table(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, ids)``: the known values' stable hashes as int64 (the uint64 bits), sorted, and the
        id of each (1..n); a hash ``h`` encodes to ``ids[i]`` where ``keys[i] == h``, else to 0."""
        if self._table is None:
            h = stable_hash(self.values).view(np.int64) if self.values else np.zeros(0, np.int64)
            order = np.argsort(h, kind="stable")
            keys = h[order]
            if len(keys) > 1 and (keys[1:] == keys[:-1]).any():
                j = int(np.flatnonzero(keys[1:] == keys[:-1])[0])
                raise DataError(f"vocabulary of column {self.column!r}: values {self.values[order[j]]!r} and "
                                f"{self.values[order[j + 1]]!r} have the same 64-bit hash")
            self._table = (keys, (order + 1).astype(np.int64))
        return self._table

    def encode_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """Ids of values given by their stable hashes (int64 or uint64); unknown hashes give 0."""
        keys, ids = self.lookup_table()
        h = np.asarray(hashes).view(np.int64)
        if not len(keys):
            return np.zeros(len(h), np.int64)
        pos = np.minimum(np.searchsorted(keys, h), len(keys) - 1)
        return np.where(keys[pos] == h, ids[pos], 0)

    def encode(self, values: Any, out: np.ndarray | None = None) -> np.ndarray:
        """int64 ids of ``values`` (written into ``out``, a 1-D int64 array of their length, if given);
        unknown values and nulls are 0, counted in ``oov_count``."""
        pa, pc, _, _ = _pa()
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
        uniq, idx = _distinct_hashes(arr)
        ids = self.encode_hashes(uniq)
        out = np.take(ids, idx, out=out)
        if arr.null_count:
            out[~pc.is_valid(arr).to_numpy(zero_copy_only=False)] = 0
        if arr.null_count or not ids.all():  # some row may be OOV: count them (else none is: no pass over the rows)
            self.oov_count += int(np.count_nonzero(out == 0))
        return out

    def to_dict(self) -> dict:
        return {"column": self.column, "min_count": self.min_count, "values": self.values}

    @classmethod
    def from_dict(cls, d: Mapping) -> Vocabulary:
        return cls(d["column"], list(d["values"]), int(d.get("min_count", 1)))


@dataclass
class SequenceIds:
    """A column of id lists (e.g. a user's recent items) through ``inner`` (a :class:`Vocabulary` or
    :class:`HashBuckets`): ``(N, max_len)`` int64, the first ``max_len`` ids of each list, each
    ``inner`` id + 1, padded with 0 (so 0 is padding, 1 the out-of-vocabulary id). The model pools
    the embeddings of the non-padding positions (``pooling``: mean, sum or max), what
    ``nn.EmbeddingBag`` computes for mean and sum. A null list is all padding; a null id is OOV.
    Vectorised: one encoding of the flattened ids, one scatter into the padded matrix."""

    inner: Vocabulary | HashBuckets
    max_len: int = 50
    pooling: str = "mean"

    @property
    def size(self) -> int:
        return self.inner.size + 1

    @property
    def oov_count(self) -> int:
        return getattr(self.inner, "oov_count", 0)

    @oov_count.setter
    def oov_count(self, value: int) -> None:
        if isinstance(self.inner, Vocabulary):
            self.inner.oov_count = value

    def encode(self, values: Any) -> np.ndarray:
        pa, pc, _, _ = _pa()
        arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            raise DataError(f"sequence column: expected lists of ids, got {arr.type}")
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(arr)
        ids = self.inner.encode(flat) + 1 if len(flat) else np.zeros(0, np.int64)
        out = np.zeros((len(arr), self.max_len), np.int64)
        row = np.repeat(np.arange(len(arr)), lengths)
        pos = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = pos < self.max_len
        out[row[keep], pos[keep]] = ids[keep]
        return out


def save_vocabularies(vocabs: Mapping[str, Vocabulary], path: str | Path) -> None:
    """Write vocabularies to one JSON file (atomically: a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({c: v.to_dict() for c, v in vocabs.items()}, ensure_ascii=False))
    tmp.replace(path)


def load_vocabularies(path: str | Path) -> dict[str, Vocabulary]:
    try:
        raw = json.loads(Path(path).read_text())
        return {c: Vocabulary.from_dict(v) for c, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a polytask vocabulary file ({exc})") from None


def id_feature(name: str, enc: Any, embed_dim: int) -> Any:
    """The model feature of an id column: a sparse feature, or a pooled sequence for :class:`SequenceIds`."""
    from polytask.data.features import SequenceFeature, SparseFeature

    if isinstance(enc, SequenceIds):
        return SequenceFeature(name, enc.size, embed_dim, pooling=enc.pooling, padding_idx=0)
    return SparseFeature(name, enc.size, embed_dim)


__all__ = ["HashBuckets", "SequenceIds", "Vocabulary", "id_feature", "load_vocabularies", "save_vocabularies",
           "stable_hash"]
