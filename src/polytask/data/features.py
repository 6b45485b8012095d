"""What a data set's inputs are: dense columns, categorical ids, id sequences (:class:`FeatureSpec`).

A data set describes its inputs with a :class:`FeatureSpec` (``Splits.input_spec``) and a model
receives it as ``input_dim`` (:func:`polytask.nn.embedding.input_layer` builds the embeddings).
The spec lives in ``data`` so that loaders (CSV, streaming tables) need nothing from ``nn``;
``polytask.nn`` re-exports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from polytask.errors import ConfigError

Pooling = Literal["mean", "sum", "max"]


@dataclass(frozen=True)
class DenseFeature:
    """A real-valued input of ``dim`` columns; its tensor is ``(N,)`` (dim 1) or ``(N, dim)``."""

    name: str
    dim: int = 1


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature: integer ids in ``[0, vocab_size)``, tensor ``(N,)``, embedded to ``embed_dim``."""

    name: str
    vocab_size: int
    embed_dim: int = 16


@dataclass(frozen=True)
class SequenceFeature:
    """A variable-length list of ids, tensor ``(N, L)`` padded with ``padding_idx``, embedded and pooled.

    ``pooling`` is ``mean`` (over non-padding positions), ``sum`` or ``max``. Positions holding
    ``padding_idx`` contribute nothing; an all-padding row pools to zeros.
    """

    name: str
    vocab_size: int
    embed_dim: int = 16
    pooling: Pooling = "mean"
    padding_idx: int = 0


Feature = DenseFeature | SparseFeature | SequenceFeature


@dataclass(frozen=True)
class FeatureSpec:
    """The named input features of a data set; passed to models as ``input_dim``.

    ``output_dim`` is the width of the flat vector :class:`FeatureEmbedding` produces (dense
    columns followed by one embedding per categorical / sequence feature, in spec order).
    """

    features: tuple[Feature, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        if not self.features:
            raise ConfigError("feature spec: needs at least one feature")
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"feature spec: duplicate feature name(s) {', '.join(map(repr, dup))}")
        for f in self.features:
            if isinstance(f, DenseFeature):
                if f.dim < 1:
                    raise ConfigError(f"feature {f.name!r}: dim must be >= 1, got {f.dim}")
                continue
            if f.vocab_size < 1 or f.embed_dim < 1:
                raise ConfigError(f"feature {f.name!r}: vocab_size and embed_dim must be >= 1")
            if isinstance(f, SequenceFeature) and f.pooling not in ("mean", "sum", "max"):
                raise ConfigError(f"feature {f.name!r}: unknown pooling {f.pooling!r}; use mean, sum or max")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def dense(self) -> list[DenseFeature]:
        return [f for f in self.features if isinstance(f, DenseFeature)]

    @property
    def embedded(self) -> list[SparseFeature | SequenceFeature]:
        return [f for f in self.features if not isinstance(f, DenseFeature)]

    @property
    def output_dim(self) -> int:
        return sum(f.dim for f in self.dense) + sum(f.embed_dim for f in self.embedded)


def spec_from_dict(entries: Sequence[Mapping]) -> FeatureSpec:
    """A FeatureSpec from config entries ``{"name", "kind": dense|sparse|sequence, ...}``."""
    kinds = {"dense": DenseFeature, "sparse": SparseFeature, "sequence": SequenceFeature}
    out: list[Feature] = []
    for i, e in enumerate(entries):
        e = dict(e)
        kind = e.pop("kind", None)
        if kind not in kinds:
            raise ConfigError(f"features[{i}]: kind must be one of {', '.join(kinds)}, got {kind!r}")
        try:
            out.append(kinds[kind](**e))
        except TypeError as exc:
            raise ConfigError(f"features[{i}] ({e.get('name')!r}): {exc}") from None
    return FeatureSpec(tuple(out))


__all__ = ["DenseFeature", "Feature", "FeatureSpec", "Pooling", "SequenceFeature", "SparseFeature", "spec_from_dict"]
