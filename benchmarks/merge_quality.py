"""Merging quality on built-in data: the standard table of the model-merging literature.

A shared-bottom model is pre-trained briefly on all tasks of a built-in data set (the "base");
a copy is then fine-tuned on each task alone (its trunk and its own head move). The fine-tuned
models are merged with every method, and each merged model is evaluated on every task's test
split. Accuracy is reported absolute and normalised to the model fine-tuned on that task (100 =
as good as the individual model), plus the jointly trained multi-task model as a reference.

Protocol as in the merging papers: only the shared trunk is merged; each task keeps the head it
was fine-tuned with (heads are task-specific, so ``theta_0 + sum_k tau_k`` restores each head).
AdaMerging uses the unlabeled test inputs (entropy), as in Yang et al. (ICLR 2024); Fisher and
RegMean use each task's training inputs.

    python benchmarks/merge_quality.py --data digits --seed 0

Measured 2026-11-23 (digits: digit/odd/ge5, seed 0, default arguments, 240 s on 2 loaded cores);
one seed, untuned merge hyper-parameters - a sanity table, not a ranking of the methods:

| method | digit acc | digit norm | odd acc | odd norm | ge5 acc | ge5 norm | mean norm |
|---|---:|---:|---:|---:|---:|---:|---:|
| individual fine-tuned (reference) | 96.4 | 100.0 | 96.1 | 100.0 | 98.1 | 100.0 | 100.0 |
| base (pre-trained) | 70.8 | 73.5 | 87.2 | 90.8 | 70.0 | 71.4 | 78.5 |
| joint multi-task training | 95.8 | 99.4 | 96.7 | 100.6 | 97.8 | 99.7 | 99.9 |
| task arithmetic (λ=0.3) | 90.0 | 93.4 | 91.1 | 94.8 | 65.8 | 67.1 | 85.1 |
| model soup | 90.0 | 93.4 | 91.4 | 95.1 | 66.4 | 67.7 | 85.4 |
| TIES (k=20%, λ=1) | 86.4 | 89.6 | 89.2 | 92.8 | 68.3 | 69.7 | 84.0 |
| DARE-TIES (p=0.5) | 91.9 | 95.4 | 89.4 | 93.1 | 69.7 | 71.1 | 86.5 |
| DARE linear (p=0.5, λ=0.3) | 92.2 | 95.7 | 90.0 | 93.6 | 66.9 | 68.3 | 85.9 |
| Breadcrumbs (λ=0.3) | 90.8 | 94.2 | 90.0 | 93.6 | 65.0 | 66.3 | 84.7 |
| Consensus TA (λ=0.3) | 83.9 | 87.0 | 87.5 | 91.0 | 60.6 | 61.8 | 79.9 |
| Model Stock | 88.1 | 91.4 | 87.5 | 91.0 | 62.8 | 64.0 | 82.1 |
| TSV-M (α=1) | 91.9 | 95.4 | 93.1 | 96.8 | 69.7 | 71.1 | 87.8 |
| Iso-C (α=1) | 88.3 | 91.6 | 89.7 | 93.4 | 56.1 | 57.2 | 80.7 |
| Iso-CTS (α=1) | 84.7 | 87.9 | 86.4 | 89.9 | 63.1 | 64.3 | 80.7 |
| PCB (r=0.1, λ=1) | 84.7 | 87.9 | 90.6 | 94.2 | 71.1 | 72.5 | 84.9 |
| Fisher merging | 96.7 | 100.3 | 86.4 | 89.9 | 63.6 | 64.9 | 85.0 |
| RegMean (α=0.9) | 93.9 | 97.4 | 91.7 | 95.4 | 73.1 | 74.5 | 89.1 |
| AdaMerging (task-wise) | 91.1 | 94.5 | 92.8 | 96.5 | 67.5 | 68.8 | 86.6 |
| AdaMerging (layer-wise) | 94.2 | 97.7 | 91.7 | 95.4 | 59.7 | 60.9 | 84.7 |
| WEMoE (bottom MLP upcycled) | 91.7 | 95.1 | 85.6 | 89.0 | 54.4 | 55.5 | 79.9 |
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from polytask.data import load
from polytask.merge import merge_state_dicts
from polytask.merge.data_driven import adamerging, fisher_diagonal, fisher_merge, regmean_merge, wemoe
from polytask.nn import build_model
from polytask.train.trainer import evaluate

PER_TENSOR = [
    ("task arithmetic (λ=0.3)", "task_arithmetic", {"lambda_": 0.3}, {}),
    ("model soup", "linear", {}, {}),
    ("TIES (k=20%, λ=1)", "ties", {}, {"density": 0.2}),
    ("DARE-TIES (p=0.5)", "dare_ties", {"lambda_": 0.5}, {"density": 0.5}),
    ("DARE linear (p=0.5, λ=0.3)", "dare_linear", {"lambda_": 0.3}, {"density": 0.5}),
    ("Breadcrumbs (λ=0.3)", "breadcrumbs", {"lambda_": 0.3}, {"density": 0.9, "gamma": 0.01}),
    ("Consensus TA (λ=0.3)", "consensus", {"lambda_": 0.3}, {}),
    ("Model Stock", "model_stock", {}, {}),
    ("TSV-M (α=1)", "tsv", {}, {}),
    ("Iso-C (α=1)", "iso_c", {}, {}),
    ("Iso-CTS (α=1)", "iso_cts", {}, {}),
    ("PCB (r=0.1, λ=1)", "pcb", {"ratio": 0.1}, {}),
]


def train(model: nn.Module, splits, tasks, epochs: int, seed: int, lr: float = 3e-3) -> nn.Module:
    """Adam on the summed loss of ``tasks`` (no weight decay: untouched heads stay put)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in splits.train.batches(64, shuffle=True, generator=g):
            out = model(batch.inputs)
            loss = sum(t.loss(out[t.name], batch.targets[t.name]) for t in tasks)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    if hasattr(model, "shared_features"):
        model.shared_features = None
    return model


