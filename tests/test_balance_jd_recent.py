"""The methods torchjd 0.18 ships that polytask added later: Krum, TrimmedMean, SDMGrad, MoDo,
CR-MOGM, PCD (gradient methods) and the constant / mean / PBI / COSMOS scalarisations.

Each has (a) equality with torchjd over several consecutive steps (stateful methods keep their
state across the steps on both sides), skipped inside the test only when torchjd is missing;
(b) a case computed by hand; (c) a property from the paper; and the tests below that can fail:
a wrong variant rejected, state restored. None of these methods draws random numbers, so every
comparison is exact up to rounding (float64). The registry-wide tests (tests/test_faults_balance_agg.py,
tests/test_balance_dist.py) pick the new names up by walking the registry.
"""

from __future__ import annotations

import pytest
import torch

from polytask import balance
from polytask.balance import robust, scalarizers, stateful_weightings as sw
from polytask.balance.aggregators import gramian_only as _gramian_only
from polytask.balance.solvers import project_simplex
from polytask.errors import ConfigError

try:  # the peer (pip install polytask[peers]); only the tests that compare with it skip without it
    import torchjd.aggregation as tja
    import torchjd.scalarization as tjs
except ImportError:  # pragma: no cover
    tja = tjs = None
peer = pytest.mark.skipif(tja is None, reason="torchjd 0.18 (the peers extra) is not installed")

DT = torch.float64


def _random(t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(t, 1, generator=g, dtype=DT) * 3 + 0.1
    return torch.randn(t, d, generator=g, dtype=DT) * scale


def _cases() -> list[tuple[str, torch.Tensor]]:
    """Random Jacobians plus hard ones: parallel, nearly opposite, a zero row, 1e-6..1e6 scales."""
    cases = [(f"rand{t}x{d}", _random(t, d, 10 * t + d)) for t, d in [(3, 5), (4, 40), (6, 3), (8, 100), (16, 64)]]
    g = _random(3, 20, 1)
    cases.append(("parallel", torch.stack([g[0], 2.5 * g[0], g[1]])))
    cases.append(("opposite", torch.stack([g[0], -(1 - 1e-9) * g[0], g[2]])))
    cases.append(("zero_row", torch.stack([g[0], torch.zeros_like(g[0]), g[1]])))
    j = _random(4, 30, 7)
    cases.append(("scale1e-8", j * 1e-8))
    cases.append(("rows1e-6to1e6", j * torch.tensor([[1e-6], [1e-2], [1e2], [1e6]], dtype=DT)))
    return cases


CASES = _cases()
IDS = [name for name, _ in CASES]


def _steps(jac: torch.Tensor, n: int = 4) -> list[torch.Tensor]:
    """``n`` consecutive Jacobians: the case, then perturbed copies (the state must carry over)."""
    t, d = jac.shape
    return [jac] + [jac + 0.3 * jac.norm(dim=1, keepdim=True) / d ** 0.5 * _random(t, d, 100 + k) for k in range(n - 1)]


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    scale = max(ref.norm().item(), 1e-300)
    err = (ours - ref).norm().item()
    assert err <= rtol * scale, f"{err / scale:.3g} > {rtol}"


# --- Krum and TrimmedMean ------------------------------------------------------------------------


KRUM_CASES = [(name, jac, f, m) for name, jac in CASES for f, m in [(0, 1), (1, 1), (1, 2), (0, 3)]
              if jac.shape[0] >= max(f + 3, m)]  # Krum needs T >= f + 3


@peer
@pytest.mark.parametrize("name,jac,n_byzantine,n_selected", KRUM_CASES, ids=[f"{c[0]}-f{c[2]}-m{c[3]}" for c in KRUM_CASES])
def test_krum_matches_torchjd(name, jac, n_byzantine, n_selected):
    ours = robust.Krum(n_byzantine=n_byzantine, n_selected=n_selected)(jac)
    _close(ours, tja.Krum(n_byzantine=n_byzantine, n_selected=n_selected)(jac), 1e-12)


def test_krum_by_hand_drops_the_outlier():
    # rows (0,0), (1,0), (0,1), (10,10); f = 0: each score sums the T - f - 2 = 2 nearest distances.
    # s0 = 1 + 1 = 2; s1 = 1 + sqrt2; s2 = 1 + sqrt2; s3 = |(10,10)-(1,0)| + |(10,10)-(0,1)| = 2 sqrt181.
    jac = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]], dtype=DT)
    assert torch.equal(robust.Krum()(jac), jac[0])
    # Multi-Krum with m = 3 averages rows 0, 1, 2: (1/3, 1/3); the outlier never counts.
    _close(robust.Krum(n_selected=3)(jac), torch.tensor([1 / 3, 1 / 3], dtype=DT), 1e-15)
    # The weights come from the Gramian alone (feature level), and are 1/m on the selected rows.
    w = robust.krum_weights(jac @ jac.T, 0, 3)
    assert torch.equal(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=DT))
    assert _gramian_only(robust.Krum())


