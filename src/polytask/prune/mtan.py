"""MTAN's trunk channels and the task-stacked layers each one couples (Liu, Johns, Davison,
"End-to-End Multi-Task Learning with Attention", CVPR 2019; :class:`polytask.nn.mtan.MTAN`).

Block ``j`` of the trunk has two prunable layers, whose channels go with these tensors:

- ``trunk_u.J.0`` (``u_j``): its own filters and batch norm, the inputs of ``p_j``'s conv, and
  the ``u_j`` part of every task's attention input (``[u_j ; â_{j-1}]``: the first ``u_j``
  channels of each task's group of the grouped 1×1 conv);
- ``trunk_p.J.0`` (``p_j``, the block output): its own filters and batch norm, the next block's
  ``u`` conv inputs, and, because every task's mask multiplies ``p_j`` channel by channel, the
  same channel of every task's mask (the second attention conv's outputs in each task's group,
  and its batch norm) and of every task's attended features ``a_j^t ⊙ p_j`` (the inputs of
  ``f_j``, in each task's group).

The attention and transfer convolutions stack the tasks along channels (``groups = T``), so a
trunk channel ``c`` of width ``C`` is channel ``t·C + c`` of each task-stacked tensor. torch-pruning
1.6's graph cannot follow ``p_j.repeat(1, T, 1, 1)`` and the reshapes of the task stack, so the
group is written here, once, from the architecture; every cut is torch-pruning's own
(``prune_conv_out_channels``, ``prune_batchnorm_out_channels``, ``prune_conv_in_channels``, which
for a grouped conv removes the same in-group index from every group, as needed here). In the
per-task form below, the same indices go from each task's own attention input and mask conv.

**Task attention units.** Each task's attention hidden layer ``g_j`` (the 1×1 conv-BN-ReLU between
``[u_j ; â_{j-1}^t]`` and the mask conv ``h_j``) is a prunable layer of its own, with its own width
per task: ``attention.J.tasks.I.0.0`` (task ``I``, block ``J``). This needs the model in the form
with ``model.params.attention_widths`` (:class:`polytask.nn.mtan.TaskAttention`, one conv pair per
task); :func:`per_task_copy` rebuilds a grouped MTAN in that form with its weights, the same
function. A unit goes with its batch norm and the inputs of the same task's mask conv, nothing
else: torch-pruning's graph, traced on that task's attention module alone, finds this group. A
unit serves one task, so only that task's loss has a gradient at it (its per-task Taylor score is
zero for every other task) and removing it changes only that task's prediction: PAGCP's per-task
loss constraint then binds the owning task alone. The attended features ``f_j`` and the towers are
not pruned. FLOPs are counted on each task's own convs (torch-pruning's counter hooks them, which
runs the tasks one by one); the per-task form's forward otherwise runs all tasks at once, each
task's ``g_j`` padded to the widest task's (:class:`~polytask.nn.mtan.TaskAttention`), so the
multiply-adds it executes in block ``j`` follow the widest task there, not the sum.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from polytask.nn.mtan import TaskAttention

#: (function, module, indices) of one cut; the list of cuts of one channel set is its group
Cut = tuple[Callable, nn.Module, list[int]]


def trunk_layer_names(model: nn.Module) -> list[str]:
    """``trunk_u.J.0`` and ``trunk_p.J.0`` of every block, in forward order."""
    return [f"{kind}.{j}.0" for j in range(len(model.trunk_u)) for kind in ("trunk_u", "trunk_p")]


def is_per_task(model: nn.Module) -> bool:
    """Whether each task's attention modules are their own (built with ``attention_widths``)."""
    return isinstance(model.attention[0], TaskAttention)


def attention_layer_names(model: nn.Module) -> list[str]:
    """Each task's attention hidden conv ``g_j`` (``attention.J.tasks.I.0.0``), block by block; none
    in the grouped form."""
    if not is_per_task(model):
        return []
    return [f"attention.{j}.tasks.{i}.0.0" for j, block in enumerate(model.attention) for i in range(len(block.tasks))]


def layer_names(model: nn.Module) -> list[str]:
    """Every prunable layer: the trunk's (:func:`trunk_layer_names`), then the tasks' attention units."""
    return trunk_layer_names(model) + attention_layer_names(model)


def _stacked(idxs: Sequence[int], width: int, tasks: int) -> list[int]:
    """Channel ``c`` of a ``width``-wide trunk tensor in every task's group of a task-stacked one."""
    return [t * width + c for t in range(tasks) for c in idxs]


