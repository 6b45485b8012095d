"""Start a worker script as several gloo ranks on this machine and collect what each rank pickled.

A test helper shared by the distributed table tests: every rank is one process with ``RANK``,
``WORLD_SIZE``, ``STORE`` (a file rendezvous: no port to race other tests for) and
``OMP_NUM_THREADS=1``; the worker is called as ``script *args OUT`` and writes its result to OUT.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def run_ranks(script: Path, world: int, args: Sequence[str] = (), env: dict[str, str] | None = None,
              tag: str = "out", timeout: float = 180) -> list[Any]:
    """Run ``script`` on ``world`` ranks (beside it: the store ``store<world>`` and each rank's
    ``<tag><world>_<rank>.pkl``); every rank must exit 0 (else its stderr's tail fails the test).
    Returns the ranks' unpickled results in rank order."""
    store = script.parent / f"store{world}"
    store.unlink(missing_ok=True)
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world), STORE=str(store),
                        **(env or {}))
        out = script.parent / f"{tag}{world}_{rank}.pkl"
        procs.append((subprocess.Popen([sys.executable, str(script), *args, str(out)], env=rank_env,
                                       stderr=subprocess.PIPE, text=True), out))
    results = []
    for proc, out in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        results.append(pickle.loads(out.read_bytes()))
    return results
