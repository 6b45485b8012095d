"""The compiled CPU solvers (numba, polytask.balance.compiled) against the torch path they replace.

The torch path is the reference; it is itself the paper's update (checked against torchjd 0.18 in
tests/test_balance_jd_recent.py). SDMGrad's default inner SGD (lr = 10) is chaotic: the torch path
run on the transposed (equal, symmetric) Gramian already differs by ~1e-12 after 20 steps, and
chained steps amplify that to O(1). So consecutive steps are compared two ways: every step from the
same previous weights (default lr), and with both paths carrying their own state where the inner
SGD contracts (small lr).
"""

from __future__ import annotations

import pytest
import torch

from polytask.balance import compiled
from polytask.balance import stateful_weightings as sw
from polytask.balance.registry import BALANCERS

pytest.importorskip("numba")
DT = torch.float64


def _gramians(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hard Gramians: nearly opposite pair, zero, 1e-6 / 1e6 scales, mixed 1e-6..1e6 rows, rank one."""
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(n, 40, dtype=DT, generator=gen)
    opposite = j.clone()
    opposite[1] = -opposite[0] * (1 + 1e-9)
    mixed = j * torch.logspace(-6, 6, n, dtype=DT).unsqueeze(1)
    rank_one = torch.randn(1, 40, dtype=DT, generator=gen).expand(n, 40) * torch.arange(1, n + 1, dtype=DT).unsqueeze(1)
    cases = {"random": j, "opposite": opposite, "tiny": j * 1e-6, "huge": j * 1e6, "mixed": mixed, "rank_one": rank_one}
    out = {name: m @ m.T for name, m in cases.items()}
    out["zero"] = torch.zeros(n, n, dtype=DT)
    return out


def _torch_path(fn, *args, **kwargs):
    old = compiled.USE_COMPILED
    compiled.USE_COMPILED = False
    try:
        return fn(*args, **kwargs)
    finally:
        compiled.USE_COMPILED = old


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_compiled_path_is_taken_only_for_float64_cpu_without_autograd():
    g = torch.eye(3, dtype=DT)
    assert compiled.compiled_for(g) is not None
    assert compiled.compiled_for(g.float()) is None
    assert compiled.compiled_for(g.clone().requires_grad_()) is None
    assert _torch_path(compiled.compiled_for, g) is None


@pytest.mark.parametrize("n", [2, 16])
def test_sdmgrad_inner_matches_torch_step_by_step_at_default_lr(n):
    for name, g in _gramians(n).items():
        w = torch.full((n,), 1.0 / n, dtype=DT)
        pref = torch.full((n,), 1.0 / n, dtype=DT)
        for step in range(6):  # each step from the reference's previous weights (the method is chaotic)
            ref = _torch_path(sw.sdmgrad_inner, g, w, pref, 10.0, 0.5, 0.3, 20)
            got = sw.sdmgrad_inner(g, w, pref, 10.0, 0.5, 0.3, 20)
            assert _rel(got, ref) < 1e-10, (name, step, _rel(got, ref))
            assert float(got.sum()) == pytest.approx(1.0, abs=1e-12) and bool((got >= 0).all())
            w = ref


@pytest.mark.parametrize("n", [2, 16])
def test_sdmgrad_balancer_matches_torch_over_consecutive_steps(n):
    """Both paths keep their own state; lr small enough that the inner SGD contracts."""
    for name, g in _gramians(n, seed=1).items():
        fast, slow = BALANCERS.build("sdmgrad", lr=0.05).aggregator, BALANCERS.build("sdmgrad", lr=0.05).aggregator
        for step in range(5):
            scaled = g * (1.0 + 0.1 * step)
            got = fast.weights(scaled)
            ref = _torch_path(slow.weights, scaled)
            assert _rel(got, ref) < 1e-12, (name, step, _rel(got, ref))
            assert _rel(fast.task_weights, slow.task_weights) < 1e-12


def test_sdmgrad_inner_nan_propagates_as_in_torch():
    g = _gramians(4)["random"]
    g[1, 2] = g[2, 1] = float("nan")
    w = torch.full((4,), 0.25, dtype=DT)
    ref = _torch_path(sw.sdmgrad_inner, g, w, w, 10.0, 0.5, 0.3, 20)
    got = sw.sdmgrad_inner(g, w, w, 10.0, 0.5, 0.3, 20)
    assert torch.equal(got.isnan(), ref.isnan()) and bool(got.isnan().all())


def test_sdmgrad_inner_hand_case_two_tasks():
    """T = 2, A = diag(1, 0) scaled to mean norm 1/2 (A / 0.25 = diag(4, 0)), w~ = (1/2, 1/2), lambda = 0,
    lr = 0.1, no momentum, one step from (1/2, 1/2): y = w - 0.1 (2, 0) = (0.3, 0.5); the projection
    adds 0.1 to each: (0.4, 0.6)."""
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=DT)
    w = torch.full((2,), 0.5, dtype=DT)
    got = sw.sdmgrad_inner(g, w, w, 0.1, 0.0, 0.0, 1)
    torch.testing.assert_close(got, torch.tensor([0.4, 0.6], dtype=DT), rtol=0, atol=1e-8)  # 1e-8: A's +1e-8 guard


@pytest.mark.parametrize("n", [2, 16])
def test_nonneg_qp_matches_torch_on_hard_problems(n):
    from polytask.balance.solvers import nonneg_qp

    for name, g in _gramians(n, seed=2).items():
        top = float(g.diagonal().max()) or 1.0
        quad = g + 1e-9 * top * torch.eye(n, dtype=DT)
        gen = torch.Generator().manual_seed(3)
        lin = torch.randn(3, n, dtype=DT, generator=gen) * top  # batched rows, as UPGrad's
        got, ref = nonneg_qp(quad, lin), _torch_path(nonneg_qp, quad, lin)
        scale = float(ref.abs().max()) or 1.0
        # rounding in a solve is amplified by the condition number (the nearly opposite pair: ~1e9), in either path
        tol = max(1e-12, 1e-14 * float(torch.linalg.cond(quad)))
        assert float((got - ref).abs().max()) <= tol * scale, (name, _rel(got, ref), tol)
        assert got.shape == ref.shape and bool((got >= 0).all())
        one = nonneg_qp(quad, lin[0])  # 1-D right-hand side keeps its shape
        assert one.shape == (n,)


def test_nonneg_qp_well_conditioned_agrees_to_1e12_and_solves_kkt():
    from polytask.balance.solvers import nonneg_qp

    gen = torch.Generator().manual_seed(4)
    m = torch.randn(16, 16, dtype=DT, generator=gen)
    quad = m @ m.T + 16 * torch.eye(16, dtype=DT)
    for step in range(5):
        lin = torch.randn(16, dtype=DT, generator=gen) * 10.0 ** (step - 2)
        got, ref = nonneg_qp(quad, lin), _torch_path(nonneg_qp, quad, lin)
        assert _rel(got, ref) < 1e-12
        mult = quad @ got + lin  # KKT: x >= 0, Qx + q >= 0, complementarity
        assert float(mult.min()) > -1e-10 * float(lin.abs().max()) and float((got * mult).abs().max()) < 1e-9


def test_nonneg_qp_nan_as_torch():
    from polytask.balance.solvers import nonneg_qp

    quad = torch.eye(3, dtype=DT)
    quad[0, 1] = quad[1, 0] = float("nan")
    lin = -torch.ones(3, dtype=DT)
    got, ref = nonneg_qp(quad, lin), _torch_path(nonneg_qp, quad, lin)
    assert torch.equal(got.isnan(), ref.isnan())


@pytest.mark.parametrize("n", [2, 16])
@pytest.mark.parametrize("tau", [0.02, 0.5])
def test_pcd_matches_torch_over_consecutive_steps(n, tau):
    for name, g in _gramians(n, seed=5).items():
        fast, slow = BALANCERS.build("pcd", tau=tau).aggregator, BALANCERS.build("pcd", tau=tau).aggregator
        for step in range(5):
            scaled = g * (1.0 + 0.5 * step)
            got = fast.weights(scaled)
            ref = _torch_path(slow.weights, scaled)
            scale = float(ref.abs().max()) or 1.0
            assert float((got - ref).abs().max()) <= 1e-12 * scale, (name, step, _rel(got, ref))
            assert torch.equal(fast.sq_norm_avg, slow.sq_norm_avg)


def test_pcd_infeasible_and_nan_as_torch():
    g = torch.tensor([[1.0, 0.2, 0.1], [0.2, 1.0, -1.0], [0.1, -1.0, 1.0]], dtype=DT)  # opposite secondaries
    for gram in (g, torch.where(torch.eye(3, dtype=torch.bool), g, float("nan"))):
        fast, slow = BALANCERS.build("pcd", tau=0.5).aggregator, BALANCERS.build("pcd", tau=0.5).aggregator
        got, ref = fast.weights(gram), _torch_path(slow.weights, gram)
        assert torch.equal(got.isnan(), ref.isnan())
        torch.testing.assert_close(got.nan_to_num(), ref.nan_to_num(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [2, 16])
def test_cr_mogm_over_mgda_matches_torch_over_consecutive_steps(n):
    for name, g in _gramians(n, seed=6).items():
        fast, slow = BALANCERS.build("cr_mogm").aggregator, BALANCERS.build("cr_mogm").aggregator
        for step in range(5):
            scaled = g * (1.0 + 0.5 * step)
            got = fast.weights(scaled)
            ref = _torch_path(slow.weights, scaled)
            # 2e-12: the 1e-6..1e6 rows (the min-norm QP's condition number ~1e12) reach 7e-13
            assert float((got - ref).abs().max()) <= 2e-12 * float(ref.abs().max()), (name, step, _rel(got, ref))


@pytest.mark.parametrize("n", [2, 16])
def test_min_norm_simplex_matches_torch_and_is_the_hand_solution(n):
    from polytask.balance.solvers import min_norm_simplex

    for name, g in _gramians(n, seed=7).items():
        got, ref = min_norm_simplex(g), _torch_path(min_norm_simplex, g)
        assert torch.equal(got.isnan(), ref.isnan()), name
        assert float((got - ref).abs().max()) <= 2e-12 * float(ref.abs().max()), (name, _rel(got, ref))
    # hand case: orthogonal gradients of squared norms 1 and 4: w ∝ (1/1, 1/4) -> (0.8, 0.2)
    g = torch.diag(torch.tensor([1.0, 4.0], dtype=DT))
    torch.testing.assert_close(min_norm_simplex(g), torch.tensor([0.8, 0.2], dtype=DT), rtol=0, atol=1e-9)


def test_without_numba_the_torch_path_runs(monkeypatch):
    monkeypatch.setattr(compiled, "_kernels", lambda: None)  # as when numba is not installed
    assert compiled.compiled_for(torch.eye(2, dtype=DT)) is None
    g = _gramians(4)["random"]
    w = torch.full((4,), 0.25, dtype=DT)
    torch.testing.assert_close(sw.sdmgrad_inner(g, w, w, 0.1, 0.5, 0.3, 20),
                               _torch_path(sw.sdmgrad_inner, g, w, w, 0.1, 0.5, 0.3, 20), rtol=0, atol=0)


# A 5 x 5 problem (found by a random search) on which the all-switch rule cycles: only the least-index
# iterations after the first 10 solve it, so it exercises that branch of both paths.
_CYCLING_QUAD = [
    [float.fromhex('0x1.31bfae345f62ep+1'), float.fromhex('-0x1.a382977f4aa98p-1'), float.fromhex('-0x1.9fdeff6beb13ap+0'), float.fromhex('-0x1.a1c6b51de4fc7p-2'), float.fromhex('0x1.0c39bdde9b0bcp+2')],
    [float.fromhex('-0x1.a382977f4aa98p-1'), float.fromhex('0x1.98b1dd0bc645cp+0'), float.fromhex('-0x1.572a6310f7b9cp-1'), float.fromhex('0x1.71ed903a6c6fcp-3'), float.fromhex('-0x1.5e2393a3b7df6p+1')],
    [float.fromhex('-0x1.9fdeff6beb13ap+0'), float.fromhex('-0x1.572a6310f7b9cp-1'), float.fromhex('0x1.0b287fc7be4ebp+2'), float.fromhex('0x1.2f02579539fcep-3'), float.fromhex('0x1.29e2bdc1eeb26p+0')],
    [float.fromhex('-0x1.a1c6b51de4fc7p-2'), float.fromhex('0x1.71ed903a6c6fcp-3'), float.fromhex('0x1.2f02579539fcep-3'), float.fromhex('0x1.46d153143efaap-1'), float.fromhex('0x1.2b23b759483b7p-2')],
    [float.fromhex('0x1.0c39bdde9b0bcp+2'), float.fromhex('-0x1.5e2393a3b7df6p+1'), float.fromhex('0x1.29e2bdc1eeb26p+0'), float.fromhex('0x1.2b23b759483b7p-2'), float.fromhex('0x1.ffe668b6be816p+3')],
]
_CYCLING_LIN = [float.fromhex('-0x1.67324e211e86ap-1'), float.fromhex('0x1.3b503398c9059p+1'), float.fromhex('-0x1.d1d6d070a2628p-1'), float.fromhex('-0x1.6d7277861783bp+0'), float.fromhex('-0x1.6bab03c2fcd19p+0')]


def test_nonneg_qp_least_index_phase_matches_torch():
    from polytask.balance.solvers import nonneg_qp

    quad, lin = torch.tensor(_CYCLING_QUAD, dtype=DT), torch.tensor(_CYCLING_LIN, dtype=DT)
    fast_only = _torch_path(nonneg_qp, quad, lin, iters=10)
    got, ref = nonneg_qp(quad, lin), _torch_path(nonneg_qp, quad, lin)
    assert float((fast_only - ref).abs().max()) > 1.0  # the case needs the least-index phase
    assert _rel(got, ref) < 1e-12
    mult = quad @ got + lin  # KKT of the solution
    assert float(mult.min()) > -1e-12 and float((got * mult).abs().max()) < 1e-12
    assert _rel(nonneg_qp(quad, lin, iters=10), fast_only) < 1e-12  # and the compiled loop stops where torch's does


# --- PCGrad, CAGrad and the alpha-fair Newton solver (Nash-MTL, FairGrad) -------------------------------

def _well_posed(n: int, seed: int) -> dict[str, torch.Tensor]:
    """The hard Gramians, with a nearly opposite pair that still has a solution: ``g_1 = -g_0 + 1e-3 r``
    (``r`` random) instead of ``-(1 + 1e-9) g_0``. Exactly collinear opposite rows put 0 in the
    convex hull of the gradients: the fair condition ``G w = w^(-1/alpha)`` has no positive solution
    there and the Newton iterates grow without end in either path (checked separately below)."""
    cases = _gramians(n, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    j = torch.randn(n, 40, dtype=DT, generator=gen)
    j[1] = -j[0] + 1e-3 * torch.randn(40, dtype=DT, generator=gen)
    cases["opposite"] = j @ j.T
    return cases


@pytest.mark.parametrize("n", [2, 3, 16])
def test_pcgrad_coefficients_match_torch_for_the_same_orders(n):
    from polytask.balance.aggregators.conflict import _random_orders, pcgrad_coefficients

    for name, g in _gramians(n, seed=8).items():
        for seed in range(3):
            orders = _random_orders(n, g.device, torch.Generator().manual_seed(seed), False)
            got, ref = pcgrad_coefficients(g, orders), _torch_path(pcgrad_coefficients, g, orders)
            assert torch.equal(got.isnan(), ref.isnan()), name
            assert float((got - ref).abs().max()) <= 1e-13 * float(ref.abs().max()), (name, seed, _rel(got, ref))
    # hand case (Yu et al.'s Algorithm 1): g1 = (1, 0), g2 = (-1, 1) conflict (g1.g2 = -1);
    # g1^PC = g1 + g2/2 = (1/2, 1/2); g2^PC = g2 + g1 = (0, 1): coefficients [[1, 1/2], [1, 1]]
    g = torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=DT)
    orders = torch.tensor([[0, 1], [1, 0]])
    torch.testing.assert_close(pcgrad_coefficients(g, orders), torch.tensor([[1.0, 0.5], [1.0, 1.0]], dtype=DT), rtol=0, atol=1e-15)


def test_pcgrad_nan_gramian_propagates_as_in_torch():
    from polytask.balance.aggregators.conflict import _random_orders, pcgrad_coefficients

    g = _gramians(4, seed=9)["random"]
    g[1, 2] = g[2, 1] = float("nan")
    orders = _random_orders(4, g.device, torch.Generator().manual_seed(0), False)
    got, ref = pcgrad_coefficients(g, orders), _torch_path(pcgrad_coefficients, g, orders)
    assert bool(ref.isnan().any()) and torch.equal(got.isnan(), ref.isnan())


@pytest.mark.parametrize("n", [2, 3, 16])
def test_cagrad_dual_matches_torch(n):
    from polytask.balance.solvers import cagrad_dual

    for name, g in _well_posed(n, seed=10).items():
        normalized = g / g.trace().clamp_min(1e-300)  # as CAGrad calls it
        for c in (0.1, 0.4, 2.0):
            (got, ok), (ref, ref_ok) = cagrad_dual(normalized, c), _torch_path(cagrad_dual, normalized, c)
            assert bool(ok) == bool(ref_ok), (name, c)
            assert torch.equal(got.isnan(), ref.isnan()), (name, c)
            if bool(ref.isnan().all()):
                continue
            tol = 1e-10 if name == "opposite" else 1e-12
            assert float((got - ref).nan_to_num().abs().max()) <= tol * float(ref.nan_to_num().abs().max()), (name, c)


@pytest.mark.parametrize("name", ["pcgrad", "cagrad", "nash_mtl", "fairgrad"])
@pytest.mark.parametrize("n", [2, 16])
def test_conflict_and_fair_balancers_match_torch_over_consecutive_steps(name, n):
    """Each path keeps its own state (Nash-MTL's warm start; PCGrad's generator, seeded alike)."""
    for case, g in _well_posed(n, seed=11).items():
        cls = type(BALANCERS.build(name).aggregator)
        if name == "pcgrad":  # the same random orders on both sides
            fast, slow = (cls(generator=torch.Generator().manual_seed(5)) for _ in range(2))
        else:
            fast, slow = cls(), cls()
        for step in range(4):
            scaled = g * (1.0 + 0.3 * step)
            got, ref = fast.weights(scaled), _torch_path(slow.weights, scaled)
            assert torch.equal(got.isnan(), ref.isnan()), (case, step)
            assert float((got - ref).abs().max()) <= 1e-9 * float(ref.abs().max().clamp_min(1e-300)), (case, step, _rel(got, ref))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("n", [2, 3, 16])
def test_power_fair_weights_match_torch_with_and_without_a_warm_start(alpha, n):
    from polytask.balance.solvers import fair_residual, power_fair_weights

    for name, g in _well_posed(n, seed=12).items():
        gen = torch.Generator().manual_seed(1)
        for init in (None, torch.rand(n, dtype=DT, generator=gen), torch.tensor([float("nan")] + [0.0] * (n - 1), dtype=DT)):
            got = power_fair_weights(g, alpha, init=init)
            ref = _torch_path(power_fair_weights, g, alpha, init=init)
            assert float((got - ref).abs().max()) <= 1e-9 * float(ref.abs().max().clamp_min(1e-300)), (name, _rel(got, ref))
            if name != "zero":
                assert float(fair_residual(g, got, alpha)) < 1e-8, name  # and it is the solution


def test_power_fair_weights_without_a_solution_stay_finite_and_positive():
    """Rows ``g_1 = -(1 + 1e-9) g_0``: 0 is in the convex hull, no positive ``w`` has ``G w = 1 / w``,
    and the iterates of either path grow (residuals ~1 after 30 steps); the compiled one must still
    give finite positive weights, large on the opposite pair."""
    from polytask.balance.solvers import power_fair_weights

    for n in (2, 3, 16):
        g = _gramians(n)["opposite"]
        for w in (power_fair_weights(g, 1.0), _torch_path(power_fair_weights, g, 1.0)):
            assert bool(torch.isfinite(w).all()) and bool((w > 0).all()) and float(w[:2].min()) > 1e5


def test_kernels_divide_by_zero_as_torch_does_instead_of_raising():
    """numba's default (Python) error model raises ZeroDivisionError on x / 0.0; torch gives inf or NaN.
    A singular reduced system (an all-zero QP) must give non-finite values in both paths."""
    from polytask.balance.solvers import nonneg_qp

    quad, lin = torch.zeros(3, 3, dtype=DT), -torch.ones(3, dtype=DT)
    got, ref = nonneg_qp(quad, lin), _torch_path(nonneg_qp, quad, lin)
    assert not bool(torch.isfinite(got).all()) and not bool(torch.isfinite(ref).all())


# --- TrimmedMean's b = 1 block (float32 feature Jacobians too) --------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trimmed_mean_one_matches_torch_and_the_sort(dtype):
    from polytask.balance.robust import trimmed_mean

    gen = torch.Generator().manual_seed(13)
    for n in (3, 4, 16):
        jac = torch.randn(n, 5000, generator=gen, dtype=torch.float64).to(dtype)
        jac[:, :50] = jac[0, :50]  # whole columns equal (max == min)
        jac[: n // 2 + 1, 50:100] = jac[0, 50:100]  # ties at one end, beyond one entry
        jac[:, 100:150] = torch.randint(-2, 3, (n, 50), generator=gen).to(dtype)  # many ties at both ends
        jac[0, 150:200] = 1e30  # a huge outlier that must not cancel the rest
        jac[1, 200] = float("nan")
        jac[2, 201] = float("inf")
        jac[0, 202] = -0.0
        got, ref = trimmed_mean(jac, 1), _torch_path(trimmed_mean, jac, 1)
        assert got.dtype == dtype and torch.equal(got.isnan(), ref.isnan())
        assert bool(got[200:202].isnan().all())
        good = ~ref.isnan()
        eps = torch.finfo(dtype).eps
        # the mean of the middle values by a sort, in float64 (the definition)
        ordered, _ = torch.sort(jac.double(), dim=0)
        exact = ordered[1:n - 1].mean(dim=0).to(dtype)
        scale = jac.double().abs().clamp_max(1e3).amax(dim=0).to(dtype)  # the outlier is trimmed away
        assert bool(((got - exact).abs() <= 4 * n * eps * scale)[good].all())
        assert bool(((got - ref).abs() <= 4 * n * eps * scale)[good].all())


def test_trimmed_mean_compiled_path_runs_only_on_cpu_without_autograd():
    from polytask.balance import _solvers_numba
    from polytask.balance.robust import trimmed_mean

    calls = []
    jac = torch.randn(5, 30)
    original = _solvers_numba.trimmed_mean_one
    try:
        _solvers_numba.trimmed_mean_one = lambda j: calls.append(j.shape) or original(j)
        trimmed_mean(jac, 1)
        trimmed_mean(jac.clone().requires_grad_(), 1)  # autograd through it: the torch path
        trimmed_mean(jac, 2)  # b >= 2 sorts in torch
    finally:
        _solvers_numba.trimmed_mean_one = original
    assert calls == [(5, 30)]
