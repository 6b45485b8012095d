"""Run directories: claim one for a command, lock it, start over atomically, resume safely.

``polytask train`` and ``polytask analyze CONFIG`` (and :meth:`Trainer.fit`) go through
:func:`claim_run_dir`, which

- refuses a path that is a file or not writable, in one line;
- takes an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` for the whole command (the OS releases it
  when the process ends, even on ``kill -9``); a second command on the same run directory gets a
  one-line error;
- refuses a directory that already holds a run (a checkpoint) unless ``--resume`` or
  ``--overwrite``;
- starts over atomically: the previous run is renamed whole to the hidden sibling
  ``.NAME.previous`` and deleted only once the new run has written its first checkpoint. If the new
  run fails before that, the previous run is put back; if it is killed, the next command on that
  run directory puts it back (or deletes it, when the new run had reached its checkpoint). A
  directory never mixes two runs;
- on ``--resume``, compares the stored ``config.yaml`` with the new config: changes that alter the
  run's meaning are refused, every changed key named in one line; the safe ones
  (:data:`SAFE_ON_RESUME`) are applied and said;
- removes the partial files that a killed write of ours left (names ending in
  :data:`polytask.train.checkpoint.PARTIAL`), never anything else;
- leaves no new folder after a start that failed before its first epoch (a config refused while
  the Trainer is built, data refused at epoch 0): the run directory and the parent folders that the
  claim created are removed; a run that recorded an epoch is kept as it stopped.

``metrics.jsonl`` is appended one whole record per ``write`` (``O_APPEND``, fsync) and read with a
torn last line treated as absent (:func:`append_jsonl`, :func:`read_jsonl`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from polytask.errors import CheckpointError, ConfigError, DataError
from polytask.train.checkpoint import PARTIAL, dir_mode, write_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; run directories are not locked
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("polytask")

LOCK_NAME = ".lock"
#: what a polytask run directory may hold (train, analyze, report); anything else means the folder
#: is not ours and is never moved or deleted
RUN_ENTRIES = frozenset({"config.yaml", "metrics.jsonl", "best", "checkpoints", "summary.md", "plots", "analysis",
                         "runs", "report.html", "done.json", "vocab.json", LOCK_NAME})
#: environment variable through which a process holding run-directory locks tells its child
#: processes (e.g. the workers of a multi-process run) that the lock is already held for them
HELD_ENV = "POLYTASK_HELD_RUN_DIRS"

#: config keys that ``--resume`` may change, and why that keeps the run's meaning; every other key
#: (learning rate, seed, data, model, balancer, batch size, ...) is refused
SAFE_ON_RESUME: dict[str, str] = {
    "train.epochs": "more epochs continue the same run (not fewer; not with scheduler.name=cosine, whose "
                    "length it sets)",
    "device": "where the run computes, not what",
    "train.eval_batch_size": "evaluation batch size: metrics are computed over the whole split either way",
    "name": "the run's label; the run directory is the one being resumed",
    "out_dir": "where the run directory is; the run directory is the one being resumed",
}

Mode = Literal["new", "overwrite", "resume", "use"]


def mode_of(resume: bool, overwrite: bool) -> Mode:
    """The claim mode of the ``--resume`` / ``--overwrite`` flags."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run or start it over")
    return "resume" if resume else "overwrite" if overwrite else "new"


def is_primary() -> bool:
    """True unless this process is a non-zero rank of a multi-process run (only rank 0 manages
    the run directory)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("RANK", "0") in ("", "0")


# ----------------------------------------------------------------------------- metrics.jsonl
def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to a JSON-lines file in one ``write`` (``O_APPEND``), then fsync. A failed
    write (disk full) is cut back to the file's previous end and raised as one line."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise (write_error(path, exc) or exc) from None
    try:
        start = os.fstat(fd).st_size
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # a torn last line is read as absent
            raise (write_error(path, exc) or exc) from None
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn last line (no newline, or not JSON) is absent.
    DataError naming the file and line for a bad line before the last."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    lines = text.split("\n")
    complete, last = lines[:-1], lines[-1]  # ``last`` is "" when the file ends with a newline
    rows = []
    for i, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(complete) and not last:
                break  # the last line is torn
            raise DataError(f"{path}: line {i} is not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {i} is not a JSON object")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- partial files
def clean_partials(run_dir: Path) -> list[Path]:
    """Remove what our killed writes left in ``run_dir`` (names ``.*`` ending in ``.partial``, and
    the ``.tmp-*`` checkpoint folders of older versions); nothing else. Returns what was removed."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "best", run_dir / "plots", run_dir / "analysis"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            ours = entry.name.startswith(".") and entry.name.endswith(PARTIAL)
            ours |= folder.name == "checkpoints" and entry.name.startswith(".tmp-") and entry.is_dir()
            if ours:
                _remove(entry)
                removed.append(entry)
    return removed


