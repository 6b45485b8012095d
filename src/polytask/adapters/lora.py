"""Per-task low-rank adapters: LoRA per task, MTLoRA (shared + per task), Poly / MHR (skills per task)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions.utils import clamp_probs

from polytask.adapters._base import AdapterLinear, TaskContext, _kaiming
from polytask.errors import ConfigError

#: added to Poly's allocation sum before normalising (PEFT's and mttl's EPS)
POLY_EPS = 1e-12


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


def relaxed_bernoulli(logits: Tensor) -> Tensor:
    """One draw of ``RelaxedBernoulli(temperature=1, logits=logits)`` (Maddison et al.; Jang et al., ICLR 2017).

    The same arithmetic and the same ``torch.rand`` draw as ``torch.distributions.RelaxedBernoulli``
    (so PEFT's Poly draws the same under the same seed), without its argument validation, which
    reads the device (a host synchronisation) and cannot be switched off for the inner distribution.
    """
    p = clamp_probs(torch.sigmoid(logits))
    u = clamp_probs(torch.rand(logits.shape, dtype=logits.dtype, device=logits.device))
    return torch.sigmoid(u.log() - (-u).log1p() + p.log() - (-p).log1p())


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
            z = relaxed_bernoulli(logits)
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