def clone(model: nn.Module) -> nn.Module:
    """A deep copy (the cached shared features of the last forward are not copied)."""
    if hasattr(model, "shared_features"):
        model.shared_features = None
    return copy.deepcopy(model)


def accuracy(model: nn.Module, splits, tasks) -> dict[str, float]:
    metrics = evaluate(model, splits.test, tasks)
    return {t.name: metrics[t.name]["accuracy"] for t in tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-epochs", type=int, default=1)
    parser.add_argument("--ft-epochs", type=int, default=15)
    parser.add_argument("--ada-steps", type=int, default=100)
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    splits = load(args.data)
    tasks = [t for t in splits.tasks if t.kind in ("binary", "multiclass")]
    names = [t.name for t in tasks]
    input_dim = splits.train.inputs.shape[1]
    base = build_model("shared_bottom", input_dim, tasks, bottom=(128, 64), tower=(32,))
    base = train(base, splits, tasks, args.base_epochs, args.seed)
    finetuned = [train(clone(base), splits, [t], args.ft_epochs, args.seed + 1 + i) for i, t in enumerate(tasks)]
    joint = train(clone(base), splits, tasks, args.ft_epochs, args.seed)

    base_sd = base.state_dict()
    ft_sds = [m.state_dict() for m in finetuned]
    head_keys = [k for k in base_sd if k.startswith("heads.")]
    # each task keeps its own fine-tuned head: theta_0 + sum_k tau_k on the head tensors
    own_heads = merge_state_dicts("task_arithmetic", [{k: s[k] for k in head_keys} for s in ft_sds],
                                  {k: base_sd[k] for k in head_keys})

    def as_model(state: dict[str, torch.Tensor]) -> nn.Module:
        m = clone(base)
        m.load_state_dict({**state, **own_heads})
        return m

    rows: list[tuple[str, dict[str, float]]] = []
    individual = {t.name: accuracy(m, splits, [t])[t.name] for t, m in zip(tasks, finetuned)}
    rows.append(("individual fine-tuned (reference)", individual))
    rows.append(("base (pre-trained)", accuracy(base, splits, tasks)))
    rows.append(("joint multi-task training", accuracy(joint, splits, tasks)))
    for label, method, params, per_model in PER_TENSOR:
        merged = merge_state_dicts(method, ft_sds, base_sd, model_params=[per_model] * len(tasks),
                                   seed=args.seed, **params)
        rows.append((label, accuracy(as_model(merged), splits, tasks)))

    train_batches = [list(splits.train.batches(128)) for _ in tasks]
    gen = torch.Generator().manual_seed(args.seed)
    fishers = [fisher_diagonal(m, train_batches[k], k, tasks=names, generator=gen) for k, m in enumerate(finetuned)]
    rows.append(("Fisher merging", accuracy(as_model(fisher_merge(finetuned, fishers)), splits, tasks)))
    rows.append(("RegMean (α=0.9)", accuracy(as_model(regmean_merge(finetuned, train_batches)), splits, tasks)))
    test_inputs = [[b.inputs for b in splits.test.batches(128)] for _ in tasks]
    for granularity in ("task", "layer"):
        state, _ = adamerging(base, finetuned, test_inputs, granularity=granularity, steps=args.ada_steps,
                              lr=1e-2, tasks=names)
        rows.append((f"AdaMerging ({granularity}-wise)", accuracy(as_model(state), splits, tasks)))
    # WEMoE: the shared bottom MLP becomes a weight-ensembling MoE; heads as above
    def with_own_heads(model: nn.Module) -> nn.Module:
        m = clone(model)
        m.load_state_dict({**model.state_dict(), **own_heads})
        return m

    moe = wemoe(with_own_heads(base), [with_own_heads(m) for m in finetuned], test_inputs, ["bottom"],
                steps=args.ada_steps, lr=1e-2, tasks=names)
    rows.append(("WEMoE (bottom MLP upcycled)", accuracy(moe, splits, tasks)))

    print(f"data: {args.data} (tasks {', '.join(names)}), seed {args.seed}; shared-bottom 128-64, tower 32; "
          f"base {args.base_epochs} epoch(s) joint, fine-tune {args.ft_epochs} epochs per task "
          f"({time.perf_counter() - t0:.0f}s)\n")
    header = " | ".join(f"{n} acc | {n} norm" for n in names)
    print(f"| method | {header} | mean norm |")
    print("|---|" + "---:|" * (2 * len(names) + 1))
    for label, acc in rows:
        norm = {n: 100 * acc[n] / individual[n] for n in names}
        cells = " | ".join(f"{100 * acc[n]:.1f} | {norm[n]:.1f}" for n in names)
        print(f"| {label} | {cells} | {sum(norm.values()) / len(names):.1f} |")
    print("\nacc: test accuracy (%); norm: accuracy / individual fine-tuned model's accuracy (%)")


if __name__ == "__main__":
    main()
