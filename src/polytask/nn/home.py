"""HoME: hierarchy of multi-gate experts with expert normalisation, feature gates and self-gates.

Wang, Cao, Fu, Gai, Zhou, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at
Kuaishou", arXiv:2408.05430 (2024).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.nn.base import TaskHeads, check_positive, check_widths
from polytask.nn.embedding import FeatureSpec, input_layer
from polytask.nn.layers import BatchedLinear, BatchedMLP, mix_experts
from polytask.nn.moe import RoutedModel, per_task
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


class NormalizedExperts(nn.Module):
    """``n`` experts whose outputs are batch-normalised per expert and passed through Swish.

    HoME's "expert normalisation & Swish": aligning the experts' output distributions keeps a gate
    from favouring an expert merely for its scale, and Swish avoids ReLU's all-zero outputs.
    """

    def __init__(self, n: int, in_dim: int, hidden: Sequence[int], activation: str = "silu") -> None:
        super().__init__()
        hidden = tuple(hidden)
        self.mlp = BatchedMLP(n, in_dim, hidden[:-1], hidden[-1], act=activation)  # last layer linear
        self.norm = nn.BatchNorm1d(n * hidden[-1])
        self.n, self.out_dim = n, hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(x)  # (n, B, H)
        b = y.shape[1]
        y = self.norm(y.transpose(0, 1).reshape(b, -1)).reshape(b, self.n, self.out_dim).transpose(0, 1)
        return F.silu(y)


class FeatureGate(nn.Module):
    """Per-expert input gate ``x ⊙ 2·sigmoid(B A x)`` with low-rank ``A`` (d→r), ``B`` (r→d).

    HoME's feature-gate privatises each expert's input. ``B`` starts small (std 0.01), so every
    gate starts close to 1 (near the identity) while both factors receive gradients.
    """

    def __init__(self, n: int, dim: int, rank: int) -> None:
        super().__init__()
        self.down = BatchedLinear(n, dim, rank, bias=False)
        self.up = BatchedLinear(n, rank, dim, bias=False)
        nn.init.normal_(self.up.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return x * 2.0 * torch.sigmoid(self.up(self.down(x)))


class HoMELevel(nn.Module):
    """One HoME level: a bank of normalised experts, each reading one input stream, and gated outputs.

    Output ``o`` reads stream ``out_streams[o]``; its softmax gate weighs the experts listed in
    ``allowed[o]`` and its self-gate adds ``Σ_j sigmoid(s_o(x))_j E_j`` over its own experts
    ``own[o]`` (HoME's self-gate, a gated residual path to the output's own experts). With
    ``global_output`` a softmax gate over all experts, reading stream 0, adds a global output
    in front. Experts run as one batched op, gates of all outputs as one.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], expert_streams: Sequence[int], out_streams: Sequence[int],
                 allowed: Sequence[Sequence[int]], own: Sequence[Sequence[int]], global_output: bool, rank: int) -> None:
        super().__init__()
        n, o = len(expert_streams), len(out_streams)
        self.num_experts = n
        self.register_buffer("expert_streams", torch.tensor(list(expert_streams)), persistent=False)
        self.register_buffer("out_streams", torch.tensor(list(out_streams)), persistent=False)
        self.register_buffer("allowed", torch.tensor([list(a) for a in allowed]), persistent=False)
        self.register_buffer("own", torch.tensor([list(a) for a in own]), persistent=False)
        self.feature_gate = FeatureGate(n, in_dim, rank) if rank > 0 else None
        self.experts = NormalizedExperts(n, in_dim, hidden)
        self.gates = BatchedLinear(o, in_dim, self.allowed.shape[1])
        self.self_gates = BatchedLinear(o, in_dim, self.own.shape[1])
        self.global_gate = nn.Linear(in_dim, n) if global_output else None

    def forward(self, streams: Tensor) -> tuple[Tensor, Tensor]:
        inputs = streams[self.expert_streams]  # (n, B, d)
        if self.feature_gate is not None:
            inputs = self.feature_gate(inputs)
        experts = self.experts(inputs)  # (n, B, H)
        gate_in = streams[self.out_streams]  # (O, B, d)
        o, b = gate_in.shape[:2]
        gates = torch.softmax(self.gates(gate_in), dim=-1)
        selfg = torch.sigmoid(self.self_gates(gate_in))
        weights = gates.new_zeros(o, b, self.num_experts)
        weights = weights.scatter(2, self.allowed.unsqueeze(1).expand(-1, b, -1), gates)
        weights = weights.scatter_add(2, self.own.unsqueeze(1).expand(-1, b, -1), selfg)
        if self.global_gate is not None:  # global output first, all outputs mixed in one op
            weights = torch.cat([torch.softmax(self.global_gate(streams[0]), dim=-1).unsqueeze(0), weights])
        return mix_experts(weights, experts), gates

    def task_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.gates.parameters(), self.self_gates.parameters())


