"""Which channels of a model can be pruned, and torch-pruning's dependency graph over them.

The shape surgery is torch-pruning's (Fang et al., "DepGraph: Towards Any Structural Pruning",
CVPR 2023; ``torch-pruning`` 1.6): its :class:`~torch_pruning.DependencyGraph` traces the model
once and finds every tensor a removed channel touches. polytask's batched layers
(:class:`~polytask.nn.layers.BatchedLinear`, weight ``(n, in, out)``) are unknown to it, so
:class:`BatchedLinearPruner` tells it how to cut their input and output widths.

A *prunable layer* is a layer whose output channels (hidden units, filters) may be removed:

- ``shared_bottom``: every linear layer of the shared trunk (``bottom``);
- ``mmoe`` / ``omoe``: every layer of the expert bank; a hidden unit of the bank is removed from
  every expert at once (the experts are one stacked tensor, and the last width is the width of the
  mixture every tower reads), which keeps the config's ``expert`` widths the pruned shape;
- a plain module (e.g. a CNN built in Python): the layers the caller names.

Other architectures are refused with the reason (:data:`REFUSED`): PLE/CGC share one ``expert``
width list between levels and banks, MTAN's attention reads the trunk through grouped convolutions,
ESMM/AITM have no shared trunk whose channels could go without changing what a task predicts.
Task towers and gates are not pruned: they are task-specific and small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from polytask.errors import ConfigError
from polytask.nn.layers import BatchedLinear

#: architectures whose pruned widths map back to their config (``model.params``)
SUPPORTED = ("shared_bottom", "hps", "single_task", "mmoe", "omoe")

#: why the others are refused (one line each); architectures not listed get the generic line
REFUSED = {
    "esmm": "its CTCVR output is the product of two towers' probabilities, so there is no trunk of channels to "
            "prune without changing what each task predicts",
    "aitm": "its information-transfer attention couples the towers, which have no shared trunk to prune",
    "mtan": "its attention modules read the trunk channels through per-task grouped convolutions and reshapes "
            "that torch-pruning's dependency graph cannot follow",
    "ple": "its expert outputs reach the next level through stream slices and gate products that torch-pruning's "
           "graph maps to the wrong channels (it would cut the gates), and one 'expert' width list serves every "
           "level and expert bank",
    "cgc": "its specific and shared expert banks share one 'expert' width list, so widths pruned per bank could "
           "not be recorded in the config",
}


class BatchedLinearPruner:
    """torch-pruning pruning function for :class:`BatchedLinear` (weight ``(n, in, out)``, bias
    ``(n, 1, out)``): output channels are the last dimension, input channels the middle one, the
    same indices in each of the ``n`` stacked maps."""

    def __new__(cls):  # build the subclass lazily: torch_pruning is imported only when pruning
        import torch_pruning as tp

        class _Pruner(tp.pruner.function.BasePruningFunc):
            TARGET_MODULES = (BatchedLinear,)

            def prune_out_channels(self, layer: BatchedLinear, idxs: Sequence[int]) -> BatchedLinear:
                keep = _kept(layer.out_features, idxs, layer.weight.device)
                layer.weight = nn.Parameter(layer.weight.data.index_select(2, keep).contiguous())
                if layer.bias is not None:
                    layer.bias = nn.Parameter(layer.bias.data.index_select(2, keep).contiguous())
                layer.out_features = len(keep)
                return layer

            def prune_in_channels(self, layer: BatchedLinear, idxs: Sequence[int]) -> BatchedLinear:
                keep = _kept(layer.in_features, idxs, layer.weight.device)
                layer.weight = nn.Parameter(layer.weight.data.index_select(1, keep).contiguous())
                layer.in_features = len(keep)
                return layer

            def get_out_channels(self, layer: BatchedLinear) -> int:
                return layer.out_features

            def get_in_channels(self, layer: BatchedLinear) -> int:
                return layer.in_features

        return _Pruner()


def _kept(width: int, removed: Sequence[int], device: torch.device) -> torch.Tensor:
    gone = set(int(i) for i in removed)
    return torch.tensor([i for i in range(width) if i not in gone], dtype=torch.long, device=device)


@dataclass
class Layer:
    """One prunable layer: its dotted name in the model and its current output width."""

    name: str
    module: nn.Module

    @property
    def width(self) -> int:
        m = self.module
        return m.out_features if isinstance(m, (nn.Linear, BatchedLinear)) else m.out_channels


def prunable_layers(model: nn.Module, arch: str | None = None, names: Sequence[str] | None = None) -> list[Layer]:
    """The prunable layers of ``model`` (see the module docstring); ``names`` picks them in a plain
    module. ConfigError naming ``arch`` when the architecture cannot be pruned."""
    modules = dict(model.named_modules())
    if names is not None:
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"prune layers: no module named {missing[0]!r} in the model")
        return [Layer(n, modules[n]) for n in names]
    if arch not in SUPPORTED:
        why = REFUSED.get(arch or "", "it is not one of the architectures pruning supports "
                                        f"({', '.join(SUPPORTED)})")
        raise ConfigError(f"model.arch: cannot prune architecture {arch!r}: {why}")
    prefix = "bottom." if arch in ("shared_bottom", "hps", "single_task") else "experts."
    kinds = (nn.Linear, BatchedLinear)
    return [Layer(n, m) for n, m in modules.items() if n.startswith(prefix) and isinstance(m, kinds)]


def dependency_graph(model: nn.Module, example_inputs):
    """torch-pruning's DependencyGraph of ``model`` traced on ``example_inputs``, with the
    batched-layer pruner registered."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    # a gate's output weighs whole experts: it meets the expert outputs in a broadcast product that
    # torch-pruning would read as an element-wise op coupling the gate's E outputs with the experts'
    # H channels; tracing it detached keeps the gates out of every group (they are never pruned)
    hooks = [m.register_forward_hook(lambda _m, _i, out: out.detach()) for m in gate_modules(model)]
    try:
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, customized_pruners={BatchedLinear: BatchedLinearPruner()},
            verbose=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return graph


def gate_modules(model: nn.Module) -> list[nn.Module]:
    """The routing gates of a mixture-of-experts model (none elsewhere)."""
    return [m for name in ("gates", "gate") if isinstance(m := getattr(model, name, None), nn.Module)]


def out_pruning_fn(graph, module: nn.Module):
    """The function of ``graph`` that removes output channels of ``module`` (the registered
    pruner's own: the graph matches dependencies by function)."""
    pruner = graph.get_pruner_of_module(module)
    if pruner is None:
        raise ConfigError(f"prune: cannot prune the outputs of a {type(module).__name__}")
    return pruner.prune_out_channels
