"""Atomic checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a directory ``checkpoints/epoch-NNNN`` written under a temporary name and renamed
into place only when complete; ``checkpoints/latest.json`` (replaced atomically) points at the
newest complete one. A run killed at any moment therefore leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from polytask.errors import CheckpointError

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


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model_file(state: dict[str, Tensor], path: Path) -> None:
    """Save a model state dict to ``path`` (safetensors) atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(root: Path, epoch: int, parts: dict[str, Any], keep: set[int] = frozenset()) -> Path:
    """Write ``parts`` (name -> nested state) as checkpoint ``epoch`` under ``root`` and point
    ``latest.json`` at it. Older checkpoints not in ``keep`` are removed afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        for name, state in parts.items():
            skeleton, tensors = split_state(state, name)
            save_file(tensors, str(tmp / f"{name}.safetensors"))
            _write_json(tmp / f"{name}.json", skeleton)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest.json", json.dumps({"epoch": epoch, "dir": final.name}))
    for old in root.glob("epoch-*"):
        num = int(old.name.split("-")[1])
        if num != epoch and num not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


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