TRIM_CASES = [(name, jac, b) for name, jac in CASES for b in (0, 1, 2) if jac.shape[0] >= 2 * b + 1]


@peer
@pytest.mark.parametrize("name,jac,trim", TRIM_CASES, ids=[f"{c[0]}-b{c[2]}" for c in TRIM_CASES])
def test_trimmed_mean_matches_torchjd(name, jac, trim):
    _close(robust.TrimmedMean(trim_number=trim)(jac), tja.TrimmedMean(trim_number=trim)(jac), 1e-14)


def test_trimmed_mean_by_hand():
    # column 0: {1, 2, 100, -50, 3} -> drop -50 and 100 -> mean(1, 2, 3) = 2
    # column 1: {0, 0, 0, 0, 7}     -> drop one 0 and 7  -> mean(0, 0, 0) = 0
    jac = torch.tensor([[1.0, 0.0], [2.0, 0.0], [100.0, 0.0], [-50.0, 0.0], [3.0, 7.0]], dtype=DT)
    update, weights = robust.TrimmedMean(trim_number=1).aggregate(jac)
    assert torch.equal(update, torch.tensor([2.0, 0.0], dtype=DT))
    _close(weights @ jac, update, 1e-10)  # the logged weights reproduce the update (it is in the span here)
    assert not _gramian_only(robust.TrimmedMean())  # per coordinate: needs the Jacobian


def test_krum_and_trimmed_mean_need_enough_tasks():
    jac = _random(3, 4, 0)
    with pytest.raises(ConfigError, match=r"^balancer.params.n_byzantine: krum .* needs at least 4 tasks, got 3$"):
        robust.Krum(n_byzantine=1)(jac)
    with pytest.raises(ConfigError, match=r"^balancer.params.trim_number: trimmed_mean .* needs at least 5 tasks, got 3$"):
        robust.TrimmedMean(trim_number=2)(jac)


# --- SDMGrad and MoDo ------------------------------------------------------------------------------


@peer
@pytest.mark.parametrize("params", [{}, {"lambda_": 0.0, "momentum": 0.0}, {"lambda_": 2.0, "lr": 1.0, "n_iter": 5}],
                         ids=["default", "no_pull", "strong_pull"])
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_sdmgrad_matches_torchjd_over_steps(name, jac, params):
    ours, ref = sw.SDMGrad(**params), tja.SDMGradWeighting(**params)
    for j in _steps(jac):
        gramian = j @ j.T
        _close(ours(j), ref(gramian) @ j, 1e-13)
    assert int(ours.steps) == 4


@peer
@pytest.mark.parametrize("params", [{}, {"gamma": 0.5, "rho": 0.0}], ids=["default", "no_rho"])
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_modo_matches_torchjd_over_steps(name, jac, params):
    ours, ref = sw.MoDo(**params), tja.MoDoWeighting(**params)
    for j in _steps(jac):
        w = ref(j @ j.T)
        _close(ours(j), w @ j, 1e-13)


@peer
def test_sdmgrad_and_modo_take_a_two_batch_matrix_as_torchjd():
    # The papers' unbiased version: A = J_1 J_2^T from two independent batches (not symmetric).
    ours_s, ref_s, ours_m, ref_m = sw.SDMGrad(), tja.SDMGradWeighting(), sw.MoDo(), tja.MoDoWeighting()
    for k in range(4):
        a = _random(4, 30, 200 + k) @ _random(4, 30, 300 + k).T
        _close(ours_s.weights(a), ref_s(a), 1e-10)
        _close(ours_m.weights(a), ref_m(a), 1e-12)


def test_sdmgrad_by_hand_one_inner_step():
    # G = diag(1, 4): scale = mean(1, 2) = 1.5, A = G / 2.25. w0 = (1/2, 1/2), w~ = (1/2, 1/2),
    # lambda = 1: grad = A (w0 + w~) = (1, 4)/2.25; w0 - lr grad with lr = 0.225 = (0.4, 0.1),
    # which sums to 0.5: the projection adds 0.25 to each -> (0.65, 0.35);
    # output (w + w~) / 2 = (0.575, 0.425).
    g = torch.diag(torch.tensor([1.0, 4.0], dtype=DT))
    w = sw.SDMGrad(lr=0.225, n_iter=1, lambda_=1.0).weights(g)
    _close(w, torch.tensor([0.575, 0.425], dtype=DT), 1e-7)  # the 1e-8 in the scale's denominator


