"""Fused bfloat16 task-vector merges: the same bits as the torch path, several times faster.

A bfloat16 merge done with torch ops (as mergekit does it) makes one pass over memory per step
(subtract, trim, multiply, sign election, sum, divide, add), each widening to float32 and
rounding back; TIES also sorts every task vector. Here each entry goes through all of its steps
at once, in compiled loops (:mod:`polytask.merge._bf16_numba`, numba), rounding after each step
exactly where torch rounds, so the output is bit-identical to :func:`polytask.merge.methods._combine`
(and to mergekit). The trim's selection is linear: a histogram of the 2^15 magnitudes gives the
threshold, and only where equal magnitudes straddle it is torch's sort replayed to pick the same
ones (:func:`trim_masks`).

Used when numba is installed (``pip install 'polytask[fast]'``) and the inputs are bfloat16;
everything else takes the torch path, which gives the same results (tests compare the two).
DARE's drop draws from a counter-based generator (:func:`uniform24`), the same in both paths.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "all_finite", "available", "can_trim", "combine", "dare_norms", "dare_threshold", "stream_seed", "subtract",
    "trim_differences", "trim_in_place", "trim_masks", "uniform24",
]

#: Entries per chunk of :func:`combine` handed to a thread.
_CHUNK = 1 << 20
#: Trims of rows at least this long run one at a time (their scratch is 4 bytes per entry).
_SERIAL_TRIM = 1 << 24
_MASK64 = (1 << 64) - 1


@functools.cache
def _compiled():
    try:
        from polytask.merge import _bf16_numba
    except ImportError:  # numba is not installed: the torch path
        return None
    return _bf16_numba


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(2, torch.get_num_threads())), thread_name_prefix="polytask-kernel")


def available(*tensors: Tensor | None) -> bool:
    """Whether the fused kernels take these tensors (or lists of tensors): numba installed, all
    bfloat16 CPU tensors."""
    flat = [u for t in tensors for u in (t if isinstance(t, (list, tuple)) else [t])]
    if any(t is not None and (t.dtype != torch.bfloat16 or t.device.type != "cpu") for t in flat):
        return False
    return _compiled() is not None


def _bits(t: Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def _rows(x: Tensor | Sequence[Tensor]) -> tuple[np.ndarray, ...]:
    """The models' tensors as a tuple of flat bit arrays: the rows of a stacked ``(N, *shape)``
    tensor, or N tensors of one shape (e.g. views of mapped checkpoint files)."""
    return tuple(_bits(t.reshape(-1)) for t in x)


def subtract(x: Tensor | Sequence[Tensor], base: Tensor, out: Tensor) -> Tensor:
    """``out[i] = x[i] - base`` in bfloat16 (as torch rounds), ``out`` ``(N, *shape)``, in chunks on
    two threads: task vectors from read-only views."""
    compiled = _compiled()
    xs, b = _rows(x), _bits(base.reshape(-1))
    os_ = _rows(out)
    m = b.size

    def run(lo: int) -> None:
        compiled.subtract(xs, b, os_, lo, min(lo + _CHUNK, m))

    list(_pool().map(run, range(0, m, _CHUNK)))
    return out


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_seed(seed: int, model: int) -> int:
    """The seed of model ``model``'s random stream in a tensor whose generator seed is ``seed``."""
    return _splitmix(_splitmix(seed & _MASK64) ^ (model + 1))


def uniform24(seed: int, start: int, count: int) -> Tensor:
    """Draws ``start .. start+count-1`` of the stream ``seed``: int32 in [0, 2^24), uniform.

    SplitMix64's output function (Steele, Lea & Flood, OOPSLA 2014) of the ``(j+1)``-th Weyl step,
    top 24 bits: counter-based, so a chunk of a tensor draws its entries without the others.
    Computed with int64 torch ops (two's-complement wrap-around; logical shifts by masking) when
    numba is absent.
    """
    compiled = _compiled()
    if compiled is not None:
        out = np.empty(count, np.int32)
        compiled.fill_uniform24(np.uint64(seed), start, out)
        return torch.from_numpy(out)

    def signed(c: int) -> int:
        return c - (1 << 64) if c >= 1 << 63 else c

    def shr(z: Tensor, s: int) -> Tensor:
        return (z >> s) & ((1 << (64 - s)) - 1)

    j = torch.arange(start + 1, start + count + 1, dtype=torch.int64)
    z = j.mul_(signed(0x9E3779B97F4A7C15)).add_(signed(seed))
    z = (z ^ shr(z, 30)).mul_(signed(0xBF58476D1CE4E5B9))
    z = (z ^ shr(z, 27)).mul_(signed(0x94D049BB133111EB))
    z = z ^ shr(z, 31)
    return shr(z, 40).to(torch.int32)


