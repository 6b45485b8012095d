"""Quality of every registered balancer on the built-in synthetic data, with significance over seeds.

For each seed: single-task baselines (the same shared-bottom network with one task, trained with
the same budget), then one multi-task run per balancer. Printed:

- per method: Δm% against the single-task baselines (Maninis et al., CVPR 2019; over each task's
  metrics, mse and mae; lower is better) as mean ± std over seeds, a ``*`` when the method is the
  best or not significantly worse than it, the mean task weights of the last epoch, the mean epoch
  chosen on validation (close to the last: not converged), the seconds per run, and a status: ``ok``, ``nan`` (a non-finite loss or metric), ``diverged`` (a task's
  test loss above the untrained model's) or the error;
- every test metric (per task mse and mae) as mean ± std over seeds, with the same ``*``;
- the pairwise matrix of Δm%: ``<`` the row method significantly better than the column method,
  ``>`` worse, ``=`` not significantly different.

Significance (``polytask.report.significance``): runs are paired by seed (same data, same split,
same initialisation); two-sided paired t-test on the per-seed differences, Holm-corrected over the
family (the comparisons with the best in a column; all pairs in the matrix), alpha 0.05. With 3-5
seeds the t-test leans on normal differences it cannot check, and the exact Wilcoxon signed-rank
test (printed against the best, for reference) cannot go below p = 0.0625 with 5 seeds: read
``=`` as "these seeds cannot tell them apart", not "equal".

Settings (``--setting``; any flag given overrides it):

- ``default``: 4 tasks, correlation 0.1, 6000 rows, 15 epochs, 3 seeds, every registered balancer.
- ``separating``: a setting where methods differ on a CPU: 12 tasks at correlation 0 (no shared
  direction: the 32-unit bottleneck must be shared between unrelated tasks), each task's targets
  scaled by a factor from 0.1 to 10 (losses spread over four orders of magnitude: what loss-scale
  invariance is for), 2000 rows per seed, Adam 3e-3 for 60 epochs (with 4000 rows and 30 epochs at
  1e-3 the epoch chosen on validation was always the last), 5 seeds, the 12 main methods
  (``MAIN_METHODS``), and ONE synthetic function for all seeds (``--function-seed 0``; each seed gets
  its own rows of it, :func:`replicate_of`). Why the last: with a new function per seed (the first
  version of this setting), no pair of methods was significantly different over 5 seeds although
  the ranking hardly changed over seeds 0-3. The size of Δm% did: ``synthetic`` draws the sine
  frequencies with the seed, seed 2 drew low ones (a smooth function that single-task runs learn to
  3-7 % of the target variance: EW's neglected small-scale tasks then lose 1000-4000 %, Δm% 566) and
  seed 4 two high ones (nothing is learnable from 1400 rows: single-task and every multi-task run
  stop near epoch 2-10 at the target variance, Δm% ≈ 0 for all). The per-seed differences between
  methods then scale with the seed's difficulty, and a paired t-test sees noise. One fixed function
  (seed 0's, not chosen for any method's sake: the first seed, with moderate frequencies) with fresh
  samples, split and initialisation per seed keeps what a replicate should vary and nothing else.
  Runs are paired: in one seed every method sees the same rows, split, batch order and initial
  weights. Sized to stay under about 15 minutes with 2 processes on 2 quiet cores: the same runs,
  networks and rows per run as the first version, which took 1509 s with 1 process on the shared
  2-core machine (the lead's quiet-machine run gives the real figure). Most multi-task runs still
  choose one of the last epochs; at 120 epochs (run once) the loss-weighting ones still chose epochs
  96-119, the order barely moved (IMTL-G and Nash-MTL best; EW, DWA, RLW worst) and fewer pairs
  were significant, for twice the time: 60 stays.

    .venv/bin/python benchmarks/balance_quality.py                       # all balancers, 3 seeds
    .venv/bin/python benchmarks/balance_quality.py --setting separating  # 12 methods, 5 seeds
    .venv/bin/python benchmarks/balance_quality.py --methods ew,famo --seeds 2 --epochs 2   # a smoke check
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any


#: The methods most tables compare (loss-based, then gradient-based).
MAIN_METHODS = ("ew", "uw", "dwa", "rlw", "gls", "famo", "gradnorm", "mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl")

SETTINGS: dict[str, dict[str, Any]] = {
    "default": dict(methods="all", seeds=3, epochs=15, tasks=4, correlation=0.1, rows=6000, scale_spread=1.0, lr=1e-3,
                    function_seed=-1),
    "separating": dict(methods=",".join(MAIN_METHODS), seeds=5, epochs=60, tasks=12, correlation=0.0, rows=2000,
                       scale_spread=100.0, lr=3e-3, function_seed=0),
}


def data_params(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    params = {"num_tasks": args.tasks, "correlation": args.correlation, "num_rows": args.rows, "seed": seed}
    if args.noise_std is not None:
        params["noise_std"] = args.noise_std
    if args.scale_spread != 1.0:
        params["target_scales"] = target_scales(args.tasks, args.scale_spread)
    if args.function_seed >= 0:  # one function for every seed; the seed picks the sample (see replicate_of)
        params.update(seed=args.function_seed, replicate=seed, replicates=args.seeds)
    return params


def target_scales(n_tasks: int, spread: float) -> list[float]:
    """Per-task target factors from ``spread^-1/2`` to ``spread^1/2``, geometrically spaced."""
    if n_tasks == 1:
        return [1.0]
    return [spread ** (t / (n_tasks - 1) - 0.5) for t in range(n_tasks)]


def replicate_of(replicate: int, replicates: int, **params: Any) -> Any:
    """Replicate ``replicate`` of ``replicates`` independent samples of ONE synthetic function.

    ``synthetic(seed=...)`` draws the function (task directions ``w_t``, sine frequencies ``α_i`` and
    phases ``β_i``) and the rows from one generator, so a new seed is a new problem: some seeds draw
    high frequencies no run can learn from a few thousand rows, others a smooth function learnt almost
    to the noise. Here the function is drawn once (``params['seed']``) with ``replicates × num_rows``
    rows; replicate ``r`` takes the ``r``-th disjoint slice of each of its train, validation and test
    splits: fresh i.i.d. rows from the same population, so the seeds differ only by sample and
    initialisation, as replicates should.
    """
    from polytask.data import Splits, synthetic

    pool = synthetic(**{**params, "num_rows": params.get("num_rows", 12000) * replicates})

    def slice_of(part: Any) -> Any:
        size = len(part) // replicates
        return part.subset(range(replicate * size, (replicate + 1) * size))

    return Splits(pool.name, pool.tasks, slice_of(pool.train), slice_of(pool.val), slice_of(pool.test), pool.input_spec)


def scaled_synthetic(target_scales: list[float] | None = None, replicate: int | None = None,
                     replicates: int = 1, **params: Any) -> Any:
    """The built-in synthetic data with task ``t``'s targets multiplied by ``target_scales[t]``;
    with ``replicate`` given, that replicate of one function (:func:`replicate_of`)."""
    from polytask.data import synthetic

    splits = synthetic(**params) if replicate is None else replicate_of(replicate, replicates, **params)
    for part in (splits.train, splits.val, splits.test):
        for t, task in enumerate(splits.tasks):
            part.targets[task.name] = part.targets[task.name] * (target_scales or [1.0] * len(splits.tasks))[t]
    return splits


def _register_scaled_data() -> str:
    """Register :func:`scaled_synthetic` in this process (once) and return its data set name."""
    from polytask.data import DATASETS

    if "synthetic_scaled" not in DATASETS.names():
        DATASETS.register("synthetic_scaled")(scaled_synthetic)
    return "synthetic_scaled"


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration; return its best-on-validation test metrics, weights and status."""
    import torch

    torch.set_num_threads(1)
    import polytask.report.summary as summary
    from polytask.balance import BALANCERS
    from polytask.errors import PolytaskError
    from polytask.train import Trainer, parse_config

    summary.write_summary = lambda *a, **k: None  # plots and reports are not what we measure here

    class EndEpoch:
        """Closes the balancer's epoch (DWA) in case the Trainer does not; a second call is a no-op."""

        def on_epoch_end(self, trainer: Any, record: Any) -> None:
            trainer.balancer.end_epoch()

    params = dict(job.get("balancer_params", {}))
    cls = BALANCERS.lookup(job["balancer"])
    if "seed" in inspect.signature(cls).parameters:
        params["seed"] = job["seed"]  # RLW: its own generator, seeded per run
    with tempfile.TemporaryDirectory() as out:
        cfg = parse_config({
            "name": "q", "out_dir": out, "seed": job["seed"], "device": "cpu",
            "data": {"name": _register_scaled_data() if {"target_scales", "replicate"} & set(job["data"]) else "synthetic",
                     "params": job["data"], "tasks": job.get("tasks")},
            "model": {"arch": "shared_bottom", "params": {"bottom": [64, 32], "tower": [16]}},
            "balancer": {"name": job["balancer"], "params": params},
            "optim": {"name": "adam", "lr": job.get("lr", 1e-3)},
            "train": {"epochs": job["epochs"], "batch_size": 128, "early_stopping": None},
        })
        start = time.perf_counter()
        try:
            result = Trainer(cfg, callbacks=[EndEpoch()], progress=False).fit()
        except (PolytaskError, RuntimeError, ValueError) as exc:
            return {**job, "status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}",
                    "seconds": time.perf_counter() - start}
        seconds = time.perf_counter() - start
    untrained = result.history[0].test
    values = [v for m in result.test.values() for v in m.values()]
    status = "ok"
    if not all(math.isfinite(v) for v in values) or any(
            not math.isfinite(r.train[t]["loss"]) for r in result.history[1:] for t in r.train):
        status = "nan"
    elif any(result.test[t]["loss"] > untrained[t]["loss"] for t in result.test):
        status = "diverged"
    last = result.history[-1].train
    return {**job, "status": status, "seconds": seconds, "test": result.test, "best_epoch": result.best_epoch,
            "weights": {t: last[t]["weight"] for t in last}}


