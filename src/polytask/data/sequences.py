"""Token-sequence multi-task data for transformer backbones (``model.arch: adapters``).

Inputs are a dict ``{"input_ids": (N, L) long, "attention_mask": (N, L) long}`` (1 = token,
0 = padding), optionally with ``"task_ids": (N,) long``: the one task a row was drawn for (a
mixed-task batch: the adapter model then runs each row once, under its own task, instead of once
per task). Two sources:

- ``sequence_tasks``: generated, several related binary tasks with a known signal (below);
- ``token_file``: a user's tokenised data in one ``.safetensors`` or ``.pt`` file holding
  ``input_ids`` (and optionally ``attention_mask``, ``task_ids``) and one ``labels.<task>``
  tensor per task; a float label NaN or an integer label ``-100`` (Hugging Face's ignore index)
  marks a row unlabelled for that task. Or a table (``.jsonl``, ``.parquet``) with the same
  columns, one row per sequence: ``input_ids`` a list of token ids per row, ``labels.<task>`` a
  value per row or, for a token-level task, a list of per-token labels aligned to the tokenisation
  (one per id of ``input_ids``; ``-100`` or null: no label); a list of another length is a
  DataError naming the file, the row (0-based) and the column. A table may give ``words`` (a list
  of words per row, CoNLL style) instead of ``input_ids``, with one label per word: a tokenizer
  (``data.params.tokenizer``) splits them and the labels follow the sub-words
  (:mod:`polytask.data.words`).

Token-level tasks (:class:`~polytask.token_tasks.TokenTask`, one label per token: tagging, per-token
regression) are ``labels.<task>`` tensors of shape ``(N, L)`` like ``input_ids`` (found from the
shape, or declared ``level: token``); padding tokens (``attention_mask`` 0) get no label, whatever
the file holds there, and a row without a labelled token is unlabelled for the task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polytask.data.builtin import DATASETS, split_indices
from polytask.data.dataset import MultiTaskDataset, Splits
from polytask.data.words import first_subtokens
from polytask.errors import ConfigError, DataError
from polytask.tasks import Task
from polytask.token_tasks import IGNORE_INDEX, LEVELS, TokenTask, with_first_subtokens, word_task

#: id of the padding token in generated data (real tokens are 1..vocab_size-1)
PAD_ID = 0


def _check(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.params.{name} must be an integer >= {minimum}, got {value!r}")


@DATASETS.register("sequence_tasks", "sequences")
def sequence_tasks(num_tasks: int = 3, relatedness: float = 0.5, num_rows: int = 2000, vocab_size: int = 64,
                   max_length: int = 16, key_tokens: int = 8, mixed: bool = False, token_tasks: int = 0,
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

    ``token_tasks`` adds that many token-level tagging tasks ``tag0, tag1, ...`` (multiclass, 3
    classes, every row labelled): token ``i``'s class is the number of ``S_j`` tokens among the
    first ``i + 1`` tokens, capped at 2 (it needs the tokens before it: a task for the context, not
    for the token alone); padding tokens have no label (``-100``). Tag task ``j`` has the key set
    of binary task ``j`` (more key sets are drawn when ``token_tasks > num_tasks``). Not with
    ``mixed``. The binary tasks are the same with or without them.
    """
    _check("num_tasks", num_tasks, 1)
    _check("token_tasks", token_tasks, 0)
    if token_tasks and mixed:
        raise ConfigError(f"data.params.token_tasks: token-level tasks are labelled on every row; they cannot be "
                          f"mixed (mixed: true labels each row for one task), got token_tasks={token_tasks}")
    _check("num_rows", num_rows, 20)
    _check("max_length", max_length, 2)
    _check("key_tokens", key_tokens, 1)
    if not 0.0 <= float(relatedness) <= 1.0:
        raise ConfigError(f"data.params.relatedness must be in [0, 1], got {relatedness!r}")
    shared = round(relatedness * key_tokens)
    sets = max(num_tasks, token_tasks)
    needed = shared + sets * (key_tokens - shared) + 1
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
                            for t in range(sets)])                 # (max(T, token_tasks), k)
    is_key = (ids[:, :, None, None] == key_sets[None, None]).any(-1)          # (N, L, sets)
    counts = is_key[..., :num_tasks].sum(1)                        # (N, T): key tokens per row
    score = counts.double() + 0.5 * (ids.gather(1, (lengths - 1)[:, None]) % 2).double()
    labels = (score > score.median(0).values).float()              # (N, T)
    tasks = [Task(f"task{t}", "binary", metrics=("auc", "accuracy", "logloss")) for t in range(num_tasks)]
    inputs = {"input_ids": ids, "attention_mask": mask}
    masks: dict[str, Tensor] = {}
    if mixed:
        owner = torch.randint(0, num_tasks, (num_rows,), generator=g)
        inputs["task_ids"] = owner
        masks = {t.name: owner == i for i, t in enumerate(tasks)}
    targets = {t.name: labels[:, i] for i, t in enumerate(tasks)}
    for j in range(token_tasks):  # running count of S_j tokens, capped at 2; padding: no label
        tags = is_key[..., j].long().cumsum(1).clamp_max(2)
        targets[f"tag{j}"] = tags.where(mask.bool(), torch.full_like(tags, IGNORE_INDEX))
        tasks.append(TokenTask(f"tag{j}", "multiclass", num_classes=3))
    full = MultiTaskDataset(inputs, targets, masks)
    tr, va, te = split_indices(num_rows, split, seed)
    spec = {"vocab_size": vocab_size, "max_length": max_length}
    return Splits("sequence_tasks", tasks, full.subset(tr), full.subset(va), full.subset(te), spec)