def test_modo_by_hand_two_steps_carry_the_state():
    # G = diag(1, 3), gamma = 0.1, rho = 0: lambda0 = (1/2, 1/2); grad = (1/2, 3/2);
    # lambda0 - 0.1 grad = (0.45, 0.35) -> projection adds 0.1 -> (0.55, 0.45).
    # Step 2: grad = (0.55, 1.35) -> (0.495, 0.315) -> adds 0.095 -> (0.59, 0.41).
    g = torch.diag(torch.tensor([1.0, 3.0], dtype=DT))
    m = sw.MoDo(gamma=0.1, rho=0.0)
    _close(m.weights(g), torch.tensor([0.55, 0.45], dtype=DT), 1e-14)
    _close(m.weights(g), torch.tensor([0.59, 0.41], dtype=DT), 1e-14)
    # A new task set restarts from 1/T (as torchjd), and the counters say so.
    g3 = torch.eye(3, dtype=DT)
    _close(m.weights(g3), project_simplex(torch.full((3,), 1 / 3, dtype=DT) * 0.9), 1e-15)
    assert int(m.tasks) == 3 and int(m.steps) == 1


def test_sdmgrad_moves_towards_mgda_and_the_mean():
    # Property (paper, Section 4): lambda -> 0 gives MGDA's min-norm weights on the simplex, large lambda the mean.
    jac = _random(3, 10, 4)
    g = jac @ jac.T
    mgda = balance.get("mgda").aggregator.solve(g)
    near_mgda = sw.SDMGrad(lambda_=0.0, n_iter=2000, lr=1.0, momentum=0.0).weights(g)
    _close(near_mgda @ jac, mgda @ jac, 1e-6)
    near_mean = sw.SDMGrad(lambda_=1e6).weights(g)
    _close(near_mean, torch.full((3,), 1 / 3, dtype=DT), 1e-5)


# --- CR-MOGM -----------------------------------------------------------------------------------------


@peer
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_cr_mogm_matches_torchjd_over_steps(name, jac, alpha):
    # the base: UPGrad with torchjd's norm_eps, whose own equality with torchjd is tested elsewhere
    ours = sw.CRMOGM(base="upgrad", alpha=alpha, base_params={"norm_eps": 1e-4})
    ref = tja.GramianWeightedAggregator(tja.CRMOGMWeighting(tja.UPGradWeighting(), alpha=alpha))
    for j in _steps(jac):
        _close(ours(j), ref(j), 1e-12)


@peer
def test_cr_mogm_initial_weights_match_torchjd():
    init = [0.7, 0.2, 0.1]
    ours = sw.CRMOGM(base="imtl_g", alpha=0.8, initial_weights=init)
    ref = tja.CRMOGMWeighting(tja.IMTLGWeighting(), alpha=0.8, initial_weights=torch.tensor(init, dtype=DT))
    for j in _steps(_random(3, 12, 9)):
        _close(ours.solve(j @ j.T), ref(j @ j.T), 1e-7)  # IMTL-G: pinv vs torchjd's, ~1e-8 apart


def test_cr_mogm_by_hand_is_a_moving_average_of_the_base():
    # base "constant-like": MGDA on orthogonal rows of norms 1 and 2 gives w = (4, 1)/5 (min-norm point).
    # lambda_1 = w^_1 (no initial weights); with initial weights (1, 0) and alpha = 0.5:
    # lambda_1 = 0.5 (1, 0) + 0.5 (0.8, 0.2) = (0.9, 0.1); lambda_2 = 0.5 (0.9, 0.1) + 0.5 (0.8, 0.2) = (0.85, 0.15).
    g = torch.diag(torch.tensor([1.0, 4.0], dtype=DT))
    plain = sw.CRMOGM(alpha=0.5)
    _close(plain.weights(g), torch.tensor([0.8, 0.2], dtype=DT), 1e-9)
    c = sw.CRMOGM(alpha=0.5, initial_weights=[1.0, 0.0])
    _close(c.weights(g), torch.tensor([0.9, 0.1], dtype=DT), 1e-9)
    _close(c.weights(g), torch.tensor([0.85, 0.15], dtype=DT), 1e-9)


