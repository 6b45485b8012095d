"""PAGCP: performance-aware global channel pruning of a multi-task model.

Ye, Zhang, Chen, Fan, Wang, "Performance-aware Approximation of Global Channel Pruning for
Multitask CNNs", IEEE TPAMI 45(8), 2023. The global objective (remove the channels whose joint
removal costs the least, every task's performance as a constraint) is approximated greedily, one
layer at a time:

1. **FLOPs-aware order.** Each layer's FLOPs contribution is the FLOPs removed by masking a probe
   fraction (30%) of its channels; layers are visited from the largest contribution down (the
   order is reversed when the threshold schedule decreases, λ > 1, as in the authors' code).
2. **Task-aware saliency**, recomputed on the model pruned so far (the sequential approximation of
   the inter-layer joint saliency): a first-order Taylor score per task (Molchanov et al. 2017),
   normalised per task to sum to one so that tasks of different loss scales count alike; a
   channel is as salient as it is for the task that needs it most (the max over tasks), so a
   channel goes only when no task needs it.
3. **Performance-aware oracle criterion.** The layer's ratio grows over ``ratios`` (5%, 10%, ...,
   95%) until some task's validation loss exceeds ``(1 + θ_l)`` times its loss before this layer;
   the last ratio under the constraint is kept. θ grows from layer to layer, ``θ_{l+1} = λ θ_l``,
   with ``λ`` fixed by ``Π_{l<L} (1 + θ_0 λ^l) = τ`` (``τ = initial_thres``: the product of the
   allowed per-layer loss growths over the pass).

The defaults are the authors' (``initial_rate`` θ_0 = 0.06, ``initial_thres`` τ = 6, ratios
0.05..0.95 in 19 steps, probe 0.3; https://github.com/HankYe/PAGCP, compress.py / sensitivity.py).

Where this differs: the paper and code have no FLOPs budget (each run of the threshold-driven pass
prunes what the constraint allows, and the README repeats the command round after round). Here the
pass stops as soon as the FLOPs ratio reaches ``target`` (the last layer keeps just enough channels
to meet it) and, while it is above the target, another round starts with θ_0 raised by
``rate_slope`` (the code's ``initial_rate + rate_slope · round``). The code's final top-k filter
(re-apply only the 80% of layers with the best loss-per-FLOPs ratio) would undo part of a budget,
so it is not applied. The code ranks channels within a layer by their L1/L2 norm; the paper's
per-task sensitivity is followed instead (step 2). With ``--keep-task-floor`` the floor is a second
constraint on each step, on the main validation metrics.

**Relaxed rounds (ours).** A relative loss limit can stall a pass: θ grows only after a layer was
pruned (as in the code), so when the first layer of a pass cannot lose even 5% of its channels
within ``1 + θ_0`` (a task whose validation loss is near zero, where one channel multiplies it),
every layer of the pass is held to θ_0 and ``rounds`` rounds of ``+rate_slope`` may end far above
the target (benchmarks/prune.py's PLE, validation MSE ~0.025: 5% of the tied hidden units cost 1.3-2x a
task's loss, so 20 rounds (θ_0 <= 1.2) stop at flops 0.913 for a 0.3 target; the authors' losses, YOLO's,
are far from zero). To keep PAGCP comparable at a FLOPs budget, after the ``rounds`` rounds of the
authors' schedule every per-layer limit of the last round is multiplied by ``relax`` (2), then 4,
8, ... (``θ_l = relax^k · θ_0 · λ^l``, θ_0 and λ of the last round) for at most ``relax_rounds``
(10) more rounds; ``limit`` records the scale and θ_0 finally used (scale 1: the authors' schedule
met the target). The task floor is never relaxed; a target still unmet raises UnreachableBudget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from polytask.prune import importance
from polytask.prune.core import PRUNERS, PruneContext, UnreachableBudget, apply_plan, top_channels


def threshold_growth(initial_rate: float, layers: int, initial_thres: float) -> float:
    """``λ`` with ``Π_{l<layers} (1 + initial_rate · λ^l) = initial_thres`` (bisection on log λ)."""
    if layers <= 1:
        return 1.0

    def product(lam: float) -> float:
        out = 1.0
        for l in range(layers):
            out *= 1 + initial_rate * lam ** l
        return out

    low, high = 1e-6, 1e6
    for _ in range(200):
        mid = (low * high) ** 0.5
        if product(mid) < initial_thres:
            low = mid
        else:
            high = mid
    return (low * high) ** 0.5


def task_aware_saliency(per_task: Tensor) -> Tensor:
    """``(T, C)`` per-task scores -> ``(C,)``: each task's scores normalised to sum 1, max over tasks."""
    total = per_task.sum(1, keepdim=True)
    share = torch.where(total > 0, per_task / total.clamp_min(torch.finfo(per_task.dtype).tiny), 0.0)
    return share.amax(0)


