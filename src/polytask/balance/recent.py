"""Balancers published 2022-2025 that no pinned peer ships (issue 16): GO4Align, NTKMTL, Auto-Lambda.

Each is checked against hand-computed cases from its paper's equations (``tests/test_balance_recent.py``);
the docstrings say where the code follows the paper and where the authors' public code differs.

- :class:`GO4Align` -- loss-based (no per-task gradient): risk-guided indicators, grouped by an
  exact one-dimensional k-means.
- :class:`NTKMTL` -- Gramian-only (``J J^T``), so it runs at parameter or feature level, including the
  engine's Gramian-only linear-head path.
- :class:`AutoLambda` -- loss weights meta-learned on a held-out batch (the Trainer feeds it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from polytask.balance import aggregators as agg
from polytask.balance._loss_state import BufferOptimizer, TaskStateBalancer, flat_jacobian, present_tasks
from polytask.balance.base import LossWeighting, accumulate_grads, all_finite, graph_leaves, stack_losses
from polytask.balance.loss_weighting import _positive
from polytask.balance.registry import BALANCERS, register_aggregator
from polytask.errors import ConfigError

__all__ = ["AutoLambda", "GO4Align", "HeldOut", "NTKMTL", "NTKMTLSR", "kmeans_1d", "ntk_weights"]


# ------------------------------------------------------------------------------- 1-D k-means
def _run_costs(xs: Tensor, ms: Tensor) -> Tensor:
    """``(n + 1, n + 1)``: within-run sum of squares of the sorted values ``xs[i:j]`` (entries with ``ms`` 0 take
    no part), ``inf`` where ``i > j``. Summed directly around each run's mean, not from prefix sums of ``x^2``,
    which cancel when the values span many orders of magnitude."""
    n = xs.shape[0]
    bounds = torch.arange(n + 1, device=xs.device)
    pos = torch.arange(n, device=xs.device)
    inside = (pos >= bounds[:, None, None]) & (pos < bounds[None, :, None]) & (ms > 0)  # (i, j, m)
    weight = inside.to(xs.dtype)
    mean = (weight * xs).sum(-1) / weight.sum(-1).clamp_min(1)
    cost = (weight * (xs - mean[..., None]) ** 2).sum(-1)
    return torch.where(bounds[:, None] <= bounds[None, :], cost, torch.full_like(cost, float("inf")))


def kmeans_1d(values: Tensor, k: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact k-means of the scalars ``values`` (``(n,)``) into at most ``k`` groups: ``(centroid_of_each, group)``.

    In one dimension an optimal clustering is a partition of the SORTED values into contiguous runs, found
    exactly by dynamic programming over the run boundaries (``D_g(j) = min_i D_{g-1}(i) + cost(i, j)``,
    ``O(k n^2)``, the first minimum on ties): deterministic, no random start, no host sync. Entries outside
    ``mask`` take no part (centroid 0, group -1). Runs may be empty, so fewer values than ``k`` give each
    value its own group.
    """
    n = values.shape[0]
    k = max(1, min(k, n))
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask
    # the values taking part first, in increasing order; the others (sort key +inf) last
    order = torch.argsort(torch.where(mask, values, torch.full_like(values, float("inf"))), stable=True)
    xs = torch.where(mask, values, torch.zeros_like(values))[order]
    ms = mask[order].to(values.dtype)
    cost = _run_costs(xs, ms)
    best, choices = cost[0], []  # best[j]: least cost of xs[:j] in the groups so far
    for _ in range(k - 1):  # one more group per pass: sequential by construction
        total = best[:, None] + cost  # (i, j): the new group is xs[i:j]
        choices.append(total.argmin(0))
        best = total.gather(0, choices[-1][None]).squeeze(0)
    end, inner = torch.tensor(n, device=values.device), []
    for choice in reversed(choices):  # walk the boundaries back from the end
        end = choice[end]
        inner.append(end)
    positions = torch.arange(n, device=values.device)
    cuts = torch.stack(inner) if inner else positions.new_zeros(0)
    group_sorted = (cuts[None, :] <= positions[:, None]).sum(1)  # inner boundaries at or before each position
    sums = torch.zeros(k, dtype=values.dtype, device=values.device).scatter_add_(0, group_sorted, xs * ms)
    sizes = torch.zeros(k, dtype=values.dtype, device=values.device).scatter_add_(0, group_sorted, ms)
    centroids = (sums / sizes.clamp_min(1))[group_sorted]
    group = torch.empty_like(group_sorted).scatter_(0, order, group_sorted)
    centre = torch.empty_like(centroids).scatter_(0, order, centroids)
    return torch.where(mask, centre, torch.zeros_like(values)), torch.where(mask, group, -1)


