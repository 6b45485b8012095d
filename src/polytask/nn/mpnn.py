"""The message-passing neural network of Gilmer et al. as the QM9 multi-task benchmarks use it.

Gilmer, Schoenholz, Riley, Vinyals & Dahl, "Neural Message Passing for Quantum Chemistry"
(ICML 2017): edge-network messages ``m_ij = A(e_ij) h_j`` with a matrix ``A(e)`` produced by an
MLP of the edge features, a GRU update, and a Set2Set readout (Vinyals, Bengio & Kudlur, ICLR
2016). The configuration is the one of Navon et al., "Multi-Task Learning as a Bargaining Game"
(ICML 2022) and Liu et al., "FAMO" (NeurIPS 2023): Linear 11→64, one edge-network convolution
(edge MLP 5→128→64·64, mean aggregation, root weight) applied 3 times with a shared GRU,
Set2Set with 3 steps, Linear 128→64 as the shared representation, one Linear head per target.

:class:`EdgeNetworkConv` computes exactly what ``torch_geometric.nn.NNConv`` computes (same
parameter names, so state dicts load into each other) but never builds the per-edge 64×64
matrices. With ``A(e) = reshape(W₂ ReLU(W₁e + b₁) + b₂)`` and ``u_e = ReLU(W₁e + b₁)`` (128
values per edge), the message sum of node ``i`` is

    Σ_j A(e_ij)ᵀ h_j = Σ_j Σ_k u_ijk (G_kᵀ h_j) + (Σ_j h_j)ᵀ B₂,

with ``G_k`` the 64×64 slice ``k`` of ``W₂`` and ``B₂`` the reshaped ``b₂``. ``G_kᵀ h_j`` is one
``(nodes, 64) @ (64, 128·64)`` product per node, not per edge, and the sum over ``(j, k)`` is one
batched matmul per molecule on a dense ``(molecules, atoms, atoms·128)`` layout. For the fully
connected QM9 graphs (~300 edges per molecule) this cuts the cost of a convolution several-fold
on CPU (see ``benchmarks/qm9_mpnn_conv.py``). The dense layout costs memory quadratic in the
largest molecule of a batch, so it is meant for small molecules; ``conv="pyg"`` uses NNConv.

For complete graphs grouped by size (a :class:`polytask.data.qm9.GraphBatch` built ``by_size``)
:meth:`EdgeNetworkConv.grouped_context` skips the padding: each run of equally sized molecules is
an exact ``(molecules, atoms, ...)`` block, the self pairs are masked out inside the ReLU, and the
``(rows, 128·64) @ (128·64, 64)`` product is taken per block of at most ``chunk_atoms`` rows so
that its operands stay in cache on a CPU. The bias ``b₂`` rides on one more hidden unit that is 1
on every edge. In the first step the node states are the embedded atom features, which take few
distinct values (30 in QM9): ``W₂`` is then applied to those rows only, after summing ``u_ijk``
over the neighbours of each kind. These are the same sums in another order, so results agree to
float rounding (tests compare with NNConv). On a GPU the padded layout's few large kernels are
faster than one small kernel per size group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import ConfigError, DataError
from polytask.nn.base import MultiTaskModel, TaskHeads
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task


def _require_pyg() -> None:
    import importlib.util

    if importlib.util.find_spec("torch_geometric") is None:
        raise ConfigError(
            "the MPNN needs the optional package torch_geometric: pip install 'polytask[qm9]'"
        )


@dataclass
class EdgeContext:
    """What :class:`EdgeNetworkConv` derives from the edges alone, reused by every step."""

    dense_u: Tensor  # (B, M*K, M): hidden edge features, rows (target i, k), columns source j
    adjacency: Tensor  # (B, M, M): number of edges j -> i
    batch: Tensor  # (A,) graph of each node
    local: Tensor  # (A,) position of each node inside its graph
    inv_degree: Tensor  # (A, 1)
    num_graphs: int
    max_nodes: int


@dataclass
class GroupedEdgeContext:
    """What :class:`EdgeNetworkConv` derives from complete graphs grouped by size.

    Nodes are ordered by graph and graphs by size; ``groups[g] = (graphs, atoms each)`` covers
    the next ``graphs * atoms`` nodes, and ``dense_u[g]`` holds their hidden edge features as
    ``(graphs, atoms*(K+1), atoms)`` (rows: target ``i`` and hidden unit ``k``; columns: source
    ``j``; zero on ``i == j``). Unit ``K`` is 1 on every edge: it carries the bias ``b2``.
    """

    dense_u: list[Tensor]
    groups: list[tuple[int, int]]
    inv_degree: Tensor  # (A, 1)


def _self_loop_mask(n: int, reference: Tensor) -> Tensor:
    """``(n, 1, n)``: -inf on ``i == j``, 0 elsewhere; added before the ReLU it zeroes the self
    pairs exactly (ReLU(-inf) = 0 with a zero gradient) at no extra pass over the edges."""
    mask = torch.zeros(n, n, dtype=reference.dtype, device=reference.device)
    return mask.fill_diagonal_(float("-inf")).view(n, 1, n)  # a scalar fill: no host-to-device copy


class EdgeNetworkConv(nn.Module):
    """Edge-network graph convolution of Gilmer et al. (ICML 2017), mean aggregation.

    ``out_i = (1/|N(i)|) Σ_{j∈N(i)} A(e_ji)ᵀ x_j + W_root x_i + b`` where ``A(e)`` is the
    ``in × out`` matrix produced by the edge MLP ``nn = Sequential(Linear(edge_dim, hidden),
    ReLU(), Linear(hidden, in·out))``. Same result and parameters as
    ``torch_geometric.nn.NNConv(in, out, nn, aggr="mean")``, computed without per-edge matrices
    (module docstring). Edges must join nodes of the same graph (as in any PyG batch).

    ``chunk_atoms`` bounds the rows of one weight product on the grouped path (CPU cache); CUDA
    tensors are processed one size group at a time regardless.
    """

    def __init__(
        self, in_channels: int, out_channels: int, edge_dim: int, hidden: int = 128, chunk_atoms: int = 192
    ) -> None:
        super().__init__()
        if chunk_atoms < 1:
            raise ConfigError(f"EdgeNetworkConv: chunk_atoms must be positive, got {chunk_atoms}")
        self.in_channels, self.out_channels, self.hidden = in_channels, out_channels, hidden
        self.chunk_atoms = chunk_atoms
        self.nn = nn.Sequential(nn.Linear(edge_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_channels * out_channels))
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init for the edge MLP; U(±1/√in) root weight, zero bias (as NNConv)."""
        for layer in (self.nn[0], self.nn[2]):
            layer.reset_parameters()
        bound = 1.0 / math.sqrt(self.in_channels)
        nn.init.uniform_(self.lin.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def edge_context(
        self, edge_index: Tensor, edge_attr: Tensor, batch: Tensor, num_graphs: int, max_nodes: int
    ) -> EdgeContext:
        """Hidden edge features on the dense per-graph layout (depends on the edges only)."""
        src, dst = edge_index[0], edge_index[1]
        num_nodes, m = batch.shape[0], max_nodes
        # index_add_ into a known size: unlike bincount, no host sync on CUDA
        counts = torch.zeros(num_graphs, dtype=batch.dtype, device=batch.device).index_add_(0, batch, torch.ones_like(batch))
        first = counts.cumsum(0) - counts
        local = torch.arange(num_nodes, device=batch.device) - first[batch]
        graph, li, lj = batch[dst], local[dst], local[src]
        u = F.relu(self.nn[0](edge_attr))
        dense = u.new_zeros(num_graphs, m, m, self.hidden)
        dense = dense.index_put((graph, li, lj), u, accumulate=True)  # duplicates add, as messages do
        ones = torch.ones_like(u[:, 0])
        adjacency = u.new_zeros(num_graphs, m, m).index_put_((graph, li, lj), ones, accumulate=True)
        degree = adjacency.sum(2)[batch, local].clamp_min(1.0)
        return EdgeContext(
            dense_u=dense.permute(0, 1, 3, 2).reshape(num_graphs, m * self.hidden, m),
            adjacency=adjacency, batch=batch, local=local, inv_degree=degree.reciprocal().unsqueeze(1),
            num_graphs=num_graphs, max_nodes=m,
        )

    def grouped_context(self, pair_attr: Tensor, groups: Sequence[tuple[int, int]]) -> GroupedEdgeContext:
        """Hidden edge features of complete graphs grouped by size (no padding).

        ``pair_attr`` holds the edge features of every ordered pair ``(i, j)`` of each graph,
        row-major per graph, ``i == j`` included (ignored); ``groups`` lists ``(graphs, atoms
        each)`` in node order (:class:`polytask.data.qm9.GraphBatch` built ``by_size``).
        """
        # one more hidden unit, constant 1 on every edge: it carries the b2 term of A(e)
        k = self.hidden + 1
        weight = torch.cat([self.nn[0].weight, self.nn[0].weight.new_zeros(1, self.nn[0].in_features)])
        bias = torch.cat([self.nn[0].bias, self.nn[0].bias.new_ones(1)])
        blocks, dense_u, start = [], [], 0
        for count, n in groups:
            # rows of at most chunk_atoms nodes per block (all of a size group on CUDA)
            per = count if pair_attr.is_cuda else max(1, self.chunk_atoms // n)
            for first in range(0, count, per):
                blocks.append((min(per, count - first), n))
        for count, n in blocks:
            attr = pair_attr[start : start + count * n * n].view(count * n, n, -1)
            start += count * n * n
            # (count*n, K, n): the hidden units of the pairs of each target row, sources last
            pre = torch.matmul(weight, attr.transpose(1, 2)).view(count, n, k, n)
            pre = pre + (bias.view(1, k, 1) + _self_loop_mask(n, pre))
            dense_u.append(F.relu(pre).view(count, n * k, n))
        if start != pair_attr.shape[0]:
            raise DataError(f"EdgeNetworkConv: groups cover {start} atom pairs but pair_attr has {pair_attr.shape[0]} rows")
        degree = torch.cat([pair_attr.new_full((count * n, 1), float(max(n - 1, 1))) for count, n in blocks])
        return GroupedEdgeContext(dense_u=dense_u, groups=blocks, inv_degree=degree.reciprocal())

    def _propagate_grouped(self, x: Tensor, ctx: GroupedEdgeContext, kinds: tuple[Tensor, Tensor] | None) -> Tensor:
        cin, cout, k = self.in_channels, self.out_channels, self.hidden
        # (K+1, in, out): the slices G_k of W2, then B2 for the constant unit of the context
        w2 = torch.cat([self.nn[2].weight.view(cin, cout, k).permute(2, 0, 1), self.nn[2].bias.view(1, cin, cout)])
        if kinds is not None and kinds[0].shape[0] < cin:
            # x_j = table[kind_j]: sum u_ijk over the sources of each kind q (V_i[k, q]), then
            # apply the Q rows table @ G_k instead of the in-wide x_j (Q < in: fewer products)
            table, kind = kinds
            weight = torch.matmul(table, w2).reshape(-1, cout)  # [(k, q), b]
            sources = F.one_hot(kind, table.shape[0]).to(x.dtype)
        else:
            weight, sources = w2.reshape(-1, cout), x  # [(k, a), b]
        # per block: S[i, (k, a)] = sum_j u_ijk x_j[a], then S @ W while S is still in cache (one
        # (A, K*in) buffer and one big product measure slower on a CPU)
        blocks = sources.split([count * n for count, n in ctx.groups])
        summed = torch.cat([
            torch.bmm(u, block.view(count, n, -1)).view(count * n, -1) @ weight
            for (count, n), u, block in zip(ctx.groups, ctx.dense_u, blocks)
        ])
        return summed * ctx.inv_degree + self.lin(x) + self.bias

    def propagate(
        self, x: Tensor, ctx: EdgeContext | GroupedEdgeContext, kinds: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """The convolution of node features ``x`` (A, in) over the edges of ``ctx``.

        ``kinds = (table, kind)`` may state that ``x == table[kind]`` with few distinct rows (the
        embedded atom features of the first step); the grouped path then multiplies ``W2`` with
        the table's rows instead of every node's (exact; fewer operations when rows < in).
        """
        if isinstance(ctx, GroupedEdgeContext):
            return self._propagate_grouped(x, ctx, kinds)
        cin, cout, k = self.in_channels, self.out_channels, self.hidden
        dense_x = x.new_zeros(ctx.num_graphs, ctx.max_nodes, cin).index_put((ctx.batch, ctx.local), x)
        # S[i, (k, a)] = sum_j u_ijk x_j[a]  (one batched matmul per graph)
        s = torch.bmm(ctx.dense_u, dense_x).view(ctx.num_graphs * ctx.max_nodes, k * cin)
        w2 = self.nn[2].weight  # (in*out, K): entry [a*out + b, k] of A(e) = W2 u + b2
        g = w2.view(cin, cout, k).permute(2, 0, 1).reshape(k * cin, cout)  # [(k, a), b]
        # on the padded rows, then pick the real nodes: gathering the narrow result is cheaper
        # (forward and backward) than gathering the K*in-wide rows first
        summed = (s @ g).view(ctx.num_graphs, ctx.max_nodes, cout)[ctx.batch, ctx.local]
        neighbour_sum = torch.bmm(ctx.adjacency, dense_x)[ctx.batch, ctx.local]  # sum_j x_j
        summed = summed + neighbour_sum @ self.nn[2].bias.view(cin, cout)
        return summed * ctx.inv_degree + self.lin(x) + self.bias

    def forward(
        self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor,
        num_graphs: int | None = None, max_nodes: int | None = None,
    ) -> Tensor:
        """One convolution; ``num_graphs`` / ``max_nodes`` avoid a host sync when given."""
        if num_graphs is None or max_nodes is None:
            counts = torch.bincount(batch)
            num_graphs, max_nodes = int(counts.shape[0]), int(counts.max())
        return self.propagate(x, self.edge_context(edge_index, edge_attr, batch, num_graphs, max_nodes))


@ARCHITECTURES.register("mpnn", "gilmer_mpnn")
class MPNN(MultiTaskModel):
    """Multi-task MPNN of Gilmer et al. (ICML 2017) in the configuration of Navon et al. (ICML 2022).

    ``forward(batch)`` takes a graph batch with ``x``, ``edge_index``, ``edge_attr``, ``batch``
    and ``ptr`` (a :class:`polytask.data.qm9.GraphBatch` or a ``torch_geometric`` ``Batch``)
    and returns ``{task: (molecules, 1)}``; ``shared_features`` is the 64-wide representation
    read by the heads. Shared parameters: everything but the heads.

    Args:
        input_dim: node features (11 for QM9).
        tasks: one regression head per task.
        edge_dim: edge features (5 for QM9: bond one-hot + distance).
        dim: width of node states and of the shared representation.
        edge_hidden: hidden width of the edge network.
        steps: message-passing steps (the convolution and GRU are shared across steps).
        set2set_steps: Set2Set processing steps.
        conv: ``factorised`` (:class:`EdgeNetworkConv`) or ``pyg`` (``torch_geometric.nn.NNConv``).
    """

    def __init__(
        self,
        input_dim: int,
        tasks: Sequence[Task],
        edge_dim: int = 5,
        dim: int = 64,
        edge_hidden: int = 128,
        steps: int = 3,
        set2set_steps: int = 3,
        conv: Literal["factorised", "pyg"] = "factorised",
    ) -> None:
        super().__init__(tasks)
        _require_pyg()
        from torch_geometric.nn import NNConv, Set2Set

        if conv not in ("factorised", "pyg"):
            raise ConfigError(f"MPNN: conv must be 'factorised' or 'pyg', got {conv!r}")
        self.steps, self.conv_kind = steps, conv
        self.lin0 = nn.Linear(input_dim, dim)
        if conv == "factorised":
            self.conv: nn.Module = EdgeNetworkConv(dim, dim, edge_dim, edge_hidden)
        else:
            edge_net = nn.Sequential(nn.Linear(edge_dim, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, dim * dim))
            self.conv = NNConv(dim, dim, edge_net, aggr="mean")
        self.gru = nn.GRU(dim, dim)
        self.set2set = Set2Set(dim, processing_steps=set2set_steps)
        self.lin1 = nn.Linear(2 * dim, dim)
        self.heads = TaskHeads(self.tasks, dim)

    def forward(self, data: Any) -> dict[str, Tensor]:
        """Per-task predictions ``{task: (molecules, 1)}``; sets ``shared_features``.

        Reads ``data.max_nodes`` (largest graph) when present; otherwise computes it (a host sync).
        A batch with ``groups`` and ``pair_attr`` (complete graphs grouped by size) takes the
        grouped path of :class:`EdgeNetworkConv`; with ``kinds`` and ``atom_kind`` too (the
        distinct atom feature rows, ``x == kinds[atom_kind]``), the first step applies the edge
        network's weights to the distinct embedded atoms only.
        """
        num_graphs = int(data.ptr.shape[0] - 1)  # shape only: no host sync
        max_nodes = getattr(data, "max_nodes", None)
        groups = getattr(data, "groups", None)
        kinds = None
        if self.conv_kind == "factorised" and groups is not None and getattr(data, "kinds", None) is not None:
            table = F.relu(self.lin0(data.kinds))  # the distinct embedded atoms
            kinds = (table, data.atom_kind)
            out = table[data.atom_kind]
        else:
            out = F.relu(self.lin0(data.x))
        state = out.unsqueeze(0)
        ctx: EdgeContext | GroupedEdgeContext
        if self.conv_kind == "factorised" and groups is not None:
            ctx = self.conv.grouped_context(data.pair_attr, groups)
        elif self.conv_kind == "factorised":
            if max_nodes is None:
                max_nodes = int((data.ptr[1:] - data.ptr[:-1]).max())
            ctx = self.conv.edge_context(data.edge_index, data.edge_attr, data.batch, num_graphs, max_nodes)
        for step in range(self.steps):
            if self.conv_kind == "factorised":
                message = F.relu(self.conv.propagate(out, ctx, kinds if step == 0 else None))
            else:
                message = F.relu(self.conv(out, data.edge_index, data.edge_attr))
            out, state = self.gru(message.unsqueeze(0), state)
            out = out.squeeze(0)
        pooled = self.set2set(out, data.batch, dim_size=num_graphs)
        features = F.relu(self.lin1(pooled))
        self.shared_features = features
        return self.heads(features)
