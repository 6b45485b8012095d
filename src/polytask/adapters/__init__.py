"""Multi-task adapters for pretrained models: wrap the ``nn.Linear`` layers of any module in place.

Methods (one class each in :mod:`polytask.adapters.layers`, paper in its docstring):
``lora`` (one LoRA per task), ``mtlora`` (shared + per-task LoRA), ``hydralora`` (shared A,
routed B heads), ``molora`` (top-k mixture of LoRA experts with a load-balancing loss), ``smora``
(each rank an expert, top-k rank-wise routing), ``loramoe`` (dense mixture of LoRA experts with
LoRAMoE's localized balancing constraint over expert groups and task types), ``poly`` / ``mhr``
(skill LoRAs mixed by a learned task-to-skill allocation, ``n_splits`` heads for MHR; PEFT's layout), ``arrow`` (zero-shot per-token
routing over a library of LoRAs by their top singular vectors; fill it with ``load_peft``)::

    from polytask import adapters, balance
    adapters.apply(model, "molora", tasks=["a", "b"], target_modules=["query", "value"], rank=8,
                   alpha=16, num_experts=4, top_k=2)
    adapters.set_task(model, "a")                  # or a (B,) tensor of task ids, one per sample
    out = model(x)
    losses = {...}
    balance.get("nash_mtl").backward(losses, shared=adapters.shared_parameters(model))
    adapters.save(model, "run/adapters")           # safetensors + adapter_config.json
    adapters.save_peft(model, "run/peft_a", task="a")   # method "lora": PEFT's format for one task

``polytask train`` runs these methods on a Hugging Face backbone (a local folder or an inline
config) with ``model.arch: adapters`` (:mod:`polytask.train.backbone`; data from
:mod:`polytask.data.sequences`; examples/adapters_*.yaml).

A ``(B,)`` task-id tensor is not range-checked (that would synchronise with the device): an id
outside ``0..T-1`` fails in indexing. ``target_modules`` follows PEFT: a string is a regular
expression matched in full against module names, a list matches a name equal to an entry or
ending in ``"." + entry``. After ``apply`` a wrapped layer's weights live under ``<name>.base.``:
save the adapters with :func:`save`, not the model's ``state_dict``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from polytask.adapters.layers import (ALIASES, METHODS, AdapterLinear, ArrowLinear, HydraLoRALinear, LoRALinear,
                                      LoRAMoELinear, MoLoRALinear, MTLoRALinear, PolyLinear, SMoRALinear, TaskContext,
                                      load_balancing_loss, localized_balancing_loss, topk_gates)
from polytask.errors import ConfigError

__all__ = [
    "apply", "unwrap", "set_task", "task_context", "set_token_mask", "shared_parameters", "task_parameters", "aux_loss",
    "expert_usage", "adapter_layers", "save", "load", "save_peft", "load_peft", "lora_similarity", "mbc_clusters",
    "task_vectors", "AdapterLinear", "LoRALinear", "MTLoRALinear", "HydraLoRALinear", "MoLoRALinear", "SMoRALinear",
    "PolyLinear", "ArrowLinear", "LoRAMoELinear", "TaskContext", "topk_gates", "load_balancing_loss",
    "localized_balancing_loss", "canonical_method", "is_routed_method", "method_of", "token_mask",
]

_ATTR = "_polytask_adapters"


def _matches(name: str, target: str | Sequence[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def canonical_method(method: str) -> str:
    """The registered name of ``method`` (aliases resolved); ConfigError naming an unknown method."""
    key = ALIASES.get(method, method) if isinstance(method, str) else method
    if key not in METHODS:
        raise ConfigError(f"adapters.method: unknown method {method!r}; known: {', '.join(METHODS)}")
    return key


def is_routed_method(method: str) -> bool:
    """Whether the method's layers route tokens over experts (they expose ``gate_weights``)."""
    return METHODS[canonical_method(method)].routed


def method_of(model: nn.Module) -> str:
    """The method ``apply`` wrapped ``model`` with."""
    return _state(model)["method"]


def token_mask(model: nn.Module) -> Tensor | None:
    """The padding mask set by :func:`set_token_mask` (None if none)."""
    return _state(model)["context"].token_mask


