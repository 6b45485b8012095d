"""Word-labelled token data: words split into sub-words by a Hugging Face fast tokenizer, word labels
spread over the tokens with the encoding's ``word_ids()``.

CoNLL-style data give a list of words per sentence and one label per word (NER, POS tags). The
tokenizer splits a word into one or more sub-words and adds special tokens (``[CLS]``, ``[SEP]``).
The labels follow the rule of Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers
for Language Understanding", NAACL 2019, §5.3 (NER: the first sub-token's representation is
classified, the others are not), as Hugging Face's token-classification guide writes it with
``word_ids()``: the first sub-token of each word gets the word's label; later sub-tokens and special
tokens get ``-100`` (NaN for a regression). With ``label_all_subtokens`` every sub-token gets its
word's label (the guide's ``label_all_tokens`` variant, without its B- to I- relabelling: the classes
are the user's). Truncation to ``max_length`` tokens may cut a word in half (its first sub-token
still carries the label) or drop the last words (they have no token, hence no label and no
prediction).

Evaluation is per word: :class:`~polytask.token_tasks.WordTask` scores each word by its first
sub-token's prediction in both modes, so a word split into three sub-words counts once.

Tokenising is a Python loop over rows inside ``tokenizers`` (``word_ids()`` is per encoding); it runs
once when the data are loaded, never in a training step. Spreading the labels is vectorised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polytask.errors import ConfigError, DataError
from polytask.token_tasks import IGNORE_INDEX

#: where a token belongs to no word (special tokens, padding) in a ``word_ids`` tensor
NO_WORD = -1

TOKENIZER_KEY = "data.params.tokenizer"


def load_tokenizer(path: str | Path, key: str = TOKENIZER_KEY) -> Any:
    """A fast tokenizer from a local folder (``AutoTokenizer``, local files only) or a
    ``tokenizer.json`` file (``PreTrainedTokenizerFast``); never a hub id. ConfigError naming ``key``
    for a path that does not exist, a folder that does not load, or a slow (Python) tokenizer."""
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(f"{key}: {str(path)!r} does not exist (give a local tokenizer folder or tokenizer.json "
                          f"file; hub ids are not downloaded)")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if file.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(file))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(file), local_files_only=True)
    except Exception as exc:  # a foreign folder or torn file: one line naming it
        raise ConfigError(f"{key}: cannot load a tokenizer from {str(file)!r} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    check_fast(tokenizer, f"{key}: {str(file)!r}")
    return tokenizer


def check_fast(tokenizer: Any, where: str = TOKENIZER_KEY) -> None:
    """ConfigError unless ``tokenizer`` is a fast (Rust ``tokenizers``) one: only those give ``word_ids()``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{where} is a slow tokenizer ({type(tokenizer).__name__}) without word_ids(); "
                          f"words need a fast tokenizer (a tokenizer.json)")