def test_cr_mogm_refuses_a_base_that_needs_the_jacobian():
    with pytest.raises(ConfigError, match=r"^balancer.params.base: cr_mogm needs a gradient balancer that needs only the Gramian, got 'graddrop'$"):
        sw.CRMOGM(base="graddrop")
    with pytest.raises(ConfigError, match=r"^balancer.params.base: cr_mogm needs .*got 'ew'$"):
        sw.CRMOGM(base="ew")
    with pytest.raises(ConfigError, match=r"^balancer.params.base_params.eps: balancer 'mgda' has no parameter 'eps'"):
        sw.CRMOGM(base="mgda", base_params={"eps": 1.0})
    with pytest.raises(ConfigError, match=r"^balancer.params.base: unknown balancer 'mgdaa' \(did you mean mgda"):
        sw.CRMOGM(base="mgdaa")
    with pytest.raises(ConfigError, match=r"^balancer.params.base_params.mode: cr_mogm"):
        sw.CRMOGM(base="mgda", base_params={"mode": "features"})


def test_cr_mogm_random_base_draws_from_the_seeded_generator():
    # PCGrad as the base: two balancers with the same seed give the same updates; the seed reaches the base.
    jac = _random(4, 10, 2)
    a = balance.get("cr_mogm", base="pcgrad", seed=5)
    b = balance.get("cr_mogm", base="pcgrad", seed=5)
    a._seed_generator(jac.device, None)
    b._seed_generator(jac.device, None)
    assert a.aggregator.inner.generator is not None
    for _ in range(3):
        assert torch.equal(a.aggregator(jac), b.aggregator(jac))


# --- PCD ------------------------------------------------------------------------------------------------


@peer
@pytest.mark.parametrize("tau", [0.02, 0.5, 1.0])
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_pcd_matches_torchjd_over_steps(name, jac, tau):
    ours, ref = sw.PCD(tau=tau, beta=0.9), tja.PCD(tau=tau, beta=0.9)
    for j in _steps(jac):
        _close(ours(j), ref(j), 1e-9)  # the dual QP's 1e-12 regularisation: ~1e-11 at worst


@peer
def test_pcd_hard_cases_match_torchjd():
    g = _random(4, 20, 3)
    cases = {
        "infeasible": torch.stack([g[0], g[1], -g[1], g[2]]),  # two opposite secondary gradients: update = g_1
        "zero_primary": torch.stack([torch.zeros_like(g[0]), g[1], g[2]]),
        "primary_opposes_all": torch.stack([g[0], -g[0], -2 * g[0]]),
        "vector_tau": g,
    }
    for name, jac in cases.items():
        kwargs = {"tau": [0.1, 0.3, 0.9]} if name == "vector_tau" else {}
        ours = sw.PCD(**kwargs)
        ref = tja.PCD(**({"tau": torch.tensor(kwargs["tau"], dtype=DT)} if kwargs else {}))
        for j in _steps(jac, 3):
            _close(ours(j), ref(j), 1e-9)


def test_pcd_by_hand_and_its_constraint():
    # g_1 = (1, 0), g_2 = (-1, 1), first step: v^ = ||g||^2 so g~_1 = (1, 0), g~_2 = (-1, 1)/sqrt2 (eps ~ 0).
    # tau = 0.5: need g~_2 . d >= 0.5; at d = g~_1: -1/sqrt2 < 0.5, so the constraint is active:
    # d = g~_1 + mu g~_2 with g~_2.g~_1 + mu |g~_2|^2 = 0.5 -> mu = 0.5 + 1/sqrt2;
    # d = (1 - mu/sqrt2, mu/sqrt2) = (0.5 - 0.5/sqrt2 - ... ) computed below, then rescaled to |g_1| = 1.
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=DT)
    r2 = 2 ** 0.5
    mu = 0.5 + 1 / r2
    d = torch.tensor([1 - mu / r2, mu / r2], dtype=DT)
    expected = d / d.norm()
    ours = sw.PCD(tau=0.5, eps=0.0)(jac)
    _close(ours, expected, 1e-10)  # the dual QP's 1e-12 regularisation
    # the paper's guarantee on the normalised gradients: g~_2 . (d / |d| * |g_1|) scales tau |g~_2|^2 by |g_1|/|d~|
    assert (jac[1] / r2) @ ours >= 0.5 / d.norm() - 1e-12


