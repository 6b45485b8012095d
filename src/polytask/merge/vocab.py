"""Token-indexed tensors re-indexed to a merged vocabulary, as mergekit 0.1.5's ``PermutedVocabulary``.

:func:`align_rows` re-indexes the embedding (or LM-head) tensors of the models merged into one
output tensor: row ``i`` of each becomes output token ``i``'s row in that model. A token some
input lacks gets, in that input: the row of the only model that has it; zeros if none has it;
the base's row if the base is among the tensor's inputs and has it; else the mean of the rows of
the models that have it (summed in input order, then divided by their count, in the merge's
dtype: mergekit's arithmetic, so the bits agree). ``tokenizer.tokens`` settings come first, and
``force`` uses the configured row in every model. Padding rows (``pad_to_multiple_of``) take the
mean of the real tokens' rows.

:class:`AlignedSource` shows the merge engine an input checkpoint with those tensors aligned
(computed once per tensor for all its models, on the first read) and, for a model with tied
embeddings among untied ones, its embedding read as its LM head (mergekit's ``tied_names``).
The tokenizer side (which tokens, which rows each model has) is :mod:`polytask.merge.tokenizer`.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from polytask.errors import ConfigError
from polytask.merge.io import TensorSpec

__all__ = ["TokenChoice", "VocabPlan", "permutation", "align_rows", "AlignedSource", "align_sources",
           "tied_aliases", "is_vocab_tensor", "EMBEDDING"]

#: Tensors indexed by token on their first axis (mergekit's ``vocabulary_axis: 0``). T5 keeps its
#: embedding as the top-level ``shared.weight`` (beside the encoder's and decoder's copies).
_VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|lm_head|embed_out)\.weight$"
                           r"|^shared\.weight$")
#: Input embeddings (an LM head's tied partner).
EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in)\.weight$|^shared\.weight$")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.weight$")


def is_vocab_tensor(name: str) -> bool:
    """Whether ``name`` is a token-indexed tensor (rows = tokens): input embeddings or LM head."""
    return _VOCAB_TENSOR.search(name) is not None


@dataclass(frozen=True)
class TokenChoice:
    """Where an output token's row comes from where a model lacks it (or everywhere, if ``force``).

    ``kind``: ``"model"`` (the token's row in model ``model``), ``"row"`` (row ``row`` of model
    ``model``), ``"zero"`` or ``"none"`` (a ``tokenizer.tokens`` entry without a source: valid only
    where every model has the token). The mean over the models is not a choice but the fallback.
    """

    kind: str
    model: int | None = None
    row: int | None = None
    force: bool = False


@dataclass
class VocabPlan:
    """The output tokenizer and, per input model (by source index), where each output token's row is.

    ``perms[k][i]`` is the row of output token ``i`` in model ``k`` (-1: the model lacks it);
    ``rows`` is the output's row count (the vocabulary, padded); ``choices`` the
    ``tokenizer.tokens`` settings; ``base`` the base's source index.
    """

    tokenizer: Any
    vocab: dict[str, int]
    rows: int
    perms: dict[int, Tensor]
    choices: dict[str, TokenChoice] = field(default_factory=dict)
    base: int | None = None


def permutation(vocab: Mapping[str, int], model_vocab: Mapping[str, int], size: int, rows: int | None) -> Tensor:
    """Row of each output token in a model (-1 where it lacks the token or the row is past its vocabulary)."""
    limit = size if rows is None else min(size, rows)
    perm = torch.full((len(vocab),), -1, dtype=torch.long)
    ids = [(i, model_vocab[t]) for t, i in vocab.items() if t in model_vocab and model_vocab[t] < limit]
    if ids:
        new, old = zip(*ids)
        perm[list(new)] = torch.tensor(old, dtype=torch.long)
    return perm


def _auto_choices(plan: VocabPlan, group: Sequence[int], present: Tensor) -> tuple[dict[str, TokenChoice], Tensor]:
    """mergekit's default source of each output token missing from some input of ``group``
    (``present``: (models, tokens), whether each model has each token): the explicit choices plus
    one per such token, and the mask of the tokens whose rows are the mean of the models'."""
    count = present.sum(0)
    base_pos = group.index(plan.base) if plan.base in group else None
    choices = dict(plan.choices)
    mean = torch.zeros(len(plan.vocab), dtype=torch.bool)
    partial = (count < len(group)).nonzero().flatten()
    names = _names_by_id(plan.vocab)
    counts = count[partial].tolist()
    donors = present[:, partial].to(torch.uint8).argmax(0).tolist()  # the first model that has it
    in_base = present[base_pos, partial].tolist() if base_pos is not None else [False] * len(counts)
    for i, c, donor, base_has in zip(partial.tolist(), counts, donors, in_base):
        token = names[i]
        if token in choices:
            continue
        if c == 1:
            choices[token] = TokenChoice("model", model=group[donor])
        elif c == 0:
            warnings.warn(f"tokenizer: token {token!r} is in no model; its rows are zeros", RuntimeWarning,
                          stacklevel=4)
            choices[token] = TokenChoice("zero")
        elif base_has:
            choices[token] = TokenChoice("model", model=plan.base)
        else:
            mean[i] = True
    return choices, mean


