"""Expert banks of different widths run together, with no Python loop over banks.

A pruned PLE/CGC (Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE)", RecSys 2020,
pruned by ``polytask prune``) keeps one :class:`~polytask.nn.layers.BatchedMLP` per bank (each
task's specific experts, the shared experts), each with its own hidden widths. The parameters stay
in those modules (checkpoints and pruning read them by name); :class:`RaggedBanks` runs all banks
of one level as a few batched ops by gathering their parameters into stacked tensors each
forward, through index tables computed once from the widths:

- first layer, banks reading the same input ``(B, d)`` (PLE's first level): one GEMM on the
  concatenated output widths of all experts (exact: no padding);
- first layer, bank ``j`` reading stream ``j`` of ``(J, B, d)`` (upper levels: task ``i``'s bank
  reads task ``i``'s gate output, the shared bank the shared stream): one ``bmm`` over the
  streams, each stream's concatenated widths padded with zero columns to the widest stream;
- deeper layers (block-diagonal across experts): one ``bmm`` over all experts, each expert's
  weight zero-padded to the widest input and output at that depth.

Padded weights and biases are zeros, every activation polytask offers maps 0 to 0 and dropout
keeps 0, so padded units stay exactly 0 and the result is the per-bank loop's; the padding only
costs multiply-adds, counted by :func:`matmul_macs`. The gather's backward scatters
each gradient entry back to the one parameter entry it came from.

Forward hooks on a bank (``polytask prune``'s activation scores, torch-pruning's op counter) need
the banks' own modules to run, so with any hook present the banks run one after the other as
before (:meth:`RaggedBanks.looped`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from polytask.nn.layers import BatchedLinear


def _linears(bank: nn.Module) -> list[BatchedLinear]:
    return [m for m in bank.layers if isinstance(m, BatchedLinear)]


def bank_shapes(banks: Sequence[nn.Module]) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """``(counts, dims)`` of banks: experts per bank and each bank's ``(in, hidden..., out)`` widths."""
    counts = tuple(_linears(bank)[0].n for bank in banks)
    dims = tuple((_linears(bank)[0].in_features, *(lin.out_features for lin in _linears(bank))) for bank in banks)
    return counts, dims


def matmul_macs(counts: Sequence[int], dims: Sequence[Sequence[int]], batch: int, streams: bool) -> tuple[int, int]:
    """Multiply-adds of the banks' linear layers for ``batch`` rows: ``(run, exact)``, ``run`` what
    :class:`RaggedBanks` executes (padding included), ``exact`` what the banks need (the per-bank
    loop's count). ``streams``: bank ``j`` reads stream ``j`` (upper PLE levels) rather than one input."""
    depth = len(dims[0]) - 1
    exact = sum(n * d[k] * d[k + 1] for n, d in zip(counts, dims) for k in range(depth))
    first = [n * d[1] for n, d in zip(counts, dims)]
    run = dims[0][0] * (len(first) * max(first) if streams else sum(first))
    run += sum(sum(counts) * max(d[k] for d in dims) * max(d[k + 1] for d in dims) for k in range(1, depth))
    return batch * run, batch * exact


class RaggedBanks:
    """Runs banks of ``n_j`` experts with layer widths ``dims[j]`` (same input width, output width
    and depth) at once: ``ragged(x, banks)``. Experts come out bank-major.

    Holds no parameters, only index tables cached by the banks' shapes and device (rebuilt when
    pruning changes a width).
    """

    def __init__(self) -> None:
        self._cache: tuple | None = None

    def tables(self, banks: Sequence[nn.Module], device: torch.device) -> _Tables:
        key = (*bank_shapes(banks), device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _Tables(*key[:2]).to(device))
        return self._cache[1]

    @staticmethod
    def hooked(banks: Sequence[nn.Module]) -> bool:
        """Whether a forward hook watches a bank or one of its layers (then the banks must run)."""
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for bank in banks for m in bank.modules())

    @staticmethod
    def looped(x: Tensor, banks: Sequence[nn.Module]) -> Tensor:
        """The reference: each bank on its input (``x`` or stream ``j``), one after the other."""
        return torch.cat([bank(x if x.ndim == 2 else x[j]) for j, bank in enumerate(banks)])

    def __call__(self, x: Tensor, banks: Sequence[nn.Module]) -> Tensor:
        """Outputs of every expert ``(E, B, out)``, bank-major: ``x`` is ``(B, d)`` (every bank reads
        it) or ``(J, B, d)`` (bank ``j`` reads ``x[j]``)."""
        if self.hooked(banks):
            return self.looped(x, banks)
        tables = self.tables(banks, x.device)
        params = [p for bank in banks for lin in _linears(bank) for p in (lin.weight, lin.bias)]
        flat = torch.cat([*(p.reshape(-1) for p in params), params[0].new_zeros(1)])
        w, b, gather = tables.first[x.ndim == 3]
        streams = x.unsqueeze(0) if x.ndim == 2 else x
        h = torch.baddbmm(flat[b], streams, flat[w])
        rows = x.shape[-2]
        wide = torch.cat([h.transpose(0, 1).reshape(rows, -1), h.new_zeros(rows, 1)], dim=1)
        h = wide[:, gather].reshape(rows, tables.num_experts, -1).transpose(0, 1)
        deep = iter(tables.deep)
        for module in list(banks[0].layers)[1:]:  # depth is sequential; activations map 0 to 0
            if isinstance(module, BatchedLinear):
                w, b = next(deep)
                h = torch.baddbmm(flat[b], h, flat[w])
            else:
                h = module(h)
        return h