def apply(model: nn.Module, method: str, tasks: Sequence[str], target_modules: str | Sequence[str],
          rank: int = 8, alpha: float | None = None, **params: Any) -> nn.Module:
    """Wrap every matching ``nn.Linear`` of ``model`` in place, freeze all its other parameters.

    ``alpha`` defaults to ``rank`` (scaling 1). ``params`` go to the method's layer
    (``num_experts``, ``top_k``). Returns ``model``. ConfigError for an unknown method or task
    list, ``rank <= 0`` or larger than a layer, a ``top_k`` outside ``1..num_experts``, target
    modules that match no ``nn.Linear``, or a model already wrapped.
    """
    key = canonical_method(method)
    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"adapters.tasks: need distinct task names, got {tasks!r}")
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"adapters.rank: must be a positive integer, got {rank!r}")
    if hasattr(model, _ATTR):
        raise ConfigError("adapters.apply: the model already has adapters")
    cls = METHODS[key]
    takes = set(inspect.signature(cls.__init__).parameters) - {"self", "base", "context", "rank", "alpha"}
    unknown = sorted(set(params) - takes)
    if unknown:
        raise ConfigError(f"adapters.{unknown[0]}: method {key!r} takes no such parameter "
                          f"(it takes: {', '.join(sorted(takes)) or 'none'}), got {params[unknown[0]]!r}")
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if k in takes}
    effective = {**defaults, **params}
    if "num_experts" in effective and (not isinstance(effective["num_experts"], int) or effective["num_experts"] < 1):
        raise ConfigError(f"adapters.num_experts: must be a positive integer, got {effective['num_experts']!r}")
    if "top_k" in effective:
        # SMoRA routes over the ranks: its experts are the rank's R rows
        e, what = ((rank, "rank") if key == "smora" else (len(tasks), "the number of tasks (LoRAs)")
                   if key == "arrow" else (effective["num_experts"], "num_experts"))
        if not isinstance(effective["top_k"], int) or not 1 <= effective["top_k"] <= e:
            raise ConfigError(f"adapters.top_k: must be between 1 and {what}={e}, got {effective['top_k']!r}")
    alpha = float(rank if alpha is None else alpha)
    cls.check_tasks(tasks, **params)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and _matches(n, target_modules)]
    if not names:
        raise ConfigError(f"adapters.target_modules: {target_modules!r} matches no nn.Linear of the model")
    for n in names:
        lin = model.get_submodule(n)
        parent = model.get_submodule(n.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            # MultiheadAttention reads out_proj.weight directly (F.multi_head_attention_forward): a wrapper is bypassed
            raise ConfigError(f"adapters.target_modules: module {n!r} is the output projection of an "
                              f"nn.MultiheadAttention, which cannot be wrapped")
        if rank > min(lin.in_features, lin.out_features):
            raise ConfigError(f"adapters.rank: {rank} is larger than module {n!r} "
                              f"({lin.in_features} -> {lin.out_features}), got rank={rank}")
        cls.check(n, lin, rank, **params)
    for p in model.parameters():
        p.requires_grad_(False)
    context = TaskContext(tasks)
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        layer = cls(lin, context, rank, alpha, **params)
        layer.train(lin.training)                    # an eval()-mode model stays in eval mode (Poly samples in train)
        setattr(parent, child, layer)
    object.__setattr__(model, _ATTR, {"method": key, "tasks": tasks, "rank": rank, "alpha": alpha,
                                      "target_modules": target_modules, "modules": names, "params": dict(params),
                                      "context": context})
    return model


def unwrap(model: nn.Module, merge_task: str | None = None) -> nn.Module:
    """Put the original ``nn.Linear`` layers back, in place; with ``merge_task``, fold that task's LoRA in.

    ``merge_task`` (methods ``lora``/``mtlora``): ``W <- W0 + (alpha / r) B_t A_t`` (plus the shared
    ``B A`` for MTLoRA), so the plain model computes what the adapted one did for that task. The
    base's ``requires_grad`` flags stay off (``apply`` froze them). ConfigError for an unknown task
    or a routed method (its update depends on the input: nothing to fold).
    """
    state = _state(model)
    layers = adapter_layers(model)
    t = None
    if merge_task is not None:
        if state["method"] not in ("lora", "mtlora"):
            raise ConfigError(f"adapters.unwrap: merge_task needs a per-task LoRA ('lora', 'mtlora'), "
                              f"method {state['method']!r} routes per input")
        t = state["context"].resolve(merge_task)
    for name, layer in layers.items():
        if t is not None:
            with torch.no_grad():
                update = layer.lora_B[t] @ layer.lora_A[t]
                if isinstance(layer, MTLoRALinear):
                    update = update + layer.shared_B @ layer.shared_A
                layer.base.weight += layer.scaling * update
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    object.__delattr__(model, _ATTR)
    return model


def _state(model: nn.Module) -> dict[str, Any]:
    state = getattr(model, _ATTR, None)
    if state is None:
        raise ConfigError("adapters: the model has no adapters; call polytask.adapters.apply first")
    return state


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """The wrapped layers, by module name."""
    _state(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def set_task(model: nn.Module, task: str | int | Tensor | None) -> None:
    """Select the task(s) the next forward passes serve: a name, an index, or a ``(B,)`` id tensor."""
    context: TaskContext = _state(model)["context"]
    context.task = context.resolve(task)


@contextmanager
def task_context(model: nn.Module, task: str | int | Tensor) -> Iterator[None]:
    """``with task_context(model, "a"): out = model(x)``; restores the previous task afterwards."""
    context: TaskContext = _state(model)["context"]
    before = context.task
    context.task = context.resolve(task)
    try:
        yield
    finally:
        context.task = before


def set_token_mask(model: nn.Module, mask: Tensor | None) -> None:
    """Padding mask ``(B, L)`` (1 = token, 0 = padding) for the routers' load-balancing losses; None clears.

    Used by every routed layer whose input has ``B * L`` tokens (layers fed pooled ``(B, H)``
    features keep all their rows). Routing itself is per token and needs no mask.
    """
    context: TaskContext = _state(model)["context"]
    context.token_mask = mask


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable adapter parameters every task uses (the ``shared=`` of a gradient balancer)."""
    return [p for m in adapter_layers(model).values() for p in m.shared_parameters()]


def task_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable adapter parameters stacked per task (leading dimension = task index)."""
    return [p for m in adapter_layers(model).values() for p in m.task_parameters()]


def expert_usage(model: nn.Module) -> dict[str, Tensor]:
    """Mean gate weight per task and expert of the last forward, per routed layer: ``{module: (T, E)}``.

    Tokens belong to the task of their sample: the context's ``(B,)`` task ids (every token of
    sample ``b`` to ``ids[b]``), or the single task set for the batch. A task with no token in the
    batch gets a row of zeros. Runs on the device (``index_add``), no host synchronisation.
    """
    state = _state(model)
    context: TaskContext = state["context"]
    t = len(state["tasks"])
    out = {}
    for name, layer in adapter_layers(model).items():
        g = layer.gate_weights
        if g is None:
            continue
        task = context.task
        if isinstance(task, Tensor):
            if g.shape[0] % task.shape[0]:
                continue                      # a layer whose rows are not whole samples' tokens
            owner = task.to(g.device).repeat_interleave(g.shape[0] // task.shape[0])
        elif task is None:
            continue
        else:
            owner = torch.full((g.shape[0],), task, device=g.device, dtype=torch.long)
        sums = torch.zeros(t, g.shape[1], dtype=g.dtype, device=g.device).index_add_(0, owner, g)
        counts = torch.zeros(t, dtype=g.dtype, device=g.device).index_add_(0, owner, torch.ones_like(g[:, 0]))
        out[name] = sums / counts.clamp_min(1)[:, None]
    return out


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the load-balancing losses of the last forward pass (0 for methods without routing loss)."""
    layers = adapter_layers(model).values()
    losses = [m.aux_loss for m in layers if getattr(m, "aux_loss", None) is not None]
    if losses:
        return torch.stack(losses).sum()
    return torch.zeros((), device=next(iter(layers)).base.weight.device)


from polytask.adapters.io import load, load_peft, save, save_peft  # noqa: E402  (io needs apply)
from polytask.adapters.library import lora_similarity, mbc_clusters, task_vectors  # noqa: E402
