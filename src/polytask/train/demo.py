"""``polytask demo``: multi-task vs single-task baselines on the built-in data, with Δm%."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polytask.report.summary import metrics_table
from polytask.tasks import Task, delta_m
from polytask.train.config import parse_config
from polytask.train.trainer import Metrics, Trainer

#: (data set, data params, model params, train params) of each demo experiment.
DEMO_SETS: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ("digits", {}, {"bottom": [128, 64], "tower": [32]}, {"epochs": 40, "batch_size": 64}),
    ("synthetic", {"num_tasks": 3, "correlation": 0.8, "num_rows": 8000},
     {"bottom": [64, 32], "tower": [16]}, {"epochs": 25, "batch_size": 128}),
]


@dataclass
class DemoResult:
    dataset: str
    tasks: list[Task]
    multi: Metrics
    single: Metrics
    delta_m: float
    run_dir: Path

    def table(self) -> str:
        return metrics_table(self.tasks, {"single-task": self.single, "shared-bottom": self.multi})


def _config(name: str, data: str, data_params: dict, model_params: dict, train: dict, out: Path, seed: int,
            device: str, tasks: list[str] | None = None) -> Any:
    return parse_config({
        "name": name, "seed": seed, "device": device, "out_dir": str(out / "{name}"),
        "data": {"name": data, "params": data_params, "tasks": tasks},
        "model": {"arch": "shared_bottom", "params": model_params},
        "train": {**train, "early_stopping": None},
    })


def run_demo(out: Path, seed: int = 0, device: str = "auto", epochs_scale: float = 1.0,
             progress: bool | None = None) -> list[DemoResult]:
    """Train a shared-bottom model and one single-task model per task (same architecture and
    budget) on each built-in data set; Δm% of the multi-task model against the single-task ones."""
    results = []
    for data, dparams, mparams, tparams in DEMO_SETS:
        tparams = {**tparams, "epochs": max(1, round(tparams["epochs"] * epochs_scale))}
        cfg = _config(f"{data}-multi", data, dparams, mparams, tparams, out, seed, device)
        trainer = Trainer(cfg, progress=progress)
        multi = trainer.fit(overwrite=True)  # a demo run replaces the previous demo's
        single: Metrics = {}
        for task in trainer.tasks:
            scfg = _config(f"{data}-single-{task.name}", data, dparams, mparams, tparams, out, seed, device,
                           tasks=[task.name])
            single[task.name] = Trainer(scfg, progress=progress).fit(overwrite=True).test[task.name]
        dm = delta_m(multi.test, single, trainer.tasks)
        results.append(DemoResult(data, trainer.tasks, multi.test, single, dm, multi.run_dir))
    return results


def format_demo(results: list[DemoResult], seconds: float) -> str:
    parts = []
    for r in results:
        parts += [f"## {r.dataset}: test metrics at the best validation epoch", "", r.table(), "",
                  f"Δm% of shared-bottom vs single-task: {r.delta_m:+.2f}% (lower is better; "
                  "negative means multi-task beats the single-task baselines)", ""]
    parts.append(f"Wall time: {seconds:.1f} s. Run directories: {results[0].run_dir.parent}")
    return "\n".join(parts)


def demo_main(out: Path, seed: int, device: str, epochs_scale: float = 1.0) -> str:
    start = time.perf_counter()
    results = run_demo(out, seed, device, epochs_scale)
    return format_demo(results, time.perf_counter() - start)
