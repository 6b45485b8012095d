"""Multi-Task Attention Network (MTAN) for convolutional trunks.

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import chain

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError, DataError
from polytask.nn.base import MultiTaskModel, TaskHeads, check_widths
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
    The groups differ in width, so no grouped conv holds them: the forward runs one conv pair per task
    (a Python loop over tasks; the grouped form, without ``attention_widths``, has none)."""

    def __init__(self, attn_in: int, hidden: Sequence[int], out: int) -> None:
        super().__init__()
        self.tasks = nn.ModuleList(nn.Sequential(_conv(attn_in, h, 1), _conv(h, out, 1, act=nn.Sigmoid()))
                                   for h in hidden)

    def forward(self, x: Tensor) -> Tensor:
        parts = x.chunk(len(self.tasks), dim=1)
        return torch.cat([task(part) for task, part in zip(self.tasks, parts)], dim=1)


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