def encode_words(tokenizer: Any, words: list[list[str]], max_length: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, word_ids)``, each ``(N, L)`` with ``L`` the longest encoding:
    the words of each row tokenised with ``is_split_into_words=True``, truncated to ``max_length``
    tokens, special tokens as the tokenizer adds them; ``word_ids`` holds each token's word index
    in its row, ``NO_WORD`` for special tokens and padding."""
    check_fast(tokenizer)
    try:
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    except (ValueError, AssertionError, TypeError) as exc:  # the user's tokenizer refuses words split in advance
        raise ConfigError(f"{TOKENIZER_KEY}: cannot tokenise words split in advance ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    ids = enc["input_ids"]
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    width = int(lengths.max()) if len(lengths) else 0
    real = np.arange(width) < lengths[:, None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dense_ids = np.full((len(ids), width), pad, dtype=np.int64)
    dense_ids[real] = np.fromiter((i for r in ids for i in r), dtype=np.int64, count=int(lengths.sum()))
    word_ids = np.full((len(ids), width), NO_WORD, dtype=np.int64)
    flat = (NO_WORD if w is None else w for i in range(len(ids)) for w in enc.word_ids(i))
    word_ids[real] = np.fromiter(flat, dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(dense_ids), torch.from_numpy(real.astype(np.int64)), torch.from_numpy(word_ids)


def first_subtokens(word_ids: Tensor) -> Tensor:
    """``(N, L)`` bool: the first token of each word (its word id differs from the previous token's)."""
    before = torch.cat([torch.full_like(word_ids[:, :1], NO_WORD), word_ids[:, :-1]], 1)
    return (word_ids != NO_WORD) & (word_ids != before)


def spread_labels(word_labels: Tensor, word_counts: Tensor, word_ids: Tensor,
                  label_all_subtokens: bool = False) -> Tensor:
    """Token labels ``(N, L)`` from the words' labels of all rows in one flat tensor (row after row,
    ``word_counts[r]`` of them for row ``r``): each word's first sub-token gets its label, the other
    sub-tokens too with ``label_all_subtokens``; every other token gets no label (``-100``, NaN for
    float labels)."""
    none = float("nan") if word_labels.is_floating_point() else IGNORE_INDEX
    starts = torch.cumsum(word_counts, 0) - word_counts                # offset of each row's first word
    labelled = word_ids != NO_WORD
    if not label_all_subtokens:
        labelled &= first_subtokens(word_ids)
    index = (starts[:, None] + word_ids).where(labelled, torch.zeros_like(word_ids))
    picked = word_labels[index] if len(word_labels) else torch.full(word_ids.shape, none, dtype=word_labels.dtype)
    return picked.where(labelled, torch.full_like(picked, none))


def word_outputs(output: Tensor, word_ids: Tensor) -> list[Tensor]:
    """Per row, the model output at each word's first sub-token: ``(words kept, width)``, in word
    order (words cut off by truncation have none). ``output`` is ``(N, L, width)``."""
    first = first_subtokens(word_ids)
    return [output[r][first[r]] for r in range(output.shape[0])]  # rows differ in length: a list


def words_column(table: Any, path: Path) -> tuple[list[list[str]], np.ndarray]:
    """The ``words`` column as Python lists, and the number of words of each row; DataError naming
    the file (and row) for a column that is not lists of strings or a null row."""
    import pyarrow as pa

    from polytask.data.sequences import _is_list, _lengths

    if "words" not in table.column_names:
        raise DataError(f"{path}: needs a column 'words' holding a list of words per row, got columns "
                        f"{', '.join(table.column_names)}")
    col = table.column("words").combine_chunks()
    if not _is_list(col.type) or not (pa.types.is_string(col.type.value_type) or
                                      pa.types.is_large_string(col.type.value_type) or
                                      pa.types.is_null(col.type.value_type)):
        raise DataError(f"{path}: column 'words' must hold a list of strings per row, got {col.type}")
    if col.null_count:
        raise DataError(f"{path}: column 'words', row {int(np.asarray(col.is_null()).argmax())}: no words (null)")
    return col.to_pylist(), _lengths(col)


def predictions(task: Any, output: Tensor) -> Tensor:
    """What ``polytask`` writes as a prediction of ``task`` from its outputs ``(..., width)``: the class
    id (multiclass), the probability (binary: sigmoid of the logit; multilabel: one per label) or the
    value (regression)."""
    if task.kind == "multiclass":
        return output.argmax(-1)
    if task.kind == "binary" or task.kind == "regression" and output.shape[-1] == 1:
        output = output.squeeze(-1)
    return torch.sigmoid(output.float()) if task.kind in ("binary", "multilabel") else output.float()


def per_word(values: Tensor, word_ids: Tensor, counts: np.ndarray) -> Any:
    """A pyarrow list array with one entry per word of each row (``counts[r]`` words): ``values``
    ``(N, L)`` read at each word's first sub-token, null for a word without a token (cut off by
    truncation, or an empty string)."""
    import pyarrow as pa

    first = first_subtokens(word_ids)
    rows, cols = first.nonzero(as_tuple=True)
    starts = np.cumsum(counts) - counts
    where = starts[rows.numpy()] + word_ids[rows, cols].numpy()
    flat = values[first].numpy()
    dense = np.zeros(int(counts.sum()), dtype=flat.dtype)
    given = np.zeros(int(counts.sum()), dtype=bool)
    dense[where], given[where] = flat, True
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(dense, mask=~given))


def predict_words(model: torch.nn.Module, tasks: Any, path: str | Path, out: str | Path, tokenizer: Any,
                  max_length: int = 512, batch_size: int = 64, keep: tuple[str, ...] = ()) -> int:
    """Score the ``words`` table ``path`` (``.jsonl``/``.parquet``; label columns are not read) with
    ``model`` into ``out`` (``.parquet``, or JSON lines for ``.jsonl``): the ``words`` column, the ``keep``
    columns, then one column per task: for a token-level task a list with one prediction per word
    (read at the word's first sub-token, as the metrics are; see :func:`predictions`; null for a word
    cut off by ``max_length``), for a row-level task one prediction per row. ``out`` appears only when
    complete. Returns the number of rows."""
    import pyarrow as pa

    from polytask.data.sequences import read_arrow_table
    from polytask.token_tasks import level_of
    from polytask.train.checkpoint import atomic_write

    path, out = Path(path), Path(out)
    table = read_arrow_table(path)
    words, counts = words_column(table, path)
    names = {"words", *(t.name for t in tasks)}
    for c in keep:
        if c in names:
            raise ConfigError(f"keep: column {c!r} has the name of an output column")
        if c not in table.column_names:
            raise ConfigError(f"keep: column {c!r} is not in {path}")
    ids, attention, word_ids = encode_words(tokenizer, words, max_length)
    was_training = model.training
    model.eval()
    chunks: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for s in range(0, len(words), batch_size):
            batch = {"input_ids": ids[s:s + batch_size], "attention_mask": attention[s:s + batch_size]}
            for name, output in model(batch).items():
                chunks.setdefault(name, []).append(output.float())
    model.train(was_training)
    columns = {"words": table.column("words"), **{c: table.column(c) for c in keep}}
    for t in tasks:
        values = predictions(t, torch.cat(chunks[t.name]))
        columns[t.name] = per_word(values, word_ids, counts) if level_of(t) == "token" else pa.array(values.numpy())
    result = pa.table(columns)

    def fill(tmp: str) -> None:
        if out.suffix == ".jsonl":
            import json

            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in result.to_pylist())
        else:
            import pyarrow.parquet as pq

            pq.write_table(result, tmp)

    atomic_write(out, fill, error=DataError)
    return len(words)