def canonical_balancers() -> list[str]:
    """One name per registered balancer (its first registered name): EW, the loss-based ones, then
    the gradient aggregators."""
    from polytask.balance import BALANCERS, LossWeighting

    first: dict[Any, str] = {}
    for name, cls in BALANCERS._entries.items():  # registration order: primary name first
        first.setdefault(cls, name)

    def group(item: tuple[Any, str]) -> int:
        cls, name = item
        if name == "ew":
            return 0
        return 1 if isinstance(cls, type) and issubclass(cls, LossWeighting) else 2

    return [name for _, name in sorted(first.items(), key=group)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--methods", default=None, help="comma-separated balancer names ('all': every registered one)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--correlation", type=float, default=None)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--scale-spread", type=float, default=None,
                        help="ratio of the largest to the smallest task's target scale (1: unscaled)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    parser.add_argument("--noise-std", type=float, default=None, help="std of the synthetic targets' noise "
                        "before scaling (the data set's default: 0.1)")
    parser.add_argument("--function-seed", type=int, default=None, help="draw the synthetic function once with "
                        "this seed and give each seed its own sample of it (-1: a new function per seed)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.05, help="family-wise significance level")
    parser.add_argument("--json", default=None, help="also write every run's result and the pairwise tests of Δm%% "
                        "and of every metric (paired t, Holm over all pairs) to this JSON file")
    parser.add_argument("--pairwise-metrics", action="store_true",
                        help="also print the pairwise matrix of every test metric, not only of Δm%%")
    args = parser.parse_args()
    for key, value in SETTINGS[args.setting].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    methods = canonical_balancers() if args.methods == "all" else args.methods.split(",")
    task_names = [f"task{t}" for t in range(args.tasks)]
    jobs = []
    for seed in range(args.seeds):
        common = {"seed": seed, "epochs": args.epochs, "lr": args.lr, "data": data_params(args, seed)}
        jobs += [{**common, "kind": "single", "balancer": "ew", "tasks": [t]} for t in task_names]
        jobs += [{**common, "kind": "mtl", "balancer": m} for m in methods]
    wall = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, jobs))
    wall = time.perf_counter() - wall
    comparisons = print_tables(args, methods, task_names, results)
    if args.json:
        import dataclasses
        import json

        with open(args.json, "w") as f:
            json.dump({"runs": results, "pairwise": {name: [dataclasses.asdict(c) for c in found]
                                                     for name, found in comparisons.items()}}, f, indent=1)
    print(f"{len(jobs)} runs in {wall:.0f} s with {args.jobs} processes")


