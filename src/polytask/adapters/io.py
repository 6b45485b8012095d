"""Saving and loading adapters alone: safetensors + ``adapter_config.json``; PEFT's LoRA format per task.

``save``/``load``: every trainable adapter tensor, keyed ``<module name>.<parameter>``, and a JSON
config (method, tasks, rank, alpha, wrapped module names, method parameters) from which ``load``
re-applies the same adapters to a fresh copy of the base model. ``save_peft``/``load_peft``: one
task's LoRA of a ``lora`` (or ``mtlora``, task-specific part) model as a PEFT ``LoraConfig``
adapter directory (``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight``
keys), which ``peft.PeftModel.from_pretrained`` loads onto the unwrapped base model.

Files are written atomically (a full disk leaves the previous files, and raises CheckpointError
naming the file), the weights before the config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from polytask import adapters as _api
from polytask.errors import CheckpointError, ConfigError
from polytask.train.checkpoint import atomic_write, atomic_write_text

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
FORMAT = 1


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict, weights: str) -> Path:
    atomic_write(path / weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG, json.dumps(config, indent=1))
    return path


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in _api.adapter_layers(model).items():
        for pname, p in layer.named_parameters(recurse=False):
            out[f"{name}.{pname}"] = p.detach().contiguous()
    return out


def save(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters of ``model`` (not the base) into the directory ``path``; returns it."""
    state = _api._state(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "method": state["method"], "tasks": state["tasks"], "rank": state["rank"],
              "alpha": state["alpha"], "modules": state["modules"], "params": state["params"]}
    return _write(path, {k: v.cpu() for k, v in _adapter_tensors(model).items()}, config, WEIGHTS)


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the adapters saved in ``path`` to ``model`` (the unwrapped base) and load their weights.

    CheckpointError naming the file for a missing or unreadable one, naming the tensor for a
    missing tensor or a shape mismatch (an adapter saved for a different base).
    """
    path = Path(path)
    config, tensors = _read(path, WEIGHTS, "adapters.load")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"adapters.load: {path / CONFIG} is not a polytask adapter config "
                              f"(format {config.get('format')!r}, expected {FORMAT})")
    missing = [m for m in config["modules"] if not isinstance(_get(model, m), nn.Linear)]
    if missing:
        raise CheckpointError(f"adapters.load: module {missing[0]!r} of {path} is not an nn.Linear of the model")
    _api.apply(model, config["method"], config["tasks"], [m for m in config["modules"]], config["rank"],
               config["alpha"], **config["params"])
    _copy_into(model, tensors, path / WEIGHTS)
    return model


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    own = dict(_api.adapter_layers(model))
    expected = {f"{n}.{p}": t for n, layer in own.items() for p, t in layer.named_parameters(recurse=False)}
    for key, param in expected.items():
        if key not in tensors:
            raise CheckpointError(f"adapters.load: tensor {key!r} missing from {file}")
        if tensors[key].shape != param.shape:
            raise CheckpointError(f"adapters.load: tensor {key!r} of {file} has shape {tuple(tensors[key].shape)}, "
                                  f"the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensors[key])


def _lora_layers(model: nn.Module, what: str, methods: tuple[str, ...] = ("lora", "mtlora")) -> dict[str, nn.Module]:
    state = _api._state(model)
    if state["method"] not in methods:
        raise ConfigError(f"adapters.{what}: takes methods {', '.join(map(repr, methods))} (PEFT's LoRA or "
                          f"Poly format), got method {state['method']!r}")
    return _api.adapter_layers(model)


def _save_peft_poly(model: nn.Module, path: Path) -> Path:
    layers = _api.adapter_layers(model)
    state = _api._state(model)
    first = next(iter(layers.values()))
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.poly_lora_A"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.poly_lora_B"] = layer.lora_B.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.poly_router.module_logits"] = layer.router.detach().cpu().contiguous()
    config = {"peft_type": "POLY", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "r": state["rank"], "poly_type": "poly", "n_tasks": len(state["tasks"]), "n_skills": first.n_skills,
              "n_splits": first.n_splits, "init_weights": True, "target_modules": list(layers),
              "modules_to_save": None}
    return _write(path, tensors, config, PEFT_WEIGHTS)


def save_peft(model: nn.Module, path: str | Path, task: str | None = None) -> Path:
    """Write adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``lora``/``mtlora``: task ``task``'s LoRA (for ``mtlora`` only the task-specific part: PEFT
    has no shared one). ``poly``/``mhr``: the whole model, all tasks (PEFT's ``PolyConfig``, task
    ids in the order of ``tasks``); ``task`` is not used. PEFT's Poly scales by ``1/r``: the
    same outputs need ``alpha=1`` here.
    """
    layers = _lora_layers(model, "save_peft", ("lora", "mtlora", "poly", "mhr"))
    state = _api._state(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if state["method"] in ("poly", "mhr"):
        return _save_peft_poly(model, path)
    if task is None:
        raise ConfigError(f"adapters.save_peft: method {state['method']!r} needs task= (one task per PEFT adapter)")
    t = state["context"].resolve(task)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[t].detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[t].detach().cpu().contiguous()
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "r": state["rank"], "lora_alpha": state["alpha"], "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "target_modules": list(layers), "modules_to_save": None}
    return _write(path, tensors, config, PEFT_WEIGHTS)


def load_peft(model: nn.Module, path: str | Path, task: str) -> nn.Module:
    """Load a PEFT LoRA adapter directory into task ``task``'s LoRA of a ``lora``/``mtlora``/``arrow`` model.

    CheckpointError naming the tensor for a shape mismatch (a PEFT adapter for a different base)
    or a wrapped module the adapter lacks; ConfigError if its ``lora_alpha / r`` scaling or rank
    differs from the model's.
    """
    layers = _lora_layers(model, "load_peft", ("lora", "mtlora", "arrow"))
    state = _api._state(model)
    t = state["context"].resolve(task)
    path = Path(path)
    config, tensors = _read(path, PEFT_WEIGHTS, "adapters.load_peft")
    if config.get("r") != state["rank"] or float(config.get("lora_alpha", 8)) != state["alpha"]:
        raise ConfigError(f"adapters.load_peft: {path / CONFIG} has r={config.get('r')}, "
                          f"lora_alpha={config.get('lora_alpha')}; the model has rank={state['rank']}, "
                          f"alpha={state['alpha']}")
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            key = next((k for k in (f"base_model.model.{name}.{part}.weight",
                                    f"base_model.model.{name}.{part}.default.weight") if k in tensors), None)
            if key is None:
                raise CheckpointError(f"adapters.load_peft: tensor for module {name!r} ({part}) missing from "
                                      f"{path / PEFT_WEIGHTS}")
            dest = getattr(layer, part)
            if tensors[key].shape != dest.shape[1:]:
                raise CheckpointError(f"adapters.load_peft: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                      f"module {name!r} expects {tuple(dest.shape[1:])}")
            with torch.no_grad():
                dest[t].copy_(tensors[key])
        if hasattr(layer, "refresh"):
            layer.refresh()                          # Arrow: the library changed, so do its prototypes
    return model


def _read(path: Path, weights: str, who: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of the adapter folder ``path``; CheckpointError naming it if either is unreadable."""
    try:
        return json.loads((path / CONFIG).read_text()), load_file(str(path / weights))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{who}: cannot read {path}: {exc}") from None
