"""Gradient aggregators: equivalence with torchjd 0.18 where it has the method, paper properties else.

The peer tests (``@peer``) skip when torchjd is missing; the hand-computed and property tests always run.

torchjd computes CAGrad and Nash-MTL with cvxpy, UPGrad/DualProj with quadprog and FairGrad with
scipy; those comparisons are skipped when the optional packages are missing. Jacobians are
float64 so that differences come from the methods, not from rounding.
"""

from __future__ import annotations

import inspect
import math

import warnings

import pytest
import torch

from polytask.balance import aggregators as agg
from polytask.balance.solvers import cagrad_dual, frank_wolfe_min_norm, nonneg_qp, power_fair_weights, project_simplex

try:  # the peer (pip install polytask[peers]); only the tests that compare with it skip without it
    import torchjd.aggregation as tja
except ImportError:  # pragma: no cover
    tja = None
peer = pytest.mark.skipif(tja is None, reason="torchjd 0.18 (the peers extra) is not installed")

DT = torch.float64


def _random(t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(t, 1, generator=g, dtype=DT) * 3 + 0.1
    return torch.randn(t, d, generator=g, dtype=DT) * scale


def _cases() -> list[tuple[str, torch.Tensor]]:
    """Random matrices of several shapes plus degenerate ones."""
    cases = [(f"rand{t}x{d}", _random(t, d, 10 * t + d)) for t, d in [(2, 5), (3, 40), (5, 3), (8, 100), (16, 64), (32, 200)]]
    g = _random(3, 20, 1)
    cases.append(("parallel", torch.stack([g[0], 2.5 * g[0], g[1]])))
    cases.append(("opposite", torch.stack([g[0], -0.5 * g[0], g[2]])))
    cases.append(("zero_row", torch.stack([g[0], torch.zeros_like(g[0]), g[1]])))
    cases.append(("T1", _random(1, 30, 5)))
    cases.append(("T32", _random(32, 50, 6)))
    j = _random(4, 30, 7)  # scaled inputs, as torchjd's tests have them (STYLE.md, smell 5)
    cases.append(("scale1e-10", j * 1e-10))
    cases.append(("scale1e10", j * 1e10))
    cases.append(("rows1e-6to1e6", j * torch.tensor([[1e-6], [1e-2], [1e2], [1e6]], dtype=DT)))
    return cases


CASES = _cases()
IDS = [name for name, _ in CASES]


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    scale = max(ref.norm().item(), 1e-12)
    assert (ours - ref).norm().item() <= rtol * scale, f"{(ours - ref).norm().item() / scale:.3g} > {rtol}"


# --- deterministic Gramian/Jacobian methods ---------------------------------------------------


@peer
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_mgda_matches_torchjd(name, jac):
    _close(agg.MGDA(solver="frank_wolfe")(jac), tja.MGDA()(jac), 1e-10)


@peer
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_imtlg_matches_torchjd(name, jac):
    _close(agg.IMTLG()(jac), tja.IMTLG()(jac), 1e-9)


@peer
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_aligned_mtl_matches_torchjd(name, jac, scale_mode):
    _close(agg.AlignedMTL(scale_mode=scale_mode)(jac), tja.AlignedMTL(scale_mode=scale_mode)(jac), 1e-8)


@peer
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_config_matches_torchjd(name, jac):
    _close(agg.ConFIG()(jac), tja.ConFIG()(jac), 1e-8)


@peer
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_graddrop_matches_torchjd_same_draw(name, jac):
    leak = [0.1 * i % 0.5 for i in range(jac.shape[0])]
    torch.manual_seed(3)
    ours = agg.GradDrop(leak=leak)(jac)
    torch.manual_seed(3)
    ref = tja.GradDrop(leak=torch.tensor(leak, dtype=DT))(jac)
    _close(ours, ref, 1e-12)


def _torchjd_orders(t: int, seed: int, exclude_self: bool) -> torch.Tensor:
    """The permutations torchjd draws (one ``randperm`` per task, in order) after ``manual_seed``."""
    torch.manual_seed(seed)
    rows = []
    for i in range(t):
        if exclude_self:
            others = [j for j in range(t) if j != i]
            rows.append([others[k] for k in torch.randperm(t - 1).tolist()])
        else:
            rows.append(torch.randperm(t).tolist())
    return torch.tensor(rows, dtype=torch.long).reshape(t, -1)


@peer
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_pcgrad_matches_torchjd_same_orders(name, jac):
    orders = _torchjd_orders(jac.shape[0], 7, exclude_self=False)
    ours = agg.pcgrad_coefficients(jac @ jac.T, orders).sum(0) @ jac
    torch.manual_seed(7)
    _close(ours, tja.PCGrad()(jac), 1e-10)


@peer
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_gradvac_matches_torchjd_over_steps(name, jac):
    t = jac.shape[0]
    ref_agg = tja.GradVac(beta=0.3)
    phi_hat = torch.zeros(t, t, dtype=DT)
    for step in range(3):
        j = jac + 0.3 * _random(t, jac.shape[1], 100 + step)
        orders = _torchjd_orders(t, step, exclude_self=True) if t > 1 else torch.zeros(1, 0, dtype=torch.long)
        coef, phi_hat = agg.gradvac_coefficients(j @ j.T, phi_hat, orders, 0.3, 1e-8)
        torch.manual_seed(step)
        _close(coef.sum(0) @ j, ref_agg(j), 1e-9)


@peer
def test_excess_mtl_matches_torchjd_over_steps():
    # With a warm-up both set the baseline from it. Without one, torchjd 0.18 applies the raw,
    # unnormalised excess risk at the first step, which the paper and the authors' code do not
    # (see test_excess_mtl_first_step_and_second_step_by_hand).
    ours, ref = agg.ExcessMTL(robust_step_size=0.5, n_warmup_steps=2), tja.ExcessMTL(0.5, 2)
    for step in range(5):
        j = _random(4, 30, 200 + step)
        _close(ours(j), ref(j), 1e-10)


def test_excess_mtl_first_step_and_second_step_by_hand():
    # He et al. (ICML 2024), Eqs. 6-7 and 9 with the first step as the baseline (Sec. 3.2):
    # E_i = sum_k g_ik^2 / sqrt(S_ik + 1e-7), S = running sum of g^2; step 1 only sets E^0 (weights
    # stay uniform, whatever the gradient scales); step 2: w = softmax(log(1/2) + eta E / E^0).
    eta = 0.5
    j1 = torch.tensor([[3.0, 4.0], [0.1, 0.0]], dtype=DT)  # task 0 has ~70x the gradient of task 1
    j2 = torch.tensor([[1.0, 0.0], [0.0, 0.2]], dtype=DT)
    method = agg.ExcessMTL(robust_step_size=eta)
    update, w1 = method.aggregate(j1)
    assert torch.allclose(w1, torch.tensor([0.5, 0.5], dtype=DT), atol=0) and torch.allclose(update, 0.5 * j1.sum(0))
    e0 = [9 / math.sqrt(9 + 1e-7) + 16 / math.sqrt(16 + 1e-7), 0.01 / math.sqrt(0.01 + 1e-7) + 0.0]
    e2 = [1 / math.sqrt(10 + 1e-7) + 0.0, 0.0 + 0.04 / math.sqrt(0.04 + 1e-7)]
    logits = [math.log(0.5) + eta * a / (b + 1e-7) for a, b in zip(e2, e0)]
    expected = torch.tensor([math.exp(v) for v in logits], dtype=DT)
    expected = expected / expected.sum()
    update, w2 = method.aggregate(j2)
    assert torch.allclose(w2, expected, rtol=1e-12, atol=0) and torch.allclose(update, expected @ j2, rtol=1e-12)
    assert w2[1] > w2[0]  # task 1's excess risk grew 20x relative to its start, task 0's fell


# --- methods whose torchjd version needs optional solvers -----------------------------------------


@peer
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_upgrad_and_dualproj_match_torchjd(name, jac):
    pytest.importorskip("qpsolvers")
    pytest.importorskip("quadprog")
    # torchjd counts a Jacobian with ||J||_F^2 < 1e-4 as zero (its norm_eps; ours defaults to 0, so
    # that small gradients are not averaged into a conflicting update): compare at unit norm, scaled
    norm = jac.norm()
    _close(agg.UPGrad()(jac), norm * tja.UPGrad()(jac / norm), 1e-7)
    _close(agg.DualProj()(jac), norm * tja.DualProj()(jac / norm), 1e-7)
    if norm ** 2 >= 1e-4:  # where torchjd normalises too, equal as they are
        _close(agg.UPGrad()(jac), tja.UPGrad()(jac), 1e-7)
        _close(agg.UPGrad(norm_eps=1e-4)(jac * 1e-3), tja.UPGrad()(jac * 1e-3), 1e-7)  # torchjd's threshold, on request


def _projection_on_dual_cone(jac: torch.Tensor) -> torch.Tensor:
    """cvxpy (Clarabel): the point of ``{d : J d >= 0}`` closest to the mean gradient."""
    cp = pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    # the cone and the projection are scale-invariant: unit rows, unit g0, scaled back
    rows = (jac / jac.norm(dim=1, keepdim=True).clamp_min(1e-300)).numpy()
    g0 = jac.mean(0)
    d = cp.Variable(jac.shape[1])
    cp.Problem(cp.Minimize(cp.sum_squares(d - (g0 / g0.norm()).numpy())), [rows @ d >= 0]).solve(
        cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return torch.tensor(d.value, dtype=DT) * g0.norm()


@peer
@pytest.mark.parametrize("c", [0.4, 1.0])
@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_cagrad_matches_torchjd(name, jac, c):
    pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    # torchjd returns 0 whenever ||J||_F^2 < norm_eps = 1e-4; ours normalises every scale (the
    # update is homogeneous in J): compare with torchjd at unit norm, scaled back
    ours, ref = agg.CAGrad(c=c)(jac), jac.norm() * tja.CAGrad(c=c)(jac / jac.norm())
    if ref.abs().max() == 0 and jac.mean(0).norm() > 0:
        # torchjd's "Pareto front" branch (||g_w|| < norm_eps): it returns 0, which lies outside the
        # ball ||d - g0|| <= c ||g0|| for c < 1. The dual value is 0 there, every d of the ball with
        # J d >= 0 is optimal, and ours is the one closest to g0: the projection (checked with cvxpy).
        # A 1e-6 row next to a 1e6 one is such a zero row at that precision.
        assert name in ("zero_row", "opposite", "rows1e-6to1e6")  # the degenerate cases of CASES, and only those
        _close(ours, _projection_on_dual_cone(jac), 1e-6)
        assert (ours - jac.mean(0)).norm() <= c * jac.mean(0).norm() * (1 + 1e-9)
        return
    # torchjd's conic solver stops at ~1e-8 on the objective; the weights amplify that error by
    # c||g0|| / ||g_w||, so the vectors are compared at 1e-3 relative to the mean gradient.
    scale = jac.mean(0).norm().item()
    assert (ours - ref).norm().item() <= 1e-3 * scale + 1e-12


@pytest.mark.parametrize("device_path", [False, True], ids=["cpu", "fixed_iterations"])
def test_cagrad_with_a_zero_gradient_by_hand(device_path, monkeypatch):
    # J = [g1; g2; 0]: task 3 has no labelled rows. g1 = e1, g2 = (-2, 1), g0 = (-1/3, 1/3),
    # ||g0|| = sqrt(2)/3. The zero row makes min_i g_i.d <= 0, and the cone {d : d1 >= 0, d2 >= 2 d1}
    # is at distance 1/3 from g0 (its closest point is p = (0, 1/3)). For c < 1/sqrt(2) the ball
    # misses the cone: the dual minimiser is g_w = e1 (any w = (a, 0, 1 - a)) and
    # d = g0 + c ||g0|| e1 = (-1/3 + c sqrt(2)/3, 1/3), weights (1/3 + c sqrt(2)/3, 1/3, 1/3).
    # For c >= 1/sqrt(2) the dual value is 0 (g_w = 0 at w = e3) and the answer is p, weights
    # (2/3, 1/3, 1/3): continuous in c, where torchjd 0.18 jumps to d = 0 (outside the ball).
    if device_path:  # the accelerator's path: both solutions computed, torch.where picks
        from polytask.balance import compiled, solvers

        monkeypatch.setattr(solvers, "_early_exit", lambda t: False)
        monkeypatch.setattr(compiled, "USE_COMPILED", False)  # as on an accelerator: no compiled loop either
    jac = torch.tensor([[1.0, 0.0], [-2.0, 1.0], [0.0, 0.0]], dtype=DT)
    for c in [0.4, 0.7, 0.75, 1.0, 2.0]:
        shift = min(c * math.sqrt(2) / 3, 1 / 3)
        update, w = agg.CAGrad(c=c).aggregate(jac)
        _close(update, torch.tensor([-1 / 3 + shift, 1 / 3], dtype=DT), 1e-9)
        _close(w, torch.tensor([1 / 3 + shift, 1 / 3, 1 / 3], dtype=DT), 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_zero_gradient_row_stays_in_ball_and_is_optimal(seed):
    # A batch without labels for one task: its gradient row is 0. The update must stay in
    # CAGrad's ball and reach the best worst-task improvement min_i g_i.d (0 here, or the
    # negative value of the ball's best point when the ball misses the cone J d >= 0).
    jac = _random(4, 12, 40 + seed)
    jac[2] = 0.0
    if seed % 2:
        jac[1] = -jac[0] + 0.2 * jac[1]  # strong conflict between two other tasks too
    g0 = jac.mean(0)
    for c in [0.2, 0.4, 1.0]:
        d = agg.CAGrad(c=c)(jac)
        assert d.norm() > 0
        assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-9)
        gen = torch.Generator().manual_seed(seed)
        best = (jac @ d).min()
        for _ in range(300):  # no point of the ball does better on the worst task
            u = torch.randn(12, generator=gen, dtype=DT)
            cand = g0 + c * g0.norm() * u / u.norm() * torch.rand(1, generator=gen, dtype=DT) ** (1 / 12)
            assert (jac @ cand).min() <= best + 1e-9 * g0.norm() ** 2


@peer
@pytest.mark.parametrize("name,jac", [c for c in CASES if c[0].startswith("rand") and c[1].shape[1] >= c[1].shape[0]], ids=lambda v: v if isinstance(v, str) else "")
def test_nash_mtl_matches_torchjd_first_steps(name, jac):
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    t, d = jac.shape  # full-rank Gramians only: else G w = 1/w has no solution
    ref = tja.NashMTL(n_tasks=t, max_norm=0.0)
    ours = agg.NashMTL(max_norm=0.0)
    for step in range(3):
        j = jac + 0.1 * _random(t, d, 300 + step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = ref(j)
        o = ours(j)
        if step == 0:  # torchjd's first call returns its initial weights (all ones) unsolved
            continue
        # torchjd's convex-concave iterations stop at a residual of ~1e-7 here; ours is solved to
        # machine precision (checked in test_nash_weights_bargaining).
        _close(o, r, 1e-5)


@peer
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_fairgrad_matches_torchjd(alpha):
    pytest.importorskip("scipy")
    for t, d in [(2, 10), (4, 30), (8, 50)]:
        jac = _random(t, d, t + d)
        _close(agg.FairGrad(alpha=alpha)(jac), tja.FairGrad(alpha=alpha)(jac), 1e-5)


# --- paper properties (also for methods torchjd lacks) ---------------------------------------------


def _rand_hull_point(t: int, g: torch.Generator) -> torch.Tensor:
    w = torch.rand(t, generator=g, dtype=DT)
    return w / w.sum()


@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_mgda_min_norm_point_in_hull_and_minimal(name, jac):
    g = torch.Generator().manual_seed(0)
    w = agg.MGDA().weights(jac @ jac.T)
    assert (w >= -1e-12).all() and abs(w.sum().item() - 1) < 1e-9
    fw = agg.MGDA(solver="frank_wolfe", epsilon=1e-12, max_iters=3000).weights(jac @ jac.T)
    assert (w @ jac).norm() <= (fw @ jac).norm() + 1e-5 * jac.norm()  # at least as short as converged FW
    best = (w @ jac).norm()
    for _ in range(50):  # no point of the hull is shorter
        assert (_rand_hull_point(jac.shape[0], g) @ jac).norm() >= best - 1e-6 * jac.norm()


def test_mgda_two_gradients_closed_form():
    # Sener & Koltun (2018), Algorithm 1: gamma = ((g2 - g1) . g2) / ||g1 - g2||^2, clipped to [0, 1].
    g1, g2 = torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([0.0, 2.0], dtype=DT)
    gamma = ((g2 - g1) @ g2) / (g1 - g2).norm() ** 2
    expected = gamma * g1 + (1 - gamma) * g2
    _close(agg.MGDA(solver="frank_wolfe", epsilon=1e-12, max_iters=500)(torch.stack([g1, g2])), expected, 1e-6)
    _close(agg.MGDA()(torch.stack([g1, g2])), expected, 1e-8)


@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_pcgrad_no_conflict_with_projected_gradients(name, jac):
    t = jac.shape[0]
    coef = agg.pcgrad_coefficients(jac @ jac.T, _torchjd_orders(t, 1, exclude_self=False))
    projected = coef @ jac
    for i in range(t):
        # the last gradient g_i^PC was projected against stays non-conflicting
        last = [j for j in _torchjd_orders(t, 1, exclude_self=False)[i].tolist() if j != i]
        if last:
            assert projected[i] @ jac[last[-1]] >= -1e-9 * jac.norm() ** 2


def test_pcgrad_two_conflicting_gradients_hand_computed():
    g1, g2 = torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([-1.0, 1.0], dtype=DT)
    # g1 - (g1.g2/|g2|^2) g2 = [1,0] + 0.5[-1,1] = [0.5, 0.5]; g2 - (g2.g1/|g1|^2) g1 = [0, 1]
    out = agg.PCGrad()(torch.stack([g1, g2]))
    _close(out, torch.tensor([0.5, 1.5], dtype=DT), 1e-12)


@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_cagrad_c0_is_mean(name, jac):
    _close(agg.CAGrad(c=0.0)(jac), jac.mean(0), 1e-12)


def test_cagrad_solution_is_optimal_and_in_ball():
    jac = _random(6, 40, 11)
    jac[1] = -0.3 * jac[0] + 0.1 * jac[1]
    c = 0.5
    gram = jac @ jac.T
    g0 = jac.mean(0)
    d = agg.CAGrad(c=c)(jac)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-6)  # the constraint of CAGrad's problem
    # d maximises min_i g_i.d over the ball: compare with random points of the ball
    gen = torch.Generator().manual_seed(0)
    best = (jac @ d).min()
    for _ in range(200):
        u = torch.randn(40, generator=gen, dtype=DT)
        cand = g0 + c * g0.norm() * u / u.norm() * torch.rand(1, generator=gen, dtype=DT)
        assert (jac @ cand).min() <= best + 1e-9
    v, solved = cagrad_dual(gram / gram.trace(), c)
    assert bool(solved)


def test_cagrad_pareto_stationary_gives_zero():
    g = _random(1, 10, 2)[0]
    jac = torch.stack([g, -g])  # 0 in the convex hull; c >= 1 -> the minimiser has g_w = 0
    assert agg.CAGrad(c=1.0)(jac).norm() < 1e-8


@pytest.mark.parametrize("name,jac", CASES, ids=IDS)
def test_upgrad_never_conflicts(name, jac):
    reg = 1e-4  # exact for the regularised Gramian G/tr(G) + reg I: conflicts stay within reg |w|
    out, w = agg.UPGrad(reg_eps=reg).aggregate(jac)
    assert (jac @ out >= -1.01 * reg * jac.norm() ** 2 * w.abs().max()).all()



def test_imtlg_equal_projections():
    # Liu et al. (2021): the update has the same projection on every unit task gradient.
    jac = _random(4, 12, 3)
    out = agg.IMTLG()(jac)
    proj = (jac / jac.norm(dim=1, keepdim=True)) @ out
    assert torch.allclose(proj, proj[0].expand_as(proj), rtol=1e-8)


@pytest.mark.parametrize("t,d", [(2, 5), (5, 20), (16, 40)])
def test_nash_weights_bargaining(t, d):
    jac = _random(t, d, t * d)
    gram = jac @ jac.T
    w = agg.NashMTL(max_norm=0.0).weights(gram)
    assert (w > 0).all()
    _close(gram @ w, 1.0 / w, 1e-9)  # Navon et al. (2022): G w = 1/w


def test_nash_max_norm_and_state_roundtrip():
    jac = _random(3, 10, 1)
    a = agg.NashMTL(max_norm=0.5, update_weights_every=2)
    out = a(jac)
    assert abs(out.norm().item() - 0.5) < 1e-9  # ||J^T w|| = sqrt(T) > 0.5 -> clipped
    b = agg.NashMTL(max_norm=0.5, update_weights_every=2)
    b.load_state_dict(a.state_dict())
    assert int(b.steps) == 1 and torch.equal(b.prev_weights, a.prev_weights)
    jac2 = _random(3, 10, 2)
    _close(b(jac2), a(jac2), 0.0)  # step 1: both reuse the stored weights


def _nash_hard_steps() -> list[tuple[str, torch.Tensor]]:
    """Consecutive Jacobians for one Nash-MTL (each warm-starts from the last): nearly opposite,
    zero and badly scaled gradients, and plain ones between them."""
    base = _random(4, 12, 77)
    opposite = torch.stack([base[0], -base[0] + 1e-3 * base[1], base[2], base[3]])  # cos = -1 + 5e-7
    zero = base.clone()
    zero[1] = 0.0  # a task without labels in this batch
    scaled = base * torch.tensor([[1e-6], [1e6], [1.0], [1e3]], dtype=DT)
    return [("opposite", opposite), ("plain", base), ("opposite", opposite), ("scaled", scaled), ("zero", zero),
            ("opposite", opposite), ("tiny", base * 1e-6), ("huge", base * 1e6), ("opposite", opposite * 1e-6),
            ("scaled", scaled), ("plain", base + 0.1 * _random(4, 12, 78))]


def _bargaining_residual(gram: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """max_i |w_i (G w)_i - 1| over tasks with a gradient (Navon et al. 2022: G w = 1/w), relative per task."""
    present = gram.diagonal() > 0
    return ((gram @ w) * w - 1.0)[present].abs().max()


@pytest.mark.parametrize("device_path", [False, True], ids=["cpu", "fixed_iterations"])
@pytest.mark.parametrize("every", [1, 2])
def test_nash_converges_on_hard_cases_over_consecutive_steps(every, device_path, monkeypatch):
    # A warm start from nearly opposite gradients (weights ~1e3) used to stop after the fixed Newton
    # iterations at a residual ~1e4 on the next step; badly scaled gradients never moved.
    if device_path:  # the accelerator's path: all iterations, the solve at every step, torch.where
        from polytask.balance import compiled, solvers

        monkeypatch.setattr(solvers, "_early_exit", lambda t: False)
        monkeypatch.setattr(compiled, "USE_COMPILED", False)  # as on an accelerator: no compiled loop either
    nash = agg.NashMTL(max_norm=0.0, update_weights_every=every)
    previous = None
    for step, (name, jac) in enumerate(_nash_hard_steps()):
        gram = jac @ jac.T
        w = nash.weights(gram)
        if step % every:  # reuses the stored weights
            assert torch.equal(w, previous), name
        else:
            assert (w[gram.diagonal() > 0] > 0).all(), name
            # at the rounding floor: 1e-15 x the condition number of the unit-diagonal Gramian (2.5e7
            # for "opposite", where the residual measured through J is 3e-9 too), else ~1e-12
            d = gram.diagonal().sqrt().clamp_min(1e-300)
            eig = torch.linalg.eigvalsh((gram / d.outer(d))[gram.diagonal() > 0][:, gram.diagonal() > 0])
            tol = 1e-15 * (eig[-1] / eig[0]).item() + 1e-12
            assert _bargaining_residual(gram, w) < tol, (step, name, _bargaining_residual(gram, w).item(), tol)
            if name == "zero":  # no solution for the task without gradient: weight 0, the others solved
                assert w[1] == 0
        previous = w


def test_nash_solution_is_the_unique_one_of_the_scaled_problem_cvxpy():
    # Independent check with cvxpy (Clarabel) on the convex problem whose minimiser solves
    # G w = 1/w: min 1/2 w^T G w - sum_i log w_i. Solved with the tasks rescaled to unit gradients
    # (G = D C D, w = D^-1 u), which the conic solver needs for the 1e-6 vs 1e6 case.
    cp = pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    for name, jac in _nash_hard_steps():
        if name == "zero":
            continue
        gram = jac @ jac.T
        d = gram.diagonal().sqrt()
        corr = (gram / d.outer(d)).numpy()
        u = cp.Variable(4)
        with warnings.catch_warnings():  # "may be inaccurate": it stops short of tolerances this tight
            warnings.simplefilter("ignore")
            cp.Problem(cp.Minimize(0.5 * cp.quad_form(u, cp.psd_wrap(corr)) - cp.sum(cp.log(u)))).solve(
                cp.CLARABEL, tol_gap_abs=1e-14, tol_gap_rel=1e-14, tol_feas=1e-14, tol_ktratio=1e-12)
        ref = torch.tensor(u.value, dtype=DT) / d
        ours = agg.NashMTL(max_norm=0.0).weights(gram)
        assert ((ours - ref).abs() / ref).max() < 1e-5, name


@peer
def test_nash_hard_steps_against_torchjd_the_authors_formulation():
    # torchjd 0.18 runs the authors' convex-concave cvxpy iterations. On the plain steps of the hard
    # sequence both agree (torchjd stops at a residual ~1e-7); on the nearly opposite, zero and badly
    # scaled ones torchjd ends far from G w = 1/w (residual 1 to 17 here) while ours is at the
    # rounding floor: ours is never the less converged of the two.
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    ref, ours = tja.NashMTL(n_tasks=4, max_norm=0.0), agg.NashMTL(max_norm=0.0)
    agreed = 0
    for step, (name, jac) in enumerate(_nash_hard_steps()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = ref(jac)
        o = ours(jac)
        gram = jac @ jac.T
        w_ref = torch.linalg.lstsq(jac.T, r.unsqueeze(1)).solution.squeeze(1)  # full row rank: exact
        res_ref, res_ours = _bargaining_residual(gram, w_ref), _bargaining_residual(gram, ours.prev_weights)
        assert res_ours <= max(res_ref, 1e-8), (step, name)
        if step > 0 and res_ref < 1e-6:  # torchjd converged: the same solution
            _close(o, r, 1e-5)
            agreed += 1
    assert agreed == 2  # the two plain steps


def test_nash_non_finite_warm_start_or_gramian_does_not_stick():
    jac = _random(3, 10, 5)
    gram = jac @ jac.T
    fresh = agg.NashMTL(max_norm=0.0).weights(gram)
    nash = agg.NashMTL(max_norm=0.0)
    nash.weights(gram)
    nash.prev_weights = torch.full((3,), float("nan"), dtype=DT)  # as a NaN step would leave it
    assert torch.equal(nash.weights(gram), fresh)  # the cold start wins: same as a fresh method
    assert torch.isnan(nash.weights(gram * float("nan"))).all()  # a NaN input is visible in the output


def test_nash_loads_a_state_dict_from_before_steps_was_a_buffer():
    a = agg.NashMTL(update_weights_every=2)
    a(_random(3, 10, 1))
    legacy = {"prev_weights": a.prev_weights.clone(), "_extra_state": {"step": 1}}
    b = agg.NashMTL(update_weights_every=2)
    b.load_state_dict(legacy)
    assert int(b.steps) == 1 and torch.equal(b.prev_weights, a.prev_weights)
    jac = _random(3, 10, 2)
    assert torch.equal(b(jac), a(jac))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_fairgrad_alpha_fair_condition(alpha):
    jac = _random(5, 20, 9)
    gram = jac @ jac.T
    w = agg.FairGrad(alpha=alpha).weights(gram)
    _close(gram @ w, w ** (-1.0 / alpha), 1e-9)  # Ban & Ji (2024), Eq. 4
    _close(agg.FairGrad(alpha=0.0)(jac), jac.mean(0), 1e-12)


def test_moco_tracking_and_simplex():
    # Fernando et al. (2023), Algorithm 1 by hand for two steps.
    j1, j2 = _random(3, 8, 1), _random(3, 8, 2)
    beta, gamma, rho = 0.5, 0.1, 0.01
    m = agg.MoCo(beta=beta, gamma=gamma, rho=rho)
    m(j1)
    out = m(j2)
    y = j1 - beta * (j1 - j2)
    lam = torch.full((3,), 1 / 3, dtype=DT)
    lam = project_simplex(lam - gamma * (j1 @ j1.T + rho * torch.eye(3, dtype=DT)) @ lam)
    lam = project_simplex(lam - gamma * (y @ y.T + rho * torch.eye(3, dtype=DT)) @ lam)
    _close(out, lam @ y, 1e-12)
    state = m.state_dict()
    m2 = agg.MoCo(beta=beta, gamma=gamma, rho=rho)
    m2.load_state_dict(state)
    _close(m2(j1), m(j1), 0.0)


def test_gradvac_state_roundtrip():
    jac = _random(3, 10, 4)
    a = agg.GradVac(beta=0.5, generator=torch.Generator().manual_seed(0))
    a(jac)
    b = agg.GradVac(beta=0.5, generator=torch.Generator().manual_seed(1))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.phi_hat, b.phi_hat) and a.phi_hat.abs().sum() > 0


# --- solvers ----------------------------------------------------------------------------------


def test_project_simplex_matches_definition():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(20, 6, generator=gen, dtype=DT) * 2
    p = project_simplex(y)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(20, dtype=DT))
    for row, proj in zip(y, p):  # no simplex point is closer
        for _ in range(20):
            q = _rand_hull_point(6, gen)
            assert (q - row).norm() >= (proj - row).norm() - 1e-12


def test_nonneg_qp_kkt_on_ill_conditioned_problems():
    for seed in range(4):
        jac = _random(32, 10, seed)  # rank 10: the +1e-4 I regularisation sets the conditioning
        q = jac @ jac.T
        q = q / q.trace() + 1e-4 * torch.eye(32, dtype=DT)
        lin = torch.randn(32, 32, generator=torch.Generator().manual_seed(seed), dtype=DT) * 0.01
        x = nonneg_qp(q, lin)
        mult = x @ q + lin
        assert (x >= 0).all() and (mult >= -1e-12).all() and (x * mult).abs().max() < 1e-14 * x.abs().max()


def test_frank_wolfe_freezes_after_convergence():
    gram = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    assert torch.allclose(frank_wolfe_min_norm(gram), torch.tensor([0.5, 0.5], dtype=DT))


def test_power_fair_weights_warm_start_is_fixed_point():
    jac = _random(4, 9, 0)
    gram = jac @ jac.T
    w = power_fair_weights(gram)
    _close(power_fair_weights(gram, init=w, iters=1), w, 1e-12)


@pytest.mark.parametrize("name,jac", [c for c in CASES if c[0] in ("rand16x64", "T32", "opposite", "parallel")], ids=lambda v: v if isinstance(v, str) else "")
def test_fixed_iteration_path_equals_early_exit(name, jac, monkeypatch):
    # On accelerators the solvers run their full fixed iteration count (no host sync); on the CPU
    # they stop at the fixed point. Both must give the same result.
    from polytask.balance import compiled, solvers

    # The CPU side runs the compiled loops where numba is installed, the other side torch's fixed counts.
    # Nash-MTL and FairGrad are left out on "opposite" (g_2 = -g_1 / 2: 0 in the convex hull, so
    # G w = w^(-1/alpha) has no solution and the iterates of the two paths part by their rounding).
    methods = [agg.UPGrad(), agg.DualProj(), agg.CAGrad(c=0.5), agg.MGDA(), agg.MGDA(solver="frank_wolfe")]
    if name != "opposite":
        methods.append(agg.FairGrad(alpha=2.0))
    if jac.shape[1] >= jac.shape[0] and name != "opposite":
        methods.append(agg.NashMTL(max_norm=0.0))
    early = [m(jac) for m in methods]
    monkeypatch.setattr(solvers, "_early_exit", lambda t: False)
    monkeypatch.setattr(compiled, "USE_COMPILED", False)  # as on an accelerator: no compiled loop either
    for m, e in zip(methods, early):
        # MGDA's update on "opposite" is 0 up to rounding (~1e-12 |J|): compared at the Jacobian's scale there
        floor = 1e-6 * jac.norm().item()
        assert (m(jac)[0] - e[0]).norm().item() <= 1e-9 * max(e[0].norm().item(), floor), type(m).__name__
        if e[0].norm().item() > floor:  # the weights too, where the update is not 0
            _close(m(jac)[1], e[1], 1e-9)


# (factory, degree): the update of s J is s^degree times that of J (Nash-MTL's w scales as 1/s,
# FairGrad's as s^(-2 alpha / (1 + alpha))); degree 1 for the others.
HOMOGENEOUS = {"mgda": (agg.MGDA, 1.0), "imtl_g": (agg.IMTLG, 1.0), "aligned_mtl": (agg.AlignedMTL, 1.0),
               "config": (agg.ConFIG, 1.0), "cagrad": (agg.CAGrad, 1.0), "upgrad": (agg.UPGrad, 1.0),
               "dualproj": (agg.DualProj, 1.0), "nash_mtl": (lambda: agg.NashMTL(max_norm=0.0), 0.0),
               "fairgrad": (lambda: agg.FairGrad(alpha=2.0), -1.0 / 3.0)}


@pytest.mark.parametrize("scale", [1e-10, 1e-3, 1e10])
@pytest.mark.parametrize("name", sorted(HOMOGENEOUS))
def test_update_is_homogeneous_in_the_gradients(name, scale):
    # No absolute threshold decides the method: small gradients (late in training) get the same
    # method as large ones. torchjd's CAGrad returns 0, and its UPGrad/DualProj the (conflicting)
    # mean gradient, once ||J||_F^2 < 1e-4 -- scale 1e-3 here.
    make, degree = HOMOGENEOUS[name]
    for jac in (_random(4, 30, 7), torch.stack([_random(1, 30, 8)[0], -_random(1, 30, 8)[0] + 0.3 * _random(1, 30, 9)[0]])):
        _close(make()(jac * scale), scale ** degree * make()(jac), 1e-9)


# --- state and printing ------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs", [(agg.ExcessMTL, {"n_warmup_steps": 2}), (agg.ExcessMTL, {}), (agg.MoCo, {}),
                                        (agg.GradVac, {}), (agg.NashMTL, {"update_weights_every": 2})])
