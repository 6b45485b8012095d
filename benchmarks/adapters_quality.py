"""Quality of the multi-task adapters on related synthetic sequence tasks: Δm% against two baselines.

Data: ``sequence_tasks`` (``polytask.data.sequences``): ``T`` binary tasks whose labels count a
task's key tokens, the key sets sharing ``relatedness`` of their tokens, and one token-level
tagging task ``tag0`` (each token's running count of task 0's key tokens, capped at 2; a tower on
every token, scored by token accuracy and macro-F1). Backbone: a small random
BERT-shaped model (frozen, the same for every run of a seed); adapters in the query/value
projections; towers on the mean-pooled output. Every run: the same epochs, batch, optimizer and
early stopping on the validation split (``polytask.train.Trainer``), test metrics at the best
validation epoch.

Baselines (Maninis et al. 2019's Δm%, lower is better, over every task's metrics):

- ``vs single``: one LoRA per task, each trained alone on its task (``T`` runs);
- ``vs shared``: one LoRA shared by all tasks (``one_adapter: true``), trained on all tasks.

Table: mean ± std over seeds of Δm% against each baseline (AUC and accuracy of the binary tasks,
token accuracy and macro-F1 of the tagging task), the mean test AUC and the tag task's test
token accuracy.
Run: ``.venv/bin/python benchmarks/adapters_quality.py [--seeds 0 1 2] [--toy]``. ``--toy`` only
checks that the script works (seconds, meaningless numbers); the default size runs in minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from polytask.tasks import delta_m

METHODS: list[tuple[str, dict[str, Any]]] = [
    ("lora", {}),
    ("mtlora", {}),
    ("hydralora", {"num_experts": 4}),
    ("molora", {"num_experts": 4, "top_k": 2}),
    ("loramoe", {"num_experts": 4}),
    ("smora", {"top_k": 2}),
    ("mhr", {"n_skills": 3, "n_splits": 2}),
]


def run_config(name: str, out: Path, seed: int, size: dict, method: str, params: dict, tasks: list[str] | None = None,
               one_adapter: bool = False) -> dict:
    bert = {"model_type": "bert", "vocab_size": size["vocab"], "hidden_size": size["hidden"],
            "num_hidden_layers": size["layers"], "num_attention_heads": 2, "intermediate_size": 2 * size["hidden"],
            "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return {
        "name": name, "seed": seed, "device": "cpu", "out_dir": str(out / name),
        "data": {"name": "sequence_tasks", "tasks": tasks,
                 "params": {"num_tasks": size["tasks"], "relatedness": size["relatedness"], "num_rows": size["rows"],
                            "vocab_size": size["vocab"], "max_length": size["length"],
                            "token_tasks": size["token_tasks"], "seed": seed}},
        "model": {"arch": "adapters", "params": {
            "backbone": {"config": bert}, "method": method, "target_modules": ["query", "value"],
            "rank": size["rank"], "alpha": 2 * size["rank"], "method_params": params, "pooling": "mean",
            "one_adapter": one_adapter}},
        "balancer": {"name": "ew"}, "optim": {"name": "adamw", "lr": size["lr"]},
        "train": {"epochs": size["epochs"], "batch_size": 64, "early_stopping": 3},
    }


def fit(config: dict) -> dict[str, dict[str, float]]:
    from polytask.train import Trainer
    from polytask.train.config import parse_config

    return Trainer(parse_config(config), progress=False).fit(overwrite=True).test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = dict(tasks=3, token_tasks=1, relatedness=0.5, rows=2000, vocab=64, length=16, hidden=64, layers=2, rank=4,
                lr=3e-3, epochs=6)
    if args.toy:
        size.update(rows=200, hidden=16, epochs=1)
    pooled = [f"task{t}" for t in range(size["tasks"])]
    tags = [f"tag{j}" for j in range(size["token_tasks"])]
    tasks = pooled + tags
    metrics = {**{t: ["auc", "accuracy"] for t in pooled}, **{t: ["accuracy", "macro_f1"] for t in tags}}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        dm: dict[str, dict[str, list[float]]] = {}
        auc: dict[str, list[float]] = {}
        tag_acc: dict[str, list[float]] = {}
        for seed in args.seeds:
            single = {}
            for t in tasks:  # one LoRA per task, each trained alone
                single.update(fit(run_config(f"single-{t}-s{seed}", out, seed, size, "lora", {}, tasks=[t])))
            shared = fit(run_config(f"shared-s{seed}", out, seed, size, "lora", {}, one_adapter=True))
            results = {"one shared lora": shared}
            for method, params in METHODS:
                results[method] = fit(run_config(f"{method}-s{seed}", out, seed, size, method, params))
            results["one lora per task (single)"] = single
            for name, res in results.items():
                row = dm.setdefault(name, {"single": [], "shared": []})
                row["single"].append(delta_m(res, single, metrics=metrics))
                row["shared"].append(delta_m(res, shared, metrics=metrics))
                auc.setdefault(name, []).append(statistics.mean(res[t]["auc"] for t in pooled))
                if tags:
                    tag_acc.setdefault(name, []).append(statistics.mean(res[t]["accuracy"] for t in tags))
            print(f"seed {seed} done", flush=True)

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):+.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:+.2f}"

    print(f"\n{size['tasks']} sequence tasks + {size['token_tasks']} tagging task (relatedness {size['relatedness']}), "
          f"{size['rows']} rows, BERT-shaped hidden {size['hidden']} x {size['layers']} layers, rank {size['rank']}, "
          f"seeds {args.seeds}; Δm% over AUC and accuracy (tags: token accuracy and macro-F1; lower is better)")
    print("| method | Δm% vs single | Δm% vs shared | mean test AUC | tag token accuracy |")
    print("|---|---:|---:|---:|---:|")
    for name in dm:
        tag = f"{statistics.mean(tag_acc[name]):.4f}" if tag_acc else "-"
        print(f"| {name} | {ms(dm[name]['single'])} | {ms(dm[name]['shared'])} | {statistics.mean(auc[name]):.4f} "
              f"| {tag} |")


if __name__ == "__main__":
    main()