@PRUNERS.register("pagcp")
@dataclass
class PAGCP:
    """PAGCP (Ye et al., TPAMI 2023); see the module docstring.

    Args:
        initial_rate: θ_0, the first layer's allowed relative loss growth per task.
        initial_thres: τ, the product of the per-layer growths ``(1 + θ_l)`` over one pass.
        ratios: the pruning ratios tried in each layer, in increasing order.
        probe: the fraction masked to measure a layer's FLOPs contribution.
        rate_slope: θ_0 grows by this each further round (until the FLOPs target is met).
        rounds: rounds of the authors' schedule (θ_0 raised by ``rate_slope`` each).
        relax: factor on every per-layer limit in each relaxed round after those (2: x2, x4, ...).
        relax_rounds: most relaxed rounds before the budget is declared unreachable (0: none).
        rows: rows of the train split the saliency is computed on.
    """

    initial_rate: float = 0.06
    initial_thres: float = 6.0
    ratios: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
    probe: float = 0.3
    rate_slope: float = 0.06
    rounds: int = 20
    relax: float = 2.0
    relax_rounds: int = 10
    rows: int = 1024
    log: list[dict] = field(default_factory=list, repr=False)
    limit: dict | None = field(default=None, repr=False)

    def prune(self, ctx: PruneContext, target: float) -> nn.Module:
        model, self.limit = ctx.model, None
        for round_, theta0, scale in self.schedule():
            lam = threshold_growth(theta0, len(ctx.layers), self.initial_thres)
            model = self._pass(ctx, model, target, theta0 * scale, lam, round_, scale)
            self.limit = {"round": round_, "theta0": theta0, "scale": scale}
            if ctx.flops_ratio(model) <= target:
                return model
        reached = ctx.flops_ratio(model)
        why = (f"under --keep-task-floor {ctx.floor:g}" if ctx.floor is not None
               else f"under PAGCP's loss constraint in {self.rounds} rounds and {self.relax_rounds} relaxed ones "
                    f"(limits up to x{self.relax ** self.relax_rounds:g})")
        raise UnreachableBudget(f"--target flops={target:g} is unreachable {why}: the best reachable is "
                                f"flops={reached:.3f}", reached)

    def schedule(self) -> list[tuple[int, float, float]]:
        """``(round, θ_0, scale)`` of every round: the authors' ``θ_0 = initial_rate + rate_slope · round``,
        then the last θ_0 with its limits scaled by ``relax^k`` (the module docstring's relaxed rounds)."""
        rates = [self.initial_rate + self.rate_slope * r for r in range(self.rounds)]
        last = rates[-1] if rates else self.initial_rate
        relaxed = [(self.rounds + k - 1, last, self.relax ** k) for k in range(1, self.relax_rounds + 1)]
        return [(r, rate, 1.0) for r, rate in enumerate(rates)] + relaxed

    def order(self, ctx: PruneContext, model: nn.Module, lam: float) -> list[str]:
        """Layers by FLOPs contribution (largest first; smallest first when λ > 1)."""
        base = ctx.cost(model).flops
        widths = ctx.widths(model)
        gain = {}
        for name in ctx.layers:
            keep = max(1, widths[name] - int(round(self.probe * widths[name])))
            probe = apply_plan(model, ctx.layers, {name: list(range(keep))}, ctx.example)
            gain[name] = base - ctx.cost(probe).flops
        return sorted(ctx.layers, key=lambda n: gain[n], reverse=lam <= 1)

    def _pass(self, ctx: PruneContext, model: nn.Module, target: float, theta0: float, lam: float,
              round_: int, scale: float = 1.0) -> nn.Module:
        theta = theta0
        base = ctx.losses(model)
        for name in self.order(ctx, model, lam):
            if ctx.flops_ratio(model) <= target:
                break
            layer = ctx.modules(model)[ctx.layers.index(name)]  # a module, or a tied layer's members
            per_task = importance.taylor_per_task(model, [layer], ctx.score_data, ctx.tasks, self.rows)[0]
            saliency = task_aware_saliency(per_task)
            width = saliency.numel()
            accepted, accepted_keep, losses = None, width, base
            for ratio in self.ratios:
                keep = width - int(round(ratio * width))
                if keep < 1 or keep >= accepted_keep:
                    continue
                candidate = apply_plan(model, ctx.layers, {name: top_channels(saliency, keep)}, ctx.example)
                cand_losses = ctx.losses(candidate)
                within = bool((cand_losses <= (1 + theta) * base).all())  # a NaN loss is outside
                if not within or not ctx.within_floor(candidate):
                    break  # the oracle criterion: the previous ratio is this layer's
                accepted, accepted_keep, losses = candidate, keep, cand_losses
                if ctx.flops_ratio(candidate) <= target:
                    accepted, accepted_keep = self._just_enough(ctx, model, name, saliency, keep, width, target)
                    losses = ctx.losses(accepted)
                    break
            self.log.append({"round": round_, "scale": scale, "layer": name, "theta": theta, "width": width,
                             "kept": accepted_keep, "loss_ratio": (losses / base.clamp_min(1e-30)).tolist()})
            if accepted is not None:
                model = accepted
                base = torch.maximum(base, losses)
                theta *= lam
        return model

    def _just_enough(self, ctx: PruneContext, model: nn.Module, name: str, saliency: Tensor, low: int, high: int,
                     target: float) -> tuple[nn.Module, int]:
        """The most channels in ``[low, high)`` for which the FLOPs ratio is at most ``target``
        (``low`` meets it); bisection, since FLOPs grow with the channels kept."""
        best = low
        lo, hi = low + 1, high - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = apply_plan(model, ctx.layers, {name: top_channels(saliency, mid)}, ctx.example)
            if ctx.flops_ratio(trial) <= target:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return apply_plan(model, ctx.layers, {name: top_channels(saliency, best)}, ctx.example), best