def test_stateful_round_trip_and_legacy_state_dicts(cls, kwargs):
    # The state (step counters included) is in tensors only; a state dict written before the counter
    # was a buffer (in get_extra_state, or absent) still loads and continues the same way.
    def make():
        return cls(generator=torch.Generator().manual_seed(0), **kwargs) if cls is agg.GradVac else cls(**kwargs)

    a = make()
    for step in range(3):
        a(_random(3, 10, 600 + step))
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and int(state["steps"]) == 3
    legacy = {k: v.clone() for k, v in state.items() if k != "steps"}
    if cls in (agg.ExcessMTL, agg.NashMTL):
        legacy["_extra_state"] = {"steps" if cls is agg.ExcessMTL else "step": 3}
    for loaded in ({k: v.clone() for k, v in state.items()}, legacy):
        b = make()
        b.load_state_dict(loaded)
        # MoCo and GradVac saved no counter: any saved state means "not fresh", all they read from it
        assert int(b.steps) == (3 if loaded is state or "_extra_state" in loaded or "steps" in loaded else 1)
        ref = make()
        ref.load_state_dict(state)
        jac = _random(3, 10, 700)
        assert torch.equal(b(jac), ref(jac))
    fresh = make()  # the state matters: a fresh method does something else at this step
    assert not torch.equal(fresh(_random(3, 10, 700)), ref(_random(3, 10, 701)))


