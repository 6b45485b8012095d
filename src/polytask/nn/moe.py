"""Mixture-of-experts architectures: OMoE, MMoE, CGC and PLE.

Experts of one layer are stacked into one :class:`~polytask.nn.layers.BatchedMLP` (one batched
matmul per layer for all experts), gates of all tasks into one :class:`BatchedLinear`, and the
per-task mixture is a single ``einsum``; nothing loops over experts or tasks.

After each forward a routed model exposes

- ``gate_weights``: ``{task: Tensor (B, E_task)}``, the softmax gate of each task (of the last
  extraction level for PLE), for :func:`polytask.nn.diagnostics.expert_usage`;
- ``shared_features``: the per-task expert mixtures ``(T, B, H)`` that the towers read (task
  ``t``'s loss depends only on slice ``t``); OMoE, whose single gate is shared, exposes ``(B, H)``.

Which parameters are shared: experts (and the input embeddings) are shared; a task's gate and
tower are task-specific, since no other task's loss depends on them (Ma et al. 2018 call the
gates "task-specific"). In CGC/PLE a task's gates (every level) and its specific experts of the
*last* level are task-specific too; specific experts of lower PLE levels feed the shared gate, so
every task depends on them. Per-task modules are stacked in one tensor across tasks (slice ``t``
serves task ``t``), as in :class:`~polytask.nn.base.TaskHeads`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.nn.base import MultiTaskModel, TaskHeads, check_positive, check_widths  # noqa: F401  (re-exported)
from polytask.nn.embedding import FeatureSpec, input_layer
from polytask.nn.layers import BatchedLinear, BatchedMLP, mix_experts
from polytask.nn.ragged import RaggedBanks
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


def per_task(names: Sequence[str], stacked: Tensor) -> dict[str, Tensor]:
    """``{name: stacked[i]}`` for a tensor stacked over tasks in dim 0 (views, no copy)."""
    return dict(zip(names, stacked.unbind(0)))


class RoutedModel(MultiTaskModel):
    """A multi-task model with task gates; gates count as task-specific parameters.

    Subclasses keep their task gates in ``self.task_gate_modules()`` and set ``gate_weights``.
    """

    gate_weights: dict[str, Tensor]

    def task_gate_modules(self) -> list[nn.Module]:
        """Modules whose parameters belong to individual tasks (besides ``heads``)."""
        return []

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.heads.parameters(), *(m.parameters() for m in self.task_gate_modules()))


@ARCHITECTURES.register("mmoe")
class MMoE(RoutedModel):
    """Multi-gate mixture-of-experts.

    Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD 2018. ``y_t = h_t(Σ_e g_t(x)_e f_e(x))`` with
    ``g_t(x) = softmax(W_t x + b_t)``: shared experts ``f_e``, one linear softmax gate (the paper's
    ``W_t x``; we add a bias, as torch-rechub does) and one tower per task.

    Args:
        input_dim: dense width or a :class:`~polytask.nn.embedding.FeatureSpec`.
        tasks: the tasks; one gate and one tower each.
        num_experts: number of shared experts.
        expert: hidden widths of each expert MLP (activation after every layer); the last width is
            the width of the mixture the towers read.
        tower: hidden widths of each task tower.
        activation, dropout: of experts and towers.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], num_experts: int = 8,
                 expert: Sequence[int] = (64,), tower: Sequence[int] = (32,), activation: str = "relu",
                 dropout: float = 0.0) -> None:
        super().__init__(tasks)
        check_positive("num_experts", num_experts)
        expert = check_widths("expert", expert)
        self.input = input_layer(input_dim)
        d = self.input.output_dim
        self.num_experts = num_experts
        self.experts = BatchedMLP(num_experts, d, expert, act=activation, dropout=dropout)
        self.gates = BatchedLinear(len(self.tasks), d, num_experts)
        self.heads = TaskHeads(self.tasks, expert[-1], check_widths("tower", tower, True), activation, dropout)

    def task_gate_modules(self) -> list[nn.Module]:
        return [self.gates]

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.input(x)
        experts = self.experts(h)  # (E, B, H)
        gates = torch.softmax(self.gates(h), dim=-1)  # (T, B, E)
        mixed = mix_experts(gates, experts)
        self.gate_weights = per_task(self.task_names, gates)
        self.shared_features = mixed
        return self.read_heads(mixed)


