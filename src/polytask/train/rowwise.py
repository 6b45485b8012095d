"""Row-wise optimisers for large embedding tables trained with sparse gradients.

:class:`RowWiseAdagrad` keeps ONE accumulator per embedding row instead of one per entry (a table of
``n`` rows and width ``d`` costs ``n`` numbers of optimiser state, not ``n d`` as Adagrad or ``2 n d``
as Adam), and reads and writes only the rows of the batch. :func:`clip_grad_norm` clips gradients
by their total norm when some of them are sparse (``train.grad_clip`` with sparse tables).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from polytask.errors import ConfigError


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row of each (embedding) parameter; sparse or dense gradients.

    Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
    Optimization", JMLR 12, 2011 (Adagrad, the diagonal update of their Figure 1); the row-wise
    variant is the one of DLRM (Naumov et al., arXiv:1906.00091, 2019) and FBGEMM's
    ``EXACT_ROWWISE_ADAGRAD``: for each row ``i`` that has a gradient ``g_i`` (width ``d``)::

        s_i <- s_i + mean_j g_ij^2              (one number per row)
        w_i <- w_i - lr * g_i / (sqrt(s_i) + eps)

    Rows without a gradient in the step are not read or written (a sparse gradient's rows only;
    with a dense gradient, a zero row adds 0 to ``s_i`` and moves by 0, so both agree). A sparse
    gradient is coalesced first (duplicate indices summed: the row's gradient, then squared).

    Differences: the paper's diagonal Adagrad keeps ``s`` per entry; with ``d = 1`` the two coincide,
    and so does ``torch.optim.Adagrad`` (``lr_decay=0``, ``weight_decay=0``, same ``eps`` added
    after the square root: tested). FBGEMM's default ``eps`` is 1e-8; ours is torch's 1e-10. No
    weight decay (FBGEMM's L2 option would move every touched row towards 0; not implemented).
    Parameters of one dimension count each entry as a row. No host synchronisation, but for
    coalescing a sparse gradient on CUDA (the number of distinct rows).

    Args:
        params: the parameters (or param groups), typically embedding tables with ``sparse=True``.
        lr: the step size (``> 0``).
        eps: added to ``sqrt(s_i)`` (``>= 0``).
        initial_accumulator_value: the starting ``s_i`` (``>= 0``).
    """

    def __init__(self, params: Any, lr: float = 1e-2, eps: float = 1e-10,
                 initial_accumulator_value: float = 0.0) -> None:
        if not lr > 0:
            raise ConfigError(f"optim.lr must be > 0 for rowwise_adagrad, got {lr}")
        if not eps >= 0:
            raise ConfigError(f"rowwise_adagrad eps must be >= 0, got {eps}")
        if not initial_accumulator_value >= 0:
            raise ConfigError("rowwise_adagrad initial_accumulator_value must be >= 0, "
                              f"got {initial_accumulator_value}")
        super().__init__(params, {"lr": lr, "eps": eps, "initial_accumulator_value": initial_accumulator_value})

    def _accumulator(self, p: Tensor, group: dict) -> Tensor:
        state = self.state[p]
        if "sum" not in state:
            state["sum"] = torch.full((p.shape[0] if p.dim() else 1,), float(group["initial_accumulator_value"]),
                                      dtype=p.dtype, device=p.device)
        return state["sum"]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:  # one update per table: the tables differ in shape
                if p.grad is None:
                    continue
                acc = self._accumulator(p, group)
                rows2d = p.view(p.shape[0] if p.dim() else 1, -1)
                if p.grad.is_sparse:
                    g = p.grad.coalesce()
                    index, values = g.indices()[0], g.values().reshape(g.values().shape[0], -1)
                    acc.index_add_(0, index, values.square().mean(1))
                    std = acc.index_select(0, index).sqrt_().add_(eps)
                    rows2d.index_add_(0, index, values / std[:, None], alpha=-lr)
                else:
                    values = p.grad.reshape(rows2d.shape)
                    acc.add_(values.square().mean(1))
                    rows2d.addcdiv_(values, acc.sqrt().add_(eps)[:, None], value=-lr)
        return loss


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` (L2, ``error_if_nonfinite=False``)
    where some gradients are sparse: what it does on the dense equivalent of every gradient.

    The total norm is torch's: the L2 norm of the per-gradient norms, with a sparse gradient's norm
    taken on its coalesced values (duplicate rows add up first, as they do in the dense gradient;
    the gradient is replaced by its coalesced form, which the row-wise optimisers would form anyway).
    Every gradient, sparse values included, is multiplied by ``clamp(max_norm / (total + 1e-6),
    max=1)``, one tensor: no host synchronisation (but coalescing, on CUDA, for its size). As in
    torch, a NaN anywhere makes every gradient NaN, and an infinite norm zeroes the finite entries
    (and turns the infinite ones into NaN). Without sparse gradients this is torch's function.
    Under ``--nproc N`` it runs after the gradients are reduced (as DDP + clip would): every rank
    scales by the global batch's norm. Returns the total norm.
    """
    params = [p for p in parameters if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    grads = [p.grad.values() if p.grad.is_sparse else p.grad for p in params]  # values(): a view, scaled in place
    total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's clip_grads_with_norm_
    for device in {g.device for g in grads}:  # foreach ops take one device's tensors (torch groups them too)
        torch._foreach_mul_([g for g in grads if g.device == device], coef.to(device))
    return total


__all__ = ["RowWiseAdagrad", "clip_grad_norm"]