def _names_by_id(vocab: Mapping[str, int]) -> dict[int, str]:
    return {i: t for t, i in vocab.items()}


def align_rows(plan: VocabPlan, group: Sequence[int], tensors: Sequence[Tensor], dtype: torch.dtype,
               name: str, labels: Sequence[str]) -> list[Tensor]:
    """``tensors`` (the token-indexed tensor ``name`` of the models ``group``, rows first)
    re-indexed to the output vocabulary in ``dtype``, as mergekit's ``PermutedVocabulary``."""
    shape = tensors[0].shape[1:]
    for k, t in zip(group, tensors):
        if t.shape[1:] != shape:
            raise ConfigError(f"tokenizer: tensor {name!r} has shape {list(t.shape)} in model {labels[k]} but "
                              f"{list(tensors[0].shape)} in model {labels[group[0]]}; the rows cannot be aligned")
    x = {k: t.to(dtype) for k, t in zip(group, tensors)}
    perm = {k: plan.perms[k] for k in group}
    present = torch.stack([perm[k] >= 0 for k in group])
    all_present = present.all(0).tolist()
    choices, mean = _auto_choices(plan, group, present)
    n = len(plan.vocab)
    default = torch.zeros((n, *shape), dtype=dtype)
    has_default = mean.clone()
    forced = torch.zeros(n, dtype=torch.bool)
    # the mean: zeros + each model's row in input order, then / count (mergekit's arithmetic)
    if bool(mean.any()):
        counts = torch.zeros(n, dtype=torch.long)
        for k in group:
            rows = (mean & (perm[k] >= 0)).nonzero().flatten()
            default[rows] = default[rows] + x[k][perm[k][rows]]
            counts[rows] += 1
        for c in counts[mean].unique().tolist():
            rows = (mean & (counts == c)).nonzero().flatten()
            default[rows] = default[rows] / c
    copies: dict[int, tuple[list[int], list[int]]] = {k: ([], []) for k in group}  # model -> (tokens, rows)
    for token, choice in choices.items():
        i = plan.vocab.get(token)
        if i is None:
            continue
        if choice.force:
            forced[i] = True
        elif all_present[i]:
            continue  # every input has it: its own rows
        if choice.kind == "zero":
            has_default[i] = True
        elif choice.kind in ("model", "row"):
            k = choice.model
            if k not in x:
                raise ConfigError(f"tokenizer.tokens[{token!r}].source: model {labels[k]} is not an input of "
                                  f"tensor {name!r}")
            row = int(perm[k][i]) if choice.kind == "model" else choice.row
            if row < 0 or row >= x[k].shape[0]:
                raise ConfigError(f"tokenizer.tokens[{token!r}].source: token {token!r} has no row in model "
                                  f"{labels[k]} (tensor {name!r} has {x[k].shape[0]} rows)")
            copies[k][0].append(i)
            copies[k][1].append(row)
        elif choice.kind == "none":
            raise ConfigError(f"tokenizer.tokens[{token!r}]: some models lack this token (or it is forced); "
                              "give its source")
    for k, (ids, rows) in copies.items():
        if ids:
            default[ids] = x[k][rows]
            has_default[ids] = True
    out = []
    for k in group:
        new = torch.zeros((plan.rows, *shape), dtype=dtype)
        keep = (perm[k] >= 0) & ~forced
        idx = keep.nonzero().flatten()
        new[idx] = x[k][perm[k][idx]]
        fill = (~keep & has_default).nonzero().flatten()
        new[fill] = default[fill]
        if plan.rows > n:  # padding rows: the mean embedding of the real tokens
            new[n:] = torch.mean(new[:n], dim=0)
        out.append(new)
    return out


