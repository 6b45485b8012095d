"""Run configuration: pydantic models loaded from YAML; every option has a working default."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from polytask.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Which data set: a built-in name (``synthetic``, ``digits``, ...) and its parameters."""

    name: str = "synthetic"
    params: dict[str, Any] = Field(default_factory=dict)
    tasks: list[str] | None = None  # train on these tasks only (default: all of the data set's)


class ModelConfig(_Strict):
    """Architecture name (see ``polytask.nn.ARCHITECTURES``) and its constructor parameters."""

    arch: str = "shared_bottom"
    params: dict[str, Any] = Field(default_factory=dict)


class BalancerConfig(_Strict):
    """Balancer name (see ``polytask.balance.names()``) and its parameters."""

    name: str = "ew"
    params: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0)  # sgd only


class SchedulerConfig(_Strict):
    """Learning-rate schedule, stepped once per epoch (``plateau`` on the validation score)."""

    name: Literal["none", "cosine", "step", "plateau"] = "none"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.5, gt=0)
    factor: float = Field(0.5, gt=0, lt=1)
    patience: int = Field(5, ge=0)
    min_lr: float = Field(0.0, ge=0)


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=1)
    eval_batch_size: int = Field(4096, ge=1)
    early_stopping: int | None = Field(10, ge=1)  # patience in epochs; None disables
    grad_clip: float | None = Field(None, gt=0)
    # more than one process (see train/dist.py); ignored at world size 1
    strategy: Literal["ddp", "fsdp"] = "ddp"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 adds a GradScaler (CUDA)
    accumulate: int = Field(1, ge=1)  # micro-batches per optimizer step (one update of K * batch_size rows)


class RunConfig(_Strict):
    """Everything one training run needs. ``out_dir`` receives the run directory."""

    name: str = "run"
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/{name}"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    balancer: BalancerConfig = Field(default_factory=BalancerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("out_dir")
    @classmethod
    def _out_dir_placeholders(cls, value: str) -> str:
        """Only ``{name}`` may appear in ``out_dir`` (``{{`` and ``}}`` for literal braces)."""
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc} (only {{name}} is replaced; write {{{{ and }}}} for braces)") from None
        bad = [f for f in fields if f != "name"]
        if bad:
            raise ValueError(f"{value!r}: unknown placeholder {{{bad[0]}}}; only {{name}} is replaced")
        if not value.format(name="x").strip():
            raise ValueError("must not be empty")
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir.format(name=self.name))


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}"
    return f"{source}: {key}: {err['msg']}"


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config mapping; ConfigError naming the first bad key."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config file, apply ``--set`` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return parse_config(apply_overrides(data, overrides or []), str(path))


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