def group(model: nn.Module, name: str, removed: Sequence[int]) -> list[Cut]:
    """The cuts that remove output channels ``removed`` of trunk layer ``name`` consistently."""
    import torch_pruning as tp

    kind, j, _ = name.split(".")
    j, t, idxs = int(j), model.num_tasks, sorted(int(i) for i in removed)
    block = getattr(model, kind)[j]
    width = block[0].out_channels
    cuts: list[Cut] = [(tp.prune_conv_out_channels, block[0], idxs), (tp.prune_batchnorm_out_channels, block[1], idxs)]
    attention = model.attention[j]
    if kind == "trunk_u":  # u_j feeds p_j's conv and the head of every task's attention input
        cuts.append((tp.prune_conv_in_channels, model.trunk_p[j][0], idxs))
        if is_per_task(model):  # u_j channels come first in each task's input
            return cuts + [(tp.prune_conv_in_channels, task[0][0], idxs) for task in attention.tasks]
        attn_in = attention[0][0]
        per_task = attn_in.in_channels // t  # u_j channels come first in each task's group
        return cuts + [(tp.prune_conv_in_channels, attn_in, _stacked(idxs, per_task, t))]
    stacked = _stacked(idxs, width, t)
    if is_per_task(model):  # the same channel of each task's mask
        for task in attention.tasks:
            cuts += [(tp.prune_conv_out_channels, task[1][0], idxs),
                     (tp.prune_batchnorm_out_channels, task[1][1], idxs)]
    else:
        cuts += [(tp.prune_conv_out_channels, attention[1][0], stacked),
                 (tp.prune_batchnorm_out_channels, attention[1][1], stacked)]
    cuts.append((tp.prune_conv_in_channels, model.transfer[j][0], stacked))
    if j + 1 < len(model.trunk_u):
        cuts.append((tp.prune_conv_in_channels, model.trunk_u[j + 1][0], idxs))
    return cuts


def prune_trunk_channels(model: nn.Module, name: str, removed: Sequence[int]) -> None:
    """Remove output channels ``removed`` of layer ``name`` and every coupled channel, in place: a
    trunk layer through :func:`group`, a task's attention unit through :func:`prune_attention_units`."""
    if name.startswith("attention."):
        prune_attention_units(model, name, removed)
        return
    for fn, module, idxs in group(model, name, removed):
        fn(module, idxs)


def prune_attention_units(model: nn.Module, name: str, removed: Sequence[int]) -> None:
    """Remove hidden units ``removed`` of a task's attention conv ``attention.J.tasks.I.0.0``, in place,
    through torch-pruning's graph traced on that task's attention module alone (the group: the
    conv's filters, its batch norm, the inputs of the task's mask conv)."""
    from polytask.prune.graph import dependency_graph, out_pruning_fn

    task = model.get_submodule(name.rsplit(".0.0", 1)[0])
    conv = task[0][0]
    graph = dependency_graph(task, (conv.weight.new_zeros(1, conv.in_channels, 1, 1),))
    graph.get_pruning_group(conv, out_pruning_fn(graph, conv), idxs=sorted(int(i) for i in removed)).prune()


def coupled_outputs(model: nn.Module, name: str) -> list[nn.Module]:
    """The task-stacked convs whose outputs lose a channel with ``name``'s (every task's mask conv for
    ``p_j``; none for ``u_j`` or a task's attention unit): their filters count in the channel's L1
    importance."""
    kind, j, *_ = name.split(".")
    if kind != "trunk_p":
        return []
    if is_per_task(model):
        return [task[1][0] for task in model.attention[int(j)].tasks]
    return [model.attention[int(j)][1][0]]


_GROUPED = re.compile(r"^attention\.(\d+)\.([01])\.(.+)$")


def per_task_state(state: dict[str, Tensor], num_tasks: int) -> dict[str, Tensor]:
    """A grouped MTAN's state dict in the per-task layout: ``attention.J.K.X`` (``K`` 0: ``g``, 1: ``h``;
    tensors stacked task-major along dim 0, as the grouped convs' outputs and their batch norms are)
    becomes ``attention.J.tasks.I.K.X``; a scalar (``num_batches_tracked``) goes to every task."""
    out = {}
    for key, value in state.items():
        match = _GROUPED.match(key)
        if match is None:
            out[key] = value
            continue
        j, k, rest = match.groups()
        parts = value.chunk(num_tasks, dim=0) if value.ndim else [value] * num_tasks
        for i, part in enumerate(parts):
            out[f"attention.{j}.tasks.{i}.{k}.{rest}"] = part.clone()
    return out


def per_task_copy(model: nn.Module, build: Callable[[dict], nn.Module]) -> nn.Module:
    """``model`` (a grouped MTAN) rebuilt with each task's attention modules its own and its weights:
    ``build(params)`` builds the model from its config's ``model.params`` updated with ``params``
    (``attention_widths``, and ``attention_channels`` set to None)."""
    t = model.num_tasks
    hidden = [block[0][0].out_channels // t for block in model.attention]
    per_task = build({"attention_channels": None,
                      "attention_widths": {task.name: list(hidden) for task in model.tasks}})
    per_task.load_state_dict(per_task_state(model.state_dict(), t))
    return per_task.train(model.training)


def widths(model: nn.Module) -> dict:
    """The ``model.params`` widths that rebuild ``model``'s shapes: ``channels`` (``p_j``),
    ``u_channels``, the attention hidden widths (``attention_channels`` in the grouped form;
    ``attention_widths``, per task, in the per-task form, with ``attention_channels`` set to None)
    and ``transfer_channels``, so that a rebuilt model has them whatever the defaults would say."""
    t = model.num_tasks
    if is_per_task(model):
        return {"channels": [b[0].out_channels for b in model.trunk_p],
                "u_channels": [b[0].out_channels for b in model.trunk_u],
                "attention_channels": None,
                "attention_widths": {task.name: [block.tasks[i][0][0].out_channels for block in model.attention]
                                     for i, task in enumerate(model.tasks)},
                "transfer_channels": [f[0].out_channels // t for f in model.transfer]}
    return {"channels": [b[0].out_channels for b in model.trunk_p],
            "u_channels": [b[0].out_channels for b in model.trunk_u],
            "attention_channels": [a[0][0].out_channels // t for a in model.attention],
            "transfer_channels": [f[0].out_channels // t for f in model.transfer]}