@ARCHITECTURES.register("home")
class HoME(RoutedModel):
    """Hierarchy of multi-gate experts (Wang et al. 2024).

    Tasks are grouped into categories (``task_groups``, e.g. passive vs interactive behaviours in
    the paper). Level 1 (meta): global meta experts and per-category meta experts; each category
    gets a gated mixture of the global and its own meta experts (plus a self-gated residual of its
    own), and a global gate over all meta experts forms the global stream. Level 2 (tasks): global
    experts read the global stream, a category's experts and its tasks' experts read that
    category's stream; task ``t``'s gate weighs the global, its category's and its own experts,
    and a self-gate adds its own experts. This is the paper's hierarchy mask. All experts are
    normalised (batch norm + Swish) and every expert reads a feature-gated private copy of its
    input (``feature_gate_rank=0`` turns feature gates off).

    The paper describes these mechanisms without every detail; where it is silent (the self-gate
    form, feature gates starting near 1, one category by default) the choices above are ours.

    Parameters: experts (in one bank per level), feature gates and level-1 gates are shared; the
    level-2 task gates, self-gates and towers are task-specific. ``gate_weights[task]``: the task's
    level-2 softmax gate ``(B, shared + group + task experts)`` in that order; ``shared_features``:
    per-task level-2 outputs ``(T, B, H)``.

    Args:
        input_dim: dense width or a FeatureSpec;
        task_groups: lists of task names, every task in exactly one (default: one group of all);
        shared_experts: global experts per level (>= 0); group_experts: experts per category and
        level (>= 1); task_experts: experts per task (>= 1); expert: hidden widths of each expert;
        feature_gate_rank: rank of the feature gates (0: none); tower, activation, dropout.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task],
                 task_groups: Sequence[Sequence[str]] | None = None, shared_experts: int = 1, group_experts: int = 1,
                 task_experts: int = 1, expert: Sequence[int] = (64,), feature_gate_rank: int = 8,
                 tower: Sequence[int] = (32,), activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__(tasks)
        k0, k1, k2 = shared_experts, group_experts, task_experts
        check_positive("shared_experts", k0, minimum=0)
        check_positive("group_experts", k1)
        check_positive("task_experts", k2)
        check_positive("feature_gate_rank", feature_gate_rank, minimum=0)
        expert = check_widths("expert", expert)
        group_of = self._groups(task_groups)
        g, t = max(group_of) + 1, len(self.tasks)
        self.input = input_layer(input_dim)
        d, h = self.input.output_dim, expert[-1]
        glob = list(range(k0))
        cat = [[k0 + c * k1 + j for j in range(k1)] for c in range(g)]
        self.meta = HoMELevel(d, expert, [0] * (k0 + g * k1), [0] * g,
                              [glob + cat[c] for c in range(g)], cat, global_output=True, rank=feature_gate_rank)
        base = k0 + g * k1
        mine = [[base + i * k2 + j for j in range(k2)] for i in range(t)]
        self.task_level = HoMELevel(
            h, expert, [0] * k0 + [1 + c for c in range(g) for _ in range(k1)] + [1 + group_of[i] for i in range(t)
                                                                                  for _ in range(k2)],
            [1 + group_of[i] for i in range(t)], [glob + cat[group_of[i]] + mine[i] for i in range(t)], mine,
            global_output=False, rank=feature_gate_rank)
        self.heads = TaskHeads(self.tasks, h, check_widths("tower", tower, True), activation, dropout)

    def _groups(self, task_groups: Sequence[Sequence[str]] | None) -> list[int]:
        if task_groups is None:
            return [0] * len(self.tasks)
        group_of: dict[str, int] = {}
        for c, members in enumerate(task_groups):
            for name in members:
                if name not in self.task_names:
                    raise ConfigError(f"model.params.task_groups: unknown task {name!r}; tasks: {', '.join(self.task_names)}")
                if name in group_of:
                    raise ConfigError(f"model.params.task_groups: task {name!r} is in more than one group")
                group_of[name] = c
        missing = [n for n in self.task_names if n not in group_of]
        if missing:
            raise ConfigError(f"model.params.task_groups: task(s) {', '.join(map(repr, missing))} in no group")
        if any(not members for members in task_groups):
            raise ConfigError("model.params.task_groups: empty group")
        return [group_of[n] for n in self.task_names]

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.heads.parameters(), self.task_level.task_parameters())

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.input(x)
        streams, _ = self.meta(h.unsqueeze(0))  # (1 + G, B, H): global, then categories
        out, gates = self.task_level(streams)  # (T, B, H)
        self.gate_weights = per_task(self.task_names, gates)
        self.shared_features = out
        return self.read_heads(out)
