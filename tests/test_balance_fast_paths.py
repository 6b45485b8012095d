"""The cheaper paths of issue 16 (feature level at T = 16) against the plain computation they replace.

- the coordinate-wise trimmed mean without a sort (``b = 1``) against a sort, with ties, huge outliers
  and non-finite entries; and why feature level needs its Jacobian (it is not rotation-equivariant);
- the solvers that stop early on the CPU (or skip work there) against the same solvers run for their
  full iteration count, over several consecutive steps, on hard Gramians.

Every reference here is either a sort (the definition of the trimmed mean) or the same algorithm
without the shortcut; the peer comparisons (torchjd) stay in ``tests/test_balance_jd_recent.py`` and
``tests/test_balance_aggregators.py``.
"""

from __future__ import annotations

import pytest
import torch

from polytask.balance import robust

DT = torch.float64


def _random(t: int, d: int, seed: int, dtype: torch.dtype = DT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(t, 1, generator=g, dtype=DT) * 3 + 0.1
    return (torch.randn(t, d, generator=g, dtype=DT) * scale).to(dtype)


def _sorted_trim(jac: torch.Tensor, b: int) -> torch.Tensor:
    """The definition: sort each column, drop b at each end, average the rest (in float64)."""
    ordered = jac.double().sort(dim=0)[0]
    return ordered[b: jac.shape[0] - b].mean(dim=0)


# --- trimmed mean -----------------------------------------------------------------------------------


def _trim_cases() -> list[tuple[str, torch.Tensor]]:
    base = _random(16, 300, 1)
    ties = base.clone()
    ties[:, :50] = 2.5  # every value equal: the answer is that value
    ties[:3, 50:100] = ties[:, 50:100].max(dim=0).values + 1.0  # the max three times: two of them are middle values
    ties[3:5, 100:150] = ties[:, 100:150].min(dim=0).values - 1.0  # the min twice
    small = _random(3, 40, 2)  # T = 3: the median
    outlier = _random(5, 60, 3)
    outlier[0] = 1e300  # one huge row: Σ g - max - min would lose every digit of the middle
    outlier[1, :30] = -1e300
    scaled = _random(4, 30, 7) * torch.tensor([[1e-6], [1e-2], [1e2], [1e6]], dtype=DT)
    return [("rand16", base), ("ties", ties), ("t3", small), ("outlier1e300", outlier), ("rows1e-6to1e6", scaled),
            ("float32", _random(16, 500, 4, torch.float32))]


TRIM_CASES = _trim_cases()


@pytest.mark.parametrize("b", [0, 1, 2])
@pytest.mark.parametrize("name,jac", TRIM_CASES, ids=[c[0] for c in TRIM_CASES])
def test_trimmed_mean_equals_the_sorted_definition(name, jac, b):
    if jac.shape[0] < 2 * b + 1:
        pytest.skip("needs T >= 2b + 1")
    ours = robust.trimmed_mean(jac, b)
    ref = _sorted_trim(jac, b).to(jac.dtype)
    # elementwise, relative to each column's own middle values (not to the whole vector's norm)
    tol = 1e-6 if jac.dtype == torch.float32 else 1e-14
    scale = jac.double().abs().sort(dim=0)[0][: jac.shape[0] - 2 * b].amax(dim=0).clamp_min(1e-300)
    assert ((ours.double() - ref.double()).abs() / scale).max() <= tol


def test_trimmed_mean_by_hand_ties_and_a_huge_outlier():
    # column 0: {5, 5, 5, 1, 0} -> drop one 5 and the 0 -> mean(5, 5, 1) = 11/3
    # column 1: {4, 4, 4, 4, 4} -> 4
    # column 2: {1e300, 1, 2, 3, -1e300} -> mean(1, 2, 3) = 2 (exactly; Σ - max - min gives 0 in float64)
    jac = torch.tensor([[5.0, 4.0, 1e300], [5.0, 4.0, 1.0], [5.0, 4.0, 2.0], [1.0, 4.0, 3.0], [0.0, 4.0, -1e300]],
                       dtype=DT)
    expected = torch.tensor([11.0 / 3.0, 4.0, 2.0], dtype=DT)
    assert torch.allclose(robust.trimmed_mean(jac, 1), expected, rtol=1e-15, atol=0)
    naive = (jac.sum(0) - jac.amax(0) - jac.amin(0)) / 3  # the shortcut this avoids: wrong on column 2
    assert naive[2] != 2.0


def test_trimmed_mean_marks_non_finite_columns_only():
    jac = _random(6, 5, 9)
    jac[2, 1] = float("nan")
    jac[4, 3] = float("inf")
    jac[0, 4] = -float("inf")
    out = robust.trimmed_mean(jac, 1)
    assert torch.isnan(out[[1, 3, 4]]).all()
    assert torch.allclose(out[[0, 2]], _sorted_trim(jac[:, [0, 2]], 1), rtol=1e-15, atol=0)


def test_trimmed_mean_is_not_rotation_equivariant_so_feature_level_needs_the_jacobian():
    # A Gramian-only update J^T w(J J^T) rotates with the coordinates: f(J Q) = Q^T f(J). J = I_3, b = 1:
    # each column is {1, 0, 0}, middle 0, f(I) = 0; J Q = Q (rows of a rotation) has nonzero middles.
    q, _ = torch.linalg.qr(torch.tensor([[2.0, 1.0, 0.5], [0.3, 1.5, -1.0], [1.0, -0.7, 2.0]], dtype=DT))
    eye = torch.eye(3, dtype=DT)
    assert torch.equal(robust.trimmed_mean(eye, 1), torch.zeros(3, dtype=DT))
    rotated = robust.trimmed_mean(eye @ q, 1)
    assert rotated.abs().max() > 0.1  # while Q^T f(I) = 0: same Gramian, an update no weights w(G) can give
    assert torch.allclose((eye @ q) @ (eye @ q).T, eye, atol=1e-15)


# --- Nash-MTL / FairGrad: the CPU's early stop against the fixed iteration count -------------------


def _nash_steps() -> list[torch.Tensor]:
    """Consecutive Gramians (each solve warm-starts from the last): T = 16 drifting slowly, then hard ones."""
    base = _random(16, 64, 11)
    drift = [base + 0.05 * k * _random(16, 64, 20 + k) for k in range(4)]
    few = _random(4, 12, 77)
    opposite = torch.stack([few[0], -few[0] + 1e-3 * few[1], few[2], few[3]])  # cos = -1 + 5e-7
    zero = few.clone()
    zero[1] = 0.0
    scaled = few * torch.tensor([[1e-6], [1e6], [1.0], [1e3]], dtype=DT)
    hard = [opposite, few, scaled, zero, opposite, few * 1e-6, scaled, few + 0.1 * _random(4, 12, 78)]
    return [j @ j.T for j in drift + [drift[-1]] + hard]


def _condition(gram: torch.Tensor) -> float:
    present = gram.diagonal() > 0
    g = gram[present][:, present]
    d = g.diagonal().sqrt()
    eig = torch.linalg.eigvalsh(g / d.outer(d))
    return (eig[-1] / eig[0]).item()


@pytest.mark.parametrize("method", ["nash_mtl", "fairgrad"])
def test_early_stop_gives_the_fixed_iteration_solution_over_steps(method, monkeypatch):
    from polytask import balance
    from polytask.balance import compiled, solvers

    def run(early: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(solvers, "_early_exit", (lambda t: t.device.type == "cpu") if early else (lambda t: False))
        monkeypatch.setattr(compiled, "USE_COMPILED", False)  # the torch path, whose two modes are compared here
        params = {"max_norm": 0.0} if method == "nash_mtl" else {"alpha": 2.0}
        agg = balance.get(method, **params).aggregator
        return [agg.weights(g) for g in _nash_steps()]

    for g, fast, full in zip(_nash_steps(), run(True), run(False)):
        tol = 1e-15 * _condition(g) + 1e-11
        assert ((fast - full).abs() / full.abs().clamp_min(1e-300)).max() <= tol


def test_early_stop_takes_fewer_newton_steps_from_a_warm_start(monkeypatch):
    # proof that the shortcut runs: a warm start at the solution ends after one Newton step (one solve),
    # where the fixed count runs all of them; the cold start beside it is discarded
    from polytask.balance import compiled, solvers

    monkeypatch.setattr(compiled, "USE_COMPILED", False)  # count the torch path's solves (the compiled loop has none)
    gram = _nash_steps()[0]
    solution = solvers.power_fair_weights(gram)
    calls = []
    solve_ex = torch.linalg.solve_ex
    monkeypatch.setattr(torch.linalg, "solve_ex", lambda *a, **k: calls.append(1) or solve_ex(*a, **k))
    warm = solvers.power_fair_weights(gram, init=solution, iters=30)
    assert len(calls) == 1
    assert torch.allclose(warm, solution, rtol=1e-13, atol=0)
    monkeypatch.setattr(solvers, "_early_exit", lambda t: False)
    monkeypatch.setattr(compiled, "USE_COMPILED", False)  # as on an accelerator: no compiled loop either
    calls.clear()
    assert torch.allclose(solvers.power_fair_weights(gram, init=solution, iters=30), solution, rtol=1e-13, atol=0)
    assert len(calls) == 30


# --- the simplex projection's threshold as the largest running mean -------------------------------


def _duchi_projection(y: torch.Tensor) -> torch.Tensor:
    """Duchi et al. (ICML 2008), Fig. 1, for one vector: rho = max{j : u_j - (sum_{k<=j} u_k - 1)/j > 0}."""
    u = sorted(y.tolist(), reverse=True)
    css, rho, total = 0.0, 0, 0.0
    for j, uj in enumerate(u, start=1):
        css += uj
        if uj - (css - 1.0) / j > 0:
            rho, total = j, css
    theta = (total - 1.0) / rho
    return (y - theta).clamp_min(0.0)


def test_project_simplex_equals_duchi_on_ties_scales_and_batches():
    from polytask.balance.solvers import project_simplex

    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(16, generator=gen, dtype=DT) * s for s in (1e-8, 1.0, 10.0, 1e6)]
    rows += [torch.full((5,), 0.3, dtype=DT), torch.tensor([2.0, 2.0, -1.0, 0.5], dtype=DT),  # ties at the top
             torch.tensor([0.7], dtype=DT), torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=DT)]  # T = 1; on the simplex
    for y in rows:
        ref = _duchi_projection(y)
        out = project_simplex(y)
        assert torch.allclose(out, ref, rtol=1e-12, atol=1e-15 * max(1.0, y.abs().max().item())), y
    batch = torch.randn(3, 4, 7, generator=gen, dtype=DT)
    out = project_simplex(batch)
    ref = torch.stack([_duchi_projection(r) for r in batch.reshape(-1, 7)]).reshape(3, 4, 7)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-15)


# --- the engine's .grad updates without per-parameter no-op calls -----------------------------------


def test_accumulate_grads_converts_detaches_accumulates_and_gates():
    from polytask.balance.base import accumulate_grads

    p32 = torch.nn.Parameter(torch.zeros(3))
    p64 = torch.nn.Parameter(torch.zeros(2, dtype=DT))
    source = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    g64 = torch.tensor([0.5, 0.25, 0.125], dtype=DT)  # another dtype than p32: converted
    accumulate_grads([p32, p64], [g64, source * 2])  # a grad that records autograd: stored detached
    assert p32.grad.dtype == torch.float32 and torch.equal(p32.grad, g64.float())
    assert not p64.grad.requires_grad and torch.equal(p64.grad, torch.tensor([2.0, 4.0], dtype=DT))
    accumulate_grads([p32, p64], [g64, None])  # adds; None leaves the parameter alone
    assert torch.equal(p32.grad, 2 * g64.float()) and torch.equal(p64.grad, torch.tensor([2.0, 4.0], dtype=DT))
    accumulate_grads([p32], [g64], ok=torch.tensor(False), fill=float("nan"))  # a skipped step under a loss scaler
    assert torch.isnan(p32.grad).all()
