"""Per-tensor merge methods.

A method sees one tensor at a time: the stacked fine-tuned tensors ``tensors`` of shape
``(N, *shape)``, the base tensor (or ``None``) and the per-model parameters as ``(N,)`` float64
tensors (``weight``, ``density``, ``gamma``). Tensors come in the compute dtype when the method
sets ``native_dtype`` (mergekit's task-arithmetic family computes in bfloat16 when the config
says ``dtype: bfloat16``), else in float32 holding values already rounded to the compute dtype
(mergekit's ``linear`` and ``slerp`` work so). The engine casts the result to the compute dtype. Methods are registered in :data:`MERGE_METHODS` under mergekit's names where the two
share a method, so a mergekit YAML means the same thing here; the differences are listed in each
docstring under "mergekit".

Notation: ``tau_i = theta_i - theta_0`` is the task vector of model ``i`` (Ilharco et al., ICLR
2023), ``w_i`` its weight, ``theta_0`` the base.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from polytask.errors import ConfigError
from polytask.merge import checks, kernels
from polytask.merge.sortselect import argsort_head_mask
from polytask.registry import Registry

__all__ = [
    "MergeMethod",
    "TensorContext",
    "MERGE_METHODS",
    "topk_mask",
    "bottomk_mask",
    "tall_masks",
    "slerp",
]


@dataclass
class TensorContext:
    """What a method may know about the tensor it merges besides the values."""

    name: str = ""
    generator: torch.Generator | None = None
    #: For methods with ``writes_out``: a buffer of the merged tensor's shape and dtype that
    #: ``merge`` may fill and return (the engine recycles it once written), or None.
    out: Tensor | None = None
    #: ``scratch(shape, dtype)``: a buffer the engine takes back after the merge (else new memory).
    scratch: Callable[[tuple[int, ...], torch.dtype], Tensor] | None = None

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return self.scratch(shape, dtype) if self.scratch is not None else torch.empty(shape, dtype=dtype)


class MergeMethod:
    """Base class of per-tensor merge methods.

    Subclasses set ``model_params`` (per-model parameters and their defaults), ``requires_base``,
    ``min_models``/``max_models``, take their global parameters in ``__init__`` and implement
    :meth:`merge`. ``random`` methods get a seeded generator per tensor in the context.
    """

    requires_base: ClassVar[bool] = True
    #: A method without a required base that uses one when the config names it (NuSLERP...).
    optional_base: ClassVar[bool] = False
    model_params: ClassVar[dict[str, float]] = {"weight": 1.0}
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    random: ClassVar[bool] = False
    #: Whether ``merge`` may write its result into ``ctx.out`` (the fused kernels do).
    writes_out: ClassVar[bool] = False
    #: Whether ``merge`` takes, where :meth:`fused` says so, its inputs as a list of N read-only
    #: tensors (views of the mapped checkpoint files: no copy) instead of a stacked scratch tensor.
    reads_views: ClassVar[bool] = False

    def fused(self, dtype: torch.dtype) -> bool:
        """Whether tensors of ``dtype`` go through the fused kernels (then ``merge`` reads views)."""
        return False
    #: True: ``merge`` gets its tensors in the compute dtype (bfloat16 arithmetic for a bfloat16
    #: config, as mergekit); False: in float32 (values rounded to the compute dtype first).
    native_dtype: ClassVar[bool] = False
    #: True: each output entry depends only on the same entry of the inputs (no norms, ranks or
    #: randomness over the tensor), so the engine may merge a large tensor a block of rows at a time.
    elementwise: ClassVar[bool] = False

    def merge(
        self, tensors: Tensor, base: Tensor | None, params: dict[str, Tensor], ctx: TensorContext
    ) -> Tensor:
        """Merge ``tensors`` ``(N, *shape)`` (float32) into one tensor of ``shape``.

        ``tensors`` is scratch owned by the caller: a method may overwrite it (to save memory).
        """
        raise NotImplementedError

    def check_model_params(self, params: dict[str, Tensor]) -> None:
        """Refuse per-model parameters (``(N,)`` tensors, each already finite and in range) that
        cannot work together with this method's settings, e.g. a normalisation by weights that
        sum to zero. Called once per merge, before any tensor is read."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", prefix="parameters")


# -- helpers -------------------------------------------------------------------------------------
def _per_model(values: Tensor, ndim: int, dtype: torch.dtype | None = None) -> Tensor:
    """Reshape ``(N,)`` per-model values to broadcast against ``(N, *shape)`` (in ``dtype``)."""
    if dtype is not None:
        values = values.to(dtype)
    return values.reshape(-1, *([1] * ndim))


