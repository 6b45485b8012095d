"""Models for sequential conversion funnels (impression -> click -> conversion -> ...): ESMM, AITM.

Tasks are given in funnel order; every task is binary and a later step can only happen after the
earlier ones (e.g. ``click`` then ``purchase``, where the ``purchase`` label is click-and-purchase
over all impressions, as in Ali-CCP).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.nn.base import MultiTaskModel, check_widths
from polytask.nn.embedding import FeatureSpec, input_layer
from polytask.nn.layers import BatchedLinear, BatchedMLP
from polytask.nn.moe import per_task
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


def _check_funnel(tasks: Sequence[Task], arch: str) -> None:
    if len(tasks) < 2:
        raise ConfigError(f"{arch} needs at least two tasks in funnel order (e.g. click, purchase)")
    for t in tasks:
        if t.kind != "binary":
            raise ConfigError(f"{arch}: task {t.name!r} is {t.kind}; every funnel task must be binary")


def log_sigmoid_to_logit(log_p: Tensor) -> Tensor:
    """``logit(p) = log p - log(1 - p)`` from ``log p`` (stable for small p; clamped just below p = 1)."""
    log_p = log_p.clamp(max=-1e-7)
    return log_p - torch.log(-torch.expm1(log_p))


@ARCHITECTURES.register("esmm")
class ESMM(MultiTaskModel):
    """Entire Space Multi-task Model.

    Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, "Entire Space Multi-Task Model: An Effective Approach for
    Estimating Post-Click Conversion Rate", SIGIR 2018. A tower per funnel step on the shared
    input embedding; step ``k``'s tower estimates the *conditional* probability ``q_k`` of step
    ``k`` given step ``k-1``, and the model outputs, for task ``k``, the logit of the joint
    ``p_k = Π_{j<=k} q_j`` over all impressions. With tasks ``(click, purchase)``: output ``click``
    is pCTR, output ``purchase`` is pCTCVR = pCTR · pCVR, both trained on the entire space, and
    ``conditional_logits["purchase"]`` is pCVR (the quantity the paper is after).

    Parameters: the input embedding and the first step's tower feed every task (shared); the towers
    of later steps are task-specific (the first task's loss does not depend on them; step ``k``'s
    tower also feeds steps after ``k``). ``shared_features``: the embedded input ``(B, D)``.

    Args:
        input_dim: dense width or a FeatureSpec; tasks: binary tasks in funnel order;
        tower: hidden widths of each step's tower; activation, dropout.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], tower: Sequence[int] = (64, 32),
                 activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__(tasks)
        _check_funnel(self.tasks, "esmm")
        self.input = input_layer(input_dim)
        tower = check_widths("tower", tower, True)
        d, t = self.input.output_dim, len(self.tasks)
        # the first step's tower feeds every task (shared), later ones do not (task-specific)
        self.first = BatchedMLP(1, d, tower, 1, act=activation, dropout=dropout)
        self.later = BatchedMLP(t - 1, d, tower, 1, act=activation, dropout=dropout)
        self.conditional_logits: dict[str, Tensor] = {}

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        return self.later.parameters()

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.input(x)
        self.shared_features = h
        cond = torch.cat([self.first(h), self.later(h)]).squeeze(-1)  # (T, B) logits of q_k
        joint = F.logsigmoid(cond).cumsum(dim=0)  # log p_k = Σ_{j<=k} log q_j
        self.conditional_logits = per_task(self.task_names, cond.unsqueeze(-1))
        # the first step's joint probability is its own: keep its logit exact
        logits = torch.cat([cond[:1], log_sigmoid_to_logit(joint[1:])])
        return per_task(self.task_names, logits.unsqueeze(-1))


