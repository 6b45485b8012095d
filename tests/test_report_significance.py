"""polytask.report.significance against scipy.stats (paired t, exact Wilcoxon, Student t tail) and
hand-computed cases (Holm, ties, degenerate samples, best-group marking)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from polytask.errors import ConfigError
from polytask.report import significance as sig

stats = pytest.importorskip("scipy.stats")

PAIRS = [
    ([1.0, 2.0, 3.0], [1.5, 2.1, 3.9]),                                  # 3 seeds
    ([10.2, 9.8, 10.5, 10.1, 9.9], [10.0, 9.1, 10.4, 9.5, 9.6]),         # 5 seeds, clear shift
    ([0.1, -0.4, 0.3, 0.2, -0.1], [0.0, 0.1, -0.2, 0.3, 0.0]),           # 5 seeds, no shift
    ([1e-8, 3e-8, 2e-8, 5e-8], [2e-8, 1e-8, 4e-8, 2e-9]),                # badly scaled
    ([1e6, 1e6 + 3, 1e6 - 2, 1e6 + 7, 1e6 + 1, 1e6 + 4], [1e6 - 1, 1e6, 1e6 - 4, 1e6 + 2, 1e6, 1e6 + 1]),
    ([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0], [2.0, 7.5, 1.0, 8.0, 2.5, 8.2, 1.3, 8.4]),  # no tied |d|: scipy's exact ignores ties
]


@pytest.mark.parametrize("a,b", PAIRS)
def test_paired_t_matches_scipy(a: list[float], b: list[float]) -> None:
    ours = sig.paired_t_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert ours.statistic == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("t,df", [(0.0, 2), (0.3, 1), (2.776, 4), (-4.6, 4), (12.0, 2), (60.0, 3), (1.2, 30),
                                  (1e-6, 5), (1e4, 1)])
def test_student_t_tail_matches_scipy(t: float, df: int) -> None:
    assert sig.student_t_two_sided(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("a,b", PAIRS)
def test_wilcoxon_matches_scipy_exact(a: list[float], b: list[float]) -> None:
    ours = sig.wilcoxon_signed_rank(a, b)
    ref = stats.wilcoxon(a, b, method="exact")
    assert ours.statistic == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-12)


def test_wilcoxon_zeros_dropped_like_scipy() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [1.0, 1.5, 2.0, 4.2, 3.0, 6.6, 4.0]  # one zero difference
    ours = sig.wilcoxon_signed_rank(a, b)
    ref = stats.wilcoxon(a, b, zero_method="wilcox", method="exact")
    assert ours.statistic == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-12)


def test_wilcoxon_ties_by_hand() -> None:
    # d = (1, 1, -2): |d| ranks (1.5, 1.5, 3); W+ = 3, W- = 3, statistic 3.
    # The 8 sign assignments give W+ in {0, 1.5, 1.5, 3, 3, 4.5, 4.5, 6}; P(W+ <= 3) = 5/8, two-sided 1.25 -> 1.
    r = sig.wilcoxon_signed_rank([2.0, 2.0, 0.0], [1.0, 1.0, 2.0])
    assert (r.statistic, r.p_value) == (3.0, 1.0)
    # d = (1, 1, 2): W- = 0; only the all-positive assignment has W+ = 6 (W- = 0): p = 2 * 1/8 = 0.25.
    r = sig.wilcoxon_signed_rank([2.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    assert (r.statistic, r.p_value) == (0.0, 0.25)


def test_wilcoxon_floor_with_few_seeds() -> None:
    # All five differences positive: the smallest two-sided exact p-value, 2 / 2^5.
    assert sig.wilcoxon_signed_rank([1.0, 2, 3, 4, 5], [0.0, 0, 0, 0, 0]).p_value == pytest.approx(0.0625)


def test_degenerate_samples() -> None:
    assert sig.paired_t_test([1.0, 2.0], [1.0, 2.0]) == sig.TestResult(0.0, 1.0)
    assert sig.paired_t_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]) == sig.TestResult(math.inf, 0.0)
    assert math.isnan(sig.paired_t_test([1.0], [2.0]).p_value)
    # NaN seeds are dropped pairwise: these two are the first PAIRS case plus a failed seed.
    ours = sig.paired_t_test([1.0, 2.0, 3.0, math.nan], [1.5, 2.1, 3.9, 0.0])
    assert ours.p_value == pytest.approx(stats.ttest_rel([1.0, 2.0, 3.0], [1.5, 2.1, 3.9]).pvalue, rel=1e-9)
    assert sig.wilcoxon_signed_rank([1.0, 2.0], [1.0, 2.0]) == sig.TestResult(0.0, 1.0)
    with pytest.raises(ConfigError, match="3 and 2 values"):
        sig.paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ConfigError, match="unknown test 'z'"):
        sig.pairwise({"a": [1.0, 2.0], "b": [1.0, 3.0]}, test="z")  # type: ignore[arg-type]


def test_holm_by_hand_and_against_scipy() -> None:
    # m = 4: sorted 0.01, 0.02, 0.03, 0.04 -> 0.04, 0.06, 0.06 (kept monotone), 0.06.
    assert sig.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    adjusted = sig.holm([0.03, math.nan, 0.5])  # nan does not count: m = 2
    assert adjusted[0] == pytest.approx(0.06) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.5)
    assert sig.holm([0.9, 0.8]) == [1.0, 1.0]


def test_mean_std() -> None:
    assert sig.mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt(7.0)))
    assert sig.mean_std([4.0, math.nan]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in sig.mean_std([math.nan]))


def test_pairwise_and_best_group() -> None:
    runs = {  # lower is better; 5 seeds
        "a": [1.0, 1.1, 0.9, 1.05, 0.95],
        "b": [1.02, 1.08, 0.93, 1.04, 0.99],   # within noise of a
        "c": [2.0, 2.2, 1.9, 2.1, 2.05],       # clearly worse
    }
    comps = {(c.a, c.b): c for c in sig.pairwise(runs)}
    raw = {k: stats.ttest_rel(runs[k[0]], runs[k[1]]).pvalue for k in comps}
    order = sorted(raw, key=raw.__getitem__)
    expected = {k: min(1.0, (3 - i) * raw[k]) for i, k in enumerate(order)}
    for i in range(1, 3):  # monotone step-down
        expected[order[i]] = max(expected[order[i]], expected[order[i - 1]])
    for k, c in comps.items():
        assert c.p_value == pytest.approx(raw[k], rel=1e-9)
        assert c.p_holm == pytest.approx(expected[k], rel=1e-9)
    assert not comps["a", "b"].significant and comps["a", "c"].significant and comps["b", "c"].significant
    assert comps["a", "c"].mean_diff == pytest.approx(-1.05)
    assert sig.not_worse_than_best(runs) == {"a": True, "b": True, "c": False}
    assert sig.not_worse_than_best(runs, lower_is_better=False) == {"a": False, "b": False, "c": True}
    matrix = sig.pairwise_matrix(list(comps.values()), list(runs))
    rows = {line.split()[0]: line.split()[1:] for line in matrix.splitlines()[1:]}
    assert rows == {"a": ["=", "<"], "b": ["=", "<"], "c": [">", ">"]}


def test_best_group_with_a_failed_method() -> None:
    runs = {"a": [1.0, 2.0, 3.0], "dead": [math.nan] * 3}
    assert sig.not_worse_than_best(runs) == {"a": True, "dead": False}


def test_import_needs_no_scipy() -> None:
    code = ("import sys; sys.modules['scipy'] = None; import polytask.report.significance as s; "
            "print(s.paired_t_test([1, 2, 3], [2, 2, 5]).p_value)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) == pytest.approx(stats.ttest_rel([1, 2, 3], [2, 2, 5]).pvalue, rel=1e-9)


def test_seed_table_marks_the_best_group_per_column() -> None:
    columns = {
        "Δm%": {"a": [1.0, 1.1, 0.9, 1.05, 0.95], "b": [2.0, 2.2, 1.9, 2.1, 2.05]},
        "acc": {"a": [0.5, 0.6, 0.55, 0.52, 0.58], "b": [0.51, 0.59, 0.56, 0.52, 0.57]},  # higher is better
    }
    table = sig.seed_table(columns, {"Δm%": True, "acc": False}, ["a", "b", "c"])
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    # Δm%: a is best, b significantly worse; acc: a and b not separable (both marked).
    assert "1 ± 0.079*" in rows["a"] and "2.05 ± 0.11 " in rows["b"]
    assert rows["a"].endswith("*") and rows["b"].endswith("*")
    assert rows["c"].split()[1:] == ["—", "—"]
    with_reference = sig.seed_table(columns, {"Δm%": True, "acc": False}, ["a", "b"], reference=("stl", {"acc": 0.61}))
    assert with_reference.splitlines()[1].split() == ["stl", "—", "0.61"]  # a plain row, first, no mark