def _select_k(values: Tensor, counts: list[int], largest: bool, *, ties_likely: bool = False,
              key: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Boolean mask of ``counts[i]`` entries of row ``i`` of ``values`` ``(N, M)``.

    Entries are taken by value (of ``key(row)`` if given, made one row at a time: an ``(N, M)``
    magnitude copy is never held), largest or smallest first, the same entries as mergekit's
    ``torch.argsort(row, descending=largest)[:count]``. O(M) per row (an exact selection, no
    sort): a threshold from :func:`_kth_smallest`, then, where exactly equal values straddle it
    (in bfloat16 nearly always: ``ties_likely`` goes there at once),
    :func:`~polytask.merge.sortselect.argsort_head_mask` replays the steps of ``torch.argsort``
    that decide which tied entries come first, so the same entries are kept as by mergekit
    (bit-identical merges). Large rows run on two threads (the steps are single-threaded torch
    ops that release the GIL; mergekit's sort uses one core).
    """
    n, m = values.shape
    mask = torch.zeros_like(values, dtype=torch.bool)
    rows = [i for i, c in enumerate(counts) if 0 < c < m]
    for i, count in enumerate(counts):
        if count >= m:
            mask[i] = True

    def select(i: int) -> None:
        row = values[i] if key is None else key(values[i])
        mask[i] = _select_row(row, counts[i], largest, ties_likely)

    if len(rows) > 1 and _PARALLEL_ROW <= m <= _SERIAL_ROW:
        with ThreadPoolExecutor(2, thread_name_prefix="polytask-select") as pool:
            list(pool.map(select, rows))
    else:
        for i in rows:
            select(i)
    return mask


#: Rows of this many entries are selected two at a time; longer ones (embeddings) one at a time,
#: as each selection holds a few bytes per entry.
_PARALLEL_ROW, _SERIAL_ROW = 1 << 18, 1 << 24


def _select_row(row: Tensor, count: int, largest: bool, ties_likely: bool) -> Tensor:
    if ties_likely:
        keep = argsort_head_mask(row, count, descending=largest)
        if keep is not None:
            return keep
    m = row.numel()
    threshold = _kth_smallest(row, m - count + 1 if largest else count)
    keep = row > threshold if largest else row < threshold
    need = count - int(torch.count_nonzero(keep))
    tied = (row == threshold).nonzero().squeeze(1)
    if need < tied.numel():  # which tied entries are kept: mergekit's sort decides
        replayed = argsort_head_mask(row, count, descending=largest)
        if replayed is not None:
            return replayed
        keep = torch.zeros_like(row, dtype=torch.bool)  # NaN or the heapsort case: sort as mergekit
        keep[torch.argsort(row, descending=largest)[:count]] = True
        return keep
    keep[tied[:need]] = True
    return keep


_SAMPLE = 1 << 16


def _kth_smallest(x: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest value (1-based) of the 1-D tensor ``x``, exactly.

    For large tensors a sorted sample brackets the answer; only the entries inside the bracket
    (about 2 % of them) go through ``kthvalue``. If the bracket misses (vanishingly rare), the
    whole tensor does. The sample positions are fixed, so the result is deterministic.
    """
    n = x.numel()
    if n <= 4 * _SAMPLE:
        return x.kthvalue(k).values
    idx = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(n))
    sample = x[idx].sort().values
    q = (k - 0.5) / n
    lo = sample[max(0, int((q - 0.01) * _SAMPLE))]
    hi = sample[min(_SAMPLE - 1, int((q + 0.01) * _SAMPLE) + 1)]
    below = int(torch.count_nonzero(x < lo))
    band = x[(x >= lo) & (x <= hi)]
    rank = k - below
    if 1 <= rank <= band.numel():
        return band.kthvalue(rank).values
    return x.kthvalue(k).values


def topk_mask(x: Tensor, density: Tensor) -> Tensor:
    """Mask keeping the ``int(density_i * numel)`` largest-magnitude entries of each ``x[i]``.

    This is TIES' "trim" step (Yadav et al., NeurIPS 2023). ``density`` is ``(N,)``.
    """
    flat = x.reshape(x.shape[0], -1)
    return _magnitude_select(flat, _trim_counts(density, flat.shape[1]), largest=True).reshape(x.shape)


def _trim_counts(density: Tensor, m: int) -> list[int]:
    """Entries each model keeps: mergekit's ``int(density * numel)``, at least 1 unless 0."""
    return [m if d >= 1 else (0 if d <= 0 else max(1, int(d * m))) for d in density.tolist()]


def _trim_fused(deltas: Tensor, density: Tensor, views: list[Tensor] | None = None, base: Tensor | None = None) -> None:
    """:func:`topk_mask`'s trim applied in place without masks (compiled, half precision), or of
    ``views[i] - base`` into ``deltas``; rows the kernel leaves (NaN, infinities) go through the
    masks."""
    flat = deltas.reshape(deltas.shape[0], -1)
    counts = _trim_counts(density, flat.shape[1])
    left = kernels.trim_in_place(flat, counts) if views is None else kernels.trim_differences(views, base, counts, flat)
    for i in left:
        flat[i].mul_(_magnitude_select(flat[i:i + 1], counts[i:i + 1], largest=True)[0])


def _magnitude_select(flat: Tensor, counts: list[int], largest: bool) -> Tensor:
    """:func:`_select_k` by magnitude; half precision through the compiled selection when numba
    is installed (the same entries: :func:`polytask.merge.kernels.trim_masks`)."""
    if kernels.can_trim(flat):
        masks = kernels.trim_masks(flat, counts, largest=largest)
        if masks is not None:
            return masks
    return _select_k(flat, counts, largest=largest, ties_likely=_half(flat), key=_magnitudes)


def _half(x: Tensor) -> bool:
    """Half-precision values: 2^15 magnitudes, so a cut between exactly equal ones is the rule."""
    return x.dtype in (torch.bfloat16, torch.float16)


def _magnitudes(flat: Tensor) -> Tensor:
    """``|flat|`` (exact in every dtype). Half-precision magnitudes stay half: comparisons order
    them as their float32 values, so selections and torch's sort pick the same entries, in half
    the memory."""
    return flat.abs()


def bottomk_mask(x: Tensor, counts: list[int]) -> Tensor:
    """Mask of the ``counts[i]`` smallest-magnitude entries of each ``x[i]``."""
    flat = x.reshape(x.shape[0], -1)
    return _magnitude_select(flat, counts, largest=False).reshape(x.shape)


def _norms(x: Tensor, how: bool | str, exact: bool = False) -> Tensor | None:
    """Per-model norm of ``x`` ``(N, *shape)`` that ``how`` rescales to match (None: no norm).

    ``exact``: accumulated in float64, then rounded once to ``x``'s dtype (the same value in any
    order of summation, so the fused kernels give the same bits); else as torch sums in ``x``'s
    dtype (as mergekit)."""
    dims = tuple(range(1, x.dim()))
    if how == "l1":
        return x.abs().sum(dims, dtype=torch.float64).to(x.dtype) if exact else x.abs().sum(dims)
    if how == "l2":
        if exact:
            return torch.linalg.vector_norm(x.double(), dim=dims).to(x.dtype)
        return torch.linalg.vector_norm(x, dim=dims)
    if how == "linf":
        return x.abs().amax(dims)
    return None


def _rescale(masked: Tensor, before: Tensor | None, density: Tensor, how: bool | str, exact: bool = False) -> Tensor:
    """Rescale masked task vectors in place: by ``1/density`` (DARE paper), or back to the norm
    ``before`` they had before masking (``l1``/``l2``/``linf``, as mergekit)."""
    if how is False or how is None:
        return masked
    ndim = masked.dim() - 1
    if how is True or how == "inverse_density":
        safe = torch.where(density > 0, density, torch.ones_like(density))
        return masked.div_(_per_model(safe, ndim, masked.dtype))
    return masked.mul_(_per_model(_norm_ratio(before, _norms(masked, how, exact)), ndim, masked.dtype))


def _norm_ratio(before: Tensor, after: Tensor) -> Tensor:
    """``before / after`` per model, 1 where either norm is (near) zero."""
    eps = 1e-7
    return torch.where((before < eps) | (after < eps), torch.ones_like(before), before / after)


def _check_rescale(rescale: bool | str) -> bool | str:
    return checks.choice(checks.key("rescale"), rescale, (True, False, "inverse_density", "l1", "l2", "linf"))


def _check_fraction(name: str, value: float, *, low_open: bool = False) -> float:
    return checks.number(checks.key(name), value, low=0.0, high=1.0, low_open=low_open)


def _check_weight_sum(weights: Tensor, *, normalize: bool, consensus: str | None) -> None:
    """Refuse a normalisation that divides by a (near) zero sum of weights.

    Without sign election the divisor is ``sum_i w_i``. With it (TIES), the divisor of an entry
    is the sum of the weights of the models that agree there, any subset of the models: it
    cannot vanish only if the non-zero weights share one sign.
    """
    if not normalize:
        return
    shown = ", ".join(f"{w:g}" for w in weights.tolist())
    if consensus is not None:
        if bool((weights > 0).any()) and bool((weights < 0).any()):
            raise ConfigError(
                f"{checks.key('normalize')}: true divides each entry by the summed weights of the models "
                f"that agree on its sign, which can be 0 with weights of both signs ({shown}); set "
                f"normalize: false or use weights of one sign, got normalize: true"
            )
        return
    total = float(weights.sum())
    if abs(total) <= 1e-6 * float(weights.abs().sum()) or total == 0:
        raise ConfigError(
            f"{checks.key('normalize')}: true divides by the sum of the models' weights, which is "
            f"{total:g} ({shown}); set normalize: false or change the weights, got normalize: true"
        )


def _sign_mask(deltas: Tensor, consensus: str) -> Tensor:
    """TIES "elect": entries whose sign agrees with the elected sign (total mass, or count).

    The elected sign is + where the total is >= 0; zero entries agree with neither sign.
    """
    positive, negative = deltas > 0, deltas < 0
    if consensus == "sum":
        elected_positive = deltas.sum(dim=0) >= 0
    else:
        elected_positive = positive.sum(dim=0) >= negative.sum(dim=0)
    # where(elected_positive, positive, negative) as byte-wise logic (one pass each, no select kernel):
    # an entry agrees iff it is non-zero and "is positive" equals "+ was elected"
    nonzero = positive.logical_or(negative)
    return positive.eq_(elected_positive).logical_and_(nonzero)


#: Entries per block of the sign election and disjoint mean (see :func:`_combine`).
_COMBINE_BLOCK = 1 << 22


def _agreeing_weight_sum(agree: Tensor, w: Tensor) -> Tensor:
    """mergekit's ``(w * mask).sum(0)`` with 0 replaced by 1, without an ``(N, *shape)`` temporary:
    the same additions in the same order, accumulated as torch's sum accumulates (float32 for
    half-precision inputs), then rounded once to the compute dtype."""
    acc = torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype
    divisor = torch.zeros(agree.shape[1:], dtype=acc)
    for agree_i, w_i in zip(agree, w.reshape(-1).to(acc).tolist()):  # over models: N is small
        divisor.add_(agree_i, alpha=w_i)
    divisor = divisor.to(w.dtype)
    return divisor.masked_fill_(divisor == 0, 1)


def _combine(
    deltas: Tensor, weights: Tensor, base: Tensor, *, consensus: str | None, normalize: bool, scale: float
) -> Tensor:
    """``theta_0 + scale * sum_i w_i tau_i [/ sum_i w_i]``, optionally over sign-agreeing entries.

    The operations and their order are mergekit's (``GeneralizedTaskArithmeticMerge``), in the
    dtype of ``deltas`` with the weights rounded to it, so a bfloat16 merge gives its bits.
    ``deltas`` is scratch: it is overwritten.
    """
    if consensus is not None and deltas[0].numel() > _COMBINE_BLOCK:
        # each entry is merged on its own from here: blocks of entries bound the (N, block) masks of
        # the sign election (an embedding's would take gigabytes); the same operations per entry
        flat, base_flat = deltas.reshape(deltas.shape[0], -1), base.reshape(-1)
        out = torch.empty_like(base_flat)
        for start in range(0, flat.shape[1], _COMBINE_BLOCK):
            block = slice(start, start + _COMBINE_BLOCK)
            out[block] = _combine(flat[:, block], weights, base_flat[block], consensus=consensus,
                                  normalize=normalize, scale=scale)
        return out.reshape(base.shape)
    w = _per_model(weights, deltas.dim() - 1, deltas.dtype)
    weighted = deltas.mul_(w)
    if consensus is not None:
        agree = _sign_mask(weighted, consensus)
        divisor = _agreeing_weight_sum(agree, w) if normalize else None  # unused otherwise
        for weighted_i, agree_i in zip(weighted, agree):  # per model: a mask cast to the dtype is (M,), not (N, M)
            weighted_i.mul_(agree_i)
        mixed = weighted.sum(dim=0)
        del agree
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)  # not near zero when normalizing: see _check_weight_sum
    if normalize:
        mixed = mixed.div_(divisor)
    if scale != 1:
        mixed = mixed.mul_(scale)
    return mixed.add_(base)


