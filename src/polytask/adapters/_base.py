"""The base of every adapter layer (a frozen ``nn.Linear`` plus trainable low-rank modules),
the shared task context and the top-k routing helpers.

Which task a batch belongs to is read from a :class:`TaskContext` shared by all layers of one
model (``polytask.adapters.set_task``): either one task index for the whole batch or a ``(B,)``
tensor of task indices, one per sample (the first dimension of the input).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError


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
    #: whether the layer routes tokens over experts (its ``gate_weights`` are set by each forward)
    routed: bool = False
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

    @classmethod
    def check_tasks(cls, tasks: list[str], **params: object) -> None:
        """ConfigError naming the parameter if it does not fit the task list (checked before any change)."""

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
