"""When the small ``T x T`` solvers run as compiled CPU loops (numba) instead of torch operations.

At ``T = 16`` a solver step is a handful of microsecond-sized torch operations whose dispatch costs
more than their arithmetic (SDMGrad's inner solver: 20 steps of 8 operations). With numba
installed (``pip install 'polytask[fast]'``) and every tensor a float64 CPU tensor that records no
autograd, such a solver runs as one compiled loop (:mod:`polytask.balance._solvers_numba`);
otherwise, and always on an accelerator (where the torch path needs no host synchronisation and
replays as a CUDA graph), the torch path runs unchanged. Both paths take the same steps; they
agree to rounding (``tests/test_balance_compiled.py``).

Compiled: SDMGrad's inner solver, PCD's step after its moving average, :func:`~polytask.balance.solvers.nonneg_qp`
(so MGDA, CR-MOGM over it, UPGrad, DualProj), :func:`~polytask.balance.solvers.min_norm_simplex`,
PCGrad's projections (:func:`~polytask.balance.aggregators.conflict.pcgrad_coefficients`; the random
orders still come from torch's generator, so both paths take the same orders), CAGrad's dual
(:func:`~polytask.balance.solvers.cagrad_dual`) and the alpha-fair Newton solver of Nash-MTL and
FairGrad (:func:`~polytask.balance.solvers.power_fair_weights`). At ``T = 16`` their ``weights``
calls go from ~300 torch operations each (FairGrad ~1060) to 10-55. TrimmedMean's ``b = 1`` block
(:func:`~polytask.balance.robust.trimmed_mean`) runs as two compiled passes over the rows, for float32
feature Jacobians too.
The first call of each kernel in a new environment compiles it (seconds); numba caches the machine
code next to the module (``cache=True``), so later processes load it.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["USE_COMPILED", "compiled_for"]

#: Use the compiled loops where they apply (set False, or ``POLYTASK_COMPILED=0`` before import, for the
#: torch path everywhere). Read at every call.
USE_COMPILED: bool = os.environ.get("POLYTASK_COMPILED", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _kernels() -> ModuleType | None:
    try:
        from polytask.balance import _solvers_numba
    except ImportError:  # numba is not installed: the torch path
        return None
    return _solvers_numba


def compiled_for(*tensors: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float64,)) -> ModuleType | None:
    """The compiled kernels if they take these tensors (of ``dtypes``: float64 for the solvers; on the
    CPU, recording no autograd), else None."""
    if not USE_COMPILED:
        return None
    for t in tensors:
        if t.dtype not in dtypes or t.device.type != "cpu" or t.requires_grad:
            return None
    return _kernels()