@ARCHITECTURES.register("aitm")
class AITM(MultiTaskModel):
    """Adaptive Information Transfer Multi-task framework.

    Xi, Chen, Zhang, Zhong, Fan, Shen, Ma, Wang, Lin, "Modeling the Sequential Dependence among
    Audience Multi-step Conversions with Multi-task Learning in Targeted Display Advertising",
    KDD 2021. Each step ``t`` has a tower ``q_t``; from step 2 on, the Adaptive Information
    Transfer module attends over ``{p_{t-1}, q_t}`` where ``p_{t-1} = transfer_{t-1}(z_{t-1})``:
    ``w_u = softmax_u(⟨h1(u), h2(u)⟩ / √k)``, ``z_t = Σ_u w_u h3(u)``; ``z_1 = q_1``. Each step's
    output is a logit read from ``z_t`` by its head.

    Its behavioural calibrator (label constraint) penalises a later step predicted more likely
    than an earlier one: after forward, ``aux_loss = calibrator_weight · Σ_t mean(max(ŷ_t − ŷ_{t−1}, 0))``
    (the paper's α, 0.6 in its experiments); the Trainer adds it.

    The step towers run as one batched MLP; the transfer chain is sequential by construction (step
    ``t`` needs ``z_{t-1}``). ``attention_weights[task]``: ``(B, 2)`` weights of
    ``(p_{t-1}, q_t)`` (steps >= 2). Parameters: the embedding and the first step's tower feed
    every task (shared); the other towers, the transfer/attention modules and the output heads are
    task-specific. ``shared_features``: the embedded input ``(B, D)``.

    Args:
        input_dim: dense width or a FeatureSpec; tasks: binary tasks in funnel order;
        tower: hidden widths of each step's tower (its last width is ``k``, the AIT width);
        head: hidden widths of each step's output head; calibrator_weight: α.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], tower: Sequence[int] = (64, 32),
                 head: Sequence[int] = (), calibrator_weight: float = 0.6, activation: str = "relu",
                 dropout: float = 0.0) -> None:
        super().__init__(tasks)
        _check_funnel(self.tasks, "aitm")
        tower = check_widths("tower", tower)
        if calibrator_weight < 0:
            raise ConfigError(f"model.params.calibrator_weight must be >= 0, got {calibrator_weight}")
        self.input = input_layer(input_dim)
        t, k = len(self.tasks), tower[-1]
        self.width, self.calibrator_weight = k, float(calibrator_weight)
        self.first = BatchedMLP(1, self.input.output_dim, tower, act=activation, dropout=dropout)
        self.later = BatchedMLP(t - 1, self.input.output_dim, tower, act=activation, dropout=dropout)
        self.transfer = BatchedMLP(t - 1, k, (k,), act=activation)  # p_{t-1} = transfer(z_{t-1})
        self.h1, self.h2, self.h3 = (BatchedLinear(t - 1, k, k, bias=False) for _ in range(3))
        self.out = BatchedMLP(t, k, check_widths("head", head, True), 1, act=activation)
        self.aux_loss: Tensor | None = None
        self.attention_weights: dict[str, Tensor] = {}

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.input(x)
        self.shared_features = h
        q = torch.cat([self.first(h), self.later(h)])  # (T, B, k)
        z = [q[0]]
        for i in range(1, q.shape[0]):  # step i needs z_{i-1}: sequential by construction
            p_prev = self._one(self.transfer, i - 1, z[-1])
            u = torch.stack([p_prev, q[i]], dim=1)  # (B, 2, k)
            keys = self._one(self.h1, i - 1, u)
            queries = self._one(self.h2, i - 1, u)
            values = self._one(self.h3, i - 1, u)
            w = torch.softmax((keys * queries).sum(-1) / math.sqrt(self.width), dim=1)  # (B, 2)
            self.attention_weights[self.task_names[i]] = w
            z.append((w.unsqueeze(-1) * values).sum(dim=1))
        logits = self.out(torch.stack(z))  # (T, B, 1)
        prob = torch.sigmoid(logits.squeeze(-1))
        self.aux_loss = self.calibrator_weight * F.relu(prob[1:] - prob[:-1]).mean(dim=1).sum()
        return per_task(self.task_names, logits)

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        return chain(*(m.parameters() for m in (self.later, self.transfer, self.h1, self.h2, self.h3, self.out)))

    @staticmethod
    def _one(stack: nn.Module, i: int, x: Tensor) -> Tensor:
        """Apply member ``i`` of a batched layer stack to ``x`` (``(..., in)``)."""
        for layer in stack.layers if isinstance(stack, BatchedMLP) else [stack]:
            if isinstance(layer, BatchedLinear):
                x = x @ layer.weight[i] + (layer.bias[i, 0] if layer.bias is not None else 0)
            else:
                x = layer(x)
        return x
