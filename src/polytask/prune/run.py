"""``polytask prune``: prune a finished run directory's model into a new run directory.

The new run directory is an ordinary polytask run: ``config.yaml`` whose ``model.params`` widths
(``bottom`` for shared-bottom, ``expert`` for MMoE/OMoE, each bank's ``bank_widths`` for PLE/CGC,
the per-block widths for MTAN, ``attention_heads`` for the task-token model) are the pruned ones, so the config alone
rebuilds the pruned shapes and every tool that reads runs (``--resume`` of the fine-tuning, analyse,
report) loads it; ``best/model.safetensors`` holds the pruned weights. Recording widths rather than
pickling the whole module keeps the weights in safetensors (no code executed on load) and the model
class the one of the config. Besides, ``prune.json`` holds the method, the per-layer keep ratios and
the table, and ``prune.md`` the table: parameters, FLOPs, measured latency, each task's metrics and
Δm% against the unpruned model.

The directory is built under a temporary name next to it and renamed into place when complete:
it exists whole or not at all. The original run is only read.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polytask.errors import CheckpointError, ConfigError
from polytask.prune import banks, heads, mtan
from polytask.prune import flops as flops_lib
from polytask.prune.core import PruneContext, task_drop
from polytask.prune.graph import SUPPORTED, prunable_layers
from polytask.prune.methods import PRUNERS, check_target, prune_model
from polytask.tasks import delta_m
from polytask.train.checkpoint import PARTIAL, atomic_write_text, load_finished_run, load_model_file, load_state_checked, save_model_file

#: model.params key that holds the prunable layers' widths, per architecture
WIDTH_KEY = {"shared_bottom": "bottom", "hps": "bottom", "single_task": "bottom", "mmoe": "expert", "omoe": "expert",
             "ple": "expert", "cgc": "expert"}


@dataclass
class PruneOptions:
    """What ``polytask prune`` does: ``method`` to ``flops`` (fraction of the FLOPs left), no task's
    main validation metric worse by more than ``floor`` percent, ``finetune_epochs`` epochs of
    fine-tuning with the run's balancer, into ``out`` (default: next to the run)."""

    method: str = "pagcp"
    flops: float | str = 0.5
    floor: float | None = None
    finetune_epochs: int = 0
    out: Path | None = None
    seed: int = 0
    latency_device: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneResult:
    out_dir: Path
    table: list[dict[str, Any]]
    keep_ratios: dict[str, float]


def load_run(run_dir: Path):
    """``(config, splits, model)`` of a finished run: the best weights loaded. CheckpointError when
    the run has no finished model; ConfigError for a run pruning does not take."""

    def refuse(config: Any) -> None:
        if config.data.name == "table":
            raise ConfigError("data.name: pruning needs the data in memory; a run on streamed table data cannot be pruned")
        check_arch(config.model.arch)

    return load_finished_run(run_dir, refuse)


def check_arch(arch: str) -> None:
    """ConfigError naming the architecture unless pruning supports it."""
    key = arch.lower()
    if key not in SUPPORTED:
        prunable_layers(nn.Module(), key)  # raises the architecture's refusal


def example_rows(data, rows: int) -> tuple:
    """The forward arguments for the first ``rows`` rows of a split."""
    return (data.subset(torch.arange(min(rows, len(data)))).inputs,)


