"""Routed adapters: token-level routers over LoRA heads, experts, ranks or a library of LoRAs."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from polytask.adapters._base import AdapterLinear, TaskContext, _kaiming, load_balancing_loss, topk_gates
from polytask.adapters.lora import LoRALinear
from polytask.errors import ConfigError


class HydraLoRALinear(AdapterLinear):
    """One shared ``A``, ``E`` ``B`` heads, and a token-level softmax router over the heads.

    Tian et al., "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning",
    NeurIPS 2024, eq. 6: ``y = W0 x + sum_i w_i B_i A x`` with ``w = softmax(W_g x)``. All heads are
    computed together (``einsum`` over the stacked ``B: (E, out, r)``). Like the paper, the router
    needs no task label, so every parameter is shared by all tasks; the scaling ``alpha / r`` is
    PEFT's, which the authors' code also uses.
    """

    method = "hydralora"
    routed = True

    def __init__(self, base: nn.Linear, context: TaskContext, rank: int, alpha: float,
                 num_experts: int = 4) -> None:
        super().__init__(base, context, rank, alpha)
        self.num_experts = num_experts
        self.lora_A = nn.Parameter(_kaiming((rank, self.in_features), self.in_features).to(base.weight))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank).to(base.weight))
        self.router = nn.Parameter(_kaiming((num_experts, self.in_features), self.in_features).to(base.weight))

    def delta(self, x: Tensor) -> Tensor:
        w = torch.softmax(x @ self.router.T, dim=-1)           # (..., E)
        self.gate_weights = w.detach().reshape(-1, self.num_experts)
        h = x @ self.lora_A.T                                   # (..., r): the shared A, once
        return torch.einsum("...e,...r,eor->...o", w, h, self.lora_B)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B, self.router]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_experts={self.num_experts}"


class MoLoRALinear(AdapterLinear):
    """A mixture of ``E`` LoRA experts with top-k token routing and a load-balancing loss.

    Zadouri et al., "Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE
    for Instruction Tuning" (MoLoRA), arXiv 2023; Dou et al., "LoRAMoE: Alleviating World
    Knowledge Forgetting in Large Language Models via MoE-Style Plugin", ACL 2024, eq. 5-6:
    ``y = W0 x + s * sum_e g_e(x) B_e A_e x`` with ``g = topk(softmax(W_g x))``, renormalised.
    Experts are stacked, ``A: (E, r, in)``, ``B: (E, out, r)``, and run densely in two ``einsum``
    calls (the unselected experts' gates are 0). Departures: MoLoRA routes softly (``top_k=E``
    gives that); LoRAMoE's localized balancing constraint (expert groups weighted by a task-type
    label, :class:`LoRAMoELinear`) is replaced by the Switch-Transformer load-balancing loss
    (:func:`load_balancing_loss`),
    kept after each forward in ``aux_loss`` (sum them with ``polytask.adapters.aux_loss``).
    """

    method = "molora"
    routed = True

    def __init__(self, base: nn.Linear, context: TaskContext, rank: int, alpha: float,
                 num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__(base, context, rank, alpha)
        self.num_experts, self.top_k = num_experts, top_k
        self.lora_A = nn.Parameter(_kaiming((num_experts, rank, self.in_features), self.in_features).to(base.weight))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank).to(base.weight))
        self.router = nn.Parameter(_kaiming((num_experts, self.in_features), self.in_features).to(base.weight))
        self.aux_loss: Tensor | None = None

    def delta(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])                           # (N, in)
        gates, probs = topk_gates(flat @ self.router.T, self.top_k)  # (N, E)
        self.aux_loss = load_balancing_loss(gates, probs, self.context.mask_for(flat.shape[0]))
        self.gate_weights = gates.detach()
        h = torch.einsum("ni,eri->ner", flat, self.lora_A) * gates.unsqueeze(-1)   # (N, E, r)
        out = torch.einsum("ner,eor->no", h, self.lora_B)
        return out.reshape(*x.shape[:-1], self.out_features)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B, self.router]

    def __getstate__(self) -> dict:
        # the last forward's aux loss is a graph node: deepcopy/pickle of the model would refuse it
        state = self.__dict__.copy()
        state["aux_loss"] = None
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_experts={self.num_experts}, top_k={self.top_k}"


def localized_balancing_loss(gates: Tensor, sample_group: Tensor, expert_group: Tensor, delta: float,
                             mask: Tensor | None = None, form: str = "paper") -> Tensor:
    """LoRAMoE's localized balancing constraint ``L_lbc = sigma^2(Z) / mu(Z)``, ``Z = I o Q``.

    Dou et al., ACL 2024, eq. 7-9.

    ``gates``: ``(B, L, E)`` router weights of ``B`` samples' ``L`` tokens (``(B, E)`` for one
    vector per sample); ``Q[n, m] = sum_j G(x_j)_n`` over the real tokens ``j`` of sample ``m``
    (``mask`` ``(B, L)``, 0 = padding); ``I[n, m] = 1 + delta`` where expert ``n``'s group
    (``expert_group``, ``(E,)``) is sample ``m``'s type (``sample_group``, ``(B,)``), else
    ``1 - delta``. ``form="paper"``: ``sigma^2`` is the population variance over all ``E * B``
    entries, divided by the mean as in eq. 9; ``form="authors"``: the authors' code
    (Ablustrund/LoRAMoE, ``peft/tuners/lora.py``), the squared coefficient of variation
    ``var(Z) / (mean(Z)^2 + 1e-10)`` with the unbiased variance, and padding tokens counted in ``Q``
    (pass no ``mask`` to match it). Either form is 0 exactly when ``Z`` is uniform, i.e. when
    ``Q`` is proportional to ``1 / I``.
    """
    g = gates if gates.ndim == 3 else gates[:, None, :]
    if mask is not None:
        g = g * mask.reshape(g.shape[0], g.shape[1], 1).to(g.dtype)
    q = g.sum(1).T                                                          # (E, B)
    same = expert_group[:, None].to(sample_group.device) == sample_group[None, :]
    coeff = torch.tensor([1.0 - delta, 1.0 + delta], dtype=q.dtype, device=q.device)   # in q's precision
    z = coeff[same.long()] * q
    if form == "authors":
        return z.var() / (z.mean().square() + 1e-10)
    return z.var(unbiased=False) / z.mean()


class LoRAMoELinear(AdapterLinear):
    """LoRA experts mixed by a dense softmax router, with LoRAMoE's localized balancing constraint.

    Dou et al., "LoRAMoE: Alleviating World Knowledge Forgetting in Large Language Models via
    MoE-Style Plugin", ACL 2024. Eq. 5-6: ``o = W0 x + s sum_i G(x)_i B_i A_i x`` with
    ``G(x) = softmax(x W_g)`` over all ``E`` experts (no top-k). Sec. 3.2, eq. 7-9: the experts
    form groups, each sample has a type, ``Q[n, m]`` is expert ``n``'s summed router weight over
    sample ``m``'s tokens, ``I[n, m] = 1 + delta`` if expert ``n`` belongs to sample ``m``'s type
    and ``1 - delta`` otherwise, and ``L_lbc = sigma^2(I o Q) / mu(I o Q)`` (kept in ``aux_loss``
    after each forward; the training loss adds ``beta * L_lbc``). Here a sample's type is the group
    of its task (``task_groups[t]``, default: every task in group 0); the experts are split into
    consecutive equal groups unless ``expert_groups`` gives each expert's group. The paper has two
    groups (world knowledge and downstream tasks) and ``delta = 0.1``. Experts are stacked and run
    in two ``einsum`` calls as in :class:`MoLoRALinear`. With no task set the loss is not formed
    (``aux_loss = None``, e.g. at inference). The scaling ``alpha / r`` is PEFT's. The authors' code
    (Ablustrund/LoRAMoE) has two groups (first half of the experts for task type 1), sums the
    router weights over padding tokens too, and uses ``var / mean^2`` (``form="authors"``); the
    loss is minimal when ``I o Q`` is uniform, as both the paper's and the code's formulas read.

    Args:
        num_experts: ``E``.
        delta: the paper's ``delta`` in ``[0, 1)``.
        task_groups: the group (sample type) of each task, ``len(tasks)`` integers.
        expert_groups: the group of each expert, ``E`` integers covering ``0..G-1``.
        form: ``paper`` (eq. 9) or ``authors`` (their code's squared coefficient of variation),
            see :func:`localized_balancing_loss`.
    """

    method = "loramoe"
    routed = True

    def __init__(self, base: nn.Linear, context: TaskContext, rank: int, alpha: float, num_experts: int = 6,
                 delta: float = 0.1, task_groups: list[int] | None = None,
                 expert_groups: list[int] | None = None, form: Literal["paper", "authors"] = "paper") -> None:
        super().__init__(base, context, rank, alpha)
        task_groups, expert_groups = self.groups(len(context.tasks), num_experts, task_groups, expert_groups)
        if not 0.0 <= delta < 1.0:
            raise ConfigError(f"adapters.delta: must be in [0, 1), got {delta!r}")
        if form not in ("paper", "authors"):
            raise ConfigError(f"adapters.form: must be 'paper' or 'authors', got {form!r}")
        self.form = form
        self.num_experts, self.lbc_delta = num_experts, float(delta)   # not self.delta: the method
        self.register_buffer("task_group", torch.tensor(task_groups), persistent=False)
        self.register_buffer("expert_group", torch.tensor(expert_groups), persistent=False)
        self.lora_A = nn.Parameter(_kaiming((num_experts, rank, self.in_features), self.in_features).to(base.weight))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank).to(base.weight))
        self.router = nn.Parameter(_kaiming((num_experts, self.in_features), self.in_features).to(base.weight))
        self.aux_loss: Tensor | None = None

    @staticmethod
    def groups(t: int, num_experts: int, task_groups: list[int] | None,
               expert_groups: list[int] | None) -> tuple[list[int], list[int]]:
        """Each task's and each expert's group, checked (default: every task in group 0, experts split evenly)."""
        task_groups = [0] * t if task_groups is None else list(task_groups)
        if len(task_groups) != t or not all(isinstance(g, int) and g >= 0 for g in task_groups):
            raise ConfigError(f"adapters.task_groups: need one group index >= 0 per task ({t}), got {task_groups!r}")
        groups = max(task_groups) + 1 if expert_groups is None else max(expert_groups, default=-1) + 1
        if expert_groups is None:
            if groups > num_experts:
                raise ConfigError(f"adapters.task_groups: {groups} groups need at least as many experts, "
                                  f"got num_experts={num_experts}")
            expert_groups = [e * groups // num_experts for e in range(num_experts)]
        expert_groups = list(expert_groups)
        if (len(expert_groups) != num_experts or set(expert_groups) != set(range(groups))
                or max(task_groups) >= groups):
            raise ConfigError(f"adapters.expert_groups: need {num_experts} group indices covering 0..G-1 and every "
                              f"task group, got {expert_groups!r} (task_groups {task_groups!r})")
        return task_groups, expert_groups

    @classmethod
    def check_tasks(cls, tasks: list[str], **params: object) -> None:
        cls.groups(len(tasks), params.get("num_experts", 6), params.get("task_groups"), params.get("expert_groups"))

    def delta_w(self, flat: Tensor, gates: Tensor) -> Tensor:
        h = torch.einsum("ni,eri->ner", flat, self.lora_A) * gates.unsqueeze(-1)   # (N, E, r)
        return torch.einsum("ner,eor->no", h, self.lora_B)

    def delta(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates = torch.softmax(flat @ self.router.T, dim=-1)                       # (N, E), dense
        self.gate_weights = gates.detach()
        task = self.context.task
        self.aux_loss = None
        if task is not None:
            rows = x.shape[0]
            sample = (self.task_group[task] if isinstance(task, Tensor)
                      else self.task_group[task].expand(rows))
            self.aux_loss = localized_balancing_loss(gates.reshape(rows, -1, self.num_experts), sample,
                                                     self.expert_group, self.lbc_delta,
                                                     self.context.mask_for(flat.shape[0]), self.form)
        return self.delta_w(flat, gates).reshape(*x.shape[:-1], self.out_features)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B, self.router]

    __getstate__ = MoLoRALinear.__getstate__

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_experts={self.num_experts}, delta={self.lbc_delta}, "
                f"expert_groups={self.expert_group.tolist()}, task_groups={self.task_group.tolist()}")


class SMoRALinear(AdapterLinear):
    """Each rank an expert: one rank-``R`` LoRA whose ranks are gated per token, top-k of ``R`` active.

    Zhao et al., "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for
    Multi-Task Learning" (SMoRA), arXiv 2025: ``y = W0 x + s B (g(x) * A x)`` with
    ``g = topk(softmax(W_g x))`` over the ``R`` ranks (renormalised), ``A: (R, in)``,
    ``B: (out, R)``, ``W_g: (R, in)``. The ranks are computed densely in one matmul and the
    unselected ones gated to 0 (a rank is one multiply-add per feature: gathering would cost more).
    Departure: balancing uses the Switch loss of :class:`MoLoRALinear` (``aux_loss``), not the
    paper's own balancing scheme; scaling is ``alpha / R`` as for a LoRA of rank ``R``.
    """

    method = "smora"
    routed = True

    def __init__(self, base: nn.Linear, context: TaskContext, rank: int, alpha: float, top_k: int = 2) -> None:
        super().__init__(base, context, rank, alpha)
        self.top_k = top_k
        self.lora_A = nn.Parameter(_kaiming((rank, self.in_features), self.in_features).to(base.weight))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank).to(base.weight))
        self.router = nn.Parameter(_kaiming((rank, self.in_features), self.in_features).to(base.weight))
        self.aux_loss: Tensor | None = None

    def delta(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates, probs = topk_gates(flat @ self.router.T, self.top_k)   # (N, R): one gate per rank
        self.aux_loss = load_balancing_loss(gates, probs, self.context.mask_for(flat.shape[0]))
        self.gate_weights = gates.detach()
        out = ((flat @ self.lora_A.T) * gates) @ self.lora_B.T
        return out.reshape(*x.shape[:-1], self.out_features)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B, self.router]

    __getstate__ = MoLoRALinear.__getstate__

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_k={self.top_k}"


class ArrowLinear(LoRALinear):
    """Zero-shot per-token routing over a library of LoRAs (one per ``tasks`` entry) by their prototypes.

    Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs", ICML 2024,
    sec. 4 (Arrow): each expert's prototype ``v_e`` is the top right singular vector of
    ``ΔW_e = B_e A_e``; token ``x`` scores ``|<x, v_e>|`` (sign-free), keeps the top-k experts and
    mixes them with ``softmax(score / temperature)``: ``y = W0 x + s sum_e c_e(x) B_e A_e x``. The
    library has the stacked layout of :class:`LoRALinear`, so ``load_peft(model, dir, task=name)``
    fills one expert from a PEFT LoRA. The prototypes come from an exact SVD (PEFT's ``ArrowConfig``
    runs 15 power iterations from a random start, the same vector when the top singular value is
    well separated), computed once and cached: call :meth:`refresh` after changing the weights
    (``load_peft`` does). No task context is read.
    """

    method = "arrow"
    routed = True

    def __init__(self, base: nn.Linear, context: TaskContext, rank: int, alpha: float,
                 top_k: int = 3, temperature: float = 1.0) -> None:
        super().__init__(base, context, rank, alpha)
        self.top_k, self.temperature = top_k, temperature
        self.register_buffer("prototypes", None, persistent=False)

    @torch.no_grad()
    def refresh(self) -> Tensor:
        """Recompute the ``(E, in)`` prototypes from the current library (one batched SVD)."""
        delta_w = (self.lora_B @ self.lora_A).to(torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32)
        self.prototypes = torch.linalg.svd(delta_w, full_matrices=False).Vh[:, 0, :].to(self.lora_A.dtype)
        return self.prototypes

    def delta(self, x: Tensor) -> Tensor:
        protos = self.prototypes if self.prototypes is not None else self.refresh()
        flat = x.reshape(-1, x.shape[-1])
        score = (flat @ protos.T).abs()                                     # (N, E)
        top, idx = score.topk(min(self.top_k, score.shape[-1]), dim=-1)
        coeff = torch.softmax(torch.full_like(score, float("-inf")).scatter(-1, idx, top) / self.temperature, -1)
        self.gate_weights = coeff.detach()
        h = torch.einsum("ni,eri->ner", flat, self.lora_A) * coeff.unsqueeze(-1)
        return torch.einsum("ner,eor->no", h, self.lora_B).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_k={self.top_k}, temperature={self.temperature}"
