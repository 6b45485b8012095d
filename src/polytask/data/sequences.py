"""Token-sequence multi-task data for transformer backbones (``model.arch: adapters``).

Inputs are a dict ``{"input_ids": (N, L) long, "attention_mask": (N, L) long}`` (1 = token,
0 = padding), optionally with ``"task_ids": (N,) long``: the one task a row was drawn for (a
mixed-task batch: the adapter model then runs each row once, under its own task, instead of once
per task). Two sources:

- ``sequence_tasks``: generated, several related binary tasks with a known signal (below);
- ``token_file``: a user's tokenised data in one ``.safetensors`` or ``.pt`` file holding
  ``input_ids`` (and optionally ``attention_mask``, ``task_ids``) and one ``labels.<task>``
  tensor per task; a float label NaN or an integer label ``-100`` (Hugging Face's ignore index)
  marks a row unlabelled for that task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from polytask.data.builtin import DATASETS, split_indices
from polytask.data.dataset import MultiTaskDataset, Splits
from polytask.errors import ConfigError, DataError
from polytask.tasks import Task

#: id of the padding token in generated data (real tokens are 1..vocab_size-1)
PAD_ID = 0


def _check(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.params.{name} must be an integer >= {minimum}, got {value!r}")


@DATASETS.register("sequence_tasks", "sequences")
def sequence_tasks(num_tasks: int = 3, relatedness: float = 0.5, num_rows: int = 2000, vocab_size: int = 64,
                   max_length: int = 16, key_tokens: int = 8, mixed: bool = False,
                   split: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> Splits:
    """Related binary sequence-classification tasks with a known signal.

    Each row is a sequence of uniform random tokens from ``1..vocab_size-1`` whose length is
    uniform in ``[max_length // 2, max_length]`` (the rest padding, id 0). Task ``t`` has a set
    ``S_t`` of ``key_tokens`` token ids; its label is 1 when the sequence holds more ``S_t``
    tokens than the median row does (ties broken by the last token's parity, so classes are
    near balanced). The first ``round(relatedness * key_tokens)`` ids of every ``S_t`` are common to
    all tasks, the rest are the task's own: ``relatedness=1`` makes the tasks one task,
    ``0`` unrelated ones. ``mixed=True`` labels each row for one task only (drawn uniformly,
    given in ``task_ids``), as in an instruction-tuning mixture.
    """
    _check("num_tasks", num_tasks, 1)
    _check("num_rows", num_rows, 20)
    _check("max_length", max_length, 2)
    _check("key_tokens", key_tokens, 1)
    if not 0.0 <= float(relatedness) <= 1.0:
        raise ConfigError(f"data.params.relatedness must be in [0, 1], got {relatedness!r}")
    shared = round(relatedness * key_tokens)
    needed = shared + num_tasks * (key_tokens - shared) + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < needed:
        raise ConfigError(f"data.params.vocab_size must be at least {needed} (padding + the tasks' key tokens), "
                          f"got {vocab_size!r}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (num_rows, max_length), generator=g)
    lengths = torch.randint(max_length // 2, max_length + 1, (num_rows,), generator=g)
    mask = (torch.arange(max_length) < lengths[:, None]).long()
    ids = ids * mask                                               # padding -> PAD_ID
    perm = torch.randperm(vocab_size - 1, generator=g) + 1         # key tokens drawn among the real ids
    own = key_tokens - shared
    key_sets = torch.stack([torch.cat([perm[:shared], perm[shared + t * own: shared + (t + 1) * own]])
                            for t in range(num_tasks)])            # (T, k)
    counts = (ids[:, :, None, None] == key_sets[None, None]).any(-1).sum(1)   # (N, T): key tokens per row
    score = counts.double() + 0.5 * (ids.gather(1, (lengths - 1)[:, None]) % 2).double()
    labels = (score > score.median(0).values).float()              # (N, T)
    tasks = [Task(f"task{t}", "binary", metrics=("auc", "accuracy", "logloss")) for t in range(num_tasks)]
    inputs = {"input_ids": ids, "attention_mask": mask}
    masks: dict[str, Tensor] = {}
    if mixed:
        owner = torch.randint(0, num_tasks, (num_rows,), generator=g)
        inputs["task_ids"] = owner
        masks = {t.name: owner == i for i, t in enumerate(tasks)}
    full = MultiTaskDataset(inputs, {t.name: labels[:, i] for i, t in enumerate(tasks)}, masks)
    tr, va, te = split_indices(num_rows, split, seed)
    spec = {"vocab_size": vocab_size, "max_length": max_length}
    return Splits("sequence_tasks", tasks, full.subset(tr), full.subset(va), full.subset(te), spec)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise DataError(f"data.params.path: {str(path)!r} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: one line naming it
        raise DataError(f"{path}: cannot read tensors ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") \
            from None
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise DataError(f"{path}: expected a mapping of names to tensors")
    return dict(data)


def _task_from_labels(name: str, labels: Tensor, kind: str | None, path: Path) -> tuple[Task, Tensor, Tensor]:
    """The task, its targets and its label mask from one ``labels.<task>`` tensor."""
    if labels.is_floating_point():
        labelled = ~torch.isnan(labels) if labels.ndim == 1 else ~torch.isnan(labels).any(-1)
        values = torch.nan_to_num(labels, nan=0.0)
    else:
        labelled = labels != -100
        values = labels.where(labelled, torch.zeros_like(labels))
    kind = kind or ("regression" if labels.is_floating_point() else
                    "binary" if int(values.max()) <= 1 else "multiclass")
    if kind == "multiclass":
        task = Task(name, kind, num_classes=int(values.max()) + 1)
        return task, values.long(), labelled
    if kind not in ("binary", "regression"):
        raise ConfigError(f"data.params.tasks.{name}: kind must be binary, multiclass or regression, got {kind!r}")
    return Task(name, kind), values.float(), labelled


@DATASETS.register("token_file", "tokens")
def token_file(path: str, tasks: dict[str, str] | None = None, split: Sequence[float] = (0.8, 0.1, 0.1),
               seed: int = 0) -> Splits:
    """A user's tokenised multi-task data from one file (see the module docstring for its layout).

    ``tasks`` maps a task name to its kind (``binary``, ``multiclass``, ``regression``); by
    default every ``labels.<task>`` tensor is a task, a float tensor a regression, an integer one
    binary when its labels are 0/1 and multiclass otherwise. DataError naming the file and tensor
    for a missing or misshapen tensor.
    """
    file = Path(path)
    tensors = _read_tensors(file)
    ids = tensors.get("input_ids")
    if ids is None or ids.ndim != 2 or ids.is_floating_point():
        raise DataError(f"{file}: needs an integer tensor 'input_ids' of shape (rows, length), got "
                        f"{'none' if ids is None else f'{ids.dtype} {tuple(ids.shape)}'}")
    n, length = ids.shape
    mask = tensors.get("attention_mask", torch.ones_like(ids))
    if tuple(mask.shape) != (n, length):
        raise DataError(f"{file}: tensor 'attention_mask' has shape {tuple(mask.shape)}, input_ids {(n, length)}")
    names = [k.split(".", 1)[1] for k in tensors if k.startswith("labels.")]
    wanted = list(tasks) if tasks else names
    missing = [t for t in wanted if t not in names]
    if missing or not wanted:
        raise DataError(f"{file}: no tensor 'labels.{missing[0] if missing else '<task>'}' "
                        f"(labels present: {', '.join(names) or 'none'})")
    task_list, targets, masks = [], {}, {}
    for name in wanted:  # load time, once per task
        labels = tensors[f"labels.{name}"]
        if labels.shape[0] != n:
            raise DataError(f"{file}: tensor 'labels.{name}' has {labels.shape[0]} rows, input_ids {n}")
        task, targets[name], labelled = _task_from_labels(name, labels, (tasks or {}).get(name), file)
        task_list.append(task)
        if not bool(labelled.all()):
            masks[name] = labelled
    inputs = {"input_ids": ids.long(), "attention_mask": mask.long()}
    if "task_ids" in tensors:
        owner = tensors["task_ids"]
        outside = bool(((owner < 0) | (owner >= len(wanted))).any())
        if tuple(owner.shape) != (n,) or owner.is_floating_point() or outside:
            raise DataError(f"{file}: tensor 'task_ids' must hold one task index in 0..{len(wanted) - 1} per row "
                            f"(the order of the tasks: {', '.join(wanted)}), got {owner.dtype} {tuple(owner.shape)} "
                            f"with values {int(owner.min())}..{int(owner.max())}")
        inputs["task_ids"] = owner.long()
    full = MultiTaskDataset(inputs, targets, masks)
    tr, va, te = split_indices(n, split, seed)
    spec = {"vocab_size": int(ids.max()) + 1, "max_length": length}
    return Splits(file.stem, task_list, full.subset(tr), full.subset(va), full.subset(te), spec)
