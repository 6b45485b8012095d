"""Batched building blocks: many independent small MLPs (experts, task towers) run as one op.

Stacked weights and ``torch.baddbmm`` replace a Python loop over experts or tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}


def activation(name: str) -> nn.Module:
    """An activation module by name (relu, gelu, silu, tanh, identity)."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(in_dim: int, hidden: Sequence[int], act: str = "relu", dropout: float = 0.0) -> nn.Sequential:
    """Plain MLP ``in_dim -> hidden[0] -> ... -> hidden[-1]`` with an activation after each layer."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), activation(act)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers)


class BatchedLinear(nn.Module):
    """``n`` independent linear maps applied in one batched matmul.

    Input ``(B, in)`` (the same input for every map) or ``(n, B, in)``; output ``(n, B, out)``.
    Each map is initialised like ``nn.Linear`` (Kaiming-uniform weight, uniform bias).
    """

    def __init__(self, n: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        nn.init.uniform_(self.weight, -bound, bound)  # same bound nn.Linear's default init gives
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            out = torch.matmul(x, self.weight)  # (B,in) @ (n,in,out) broadcasts to (n,B,out)
        else:
            out = torch.bmm(x, self.weight)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"n={self.n}, in_features={self.in_features}, out_features={self.out_features}"


class BatchedMLP(nn.Module):
    """``n`` independent MLPs of the same shape, evaluated together: ``(B,in)|(n,B,in) -> (n,B,out)``.

    ``hidden`` lists the hidden widths; ``out`` is the width of the last layer (no activation
    after it unless ``final_activation``).
    """

    def __init__(
        self,
        n: int,
        in_features: int,
        hidden: Sequence[int],
        out: int | None = None,
        act: str = "relu",
        dropout: float = 0.0,
        final_activation: bool = False,
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden] + ([out] if out is not None else [])
        if len(widths) < 2:
            raise ConfigError("BatchedMLP needs at least one layer (hidden widths or out)")
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(BatchedLinear(n, widths[i], widths[i + 1]))
            last = i == len(widths) - 2
            if not last or final_activation or out is None:
                layers.append(activation(act))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)
        self.out_features = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
