"""PLE/CGC expert banks that keep their own widths (Tang, Liu, Zhao, Gong, "Progressive Layered
Extraction (PLE)", RecSys 2020).

A PLE built with ``bank_widths`` (:class:`polytask.nn.moe.PLE`) has one bank per task
(``levels.L.task_experts.I``) and the shared bank (``levels.L.shared_experts``), each with its own
hidden widths, the same in every level. Pruning prunes a bank's hidden depth ``K`` as one layer
tied over the levels: ``levels.*.task_experts.I.layers.K`` or ``levels.*.shared_experts.layers.K``
(every level's bank is built from the same widths, so a unit index goes from every level at once,
as before; see :mod:`polytask.prune.graph`). So PAGCP can cut task b's experts harder than the
shared ones.

A run trained without ``bank_widths`` (one stacked bank of every task's specific experts) is
first rebuilt in that form with its own widths (:func:`banked_copy`: the stacked weights sliced
per task, the same function), then pruned; the pruned run's config records ``bank_widths``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor, nn

from polytask.nn.layers import BatchedLinear

_STACKED = re.compile(r"^(levels\.\d+)\.specific_experts\.(.+)$")


def is_banked(model: nn.Module) -> bool:
    """Whether every task's specific experts are a bank of their own (``bank_widths`` given)."""
    return getattr(model.levels[0], "task_experts", None) is not None


def hidden_patterns(model: nn.Module, depths: list[int]) -> list[str]:
    """The tied layer names of a banked PLE: each bank's layers at ``depths`` (indices into its
    ``layers``), task banks first, then the shared bank."""
    level = model.levels[0]
    banks = [f"task_experts.{i}" for i in range(len(level.task_experts))]
    if level.shared_experts is not None:
        banks.append("shared_experts")
    return [f"levels.*.{bank}.layers.{k}" for bank in banks for k in depths]


def bank_widths(model: nn.Module) -> dict[str, list[int]]:
    """``model.params.bank_widths`` of a banked PLE: each bank's hidden widths (output width left out)."""
    level = model.levels[0]

    def hidden(bank: nn.Module) -> list[int]:
        return [m.out_features for m in bank.layers if isinstance(m, BatchedLinear)][:-1]

    widths = {name: hidden(bank) for name, bank in zip(model.task_names, level.task_experts)}
    if level.shared_experts is not None:
        widths["shared"] = hidden(level.shared_experts)
    return widths


def banked_state(state: dict[str, Tensor], num_tasks: int) -> dict[str, Tensor]:
    """A stacked PLE's state dict in the banked layout: ``levels.L.specific_experts.X`` (``T · S``
    experts, task-major) becomes ``levels.L.task_experts.I.X`` (task ``I``'s ``S`` experts)."""
    out = {}
    for key, value in state.items():
        match = _STACKED.match(key)
        if match is None:
            out[key] = value
            continue
        level, rest = match.groups()
        for i, part in enumerate(value.chunk(num_tasks, dim=0)):
            out[f"{level}.task_experts.{i}.{rest}"] = part.clone()
    return out


def banked_copy(model: nn.Module, build: Callable[[dict[str, list[int]]], nn.Module]) -> nn.Module:
    """``model`` (a stacked PLE/CGC) rebuilt with one bank per task at its own widths and its weights:
    ``build(bank_widths)`` builds the model from its config with ``bank_widths`` added."""
    level = model.levels[0]
    stacked = level.specific_experts
    hidden = [m.out_features for m in stacked.layers if isinstance(m, BatchedLinear)][:-1]
    widths = {name: list(hidden) for name in model.task_names}
    if level.shared_experts is not None:
        widths["shared"] = list(hidden)
    banked = build(widths)
    banked.load_state_dict(banked_state(model.state_dict(), len(model.task_names)))
    return banked.train(model.training)
