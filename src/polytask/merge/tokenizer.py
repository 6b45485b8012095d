"""Merged tokenizers and token-aligned embeddings, as mergekit 0.1.5 builds them.

A config with ``tokenizer_source: base | union | <model>`` (or the ``tokenizer:`` block, whose
``source`` defaults to ``union``) gets an output tokenizer, and every vocabulary-indexed tensor
(``embed_tokens``, ``lm_head``...) of every input is re-indexed to it before the merge, so that
row ``i`` of each input is the embedding of output token ``i``:

- ``base``: the base's tokenizer, stripped of the tokens at or past its config's ``vocab_size``
  (BPE only, as mergekit); ``<model>``: that model's tokenizer as it is; ``union``: the base's
  tokenizer plus every other model's tokens (below its ``vocab_size``) in config order, plain
  tokens first, then added tokens with their settings (the first model's wins).
- ``tokenizer.tokens`` tokens are added to the output if missing; each may say where its row
  comes from (``source: <model>``, ``{kind: model_token, model, token | token_id}``,
  ``{kind: zero}``) and ``force: true`` uses that row in every model, even where it has the token.
- A token some input lacks gets, in that input: the row of the only model that has it; zeros if
  none has it; the base's row if the base is among the tensor's inputs and has it; else the mean
  of the rows of the models that have it (summed in input order, in the merge's dtype).
- ``pad_to_multiple_of`` pads the rows with the mean embedding of the real tokens.
- ``chat_template``: a literal Jinja template, ``auto`` (the template most of the inputs use),
  or a built-in name (``chatml``, ``llama3``, ``mistral``: polytask's own text, rendering as
  mergekit's templates of those names).

The tokenizer files are written as ``transformers``' ``save_pretrained`` writes them (the same
files as mergekit), the base's other tokenizer files are dropped, and ``config.json`` gets the
output ``vocab_size``.

Where polytask differs from mergekit: inputs are taken in config order and each model's tokens
by id (mergekit walks a set of models and each fast tokenizer's ``get_vocab()`` order, so its
union's order of new tokens can change from run to run); a model without tokenizer files is
assumed to share the base's only when its vocabulary size equals the base's (else ConfigError,
mergekit assumes it silently); a token past a model's ``vocab_size`` counts as missing there
(mergekit fails on it later with a KeyError); unknown models and tokens are ConfigErrors naming
the key.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.errors import ConfigError
from polytask.merge.io import TensorSpec

__all__ = ["VocabPlan", "build_vocab_plan", "align_rows", "AlignedSource", "is_vocab_tensor",
           "chat_template_text", "tokenizer_files", "TOKENIZER_FILES"]

#: Tensors indexed by token on their first axis (mergekit's ``vocabulary_axis: 0``).
_VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|lm_head|embed_out)\.weight$")

#: Tokenizer files of a model folder: replaced (or removed) when the merge writes its own tokenizer.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json")

# Built-in chat templates (polytask's text; each renders a conversation as mergekit's template of that name).
_CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
               "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama3": ("{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
               "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
               "+ '<|eot_id|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "mistral": ("{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
                "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}{{- bos_token }}"
                "{%- for message in turns %}"
                "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{- raise_exception('roles must alternate user/assistant after an optional system message') }}"
                "{%- endif %}{%- if message['role'] == 'user' %}"
                "{%- if loop.first and system is defined %}{{- ' [INST] ' + system + '\\n\\n' + message['content'] "
                "+ ' [/INST]' }}{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
                "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
                "{%- else %}{{- raise_exception('only user and assistant roles after an optional system message') }}"
                "{%- endif %}{%- endfor %}"),
}


def is_vocab_tensor(name: str) -> bool:
    """Whether ``name`` is a token-indexed tensor (rows = tokens): input embeddings or LM head."""
    return _VOCAB_TENSOR.search(name) is not None


@dataclass(frozen=True)
class TokenChoice:
    """Where an output token's row comes from where a model lacks it (or everywhere, if ``force``).

    ``kind``: ``"model"`` (the token's row in model ``model``), ``"row"`` (row ``row`` of model
    ``model``), ``"zero"``, ``"mean"`` (mean over the models that have it) or ``"none"``.
    """

    kind: str
    model: int | None = None
    row: int | None = None
    force: bool = False


@dataclass
class VocabPlan:
    """The output tokenizer and, per input model (by source index), where each output token's row is.

    ``perms[k][i]`` is the row of output token ``i`` in model ``k`` (-1: the model lacks it).
    """

    tokenizer: Any
    vocab: dict[str, int]
    rows: int
    perms: dict[int, Tensor]
    choices: dict[str, TokenChoice] = field(default_factory=dict)
    base: int | None = None


# -- loading ----------------------------------------------------------------------------------------
def _folder(path: str) -> str:
    """A model's folder (mergekit's ``model+adapter``: the model's)."""
    from polytask.merge.lora import split_lora_path

    split = split_lora_path(path)
    return split[0] if split is not None else path