def _check_consensus(consensus: str | None) -> str | None:
    return checks.choice(checks.key("consensus"), consensus, (None, "sum", "count"))


def _check_lambda(lambda_: float) -> float:
    return checks.number(checks.key("lambda_"), lambda_)


def _check_normalize(normalize: bool) -> bool:
    return checks.flag(checks.key("normalize"), normalize)


class _WeightedSum(MergeMethod):
    """Base of the methods whose ``normalize`` divides by summed weights (:func:`_combine`)."""

    normalize: bool = False
    consensus: str | None = None

    def check_model_params(self, params: dict[str, Tensor]) -> None:
        _check_weight_sum(params["weight"], normalize=self.normalize, consensus=self.consensus)


# -- averaging -----------------------------------------------------------------------------------
@MERGE_METHODS.register("linear", "model_soup", "soup")
class Linear(_WeightedSum):
    """Weighted average of the models: model soups (Wortsman et al., ICML 2022).

    ``theta = sum_i w_i theta_i / sum_i w_i`` (``normalize=True``) or ``sum_i w_i theta_i``.
    With ``normalize``, weights that sum to (nearly) zero are refused (ConfigError).

    mergekit: same as its ``linear``. Through the Python API the base is not an input; in a config
    an unlisted ``base_model`` is one more input, as in mergekit.
    """

    requires_base = False
    elementwise = True

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = _check_normalize(normalize)

    def merge(self, tensors, base, params, ctx):
        # mergekit's order: float32 (float64 for float64 inputs) addcmul over the models, then /sum
        dtype = torch.float64 if tensors.dtype == torch.float64 else torch.float32
        w = params["weight"].to(dtype)
        out = torch.zeros(tensors.shape[1:], dtype=dtype)
        for tensor, coefficient in zip(tensors, w):
            out.addcmul_(tensor, coefficient)
        return out.div_(w.sum()) if self.normalize else out


