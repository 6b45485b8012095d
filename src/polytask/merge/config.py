"""Merge configs: a pydantic model read from YAML, mergekit-compatible for the shared methods.

A config looks like mergekit's::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 1.0, density: 0.5}
      - model: ./code
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16

Differences from mergekit (everything else means the same):

- ``dtype`` is the compute dtype, as in mergekit: inputs are rounded to it, the task-arithmetic
  family (``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs*``, ``della*``) computes in
  it, ``linear``/``slerp`` compute in float32 from the rounded inputs, and the output is
  written in it (``out_dtype``, if given, wins). Without ``dtype`` each tensor is merged in its
  checkpoints' (promoted) dtype. ``compute_dtype: float32`` (polytask's key) computes in
  float32 whatever ``dtype`` says (then ``dtype`` is only the output dtype); ``compute_dtype:
  auto`` computes in the checkpoints' dtype. Deterministic
  methods give mergekit's bits for the same config; methods outside that list compute in
  float32 from the rounded inputs.
- ``slices:`` (``sources`` with ``layer_range``), per-layer gradients (``t: [0, 0.5, 1]``)
  and ``filter`` conditions follow mergekit; see :mod:`polytask.merge.plan`.
- A ``base_model`` not listed under ``models`` is an input of every method, as in mergekit: the
  base of the methods that use one, one more model for the others (``karcher``, ``linear``:
  weighted by the top-level ``weight``, default 1; mergekit requires that weight).
- ``dare_*``: ``rescale: true`` is the paper's ``1/density``; mergekit's is L1-norm matching,
  written ``rescale: l1`` here. Random masks come from ``seed`` (same seed, same output).
- TIES/Breadcrumbs: among exactly equal magnitudes at the trim threshold, the lowest indices
  are kept (mergekit: whatever an unstable sort gives).
- ``tokenizer_source`` (``base``, ``union`` or a model), the ``tokenizer:`` block and
  ``chat_template`` write a merged tokenizer and align the embedding/LM-head rows of models whose
  vocabularies differ, as mergekit; see :mod:`polytask.merge.tokenizer`.
- ``modules:`` (mergekit's modular form): ``default`` for a one-module model; each module of a
  vision-language or encoder-decoder model (``text_decoder``, ``vision_tower``, ``encoder``...
  as mergekit names them) with its own ``models``/``slices``; a module's ``parameters`` sit
  between the slice's and the top level's. The same names work on checkpoints in transformers
  5's key layout (``model.language_model.*``: Gemma 3, Mistral 3, Qwen2-VL/2.5-VL), which
  mergekit 0.1.5 refuses; inputs in another layout than the base are renamed to the base's.
  See :mod:`polytask.merge.modules`.
- A file of several YAML documents runs as ``mergekit-multi`` (``name:``; mega.yml's
  ``out_path:``); see :func:`run_merge`. A single document's ``name``/``out_path`` has no effect.
- Unknown keys are all named at once, as written. A global parameter given per model (``lambda``
  under a model) is ignored with a warning (mergekit ignores it silently). The old ``pattern:``
  of a condition is read as ``filter:`` with a warning (mergekit 0.1.5 ignores it, so the
  condition matches every tensor there).
- ``strict_dtypes`` (default true) refuses checkpoints whose dtypes differ, unless ``dtype`` or
  ``compute_dtype`` is given (every input is rounded to it, as in mergekit).
- ``int8_mask`` is accepted and ignored (a memory option with no effect on the result).
- Paths are local files or directories (no hub downloads). A relative path is read from the
  config file's folder when it exists there, else as given (from the working directory);
  mergekit reads it as given only.
- Every numeric parameter must be a finite number in its method's range (``density`` in
  (0, 1], ``weight`` finite, ``t`` in [0, 1]...); ``normalize`` by weights that sum to zero is
  refused; a merged tensor with NaN/inf values stops the merge (``--allow-nonfinite``: a warning).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from polytask.errors import ConfigError, MergeError

__all__ = ["MergeConfig", "ModelEntry", "SliceDef", "SliceSource", "load_merge_config", "load_merge_configs", "run_merge"]

# mergekit keys polytask does not implement yet, with what to do instead.
_UNSUPPORTED: dict[str, str] = {}


class _WithParameters(BaseModel):
    """A config node with a ``parameters:`` mapping (``parameters:`` left empty in YAML means none)."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class ModelEntry(_WithParameters):
    """One input model and its per-model parameters (``weight``, ``density``, ``gamma``...)."""

    model: str