@ARCHITECTURES.register("omoe")
class OMoE(MultiTaskModel):
    """One-gate mixture-of-experts: the baseline of Ma et al., KDD 2018 (§4.2 "OMoE").

    ``y_t = h_t(Σ_e g(x)_e f_e(x))``: the experts and the single gate are shared by all tasks, so
    ``shared_features`` is the one mixture ``(B, H)``. ``gate_weights`` maps every task to the same
    ``(B, E)`` gate. Arguments as in :class:`MMoE`.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], num_experts: int = 8,
                 expert: Sequence[int] = (64,), tower: Sequence[int] = (32,), activation: str = "relu",
                 dropout: float = 0.0) -> None:
        super().__init__(tasks)
        check_positive("num_experts", num_experts)
        expert = check_widths("expert", expert)
        self.input = input_layer(input_dim)
        d = self.input.output_dim
        self.experts = BatchedMLP(num_experts, d, expert, act=activation, dropout=dropout)
        self.gate = nn.Linear(d, num_experts)
        self.heads = TaskHeads(self.tasks, expert[-1], check_widths("tower", tower, True), activation, dropout)

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.input(x)
        experts = self.experts(h)
        gate = torch.softmax(self.gate(h), dim=-1)  # (B, E)
        mixed = mix_experts(gate, experts)
        self.gate_weights = {n: gate for n in self.task_names}
        self.shared_features = mixed
        return self.read_heads(mixed)


class ExtractionLevel(nn.Module):
    """One layer of task-specific and shared experts with gates (CGC, one PLE level, one AdaTT level).

    Task-specific experts (``specific`` per task, task-major order) form one BatchedMLP, shared
    experts (``shared``) another; gate weights index the experts as ``[task 0's specific, ...,
    task T-1's specific, shared]``. Input is ``(B, d)`` (every expert and gate reads it) or
    ``(T+1, B, d)`` (stream ``t`` for task ``t``, stream ``T`` the shared one).

    Gates: ``scope="own"`` gives task ``t``'s gate its own specific experts and the shared ones
    (CGC/PLE); ``scope="all"`` lets it weigh every expert (AdaTT). With ``shared_output`` a shared
    gate over all experts produces the shared stream for the next level (PLE, AdaTT-sp); without
    it the level returns ``T`` streams, and a ``(T, B, d)`` input (no shared stream) is accepted
    when there are no shared experts.
    ``native`` adds AdaTT's learnable linear combination of the task's own experts.
    ``task_hidden`` (one list per task) and ``shared_hidden`` give a bank its own hidden widths (the
    widths before the output width ``hidden[-1]``, which every bank keeps: the gates mix it): each
    task's specific experts are then a bank of their own, ``task_experts[t]``, instead of one
    stacked ``specific_experts`` bank, and all banks run together through
    :class:`~polytask.nn.ragged.RaggedBanks` (a GEMM or a bmm per width group and depth, no loop
    over tasks). This is how a pruned PLE (``polytask prune``) is described.

    Returns ``(outputs (T[+1], B, H), task gates (T, B, width))``.
    """

    def __init__(self, num_tasks: int, specific: int, shared: int, in_dim: int, hidden: Sequence[int],
                 activation: str = "relu", dropout: float = 0.0, shared_output: bool = False,
                 scope: str = "own", native: bool = False, task_hidden: Sequence[Sequence[int]] | None = None,
                 shared_hidden: Sequence[int] | None = None) -> None:
        super().__init__()
        t, s, k = num_tasks, specific, shared
        self.num_tasks, self.specific, self.shared, self.scope = t, s, k, scope
        self.num_experts = t * s + k
        out = tuple(hidden)[-1]
        if task_hidden is None:
            self.specific_experts = BatchedMLP(t * s, in_dim, hidden, act=activation, dropout=dropout) if s else None
            self.task_experts = None
        else:
            self.specific_experts = None
            self.task_experts = nn.ModuleList(BatchedMLP(s, in_dim, [*widths, out], act=activation, dropout=dropout)
                                              for widths in task_hidden)
        shared_widths = hidden if shared_hidden is None else [*shared_hidden, out]
        self.shared_experts = BatchedMLP(k, in_dim, shared_widths, act=activation, dropout=dropout) if k else None
        # every bank in a few batched ops (index tables only, no parameters)
        self.ragged = RaggedBanks() if task_hidden is not None else None
        self.out_dim = tuple(hidden)[-1]
        width = s + k if scope == "own" else self.num_experts
        self.task_gates = BatchedLinear(t, in_dim, width)
        self.shared_gate = nn.Linear(in_dim, self.num_experts) if shared_output else None
        self.native = nn.Parameter(torch.ones(t, s)) if native else None

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that each serve one task: specific experts, task gates, native combinations."""
        parts = [self.task_gates.parameters()]
        if self.specific_experts is not None:
            parts.append(self.specific_experts.parameters())
        if self.task_experts is not None:
            parts.append(self.task_experts.parameters())
        if self.native is not None:
            parts.append(iter([self.native]))
        return chain(*parts)

    def _experts(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Outputs of the specific experts ``(T*S, B, H)`` and of the shared experts ``(K, B, H)``."""
        t, s = self.num_tasks, self.specific
        specific = shared = None
        if self.specific_experts is not None:
            if x.ndim == 2:
                specific = self.specific_experts(x)
            else:  # task i's experts read stream i: (T, B, d) -> (T*S, B, d)
                streams = x[:t].unsqueeze(1).expand(-1, s, -1, -1).reshape(t * s, *x.shape[1:])
                specific = self.specific_experts(streams)
        elif self.task_experts is not None:  # banks of their own widths, shared bank included
            banks = [*self.task_experts, *([self.shared_experts] if self.shared_experts is not None else [])]
            everything = self.ragged(x if x.ndim == 2 else x[: len(banks)], banks)
            specific = everything[: t * s]
            return specific, (everything[t * s:] if self.shared_experts is not None else None)
        if self.shared_experts is not None:
            shared = self.shared_experts(x if x.ndim == 2 else x[t])
        return specific, shared

    def _mix_all(self, weights: Tensor, specific: Tensor | None, shared: Tensor | None) -> Tensor:
        """Mix with weights over all experts ``(..., B, T*S + K)`` without concatenating the banks."""
        ts = self.num_tasks * self.specific
        out = mix_experts(weights[..., :ts], specific) if specific is not None else None
        if shared is not None:
            mixed = mix_experts(weights[..., ts:], shared)
            out = mixed if out is None else out + mixed
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        specific, shared = self._experts(x)
        task_in = x if x.ndim == 2 else x[: self.num_tasks]
        gates = torch.softmax(self.task_gates(task_in), dim=-1)  # (T, B, width)
        if self.scope == "own":  # task t mixes its own S experts and the shared ones
            t, s = self.num_tasks, self.specific
            b, h = gates.shape[1], specific.shape[-1] if specific is not None else shared.shape[-1]
            out = (gates[..., :s].permute(2, 0, 1).unsqueeze(-1)
                   * specific.reshape(t, s, b, h).transpose(0, 1)).sum(dim=0) if specific is not None else None
            if shared is not None:
                mixed = mix_experts(gates[..., s:], shared)
                out = mixed if out is None else out + mixed
        else:
            weights = gates if self.native is None else gates + self._native_weights().unsqueeze(1)
            out = self._mix_all(weights, specific, shared)
        if self.shared_gate is not None:  # the shared stream for the next level
            shared_in = x if x.ndim == 2 else x[self.num_tasks]
            stream = self._mix_all(torch.softmax(self.shared_gate(shared_in), dim=-1), specific, shared)
            out = torch.cat([out, stream.unsqueeze(0)])
        return out, gates

    def _native_weights(self) -> Tensor:
        """``(T, E_all)``: task t's native weights at its own experts' positions, zeros elsewhere."""
        t, s = self.num_tasks, self.specific
        eye = torch.eye(t, dtype=self.native.dtype, device=self.native.device)
        own = (eye.unsqueeze(-1) * self.native.unsqueeze(0)).reshape(t, t * s)  # block-diagonal
        return torch.cat([own, own.new_zeros(t, self.shared)], dim=1)


def _bank_widths(banks: dict[str, Sequence[int]] | None, task_names: Sequence[str], shared: int,
                 expert: Sequence[int]) -> dict[str, tuple[int, ...]] | None:
    """``model.params.bank_widths`` checked: one list of ``len(expert) - 1`` widths per task (and
    ``shared`` when there are shared experts), nothing else."""
    if banks is None:
        return None
    if not isinstance(banks, dict):
        raise ConfigError(f"model.params.bank_widths must map each bank (shared, a task) to widths, got {banks!r}")
    names = [*task_names, *(["shared"] if shared else [])]
    if sorted(banks) != sorted(names):
        raise ConfigError(f"model.params.bank_widths needs exactly the banks {names}, got {sorted(banks)}")
    out = {}
    for name in names:
        out[name] = check_widths(f"bank_widths.{name}", banks[name], allow_empty=True)
        if len(out[name]) != len(expert) - 1:
            raise ConfigError(f"model.params.bank_widths.{name} needs one width per hidden expert layer "
                              f"({len(expert) - 1}: every expert width but the output's), got {list(banks[name])!r}")
    return out


@ARCHITECTURES.register("ple")
class PLE(RoutedModel):
    """Progressive Layered Extraction.

    Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL)
    Model for Personalized Recommendations", RecSys 2020. ``num_levels`` stacked extraction layers
    of task-specific and shared experts; a task's gate weighs its own experts and the shared ones;
    below the last level a shared gate over all experts feeds the shared experts of the next level.
    With ``num_levels=1`` it is CGC (Customized Gate Control, §4.1 of the same paper).

    Args:
        input_dim: dense width or a FeatureSpec.
        tasks: the tasks.
        num_levels: number of extraction layers (>= 1).
        specific_experts: experts per task in each level (>= 1).
        shared_experts: shared experts in each level (>= 0; with 0, CGC is single-task towers).
        expert: hidden widths of each expert MLP; every level uses them.
        tower, activation, dropout: as in :class:`MMoE`.
        bank_widths: the hidden widths (every ``expert`` width but the last) of one bank of experts
        in every level, by bank: ``shared`` and each task's name (all of them, when given). Left
        out, every bank has ``expert``'s; ``polytask prune`` writes it so that each bank keeps its
        own pruned widths (a task's specific experts then run as a bank of their own, see
        :class:`ExtractionLevel`).

    ``gate_weights[task]`` is the last level's gate ``(B, specific + shared)``, own experts first;
    ``level_gate_weights`` holds every level's ``(T, B, width)`` gates.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], num_levels: int = 2,
                 specific_experts: int = 1, shared_experts: int = 1, expert: Sequence[int] = (64,),
                 tower: Sequence[int] = (32,), activation: str = "relu", dropout: float = 0.0,
                 bank_widths: dict[str, Sequence[int]] | None = None) -> None:
        super().__init__(tasks)
        check_positive("num_levels", num_levels)
        check_positive("specific_experts", specific_experts)
        check_positive("shared_experts", shared_experts, minimum=0)
        expert = check_widths("expert", expert)
        banks = _bank_widths(bank_widths, self.task_names, shared_experts, expert)
        self.input = input_layer(input_dim)
        widths = [self.input.output_dim] + [expert[-1]] * num_levels
        self.levels = nn.ModuleList(
            ExtractionLevel(len(self.tasks), specific_experts, shared_experts, widths[i], expert, activation,
                            dropout, shared_output=i < num_levels - 1, scope="own",
                            task_hidden=None if banks is None else [banks[n] for n in self.task_names],
                            shared_hidden=None if banks is None else banks.get("shared"))
            for i in range(num_levels)
        )
        self.heads = TaskHeads(self.tasks, expert[-1], check_widths("tower", tower, True), activation, dropout)

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        # a task gate only feeds its own task's stream, at every level; the last level's specific
        # experts serve one task each, while lower levels' specific experts feed the shared gate
        return chain(self.heads.parameters(), self.levels[-1].task_parameters(),
                     *(level.task_gates.parameters() for level in self.levels[:-1]))

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.input(x)
        gates_per_level = []
        for level in self.levels:  # levels are sequential by design
            h, gates = level(h)
            gates_per_level.append(gates)
        self.level_gate_weights = gates_per_level
        self.gate_weights = per_task(self.task_names, gates_per_level[-1])
        self.shared_features = h
        return self.read_heads(h)


@ARCHITECTURES.register("cgc")
class CGC(PLE):
    """Customized Gate Control: PLE with one extraction level (Tang et al., RecSys 2020, §4.1).

    Arguments as in :class:`PLE` without ``num_levels``.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], specific_experts: int = 1,
                 shared_experts: int = 1, expert: Sequence[int] = (64,), tower: Sequence[int] = (32,),
                 activation: str = "relu", dropout: float = 0.0, bank_widths: dict[str, Sequence[int]] | None = None
                 ) -> None:
        super().__init__(input_dim, tasks, 1, specific_experts, shared_experts, expert, tower, activation, dropout,
                         bank_widths)
