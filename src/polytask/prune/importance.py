"""Channel importance for pruning: per-task first-order Taylor, Taylor of the summed loss, L1, random.

Every function returns, for each prunable layer, a score per output channel (higher = keep);
per-task Taylor returns ``(T, C)``. A layer is a module or, for a tied layer (PLE/CGC: the same
expert depth in every bank and level, which lose a unit index together), the list of its members;
a tied unit's Taylor term is the sum of its members' terms before the absolute value, as an
expert bank's sums over its experts (removing the unit removes it from all of them at once, and
first-order terms add); its L1 norm is the sum over the members. A *coupled* layer (MTAN's block
output ``p_j``, whose channel goes with the same channel of every task's mask) is scored on its own
activation for Taylor (the channel's whole first-order effect passes through it: the masks only
multiply it) and, for L1, with the coupled filters added (its own plus every task's mask filter).

- **Taylor** (Molchanov, Tyree, Karras, Aila, Kautz, "Pruning Convolutional Neural Networks for
  Resource Efficient Inference", ICLR 2017, eq. 7): removing channel ``c`` changes the loss by about
  ``|a_c · ∂L/∂a_c|``, the activation (after the layer's batch norm, if any) times its gradient,
  summed over the channel's spatial
  positions (and, for an expert bank, over the experts, which lose the unit together), its absolute
  value averaged over the rows. Per task, ``L = L_t``; task-agnostic, ``L = Σ_t L_t``, whose
  gradient is the sum of the tasks' ones, so both come from the same per-task products.
- **L1** (Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017):
  the L1 norm of the channel's incoming weights.
- **random**: uniform scores from a seeded generator.

An attention layer's units are its heads (:mod:`polytask.prune.heads`): Taylor is taken on the
heads' outputs ``(B, heads, L, head_dim)``, summed over positions and ``head_dim`` (Michel et al.,
NeurIPS 2019's head importance, per row), L1 over the head's q/k/v rows and output columns.

The per-task gradients take one backward per task (a loop over tasks): this runs once per pruning
decision, outside any training step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from polytask.data.dataset import MultiTaskDataset
from polytask.nn.layers import BatchedLinear
from polytask.nn.task_token import HeadAttention
from polytask.prune.heads import head_l1
from polytask.tasks import Task


@dataclass
class Coupled:
    """A layer with the task-stacked layers whose outputs lose its channels: ``stacked`` modules
    have ``T · C`` outputs, task-major, channel ``c`` of the layer being ``t · C + c`` in each."""

    module: nn.Module
    stacked: list[nn.Module] = field(default_factory=list)


def _channel_last(activation: Tensor, module: nn.Module) -> Tensor:
    """``(B, C)`` per-row sums over everything but rows and channels (spatial positions, experts)."""
    if isinstance(module, BatchedLinear):  # (n, B, C): a unit is removed from all n maps
        return activation.sum(0)
    if activation.ndim > 2:  # (B, C, *spatial)
        return activation.flatten(2).sum(-1)
    return activation


def activation_site(model: nn.Module, layer: nn.Module) -> nn.Module:
    """The module whose output holds ``layer``'s channels as removing them leaves them: the batch
    norm right after the layer when there is one (a removed filter takes its normalised channel,
    shift included, with it: setting the conv output to 0 would leave the shift), else the layer
    (a linear unit's output includes its bias; a following ReLU maps 0 to 0)."""
    entries = list(model.named_modules())
    names = [n for n, m in entries if m is layer]
    if not names:
        return layer
    if isinstance(layer, HeadAttention):  # its heads' outputs (B, heads, L, head_dim)
        return layer.head_output
    index = [m for _, m in entries].index(layer)
    for name, module in entries[index + 1:]:
        if name.startswith(names[0] + "."):
            continue  # a submodule of the layer itself
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_features == _width(layer):
            return module
        return layer
    return layer


def _hook_sites(model: nn.Module, modules: Sequence[nn.Module], captured: dict[int, Tensor]) -> list:
    """Forward hooks keeping, under ``id(layer)``, each layer's activation (see :func:`activation_site`)."""
    def keeper(key: int):
        return lambda _m, _i, out: captured.__setitem__(key, out)

    return [activation_site(model, m).register_forward_hook(keeper(id(m))) for m in modules]


def _scored_batches(model: nn.Module, modules: Sequence[nn.Module], data: MultiTaskDataset, rows: int,
                    batch_size: int) -> Iterator[tuple[Any, dict[str, Tensor], list[Tensor]]]:
    """For each batch of the first ``rows`` rows: the batch, the model's outputs and the hooked
    activations (every member of every layer, in order), with the model in eval mode (dropout off:
    the scores of the model as it predicts); hooks and mode are restored at the end."""
    captured: dict[int, Tensor] = {}
    members = [p for m in modules for p in _parts(m)]
    hooks = _hook_sites(model, members, captured)
    was_training = model.training
    model.eval()
    try:
        for batch in data.subset(torch.arange(min(rows, len(data)))).batches(batch_size):
            outputs = model(batch.inputs)
            yield batch, outputs, [captured[id(p)] for p in members]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def _task_loss(task: Task, outputs: dict[str, Tensor], batch: Any) -> Tensor:
    return task.loss(outputs[task.name], batch.targets[task.name], None if batch.mask is None else batch.mask.get(task.name))


def taylor_per_task(model: nn.Module, modules: Sequence[nn.Module], data: MultiTaskDataset, tasks: Sequence[Task],
                    rows: int = 1024, batch_size: int = 256) -> list[Tensor]:
    """Per-task Taylor scores ``(T, C)`` of each module's output channels, on the first ``rows`` rows."""
    parts = [_parts(m) for m in modules]
    sums = [torch.zeros(len(tasks), _width(m)) for m in modules]
    seen = 0
    for batch, outputs, acts in _scored_batches(model, modules, data, rows, batch_size):
        for t, task in enumerate(tasks):  # one backward per task (see the module docstring)
            grads = torch.autograd.grad(_task_loss(task, outputs, batch), acts, retain_graph=True, allow_unused=True)
            for i, score in enumerate(_layer_scores(parts, acts, grads)):
                sums[i][t] += score
        seen += _rows(batch.inputs)
    return [s / max(seen, 1) for s in sums]


def taylor_summed(model: nn.Module, modules: Sequence[nn.Module], data: MultiTaskDataset, tasks: Sequence[Task],
                  rows: int = 1024, batch_size: int = 256) -> list[Tensor]:
    """Taylor scores ``(C,)`` for the summed loss ``Σ_t L_t`` (task-agnostic)."""
    parts = [_parts(m) for m in modules]
    sums = [torch.zeros(_width(m)) for m in modules]
    seen = 0
    for batch, outputs, acts in _scored_batches(model, modules, data, rows, batch_size):
        total = sum(_task_loss(t, outputs, batch) for t in tasks)
        grads = torch.autograd.grad(total, acts, allow_unused=True)
        for i, score in enumerate(_layer_scores(parts, acts, grads)):
            sums[i] += score
        seen += _rows(batch.inputs)
    return [s / max(seen, 1) for s in sums]


def l1(modules: Sequence[nn.Module | Sequence[nn.Module] | Coupled]) -> list[Tensor]:
    """L1 norm of each output channel's incoming weights (over every member of a tied layer, and
    every task's coupled filter of a coupled layer)."""
    return [sum(_l1_of(p) for p in _parts(m)) + _coupled_l1(m) for m in modules]


def _coupled_l1(layer) -> Tensor | float:
    if not isinstance(layer, Coupled):
        return 0.0
    width = _width(layer)
    return sum(_l1_of(s).reshape(-1, width).sum(0) for s in layer.stacked)


def _l1_of(m: nn.Module) -> Tensor:
    if isinstance(m, HeadAttention):
        return head_l1(m)
    w = m.weight.detach()
    if isinstance(m, BatchedLinear):  # (n, in, out)
        return w.abs().sum((0, 1)).cpu()
    return w.abs().flatten(1).sum(1).cpu()  # (out, in, ...)


def _parts(layer: nn.Module | Sequence[nn.Module] | Coupled) -> list[nn.Module]:
    if isinstance(layer, Coupled):
        return [layer.module]
    return [layer] if isinstance(layer, nn.Module) else list(layer)


def _layer_scores(parts: list[list[nn.Module]], acts: list[Tensor], grads) -> list[Tensor]:
    """Per layer ``(C,)``: Σ_rows |Σ_members a · ∂L/∂a| (summed over channel positions and experts):
    removing a tied unit removes it from every member at once, so the first-order terms of the
    members add before the absolute value, as those of the experts of one bank do. A member the
    loss does not reach (``None`` gradient) adds 0."""
    scores, i = [], 0
    for ps in parts:
        per_row = None
        for p in ps:
            a, g = acts[i], grads[i]
            i += 1
            if g is not None:
                term = _channel_last(a.detach() * g, p)
                per_row = term if per_row is None else per_row + term
        scores.append(torch.zeros(_width(ps[0])) if per_row is None else per_row.abs().sum(0).cpu())
    return scores


def random(modules: Sequence[nn.Module], seed: int = 0) -> list[Tensor]:
    """Uniform random scores (a seeded draw)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(_width(m), generator=g) for m in modules]


def _width(m: nn.Module | Sequence[nn.Module]) -> int:
    m = _parts(m)[0]
    if isinstance(m, HeadAttention):
        return m.num_heads
    return m.out_features if isinstance(m, (nn.Linear, BatchedLinear)) else m.out_channels


def _rows(inputs) -> int:
    return inputs.shape[0] if isinstance(inputs, Tensor) else next(iter(inputs.values())).shape[0]
