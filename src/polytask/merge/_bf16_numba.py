"""Compiled loops (numba) behind :mod:`polytask.merge.kernels`: bfloat16 task-vector merges in one
pass per entry, and the magnitude trim's selection in linear time.

Imported only when numba is installed (the ``fast`` extra). Arrays are numpy views of torch
tensors: bfloat16 as ``uint16`` bit patterns. Every bfloat16 operation is done as torch does it on
the CPU: widen both operands to float32 (exact), compute in float32, round to nearest even back to
bfloat16 -- so a sequence of these steps gives torch's (and mergekit's) bits.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_BLOCK = 64  # entries per block of the branch-free partition
_COMBINE_BLOCK = 4096  # entries per block of combine: all models' values, then their sum
_LEAF = 16  # libstdc++'s _S_threshold: ranges this small are left to the final insertion sort


@intrinsic
def _u32_as_f32(typingctx, x):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_as_u32(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always")
def widen(b):
    """bfloat16 bits -> float32 (exact)."""
    return _u32_as_f32(np.uint32(b) << np.uint32(16))


@njit(inline="always")
def round_bf16(f):
    """float32 -> bfloat16 bits, round to nearest even (c10::BFloat16); NaN -> 0x7FC0."""
    u = _f32_as_u32(f)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    bias = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return np.uint16((u + bias) >> np.uint32(16))


@njit(inline="always")
def uniform24(seed, j):
    """24 uniform bits for entry ``j`` of a stream ``seed``: SplitMix64's output function (Steele,
    Lea & Flood, OOPSLA 2014) of the ``j+1``-th Weyl step, counter-based, so any chunk of a tensor
    draws its own entries without the others."""
    z = seed + np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(40)


@njit(nogil=True, cache=True)
def fill_uniform24(seed, start, out):
    """``out[t] = uniform24(seed, start + t)`` (int32): the same draws for the torch fallback's
    tests."""
    for t in range(out.size):
        out[t] = np.int32(uniform24(seed, start + t))


# ---------------------------------------------------------------------------------------------
# the magnitude trim: which entries torch.argsort(|tau|, descending)[:k] picks, ties included
#
# The sort is replayed on 4-byte entries: a key (the magnitude's 15 bits) or, for the entries tied
# at the threshold (the only ones whose identity matters), a flag and the original position.

_FLAG = np.uint32(0x80000000)  # a flagged entry holding a position (a tie at the threshold), not a key


@njit(inline="always")
def _key(e, v):
    """The key of a flagged entry: tied entries carry their position, their key is ``v``."""
    return e if e < _FLAG else v


@njit(nogil=True, cache=True)
def _partition(work, f, last, pivot, v, off_left, off_right):
    """Hoare's unguarded partition of ``work[f:last]`` around ``pivot`` (libstdc++'s
    ``__unguarded_partition``, descending by :func:`_key`), returning the cut; the same swaps in
    the same order.

    The left scan stops at keys not above the pivot, the right scan at keys not below it, and the
    s-th stops of the two swap while the left one lies before the right one. While the unscanned
    range is long, the stops of a block at each end are found without branches (BlockQuicksort,
    Edelkamp & Weiss, ESA 2016) and swapped pairwise in scan order; the last stretch runs the
    scans themselves from where the blocks left them."""
    n_left = 0
    n_right = 0
    i_left = 0
    i_right = 0
    while last - f >= 2 * _BLOCK:
        if i_left == n_left:
            n_left = 0
            i_left = 0
            block = work[f:f + _BLOCK]  # (slices indexed by the loop counter: no wrap-around tests)
            for t in range(_BLOCK):
                off_left[n_left] = t
                n_left += _key(block[t], v) <= pivot
        if i_right == n_right:
            n_right = 0
            i_right = 0
            block = work[last - _BLOCK:last]
            for t in range(_BLOCK):
                off_right[n_right] = t
                n_right += _key(block[np.uint64(_BLOCK - 1 - t)], v) >= pivot
        swaps = min(n_left - i_left, n_right - i_right)
        for s in range(swaps):
            a = f + off_left[i_left + s]
            b = last - 1 - off_right[i_right + s]
            tmp = work[a]
            work[a] = work[b]
            work[b] = tmp
        i_left += swaps
        i_right += swaps
        if i_left == n_left:
            f += _BLOCK
        if i_right == n_right:
            last -= _BLOCK
    if i_left < n_left:  # resume the scalar scans at the next stop a block had found
        f += off_left[i_left]
    if i_right < n_right:
        last -= off_right[i_right]
    while True:
        while _key(work[f], v) > pivot:
            f += 1
        last -= 1
        while pivot > _key(work[last], v):
            last -= 1
        if f >= last:
            return f
        tmp = work[f]
        work[f] = work[last]
        work[last] = tmp
        f += 1


@njit(nogil=True, cache=True)
def _replay(work, k, v, depth):
    """Replay libstdc++'s introsort (descending by :func:`_key`) on the path to position ``k``,
    with ``depth`` levels before its heapsort fallback; the first ``k`` entries are then the kept
    ones.

    The steps (Musser 1997, as libstdc++'s ``std::sort``): median of entries 1, mid and last-1
    moved to the first, Hoare's unguarded partition around it, ranges of at most 16 left to the
    final insertion sort, heapsort past a depth of 2 floor(log2 n). Only the range holding
    position ``k`` is followed: the other one lies wholly before or after ``k``. Returns 0, or 2
    where the heapsort fallback is reached (the caller sorts instead)."""
    off_left = np.empty(_BLOCK, np.int64)
    off_right = np.empty(_BLOCK, np.int64)
    lo = 0
    hi = work.size
    if k <= 0 or k >= hi:
        return 0
    while hi - lo > _LEAF:
        if depth == 0:
            return 2
        depth -= 1
        a = lo + 1
        b = lo + (hi - lo) // 2
        c = hi - 1
        ka = _key(work[a], v)
        kb = _key(work[b], v)
        kc = _key(work[c], v)
        if ka > kb:
            if kb > kc:
                m = b
            elif ka > kc:
                m = c
            else:
                m = a
        elif ka > kc:
            m = a
        elif kb > kc:
            m = c
        else:
            m = b
        t = work[lo]
        work[lo] = work[m]
        work[m] = t
        f = _partition(work, lo + 1, hi, _key(work[lo], v), v, off_left, off_right)
        if f == k:
            return 0
        if k < f:
            hi = f
        else:
            lo = f
    for i in range(lo + 1, hi):  # the leaf: the final insertion sort is stable within it
        e = work[i]
        ke = _key(e, v)
        j = i
        while j > lo and ke > _key(work[j - 1], v):
            work[j] = work[j - 1]
            j -= 1
        work[j] = e
    return 0


@njit(inline="always")
def _entry(x, base, subtract, i):
    """Entry ``i`` of the task vector: ``x[i]``, or ``x[i] - base[i]`` rounded to bfloat16 (made on
    the fly, so that a trim needs no stored copy of it)."""
    return round_bf16(widen(x[i]) - widen(base[i])) if subtract else x[i]


@njit(nogil=True, cache=True)
def _threshold(x, base, subtract, k, descending, nan_above):
    """The ``k``-th magnitude pattern ``v`` in sort order, from a histogram of the 2^15 patterns
    (with the sign dropped, half-precision bits order as the magnitudes do: exact, no float copy),
    how many entries equal it, and whether they straddle the cut. ``v`` is -1 if there is a NaN
    (``nan_above`` is the largest pattern that is not NaN); the last value tells an infinity.
    Entries as :func:`_entry` makes them."""
    hist = np.zeros(32768, np.int64)
    for i in range(x.size):
        hist[_entry(x, base, subtract, i) & 0x7FFF] += 1
    for a in range(nan_above + 1, 32768):
        if hist[a] != 0:
            return -1, 0, False, True
    above = 0
    if descending:
        v = 32767
        while above + hist[v] < k:
            above += hist[v]
            v -= 1
    else:
        v = 0
        while above + hist[v] < k:
            above += hist[v]
            v += 1
    return v, hist[v], above + hist[v] > k, hist[nan_above] != 0


@njit(nogil=True, cache=True)
def _kept_ties(x, base, subtract, k, descending, v, tied):
    """Original positions of the entries equal to ``v`` that the sort puts among the first ``k``
    (status, positions): the sort replayed (:func:`_replay`) on flagged entries built from the
    entries (:func:`_entry`; ascending as descending on ``0x7FFF - key``), 4 bytes per entry,
    freed on return."""
    n = x.size
    key_v = np.uint16(v) if descending else np.uint16(0x7FFF - v)
    depth = 0
    m = n
    while m > 1:
        m >>= 1
        depth += 1
    flagged = np.empty(n, np.uint32)
    for i in range(n):
        a = _entry(x, base, subtract, i) & 0x7FFF
        flagged[i] = _FLAG | np.uint32(i) if a == v else (np.uint32(a) if descending else np.uint32(0x7FFF - a))
    status = _replay(flagged, k, key_v, 2 * depth)
    kept = np.empty(tied, np.int64)
    count = 0
    if status == 0:
        for p in range(k):
            e = flagged[p]
            if e >= _FLAG:
                kept[count] = e & np.uint32(0x7FFFFFFF)
                count += 1
    return status, kept[:count]


@njit(nogil=True, cache=True)
def head_keep(bits, k, descending, nan_above, keep):
    """``keep[i]`` = entry ``i`` is among ``torch.argsort(|x|, descending)[:k]`` (``0 < k < n``).

    ``bits`` are the half-precision bit patterns of ``x``. The threshold ``v`` (:func:`_threshold`) decides every entry not equal to it; only
    where entries equal to ``v`` straddle the cut does the sort's order matter: then the sort is
    replayed (:func:`_tied_positions`). Returns 0, 1 (a NaN) or 2 (the heapsort fallback).
    """
    v, tied, straddle, _ = _threshold(bits, bits, False, k, descending, nan_above)
    if v < 0:
        return 1
    for i in range(bits.size):
        a = bits[i] & 0x7FFF
        keep[i] = (a > v if descending else a < v) or (a == v and not straddle)
    if not straddle:
        return 0
    status, kept = _kept_ties(bits, bits, False, k, descending, v, tied)
    if status != 0:
        return status
    for i in kept:
        keep[i] = True
    return 0


@njit(nogil=True, cache=True)
def trim(x, base, subtract, k, nan_above, out):
    """TIES' trim of one task vector into ``out`` (which may be ``x`` itself when not
    ``subtract``): entries outside ``torch.argsort(|tau|, descending=True)[:k]`` become zeros of
    their sign (``tau * mask`` as torch computes it), the same entries as :func:`head_keep`
    without a mask. With ``subtract``, ``tau = x - base`` is made on the fly in each pass and
    written once, after the selection: the selection's scratch and the task vector are never held
    together. Returns 0, 1 (a NaN or an infinity: ``inf * 0`` is NaN, left to the masked path) or
    2 (the heapsort fallback); ``out`` is untouched unless it returns 0."""
    v, tied, straddle, infinite = _threshold(x, base, subtract, k, True, nan_above)
    if v < 0 or infinite:
        return 1
    kept = np.empty(0, np.int64)
    if straddle:
        status, kept = _kept_ties(x, base, subtract, k, True, v, tied)
        if status != 0:
            return status
    values = np.empty(kept.size, np.uint16)  # kept ties, read before out is written (out may be x)
    for t in range(kept.size):
        values[t] = _entry(x, base, subtract, kept[t])
    for i in range(x.size):
        d = _entry(x, base, subtract, i)
        a = d & 0x7FFF
        out[i] = d if a > v or (a == v and not straddle) else d & np.uint16(0x8000)
    for t in range(kept.size):
        out[kept[t]] = values[t]
    return 0


# ---------------------------------------------------------------------------------------------
# the weighted sum of task vectors, with TIES' sign election and DARE's drop, one pass per entry


@njit(inline="always")
def _times(d, flag):
    """``d * flag`` for a 0/1 flag, rounded as torch's multiply by a mask: ``d`` itself, or a zero of
    ``d``'s sign (written without a branch, so that the loops vectorise)."""
    return widen(round_bf16(d * np.float32(flag)))