def print_tables(args: argparse.Namespace, methods: list[str], task_names: list[str],
                 results: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Print the Δm% table, the per-metric tables and the pairwise Δm% matrix, all over seeds with
    significance; return the pairwise comparisons of Δm% and of every metric (Holm over all pairs)."""
    from polytask.report import significance as sig
    from polytask.tasks import Task, delta_m

    tasks = [Task(t, "regression", metrics=("mse", "mae")) for t in task_names]
    single: dict[int, dict[str, Any]] = {seed: {} for seed in range(args.seeds)}
    for r in results:
        if r["kind"] == "single":
            if r["status"] != "ok":
                raise SystemExit(f"single-task baseline {r['tasks'][0]} seed {r['seed']} failed: {r['status']}")
            single[r["seed"]].update(r["test"])

    # Per method, one value per seed (nan where the run failed): paired by position = seed.
    runs = {m: {r["seed"]: r for r in results if r["kind"] == "mtl" and r["balancer"] == m} for m in methods}

    def per_seed(m: str, value) -> list[float]:  # noqa: ANN001
        return [value(runs[m][s]) if "test" in runs[m].get(s, {}) else math.nan for s in range(args.seeds)]

    deltas = {m: per_seed(m, lambda r: delta_m(r["test"], single[r["seed"]], tasks)) for m in methods}
    best_group = sig.not_worse_than_best(deltas, alpha=args.alpha)
    means = {m: sig.mean_std(deltas[m])[0] for m in methods}
    best = min((m for m in methods if math.isfinite(means[m])), key=means.__getitem__, default=None)

    scales = "" if args.scale_spread == 1.0 else f", target scales x{args.scale_spread ** -0.5:.3g}..x{args.scale_spread ** 0.5:.3g}"
    if args.function_seed >= 0:
        scales += f"; one function (seed {args.function_seed}), its own {args.rows} rows per seed"
    if args.noise_std is not None:
        scales += f"; noise std {args.noise_std:g}"
    print(f"synthetic data: {args.tasks} tasks, correlation {args.correlation}, {args.rows} rows{scales}; "
          f"shared-bottom (64,32)+tower(16); Adam {args.lr:g}, batch 128, {args.epochs} epochs; "
          f"{args.seeds} seeds; test metrics at the epoch chosen on validation")
    single_best = [r["best_epoch"] for r in results if r["kind"] == "single"]
    print(f"single-task runs: epoch chosen on validation {statistics.mean(single_best):.1f} on average "
          f"(of {args.epochs}; close to the last: not converged)")
    print(f"* = best or not significantly worse than the best (paired t-test over seeds, Holm over the "
          f"comparisons with the best, alpha {args.alpha}); p(W): exact Wilcoxon signed-rank against the best, "
          f"uncorrected (>= {2 / 2 ** args.seeds:.3g} with {args.seeds} seeds)\n")
    weights_shown = min(args.tasks, 6)
    header = (f"{'method':<12}{'Δm% mean':>10}{'± std':>8}{'':2}{'p(t)':>8}{'p(W)':>8}  "
              f"{'last-epoch weights' + (' (first 6)' if args.tasks > 6 else ''):<34}{'best ep':>8}{'s/run':>7}  status")
    print(header)
    print("-" * len(header))
    for m in methods:
        statuses = ",".join(sorted({r["status"] for r in runs[m].values()}))
        secs = statistics.mean(r["seconds"] for r in runs[m].values())
        mean, std = sig.mean_std(deltas[m])
        if math.isnan(mean):
            print(f"{m:<12}{'—':>10}{'':>8}{'':2}{'':>8}{'':>8}  {'':<34}{'':>8}{secs:>7.1f}  {statuses}")
            continue
        if m == best or best is None:
            p_t = p_w = "best"
        else:
            p_t = f"{sig.paired_t_test(deltas[m], deltas[best]).p_value:.3g}"
            p_w = f"{sig.wilcoxon_signed_rank(deltas[m], deltas[best]).p_value:.3g}"
        ok = [r for r in runs[m].values() if "test" in r]
        w = [statistics.mean(r["weights"][t] for r in ok) for t in task_names[:weights_shown]]
        best_epoch = statistics.mean(r["best_epoch"] for r in ok)  # near the last epoch: not converged
        print(f"{m:<12}{mean:>10.2f}{std:>8.2f}{'*' if best_group[m] else '':2}{p_t:>8}{p_w:>8}  "
              f"{' '.join(f'{x:.2f}' for x in w):<34}{best_epoch:>8.1f}{secs:>7.1f}  {statuses}")

    print("\nΔm% per seed (paired: in one column every method saw the same rows and initial weights):")
    print(f"{'method':<12}" + "".join(f"{'seed ' + str(seed):>10}" for seed in range(args.seeds)))
    for m in methods:
        print(f"{m:<12}" + "".join(f"{d:>10.1f}" for d in deltas[m]))

    finite = [m for m in methods if math.isfinite(means[m])]
    comparisons = {"Δm%": sig.pairwise({m: deltas[m] for m in finite}, alpha=args.alpha)}
    print("\nTest metrics, mean ± std over seeds (* as above, per column; lower is better):")
    single_row = {f"{t} {k}": statistics.mean(single[s][t][k] for s in single) for t in task_names for k in ("mse", "mae")}
    for metric in ("mse", "mae"):
        columns = {f"{t} {metric}": {m: per_seed(m, lambda r, t=t: r["test"][t][metric]) for m in methods}
                   for t in task_names}
        print(sig.seed_table(columns, {c: True for c in columns}, methods, alpha=args.alpha,
                             reference=("single-task", single_row)) + "\n")
        for name, col in columns.items():
            comparisons[name] = sig.pairwise({m: col[m] for m in finite}, alpha=args.alpha)

    print("Pairwise Δm% (row vs column; paired t-test, Holm over all pairs): "
          "< better, > worse, = not significantly different")
    print(sig.pairwise_matrix(comparisons["Δm%"], finite))
    if args.pairwise_metrics:
        for name, found in comparisons.items():
            if name != "Δm%":
                print(f"\nPairwise {name} (as above):\n" + sig.pairwise_matrix(found, finite))
    return comparisons


if __name__ == "__main__":
    main()