def dare_threshold(density: float) -> int:
    """Keep an entry iff its draw is below this: ``ceil(density * 2^24)`` (exact probability)."""
    return math.ceil(min(max(density, 0.0), 1.0) * (1 << 24))  # exact: a power-of-two scaling


#: The exponent bits of each half-precision dtype: also its infinity, the largest magnitude pattern
#: that is not NaN.
_EXPONENT = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def can_trim(x: Tensor) -> bool:
    """Whether :func:`trim_masks` takes ``x``: numba installed, a half-precision CPU tensor."""
    return x.dtype in _EXPONENT and x.device.type == "cpu" and _compiled() is not None


#: Attribute by which :func:`combine` tells :func:`all_finite` whether the tensor it just wrote is
#: finite (popped when read; set again by every write).
_FINITE = "_polytask_finite"


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite; half precision by its bits in one compiled pass
    (torch's ``isfinite`` widens bfloat16 entry by entry: several times slower than the merge)."""
    known = t.__dict__.pop(_FINITE, None)  # told by combine, which wrote t (read once)
    if known is not None:
        return known
    if t.dtype in _EXPONENT and t.device.type == "cpu" and t.is_contiguous() and _compiled() is not None:
        return not _compiled().any_nonfinite(_bits(t.reshape(-1)), _EXPONENT[t.dtype])
    return bool(t.abs().amax() < float("inf")) if t.numel() else True  # NaN fails the comparison


def trim_masks(deltas: Tensor, counts: list[int], *, largest: bool) -> Tensor | None:
    """Masks of the entries ``torch.argsort(|deltas[i]|, descending=largest)[:counts[i]]`` picks,
    tie for tie, for half-precision ``deltas`` ``(N, M)`` (see :func:`can_trim`); None where a row
    has a NaN or reaches the sort's heapsort fallback (the caller sorts)."""
    compiled = _compiled()
    n, m = deltas.shape
    nan_above = _EXPONENT[deltas.dtype]
    masks = torch.zeros((n, m), dtype=torch.bool)
    bits = _bits(deltas)
    keep = masks.numpy()
    rows = [i for i in range(n) if 0 < counts[i] < m]
    for i in range(n):
        if counts[i] >= m:
            keep[i] = True

    status = _per_row(lambda i: compiled.head_keep(bits[i], counts[i], largest, nan_above, keep[i]), rows, m)
    return None if any(status) else masks


def _per_row(select: Callable[[int], int], rows: list[int], m: int) -> list[int]:
    """``select(i)`` for each row, two at a time unless the rows are long (each selection holds 4
    bytes of scratch per entry)."""
    if m < _SERIAL_TRIM and len(rows) > 1:
        return list(_pool().map(select, rows))
    return [select(i) for i in rows]


def dare_norms(x: Tensor | Sequence[Tensor], base: Tensor, thresholds: list[int], seeds: list[int], how: str) -> tuple[Tensor, Tensor]:
    """Per-model ``l1``/``l2``/``linf`` norms of the task vectors ``x[i] - base`` before and after
    DARE's drop (:func:`combine`'s draws), accumulated in float64 and rounded once to bfloat16 (as
    ``methods._norms(exact=True)``), in parallel chunks."""
    compiled = _compiled()
    n = len(x)
    xs = _rows(x)
    b = _bits(base.reshape(-1))
    m = b.size
    code = {"l1": 1, "l2": 2, "linf": 3}[how]
    ts, ss = np.asarray(thresholds, np.int64), np.asarray(seeds, np.uint64)

    def run(lo: int) -> tuple[np.ndarray, np.ndarray]:
        before, after = np.zeros(n), np.zeros(n)
        compiled.dare_norms(xs, b, ts, ss, code, lo, min(lo + _CHUNK, m), before, after)
        return before, after

    parts = list(_pool().map(run, range(0, m, _CHUNK)))
    if code == 3:
        before, after = np.max([p[0] for p in parts], 0), np.max([p[1] for p in parts], 0)
    else:
        before, after = np.sum([p[0] for p in parts], 0), np.sum([p[1] for p in parts], 0)
    if code == 2:
        before, after = np.sqrt(before), np.sqrt(after)
    return torch.from_numpy(before).to(torch.bfloat16), torch.from_numpy(after).to(torch.bfloat16)


def trim_in_place(deltas: Tensor, counts: list[int]) -> list[int]:
    """TIES' trim of half-precision task vectors ``(N, M)`` in place, no mask: entries outside
    ``torch.argsort(|deltas[i]|, descending=True)[:counts[i]]`` become zeros of their sign.

    Returns the rows left unchanged for the caller's masked path: a NaN or an infinity, the sort's
    heapsort fallback, or a count of 0.
    """
    return _trim(list(deltas), deltas, counts, None, deltas.dtype)


def trim_differences(x: Sequence[Tensor], base: Tensor, counts: list[int], out: Tensor) -> list[int]:
    """:func:`trim_in_place` of the task vectors ``x[i] - base`` (bfloat16, rounded as torch),
    written into ``out`` ``(N, *shape)`` only after each one's selection (its scratch and the task
    vector are never held together: the peak of a TIES merge of embeddings). Rows returned (as
    :func:`trim_in_place`) hold the plain difference, for the caller's masked path."""
    left = _trim(list(x), out, counts, base, torch.bfloat16)
    for i in left:
        subtract([x[i]], base, out[i:i + 1])
    return left


def _trim(x: list[Tensor], out: Tensor, counts: list[int], base: Tensor | None, dtype: torch.dtype) -> list[int]:
    compiled = _compiled()
    n = len(x)
    m = out[0].numel()
    nan_above = _EXPONENT[dtype]
    rows = [_bits(t.reshape(-1)) for t in x]
    targets = [_bits(t.reshape(-1)) for t in out]
    b = _bits(base.reshape(-1)) if base is not None else rows[0]
    trimmed = [i for i in range(n) if 0 < counts[i] < m]

    status = _per_row(lambda i: compiled.trim(rows[i], b, base is not None, counts[i], nan_above, targets[i]),
                      trimmed, m)
    if base is not None:  # rows kept whole: the plain difference
        for i in range(n):
            if counts[i] >= m:
                compiled.subtract((rows[i],), b, (targets[i],), 0, m)
    return [i for i in range(n) if counts[i] <= 0] + [i for i, s in zip(trimmed, status) if s != 0]


def combine(x: Tensor | Sequence[Tensor], base: Tensor, weights: Tensor, *, subtract: bool,
            dare: tuple[list[int], list[int], list[float]] | None = None, consensus: str | None, normalize: bool,
            scale: float, out: Tensor | None = None, multiply_by: list[float] | None = None) -> Tensor:
    """``base + scale * sum_i w_i tau_i [/ divisor]`` in bfloat16, bit for bit as
    :func:`polytask.merge.methods._combine` after the same trims and drops.

    ``x`` ``(N, *shape)`` or N tensors of ``base``'s shape: task vectors (TIES': trimmed by
    :func:`trim_in_place`), or fine-tuned weights if ``subtract`` (read only: views of mapped files
    do); ``dare``: per model (threshold, stream seed, rescale divisor or 0) as from
    :func:`dare_threshold`, :func:`stream_seed`, drawn for entry ``j`` of the whole tensor; ``out``: a contiguous bfloat16 buffer of ``base``'s shape to
    fill (else a new tensor); ``multiply_by``: per model, bfloat16 factors applied after the drop
    (a norm-matching rescale, :func:`dare_norms`).
    """
    compiled = _compiled()
    n = len(x)
    xs = _rows(x)
    b = _bits(base.reshape(-1))
    m = b.size
    if out is None or out.shape != base.shape or out.dtype != base.dtype or not out.is_contiguous():
        out = torch.empty_like(base)
    o = _bits(out.reshape(-1))
    w = weights.to(torch.bfloat16).float().numpy()
    thresholds, seeds, divisors = dare if dare is not None else ([-1] * n, [0] * n, [0.0] * n)
    thresholds = np.asarray(thresholds, np.int64)
    seeds = np.asarray(seeds, np.uint64)
    divisors = torch.tensor(divisors).to(torch.bfloat16).float().numpy()
    factors = np.asarray(multiply_by if multiply_by is not None else [0.0] * n, np.float32)
    code = {None: 0, "sum": 1, "count": 2}[consensus]
    weight_sum = np.float32(weights.to(torch.bfloat16).sum(dim=0).float()) if code == 0 else np.float32(1)

    def run(lo: int) -> bool:
        return compiled.combine(xs, b, subtract, thresholds, seeds, divisors, factors, w, code, normalize, weight_sum,
                                np.float32(scale), o, lo, min(lo + _CHUNK, m))

    starts = range(0, m, _CHUNK)
    nonfinite = any(_pool().map(run, starts)) if len(starts) > 1 else run(0)
    setattr(out, _FINITE, not nonfinite)  # for all_finite, without another pass
    return out
