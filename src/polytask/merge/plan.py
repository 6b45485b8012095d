"""Turn a mergekit-style config into tensor jobs: slices, per-layer gradients and filters.

mergekit's rules, which this module follows (``mergekit/plan.py``, ``mergekit/config.py`` 0.1.5):

- ``models:`` is one slice over every layer of every model (the base added if not listed);
  ``slices:`` lists output slices, each merging the same number of consecutive layers
  (``layer_range: [start, end)``) of its sources. Output layers are numbered in order over the
  slices, so a frankenmerge may have more (or fewer) layers than its inputs.
- Tensors outside the layers (embeddings before, final norm and LM head after) come from the
  sources of the first slice (embeddings) or of the last one (everything else).
- A parameter may be a number, a list of numbers (a gradient over the layers of a slice: layer
  ``i`` of ``L`` sits at ``t = i/(L-1)`` and the list is interpolated linearly over ``t``;
  tensors outside the layers use ``t = 0``), or a list of ``{filter, value}`` conditions whose
  first match (``filter`` is a substring of the tensor name; none or ``*`` matches every tensor)
  gives the value. A setting that gives nothing falls through to the next scope.
- Scopes, first hit wins: the source's (or model entry's) ``parameters`` (per-model keys only),
  the slice's, the top level's. Per-model values are looked up under the input's tensor name,
  global ones under the output's.

What polytask adds: every value is checked before anything is written; a filter that matches no
tensor is named in a warning; a gradient with more values than the layers of a slice it applies
to, an empty list, or a layer range outside a model stop with one line naming the key and model.
A Llama-shaped checkpoint's layers are the tensors named ``...layers.<i>.<rest>`` (also
``h.<i>``, ``blocks.<i>``); tensors named ``*embed*``/``wte``/``wpe`` are the ones before them.
The output's ``config.json`` gets the new layer count, and its per-layer lists follow the output's
layers (``layer_types``, which transformers 5 writes and checks, Llama 4's ``no_rope_layers`` and
``moe_layers``, Mllama's ``cross_attention_layers``, Qwen2.5-VL's ``fullatt_block_indexes``:
:func:`set_layer_count`); mergekit keeps the old lists, which transformers 5 refuses to load (or
loads with the wrong layer kinds). Lists of tapped layers (``deepstack_visual_indexes``,
``intermediate_layers_indices``) are kept, with a warning where the layers there moved.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.errors import ConfigError, MergeError
from polytask.merge import checks
from polytask.merge.engine import TensorJob, _check_counts, build_method, resolve_model_params
from polytask.merge.methods import MERGE_METHODS, MergeMethod

__all__ = ["evaluate_setting", "plan_config", "PlannedMerge", "layer_structure", "gradient_lengths"]

_LAYER = re.compile(r"^(.*?\b(?:layers|h|blocks)\.)(\d+)\.(.+)$")
_PRE = re.compile(r"embed|\bwte\b|\bwpe\b")
#: mergekit keys whose Python names differ, and keys accepted with no effect.
RENAMED = {"lambda": "lambda_"}
IGNORED = {"int8_mask"}


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str)) or v is None


def _as_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str) and checks._EXP_FLOAT.fullmatch(v.strip()):
        return float(v)
    return None


def _conditions(where: str, setting: Any) -> list[dict[str, Any]] | None:
    """``setting`` as a list of ``{filter, value}`` conditions, or None if it is a plain value."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and not all(_is_scalar(e) for e in setting):
        for k, e in enumerate(setting):
            if isinstance(e, dict) and "pattern" in e and "filter" not in e:
                # mergekit's old spelling; 0.1.5 ignores the key (the condition then matches every tensor)
                warnings.warn(f"{where}: 'pattern: {e['pattern']}' is read as 'filter: {e['pattern']}' (mergekit "
                              "0.1.5 ignores 'pattern' and applies that value to every tensor); write filter:",
                              RuntimeWarning, stacklevel=3)
                e = setting[k] = {("filter" if key == "pattern" else key): v for key, v in e.items()}
            if not isinstance(e, dict) or "value" not in e or set(e) - {"value", "filter"}:
                raise ConfigError(f"{where}: a list of conditions takes entries {{filter: ..., value: ...}}, got {e!r}")
            if e.get("filter") is not None and not isinstance(e["filter"], str):
                raise ConfigError(f"{where}: filter must be a string, got {e['filter']!r}")
            if not (_is_scalar(e["value"]) or (isinstance(e["value"], list) and all(_is_scalar(v) for v in e["value"]))):
                raise ConfigError(f"{where}: a value must be a number or a list of numbers, got {e['value']!r}")
        return setting
    return None


