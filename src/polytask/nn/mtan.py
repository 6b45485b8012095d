"""Multi-Task Attention Network (MTAN) for convolutional trunks.

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
        input_dim: input channels; channels: width of each trunk block (one block per entry);
        tower: hidden widths of each task tower.
    """

    def __init__(self, input_dim: int, tasks: Sequence[Task], channels: Sequence[int] = (16, 32, 64),
                 tower: Sequence[int] = ()) -> None:
        super().__init__(tasks)
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ConfigError(f"input_dim: mtan needs the number of image channels (int), got {input_dim!r}")
        channels = check_widths("channels", channels)
        t = self.num_tasks = len(self.tasks)
        self.in_channels = input_dim
        widths = [input_dim, *channels]
        self.trunk_u = nn.ModuleList(_conv(widths[j], widths[j + 1], 3) for j in range(len(channels)))
        self.trunk_p = nn.ModuleList(_conv(widths[j + 1], widths[j + 1], 3) for j in range(len(channels)))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        attn_in = [c + (c if j > 0 else 0) for j, c in enumerate(channels)]  # [u_j ; â_{j-1}] widths
        self.attention = nn.ModuleList(
            nn.Sequential(_conv(t * attn_in[j], t * c, 1, groups=t), _conv(t * c, t * c, 1, groups=t, act=nn.Sigmoid()))
            for j, c in enumerate(channels)
        )
        # f_j maps block j's attended features to block j+1's width (the last one keeps its width)
        self.transfer = nn.ModuleList(
            _conv(t * c, t * (channels[j + 1] if j + 1 < len(channels) else c), 3, groups=t)
            for j, c in enumerate(channels)
        )
        self.heads = TaskHeads(self.tasks, channels[-1], check_widths("tower", tower, True))

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
            c = u.shape[1]
            u_t = u.unsqueeze(1).expand(n, t, *u.shape[1:])
            inp = u_t if att is None else torch.cat([u_t, att.reshape(n, t, c, *att.shape[2:])], dim=2)
            mask = self.attention[j](inp.reshape(n, -1, *u.shape[2:]))  # (N, T*C, H, W)
            selected = mask * p.repeat(1, t, 1, 1)
            att = self.pool(self.transfer[j](selected))
            h = self.pool(p)
        self.shared_features = p
        pooled = att.reshape(n, t, -1, *att.shape[2:]).mean(dim=(3, 4))  # (N, T, C_L)
        return self.heads(pooled.transpose(0, 1))