def test_pcd_weights_solver_reports_infeasible_and_feasible():
    g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], dtype=DT)
    w = sw.pcd_weights(g @ g.T, torch.full((2,), 0.1, dtype=DT))
    assert torch.equal(w, torch.tensor([1.0, 0.0, 0.0], dtype=DT))  # both secondaries cannot both progress
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    _close(sw.pcd_weights(h @ h.T, torch.tensor([0.5], dtype=DT)), torch.tensor([1.0, 0.5], dtype=DT), 1e-10)


# --- state: save / restore, and the engine's guard ------------------------------------------------------


@pytest.mark.parametrize("name,params", [("sdmgrad", {"n_iter": 2, "lr": 0.1}), ("modo", {}), ("cr_mogm", {"base": "nash_mtl"}), ("pcd", {})])
def test_state_dict_round_trip_resumes_exactly(name, params):
    steps = _steps(_random(3, 15, 8), 5)
    whole = balance.get(name, **params).aggregator
    full = [whole(j) for j in steps]
    first = balance.get(name, **params).aggregator
    for j in steps[:2]:
        first(j)
    resumed = balance.get(name, **params).aggregator
    resumed.load_state_dict(first.state_dict())
    for j, ref in zip(steps[2:], full[2:]):
        assert torch.equal(resumed(j), ref)
    fresh = balance.get(name, **params).aggregator  # and without the state it differs: the state matters
    assert not torch.equal(fresh(steps[2]), full[2])


@pytest.mark.parametrize("name", ["sdmgrad", "modo", "cr_mogm", "pcd", "krum", "trimmed_mean"])
def test_a_nan_step_is_skipped_and_the_state_kept(name):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 6).double()
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1).double() for _ in range(3))
    x = torch.randn(8, 4, dtype=DT)

    def run(bad: bool) -> list[torch.Tensor]:
        b = balance.get(name)
        out = []
        for step in range(3):
            trunk.zero_grad(set_to_none=True)
            if bad or step != 1:
                z = torch.tanh(trunk(x))
                losses = {f"t{i}": (h(z) ** 2).mean() * (i + 1 + step) for i, h in enumerate(heads)}
                if bad and step == 1:
                    losses["t0"] = losses["t0"] * float("nan")
                b.backward(losses, shared=list(trunk.parameters()))
                out.append(trunk.weight.grad.clone())
        assert int(b.skipped_steps) == int(bad)
        return out

    with_nan, without = run(True), run(False)
    assert torch.count_nonzero(with_nan[1]) == 0
    assert torch.equal(with_nan[2], without[1])  # the step after the NaN as if it never came


# --- scalarizers ------------------------------------------------------------------------------------------


def _losses() -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=DT) for v in ([1.0, 2.0, 3.0], [0.3, 5.0], [1e-4, 1e4, 1.0, 2.0], [2.0, 2.0, 2.0])]


