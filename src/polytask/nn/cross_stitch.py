"""Cross-stitch networks.

Misra, Shrivastava, Gupta, Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.nn.base import MultiTaskModel, TaskHeads, check_widths
from polytask.nn.embedding import FeatureSpec, input_layer
from polytask.nn.layers import BatchedLinear, activation as make_activation
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


@ARCHITECTURES.register("cross_stitch")
class CrossStitch(MultiTaskModel):
    """One MLP column per task; after every hidden layer a cross-stitch unit mixes the columns.

    ``h̃_t = Σ_s α_ts h_s`` with a learnable ``T×T`` matrix ``α`` per layer (eq. 1 of the paper,
    generalised from two tasks to ``T``). The columns of one layer run as one batched matmul and a
    stitch is one ``einsum``. ``α`` starts at ``stitch_self`` on the diagonal and
    ``(1 - stitch_self) / (T - 1)`` elsewhere (the paper's ``α_S = 0.9, α_D = 0.1`` for two tasks);
    with ``stitch_self=1`` the columns start as independent networks.

    Parameters: the columns and stitches are shared (through the stitches every task's loss depends
    on every column); the towers are task-specific. ``shared_features``: the last stitched
    column outputs ``(T, B, H)``, slice ``t`` read by task ``t``'s tower.

    Args:
        input_dim: dense width or a FeatureSpec.
        hidden: widths of each column's layers (>= 1 layer);
        tower: hidden widths of each task tower; stitch_self: initial diagonal of ``α`` in [0, 1];
        activation, dropout: as in the other models.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], hidden: Sequence[int] = (64, 32),
                 tower: Sequence[int] = (), stitch_self: float = 0.9, activation: str = "relu",
                 dropout: float = 0.0) -> None:
        super().__init__(tasks)
        hidden = check_widths("hidden", hidden)
        if not 0.0 <= stitch_self <= 1.0:
            raise ConfigError(f"model.params.stitch_self must lie in [0, 1], got {stitch_self}")
        self.input = input_layer(input_dim)
        t = len(self.tasks)
        widths = [self.input.output_dim, *hidden]
        self.columns = nn.ModuleList(BatchedLinear(t, widths[i], widths[i + 1]) for i in range(len(hidden)))
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        other = (1.0 - stitch_self) / (t - 1) if t > 1 else 0.0
        init = torch.full((t, t), other) + (stitch_self - other) * torch.eye(t)
        self.stitches = nn.ParameterList(nn.Parameter(init.clone()) for _ in hidden)
        self.heads = TaskHeads(self.tasks, hidden[-1], check_widths("tower", tower, True), activation, dropout)

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.input(x)
        for layer, alpha in zip(self.columns, self.stitches):  # layers are sequential by design
            h = self.dropout(self.act(layer(h)))  # (T, B, H)
            h = torch.einsum("ts,sbh->tbh", alpha, h)
        self.shared_features = h
        return self.read_heads(h)
