"""Gradient surgery on conflicts: per-pair projections in a random order (PCGrad, GradVac) and per-coordinate
sign dropout (GradDrop)."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.balance.aggregators._base import (
    _check,
    _LazyStateMixin,
    _least_squares_weights,
    _preference,
    _SOLVE_DTYPE,
    Aggregator,
    GramianWeighting,
)
from polytask.balance.compiled import compiled_for
from polytask.balance.registry import register_aggregator
from polytask.balance.solvers import cuda_graphed


def _random_orders(n: int, device: torch.device, generator: torch.Generator | None, exclude_self: bool) -> Tensor:
    """``(n, n)`` (or ``(n, n-1)`` without self) rows of independent random permutations."""
    keys = torch.rand(n, n, device=device, generator=generator)
    if exclude_self:
        keys = keys + torch.eye(n, device=device) * 2.0  # self sorts last, then dropped
        return keys.argsort(dim=1)[:, : n - 1]
    return keys.argsort(dim=1)


@register_aggregator("pcgrad")
class PCGrad(GramianWeighting):
    """PCGrad: project each task gradient on the normal plane of every gradient it conflicts with.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1: for each task
    ``i``, visit the other tasks ``j`` in a random order; if ``g_i^PC . g_j < 0`` set
    ``g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j``. The update is ``sum_i g_i^PC``. Tracked as
    coefficients ``g_i^PC = sum_k C_ik g_k`` so only the Gramian is needed; all tasks ``i`` are
    processed in parallel (one step per position in the random order). LibMTL 1.1.5's loop also
    visits ``j = i`` (projecting ``g_i^PC`` on its own ``g_i`` if they conflict after earlier
    projections); torchjd 0.18 and we skip it.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        return pcgrad_coefficients(gramian, _random_orders(n, gramian.device, self.generator, False)).sum(0)


@cuda_graphed
def pcgrad_coefficients(gramian: Tensor, orders: Tensor) -> Tensor:
    """PCGrad's projected gradients as coefficients ``C`` (``g_i^PC = sum_k C_ik g_k``).

    ``orders[i]`` is the order (a permutation of all tasks; ``i`` itself is skipped) in which
    task ``i`` is projected against the others.
    """
    kernels = compiled_for(gramian)
    if kernels is not None:  # the same projections as one compiled loop (float64 CPU, numba installed)
        return torch.from_numpy(kernels.pcgrad_coefficients(gramian.contiguous().numpy(), orders.contiguous().numpy()))
    n = gramian.shape[0]
    rows = torch.arange(n, device=gramian.device).unsqueeze(1)
    coef = torch.eye(n, dtype=gramian.dtype, device=gramian.device)
    # Everything that depends on the order only, gathered once: the Gramian rows met at each
    # position and the squared norms to divide by (inf for i itself, so its step is exactly 0).
    met = gramian[orders]  # met[i, k] = G[orders[i, k]]
    sq_norm = gramian.diagonal()[orders].clamp_min(torch.finfo(gramian.dtype).tiny)
    sq_norm = torch.where(orders == rows, torch.full_like(sq_norm, float("inf")), sq_norm)
    for met_k, norm_k, j in zip(met.unbind(1), sq_norm.unbind(1), orders.unsqueeze(-1).unbind(1)):
        inner = (coef * met_k).sum(1, keepdim=True)  # g_i^PC . g_j for every i
        # -inner / ||g_j||^2 where they conflict (inner < 0), else 0.
        coef.scatter_add_(1, j, (-inner).clamp_min(0.0) / norm_k.unsqueeze(1))
    return coef