class SliceSource(_WithParameters):
    """One source of an output slice: the layers ``[start, end)`` of a model."""

    model: str
    layer_range: tuple[int, int]


class SliceDef(_WithParameters):
    """An output slice: its sources (same number of layers each), base and parameters."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None


class ModelToken(BaseModel):
    """A token's row taken from a model's token (``token``) or row (``token_id``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_of_token_or_id(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token and token_id")
        return self


class ZeroToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["zero"]


class TokenSettings(BaseModel):
    """Where one token's embedding comes from (``force``: in every model, even those that have it)."""

    model_config = ConfigDict(extra="forbid")

    source: ModelToken | ZeroToken | str | None = None
    force: bool = False


class TokenizerBlock(BaseModel):
    """mergekit's ``tokenizer:`` block."""

    model_config = ConfigDict(extra="forbid")

    source: str = "union"
    tokens: dict[str, TokenSettings] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class ModuleDef(_WithParameters):
    """One module of mergekit's ``modules:`` form: its models or slices and parameters."""

    models: list[ModelEntry] | None = None
    slices: list[SliceDef] | None = Field(default=None, min_length=1)

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_entries(cls, value: Any) -> Any:
        return [{"model": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _models_or_slices(self) -> ModuleDef:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of models and slices")
        return self


def _condition_list(setting: Any) -> list[Any]:
    if isinstance(setting, dict):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        return list(setting)
    return [{"value": setting}]


class MergeConfig(BaseModel):
    """A merge: the method, the base, the models (or slices) and their parameters, the output format."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[SliceDef] | None = Field(default=None, min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    compute_dtype: str | None = None
    name: str | None = None  # mergekit-multi: the folder of this merge under the intermediate directory
    out_path: str | None = None  # mergekit-mega (mega.yml): this merge's folder, from the config's folder
    seed: int = 0
    tokenizer_source: str | None = None
    tokenizer: TokenizerBlock | None = None
    chat_template: str | None = None
    modules: dict[str, ModuleDef] | None = Field(default=None, min_length=1)
    _from_default_module: bool = PrivateAttr(default=False)
    max_shard_size: int | str = "5GB"
    allow_pickle: bool = False
    strict_dtypes: bool = True
    io_threads: int = Field(default=4, ge=1)

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_entries(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if [self.models, self.slices, self.modules].count(None) != 2:
            raise ValueError("give exactly one of models, slices and modules")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either tokenizer_source or tokenizer, not both")
        return self

    def without_modules(self) -> MergeConfig:
        """A config whose only module is ``default`` written with ``models``/``slices``
        (:meth:`module_config`); a config of several modules as it is (planned per module by
        :mod:`polytask.merge.modules`)."""
        if self.modules is None or list(self.modules) != ["default"]:
            return self
        out = self.module_config("default")
        out._from_default_module = True  # a multi-module model has no module 'default': refused when planned
        return out

    def module_config(self, name: str) -> MergeConfig:
        """Module ``name`` as a merge of its own: its ``models``/``slices``, its parameters before
        the top level's (a condition list that matches nothing falls through, as in mergekit)."""
        module = self.modules[name]
        params = dict(self.parameters)
        for key, setting in module.parameters.items():
            params[key] = _condition_list(setting) + (_condition_list(params[key]) if key in params else [])
        return self.model_copy(update={"modules": None, "models": module.models, "slices": module.slices,
                                       "parameters": params})

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    def with_paths_from(self, folder: str | os.PathLike[str]) -> MergeConfig:
        """A copy whose relative model paths are read from ``folder`` (the config file's) where
        they exist there; the others stay as given (relative to the working directory)."""

        def resolve(path: str) -> str:
            if "+" in path and not (Path(folder) / path).exists() and not Path(path).exists():
                model, _, adapter = path.rpartition("+")  # mergekit's model+lora
                if model:
                    return f"{resolve(model)}+{resolve(adapter)}"
            p = Path(path).expanduser()
            if p.is_absolute():
                return str(p)
            beside = Path(folder) / p
            return str(beside) if beside.exists() else str(p)

        def resolve_source(source: Any) -> Any:
            if isinstance(source, str):
                return source if source in ("base", "union") else resolve(source)
            if isinstance(source, ModelToken):
                return source.model_copy(update={"model": resolve(source.model)})
            return source

        tokenizer = self.tokenizer
        if tokenizer is not None:
            tokenizer = tokenizer.model_copy(update={
                "source": resolve_source(tokenizer.source),
                "tokens": None if tokenizer.tokens is None else {
                    t: v.model_copy(update={"source": resolve_source(v.source)}) for t, v in tokenizer.tokens.items()}})
        return self.with_models_mapped(resolve).model_copy(update={
            "tokenizer_source": resolve_source(self.tokenizer_source), "tokenizer": tokenizer})

    def with_models_mapped(self, fn: Any) -> MergeConfig:
        """A copy with ``fn`` applied to every model path (base, models, slices, in every module)."""

        def models(entries: list[ModelEntry] | None) -> list[ModelEntry] | None:
            return None if entries is None else [e.model_copy(update={"model": fn(e.model)}) for e in entries]

        def slices(defs: list[SliceDef] | None) -> list[SliceDef] | None:
            return None if defs is None else [
                sl.model_copy(update={
                    "base_model": None if sl.base_model is None else fn(sl.base_model),
                    "sources": [src.model_copy(update={"model": fn(src.model)}) for src in sl.sources],
                }) for sl in defs]

        return self.model_copy(update={
            "base_model": None if self.base_model is None else fn(self.base_model),
            "models": models(self.models),
            "slices": slices(self.slices),
            "modules": None if self.modules is None else {
                name: m.model_copy(update={"models": models(m.models), "slices": slices(m.slices)})
                for name, m in self.modules.items()},
        })

    def tokenizer_model(self) -> str | None:
        """The model whose tokenizer is the output's (``tokenizer_source: <model>``), if one is named."""
        source = self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source
        return None if source in (None, "base", "union") else source

    def model_paths(self) -> list[str]:
        """Every model the config names (base first), once each, as written."""
        paths = [] if self.base_model is None else [self.base_model]
        groups = [(self.models, self.slices)] + [(m.models, m.slices) for m in (self.modules or {}).values()]
        for models, slices in groups:
            for e in models or []:
                paths.append(e.model)
            for sl in slices or []:
                paths.extend([*([sl.base_model] if sl.base_model else []), *(src.model for src in sl.sources)])
        seen: dict[str, str] = {}
        for p in paths:
            seen.setdefault(os.path.normpath(p), p)
        return list(seen.values())


def _read_documents(p: Path) -> list[Any]:
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except OSError as exc:
        raise ConfigError(f"cannot read merge config {str(p)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
    return docs or [None]


def load_merge_config(path: str | os.PathLike[str]) -> MergeConfig:
    """Read and validate a merge config (YAML); ConfigError naming the file and key if bad."""
    p = Path(path)
    docs = _read_documents(p)
    if len(docs) > 1:
        raise ConfigError(f"{p}: holds {len(docs)} merges (YAML documents); use load_merge_configs or run_merge")
    return _validate(p, docs[0], "")


def load_merge_configs(path: str | os.PathLike[str]) -> list[MergeConfig]:
    """Every merge of a (multi-document, mergekit-multi style) YAML file, each validated; all the
    documents' errors are named at once (``document 2: ...``)."""
    p = Path(path)
    docs = _read_documents(p)
    out: list[MergeConfig] = []
    errors: list[str] = []
    for i, doc in enumerate(docs):
        try:
            out.append(_validate(p, doc, f"document {i + 1}: " if len(docs) > 1 else ""))
        except ConfigError as exc:
            errors.append(str(exc).removeprefix(f"{p}: "))
    if errors:
        raise ConfigError(f"{p}: {'; '.join(errors)}")
    return out


def _validate(p: Path, raw: Any, where: str) -> MergeConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: {where}a merge config must be a mapping with merge_method and models")
    try:
        return MergeConfig.model_validate(raw).without_modules()
    except ValidationError as exc:
        raise ConfigError(f"{p}: {where}{_all_errors(exc)}") from None


def _all_errors(exc: ValidationError) -> str:
    """Every validation error in one line, keys as the config writes them (``models[1].paramters``)."""
    unknown: list[str] = []
    other: list[str] = []
    for err in exc.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".") or "(top level)"
        if err["type"] == "extra_forbidden":
            unknown.append(f"{loc} ({_UNSUPPORTED[loc]})" if loc in _UNSUPPORTED else loc)
        elif f"{loc}: {err['msg']}" not in other:
            other.append(f"{loc}: {err['msg']}")
    parts = [f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"] if unknown else []
    return "; ".join(parts + other)


def run_merge(
    config_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    allow_pickle: bool | None = None,
    allow_nonfinite: bool = False,
    intermediate_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Run the merge(s) described by the YAML file ``config_path`` into ``out_dir``.

    A file of several YAML documents is run as ``mergekit-multi`` runs it: each document is a
    merge; one with a ``name`` is written to ``intermediate_dir/<name>`` (default: the folder
    ``<out_dir>.parts`` beside ``out_dir`` when one document has no name, else ``out_dir``
    itself) and later documents may use that name as a model; the one without a name is written
    to ``out_dir``. Merges run in dependency order; a named merge whose output exists is kept
    (mergekit's ``--lazy``) unless ``overwrite``, and only when its ``polytask_merge.yaml`` equals
    the document and none of the merges it uses was rebuilt in this run; otherwise it is rebuilt
    (ConfigError for one without that record). Every document is validated before any runs.

    The output directory holds the merged safetensors (sharded with an index when large), the
    base's config/tokenizer files and ``polytask_merge.yaml`` (a copy of the config). Relative
    model paths are read from the config's folder when they exist there, else as given.
    ``allow_pickle`` (default: the config's) reads pickled ``.bin``/``.pt`` checkpoints with
    ``torch.load(weights_only=True)``; ``allow_nonfinite`` writes NaN/inf tensors with a warning
    instead of refusing. Errors are :class:`~polytask.errors.PolytaskError` subclasses naming the
    key, model or tensor.
    """
    configs = load_merge_configs(config_path)
    if len(configs) == 1:
        return _run_one(configs[0], config_path, Path(config_path).read_text(), out_dir, overwrite=overwrite,
                        progress=progress, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    out = Path(out_dir)
    order, parts, uses = _multi_order(configs, config_path, out, intermediate_dir)
    result = out
    rebuilt: set[int] = set()
    for k in order:
        target = _target(configs[k], config_path, parts, out)
        cfg = _with_merge_names(configs[k], configs, parts)
        text = yaml.safe_dump(cfg.model_dump(exclude_defaults=True), sort_keys=False)
        replace = overwrite
        if target != out and not overwrite and target.is_dir() and any(target.glob("*.safetensors")):
            # mergekit-multi --lazy: an intermediate merge that exists is kept, but only when it was
            # made from this very document and from inputs that this run did not rebuild
            if _recorded_config(target, k, config_path) == text and not uses[k] & rebuilt:
                continue
            replace = True  # ours (it holds our record), made from another config: rebuilt
        done = _run_one(cfg, config_path, text, target, overwrite=replace, progress=progress,
                        allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
        rebuilt.add(k)
        result = done
    return result


def _recorded_config(target: Path, k: int, config_path: Any) -> str:
    """The config an existing intermediate merge was made from (its ``polytask_merge.yaml``).
    ConfigError when it has none: without it, whether it fits document ``k + 1`` is unknown."""
    try:
        return (target / "polytask_merge.yaml").read_text()
    except OSError:
        raise ConfigError(f"{config_path}: document {k + 1}'s output {str(target)!r} exists without the "
                          "polytask_merge.yaml it was made from; remove it or pass --overwrite") from None


def _target(cfg: MergeConfig, config_path: Any, parts: Path, out: Path) -> Path:
    """Where one document of a multi-document config is written."""
    if cfg.out_path is not None:
        p = Path(cfg.out_path).expanduser()
        return p if p.is_absolute() else Path(config_path).parent / p
    return parts / cfg.name if cfg.name is not None else out


def _multi_order(configs: list[MergeConfig], config_path: Any, out: Path,
                 intermediate_dir: Any) -> tuple[list[int], Path, dict[int, set[int]]]:
    """The order in which the documents run (each after the merges it uses), the folder of the
    named ones, and the merges each document uses (directly)."""
    names = [c.name for c in configs]
    unnamed = [i + 1 for i, c in enumerate(configs) if c.name is None and c.out_path is None]
    if len(unnamed) > 1:
        raise ConfigError(f"{config_path}: documents {', '.join(map(str, unnamed))} have no name; give every "
                          "merge but the final one a name (its folder under the intermediate directory)")
    dup = sorted({n for n in names if n is not None and names.count(n) > 1})
    if dup:
        raise ConfigError(f"{config_path}: name {dup[0]!r} is given to several documents; names must be unique")
    parts = Path(intermediate_dir) if intermediate_dir is not None else (
        out.with_name(out.name + ".parts") if unnamed else out)
    outs = {os.path.normpath(c.out_path): i for i, c in enumerate(configs) if c.out_path is not None}
    used = [[*c.model_paths(), *([c.tokenizer_model()] if c.tokenizer_model() else [])] for c in configs]
    uses = {i: {names.index(m) for m in used[i] if m in names}
            | {outs[os.path.normpath(m)] for m in used[i] if os.path.normpath(m) in outs}
            for i, c in enumerate(configs)}
    order: list[int] = []
    state: dict[int, int] = {}

    def visit(i: int, chain: list[int]) -> None:
        if state.get(i) == 2:
            return
        if state.get(i) == 1:
            loop = " -> ".join(str(names[j]) for j in [*chain, i])
            raise ConfigError(f"{config_path}: merges use each other in a loop ({loop})")
        state[i] = 1
        for j in sorted(uses[i]):
            visit(j, [*chain, i])
        state[i] = 2
        order.append(i)

    for i in range(len(configs)):
        visit(i, [])
    return order, parts, uses


def _with_merge_names(cfg: MergeConfig, configs: list[MergeConfig], parts: Path) -> MergeConfig:
    """``cfg`` with the names of other merges replaced by their output folders."""
    names = {c.name for c in configs if c.name is not None}

    def sub(path: str | None) -> str | None:
        return str(parts / path) if path in names else path

    tokenizer = cfg.tokenizer
    if tokenizer is not None:
        tokenizer = tokenizer.model_copy(update={"source": sub(tokenizer.source)})
    return cfg.with_models_mapped(sub).model_copy(update={"tokenizer_source": sub(cfg.tokenizer_source),
                                                          "tokenizer": tokenizer})


def _run_one(
    written: MergeConfig,
    config_path: str | os.PathLike[str],
    text: str,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool,
    progress: bool | None,
    allow_pickle: bool | None,
    allow_nonfinite: bool,
) -> Path:
    from polytask.merge.engine import merge_planned
    from polytask.merge.io import parse_dtype
    from polytask.merge.plan import output_config, plan_config

    config = written.with_paths_from(Path(config_path).parent)
    paths = config.model_paths()
    labels = written.model_paths()  # errors name the models as the config writes them
    source_of = _PathIndex({p: i for i, p in enumerate(paths)})
    base_i = None if config.base_model is None else source_of[config.base_model]
    roles = ["base model" if i == base_i else "input model" for i in range(len(paths))]
    out_dtype = config.out_dtype or config.dtype
    compute = config.compute_dtype or config.dtype or "auto"
    for key, value in (("dtype", config.dtype), ("out_dtype", config.out_dtype), ("compute_dtype", config.compute_dtype)):
        if value is not None and not (key == "compute_dtype" and value == "auto"):
            try:
                parse_dtype(value)
            except MergeError as exc:
                raise ConfigError(f"{config_path}: {key}: {exc}") from None
    reference = paths[base_i] if base_i is not None else paths[0]
    if "+" in reference:
        from polytask.merge.lora import split_lora_path

        split = split_lora_path(reference)  # mergekit's model+adapter: config and tokenizer of the model
        reference = split[0] if split is not None else reference
    extra = {"polytask_merge.yaml": text}

    vocab: dict[str, int] = {}

    def wrap_sources(sources):  # type: ignore[no-untyped-def]
        from polytask.merge.modules import same_naming
        from polytask.merge.tokenizer import prepare

        # inputs saved in another key layout (transformers 4 / 5) are read under the reference's names
        sources = same_naming(reference, sources, labels, 0 if base_i is None else base_i)
        wrapped, files, rows = prepare(config, written, sources, paths, labels, source_of, base_i)
        extra.update(files)
        if rows is not None:
            vocab["rows"] = rows
        return wrapped

    def plan_jobs(sources):  # type: ignore[no-untyped-def]
        dtype_out = None if out_dtype is None else parse_dtype(out_dtype)
        layout, planned_config = _modules_of(config, reference, sources[0 if base_i is None else base_i], config_path)
        if layout is not None:  # several modules: one plan each, one output
            from polytask.merge.modules import modules_output_config, plan_modules

            plans = plan_modules(planned_config, *layout, sources, source_of, labels)
            jobs = plans.jobs
            changed = modules_output_config(reference, plans.num_layers, layout[1], dtype_out,
                                            plans.layer_sources)
        else:
            planned = plan_config(config, sources, source_of, labels)
            jobs = planned.jobs
            changed = output_config(reference, planned.num_layers, dtype_out, planned.layer_sources)
        if changed is not None:
            extra["config.json"] = changed
        if "rows" in vocab:
            from polytask.merge.tokenizer import with_vocab_size

            resized = with_vocab_size(extra.get("config.json"), reference, vocab["rows"], dtype_out)
            if resized is not None:
                extra["config.json"] = resized
        return jobs

    return merge_planned(
        paths, labels, roles, plan_jobs, out_dir,
        dtype=out_dtype,
        compute_dtype=compute,
        seed=config.seed,
        max_shard_size=config.max_shard_size,
        io_threads=config.io_threads,
        allow_pickle=config.allow_pickle if allow_pickle is None else allow_pickle,
        allow_nonfinite=allow_nonfinite,
        overwrite=overwrite,
        copy_files_from=reference,
        extra_files=extra,
        progress=progress,
        wrap_sources=wrap_sources,
    )


def _modules_of(config: MergeConfig, reference: str, source: Any, config_path: Any) -> tuple[Any, MergeConfig]:
    """The reference model's modules (:func:`~polytask.merge.modules.layout_of`) when it has
    several, else None, and the config to plan; ConfigError for module names it does not have."""
    from polytask.merge.modules import layout_of, module_names_in_layout

    layout = layout_of(reference, source.names())
    if layout is not None and config.modules:
        # inferred modules are named by the reference's tensors; a name in another key layout
        # (transformers 4's language_model.model.layers for a 5.x checkpoint) means the same stack
        renamed = module_names_in_layout(*layout, config.modules, source.names())
        if renamed:
            seen: dict[str, str] = {}
            for k in config.modules:
                if (first := seen.setdefault(renamed.get(k, k), k)) != k:
                    raise ConfigError(f"{config_path}: modules.{k}: the same module as modules.{first} (in another "
                                      "key layout); give each module once")
            config = config.model_copy(update={"modules": {renamed.get(k, k): v for k, v in config.modules.items()}})
    if layout is None and config.modules is not None:
        bad = next(k for k in config.modules if k != "default")
        raise ConfigError(f"{config_path}: modules.{bad}: the model has one module, 'default' (several modules: "
                          "vision-language and encoder-decoder models, as mergekit defines or infers them)")
    if layout is not None and config._from_default_module:
        if "default" not in layout[1]:
            raise ConfigError(f"{config_path}: modules.default: {layout[0]} has no module 'default'; its modules "
                              f"are {', '.join(sorted(layout[1]))}")
        # the module 'default' of an inferred layout (the tensors outside the layers), parameters already merged
        default = ModuleDef(models=config.models, slices=config.slices)
        config = config.model_copy(update={"modules": {"default": default}, "models": None, "slices": None})
    return layout, config


class _PathIndex(dict):  # type: ignore[type-arg]
    """Model path -> checkpoint index, looked up by normalised path."""

    def __init__(self, items: dict[str, int]) -> None:
        super().__init__({os.path.normpath(k): v for k, v in items.items()})

    def __getitem__(self, key: str) -> int:
        return super().__getitem__(os.path.normpath(key))