def remove_stale_builds(target: Path) -> list[Path]:
    """Remove what killed commands building ``target`` under a temporary sibling name left: folders
    ``.NAME.<pid>.partial`` (``polytask prune`` builds its run directory so) whose process is gone and
    whose lock no one holds, and files ``.NAME.<pid>.XXXXXXXX.partial``
    (:func:`~polytask.train.checkpoint.atomic_write`'s) whose process is gone. Returns what was removed."""
    target = Path(target)
    removed = []
    prefix = f".{target.name}."
    for entry in target.parent.iterdir() if target.parent.is_dir() else ():
        if not entry.name.startswith(prefix) or not entry.name.endswith(PARTIAL):
            continue
        middle = entry.name[len(prefix):-len(PARTIAL)]  # not a glob: the name may hold [ or *
        pid, dot, rand = middle.partition(".")
        if dot:  # a file of atomic_write: mkstemp's 8 characters after the pid
            ours = len(rand) == 8 and rand.replace("_", "").isalnum() and entry.is_file() and not entry.is_symlink()
        else:
            ours = entry.is_dir() and not _locked(entry)
        if not ours or not pid.isdigit() or _alive(int(pid)):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _locked(run_dir: Path) -> bool:
    """Whether a process holds ``RUN_DIR/.lock``."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR)
    except OSError:
        return False
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- resume check
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):  # an empty mapping adds no key: {} and an absent section are alike
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else value if isinstance(value, str) else json.dumps(value)


_UNSET = object()


def config_changes(stored: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Differences between two config dumps as ``key old -> new``: (refused, safe) per
    :data:`SAFE_ON_RESUME`."""
    a, b = _flatten(stored), _flatten(new)
    refused, safe = [], []
    for key in [*a, *(k for k in b if k not in a)]:
        old, cur = a.get(key, _UNSET), b.get(key, _UNSET)
        if old == cur:
            continue
        text = f"{key} {_show(old)} -> {_show(cur)}"
        ok = key in SAFE_ON_RESUME
        if key == "train.epochs":
            cosine = b.get("scheduler.name") == "cosine" or a.get("scheduler.name") == "cosine"
            ok = isinstance(old, int) and isinstance(cur, int) and cur > old and not cosine
        (safe if ok else refused).append(text)
    return refused, safe


def check_resume_config(run_dir: Path, config: Any) -> list[str]:
    """Compare ``RUN_DIR/config.yaml`` with ``config`` before a resume. ConfigError naming every
    changed key that alters the run (the stored file is left as it is); returns the safe changes."""
    import yaml

    from polytask.train.config import parse_config

    path = run_dir / "config.yaml"
    try:
        stored_raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"--resume: cannot read the run's {path} ({exc.strerror}) to check the settings; "
                              "start over with --overwrite") from None
    except yaml.YAMLError:
        raise CheckpointError(f"--resume: the run's {path} is not valid YAML; start over with --overwrite") from None
    if not isinstance(stored_raw, dict):
        raise CheckpointError(f"--resume: the run's {path} is not a config mapping; start over with --overwrite")
    stored = parse_config(stored_raw, str(path)).model_dump(mode="json")
    refused, safe = config_changes(stored, config.model_dump(mode="json"))
    if refused:
        raise ConfigError(f"--resume: config changed: {', '.join(refused)}; start over with --overwrite "
                          "(or undo the change)")
    return safe


# ----------------------------------------------------------------------------- claim
@dataclass
class RunClaim:
    """A run directory held by this process: its lock and the previous run moved aside."""

    run_dir: Path
    mode: Mode
    fd: int | None = None
    aside: Path | None = None
    notes: list[str] = field(default_factory=list)
    depth: int = 1
    #: the topmost folder this claim created (the run directory or an ancestor), None if it existed
    created: Path | None = None

    def checkpoint_written(self) -> None:
        """The new run has a checkpoint: the previous run moved aside is deleted."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None


_HELD: dict[str, RunClaim] = {}


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def _held_by_parent(key: str) -> bool:
    return key in os.environ.get(HELD_ENV, "").split(os.pathsep)


def _set_env(key: str, held: bool) -> None:
    keys = [k for k in os.environ.get(HELD_ENV, "").split(os.pathsep) if k and k != key]
    if held:
        keys.append(key)
    if keys:
        os.environ[HELD_ENV] = os.pathsep.join(keys)
    else:
        os.environ.pop(HELD_ENV, None)


def aside_path(run_dir: Path) -> Path:
    """Where ``--overwrite`` keeps the previous run until the new one has a checkpoint."""
    return run_dir.parent / f".{run_dir.name}.previous"


def _discard_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.discarded{PARTIAL}"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that can be resumed (``checkpoints/latest.json``)."""
    return (run_dir / "checkpoints" / "latest.json").is_file()


