"""The shape of the MMoE paper's synthetic experiment (Ma et al., KDD 2018, §4.3, Fig. 4).

Two regression tasks of the built-in ``synthetic`` data set (``polytask.data.synthetic``: the
paper's generator, task correlation = cosine of the task weight vectors) at correlations 1.0,
0.9, 0.5 and 0.0; shared-bottom, OMoE and MMoE of about the same size, several seeds each, trained
with the same budget (Adam, equal task weights; a bare loop by default, polytask's Trainer with
``--trainer``, which also evaluates and checkpoints every epoch). Printed: the test MSE after the last epoch (mean of
the two tasks; mean ± std over seeds) and MMoE's gain over shared-bottom and OMoE.

The paper's finding: all models do worse as correlation falls, and MMoE's advantage over the
others grows as the tasks become less correlated.

Run: ``.venv/bin/python benchmarks/mmoe_synthetic.py [--seeds 3] [--epochs 15]`` (a few minutes
on 2 CPU cores; the CPU may be shared with other processes, which changes time, not results).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from polytask.data import synthetic
from polytask.nn import build_model
from polytask.train import RunConfig, Trainer

MODELS = {  # sizes as in the paper's synthetic study: 8 experts of 16 units vs a ~same-size bottom
    "shared_bottom": dict(bottom=(128,), tower=(8,)),
    "omoe": dict(num_experts=8, expert=(16,), tower=(8,)),
    "mmoe": dict(num_experts=8, expert=(16,), tower=(8,)),
}
CORRELATIONS = (1.0, 0.9, 0.5, 0.0)


def run_trainer(arch: str, correlation: float, seed: int, args: argparse.Namespace, out_dir: str) -> tuple[float, float]:
    """(train, test) MSE (mean over tasks) after the last epoch, trained by polytask's Trainer."""
    splits = synthetic(num_tasks=2, correlation=correlation, num_rows=args.rows, input_dim=100, seed=seed)
    torch.manual_seed(seed)
    model = build_model(arch, splits.input_spec, splits.tasks, **MODELS[arch])
    config = RunConfig(
        name=f"{arch}-{correlation}-{seed}", seed=seed, device="cpu", out_dir=f"{out_dir}/{{name}}",
        model={"arch": arch, "params": MODELS[arch]}, optim={"name": "adam", "lr": args.lr},
        train={"epochs": args.epochs, "batch_size": args.batch, "early_stopping": None},
    )
    result = Trainer(config, splits=splits, model=model, progress=False).fit()
    model.eval()
    with torch.no_grad():
        out = model(splits.train.inputs)
    train = statistics.fmean(t.evaluate(out[t.name], splits.train.targets[t.name])["mse"] for t in splits.tasks)
    last = result.history[-1].test
    return train, statistics.fmean(last[t.name]["mse"] for t in splits.tasks)


def run_plain(arch: str, correlation: float, seed: int, args: argparse.Namespace, out_dir: str) -> tuple[float, float]:
    """The same training (Adam, shuffled mini-batches, equal-weight sum of the task losses) in a
    bare loop: no per-epoch evaluation or checkpoint files, so many runs fit in a few minutes."""
    splits = synthetic(num_tasks=2, correlation=correlation, num_rows=args.rows, input_dim=100, seed=seed)
    torch.manual_seed(seed)
    model = build_model(arch, splits.input_spec, splits.tasks, **MODELS[arch])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    x, y = splits.train.inputs, splits.train.targets
    g = torch.Generator().manual_seed(seed)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=g).split(args.batch):
            out = model(x[idx])
            loss = sum(t.loss(out[t.name], y[t.name][idx]) for t in splits.tasks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return tuple(  # type: ignore[return-value]
            statistics.fmean(t.evaluate(model(part.inputs)[t.name], part.targets[t.name])["mse"] for t in splits.tasks)
            for part in (splits.train, splits.test)
        )


def _one_run(job: tuple[str, float, int, argparse.Namespace, str]) -> tuple[str, float, int, tuple[float, float]]:
    arch, correlation, seed, args, out_dir = job
    torch.set_num_threads(args.threads)
    run = run_trainer if args.trainer else run_plain
    return arch, correlation, seed, run(arch, correlation, seed, args, out_dir)


def _table(results: dict[tuple[str, float], list[float]], title: str) -> None:
    print(title)
    header = (f"{'corr':>4} | {'shared_bottom':>15} | {'omoe':>15} | {'mmoe':>15} | "
              f"{'MMoE vs SB':>10} | {'MMoE vs OMoE':>12}")
    print(header)
    print("-" * len(header))
    for correlation in CORRELATIONS:
        cells, means = [], {}
        for arch in MODELS:
            v = results[(arch, correlation)]
            means[arch] = statistics.fmean(v)
            std = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{means[arch]:7.3f} ± {std:5.3f}")
        # gains per seed, then averaged: the data's scale changes with the seed
        per_seed = list(zip(*(results[(a, correlation)] for a in ("shared_bottom", "omoe", "mmoe"))))
        gain_sb = statistics.fmean(100 * (sb - mm) / sb for sb, _, mm in per_seed)
        gain_omoe = statistics.fmean(100 * (om - mm) / om for _, om, mm in per_seed)
        print(f"{correlation:4.1f} | " + " | ".join(f"{c:>15}" for c in cells) + f" | {gain_sb:9.1f}% | {gain_omoe:11.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trainer", action="store_true",
                        help="train with polytask.train.Trainer (evaluates and checkpoints every epoch: slower)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs in parallel processes (each with --threads threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train: dict[tuple[str, float], list[float]] = {}
    test: dict[tuple[str, float], list[float]] = {}
    with tempfile.TemporaryDirectory() as out_dir:
        jobs = [(arch, c, seed, args, out_dir) for c in CORRELATIONS for seed in range(args.seeds) for arch in MODELS]
        if args.workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.workers) as pool:
                done = pool.map(_one_run, jobs, chunksize=1)
        else:
            done = map(_one_run, jobs)
        for arch, correlation, seed, (mse_train, mse_test) in sorted(done, key=lambda r: (r[1], r[2])):
            train.setdefault((arch, correlation), []).append(mse_train)
            test.setdefault((arch, correlation), []).append(mse_test)
            print(f"corr {correlation} seed {seed} {arch}: train {mse_train:.4f} test {mse_test:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print(f"\nMMoE synthetic experiment ({'Trainer' if args.trainer else 'bare loop'}): 2 regression tasks, "
          f"{args.rows} rows (70% train), input 100, {args.epochs} epochs, Adam lr {args.lr}, batch {args.batch}, seeds 0..{args.seeds - 1}; "
          f"MSE after the last epoch, mean over tasks (mean ± std over seeds); "
          f"{time.perf_counter() - start:.0f} s")
    _table(train, "\ntraining-set MSE (the paper's Fig. 4 plots the training loss)")
    _table(test, "\ntest MSE")
    print("gain = mean over seeds of (other − MMoE) / other · 100: positive when MMoE's error is lower")


if __name__ == "__main__":
    main()
