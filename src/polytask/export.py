"""Export a run trained on table data for serving: the model with its id preprocessing, as one
``torch.export`` program (``.pt2``).

Strings cannot enter a traced program, so the serving contract starts one step after the raw
value: each id column is given as the 64-bit FNV-1a hash of the value's UTF-8 text
(:func:`polytask.data.tables.stable_hash`, its uint64 bits read as int64; an integer id hashes
like its decimal string, a missing one like ``""``). Everything after that is inside the
program, as tensor ops:

* a vocabulary column: ``torch.searchsorted`` in the vocabulary's sorted hashes
  (:meth:`~polytask.data.tables.Vocabulary.lookup_table`, stored as buffers), the id where the
  hash is found, else 0 (the out-of-vocabulary row) - the same lookup ``polytask predict`` does;
* a hashed column: MurmurHash3's fmix64 finaliser and the modulo, written with int64 ops (logical
  shifts by masking; the unsigned modulo from the two 32-bit halves), equal to
  :class:`~polytask.data.tables.HashBuckets`.

The program takes ``dense`` float32 ``(N, n_dense)`` (columns in the run's ``data.params.dense``
order; ``(N, 0)`` when there are none) and ``ids`` int64 ``(N, n_ids)`` (the hashes, in the
order of ``data.params.ids``, sequence columns left out); with sequence columns also ``lists``
int64 ``(N, n_seq, L)`` (each list's first ``max_len`` element hashes) and ``lengths`` int64
``(N, n_seq)`` (:func:`serving_inputs` builds all of them from raw rows); with a dynamic ``N`` (up to the bound export records in
``program.range_constraints``, set by the model's widest activation: 2**31 / width), and returns ``{task: probability (N,)}``:
the probabilities ``polytask predict`` writes. The column and task names travel inside the file
(``extra_files["serving.json"]``); :func:`load_serving` reads both back.

ONNX is not written: torch's ONNX exporter needs the ``onnx``/``onnxscript`` packages, which
polytask does not depend on; an ExportedProgram can be lowered to it (or AOTInductor) later.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from polytask.errors import ConfigError

SERVING_JSON = "serving.json"
HASH = "fnv1a64(utf8 text) as int64; integers as decimal text, missing as ''"
_U32 = 0xFFFFFFFF


def _signed(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_FMIX1, _FMIX2 = _signed(0xFF51AFD7ED558CCD), _signed(0xC4CEB9FE1A85EC53)


def _shr(h: Tensor, k: int) -> Tensor:
    """Logical (unsigned) right shift of int64 bits: torch's ``>>`` on int64 is arithmetic."""
    return (h >> k) & ((1 << (64 - k)) - 1)


def fmix64(h: Tensor) -> Tensor:
    """MurmurHash3's 64-bit finaliser on int64 tensors (products wrap like uint64's)."""
    h = h ^ _shr(h, 33)
    h = h * _FMIX1
    h = h ^ _shr(h, 33)
    h = h * _FMIX2
    return h ^ _shr(h, 33)


def unsigned_mod(h: Tensor, m: int) -> Tensor:
    """``uint64(h) % m`` for int64 ``h`` and ``1 <= m < 2**31``: ``(hi * 2**32 + lo) % m`` from the
    32-bit halves, every product below 2**62."""
    hi, lo = _shr(h, 32), h & _U32
    return ((hi % m) * ((1 << 32) % m) + lo % m) % m


class VocabularyLookup(nn.Module):
    """Hash -> vocabulary id (0 when unknown), by binary search in the sorted hashes."""

    def __init__(self, keys: np.ndarray, ids: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("keys", torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64)))
        self.register_buffer("ids", torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))

    def forward(self, h: Tensor) -> Tensor:
        if self.keys.numel() == 0:  # decided when exporting: an empty vocabulary sends all to OOV
            return torch.zeros_like(h)
        pos = torch.searchsorted(self.keys, h).clamp_max(self.keys.numel() - 1)
        return torch.where(self.keys[pos] == h, self.ids[pos], torch.zeros_like(h))

    def extra_repr(self) -> str:
        return f"size={self.keys.numel() + 1}"


class BucketLookup(nn.Module):
    """Hash -> bucket, as :class:`~polytask.data.tables.HashBuckets` (seed 0)."""

    def __init__(self, buckets: int) -> None:
        super().__init__()
        self.buckets = buckets

    def forward(self, h: Tensor) -> Tensor:
        return unsigned_mod(fmix64(h), self.buckets)

    def extra_repr(self) -> str:
        return f"buckets={self.buckets}"


