"""Merge methods on the hypersphere: the Karcher mean, NuSLERP and Multi-SLERP.

Each tensor is a point (or, with a base, a task vector) on a sphere; the methods interpolate
directions along great circles and magnitudes separately. Every method follows mergekit 0.1.5's
operations in its order and dtype, so the same config gives the same bits.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from polytask.errors import MergeError
from polytask.merge import checks
from polytask.merge.methods import MERGE_METHODS, MergeMethod

__all__ = ["Karcher", "NuSlerp", "MultiSlerp", "karcher_mean", "nuslerp"]


def karcher_mean(tensors: list[Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Weighted Karcher (Riemannian) mean of the directions of ``tensors`` on the unit sphere,
    times the weighted mean of their norms (mergekit's ``karcher_merge_tensors``, step for step).

    Fixed point of ``mu <- exp_mu(sum_i a_i log_mu(u_i))``, at most ``max_iter`` steps, stopping
    when the tangent step is below ``tol``; inputs of norm ``<= tol`` take no part in the mean.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [torch.zeros_like(t) if float(n) == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return sum(t * 0 for t in tensors)  # type: ignore[return-value]
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if float(mean_norm) < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):  # sequential by construction: a fixed-point iteration
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, points):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if float(tangent_norm) < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if float(unit_norm) > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


@MERGE_METHODS.register("karcher")
class Karcher(MergeMethod):
    """Karcher mean of the models (Karcher, "Riemannian center of mass and mollifier smoothing",
    Comm. Pure Appl. Math. 1977; for model merging, arXiv 2603.04972 as mergekit cites).

    Each tensor's direction is averaged on the unit sphere (the point minimising the summed
    squared geodesic distances, found by the fixed-point iteration of :func:`karcher_mean` with
    equal weights ``1/N``); its norm is the mean of the models' norms.

    Args:
        max_iter: iterations of the fixed point (>= 1).
        tol: step size (and norm) below which it stops (> 0).

    mergekit: same as its ``karcher`` (a config's ``base_model`` takes part in the mean, as there).
    """

    requires_base = False
    min_models = 1
    native_dtype = True
    model_params: ClassVar[dict[str, float]] = {}

    def __init__(self, max_iter: int = 10, tol: float = 1e-5) -> None:
        self.max_iter = checks.integer(checks.key("max_iter"), max_iter, low=1)
        self.tol = checks.number(checks.key("tol"), tol, low=0.0, low_open=True)

    def merge(self, tensors, base, params, ctx):
        items = list(tensors.unbind(0))
        return karcher_mean(items, [1.0 / len(items)] * len(items), self.max_iter, self.tol)


def nuslerp(t: float, v0: Tensor, v1: Tensor, dim: int = -1, eps: float = 1e-8, flatten: bool = False) -> Tensor:
    """SLERP from ``v0`` to ``v1`` over rows (``dim``), or of the flattened tensors
    (``flatten``); linear where the two are (anti)parallel (mergekit's ``nuslerp``)."""
    out_shape = v0.shape

    def unit(x: Tensor) -> Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


@MERGE_METHODS.register("nuslerp")
class NuSlerp(MergeMethod):
    """NuSLERP: SLERP between two models with the fraction set by their weights, optionally
    of their task vectors (mergekit's method; Goddard et al., "Arcee's MergeKit", EMNLP 2024
    Industry; SLERP: Shoemake, SIGGRAPH 1985).

    ``t = w_2 / (w_1 + w_2)`` (0.5 if the weights sum to ~0); ``theta = slerp(t, theta_1,
    theta_2)``, or with a base ``theta_0 + slerp(t, tau_1, tau_2)``. The tensors are one flat vector
    (``nuslerp_flatten``, default) or interpolated row by row (``nuslerp_row_wise``: over columns
    of dim 0; else over the last dim).

    mergekit: same as its ``nuslerp``.
    """

    requires_base = False
    optional_base = True
    min_models = 2
    max_models = 2
    native_dtype = True

    def __init__(self, nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> None:
        self.nuslerp_row_wise = checks.flag(checks.key("nuslerp_row_wise"), nuslerp_row_wise)
        self.nuslerp_flatten = checks.flag(checks.key("nuslerp_flatten"), nuslerp_flatten)

    def merge(self, tensors, base, params, ctx):
        w = params["weight"].tolist()
        total = sum(w)
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        dim = 0 if self.nuslerp_row_wise else -1
        if base is not None:
            return base + nuslerp(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=self.nuslerp_flatten)
        return nuslerp(t, tensors[0], tensors[1], dim=dim, flatten=self.nuslerp_flatten)


@MERGE_METHODS.register("multislerp")
class MultiSlerp(MergeMethod):
    """Multi-SLERP: barycentric interpolation of N models on the hypersphere (Goddard,
    "Multi-SLERP", goddard.blog 2025; after Buss & Fillmore, "Spherical averages and
    applications to spherical splines and interpolation", ACM TOG 2001).

    With ``x_i`` the models (or task vectors, with a base) as flat vectors, ``u_i = x_i /
    (|x_i| + eps)`` and weights ``w_i`` (normalised to sum 1 if ``normalize_weights``): the
    weighted mean direction ``m`` of the ``u_i``; the tangent vectors ``u_i - (u_i . m) m``
    averaged with ``w``; the exponential map back to the sphere; the result times
    ``sum_i w_i |x_i|`` (plus the base). Two antipodal inputs fall back to the weighted sum; more
    that cancel out stop the merge (MergeError naming the tensor).

    mergekit: same as its ``multislerp``.
    """

    requires_base = False
    optional_base = True
    native_dtype = True

    def __init__(self, normalize_weights: bool = True, eps: float = 1e-8) -> None:
        self.normalize_weights = checks.flag(checks.key("normalize_weights"), normalize_weights)
        self.eps = checks.number(checks.key("eps"), eps, low=0.0, low_open=True)

    def merge(self, tensors, base, params, ctx):
        if tensors.shape[0] == 1:
            return tensors[0]
        x = tensors - base if base is not None else tensors
        flat = x.reshape(x.shape[0], -1)
        w = params["weight"].to(x.dtype)
        if self.normalize_weights:
            w = w / w.sum()
        norms = torch.norm(flat, dim=-1, keepdim=True)
        units = flat / (norms + self.eps)
        mean = (units * w.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < self.eps:
            if x.shape[0] == 2:
                res = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
                return res + base if base is not None else res
            raise MergeError(f"tensor {ctx.name!r}: multislerp: the weighted directions cancel out (antipodal "
                             "inputs with balancing weights); change the weights")
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        step = (tangents * w.view(-1, 1)).sum(0)
        step_norm = torch.norm(step) + self.eps
        result = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
        result = (result * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
        return result + base if base is not None else result
