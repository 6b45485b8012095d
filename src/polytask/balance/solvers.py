"""Small dense solvers for gradient aggregation, written in torch on the caller's device.

Every solver here works on ``T x T`` matrices (Gramians of task gradients). On an accelerator it
runs a *fixed* number of iterations and never reads a value back to the host, so an aggregation
step needs no host synchronisation: convergence is handled by masking (iterations after
convergence leave the iterate unchanged). On the CPU, where reading a flag costs nothing, the
loops stop as soon as the iterate is a fixed point (:func:`_early_exit`), with the same result;
Newton's (:func:`power_fair_weights`) stops once one of its two starts has converged and skips
the line search in its quadratic phase, the same solution to rounding.

Solvers:

- :func:`project_simplex` -- Euclidean projection onto the probability simplex.
- :func:`frank_wolfe_min_norm` -- the min-norm point of the convex hull of the task gradients
  by Frank-Wolfe (Sener & Koltun, NeurIPS 2018, Algorithm 2).
- :func:`min_norm_simplex` -- the same point exactly, through :func:`nonneg_qp`.
- :func:`nonneg_qp` -- ``min 1/2 x^T Q x + q^T x  s.t. x >= 0`` (batched over ``q``) by a
  primal-dual active-set method.
- :func:`cagrad_dual` -- CAGrad's inner problem (Liu et al., NeurIPS 2021) by an active-set
  method on its optimality conditions.
- :func:`power_fair_weights` -- positive solution of ``G w = w^(-1/alpha)`` (Nash-MTL for
  alpha=1, FairGrad for general alpha) by Newton with a batched line search on a convex potential;
  :func:`fair_residual` measures how well a ``w`` solves it.

On CUDA a fixed-iteration loop is many tiny kernels whose launch cost dominates (one
:func:`nonneg_qp` iteration: ~180 us of launches on an H100). Solvers decorated with
:func:`cuda_graphed` therefore run, on CUDA, as the replay of a CUDA graph captured at their first
call for the same shapes, dtypes, device and non-tensor arguments. :data:`CUDA_GRAPHS` (environment
variable ``POLYTASK_CUDA_GRAPHS=0``) turns that off; the CPU path never uses it. On the CPU the
same dispatch cost (a few microseconds per operation, on ``16 x 16`` problems) is removed by running
:func:`nonneg_qp` and :func:`min_norm_simplex` as compiled loops when numba is installed (:mod:`polytask.balance.compiled`;
float64 tensors without autograd), with the same iterations.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from polytask.balance.compiled import compiled_for

__all__ = ["CUDA_GRAPHS", "cagrad_dual", "cuda_graphed", "fair_residual", "frank_wolfe_min_norm", "min_norm_simplex",
           "nonneg_qp", "power_fair_weights", "project_simplex"]

#: Run :func:`cuda_graphed` solvers on CUDA as CUDA-graph replays (set False, or the environment
#: variable ``POLYTASK_CUDA_GRAPHS=0`` before import, to run them eagerly). Read at every call.
CUDA_GRAPHS: bool = os.environ.get("POLYTASK_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "no", "off")

#: The device type on which graphs are used; tests set "cpu" together with a fake :data:`_capture`.
_GRAPH_DEVICE = "cuda"

F = TypeVar("F", bound=Callable[..., Any])


class _Graphed:
    """One captured call: the static input tensors (by argument name), the static outputs, the replay."""

    __slots__ = ("inputs", "outputs", "replay")

    def __init__(self, inputs: dict[str, Tensor], outputs: Any, replay: Callable[[], None]) -> None:
        self.inputs, self.outputs, self.replay = inputs, outputs, replay


#: (function, static arguments, (name, shape, dtype, device) of the tensor arguments) -> its graph,
#: or None where capture failed (that call then runs eagerly).
_GRAPHS: dict[tuple[Any, ...], _Graphed | None] = {}
_state = threading.local()  # .capturing: a capture is in progress on this thread (nested solvers run inline)


def _capture_cuda(run: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
    """Capture ``run()`` in a CUDA graph: ``(its static outputs, replay)``. Nothing is computed yet.

    The warm-up call runs on a side stream (as capture requires), the same stream the capture
    then uses: the library handles and workspaces (cuSOLVER, cuBLAS) it creates for that stream
    are not created during capture. ``thread_local`` capture: other threads (a DataLoader's
    pin-memory thread) may keep calling CUDA meanwhile.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        outputs = run()
    return outputs, graph.replay


