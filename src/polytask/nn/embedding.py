"""Model inputs: dense vectors, and categorical / sequence features embedded and pooled.

A model receives ``input_dim``: an ``int`` (a dense ``(N, d)`` tensor) or a :class:`FeatureSpec`
(a dict of named feature tensors; the spec and its features are defined in
:mod:`polytask.data.features` and re-exported here). :func:`input_layer` turns either into a module that checks the
input and returns one flat ``(N, D)`` vector, which every architecture then reads. Embedding
tables live in that module, so they count as shared parameters (as in the shared lookup table of
ESMM, Ma et al. SIGIR 2018, and the embedding layer of MMoE/PLE models in recommendation).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from polytask.data.features import (  # noqa: F401  (re-exported: the spec lives in data)
    DenseFeature, Feature, FeatureSpec, Pooling, SequenceFeature, SparseFeature, spec_from_dict)
from polytask.errors import ConfigError, DataError


class FeatureEmbedding(nn.Module):
    """Embeds a dict of feature tensors into one ``(N, spec.output_dim)`` vector.

    One ``nn.Embedding`` table per categorical / sequence feature (tables differ in size, so they
    are separate modules); dense features pass through unchanged.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        self.spec = spec
        self.tables = nn.ModuleDict(
            {f.name: nn.Embedding(f.vocab_size, f.embed_dim,
                                  padding_idx=f.padding_idx if isinstance(f, SequenceFeature) else None)
             for f in spec.embedded}
        )
        self.output_dim = spec.output_dim

    def fields(self, x: Mapping[str, Tensor]) -> tuple[Tensor | None, list[Tensor]]:
        """``(dense (N, Σdim) or None, [one (N, embed_dim) vector per embedded feature])``."""
        if not isinstance(x, Mapping):
            raise DataError("input: this model was built for named features "
                            f"({', '.join(self.spec.names)}); got a {type(x).__name__}, expected a dict")
        missing = [n for n in self.spec.names if n not in x]
        if missing:
            raise DataError(f"input: missing feature(s) {', '.join(map(repr, missing))}")
        dense = [_dense_column(f, x[f.name]) for f in self.spec.dense]
        embedded = [self._embed(f, x[f.name]) for f in self.spec.embedded]
        return (torch.cat(dense, dim=1) if dense else None), embedded

    def _embed(self, f: SparseFeature | SequenceFeature, ids: Tensor) -> Tensor:
        if ids.is_floating_point():
            raise DataError(f"feature {f.name!r}: ids must be integers, got {str(ids.dtype).replace('torch.', '')}")
        table = self.tables[f.name]
        if isinstance(f, SparseFeature):
            if ids.ndim != 1:
                raise DataError(f"feature {f.name!r}: categorical ids must have shape (N,), got {tuple(ids.shape)}")
            return table(ids)
        if ids.ndim != 2:
            raise DataError(f"feature {f.name!r}: sequence ids must have shape (N, L), got {tuple(ids.shape)}")
        return pool_sequence(table(ids), ids != f.padding_idx, f.pooling)

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        dense, embedded = self.fields(x)
        parts = ([dense] if dense is not None else []) + embedded
        return torch.cat(parts, dim=1)


def pool_sequence(emb: Tensor, keep: Tensor, pooling: str) -> Tensor:
    """Pool ``emb (N, L, e)`` over positions where ``keep (N, L)`` is True."""
    w = keep.unsqueeze(-1).to(emb.dtype)
    if pooling == "max":
        masked = emb.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(dim=1)
        return torch.where(keep.any(dim=1, keepdim=True), masked, torch.zeros_like(masked))
    total = (emb * w).sum(dim=1)
    return total if pooling == "sum" else total / w.sum(dim=1).clamp_min(1.0)


def _dense_column(f: DenseFeature, v: Tensor) -> Tensor:
    if v.ndim == 1 and f.dim == 1:
        v = v.unsqueeze(1)
    if v.ndim != 2 or v.shape[1] != f.dim:
        raise DataError(f"feature {f.name!r}: expected shape (N, {f.dim}), got {tuple(v.shape)}")
    return v.to(torch.get_default_dtype()) if not v.is_floating_point() else v


class DenseInput(nn.Module):
    """Checks a dense ``(N, input_dim)`` tensor and passes it through."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.output_dim = input_dim

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise DataError(f"input: this model was built for a dense (N, {self.output_dim}) tensor, "
                            f"got a {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.output_dim:
            raise DataError(f"input: expected shape (N, {self.output_dim}) (model input_dim), got {tuple(x.shape)}")
        return x


def input_layer(input_dim: int | FeatureSpec) -> DenseInput | FeatureEmbedding:
    """The input module for ``input_dim``; its ``output_dim`` is the flat width the model reads."""
    if isinstance(input_dim, FeatureSpec):
        return FeatureEmbedding(input_dim)
    if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
        raise ConfigError(f"input_dim must be a positive int or a FeatureSpec, got {input_dim!r}")
    return DenseInput(input_dim)
