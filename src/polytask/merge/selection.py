"""Merge methods that keep or swap parts of the inputs: passthrough, NearSwap, SCE, Arcee Fusion,
RAM and RAM+ (tensor-local).

Every method here computes in the compute dtype (``native_dtype``) with mergekit 0.1.5's
operations in mergekit's order, so the same config gives the same bits.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.merge import checks
from polytask.merge.methods import MERGE_METHODS, MergeMethod

__all__ = ["Passthrough", "NearSwap", "SCE", "ArceeFusion", "RAM", "RAMPlusTL", "sce_weights", "sce_mask"]


@MERGE_METHODS.register("passthrough")
class Passthrough(MergeMethod):
    """Copy one model's tensors as they are, optionally times ``scale``: the building block of
    frankenmerges (``slices:`` stacking layer ranges of several models, one source each).

    ``theta = scale * theta_1``. No paper: it is mergekit's ``passthrough`` (Goddard et al.,
    "Arcee's MergeKit: A Toolkit for Merging Large Language Models", EMNLP 2024 Industry).

    mergekit: same (``scale`` is a per-model parameter; 1 leaves the tensor untouched).
    """

    requires_base = False
    max_models = 1
    native_dtype = True
    model_params: ClassVar[dict[str, float]] = {"scale": 1.0}

    def merge(self, tensors, base, params, ctx):
        scale = float(params["scale"][0])
        return tensors[0] if scale == 1.0 else tensors[0] * scale


@MERGE_METHODS.register("nearswap")
class NearSwap(MergeMethod):
    """Take the other model's value where it is near the base's: NearSwap (alchemonaut,
    QuartetAnemoi-70B model card, 2024; no paper).

    ``w = clamp(t / max(|theta_0 - theta_1|, 1e-6), 0, 1)``, ``theta = w theta_1 + (1 - w) theta_0``:
    entries closer than ``t`` are swapped in whole, farther ones interpolated towards the base.

    Args:
        t: the distance below which the other model's value is taken (> 0).

    mergekit: same as its ``nearswap`` (it does not check ``t``).
    """

    max_models = 1
    native_dtype = True
    model_params: ClassVar[dict[str, float]] = {}

    def __init__(self, t: float) -> None:
        self.t = checks.number(checks.key("t"), t, low=0.0, low_open=True)

    def merge(self, tensors, base, params, ctx):
        b = tensors[0]
        weight = (self.t / torch.abs(base - b).clamp(min=1e-6)).clamp(min=0, max=1)
        return weight * b + (1 - weight) * base


def sce_weights(tvs: Tensor) -> Tensor:
    """SCE's "calculate": each task vector's weight is its mean square over their sum (uniform
    when every task vector is ~0)."""
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = float(torch.sum(weights))
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def sce_mask(tvs: Tensor, density: float, dtype: torch.dtype) -> Tensor:
    """SCE's "select": the ``density`` fraction of entries (of the non-constant ones) whose
    variance across the task vectors is largest."""
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=dtype)
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * density)
    mask = torch.zeros_like(var, dtype=dtype)
    if k == 0:
        return mask
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[indices] = 1
    return mask


@MERGE_METHODS.register("sce")
class SCE(MergeMethod):
    """SCE merging (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990,
    2024, Sec. 3.3): Select, Calculate, Erase.

    With task vectors ``tau_i``: select the ``select_topk`` fraction of entries with the largest
    variance across the ``tau_i`` (the others are zeroed); calculate per-model weights
    ``eta_i = mean(tau_i^2) / sum_j mean(tau_j^2)``; erase the entries whose sign disagrees with
    the sign of ``sum_i tau_i`` (TIES' election); ``theta = theta_0 + sum_i eta_i m_i tau_i /
    max(sum_i eta_i m_i, 1e-6)``.

    Args:
        select_topk: fraction of entries kept by the variance selection, in [0, 1].
        int8_mask: accepted for mergekit configs; no effect on the result.

    mergekit: same as its ``sce``; a ``weight`` per model is not a parameter (none there either).
    """

    native_dtype = True
    model_params: ClassVar[dict[str, float]] = {}

    def __init__(self, select_topk: float = 1.0, int8_mask: bool = False) -> None:
        self.select_topk = checks.number(checks.key("select_topk"), select_topk, low=0.0, high=1.0)
        self.int8_mask = checks.flag(checks.key("int8_mask"), int8_mask)

    def merge(self, tensors, base, params, ctx):
        tvs = tensors - base
        if self.select_topk < 1:
            tvs = tvs * sce_mask(tvs, self.select_topk, base.dtype).unsqueeze(0)
        erase = _mergekit_sign_agreement(tvs).to(base.dtype)
        w = sce_weights(tvs).reshape(-1, *([1] * base.dim()))
        erased = w * erase
        merged = (tvs * erased).sum(dim=0)
        return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _mergekit_sign_agreement(deltas: Tensor) -> Tensor:
    """mergekit's ``get_mask(..., "sum")``: ``sign(delta) == (+1 if sum >= 0 else -1)``."""
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == majority


@MERGE_METHODS.register("arcee_fusion")
class ArceeFusion(MergeMethod):
    """Arcee Fusion (Arcee AI, 2025; no paper): keep the other model's change only where it
    matters most.

    Importance ``s = |theta_1 - theta_0| * KL(softmax(theta_1) || softmax(theta_0))`` (the KL per
    row, over the last dimension, softmax with ``+1e-8``); with ``q1, med, q3`` the quartiles of
    ``s`` (lower order statistics of the sorted values), the threshold is ``med + 1.5 (q3 - q1)``
    and ``theta = theta_0 + (theta_1 - theta_0) * [s >= threshold]``.

    mergekit: same as its ``arcee_fusion``. For tensors over 10^6 entries mergekit estimates the
    quartiles from 10^6 entries drawn with the global RNG; here they are drawn with the merge's
    seeded generator (same estimate in distribution, repeatable).
    """

    max_models = 1
    native_dtype = True
    random = True
    model_params: ClassVar[dict[str, float]] = {}

    def merge(self, tensors, base, params, ctx):
        other = tensors[0]
        diff = (other - base).abs()
        p = F.softmax(other, dim=-1) + 1e-8
        q = F.softmax(base, dim=-1) + 1e-8
        importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        flat = importance.reshape(-1)
        if flat.numel() > 1_000_000:
            flat = flat[torch.randint(flat.numel(), (1_000_000,), generator=ctx.generator)]
        ordered, _ = torch.sort(flat)
        q1, med, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
        mask = (importance >= med + 1.5 * (q3 - q1)).float()
        return base + (other - base) * mask


def _ram_vectors(tensors: Tensor, base: Tensor, epsilon: float) -> tuple[Tensor, ...]:
    tv = (tensors - base).reshape(tensors.shape[0], -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


@MERGE_METHODS.register("ram")
class RAM(MergeMethod):
    """Reinforced Agent Merging (RAM; arXiv 2601.13572, 2026): keep what only one model changed,
    average what several changed.

    With ``c_j`` the number of models whose ``|tau_i,j| > epsilon``: ``theta_j = theta_0,j +
    sum_i tau'_i,j [c_j = 1] + sum_i tau'_i,j [c_j > 1] / c_j``, where ``tau'`` zeroes entries
    at most ``epsilon``. Unlike a mean, a change made by one model only is not diluted.

    Args:
        epsilon: magnitude at or below which an entry counts as unchanged (>= 0).

    mergekit: same as its ``ram``.
    """

    native_dtype = True
    model_params: ClassVar[dict[str, float]] = {}

    def __init__(self, epsilon: float = 1e-5) -> None:
        self.epsilon = checks.number(checks.key("epsilon"), epsilon, low=0.0)

    def merge(self, tensors, base, params, ctx):
        tv, nonzero, counts, overlap, unique = _ram_vectors(tensors, base, self.epsilon)
        tvz = tv * nonzero
        merged = ((tvz * unique) + (tvz * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
        return base + merged.reshape_as(base)


@MERGE_METHODS.register("ramplus_tl", "ramplus")
class RAMPlusTL(RAM):
    """RAM+ tensor-local (arXiv 2601.13572, 2026): RAM with the unique changes of model ``i``
    scaled up by ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, ``rho_i`` the ratio of model
    ``i``'s shared to unique changed entries in this tensor (the paper's per-model ratio,
    computed per tensor here as in mergekit).

    Args:
        r: strength of the rescaling (>= 0).
        alpha: cap on ``rho`` (>= 0).
        epsilon: magnitude at or below which an entry counts as unchanged (>= 0).

    mergekit: same as its ``ramplus_tl``.
    """

    def __init__(self, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> None:
        super().__init__(epsilon=epsilon)
        self.r = checks.number(checks.key("r"), r, low=0.0)
        self.alpha = checks.number(checks.key("alpha"), alpha, low=0.0)

    def merge(self, tensors, base, params, ctx):
        tv, nonzero, counts, overlap, unique = _ram_vectors(tensors, base, self.epsilon)
        shared = (nonzero & overlap).sum(dim=1)
        only = (nonzero & unique).sum(dim=1)
        rho = shared / only.clamp(min=self.epsilon)
        lam = 1 + self.r * rho.clamp(min=0, max=self.alpha)
        tvz = tv * nonzero
        merged = ((tvz * unique * lam.unsqueeze(-1)) + (tvz * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
        return base + merged.reshape_as(base)