def _read_tensors(path: Path, words: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """The file's tensors; ``words`` (``tokenizer``, ``max_length``, ``label_all_subtokens``) for a table
    with a ``words`` column (:mod:`polytask.data.words`)."""
    if not path.is_file():
        raise DataError(f"data.params.path: {str(path)!r} is not a file")
    if path.suffix in TABLE_SUFFIXES:
        return _read_table(path, words)
    if words is not None:
        raise ConfigError(f"data.params.tokenizer: {path} holds token ids; a tokenizer is for a table "
                          f"(.jsonl, .parquet) with a 'words' column")
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


#: table files ``token_file`` reads (one row per sequence, list columns)
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")


def read_arrow_table(path: Path) -> Any:
    """A ``.parquet`` or JSON-lines file as one pyarrow table; DataError naming the file when unreadable."""
    import pyarrow as pa

    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.json as pj

        table = pj.read_json(path)
        try:
            table.validate(full=True)
        except pa.ArrowInvalid:  # pyarrow 26 drops a list's leading nulls while it infers the item type
            table = pj.read_json(path, parse_options=pj.ParseOptions(explicit_schema=table.schema))
        return table
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read the table ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") \
            from None


def _read_table(path: Path, words: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """The tensors of the module docstring from a JSON-lines or Parquet table: list columns padded to
    the longest ``input_ids`` (``attention_mask`` from the lengths unless given), per-token label
    lists checked against ``input_ids`` row by row (vectorised), nulls as "no label". A table with
    ``words`` instead is tokenised with ``words["tokenizer"]`` (:func:`polytask.data.words.read_word_table`)."""
    table = read_arrow_table(path)
    if "words" in table.column_names or words is not None:
        return _read_words(table, path, words)
    if "input_ids" not in table.column_names or not _is_list(table.schema.field("input_ids").type):
        raise DataError(f"{path}: needs a column 'input_ids' holding a list of token ids per row, got columns "
                        f"{', '.join(table.column_names)}")
    ids_col = table.column("input_ids").combine_chunks()
    if ids_col.null_count:
        raise DataError(f"{path}: column 'input_ids', row {_first(ids_col.is_null())}: no token ids (null)")
    lengths = _lengths(ids_col)
    out = {"input_ids": _pad(ids_col, lengths, 0, path, "input_ids")}
    if "attention_mask" not in table.column_names:
        out["attention_mask"] = torch.from_numpy(np.arange(out["input_ids"].shape[1]) < lengths[:, None]).long()
    for name in table.column_names:
        if name == "input_ids" or not (name.startswith("labels.") or name in ("attention_mask", "task_ids")):
            continue
        col = table.column(name).combine_chunks()
        if _is_list(col.type):
            got = _lengths(col)
            bad = (got != lengths) & ~col.is_null().to_numpy(zero_copy_only=False)
            if bad.any():
                r = int(bad.argmax())
                what = "labels" if name.startswith("labels.") else "values"
                raise DataError(f"{path}: column {name!r}, row {r}: {int(got[r])} {what} for {int(lengths[r])} tokens "
                                f"(input_ids); give one per token ({IGNORE_INDEX} or null where a token has none)")
            out[name] = _pad(col, lengths, 0 if name == "attention_mask" else None, path, name)
        else:
            out[name] = _scalars(col, path, name)
    return out


def _read_words(table: Any, path: Path, words: dict[str, Any] | None) -> dict[str, Tensor]:
    from polytask.data import words as words_lib

    if words is None:
        raise ConfigError(f"data.params.tokenizer: {path} gives words, not input_ids; name a local tokenizer "
                          f"folder or tokenizer.json file to split them into tokens")
    if "words" not in table.column_names:
        raise ConfigError(f"data.params.tokenizer: {path} has no column 'words' (a tokenizer splits a list of "
                          f"words per row; columns: {', '.join(table.column_names)})")
    tokenizer = words_lib.load_tokenizer(words["tokenizer"])
    return words_lib.read_word_table(table, path, tokenizer, words["max_length"], words["label_all_subtokens"])


def _is_list(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _first(flags) -> int:
    return int(np.asarray(flags.to_numpy(zero_copy_only=False)).argmax())


def _lengths(col) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _fill_value(values, fill: int | None) -> float | int:
    """Padding and null entries: ``fill`` if given, else no label (-100 for integers, NaN for floats)."""
    import pyarrow as pa

    if fill is not None:
        return fill
    return IGNORE_INDEX if pa.types.is_integer(values.type) or pa.types.is_boolean(values.type) else float("nan")


def _pad(col, lengths: np.ndarray, fill: int | None, path: Path, name: str) -> Tensor:
    """A list column as one ``(N, max length of input_ids)`` tensor (rows' values left-aligned)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = col.flatten()                       # the non-null rows' values, in row order
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type)
            or pa.types.is_null(values.type)):
        raise DataError(f"{path}: column {name!r} must hold lists of numbers, got {col.type}")
    if pa.types.is_boolean(values.type):
        values = values.cast(pa.int64())
    if pa.types.is_null(values.type):            # only nulls (or empty lists): no label anywhere
        values = values.cast(pa.int64())
    pad = _fill_value(values, fill)
    flat = pc.fill_null(values, pad).to_numpy(zero_copy_only=False)
    width = int(lengths.max()) if len(lengths) else 0
    dense = np.full((len(lengths), width), pad, dtype=flat.dtype if flat.dtype.kind == "f" else np.int64)
    own = _lengths(col)                          # a null row has length 0: all padding
    dense[np.arange(width) < own[:, None]] = flat
    return torch.from_numpy(dense)


def _scalars(col, path: Path, name: str) -> Tensor:
    """A column of one number per row (a row-level label, ``task_ids``); null: no label."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_boolean(col.type):
        col = col.cast(pa.int64())
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DataError(f"{path}: column {name!r} must hold a number per row (or a list per row for a "
                        f"token-level label), got {col.type}")
    return torch.from_numpy(pc.fill_null(col, _fill_value(col, None)).to_numpy(zero_copy_only=False).copy())


def _task_spec(name: str, spec: str | Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """``(kind, level)`` from ``data.params.tasks.<name>``: a kind, or ``{kind: ..., level: row | token}``."""
    if spec is None or isinstance(spec, str):
        return spec, None
    unknown = sorted(set(spec) - {"kind", "level"})
    if unknown:
        raise ConfigError(f"data.params.tasks.{name}: unknown key(s) {', '.join(unknown)}; known: kind, level")
    level = spec.get("level")
    if level is not None and level not in LEVELS:
        raise ConfigError(f"data.params.tasks.{name}.level must be row or token, got {level!r}")
    return spec.get("kind"), level


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


def _token_task_from_labels(name: str, labels: Tensor, kind: str | None, attention: Tensor,
                            path: Path) -> tuple[TokenTask, Tensor, Tensor]:
    """The token-level task, its ``(N, L)`` targets (no label: -100 or NaN, padding included) and its
    row mask (rows with a labelled token) from one ``labels.<task>`` tensor shaped like ``input_ids``."""
    real = attention.bool()
    if labels.is_floating_point() and kind in (None, "regression"):
        targets = labels.float().where(real, torch.full_like(labels.float(), float("nan")))
        task = TokenTask(name, "regression")
    else:
        if labels.is_floating_point():  # a class label stored as a float: NaN is no label
            labels = torch.nan_to_num(labels, nan=IGNORE_INDEX).long()
        targets = labels.long().where(real, torch.full_like(labels.long(), IGNORE_INDEX))
        valid = targets != IGNORE_INDEX
        if bool((valid & (targets < 0)).any()):
            r = int((valid & (targets < 0)).any(1).long().argmax())
            raise DataError(f"{path}: tensor 'labels.{name}', row {r}: negative class label "
                            f"{int(targets[r][valid[r] & (targets[r] < 0)][0])} (classes are 0..C-1, "
                            f"{IGNORE_INDEX}: no label)")
        top = int(targets[valid].max()) if bool(valid.any()) else 0
        kind = kind or ("binary" if top <= 1 else "multiclass")
        if kind == "regression":
            targets = targets.float().where(valid, torch.full_like(targets.float(), float("nan")))
            task = TokenTask(name, "regression")
        elif kind == "multiclass":
            task = TokenTask(name, kind, num_classes=max(top + 1, 2))
        elif kind == "binary":
            task = TokenTask(name, kind)
        else:
            raise ConfigError(f"data.params.tasks.{name}: kind must be binary, multiclass or regression, "
                              f"got {kind!r}")
    return task, targets, task.valid_tokens(targets).any(1)


@DATASETS.register("token_file", "tokens")
def token_file(path: str, tasks: dict[str, str | dict[str, Any]] | None = None,
               split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, tokenizer: str | None = None,
               max_length: int = 512, label_all_subtokens: bool = False) -> Splits:
    """A user's tokenised multi-task data from one file (see the module docstring for its layout).

    ``tasks`` maps a task name to its kind (``binary``, ``multiclass``, ``regression``) or to
    ``{kind: ..., level: row | token}``; by default every ``labels.<task>`` tensor is a task, a
    float tensor a regression, an integer one binary when its labels are 0/1 and multiclass
    otherwise, and token-level when it has one label per token (the shape of ``input_ids``).
    DataError naming the file and tensor for a missing or misshapen tensor.

    A table with a ``words`` column (a list of words per row) and per-word label lists needs
    ``tokenizer`` (a local tokenizer folder or ``tokenizer.json``; see :mod:`polytask.data.words`): the
    words are tokenised, truncated to ``max_length`` tokens, and each list-labelled task becomes a
    :class:`~polytask.token_tasks.WordTask` (label on each word's first sub-token, or on all of them
    with ``label_all_subtokens``; metrics per word). ``word_ids`` (each token's word, -1: none) is
    kept among the inputs, for per-word predictions (:func:`polytask.data.words.word_outputs`).
    """
    _check("max_length", max_length, 1)
    if not isinstance(label_all_subtokens, bool):
        raise ConfigError(f"data.params.label_all_subtokens must be true or false, got {label_all_subtokens!r}")
    if label_all_subtokens and tokenizer is None:
        raise ConfigError("data.params.label_all_subtokens: spreading word labels over sub-words needs "
                          "data.params.tokenizer (and a table with a 'words' column)")
    file = Path(path)
    words = None if tokenizer is None else {"tokenizer": tokenizer, "max_length": max_length,
                                            "label_all_subtokens": label_all_subtokens}
    tensors = _read_tensors(file, words)
    word_ids = tensors.pop("word_ids", None)
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
        kind, level = _task_spec(name, (tasks or {}).get(name))
        per_token = level == "token" or (level is None and labels.ndim == 2 and labels.shape[1] == length)
        if per_token and tuple(labels.shape[:2]) != (n, length):
            raise DataError(f"{file}: tensor 'labels.{name}' has shape {tuple(labels.shape)}, input_ids {(n, length)}: "
                            f"a token-level task needs one label per token")
        if per_token:
            task, targets[name], labelled = _token_task_from_labels(name, labels, kind, mask, file)
            if word_ids is not None:  # labels spread from words: scored per word at the first sub-tokens
                task, targets[name] = word_task(task), with_first_subtokens(targets[name], first_subtokens(word_ids))
        else:
            task, targets[name], labelled = _task_from_labels(name, labels, kind, file)
        task_list.append(task)
        if not bool(labelled.all()):
            masks[name] = labelled
    inputs = {"input_ids": ids.long(), "attention_mask": mask.long()}
    if word_ids is not None:
        inputs["word_ids"] = word_ids
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
