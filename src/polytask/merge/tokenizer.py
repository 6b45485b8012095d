"""Merged tokenizers, as mergekit 0.1.5 builds them, and the config's vocabulary hooks.

A config with ``tokenizer_source: base | union | <model>`` (or the ``tokenizer:`` block, whose
``source`` defaults to ``union``) gets an output tokenizer, and every token-indexed tensor
(``embed_tokens``, ``lm_head``, ``wte``...) of every input is re-indexed to it before the merge
(:mod:`polytask.merge.vocab`), so that row ``i`` of each input is output token ``i``'s:

- ``base``: the base's tokenizer, stripped of the tokens at or past its config's ``vocab_size``
  (BPE only, as mergekit); ``<model>``: that model's tokenizer as it is; ``union``: the base's
  tokenizer plus every other model's tokens (below its ``vocab_size``), plain tokens first, then
  added tokens with their settings (the first model's win).
- ``tokenizer.tokens`` tokens are added to the output if missing; each may say where its row
  comes from (``source: <model>``, ``{kind: model_token, model, token | token_id}``,
  ``{kind: zero}``) and ``force: true`` uses that row in every model, even where it has the token.
  ``pad_to_multiple_of`` pads the rows.
- ``chat_template``: a literal Jinja template, ``auto`` (the template most of the inputs use),
  or a built-in name: every template mergekit 0.1.5 ships (``alpaca``, ``chatml``, ``exaone``,
  ``llama3``, ``mistral``), in polytask's own text that renders every conversation as mergekit's
  file of that name does under ``apply_chat_template``. Two of them depart from the published
  format because mergekit's files do: ``alpaca`` (Taori et al., Stanford Alpaca, 2023) puts the
  last system message where Alpaca has its fixed preamble and no blank line before the
  generation prompt; ``exaone`` (LG AI Research, EXAONE 3.0, 2024) carries the indentation of
  mergekit's file into the prompt (4 spaces before each turn, 8 and a blank line after it),
  which LG's own template does not. Alone, ``chat_template`` re-saves the base's tokenizer with it.

The tokenizer files are written as ``transformers``' ``save_pretrained`` writes them (the same
files as mergekit), the base's other tokenizer files are dropped, and ``config.json`` gets the
output ``vocab_size``. Without a tokenizer key, embeddings merged together must have as many
rows (ConfigError naming the models and ``tokenizer_source``); a model with tied embeddings
among untied ones has its embedding read as its LM head either way (mergekit's ``tied_names``).

Where polytask differs from mergekit: inputs are taken in config order and each model's tokens
by id (mergekit walks a set of models and each fast tokenizer's ``get_vocab()`` order, so its
union's order of new tokens can change from run to run); a model without tokenizer files is
assumed to share the base's only when its vocabulary size equals the base's (else ConfigError,
mergekit assumes it silently); a token past a model's ``vocab_size`` counts as missing there
(mergekit fails on it later with a KeyError); stripping a BPE tokenizer also drops the merges
that make a stripped token (mergekit keeps them and then cannot load its own output); a model's ``vocab_size`` above its embedding rows,
unknown models and unknown tokens are ConfigErrors naming the key and model.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from polytask.errors import ConfigError
from polytask.merge.vocab import (EMBEDDING, TokenChoice, VocabPlan, align_sources, is_vocab_tensor, permutation,
                                  tied_aliases)

__all__ = ["build_vocab_plan", "chat_template_text", "tokenizer_files", "prepare", "with_vocab_size",
           "TOKENIZER_FILES"]

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
    # Stanford Alpaca's sections (Taori et al. 2023: "### Instruction:", "### Input:", "### Response:"),
    # the last system message in place of its fixed preamble, as mergekit's alpaca.jinja renders:
    # sections joined by a blank line, none before a generation prompt, which follows unless the
    # assistant spoke last
    "alpaca": (r"{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
               r"{{- (system[-1]['content'] | trim if system else '') + '\n\n' -}}"
               r"{%- set headers = {'user': '### Instruction:', 'user_context': '### Input:', "
               r"'assistant': '### Response:'} -%}"
               r"{%- for message in messages -%}{%- if message['role'] in headers -%}"
               r"{{- headers[message['role']] + '\n' + message['content'] | trim -}}"
               r"{%- if not loop.last %}{{- '\n\n' -}}{%- endif -%}"
               r"{%- endif -%}{%- endfor -%}"
               r"{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
               r"{{- '### Response:\n' -}}{%- endif -%}"),
    # LG's EXAONE 3 turns ("[|role|]content", "[|endofturn|]" after every turn but a user's, an
    # empty system turn first), with the indentation and blank lines mergekit's exaone.jinja
    # renders into the prompt (4 spaces before a turn, 8 before its end): the same text as mergekit
    "exaone": (r"{%- for message in messages -%}"
               r"{%- if loop.first and message['role'] != 'system' -%}"
               r"{{- '        [|system|][|endofturn|]\n\n' -}}{%- endif -%}"
               r"{{- '    [|' + message['role'] + '|]' + message['content'] + '\n        ' -}}"
               r"{{- ('\n' if message['role'] == 'user' else '[|endofturn|]\n') + '\n' -}}"
               r"{%- endfor -%}"
               r"{%- if add_generation_prompt -%}{{- '    [|assistant|]\n' -}}{%- endif -%}"),
}


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

    prefix = spec["model"].get("continuing_subword_prefix") or ""

    def keep(merge: Any) -> bool:
        # mergekit drops the merges of an unused token, not those that make one; the tokenizers
        # library then refuses the file (a merge result out of the vocabulary), so drop both
        parts = merge.split(" ") if isinstance(merge, str) else merge
        made = parts[0] + (parts[1][len(prefix):] if prefix and parts[1].startswith(prefix) else parts[1])
        return not any(p in unused for p in parts) and made not in unused

    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if keep(m)]
    try:
        tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as exc:  # the tokenizers library raises a bare Exception on a bad file
        raise ConfigError(f"{where}: model {label}: its tokenizer without the tokens past vocab_size {vocab_size} "
                          f"does not load: {str(exc).splitlines()[0]}") from None
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
    perms = {k: permutation(vocab, toks[k].get_vocab(), sizes[k], rows[k]) for k in range(len(paths))}
    choices = _explicit_choices(tokens or {}, index_of or {}, toks, labels, where)
    return VocabPlan(out, vocab, padded, perms, choices, base)


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
    config_of = _module_configs(config, paths[ref], sources[ref].names())
    if source is None:
        embedding = next((n for n in sources[ref].names() if EMBEDDING.search(n)), None)
        # no embedding by these names (T5's is shared.weight): a modules: config has no one group to check
        owner = config_of(embedding) if embedding is not None else (config if config.modules is None else None)
        for pre in (True, False):
            if owner is not None:
                _check_same_vocabulary(sources, labels, _group(owner, source_of, base, pre))
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
        embedding = next((n for n in s.names() if EMBEDDING.search(n)), None) or next(
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
    groups = {n: _group(owner, source_of, base, bool(_PRE_TENSOR.search(n)))
              for n in {n for s in sources for n in s.names() if is_vocab_tensor(n)}
              if (owner := config_of(n)) is not None}
    dtype = None
    if config.dtype is not None:
        from polytask.merge.io import parse_dtype

        dtype = parse_dtype(config.dtype)
    aligned = align_sources(plan, sources, groups, dtype, labels, aliases)
    return aligned, tokenizer_files(plan.tokenizer, template), plan.rows


def _module_configs(config: Any, reference: str, names: Sequence[str]) -> Any:
    """Tensor name -> the config that merges it: ``config`` itself, or for a ``modules:`` config
    the one-module form of the module holding the tensor (None: its module is not merged)."""
    if config.modules is None:
        return lambda name: config
    from polytask.merge.modules import layout_of, module_of

    layout = layout_of(_folder(reference), names)
    modules = {} if layout is None else layout[1]

    def config_of(name: str) -> Any:
        module = module_of(name, modules)
        return config.module_config(module) if module in config.modules else None

    return config_of


def _check_same_vocabulary(sources: Sequence[Any], labels: Sequence[str], group: Sequence[int]) -> None:
    """Without a tokenizer key, the embeddings merged together (``group``) must have the same
    number of rows (mergekit refuses them too unless told to truncate): say which key fixes it."""
    def rows(s: Any) -> tuple[str, int] | None:
        name = next((n for n in s.names() if EMBEDDING.search(n)), None)
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