@MERGE_METHODS.register("task_arithmetic")
class TaskArithmetic(_WeightedSum):
    """Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

    ``theta = theta_0 + lambda * sum_i w_i tau_i`` (divided by ``sum_i w_i`` if ``normalize``).

    mergekit: same as its ``task_arithmetic`` (YAML ``lambda`` is ``lambda_`` in Python).
    """

    native_dtype = True
    writes_out = True
    reads_views = True
    elementwise = True

    def __init__(self, normalize: bool = False, lambda_: float = 1.0, rescale: bool = False) -> None:
        self.normalize = _check_normalize(normalize)
        self.lambda_ = _check_lambda(lambda_)
        # mergekit takes it for every task-arithmetic method; without a mask it changes nothing
        self.rescale = checks.flag(checks.key("rescale"), rescale)

    def fused(self, dtype):
        return dtype == torch.bfloat16 and kernels.available()

    def merge(self, tensors, base, params, ctx):
        if kernels.available(tensors, base):
            return kernels.combine(tensors, base, params["weight"], subtract=True, consensus=None,
                                   normalize=self.normalize, scale=self.lambda_, out=ctx.out)
        return _combine(tensors.sub_(base), params["weight"], base, consensus=None,
                        normalize=self.normalize, scale=self.lambda_)


@MERGE_METHODS.register("ties")
class Ties(_WeightedSum):
    """TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
    NeurIPS 2023).

    1. trim: keep the ``density`` fraction of largest-magnitude entries of each ``tau_i``;
    2. elect: per entry, the sign of the summed (weighted) trimmed values;
    3. disjoint merge: mean over the models whose sign agrees (weighted by ``w_i`` when
       ``normalize``), then ``theta = theta_0 + lambda * tau_m``.

    The paper trims to 20 %; ``density`` defaults to 1.0 (no trim) as in mergekit, so set it.
    With ``normalize``, weights of both signs are refused: the mean over the agreeing models
    could divide by zero (mergekit divides by 1 there instead).
    ``rescale`` (mergekit's key): ``true``/``"l1"`` rescales each trimmed task vector back to
    its L1 norm (``"l2"``/``"linf"``: that norm); the paper does not rescale (default false).
    mergekit: same as its ``ties``, bit for bit in the same dtype: of several exactly equal
    magnitudes at the trim threshold, the ones its ``torch.argsort`` puts first are kept, found
    without the sort (:mod:`polytask.merge.sortselect`).
    """

    model_params = {"weight": 1.0, "density": 1.0}

    native_dtype = True
    writes_out = True
    reads_views = True

    def __init__(self, normalize: bool = True, lambda_: float = 1.0, consensus: str = "sum",
                 rescale: bool | str = False) -> None:
        self.normalize = _check_normalize(normalize)
        self.lambda_ = _check_lambda(lambda_)
        self.consensus = _check_consensus(consensus)
        self.rescale = _check_rescale(rescale)
        if self.rescale in (True, "inverse_density"):  # no 1/density for a deterministic trim: mergekit's L1
            self.rescale = "l1"

    def fused(self, dtype):
        return dtype == torch.bfloat16 and not self.rescale and kernels.available()

    def merge(self, tensors, base, params, ctx):
        if not self.rescale and kernels.available(tensors, base):  # trim in place, elect and merge in one pass
            if isinstance(tensors, list):  # read-only views: the trimmed task vectors go into scratch
                deltas = ctx.buffer((len(tensors), *base.shape), base.dtype)
                _trim_fused(deltas, params["density"], tensors, base)
            else:
                deltas = tensors.sub_(base)
                _trim_fused(deltas, params["density"])
            # the merged tensor goes over the first task vector (each block is read before it is
            # written): no output buffer, the peak of an embedding's merge is one tensor lower
            return kernels.combine(deltas, base, params["weight"], subtract=False, consensus=self.consensus,
                                   normalize=self.normalize, scale=self.lambda_, out=deltas[0])
        deltas = tensors.sub_(base)
        before = _norms(deltas, self.rescale)
        for delta_i, keep_i in zip(deltas, topk_mask(deltas, params["density"])):  # per model: (M,) casts
            delta_i.mul_(keep_i)
        if self.rescale:  # back to each task vector's norm before the trim (mergekit's rescale)
            deltas = _rescale(deltas, before, params["density"], self.rescale)
        return _combine(deltas, params["weight"], base, consensus=self.consensus,
                        normalize=self.normalize, scale=self.lambda_)


@MERGE_METHODS.register("dare_linear", "dare_task_arithmetic", "dare")
class DareLinear(_WeightedSum):
    """DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch", ICML 2024) followed by task arithmetic.

    Drop: each entry of ``tau_i`` is kept with probability ``density`` (= 1 - p) by a seeded
    Bernoulli mask; rescale: kept entries are multiplied by ``1/density`` so that
    ``E[masked tau_i] = tau_i``. Then ``theta = theta_0 + lambda * sum_i w_i tau_i``.

    ``rescale``: ``true``/``"inverse_density"`` is the paper's ``1/(1-p)``; ``"l1"``, ``"l2"``,
    ``"linf"`` rescale to keep that norm of ``tau_i``. mergekit: its ``rescale: true`` means L1 norm
    matching, not ``1/density``; write ``rescale: l1`` for its exact behaviour (both agree in
    expectation). Masks come from our own seeded counter-based generator (:func:`dare_drop`), so
    the result equals mergekit's only in distribution.
    """

    model_params = {"weight": 1.0, "density": 1.0}
    random = True

    native_dtype = True
    writes_out = True
    reads_views = True

    def __init__(self, normalize: bool = False, lambda_: float = 1.0, rescale: bool | str = True) -> None:
        self.normalize = _check_normalize(normalize)
        self.lambda_ = _check_lambda(lambda_)
        self.rescale = _check_rescale(rescale)

    def fused(self, dtype):
        return dtype == torch.bfloat16 and kernels.available()

    def merge(self, tensors, base, params, ctx):
        fused = _fused_dare(tensors, base, params, self.rescale, ctx.generator, consensus=self.consensus,
                            normalize=self.normalize, scale=self.lambda_, out=ctx.out)
        if fused is not None:
            return fused
        deltas = dare_drop(tensors.sub_(base), params["density"], self.rescale, ctx.generator)
        return _combine(deltas, params["weight"], base, consensus=self.consensus,
                        normalize=self.normalize, scale=self.lambda_)


