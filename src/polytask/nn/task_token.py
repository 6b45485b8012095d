"""Task-token attention: each task owns a learned token that attends over the feature tokens.

After INFNet (Li, Mao, Tang, Cheng, Zeng, Wang, Liu, Jiang, "INFNet: A Task-aware Information
Flow Network for Large-Scale Recommendation Systems", arXiv:2508.11565, 2025) and MultiTab
(Sinodinos et al., "MultiTab: A Scalable Foundation for Multitask Learning on Tabular
Data", arXiv 2025): features become tokens (categorical, sequence, dense), task tokens read them
with cross-attention, and each task's head reads its own token. This is the shared core of both
designs, not a reproduction of either: INFNet's proxy tokens and gated units and MultiTab's
masked multi-token attention are not implemented.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.nn.base import MultiTaskModel, TaskHeads, check_positive, check_widths
from polytask.nn.embedding import FeatureEmbedding, FeatureSpec, input_layer
from polytask.nn.moe import per_task
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


class FeatureTokenizer(nn.Module):
    """Turns an input into ``(B, F, d_model)`` feature tokens.

    Every dense column becomes one token ``x_i · w_i + b_i`` (the numeric tokenizer of Gorishniy
    et al., "Revisiting Deep Learning Models for Tabular Data", NeurIPS 2021), done for all columns
    in one broadcast product; every categorical / sequence feature's (pooled) embedding is
    projected to ``d_model`` by its own linear map.
    """

    def __init__(self, input_dim: int | FeatureSpec, d_model: int) -> None:
        super().__init__()
        self.input = input_layer(input_dim)
        if isinstance(self.input, FeatureEmbedding):
            spec = self.input.spec
            n_dense = sum(f.dim for f in spec.dense)
            self.project = nn.ModuleList(nn.Linear(f.embed_dim, d_model) for f in spec.embedded)
        else:
            n_dense = self.input.output_dim
            self.project = nn.ModuleList()
        self.num_dense = n_dense
        self.dense_weight = nn.Parameter(torch.randn(n_dense, d_model) / d_model**0.5)
        self.dense_bias = nn.Parameter(torch.zeros(n_dense, d_model))
        self.num_tokens = n_dense + len(self.project)

    def forward(self, x: Tensor | dict[str, Tensor]) -> Tensor:
        if isinstance(self.input, FeatureEmbedding):
            dense, embedded = self.input.fields(x)
        else:
            dense, embedded = self.input(x), []
        tokens = []
        if dense is not None and self.num_dense:
            tokens.append(dense.unsqueeze(-1) * self.dense_weight + self.dense_bias)
        if embedded:  # one small projection per feature (tables differ in width)
            tokens.append(torch.stack([proj(e) for proj, e in zip(self.project, embedded)], dim=1))
        return torch.cat(tokens, dim=1)


class HeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al., "Attention Is All You Need", NeurIPS 2017) whose heads
    can be fewer than ``d_model / head_dim``: ``heads`` heads of width ``head_dim`` read and write
    ``d_model``-wide tokens. Removing a head (Michel, Levy, Neubig, "Are Sixteen Heads Really
    Better than One?", NeurIPS 2019) removes its rows of the q/k/v projections and its columns of
    the output projection; the token width stays.

    The computation and parameter names are ``nn.MultiheadAttention``'s (batch first, no
    ``bias_k``/``bias_v``): ``in_proj_weight`` ``(3 · heads · head_dim, d_model)``, ``in_proj_bias``,
    ``out_proj``; with every head it computes what ``nn.MultiheadAttention(d_model, heads)`` does
    with the same state dict (tests/test_prune_heads.py). The heads' outputs ``(B, heads, L,
    head_dim)`` pass through ``head_output`` (an identity), where a head's importance is read.
    Returns ``(output, attention averaged over heads (B, Lq, Lk) or None)``.
    """

    def __init__(self, d_model: int, head_dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_dim, self.head_dim, self.num_heads, self.dropout = d_model, head_dim, heads, dropout
        inner = heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        self.out_proj = nn.Linear(inner, d_model)
        self.head_output = nn.Identity()
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = True
                ) -> tuple[Tensor, Tensor | None]:
        b, lq, h, dh = query.shape[0], query.shape[1], self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def split(x: Tensor, w: Tensor, bias: Tensor) -> Tensor:  # (B, L, d) -> (B, heads, L, head_dim)
            return F.linear(x, w, bias).reshape(b, x.shape[1], h, dh).transpose(1, 2)

        q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
        attn = torch.softmax((q * dh ** -0.5) @ k.transpose(-2, -1), dim=-1)  # (B, heads, Lq, Lk)
        attn = F.dropout(attn, self.dropout, self.training)
        heads = self.head_output(attn @ v)
        # F.linear, not self.out_proj(...): the FLOPs hook counts the whole attention once
        out = F.linear(heads.transpose(1, 2).reshape(b, lq, h * dh), self.out_proj.weight, self.out_proj.bias)
        return out, attn.mean(1) if need_weights else None

    def extra_repr(self) -> str:
        return f"d_model={self.embed_dim}, heads={self.num_heads}, head_dim={self.head_dim}"