def _lock(run_dir: Path) -> int:
    """Open and flock ``RUN_DIR/.lock`` (exclusive, non-blocking); one-line errors."""
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise ConfigError(f"run directory {run_dir} is not writable: cannot create {path.name} "
                          f"({exc.strerror})") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        owner = ""
        try:
            owner = os.pread(fd, 32, 0).decode().strip()
        except (OSError, UnicodeDecodeError):
            pass
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f" (pid {owner})" if owner.isdigit() else ""
            raise ConfigError(f"run directory {run_dir} is in use by another polytask command{who}; wait for it "
                              "to finish or choose another out_dir") from None
        raise ConfigError(f"run directory {run_dir}: cannot lock {path.name} ({exc.strerror})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the pid is only for the message of a second command
    return fd


def _prepare(run_dir: Path, mode: Mode) -> Path | None:
    """Path checks before anything is created: a file, a resume without a checkpoint. Creates the
    run directory; returns the topmost folder it created (None when the run directory existed)."""
    for p in (run_dir, *run_dir.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"run directory {run_dir}: {p} is a file, not a folder (see out_dir)")
        if p.exists():
            break
    if mode == "resume" and not has_checkpoint(run_dir) and not aside_path(run_dir).is_dir():
        raise CheckpointError(f"no checkpoint to resume from: {run_dir / 'checkpoints' / 'latest.json'} "
                              "does not exist")
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=dir_mode() | 0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
    created = missing[-1] if missing else None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        why = os.strerror(errno.EROFS if os.statvfs(run_dir).f_flag & os.ST_RDONLY else errno.EACCES)
        if created is not None:
            _remove_empty(run_dir, created)
        raise ConfigError(f"run directory {run_dir} is not writable ({why})")
    return created


def _recover(claim: RunClaim) -> None:
    """Finish what a killed start-over left: put the previous run back, or delete it when the new
    run had reached its checkpoint; remove our partial files."""
    run_dir, aside, discard = claim.run_dir, aside_path(claim.run_dir), _discard_path(claim.run_dir)
    if aside.is_dir():
        if has_checkpoint(run_dir):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            claim.aside = aside
            _restore(claim)
            claim.created = None  # the run directory is the previous run now, never removed as new
            log.warning("polytask: restored the previous run in %s (a start-over had stopped before its "
                        "first checkpoint)", run_dir)
    if discard.exists():
        shutil.rmtree(discard, ignore_errors=True)
    clean_partials(run_dir)


def _restore(claim: RunClaim) -> None:
    """Put the run moved aside back in place of the (checkpoint-less) new one, keeping the lock."""
    run_dir, aside = claim.run_dir, claim.aside
    assert aside is not None
    discard = _discard_path(run_dir)
    if discard.exists():
        shutil.rmtree(discard, ignore_errors=True)
    os.rename(run_dir, discard)  # our lock moves with it: no other command can enter meanwhile...
    os.rename(aside, run_dir)
    claim.aside = None
    old_fd, claim.fd = claim.fd, None
    try:
        claim.fd = _lock(run_dir)  # ...except in this instant, in which case it gets the restored run
    finally:
        if old_fd is not None:
            os.close(old_fd)
        shutil.rmtree(discard, ignore_errors=True)


def _move_aside(claim: RunClaim) -> None:
    """Rename the run directory whole to ``.NAME.previous`` and lock a fresh, empty one. A folder
    without files of a run is used as it is; one that mixes a run with other files is refused (the
    other files are never moved or deleted)."""
    run_dir = claim.run_dir
    entries = [e.name for e in run_dir.iterdir() if e.name != LOCK_NAME]
    ours = [e for e in entries if e in RUN_ENTRIES or e.endswith(PARTIAL)]
    if not ours:
        return
    foreign = sorted(e for e in entries if e not in ours)
    if foreign:
        raise ConfigError(f"run directory {run_dir} holds a run and files that are not a polytask run's "
                          f"({', '.join(map(repr, foreign[:3]))}); move them, or choose another out_dir")
    aside = aside_path(run_dir)
    try:
        os.rename(run_dir, aside)
        os.mkdir(run_dir, dir_mode() | 0o700)
    except OSError as exc:
        user = write_error(aside, exc)
        raise (ConfigError(str(user)) if user else exc) from None
    claim.aside = aside
    old_fd, claim.fd = claim.fd, None
    try:
        claim.fd = _lock(run_dir)
    finally:
        if old_fd is not None:
            os.close(old_fd)


def _started(run_dir: Path) -> bool:
    """Whether a run directory holds anything of a run that started: a checkpoint, an epoch's
    metrics, or any file besides those a start writes before its first epoch (the config, the
    vocabularies, an empty metrics.jsonl)."""
    if has_checkpoint(run_dir):
        return True
    entries = {e.name for e in run_dir.iterdir()} - {LOCK_NAME}
    if entries - {"config.yaml", "metrics.jsonl", "vocab.json"}:
        return True
    try:
        return bool(read_jsonl(run_dir / "metrics.jsonl"))
    except DataError:
        return True


def _remove_created(run_dir: Path, created: Path) -> None:
    """Remove a run directory that a failed start created, and the folders above it up to
    ``created`` while they are empty. The lock file goes last; the caller still holds its flock."""
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            _remove(entry)
    (run_dir / LOCK_NAME).unlink(missing_ok=True)
    _remove_empty(run_dir, created)


def _remove_empty(run_dir: Path, created: Path) -> None:
    """Remove ``run_dir`` and the folders above it up to ``created``, while they are empty."""
    for folder in (run_dir, *run_dir.parents):
        try:
            folder.rmdir()  # only while empty: a folder another command has just entered stays
        except OSError:
            return
        if folder == created:
            return


def _release(claim: RunClaim, failed: bool = False) -> None:
    claim.depth -= 1
    if claim.depth > 0:
        return
    try:
        if claim.aside is not None:
            if has_checkpoint(claim.run_dir):
                claim.checkpoint_written()
            else:  # the new run ended (failed) before its first checkpoint: the previous run is kept
                _restore(claim)
                log.warning("polytask: the previous run in %s is kept (the new run stopped before its first "
                            "checkpoint)", claim.run_dir)
        # a start that failed before its first epoch (a refused config, data that does not load)
        # leaves no new folder behind; nor does a command that wrote nothing in the folder it made
        if claim.created is not None and claim.run_dir.is_dir() and not _started(claim.run_dir):
            if failed or not any(e.name != LOCK_NAME for e in claim.run_dir.iterdir()):
                _remove_created(claim.run_dir, claim.created)
    finally:
        if claim.fd is not None:
            os.close(claim.fd)  # releases the flock
            claim.fd = None
        key = _key(claim.run_dir)
        _HELD.pop(key, None)
        _set_env(key, False)


@contextmanager
def claim_run_dir(run_dir: Path, config: Any = None, mode: Mode = "new", advice: str = "",
                  primary: bool = True) -> Iterator[RunClaim]:
    """Hold ``run_dir`` for one command (see the module docstring).

    ``mode``: ``new`` (refuse a directory holding a run), ``overwrite`` (start over atomically),
    ``resume`` (continue; ``config`` checked against the stored one), ``use`` (an existing run
    directory, e.g. analysed: only locked). ``advice`` replaces the default hint of the refusal.
    A nested claim of the same directory in the same process (or in a child of the process that
    holds it) is the outer one. Not ``primary`` (a non-zero rank): nothing is done.
    """
    run_dir = Path(run_dir)
    key = _key(run_dir)
    if not primary or (key not in _HELD and _held_by_parent(key)):
        yield RunClaim(run_dir, mode, depth=0)
        return
    if key in _HELD:
        claim = _HELD[key]
        claim.depth += 1
        try:
            yield claim
        finally:
            _release(claim)
        return
    created = _prepare(run_dir, mode)
    try:
        claim = RunClaim(run_dir, mode, fd=_lock(run_dir), created=created)
    except BaseException:
        if created is not None:  # empty folders only: another command may have entered meanwhile
            _remove_empty(run_dir, created)
        raise
    _HELD[key] = claim
    _set_env(key, True)
    failed = False
    try:
        _recover(claim)
        if mode == "resume":
            if not has_checkpoint(run_dir):
                raise CheckpointError(f"no checkpoint to resume from: {run_dir / 'checkpoints' / 'latest.json'} "
                                      "does not exist")
            if config is not None:
                safe = check_resume_config(run_dir, config)
                if safe:
                    claim.notes.append(f"--resume: applied {', '.join(safe)}")
        elif mode in ("new", "overwrite"):
            if mode == "new" and has_checkpoint(run_dir):
                raise ConfigError(f"run directory {run_dir} already holds a run: "
                                  + (advice or "pass --resume to continue it or --overwrite to start over "
                                     "(the previous run is kept until the new one has its first checkpoint)"))
            _move_aside(claim)
        for note in claim.notes:
            log.warning("polytask: %s", note)
        yield claim
    except BaseException:
        failed = True
        raise
    finally:
        _release(claim, failed)


def checkpoint_written(run_dir: Path) -> None:
    """Tell the claim of ``run_dir`` that a checkpoint now exists: the previous run moved aside
    goes, whether this process holds the claim or its parent does (a worker of ``--nproc``)."""
    key = _key(run_dir)
    claim = _HELD.get(key)
    if claim is not None:
        claim.checkpoint_written()
    elif _held_by_parent(key) and has_checkpoint(Path(run_dir)):
        shutil.rmtree(aside_path(Path(run_dir)), ignore_errors=True)
