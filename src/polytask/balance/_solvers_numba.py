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


@njit(cache=True, nogil=True)
def _solve_in_place(mat: np.ndarray, rhs: np.ndarray) -> None:
    """``rhs <- mat^-1 rhs`` by Gaussian elimination with partial pivoting (as LAPACK's ``gesv``); ``mat``
    is overwritten. A zero pivot divides by zero (inf/NaN out), as ``torch.linalg.solve_ex`` leaves
    a singular system unreported."""
    n = mat.shape[0]
    for c in range(n):
        p = c
        for r in range(c + 1, n):
            if abs(mat[r, c]) > abs(mat[p, c]):
                p = r
        if p != c:
            for k in range(n):
                mat[c, k], mat[p, k] = mat[p, k], mat[c, k]
            rhs[c], rhs[p] = rhs[p], rhs[c]
        for r in range(c + 1, n):
            f = mat[r, c] / mat[c, c]
            if f != 0.0 or f != f:
                for k in range(c + 1, n):
                    mat[r, k] -= f * mat[c, k]
                rhs[r] -= f * rhs[c]
    for c in range(n - 1, -1, -1):
        acc = rhs[c]
        for k in range(c + 1, n):
            acc -= mat[c, k] * rhs[k]
        rhs[c] = acc / mat[c, c]


@njit(cache=True, nogil=True)
def nonneg_qp(quad: np.ndarray, lin: np.ndarray, iters: int) -> np.ndarray:
    """:func:`polytask.balance.solvers.nonneg_qp` for every row of ``lin`` (``(m, T)``), one row at a time
    (rows are independent there too), the reduced system solved on the free indices only."""
    m, n = lin.shape
    fast = min(iters, 10)
    out = np.empty((m, n))
    x = np.empty(n)
    free = np.empty(n, dtype=np.bool_)
    violated = np.empty(n, dtype=np.bool_)
    idx = np.empty(n, dtype=np.int64)
    for row in range(m):
        q = lin[row]
        for i in range(n):
            free[i] = q[i] < 0.0  # the first active-set step from x = 0
        for k in range(iters):
            f = 0
            for i in range(n):
                if free[i]:
                    idx[f] = i
                    f += 1
            sub = np.empty((f, f))
            rhs = np.empty(f)
            for a in range(f):
                rhs[a] = -q[idx[a]]
                for b in range(f):
                    sub[a, b] = quad[idx[a], idx[b]]
            _solve_in_place(sub, rhs)
            x[:] = 0.0
            for a in range(f):
                x[idx[a]] = rhs[a]
            any_violated = False
            for j in range(n):
                mult = 0.0
                for i in range(n):
                    mult += x[i] * quad[i, j]
                mult += q[j]  # (x Q) + q, in the torch path's order
                violated[j] = x[j] < 0.0 if free[j] else mult < 0.0
                any_violated = any_violated or violated[j]
            if not any_violated:
                break
            if k >= fast:  # Murty's least-index rule: switch only the first violated index
                first = True
                for j in range(n):
                    if violated[j] and not first:
                        violated[j] = False
                    elif violated[j]:
                        first = False
            for j in range(n):
                if violated[j]:
                    free[j] = not free[j]
        for i in range(n):
            v = x[i]
            out[row, i] = 0.0 if v < 0.0 else v
    return out


@njit(cache=True, nogil=True)
def _max_nan(values: np.ndarray) -> float:
    """``values.max()`` with NaN propagating, as torch's."""
    top = -np.inf
    for v in values:
        if v != v:
            return v
        top = max(top, v)
    return top


@njit(cache=True, nogil=True)
def pcd_step_weights(gramian: np.ndarray, scales: np.ndarray, taus: np.ndarray, reg: float, iters: int) -> np.ndarray:
    """The part of ``PCD.weights`` after the moving average (``T >= 2``): the normalised Gramian, the
    QP of :func:`polytask.balance.stateful_weightings.pcd_weights`, and the rescaling to ``||g_1||``."""
    n = gramian.shape[0]
    tiny = np.finfo(np.float64).tiny
    normalized = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            normalized[i, j] = gramian[i, j] * (scales[i] * scales[j])
    diag = np.empty(n)
    for i in range(n):
        diag[i] = normalized[i, i]
    gs = normalized[1:, 1:].copy()
    b = np.empty(n - 1)
    for j in range(n - 1):
        b[j] = taus[j] * gs[j, j] - normalized[j + 1, 0]
    top = _max_nan(diag)
    top = top if top != top or top > tiny else tiny
    quad = gs.copy()
    for j in range(n - 1):
        quad[j, j] += reg * top
    lin = np.empty((1, n - 1))
    lin[0] = -b
    mu = nonneg_qp(quad, lin, iters)[0]
    residual = b - gs @ mu
    feasible = _max_nan(residual) <= 1e-6 * top
    w = np.zeros(n)
    w[0] = 1.0
    if feasible:
        w[1:] = mu
    direction_sq_norm = w @ (normalized @ w)
    magnitude = 0.0
    for i in range(n):
        d = diag[i]
        magnitude += abs(w[i]) * np.sqrt(d if d > 0.0 or d != d else 0.0)
    magnitude = magnitude * magnitude
    precision = 10.0 * np.finfo(np.float64).eps
    keep = gramian[0, 0] > 0.0 and direction_sq_norm > precision * magnitude
    if not keep:
        return np.zeros(n)
    rescale = np.sqrt(gramian[0, 0] / (direction_sq_norm if direction_sq_norm > tiny else tiny))
    return w * scales * rescale


@njit(cache=True, nogil=True)
def min_norm_simplex(gramian: np.ndarray, reg: float, iters: int) -> np.ndarray:
    """:func:`polytask.balance.solvers.min_norm_simplex`: ``nonneg_qp(G / tr(G) + reg I, -1)``, normalised."""
    n = gramian.shape[0]
    tiny = np.finfo(np.float64).tiny
    trace = 0.0
    for i in range(n):
        trace += gramian[i, i]
    trace = trace if trace != trace or trace > tiny else tiny
    quad = gramian / trace
    for i in range(n):
        quad[i, i] += reg
    lin = -np.ones((1, n))
    lam = nonneg_qp(quad, lin, iters)[0]
    total = lam.sum()
    return lam / (total if total != total or total > tiny else tiny)
