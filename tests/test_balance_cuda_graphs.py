"""CUDA-graph replay of the solvers (``polytask.balance.solvers.cuda_graphed``).

On the CPU the capture itself is replaced by a fake "graph" whose replay re-runs the captured
closure into the static outputs: that checks everything but the capture (which call is graphed,
the cache key, the copy into the static inputs, the clone of the outputs, the switch, the
fallback). The last test captures real graphs and runs only where a CUDA device is present
(``tests/test_cuda.py`` also runs every balancer on the GPU, graphs on by default).
"""

from __future__ import annotations

import copy

import pytest
import torch

from polytask import balance
from polytask.balance import aggregators as agg
from polytask.balance import solvers

D64 = torch.float64


def _gramian(n: int, seed: int, dtype: torch.dtype = D64) -> torch.Tensor:
    j = torch.randn(n, 2 * n + 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return j @ j.T


class FakeGraphs:
    """Stands in for ``torch.cuda.graph``: capture records the closure and returns poisoned static
    outputs (a real capture computes nothing); replay recomputes them in place from the static inputs."""

    def __init__(self) -> None:
        self.captured: list[str] = []
        self.replays = 0

    def __call__(self, run):
        outputs = run()
        self.captured.append(run)
        flat = outputs if isinstance(outputs, tuple) else (outputs,)
        for o in flat:
            o.fill_(float("nan") if o.is_floating_point() else 0)

        def replay() -> None:
            self.replays += 1
            solvers._state.capturing = True  # a real replay runs no Python: nested solvers are not re-dispatched
            try:
                fresh = run()
            finally:
                solvers._state.capturing = False
            for o, f in zip(flat, fresh if isinstance(fresh, tuple) else (fresh,)):
                o.copy_(f)

        return outputs, replay


@pytest.fixture
def fake(monkeypatch):
    from polytask.balance import compiled

    graphs = FakeGraphs()
    monkeypatch.setattr(compiled, "USE_COMPILED", False)  # the graphs stand in for CUDA, where no compiled loop runs
    monkeypatch.setattr(solvers, "_GRAPH_DEVICE", "cpu")
    monkeypatch.setattr(solvers, "_capture", graphs)
    monkeypatch.setattr(solvers, "_GRAPHS", {})
    monkeypatch.setattr(solvers, "CUDA_GRAPHS", True)
    return graphs


def _eager(fn, *args, **kwargs):
    """The undecorated solver."""
    return fn.__wrapped__(*args, **kwargs)


CALLS = {
    "min_norm_simplex": lambda g: solvers.min_norm_simplex(g),
    "frank_wolfe": lambda g: solvers.frank_wolfe_min_norm(g, 1e-3, 50),
    "nonneg_qp": lambda g: solvers.nonneg_qp(g + 1e-4 * torch.eye(len(g), dtype=g.dtype, device=g.device), g),
    "cagrad_dual": lambda g: solvers.cagrad_dual(g / g.trace(), 0.4),
    "power_fair": lambda g: solvers.power_fair_weights(g, 1.0, init=g.diagonal().rsqrt()),
    "pcgrad": lambda g: agg.pcgrad_coefficients(g, torch.stack([torch.randperm(len(g), generator=torch.Generator().manual_seed(i)) for i in range(len(g))]).to(g.device)),
}


def _run_eager(name: str, g: torch.Tensor):
    with torch.no_grad():
        old = solvers.CUDA_GRAPHS
        solvers.CUDA_GRAPHS = False
        try:
            return CALLS[name](g)
        finally:
            solvers.CUDA_GRAPHS = old


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_replay_with_new_inputs_matches_eager(fake, name):
    """One capture, then each call copies its own Gramian in: results equal the eager solver's,
    and a result returned earlier is not overwritten by later replays (outputs are cloned)."""
    grams = [_gramian(5, s) for s in range(4)]
    results = [CALLS[name](g) for g in grams]
    assert len(fake.captured) == 1 and fake.replays == len(grams)
    for g, got in zip(grams, results):
        for a, b in zip(_as_tuple(got), _as_tuple(_run_eager(name, g))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the caller may overwrite its input after the call: the next replay reads only the static copy
    g = _gramian(5, 9)
    first = CALLS[name](g)
    g.zero_()
    assert not any(torch.isnan(t).any() for t in _as_tuple(first) if t.is_floating_point())


def test_cache_key_shape_dtype_and_static_arguments(fake):
    g5, g6 = _gramian(5, 0), _gramian(6, 0)
    solvers.cagrad_dual(g5, 0.4)
    solvers.cagrad_dual(g5 * 2, 0.4)  # same key
    assert len(fake.captured) == 1
    solvers.cagrad_dual(g6, 0.4)  # new T
    solvers.cagrad_dual(g5.float(), 0.4)  # new dtype
    solvers.cagrad_dual(g5, 0.5)  # new static argument (c)
    solvers.cagrad_dual(g5, c=0.5)  # the same call by keyword: same key
    assert len(fake.captured) == 4
    solvers.power_fair_weights(g5)  # init=None ...
    solvers.power_fair_weights(g5, init=torch.ones(5, dtype=D64))  # ... and a tensor init: two graphs
    assert len(fake.captured) == 6


def test_nested_solver_is_captured_inside_its_caller(fake):
    """min_norm_simplex calls nonneg_qp: one graph for the whole call, none for the inner one alone."""
    solvers.min_norm_simplex(_gramian(4, 0))
    assert len(fake.captured) == 1 and len(solvers._GRAPHS) == 1


def test_switch_off_autograd_and_other_devices_run_eagerly(fake, monkeypatch):
    g = _gramian(4, 0)
    monkeypatch.setattr(solvers, "CUDA_GRAPHS", False)
    solvers.min_norm_simplex(g)
    monkeypatch.setattr(solvers, "CUDA_GRAPHS", True)
    solvers.min_norm_simplex(g.clone().requires_grad_())  # recording autograd: never graphed
    monkeypatch.setattr(solvers, "_GRAPH_DEVICE", "cuda")
    solvers.min_norm_simplex(g)  # a CPU tensor on a CUDA-graph setup
    assert fake.captured == [] and solvers._GRAPHS == {}
    monkeypatch.setattr(solvers, "_GRAPH_DEVICE", "cpu")
    with torch.no_grad():
        solvers.min_norm_simplex(g.clone().requires_grad_())  # no recording: graphed
    assert len(fake.captured) == 1


def test_failed_capture_warns_once_and_runs_eagerly(fake, monkeypatch):
    def broken(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(solvers, "_capture", broken)
    g = _gramian(4, 1)
    with pytest.warns(RuntimeWarning, match="min_norm_simplex"):
        got = solvers.min_norm_simplex(g)
    torch.testing.assert_close(got, _run_eager("min_norm_simplex", g), rtol=0, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solvers.min_norm_simplex(g)  # cached as eager: no second attempt, no second warning
    assert solvers._GRAPHS and set(solvers._GRAPHS.values()) == {None}  # (the inner nonneg_qp tried alone too)


@pytest.mark.parametrize("name", ["mgda", "cagrad", "nash_mtl", "upgrad", "dualproj", "fairgrad", "pcgrad", "gradvac"])
def test_balancer_steps_with_graphs_match_eager(fake, name):
    """Several steps of a balancer (Nash-MTL's warm start, GradVac's targets carried between steps)
    give the same gradients with the (fake) graphs as without."""
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(6, 8).double(), torch.nn.Linear(8, 4).double()
    x = torch.randn(16, 6, dtype=D64)
    y = torch.randn(16, 4, dtype=D64)
    runs = []
    for graphs in (True, False):
        solvers.CUDA_GRAPHS = graphs
        t, h = copy.deepcopy(trunk), copy.deepcopy(heads)
        torch.manual_seed(5)
        bal = balance.get(name)
        grads = []
        for _ in range(3):
            out = h(torch.tanh(t(x)))
            losses = {f"t{i}": ((out[:, i] - y[:, i]) ** 2).mean() for i in range(4)}
            t.zero_grad(), h.zero_grad()
            bal.backward(losses, shared=list(t.parameters()))
            grads.append([p.grad.clone() for p in t.parameters()])
            with torch.no_grad():
                for p in [*t.parameters(), *h.parameters()]:
                    p -= 0.1 * p.grad
        runs.append(grads)
    assert len(fake.captured) >= 1
    for a, b in zip(*runs):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(CALLS) + ["gradvac"])
def test_real_cuda_graphs_match_eager(monkeypatch, name):
    """Real capture on the GPU: replays with new Gramians equal the eager GPU solver."""
    monkeypatch.setattr(solvers, "_GRAPHS", {})
    monkeypatch.setattr(solvers, "CUDA_GRAPHS", True)
    if name == "gradvac":
        n = 5
        orders = torch.stack([torch.randperm(n - 1) for _ in range(n)]).cuda()
        orders = orders + (orders >= torch.arange(n, device="cuda").unsqueeze(1))  # skip self
        phi = torch.full((n, n), 0.3, dtype=D64, device="cuda")
        CALLS["gradvac"] = lambda g: agg.gradvac_coefficients(g, phi, orders, 0.5, 1e-8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture (fallback warning) fails this test
        for seed in range(3):
            g = _gramian(5, seed).cuda()
            got = CALLS[name](g)
            want = _run_eager(name, g)
            for a, b in zip(_as_tuple(got), _as_tuple(want)):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(v is not None for v in solvers._GRAPHS.values()) and solvers._GRAPHS
    CALLS.pop("gradvac", None)
