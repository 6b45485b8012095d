"""DSelect-k: differentiable selection of k experts per task.

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong, Chi, "DSelect-k: Differentiable
Selection in the Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from polytask.errors import ConfigError
from polytask.nn.base import TaskHeads, check_positive, check_widths
from polytask.nn.embedding import FeatureSpec, input_layer
from polytask.nn.layers import BatchedLinear, BatchedMLP, mix_experts
from polytask.nn.moe import RoutedModel, per_task
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The smooth-step function of Hazimeh et al. (2021, eq. 4; also Hazimeh et al., "The Tree
    Ensemble Layer", ICML 2020): 0 below ``-γ/2``, 1 above ``γ/2``, and the cubic
    ``-2/γ³ t³ + 3/(2γ) t + 1/2`` in between (continuously differentiable)."""
    cubic = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


def binary_codes(num_experts: int) -> Tensor:
    """``(n, m)`` bool: row ``i`` is the binary encoding of expert ``i``, ``m = ⌈log2 n⌉``."""
    m = max(1, math.ceil(math.log2(num_experts)))
    return (torch.arange(num_experts).unsqueeze(1) >> torch.arange(m)) & 1 == 1


@ARCHITECTURES.register("dselect_k", "dselectk")
class DSelectK(RoutedModel):
    """Multi-task mixture of experts with per-example DSelect-k gates.

    Each task's gate has ``k`` single-expert selectors. Selector ``i`` maps the input to
    ``z_i ∈ R^m`` (``m = ⌈log2 n⌉``) and selects expert ``j`` with weight
    ``r(z_i)_j = Π_l [S(z_i,l) if bit l of j is 1 else 1 - S(z_i,l)]`` (S = :func:`smooth_step`);
    the gate is ``q = Σ_i softmax(α)_i r(z_i)`` with ``α`` also read from the input. As the
    selectors become binary, each task uses at most ``k`` experts. The entropy of every selector
    is the regulariser of the paper that pushes selectors to binary: after forward,
    ``aux_loss = entropy_weight · mean_batch Σ_{task, selector} H(r(z_i))``; the Trainer adds it.

    When ``n`` is not a power of two, only the ``n`` valid codes are evaluated and each selector is
    renormalised over them (our choice; the paper assumes ``n = 2^m``), so the gate always sums
    to 1 and a binary selector still picks exactly one expert.

    Parameters: experts are shared; every task's selectors and tower are task-specific.
    ``gate_weights[task]``: ``q`` ``(B, n)``; ``shared_features``: per-task mixtures ``(T, B, H)``.

    Args:
        input_dim: dense width or a FeatureSpec.
        num_experts: n (>= 2); k: selectors per task (1 <= k <= n);
        gamma: width of smooth-step's transition; entropy_weight: weight of the entropy term;
        expert, tower, activation, dropout: as in :class:`~polytask.nn.moe.MMoE`.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], num_experts: int = 8, k: int = 2,
                 gamma: float = 1.0, entropy_weight: float = 1e-3, expert: Sequence[int] = (64,),
                 tower: Sequence[int] = (32,), activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__(tasks)
        check_positive("num_experts", num_experts, minimum=2)
        check_positive("k", k)
        if k > num_experts:
            raise ConfigError(f"model.params.k ({k}) cannot exceed model.params.num_experts ({num_experts})")
        if gamma <= 0:
            raise ConfigError(f"model.params.gamma must be > 0, got {gamma}")
        expert = check_widths("expert", expert)
        self.input = input_layer(input_dim)
        d = self.input.output_dim
        t = len(self.tasks)
        self.k, self.gamma, self.entropy_weight = k, float(gamma), float(entropy_weight)
        self.register_buffer("codes", binary_codes(num_experts), persistent=False)
        m = self.codes.shape[1]
        self.experts = BatchedMLP(num_experts, d, expert, act=activation, dropout=dropout)
        self.selectors = BatchedLinear(t, d, k * m)  # z of every selector of every task
        self.selector_weights = BatchedLinear(t, d, k)  # α
        self.heads = TaskHeads(self.tasks, expert[-1], check_widths("tower", tower, True), activation, dropout)
        self.aux_loss: Tensor | None = None

    def task_gate_modules(self) -> list:
        return [self.selectors, self.selector_weights]

    def gates(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(q (T, B, n), single-expert selections r (T, B, k, n))`` for the embedded input ``h``."""
        t, b = len(self.tasks), h.shape[0]
        z = self.selectors(h).reshape(t, b, self.k, 1, -1)  # (T, B, k, 1, m)
        s = smooth_step(z, self.gamma)
        r = torch.where(self.codes, s, 1.0 - s).prod(dim=-1)  # (T, B, k, n)
        if self.codes.shape[0] < 2 ** self.codes.shape[1]:  # n not a power of two
            r = r / r.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        alpha = torch.softmax(self.selector_weights(h), dim=-1)  # (T, B, k)
        return torch.einsum("tbk,tbkn->tbn", alpha, r), r

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.input(x)
        experts = self.experts(h)
        q, r = self.gates(h)
        entropy = -(r * torch.log(r.clamp_min(1e-12))).sum(dim=-1)  # (T, B, k)
        self.aux_loss = self.entropy_weight * entropy.sum(dim=(0, 2)).mean()
        mixed = mix_experts(q, experts)
        self.gate_weights = per_task(self.task_names, q)
        self.shared_features = mixed
        return self.read_heads(mixed)
