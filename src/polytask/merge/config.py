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

- Computation is always float32. ``dtype`` is only the output dtype (``out_dtype``, if given,
  wins); mergekit computes in ``dtype``, so ``dtype: bfloat16`` there rounds intermediate
  results and can differ from ours in the last bits.
- ``dare_*``: ``rescale: true`` is the paper's ``1/density``; mergekit's is L1-norm matching,
  written ``rescale: l1`` here. Random masks come from ``seed`` (same seed, same output).
- TIES/Breadcrumbs: among exactly equal magnitudes at the trim threshold, the lowest indices
  are kept (mergekit: whatever an unstable sort gives).
- Parameters are scalars: per-layer gradients (lists) and ``filter`` dicts, ``slices`` and
  ``tokenizer_source`` other than ``base`` are not supported (ConfigError).
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
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from polytask.errors import ConfigError

__all__ = ["MergeConfig", "ModelEntry", "load_merge_config", "run_merge"]

# mergekit keys whose Python names differ, and keys accepted with no effect.
_RENAMED = {"lambda": "lambda_"}
_IGNORED = {"int8_mask"}


class ModelEntry(BaseModel):
    """One input model and its per-model parameters (``weight``, ``density``, ``gamma``...)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class MergeConfig(BaseModel):
    """A merge: the method, the base, the models and their parameters, the output format."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int = 0
    tokenizer_source: str | None = None
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

    @field_validator("tokenizer_source")
    @classmethod
    def _only_base_tokenizer(cls, value: str | None) -> str | None:
        if value not in (None, "base"):
            raise ValueError("only 'base' is supported (tokenizer and config are copied from the base)")
        return value

    def split_parameters(self, model_param_names: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Top-level parameters as (method parameters, defaults for every model)."""
        method: dict[str, Any] = {}
        defaults: dict[str, Any] = {}
        for key, value in self.parameters.items():
            if key in _IGNORED:
                continue
            if isinstance(value, (list, dict)):
                raise ConfigError(
                    f"parameters.{key}: per-layer lists and filters are not supported; use a number"
                )
            if key in model_param_names:
                defaults[key] = value
            else:
                method[_RENAMED.get(key, key)] = value
        return method, defaults

    def input_models(self, uses_base: bool = True) -> list[ModelEntry]:
        """The models to merge. For methods built on a base (task vectors, SLERP...), an entry of
        ``models`` that is the base is the base, not one more input (as in mergekit); methods
        without a base (``linear``) average every listed model."""
        if not uses_base or self.base_model is None:
            return list(self.models)
        base = os.path.normpath(self.base_model)
        return [m for m in self.models if os.path.normpath(m.model) != base]

    def with_paths_from(self, folder: str | os.PathLike[str]) -> MergeConfig:
        """A copy whose relative model paths are read from ``folder`` (the config file's) where
        they exist there; the others stay as given (relative to the working directory)."""

        def resolve(path: str) -> str:
            p = Path(path).expanduser()
            if p.is_absolute():
                return str(p)
            beside = Path(folder) / p
            return str(beside) if beside.exists() else str(p)

        return self.model_copy(update={
            "base_model": None if self.base_model is None else resolve(self.base_model),
            "models": [e.model_copy(update={"model": resolve(e.model)}) for e in self.models],
        })


def load_merge_config(path: str | os.PathLike[str]) -> MergeConfig:
    """Read and validate a merge config (YAML); ConfigError naming the file and key if bad."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read merge config {str(p)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a merge config must be a mapping with merge_method and models")
    if "slices" in raw:
        raise ConfigError(f"{p}: 'slices' is not supported; list whole models under 'models'")
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise ConfigError(f"{p}: {loc}: {err['msg']}") from None


def run_merge(
    config_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    allow_pickle: bool | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Run the merge described by the YAML file ``config_path`` into ``out_dir``.

    The output directory holds the merged safetensors (sharded with an index when large), the
    base's config/tokenizer files and ``polytask_merge.yaml`` (a copy of the config). Relative
    model paths are read from the config's folder when they exist there, else as given.
    ``allow_pickle`` (default: the config's) reads pickled ``.bin``/``.pt`` checkpoints with
    ``torch.load(weights_only=True)``; ``allow_nonfinite`` writes NaN/inf tensors with a warning
    instead of refusing. Errors are :class:`~polytask.errors.PolytaskError` subclasses naming the
    key, model or tensor.
    """
    from polytask.merge import checks
    from polytask.merge.engine import build_method, merge_checkpoints

    written = load_merge_config(config_path)
    config = written.with_paths_from(Path(config_path).parent)
    from polytask.merge.methods import MERGE_METHODS

    method_cls = MERGE_METHODS.lookup(config.merge_method)
    method_params, defaults = config.split_parameters(set(getattr(method_cls, "model_params", {})))
    for key, value in defaults.items():  # named as written (top level), not per model
        checks.model_param(f"parameters.{key}", key, value)
    method = build_method(config.merge_method, method_params)
    entries = config.input_models(uses_base=method_cls.requires_base)
    model_params = [{**defaults, **e.parameters} for e in entries]
    as_written = {id(e): w.model for e, w in zip(config.models, written.models)}
    labels = [as_written[id(e)] for e in entries]  # errors name the paths as the config writes them
    if method_cls.requires_base and written.base_model is not None:
        labels.append(written.base_model)
    return merge_checkpoints(
        method,
        [e.model for e in entries],
        config.base_model if method_cls.requires_base else None,
        out_dir,
        model_params=model_params,
        dtype=config.out_dtype or config.dtype,
        seed=config.seed,
        max_shard_size=config.max_shard_size,
        io_threads=config.io_threads,
        allow_pickle=config.allow_pickle if allow_pickle is None else allow_pickle,
        allow_nonfinite=allow_nonfinite,
        overwrite=overwrite,
        strict_dtypes=config.strict_dtypes,
        copy_files_from=config.base_model,
        labels=labels,
        extra_files={"polytask_merge.yaml": Path(config_path).read_text()},
        progress=progress,
    )
