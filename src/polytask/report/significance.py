"""Whether one method really beats another over seeds: paired tests, Holm's correction, summaries.

Benchmarks run each method with the same seeds (same data split, same initialisation), so results
are *paired* by seed and the tests here work on the per-seed differences:

- :func:`paired_t_test` -- Student's paired t-test, two-sided (``t = mean(d) / (sd(d) / sqrt(n))``,
  ``n - 1`` degrees of freedom). It assumes normally distributed differences, which 3-5 seeds
  cannot check; it is the default because it is the only one of the two that can reach ``p < 0.05``
  with fewer than six seeds.
- :func:`wilcoxon_signed_rank` -- Wilcoxon's signed-rank test (Wilcoxon, Biometrics Bulletin 1945),
  two-sided, exact (every sign assignment enumerated), zero differences dropped (Wilcoxon's own
  convention, scipy's default ``zero_method="wilcox"``), tied absolute differences given average
  ranks (the enumeration is then exact given those ranks). No normality assumption, but with ``n``
  non-zero differences its smallest two-sided p-value is ``2 / 2^n``: 0.25 for 3 seeds, 0.125 for 4,
  0.0625 for 5 -- never below 0.05 with fewer than six seeds.
- :func:`holm` -- Holm's step-down correction (Holm, Scand. J. Statistics 1979) of a family of
  p-values (all pairs of a table, or every method against the best), which controls the
  family-wise error rate without assuming independence.

With so few seeds "not significant" mostly means "the seeds cannot tell", not "equal": the tables
mark methods that are not significantly worse than the best instead of ranking them.

Pure Python (``math`` only): the Student t distribution through the regularized incomplete beta
function, so the core install needs no scipy. ``tests/test_report_significance.py`` checks every
function against ``scipy.stats``.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from polytask.errors import ConfigError

Test = Literal["t", "wilcoxon"]

__all__ = ["Comparison", "TestResult", "holm", "mean_std", "not_worse_than_best", "paired_t_test", "pairwise",
           "pairwise_matrix", "seed_table", "student_t_two_sided",
           "wilcoxon_signed_rank"]


@dataclass(frozen=True)
class TestResult:
    """A two-sided test's statistic and p-value (``nan`` when fewer than two usable pairs)."""

    statistic: float
    p_value: float


@dataclass(frozen=True)
class Comparison:
    """Method ``a`` against ``b`` over the seeds where both are finite: ``mean_diff = mean(a - b)``."""

    a: str
    b: str
    n: int
    mean_diff: float
    statistic: float
    p_value: float
    p_holm: float
    significant: bool


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``) of the finite values; std 0 for one value, nan for none."""
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def _paired(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """The differences ``a_i - b_i`` of the pairs where both are finite."""
    if len(a) != len(b):
        raise ConfigError(f"paired test: the two samples have {len(a)} and {len(b)} values (one per seed each)")
    return [float(x) - float(y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def student_t_two_sided(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Student's paired t-test of ``mean(a - b) = 0``, two-sided.

    Differences that are all zero give ``(0, 1)``; equal non-zero differences (no spread) give
    ``(±inf, 0)`` -- scipy returns nan for both.
    """
    d = _paired(a, b)
    if len(d) < 2:
        return TestResult(math.nan, math.nan)
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    if sd == 0.0:
        return TestResult(0.0, 1.0) if mean == 0.0 else TestResult(math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(len(d)))
    return TestResult(t, student_t_two_sided(t, len(d) - 1))