#: How a call is captured; tests replace it with a fake that needs no GPU.
_capture: Callable[[Callable[[], Any]], tuple[Any, Callable[[], None]]] = _capture_cuda


def _graphs_apply(tensors: list[Tensor]) -> bool:
    """Whether this call may replay a graph: switched on, every tensor argument on the graph device,
    none recording autograd, and no capture (ours or the caller's) in progress."""
    if not CUDA_GRAPHS or not tensors or getattr(_state, "capturing", False):
        return False
    if any(t.device.type != _GRAPH_DEVICE for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not (_GRAPH_DEVICE == "cuda" and torch.cuda.is_current_stream_capturing())


def _clone_outputs(outputs: Any) -> Any:
    """Fresh copies of the static outputs: the next replay overwrites them."""
    if isinstance(outputs, tuple):
        return tuple(o.clone() for o in outputs)
    return outputs.clone()


def cuda_graphed(fn: F) -> F:
    """Run ``fn`` on CUDA as the replay of a CUDA graph captured at its first call.

    ``fn`` must be a pure function of its arguments without host synchronisation or
    data-dependent Python control flow on CUDA (every solver here: fixed iteration counts). Its
    tensor arguments are copied into the graph's static inputs; its non-tensor arguments (and
    which optional tensors are None) are part of the cache key with the tensors' shapes, dtypes
    and device, so a new value captures a new graph. It returns a tensor or a tuple of tensors,
    cloned from the graph's static outputs. Calls off CUDA, with :data:`CUDA_GRAPHS` False, with
    inputs recording autograd, or inside a capture run ``fn`` as is. A capture that fails warns
    once and leaves that key eager.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else None
        if isinstance(first, Tensor) and first.device.type != _GRAPH_DEVICE:
            return fn(*args, **kwargs)  # the CPU path, decided on the first argument: no other work
        if not _graphs_apply([a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]):
            return fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        tensors = {k: v for k, v in bound.arguments.items() if isinstance(v, Tensor)}
        key = (fn.__qualname__, tuple((k, v) for k, v in bound.arguments.items() if k not in tensors),
               tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in tensors.items()))
        device = next(iter(tensors.values())).device
        # graphs are captured and replayed on the current device: make it the tensors' one
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            if key not in _GRAPHS:
                _GRAPHS[key] = _build(fn, bound.arguments, tensors)
            entry = _GRAPHS[key]
            if entry is None:
                return fn(*args, **kwargs)
            for name, static in entry.inputs.items():
                static.copy_(tensors[name])
            entry.replay()
            return _clone_outputs(entry.outputs)

    return wrapper  # type: ignore[return-value]


def _build(fn: Callable[..., Any], arguments: dict[str, Any], tensors: dict[str, Tensor]) -> _Graphed | None:
    """Capture ``fn`` on static copies of the tensor arguments (``None`` and a warning if capture fails)."""
    inputs = {k: t.detach().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    call = {**arguments, **inputs}
    _state.capturing = True
    try:
        outputs, replay = _capture(lambda: fn(**call))
    except Exception as err:  # noqa: BLE001 -- any capture failure: fall back to eager, loudly
        warnings.warn(f"polytask: CUDA graph capture of {fn.__name__} failed, running it eagerly "
                      f"(POLYTASK_CUDA_GRAPHS=0 turns graphs off): {err}", RuntimeWarning, stacklevel=3)
        return None
    finally:
        _state.capturing = False
    return _Graphed(inputs, outputs, replay)


def _early_exit(t: Tensor) -> bool:
    """Whether a solver may test convergence on the host: only for CPU tensors (no sync there)."""
    return t.device.type == "cpu"


def project_simplex(y: Tensor) -> Tensor:
    """Euclidean projection of each row of ``y`` (``(..., T)``) onto the probability simplex.

    Sort-based algorithm (Held, Wolfe & Crowder 1974; Duchi et al., ICML 2008): with ``u`` sorted
    in decreasing order, ``rho = max{j : u_j - (sum_{k<=j} u_k - 1)/j > 0}`` and the projection
    is ``max(y - theta, 0)`` with ``theta = (sum_{k<=rho} u_k - 1)/rho``. The threshold is also
    the largest of the means ``f_j = (sum_{k<=j} u_k - 1)/j``: ``f_{j+1} - f_j = (u_{j+1} - f_j)/(j+1)``
    is positive exactly while the condition holds (``j < rho``), so ``f`` rises to ``f_rho`` and
    does not rise after it. That form takes half the operations (it runs in SDMGrad's inner loop).
    """
    u = torch.topk(y, y.shape[-1], dim=-1).values  # sorted, decreasing (fewer nested operator calls than sort)
    inv_ks = 1.0 / torch.arange(1, y.shape[-1] + 1, device=y.device, dtype=y.dtype)
    theta = _simplex_threshold(u, inv_ks)
    return (y - theta).clamp_min(0.0)


def _simplex_threshold(u: Tensor, inv_ks: Tensor) -> Tensor:
    """``max_j (sum_{k<=j} u_k - 1) / j`` over the last dimension of ``u`` (sorted decreasing), kept as a dimension."""
    return torch.addcmul(-inv_ks, u.cumsum(-1), inv_ks).amax(-1, keepdim=True)


@cuda_graphed
def frank_wolfe_min_norm(gramian: Tensor, epsilon: float = 1e-3, max_iters: int = 100) -> Tensor:
    """Weights ``w`` on the simplex minimising ``w^T G w`` by Frank-Wolfe.

    Algorithm 2 of Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018: start at the barycentre, move towards the vertex ``e_t`` with the smallest
    ``(G w)_t`` with the exact line-search step ``gamma``, stop once ``gamma < epsilon``. The stop
    is applied by freezing the iterate (no host synchronisation); ``max_iters`` bounds the work.
    """
    n = gramian.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=gramian.dtype, device=gramian.device)
    gw = gramian @ w
    active = torch.ones((), dtype=torch.bool, device=gramian.device)
    diag = gramian.diagonal()
    early = _early_exit(gramian)
    for _ in range(max_iters):
        # index_select, not gw[t]: indexing with a 0-d CUDA tensor reads it on the host (a sync)
        t = torch.argmin(gw).reshape(1)
        a = gw.index_select(0, t).squeeze(0)  # w^T G e_t
        b = w @ gw  # w^T G w
        c = diag.index_select(0, t).squeeze(0)  # e_t^T G e_t
        step = torch.where(c <= a, torch.ones_like(a), torch.where(b <= a, torch.zeros_like(a), (b - a) / (b + c - 2 * a)))
        step = torch.where(active, step, torch.zeros_like(step))
        w = (1 - step) * w
        w = w.index_add(0, t, step.reshape(1))
        gw = (1 - step) * gw + step * gramian.index_select(1, t).squeeze(1)
        active = active & (step >= epsilon)
        if early and not bool(active):
            break
    return w


@cuda_graphed
def min_norm_simplex(gramian: Tensor, reg: float = 1e-10, iters: int | None = None) -> Tensor:
    """Exact weights ``w`` on the simplex minimising ``w^T G w`` (MGDA's min-norm point).

    If ``lambda = argmin_{lambda >= 0} 1/2 lambda^T Q lambda - 1^T lambda`` then
    ``w = lambda / sum(lambda)`` satisfies the optimality conditions of the min-norm problem
    (with multiplier ``1 / sum(lambda)``), so one :func:`nonneg_qp` solves it.
    ``Q = G / tr(G) + reg I`` keeps the QP bounded when 0 is in the convex hull. On the CPU with
    numba it runs as one compiled loop (MGDA's ``weights`` at ``T = 16``: ~190 -> 5 torch operations).
    """
    n = gramian.shape[0]
    kernels = compiled_for(gramian)
    if kernels is not None:  # the same steps as one compiled loop (float64 CPU, numba installed)
        return torch.from_numpy(kernels.min_norm_simplex(gramian.contiguous().numpy(), float(reg),
                                                         3 * n // 2 + 10 if iters is None else int(iters)))
    eye = torch.eye(n, dtype=gramian.dtype, device=gramian.device)
    trace = gramian.diagonal().sum().clamp_min(torch.finfo(gramian.dtype).tiny)
    lam = nonneg_qp(gramian / trace + reg * eye, -torch.ones(n, dtype=gramian.dtype, device=gramian.device), iters)
    return lam / lam.sum().clamp_min(torch.finfo(gramian.dtype).tiny)


@cuda_graphed
def nonneg_qp(quad: Tensor, lin: Tensor, iters: int | None = None) -> Tensor:
    """Solve ``min_x 1/2 x^T Q x + q^T x`` subject to ``x >= 0`` for every row ``q`` of ``lin``.

    ``quad``: ``(T, T)`` symmetric positive definite; ``lin``: ``(..., T)``. This is the linear
    complementarity problem ``x >= 0, Qx + q >= 0, x^T (Qx + q) = 0``. On a guessed free set we
    solve the equality-constrained problem (one batched linear solve), then correct the guess:

    - the first iterations switch every violated index at once (primal-dual active set method,
      Hintermueller, Ito & Kunisch, SIAM J. Optim. 2002), which usually converges in a handful of
      steps but may cycle on ill-conditioned ``Q``;
    - the remaining iterations switch only the lowest violated index (Murty's least-index
      principal pivoting, 1974), which terminates for every positive definite ``Q``.

    A solution is a fixed point of both rules, so running a fixed number of iterations (default
    ``3 T / 2 + 10``) needs no host synchronisation. The first guess is the step from ``x = 0``
    (free where ``q < 0``), which costs no solve; for UPGrad's and DualProj's problems
    (``q = G u``) an all-free start only finds ``x = -u``, one wasted solve.

    On the CPU with numba (float64, no autograd) the same iterations run as one compiled loop that
    solves the reduced system on the free indices (Gaussian elimination with partial pivoting):
    ~190 torch operations per call at ``T = 16`` become none; the result agrees to rounding times
    the condition number of ``Q``.
    """
    n = quad.shape[-1]
    iters = 3 * n // 2 + 10 if iters is None else iters
    kernels = compiled_for(quad, lin) if quad.dim() == 2 else None
    if kernels is not None:  # the same iterations as one compiled loop (float64 CPU, numba installed)
        rows = kernels.nonneg_qp(quad.contiguous().numpy(), lin.reshape(-1, n).contiguous().numpy(), iters)
        return torch.from_numpy(rows).reshape(lin.shape)
    fast = min(iters, 10)
    free = lin < 0  # the first active-set step from x = 0 (no solve needed: there Qx + q = q)
    x = torch.zeros_like(lin)
    index = torch.arange(n, device=lin.device)
    eye = torch.eye(n, dtype=quad.dtype, device=quad.device)
    neg_lin = -lin
    early = _early_exit(lin)
    for k in range(iters):
        # Reduced KKT system, padded to full size: rows/columns of active indices become identity.
        mat = torch.where(free.unsqueeze(-1) & free.unsqueeze(-2), quad, eye)
        x = torch.linalg.solve_ex(mat, torch.where(free, neg_lin, 0.0).unsqueeze(-1))[0].squeeze(-1)
        mult = x @ quad + lin
        violated = torch.where(free, x < 0, mult < 0)
        if early and not bool(violated.any()):
            break
        if k >= fast:
            first = violated.to(torch.int8).argmax(-1, keepdim=True)
            violated = violated & (index == first)
        free = free ^ violated
    return x.clamp_min(0.0)


@cuda_graphed
def cagrad_dual(gramian: Tensor, c: float, iters: int | None = None, reg: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Solve CAGrad's inner problem ``min_{w in simplex} F(w) = b^T w + s ||J^T w||``.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021, with
    ``G = J J^T``, ``g0 = J^T 1/T``, ``b = J g0 = G 1/T`` and ``s = c ||g0||``.

    With ``v = s w / ||J^T w||`` the optimality conditions become those of the non-negative QP
    ``min_{v>=0} 1/2 v^T G v + (b - nu 1)^T v`` together with ``v^T G v = s^2``; on a given free
    set ``v_F = nu p - q`` (``p = G_FF^-1 1``, ``q = G_FF^-1 b_F``) and the norm condition is a
    quadratic in ``nu``. The free set is corrected like in :func:`nonneg_qp` (all violated
    indices at first, then the lowest one). CAGrad's update is then ``J^T (1/T + v)``.

    Returns ``(v, solved)``. ``solved`` is False when the optimality system has no solution,
    which happens when the minimum sits at ``J^T w = 0`` (0 is in the convex hull of the
    gradients and ``c`` is large enough): then ``v`` would be unbounded and CAGrad's update is 0.
    """
    n = gramian.shape[0]
    iters = 3 * n // 2 + 10 if iters is None else iters
    kernels = compiled_for(gramian)
    if kernels is not None:  # the same steps as one compiled loop (float64 CPU, numba installed)
        v, solved = kernels.cagrad_dual(gramian.contiguous().numpy(), float(c), int(iters), float(reg))
        return torch.from_numpy(v), torch.tensor(solved)
    fast = min(iters, 10)
    dtype, dev = gramian.dtype, gramian.device
    ones = torch.ones(n, dtype=dtype, device=dev)
    index = torch.arange(n, device=dev)
    scale = gramian.diagonal().sum().clamp_min(torch.finfo(dtype).tiny)
    g = gramian + reg * scale * torch.eye(n, dtype=dtype, device=dev)
    b = gramian @ ones / n
    s2 = (c * c) * (ones @ b / n).clamp_min(0.0)  # s^2 = c^2 ||g0||^2
    free = torch.ones(n, dtype=torch.bool, device=dev)
    v = torch.zeros(n, dtype=dtype, device=dev)
    early = _early_exit(gramian)
    eye = torch.eye(n, dtype=dtype, device=dev)
    ones_b = torch.stack([ones, b], dim=-1)
    for k in range(iters):
        f = free.to(dtype)
        mat = torch.where(free.unsqueeze(-1) & free.unsqueeze(-2), g, eye)
        sol = torch.linalg.solve_ex(mat, ones_b * f.unsqueeze(-1))[0]
        p, q = sol[:, 0], sol[:, 1]
        a2, a1, a0 = ones @ (f * p), ones @ (f * q), b @ (f * q)
        disc = a1 * a1 - a2 * (a0 - s2)
        nu = (a1 + disc.clamp_min(0.0).sqrt()) / a2
        v = nu * p - q
        mult = g @ v + b - nu
        violated = torch.where(free, v < 0, mult < 0)
        if early and not bool(violated.any()):
            break
        if k >= fast:
            violated = violated & (index == violated.to(torch.int8).argmax())
        free = free ^ violated
    solved = ~violated.any() & (disc >= 0) & (v.sum() > 0)
    return v.clamp_min(0.0), solved


@cuda_graphed
def power_fair_weights(gramian: Tensor, alpha: float = 1.0, init: Tensor | None = None, iters: int = 30) -> Tensor:
    """Positive ``w`` with ``(G w)_i = w_i^(-1/alpha)`` for every task ``i``.

    ``alpha = 1`` is Nash-MTL's bargaining condition ``G w = 1/w`` (Navon et al., ICML 2022);
    general ``alpha > 0`` is FairGrad's alpha-fair condition (Ban & Ji, ICML 2024). The solution
    minimises the strictly convex potential ``1/2 w^T G w - sum_i h(w_i)`` with
    ``h'(w) = w^(-1/alpha)`` (:func:`_fair_potential`). Newton steps, a fixed number of times, each
    with a line search that needs no host synchronisation: the potential is evaluated at the damped
    step ``1/(1 + decrement)`` (which decreases it for self-concordant functions, ``alpha = 1``) and
    at the steps ``2^-6 ... 2^12`` together, and the best point is kept (long steps where the
    Gramian is nearly singular, e.g. nearly opposite gradients, whose solution is large); once the
    decrement is below 1/4 the full step is taken (quadratic convergence). A step never moves more
    than 90% of the way to the boundary ``w = 0``. Newton's method is invariant to a rescaling of
    the tasks (``G -> D G D``, ``w -> D^-1 w``), and so is the ``1e-12 diag(G)`` regularisation of
    the Hessian: badly scaled gradients (1e-6 next to 1e6) converge like unit ones.

    ``init`` (e.g. the previous step's solution) warm-starts the iteration; a cold start (exact when
    the gradients are orthogonal: ``w_i = G_ii^(-alpha/(1+alpha))``) runs beside it in the same
    batched solve and the one with the smaller :func:`fair_residual` is returned, so a stale,
    far-off or non-finite ``init`` never costs accuracy. On the CPU (where reading a flag costs no
    synchronisation) the iteration stops as soon as either start has converged (Newton decrement
    below 1e-9, after taking that step) and skips the line search once every decrement is below
    1/4 (it would take the full step): a warm start from last step's solution then usually ends the
    solve in one or two Newton steps, the cold start unfinished and discarded by the residual test.
    Same solution to rounding (``tests/test_balance_fast_paths.py`` checks it against the full
    fixed iteration count); on accelerators the fixed count runs, as before. A task whose gradient is 0 has no solution
    (``(G w)_i = 0``: its weight would be infinite, and does not change ``J^T w``): it gets weight 0
    and the others are solved without it.
    """
    kernels = compiled_for(gramian) if init is None or init.device.type == "cpu" else None
    if kernels is not None:  # the same steps as one compiled loop (float64 CPU, numba installed)
        start = torch.empty(0, dtype=torch.float64) if init is None else init.detach().to(torch.float64).contiguous()
        return torch.from_numpy(kernels.power_fair_weights(gramian.contiguous().numpy(), float(alpha), start.numpy(), int(iters)))
    n = gramian.shape[0]
    dtype, dev = gramian.dtype, gramian.device
    tiny = torch.finfo(dtype).tiny
    absent = gramian.diagonal() <= tiny
    eye = torch.eye(n, dtype=dtype, device=dev)
    g = torch.where(absent.unsqueeze(0) | absent.unsqueeze(1), eye, gramian)  # a zero gradient's row/column: e_i
    cold = g.diagonal().clamp_min(tiny) ** (-alpha / (1.0 + alpha))
    if init is None:
        w = cold.unsqueeze(0)
    else:
        init = init.to(dtype)
        w = torch.stack([cold, torch.where(torch.isfinite(init) & (init > 0), init, cold)])
    w = _fair_newton(g, alpha, w, iters)
    res = fair_residual(g, w, alpha)
    best = w[0] if init is None else torch.where(res[1] < res[0], w[1], w[0])  # NaN residual: the cold start
    return torch.where(absent, torch.zeros_like(best), best)


def fair_residual(gramian: Tensor, w: Tensor, alpha: float = 1.0) -> Tensor:
    """``max_i |w_i^(1/alpha) (G w)_i - 1|`` for each row of ``w`` (``(..., T)``): the relative residual of
    ``G w = w^(-1/alpha)``, invariant to a rescaling of the tasks (0 at :func:`power_fair_weights`'s solution).
    Tasks whose gradient is 0 (no solution; weight 0 there) are left out."""
    present = gramian.diagonal() > torch.finfo(gramian.dtype).tiny
    powered = w if alpha == 1.0 else w.pow(1.0 / alpha)
    return torch.where(present, (w @ gramian) * powered - 1.0, 0.0).abs().amax(-1)


def _fair_potential(gramian: Tensor, w: Tensor, alpha: float) -> Tensor:
    """``1/2 w^T G w - sum_i h(w_i)`` with ``h'(w) = w^(-1/alpha)``, per row of ``w``; ``inf`` outside ``w > 0``."""
    inside = (w > 0).all(-1)
    safe = torch.where(inside.unsqueeze(-1), w, torch.ones_like(w))
    barrier = safe.log() if alpha == 1.0 else safe.pow(1.0 - 1.0 / alpha) / (1.0 - 1.0 / alpha)
    value = 0.5 * ((safe @ gramian) * safe).sum(-1) - barrier.sum(-1)
    return torch.where(inside, value, torch.full_like(value, float("inf")))


def _fair_newton(gramian: Tensor, alpha: float, w: Tensor, iters: int) -> Tensor:
    """:func:`power_fair_weights`' Newton iterations from each row of ``w`` (``(B, T)``), batched."""
    dtype, dev = gramian.dtype, gramian.device
    tiny = torch.finfo(dtype).tiny
    p = -1.0 / alpha
    reg = 1e-12 * gramian.diagonal()
    steps = first = None  # the line search's candidates, built at its first use (a CPU solve may never search)
    early = _early_exit(gramian)
    w = w.clamp_min(tiny)
    for _ in range(iters):  # sequential by construction: each Newton step starts where the last ended
        grad = w @ gramian - w.pow(p)
        hess = gramian + torch.diag_embed(reg - p * w.pow(p - 1.0))
        # solve_ex on an accelerator: linalg.solve checks for singularity on the host (a sync)
        step = torch.linalg.solve_ex(hess, grad.unsqueeze(-1))[0].squeeze(-1)
        decrement = (grad * step).sum(-1).clamp_min(0.0).sqrt()
        quadratic = decrement < 0.25
        if early and bool(quadratic.all()):  # CPU: the line search below would pick the full step for every row
            t = torch.ones_like(decrement)
        else:
            if steps is None:
                steps = torch.cat([torch.zeros(1, dtype=dtype, device=dev),  # slot for the damped step
                                   2.0 ** torch.arange(-6, 13, dtype=dtype, device=dev)])
                first = torch.arange(steps.shape[0], device=dev) == 0
            cand = torch.where(first, (1.0 / (1.0 + decrement)).unsqueeze(-1), steps)  # (B, K)
            potential = _fair_potential(gramian, w.unsqueeze(1) - cand.unsqueeze(-1) * step.unsqueeze(1), alpha)
            t = cand.gather(-1, potential.argmin(-1, keepdim=True)).squeeze(-1)
            t = torch.where(quadratic, torch.ones_like(t), t)
        # Never move more than 90% of the way to the boundary w = 0.
        ratio = torch.where(step > 0, 0.9 * w / step.clamp_min(tiny), torch.full_like(w, float("inf"))).amin(-1)
        w = (w - torch.minimum(t, ratio).unsqueeze(-1) * step).clamp_min(tiny)
        # CPU: stop once one start has converged (quadratic convergence: its next step is ~1e-18 relative);
        # the caller keeps the start with the smaller residual, so the other one need not converge too
        if early and bool((decrement < 1e-9).any()):
            break
    return w