@register_aggregator("gradvac")
class GradVac(_LazyStateMixin, GramianWeighting):
    """Gradient Vaccine: raise each pair's cosine similarity towards an EMA target.

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", ICLR 2021, Algorithm 1 (applied to the whole shared
    parameter vector). For each task ``i`` and the other tasks ``j`` in random order: if
    ``phi_ij = cos(g_i, g_j) < phi_hat_ij``, add
    ``||g_i|| (phi_hat sqrt(1-phi^2) - phi sqrt(1-phi_hat^2)) / (||g_j|| sqrt(1-phi_hat^2)) g_j``
    to ``g_i``; then ``phi_hat_ij <- (1-beta) phi_hat_ij + beta phi_ij``. ``phi_hat`` is a buffer.
    The EMA moves every visited pair's target, as in the paper; LibMTL 1.1.5 moves only the targets
    of the pairs it corrected (``tests/test_balance_peer_libmtl.py`` pins both).

    Args:
        beta: EMA rate of the similarity targets, in [0, 1].
        eps: added to denominators.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check(0.0 <= beta <= 1.0, f"gradvac: beta must be in [0, 1], got {beta}")
        _check(eps >= 0.0, f"gradvac: eps must be >= 0, got {eps}")
        self.beta, self.eps, self.generator = beta, eps, generator
        self.register_buffer("phi_hat", torch.zeros(0, 0, dtype=_SOLVE_DTYPE))
        self._init_steps()

    def weights(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        resized = self.phi_hat.shape != (n, n)
        if resized:
            self.phi_hat = torch.zeros(n, n, dtype=_SOLVE_DTYPE, device=gramian.device)
        orders = _random_orders(n, gramian.device, self.generator, True)
        fresh = self._fresh(n, resized)
        phi_hat = torch.where(fresh, 0.0, self.phi_hat.to(gramian))
        coef, self.phi_hat = gradvac_coefficients(gramian, phi_hat, orders, self.beta, self.eps)
        self._advance(fresh, n)
        return coef.sum(0)


@cuda_graphed
def gradvac_coefficients(gramian: Tensor, phi_hat: Tensor, orders: Tensor, beta: float, eps: float) -> tuple[Tensor, Tensor]:
    """GradVac's corrected gradients as coefficients, and the updated targets ``phi_hat``.

    ``orders[i]``: the other tasks in the order task ``i`` visits them (``(T, T-1)``).
    """
    n = gramian.shape[0]
    rows = torch.arange(n, device=gramian.device)
    coef = torch.eye(n, dtype=gramian.dtype, device=gramian.device)
    cg = gramian.clone()  # cg[i] = (g_i^PC . g_k)_k
    diag = gramian.diagonal().clamp_min(0.0)
    phi_hat = phi_hat.clone()
    for k in range(orders.shape[1]):
        j = orders[:, k]
        dot = cg[rows, j]
        norm_i = (cg * coef).sum(1).clamp_min(0.0).sqrt()
        norm_j = diag[j].sqrt()
        phi = dot / (norm_i * norm_j + eps)
        hat = phi_hat[rows, j]
        sin_phi = (1.0 - phi * phi).clamp_min(0.0).sqrt()
        sin_hat = (1.0 - hat * hat).clamp_min(0.0).sqrt()
        w = norm_i * (hat * sin_phi - phi * sin_hat) / (norm_j * sin_hat + eps)
        w = torch.where(phi < hat, w, torch.zeros_like(w))
        coef = coef.index_put((rows, j), w, accumulate=True)
        cg = cg + w.unsqueeze(1) * gramian[j]
        phi_hat = phi_hat.index_put((rows, j), (1.0 - beta) * hat + beta * phi)
    return coef, phi_hat


@register_aggregator("graddrop", default_mode="features")
class GradDrop(Aggregator):
    """GradDrop: keep, per coordinate, only the gradients of one randomly chosen sign.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020, Algorithm 1 (lines 10-15): the sign purity ``P = 1/2 (1 + sum_i g_i / sum_i
    |g_i|)`` per coordinate, a uniform draw ``U``; task ``i`` keeps its coordinate if
    ``P > U`` and ``g_i > 0`` or ``P < U`` and ``g_i < 0``. ``leak`` (per task) lets a fraction
    through. The paper applies it to the gradients at the shared features (``mode="features"``).
    We take the purity per coordinate of the feature Jacobian (per sample and feature); the paper's
    batch-reduced form, which LibMTL 1.1.5 runs, first sums ``sign(z) * ∂L_i/∂z`` over the batch
    and draws one mask per feature for the whole batch (equal for a batch of one, ``z > 0``).
    Logged weights are a least-squares fit (the update is not in the span of the gradients).
    """

    def __init__(self, leak: list[float] | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.leak = None if leak is None else list(leak)
        self.generator = generator

    def aggregate(self, jacobian: Tensor) -> tuple[Tensor, Tensor]:
        n = jacobian.shape[0]
        leak = torch.zeros(n, dtype=jacobian.dtype, device=jacobian.device) if self.leak is None else _preference(self.leak, n, jacobian, "graddrop")
        purity = 0.5 * (1.0 + jacobian.sum(0) / jacobian.abs().sum(0))
        draw = torch.rand(purity.shape, dtype=jacobian.dtype, device=jacobian.device, generator=self.generator)
        keep = ((purity > draw) & (jacobian > 0)) | ((purity < draw) & (jacobian < 0))
        update = ((leak.unsqueeze(1) + (1.0 - leak.unsqueeze(1)) * keep) * jacobian).sum(0)
        return update, _least_squares_weights(jacobian, update)