def _has_tokenizer(path: Path) -> bool:
    path = Path(_folder(str(path)))
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file() or (
        path / "vocab.json").is_file()


def _load_tokenizer(path: str, label: str, where: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(_folder(path), **kwargs)  # a local folder: no download
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: cannot read the tokenizer of model {label}: {first}") from None


def _vocab_size(path: str, rows: int | None, tokenizer: Any | None) -> int:
    """A model's vocabulary size: its config's ``vocab_size`` (as mergekit), else its embedding rows."""
    try:
        cfg = json.loads((Path(_folder(path)) / "config.json").read_text())
        size = cfg.get("vocab_size") if isinstance(cfg, dict) else None
        if size is None and isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict):
            size = cfg["text_config"].get("vocab_size")
        if isinstance(size, int) and size > 0:
            return size
    except (OSError, json.JSONDecodeError):
        pass
    if rows is not None:
        return rows
    return len(tokenizer.get_vocab()) if tokenizer is not None else 0


def _stripped(tokenizer: Any, vocab_size: int, label: str, where: str) -> Any:
    """``tokenizer`` without its tokens at or past ``vocab_size`` (mergekit: BPE tokenizers only)."""
    unused = {tok for tok, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tokenizer
    import tokenizers

    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{where}: model {label} has tokens past its vocab_size {vocab_size} and no fast "
                          "tokenizer to strip them from")
    spec = json.loads(tokenizer._tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ConfigError(f"{where}: model {label}: its {spec['model']['type']} tokenizer has "
                          f"{len(unused)} tokens past its vocab_size {vocab_size}; only BPE tokenizers can be "
                          "stripped of them (as mergekit)")
    spec["added_tokens"] = [e for e in spec["added_tokens"] if e["id"] < vocab_size]
    for tok in unused:
        spec["model"]["vocab"].pop(tok, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return tokenizer


def _union(base: Any, others: Sequence[tuple[Any, int]]) -> Any:
    """The base tokenizer plus every token of ``others`` (tokenizer, vocab size), in order."""
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in others:
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        # by id (mergekit walks get_vocab()'s order, which a fast tokenizer does not fix)
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and t not in added_names:
                plain.setdefault(t, None)
        for i, info in decoder.items():
            if i < size and info.content not in added:
                added[info.content] = info
            elif i < size and added[info.content] != info:
                warnings.warn(f"tokenizer: token {info.content!r} is added with different settings; the first "
                              "model's are used", RuntimeWarning, stacklevel=3)
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base tokenizer object stays as it is
        base.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base.get_vocab()
    for t in plain:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


# -- the plan ---------------------------------------------------------------------------------------
def build_vocab_plan(
    paths: Sequence[str],
    labels: Sequence[str],
    base: int | None,
    source: str,
    rows: Sequence[int | None],
    *,
    tokens: Mapping[str, Any] | None = None,
    pad_to_multiple_of: int | None = None,
    source_label: str | None = None,
    index_of: Mapping[str, int] | None = None,
    where: str = "tokenizer_source",
) -> VocabPlan:
    """The output tokenizer and each model's row for each output token.

    ``paths``/``labels``: the input models (source indices); ``base``: the base's index (None:
    the first model stands in, as in mergekit); ``source``: ``"base"``, ``"union"`` or a model
    path; ``rows``: each model's embedding rows (None if unknown); ``tokens``: the
    ``tokenizer.tokens`` block (token -> settings with model paths resolved as ``paths``);
    ``index_of`` maps a model path of ``tokens`` to its index. ConfigError naming ``where`` for
    models without tokenizers, unknown models, tokens that cannot be placed.
    """
    ref = 0 if base is None else base
    ref_path = paths[ref]
    if not _has_tokenizer(Path(ref_path)):
        raise ConfigError(f"{where}: {'base model' if base is not None else 'first model'} {labels[ref]} has no "
                          "tokenizer files (tokenizer.json or tokenizer.model); the merged tokenizer starts from it")
    sizes: dict[int, int] = {}
    toks: dict[int, Any] = {}
    base_tok = _load_tokenizer(ref_path, labels[ref], where, use_fast=True)
    sizes[ref] = _vocab_size(ref_path, rows[ref], base_tok)
    toks[ref] = _stripped(base_tok, sizes[ref], labels[ref], where)
    for k, p in enumerate(paths):
        if k == ref:
            continue
        if not _has_tokenizer(Path(p)):
            size = _vocab_size(p, rows[k], None)
            if size != sizes[ref]:
                raise ConfigError(f"{where}: model {labels[k]} has no tokenizer files and {size} tokens, not the "
                                  f"{sizes[ref]} of {labels[ref]}; its embedding rows cannot be aligned by token")
            warnings.warn(f"{where}: model {labels[k]} has no tokenizer files; assuming {labels[ref]}'s",
                          RuntimeWarning, stacklevel=2)
            toks[k], sizes[k] = toks[ref], size
            continue
        toks[k] = _load_tokenizer(p, labels[k], where)
        sizes[k] = _vocab_size(p, rows[k], toks[k])
    for k, size in sizes.items():
        if rows[k] is not None and rows[k] < size:
            raise ConfigError(f"{where}: model {labels[k]}: config.json's vocab_size {size} is more than the "
                              f"{rows[k]} rows of its embeddings; its rows cannot be aligned by token")
    if source == "base":
        out = toks[ref]
    elif source == "union":
        out = _union(toks[ref], [(toks[k], sizes[k]) for k in toks if toks[k] is not toks[ref] or k == ref])
    else:
        label = source_label or source
        if not Path(source).is_dir():
            raise ConfigError(f"{where}: model {label!r} is not a folder (give base, union, or a model of the "
                              "config or a folder with tokenizer files)")
        if not _has_tokenizer(Path(source)):
            raise ConfigError(f"{where}: model {label!r} has no tokenizer files (tokenizer.json or tokenizer.model)")
        out = _load_tokenizer(source, label, where)  # a fresh copy, as it is (not stripped), as mergekit
    existing = set(out.get_vocab())
    for t in tokens or {}:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    n = len(vocab)
    padded = n if not pad_to_multiple_of or n % pad_to_multiple_of == 0 else (
        n // pad_to_multiple_of + 1) * pad_to_multiple_of
    perms = {k: _permutation(vocab, toks[k].get_vocab(), sizes[k], rows[k]) for k in range(len(paths))}
    choices = _explicit_choices(tokens or {}, index_of or {}, toks, labels, where)
    return VocabPlan(out, vocab, padded, perms, choices, base)


def _permutation(vocab: Mapping[str, int], model_vocab: Mapping[str, int], size: int, rows: int | None) -> Tensor:
    """Row of each output token in a model (-1 where it lacks the token or the row is past its vocabulary)."""
    limit = size if rows is None else min(size, rows)
    perm = torch.full((len(vocab),), -1, dtype=torch.long)
    ids = [(i, model_vocab[t]) for t, i in vocab.items() if t in model_vocab and model_vocab[t] < limit]
    if ids:
        new, old = zip(*ids)
        perm[list(new)] = torch.tensor(old, dtype=torch.long)
    return perm


def _explicit_choices(tokens: Mapping[str, Any], index_of: Mapping[str, int], toks: Mapping[int, Any],
                      labels: Sequence[str], where: str) -> dict[str, TokenChoice]:
    """The ``tokenizer.tokens`` settings as :class:`TokenChoice` s (models as source indices)."""
    out: dict[str, TokenChoice] = {}
    for token, cfg in tokens.items():
        key = f"tokenizer.tokens[{token!r}].source"
        src = getattr(cfg, "source", None)
        force = bool(getattr(cfg, "force", False))
        if src is None:
            out[token] = TokenChoice("none", force=force)
            continue
        if getattr(src, "kind", None) == "zero":
            out[token] = TokenChoice("zero", force=force)
            continue
        model = src if isinstance(src, str) else src.model
        k = index_of.get(os.path.normpath(model))
        if k is None:
            raise ConfigError(f"{key}: model {model!r} is not one of the merged models")
        if isinstance(src, str):
            out[token] = TokenChoice("model", model=k, force=force)
            continue
        row = src.token_id
        if row is None:
            row = toks[k].get_vocab().get(src.token)
            if row is None:
                raise ConfigError(f"{key}: token {src.token!r} is not in the vocabulary of model {labels[k]}")
        out[token] = TokenChoice("row", model=k, row=int(row), force=force)
    return out


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
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.weight$")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in)\.weight$")


def tied_aliases(sources: Sequence[Any]) -> list[dict[str, str]]:
    """Per source, the LM head it lacks -> its input embedding, where another source has that head
    (a model with tied embeddings among untied ones: mergekit reads its embedding as its head)."""
    heads = {n for s in sources for n in s.names() if _HEAD.search(n)}
    out: list[dict[str, str]] = []
    for s in sources:
        embedding = next((n for n in s.names() if _EMBEDDING.search(n)), None)
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


# -- output files -----------------------------------------------------------------------------------
def chat_template_text(template: str, tokenizers: Sequence[Any] = ()) -> str | None:
    """The Jinja text of ``chat_template``: a built-in name, ``auto`` (the most common template of
    ``tokenizers``; None if they have none), or the template itself."""
    if template == "auto":
        found = []
        for tok in tokenizers:
            t = getattr(tok, "chat_template", None)
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(template) < 256 and "\n" not in template and "{" not in template:
        if template in _CHAT_TEMPLATES:
            return _CHAT_TEMPLATES[template]
        raise ConfigError(f"chat_template: no built-in template {template!r} (polytask has "
                          f"{', '.join(sorted(_CHAT_TEMPLATES))}); give the Jinja text itself")
    if len(template) < 20 or "{" not in template:
        raise ConfigError(f"chat_template: not a Jinja template or a built-in name, got {template!r}")
    return template


def tokenizer_files(tokenizer: Any, chat_template: str | None) -> dict[str, str | None]:
    """The files ``save_pretrained`` writes for ``tokenizer`` (with ``chat_template`` set), and
    ``None`` for the other tokenizer files (a copied base file that must go)."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        written = {p.name: p.read_text() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return {**{f: None for f in TOKENIZER_FILES if f not in written}, **written}


# -- the config's entry point -----------------------------------------------------------------------
_PRE_TENSOR = re.compile(r"embed|\bwte\b|\bwpe\b")


def _group(config: Any, source_of: Mapping[str, int], base: int | None, pre: bool) -> list[int]:
    """The models merged into a token-indexed tensor, in mergekit's order: the models (the base
    appended if not listed), or the sources of the first (embeddings) or last slice."""
    if config.models is not None:
        group = [source_of[e.model] for e in config.models]
    else:
        sl = config.slices[0] if pre else config.slices[-1]
        group = [source_of[src.model] for src in sl.sources]
        if sl.base_model is not None and source_of[sl.base_model] not in group:
            group.append(source_of[sl.base_model])
    group = list(dict.fromkeys(group))
    if base is not None and base not in group:
        group.append(base)
    return group


def prepare(config: Any, written: Any, sources: Sequence[Any], paths: Sequence[str], labels: Sequence[str],
            source_of: Mapping[str, int], base: int | None) -> tuple[list[Any], dict[str, str | None], int | None]:
    """For a config with ``tokenizer_source``/``tokenizer``/``chat_template``: the sources to
    merge from (token-indexed tensors aligned), the tokenizer files to write, the output rows
    (None when only a chat template is set: the base's tokenizer, re-saved with it)."""
    block = config.tokenizer
    source = block.source if block is not None else config.tokenizer_source
    loaded: list[Any] = []
    if config.chat_template == "auto":
        loaded = [_load_tokenizer(p, lab, "chat_template") for p, lab in zip(paths, labels)
                  if _has_tokenizer(Path(p))]
    template = None if config.chat_template is None else chat_template_text(config.chat_template, loaded)
    ref = 0 if base is None else base
    aliases = tied_aliases(sources)
    if source is None:
        for pre in (True, False):
            _check_same_vocabulary(sources, labels, _group(config, source_of, base, pre))
    if source is None and template is None:  # only tied heads to read from the embeddings (if any)
        return (align_sources(None, sources, {}, None, labels, aliases) if any(aliases) else list(sources)), {}, None
    if source is None:  # only a chat template: mergekit re-saves the donor's tokenizer with it
        if not _has_tokenizer(Path(paths[ref])):
            raise ConfigError(f"chat_template: model {labels[ref]} has no tokenizer files to add the template to")
        tok = _load_tokenizer(paths[ref], labels[ref], "chat_template")
        return align_sources(None, sources, {}, None, labels, aliases), tokenizer_files(tok, template), None
    where = "tokenizer.source" if block is not None else "tokenizer_source"
    rows: list[int | None] = []
    for s in sources:
        embedding = next((n for n in s.names() if _EMBEDDING.search(n)), None) or next(
            (n for n in s.names() if is_vocab_tensor(n)), None)
        rows.append(s.spec(embedding).shape[0] if embedding is not None else None)
    written_block = written.tokenizer
    source_label = (written_block.source if written_block is not None else written.tokenizer_source)
    plan = build_vocab_plan(
        paths, labels, base, source, rows,
        tokens=None if block is None else block.tokens,
        pad_to_multiple_of=None if block is None else block.pad_to_multiple_of,
        source_label=source_label,
        index_of={os.path.normpath(p): i for i, p in enumerate(paths)},
        where=where,
    )
    groups = {n: _group(config, source_of, base, bool(_PRE_TENSOR.search(n)))
              for n in {n for s in sources for n in s.names() if is_vocab_tensor(n)}}
    dtype = None
    if config.dtype is not None:
        from polytask.merge.io import parse_dtype

        dtype = parse_dtype(config.dtype)
    aligned = align_sources(plan, sources, groups, dtype, labels, aliases)
    return aligned, tokenizer_files(plan.tokenizer, template), plan.rows


def _check_same_vocabulary(sources: Sequence[Any], labels: Sequence[str], group: Sequence[int]) -> None:
    """Without a tokenizer key, the embeddings merged together (``group``) must have the same
    number of rows (mergekit refuses them too unless told to truncate): say which key fixes it."""
    def rows(s: Any) -> tuple[str, int] | None:
        name = next((n for n in s.names() if _EMBEDDING.search(n)), None)
        return None if name is None else (name, s.spec(name).shape[0])

    ref = group[0]
    want = rows(sources[ref])
    for k in group:
        got = rows(sources[k])
        if want is not None and got is not None and got[1] != want[1]:
            raise ConfigError(f"tokenizer_source: model {labels[k]} has {got[1]} token rows ({got[0]}) but model "
                              f"{labels[ref]} has {want[1]}; their vocabularies differ: set tokenizer_source "
                              "(base, union or a model) to align the rows by token")


def with_vocab_size(text: str | None, reference: str | os.PathLike[str], rows: int,
                    dtype: torch.dtype | None) -> str | None:
    """``config.json`` (``text``, else the reference model's) with ``vocab_size`` set to ``rows``
    (None if there is no such file)."""
    if text is None:
        f = Path(reference) / "config.json"
        if not f.is_file():
            return None
        text = f.read_text()
        if dtype is not None:
            cfg = json.loads(text)
            cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
            if "dtype" in cfg:
                cfg["dtype"] = cfg["torch_dtype"]
            text = json.dumps(cfg)
    cfg = json.loads(text)
    if not isinstance(cfg, dict):
        return None
    if isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
        cfg["text_config"]["vocab_size"] = rows
    else:
        cfg["vocab_size"] = rows
    return json.dumps(cfg, indent=2) + "\n"