def _peer_weights(scalarizer, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = losses.clone().requires_grad_(True)
    value = scalarizer(x)
    return value.detach(), torch.autograd.grad(value, x)[0]


@peer
@pytest.mark.parametrize("theta", [0.0, 5.0])
@pytest.mark.parametrize("with_pref", [False, True])
def test_pbi_matches_torchjd(theta, with_pref):
    for losses in _losses():
        t = losses.shape[0]
        pref = [float(i + 1) for i in range(t)] if with_pref else None
        ref_pref = torch.tensor(pref, dtype=DT) if with_pref else torch.ones(t, dtype=DT)
        reference = [0.1 * i for i in range(t)] if with_pref else None
        ref = tjs.PBI(theta, ref_pref, None if reference is None else torch.tensor(reference, dtype=DT))
        ours = scalarizers.PBI(theta=theta, preference=pref, reference=reference)
        value, grad = _peer_weights(ref, losses)
        _close(ours.objective(losses), value, 1e-14)
        _close(ours.weights(losses), grad, 1e-12)


@peer
@pytest.mark.parametrize("lambda_", [0.0, 0.5, 8.0])
def test_cosmos_matches_torchjd(lambda_):
    for losses in _losses():
        t = losses.shape[0]
        pref = torch.distributions.Dirichlet(torch.ones(t, dtype=DT)).sample() if lambda_ else torch.full((t,), 1 / t, dtype=DT)
        ref = tjs.COSMOS(lambda_, pref)
        ours = scalarizers.COSMOS(lambda_=lambda_, preference=pref.tolist())
        value, grad = _peer_weights(ref, losses)
        _close(ours.objective(losses), value, 1e-14)
        _close(ours.weights(losses), grad, 1e-12)


@peer
def test_constant_and_mean_match_torchjd():
    for losses in _losses():
        t = losses.shape[0]
        w = [0.5 * (i + 1) for i in range(t)]
        _close(scalarizers.ConstantWeighting(weights=w).weights(losses), _peer_weights(tjs.Constant(torch.tensor(w, dtype=DT)), losses)[1], 0)
        _close(scalarizers.MeanWeighting().weights(losses), _peer_weights(tjs.Mean(), losses)[1], 1e-15)
        # and the aggregator form of torchjd's Constant: J^T w, the update of Σ w_t L_t
        jac = _random(t, 7, t)
        _close(torch.tensor(w, dtype=DT) @ jac, tja.Constant(torch.tensor(w, dtype=DT))(jac), 1e-15)


def test_pbi_and_cosmos_by_hand():
    # PBI, w = (1, 1), L = (3, 1): w^ = (1, 1)/sqrt2, d1 = 4/sqrt2 = 2 sqrt2, p = (3, 1) - (2, 2) = (1, -1),
    # d2 = sqrt2; theta = 2: f = 2 sqrt2 + 2 sqrt2 = 4 sqrt2; weights = w^ + 2 p / sqrt2 = (1/sqrt2 + sqrt2, 1/sqrt2 - sqrt2).
    r2 = 2 ** 0.5
    pbi = scalarizers.PBI(theta=2.0)
    losses = torch.tensor([3.0, 1.0], dtype=DT)
    _close(pbi.objective(losses), torch.tensor(4 * r2, dtype=DT), 1e-12)
    _close(pbi.weights(losses), torch.tensor([1 / r2 + r2, 1 / r2 - r2], dtype=DT), 1e-12)
    # COSMOS, r = (1/2, 1/2), L = (3, 4), lambda = 1: r.L = 3.5, |r| = 1/sqrt2, |L| = 5, cos = 3.5 sqrt2 / 5;
    # d cos / dL = r / (|r||L|) - (r.L) L / (|r| |L|^3) = (sqrt2/10 - 3.5 sqrt2 3/125, sqrt2/10 - 3.5 sqrt2 4/125).
    cosmos = scalarizers.COSMOS(lambda_=1.0)
    losses = torch.tensor([3.0, 4.0], dtype=DT)
    dcos = torch.tensor([r2 / 10 - 3.5 * r2 * 3 / 125, r2 / 10 - 3.5 * r2 * 4 / 125], dtype=DT)
    _close(cosmos.weights(losses), 0.5 - dcos, 1e-12)
    _close(cosmos.objective(losses), torch.tensor(3.5 - 3.5 * r2 / 5, dtype=DT), 1e-12)


def test_scalarizer_backward_gives_the_objective_gradient():
    # the balancer's backward is the gradient of f(L(theta)) itself (PBI weights may be negative)
    theta = torch.tensor([0.3, -1.2, 2.0], dtype=DT, requires_grad=True)
    for name, params in [("pbi", {"theta": 5.0, "preference": [1.0, 2.0]}), ("cosmos", {"lambda_": 2.0}),
                         ("constant", {"weights": [0.2, 3.0]}), ("mean", {})]:
        b = balance.get(name, **params)
        theta.grad = None
        losses = {"a": (theta ** 2).sum(), "b": (theta - 1).abs().sum() + theta[0] * theta[1]}
        b.backward(losses, parameters=[theta])
        vec = torch.stack([(theta ** 2).sum(), (theta - 1).abs().sum() + theta[0] * theta[1]])
        f = b.objective(vec) if hasattr(b, "objective") else b.weights(vec.detach()) @ vec
        expected = torch.autograd.grad(f, theta)[0]
        _close(theta.grad, expected, 1e-12)


# --- configuration errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params,message", [
    ("sdmgrad", {"lr": 0.0}, r"^balancer.params.lr: sdmgrad needs lr > 0, got 0.0$"),
    ("sdmgrad", {"momentum": 1.0}, r"^balancer.params.momentum: sdmgrad needs momentum in \[0, 1\), got 1.0$"),
    ("modo", {"gamma": -1.0}, r"^balancer.params.gamma: modo needs gamma > 0, got -1.0$"),
    ("cr_mogm", {"alpha": 1.5}, r"^balancer.params.alpha: cr_mogm needs alpha in \[0, 1\], got 1.5$"),
    ("pcd", {"tau": 2.0}, r"^balancer.params.tau: pcd needs tau in \[0, 1\], got 2.0$"),
    ("krum", {"n_byzantine": -1}, r"^balancer.params.n_byzantine: krum needs n_byzantine >= 0, got -1$"),
    ("trimmed_mean", {"trim_number": -1}, r"^balancer.params.trim_number: trimmed_mean needs trim_number >= 0, got -1$"),
    ("pbi", {"theta": -1.0}, r"^balancer.params.theta: pbi needs theta >= 0, got -1.0$"),
    ("cosmos", {"lambda_": -1.0}, r"^balancer.params.lambda: cosmos needs lambda_ >= 0|^balancer.params.lambda_: cosmos"),
    ("sdmgrad", {"lamda": 0.3}, r"^balancer.params.lamda: .*did you mean lambda"),
    ("pcd", {"taus": 0.3}, r"^balancer.params.taus: .*did you mean tau"),
    ("pbi", {"weights": [1.0]}, r"^balancer.params.weights: balancer 'pbi' has no parameter 'weights'; it takes: nan_policy, preference, reference, theta$"),
])
def test_bad_parameters_are_one_line_config_errors(name, params, message):
    with pytest.raises(ConfigError, match=message) as info:
        balance.get(name, **params)
    assert "\n" not in str(info.value)


