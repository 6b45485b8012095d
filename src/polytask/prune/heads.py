"""Whole attention heads of the task-token model (:class:`polytask.nn.task_token.HeadAttention`).

A head is removed as Michel, Levy, Neubig ("Are Sixteen Heads Really Better than One?", NeurIPS
2019) mask it: its ``head_dim`` rows of the q, k and v projections and its ``head_dim`` columns
of the output projection go; the token width ``d_model`` (the residual stream every LayerNorm,
FFN and tower reads) stays. torch-pruning 1.6.1 has no such cut for ``nn.MultiheadAttention``: its
``MultiheadAttentionPruner`` removes channels of ``embed_dim``, which there is both the inner width
and the token width (so the residual stream, every LayerNorm and FFN would shrink with it), and
its head pruning (``BasePruner(prune_num_heads=True, num_heads={...})``) works on separate q/k/v
``nn.Linear`` layers, not on the fused ``in_proj_weight``. Hence :class:`HeadAttention` (inner
width ``heads · head_dim`` apart from ``d_model``) and this cut of our own module.

Importance per head (higher = keep): L1 of its q/k/v rows and output columns (:func:`head_l1`);
Taylor (per task, or of the summed loss) on the head's output, ``|Σ a · ∂L/∂a|`` over its
positions and ``head_dim`` channels, per row: the first-order change of the loss when the head's
output is removed, Michel et al.'s ``|∂L/∂ξ_h|`` for a per-row head gate ``ξ``
(:mod:`polytask.prune.importance`, which reads it at ``head_output``). FLOPs: :func:`attention_flops`,
torch-pruning's count for ``nn.MultiheadAttention`` with the inner width apart from ``d_model``.

A run trained with ``nn.MultiheadAttention`` is first rebuilt with :class:`HeadAttention` at every
head (the same state dict), then pruned; the pruned config records ``attention_heads``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polytask.nn.task_token import HeadAttention


def attention_layer_names(model: nn.Module) -> list[str]:
    """``layers.I.self_attn`` and ``layers.I.cross_attn`` of every layer, in forward order."""
    return [f"layers.{i}.{kind}" for i in range(len(model.layers)) for kind in ("self_attn", "cross_attn")]


def has_head_attention(model: nn.Module) -> bool:
    return all(isinstance(model.get_submodule(n), HeadAttention) for n in attention_layer_names(model))


def _head_rows(module: HeadAttention, heads: Sequence[int]) -> Tensor:
    """Rows of ``in_proj_weight`` (q, k and v blocks) that belong to ``heads``."""
    inner, dh = module.num_heads * module.head_dim, module.head_dim
    cols = torch.tensor([h * dh + i for h in heads for i in range(dh)], dtype=torch.long)
    return torch.cat([cols + part * inner for part in range(3)]).to(module.in_proj_weight.device)


def prune_heads(module: HeadAttention, removed: Sequence[int]) -> None:
    """Remove heads ``removed`` of ``module`` in place (their q/k/v rows and output columns)."""
    gone = set(int(h) for h in removed)
    kept = [h for h in range(module.num_heads) if h not in gone]
    rows = _head_rows(module, kept)
    cols = _head_rows(module, kept)[: len(kept) * module.head_dim]  # the q block's indices = the inner columns
    module.in_proj_weight = nn.Parameter(module.in_proj_weight.data.index_select(0, rows).contiguous())
    module.in_proj_bias = nn.Parameter(module.in_proj_bias.data.index_select(0, rows).contiguous())
    out = module.out_proj
    out.weight = nn.Parameter(out.weight.data.index_select(1, cols).contiguous())
    out.in_features = len(cols)
    module.num_heads = len(kept)


def head_l1(module: HeadAttention) -> Tensor:
    """``(heads,)``: L1 norm of each head's q, k, v projection rows and output projection columns."""
    h, dh = module.num_heads, module.head_dim
    w_in = module.in_proj_weight.detach().abs().sum(1).reshape(3, h, dh).sum((0, 2))
    w_out = module.out_proj.weight.detach().abs().sum(0).reshape(h, dh).sum(1)
    return (w_in + w_out).cpu()


def attention_flops(module: HeadAttention, inputs, output) -> None:
    """torch-pruning 1.6's ``multihead_attention_counter_hook`` with the inner width ``heads ·
    head_dim`` apart from ``d_model`` (the same number when every head is there): q scaling, the
    three projections and their biases, per head ``QKᵀ``, softmax and ``AV``, and the output
    projection with its bias."""
    q, k, v = inputs[:3]
    batch, lq, lk, lv = q.shape[0], q.shape[1], k.shape[1], v.shape[1]
    d, inner, dh = module.embed_dim, module.num_heads * module.head_dim, module.head_dim
    flops = lq * inner + (lq + lk + lv) * d * inner + (lq + lk + lv) * inner
    flops += module.num_heads * (lq * lk * dh + lq * lk + lq * lk * dh)
    flops += lq * d * (inner + 1)
    module.__flops__ += int(flops * batch)


def head_counts(model: nn.Module) -> list[list[int]]:
    """``model.params.attention_heads``: each layer's (self, cross) head counts."""
    return [[layer.self_attn.num_heads, layer.cross_attn.num_heads] for layer in model.layers]


def with_head_attention(model: nn.Module, build) -> nn.Module:
    """``model`` (``nn.MultiheadAttention`` layers) rebuilt with :class:`HeadAttention` at every head
    and its weights: ``build(attention_heads)`` builds the model from its config with them."""
    full = [[layer.self_attn.num_heads, layer.cross_attn.num_heads] for layer in model.layers]
    rebuilt = build(full)
    rebuilt.load_state_dict(model.state_dict())  # the same parameter names
    return rebuilt.train(model.training)
