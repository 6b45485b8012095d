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
  reads task ``i``'s gate output, the shared bank the shared stream): one ``bmm`` per width group
  over its banks' streams, each stream's concatenated widths padded with zero columns to the
  group's widest stream;
- deeper layers (block-diagonal across experts): one ``bmm`` per width group over its experts,
  each expert's weight zero-padded to the group's widest input and output at that depth.

Banks are split into at most :data:`MAX_GROUPS` groups of similar widths (:func:`width_groups`),
so that a bank pruned hard is not padded to the widest one; the op count depends on the groups,
not on the number of tasks.

Padded weights and biases are zeros, every activation polytask offers maps 0 to 0 and dropout
keeps 0, so padded units stay exactly 0 and the result is the per-bank loop's; the padding only
costs multiply-adds, counted by :func:`matmul_macs`. The gather's backward scatters
each gradient entry back to the one parameter entry it came from.

Costs besides the padding: each forward copies the banks' parameters once into a flat vector
and gathers the padded weights from it (parameter-sized memory traffic, no FLOPs). With dropout in
training, the masks are drawn over the padded tensor: the same distribution as the loop's, other
draws. The index tables are built on the host once per set of bank shapes and device.

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


#: Most groups of banks the deeper layers run in (one bmm each per depth).
MAX_GROUPS = 2


def _deep_macs(counts: Sequence[int], dims: Sequence[Sequence[int]], group: Sequence[int]) -> int:
    """Per-row multiply-adds of the deeper layers of the banks in ``group``, padded to its widest."""
    # lists, not generators, inside min/max/sum: torch.compile traces these when it builds the tables
    experts = sum([counts[j] for j in group])
    return sum([experts * max([dims[j][k] for j in group]) * max([dims[j][k + 1] for j in group])
                for k in range(1, len(dims[0]) - 1)])


def width_groups(counts: Sequence[int], dims: Sequence[Sequence[int]]) -> list[list[int]]:
    """Banks split into at most :data:`MAX_GROUPS` groups for the deeper layers: banks sorted by
    their deeper layers' size, cut where padding costs least; a second group only when it saves
    more than 1/8 of the padded multiply-adds (each group is one more op per depth)."""
    order = sorted(range(len(counts)), key=lambda j: (sum([dims[j][k] * dims[j][k + 1]
                                                           for k in range(1, len(dims[j]) - 1)]), j))
    best = [order]
    one = _deep_macs(counts, dims, order)
    if MAX_GROUPS >= 2 and len(order) > 1 and one > 0:
        cost, cut = min([(_deep_macs(counts, dims, order[:c]) + _deep_macs(counts, dims, order[c:]), c)
                         for c in range(1, len(order))])
        if cost < one * 7 / 8:
            best = [order[:cut], order[cut:]]
    return best


def matmul_macs(counts: Sequence[int], dims: Sequence[Sequence[int]], batch: int, streams: bool) -> tuple[int, int]:
    """Multiply-adds of the banks' linear layers for ``batch`` rows: ``(run, exact)``, ``run`` what
    :class:`RaggedBanks` executes (padding included), ``exact`` what the banks need (the per-bank
    loop's count). ``streams``: bank ``j`` reads stream ``j`` (upper PLE levels) rather than one input."""
    depth = len(dims[0]) - 1
    exact = sum([n * d[k] * d[k + 1] for n, d in zip(counts, dims) for k in range(depth)])
    first = [n * d[1] for n, d in zip(counts, dims)]
    groups = width_groups(counts, dims)
    if streams:  # per group: its banks' streams, padded to the group's widest
        run = dims[0][0] * sum([len(g) * max([first[j] for j in g]) for g in groups])
    else:
        run = dims[0][0] * sum(first)
    run += sum([_deep_macs(counts, dims, group) for group in groups])
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
        """Whether a hook watches a bank or one of its layers (then the banks must run): forward,
        forward-pre or module backward hooks, on the modules or global."""
        kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        if any(getattr(_module, "_global" + kind, None) for kind in kinds):
            return True
        return any(getattr(m, kind) for bank in banks for m in bank.modules() for kind in kinds)

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
        rows = x.shape[-2]
        if x.ndim == 2:  # one exact GEMM for every bank, then each group's padded layout
            w, b, gathers = tables.shared_first
            wide = _with_zero_column(torch.addmm(flat[b], x, flat[w]))
            inputs = [wide[:, gather] for gather in gathers]
        else:  # per group, a bmm over its banks' streams
            inputs = []
            for streams, w, b, gather in tables.stream_first:  # width groups, not tasks
                h = torch.baddbmm(flat[b], x.index_select(0, streams), flat[w])
                inputs.append(_with_zero_column(h.transpose(0, 1).reshape(rows, -1))[:, gather])
        later = list(banks[0].layers)[1:]  # activations (map 0 to 0), dropout, deeper layers
        outs = []
        for h, width, deep in zip(inputs, tables.first_widths, tables.deep):  # width groups, not tasks
            h = h.reshape(rows, -1, width).transpose(0, 1)
            layers = iter(deep)
            for module in later:  # depth is sequential
                if isinstance(module, BatchedLinear):
                    w, b = next(layers)
                    h = torch.baddbmm(flat[b], h, flat[w])
                else:
                    h = module(h)
            outs.append(h)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out if tables.order is None else out.index_select(0, tables.order)