def test_wrong_task_counts_are_config_errors():
    with pytest.raises(ConfigError, match=r"^balancer.params.preference: pbi has 3 entries for 2 tasks$"):
        balance.get("pbi", preference=[1.0, 1.0, 1.0]).weights(torch.ones(2, dtype=DT))
    with pytest.raises(ConfigError, match=r"^balancer.params.tau: pcd needs one tau per secondary task \(2\), got 1$"):
        sw.PCD(tau=[0.1])(_random(3, 4, 1))


def test_trimmed_mean_does_not_hide_a_non_finite_entry():
    # torchjd's sort puts NaN last and trims it away; here the column becomes NaN so the engine skips the step.
    jac = _random(5, 4, 3)
    jac[2, 1] = float("nan")
    jac[4, 3] = float("inf")
    update = robust.TrimmedMean(trim_number=1)(jac)
    assert torch.isnan(update[1]) and torch.isnan(update[3])
    clean = jac[:, [0, 2]]
    _close(update[[0, 2]], tja.TrimmedMean(trim_number=1)(clean) if tja else clean.sort(0)[0][1:4].mean(0), 1e-15)


@pytest.mark.parametrize("name,params", [("sdmgrad", {"n_iter": 2, "lr": 0.1}), ("modo", {}),
                                         ("cr_mogm", {"base": "nash_mtl"}), ("pcd", {})])
def test_reset_starts_afresh(name, params):
    steps = _steps(_random(3, 15, 8), 3)
    used = balance.get(name, **params).aggregator
    for j in steps[:2]:
        used(j)
    used.reset()
    fresh = balance.get(name, **params).aggregator
    assert torch.equal(used(steps[2]), fresh(steps[2]))


def test_the_new_methods_are_registered_and_the_gramian_ones_run_at_feature_level():
    gramian_only = {"sdmgrad", "modo", "cr_mogm", "pcd", "krum"}
    assert gramian_only | {"trimmed_mean", "constant", "mean", "pbi", "cosmos"} <= set(balance.names())
    for name in gramian_only:
        assert _gramian_only(balance.get(name).aggregator), name
    assert not _gramian_only(balance.get("trimmed_mean").aggregator)
    assert "stateful_weightings.SDMGrad" in balance.BALANCERS.lookup("sdmgrad").__doc__


def _torchjd_reference(name: str):
    return {"sdmgrad": lambda: tja.GramianWeightedAggregator(tja.SDMGradWeighting()),
            "modo": lambda: tja.GramianWeightedAggregator(tja.MoDoWeighting()),
            "cr_mogm": lambda: tja.GramianWeightedAggregator(tja.CRMOGMWeighting(tja.UPGradWeighting())),
            "pcd": lambda: tja.PCD(), "krum": lambda: tja.Krum(n_byzantine=1, n_selected=2),
            "trimmed_mean": lambda: tja.TrimmedMean(trim_number=1)}[name]()


@peer
@pytest.mark.parametrize("name,params", [("sdmgrad", {}), ("modo", {}), ("cr_mogm", {"base": "upgrad", "base_params": {"norm_eps": 1e-4}}),
                                         ("pcd", {}), ("krum", {"n_byzantine": 1, "n_selected": 2}), ("trimmed_mean", {})])
