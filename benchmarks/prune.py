"""Multi-task pruning: Δm% and worst-task drop against the unpruned model at 30/50/70% FLOPs.

Two settings, each trained from scratch per seed with polytask's Trainer (equal weights):

- ``digits-cnn``: a small CNN trunk (three 3x3 conv-BN-ReLU blocks) on scikit-learn's 8x8 digits
  as four tasks (digit, odd, ge5, value; ``polytask.data`` "digits"), linear heads per task; the
  conv filters are pruned;
- ``synthetic-mmoe``: MMoE (8 experts, hidden 64-32) on the synthetic generator of Ma et al. (KDD
  2018; 3 tasks, correlation 0.5); the experts' hidden units are pruned;
- ``synthetic-ple``: PLE (Tang et al., RecSys 2020; 2 levels, 1 specific expert per task and 1
  shared expert per level, hidden 64-32) on the same data; the experts' hidden layer (64) is pruned,
  each bank (every task's, the shared one) to its own width, tied over the levels, while their
  output width (32), the gates and the towers stay;
- ``digits-mtan``: MTAN (Liu et al., CVPR 2019; blocks of 16-32-32 channels, 8-16 with --quick)
  on the same digits as 1x8x8 images; both trunk convs of every block are pruned, each channel with
  every task's attention input, mask and attended features, and each task's attention hidden units
  (its own width per block, ``attention_widths``) (``polytask.prune.mtan``). Not in the
  default ``--settings`` (name it: a few minutes on one core with --quick).

For each FLOPs target and method (pagcp, taylor, l1, random) the table prints, as mean ± std over
seeds, the test Δm% against the unpruned model (all metrics of all tasks, positive = worse), the
worst task's drop of its main metric (percent), the FLOPs ratio reached and the latency ratio
(median CPU forward time of a 256-row batch, pruned / unpruned). ``--finetune-epochs`` fine-tunes
every pruned model with the Trainer before it is measured (default 3; 0: one-shot, as --quick); the
unpruned reference is not trained further, so a fine-tuned model may beat it (negative Δm%).

    .venv/bin/python benchmarks/prune.py [--quick] [--seeds 3] [--finetune-epochs 3] [--device cpu]

PAGCP meets each target with its relaxed rounds where the authors' schedule stalls (see
``polytask.prune.pagcp``); the "limit x" column is the mean scale of its loss limits finally used
(1: the authors' schedule sufficed). A method that cannot meet a target for some seed prints
"unreachable (best X)" (X: the lowest FLOPs ratio it reached) instead of crashing the run.

The expectation to check (issue 15): PAGCP has the lowest worst-task drop at each budget. Timings
taken on a shared machine mean nothing; read the latency column from a quiet one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from polytask.data import load
from polytask.data.dataset import MultiTaskDataset, Splits
from polytask.nn import TaskHeads, build_model
from polytask.prune import PAGCP, PruneContext, UnreachableBudget, count, latency_ms, prune_model
from polytask.prune.core import task_drop
from polytask.prune.graph import prunable_layers
from polytask.tasks import delta_m
from polytask.train import Trainer
from polytask.train.config import parse_config
from polytask.train.trainer import evaluate

METHODS = ("pagcp", "taylor", "l1", "random")
TARGETS = (0.3, 0.5, 0.7)


class DigitsCNN(nn.Module):
    """Shared CNN trunk on 8x8 digit images (the flat 64 pixels reshaped), one linear head per task."""

    def __init__(self, tasks, channels=(16, 32, 32)) -> None:
        super().__init__()
        layers, cin = [], 1
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            cin = c
        self.trunk = nn.Sequential(*layers)
        self.heads = TaskHeads(tasks, cin)
        self.task_names = [t.name for t in tasks]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x.reshape(-1, 1, 8, 8)).mean(dim=(2, 3))
        return self.heads(z)

    def conv_names(self) -> list[str]:
        return [f"trunk.{i}" for i, m in enumerate(self.trunk) if isinstance(m, nn.Conv2d)]


def train(model: nn.Module, splits, out: Path, seed: int, epochs: int, device: str, name: str) -> nn.Module:
    cfg = parse_config({"name": name, "out_dir": str(out / name), "seed": seed, "device": device,
                        "data": {"name": splits.name}, "optim": {"name": "adam", "lr": 3e-3},
                        "train": {"epochs": epochs, "batch_size": 128, "early_stopping": None}})
    trainer = Trainer(cfg, splits=splits, model=model, progress=False)
    trainer.fit()
    return trainer.model.eval()


def digit_images(seed: int) -> Splits:
    """The digits data set with its inputs as 1x8x8 images (MTAN reads images)."""
    flat = load("digits", seed=seed)
    parts = [MultiTaskDataset(part.inputs.reshape(-1, 1, 8, 8), part.targets)
             for part in (flat.train, flat.val, flat.test)]
    return Splits("digits", flat.tasks, *parts, 1)


def setting(name: str, seed: int, quick: bool, device: str):
    torch.manual_seed(seed)
    if name == "digits-mtan":
        splits = digit_images(seed)
        channels = [8, 16] if quick else [16, 32, 32]
        # each task's attention hidden width its own (attention_widths): those units are pruned too
        model = build_model("mtan", 1, splits.tasks, channels=channels,
                            attention_widths={t.name: channels for t in splits.tasks})
        return splits, model, [layer.name for layer in prunable_layers(model, "mtan")], 4 if quick else 15
    if name == "digits-cnn":
        splits = load("digits", seed=seed)
        model = DigitsCNN(splits.tasks, (8, 16, 16) if quick else (16, 32, 32))
        return splits, model, model.conv_names(), 4 if quick else 15
    splits = load("synthetic", num_tasks=3, correlation=0.5, num_rows=2000 if quick else 8000, input_dim=32,
                  seed=seed)
    expert = [32, 16] if quick else [64, 32]
    if name == "synthetic-ple":
        banks = {name: expert[:-1] for name in [*(t.name for t in splits.tasks), "shared"]}  # one width per bank
        model = build_model("ple", 32, splits.tasks, num_levels=2, specific_experts=1, shared_experts=1,
                            expert=expert, tower=[16], bank_widths=banks)
        return splits, model, [layer.name for layer in prunable_layers(model, "ple")], 4 if quick else 15
    model = build_model("mmoe", 32, splits.tasks, num_experts=4 if quick else 8, expert=expert, tower=[16])
    return splits, model, [layer.name for layer in prunable_layers(model, "mmoe")], 4 if quick else 15


def measure(splits, base: nn.Module, pruned: nn.Module, base_test) -> dict[str, float]:
    test = evaluate(pruned, splits.test, splits.tasks)
    x = (splits.test.subset(torch.arange(min(256, len(splits.test)))).inputs,)
    one = (splits.test.subset(torch.arange(1)).inputs,)
    return {
        "dm": delta_m(test, base_test, splits.tasks),
        "worst": max(task_drop(t, test[t.name], base_test[t.name]) for t in splits.tasks),
        "flops": count(pruned, one).flops / count(base, one).flops,
        "latency": latency_ms(pruned, x) / latency_ms(base, x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, small models, few epochs, one target")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="fine-tuning epochs after pruning (default: 3, --quick: 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="digits-cnn,synthetic-mmoe,synthetic-ple",
                        help="comma-separated; digits-mtan too")
    args = parser.parse_args()
    seeds = range(1 if args.quick else args.seeds)
    if args.finetune_epochs is None:
        args.finetune_epochs = 0 if args.quick else 3
    targets = (0.5,) if args.quick else TARGETS
    results: dict[tuple, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            for seed in seeds:
                splits, model, layers, epochs = setting(name, seed, args.quick, args.device)
                base = train(model, splits, Path(tmp), seed, epochs, args.device, f"{name}-{seed}")
                base_test = evaluate(base, splits.test, splits.tasks)
                ctx = PruneContext(base, layers, (splits.train.subset(torch.arange(4)).inputs,), splits.tasks,
                                   splits.train, splits.val)
                for target in targets:
                    for method in METHODS:
                        pruner = PAGCP() if method == "pagcp" else method
                        try:
                            pruned = prune_model(ctx, pruner, target, **({} if method == "pagcp" else {"seed": seed}))
                        except UnreachableBudget as exc:
                            results.setdefault((name, target, method), []).append({"unreachable": exc.best})
                            continue
                        if args.finetune_epochs:
                            pruned = train(pruned, splits, Path(tmp), seed, args.finetune_epochs, args.device,
                                           f"{name}-{seed}-{method}-{target}")
                        row = measure(splits, base, pruned, base_test)
                        if method == "pagcp":
                            row["scale"] = pruner.limit["scale"]
                        results.setdefault((name, target, method), []).append(row)
    print(f"| setting | FLOPs target | method | Δm% test | worst-task drop % | FLOPs ratio | latency ratio | limit x |"
          f"  ({len(list(seeds))} seed(s), fine-tune {args.finetune_epochs} epochs)")
    print("|---|---|---|---|---|---|---|---|")
    for (name, target, method), rows in results.items():
        print(f"| {name} | {target:g} | {method} | " + " | ".join(table_cells(rows)) + " |")


def table_cells(rows: list[dict[str, float]]) -> list[str]:
    """One method's cells over seeds: mean ± std, or "unreachable (best X)" when any seed missed the target
    (X: the lowest FLOPs ratio reached, worst seed), so that no mean mixes met and missed budgets."""
    missed = [r["unreachable"] for r in rows if "unreachable" in r]
    if missed:
        return [f"unreachable (best {max(missed):.3f}) in {len(missed)}/{len(rows)} seeds"] + [""] * 4
    cells = []
    for key in ("dm", "worst", "flops", "latency"):
        vals = [r[key] for r in rows]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}" if key in ("flops", "latency")
                     else f"{statistics.mean(vals):+.2f} ± {sd:.2f}")
    scales = [r["scale"] for r in rows if "scale" in r]
    cells.append(f"{statistics.mean(scales):g}" if scales else "")
    return cells


if __name__ == "__main__":
    main()