class _Tables:
    """Index tables into the flat vector of every bank's parameters (bank-major; per layer weight
    then bias; one zero at the end, where padding points)."""

    def __init__(self, counts: Sequence[int], dims: Sequence[Sequence[int]]) -> None:
        self.counts = [int(n) for n in counts]
        self.dims = [list(map(int, d)) for d in dims]
        self.depth = len(self.dims[0]) - 1
        bank_of = [j for j, n in enumerate(self.counts) for _ in range(n)]
        local = [s for n in self.counts for s in range(n)]
        self.num_experts = len(bank_of)
        offsets = self._param_offsets()
        self.zero_slot = offsets[-1]
        # first layer: one GEMM (shared input) or one bmm over streams (bank j reads stream j)
        self.first = [self._first_layer_tables(offsets, streams, bank_of, local)
                      for streams in ([0] * len(self.counts), list(range(len(self.counts))))]
        self.deep = [self._deep_layer_tables(offsets, k, bank_of, local) for k in range(1, self.depth)]

    def to(self, device: torch.device) -> _Tables:
        self.first = [tuple(t.to(device) for t in ts) for ts in self.first]
        self.deep = [tuple(t.to(device) for t in ts) for ts in self.deep]
        return self

    def _param_offsets(self) -> list[int]:
        """Start of each (bank, layer, weight|bias) in the flat vector, bank-major; last: its length."""
        out, pos = [], 0
        for n, d in zip(self.counts, self.dims):
            for k in range(self.depth):
                out += [pos, pos + n * d[k] * d[k + 1]]
                pos += n * d[k] * d[k + 1] + n * d[k + 1]
        return out + [pos]

    def _at(self, offsets: list[int], j: int, k: int, bias: bool) -> int:
        return offsets[2 * (j * self.depth + k) + int(bias)]

    def _first_layer_tables(self, offsets, streams, bank_of, local) -> tuple[Tensor, Tensor, Tensor]:
        """Weight ``(S, d, Q)`` and bias ``(S, 1, Q)`` indices for ``S`` streams, each stream's banks'
        columns concatenated and zero-padded to the widest stream ``Q``; and the gather from the
        flattened ``(B, S·Q + 1)`` output (last column zero) to the padded ``(B, E·P)`` layout."""
        d = self.dims[0][0]
        num_streams = max(streams) + 1
        widths = [n * dims[1] for n, dims in zip(self.counts, self.dims)]
        start = [sum(w for w, s2 in zip(widths[:j], streams[:j]) if s2 == streams[j]) for j in range(len(widths))]
        q = max(sum(w for w, s in zip(widths, streams) if s == st) for st in range(num_streams))
        w_idx = torch.full((num_streams, d, q), self.zero_slot, dtype=torch.long)
        b_idx = torch.full((num_streams, 1, q), self.zero_slot, dtype=torch.long)
        for j, (n, dims) in enumerate(zip(self.counts, self.dims)):
            out = dims[1]
            cols = slice(start[j], start[j] + n * out)
            block = self._at(offsets, j, 0, False) + torch.arange(n * d * out).reshape(n, d, out)
            w_idx[streams[j], :, cols] = block.permute(1, 0, 2).reshape(d, n * out)
            b_idx[streams[j], 0, cols] = self._at(offsets, j, 0, True) + torch.arange(n * out)
        p = max(dims[1] for dims in self.dims)
        gather = torch.full((self.num_experts, p), num_streams * q, dtype=torch.long)
        for e, (j, s) in enumerate(zip(bank_of, local)):
            out = self.dims[j][1]
            gather[e, :out] = streams[j] * q + start[j] + s * out + torch.arange(out)
        return w_idx, b_idx, gather.reshape(-1)

    def _deep_layer_tables(self, offsets, k, bank_of, local) -> tuple[Tensor, Tensor]:
        """Weight ``(E, P_in, P_out)`` and bias ``(E, 1, P_out)`` indices of layer ``k``, zero-padded."""
        p_in = max(d[k] for d in self.dims)
        p_out = max(d[k + 1] for d in self.dims)
        w_idx = torch.full((self.num_experts, p_in, p_out), self.zero_slot, dtype=torch.long)
        b_idx = torch.full((self.num_experts, 1, p_out), self.zero_slot, dtype=torch.long)
        for e, (j, s) in enumerate(zip(bank_of, local)):
            i, o = self.dims[j][k], self.dims[j][k + 1]
            w_idx[e, :i, :o] = self._at(offsets, j, k, False) + s * i * o + torch.arange(i * o).reshape(i, o)
            b_idx[e, 0, :o] = self._at(offsets, j, k, True) + s * o + torch.arange(o)
        return w_idx, b_idx