def _average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Wilcoxon's signed-rank test of ``a - b`` symmetric about 0, two-sided and exact.

    The statistic is ``min(W+, W-)`` (scipy's two-sided statistic). The null distribution of ``W+``
    is counted over all ``2^n`` sign assignments of the (average) ranks, by dynamic programming on
    twice the ranks (integers even with ties). No differences left: ``(nan, nan)``; all zero: ``(0, 1)``.
    """
    d = _paired(a, b)
    if not d:
        return TestResult(math.nan, math.nan)
    nonzero = [x for x in d if x != 0.0]
    if not nonzero:
        return TestResult(0.0, 1.0)
    ranks = _average_ranks([abs(x) for x in nonzero])
    w_plus = sum(r for r, x in zip(ranks, nonzero) if x > 0)
    w_minus = sum(ranks) - w_plus
    doubled = [round(2 * r) for r in ranks]
    counts = [1] + [0] * sum(doubled)  # counts[s]: sign assignments with 2 W+ = s
    for r in doubled:
        for s in range(len(counts) - 1, r - 1, -1):
            counts[s] += counts[s - r]
    low = round(2 * min(w_plus, w_minus))
    p = 2.0 * sum(counts[:low + 1]) / 2 ** len(nonzero)
    return TestResult(min(w_plus, w_minus), min(1.0, p))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the ``k``-th smallest of ``m`` is multiplied by
    ``m - k + 1``, then made non-decreasing and capped at 1. ``nan`` entries (untestable pairs) stay
    ``nan`` and do not count in ``m``."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (len(indexed) - k) * p))
        adjusted[i] = running
    return adjusted


def _test(kind: Test):
    if kind == "t":
        return paired_t_test
    if kind == "wilcoxon":
        return wilcoxon_signed_rank
    raise ConfigError(f"significance test: unknown test {kind!r} (known: 't', 'wilcoxon')")


def _compare(runs: Mapping[str, Sequence[float]], pairs: Sequence[tuple[str, str]], test: Test,
             alpha: float) -> list[Comparison]:
    run_test = _test(test)
    results = [run_test(runs[a], runs[b]) for a, b in pairs]
    adjusted = holm([r.p_value for r in results])
    out = []
    for (a, b), r, p_holm in zip(pairs, results, adjusted):
        d = _paired(runs[a], runs[b])
        out.append(Comparison(a, b, len(d), statistics.fmean(d) if d else math.nan, r.statistic, r.p_value, p_holm,
                              p_holm < alpha))  # nan < alpha is False: an untestable pair is never significant
    return out


def pairwise(runs: Mapping[str, Sequence[float]], test: Test = "t", alpha: float = 0.05) -> list[Comparison]:
    """Every pair of methods, paired over seeds (``runs[m][i]`` is method ``m``'s value with seed ``i``),
    Holm-corrected over all pairs; ``significant`` when the adjusted p-value is below ``alpha``."""
    return _compare(runs, list(itertools.combinations(runs, 2)), test, alpha)


def not_worse_than_best(runs: Mapping[str, Sequence[float]], lower_is_better: bool = True, test: Test = "t",
                        alpha: float = 0.05) -> dict[str, bool]:
    """For each method: ``True`` if it is the best by mean or not significantly different from it
    (Holm over the ``M - 1`` comparisons with the best); methods without a finite value get ``False``."""
    means = {m: mean_std(v)[0] for m, v in runs.items()}
    finite = [m for m in runs if math.isfinite(means[m])]
    if not finite:
        return {m: False for m in runs}
    best = (min if lower_is_better else max)(finite, key=means.__getitem__)
    comparisons = _compare(runs, [(best, m) for m in finite if m != best], test, alpha)
    tied = {c.b: not c.significant for c in comparisons}
    return {m: m == best or tied.get(m, False) for m in runs}


def pairwise_matrix(comparisons: Sequence[Comparison], methods: Sequence[str], lower_is_better: bool = True) -> str:
    """A text matrix: row method against column method, ``<`` significantly better, ``>`` significantly
    worse, ``=`` not significantly different, ``.`` untestable (direction by ``lower_is_better``)."""
    mark: dict[tuple[str, str], str] = {}
    for c in comparisons:
        if not math.isfinite(c.p_holm):
            row = col = "."
        elif not c.significant:
            row = col = "="
        else:
            a_better = (c.mean_diff < 0) == lower_is_better
            row, col = ("<", ">") if a_better else (">", "<")
        mark[c.a, c.b], mark[c.b, c.a] = row, col
    width = max(len(m) for m in methods) + 1
    short = [m[:6] for m in methods]
    lines = [" " * width + "".join(f"{s:>7}" for s in short)]
    for m in methods:
        lines.append(f"{m:<{width}}" + "".join(f"{'' if m == n else mark.get((m, n), '.'):>7}" for n in methods))
    return "\n".join(lines)


def seed_table(columns: Mapping[str, Mapping[str, Sequence[float]]], lower_is_better: Mapping[str, bool],
               methods: Sequence[str], test: Test = "t", alpha: float = 0.05, digits: int = 4,
               reference: tuple[str, Mapping[str, float]] | None = None) -> str:
    """A text table of ``mean ± std`` over seeds, one row per method, one column per metric
    (``columns[metric][method]``: the per-seed values, paired by position). A ``*`` follows the
    methods that are the best by mean or not significantly different from it in that column
    (:func:`not_worse_than_best`, Holm over that column's comparisons). ``reference``: ``(label,
    {metric: value})``, a first row of plain values that takes no part in the tests (e.g. single-task)."""
    marks = {name: not_worse_than_best({m: col[m] for m in methods if m in col}, lower_is_better[name], test, alpha)
             for name, col in columns.items()}
    cells: dict[str, list[str]] = {}
    for m in methods:
        row = []
        for name, col in columns.items():
            if m not in col:
                row.append("—")
                continue
            mean, std = mean_std(col[m])
            star = "*" if marks[name].get(m) else " "
            row.append("—" if math.isnan(mean) else f"{mean:.{digits}g} ± {std:.2g}{star}")
        cells[m] = row
    rows = list(methods)
    if reference is not None:
        label, values = reference
        cells = {label: [f"{values[name]:.{digits}g}  " if name in values else "—" for name in columns], **cells}
        rows = [label, *rows]
    widths = [max([len(name)] + [len(cells[m][i]) for m in rows]) + 2 for i, name in enumerate(columns)]
    first = max(len("method"), *(len(m) for m in rows)) + 1
    lines = [f"{'method':<{first}}" + "".join(f"{name:>{w}}" for name, w in zip(columns, widths))]
    lines += [f"{m:<{first}}" + "".join(f"{c:>{w}}" for c, w in zip(cells[m], widths)) for m in rows]
    return "\n".join(lines)