@njit(nogil=True, cache=True)
def _task_values(x, base, subtract, dare_threshold, dare_seed, divide_by, multiply_by, weights, j0, width, out):
    """``out[i, :width]`` = the weighted (and dropped) task vector of model ``i`` at entries
    ``j0 ..`` (float32 holding bfloat16 values): one simple loop per step and model, over a block
    that stays in cache, so that each loop vectorises."""
    n = len(x)
    # slices indexed by the loop counter: indices known to be >= 0, so numba adds no wrap-around
    # test and LLVM vectorises the loops
    bases = base[j0:j0 + width]
    for i in range(n):
        xi = x[i][j0:j0 + width]
        row = out[i]
        if subtract:
            for t in range(width):
                row[t] = widen(round_bf16(widen(xi[t]) - widen(bases[t])))
        else:
            for t in range(width):
                row[t] = widen(xi[t])
        threshold = dare_threshold[i]
        if threshold >= 0:
            seed = dare_seed[i]
            for t in range(width):
                row[t] = _times(row[t], uniform24(seed, j0 + t) < threshold)
            divisor = divide_by[i]
            if divisor > 0:
                for t in range(width):
                    row[t] = widen(round_bf16(row[t] / divisor))
            factor = multiply_by[i]
            if factor > 0:
                for t in range(width):
                    row[t] = widen(round_bf16(row[t] * factor))
        w = weights[i]
        for t in range(width):
            row[t] = widen(round_bf16(row[t] * w))


