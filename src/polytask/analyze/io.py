"""JSON files of the diagnostics: every matrix with its task names, NaN written as ``null``.

A run directory keeps them under ``analysis/`` (``conflict.json``, ``affinity.json``,
``grouping.json``, ``transfer.json``, ``experts.json``); heatmaps go to ``plots/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.errors import DataError

ANALYSIS_DIR = "analysis"


def to_jsonable(value: Any) -> Any:
    """Tensors to nested lists, NaN/inf to ``None``; dicts and lists recursively."""
    if isinstance(value, Tensor):
        return to_jsonable(value.detach().cpu().double().tolist())
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def from_jsonable(value: Any) -> Tensor:
    """A nested list (``None`` meaning NaN) back to a float64 tensor."""
    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return [fix(x) for x in v]
        return math.nan if v is None else v
    return torch.tensor(fix(value), dtype=torch.float64)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors allowed) atomically as indented JSON (the run directory's one
    atomic writer: umask kept, no partial file left on a full disk)."""
    from polytask.train.checkpoint import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(to_jsonable(payload), indent=1), error=DataError)


def read_json(path: Path, kind: str | None = None) -> dict[str, Any]:
    """Read a diagnostics file, checking its ``kind`` when given (DataError naming the file)."""
    try:
        payload = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if kind is not None and payload.get("kind") != kind:
        raise DataError(f"{path}: expected a {kind!r} diagnostics file, found kind {payload.get('kind')!r}")
    return payload


def analysis_path(run_dir: Path, name: str) -> Path:
    """``RUN_DIR/analysis/NAME.json``."""
    return Path(run_dir) / ANALYSIS_DIR / f"{name}.json"