def test_every_aggregator_prints_its_hyperparameters():
    from polytask import balance
    from polytask.balance import GradientBalancer

    printed = 0
    for name in balance.names():
        balancer = balance.get(name)
        if not isinstance(balancer, GradientBalancer):
            continue
        engine_params = ("mode", "nan_policy", "seed")  # the GradientBalancer's own, not the method's
        params = [p for p in inspect.signature(balance.BALANCERS.lookup(name)).parameters if p not in engine_params]
        text = repr(balancer.aggregator)
        assert all(f"{p}=" in text for p in params), (name, text)
        printed += bool(params)
    assert printed >= 10
    assert "c=0.7" in repr(agg.CAGrad(c=0.7)) and "update_weights_every=3" in repr(agg.NashMTL(update_weights_every=3))


def test_solve_is_weights_in_float64_in_the_gramians_dtype():
    jac = _random(4, 30, 11).float()
    gram = jac @ jac.T
    for method in (agg.MGDA(), agg.CAGrad(), agg.UPGrad(), agg.IMTLG()):
        w = method.solve(gram)
        assert w.dtype == torch.float32 and torch.equal(w, method.weights(gram.double()).float())
        update, weights = method.aggregate(jac)
        assert torch.equal(weights, w) and torch.equal(update, w @ jac)
