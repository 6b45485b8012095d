"""Atomic checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a directory ``checkpoints/epoch-NNNN`` written under a temporary name and renamed
into place only when complete; ``checkpoints/latest.json`` (replaced atomically) points at the
newest complete one. A run killed at any moment therefore leaves the previous checkpoint intact.

Every file of a run directory is written by :func:`atomic_write` (temporary file in the same
folder, fsync, rename): the temporary names end in :data:`PARTIAL`, so a partial left by a killed
process is recognisable and removed by the next run (:func:`polytask.train.rundir.clean_partials`);
files and folders get the process umask (``0o666 & ~umask``), as a plain ``open`` would give them;
a full or read-only disk is one :class:`CheckpointError` naming the file, with the temporary file
removed and the previous version of the file intact.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
import torch
from torch import Tensor

from polytask.errors import CheckpointError, PolytaskError

#: suffix of every temporary file or folder written on the way to an atomic rename
PARTIAL = ".partial"
#: errors of the disk rather than of the program: reported in one line naming the file
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                         errno.ENOENT, errno.ENOTDIR, errno.EISDIR})
_UMASK_LOCK = threading.Lock()

_TENSOR = "__tensor__"


def split_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """Split a nested state (dicts/lists/tuples/scalars/tensors) into a JSON-able skeleton and a
    flat ``{key: tensor}`` dict; :func:`join_state` reverses it."""
    tensors: dict[str, Tensor] = {}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, Tensor):
            tensors[key] = node.detach().cpu().contiguous()
            return {_TENSOR: key}
        if isinstance(node, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, (list, tuple)):
            return {"__list__" if isinstance(node, list) else "__tuple__": [walk(v, f"{key}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, float) and (node != node or node in (float("inf"), float("-inf"))):
            return {"__float__": repr(node)}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot checkpoint a value of type {type(node).__name__} at {key!r}")

    return walk(state, prefix or "s"), tensors


def join_state(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Rebuild a state from :func:`split_state`'s output."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if "__dict__" in skeleton:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [join_state(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(join_state(v, tensors) for v in skeleton["__tuple__"])
        if "__float__" in skeleton:
            return float(skeleton["__float__"])
    return skeleton


def process_umask() -> int:
    """The process umask (read by setting it and putting it back, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode a file created with ``open`` gets: ``0o666`` less the umask."""
    return 0o666 & ~process_umask()


def dir_mode() -> int:
    """Mode a folder created with ``mkdir`` gets: ``0o777`` less the umask."""
    return 0o777 & ~process_umask()


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, SafetensorError):  # the Rust writer reports I/O errors as text: "... (os error 28)"
        found = re.search(r"os error (\d+)", str(exc))
        return int(found.group(1)) if found else None
    return None


def write_error(path: Path, exc: BaseException, kept: str = "",
                error: type[PolytaskError] = CheckpointError) -> PolytaskError | None:
    """The one-line user error for a failed write of ``path`` (None when ``exc`` is not a disk error)."""
    code = _errno_of(exc)
    if code not in DISK_ERRORS:
        return None
    return error(f"cannot write {path}: {os.strerror(code)}{'; ' + kept if kept else ''}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - a regular file either writes or raises
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def _fill_bytes(data: bytes) -> Callable[[str], None]:
    def fill(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            _write_fd(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    return fill


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, fill: Callable[[str], None], kept: str = "",
                 error: type[PolytaskError] = CheckpointError) -> Path:
    """Write ``path`` atomically: ``fill(tmp)`` writes the content into a temporary file of the
    same folder (named ``.NAME.<pid>.XXXXXXXX.partial``, mode ``0o666 & ~umask``; the process id
    lets :func:`polytask.train.rundir.remove_stale_builds` tell a killed write's file from a live
    one's), which is then renamed onto
    ``path``. On a disk error (full, read-only, no permission, missing folder) the temporary file is
    removed, ``path`` keeps its previous content and ``error`` is raised naming ``path`` (``kept``
    appended, e.g. which checkpoint is still there)."""
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=PARTIAL)
        try:
            os.fchmod(fd, file_mode())
        finally:
            os.close(fd)
        fill(tmp)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as exc:
        user = write_error(path, exc, kept, error)
        if user is None:
            raise
        raise user from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes, kept: str = "",
                       error: type[PolytaskError] = CheckpointError) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, _fill_bytes(data), kept, error)


def atomic_write_text(path: Path, text: str, kept: str = "", error: type[PolytaskError] = CheckpointError) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, _fill_bytes(text.encode("utf-8")), kept, error)


def _save_tensors(tensors: dict[str, Tensor], path: str | Path) -> None:
    save_file(tensors, str(path))
    os.chmod(path, file_mode())  # the safetensors writer creates its file 0600 whatever the umask
    _fsync_file(path)


def save_model_file(state: dict[str, Tensor], path: Path) -> None:
    """Save a model state dict to ``path`` (safetensors) atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: _save_tensors(tensors, tmp))


def kept_checkpoint(root: Path) -> str:
    """What a failed write leaves to resume from: ``the checkpoint of epoch N in ROOT is kept`` or
    ``no checkpoint has been written yet``."""
    try:
        epoch = int(json.loads((Path(root) / "latest.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"no checkpoint has been written yet in {root}"
    return f"the checkpoint of epoch {epoch} in {root} is kept"


def save_checkpoint(root: Path, epoch: int, parts: dict[str, Any], keep: set[int] = frozenset()) -> Path:
    """Write ``parts`` (name -> nested state) as checkpoint ``epoch`` under ``root`` and point
    ``latest.json`` at it. Older checkpoints not in ``keep`` are removed afterwards. A full or
    read-only disk raises CheckpointError naming the file; the previous checkpoint stays valid."""
    kept = kept_checkpoint(root)
    final = root / f"epoch-{epoch:04d}"
    tmp: Path | None = None
    where = root
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-", suffix=PARTIAL))
        os.chmod(tmp, dir_mode())
        for name, state in parts.items():
            skeleton, tensors = split_state(state, name)
            where = final / f"{name}.safetensors"
            _save_tensors(tensors, tmp / f"{name}.safetensors")
            where = final / f"{name}.json"
            _fill_bytes(json.dumps(skeleton).encode())(_create(tmp / f"{name}.json"))
        where = final
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        tmp = None
    except (OSError, SafetensorError) as exc:
        user = write_error(where, exc, kept)
        if user is None:
            raise
        raise user from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(root / "latest.json", json.dumps({"epoch": epoch, "dir": final.name}), kept)
    for old in root.glob("epoch-*"):
        num = int(old.name.split("-")[1])
        if num != epoch and num not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _create(path: Path) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.close(fd)
    return str(path)


def load_checkpoint(root: Path) -> tuple[int, dict[str, Any]]:
    """Load the checkpoint ``latest.json`` points at; CheckpointError naming the bad file."""
    pointer = root / "latest.json"
    if not pointer.exists():
        raise CheckpointError(f"no checkpoint to resume from: {pointer} does not exist")
    try:
        info = json.loads(pointer.read_text())
        epoch, directory = int(info["epoch"]), root / info["dir"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"corrupt checkpoint pointer {pointer}") from None
    parts: dict[str, Any] = {}
    files = sorted(directory.glob("*.json"))
    if not files:
        raise CheckpointError(f"checkpoint directory {directory} is missing or empty")
    for js in files:
        st = js.with_suffix(".safetensors")
        try:
            skeleton = json.loads(js.read_text())
            tensors = load_file(str(st))
        except (OSError, ValueError, SafetensorError) as exc:
            bad = st if isinstance(exc, SafetensorError) or not st.exists() else js
            raise CheckpointError(f"corrupt or unreadable checkpoint file {bad}") from None
        try:
            parts[js.stem] = join_state(skeleton, tensors)
        except (KeyError, TypeError):
            raise CheckpointError(f"checkpoint file {js} does not match {st}") from None
    return epoch, parts


def load_model_file(path: Path) -> dict[str, Tensor]:
    """Load a safetensors state dict; CheckpointError naming the file if missing or corrupt."""
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        raise CheckpointError(f"corrupt checkpoint file {path}") from None




def load_finished_run(run_dir: Path, refuse: Callable[[Any], None] | None = None) -> tuple[Any, Any, Any]:
    """``(config, splits, model)`` of a finished run on in-memory data: the config it stored, its data
    loaded again (with its task selection), and the model with its best weights, in eval mode.
    ``refuse(config)`` runs before the data is loaded (a command's own checks). CheckpointError when
    ``run_dir`` is not a run directory or has no finished model."""
    from polytask import data as data_lib
    from polytask import nn as nn_lib
    from polytask.train.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: {run_dir / 'config.yaml'} does not exist")
    weights = run_dir / "best" / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"run directory {run_dir} has no finished model: {weights} does not exist")
    config = load_config(run_dir / "config.yaml")
    if refuse is not None:
        refuse(config)
    # seeded where the Trainer seeds: a backbone built from a config (model.arch: adapters) draws its
    # frozen weights from the global generator, and its adapters are checked against them by digest
    torch.manual_seed(config.seed)
    splits = data_lib.load(config.data.name, **config.data.params)
    if config.data.tasks is not None:
        splits = splits.select_tasks(config.data.tasks)
    model = nn_lib.build_model(config.model.arch, splits.input_spec, splits.tasks, **config.model.params)
    load_state_checked(model, load_model_file(weights), weights)
    model.eval()
    return config, splits, model


def describe_mismatch(expected: dict[str, Tensor], got: dict[str, Any], limit: int = 4) -> str:
    """How a state dict ``got`` differs from the ``expected`` one, naming the tensors (at most
    ``limit`` per kind); empty when they fit."""
    def names(keys: list[str]) -> str:
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)} in the file vs {tuple(v.shape)} in the model" for k, v in expected.items()
              if k in got and isinstance(got[k], Tensor) and tuple(got[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"missing tensor(s) {names(missing)}")
    if unexpected:
        parts.append(f"unexpected tensor(s) {names(unexpected)}")
    if shapes:
        parts.append(f"shape of {names(shapes)}")
    return "; ".join(parts)


def load_state_checked(module: Any, state: dict[str, Any], source: str | Path) -> None:
    """``module.load_state_dict(state)``, or a CheckpointError naming ``source`` and the tensors
    that do not fit (missing, unexpected, wrong shape) in one line."""
    problem = describe_mismatch(module.state_dict(), state)
    if problem:
        raise CheckpointError(f"{source} does not fit the model: {problem}")
    module.load_state_dict(state)
