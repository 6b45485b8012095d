"""Multi-Task Attention Network (MTAN) for convolutional trunks.

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import chain

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from polytask.errors import ConfigError, DataError
from polytask.nn.base import MultiTaskModel, TaskHeads, check_widths
from polytask.nn.ragged import RaggedBanks
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


def _conv(cin: int, cout: int, kernel: int, groups: int = 1, act: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act if act is not None else nn.ReLU())


def _stage_widths(name: str, widths: Sequence[int] | None, default: Sequence[int]) -> tuple[int, ...]:
    """One width per block for ``model.params.<name>`` (``default`` when left out)."""
    if widths is None:
        return tuple(default)
    widths = check_widths(name, widths)
    if len(widths) != len(default):
        raise ConfigError(f"model.params.{name} needs one width per block ({len(default)}), got {list(widths)!r}")
    return widths


def _task_widths(widths: Mapping[str, Sequence[int]], tasks: Sequence[Task], blocks: int) -> list[tuple[int, ...]]:
    """``model.params.attention_widths``: one list of per-block widths per task, keyed by task name."""
    names = [t.name for t in tasks]
    if not isinstance(widths, Mapping) or sorted(widths) != sorted(names):
        got = sorted(widths) if isinstance(widths, Mapping) else type(widths).__name__
        raise ConfigError(f"model.params.attention_widths needs one entry per task {names}, got {got}")
    for name in names:
        if not isinstance(widths[name], Sequence) or isinstance(widths[name], str):
            raise ConfigError(f"model.params.attention_widths.{name} must be a list of positive integers, "
                              f"got {widths[name]!r}")
    return [_stage_widths(f"attention_widths.{name}", widths[name], (1,) * blocks) for name in names]


class TaskAttention(nn.Module):
    """The attention modules of one block with a hidden width per task (``attention_widths``): task
    ``t``'s ``g`` (1×1 conv-BN-ReLU to its own width) and ``h`` (1×1 conv-BN-sigmoid to the block's
    channels) in ``tasks.t``; the same computation as the grouped form, each task's group a module.

    Input and output are task-stacked like the grouped convs': ``(N, T·A, H, W) -> (N, T·C, H, W)``.
    The groups differ in width, so no grouped conv holds them as they are. The forward gathers the
    tasks' parameters into the grouped layout with every task's ``g`` padded to the widest one
    (zero filters, zero batch-norm scale and shift: a padded unit outputs 0, and the zero inputs of
    the ``h`` conv ignore it), then runs the grouped form's ops: a fixed number of ops whatever the
    number of tasks, the padding costing multiply-adds only. In training the batch norms' running
    statistics are written back to each task's module (one fused copy). With a hook on any of its
    modules (pruning's activation scores, torch-pruning's op counter, which then counts the exact
    per-task convs) or a batch norm with ``momentum=None``, the tasks run one after the other
    (:meth:`looped`, the reference)."""

    def __init__(self, attn_in: int, hidden: Sequence[int], out: int) -> None:
        super().__init__()
        self.tasks = nn.ModuleList(nn.Sequential(_conv(attn_in, h, 1), _conv(h, out, 1, act=nn.Sigmoid()))
                                   for h in hidden)
        self._slots: tuple | None = None  # (widths, device) -> padded slot table, rebuilt when pruned

    def looped(self, x: Tensor) -> Tensor:
        parts = x.chunk(len(self.tasks), dim=1)
        return torch.cat([task(part) for task, part in zip(self.tasks, parts)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if RaggedBanks.hooked([self]) or any(task[i][1].momentum is None for task in self.tasks for i in (0, 1)):
            return self.looped(x)
        g = [task[0] for task in self.tasks]  # conv-BN-ReLU per task (a list of modules, no compute)
        h = [task[1] for task in self.tasks]
        slots = self._padded_slots([m[0].out_channels for m in g], x.device)
        t, width = len(self.tasks), slots[0].numel() // len(self.tasks)
        hidden = F.conv2d(x, _gather_rows(torch.cat([m[0].weight for m in g]), slots[0]),
                          _gather_rows(torch.cat([m[0].bias for m in g]), slots[0]), groups=t)
        hidden = F.relu(_batch_norm(hidden, [m[1] for m in g], slots))
        w_h = torch.cat([m[0].weight for m in h], dim=1)  # (C, Σ h_t, 1, 1): task t's inputs in its slots
        w_h = _gather_rows(w_h.transpose(0, 1), slots[0]).reshape(t, width, -1).transpose(1, 2)
        mask = F.conv2d(hidden, w_h.reshape(-1, width, 1, 1), torch.cat([m[0].bias for m in h]), groups=t)
        return torch.sigmoid(_batch_norm(mask, [m[1] for m in h], None))

    def _padded_slots(self, widths: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """``slots`` ``(T · max width,)``: task ``t``'s unit ``k`` at ``t · max + k``, pointing at its row
        of the concatenated parameters; padding points one past them, at the zero row
        :func:`_gather_rows` adds. ``real`` ``(Σ widths,)``: where each row sits among the slots."""
        key = (tuple(widths), device)
        if self._slots is None or self._slots[0] != key:
            wide, starts = max(widths), [sum(widths[:i]) for i in range(len(widths))]
            slots = [starts[i] + k if k < w else sum(widths) for i, w in enumerate(widths) for k in range(wide)]
            real = [i * wide + k for i, w in enumerate(widths) for k in range(w)]
            self._slots = (key, (torch.tensor(slots, device=device), torch.tensor(real, device=device)))
        return self._slots[1]


def _gather_rows(rows: Tensor, slots: Tensor | None, pad: float = 0.0) -> Tensor:
    """``rows[slots]`` along dim 0, where the slot ``len(rows)`` reads a row of ``pad``; ``rows`` as
    they are for ``slots=None``."""
    if slots is None:
        return rows
    return torch.cat([rows, rows.new_full((1, *rows.shape[1:]), pad)]).index_select(0, slots)


def _batch_norm(x: Tensor, norms: Sequence[nn.BatchNorm2d], slots: tuple[Tensor, Tensor] | None) -> Tensor:
    """The tasks' batch norms as one over the padded channels (scale and shift 0 at padding, mean 0
    and variance 1 there); in training, the updated running statistics go back to each module."""
    first, gather = norms[0], None if slots is None else slots[0]
    weight = _gather_rows(torch.cat([m.weight for m in norms]), gather)
    bias = _gather_rows(torch.cat([m.bias for m in norms]), gather)
    mean = _gather_rows(torch.cat([m.running_mean for m in norms]), gather)
    var = _gather_rows(torch.cat([m.running_var for m in norms]), gather, pad=1.0)
    if not first.training:
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, first.eps)
    out = F.batch_norm(x, mean, var, weight, bias, True, first.momentum, first.eps)  # updates mean, var
    with torch.no_grad():  # back to each task's buffers: one fused copy, no loop over tasks
        if slots is not None:
            mean, var = mean.index_select(0, slots[1]), var.index_select(0, slots[1])
        widths = [m.num_features for m in norms]
        torch._foreach_copy_([m.running_mean for m in norms] + [m.running_var for m in norms],
                             [*mean.split(widths), *var.split(widths)])
        torch._foreach_add_([m.num_batches_tracked for m in norms], 1)
    return out


@ARCHITECTURES.register("mtan")
class MTAN(MultiTaskModel):
    """A shared convolutional trunk of blocks, with one soft-attention module per task and block.

    Trunk block ``j`` computes ``u_j`` (first conv) and ``p_j`` (block output). Task ``t``'s mask
    ``a_j^t = h_j(g_j([u_j ; â_{j-1}^t]))`` (two 1×1 conv-BN layers, ReLU then sigmoid; block 1
    reads ``u_1`` only) selects the task's features ``â_j^t = f_j(a_j^t ⊙ p_j)`` where ``f_j`` is a
    3×3 conv-BN-ReLU to the next block's width followed by 2×2 max-pooling (eqs. 1-2 of the paper).
    The attention modules of all tasks run as one grouped convolution (``groups = T``). Each task's
    last attended map is average-pooled and read by its tower.

    Inputs are images ``(N, C, H, W)``; ``input_dim`` is the channel count ``C``.
    Parameters: the trunk is shared; attention modules and towers are task-specific.
    ``shared_features``: the trunk's last feature map ``p_L`` ``(N, C_L, H_L, W_L)``.

    Args:
        input_dim: input channels; channels: width of each trunk block's output ``p_j`` (one block
        per entry), which is also the width of every task's mask ``a_j^t`` (they multiply channel by
        channel); tower: hidden widths of each task tower.
        u_channels: width of each block's first conv ``u_j`` (default: ``channels``).
        attention_channels: width of each block's attention hidden layer ``g_j``, per task
        (default: ``channels``).
        attention_widths: instead of ``attention_channels``, each task's own ``g_j`` widths,
        ``{task: [one per block]}`` (what ``polytask prune`` records after cutting a task's
        attention units); the blocks are then :class:`TaskAttention` modules.
        transfer_channels: width of each block's attended features ``â_j`` (the output of ``f_j``;
        default: the next block's ``channels``, the last block's own); the towers read the last one.
        The three exist so that a pruned trunk (``polytask prune``: ``u_j`` and ``p_j`` channels)
        is described by its config; left out, the model is the paper's, one width per block.
    """

    def __init__(self, input_dim: int, tasks: Sequence[Task], channels: Sequence[int] = (16, 32, 64),
                 tower: Sequence[int] = (), u_channels: Sequence[int] | None = None,
                 attention_channels: Sequence[int] | None = None,
                 transfer_channels: Sequence[int] | None = None,
                 attention_widths: Mapping[str, Sequence[int]] | None = None) -> None:
        super().__init__(tasks)
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ConfigError(f"input_dim: mtan needs the number of image channels (int), got {input_dim!r}")
        channels = check_widths("channels", channels)
        u_w = _stage_widths("u_channels", u_channels, channels)
        hidden = _stage_widths("attention_channels", attention_channels, channels)
        moved = _stage_widths("transfer_channels", transfer_channels, (*channels[1:], channels[-1]))
        t = self.num_tasks = len(self.tasks)
        self.in_channels = input_dim
        ins = [input_dim, *channels[:-1]]  # block j reads p_{j-1} (pooled)
        self.trunk_u = nn.ModuleList(_conv(ins[j], u_w[j], 3) for j in range(len(channels)))
        self.trunk_p = nn.ModuleList(_conv(u_w[j], c, 3) for j, c in enumerate(channels))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        attn_in = [u_w[j] + (moved[j - 1] if j > 0 else 0) for j in range(len(channels))]  # [u_j ; â_{j-1}]
        if attention_widths is not None and attention_channels is not None:
            raise ConfigError("model.params.attention_widths: give it or attention_channels, not both, "
                              f"got attention_channels={list(attention_channels)!r}")
        if attention_widths is not None:
            per_task = _task_widths(attention_widths, self.tasks, len(channels))
            self.attention = nn.ModuleList(TaskAttention(attn_in[j], [w[j] for w in per_task], c)
                                           for j, c in enumerate(channels))
        else:
            self.attention = nn.ModuleList(
                nn.Sequential(_conv(t * attn_in[j], t * hidden[j], 1, groups=t),
                              _conv(t * hidden[j], t * c, 1, groups=t, act=nn.Sigmoid()))
                for j, c in enumerate(channels)
            )
        # f_j maps block j's attended features to â_j (by default the next block's width)
        self.transfer = nn.ModuleList(_conv(t * c, t * moved[j], 3, groups=t) for j, c in enumerate(channels))
        self.heads = TaskHeads(self.tasks, moved[-1], check_widths("tower", tower, True))

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.heads.parameters(), self.attention.parameters(), self.transfer.parameters())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DataError(f"input: mtan expects images (N, {self.in_channels}, H, W), got {shape}")
        t, n = self.num_tasks, x.shape[0]
        h, att = x, None  # att: (N, T*C, H, W), tasks stacked along channels
        for j, (conv_u, conv_p) in enumerate(zip(self.trunk_u, self.trunk_p)):
            u = conv_u(h)
            p = conv_p(u)
            u_t = u.unsqueeze(1).expand(n, t, *u.shape[1:])
            inp = u_t if att is None else torch.cat([u_t, att.reshape(n, t, -1, *att.shape[2:])], dim=2)
            mask = self.attention[j](inp.reshape(n, -1, *u.shape[2:]))  # (N, T*C, H, W)
            selected = mask * p.repeat(1, t, 1, 1)
            att = self.pool(self.transfer[j](selected))
            h = self.pool(p)
        self.shared_features = p
        pooled = att.reshape(n, t, -1, *att.shape[2:]).mean(dim=(3, 4))  # (N, T, C_L)
        return self.heads(pooled.transpose(0, 1))