def dare_drop(deltas: Tensor, density: Tensor, rescale: bool | str, generator: torch.Generator | None) -> Tensor:
    """DARE's drop-and-rescale of task vectors ``(N, *shape)`` with keep probability ``density``
    (in place). Models with ``density >= 1`` are left as they are.

    Entry ``j`` of model ``i`` is kept iff draw ``j`` of stream ``i`` (:func:`_dare_streams`) is
    below ``ceil(density_i * 2^24)``: the keep probability is ``density_i`` to 2^-24, the same
    draws in the fused bfloat16 path (:mod:`polytask.merge.kernels`), in any chunking.
    """
    if bool((density >= 1).all()):
        return deltas
    density = density.clamp(0, 1)
    before = _norms(deltas, rescale, exact=True)
    flat = deltas.reshape(deltas.shape[0], -1)
    m = flat.shape[1]
    for delta_i, p, seed in zip(flat, density.tolist(), _dare_streams(generator, len(flat))):
        threshold = kernels.dare_threshold(p)
        for start in range(0, m, _DRAW_CHUNK):  # bounded int64 temporaries
            part = delta_i[start:start + _DRAW_CHUNK]
            part.mul_(kernels.uniform24(seed, start, part.numel()) < threshold)
    return _rescale(deltas, before, density, rescale, exact=True)


#: Draws made at once by :func:`dare_drop`'s torch path.
_DRAW_CHUNK = 1 << 22


def _dare_streams(generator: torch.Generator | None, n: int) -> list[int]:
    """Per-model stream seeds of one tensor: from the tensor's seeded generator (the engine's), or
    from torch's global generator when none is given."""
    seed = generator.initial_seed() if generator is not None else int(torch.randint(2**62, ()))
    return [kernels.stream_seed(seed, i) for i in range(n)]


def _fused_dare(tensors: Tensor, base: Tensor, params: dict[str, Tensor], rescale: bool | str,
                generator: torch.Generator | None, **combine) -> Tensor | None:
    """DARE's drop, its ``1/density`` rescale and the (TIES) combination in one pass per entry
    (bfloat16 with numba; None otherwise: the torch path)."""
    if not kernels.available(tensors, base):
        return None
    density = params["density"]
    n = len(tensors)
    if bool((density >= 1).all()):
        return kernels.combine(tensors, base, params["weight"], subtract=True, **combine)
    ps = density.clamp(0, 1).tolist()
    thresholds, seeds = [kernels.dare_threshold(p) for p in ps], _dare_streams(generator, n)
    if rescale in (True, "inverse_density"):
        dare = (thresholds, seeds, [p if p > 0 else 1.0 for p in ps])
        return kernels.combine(tensors, base, params["weight"], subtract=True, dare=dare, **combine)
    if not rescale:
        dare = (thresholds, seeds, [0.0] * n)
        return kernels.combine(tensors, base, params["weight"], subtract=True, dare=dare, **combine)
    # back to each task vector's norm: a first pass for the norms before and after the drop
    before, after = kernels.dare_norms(tensors, base, thresholds, seeds, rescale)
    scale = _norm_ratio(before, after).tolist()
    return kernels.combine(tensors, base, params["weight"], subtract=True, dare=(thresholds, seeds, [0.0] * n),
                           multiply_by=scale, **combine)


@MERGE_METHODS.register("dare_ties")
class DareTies(DareLinear):
    """DARE drop-and-rescale (Yu et al., ICML 2024) followed by TIES' sign election and disjoint
    merge (Yadav et al., NeurIPS 2023) instead of TIES' magnitude trim.

    mergekit: as its ``dare_ties`` (``normalize`` defaults to false there and here); see
    :class:`DareLinear` for ``rescale``.
    """

    def __init__(self, normalize: bool = False, lambda_: float = 1.0, rescale: bool | str = True,
                 consensus: str = "sum") -> None:
        super().__init__(normalize=normalize, lambda_=lambda_, rescale=rescale)
        self.consensus = _check_consensus(consensus)


def della_drop(deltas: Tensor, density: Tensor, epsilon: Tensor, rescale: bool | str,
               generator: torch.Generator | None) -> Tensor:
    """DELLA's MagPrune on task vectors ``(N, *shape)`` (in place): in each row, the entry of
    magnitude rank ``r`` (1 = smallest, of ``n``) is kept with probability
    ``p = density - epsilon + 2 epsilon (r - 1)/(n - 1)``; kept entries are divided by their ``p``
    (``rescale`` true) or rescaled to keep a norm (``"l1"``...). 1-D tensors are one row."""
    dens, eps = density.tolist(), epsilon.tolist()
    for i in range(deltas.shape[0]):
        if dens[i] >= 1:
            continue
        x = deltas[i]
        rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
        ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(rows.dtype)
        span = max(rows.shape[1] - 1, 1)
        probs = (dens[i] - eps[i]) + ranks / span * (2 * eps[i])
        before = _norms(rows.unsqueeze(0), rescale)
        mask = torch.bernoulli(probs.float(), generator=generator).to(rows.dtype)
        rows.mul_(mask)
        if rescale is True or rescale == "inverse_density":
            rows.div_(probs)
        elif rescale:
            _rescale(rows.unsqueeze(0), before, density[i:i + 1], rescale)
    return deltas


def _check_della(params: dict[str, Tensor]) -> None:
    for d, e in zip(params["density"].tolist(), params["epsilon"].tolist()):
        if d < 1 and not (0 < d - e and d + e < 1):
            raise ConfigError(f"{checks.key('epsilon')}: density - epsilon and density + epsilon must lie in "
                              f"(0, 1) (they are the lowest and highest keep probabilities), got density {d:g}, "
                              f"epsilon {e:g}")