def prune_run(run_dir: Path, options: PruneOptions, progress: bool = False) -> PruneResult:
    """Prune the run in ``run_dir`` (see the module docstring); returns where it went and the table."""
    target = check_target(options.flops)
    PRUNERS.lookup(options.method)
    from polytask.train.trainer import resolve_device

    try:  # an unknown or absent device is refused before any work
        resolve_device(options.latency_device)
    except ConfigError as exc:
        raise ConfigError(f"--latency-device: {str(exc).split(': ', 1)[-1]}") from None
    if options.finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be >= 0, got {options.finetune_epochs}")
    run_dir = Path(run_dir)
    out = Path(options.out) if options.out is not None else run_dir.parent / (
        f"{run_dir.name}-{options.method}-flops{target:g}")
    if out.exists():
        raise ConfigError(f"--out: {out} already exists; choose another directory")
    config, splits, original = load_run(run_dir)
    model = prunable_form(config, splits, original)
    torch.manual_seed(options.seed)
    layers = prunable_layers(model, config.model.arch.lower())
    ctx = PruneContext(model, [layer.name for layer in layers], example_rows(splits.train, 4), splits.tasks,
                       splits.train, splits.val, options.floor)
    params = dict(options.params)
    if "seed" in inspect.signature(PRUNERS.lookup(options.method)).parameters:  # the random draws
        params.setdefault("seed", options.seed)
    pruner = PRUNERS.build(options.method, **params)
    pruned = prune_model(ctx, pruner, target)
    widths = ctx.widths(pruned)
    keep = {n: widths[n] / w for n, w in ctx.widths(model).items()}
    new_params = pruned_params(config.model.arch.lower(), config.model.params, [widths[n] for n in ctx.layers], pruned)
    data = config.model_dump(mode="json")
    data["model"]["params"] = new_params
    data["name"] = f"{config.name}-pruned"
    data["out_dir"] = str(out).replace("{", "{{").replace("}", "}}")
    if options.finetune_epochs:
        data["train"]["epochs"] = options.finetune_epochs
    from polytask.train.config import dump_config, parse_config

    final_config = parse_config(data, "pruned config")
    from polytask.train.rundir import remove_stale_builds

    remove_stale_builds(out)  # what a killed prune into the same --out left
    created = [p for p in out.parents if not p.exists()]  # innermost first; removed again on failure
    tmp = out.parent / f".{out.name}.{os.getpid()}{PARTIAL}"
    try:
        _write(tmp, data, options.finetune_epochs, splits, pruned, progress)
        pruned = _reload(final_config, splits, tmp / "best" / "model.safetensors")
        table = _table(ctx, original, pruned, splits, options.latency_device)  # the run's own form
        summary = {"method": options.method, "target_flops": target, "keep_task_floor": options.floor,
                   "finetune_epochs": options.finetune_epochs, "source": str(run_dir),
                   "widths": {n: widths[n] for n in ctx.layers}, "keep_ratios": keep, "table": table,
                   "val_drops": ctx.drops(table[1]["val"]),  # after fine-tuning: the floor held at pruning time
                   "decisions": getattr(pruner, "log", []),  # PAGCP: each layer's θ, kept width, loss ratios
                   "limit": getattr(pruner, "limit", None)}  # PAGCP: the round, θ_0 and limit scale that met it
        atomic_write_text(tmp / "prune.json", json.dumps(summary, indent=1))
        atomic_write_text(tmp / "prune.md", markdown(table, splits.tasks))
        atomic_write_text(tmp / "config.yaml", dump_config(final_config))
        try:
            os.rename(tmp, out)
        except OSError as exc:
            raise ConfigError(f"--out: cannot create {out} ({exc.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()  # only while empty
            except OSError:
                break
        raise
    return PruneResult(out, table, keep)


def pruned_params(arch: str, params: dict[str, Any], widths: list[int], pruned: nn.Module | None = None
                  ) -> dict[str, Any]:
    """``model.params`` with the pruned widths: every prunable layer's, in order; PLE/CGC prune the
    experts' hidden layers only, so the last ``expert`` width (the experts' output) is kept, and a
    banked PLE/CGC records each bank's hidden widths (``bank_widths``); MTAN's
    per-block widths are read from the ``pruned`` model (:func:`polytask.prune.mtan.widths`)."""
    if arch == "mtan":
        from polytask.prune import mtan

        return {**params, **mtan.widths(pruned)}
    if arch in ("task_token", "task_token_attention"):
        return {**params, "attention_heads": heads.head_counts(pruned)}
    if arch in ("ple", "cgc") and pruned is not None and banks.is_banked(pruned):
        return {**params, "bank_widths": banks.bank_widths(pruned)}
    key = WIDTH_KEY[arch]
    if arch in ("ple", "cgc"):
        widths = [*widths, params[key][-1]]  # expert has >= 2 widths, else no layer was prunable
    return {**params, key: widths}


def prunable_form(config, splits, model: nn.Module) -> nn.Module:
    """The model in the form that is pruned: a PLE/CGC with one stacked bank of every task's
    specific experts is rebuilt with one bank per task (:func:`polytask.prune.banks.banked_copy`),
    so that each bank keeps its own widths; a task-token model with ``nn.MultiheadAttention`` is
    rebuilt with :class:`~polytask.nn.task_token.HeadAttention` at every head
    (:func:`polytask.prune.heads.with_head_attention`); a grouped MTAN is rebuilt with each task's
    attention modules its own (:func:`polytask.prune.mtan.per_task_copy`); other models as they are."""
    from polytask import nn as nn_lib

    def build(key: str):
        return lambda value: nn_lib.build_model(config.model.arch, splits.input_spec, splits.tasks,
                                                **{**config.model.params, key: value})

    arch = config.model.arch.lower()
    if arch in ("ple", "cgc") and not banks.is_banked(model):
        return banks.banked_copy(model, build("bank_widths")).eval()
    if arch in ("task_token", "task_token_attention") and not heads.has_head_attention(model):
        return heads.with_head_attention(model, build("attention_heads")).eval()
    if arch == "mtan" and not mtan.is_per_task(model):  # each task's attention units (prune/mtan.py)
        return mtan.per_task_copy(model, lambda params: nn_lib.build_model(
            config.model.arch, splits.input_spec, splits.tasks, **{**config.model.params, **params})).eval()
    return model


def _write(tmp: Path, data: dict, finetune_epochs: int, splits, pruned: nn.Module, progress: bool) -> None:
    """The run directory under its temporary name: fine-tuned by the Trainer (the run's balancer,
    optimizer and schedule), or the pruned weights as they are."""
    from polytask.train import rundir
    from polytask.train.config import dump_config, parse_config
    from polytask.train.trainer import Trainer, evaluate

    config = parse_config(dict(data, out_dir=str(tmp).replace("{", "{{").replace("}", "}}")), "pruned config")
    with rundir.claim_run_dir(tmp, config, "new"):
        if finetune_epochs:
            Trainer(config, splits=splits, model=pruned, progress=progress).fit()
            return
        (tmp / "best").mkdir(parents=True, exist_ok=True)
        atomic_write_text(tmp / "config.yaml", dump_config(config))
        save_model_file(pruned.state_dict(), tmp / "best" / "model.safetensors")
        val = evaluate(pruned, splits.val, splits.tasks)
        test = evaluate(pruned, splits.test, splits.tasks)
        atomic_write_text(tmp / "best" / "metrics.json",
                          json.dumps({"epoch": 0, "val": val, "test": test}, indent=1))


def _reload(config, splits, weights: Path) -> nn.Module:
    """The pruned model rebuilt from the new config and its saved weights (proves the run loads)."""
    from polytask import nn as nn_lib

    model = nn_lib.build_model(config.model.arch, splits.input_spec, splits.tasks, **config.model.params)
    load_state_checked(model, load_model_file(weights), weights)
    return model.eval()


def _table(ctx: PruneContext, original: nn.Module, pruned: nn.Module, splits,
           latency_device: str = "cpu") -> list[dict[str, Any]]:
    """Parameters, FLOPs, latency (a 256-row forward on ``latency_device``), metrics and Δm% (against
    the unpruned model) of both models."""
    from polytask.train.trainer import evaluate, resolve_device

    device = resolve_device(latency_device)
    example = example_rows(splits.val.to(device), 256)
    rows = []
    base = {s: evaluate(original, getattr(splits, s), splits.tasks) for s in ("val", "test")}
    for name, model in (("unpruned", original), ("pruned", pruned)):
        cost = ctx.cost(model)
        metrics = {s: evaluate(model, getattr(splits, s), splits.tasks) for s in ("val", "test")}
        rows.append({
            "model": name, "params": cost.params, "flops": cost.flops,
            "latency_ms": flops_lib.latency_ms(copy.deepcopy(model).to(device), example),
            "latency_device": str(device),
            "val": metrics["val"], "test": metrics["test"],
            "delta_m_val": delta_m(metrics["val"], base["val"], splits.tasks),
            "delta_m_test": delta_m(metrics["test"], base["test"], splits.tasks),
            "task_drop_test": {t.name: task_drop(t, metrics["test"][t.name], base["test"][t.name])
                               for t in splits.tasks},
        })
    return rows


def markdown(table: list[dict[str, Any]], tasks) -> str:
    """The table as Markdown: one row per model, test metrics per task."""
    cols = [f"{t.name} {m}" for t in tasks for m in t.metrics]
    device = table[0].get("latency_device", "cpu")
    head = ["model", "params", "FLOPs/row", f"latency ms ({device})", *cols, "Δm% test", "Δm% val"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        vals = [f"{r['test'][t.name][m]:.4f}" for t in tasks for m in t.metrics]
        lines.append("| " + " | ".join([r["model"], str(r["params"]), f"{r['flops']:.0f}", f"{r['latency_ms']:.3f}",
                                        *vals, f"{r['delta_m_test']:+.2f}", f"{r['delta_m_val']:+.2f}"]) + " |")
    return "\n".join(lines) + "\n"