def evaluate_setting(where: str, setting: Any, tensor_name: str, t: float) -> Any:
    """A parameter's value for ``tensor_name`` at layer position ``t`` (mergekit's rule), or None
    when a list of conditions has no match."""
    conds = _conditions(where, setting)
    if conds is not None:
        for c in conds:
            f = c.get("filter")
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate_setting(where, c["value"], tensor_name, t)
        return None
    if isinstance(setting, list):
        if not setting:
            raise ConfigError(f"{where}: an empty list gives no value; write a number or a list of numbers")
        numbers = [_as_number(v) for v in setting]
        if any(n is None for n in numbers):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(numbers) - 1)
        i0 = int(scaled)
        i1 = min(len(numbers) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * numbers[i0] + frac * numbers[i1]
    return setting


def _gradients(where: str, setting: Any) -> list[tuple[str, int]]:
    """``(where, length)`` of every gradient (list of values) inside ``setting``."""
    conds = _conditions(where, setting)
    if conds is not None:
        return [g for c in conds for g in _gradients(f"{where} (filter {c.get('filter')!r})", c["value"])]
    if isinstance(setting, list):
        return [(where, len(setting))]
    return []


def gradient_lengths(where: str, scope: Mapping[str, Any]) -> list[tuple[str, int]]:
    """``(where.key, length)`` of every gradient (list of values) in a ``parameters`` mapping."""
    return [g for key, setting in scope.items() for g in _gradients(f"{where}.{key}", setting)]


def _filters(where: str, setting: Any) -> list[tuple[str, str]]:
    conds = _conditions(where, setting)
    return [(where, c["filter"]) for c in conds or [] if c.get("filter") not in (None, "*")]


@dataclass
class Structure:
    """The layers of one checkpoint: ``layers[i][rest]`` is the name of tensor ``rest`` of layer ``i``."""

    label: str
    prefix: str | None
    layers: dict[int, dict[str, str]]
    others: list[str]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def layer_structure(names: Sequence[str], label: str, stack: str | None = None) -> Structure:
    """Group tensor names into numbered layers (``model.layers.3.mlp.up_proj.weight``); with
    ``stack``, the layers are the tensors named ``<stack><i>.<rest>`` (one module's stack)."""
    pattern = _LAYER if stack is None else re.compile(rf"^({re.escape(stack)})(\d+)\.(.+)$")
    layers: dict[int, dict[str, str]] = {}
    prefixes: set[str] = set()
    others: list[str] = []
    for name in names:
        m = pattern.match(name)
        if m is None:
            others.append(name)
            continue
        prefixes.add(m.group(1))
        layers.setdefault(int(m.group(2)), {})[m.group(3)] = name
    if len(prefixes) > 1:
        raise MergeError(f"model {label}: layers under several prefixes ({', '.join(sorted(prefixes))}); "
                         "slices and gradients need one stack of layers")
    if layers and sorted(layers) != list(range(len(layers))):
        raise MergeError(f"model {label}: layer numbers are not 0..{len(layers) - 1}")
    return Structure(label, prefixes.pop() if prefixes else None, dict(sorted(layers.items())), others)


@dataclass
class _Entry:
    """One source of a slice: a checkpoint, its first layer and its own parameters."""

    source: int
    start: int
    parameters: dict[str, Any]
    where: str
    is_base: bool = False
    label: str = ""


@dataclass
class _Slice:
    entries: list[_Entry]
    length: int
    parameters: dict[str, Any]
    where: str


@dataclass
class PlannedMerge:
    """The jobs of a config, the number of output layers, and the filters that matched nothing."""

    jobs: list[TensorJob]
    num_layers: int
    unmatched_filters: list[tuple[str, str]] = field(default_factory=list)
    slice_lengths: list[int] = field(default_factory=list)
    #: per output layer, the layer of its slice's base (else first source) it comes from
    layer_sources: list[int] = field(default_factory=list)


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def plan_config(config: Any, sources: Sequence[Any], source_of: Mapping[str, int],
                labels: Sequence[str], *, layer_stack: str | None = None, pre: re.Pattern[str] | None = None,
                filter_names: Collection[str] | None = None, check_gradient_fit: bool = True) -> PlannedMerge:
    """Jobs for ``config`` (a :class:`~polytask.merge.config.MergeConfig` with resolved paths).

    ``sources`` are the opened checkpoints, ``source_of`` maps a model path (as in ``config``) to
    its index there, ``labels`` name them as the config writes them. One module of a
    multi-module model (:mod:`polytask.merge.modules`) passes its views of the sources, its layer
    stack, the names of the tensors before its layers (``pre``) and the names ``filter``
    conditions are matched against to warn (every module's), and checks the gradients' lengths
    itself (``check_gradient_fit=False``: a gradient must fit some module it applies to).
    """
    method_cls = MERGE_METHODS.lookup(config.merge_method)
    per_model_keys = set(getattr(method_cls, "model_params", {}))
    global_keys = _init_keys(method_cls)
    structures = [layer_structure(s.names(), labels[i], layer_stack) for i, s in enumerate(sources)]
    slices = _slices(config, method_cls, source_of, structures, check_gradient_fit)
    top = dict(config.parameters)
    _check_keys(config, method_cls, slices)
    if check_gradient_fit:
        _check_gradients(top, "parameters", slices)
    ref_i = source_of[config.base_model] if config.base_model is not None else slices[0].entries[0].source
    ref = structures[ref_i]
    if config.slices is None:  # whole models: the same tensors in each (slices take what they need)
        ref_names = set(sources[ref_i].names())
        for e in slices[0].entries:
            extra = sorted(set(sources[e.source].names()) - ref_names)
            if extra:
                raise MergeError(f"tensor {extra[0]!r} of model {e.label} is missing from "
                                 f"{'base' if config.base_model is not None else 'first model'} {labels[ref_i]}")
    jobs: list[TensorJob] = []
    methods: dict[tuple[Any, ...], MergeMethod] = {}
    params_cache: dict[tuple[Any, ...], dict[str, Tensor]] = {}
    all_names = set(filter_names) if filter_names is not None else {n for s in sources for n in s.names()}
    # mixed input dtypes are refused only when no dtype says what to compute in (then all are rounded to it)
    strict_dtypes = config.strict_dtypes and config.dtype is None and config.compute_dtype is None

    def job(out_name: str, rest_of: dict[int, str], sl: _Slice, t: float) -> None:
        reads = [(e.source, rest_of[k]) for k, e in enumerate(sl.entries)]
        for (i, n), e in zip(reads, sl.entries):
            if n not in sources[i]:
                raise MergeError(f"{e.where}: tensor {n!r} is missing from model {labels[i]} "
                                 f"(needed for output tensor {out_name!r})")
        ref_spec = sources[reads[0][0]].spec(reads[0][1])
        for (i, n), e in zip(reads[1:], sl.entries[1:]):
            spec = sources[i].spec(n)
            if spec.shape != ref_spec.shape:
                raise MergeError(f"tensor {n!r} has shape {list(spec.shape)} in model {labels[i]} but "
                                 f"{list(ref_spec.shape)} in model {labels[reads[0][0]]}")
            if spec.dtype != ref_spec.dtype and (strict_dtypes or not (
                    spec.dtype.is_floating_point and ref_spec.dtype.is_floating_point)):
                raise MergeError(
                    f"tensor {n!r} is {str(spec.dtype).removeprefix('torch.')} in model {labels[i]} but "
                    f"{str(ref_spec.dtype).removeprefix('torch.')} in model {labels[reads[0][0]]} (set "
                    "strict_dtypes: false to merge mixed float dtypes)")
        base_k = next((k for k, e in enumerate(sl.entries) if e.is_base), None)
        inputs = [r for k, r in enumerate(reads) if k != base_k]
        base = reads[base_k] if base_k is not None else None
        if not ref_spec.dtype.is_floating_point:
            jobs.append(TensorJob(out_name, [base or reads[0]], None, None))
            return
        # global parameters: slice, then top level, looked up under the output name
        glob: dict[str, Any] = {}
        for where, scope in ((f"{sl.where}.parameters", sl.parameters), ("parameters", top)):
            for key, setting in scope.items():
                if key in IGNORED or key in per_model_keys or RENAMED.get(key, key) in glob:
                    continue
                value = evaluate_setting(f"{where}.{key}", setting, out_name, t)
                if value is not None:
                    glob[RENAMED.get(key, key)] = value
        mkey = tuple(sorted(glob.items(), key=lambda kv: kv[0]))
        if mkey not in methods:
            methods[mkey] = build_method(config.merge_method, glob)
        method = methods[mkey]
        # per-model parameters: the source's, the slice's, the top level's, under the input's name
        per_model: list[dict[str, Any]] = []
        for k, e in enumerate(sl.entries):
            if k == base_k:
                continue
            values: dict[str, Any] = {}
            for where, scope in ((f"{e.where}.parameters", e.parameters),
                                 (f"{sl.where}.parameters", sl.parameters), ("parameters", top)):
                for key, setting in scope.items():
                    if key not in per_model_keys or key in values:
                        continue
                    value = evaluate_setting(f"{where}.{key}", setting, reads[k][1], t)
                    if value is not None:
                        values[key] = value
            per_model.append(values)
        in_labels = [labels[e.source] for k, e in enumerate(sl.entries) if k != base_k]
        pkey = (id(method), tuple(tuple(sorted(d.items())) for d in per_model), tuple(in_labels))
        if pkey not in params_cache:
            params_cache[pkey] = resolve_model_params(method, per_model, in_labels)
        jobs.append(TensorJob(out_name, inputs, base, method, params_cache[pkey]))

    before = _PRE if pre is None else pre
    for name in [n for n in ref.others if before.search(n)]:
        job(name, {k: name for k in range(len(slices[0].entries))}, slices[0], 0.0)
    out_layer = 0
    layer_sources: list[int] = []
    for sl in slices:
        lead = next((e for e in sl.entries if e.is_base), sl.entries[0])
        for offset in range(sl.length):
            layer_sources.append(lead.start + offset)
            t = offset / (sl.length - 1) if sl.length > 1 else 1.0
            # this layer's tensors in its sources (not layer 0's: T5 has relative_attention_bias in
            # block 0 only); a tensor that some source lacks is refused in job()
            rests = dict.fromkeys(r for e in sl.entries for r in structures[e.source].layers.get(e.start + offset, {}))
            for rest in rests:
                rest_of = {}
                for k, e in enumerate(sl.entries):
                    st = structures[e.source]
                    rest_of[k] = st.layers.get(e.start + offset, {}).get(rest, f"{st.prefix}{e.start + offset}.{rest}")
                job(f"{ref.prefix}{out_layer}.{rest}", rest_of, sl, t)
            out_layer += 1
    for name in [n for n in ref.others if not before.search(n)]:
        job(name, {k: name for k in range(len(slices[-1].entries))}, slices[-1], 0.0)
    filters = [f for where, scope in _scopes(config, slices) for key, s in scope.items()
               for f in _filters(f"{where}.{key}", s)]
    unmatched = [(w, f) for w, f in dict.fromkeys(filters) if not any(f in n for n in all_names)]
    for where, f in unmatched:
        warnings.warn(f"{where}: filter {f!r} matches no tensor of the models", RuntimeWarning, stacklevel=2)
    return PlannedMerge(jobs, out_layer, unmatched, [sl.length for sl in slices], layer_sources)


def _check_keys(config: Any, method_cls: Any, slices: list[_Slice]) -> None:
    """Refuse every unknown parameter key at once, each named as the config writes it."""
    per_model = set(getattr(method_cls, "model_params", {}))
    glob = {k.rstrip("_") if k.endswith("_") else k for k in _init_keys(method_cls)}
    takes = ", ".join(sorted(glob)) + (f" (per model: {', '.join(sorted(per_model))})" if per_model else "")
    problems: list[str] = []
    scopes = [("parameters", dict(config.parameters))] + [(f"{sl.where}.parameters", sl.parameters) for sl in slices]
    for where, scope in scopes:
        for key in scope:
            if key in IGNORED or key in per_model or key in glob:
                continue
            close = difflib.get_close_matches(key, sorted(glob | per_model), n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{where}.{key}: merge method {config.merge_method!r} has no parameter {key!r}{hint}")
    seen: set[tuple[str, str]] = set()
    for sl in slices:
        for e in sl.entries:
            for key in e.parameters:
                if key in per_model or key in IGNORED or key in glob or (e.label, key) in seen:
                    continue
                seen.add((e.label, key))
                known = ", ".join(sorted(per_model)) or "none"
                problems.append(f"model {e.label}: method {method_cls.__name__} has no per-model parameter "
                                f"{key!r} (it takes: {known})")
    if len(problems) == 1:
        raise ConfigError(f"{problems[0]}; it takes: {takes}")
    if problems:
        raise ConfigError(f"{len(problems)} unknown parameters: {'; '.join(problems)}; "
                          f"{config.merge_method} takes: {takes}")
    # every value as written, before any is interpolated: per-model numbers against their ranges,
    # global values against the constructor's types (its range checks run when it is built)
    from polytask.registry import check_params

    bad: list[str] = []
    for where, scope, label in ([(w, sc, None) for w, sc in scopes]
                                + [(e.where, e.parameters, e.label) for sl in slices for e in sl.entries]):
        for key, setting in scope.items():
            if key in IGNORED or (label is not None and key not in per_model):
                continue
            shown = f"model {label}: parameters.{key}" if label else f"{where}.{key}"
            for leaf in _leaves(f"{where}.{key}", setting):
                try:
                    if key in per_model:
                        checks.model_param(shown, key, leaf)
                    else:
                        check_params(method_cls, {RENAMED.get(key, key): leaf}, "", prefix=where)
                except ConfigError as exc:
                    if str(exc) not in bad:
                        bad.append(str(exc))
                    break
    if bad:
        raise ConfigError("; ".join(bad))


def _leaves(where: str, setting: Any) -> list[Any]:
    conds = _conditions(where, setting)
    if conds is not None:
        return [v for c in conds for v in _leaves(where, c["value"])]
    return list(setting) if isinstance(setting, list) else [setting]


def _init_keys(method_cls: Any) -> set[str]:
    return set(inspect.signature(method_cls).parameters)


def _scopes(config: Any, slices: list[_Slice]) -> list[tuple[str, dict[str, Any]]]:
    out = [("parameters", dict(config.parameters))]
    for sl in slices:
        out.append((f"{sl.where}.parameters", sl.parameters))
        out.extend((f"{e.where}.parameters", e.parameters) for e in sl.entries)
    return out


def _check_gradients(scope: Mapping[str, Any], where: str, slices: list[_Slice]) -> None:
    for key, setting in scope.items():
        for w, n in _gradients(f"{where}.{key}", setting):
            for sl in slices:
                if n > max(sl.length, 1):
                    e = sl.entries[0]
                    raise ConfigError(
                        f"{w}: a gradient of {n} values does not fit the {sl.length} layer(s) of {sl.where} "
                        f"(model {e.label} layers [{e.start}, {e.start + sl.length})); give at most "
                        f"{max(sl.length, 1)} values, got {n}")


def _slices(config: Any, method_cls: Any, source_of: Mapping[str, int], structures: list[Structure],
            check_gradient_fit: bool = True) -> list[_Slice]:
    requires_base = method_cls.requires_base or method_cls.optional_base
    base = config.base_model
    out: list[_Slice] = []
    if config.slices is None:
        entries = []
        for k, m in enumerate(config.models):
            i = source_of[m.model]
            is_base = requires_base and base is not None and _same(m.model, base)
            entries.append(_Entry(i, 0, dict(m.parameters), f"models[{k}]", is_base, structures[i].label))
        if base is not None and not any(_same(m.model, base) for m in config.models):
            # mergekit adds an unlisted base to the inputs of every method: as the base where the method
            # uses one, else as one more model (karcher averages it in; linear weighs it by weight)
            i = source_of[base]
            entries.append(_Entry(i, 0, {}, "base_model", requires_base, structures[i].label))
        n = {structures[e.source].num_layers for e in entries}
        if len(n) > 1:
            counts = ", ".join(f"{structures[e.source].label}: {structures[e.source].num_layers}" for e in entries)
            raise MergeError(f"models have different numbers of layers ({counts}); use slices: to pick layer ranges")
        out.append(_Slice(entries, n.pop(), {}, "models"))
    else:
        for s_i, sl in enumerate(config.slices):
            where = f"slices[{s_i}]"
            sbase = sl.base_model or base
            entries = []
            for k, src in enumerate(sl.sources):
                i = source_of[src.model]
                st = structures[i]
                start, end = src.layer_range
                sw = f"{where}.sources[{k}]"
                if not (0 <= start < end <= st.num_layers):
                    raise ConfigError(f"{sw}.layer_range: [{start}, {end}] is outside model {st.label}'s "
                                      f"{st.num_layers} layers (a range [start, end) with 0 <= start < end <= "
                                      f"{st.num_layers}), got [{start}, {end}]")
                is_base = requires_base and sbase is not None and _same(src.model, sbase)
                entries.append(_Entry(i, start, dict(src.parameters), sw, is_base, st.label))
            lengths = {e.where: src.layer_range[1] - src.layer_range[0] for e, src in zip(entries, sl.sources)}
            if len(set(lengths.values())) > 1:
                shown = ", ".join(f"{w}: {n}" for w, n in lengths.items())
                raise ConfigError(f"{where}.sources: every source of a slice needs the same number of layers, got {shown}")
            if method_cls.requires_base and sbase is not None and not any(e.is_base for e in entries):
                raise ConfigError(f"{where}: base_model {sbase!r} is not one of its sources; add it with a layer_range")
            out.append(_Slice(entries, next(iter(lengths.values())), dict(sl.parameters), where))
    if not out or not out[0].entries:
        raise ConfigError("no models to merge")
    per_model_keys = set(getattr(method_cls, "model_params", {}))
    global_keys = _init_keys(method_cls)
    for sl in out:
        for e in sl.entries:
            for key in e.parameters:
                if key in per_model_keys or key in IGNORED:
                    continue
                if RENAMED.get(key, key) in global_keys:  # mergekit reads global keys only from slices and the top
                    warnings.warn(f"{e.where}.parameters.{key}: {key!r} is a global parameter of "
                                  f"{config.merge_method}; per model it is ignored (as mergekit does); set it "
                                  "under the top-level parameters", RuntimeWarning, stacklevel=3)
                    continue
        n_inputs = sum(not e.is_base for e in sl.entries)
        try:
            _check_counts(method_cls, n_inputs, any(e.is_base for e in sl.entries))
        except ConfigError as exc:
            raise ConfigError(f"{sl.where}: {exc}") from None
        if not check_gradient_fit:
            continue
        for e in sl.entries:
            _check_gradients(e.parameters, f"{e.where}.parameters", [sl])
        _check_gradients(sl.parameters, f"{sl.where}.parameters", [sl])
    return out


def output_config(path: str | os.PathLike[str] | None, num_layers: int, dtype: torch.dtype | None,
                  layer_sources: Sequence[int] | None = None) -> str | None:
    """The reference model's ``config.json`` with ``num_hidden_layers`` set to the output's
    count and its ``layer_types`` (see :func:`set_layer_count`) following the output's layers
    (None if it has no such file or nothing changes)."""
    if path is None:
        return None
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict) or cfg.get("num_hidden_layers") is None:
        return None
    if not set_layer_count(cfg, "num_hidden_layers", num_layers, layer_sources):
        return None
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    return json.dumps(cfg, indent=2) + "\n"


#: ``config.json`` lists with one entry per layer (transformers 5 checks ``layer_types``' length;
#: Llama 4's ``no_rope_layers`` flags), and lists of layer numbers (Llama 4's MoE layers, Mllama's
#: cross-attention layers: a layer holding cross_attn.* tensors must stay one to load them;
#: Qwen2.5-VL's vision blocks with full attention, the others windowed).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
LAYER_NUMBER_KEYS = ("moe_layers", "cross_attention_layers", "fullatt_block_indexes")
#: Lists of the layers whose outputs feed a projector, one projector input each (Qwen3-VL's
#: deepstack mergers, Mllama's intermediate vision states): their length is fixed by the weights,
#: so they are kept, with a warning where the output's layers there are not the source's.
TAPPED_LAYER_KEYS = ("deepstack_visual_indexes", "intermediate_layers_indices")


def set_layer_count(node: dict[str, Any], key: str, count: int, layer_sources: Sequence[int] | None) -> bool:
    """Set ``node[key]`` to ``count`` and make the per-layer lists beside it follow the output's
    layers: output layer ``i`` comes from layer ``layer_sources[i]`` and keeps its entry of
    :data:`PER_LAYER_KEYS` (attention type, RoPE flag) and its membership of
    :data:`LAYER_NUMBER_KEYS` (an MoE layer stays one, so its expert tensors load). mergekit sets
    the count only: transformers 5 refuses a ``layer_types`` of another length, and a wrong
    ``moe_layers`` expects experts where there are none. True if anything changed."""
    changed = node.get(key) != count
    node[key] = count
    if layer_sources is None or len(layer_sources) != count:
        return changed
    for name in PER_LAYER_KEYS:
        old = node.get(name)
        if isinstance(old, list) and old:
            # a source layer past the reference's list (a deeper donor): the list's pattern repeated
            new = [old[j % len(old)] for j in layer_sources]
            changed |= new != old
            node[name] = new
    for name in LAYER_NUMBER_KEYS:
        old = node.get(name)
        if isinstance(old, list) and all(isinstance(j, int) for j in old):
            members = set(old)
            new = [i for i, j in enumerate(layer_sources) if j in members]
            changed |= new != old
            node[name] = new
    for name in TAPPED_LAYER_KEYS:
        tapped = node.get(name)
        if not isinstance(tapped, list):
            continue
        came = [layer_sources[j] if isinstance(j, int) and 0 <= j < count else None for j in tapped]
        if came != tapped:
            warnings.warn(f"{name}: the output's layers {tapped} come from the source's layers {came} (None: no "
                          "such layer); the list is kept (its length is the projector's): correct the config",
                          RuntimeWarning, stacklevel=2)
    return changed