@MERGE_METHODS.register("della_linear")
class DellaLinear(_WeightedSum):
    """DELLA-Merging with task arithmetic (Deep et al., "DELLA-Merging: Reducing Interference in
    Model Merging through Magnitude-Based Sampling", arXiv 2406.11617, 2024).

    Drop (MagPrune, Sec. 3.1): within each row of ``tau_i``, entries are ranked by magnitude and
    kept with probability ``p_r = (density - epsilon) + 2 epsilon (r - 1)/(n - 1)`` (larger
    entries more often; mean ``density``); kept entries are divided by ``p_r`` so that
    ``E[masked tau_i] = tau_i``. Then ``theta = theta_0 + lambda * sum_i w_i tau_i`` (``della``
    adds TIES' sign election).

    ``rescale``: ``true`` is the paper's ``1/p_r``; ``"l1"``/``"l2"``/``"linf"`` keep that norm.
    mergekit: its ``rescale: true`` is L1 norm matching (``rescale: l1`` here); masks come from our
    seeded generator, so outputs agree in distribution (same kept fraction and mass).
    """

    model_params = {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    random = True
    native_dtype = True

    def __init__(self, normalize: bool = False, lambda_: float = 1.0, rescale: bool | str = True,
                 int8_mask: bool = False) -> None:
        self.normalize = _check_normalize(normalize)
        self.lambda_ = _check_lambda(lambda_)
        self.rescale = _check_rescale(rescale)
        self.int8_mask = checks.flag(checks.key("int8_mask"), int8_mask)

    def check_model_params(self, params: dict[str, Tensor]) -> None:
        super().check_model_params(params)
        _check_della(params)

    def merge(self, tensors, base, params, ctx):
        deltas = della_drop(tensors.sub_(base), params["density"], params["epsilon"], self.rescale, ctx.generator)
        return _combine(deltas, params["weight"], base, consensus=self.consensus,
                        normalize=self.normalize, scale=self.lambda_)


@MERGE_METHODS.register("della")
class Della(DellaLinear):
    """DELLA-Merging (Deep et al., arXiv 2406.11617, 2024): MagPrune (see :class:`DellaLinear`),
    then TIES' sign election and the mean over agreeing models (Yadav et al., NeurIPS 2023).

    mergekit: as its ``della`` (``normalize`` and ``rescale`` default to true there and here).
    """

    def __init__(self, normalize: bool = True, lambda_: float = 1.0, rescale: bool | str = True,
                 int8_mask: bool = False, consensus: str = "sum") -> None:
        super().__init__(normalize=normalize, lambda_=lambda_, rescale=rescale, int8_mask=int8_mask)
        self.consensus = _check_consensus(consensus)


@MERGE_METHODS.register("breadcrumbs")
class Breadcrumbs(_WeightedSum):
    """Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
    with Sparse Masks", ECCV 2024).

    Per tensor, each ``tau_i`` loses its ``gamma`` fraction of largest-magnitude entries
    (outliers) and then its smallest entries until a ``density`` fraction remains; then
    ``theta = theta_0 + lambda * sum_i w_i tau_i``. ``rescale: true`` rescales each masked task
    vector back to its L1 norm (as mergekit; ``"inverse_density"`` divides by ``density``).
    mergekit: same as its ``breadcrumbs`` (``breadcrumbs_ties`` adds the sign election).
    """

    model_params = {"weight": 1.0, "density": 1.0, "gamma": 0.01}

    native_dtype = True

    def __init__(self, normalize: bool = False, lambda_: float = 1.0, rescale: bool | str = False) -> None:
        self.normalize = _check_normalize(normalize)
        self.lambda_ = _check_lambda(lambda_)
        self.rescale = _check_rescale(rescale)
        if self.rescale is True:  # a deterministic mask: mergekit's L1 norm matching, as for TIES
            self.rescale = "l1"

    def merge(self, tensors, base, params, ctx):
        deltas = tensors - base
        m = deltas[0].numel()
        density, gamma = params["density"].tolist(), params["gamma"].tolist()
        keep_n = [int(d * m) for d in density]
        bottom = [max(0, m - k - int(g * m)) for k, g in zip(keep_n, gamma)]
        keep = bottomk_mask(deltas, [b + k for b, k in zip(bottom, keep_n)]) & ~bottomk_mask(deltas, bottom)
        full = _per_model(params["density"] >= 1, deltas.dim() - 1)
        before = _norms(deltas, self.rescale)
        masked = deltas.mul_(keep | full)
        masked = _rescale(masked, before, params["density"].clamp(0, 1), self.rescale)
        return _combine(masked, params["weight"], base, consensus=self.consensus,
                        normalize=self.normalize, scale=self.lambda_)


@MERGE_METHODS.register("breadcrumbs_ties")
class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs masks (Davari & Belilovsky, ECCV 2024) with TIES' sign election (Yadav
    et al., NeurIPS 2023). mergekit: same as its ``breadcrumbs_ties``."""

    def __init__(self, normalize: bool = False, lambda_: float = 1.0, rescale: bool | str = False,
                 consensus: str = "sum") -> None:
        super().__init__(normalize=normalize, lambda_=lambda_, rescale=rescale)
        self.consensus = _check_consensus(consensus)


# -- geometric -----------------------------------------------------------------------------------
@MERGE_METHODS.register("slerp")
class Slerp(MergeMethod):
    """Spherical linear interpolation between the base and one model (Shoemake, SIGGRAPH 1985).

    Each tensor is treated as one flat vector; with ``Omega`` the angle between the two,
    ``theta = sin((1-t) Omega)/sin Omega * theta_0 + sin(t Omega)/sin Omega * theta_1``, and plain
    linear interpolation when the normalised vectors are (anti)parallel (``|cos| > 0.9995``).
    ``t`` is in [0, 1] (an interpolation); a config may vary it over layers and tensors
    (gradients, filters). mergekit: same as its ``slerp``, bit for bit (:func:`slerp` follows its
    float32 arithmetic); it does not check the range of ``t``.
    """

    model_params: ClassVar[dict[str, float]] = {}
    max_models = 1

    def __init__(self, t: float = 0.5) -> None:
        self.t = checks.number(checks.key("t"), t, low=0.0, high=1.0)

    def merge(self, tensors, base, params, ctx):
        return slerp(self.t, base, tensors[0])


_SLERP_CHUNK = 1024 * 1024


def slerp(t: float | Tensor, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from ``v0`` (``t = 0``) to ``v1`` (``t = 1``), each tensor one
    flat vector; linear where the normalised vectors are (anti)parallel (``|cos| > dot_threshold``).

    The arithmetic is mergekit's ``slerp`` step for step (float32, or float64 for float64
    inputs; norms and the dot product over chunks of 2**20 entries), so results agree bitwise.
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    t = torch.as_tensor(t).reshape(-1, 1).to(dtype)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    chunks = range(0, a.shape[1], _SLERP_CHUNK)
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, i:i + _SLERP_CHUNK].to(dtype), dim=1, keepdim=True) for i in chunks]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, i:i + _SLERP_CHUNK].to(dtype), dim=1, keepdim=True) for i in chunks]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([
        (a[:, i:i + _SLERP_CHUNK].to(dtype) / norm_a * (b[:, i:i + _SLERP_CHUNK].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
        for i in chunks]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a, dtype=dtype)
    for i in chunks:
        result[:, i:i + _SLERP_CHUNK] = coef_a * a[:, i:i + _SLERP_CHUNK].to(dtype) + coef_b * b[:, i:i + _SLERP_CHUNK].to(dtype)
    return result.reshape(v0.shape)


@MERGE_METHODS.register("model_stock")
class ModelStock(MergeMethod):
    """Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models",
    ECCV 2024).

    Per tensor, with ``cos`` the mean pairwise cosine between the N task vectors,
    ``t = N cos / (1 + (N-1) cos)`` and ``theta = t * mean_i theta_i + (1 - t) * theta_0``. When
    ``1 + (N-1) cos`` vanishes the base is kept. ``filter_wise=True`` computes one ``t`` per row
    (output filter) instead of per tensor. mergekit: same as its ``model_stock``.
    """

    model_params: ClassVar[dict[str, float]] = {}
    min_models = 2
    native_dtype = True

    def __init__(self, filter_wise: bool = False) -> None:
        self.filter_wise = checks.flag(checks.key("filter_wise"), filter_wise)

    def merge(self, tensors, base, params, ctx):
        # mergekit's operations in its order (pairwise cosines, in the compute dtype)
        n = tensors.shape[0]
        if self.filter_wise:
            w0 = base.unsqueeze(0) if base.dim() == 1 else base
            ws = [t.unsqueeze(0) if base.dim() == 1 else t for t in tensors]
        else:
            w0 = base.reshape(-1)
            ws = [t.reshape(-1) for t in tensors]
        offsets = [w - w0 for w in ws]
        cos = []
        for i, a in enumerate(offsets):  # over pairs of models: N is small
            for b in offsets[i + 1:]:
                norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cos.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        mean_cos = torch.stack(cos).mean(dim=0).unsqueeze(-1)
        denominator = 1 + (n - 1) * mean_cos
        singular = denominator.abs() < 1e-6
        safe = torch.where(singular, torch.ones_like(denominator), denominator)
        t = torch.where(singular, torch.zeros_like(mean_cos), (n * mean_cos) / safe)
        average = sum(ws) / n
        return (t * average + (1 - t) * w0).reshape(base.shape)


# -- masks ---------------------------------------------------------------------------------------
def tall_masks(deltas: Tensor, lambdas: float | Tensor = 0.6, weights: Tensor | None = None) -> Tensor:
    """TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression", ICML 2024): ``m_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|`` with
    ``tau_MTL = sum_t w_t tau_t``. ``deltas`` is ``(T, *shape)``; returns a bool ``(T, *shape)``.
    ``theta_0 + m_t * tau_MTL`` approximates the model fine-tuned on task ``t``.
    """
    w = torch.ones(deltas.shape[0]) if weights is None else weights
    weighted = deltas * _per_model(w, deltas.dim() - 1, deltas.dtype)
    mtl = weighted.sum(dim=0)
    lam = torch.as_tensor(lambdas, dtype=deltas.dtype)
    if lam.dim() == 1:
        lam = _per_model(lam, deltas.dim() - 1)
    return weighted.abs() >= lam * (mtl - weighted).abs()


@MERGE_METHODS.register("consensus", "consensus_ta", "tall")
class Consensus(MergeMethod):
    """Consensus merging (Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression", ICML 2024) on top of task arithmetic.

    TALL masks ``m_t = |tau_t| >= lambda_tall |tau_MTL - tau_t|`` mark the entries that matter to
    task ``t``; entries that matter to fewer than ``k`` tasks (selfish or catastrophic weights)
    are removed from the multi-task vector: ``theta = theta_0 + lambda * 1[sum_t m_t >= k] *
    tau_MTL``, ``tau_MTL = sum_t w_t tau_t``. The paper uses ``k = 2`` and tunes ``lambda_tall``
    per task in [0.2, 0.6] on validation data; here it is one value.
    """

    def __init__(self, k: int = 2, lambda_tall: float = 0.6, lambda_: float = 1.0) -> None:
        self.k = checks.integer(checks.key("k"), k, low=0)
        self.lambda_tall = checks.number(checks.key("lambda_tall"), lambda_tall, low=0.0)
        self.lambda_ = _check_lambda(lambda_)

    def merge(self, tensors, base, params, ctx):
        deltas = tensors - base
        masks = tall_masks(deltas, self.lambda_tall, params["weight"])
        keep = masks.sum(dim=0) >= self.k
        mtl = (deltas * _per_model(params["weight"], deltas.dim() - 1, deltas.dtype)).sum(dim=0)
        return base + self.lambda_ * mtl * keep


# -- spectral ------------------------------------------------------------------------------------
def _orthogonalize(x: Tensor) -> Tensor:
    """Nearest matrix with orthonormal columns (or rows) to ``x``: ``P Q^T`` from ``x = P S Q^T``
    (orthogonal Procrustes)."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _is_matrix(t: Tensor) -> bool:
    return t.dim() == 2 and min(t.shape) > 1


@MERGE_METHODS.register("tsv", "tsv_m")
class TSVMerge(MergeMethod):
    """TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
    Merging", CVPR 2025).

    For each matrix, each task vector ``tau_t = U_t S_t V_t^T`` keeps its top ``k = fraction *
    min(m, n)`` singular triplets (``fraction`` defaults to ``1/T``); the kept ``U``'s and ``V``'s
    are concatenated and decorrelated by orthogonal Procrustes (``U_perp = P Q^T`` from the SVD of
    the concatenation), and ``theta = theta_0 + alpha * U_perp diag(S) V_perp^T``. Tensors that
    are not matrices (biases, norms) get the mean task vector, ``theta_0 + alpha * mean_t tau_t``.
    """

    model_params: ClassVar[dict[str, float]] = {}

    def __init__(self, alpha: float = 1.0, fraction: float | None = None) -> None:
        self.alpha = checks.number(checks.key("alpha"), alpha)
        self.fraction = None if fraction is None else _check_fraction("fraction", fraction, low_open=True)

    def merge(self, tensors, base, params, ctx):
        deltas = tensors - base
        if not _is_matrix(base):
            return base + self.alpha * deltas.mean(dim=0)
        t = deltas.shape[0]
        r = min(base.shape)
        k = max(1, int((self.fraction if self.fraction is not None else 1 / t) * r))
        u, s, vh = torch.linalg.svd(deltas, full_matrices=False)  # batched over tasks
        u_cat = u[:, :, :k].transpose(0, 1).reshape(base.shape[0], t * k)
        s_cat = s[:, :k].reshape(-1)
        vh_cat = vh[:, :k, :].reshape(t * k, base.shape[1])
        merged = _orthogonalize(u_cat) @ torch.diag(s_cat) @ _orthogonalize(vh_cat)
        return base + self.alpha * merged


@MERGE_METHODS.register("iso_c")
class IsoC(MergeMethod):
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025).

    For each matrix, ``tau_TA = sum_t tau_t = U S V^T``; the spectrum is flattened to its mean,
    ``theta = theta_0 + alpha * mean(S) * U V^T``. Non-matrix tensors get ``theta_0 + alpha *
    mean_t tau_t``. The paper tunes ``alpha`` on validation data.
    """

    model_params: ClassVar[dict[str, float]] = {}

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = checks.number(checks.key("alpha"), alpha)

    def merge(self, tensors, base, params, ctx):
        deltas = tensors - base
        if not _is_matrix(base):
            return base + self.alpha * deltas.mean(dim=0)
        u, s, vh = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
        return base + self.alpha * s.mean() * (u @ vh)


@MERGE_METHODS.register("iso_cts")
class IsoCTS(MergeMethod):
    """Iso-CTS (Marczak et al., ICML 2025): Iso-C with common and task-specific subspaces.

    For each matrix of rank budget ``r = min(m, n)``: the top ``k`` singular directions of
    ``tau_TA = sum_t tau_t`` form the common subspace (``k ~ common_fraction * r``, rounded so
    that the remaining ``r - k`` split evenly over the T tasks); each task vector projected off
    the common left subspace, ``(I - U_k U_k^T) tau_t``, contributes its top ``(r - k)/T``
    singular directions. The concatenated ``U`` and ``V`` are orthogonalised (Procrustes), all
    singular values are replaced by their mean, and ``theta = theta_0 + alpha * mean(S) U V^T``.
    Non-matrix tensors get ``theta_0 + alpha * mean_t tau_t``.
    """

    model_params: ClassVar[dict[str, float]] = {}

    def __init__(self, alpha: float = 1.0, common_fraction: float = 0.8) -> None:
        self.alpha = checks.number(checks.key("alpha"), alpha)
        self.common_fraction = _check_fraction("common_fraction", common_fraction)

    def merge(self, tensors, base, params, ctx):
        deltas = tensors - base
        if not _is_matrix(base):
            return base + self.alpha * deltas.mean(dim=0)
        t = deltas.shape[0]
        r = min(base.shape)
        per_task = min(round((r - int(r * self.common_fraction)) / t), r // t)
        k = r - per_task * t
        u, s, vh = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
        u_k, s_k, vh_k = u[:, :k], s[:k], vh[:k]
        if per_task > 0:
            specific = deltas - u_k @ (u_k.T @ deltas)  # batched over tasks
            ut, st, vht = torch.linalg.svd(specific, full_matrices=False)
            u_all = torch.cat([u_k, ut[:, :, :per_task].transpose(0, 1).reshape(base.shape[0], -1)], dim=1)
            s_all = torch.cat([s_k, st[:, :per_task].reshape(-1)])
            vh_all = torch.cat([vh_k, vht[:, :per_task, :].reshape(-1, base.shape[1])], dim=0)
        else:
            u_all, s_all, vh_all = u_k, s_k, vh_k
        merged = s_all.mean() * (_orthogonalize(u_all) @ _orthogonalize(vh_all))
        return base + self.alpha * merged


# -- competition balancing -----------------------------------------------------------------------
def _minmax(x: Tensor) -> Tensor:
    """Min-max normalisation over the last dimension (constant rows map to 0)."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    span = hi - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