# ---------------------------------------------------------------------------------------- GO4Align
@BALANCERS.register("go4align", "go4_align")
class GO4Align(TaskStateBalancer):
    """GO4Align: group risk minimisation with risk-guided group indicators (loss-based).

    Shen et al., "GO4Align: Group Optimization for Multi-Task Alignment", NeurIPS 2024.

    At step ``k`` with losses ``L_t`` (detached):

    1. risk-guided indicator: a Group-DRO-like history ``p ← p ⊙ exp(−η L) / Σ(p ⊙ exp(−η L))``
       (``p`` starts at ``1/T``) times the scale balance ``s_t = Σ_i L_i / L_t``: ``γ_t = s_t p_t``;
    2. dynamical group assignment: k-means of the ``γ_t`` into ``K`` groups; each task's weight is its
       group's centroid, and the model minimises ``Σ_t w_t L_t``.

    The paper writes this as adaptive group risk minimisation (dynamical group assignment, risk-guided
    group indicators); the numbers above are those of the authors' public ``GO4ALIGN`` weight method
    (``robust_step_size`` ``η = 1e-4``).
    Differences: the authors cluster with ``kmeans_pytorch`` (random initial centroids, iterated to a
    tolerance); here the clustering is exact (:func:`kmeans_1d`: the best partition of the sorted
    ``γ``), deterministic and without host sync. ``K = 1`` gives every task the mean ``γ`` (the
    authors' special case); ``K >= T`` gives ``w = γ``. A task absent from the batch (loss exactly 0)
    gets weight 0, keeps its ``p_t`` (factor 1) and takes no part in the sums or the clustering.
    ``num_groups`` is a per-benchmark choice (the shared experiment parser that NTKMTL's public code
    uses for GO4Align defaults to 5, for up to 40 tasks); 2 here, for the few-task problems polytask's
    examples train.

    No host synchronisation (the clustering is tensor ops, its one loop runs over the ``K - 1`` groups).

    Args:
        num_groups: ``K``, the number of groups (>= 1).
        robust_step_size: ``η``, step of the risk history (>= 0).
    """

    _state_buffer = "adv_probs"

    def __init__(self, num_groups: int = 2, robust_step_size: float = 1e-4,
                 nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ConfigError(f"balancer.params.num_groups: must be an integer >= 1, got {num_groups!r}")
        if not robust_step_size >= 0:
            raise ConfigError(f"balancer.params.robust_step_size: must be >= 0, got {robust_step_size!r}")
        self.num_groups, self.robust_step_size = num_groups, float(robust_step_size)
        self.register_buffer("adv_probs", torch.zeros(0))
        self._next_probs: Tensor | None = None

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, robust_step_size={self.robust_step_size}"

    def _init_state(self, losses: Tensor) -> None:
        self.adv_probs = torch.full_like(losses, 1.0 / losses.shape[0])

    def indicators(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """``(γ, p_next)``: the risk-guided indicators of this step and the updated history (not stored)."""
        present = present_tasks(losses)
        safe = torch.where(present, losses, torch.ones_like(losses))
        probs = self.adv_probs.to(losses) * torch.where(present, torch.exp(-self.robust_step_size * safe),
                                                        torch.ones_like(safe))
        probs = probs / probs.sum()
        scale = torch.where(present, losses, torch.zeros_like(losses)).sum() / safe
        return torch.where(present, scale * probs, torch.zeros_like(probs)), probs

    def weights(self, losses: Tensor) -> Tensor:
        gamma, self._next_probs = self.indicators(losses)
        return kmeans_1d(gamma, self.num_groups, present_tasks(losses))[0]

    def after_backward(self, losses: Tensor, weights: Tensor) -> None:
        self.adv_probs.copy_(self._next_probs)  # a skipped step is undone by the guard


# ------------------------------------------------------------------------------------------ NTKMTL
@register_aggregator("ntkmtl", "ntk_mtl")
class NTKMTL(agg.GramianWeighting):
    """NTKMTL: balance the tasks' convergence speeds by the eigenvalues of their neural tangent kernels.

    Qin, Wang, Liao, Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from Neural Tangent
    Kernel Perspective", NeurIPS 2025.

    Under gradient flow the residual of task ``t`` decays at rates set by the eigenvalues of its NTK
    ``K_t = J_t J_t^T``, and weighting task ``t``'s loss by ``w_t`` scales its kernel by ``w_t``; the
    paper balances the tasks' speeds with ``w_t = (Σ_i λ_i / λ_t)^{n}``, ``λ_t`` the largest eigenvalue
    of ``K_t``, exponent ``n = 1/2`` (``n = 1`` would make every ``w_t λ_t`` equal). With one kernel
    sample per task (the setting of the paper's experiments, "NTKMTL (n=1)" in the authors' code)
    ``λ_t = ‖g_t‖^2 = G_tt`` and the update is ``J^T w`` with ``w_t = (tr G / G_tt)^{1/2}``, so every
    weighted gradient ``w_t g_t`` has norm ``sqrt(tr G)``. A function of the Gramian only: it runs at
    parameter level (the method) or at feature level (gradients w.r.t. the shared representation,
    including the engine's Gramian-only linear-head path).

    Differences: the authors' code multiplies the update by ``T`` ("to match the sum loss") and clips
    the shared gradient to norm 1 (``max_norm``); neither is part of the method's weights, and
    polytask's Trainer has its own clipping option. Their NTKMTL-SR (per-sample kernels at the
    representation, largest eigenvalue of a ``B x B`` matrix per task) is not implemented here.
    A task whose gradient is exactly 0 (``G_tt = 0``: no labelled row) gets weight 0 instead of
    ``inf``; a zero Gramian gives zero weights. No eigendecomposition, no host synchronisation.

    Args:
        ntk_exp: the exponent ``n`` (the paper's 0.5).
    """

    def __init__(self, ntk_exp: float = 0.5) -> None:
        super().__init__()
        if not ntk_exp >= 0:
            raise ConfigError(f"balancer.params.ntk_exp: must be >= 0, got {ntk_exp!r}")
        self.ntk_exp = float(ntk_exp)

    def weights(self, gramian: Tensor) -> Tensor:
        w = ntk_weights(gramian.diagonal(), self.ntk_exp)
        return torch.where(torch.isfinite(gramian).all(), w, torch.full_like(w, float("nan")))


def ntk_weights(eigenvalues: Tensor, exponent: float) -> Tensor:
    """NTKMTL's weights ``w_t = (Σ_i λ_i / λ_t)^n`` from each task's largest NTK eigenvalue ``λ_t``;
    0 for a task with ``λ_t = 0`` (no gradient), NaN in, NaN out."""
    live = eigenvalues > 0
    ratio = eigenvalues.sum() / torch.where(live, eigenvalues, torch.ones_like(eigenvalues))
    w = torch.where(live, ratio.pow(exponent), torch.zeros_like(eigenvalues))
    return torch.where(torch.isfinite(eigenvalues), w, torch.full_like(w, float("nan")))




@BALANCERS.register("ntkmtl_sr", "ntk_mtl_sr")
class NTKMTLSR(LossWeighting):
    """NTKMTL-SR: NTKMTL's weights from per-sample kernels at the shared representation (loss weighting).

    Qin, Wang, Liao, Yan, NeurIPS 2025 (see :class:`NTKMTL`), the paper's efficient variant: the kernel
    of task ``t`` is taken w.r.t. the shared representation ``z`` over the ``B`` samples of the batch,
    ``K_t = J_t J_t^T`` with row ``b`` of ``J_t`` the gradient of sample ``b``'s loss ``ℓ_{t,b}`` w.r.t.
    ``z``; ``λ_t`` is its largest eigenvalue and the model minimises ``Σ_t w_t L_t`` with
    ``w_t = (Σ_i λ_i / λ_t)^{n}`` (detached), ``n = 1/2``.

    How it is computed: when each sample's prediction reads only its own row of ``z`` (heads applied
    row by row, as polytask's towers are), the rows of ``J_t`` are orthogonal and ``K_t`` is diagonal,
    so ``λ_t = max_b ‖∂ℓ_{t,b}/∂z_b‖^2``. The gradient of the masked mean loss ``L_t`` w.r.t. ``z`` has
    rows ``∂ℓ_{t,b}/∂z_b / N_t`` (``N_t`` labelled samples), so ONE backward per task to ``z`` gives
    ``λ_t = (N_t max_b ‖∂L_t/∂z_b‖)^2``, with ``N_t`` counted as the rows whose gradient is not exactly
    0 (the unlabelled ones). The authors' code instead runs ``B`` backward passes per task and an
    eigendecomposition of each ``B x B`` kernel; the two agree on such heads (tested), not on heads
    that mix samples (batch norm in a head). Under a process group: the maxima and the counts are
    reduced (one MAX and one SUM all-reduce of ``T`` numbers each), then the loss-weighting exchange.
    Micro-batch accumulation keeps each task's largest per-sample norm over the micro-batches (exact).
    No host synchronisation.

    Args:
        ntk_exp: the exponent ``n`` (the paper's 0.5).
    """

    supports_external_reduction = False  # its per-task feature gradients are taken before the wrapper's backward

    def __init__(self, ntk_exp: float = 0.5, nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        if not ntk_exp >= 0:
            raise ConfigError(f"balancer.params.ntk_exp: must be >= 0, got {ntk_exp!r}")
        self.ntk_exp = float(ntk_exp)
        self._eigenvalues: Tensor | None = None

    def extra_repr(self) -> str:
        return f"ntk_exp={self.ntk_exp}"

    @staticmethod
    def _row_norms(vec: Tensor, features: Tensor | None) -> Tensor:
        """``(T, b)``: squared norms of the rows of ``∂vec_t/∂z`` (one backward per task, graph kept)."""
        if features is None or not features.requires_grad:
            raise ConfigError("balancer 'ntkmtl_sr' needs features=model.shared_features (the shared representation)")
        rows = flat_jacobian(vec, [features]).detach().view(vec.shape[0], features.shape[0], -1)
        return (rows * rows).sum(2)

    def accumulate(self, losses, shared=None, features=None, *, task_features=None, counts=None, loss_scale=None,
                   parameters=None) -> None:
        """As :meth:`Balancer.accumulate`, keeping each task's largest per-sample squared gradient norm: a micro-batch's
        rows are ``∂ℓ_b/∂z_b / n`` with ``n`` its labelled rows, so ``n^2 max_b ‖row_b‖^2`` is exact per micro-batch."""
        norms = self._row_norms(stack_losses(losses), features)
        count = (norms > 0).sum(1).to(norms.dtype)
        largest = count * count * norms.max(1).values
        kept = self.__dict__.get("_largest")
        self.__dict__["_largest"] = largest if kept is None else torch.maximum(kept, largest)
        super().accumulate(losses, shared, features, task_features=task_features, counts=counts, loss_scale=loss_scale,
                           parameters=parameters)

    def _backward_accumulated(self, losses, shared, features, *, process_group, **kwargs) -> Tensor:
        self.__dict__["_group"] = process_group  # the maxima are reduced in prepare, after the surrogates' step
        try:
            return super()._backward_accumulated(losses, shared, features, process_group=process_group, **kwargs)
        finally:
            self.__dict__["_group"] = None
            self.__dict__["_largest"] = None

    def prepare(self, losses: Mapping[str, Tensor], vec: Tensor, sync: Any, shared: Iterable[nn.Parameter] | None,
                features: Tensor | None) -> None:
        import torch.distributed as tdist

        from polytask.balance import dist

        largest = self.__dict__.get("_largest")
        if largest is not None:  # the last micro-batch of an accumulated step: the kept maxima
            group = self.__dict__.get("_group")
            if group is not None:
                tdist.all_reduce(largest, op=tdist.ReduceOp.MAX, group=group)
            self._eigenvalues = largest
            return
        scaled = vec if sync is None else vec * sync.scale  # rows ∂ℓ_b/∂z_b / N_t on every rank
        norms = self._row_norms(scaled, features)
        largest = norms.max(1).values
        count = (norms > 0).sum(1).to(norms.dtype)
        if sync is not None:
            tdist.all_reduce(largest, op=tdist.ReduceOp.MAX, group=sync.group)
            (count,) = dist.all_reduce_sum([count], sync.group)
        self._eigenvalues = count * count * largest

    def weights(self, losses: Tensor) -> Tensor:
        return ntk_weights(self._eigenvalues, self.ntk_exp).to(losses.dtype)


# ------------------------------------------------------------------------------------- Auto-Lambda
class HeldOut(NamedTuple):
    """What Auto-Lambda needs besides the step's losses (set ``balancer.heldout`` before each ``backward``).

    ``parameters``: the model's trainable parameters (the virtual step moves them, then puts them back
    exactly); ``train_losses()``: this step's training batch evaluated again at the parameters' current
    values, ``{task: loss}``; ``heldout_losses()``: a held-out batch evaluated likewise (called once per
    step: it may draw the next batch); ``lr``: the model optimizer's current learning rate;
    ``weight_decay`` and ``momentum`` (per parameter, the optimizer's momentum buffer times its momentum
    coefficient, ``None`` entries for none): what the optimizer adds to the gradient, so that the virtual
    step is the optimizer's (the authors' ``virtual_step``).
    """

    parameters: list[Tensor]
    train_losses: Callable[[], Mapping[str, Tensor]]
    heldout_losses: Callable[[], Mapping[str, Tensor]]
    lr: float
    weight_decay: float = 0.0
    momentum: list[Tensor | None] | None = None


@BALANCERS.register("auto_lambda", "autolambda", "autol")
class AutoLambda(TaskStateBalancer):
    """Auto-Lambda: task weights meta-learned by a one-step lookahead on held-out data.

    Liu, James, Davison, Johns, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022.

    The weights ``λ`` (start ``weight_init``) minimise the primary tasks' held-out loss after one
    training step (a bi-level problem, solved with a one-step lookahead): with
    ``θ' = θ − α ∇_θ Σ_t λ_t L_t(θ)`` (``α`` the model's learning rate),

        ``∇_λ L_val(θ') = −α ∇²_{λ,θ} L_λ(θ) · ∇_θ' L_val(θ')``,

    whose ``t``-th entry ``−α ∇_θ L_t(θ) · v`` (``v = ∇_θ' L_val(θ')``) is taken by central finite
    differences (as in DARTS and the authors' code): ``−α (L_t(θ + ε v) − L_t(θ − ε v)) / (2ε)``,
    ``ε = 0.01 / ‖v‖``. ``λ`` takes one Adam step (``meta_lr``) on it, then the model's gradient is
    ``Σ_t λ_t ∇L_t`` with the updated ``λ`` (the authors' order). ``L_val = Σ_{t ∈ primary} L_t`` on
    the held-out batch (``primary=None``: every task, the paper's multi-task setting).

    Cost per step: two backward passes through the step's graph, a forward and backward on the held-out
    batch, two forwards of the training batch. Neither Gramian-only nor feature-level: the lookahead moves
    every trainable parameter (heads included) and the hypergradient needs the losses at ``θ ± ε v``, which
    no ``T x T`` Gramian or feature gradient determines. The virtual step is the model optimizer's as the
    authors write it (:meth:`virtual_step`: SGD's momentum term and L2 weight decay, passed in
    :class:`HeldOut`; Adam's moments are not used, as in their code). ``λ`` is not clipped, as in the
    paper. Not available under a process group, with micro-batch accumulation, or with
    ``reduce_gradients=False`` (ConfigError).

    Where the held-out batch comes from: set ``balancer.heldout`` (a :class:`HeldOut`) before each
    ``backward``; polytask's Trainer does this (``needs_heldout``) from ``heldout_split``: ``"train"``
    (default) is the authors' choice, a second pass over the training split in its own shuffled order
    (their ``val_loader`` is "a copy of train_loader with different data order"), which leaves the
    validation split to model selection alone; ``"val"`` draws from the validation split. Without it
    ``backward`` raises a one-line ConfigError. No host synchronisation in the balancer (the held-out
    batch's loading is the Trainer's).

    Args:
        weight_init: the initial ``λ_t`` (the authors' 0.1).
        meta_lr: Adam step size of ``λ`` (the authors' 1e-4 for dense prediction).
        primary: names of the primary tasks (None: all).
        heldout_split: where the Trainer draws the held-out batches: ``"train"`` or ``"val"``.
    """

    needs_heldout = True
    supports_external_reduction = False
    _state_buffer = "meta_weights"

    def __init__(self, weight_init: float = 0.1, meta_lr: float = 1e-4, primary: list[str] | None = None,
                 heldout_split: Literal["train", "val"] = "train", nan_policy: Literal["skip", "raise"] = "skip") -> None:
        super().__init__(nan_policy)
        if heldout_split not in ("train", "val"):
            raise ConfigError(f"balancer.params.heldout_split: must be 'train' or 'val', got {heldout_split!r}")
        self.heldout_split = heldout_split
        self.weight_init = _positive(weight_init, "weight_init", "auto_lambda")
        self.meta_lr = _positive(meta_lr, "meta_lr", "auto_lambda")
        self.primary = None if primary is None else list(primary)
        self.register_buffer("meta_weights", torch.zeros(0))
        self.opt = BufferOptimizer("adam", lr=self.meta_lr)
        self.heldout: HeldOut | None = None

    def extra_repr(self) -> str:
        return (f"weight_init={self.weight_init}, meta_lr={self.meta_lr}, primary={self.primary!r}, "
                f"heldout_split={self.heldout_split!r}")

    def _init_state(self, losses: Tensor) -> None:
        self.meta_weights = torch.full_like(losses, self.weight_init)

    def _check_accumulable(self) -> None:
        raise ConfigError("balancer 'auto_lambda': cannot accumulate micro-batches (train.accumulate must be 1)")

    def _primary_mask(self, names: list[str], like: Tensor) -> Tensor:
        if self.primary is None:
            return torch.ones_like(like)
        unknown = [p for p in self.primary if p not in names]
        if unknown:
            raise ConfigError(f"balancer.params.primary: unknown task(s) {', '.join(map(repr, unknown))}; "
                              f"the losses name {', '.join(names)}")
        return torch.tensor([float(n in self.primary) for n in names], dtype=like.dtype, device=like.device)

    def meta_gradient(self, vec: Tensor, held: HeldOut, names: list[str]) -> tuple[Tensor, Tensor]:
        """``(∇_λ L_val(θ'), finite)`` by the finite-difference rule above; the parameters are left exactly as found."""
        params = list(held.parameters)
        saved = [p.data for p in params]  # never written: the step's graph still reads these tensors
        grads = torch.autograd.grad((self.meta_weights.to(vec) * vec).sum(), params, retain_graph=True,
                                    allow_unused=True, materialize_grads=True)

        def move_to(values: Iterable[Tensor]) -> None:  # new tensors, not in-place writes (autograd's versions)
            for p, value in zip(params, values):
                p.data = value

        try:
            move_to(self.virtual_step(held, saved, grads))
            val = stack_losses(dict(held.heldout_losses()))
            v = torch.autograd.grad((self._primary_mask(names, val) * val).sum(), params, allow_unused=True,
                                    materialize_grads=True)
            norm = torch.sqrt(sum((d.double() ** 2).sum() for d in v)).to(vec.dtype)
            eps = 0.01 / torch.where(norm > 0, norm, torch.ones_like(norm))
            with torch.no_grad():
                move_to([s + eps.to(s.dtype) * d for s, d in zip(saved, v)])  # θ + ε v
                plus = stack_losses(dict(held.train_losses())).to(vec)
                move_to([s - eps.to(s.dtype) * d for s, d in zip(saved, v)])  # θ − ε v
                minus = stack_losses(dict(held.train_losses())).to(vec)
        finally:
            move_to(saved)  # θ exactly
        meta = -held.lr * (plus - minus) / (2 * eps)
        meta = torch.where(norm > 0, meta, torch.zeros_like(meta))  # no held-out signal: λ stays
        return meta, all_finite(val, plus, minus, *grads, *v)

    @staticmethod
    def virtual_step(held: HeldOut, values: list[Tensor], grads: Iterable[Tensor]) -> list[Tensor]:
        """``θ' = θ − α (m + g + wd θ)``: one step of the model's optimizer as the authors write it (SGD with its
        momentum term ``m`` and L2 weight decay; for Adam they, and this, use ``m = 0``)."""
        momentum = held.momentum or [None] * len(values)
        return [s - held.lr * (g.detach() + held.weight_decay * s + (0 if m is None else m.to(s)))
                for s, g, m in zip(values, grads, momentum)]

    def backward(self, losses, shared=None, features=None, *, task_features=None, process_group=None,
                 counts=None, loss_scale=None, parameters=None, reduce_gradients=True) -> Tensor:
        if process_group is not None or not reduce_gradients or self.accumulating:
            raise ConfigError("balancer 'auto_lambda' runs in one process only (no process_group=, "
                              "reduce_gradients=False or micro-batch accumulation)")
        held, self.heldout = self.heldout, None  # one held-out batch per step
        if held is None:
            raise ConfigError("balancer 'auto_lambda' needs a held-out batch: set balancer.heldout "
                              "(polytask.balance.recent.HeldOut) before backward, or train with polytask's Trainer")
        vec = stack_losses(losses)
        self._bind(losses, vec)
        names = list(losses)
        before = self._snapshot()
        meta, ok = self.meta_gradient(vec, held, names)
        self.opt.step(self.meta_weights, meta)
        w = self.meta_weights.detach().clone().to(vec.dtype)
        objective = (w * vec).sum()
        if loss_scale is not None:
            objective = objective * loss_scale
        leaves = [p for p in parameters if p.requires_grad] if parameters is not None else graph_leaves(list(losses.values()))
        grads = list(torch.autograd.grad(objective, leaves, allow_unused=True))
        ok = ok & all_finite(vec.detach(), w, *(g for g in grads if g is not None))
        self._check_finite(ok, vec.detach(), names)
        self._commit(ok, before)
        accumulate_grads(leaves, grads, ok, fill=0.0 if loss_scale is None else float("nan"))
        return torch.where(ok, w, torch.zeros_like(w)).detach()