# -- the engine's view ------------------------------------------------------------------------------

def tied_aliases(sources: Sequence[Any]) -> list[dict[str, str]]:
    """Per source, the LM head it lacks -> its input embedding, where another source has that head
    (a model with tied embeddings among untied ones: mergekit reads its embedding as its head)."""
    heads = {n for s in sources for n in s.names() if _HEAD.search(n)}
    out: list[dict[str, str]] = []
    for s in sources:
        embedding = next((n for n in s.names() if EMBEDDING.search(n)), None)
        out.append({h: embedding for h in sorted(heads) if h not in s and embedding is not None})
    return out


class AlignedSource:
    """An input checkpoint seen with its token-indexed tensors re-indexed to the output vocabulary
    (when there is a plan) and, if its embeddings are tied, its embedding read as its LM head.

    The tensors of all the models of a group are aligned together (a missing token's row may come
    from another model) on the first read, and each model's share is handed out once.
    """

    def __init__(self, inner: Any, k: int, shared: _Aligner, aliases: Mapping[str, str]) -> None:
        self.inner = inner
        self.k = k
        self.shared = shared
        self.aliases = dict(aliases)
        self.label = inner.label

    def names(self) -> list[str]:
        return [*self.inner.names(), *self.aliases]

    def __contains__(self, name: str) -> bool:
        return name in self.aliases or name in self.inner

    def spec(self, name: str) -> TensorSpec:
        spec = self.inner.spec(self.aliases.get(name, name))
        if not self.shared.aligns(name, self.k):
            return spec
        return TensorSpec((self.shared.plan.rows, *spec.shape[1:]), spec.dtype)  # type: ignore[union-attr]

    def raw(self, name: str) -> Tensor:
        """The tensor as stored (a tied head: the embedding)."""
        return self.inner.load(self.aliases.get(name, name))

    def load(self, name: str) -> Tensor:
        return self.shared.take(name, self.k) if self.shared.aligns(name, self.k) else self.raw(name)

    def read_into(self, name: str, out: Tensor) -> None:
        if self.shared.aligns(name, self.k):
            out.copy_(self.shared.take(name, self.k))
            return
        reader = getattr(self.inner, "read_into", None)
        if reader is not None:
            reader(self.aliases.get(name, name), out)
        else:
            out.copy_(self.raw(name))


class _Aligner:
    """Aligned token-indexed tensors, computed once per tensor for its group of models."""

    def __init__(self, plan: VocabPlan | None, groups: Mapping[str, Sequence[int]], dtype: torch.dtype | None,
                 labels: Sequence[str]) -> None:
        self.plan = plan
        self.sources: list[AlignedSource] = []
        self.groups = groups
        self.dtype = dtype
        self.labels = labels
        self.lock = threading.Lock()
        self.ready: dict[str, dict[int, Tensor]] = {}

    def aligns(self, name: str, k: int) -> bool:
        return self.plan is not None and is_vocab_tensor(name) and k in self.groups.get(name, ())

    def take(self, name: str, k: int) -> Tensor:
        assert self.plan is not None
        with self.lock:  # readers run in threads: one computes, the others wait for its result
            if name not in self.ready:
                group = list(self.groups[name])
                tensors = [self.sources[j].raw(name) for j in group]
                dtype = self.dtype or _promoted([t.dtype for t in tensors])
                self.ready[name] = dict(zip(group, align_rows(self.plan, group, tensors, dtype, name, self.labels)))
            return self.ready[name].pop(k)


def _promoted(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def align_sources(plan: VocabPlan | None, sources: Sequence[Any], groups: Mapping[str, Sequence[int]],
                  dtype: torch.dtype | None, labels: Sequence[str],
                  aliases: Sequence[Mapping[str, str]] | None = None) -> list[AlignedSource]:
    """The engine's sources with each token-indexed tensor ``name`` aligned over ``groups[name]``
    (the models merged into it, in mergekit's input order) when ``plan`` is given, and tied heads
    read from the embedding (``aliases``, from :func:`tied_aliases`); ``dtype``: the merge's
    ``dtype`` (None: the inputs' promoted dtype)."""
    shared = _Aligner(plan, groups, dtype, labels)
    shared.sources = [AlignedSource(s, k, shared, (aliases or [{}] * len(sources))[k]) for k, s in enumerate(sources)]
    return shared.sources
