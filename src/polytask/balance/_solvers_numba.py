"""Compiled CPU loops (numba) for the small ``T x T`` solvers whose torch form is dispatch-bound.

Imported only through :func:`compiled`, when numba is installed (the ``fast`` extra); callers keep
their torch path otherwise and for tensors on an accelerator (no host round trip there). Every
kernel mirrors its torch twin operation for operation, in float64 numpy arrays that are views of
the torch tensors, so the two paths agree to rounding (``tests/test_balance_compiled.py``).

Every kernel follows IEEE arithmetic as torch does (``error_model="numpy"``): a division by zero gives
inf or NaN, never an exception, so a singular system or a zero Gramian gives the torch path's values.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: compiled, cached on disk, without the GIL, with IEEE division (no ZeroDivisionError)
kernel = njit(cache=True, nogil=True, error_model="numpy")


@kernel
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


@kernel
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


@kernel
def _solve_in_place(mat: np.ndarray, rhs: np.ndarray) -> None:
    """``rhs <- mat^-1 rhs`` for the ``(n, k)`` right-hand sides ``rhs``, by Gaussian elimination with
    partial pivoting (as LAPACK's ``gesv``); ``mat`` is overwritten. A zero pivot divides by zero
    (inf/NaN out), as ``torch.linalg.solve_ex`` leaves a singular system unreported."""
    n, k_rhs = rhs.shape
    for c in range(n):
        p = c
        for r in range(c + 1, n):
            if abs(mat[r, c]) > abs(mat[p, c]):
                p = r
        if p != c:
            for k in range(n):
                mat[c, k], mat[p, k] = mat[p, k], mat[c, k]
            for k in range(k_rhs):
                rhs[c, k], rhs[p, k] = rhs[p, k], rhs[c, k]
        for r in range(c + 1, n):
            f = mat[r, c] / mat[c, c]
            if f != 0.0 or f != f:
                for k in range(c + 1, n):
                    mat[r, k] -= f * mat[c, k]
                for k in range(k_rhs):
                    rhs[r, k] -= f * rhs[c, k]
    for c in range(n - 1, -1, -1):
        for k in range(k_rhs):
            acc = rhs[c, k]
            for e in range(c + 1, n):
                acc -= mat[c, e] * rhs[e, k]
            rhs[c, k] = acc / mat[c, c]


@kernel
def _gather_free(free: np.ndarray, idx: np.ndarray) -> int:
    """The free indices in ``idx[:f]``, increasing; returns ``f``."""
    f = 0
    for i in range(free.shape[0]):
        if free[i]:
            idx[f] = i
            f += 1
    return f


@kernel
def _switch(free: np.ndarray, violated: np.ndarray, least_index: bool) -> None:
    """An active-set correction: flip every violated index, or with ``least_index`` (Murty's rule)
    only the first one; ``violated`` is left as the set that was flipped."""
    if least_index:
        first = True
        for j in range(violated.shape[0]):
            if violated[j] and not first:
                violated[j] = False
            elif violated[j]:
                first = False
    for j in range(violated.shape[0]):
        if violated[j]:
            free[j] = not free[j]


@kernel
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
            f = _gather_free(free, idx)
            sub = np.empty((f, f))
            rhs = np.empty(f)
            for a in range(f):
                rhs[a] = -q[idx[a]]
                for b in range(f):
                    sub[a, b] = quad[idx[a], idx[b]]
            _solve_in_place(sub, rhs.reshape((f, 1)))
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
            _switch(free, violated, k >= fast)
        for i in range(n):
            v = x[i]
            out[row, i] = 0.0 if v < 0.0 else v
    return out


@kernel
def _max_nan(values: np.ndarray) -> float:
    """``values.max()`` with NaN propagating, as torch's."""
    top = -np.inf
    for v in values:
        if v != v:
            return v
        top = max(top, v)
    return top


@kernel
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


@kernel
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


@kernel
def pcgrad_coefficients(gramian: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """:func:`polytask.balance.aggregators.conflict.pcgrad_coefficients`: the same projections, task by
    task at each position of the orders (each task changes only its own row, so the torch path's
    parallel rows and these sequential ones take the same steps)."""
    n = gramian.shape[0]
    tiny = np.finfo(np.float64).tiny
    coef = np.eye(n)
    for k in range(orders.shape[1]):
        for i in range(n):
            j = orders[i, k]
            inner = 0.0
            for m in range(n):
                inner += coef[i, m] * gramian[j, m]
            d = gramian[j, j]
            sq_norm = np.inf if j == i else (d if d > tiny or d != d else tiny)
            push = -inner
            push = push if push > 0.0 or push != push else 0.0  # clamp_min(0), NaN kept
            coef[i, j] += push / sq_norm
    return coef


@kernel
def cagrad_dual(gramian: np.ndarray, c: float, iters: int, reg: float) -> tuple[np.ndarray, bool]:
    """:func:`polytask.balance.solvers.cagrad_dual`, the reduced system solved on the free indices only
    (two right-hand sides: ``1`` and ``b``)."""
    n = gramian.shape[0]
    tiny = np.finfo(np.float64).tiny
    fast = min(iters, 10)
    trace = 0.0
    for i in range(n):
        trace += gramian[i, i]
    scale = trace if trace > tiny or trace != trace else tiny
    g = gramian.copy()
    for i in range(n):
        g[i, i] += reg * scale
    b = np.empty(n)
    for i in range(n):
        acc = 0.0
        for k in range(n):
            acc += gramian[i, k]
        b[i] = acc / n
    mean_b = b.sum() / n
    s2 = (c * c) * (mean_b if mean_b > 0.0 or mean_b != mean_b else 0.0)
    free = np.ones(n, dtype=np.bool_)
    violated = np.zeros(n, dtype=np.bool_)
    idx = np.empty(n, dtype=np.int64)
    v = np.zeros(n)
    disc = 0.0
    for k in range(iters):
        f = _gather_free(free, idx)
        sub = np.empty((f, f))
        rhs = np.empty((f, 2))
        for a in range(f):
            rhs[a, 0] = 1.0
            rhs[a, 1] = b[idx[a]]
            for e in range(f):
                sub[a, e] = g[idx[a], idx[e]]
        _solve_in_place(sub, rhs)
        a2 = 0.0
        a1 = 0.0
        a0 = 0.0
        for a in range(f):
            a2 += rhs[a, 0]
            a1 += rhs[a, 1]
            a0 += b[idx[a]] * rhs[a, 1]
        disc = a1 * a1 - a2 * (a0 - s2)
        root = np.sqrt(disc if disc > 0.0 or disc != disc else 0.0)
        nu = (a1 + root) / a2
        v[:] = 0.0
        for a in range(f):
            v[idx[a]] = nu * rhs[a, 0] - rhs[a, 1]
        any_violated = False
        for j in range(n):
            mult = 0.0
            for i in range(n):
                mult += g[j, i] * v[i]
            mult = mult + b[j] - nu
            violated[j] = v[j] < 0.0 if free[j] else mult < 0.0
            any_violated = any_violated or violated[j]
        if not any_violated:
            break
        _switch(free, violated, k >= fast)
    solved = not violated.any() and disc >= 0.0 and v.sum() > 0.0
    for i in range(n):
        v[i] = v[i] if v[i] > 0.0 or v[i] != v[i] else 0.0
    return v, solved


@kernel
def _fair_potential(gramian: np.ndarray, w: np.ndarray, alpha: float) -> float:
    """:func:`polytask.balance.solvers._fair_potential` of one point ``w``."""
    n = w.shape[0]
    for i in range(n):
        if not w[i] > 0.0:
            return np.inf
    quad = 0.0
    for i in range(n):
        acc = 0.0
        for k in range(n):
            acc += w[k] * gramian[k, i]
        quad += acc * w[i]
    barrier = 0.0
    for i in range(n):
        barrier += np.log(w[i]) if alpha == 1.0 else w[i] ** (1.0 - 1.0 / alpha) / (1.0 - 1.0 / alpha)
    return 0.5 * quad - barrier


@kernel
def _fair_newton(gramian: np.ndarray, alpha: float, w: np.ndarray, iters: int) -> None:
    """:func:`polytask.balance.solvers._fair_newton` on the CPU (early stops on), each row of ``w`` in place."""
    rows, n = w.shape
    tiny = np.finfo(np.float64).tiny
    p = -1.0 / alpha
    steps = np.empty(20)
    for s in range(19):
        steps[s + 1] = 2.0 ** (s - 6)
    for r in range(rows):
        for i in range(n):
            w[r, i] = w[r, i] if w[r, i] > tiny or w[r, i] != w[r, i] else tiny
    grad = np.empty((rows, n))
    step = np.empty((rows, n))
    decrement = np.empty(rows)
    trial = np.empty(n)
    for _ in range(iters):
        quadratic = True
        for r in range(rows):
            hess = gramian.copy()
            for i in range(n):
                acc = 0.0
                for k in range(n):
                    acc += w[r, k] * gramian[k, i]
                grad[r, i] = acc - w[r, i] ** p
                step[r, i] = grad[r, i]
                hess[i, i] = gramian[i, i] + (1e-12 * gramian[i, i] - p * w[r, i] ** (p - 1.0))
            _solve_in_place(hess, step[r].reshape((n, 1)))
            dot = 0.0
            for i in range(n):
                dot += grad[r, i] * step[r, i]
            decrement[r] = np.sqrt(dot if dot > 0.0 or dot != dot else 0.0)
            quadratic = quadratic and decrement[r] < 0.25
        converged = False
        for r in range(rows):
            t = 1.0
            if not quadratic and not decrement[r] < 0.25:  # the line search: the damped step and 2^-6 .. 2^12
                steps[0] = 1.0 / (1.0 + decrement[r])
                best = np.nan
                for s in range(20):
                    for i in range(n):
                        trial[i] = w[r, i] - steps[s] * step[r, i]
                    value = _fair_potential(gramian, trial, alpha)
                    if s == 0 or (value != value and best == best) or value < best:  # argmin; NaN first, as torch
                        best, t = value, steps[s]
            ratio = np.inf
            for i in range(n):
                if step[r, i] > 0.0:
                    sr = step[r, i] if step[r, i] > tiny else tiny
                    ratio = min(ratio, 0.9 * w[r, i] / sr)
            move = t if t < ratio or t != t else ratio
            for i in range(n):
                x = w[r, i] - move * step[r, i]
                w[r, i] = x if x > tiny or x != x else tiny
            converged = converged or decrement[r] < 1e-9
        if converged:
            break


@kernel
def power_fair_weights(gramian: np.ndarray, alpha: float, init: np.ndarray, iters: int) -> np.ndarray:
    """:func:`polytask.balance.solvers.power_fair_weights` on the CPU; ``init`` empty for no warm start."""
    n = gramian.shape[0]
    tiny = np.finfo(np.float64).tiny
    absent = np.empty(n, dtype=np.bool_)
    for i in range(n):
        absent[i] = gramian[i, i] <= tiny
    g = gramian.copy()
    for i in range(n):
        for j in range(n):
            if absent[i] or absent[j]:
                g[i, j] = 1.0 if i == j else 0.0
    rows = 1 if init.shape[0] == 0 else 2
    w = np.empty((rows, n))
    for i in range(n):
        d = g[i, i] if g[i, i] > tiny or g[i, i] != g[i, i] else tiny
        w[0, i] = d ** (-alpha / (1.0 + alpha))
        if rows == 2:
            ok = np.isfinite(init[i]) and init[i] > 0.0
            w[1, i] = init[i] if ok else w[0, i]
    _fair_newton(g, alpha, w, iters)
    residual = np.empty(rows)
    for r in range(rows):
        top = -np.inf
        for i in range(n):
            acc = 0.0
            for k in range(n):
                acc += w[r, k] * g[k, i]
            powered = w[r, i] if alpha == 1.0 else w[r, i] ** (1.0 / alpha)
            value = 0.0 if absent[i] else abs(acc * powered - 1.0)
            if value != value or top != top:
                top = np.nan
            else:
                top = max(top, value)
        residual[r] = top
    pick = 1 if rows == 2 and residual[1] < residual[0] else 0
    out = w[pick].copy()
    for i in range(n):
        if absent[i]:
            out[i] = 0.0
    return out


@kernel
def trimmed_mean_one(jacobian: np.ndarray) -> np.ndarray:
    """:func:`polytask.balance.robust.trimmed_mean` with ``b = 1``: per column, the values strictly between
    its max and min plus their ties beyond one each, in two passes over the rows (the columns' max
    and min, then the sums), accumulated in the input's dtype; NaN for a column with a NaN or inf."""
    n, width = jacobian.shape
    hi = jacobian[0].copy()
    lo = jacobian[0].copy()
    finite = np.isfinite(jacobian[0])
    for t in range(1, n):
        row = jacobian[t]
        for k in range(width):
            v = row[k]
            finite[k] = finite[k] and np.isfinite(v)
            hi[k] = v if v > hi[k] else hi[k]
            lo[k] = v if v < lo[k] else lo[k]
    inside = np.zeros_like(hi)
    ties_hi = np.zeros_like(hi)
    ties_lo = np.zeros_like(hi)
    for t in range(n):
        row = jacobian[t]
        for k in range(width):
            v = row[k]
            at_hi = v == hi[k]
            at_lo = v == lo[k]
            ties_hi[k] += at_hi
            ties_lo[k] += at_lo
            inside[k] += 0.0 if at_hi or at_lo else v
    out = np.empty_like(hi)
    for k in range(width):
        if not finite[k]:
            out[k] = np.nan
        elif hi[k] == lo[k]:
            out[k] = hi[k]
        else:
            out[k] = (inside[k] + (ties_hi[k] - 1) * hi[k] + (ties_lo[k] - 1) * lo[k]) / (n - 2)
    return out