#: the datasets that may read words (with ``data.params.tokenizer``)
WORD_DATASETS = ("token_file", "tokens")


def is_word_run(run_dir: str | Path) -> bool:
    """Whether the run in ``run_dir`` was trained on words: a ``token_file`` with ``data.params.tokenizer``
    in its stored config (False when there is no readable config: the caller's own checks say why)."""
    import yaml

    try:
        stored = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
        data = stored["data"]
        return data["name"] in WORD_DATASETS and bool((data.get("params") or {}).get("tokenizer"))
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return False


def predict_word_run(run_dir: str | Path, path: str | Path, out: str | Path, keep: tuple[str, ...] = (),
                     batch_size: int = 64) -> int:
    """``polytask predict`` for a run trained on words: its best model and tokenizer (the stored
    ``data.params.tokenizer`` and ``max_length``) score the ``words`` table ``path`` into ``out`` with
    :func:`predict_words`. Returns the number of rows."""
    from polytask.train.checkpoint import load_finished_run

    config, splits, model = load_finished_run(Path(run_dir))
    params = config.data.params
    tokenizer = load_tokenizer(params["tokenizer"])
    return predict_words(model, splits.tasks, path, out, tokenizer, int(params.get("max_length", 512)), batch_size, keep)


def read_word_table(table: Any, path: Path, tokenizer: Any, max_length: int = 512,
                    label_all_subtokens: bool = False) -> dict[str, Tensor]:
    """The tensors of ``token_file`` (``input_ids``, ``attention_mask``, ``labels.<task>``, ``task_ids``)
    plus ``word_ids`` from a pyarrow table with a ``words`` column: list label columns are one label
    per word (``-100`` or null: none), spread over the tokens; scalar columns stay one value per row.
    DataError naming the file, row (0-based) and column for a null words list or a label list of
    another length than its words."""
    from polytask.data.sequences import _is_list, _lengths, _scalars

    if "input_ids" in table.column_names:
        raise DataError(f"{path}: has both 'words' and 'input_ids'; give one (words are tokenised with "
                        f"data.params.tokenizer)")
    words, counts = words_column(table, path)
    ids, attention, word_ids = encode_words(tokenizer, words, max_length)
    out = {"input_ids": ids, "attention_mask": attention, "word_ids": word_ids}
    for name in table.column_names:
        if not (name.startswith("labels.") or name == "task_ids"):
            continue
        labels = table.column(name).combine_chunks()
        if not _is_list(labels.type):
            out[name] = _scalars(labels, path, name)
            continue
        got = _lengths(labels)
        bad = (got != counts) & ~np.asarray(labels.is_null().to_numpy(zero_copy_only=False))
        if bad.any():
            r = int(bad.argmax())
            raise DataError(f"{path}: column {name!r}, row {r}: {int(got[r])} labels for {int(counts[r])} words "
                            f"(words); give one per word ({IGNORE_INDEX} or null where a word has none)")
        out[name] = spread_labels(_word_labels(labels, counts, path, name), torch.from_numpy(counts), word_ids,
                                  label_all_subtokens)
    return out


def _word_labels(col: Any, counts: np.ndarray, path: Path, name: str) -> Tensor:
    """One flat tensor of every word's label, row after row (a null row: no label for its words)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from polytask.data.sequences import _fill_value

    values = col.flatten()
    if pa.types.is_boolean(values.type) or pa.types.is_null(values.type):
        values = values.cast(pa.int64())
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise DataError(f"{path}: column {name!r} must hold lists of numbers (one label per word), got {col.type}")
    none = _fill_value(values, None)
    flat = pc.fill_null(values, none).to_numpy(zero_copy_only=False)
    dense = np.full(int(counts.sum()), none, dtype=np.float64 if flat.dtype.kind == "f" else np.int64)
    own = np.repeat(~np.asarray(col.is_null().to_numpy(zero_copy_only=False)), counts)  # words of non-null rows
    dense[own] = flat
    return torch.from_numpy(dense)


__all__ = ["NO_WORD", "check_fast", "encode_words", "first_subtokens", "load_tokenizer", "per_word", "predict_words",
           "predictions", "read_word_table", "spread_labels", "word_outputs", "words_column"]
