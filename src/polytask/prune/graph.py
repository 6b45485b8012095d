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
- ``ple`` / ``cgc``: the *hidden* layers of the experts (every ``expert`` width but the last). One
  ``expert`` list serves every level and both banks (task-specific and shared), so depth ``k`` is
  one *tied* layer named by a pattern, ``levels.*.*_experts.layers.K``, whose members are that
  layer in every bank of every level. A plan keeps one list of unit indices per layer, so a unit
  index goes from every member at once, as MMoE removes it from every expert; its importance is
  the sum over the members (:mod:`polytask.prune.importance`). The experts' output width stays:
  it is what the gates mix, what the next level reads and what the towers read. Each member is
  cut by a graph traced on its own expert bank (:func:`prune_bank_units`), so the group is the
  layer's outputs and the next expert layer's inputs, nothing else, by construction. (A graph of
  the whole PLE groups a hidden unit the same way, but it follows an expert *output* channel
  through the stream slices and gate products onto the gates' outputs, as torch-pruning 1.6 reads
  the ``(T, B, E) x (E, B, H)`` broadcast product as element-wise; a bank is also faster to trace.)
  A PLE built with ``bank_widths`` (what ``polytask prune`` prunes: :mod:`polytask.prune.banks`)
  has one such tied layer per bank (each task's, the shared one) and depth, tied over the levels
  only, so each bank keeps its own width;
- ``mtan``: both convs of every trunk block (``trunk_u.J.0``, ``trunk_p.J.0``); a channel goes
  with its batch norm, the next convs' inputs and the same channel of every task's attention
  input, mask and attended features (:mod:`polytask.prune.mtan`, a group written from the
  architecture, as torch-pruning cannot follow the task stack), and the config records the
  per-block widths (``channels``, ``u_channels`` and the kept task-specific widths);
- ``task_token``: whole heads of every attention (``layers.I.self_attn``, ``layers.I.cross_attn``;
  :mod:`polytask.prune.heads`): the model is pruned with :class:`~polytask.nn.task_token.HeadAttention`
  layers, and a head is the unit a plan keeps or removes (a layer's "width" is its head count);
- a plain module (e.g. a CNN built in Python): the layers the caller names.

Other architectures are refused with the reason (:data:`REFUSED`): ESMM/AITM have no shared trunk
whose channels could go without changing what a task predicts. Task towers and gates are not
pruned: they are task-specific and small.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from polytask.errors import ConfigError
from polytask.nn.layers import BatchedLinear
from polytask.nn.mtan import MTAN
from polytask.nn.task_token import HeadAttention
from polytask.prune import banks, heads, mtan
from polytask.prune.importance import Coupled

#: architectures whose pruned widths map back to their config (``model.params``)
SUPPORTED = ("shared_bottom", "hps", "single_task", "mmoe", "omoe", "ple", "cgc", "mtan", "task_token",
             "task_token_attention")

#: why the others are refused (one line each); architectures not listed get the generic line
REFUSED = {
    "esmm": "its CTCVR output is the product of two towers' probabilities, so there is no trunk of channels to "
            "prune without changing what each task predicts",
    "aitm": "its information-transfer attention couples the towers, which have no shared trunk to prune",
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
    """One prunable layer: its name in the model and its member modules (one, or the tied layers a
    pattern name covers: see the module docstring), which share one output width."""

    name: str
    members: list[tuple[str, nn.Module]]

    @property
    def module(self) -> nn.Module:
        return self.members[0][1]

    @property
    def tied(self) -> bool:
        return is_pattern(self.name)

    coupled: list[nn.Module] = field(default_factory=list)

    @property
    def target(self) -> nn.Module | list[nn.Module] | Coupled:
        """What importance functions score: the module, the list of tied members, or the module
        with the task-stacked layers whose outputs lose its channels (MTAN)."""
        if self.coupled:
            return Coupled(self.module, self.coupled)
        return [m for _, m in self.members] if self.tied else self.module

    @property
    def width(self) -> int:
        return _out_width(self.module)


def _out_width(m: nn.Module) -> int:
    if isinstance(m, HeadAttention):  # its units are heads
        return m.num_heads
    return m.out_features if isinstance(m, (nn.Linear, BatchedLinear)) else m.out_channels


def is_pattern(name: str) -> bool:
    """Whether a layer name is a pattern covering tied layers (PLE/CGC expert depths)."""
    return "*" in name


def resolve(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs a layer name covers (fnmatch for a pattern); ConfigError if none."""
    if is_pattern(name):
        found = [(n, m) for n, m in model.named_modules() if fnmatch.fnmatchcase(n, name)]
    else:
        module = dict(model.named_modules()).get(name)
        found = [] if module is None else [(name, module)]
    if not found:
        raise ConfigError(f"prune layers: no module named {name!r} in the model")
    widths = {_out_width(m) for _, m in found}
    if len(widths) > 1:
        raise ConfigError(f"prune layers: the modules {name!r} covers have different widths {sorted(widths)}")
    return found


def prunable_layers(model: nn.Module, arch: str | None = None, names: Sequence[str] | None = None) -> list[Layer]:
    """The prunable layers of ``model`` (see the module docstring); ``names`` picks them in a plain
    module (a name with ``*`` ties the modules it matches). ConfigError naming ``arch`` when the
    architecture cannot be pruned."""
    if names is not None:
        return [_layer(model, n) for n in names]
    if arch not in SUPPORTED:
        why = REFUSED.get(arch or "", "it is not one of the architectures pruning supports "
                                        f"({', '.join(SUPPORTED)})")
        raise ConfigError(f"model.arch: cannot prune architecture {arch!r}: {why}")
    if arch in ("ple", "cgc"):
        return [Layer(n, resolve(model, n)) for n in _expert_hidden_patterns(model, arch)]
    if arch == "mtan":
        return [_layer(model, n) for n in mtan.layer_names(model)]
    if arch in ("task_token", "task_token_attention"):
        if not heads.has_head_attention(model):
            raise ConfigError("model.params.attention_heads: task_token heads are pruned in HeadAttention layers; "
                              "rebuild the model with attention_heads (polytask.prune.run.prunable_form does)")
        return [_layer(model, n) for n in heads.attention_layer_names(model)]
    prefix = "bottom." if arch in ("shared_bottom", "hps", "single_task") else "experts."
    kinds = (nn.Linear, BatchedLinear)
    return [Layer(n, [(n, m)]) for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, kinds)]


def _layer(model: nn.Module, name: str) -> Layer:
    members = resolve(model, name)
    coupled = mtan.coupled_outputs(model, name) if isinstance(model, MTAN) else []
    return Layer(name, members, coupled)


def _expert_hidden_patterns(model: nn.Module, arch: str) -> list[str]:
    """``levels.*.*_experts.layers.K`` for every expert layer but the last (the output width stays).
    Every bank of every level is built from the same ``expert`` widths, so the indices are the same."""
    level = model.levels[0]
    if banks.is_banked(model):
        bank = level.task_experts[0]
    else:
        bank = level.specific_experts if level.specific_experts is not None else level.shared_experts
    linear = [i for i, m in enumerate(bank.layers) if isinstance(m, BatchedLinear)]
    if len(linear) < 2:
        raise ConfigError(f"model.params.expert: {arch} experts have one layer (width {bank.out_features}); only "
                          f"hidden units inside the experts are pruned (the output width is what the gates mix and "
                          f"the next level and the towers read), so expert needs at least two widths")
    if banks.is_banked(model):  # one tied layer per bank and depth (see prune/banks.py)
        return banks.hidden_patterns(model, linear[:-1])
    return [f"levels.*.*_experts.layers.{i}" for i in linear[:-1]]


def prune_bank_units(model: nn.Module, member: str, removed: Sequence[int]) -> None:
    """Remove output units ``removed`` of the expert-bank layer ``member`` (``...experts.layers.K``) in
    place, through a dependency graph traced on its bank alone: the group is the layer's outputs and
    the next layer's inputs, and cannot reach gates, other banks or the next level."""
    bank = model.get_submodule(member.rsplit(".layers.", 1)[0])
    layer = model.get_submodule(member)
    first = next(m for m in bank.modules() if isinstance(m, BatchedLinear))
    example = first.weight.new_zeros(2, first.in_features)
    graph = dependency_graph(bank, (example,))
    graph.get_pruning_group(layer, out_pruning_fn(graph, layer), idxs=list(removed)).prune()


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
