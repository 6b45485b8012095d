"""Streaming checkpoint I/O: read and write safetensors tensor by tensor.

Readers parse the safetensors header (8-byte little-endian length, then a JSON table of
``name -> dtype, shape, data_offsets``) and read each tensor with ``os.preadv`` straight into a
fresh buffer. Unlike a memory map, no file page stays in the process's resident set once a
tensor is dropped, so peak memory is bounded by the tensors in flight, not by the checkpoint
size, and reads from several threads do not contend for one handle.

The writer knows every output tensor's name, shape and dtype before the first byte is computed,
so it lays out the shards and their headers up front and then writes each tensor at its offset
as soon as it is ready (in any order, from any thread). Everything goes to a hidden temporary
directory next to the target, which is renamed into place only after every tensor, the index
and the copied config/tokenizer files are on disk: an interrupted or failed merge never leaves
an output directory that looks complete. While it writes, the writer holds an exclusive lock on
the target (``.NAME.lock`` beside it, an ``flock``), so a second writer into the same target
fails at once; holding it, it removes the partial directories that killed writers left beside
it (recognised by name and by a marker file inside, and only when no live process holds the
lock of the output they were for; never anything else). What
it moves into place gets the process umask's permissions, not the temporary directory's 0700.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from polytask.errors import CheckpointError, MergeError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: no lock there
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "TensorSpec",
    "Checkpoint",
    "CheckpointWriter",
    "parse_dtype",
    "parse_size",
    "save_state_dict",
    "load_state_dict",
]

_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

#: Files of a checkpoint directory that hold weights (never copied from the base as "extras").
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Extra files copied from the base larger than this are skipped (they are not config/tokenizer).
_MAX_EXTRA_FILE_BYTES = 64 * 2**20
_MAX_HEADER_BYTES = 100 * 2**20
#: Pickled checkpoint files read with ``allow_pickle`` (``torch.load(weights_only=True)``).
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: File inside a writer's temporary directory that marks it as ours (removed before the rename).
_PARTIAL_MARKER = ".polytask-partial"
_scratch = threading.local()  # per-thread read buffer of Checkpoint.read_into


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``bfloat16``, ``float16``, ``float32``...) to a floating torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise MergeError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPE_NAMES))}")
    return _DTYPE_NAMES[key]


def parse_size(size: int | str) -> int:
    """Parse a positive byte size such as ``2GB``, ``500MB``, ``5B`` (billion, as mergekit) or an int."""
    value = _parse_size(size)
    if value is None or value <= 0:
        raise MergeError(f"cannot parse shard size {size!r}: use a positive size such as '2GB' or '500MB'")
    return value


def _parse_size(size: int | str) -> int | None:
    if isinstance(size, bool):
        return None
    if isinstance(size, int):
        return size
    text = str(size).strip().upper().replace("_", "")
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "K": 10**3, "M": 10**6, "B": 10**9}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)].strip()
            try:
                return int(float(number) * units[unit])
            except (ValueError, OverflowError):  # 'abcGB', 'nanGB', 'infGB'
                return None
    try:
        return int(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _SafetensorsFile:
    """One ``.safetensors`` file: parsed header plus positional reads (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self._map_lock = threading.Lock()
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"cannot open {path}: {exc.strerror}") from None
        try:
            self._parse_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _parse_header(self) -> None:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        if len(head) != 8:
            raise CheckpointError(f"{self.path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{self.path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        data_start = 8 + n
        self.entries: dict[str, tuple[TensorSpec, int]] = {}
        for name, entry in header.items():
            try:
                dtype = _ST_TO_TORCH[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has a bad header entry {entry!r}"
                ) from None
            spec = TensorSpec(shape, dtype)
            if end - begin != spec.nbytes or data_start + end > size or begin < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} is truncated or has wrong offsets"
                )
            self.entries[name] = (spec, data_start + begin)

    def _extent(self, name: str, rows: tuple[int, int] | None) -> tuple[TensorSpec, tuple[int, ...], int, int]:
        """Tensor ``name`` (rows ``start:stop`` along dim 0 with ``rows``: contiguous bytes): its
        spec, the shape read, and the file offset and length of its bytes."""
        spec, offset = self.entries[name]
        if rows is None:
            return spec, spec.shape, offset, spec.nbytes
        row_bytes = spec.nbytes // max(spec.shape[0], 1)
        shape = (rows[1] - rows[0], *spec.shape[1:])
        return spec, shape, offset + rows[0] * row_bytes, shape[0] * row_bytes

    def read(self, name: str, buf: torch.Tensor | None = None,
             rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (only its rows ``start:stop`` along dim 0 with ``rows``: contiguous
        bytes), read into ``buf`` (a uint8 tensor of at least its size) if given."""
        spec, shape, offset, nbytes = self._extent(name, rows)
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        buf = buf[:nbytes]
        if nbytes:
            view = memoryview(buf.numpy())
            done = 0
            while done < nbytes:
                got = os.preadv(self.fd, [view[done:]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: unexpected end of file in {name!r}")
                done += got
        return buf.view(spec.dtype).reshape(shape)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Tensor ``name`` (rows ``start:stop`` with ``rows``) as a view of the file mapped into
        memory: no copy, the page cache's own pages (the merge reads them where the kernel holds
        them; they count as file-backed memory, which the kernel can drop). Must not be written
        (the mapping is private: a write would copy the page, never reach the file). None where
        the bytes are not aligned to the dtype."""
        spec, shape, offset, nbytes = self._extent(name, rows)
        if offset % spec.dtype.itemsize or nbytes == 0:
            return None
        mapped = self._mapped()
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped.madvise(mmap.MADV_WILLNEED, start, offset + nbytes - start)  # read ahead if not cached
        return torch.frombuffer(mapped, dtype=spec.dtype, count=nbytes // spec.dtype.itemsize,
                                offset=offset).view(shape)

    def _mapped(self) -> mmap.mmap:
        with self._map_lock:
            if self._map is None:
                self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
            return self._map

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive: the mapping goes with it
                pass
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Checkpoint:
    """A read-only checkpoint read tensor by tensor.

    ``path`` is a ``.safetensors`` file, a directory holding one or more ``.safetensors`` files
    (HF-style shards with ``model.safetensors.index.json``, or any set of files whose tensor
    names do not collide), or - only with ``allow_pickle=True`` - a pickled ``.bin``/``.pt``
    file or directory, loaded with ``torch.load(weights_only=True)``. Pickles can execute code
    when loaded without ``weights_only``; we never do that, and still refuse them by default.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self._files: list[_SafetensorsFile] = []
        self._where: dict[str, _SafetensorsFile] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        if not self.path.exists():
            raise CheckpointError(f"checkpoint {str(self.path)!r} does not exist")
        if self.path.is_file() and self.path.suffix not in (".safetensors", *_PICKLE_SUFFIXES):
            self._open_other_file()
            return
        st_files = self._safetensors_files()
        if st_files:
            for file in st_files:
                self._open(file)
        else:
            self._load_pickled(allow_pickle)

    def _open_other_file(self) -> None:
        """A file with another suffix: read it if it is safetensors, else say what we read."""
        try:
            self._index_map = None
            self._open(self.path)
        except CheckpointError:
            self.close()
            raise CheckpointError(
                f"{self.path}: not a checkpoint format we read (safetensors files or directories; "
                f"{'/'.join(_PICKLE_SUFFIXES)} pickles with allow_pickle)"
            ) from None

    # -- discovery --------------------------------------------------------------------------
    def _safetensors_files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path] if self.path.suffix == ".safetensors" else []
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index") from None
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.path / f).is_file():
                    raise CheckpointError(f"{index} names shard {f!r}, which is missing")
            self._index_map: dict[str, str] | None = weight_map
            return [self.path / f for f in files]
        self._index_map = None
        return sorted(self.path.glob("*.safetensors"))

    def _open(self, file: Path) -> None:
        handle = _SafetensorsFile(file)
        self._files.append(handle)
        for name in handle.entries:
            if name in self._where:
                raise CheckpointError(
                    f"tensor {name!r} is stored twice in {self.path} "
                    f"({self._where[name].path.name} and {file.name})"
                )
            self._where[name] = handle
        if getattr(self, "_index_map", None):
            missing = [n for n, f in self._index_map.items() if f == file.name and n not in handle.entries]
            if missing:
                raise CheckpointError(f"{file}: index lists tensor {missing[0]!r} but the shard lacks it")

    def _load_pickled(self, allow_pickle: bool) -> None:
        if self.path.is_file():
            files = [self.path]
        else:
            files = sorted(p for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if not files:
            raise CheckpointError(
                f"{self.path}: no weights found (.safetensors, or {'/'.join(_PICKLE_SUFFIXES)} with allow_pickle)"
            )
        if not allow_pickle:
            raise CheckpointError(
                f"{files[0]} is a pickled checkpoint, refused by default; convert it to safetensors, or "
                "allow it (merge --allow-pickle, allow_pickle: true, allow_pickle=True) to load it "
                "with torch.load(weights_only=True)"
            )
        self._pickled = {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for a bad/unsafe pickle
                raise CheckpointError(
                    f"{f}: refused by torch.load(weights_only=True): {_pickle_reason(exc)} (it holds more "
                    "than tensors; convert it to safetensors where it was made)"
                ) from None
            if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
                state = state["state_dict"]
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{f}: does not hold a state dict")
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    self._pickled[k] = v

    # -- access -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names, in storage order (shard by shard, offset by offset)."""
        if self._pickled is not None:
            return list(self._pickled)
        out: list[str] = []
        for f in self._files:
            out.extend(sorted(f.entries, key=lambda n: f.entries[n][1]))
        return out

    def __contains__(self, name: str) -> bool:
        return name in (self._pickled if self._pickled is not None else self._where)

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of tensor ``name`` without reading it."""
        if self._pickled is not None:
            t = self._pickled[name]
            return TensorSpec(tuple(t.shape), t.dtype)
        return self._where[name].entries[name][0]

    def load(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` from disk into a new CPU tensor (thread-safe)."""
        if name not in self:
            raise MergeError(f"tensor {name!r} is missing from {self.path}")
        if self._pickled is not None:
            return self._pickled[name].clone()
        return self._where[name].read(name)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Tensor ``name`` (rows ``start:stop``) as a read-only view of the mapped file, without
        reading it (:meth:`_SafetensorsFile.view`); None for pickled checkpoints."""
        if name not in self:
            raise MergeError(f"tensor {name!r} is missing from {self.path}")
        if self._pickled is not None:
            return None
        return self._where[name].view(name, rows)

    def read_rows_into(self, name: str, out: torch.Tensor, start: int, stop: int) -> None:
        """Read rows ``start:stop`` (dim 0) of tensor ``name`` into ``out`` (converting the dtype)."""
        if name not in self:
            raise MergeError(f"tensor {name!r} is missing from {self.path}")
        if self._pickled is not None:
            out.copy_(self._pickled[name][start:stop])
            return
        spec = self.spec(name)
        if out.dtype == spec.dtype and out.is_contiguous():
            self._where[name].read(name, out.view(-1).view(torch.uint8), rows=(start, stop))
        else:
            out.copy_(self._where[name].read(name, rows=(start, stop)))

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor ``name`` and copy it (converting the dtype) into ``out`` (thread-safe).

        The raw bytes go through a per-thread scratch buffer that is reused from call to call,
        so streaming a checkpoint does not allocate (and page-fault) fresh memory per tensor.
        """
        if name not in self:
            raise MergeError(f"tensor {name!r} is missing from {self.path}")
        if self._pickled is not None:
            out.copy_(self._pickled[name])
            return
        spec = self.spec(name)
        if out.dtype == spec.dtype and out.is_contiguous() and out.numel() == spec.numel:
            # no conversion: the bytes go straight into ``out`` (no scratch copy, no scratch memory)
            self._where[name].read(name, out.view(-1).view(torch.uint8))
            return
        nbytes = spec.nbytes
        scratch = getattr(_scratch, "buf", None)
        if scratch is None or scratch.numel() < nbytes:
            scratch = _scratch.buf = torch.empty(nbytes, dtype=torch.uint8)
        out.copy_(self._where[name].read(name, scratch))

    def close(self) -> None:
        """Close the file handles."""
        for f in self._files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"


def _pickle_reason(exc: BaseException) -> str:
    """torch.load's reason for refusing a pickle, in one line (its message has six)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):  # drop torch's advice to allow-list code
            return line.removeprefix("WeightsUnpickler error:").split(". Please")[0].strip()
    return lines[0] if lines else type(exc).__name__


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _OutputLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside the output ``NAME``.

    The lock file holds the owner's process id. It is removed on release; a holder that was
    killed leaves the file, but not the lock (the kernel drops it), so the next writer takes it.
    """

    def __init__(self, target: Path, shown: str) -> None:
        self.shown = shown  # the output as the user wrote it, for messages
        self.path = target.parent / f".{target.name}.lock"
        self.fd = -1
        self.owner = "?"

    def acquire(self) -> None:
        """Take the lock, or raise MergeError naming the output and the process holding it."""
        if not self.try_acquire():
            raise MergeError(
                f"output {self.shown!r} is being written by another process (pid {self.owner}, lock "
                f"{self.path.name}); wait for it to finish or choose another output"
            )

    def try_acquire(self) -> bool:
        """Take the lock if no live process holds it (then True); ``owner`` says who does."""
        if fcntl is None:  # pragma: no cover
            return True
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise MergeError(f"cannot create lock file {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    self.owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                finally:
                    os.close(fd)
                return False
            # A holder may have removed the file after we opened it: then lock the new one.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


#: Names of a writer's temporary directories: ``.OUT.partial-XXXXXXXX`` (mkdtemp's suffix) and
#: ``.OUT.old-XXXXXXXX`` (a replaced output on its way out).
_PARTIAL_NAME = re.compile(r"\.(?P<output>.+)\.(?P<kind>partial|old)-[A-Za-z0-9_]{8}")


def _remove_stale_partials(target: Path) -> None:
    """Remove the temporary directories that killed writers left beside ``target``.

    Call while holding ``target``'s lock. A directory is removed only if it has one of our names
    (:data:`_PARTIAL_NAME`), holds our marker file, and no live process holds the lock of the
    output it was for: ``target``'s is ours; another output's is tried, and skipped if held.
    ``target``'s previous output that a writer killed between its two renames left aside
    (``.NAME.old-*`` and no ``target``) is put back instead (:func:`_restore_replaced`).
    """
    stale: dict[str, list[Path]] = {}
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _PARTIAL_NAME.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and (entry / _PARTIAL_MARKER).is_file():
            stale.setdefault(match["output"], []).append(entry)
    for output, dirs in stale.items():
        lock = None if output == target.name else _OutputLock(target.parent / output, shown=output)
        if lock is not None and not lock.try_acquire():
            continue  # a live writer of that output
        try:
            for d in sorted(dirs, key=lambda d: _PARTIAL_NAME.fullmatch(d.name)["kind"] != "old"):
                if output != target.name or not _restore_replaced(d, target):
                    shutil.rmtree(d, ignore_errors=True)
        finally:
            if lock is not None:
                lock.release()


def _restore_replaced(old: Path, output: Path) -> bool:
    """Put back an output that a writer killed between its two renames (``OUT`` aside to
    ``.OUT.old-*``, the new one onto ``OUT``) had moved aside: the old output is kept rather than
    lost. True when restored."""
    if _PARTIAL_NAME.fullmatch(old.name)["kind"] != "old" or os.path.lexists(output):
        return False
    try:
        os.rename(old, output)
    except OSError:
        return False
    (output / _PARTIAL_MARKER).unlink(missing_ok=True)
    return True


def _is_weight_file(path: Path) -> bool:
    return path.name in _WEIGHT_INDEXES or path.suffix in _WEIGHT_SUFFIXES


class CheckpointWriter:
    """Write a known set of tensors as (sharded) safetensors into a temporary directory.

    ``specs`` maps every output tensor to its shape and dtype, in the order to store them. Shards
    hold at most ``max_shard_bytes`` of tensor data (one tensor larger than that gets a shard of
    its own). One shard is written as ``model.safetensors``; several as
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``, as Hugging Face
    does. Call :meth:`write` once per tensor (any order, any thread), then :meth:`commit`; on any
    error call :meth:`abort` (the context manager does), which deletes the temporary directory.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        specs: Mapping[str, TensorSpec],
        *,
        max_shard_bytes: int = 5 * 10**9,
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
        preallocate: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self._check_target()  # fail fast; checked again under the lock
        target = Path(os.path.abspath(self.out_dir))  # "out/", "./out" and "/abs/out" share one lock
        parent = target.parent
        if parent.exists() and not parent.is_dir():
            raise MergeError(f"cannot create output {str(self.out_dir)!r}: {str(self.out_dir.parent)!r} is not a directory")
        self._created = next((p for p in reversed([parent, *parent.parents]) if not p.exists()), None)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MergeError(f"cannot create {str(self.out_dir.parent)!r} for the output: {exc.strerror}") from None
        self._out_lock = _OutputLock(target, shown=str(self.out_dir))
        try:
            self._out_lock.acquire()
            _remove_stale_partials(target)  # may put back an output that a killed writer had moved aside
            self._check_target()  # another writer may have finished into it meanwhile
            self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
        except BaseException as exc:
            self._out_lock.release()
            self._remove_created_parents()
            if isinstance(exc, OSError):
                raise MergeError(f"cannot create a temporary directory in {str(parent)!r}: {exc.strerror}") from None
            raise
        self._lock = threading.Lock()
        self._pending = set(specs)
        self._rows_done: dict[str, int] = {}  # rows stored so far by write_rows
        self._specs = dict(specs)
        self._fds: list[int] = []
        self._slot: dict[str, tuple[int, int]] = {}
        self.weight_map: dict[str, str] = {}
        try:
            (self.tmp_dir / _PARTIAL_MARKER).write_text("polytask: partial merge output, removed when stale\n")
            self._layout(max_shard_bytes, dict(metadata or {"format": "pt"}), preallocate)
        except BaseException:
            self.abort()
            raise

    def _layout(self, max_shard_bytes: int, metadata: dict[str, str], preallocate: bool) -> None:
        shards: list[list[str]] = [[]]
        used = 0
        for name, spec in self._specs.items():
            if shards[-1] and used + spec.nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(name)
            used += spec.nbytes
        n = len(shards)
        self.shard_names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.total_size = 0
        for fname, names in zip(self.shard_names, shards):
            header: dict[str, object] = {"__metadata__": metadata}
            offset = 0
            for name in names:
                spec = self._specs[name]
                if spec.dtype not in _TORCH_TO_ST:
                    raise MergeError(f"tensor {name!r}: dtype {spec.dtype} cannot be stored")
                header[name] = {
                    "dtype": _TORCH_TO_ST[spec.dtype],
                    "shape": list(spec.shape),
                    "data_offsets": [offset, offset + spec.nbytes],
                }
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data, as safetensors does
            start = 8 + len(raw)
            path = self.tmp_dir / fname
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # minus the umask
            self._fds.append(fd)
            self._checked_write(fd, struct.pack("<Q", len(raw)) + raw, 0, path)
            if preallocate and offset:
                # Reserve the space now, so that a full disk fails before any compute.
                try:
                    os.posix_fallocate(fd, start, offset)
                except OSError as exc:
                    if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                        raise MergeError(
                            f"not enough disk space for {path.name} ({offset / 1e9:.2f} GB) "
                            f"in {self.tmp_dir.parent}"
                        ) from None
                    os.ftruncate(fd, start + offset)  # filesystem without fallocate
            else:
                os.ftruncate(fd, start + offset)
            for name in names:
                begin = header[name]["data_offsets"][0]  # type: ignore[index]
                self._slot[name] = (fd, start + begin)
                self.weight_map[name] = fname
            self.total_size += offset

    def _check_target(self) -> None:
        if self.out_dir.exists() and not self.overwrite:
            raise MergeError(f"output directory {str(self.out_dir)!r} already exists (pass --overwrite / overwrite=True to replace it)")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise MergeError(f"output path {str(self.out_dir)!r} exists and is not a directory")

    def _remove_created_parents(self) -> None:
        """Remove the (empty) parent directories that this writer created, if it failed."""
        if self._created is None:
            return
        parent = Path(os.path.abspath(self.out_dir)).parent
        for p in [parent, *parent.parents]:
            try:
                p.rmdir()
            except OSError:
                return
            if p == self._created:
                return

    @staticmethod
    def _checked_write(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(fd, view[done:], offset + done)
            except OSError as exc:
                raise MergeError(f"cannot write {path.name} in {path.parent}: {exc.strerror}") from None

    @property
    def specs(self) -> Mapping[str, TensorSpec]:
        """The planned output tensors: name -> shape and dtype."""
        return self._specs

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (already in its declared dtype and shape) under ``name``."""
        spec = self._specs.get(name)
        if spec is None:
            raise MergeError(f"tensor {name!r} was not planned for this output")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise MergeError(
                f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, planned "
                f"{spec.shape} {spec.dtype}"
            )
        fd, offset = self._slot[name]
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._checked_write(fd, memoryview(data), offset, self.tmp_dir / self.weight_map[name])
        with self._lock:
            self._pending.discard(name)

    def write_rows(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Store ``tensor`` as rows ``start:start + len(tensor)`` (dim 0) of ``name``; the tensor
        counts as written once all its rows are (any order, any thread)."""
        spec = self._specs.get(name)
        if spec is None:
            raise MergeError(f"tensor {name!r} was not planned for this output")
        stop = start + tensor.shape[0] if tensor.dim() else -1
        if (tensor.dim() != len(spec.shape) or tuple(tensor.shape[1:]) != spec.shape[1:] or tensor.dtype != spec.dtype
                or start < 0 or not 0 <= stop <= spec.shape[0]):
            raise MergeError(f"tensor {name!r}: got rows {start}:{stop} {tuple(tensor.shape)} {tensor.dtype}, "
                             f"planned {spec.shape} {spec.dtype}")
        fd, offset = self._slot[name]
        row_bytes = spec.nbytes // max(spec.shape[0], 1)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._checked_write(fd, memoryview(data), offset + start * row_bytes, self.tmp_dir / self.weight_map[name])
        with self._lock:
            done = self._rows_done.get(name, 0) + tensor.shape[0]
            self._rows_done[name] = done
            if done == spec.shape[0]:
                self._pending.discard(name)

    def copy_extras(self, source_dir: str | os.PathLike[str] | None, dtype: torch.dtype | None) -> None:
        """Copy config/tokenizer files (every small non-weight top-level file) from ``source_dir``.

        ``config.json``'s ``torch_dtype`` is set to the output dtype when given.
        """
        if source_dir is None:
            return
        src = Path(source_dir)
        if not src.is_dir():
            return
        for item in sorted(src.iterdir()):
            if not item.is_file() or item.name.startswith(".") or _is_weight_file(item):
                continue
            if item.stat().st_size > _MAX_EXTRA_FILE_BYTES:
                continue
            target = self.tmp_dir / item.name
            try:
                if item.name == "config.json" and dtype is not None:
                    config = json.loads(item.read_text())
                    if isinstance(config, dict):
                        name = str(dtype).removeprefix("torch.")
                        config["torch_dtype"] = name
                        if "dtype" in config:
                            config["dtype"] = name
                        target.write_text(json.dumps(config, indent=2) + "\n")
                        continue
                shutil.copyfile(item, target)
            except (OSError, json.JSONDecodeError) as exc:
                raise MergeError(f"cannot copy {item} into the output: {exc}") from None

    def add_file(self, name: str, text: str | None) -> None:
        """Write a small text file (e.g. the merge config) into the output; ``None`` removes a
        copied one (e.g. a base tokenizer file the merged tokenizer does not have)."""
        try:
            if text is None:
                (self.tmp_dir / name).unlink(missing_ok=True)
                return
            (self.tmp_dir / name).write_text(text)
        except OSError as exc:
            raise MergeError(f"cannot write {name} in {self.tmp_dir}: {exc.strerror}") from None

    def commit(self) -> Path:
        """Check completeness, write the index, flush, and move the directory into place."""
        if self._pending:
            missing = sorted(self._pending)
            raise MergeError(
                f"output incomplete: {len(missing)} tensors were never written (first: {missing[0]!r})"
            )
        if len(self.shard_names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            self.add_file("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        try:
            for fd in self._fds:
                os.fsync(fd)
        except OSError as exc:
            raise MergeError(f"cannot flush output in {self.tmp_dir}: {exc.strerror}") from None
        self._close()
        # mkdtemp made the directory 0700; files were created 0666 minus the umask already
        os.chmod(self.tmp_dir, 0o777 & ~_umask())
        # A kill from here on leaves at worst a marked old output (removed by the next writer) or
        # a complete output holding the hidden marker file; never a complete output unmarked
        # beside it, nor an old one that nobody removes.
        old: Path | None = None
        if self.out_dir.exists():
            target = Path(os.path.abspath(self.out_dir))
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            real_dir = self.out_dir.is_dir() and not self.out_dir.is_symlink()
            if real_dir:
                (self.out_dir / _PARTIAL_MARKER).touch()  # removable once renamed aside
            os.rename(self.out_dir, old)
        os.rename(self.tmp_dir, self.out_dir)
        (self.out_dir / _PARTIAL_MARKER).unlink(missing_ok=True)
        if old is not None:
            if real_dir:
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()  # a symlink (or file) renamed aside, not what it points to
        self._out_lock.release()
        return self.out_dir

    def _close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def abort(self) -> None:
        """Delete the temporary directory; the target directory is left untouched."""
        self._close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._out_lock.release()
        self._remove_created_parents()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_bytes: int | str = 5 * 10**9,
    overwrite: bool = False,
) -> Path:
    """Save a state dict as (sharded) safetensors with the same atomic writer as merges use."""
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}
    writer = CheckpointWriter(out_dir, specs, max_shard_bytes=parse_size(max_shard_bytes), overwrite=overwrite)
    with writer:
        for k, v in state.items():
            writer.write(k, v)
        return writer.commit()


def load_state_dict(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint (file, directory or shards) into memory."""
    with Checkpoint(path, allow_pickle=allow_pickle) as ckpt:
        return {name: ckpt.load(name) for name in ckpt.names()}