class TaskTokenLayer(nn.Module):
    """Feature tokens: self-attention + FFN (pre-norm). Task tokens: cross-attention to the
    updated feature tokens + FFN (pre-norm). Task tokens do not attend to each other, so each stays its
    task's own. Returns ``(features, tasks, attention of tasks over features (B, T, F))``.
    ``heads``: the (self, cross) attentions' head counts, of width ``d_model / num_heads`` each, as
    :class:`HeadAttention` (a pruned layer); None: ``nn.MultiheadAttention`` with ``num_heads``."""

    def __init__(self, d_model: int, num_heads: int, ffn: int, dropout: float,
                 heads: Sequence[int] | None = None) -> None:
        super().__init__()
        self.norm_f1, self.norm_f2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.norm_t1, self.norm_t2, self.norm_kv = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        if heads is None:
            self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
            self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        else:
            self.self_attn = HeadAttention(d_model, d_model // num_heads, heads[0], dropout)
            self.cross_attn = HeadAttention(d_model, d_model // num_heads, heads[1], dropout)
        self.ffn_f = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model), nn.Dropout(dropout))
        self.ffn_t = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model), nn.Dropout(dropout))

    def forward(self, feats: Tensor, tasks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f = self.norm_f1(feats)
        feats = feats + self.self_attn(f, f, f, need_weights=False)[0]
        feats = feats + self.ffn_f(self.norm_f2(feats))
        kv = self.norm_kv(feats)  # task tokens read the updated feature tokens
        read, attn = self.cross_attn(self.norm_t1(tasks), kv, kv, need_weights=True)
        tasks = tasks + read
        tasks = tasks + self.ffn_t(self.norm_t2(tasks))
        return feats, tasks, attn


def _check_heads(heads: Sequence[Sequence[int]] | None, layers: int, num_heads: int) -> list[tuple[int, int]] | None:
    """``model.params.attention_heads``: one (self, cross) pair per layer, each in 1..num_heads."""
    if heads is None:
        return None
    pairs = [tuple(p) if isinstance(p, (list, tuple)) else p for p in heads]
    if len(pairs) != layers or any(not isinstance(p, tuple) or len(p) != 2 or any(
            isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= num_heads for h in p) for p in pairs):
        raise ConfigError(f"model.params.attention_heads needs one [self, cross] pair of head counts in "
                          f"1..{num_heads} per layer ({layers}), got {list(heads)!r}")
    return pairs


@ARCHITECTURES.register("task_token", "task_token_attention")
class TaskTokenAttention(MultiTaskModel):
    """Learned task tokens attend over feature tokens; each task's tower reads its own token.

    Feature tokens come from :class:`FeatureTokenizer` (dense columns, categorical and sequence
    features). ``num_layers`` :class:`TaskTokenLayer`\\ s update feature tokens with self-attention
    and task tokens with cross-attention over them; all tasks attend in one batched attention call.

    Parameters: tokenizer, embeddings and the feature/attention layers are shared; the task tokens
    and towers are task-specific. ``shared_features``: the final task tokens ``(T, B, d_model)``,
    slice ``t`` read by task ``t``. ``attention_weights[task]``: the last layer's attention of the
    task's token over the feature tokens ``(B, F)`` (averaged over heads), also exposed as
    ``gate_weights`` for :func:`~polytask.nn.diagnostics.expert_usage` (features in place of experts).

    Args:
        input_dim: dense width or a FeatureSpec; d_model: token width; num_heads: attention heads
        (must divide d_model); num_layers: layers (>= 1); ffn: hidden width of the feed-forward
        blocks; tower: hidden widths of each task tower; dropout.
        attention_heads: per layer, the heads kept in its (self, cross) attention, each of width
        ``d_model / num_heads`` (:class:`HeadAttention`); ``polytask prune`` writes it. Left out,
        every attention is ``nn.MultiheadAttention`` with ``num_heads`` heads.
    """

    def __init__(self, input_dim: int | FeatureSpec, tasks: Sequence[Task], d_model: int = 32, num_heads: int = 4,
                 num_layers: int = 2, ffn: int = 64, tower: Sequence[int] = (32,), dropout: float = 0.0,
                 attention_heads: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__(tasks)
        check_positive("d_model", d_model)
        check_positive("num_heads", num_heads)
        check_positive("num_layers", num_layers)
        check_positive("ffn", ffn)
        if d_model % num_heads:
            raise ConfigError(f"model.params.num_heads ({num_heads}) must divide model.params.d_model ({d_model})")
        self.tokenizer = FeatureTokenizer(input_dim, d_model)
        self.task_tokens = nn.Parameter(torch.randn(len(self.tasks), d_model) * 0.02)
        heads = _check_heads(attention_heads, num_layers, num_heads)
        self.layers = nn.ModuleList(
            TaskTokenLayer(d_model, num_heads, ffn, dropout, None if heads is None else heads[i])
            for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.heads = TaskHeads(self.tasks, d_model, check_widths("tower", tower, True), "relu", dropout)

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        return chain(self.heads.parameters(), [self.task_tokens])

    def forward(self, x: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        feats = self.tokenizer(x)  # (B, F, d)
        tasks = self.task_tokens.unsqueeze(0).expand(feats.shape[0], -1, -1)  # (B, T, d)
        attn = None
        for layer in self.layers:  # layers are sequential by design
            feats, tasks, attn = layer(feats, tasks)
        z = self.norm(tasks).transpose(0, 1)  # (T, B, d)
        self.attention_weights = per_task(self.task_names, attn.transpose(0, 1))
        self.gate_weights = self.attention_weights
        self.shared_features = z
        return self.read_heads(z)