def _with_zero_column(h: Tensor) -> Tensor:
    """``(B, N)`` -> ``(B, N + 1)``: the column padding gathers from."""
    return torch.cat([h, h.new_zeros(h.shape[0], 1)], dim=1)


class _Tables:
    """Index tables into the flat vector of every bank's parameters (bank-major; per layer weight
    then bias; one zero at the end, where padding points), by width group."""

    def __init__(self, counts: Sequence[int], dims: Sequence[Sequence[int]]) -> None:
        self.counts = [int(n) for n in counts]
        self.dims = [list(map(int, d)) for d in dims]
        self.depth = len(self.dims[0]) - 1
        offsets = self._param_offsets()
        self.zero_slot = offsets[-1]
        self.groups = width_groups(self.counts, self.dims)
        first_expert = [sum(self.counts[:j]) for j in range(len(self.counts))]
        # experts of each group (bank, local index), and their bank-major numbers
        members = [[(j, s) for j in group for s in range(self.counts[j])] for group in self.groups]
        placed = [first_expert[j] + s for group in members for j, s in group]
        self.order = None if placed == sorted(placed) else torch.tensor(placed).argsort()
        self.first_widths = [max([self.dims[j][1] for j in group]) for group in self.groups]
        # first layer: one GEMM over all banks (shared input), or per group one bmm over its streams
        self.shared_first = self._first_layer_tables(offsets, list(range(len(self.counts))), False, members)
        self.stream_first = []  # (streams read, weight, bias, gather) per group
        for group, m in zip(self.groups, members):
            w, b, (gather,) = self._first_layer_tables(offsets, group, True, [m])
            self.stream_first.append((torch.tensor(group), w, b, gather))
        self.deep = [[self._deep_layer_tables(offsets, k, group) for k in range(1, self.depth)] for group in members]

    def to(self, device: torch.device) -> _Tables:
        w, b, gathers = self.shared_first
        self.shared_first = (w.to(device), b.to(device), [g.to(device) for g in gathers])
        self.stream_first = [tuple(t.to(device) for t in block) for block in self.stream_first]
        self.deep = [[(w.to(device), b.to(device)) for w, b in group] for group in self.deep]
        self.order = None if self.order is None else self.order.to(device)
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

    def _first_layer_tables(self, offsets, banks, streams, members) -> tuple[Tensor, Tensor, list[Tensor]]:
        """First-layer indices of ``banks``: with ``streams``, bank ``banks[i]`` reads stream ``i``
        (weight ``(len(banks), d, Q)``, bias ``(len(banks), 1, Q)``, each stream's experts'
        columns zero-padded to the widest ``Q``); else all read one input (``(1, d, Q)`` with every
        expert's columns concatenated, no padding; the weight and bias as a matrix and a vector).
        And for each expert list of ``members`` the gather from the flattened output with a zero
        column appended to that list's ``(B, E·P)`` layout, ``P`` its widest first layer."""
        d = self.dims[0][0]
        widths = [self.counts[j] * self.dims[j][1] for j in banks]
        start = {j: (0 if streams else sum(widths[:i])) for i, j in enumerate(banks)}
        stream = {j: (i if streams else 0) for i, j in enumerate(banks)}
        num_streams, q = (len(banks), max(widths)) if streams else (1, sum(widths))
        w_idx = torch.full((num_streams, d, q), self.zero_slot, dtype=torch.long)
        b_idx = torch.full((num_streams, 1, q), self.zero_slot, dtype=torch.long)
        for j in banks:
            n, out = self.counts[j], self.dims[j][1]
            cols = slice(start[j], start[j] + n * out)
            block = self._at(offsets, j, 0, False) + torch.arange(n * d * out).reshape(n, d, out)
            w_idx[stream[j], :, cols] = block.permute(1, 0, 2).reshape(d, n * out)
            b_idx[stream[j], 0, cols] = self._at(offsets, j, 0, True) + torch.arange(n * out)
        gathers = []
        for group in members:
            p = max([self.dims[j][1] for j, _ in group])
            gather = torch.full((len(group), p), num_streams * q, dtype=torch.long)
            for e, (j, s) in enumerate(group):
                out = self.dims[j][1]
                gather[e, :out] = stream[j] * q + start[j] + s * out + torch.arange(out)
            gathers.append(gather.reshape(-1))
        if not streams:
            return w_idx[0], b_idx[0, 0], gathers
        return w_idx, b_idx, gathers

    def _deep_layer_tables(self, offsets, k, group) -> tuple[Tensor, Tensor]:
        """Weight ``(E_g, P_in, P_out)`` and bias ``(E_g, 1, P_out)`` indices of layer ``k`` for the
        experts ``group`` ((bank, local index) pairs), zero-padded to the group's widest."""
        p_in = max([self.dims[j][k] for j, _ in group])
        p_out = max([self.dims[j][k + 1] for j, _ in group])
        w_idx = torch.full((len(group), p_in, p_out), self.zero_slot, dtype=torch.long)
        b_idx = torch.full((len(group), 1, p_out), self.zero_slot, dtype=torch.long)
        for e, (j, s) in enumerate(group):
            i, o = self.dims[j][k], self.dims[j][k + 1]
            w_idx[e, :i, :o] = self._at(offsets, j, k, False) + s * i * o + torch.arange(i * o).reshape(i, o)
            b_idx[e, 0, :o] = self._at(offsets, j, k, True) + s * o + torch.arange(o)
        return w_idx, b_idx
