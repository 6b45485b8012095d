"""``polytask demo --merge``: a first model merge without checkpoints of one's own.

The set-up follows the task-vector experiments of Ilharco et al. ("Editing Models with Task
Arithmetic", ICLR 2023, §2-3), shrunk to a few CPU seconds on scikit-learn's shipped digits:

1. **base**: a shared-bottom MLP (:class:`~polytask.nn.SharedBottom`: a shared trunk, one linear
   head per task) trained briefly on every task at once: the digit (10 classes), whether it is odd,
   whether it is >= 5 (:func:`polytask.data.builtin.digits`, all scored by accuracy so that their
   mean is meaningful);
2. **fine-tunes**: one copy of the base per task, trained a few more epochs on that task alone. As
   in the paper, the classification heads stay frozen at the base's: only the shared trunk moves,
   so every fine-tune's task vector ``tau_t = theta_t - theta_0`` lives in the same weights, and a
   merged trunk serves all tasks through the base's heads (one checkpoint, every task). Training
   the heads too would make each head's task vector come from one model only, which every method
   merely scales; freezing them keeps the comparison about the trunk, where the tasks interfere;
3. **merges**: a mergekit YAML config per method (``task_arithmetic``, ``ties``, ``dare_ties``;
   seeded), run by :func:`polytask.merge.run_merge`, the code behind ``polytask merge``, on the
   safetensors checkpoints written in step 2;
4. **table**: test accuracy of each task and their mean, for the base, each fine-tune and each
   merge. A fine-tune gains on its own task and loses on the others; a merge is one model for
   every task (at seeds 0-4 each merge's mean accuracy was above the base's and, at most seeds,
   above every fine-tune's).

The output directory holds ``base/``, ``finetuned-TASK/``, ``merged-METHOD/`` (safetensors plus
``polytask_demo_model.json``, which rebuilds the model: :func:`load_demo_model`), the configs
``merge-METHOD.yaml`` (rerun them with ``polytask merge``), ``scores.json`` and ``table.md``. It
appears whole or not at all: everything is written into a hidden sibling and renamed into place
at the end; an existing output is refused unless ``overwrite`` (then replaced only at that rename).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from polytask.errors import ConfigError
from polytask.merge.io import _PARTIAL_MARKER, _OutputLock, _remove_stale_partials, _umask, save_state_dict

#: file beside each checkpoint that says how to rebuild its model (copied into merges as a config file)
MODEL_FILE = "polytask_demo_model.json"
#: the digits tasks of the demo: all classification, so accuracy is comparable and averaged
DEMO_TASKS: tuple[str, ...] = ("digit", "odd", "ge5")
SCORE = "accuracy"

#: method -> (top-level parameters, per-model parameters) of its mergekit config:
#:
#: - task arithmetic (Ilharco et al., ICLR 2023): ``theta_0 + lambda sum_t tau_t``; the paper picks
#:   lambda on validation data, fixed at 0.5 here;
#: - TIES (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023):
#:   trimmed to the paper's 20 % (its §5), then sign election and the mean of the agreeing values;
#: - DARE-TIES (Yu et al., "Language Models are Super Mario", ICML 2024, with TIES' election): half
#:   the entries dropped at random (seeded by the config's ``seed``) and the rest doubled; the paper
#:   drops up to 90 % of an LLM's delta, this trunk is small. lambda 0.5 as for task arithmetic.
#:
#: The configs are mergekit's format, but mergekit itself cannot run them: it needs a Hugging Face
#: architecture, and this model is polytask's.
DEFAULT_METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "task_arithmetic": ({"lambda": 0.5}, {"weight": 1.0}),
    "ties": ({"lambda": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.2}),
    "dare_ties": ({"lambda": 0.5}, {"weight": 1.0, "density": 0.5}),
}


@dataclass(frozen=True)
class MergeDemoSettings:
    """Sizes and budgets of the demo (the defaults take a few seconds on 2 CPU cores).

    The fine-tunes take smaller steps than the base (``finetune_lr``) so that they stay near it,
    where task vectors add up. At seeds 0-4, these defaults gave every fine-tune at least 3.6
    points over the base on its own task and every merge a higher mean accuracy than the base;
    with ``finetune_lr = 1e-3`` (and the base trained 2 epochs) the merges fell below the base at
    seed 2.
    """

    bottom: tuple[int, ...] = (128, 64)
    base_epochs: int = 3
    finetune_epochs: int = 10
    lr: float = 1e-3
    finetune_lr: float = 3e-4
    batch_size: int = 64
    methods: Mapping[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=lambda: dict(DEFAULT_METHODS))

    def __post_init__(self) -> None:
        if not self.bottom or any(not isinstance(w, int) or w < 1 for w in self.bottom):
            raise ConfigError(f"bottom: positive layer widths, got {list(self.bottom)}")
        for key in ("base_epochs", "finetune_epochs", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key}: a positive integer, got {getattr(self, key)!r}")
        for key in ("lr", "finetune_lr"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ConfigError(f"{key}: a positive number, got {getattr(self, key)!r}")
        if not self.methods:
            raise ConfigError("methods: at least one merge method, got none")


@dataclass
class MergeDemoResult:
    """Scores (``row -> task -> accuracy``, rows in table order), the tasks and the output directory."""

    tasks: list[str]
    scores: dict[str, dict[str, float]]
    out_dir: Path

    def table(self) -> str:
        head = "| model | " + " | ".join(f"{t} {SCORE}" for t in self.tasks) + " | mean |"
        rows = [head, "|" + "---|" * (len(self.tasks) + 2)]
        for name, by_task in self.scores.items():
            values = [by_task[t] for t in self.tasks]
            rows.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {_mean(values):.4f} |")
        return "\n".join(rows)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


# ------------------------------------------------------------------------------------------ model
def build_demo_model(spec: Mapping[str, Any]) -> Any:
    """The shared-bottom model that ``spec`` (the content of :data:`MODEL_FILE`) describes."""
    from polytask.data.builtin import load
    from polytask.nn import build_model

    splits = load("digits", seed=spec["data_seed"]).select_tasks(spec["tasks"])
    return build_model("shared_bottom", splits.input_spec, splits.tasks, bottom=spec["bottom"], tower=[])


def load_demo_model(directory: str | os.PathLike[str]) -> Any:
    """A model rebuilt from a demo checkpoint directory (base, fine-tune or merge), in eval mode."""
    from polytask.merge.io import load_state_dict

    directory = Path(directory)
    spec = json.loads((directory / MODEL_FILE).read_text())
    model = build_demo_model(spec)
    model.load_state_dict(load_state_dict(directory))
    return model.eval()


@torch.no_grad()
def evaluate(model: Any, split: Any, tasks: Sequence[Any]) -> dict[str, float]:
    """Accuracy of each task over a whole split (the heads' logits, scored by :meth:`Task.evaluate`)."""
    model.eval()
    out = model(split.inputs)
    return {t.name: t.evaluate(out[t.name], split.targets[t.name], split.masks.get(t.name))[SCORE] for t in tasks}


def train(model: Any, split: Any, tasks: Sequence[Any], params: Sequence[torch.nn.Parameter], epochs: int,
          lr: float, batch_size: int, generator: torch.Generator) -> None:
    """Adam on the summed losses of ``tasks``, updating ``params`` only (the others stay frozen)."""
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    n = len(split)
    for _ in range(epochs):  # epochs and batches are sequential by construction
        for rows in torch.randperm(n, generator=generator).split(batch_size):
            out = model(split.inputs[rows])
            loss = sum(t.loss(out[t.name], split.targets[t.name][rows]) for t in tasks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


# ---------------------------------------------------------------------------------------- output
@contextmanager
def _atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden sibling of ``out`` to fill, renamed to ``out`` when the block ends without error.

    The same conventions as merge outputs (:class:`polytask.merge.io.CheckpointWriter`): a lock
    beside ``out``, a marked ``.OUT.partial-XXXXXXXX`` that the next writer removes if this process
    is killed, an existing ``out`` refused unless ``overwrite`` and replaced only at the end.
    """
    def refuse_existing() -> None:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output path {str(out)!r} exists and is not a directory")
        if out.exists() and not overwrite:
            raise ConfigError(f"output directory {str(out)!r} already exists (pass --overwrite to replace it)")

    refuse_existing()
    target = Path(os.path.abspath(out))
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]  # innermost first
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _OutputLock(target, shown=str(out))
    done = False
    try:
        lock.acquire()
        refuse_existing()  # another writer may have finished into it meanwhile
        _remove_stale_partials(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            (tmp / _PARTIAL_MARKER).write_text("polytask: partial merge demo output, removed when stale\n")
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rmdir(old)
                (target / _PARTIAL_MARKER).touch()  # removable by the next writer once renamed aside
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
            (target / _PARTIAL_MARKER).unlink(missing_ok=True)
            done = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed into place
    finally:
        lock.release()
        for parent in created if not done else []:  # the folders this call made, if it failed
            try:
                parent.rmdir()
            except OSError:
                break


def _save(model: Any, directory: Path, spec: Mapping[str, Any]) -> None:
    save_state_dict({k: v.detach().contiguous() for k, v in model.state_dict().items()}, directory)
    (directory / MODEL_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def merge_config(method: str, top: Mapping[str, Any], per_model: Mapping[str, Any], models: Sequence[str],
                 seed: int) -> dict[str, Any]:
    """A mergekit config merging ``models`` onto ``base`` (paths relative to the config's folder)."""
    return {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": m, "parameters": dict(per_model)} for m in models],
        "parameters": dict(top),
        "seed": seed,
    }


# -------------------------------------------------------------------------------------------- run
def merge_demo(out: str | os.PathLike[str], seed: int = 0, *, overwrite: bool = False,
               settings: MergeDemoSettings | None = None) -> MergeDemoResult:
    """Train a base on every digits task, fine-tune one trunk per task, merge them with each
    method of ``settings.methods`` through :func:`~polytask.merge.run_merge`, and score every
    model on the test split (see the module docstring). Same seed, same models and scores."""
    from polytask.data.builtin import load
    from polytask.merge.config import run_merge

    settings = settings or MergeDemoSettings()
    out = Path(out)
    spec = {"data": "digits", "data_seed": seed, "tasks": list(DEMO_TASKS), "bottom": list(settings.bottom)}
    splits = load("digits", seed=seed).select_tasks(DEMO_TASKS)
    tasks = splits.tasks
    scores: dict[str, dict[str, float]] = {}
    with _atomic_dir(out, overwrite) as work, torch.random.fork_rng(devices=[]):  # leave the caller's RNG be
        torch.manual_seed(seed)  # the models' initial weights
        generator = torch.Generator().manual_seed(seed)
        base = build_demo_model(spec)
        train(base, splits.train, tasks, list(base.parameters()), settings.base_epochs, settings.lr,
              settings.batch_size, generator)
        _save(base, work / "base", spec)
        scores["base"] = evaluate(base, splits.test, tasks)
        finetuned = []
        for task in tasks:  # one independent fine-tune per task
            model = load_demo_model(work / "base")
            train(model, splits.train, [task], list(model.shared_parameters()), settings.finetune_epochs,
                  settings.finetune_lr, settings.batch_size, generator)
            name = f"finetuned-{task.name}"
            _save(model, work / name, spec)
            scores[name] = evaluate(model, splits.test, tasks)
            finetuned.append(name)
        for method, (top, per_model) in settings.methods.items():
            config = work / f"merge-{method}.yaml"
            config.write_text(yaml.safe_dump(merge_config(method, top, per_model, finetuned, seed), sort_keys=False))
            merged = run_merge(config, work / f"merged-{method}", progress=False)
            scores[f"merged-{method}"] = evaluate(load_demo_model(merged), splits.test, tasks)
        result = MergeDemoResult([t.name for t in tasks], scores, out)
        (work / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        (work / "table.md").write_text(result.table() + "\n")
    return result


def merge_demo_main(out: str | os.PathLike[str], seed: int = 0, overwrite: bool = False,
                    epochs_scale: float = 1.0, device: str = "auto") -> str:
    """Run :func:`merge_demo` (epochs multiplied by ``epochs_scale``, at least one) and return the
    text ``polytask demo --merge`` prints. It runs on the CPU: ``device`` other than auto/cpu is
    refused rather than ignored."""
    if not (math.isfinite(epochs_scale) and epochs_scale > 0):
        raise ConfigError(f"--epochs-scale must be a positive number, got {epochs_scale}")
    if device not in ("auto", "cpu"):
        raise ConfigError(f"--device: --merge runs on the CPU (a few seconds), got {device!r}")
    d = MergeDemoSettings()
    settings = replace(d, base_epochs=max(1, round(d.base_epochs * epochs_scale)),
                       finetune_epochs=max(1, round(d.finetune_epochs * epochs_scale)))
    start = time.perf_counter()
    result = merge_demo(out, seed, overwrite=overwrite, settings=settings)
    return "\n".join([
        "## digits: base, per-task fine-tunes (trunk only) and their merges; test accuracy", "",
        result.table(), "",
        "Each fine-tune gains on its own task and loses on the others; a merge is one model for every task.",
        f"Wall time: {time.perf_counter() - start:.1f} s. Checkpoints and merge configs: {result.out_dir}",
    ])
