"""Quality of every registered balancer on the built-in synthetic data at low task correlation.

For each seed: single-task baselines (the same shared-bottom network with one task, trained with
the same budget), then one multi-task run per balancer. Printed: per-task test MSE at the epoch
chosen on validation (mean over seeds), Δm% against the single-task baselines (Maninis et al.,
CVPR 2019; over each task's metrics, mse and mae; mean ± std over seeds; lower is better), the
mean task weights of the last epoch, the seconds per run, and a status: ``ok``, ``nan`` (a
non-finite loss or metric), ``diverged`` (a task's test loss above the untrained model's) or the
error. Runs are spread over ``--jobs`` processes with one torch thread each.

    .venv/bin/python benchmarks/balance_quality.py                # all balancers, 3 seeds
    .venv/bin/python benchmarks/balance_quality.py --methods ew,famo --seeds 1
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


def data_params(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {"num_tasks": args.tasks, "correlation": args.correlation, "num_rows": args.rows, "seed": seed}


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
            "data": {"name": "synthetic", "params": job["data"], "tasks": job.get("tasks")},
            "model": {"arch": "shared_bottom", "params": {"bottom": [64, 32], "tower": [16]}},
            "balancer": {"name": job["balancer"], "params": params},
            "optim": {"name": "adam", "lr": 1e-3},
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
    return {**job, "status": status, "seconds": seconds, "test": result.test,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated balancer names (default: all registered)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--correlation", type=float, default=0.1)
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write every run's result to this JSON file")
    args = parser.parse_args()

    methods = canonical_balancers() if args.methods == "all" else args.methods.split(",")
    task_names = [f"task{t}" for t in range(args.tasks)]
    jobs = []
    for seed in range(args.seeds):
        common = {"seed": seed, "epochs": args.epochs, "data": data_params(args, seed)}
        jobs += [{**common, "kind": "single", "balancer": "ew", "tasks": [t]} for t in task_names]
        jobs += [{**common, "kind": "mtl", "balancer": m} for m in methods]
    wall = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, jobs))
    wall = time.perf_counter() - wall
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)

    from polytask.tasks import Task, delta_m

    tasks = [Task(t, "regression", metrics=("mse", "mae")) for t in task_names]
    single = {seed: {} for seed in range(args.seeds)}
    for r in results:
        if r["kind"] == "single":
            if r["status"] != "ok":
                raise SystemExit(f"single-task baseline {r['tasks'][0]} seed {r['seed']} failed: {r['status']}")
            single[r["seed"]].update(r["test"])

    print(f"synthetic data: {args.tasks} tasks, correlation {args.correlation}, {args.rows} rows; "
          f"shared-bottom (64,32)+tower(16); Adam 1e-3, batch 128, {args.epochs} epochs; "
          f"{args.seeds} seeds; test metrics at the epoch chosen on validation")
    header = (f"{'method':<12}" + "".join(f"{t + ' mse':>12}" for t in task_names)
              + f"{'Δm% mean':>10}{'± std':>8}  {'last-epoch weights':<28}{'s/run':>7}  status")
    print(header)
    print("-" * len(header))
    single_mse = [statistics.mean(single[s][t]["mse"] for s in single) for t in task_names]
    print(f"{'single-task':<12}" + "".join(f"{v:>12.4f}" for v in single_mse) + f"{0.0:>10.2f}{'':>8}")
    for m in methods:
        runs = [r for r in results if r["kind"] == "mtl" and r["balancer"] == m]
        ok = [r for r in runs if "test" in r]
        statuses = sorted({r["status"] for r in runs})
        secs = statistics.mean(r["seconds"] for r in runs)
        if not ok:
            print(f"{m:<12}" + f"{'—':>12}" * len(task_names) + f"{'—':>10}{'':>8}  {'':<28}{secs:>7.1f}  "
                  + ",".join(statuses))
            continue
        mse = [statistics.mean(r["test"][t]["mse"] for r in ok) for t in task_names]
        deltas = [delta_m(r["test"], single[r["seed"]], tasks) for r in ok]
        std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        w = [statistics.mean(r["weights"][t] for r in ok) for t in task_names]
        weights = " ".join(f"{x:.2f}" for x in w)
        print(f"{m:<12}" + "".join(f"{v:>12.4f}" for v in mse)
              + f"{statistics.mean(deltas):>10.2f}{std:>8.2f}  {weights:<28}{secs:>7.1f}  " + ",".join(statuses))
    print(f"{len(jobs)} runs in {wall:.0f} s with {args.jobs} processes")


if __name__ == "__main__":
    main()
