"""Per-tensor merge methods: hand-computed cases from the papers' equations, and mergekit where
the semantics are shared."""

from __future__ import annotations

import math

import pytest
import torch

from polytask.errors import ConfigError, MergeError
from polytask.merge import MERGE_METHODS, merge_state_dicts, tall_masks


def _merge(method, models, base=None, model_params=None, **kw):
    """Merge single tensors through the state-dict API."""
    out = merge_state_dicts(
        method, [{"x": m} for m in models], None if base is None else {"x": base},
        model_params=model_params, **kw,
    )
    return out["x"]


@pytest.fixture
def trio():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, 16, generator=g)
    models = [base + torch.randn(24, 16, generator=g) for _ in range(3)]
    return base, models


# -- hand-computed cases -----------------------------------------------------------------------
def test_linear_is_weighted_mean():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    out = _merge("linear", [a, b], model_params=[{"weight": 1.0}, {"weight": 3.0}])
    assert torch.allclose(out, (a + 3 * b) / 4)
    out = _merge("linear", [a, b], model_params=[{"weight": 1.0}, {"weight": 3.0}], normalize=False)
    assert torch.allclose(out, a + 3 * b)


def test_task_arithmetic_adds_scaled_task_vectors():
    base = torch.tensor([1.0, 1.0, 1.0])
    m1, m2 = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 1.0])
    out = _merge("task_arithmetic", [m1, m2], base, lambda_=0.5)
    assert torch.allclose(out, base + 0.5 * ((m1 - base) + (m2 - base)))


def test_ties_trim_elect_disjoint_mean():
    # Task vectors (base = 0). Trim to the top 50 % by magnitude per task, elect the sign by
    # summed mass, average only the agreeing, non-trimmed entries (Yadav et al., Alg. 1).
    t1 = torch.tensor([4.0, -1.0, 3.0, 0.5])   # keeps 4, 3
    t2 = torch.tensor([-2.0, 5.0, -6.0, 0.1])  # keeps 5, -6
    t3 = torch.tensor([1.0, 2.0, -0.2, 3.0])   # keeps 2, 3
    # trimmed: [4,0,3,0] [0,5,-6,0] [0,2,0,3]; sums 4, 7, -3, 3 -> signs + + - +
    expected = torch.tensor([4.0, (5 + 2) / 2, -6.0, 3.0])
    out = _merge("ties", [t1, t2, t3], torch.zeros(4), model_params=[{"density": 0.5}] * 3)
    assert torch.allclose(out, expected)


def test_ties_keeps_lowest_index_among_equal_magnitudes():
    t = torch.tensor([1.0, 2.0, 2.0, 2.0, -2.0, 0.5])
    out = _merge("ties", [t], torch.zeros(6), model_params=[{"density": 0.5}])
    assert torch.equal(out, torch.tensor([0.0, 2.0, 2.0, 2.0, 0.0, 0.0]))


def test_dare_rescale_and_expectation():
    base = torch.zeros(200_000)
    tau = torch.linspace(-1, 1, 200_000)
    out = _merge("dare_linear", [tau], base, model_params=[{"density": 0.25}], seed=3)
    kept = out != 0
    # kept entries are rescaled by exactly 1/(1-p) = 1/density
    assert torch.allclose(out[kept], tau[kept] * 4)
    assert abs(kept.float().mean().item() - 0.25) < 0.005
    # unbiased: E[out] = tau; average over seeds of a constant task vector
    ones = torch.ones(50_000)
    avg = torch.stack([_merge("dare_linear", [ones], torch.zeros(50_000), model_params=[{"density": 0.3}], seed=s)
                       for s in range(8)]).mean()
    assert abs(avg.item() - 1.0) < 0.02
    # same seed, same masks; another seed, other masks
    again = _merge("dare_linear", [tau], base, model_params=[{"density": 0.25}], seed=3)
    other = _merge("dare_linear", [tau], base, model_params=[{"density": 0.25}], seed=4)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_dare_l1_rescale_preserves_l1_norm():
    tau = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    out = _merge("dare_linear", [tau], torch.zeros_like(tau), model_params=[{"density": 0.5}], rescale="l1")
    assert math.isclose(out.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-4)