@njit(nogil=True, cache=True)
def combine(x, base, subtract, dare_threshold, dare_seed, divide_by, multiply_by, weights, consensus, normalize,
            weight_sum, scale, out, lo, hi):
    """``out[j] = base[j] + scale * sum_i w_i tau_ij [/ divisor]`` for ``lo <= j < hi``, in
    bfloat16 with torch's rounding after every step of :func:`polytask.merge.methods._combine`
    and the drops before it.

    ``x``: N arrays of M entries (a tuple): task vectors (TIES' already trimmed), or fine-tuned
    weights if ``subtract`` (``tau = x - base``). ``dare_threshold[i] >= 0`` drops entry ``j``
    unless ``uniform24(dare_seed[i], j) < dare_threshold[i]``; ``divide_by[i] > 0`` then divides
    by it, ``multiply_by[i] > 0`` multiplies by it (DARE's rescales). ``consensus``: 0 none, 1 sum,
    2 count (TIES' election).
    Entries go in blocks: all models' values of a block, then their sums model by model (the
    same order of additions as torch's sum over models, from 0), without branches per entry.
    Returns whether an entry of ``out`` is NaN or infinite.
    """
    n = len(x)
    worst = np.uint16(0)
    values = np.empty((n, _COMBINE_BLOCK), np.float32)
    total = np.empty(_COMBINE_BLOCK, np.float32)
    positive = np.empty(_COMBINE_BLOCK, np.bool_)
    divisor = np.empty(_COMBINE_BLOCK, np.float32)
    for j0 in range(lo, hi, _COMBINE_BLOCK):
        width = min(_COMBINE_BLOCK, hi - j0)
        _task_values(x, base, subtract, dare_threshold, dare_seed, divide_by, multiply_by, weights, j0, width, values)
        total[:width] = 0
        if consensus != 0:
            if consensus == 1:  # elected sign: the rounded sum >= 0 (-0 included, NaN not)
                for i in range(n):
                    for t in range(width):
                        total[t] += values[i, t]
                for t in range(width):
                    r = round_bf16(total[t])
                    positive[t] = (r == 0x8000) | (r <= 0x7F80)
            else:  # elected sign: at least as many positive entries as negative
                for t in range(width):
                    total[t] = 0
                for i in range(n):
                    for t in range(width):
                        v = values[i, t]
                        total[t] += np.float32(v > 0) - np.float32(v < 0)
                for t in range(width):
                    positive[t] = total[t] >= 0
            total[:width] = 0
            divisor[:width] = 0
            for i in range(n):
                w = weights[i]
                for t in range(width):
                    v = values[i, t]
                    agree = ((v > 0) & positive[t]) | ((v < 0) & ~positive[t])
                    total[t] += v * np.float32(agree)
                    divisor[t] += w * np.float32(agree)
        else:
            for i in range(n):
                for t in range(width):
                    total[t] += values[i, t]
        bases = base[j0:j0 + width]
        merged = out[j0:j0 + width]
        for t in range(width):  # the steps after the sum, each a loop of its own (no branch inside)
            total[t] = widen(round_bf16(total[t]))
        if normalize and consensus != 0:
            for t in range(width):
                d = widen(round_bf16(divisor[t]))
                total[t] = widen(round_bf16(total[t] / (d if d != 0 else np.float32(1.0))))
        elif normalize:
            for t in range(width):
                total[t] = widen(round_bf16(total[t] / weight_sum))
        if scale != 1:
            for t in range(width):
                total[t] = widen(round_bf16(total[t] * scale))
        for t in range(width):
            r = round_bf16(total[t] + widen(bases[t]))
            merged[t] = r
            worst = max(worst, r & np.uint16(0x7F80))
    return worst == 0x7F80  # an all-ones exponent: NaN or infinite


