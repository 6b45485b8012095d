"""Which entries ``torch.argsort(x, descending=...)[:k]`` selects, in linear time, tie for tie.

mergekit's magnitude trim (TIES; Yadav et al., NeurIPS 2023) and its Breadcrumbs bottom cut keep
the first ``k`` entries of ``torch.argsort(|tau|)``: a full O(n log n) sort of every task vector,
most of a TIES merge's time. Where magnitudes are tied at the cut (in bfloat16 nearly always:
there are only 2^15 magnitudes), *which* of the tied entries are kept is decided by the sort's
algorithm, not by the values. torch sorts a CPU tensor with the C++ standard library's
``std::sort`` (libstdc++: introsort, Musser 1997: median-of-three quicksort with Hoare's
unguarded partition, leaves of at most 16 entries finished by one insertion sort, heapsort past
a depth of 2 log2 n). Each partition step leaves every entry on the side it will end on, so the
first ``k`` of the sorted order are fixed by the steps on the path to position ``k`` alone: a
quickselect that replays those steps exactly (the same pivots, the same swaps, the same tie
order) gives the same set in expected O(n). Each step is vectorised: Hoare's partition swaps the
i-th entry from the left that may not stay left with the i-th from the right that may not stay
right, as long as the first lies left of the second.

Where the replay does not apply (NaN, negative values, the heapsort fallback) :func:`argsort_head_mask`
returns ``None`` and the caller sorts. tests/test_merge_speed_paths.py checks the replay against
``torch.argsort`` on tie-heavy inputs of many sizes.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["argsort_head_mask", "replay_matches_torch"]

#: libstdc++'s ``_S_threshold``: ranges this small are left to the final insertion sort.
_LEAF = 16
#: Block length of the counts that locate the end of a partition's swaps.
_BLOCK = 1 << 14


def _median_to_first(vals: Tensor, before) -> int:
    """The position libstdc++'s ``__move_median_to_first(first, first+1, mid, last-1)`` swaps
    into position 0, ``before(a, b)`` being the sort's comparison."""
    m = vals.numel()
    a, b, c = 1, m // 2, m - 1
    va, vb, vc = vals[[a, b, c]].tolist()
    if before(va, vb):
        if before(vb, vc):
            return b
        return c if before(va, vc) else a
    if before(va, vc):
        return a
    return c if before(vb, vc) else b