class ServingModel(nn.Module):
    """A trained table model behind its id lookups: ``(dense, id hashes[, list hashes, list lengths])
    -> {task: probability}``."""

    def __init__(self, model: nn.Module, encoders: dict[str, Any], dense: list[str], tasks: list[str]) -> None:
        from polytask.data.encoders import HashBuckets, SequenceIds

        super().__init__()
        self.model, self.dense, self.tasks = model, list(dense), list(tasks)
        self.columns = [c for c, e in encoders.items() if not isinstance(e, SequenceIds)]
        self.sequences = {c: e.max_len for c, e in encoders.items() if isinstance(e, SequenceIds)}
        lookups = {}
        for c, enc in encoders.items():
            enc = getattr(enc, "inner", enc)  # a sequence column looks its ids up like a plain one
            if isinstance(enc, HashBuckets):
                if enc.seed != 0 or not 1 <= enc.buckets < 1 << 31:
                    raise ConfigError(f"data.params.ids.{c}: export needs hash seed 0 and fewer than 2**31 "
                                      f"buckets, got seed {enc.seed}, {enc.buckets} buckets")
                lookups[c] = BucketLookup(enc.buckets)
            else:
                lookups[c] = VocabularyLookup(*enc.lookup_table())
        self.lookups = nn.ModuleDict(lookups)

    def forward(self, dense: Tensor, ids: Tensor, lists: Tensor | None = None,
                lengths: Tensor | None = None) -> dict[str, Tensor]:
        inputs = {c: self.lookups[c](ids[:, j].contiguous()) for j, c in enumerate(self.columns)}
        for j, (c, max_len) in enumerate(self.sequences.items()):  # as SequenceIds: id + 1, 0 past the list's end
            h = lists[:, j, :max_len]
            ids_c = self.lookups[c](h.reshape(-1)).reshape(h.shape) + 1
            inside = torch.arange(max_len, device=h.device) < lengths[:, j:j + 1]
            inputs[c] = torch.where(inside, ids_c, torch.zeros_like(ids_c))
        if self.dense:
            inputs["dense"] = dense
        out = self.model(inputs)
        return {t: torch.sigmoid(out[t].float().reshape(-1)) for t in self.tasks}


def serving_inputs(table: Any, dense: list[str], columns: list[str],
                   sequences: dict[str, int] | None = None) -> tuple[Tensor, ...]:
    """The exported program's inputs from a pyarrow table of raw rows: ``(dense, ids)``, and with
    ``sequences`` (column: max_len) ``lists`` (N, n_seq, max max_len) of the list elements' hashes
    and ``lengths`` (N, n_seq) (a null list has length 0)."""
    import pyarrow.compute as pc

    from polytask.data.encoders import stable_hash

    n = table.num_rows
    d = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in dense], axis=1) \
        if dense else np.zeros((n, 0), np.float32)
    h = np.stack([stable_hash(table.column(c)).view(np.int64) for c in columns], axis=1) \
        if columns else np.zeros((n, 0), np.int64)
    if not sequences:
        return torch.from_numpy(d), torch.from_numpy(h)
    width = max(sequences.values())
    lists = np.zeros((n, len(sequences), width), np.int64)
    lengths = np.zeros((n, len(sequences)), np.int64)
    for j, (c, max_len) in enumerate(sequences.items()):
        arr = table.column(c)
        lens = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = stable_hash(pc.list_flatten(arr)).view(np.int64)
        row = np.repeat(np.arange(n), lens)
        pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
        keep = pos < max_len
        lists[row[keep], j, pos[keep]] = flat[keep]
        lengths[:, j] = np.minimum(lens, max_len)
    return torch.from_numpy(d), torch.from_numpy(h), torch.from_numpy(lists), torch.from_numpy(lengths)


def export_run(run_dir: str | Path, out: str | Path, example_rows: int = 8) -> Path:
    """Write the run's best model with its preprocessing to ``out`` (a ``.pt2`` file, atomically)."""
    from polytask.train.checkpoint import atomic_write
    from polytask.train.rundir import remove_stale_builds
    from polytask.train.tables import load_run_model

    if not Path(out).parent.is_dir():
        raise ConfigError(f"{out}: no folder {Path(out).parent} to write the exported program in")
    _, p, encoders, tasks, model = load_run_model(Path(run_dir))
    serving = ServingModel(model, encoders, list(p.dense), [t.name for t in tasks]).eval().requires_grad_(False)
    n, k, seq = example_rows, len(serving.columns), serving.sequences
    args: tuple[Tensor, ...] = (torch.zeros(n, len(p.dense)), torch.arange(n * k, dtype=torch.int64).reshape(n, k))
    if seq:
        args += (torch.arange(n * len(seq) * max(seq.values())).reshape(n, len(seq), -1),
                 torch.ones(n, len(seq), dtype=torch.int64))
    batch = torch.export.Dim.DYNAMIC  # the batch size; export records the range it supports
    with torch.no_grad(), warnings.catch_warnings():
        # the models keep their last shared representation as an attribute (for feature-level
        # balancing in training); in the exported program it is a dead store, not state
        warnings.filterwarnings("ignore", message=r".*shared_features was assigned during export")
        program = torch.export.export(serving, args, dynamic_shapes=tuple({0: batch} for _ in args))
    meta = {"dense": list(p.dense), "ids": serving.columns, "sequences": seq, "tasks": [t.name for t in tasks],
            "hash": HASH, "sizes": {c: e.size for c, e in encoders.items()}}
    out = Path(out)

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: torch.export.save warns about a path without .pt2
            torch.export.save(program, f, extra_files={SERVING_JSON: json.dumps(meta)})

    remove_stale_builds(out)  # the temporary files of a killed export into the same OUT
    return atomic_write(out, fill, error=ConfigError)  # a unique temporary name, renamed when complete


def load_serving(path: str | Path) -> tuple[Any, dict]:
    """``(the exported program, its serving.json)``; call ``program.module()(dense, ids)``."""
    extra = {SERVING_JSON: ""}
    program = torch.export.load(path, extra_files=extra)
    return program, json.loads(extra[SERVING_JSON])


__all__ = ["BucketLookup", "ServingModel", "VocabularyLookup", "export_run", "fmix64", "load_serving",
           "serving_inputs", "unsigned_mod"]
