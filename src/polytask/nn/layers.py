"""Batched building blocks: many independent small MLPs (experts, task towers) run as one op.

Stacked weights and batched matmuls replace a Python loop over experts or tasks;
:func:`mix_experts` forms gate-weighted sums of expert outputs.
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
            # one (B,in) @ (in, n*out) GEMM (bias fused) instead of n broadcast matmuls: same
            # result, and the backward needs no reduction over a broadcast input
            wide = self.weight.permute(1, 0, 2).reshape(self.in_features, self.n * self.out_features)
            if self.bias is not None:
                out = torch.addmm(self.bias.reshape(-1), x, wide)
            else:
                out = x @ wide
            return out.reshape(x.shape[0], self.n, self.out_features).transpose(0, 1)
        if self.bias is not None:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.bmm(x, self.weight)

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


#: Above this many elements in the ``(E, T, B, H)`` product, :func:`mix_experts` uses ``einsum``.
MIX_BROADCAST_LIMIT = 1 << 26


def mix_experts(weights: Tensor, experts: Tensor) -> Tensor:
    """Gate-weighted sums of expert outputs: ``out[t, b] = Σ_e weights[t, b, e] · experts[e, b]``.

    ``weights``: ``(T, B, E)`` (or ``(B, E)`` for a single mixture); ``experts``: ``(E, B, H)``.
    Returns ``(T, B, H)`` (or ``(B, H)``). As ``einsum("tbe,ebh->tbh")`` this is ``B`` tiny
    matmuls, which CPUs run badly; a broadcast product summed over experts is several times faster
    there, so it is used unless the ``(E, T, B, H)`` intermediate would be large.
    """
    single = weights.ndim == 2
    w = weights.unsqueeze(0) if single else weights
    t, b, e = w.shape
    if e * t * b * experts.shape[-1] <= MIX_BROADCAST_LIMIT:
        out = (w.permute(2, 0, 1).unsqueeze(-1) * experts.unsqueeze(1)).sum(dim=0)
    else:
        out = torch.einsum("tbe,ebh->tbh", w, experts)
    return out[0] if single else out