def _block_counts(flags: Tensor) -> Tensor:
    """Cumulative counts of ``flags`` at the starts of blocks of :data:`_BLOCK` (int64, with 0
    first and the total last)."""
    m = flags.numel()
    full = m // _BLOCK
    # sums of 128 flags fit a uint8, so the big reduction needs no widened copy of the flags
    sums = flags[: full * _BLOCK].view(torch.uint8).view(full, _BLOCK // 128, 128).sum(2, dtype=torch.uint8)
    sums = sums.sum(1, dtype=torch.int64)
    tail = flags[full * _BLOCK:].sum(dtype=torch.int64).reshape(1)
    return torch.cat([torch.zeros(1, dtype=torch.int64), sums, tail]).cumsum(0)


def _nth_true(flags: Tensor, counts: Tensor, n: int) -> int:
    """Position of the ``n``-th (0-based) True of ``flags``, ``counts`` from :func:`_block_counts`."""
    j = int(torch.searchsorted(counts, n, right=True)) - 1
    block = flags[j * _BLOCK:(j + 1) * _BLOCK]
    return j * _BLOCK + int(torch.nonzero(block)[n - int(counts[j])])


def _swap_count(stop_left: Tensor, stop_right: Tensor, cl: Tensor, cr: Tensor) -> int:
    """How many pairs Hoare's partition swaps: the largest ``s`` such that the ``s``-th left stop
    lies before the ``s``-th right stop, i.e. max over ``x`` of min(#left stops before ``x``,
    #right stops from ``x`` on); found at block level, then within the block where they cross."""
    total_r = int(cr[-1])
    before_l = cl  # left stops before each block start
    from_r = total_r - cr  # right stops from each block start on
    j = int(torch.count_nonzero(before_l < from_r))  # first block start where they have crossed
    lo_b = max(j - 1, 0) * _BLOCK
    hi_b = min(j * _BLOCK, stop_left.numel())
    seg_l = stop_left[lo_b:hi_b].cumsum(0, dtype=torch.int64)
    seg_r = stop_right[lo_b:hi_b].cumsum(0, dtype=torch.int64)
    base_l = int(cl[max(j - 1, 0)])
    from_r0 = total_r - int(cr[max(j - 1, 0)])
    # x = lo_b + t for t = 0..len: left stops before x, right stops from x on
    lefts = torch.cat([torch.zeros(1, dtype=torch.int64), seg_l]) + base_l
    rights = from_r0 - torch.cat([torch.zeros(1, dtype=torch.int64), seg_r])
    return int(torch.minimum(lefts, rights).max())


def _partition(vals: Tensor, descending: bool) -> tuple[int, int, Tensor, Tensor]:
    """Replay ``__unguarded_partition(first+1, last, pivot=first)`` on ``vals`` (pivot at 0).

    The left scan stops at entries that may not precede the pivot, the right scan at entries
    the pivot may not precede; the i-th stops of the two scans swap while the left one lies
    before the right one. The positions between the scans are untouched when the scans reach
    them, so the stops come from the values before the step. Returns the cut, the number of
    swaps and the stop flags (position 0, the pivot, is neither).
    """
    pivot = vals[0]
    stop_left = (vals <= pivot) if descending else (vals >= pivot)
    stop_right = (vals >= pivot) if descending else (vals <= pivot)
    stop_left[0] = False
    stop_right[0] = False
    cl, cr = _block_counts(stop_left), _block_counts(stop_right)
    swaps = _swap_count(stop_left, stop_right, cl, cr)
    cut = vals.numel()
    if swaps < int(cl[-1]):
        cut = _nth_true(stop_left, cl, swaps)
    if swaps > 0:  # the last right stop swapped holds a value that stops the left scan
        cut = min(cut, _nth_true(stop_right, cr, int(cr[-1]) - swaps))
    return cut, swaps, stop_left, stop_right


def _sides(vals: Tensor | None, idx: Tensor | None, cut: int, swaps: int, stop_left: Tensor, stop_right: Tensor,
           side: str, median: int) -> tuple[Tensor | None, Tensor]:
    """Values (if ``vals`` is given) and original positions of one side of the cut after the swaps
    (``idx`` None: the positions are the identity but for the median swap of 0 and ``median``).

    The swapped left stops are exactly the left stops before ``cut``; the swapped right stops are
    the last ``swaps`` right stops, all at or after ``cut`` (one more right stop may lie there,
    unswapped: the first). Stops are paired outside-in: the first left stop with the last right
    stop, so each side takes the other side's swapped entries in reverse order.
    """
    if side == "left":
        part, other = slice(0, cut), slice(cut, None)
        where, src = stop_left[:cut], stop_right[cut:]
        first_unswapped = False
    else:
        part, other = slice(cut, None), slice(0, cut)
        where, src = stop_right[cut:], stop_left[:cut]
        first_unswapped = int(where.sum()) > swaps
        if first_unswapped:  # the unswapped right stop: the first at or after the cut
            where = where.clone()
            where[int(torch.argmax(where.view(torch.uint8)))] = False  # argmax: the first maximum

    def take(t: Tensor | None) -> Tensor:
        if t is None:  # the identity (first step): positions, without an arange of the whole row
            incoming = torch.nonzero(src).squeeze(1).add_(other.start or 0).to(torch.int32)
            out = torch.arange(part.start or 0, part.stop if part.stop is not None else n, dtype=torch.int32)
        else:
            incoming = t[other].masked_select(src)
            out = t[part].clone()
        if side == "left":
            incoming = incoming[incoming.numel() - swaps:]  # the last `swaps` right stops
        out = out.masked_scatter_(where, incoming.flip(0))
        if t is None and median != 0:  # positions 0 and `median` hold each other's entries
            at_zero = out == 0
            out.masked_fill_(out == median, 0).masked_fill_(at_zero, median)
        return out

    n = stop_left.numel()
    return (take(vals) if vals is not None else None), take(idx)


@functools.cache
def replay_matches_torch() -> bool:
    """Whether this torch's CPU sort is the one replayed (checked once, on a tie-heavy probe of
    a few thousand entries, both directions): a torch whose sort changed gets ``argsort`` back."""
    g = torch.Generator().manual_seed(0)
    probe = (torch.randn(5000, generator=g) * 1e-2).to(torch.bfloat16).abs()
    for descending in (True, False):
        for k in (1, 1234, 2500, 4999):
            expected = torch.zeros(probe.numel(), dtype=torch.bool)
            expected[torch.argsort(probe.float(), descending=descending)[:k]] = True
            got = _replay(probe, k, descending)
            if got is None or not torch.equal(got, expected):
                return False
    return True


def argsort_head_mask(values: Tensor, k: int, *, descending: bool) -> Tensor | None:
    """Boolean mask of the entries ``torch.argsort(values, descending=descending)[:k]`` picks.

    ``values`` is a 1-D floating CPU tensor without NaN (else ``None``: sort instead). Exact,
    ties included, for torch's CPU sort (libstdc++ ``std::sort``); ``None`` also where the
    replay would reach libstdc++'s heapsort fallback (adversarial orders only).
    """
    n = values.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= n:
        return mask.fill_(True)
    if not values.is_floating_point() or bool(torch.isnan(values).any()) or n >= 2**31:
        return None  # (positions are int32)
    if not replay_matches_torch():
        return None
    return _replay(values, k, descending)


def _replay(values: Tensor, k: int, descending: bool) -> Tensor | None:
    """The quickselect along libstdc++'s introsort steps (``0 < k < n``; None: heapsort reached)."""
    n = values.numel()
    mask = torch.zeros(n, dtype=torch.bool)

    def before(a, b):
        return a > b if descending else a < b

    vals = values.reshape(-1).clone()
    idx: Tensor | None = None  # original positions of vals; None: the identity
    lo = 0
    depth = 2 * (n.bit_length() - 1)  # libstdc++: 2 * __lg(n)
    while vals.numel() > _LEAF:
        if depth == 0:
            return None
        depth -= 1
        s = _median_to_first(vals, before)
        vals[[0, s]] = vals[[s, 0]]
        if idx is not None:
            idx[[0, s]] = idx[[s, 0]]
        cut, swaps, stop_left, stop_right = _partition(vals, descending)
        if k - lo < cut:  # position k lies in the left part: the right part is dropped
            vals, idx = _sides(vals, idx, cut, swaps, stop_left, stop_right, "left", s)
            continue
        _, left_i = _sides(None, idx, cut, swaps, stop_left, stop_right, "left", s)
        mask[left_i] = True  # the left part is kept whole
        lo += cut
        if lo == k:
            return mask
        vals, idx = _sides(vals, idx, cut, swaps, stop_left, stop_right, "right", s)
    # a leaf: the final insertion sort orders it stably
    order = torch.sort(vals, descending=descending, stable=True).indices
    mask[order[: k - lo] if idx is None else idx[order[: k - lo]]] = True
    return mask