def test_dare_ties_elects_signs_after_drop():
    # With density 1 DARE-TIES is TIES without trimming: sign election + (unnormalised) sum.
    t1, t2 = torch.tensor([1.0, -3.0]), torch.tensor([-2.0, 1.0])
    out = _merge("dare_ties", [t1, t2], torch.zeros(2))
    assert torch.allclose(out, torch.tensor([-2.0, -3.0]))


def test_breadcrumbs_drops_outliers_and_small_values():
    tau = torch.arange(1.0, 11.0)  # magnitudes 1..10
    out = _merge("breadcrumbs", [tau], torch.zeros(10), model_params=[{"density": 0.5, "gamma": 0.2}])
    # drop the top 20 % (9, 10) and the smallest until 50 % remain: keep 4..8
    expected = torch.where((tau >= 4) & (tau <= 8), tau, torch.zeros(10))
    assert torch.equal(out, expected)


def test_slerp_on_orthogonal_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = _merge("slerp", [b], a, t=0.5)
    assert torch.allclose(out, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    out = _merge("slerp", [b], a, t=1 / 3)  # angle pi/6 from a
    assert torch.allclose(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    # parallel vectors fall back to linear interpolation
    assert torch.allclose(_merge("slerp", [2 * a], a, t=0.5), 1.5 * a)


def test_model_stock_ratio():
    # Two offsets at 60 degrees: cos = 1/2, t = N cos / (1 + (N-1) cos) = 1 / 1.5 = 2/3.
    base = torch.tensor([1.0, 1.0, 0.0])
    m1 = base + torch.tensor([1.0, 0.0, 0.0])
    m2 = base + torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
    t = 2 / 3
    expected = t * (m1 + m2) / 2 + (1 - t) * base
    assert torch.allclose(_merge("model_stock", [m1, m2], base), expected, atol=1e-6)


def test_tall_masks_and_consensus():
    # tau_MTL = [3, 0.2, 1.2]; masks with lambda = 1: |tau_t| >= |tau_MTL - tau_t|
    t1 = torch.tensor([2.0, 0.1, 1.0])
    t2 = torch.tensor([1.0, 0.1, 0.2])
    masks = tall_masks(torch.stack([t1, t2]), 1.0)
    assert masks.tolist() == [[True, True, True], [False, True, False]]
    out = _merge("consensus", [t1, t2], torch.zeros(3), k=2, lambda_tall=1.0)
    assert torch.allclose(out, torch.tensor([0.0, 0.2, 0.0]))
    out = _merge("consensus", [t1, t2], torch.zeros(3), k=1, lambda_tall=1.0, lambda_=0.5)
    assert torch.allclose(out, 0.5 * (t1 + t2))


def _orthogonal_blocks():
    # Task vectors living in disjoint row/column blocks: their singular vectors are mutually
    # orthogonal, so the Procrustes step changes nothing.
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.zeros(8, 6), torch.zeros(8, 6)
    t1[:4, :3] = torch.randn(4, 3, generator=g)
    t2[4:, 3:] = torch.randn(4, 3, generator=g)
    return t1, t2


def test_tsv_on_orthogonal_task_vectors_is_task_arithmetic():
    t1, t2 = _orthogonal_blocks()
    base = torch.randn(8, 6)
    out = _merge("tsv", [base + t1, base + t2], base, fraction=0.5)  # 3 = full rank of each block
    assert torch.allclose(out, base + t1 + t2, atol=1e-5)
    # with k = 1 triplet per task, the result is the sum of each task's rank-1 approximation
    low = _merge("tsv", [base + t1, base + t2], base, fraction=1 / 6)

    def rank1(t):
        u, s, vh = torch.linalg.svd(t)
        return s[0] * torch.outer(u[:, 0], vh[0])

    assert torch.allclose(low, base + rank1(t1) + rank1(t2), atol=1e-5)
    # non-matrix tensors get the mean task vector
    vec = _merge("tsv", [torch.ones(4), 3 * torch.ones(4)], torch.zeros(4))
    assert torch.allclose(vec, 2 * torch.ones(4))


def test_iso_c_flattens_the_spectrum(trio):
    base, models = trio
    out = _merge("iso_c", models, base, alpha=1.0)
    s_ta = torch.linalg.svdvals(sum(m - base for m in models))
    s_out = torch.linalg.svdvals(out - base)
    assert torch.allclose(s_out, torch.full_like(s_out, s_ta.mean().item()), atol=1e-4)
    # singular vectors are those of the task-arithmetic sum: projecting back gives the same U V^T
    u, _, vh = torch.linalg.svd(sum(m - base for m in models), full_matrices=False)
    assert torch.allclose((out - base) / s_ta.mean(), u @ vh, atol=1e-5)


def test_iso_cts_spectrum_and_limit(trio):
    base, models = trio
    out = _merge("iso_cts", models, base, common_fraction=0.5)
    s_out = torch.linalg.svdvals(out - base)
    assert torch.allclose(s_out, torch.full_like(s_out, s_out.mean().item()), atol=1e-4)  # isotropic
    # all of the space common: Iso-CTS is Iso-C
    assert torch.allclose(_merge("iso_cts", models, base, common_fraction=1.0), _merge("iso_c", models, base), atol=1e-5)


def test_pcb_identical_models_and_weighting():
    base = torch.zeros(50)
    tau = torch.randn(50, generator=torch.Generator().manual_seed(2))
    # identical task vectors: balanced average is the task vector on the kept entries
    out = _merge("pcb", [tau, tau], base, ratio=1.0)
    assert torch.allclose(out, tau, atol=1e-6)
    # by the paper's eqs the score of an entry grows with its squared magnitude: with ratio 0.2
    # exactly the 10 largest-|tau| entries survive
    out = _merge("pcb", [tau, tau], base, ratio=0.2)
    top = tau.abs().topk(10).indices
    assert set(out.nonzero().flatten().tolist()) == set(top.tolist())


def test_non_float_tensors_copied_and_dtype():
    base = {"w": torch.zeros(3, dtype=torch.bfloat16), "step": torch.tensor([7])}
    m = {"w": torch.ones(3, dtype=torch.bfloat16), "step": torch.tensor([9])}
    out = merge_state_dicts("task_arithmetic", [m], base, dtype="float32")
    assert out["w"].dtype == torch.float32 and torch.equal(out["step"], torch.tensor([7]))


# -- bad input ---------------------------------------------------------------------------------
def test_errors_name_the_problem():
    base = {"a": torch.zeros(2, 2), "b": torch.zeros(2)}
    with pytest.raises(ConfigError, match="unknown merge method 'tie'.*did you mean ties"):
        merge_state_dicts("tie", [base], base)
    with pytest.raises(ConfigError, match="no parameter 'densty'"):
        merge_state_dicts("ties", [base], base, densty=0.5)
    with pytest.raises(ConfigError, match="#0.*per-model parameter 'densty'"):
        merge_state_dicts("ties", [base], base, model_params=[{"densty": 0.5}])
    with pytest.raises(MergeError, match="'b'.*missing from model #1"):
        merge_state_dicts("linear", [base, {"a": torch.zeros(2, 2)}])
    with pytest.raises(MergeError, match="'c' of model #0 is missing from base"):
        merge_state_dicts("ties", [{**base, "c": torch.zeros(1)}], base)
    with pytest.raises(MergeError, match=r"'a' has shape \[2, 2\] in base base but \[4\] in model #0"):
        merge_state_dicts("ties", [{"a": torch.zeros(4), "b": torch.zeros(2)}], base)
    with pytest.raises(MergeError, match="'b' is float32 in base base but float16 in model #0"):
        merge_state_dicts("ties", [{"a": torch.zeros(2, 2), "b": torch.zeros(2, dtype=torch.float16)}], base)
    with pytest.raises(ConfigError, match="needs a base"):
        merge_state_dicts("ties", [base])
    with pytest.raises(ConfigError, match="at most 1"):
        merge_state_dicts("slerp", [base, base], base)
    with pytest.raises(ConfigError, match="density"):
        merge_state_dicts("ties", [base], base, model_params=[{"density": 1.5}])


def test_registry_lists_all_methods():
    for name in ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                 "breadcrumbs_ties", "slerp", "model_stock", "consensus", "tsv", "iso_c", "iso_cts", "pcb"]:
        assert name in MERGE_METHODS


# -- agreement with mergekit where semantics are shared ----------------------------------------
WEIGHTS = [1.0, 0.5, 2.0]
CASES = [
    ("task_arithmetic", {"weight": WEIGHTS, "lambda": 0.7}, {"lambda_": 0.7}),
    ("task_arithmetic", {"weight": WEIGHTS, "normalize": True}, {"normalize": True}),
    ("ties", {"weight": WEIGHTS, "density": [0.5, 0.3, 0.7]}, {}),
    ("ties", {"weight": WEIGHTS, "density": 0.4, "normalize": False, "lambda": 0.5},
     {"normalize": False, "lambda_": 0.5}),
    ("breadcrumbs", {"weight": WEIGHTS, "density": 0.5, "gamma": 0.1}, {}),
    ("breadcrumbs_ties", {"weight": WEIGHTS, "density": 0.6, "gamma": 0.05}, {}),
    ("dare_ties", {"weight": WEIGHTS, "density": 1.0}, {}),
    ("model_stock", {}, {}),
    ("model_stock", {"filter_wise": True}, {"filter_wise": True}),
]


@pytest.mark.parametrize(("method", "mk_params", "ours"), CASES)
def test_matches_mergekit(trio, method, mk_params, ours):
    api = pytest.importorskip("mergekit.merge_methods.api")
    base, models = trio
    expected = api.merge_tensors([base, *models], method, parameters=mk_params, base_index=0)
    per_model = [
        {k: (v[i] if isinstance(v, list) else v) for k, v in mk_params.items() if k in ("weight", "density", "gamma")}
        for i in range(3)
    ]
    out = _merge(method, models, base, model_params=per_model, **ours)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_matches_mergekit_linear_and_slerp(trio):
    api = pytest.importorskip("mergekit.merge_methods.api")
    base, models = trio
    expected = api.merge_tensors(models, "linear", parameters={"weight": WEIGHTS})
    out = _merge("linear", models, model_params=[{"weight": w} for w in WEIGHTS])
    assert torch.allclose(out, expected, atol=1e-6)
    for t in (0.0, 0.3, 0.9):
        expected = api.merge_tensors([base, models[0]], "slerp", parameters={"t": t}, base_index=0)
        assert torch.allclose(_merge("slerp", [models[0]], base, t=t), expected, atol=1e-5)


def test_dare_matches_mergekit_in_distribution():
    api = pytest.importorskip("mergekit.merge_methods.api")
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(100_000)
    models = [torch.randn(100_000, generator=g) for _ in range(2)]
    theirs = api.merge_tensors([base, *models], "dare_linear", parameters={"weight": 1.0, "density": 0.3}, base_index=0)
    ours = _merge("dare_linear", models, base, model_params=[{"density": 0.3}] * 2, rescale="l1")
    # same fraction of entries kept by neither / one / both models, same L1 mass
    for x in (theirs, ours):
        assert abs((x != 0).float().mean().item() - (1 - 0.7 ** 2)) < 0.01
    assert math.isclose(theirs.abs().sum().item(), ours.abs().sum().item(), rel_tol=0.02)