def test_the_balancer_trains_as_torchjd_over_steps(name, params):
    # Through the engine (parameter mode, 4 tasks, 3 SGD steps): the shared gradient equals torchjd's
    # aggregator applied to the Jacobian of the same losses, with the state carried on both sides.
    torch.manual_seed(0)
    trunk = torch.nn.Linear(5, 6).double()
    heads = [torch.nn.Linear(6, 1).double() for _ in range(4)]
    x = torch.randn(16, 5, dtype=DT)
    ys = torch.randn(4, 16, 1, dtype=DT) * torch.tensor([1.0, 3.0, 0.1, 10.0], dtype=DT)[:, None, None]
    ours, ref = balance.get(name, **params), _torchjd_reference(name)
    shared = list(trunk.parameters())
    for step in range(3):
        z = torch.tanh(trunk(x))
        losses = {f"t{i}": ((h(z) - ys[i]) ** 2).mean() for i, h in enumerate(heads)}
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                for loss in losses.values()]
        expected = ref(torch.stack(rows))
        for p in shared:
            p.grad = None
        ours.backward(losses, shared=shared)
        got = torch.cat([p.grad.reshape(-1) for p in shared])
        _close(got, expected, 1e-9)
        with torch.no_grad():
            for p in shared:
                p -= 0.05 * p.grad


def _refuse(*args, **kwargs):
    raise AssertionError("host synchronisation inside a training step")


@pytest.mark.parametrize("name", ["constant", "mean", "pbi", "cosmos"])
def test_scalarizers_make_no_host_sync(name, monkeypatch):
    theta = torch.tensor([0.3, -1.2, 2.0], dtype=DT, requires_grad=True)
    b = balance.get(name)

    def step() -> torch.Tensor:
        theta.grad = None
        b.backward({"a": (theta ** 2).sum(), "b": (theta - 1).abs().sum(), "c": theta.exp().sum()}, parameters=[theta])
        return theta.grad

    step()
    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, attr, _refuse)
    for _ in range(2):
        step()
    monkeypatch.undo()
    assert torch.isfinite(step()).all()


@pytest.mark.parametrize("name", ["sdmgrad", "pcd", "cr_mogm"])
def test_steps_with_cuda_graphs_match_eager(monkeypatch, name):
    """SDMGrad's inner loop and PCD's dual QP replay as CUDA graphs: on the CPU through the fake graph of
    tests/test_balance_cuda_graphs.py (everything but the capture), several steps equal the eager run."""
    from test_balance_cuda_graphs import FakeGraphs

    from polytask.balance import compiled, solvers

    graphs = FakeGraphs()
    monkeypatch.setattr(compiled, "USE_COMPILED", False)  # the graphs stand in for CUDA, where no compiled loop runs
    monkeypatch.setattr(solvers, "_GRAPH_DEVICE", "cpu")
    monkeypatch.setattr(solvers, "_capture", graphs)
    monkeypatch.setattr(solvers, "_GRAPHS", {})
    steps = _steps(_random(4, 12, 5), 4)
    results = {}
    for on in (True, False):
        monkeypatch.setattr(solvers, "CUDA_GRAPHS", on)
        method = balance.get(name).aggregator
        with torch.no_grad():
            results[on] = [method(j) for j in steps]
    assert len(graphs.captured) >= 1 and graphs.replays >= len(steps)
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_pcd_solution_satisfies_the_kkt_conditions(name, jac):
    # Paper's problem on the normalised Gramian: primal feasibility g~_j.d~ >= tau |g~_j|^2, mu >= 0, and
    # complementary slackness mu_j (g~_j.d~ - tau |g~_j|^2) = 0; or, if infeasible, w = e_1.
    s = jac.norm(dim=1).clamp_min(1e-300).reciprocal()
    s = torch.where(jac.norm(dim=1) > 0, s, torch.zeros_like(s))
    g = (jac @ jac.T) * torch.outer(s, s)
    tau = torch.full((jac.shape[0] - 1,), 0.3, dtype=DT)
    w = sw.pcd_weights(g, tau)
    mu = w[1:]
    slack = g[1:] @ w - tau * g.diagonal()[1:]
    top = g.diagonal().max()
    assert w[0] == 1 and (mu >= 0).all()
    if (mu == 0).all() and (slack < -1e-6 * top).any():
        return  # declared infeasible (only for the nearly opposite pair here): the update is g_1
    assert (slack >= -1e-9 * top).all(), slack
    assert (mu * slack).abs().max() <= 1e-9 * top * max(1.0, mu.max().item())


@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_sdmgrad_and_modo_weights_stay_on_the_simplex(name, jac):
    s, m = sw.SDMGrad(), sw.MoDo()
    for j in _steps(jac):
        g = j @ j.T
        for w in (s.weights(g), m.weights(g)):
            assert (w >= 0).all() and abs(w.sum().item() - 1) < 1e-12
