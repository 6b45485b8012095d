"""Adapter layers: a frozen ``nn.Linear`` plus trainable low-rank modules, one class per method.

Every layer computes ``y = base(x) + scaling * delta(x)`` with ``scaling = alpha / rank`` and its
``B`` factors initialised to zero, so a freshly wrapped model gives exactly the base model's
outputs. Per-task and per-expert factors are stacked along a leading dimension and run with
``einsum``/``bmm``: no Python loop over tasks or experts in a forward pass.

Which task a batch belongs to is read from a :class:`TaskContext` shared by all layers of one
model (``polytask.adapters.set_task``): either one task index for the whole batch or a ``(B,)``
tensor of task indices, one per sample (the first dimension of the input).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError

#: added to Poly's allocation sum before normalising (PEFT's and mttl's EPS)
POLY_EPS = 1e-12


class TaskContext:
    """The task serving the current batch: ``None``, an ``int`` index or a ``(B,)`` long tensor."""

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = list(tasks)
        self.task: int | Tensor | None = None
        #: ``(B, L)`` 1 = real token, 0 = padding: left out of the routers' load-balancing losses
        self.token_mask: Tensor | None = None

    def mask_for(self, n: int) -> Tensor | None:
        """The token mask flattened to ``(n,)`` if it has ``n`` entries (a layer fed every token), else None."""
        m = self.token_mask
        return m.reshape(-1) if m is not None and m.numel() == n else None

    def resolve(self, task: str | int | Tensor | None) -> int | Tensor | None:
        """Task name / index / per-sample index tensor -> what layers read; ConfigError naming an unknown task."""
        if task is None or isinstance(task, Tensor):
            if isinstance(task, Tensor) and (task.ndim != 1 or task.dtype not in (torch.long, torch.int)):
                raise ConfigError(f"adapters.set_task: a task-id tensor must be 1-d integer (one id per sample), "
                                  f"got shape {tuple(task.shape)} dtype {task.dtype}")
            return task
        if isinstance(task, str):
            if task not in self.tasks:
                raise ConfigError(f"adapters: unknown task {task!r}; known: {', '.join(self.tasks)}")
            return self.tasks.index(task)
        if isinstance(task, int) and 0 <= task < len(self.tasks):
            return task
        raise ConfigError(f"adapters: unknown task {task!r}; known: {', '.join(self.tasks)}")


def _kaiming(shape: tuple[int, ...], fan_in: int) -> Tensor:
    # nn.Linear's / PEFT's default init of lora_A: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


def topk_gates(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k token routing: ``(N, E)`` router logits -> ``(gates, probs)``.

    ``probs = softmax(logits)``; ``gates`` keeps each token's ``k`` largest probabilities,
    renormalised to sum to one, and zeros elsewhere (Shazeer et al. 2017; Fedus et al. 2022).
    """
    probs = torch.softmax(logits, dim=-1)
    top, idx = probs.topk(k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    return gates, probs


def load_balancing_loss(gates: Tensor, probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (Fedus et al., JMLR 2022, eq. 4).

    ``f_e``: the fraction of the ``N * k`` token-to-expert assignments that went to expert ``e``
    (from ``gates != 0``); ``P_e``: the mean router probability of ``e``. Equals 1 for perfectly
    uniform routing, ``E`` when every token goes to one expert with probability 1. Only ``P``
    carries a gradient, as in the paper. ``mask`` (``(N,)``, 0 for padding) leaves tokens out of
    both means.
    """
    e = probs.shape[-1]
    m = torch.ones_like(probs[:, 0]) if mask is None else mask.to(probs.dtype)
    assigned = (gates != 0).to(probs.dtype) * m[:, None]
    f = assigned.sum(0) / assigned.sum()
    p = (probs * m[:, None]).sum(0) / m.sum()
    return e * (f * p).sum()


class AdapterLinear(nn.Module):
    """Base class: holds the frozen ``base`` linear, ``rank``, ``alpha`` and the shared task context."""

    method: str = ""
    #: routed methods: the ``(N, E)`` gate weights of the last forward's ``N`` tokens (detached)
    gate_weights: Tensor | None = None

    def __init__(self, base: nn.Linear, context: TaskContext, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.context = context
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features

    @classmethod
    def check(cls, name: str, base: nn.Linear, rank: int, **params: object) -> None:
        """ConfigError naming module ``name`` if the method cannot wrap it with these parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * self.delta(x)

    def delta(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters every task uses."""
        return []

    def task_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters stacked per task (row ``t`` serves task ``t``)."""
        return []

    def _task(self, x: Tensor) -> int | Tensor:
        task = self.context.task
        if task is None:
            raise ConfigError(f"adapters: no task set for a {self.method} layer; call "
                              f"polytask.adapters.set_task(model, task) first")
        if isinstance(task, Tensor) and task.shape[0] != x.shape[0]:
            raise ConfigError(f"adapters: task-id tensor has {task.shape[0]} ids for a batch of {x.shape[0]}")
        return task

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _per_task_lora(x: Tensor, a: Tensor, b: Tensor, task: int | Tensor) -> Tensor:
    """``B_t A_t x`` with stacked ``a: (T, r, in)``, ``b: (T, out, r)``; ``task`` an index or ``(B,)`` ids."""
    if not isinstance(task, Tensor):
        return (x @ a[task].T) @ b[task].T
    xs = x.reshape(x.shape[0], -1, x.shape[-1])              # (B, L, in)
    h = torch.bmm(xs, a[task].transpose(1, 2))               # (B, L, r): one gathered factor per sample
    out = torch.bmm(h, b[task].transpose(1, 2))              # (B, L, out)
    return out.reshape(*x.shape[:-1], b.shape[1])


class LoRALinear(AdapterLinear):
    """One LoRA per task; the task context picks which one serves each sample.

    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, eq. 3:
    ``h = W0 x + (alpha / r) B A x`` with ``A`` Kaiming-uniform and ``B = 0`` at init. Here the
    ``T`` tasks' factors are stacked, ``A: (T, r, in)``, ``B: (T, out, r)``; row ``t`` is exactly
    the ``lora_A.weight`` / ``lora_B.weight`` PEFT would hold for task ``t`` (no dropout, no bias).
    """

    method = "lora"

    def __init__(self, base: nn.Linear, context: TaskContext, rank: int, alpha: float) -> None:
        super().__init__(base, context, rank, alpha)
        t = len(context.tasks)
        self.lora_A = nn.Parameter(_kaiming((t, rank, self.in_features), self.in_features).to(base.weight))
        self.lora_B = nn.Parameter(torch.zeros(t, self.out_features, rank).to(base.weight))

    def delta(self, x: Tensor) -> Tensor:
        return _per_task_lora(x, self.lora_A, self.lora_B, self._task(x))

    def task_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]


class MTLoRALinear(LoRALinear):
    """A task-agnostic LoRA every task uses plus one task-specific LoRA per task.

    Agiza et al., "MTLoRA: Low-Rank Adaptation Approach for Efficient Multi-Task Learning",
    CVPR 2024: task-agnostic TA-LoRA modules in the shared backbone and task-specific TS-LoRA
    modules, ``h = W0 x + s B_sh A_sh x + s B_t A_t x``. Departure from the paper: both modules sit
    in every wrapped layer and are summed there; the paper places TS-LoRA only at the end of each
    backbone stage, fed by the shared features, to build task-specific multi-scale features for a
    dense-prediction decoder, which needs a hierarchical backbone this generic wrapper does not assume.
    """

    method = "mtlora"

    def __init__(self, base: nn.Linear, context: TaskContext, rank: int, alpha: float) -> None:
        super().__init__(base, context, rank, alpha)
        self.shared_A = nn.Parameter(_kaiming((rank, self.in_features), self.in_features).to(base.weight))
        self.shared_B = nn.Parameter(torch.zeros(self.out_features, rank).to(base.weight))

    def delta(self, x: Tensor) -> Tensor:
        return (x @ self.shared_A.T) @ self.shared_B.T + super().delta(x)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.shared_A, self.shared_B]


class HydraLoRALinear(AdapterLinear):
    """One shared ``A``, ``E`` ``B`` heads, and a token-level softmax router over the heads.

    Tian et al., "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning",
    NeurIPS 2024, eq. 6: ``y = W0 x + sum_i w_i B_i A x`` with ``w = softmax(W_g x)``. All heads are
    computed together (``einsum`` over the stacked ``B: (E, out, r)``). Like the paper, the router
    needs no task label, so every parameter is shared by all tasks; the scaling ``alpha / r`` is
    PEFT's, which the authors' code also uses.
    """

    method = "hydralora"

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
    label) is replaced by the Switch-Transformer load-balancing loss (:func:`load_balancing_loss`),
    kept after each forward in ``aux_loss`` (sum them with ``polytask.adapters.aux_loss``).
    """

    method = "molora"

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


class PolyLinear(AdapterLinear):
    """A library of skill LoRAs mixed per task by a learned task-to-skill allocation (Poly; MHR with splits).

    Ponti et al., "Combining Parameter-efficient Modules for Task-level Generalisation", EACL 2023
    (Poly): task ``t`` uses ``A_t = sum_j w_tj A_j``, ``B_t = sum_j w_tj B_j`` with
    ``w_t = z_t / sum_j z_tj``, ``z_t ~ RelaxedBernoulli(logits_t)`` in training and
    ``sigmoid(logits_t)`` at evaluation. Caccia et al., "Multi-Head Adapter Routing for
    Cross-Task Generalization", NeurIPS 2023 (MHR): ``n_splits`` blocks of the input/output
    features, each with its own allocation. Layout and arithmetic follow PEFT's ``PolyModel``
    (``A: (splits, skills, in/splits, r)``, ``B: (splits, skills, r, out/splits)``, router logits
    ``(tasks, splits*skills)``), so PEFT weights copy over unchanged; PEFT scales by ``1/r``,
    which ``alpha=1`` reproduces. Unlike PEFT, a task id out of range is not checked on the host.
    The skills are shared by all tasks, the allocation logits are per task.
    """

    method = "poly"

    def __init__(self, base: nn.Linear, context: TaskContext, rank: int, alpha: float,
                 n_skills: int = 4, n_splits: int = 1) -> None:
        super().__init__(base, context, rank, alpha)
        self.n_skills, self.n_splits = n_skills, n_splits
        q, d_in, d_out = n_splits, self.in_features // n_splits, self.out_features // n_splits
        a = _kaiming((q, n_skills, rank, d_in), d_in).transpose(-1, -2)    # PEFT: kaiming on (r, d), stored .T
        self.lora_A = nn.Parameter(a.contiguous().to(base.weight))
        self.lora_B = nn.Parameter(torch.zeros(q, n_skills, rank, d_out).to(base.weight))
        self.router = nn.Parameter(torch.empty(len(context.tasks), q * n_skills).uniform_(-1e-3, 1e-3)
                                   .to(base.weight))

    @classmethod
    def check(cls, name: str, base: nn.Linear, rank: int, **params: object) -> None:
        q = params.get("n_splits", 1)
        if not isinstance(q, int) or q < 1 or base.in_features % q or base.out_features % q:
            raise ConfigError(f"adapters.n_splits: must divide the features of module {name!r} "
                              f"({base.in_features} -> {base.out_features}), got {q!r}")

    def allocation(self, task: int | Tensor) -> Tensor:
        """The normalised task-to-skill weights ``(B or 1, splits, skills)`` of ``task``."""
        logits = self.router[task].reshape(-1, self.n_splits, self.n_skills)
        if self.training:
            z = torch.distributions.RelaxedBernoulli(torch.tensor(1.0, dtype=logits.dtype, device=logits.device),
                                                     logits=logits).rsample()
        else:
            z = torch.sigmoid(logits)
        return z / (z.sum(-1, keepdim=True) + POLY_EPS)

    def delta(self, x: Tensor) -> Tensor:
        task = self._task(x)
        w = self.allocation(task)
        n, r = w.shape[0], self.rank
        a = torch.einsum("bqs,qsdr->bqdr", w, self.lora_A).reshape(n, self.in_features, r)
        b = torch.einsum("bqs,qsrd->bqrd", w, self.lora_B).transpose(1, 2).reshape(n, r, self.out_features)
        if not isinstance(task, Tensor):
            return x @ a[0] @ b[0]
        xs = x.reshape(x.shape[0], -1, x.shape[-1])
        return xs.bmm(a).bmm(b).reshape(*x.shape[:-1], self.out_features)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def task_parameters(self) -> list[nn.Parameter]:
        return [self.router]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", n_skills={self.n_skills}, n_splits={self.n_splits}"


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


METHODS: dict[str, type[AdapterLinear]] = {
    "lora": LoRALinear, "mtlora": MTLoRALinear, "hydralora": HydraLoRALinear, "molora": MoLoRALinear,
    "smora": SMoRALinear, "poly": PolyLinear, "mhr": PolyLinear, "arrow": ArrowLinear,
}
ALIASES = {"hydra_lora": "hydralora", "mo_lora": "molora", "loramoe": "molora", "mt_lora": "mtlora"}
