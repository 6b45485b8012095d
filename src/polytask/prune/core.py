"""What every pruning method shares: the context it prunes in, a plan and its application, the
task floor, and the uniform-ratio search of the task-agnostic baselines.

A *plan* maps each prunable layer's name to the output channels it keeps (indices into the layer's
current width). :func:`apply_plan` carries it out on a copy of the model through torch-pruning's
dependency graph, which cuts every coupled tensor (the next layer's inputs, the towers' inputs).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from polytask.data.dataset import MultiTaskDataset
from polytask.errors import ConfigError
from polytask.nn.mtan import MTAN
from polytask.prune import flops as flops_lib
from polytask.nn.task_token import HeadAttention
from polytask.prune import heads, mtan
from polytask.prune.graph import dependency_graph, out_pruning_fn, prunable_layers, prune_bank_units
from polytask.registry import Registry
from polytask.tasks import HIGHER_IS_BETTER, Task

#: pruning methods by name; each class has ``prune(ctx, target) -> pruned copy`` (see methods.py)
PRUNERS: Registry = Registry("pruning method", prefix="prune")

Plan = dict[str, list[int]]  # layer name -> kept output channels
Metrics = dict[str, dict[str, float]]


class UnreachableBudget(ConfigError):
    """The FLOPs target cannot be met under the task floor; ``best`` is the lowest FLOPs ratio reached."""

    def __init__(self, message: str, best: float) -> None:
        super().__init__(message)
        self.best = best


@dataclass
class PruneContext:
    """The model to prune and what judges a pruned copy of it.

    ``layers``: names of the prunable layers (see :func:`polytask.prune.graph.prunable_layers`);
    ``example``: a tuple of forward arguments (a few rows) for tracing and counting;
    ``score_data``: rows the importance scores are computed on (train split);
    ``val``: the validation split, on which losses (PAGCP's constraint) and the floor are judged;
    ``floor``: no task's main validation metric may get worse than this many percent (None: no floor).
    """

    model: nn.Module
    layers: list[str]
    example: tuple
    tasks: Sequence[Task]
    score_data: MultiTaskDataset
    val: MultiTaskDataset
    floor: float | None = None
    batch_size: int = 4096
    base_flops: float = field(init=False)
    base_metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.base_flops = self.cost(self.model).flops
        self.base_metrics = self.metrics(self.model)

    def modules(self, model: nn.Module) -> list[nn.Module | list[nn.Module]]:
        """What the importance functions score, per layer: the module, or a tied layer's members."""
        return [layer.target for layer in prunable_layers(model, names=self.layers)]

    def widths(self, model: nn.Module) -> dict[str, int]:
        return {layer.name: layer.width for layer in prunable_layers(model, names=self.layers)}

    def cost(self, model: nn.Module) -> flops_lib.Cost:
        return flops_lib.count(model, self.example)

    def flops_ratio(self, model: nn.Module) -> float:
        return self.cost(model).flops / self.base_flops

    @torch.no_grad()
    def losses(self, model: nn.Module) -> Tensor:
        """Each task's loss on the whole validation split ``(T,)``."""
        from polytask.train.trainer import predict

        out = predict(model, self.val, self.batch_size)
        return torch.stack([t.loss(out[t.name], self.val.targets[t.name], self.val.masks.get(t.name)).float()
                            for t in self.tasks])

    def metrics(self, model: nn.Module) -> Metrics:
        from polytask.train.trainer import evaluate

        return evaluate(model, self.val, self.tasks, self.batch_size)

    def drops(self, metrics: Metrics) -> dict[str, float]:
        """Each task's drop (percent, positive = worse) of its main metric against the unpruned model."""
        return {t.name: task_drop(t, metrics[t.name], self.base_metrics[t.name]) for t in self.tasks}

    def within_floor(self, model: nn.Module) -> bool:
        if self.floor is None:
            return True
        return all(drop <= self.floor for drop in self.drops(self.metrics(model)).values())  # NaN: outside


def task_drop(task: Task, pruned: dict[str, float], base: dict[str, float]) -> float:
    """Relative drop of ``task``'s main metric in percent (positive = worse, as in Δm%)."""
    m = task.main_metric
    sign = -1.0 if HIGHER_IS_BETTER[m] else 1.0
    b = float(base[m])
    if b == 0:
        return 0.0 if float(pruned[m]) == b else sign * math.copysign(math.inf, float(pruned[m]) - b)
    return 100.0 * sign * (float(pruned[m]) - b) / abs(b)


def copy_model(model: nn.Module, example: tuple) -> nn.Module:
    """A deep copy (after a forward without autograd: no graph left in the model's attributes)."""
    flops_lib.settle(model, example)
    return copy.deepcopy(model)


def apply_plan(model: nn.Module, layers: Sequence[str], plan: Plan, example: tuple) -> nn.Module:
    """A pruned copy of ``model``: each layer in ``plan`` keeps only the listed output channels (every
    member of a tied layer the same ones, each cut within its own expert bank)."""
    pruned = copy_model(model, example)
    graph = None  # the whole model's, traced only when a layer needs it (PLE's never do)
    for layer in prunable_layers(pruned, names=[n for n in layers if n in plan]):
        keep = set(plan[layer.name])
        removed = [i for i in range(layer.width) if i not in keep]
        if not keep:
            raise ConfigError(f"prune: layer {layer.name} would keep no channel")
        if not removed:
            continue
        if layer.tied:
            for member, _ in layer.members:
                prune_bank_units(pruned, member, removed)
            continue
        if isinstance(layer.module, HeadAttention):  # whole heads (see prune/heads.py)
            heads.prune_heads(layer.module, removed)
            continue
        if isinstance(pruned, MTAN):  # a group written from the architecture (see prune/mtan.py)
            mtan.prune_trunk_channels(pruned, layer.name, removed)
            continue
        graph = graph if graph is not None else dependency_graph(pruned, example)
        graph.get_pruning_group(layer.module, out_pruning_fn(graph, layer.module), idxs=removed).prune()
    flops_lib.settle(pruned, example)
    return pruned


def top_channels(scores: Tensor, count: int) -> list[int]:
    """Indices of the ``count`` highest scores, in channel order (ties: the lower index)."""
    count = max(1, min(count, scores.numel()))
    order = torch.argsort(scores, descending=True, stable=True)[:count]
    return sorted(order.tolist())


def keep_counts(widths: Sequence[int], keep_ratio: float) -> list[int]:
    """Channels kept per layer at one keep ratio (at least one)."""
    return [max(1, min(w, int(round(keep_ratio * w)))) for w in widths]


def uniform_search(ctx: PruneContext, scores: Sequence[Tensor], target: float) -> tuple[nn.Module, float]:
    """The task-agnostic baselines: the same keep ratio in every layer, the largest whose FLOPs ratio
    is at most ``target`` (bisection), each layer keeping its highest-scored channels. Under a floor,
    UnreachableBudget when that model breaks it (naming the lowest FLOPs ratio that keeps it).
    Returns the pruned model and its keep ratio."""
    widths = [ctx.widths(ctx.model)[n] for n in ctx.layers]

    def build(ratio: float) -> nn.Module:
        plan = {n: top_channels(s, k) for n, s, k in zip(ctx.layers, scores, keep_counts(widths, ratio))}
        return apply_plan(ctx.model, ctx.layers, plan, ctx.example)

    low, high = 0.0, 1.0  # the FLOPs ratio grows with the keep ratio
    if ctx.flops_ratio(build(low)) > target:
        raise UnreachableBudget(f"--target flops={target:g} is below what pruning these layers can reach "
                                f"(one channel per layer gives flops={ctx.flops_ratio(build(low)):.3f})",
                                ctx.flops_ratio(build(low)))
    for _ in range(20):
        mid = (low + high) / 2
        if ctx.flops_ratio(build(mid)) <= target:
            low = mid
        else:
            high = mid
    model = build(low)
    if not ctx.within_floor(model):
        best = _best_under_floor(ctx, build)
        raise UnreachableBudget(f"--target flops={target:g} is unreachable with --keep-task-floor {ctx.floor:g}: "
                                f"the best reachable is flops={best:.3f}", best)
    return model, low


def _best_under_floor(ctx: PruneContext, build: Callable[[float], nn.Module]) -> float:
    """Lowest FLOPs ratio on a 5% grid of keep ratios whose model stays within the floor."""
    best = 1.0
    for step in range(19, 0, -1):
        model = build(step / 20)
        if not ctx.within_floor(model):
            break
        best = ctx.flops_ratio(model)
    return best
