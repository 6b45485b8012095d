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
for a grouped conv removes the same in-group index from every group, as needed here). Task-specific
widths (attention hidden layers, attended features, towers) are not pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

#: (function, module, indices) of one cut; the list of cuts of one channel set is its group
Cut = tuple[Callable, nn.Module, list[int]]


def trunk_layer_names(model: nn.Module) -> list[str]:
    """``trunk_u.J.0`` and ``trunk_p.J.0`` of every block, in forward order."""
    return [f"{kind}.{j}.0" for j in range(len(model.trunk_u)) for kind in ("trunk_u", "trunk_p")]


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
    if kind == "trunk_u":  # u_j feeds p_j's conv and the head of every task's attention input
        attn_in = model.attention[j][0][0]
        per_task = attn_in.in_channels // t  # u_j channels come first in each task's group
        cuts += [(tp.prune_conv_in_channels, model.trunk_p[j][0], idxs),
                 (tp.prune_conv_in_channels, attn_in, _stacked(idxs, per_task, t))]
        return cuts
    mask_conv, mask_bn = model.attention[j][1][0], model.attention[j][1][1]
    stacked = _stacked(idxs, width, t)
    cuts += [(tp.prune_conv_out_channels, mask_conv, stacked), (tp.prune_batchnorm_out_channels, mask_bn, stacked),
             (tp.prune_conv_in_channels, model.transfer[j][0], stacked)]
    if j + 1 < len(model.trunk_u):
        cuts.append((tp.prune_conv_in_channels, model.trunk_u[j + 1][0], idxs))
    return cuts


def prune_trunk_channels(model: nn.Module, name: str, removed: Sequence[int]) -> None:
    """Remove output channels ``removed`` of trunk layer ``name`` and every coupled channel, in place."""
    for fn, module, idxs in group(model, name, removed):
        fn(module, idxs)


def coupled_outputs(model: nn.Module, name: str) -> list[nn.Module]:
    """The task-stacked convs whose outputs lose a channel with ``name``'s (every task's mask conv for
    ``p_j``; none for ``u_j``): their filters count in the channel's L1 importance."""
    kind, j, _ = name.split(".")
    return [model.attention[int(j)][1][0]] if kind == "trunk_p" else []


def widths(model: nn.Module) -> dict[str, list[int]]:
    """The ``model.params`` widths that rebuild ``model``'s shapes: ``channels`` (``p_j``),
    ``u_channels``, and the task-specific widths that pruning keeps (``attention_channels``,
    ``transfer_channels``), so that a rebuilt model has them whatever the defaults would say."""
    t = model.num_tasks
    return {"channels": [b[0].out_channels for b in model.trunk_p],
            "u_channels": [b[0].out_channels for b in model.trunk_u],
            "attention_channels": [a[0][0].out_channels // t for a in model.attention],
            "transfer_channels": [f[0].out_channels // t for f in model.transfer]}
