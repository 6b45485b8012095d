"""``polytask analyze CONFIG_OR_RUN_DIR``: run the requested diagnostics and write them as JSON
and heatmaps into the run directory.

- On a **config**: train it with the conflict and affinity monitors attached (statistics averaged
  over training), then derive the rest.
- On a **run directory**: reuse ``analysis/*.json`` where present; otherwise measure conflict and
  affinity at the best checkpoint over the training split (one sample per batch, up to
  ``max_batches``) — a snapshot of the trained model, not an average over training.

``grouping`` needs ``affinity``; ``transfer`` and ``check`` train extra models (T + T(T−1)/2 runs,
resp. one run per group and per task) under ``RUN_DIR/runs`` (finished runs are reused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polytask.analyze.io import analysis_path, read_json, write_json
from polytask.errors import ConfigError

WHAT = ("conflict", "affinity", "grouping", "experts", "transfer", "check")
DEFAULT_WHAT = ("conflict", "affinity", "grouping", "experts")


def parse_what(text: str) -> list[str]:
    """``conflict,affinity`` -> a checked list (``all`` selects everything)."""
    items = [w.strip() for w in text.split(",") if w.strip()]
    if items == ["all"]:
        return list(WHAT)
    unknown = [w for w in items if w not in WHAT]
    if unknown or not items:
        raise ConfigError(f"--what: unknown item(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"choose from {', '.join(WHAT)} or all")
    if "check" in items and "grouping" not in items:
        items.append("grouping")
    if "grouping" in items and "affinity" not in items:
        items.insert(0, "affinity")
    return [w for w in WHAT if w in items]


@dataclass
class AnalyzeOptions:
    """Options of one analysis (CLI flags)."""

    what: list[str] = field(default_factory=lambda: list(DEFAULT_WHAT))
    every: int = 10
    lr: float | None = None
    groups: str = "layer"
    k: int = 2
    overlap: bool = False
    method: str = "auto"
    epochs: int | None = None  # budget of transfer/check runs (default: the config's)
    max_batches: int = 50
    progress: bool | None = None
    overwrite: bool = False  # on a config whose run directory holds a run: train it again


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").exists()


def _load_best(trainer: Any, run_dir: Path) -> None:
    from polytask.errors import CheckpointError
    from polytask.train.checkpoint import load_model_file

    from polytask.train.checkpoint import load_state_checked

    path = run_dir / "best" / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"analyze: {str(path)!r} not found (train the run first)")
    load_state_checked(trainer.model, load_model_file(path), path)


def analyze(target: Path, options: AnalyzeOptions, overrides: list[str] | None = None) -> tuple[Path, list[str]]:
    """Run the diagnostics of ``options.what`` on a config or run directory.

    Returns the run directory and printable summaries of what was computed. The run directory is
    claimed for the whole analysis (:func:`polytask.train.rundir.claim_run_dir`, the same claim as
    ``polytask train``): locked, and on a config refused when it holds a run unless
    ``options.overwrite``.
    """
    from polytask.train import load_config
    from polytask.train.rundir import claim_run_dir

    target = Path(target)
    run_mode = _is_run_dir(target)
    if not run_mode and not target.is_file():
        raise ConfigError(f"analyze: {str(target)!r} is neither a config file nor a run directory (with config.yaml)")
    cfg = load_config(target / "config.yaml" if run_mode else target, overrides)
    if run_mode:
        cfg = cfg.model_copy(update={"out_dir": str(target.parent / "{name}"), "name": target.name})
        claim = claim_run_dir(target, mode="use")
    else:
        claim = claim_run_dir(cfg.run_dir, cfg, "overwrite" if options.overwrite else "new",
                              advice=f"analyze that run with `polytask analyze {cfg.run_dir}`, or pass --overwrite "
                                     "to train it again (the previous run is kept until the new one has its first "
                                     "checkpoint)")
    with claim:
        return _analyze(target, run_mode, cfg, options)


def _analyze(target: Path, run_mode: bool, cfg: Any, options: AnalyzeOptions) -> tuple[Path, list[str]]:
    from polytask.analyze.affinity import AffinityMonitor, AffinityResult
    from polytask.analyze.conflict import ConflictResult, GradientConflictMonitor
    from polytask.train import Trainer

    what = options.what
    notes: list[str] = []
    conflict: ConflictResult | None = None
    affinity: AffinityResult | None = None
    if run_mode:
        run_dir = target
        trainer = Trainer(cfg, progress=options.progress)
        needs_model = [w for w in ("conflict", "affinity") if w in what and not analysis_path(run_dir, w).exists()]
        if needs_model or "experts" in what:
            _load_best(trainer, run_dir)
        batches = [b for _, b in zip(range(options.max_batches),
                                     trainer.train_set.batches(cfg.train.batch_size, shuffle=False))]
        if "conflict" in what:
            if "conflict" in needs_model:
                from polytask.analyze.conflict import gradient_conflict

                conflict = gradient_conflict(trainer.model, trainer.tasks, batches, options.groups)
                conflict.save(run_dir)
                notes.append(f"conflict: measured at the best checkpoint over {len(batches)} training batches")
            else:
                conflict = ConflictResult.load(run_dir)
        if "affinity" in what:
            if "affinity" in needs_model:
                from polytask.analyze.affinity import task_affinity

                lr = options.lr if options.lr is not None else cfg.optim.lr
                affinity = task_affinity(trainer.model, trainer.tasks, batches, lr)
                affinity.save(run_dir)
                notes.append(f"affinity: measured at the best checkpoint over {len(batches)} training batches")
            else:
                affinity = AffinityResult.load(run_dir)
    else:
        monitors: list[Any] = []
        if "conflict" in what:
            monitors.append(GradientConflictMonitor(every=options.every, groups=options.groups))
        if "affinity" in what:
            monitors.append(AffinityMonitor(every=options.every, lr=options.lr))
        trainer = Trainer(cfg, callbacks=monitors, progress=options.progress)
        result = trainer.fit()
        run_dir = result.run_dir
        notes.append(f"trained {cfg.name}: best epoch {result.best_epoch}; run directory {run_dir}")
        for m in monitors:
            if isinstance(m, GradientConflictMonitor):
                conflict = m.result()
            else:
                affinity = m.result()
        if "experts" in what:
            _load_best(trainer, run_dir)
    tasks = [t.name for t in trainer.tasks]
    if conflict is not None:
        notes.append("gradient cosine (mean over samples):\n" + format_matrix(conflict.cosine, tasks))
        notes.append("conflict rate (cosine < 0):\n" + format_matrix(conflict.conflict_rate, tasks))
    if affinity is not None:
        notes.append("inter-task affinity Z(i→j) (row: step on task i, column: loss of task j), "
                     f"lr={affinity.lr:g}:\n"
                     + format_matrix(affinity.affinity, tasks, "{:+.3e}"))
    grouping = None
    if "grouping" in what:
        from polytask.analyze.grouping import group_tasks

        assert affinity is not None
        grouping = group_tasks(affinity.affinity, options.k, affinity.tasks, overlap=options.overlap,
                               method=options.method)  # type: ignore[arg-type]
        grouping.save(run_dir)
        notes.append(f"grouping into {options.k}: {grouping.describe()}")
    if "experts" in what:
        from polytask.analyze.experts import collect_expert_usage, is_routed, save_expert_usage

        if is_routed(trainer.model):
            usage = collect_expert_usage(trainer.model, trainer.val_set, cfg.train.eval_batch_size)
            save_expert_usage(usage, run_dir)
            notes.append("expert usage (mean gate weight, validation split):\n"
                         + format_matrix(usage.mean, usage.tasks, cols=[f"e{e}" for e in range(usage.mean.shape[1])]))
        else:
            notes.append(f"experts: skipped ({cfg.model.arch} is not a routed architecture)")
    if "transfer" in what:
        from polytask.analyze.transfer import pairwise_transfer, rank_agreement

        transfer = pairwise_transfer(cfg, run_dir / "runs", tasks, options.epochs, options.progress)
        if affinity is None and analysis_path(run_dir, "affinity").exists():  # estimates from earlier runs
            affinity = AffinityResult.load(run_dir)
        if conflict is None and analysis_path(run_dir, "conflict").exists():
            conflict = ConflictResult.load(run_dir)
        agreement = {}
        if affinity is not None:
            agreement["affinity Z(i→j)"] = rank_agreement(affinity.affinity, transfer.gain)
        if conflict is not None:
            agreement["gradient cosine"] = rank_agreement(conflict.cosine, transfer.gain)
        payload = transfer.to_json() | {"rank_agreement": agreement}
        transfer.save(run_dir)
        write_json(analysis_path(run_dir, "transfer"), payload)
        notes.append("measured pairwise gain % (row: trained with i, column: task j):\n"
                     + format_matrix(transfer.gain, tasks, "{:+.2f}"))
        notes += [f"Spearman({k}, measured gain) = {v:+.3f}" for k, v in agreement.items()]
    if "check" in what:
        from polytask.analyze.transfer import check_grouping

        assert grouping is not None
        check = check_grouping(cfg, grouping, run_dir / "runs", options.epochs, options.progress)
        check.save(run_dir)
        notes.append("grouping check:\n" + check.table())
    notes.append(f"written to {run_dir / 'analysis'} and {run_dir / 'plots'}; `polytask report {run_dir}` "
                 "renders them")
    return run_dir, notes


def format_matrix(matrix: Any, rows: list[str], fmt: str = "{:+.3f}", cols: list[str] | None = None) -> str:
    """A matrix as aligned text with row and column names."""
    cols = rows if cols is None else cols
    cells = [["", *cols]] + [[r, *(fmt.format(float(v)) if v == v else "n/a" for v in row.tolist())]
                             for r, row in zip(rows, matrix)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def read_analysis(run_dir: Path, name: str) -> dict[str, Any]:
    """The JSON payload of ``RUN_DIR/analysis/NAME.json``."""
    return read_json(analysis_path(run_dir, name))
