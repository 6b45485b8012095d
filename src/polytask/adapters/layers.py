"""Adapter layers, one class per method, and the method names ``apply`` takes.

Every layer computes ``y = base(x) + scaling * delta(x)`` with ``scaling = alpha / rank`` and its
``B`` factors initialised to zero, so a freshly wrapped model gives exactly the base model's
outputs. Per-task and per-expert factors are stacked along a leading dimension and run with
``einsum``/``bmm``: no Python loop over tasks or experts in a forward pass. The family lives in
:mod:`._base` (task context, routing helpers, base class), :mod:`.lora` (per-task modules) and
:mod:`.routed` (token routers).
"""

from __future__ import annotations

from polytask.adapters._base import AdapterLinear, TaskContext, load_balancing_loss, topk_gates
from polytask.adapters.lora import POLY_EPS, LoRALinear, MTLoRALinear, PolyLinear
from polytask.adapters.routed import (ArrowLinear, HydraLoRALinear, LoRAMoELinear, MoLoRALinear, SMoRALinear,
                                     localized_balancing_loss)

__all__ = ["AdapterLinear", "TaskContext", "load_balancing_loss", "topk_gates", "POLY_EPS", "LoRALinear",
           "MTLoRALinear", "PolyLinear", "ArrowLinear", "HydraLoRALinear", "MoLoRALinear", "SMoRALinear",
           "LoRAMoELinear", "localized_balancing_loss",
           "METHODS", "ALIASES"]

METHODS: dict[str, type[AdapterLinear]] = {
    "lora": LoRALinear, "mtlora": MTLoRALinear, "hydralora": HydraLoRALinear, "molora": MoLoRALinear,
    "smora": SMoRALinear, "loramoe": LoRAMoELinear, "poly": PolyLinear, "mhr": PolyLinear, "arrow": ArrowLinear,
}
ALIASES = {"hydra_lora": "hydralora", "mo_lora": "molora", "lora_moe": "loramoe", "mt_lora": "mtlora"}