@MERGE_METHODS.register("pcb", "pcb_merging")
class PCBMerge(MergeMethod):
    """PCB-merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024).

    Per tensor, with task vectors ``delta_i`` flattened and ``N`` models:
    intra-balancing ``b_intra_i = softmax(N * norm(delta_i * delta_i))``; inter-balancing
    ``b_inter_i = sum_j softmax(norm(delta_i * delta_j))`` (``norm`` is min-max normalisation and
    ``softmax`` runs over the entries of the tensor); ``b_i = b_intra_i * b_inter_i``; drop: keep
    the top ``ratio`` fraction of ``b_i`` per model; merge:
    ``theta = theta_0 + lambda * sum_i b_i delta_i / sum_i b_i``. Follows the paper's equations;
    the authors' code uses other activations (exp/tanh), so numbers differ from it.
    """

    model_params: ClassVar[dict[str, float]] = {}

    def __init__(self, ratio: float = 0.1, lambda_: float = 1.0) -> None:
        self.ratio = _check_fraction("ratio", ratio, low_open=True)
        self.lambda_ = _check_lambda(lambda_)

    def merge(self, tensors, base, params, ctx):
        n = tensors.shape[0]
        deltas = (tensors - base).reshape(n, -1)
        intra = torch.softmax(n * _minmax(deltas * deltas), dim=-1)
        pair = deltas.unsqueeze(1) * deltas.unsqueeze(0)  # (N, N, M)
        inter = torch.softmax(_minmax(pair), dim=-1).sum(dim=1)
        balance = intra * inter
        keep = topk_mask(balance, torch.full((n,), self.ratio))
        balance = balance * keep
        total = balance.sum(dim=0)
        merged = (balance * deltas).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))
        return base + self.lambda_ * merged.reshape(base.shape)
