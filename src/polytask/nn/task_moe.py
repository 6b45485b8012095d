"""Task-level mixture-of-experts: a router picks experts per task, not per example.

Ye, Zha, Ren, "Eliciting and Understanding Cross-Task Skills with Task-Level
Mixture-of-Experts", Findings of EMNLP 2022 (arXiv:2205.12701).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Literal

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.nn.base import TaskHeads, check_positive, check_widths
from polytask.nn.embedding import FeatureSpec, input_layer
from polytask.nn.layers import activation as make_activation
from polytask.nn.moe import RoutedModel
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


#: Relative size of the independent part of each expert's initial weights under ``expert_init="shared"``.
SHARED_INIT_JITTER = 0.1


def _expert_bank(num_experts: int, shape: tuple[int, ...], fan_in: int, init: str) -> Tensor:
    """``(num_experts, *shape)`` initial weights, uniform in ``±1/sqrt(fan_in)`` (nn.Linear's bounds).

    ``independent``: one draw per expert. ``shared``: one draw for all, plus a small independent
    part (:data:`SHARED_INIT_JITTER` of the scale) so that the routers get a gradient from the
    first step (the mixture of exactly equal experts does not depend on the routing weights).
    """
    bound = fan_in ** -0.5
    if init == "independent":
        return torch.empty(num_experts, *shape).uniform_(-bound, bound)
    common = torch.empty(1, *shape).uniform_(-bound, bound)
    return common + SHARED_INIT_JITTER * torch.empty(num_experts, *shape).uniform_(-bound, bound)


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

    Initialisation (``expert_init="shared"``, the default): the experts of a layer start from
    one draw (plus a tenth of an independent one, see :func:`_expert_bank`), as the paper's
    experts start as copies of one pretrained BART layer (the authors' code,
    INK-USC/CrossTaskMoE ``modules/utils.py::initialize_weights``, copies the layer into every
    expert and adds Gaussian noise of 1e-8; ours is larger, so that the routers of a model
    trained from scratch get a usable gradient from the first step). A convex mixture of equal
    experts is that expert, so at the start every task reads (nearly) the same representation --
    the model starts as a shared-bottom network -- and the experts become different as the
    routing sends each its own mix of the tasks' gradients. With independent draws (``"independent"``, the
    behaviour before) a task starts from a mixture of unrelated random features: the part that
    varies with the input shrinks by ``‖w_t‖₂`` per layer (the representation's standard
    deviation at the start was 0.06-0.07 over the two default layers, 0.12 with equal experts), and
    each task starts from its own features, so the direction the tasks share is learnt by each
    expert from the one or two tasks routed to it instead of by all of them together. The tasks
    that did not get going in a short run ended at or above the variance of their target (worse
    than predicting the mean) while other tasks of the same model learnt. ``hidden`` defaults to
    128: with top-2 routing one expert carries most of a task's weight, so an expert's width is a
    task's trunk width, and 64 gave it half the shared-bottom's first layer.

    Measured (``tests/test_nn_task_moe.py`` holds the fast version): synthetic generator, 5 tasks,
    correlation 0.5, 6,000 rows, EW, Adam 3e-3, 10 epochs of 256-row batches; test MSE / variance
    of the target, over 6 data seeds x 5 tasks: independent experts of 64: mean 0.60, 13 of 30
    tasks above 0.9; shared start, 64: 0.56, 10; shared start, 128 (now): 0.48, 8; shared-bottom
    (128, 64): 0.55, 9 (the 8 are two data seeds on which the shared-bottom fails as well). On
    data seed 0 over 5 initialisations: 0.94 (20 of 25 above 0.9) before, 0.40 (1 of 25) now,
    shared-bottom 0.74 (4). MMoE stays ahead (0.31 over the first four data seeds): its
    per-example gates are a one-layer path from the input that task-level routing does not have. At
    Adam 1e-3 ten epochs are too few for every architecture without per-example gates
    (shared-bottom 0.70, task-MoE 0.68 before, 0.64 now). Ruled out as causes: routing collapse and
    the load-balancing term (soft routing, ``balance_weight=0`` and ``k=num_experts`` fail alike
    with independent experts, on the two data seeds of the issue), and width alone (independent
    experts of 128: 0.61, 12 of 30). Where specialisation should pay, the shared start does not
    hold it back (3 seeds): unrelated tasks (4, correlation 0) 0.24 before, 0.20 now; two clusters
    of 3 (correlation 0.9 within, 0 across) 0.056 before, 0.061 now.

    Args:
        input_dim: dense width or a FeatureSpec; num_layers: expert layers (>= 1);
        num_experts: experts per layer (>= 2); hidden: width of each expert;
        routing: ``soft`` or ``topk``; k: experts kept per task with ``topk`` (1 <= k <= num_experts);
        task_embed_dim: width of the task embeddings; balance_weight: weight of the load-balancing term;
        expert_init: ``shared`` (experts of a layer start equal) or ``independent``;
        tower, activation, dropout: as in the other models.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], num_layers: int = 2,
                 num_experts: int = 4, hidden: int = 128, routing: Literal["soft", "topk"] = "topk", k: int = 2,
                 task_embed_dim: int = 16, balance_weight: float = 0.01,
                 expert_init: Literal["shared", "independent"] = "shared", tower: Sequence[int] = (32,),
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
        if expert_init not in ("shared", "independent"):
            raise ConfigError(f"model.params.expert_init must be 'shared' or 'independent', got {expert_init!r}")
        self.input = input_layer(input_dim)
        self.routing, self.k, self.balance_weight = routing, k, float(balance_weight)
        t = len(self.tasks)
        widths = [self.input.output_dim] + [hidden] * num_layers
        self.weights = nn.ParameterList(
            nn.Parameter(_expert_bank(num_experts, (widths[i], hidden), widths[i], expert_init))
            for i in range(num_layers))
        self.biases = nn.ParameterList(
            nn.Parameter(_expert_bank(num_experts, (hidden,), widths[i], expert_init)) for i in range(num_layers))
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