@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _block_norms(d, keep, width, how):
    """(norm of ``d[:width]``, of its kept entries): float64 sums of magnitudes (``how`` 1) or
    squares (2), or the largest magnitude (3). Reassociated so that the sums vectorise: float64
    sums of bfloat16 values, rounded to bfloat16 at the end, come out the same in any order."""
    total = 0.0
    kept = 0.0
    if how == 1:
        for t in range(width):
            v = abs(np.float64(d[t]))
            total += v
            kept += v * keep[t]
    elif how == 2:
        for t in range(width):
            v = np.float64(d[t]) * np.float64(d[t])
            total += v
            kept += v * keep[t]
    else:
        for t in range(width):
            v = abs(np.float64(d[t]))
            total = max(total, v)
            kept = max(kept, v * keep[t])
    return total, kept


@njit(nogil=True, cache=True)
def dare_norms(x, base, dare_threshold, dare_seed, how, lo, hi, before, after):
    """Norms of the task vectors ``x[i] - base`` (rounded to bfloat16) over entries ``lo..hi``,
    before and after DARE's drop (the draws of :func:`combine`), accumulated in float64 into
    ``before[i]``/``after[i]``: ``how`` 1 sums magnitudes, 2 squares, 3 takes the largest."""
    n = len(x)
    d = np.empty(_COMBINE_BLOCK, np.float32)
    keep = np.empty(_COMBINE_BLOCK, np.float64)
    for j0 in range(lo, hi, _COMBINE_BLOCK):
        width = min(_COMBINE_BLOCK, hi - j0)
        bases = base[j0:j0 + width]
        for i in range(n):
            xi = x[i][j0:j0 + width]
            threshold = dare_threshold[i]
            seed = dare_seed[i]
            for t in range(width):
                d[t] = widen(round_bf16(widen(xi[t]) - widen(bases[t])))
            for t in range(width):
                keep[t] = np.float64(uniform24(seed, j0 + t) < threshold)
            total, kept = _block_norms(d, keep, width, how)
            if how == 3:
                before[i] = max(before[i], total)
                after[i] = max(after[i], kept)
            else:
                before[i] += total
                after[i] += kept


@njit(nogil=True, cache=True)
def subtract(x, base, out, lo, hi):
    """``out[i][j] = x[i][j] - base[j]`` rounded to bfloat16, for ``lo <= j < hi``."""
    bases = base[lo:hi]
    for i in range(len(x)):
        xi = x[i][lo:hi]
        oi = out[i][lo:hi]
        for t in range(hi - lo):
            oi[t] = round_bf16(widen(xi[t]) - widen(bases[t]))


@njit(nogil=True, cache=True)
def any_nonfinite(bits, exponent):
    """Whether a half-precision bit pattern has an all-ones exponent (NaN or infinite): a max of
    the exponent bits (a reduction that vectorises), compared once."""
    worst = np.uint16(0)
    e = np.uint16(exponent)
    for i in range(bits.size):
        worst = max(worst, bits[i] & e)
    return worst == e
