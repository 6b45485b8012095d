"""Compiled CPU loops (numba) for the small ``T x T`` solvers whose torch form is dispatch-bound.

Imported only through :func:`compiled`, when numba is installed (the ``fast`` extra); callers keep
their torch path otherwise and for tensors on an accelerator (no host round trip there). Every
kernel mirrors its torch twin operation for operation, in float64 numpy arrays that are views of
the torch tensors, so the two paths agree to rounding (``tests/test_balance_compiled.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _simplex_threshold(y: np.ndarray) -> float:
    """``max_j (sum_{k<=j} u_k - 1) / j`` with ``u`` = ``y`` sorted decreasing; NaN if any entry is NaN
    (as torch's ``topk`` + ``max``: NaN sorts first and propagates)."""
    u = np.sort(y)[::-1]  # np.sort puts NaN last: reversed, first
    total = 0.0
    theta = -np.inf
    for j in range(u.shape[0]):
        total += u[j]
        mean = (total - 1.0) / (j + 1)
        if mean > theta or mean != mean:
            theta = mean
            if mean != mean:
                break
    return theta


@njit(cache=True, nogil=True)
def sdmgrad_inner(matrix: np.ndarray, w0: np.ndarray, w_tilde: np.ndarray, lr: float, momentum: float,
                  lambda_: float, n_iter: int) -> np.ndarray:
    """:func:`polytask.balance.stateful_weightings.sdmgrad_inner`, the same steps in one compiled loop."""
    n = w0.shape[0]
    scale = 0.0
    for i in range(n):
        d = matrix[i, i]
        scale += np.sqrt(d if d > 0.0 or d != d else 0.0)
    scale /= n
    a = matrix / (scale * scale + 1e-8)
    pull = a @ (lambda_ * w_tilde)
    w = w0.copy()
    velocity = np.zeros(n)
    y = np.empty(n)
    for _ in range(n_iter):
        for i in range(n):
            acc = 0.0
            for k in range(n):
                acc += a[i, k] * w[k]
            velocity[i] = pull[i] + acc + momentum * velocity[i]
            y[i] = w[i] - lr * velocity[i]
        theta = _simplex_threshold(y)
        for i in range(n):
            v = y[i] - theta
            w[i] = 0.0 if v < 0.0 else v
    return w
