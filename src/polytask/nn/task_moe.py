"""Task-level mixture-of-experts: a router picks experts per task, not per example.

Ye, Zhang, Ren, "Eliciting and Understanding Cross-Task Skills with Task-Level
Mixture-of-Experts", Findings of EMNLP 2022.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Literal

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.nn.base import TaskHeads
from polytask.nn.embedding import FeatureSpec, input_layer
from polytask.nn.layers import activation as make_activation
from polytask.nn.moe import RoutedModel, check_positive, check_widths
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


def route(logits: Tensor, routing: str, k: int) -> Tensor:
    """Routing weights from router logits ``(T, E)``.

    ``soft``: softmax over all experts. ``topk``: softmax over each task's ``k`` largest logits,
    zero elsewhere (the kept weights stay differentiable w.r.t. the router).
    """
    if routing == "soft":
        return torch.softmax(logits, dim=-1)
    top = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top, True)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


def load_balance_loss(probs: Tensor, weights: Tensor, routing: str) -> Tensor:
    """Switch-style load-balancing term ``E · Σ_e f_e P_e`` over the tasks of one layer.

    ``probs (T, E)``: router softmax; ``weights (T, E)``: routing weights actually used. ``P_e`` is
    the mean router probability; ``f_e`` the share of top-k routing slots given to expert ``e``
    (Fedus, Zoph, Shazeer, "Switch Transformers", JMLR 2022, eq. 4, with tasks in place of
    tokens). Under soft routing every expert gets every slot, so ``f_e`` is replaced by ``P_e``
    (the term becomes ``E · Σ_e P_e²``). Both equal 1 for uniform use and grow as use concentrates.
    """
    p = probs.mean(dim=0)
    if routing == "soft":
        return probs.shape[-1] * (p * p).sum()
    assigned = (weights > 0).to(probs.dtype)
    f = assigned.sum(dim=0) / assigned.sum()
    return probs.shape[-1] * (f * p).sum()


@ARCHITECTURES.register("task_moe", "task_level_moe")
class TaskMoE(RoutedModel):
    """A stack of expert layers where each task is routed, per layer, by a learned task embedding.

    Layer ``l`` has ``num_experts`` experts (one linear map and activation each); task ``t``'s
    representation is ``h_t^l = Σ_e w_{t,e}^l E_e^l(h_t^{l-1})`` with
    ``w_t^l = route(R^l(τ_t))``: a router ``R^l`` (linear) reading the task's learned embedding
    ``τ_t``. The same routing applies to every example of the task (task-level routing, Ye et
    al. 2022), with ``routing="soft"`` (softmax) or ``"topk"`` (top-``k`` experts, renormalised).
    Every expert is evaluated for every task as one ``einsum`` (dense compute: top-k gives sparse
    weights, not fewer FLOPs, which keeps the step free of data-dependent shapes).

    ``aux_loss = balance_weight · Σ_l`` :func:`load_balance_loss` after each forward (the Trainer
    adds it). ``gate_weights[task]``: ``(num_layers, num_experts)``, one row per layer.
    Parameters: experts and routers are shared; task embeddings and towers are task-specific.
    ``shared_features``: per-task representations ``(T, B, H)``.

    Args:
        input_dim: dense width or a FeatureSpec; num_layers: expert layers (>= 1);
        num_experts: experts per layer (>= 2); hidden: width of each expert;
        routing: ``soft`` or ``topk``; k: experts kept per task with ``topk`` (1 <= k <= num_experts);
        task_embed_dim: width of the task embeddings; balance_weight: weight of the load-balancing term;
        tower, activation, dropout: as in the other models.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], num_layers: int = 2,
                 num_experts: int = 4, hidden: int = 64, routing: Literal["soft", "topk"] = "topk", k: int = 2,
                 task_embed_dim: int = 16, balance_weight: float = 0.01, tower: Sequence[int] = (32,),
                 activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__(tasks)
        check_positive("num_layers", num_layers)
        check_positive("num_experts", num_experts, minimum=2)
        check_positive("hidden", hidden)
        check_positive("task_embed_dim", task_embed_dim)
        if routing not in ("soft", "topk"):
            raise ConfigError(f"model.params.routing must be 'soft' or 'topk', got {routing!r}")
        check_positive("k", k)
        if k > num_experts:
            raise ConfigError(f"model.params.k ({k}) cannot exceed model.params.num_experts ({num_experts})")
        self.input = input_layer(input_dim)
        self.routing, self.k, self.balance_weight = routing, k, float(balance_weight)
        t = len(self.tasks)
        widths = [self.input.output_dim] + [hidden] * num_layers
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, widths[i], hidden).uniform_(-1, 1) / widths[i] ** 0.5)
            for i in range(num_layers))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, hidden).uniform_(-1, 1) / widths[i] ** 0.5)
            for i in range(num_layers))
        self.task_embedding = nn.Parameter(torch.randn(t, task_embed_dim))
        self.routers = nn.ModuleList(nn.Linear(task_embed_dim, num_experts) for _ in range(num_layers))
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.heads = TaskHeads(self.tasks, hidden, check_widths("tower", tower, True), activation, dropout)
        self.aux_loss: Tensor | None = None

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.heads.parameters(), [self.task_embedding])

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.input(x)
        balance, routes = [], []
        for weight, bias, router in zip(self.weights, self.biases, self.routers):  # layers are sequential
            logits = router(self.task_embedding)  # (T, E)
            w = route(logits, self.routing, self.k)
            balance.append(load_balance_loss(torch.softmax(logits, dim=-1), w, self.routing))
            routes.append(w)
            if h.ndim == 2:  # first layer: every task reads the same input, run each expert once
                out = self.act(torch.einsum("bi,eio->ebo", h, weight) + bias.unsqueeze(1))
                h = torch.einsum("te,ebo->tbo", w, out)
            else:  # every expert on every task's representation, weighted per task
                out = self.act(torch.einsum("tbi,eio->tebo", h, weight) + bias.unsqueeze(1))
                h = torch.einsum("te,tebo->tbo", w, out)
            h = self.dropout(h)
        self.aux_loss = self.balance_weight * torch.stack(balance).sum()
        stacked = torch.stack(routes, dim=1)  # (T, L, E)
        self.gate_weights = dict(zip(self.task_names, stacked.unbind(0)))
        self.shared_features = h
        return self.read_heads(h)
