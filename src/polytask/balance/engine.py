"""The gradient engine: per-task gradients for gradient-based balancers, and the balancer itself.

Two sources of per-task gradients (DESIGN.md, "Balancers"):

- ``mode="parameters"``: the ``T x D`` Jacobian of the task losses w.r.t. the shared parameters
  -- the quantity the papers define their methods on; one ``autograd.grad`` per task (each visits
  its own head and the trunk), or one vectorised backward (``batched=True``,
  ``is_grads_batched``), which carries all ``T`` rows through every head and measured slower.
- ``mode="features"``: the Jacobian w.r.t. the shared features ``z`` the heads read (Sener &
  Koltun, NeurIPS 2018, "MGDA-UB"): ``T`` cheap backward passes through the heads only,
  aggregation there, then ONE backward of the combined feature gradient through the trunk.
  Much cheaper; an approximation of the parameter-level method.

Both modes are much cheaper when the model also exposes ``task_features`` (``nn/base.py``): a
``(T, B, ...)`` tensor whose slice ``t`` only task ``t``'s head reads -- the heads' per-task copies
of ``z`` (``z.expand(T, ...)``) or a routed model's per-task representations. Then ONE backward of
``Σ_t L_t`` to ``task_features`` and the head parameters gives every ``∂L_t/∂z`` (slice ``t``) and
every head's own-task gradient at once, since head ``t`` reads slice ``t`` alone:

- feature mode: that backward, the aggregation, one backward of the combined gradient through the
  trunk -- about one plain ``backward()`` in all;
- parameter mode: the ``T x D`` Jacobian is then ``∂z/∂θ`` applied to the ``T`` feature-gradient
  rows, i.e. ``T`` backward passes through the trunk only (not heads + trunk per task); one
  vectorised pass instead (``trunk_batched=True``, ``is_grads_batched``) measured slower on CPU
  (``benchmarks/balance_speed.py``, ``par-vb`` column).

Both are exact (the same Jacobians as the per-task passes, up to float rounding).

The third source of DESIGN.md, the ``T x T`` Gramian without the Jacobian, serves feature mode when
the heads' first layer is linear on the shared features (:class:`~polytask.nn.base.TaskHeads` with
``task_features``: tower ``t`` computes ``y_t = z W_t + b_t`` then reads only ``y_t``) and the
method needs only the Gramian (:class:`~polytask.balance.aggregators.GramianWeighting`). With
``U_t = ∂L_t/∂y_t`` (``B x o``), task ``t``'s feature gradient is ``g_t = U_t W_t^T``, so
``G_st = <U_s W_s^T, U_t W_t^T> = Σ_ij (U_s^T U_t)_ij (W_s^T W_t)_ij`` (:func:`~polytask.balance.graph.linear_head_gramian`)
and ``Σ_t w_t g_t = [w_1 U_1 ... w_T U_T] [W_1 ... W_T]^T`` -- one backward of ``Σ_t L_t`` that
stops at the ``y_t``, ``O(B (T o)^2 + d (T o)^2)`` for the Gramian, one ``B x To x d`` product,
ONE backward through the trunk; the ``T x (B d)`` feature Jacobian is never formed. The weights
and the update are those of the Jacobian path (same Gramian, same combination), the heads get
their own task's gradient. It is taken automatically where it is cheaper (``o^2 (B + d) <= B d``:
always for linear heads, ``o = 1``) and the graph has that shape; everything else keeps the paths
above.

In both modes every task-specific parameter (heads) receives its own task's plain gradient, as
with ``L_t.backward()``; only the shared part is aggregated.

A step whose aggregated gradient is not finite (NaN/inf loss or gradient) writes nothing but
zeros, leaves the aggregator's state untouched and increments the ``skipped_steps`` buffer --
all without host synchronisation (``nan_policy="raise"`` instead synchronises and raises
:class:`~polytask.errors.TrainingError` naming the tasks); the guard is the one of
:class:`~polytask.balance.base.Balancer`, shared with the loss balancers.

Under ``torch.distributed`` (``backward(..., process_group=group, counts=...)``) the same paths run
on each rank's scaled losses, with one exchange where the Gramian or the Jacobian is formed
(:mod:`polytask.balance.dist`: parameter level sums the ``T x D`` Jacobian; feature level sums the
``T x T`` Gramian, then the trunk's gradients); ``loss_scale=`` makes the aggregation see unscaled
gradients while ``.grad`` stays scaled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from polytask.balance import aggregators as agg
from polytask.balance import dist
from polytask.balance.base import (Balancer, accumulate_grads, all_finite, check_external_reduction, external_grads_ok,
                                   gate_local_grads, graph_leaves, stack_losses)
from polytask.balance.graph import find_task_parameters, linear_head_gramian, linear_head_path, task_jacobian
from polytask.balance.registry import Mode
from polytask.errors import ConfigError


#: ``autograd.grad`` to a graph edge (the gradient at a node's output) -- what the Gramian-only source needs.
_HAS_GRADIENT_EDGE = hasattr(torch.autograd.graph, "GradientEdge")

__all__ = ["GradientBalancer", "find_task_parameters", "linear_head_gramian", "task_jacobian"]


def _gate(ok: Tensor, grad: Tensor, fill: float = 0.0) -> Tensor:
    """``grad`` where the step is ``ok``, else ``fill`` (0; NaN under a loss scaler). On the CPU reading
    ``ok`` costs no sync, and skips a full ``where`` pass; on an accelerator it stays a ``where``."""
    if grad.is_sparse:  # a sparse embedding gradient (where/full_like are dense-only): scale its rows
        return grad * torch.where(ok, torch.ones((), dtype=grad.dtype, device=grad.device),
                                  torch.full((), fill, dtype=grad.dtype, device=grad.device))
    if ok.device.type == "cpu":
        return grad if bool(ok) else torch.full_like(grad, fill)
    return torch.where(ok, grad, fill)


def _accumulate_flat(params: list[Tensor], flat: Tensor, ok: Tensor, fill: float = 0.0) -> None:
    """Add consecutive slices of the flat update ``flat`` to each parameter's ``.grad`` (gated by ``ok``)."""
    gated = _gate(ok, flat, fill)  # once for the whole update (one flag read / one where), not per parameter
    for p, piece in zip(params, gated.split([p.numel() for p in params])):
        _accumulate(p, piece.view_as(p))


def _accumulate(param: Tensor, grad: Tensor) -> None:
    """``param.grad += grad``; ``grad`` must be a fresh tensor (it is stored, not copied)."""
    accumulate_grads([param], [grad])


class _StepContext(NamedTuple):
    """One step under a process group and/or a loss scale (:mod:`polytask.balance.dist`)."""

    group: Any  # the process group, or None
    sync: Any  # dist.StepSync, or None
    loss_scale: Tensor | None
    global_losses: Tensor  # (T,) detached: the global batch's losses (this process's without a group)

    def reduce(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Sum over the ranks in one flat all-reduce (nothing without a group)."""
        return list(tensors) if self.group is None else dist.all_reduce_sum(tensors, self.group)

    @property
    def fill(self) -> float:
        """What a skipped step writes into ``.grad``: 0, or NaN for a loss scaler to see the overflow."""
        return 0.0 if self.loss_scale is None else float("nan")


class GradientBalancer(Balancer):
    """A balancer that aggregates per-task gradients with an :class:`~polytask.balance.aggregators.Aggregator`.

    ``backward(losses, shared, features)`` fills ``.grad`` of the shared parameters with the
    aggregated gradient and of each task-specific parameter with its task's gradient, then
    returns the detached ``(T,)`` task weights (for logging).

    Args:
        aggregator: the aggregation method.
        mode: ``"parameters"`` (gradients w.r.t. the shared parameters, the default: the method
            as published) or ``"features"`` (w.r.t. the shared features, MGDA-UB style: much
            cheaper; needs ``features``).
        nan_policy: ``"skip"`` (zero update, counted in ``skipped_steps``, no host sync) or
            ``"raise"`` (TrainingError naming the tasks; synchronises).
        batched: compute the ``T`` rows in one vectorised backward (``is_grads_batched``) or one
            backward per task (default). The vectorised pass carries ``T`` rows through every
            head, ``T^2`` work when heads are separate modules; it measured slower on CPU
            (``benchmarks/balance_speed.py``, ``*-vmap`` columns). Ignored with ``task_features``.
        trunk_batched: with ``task_features`` in parameter mode, carry the ``T`` feature-gradient
            rows through the trunk in one vectorised backward, or one pass per task (default:
            measured faster on CPU).
        seed: random aggregators (PCGrad, GradVac, GradDrop) draw from a generator with this seed
            (saved in ``state_dict()`` as ``rng_state``); None: the global generator, or under a
            process group rank 0's seed, broadcast once.

    ``backward(..., task_features=...)`` takes the model's ``task_features`` (see the module
    docstring); ``features`` is then the tensor it copies (``shared_features``), or ``None`` /
    ``task_features`` itself for per-task representations (routed models, whose feature
    Jacobian is block-diagonal: row ``t`` is non-zero on slice ``t`` only)::

        model.expose_task_features()  # once: TaskHeads read per-task copies of shared_features
        ...
        balancer.backward(losses, shared=model.shared_parameters(), features=model.shared_features,
                          task_features=model.task_features)

    Without ``task_features`` (or with ``None``) the per-task passes above are used. A loss that
    reaches the shared parameters other than through ``task_features`` is a ConfigError (its
    slice would miss that path); that each slice is read by its own task's head only is the
    model's promise and is not checked.
    """

    #: Its one buffer, ``rng_state``, is written when a state dict is saved, never by a step (the aggregator's
    #: own buffers are its own module's: see ``_LazyStateMixin``).
    _state_updated_in_place = ()

    def __init__(self, aggregator: agg.Aggregator, mode: Mode = "parameters", nan_policy: Literal["skip", "raise"] = "skip",
                 batched: bool = False, trunk_batched: bool = False, seed: int | None = None) -> None:
        super().__init__(nan_policy)
        if mode not in ("parameters", "features"):
            raise ConfigError(f"balancer mode must be 'parameters' or 'features', got {mode!r}")
        if mode == "features" and aggregator.parameter_space_only:
            raise ConfigError(f"balancer {type(aggregator).__name__} keeps per-parameter state and needs mode='parameters'")
        self.aggregator = aggregator
        self.mode = mode
        self.batched = batched
        self.trunk_batched = trunk_batched
        self.seed = seed
        self._graph_cache: dict[tuple[Any, ...], Any] = {}
        self._ctx: _StepContext | None = None
        if seed is not None and hasattr(aggregator, "generator"):
            self.register_buffer("rng_state", torch.zeros(0, dtype=torch.uint8))  # the draws resume exactly

    def backward(self, losses: Mapping[str, Tensor], shared: Iterable[nn.Parameter] | None = None,
                 features: Tensor | None = None, *, task_features: Tensor | None = None, process_group: Any = None,
                 counts: Any = None, loss_scale: Tensor | None = None, parameters: Iterable[Tensor] | None = None,
                 reduce_gradients: bool = True) -> Tensor:
        if not reduce_gradients:
            self._check_external(parameters, features, shared)
        vec = stack_losses(losses)
        self._seed_generator(vec.device, process_group)  # before the accumulated step: a collective under a group
        done = self._begin_backward(losses, shared, features, task_features=task_features, process_group=process_group,
                                    counts=counts, loss_scale=loss_scale, parameters=parameters,
                                    reduce_gradients=reduce_gradients)
        if done is not None:
            return done
        if not reduce_gradients:
            return self._backward_external(losses, vec, features, task_features, process_group, counts, loss_scale,
                                           list(parameters), [p for p in shared if p.requires_grad])
        shared_list = [p for p in shared if p.requires_grad] if shared is not None else []
        if task_features is None and self.mode == "features" and features is None:
            raise ConfigError("balancer mode 'features' needs features= (the model's shared_features)")
        if (self.mode == "parameters" or process_group is not None) and not shared_list:
            what = "balancer mode 'parameters'" if process_group is None else "balancer.backward: process_group="
            raise ConfigError(f"{what} needs shared= (the model's shared parameters)")
        if process_group is not None or loss_scale is not None:
            losses, vec = self._enter_step(losses, vec, features, task_features, process_group, counts, loss_scale)
        try:
            if task_features is not None:
                return self._backward_one_pass(losses, vec, shared_list, features, task_features)
            if self.mode == "features":
                return self._backward_features(losses, vec, shared_list, features)
            return self._backward_parameters(losses, vec, shared_list)
        finally:
            self._ctx = None

    # -- the wrapper reduces (FSDP2's fully_shard): reduce_gradients=False --------------------------

    @property
    def supports_external_reduction(self) -> bool:  # type: ignore[override]
        """Feature level only: the combined feature gradient goes through the trunk in ONE ``Tensor.backward``
        (FSDP2's hooks reduce-scatter it); parameter level needs per-task gradients of the sharded parameters."""
        return self.mode == "features"

    def _check_external(self, parameters: Iterable[Tensor] | None, features: Tensor | None,
                        shared: Iterable[Tensor] | None) -> None:
        if self.mode == "parameters":
            raise ConfigError(f"balancer {type(self.aggregator).__name__} at parameter level needs per-task gradients of "
                              "the shared parameters, which FSDP's sharded parameters never receive (autograd.grad "
                              "bypasses its reduce-scatter): use mode='features', or reduce_gradients=True under DDP")
        check_external_reduction(self, parameters)
        if self.accumulating:
            raise ConfigError("balancer.backward: reduce_gradients=False cannot end accumulated micro-batches "
                              "(they keep per-task gradients of the parameters)")
        if features is None or shared is None:
            raise ConfigError("balancer.backward: reduce_gradients=False at feature level needs features= (the "
                              "shared representation every task's head reads) and shared= (the parameters below it)")

    @staticmethod
    def _check_below(features: Tensor, shared: list[Tensor]) -> None:
        """ConfigError if a task-specific parameter lies below the features (a routed model's gates): the one
        backward would give it the combined gradient, not its own task's. The leaves below are compared with
        ``shared`` by identity, or -- FSDP2's gathered parameters are other tensors than the sharded ones
        passed as ``shared`` -- by count and size."""
        below = [p for p in graph_leaves([features]) if p.requires_grad]
        ids = {id(p) for p in shared}
        if any(id(p) in ids for p in below):
            extra = [p for p in below if id(p) not in ids]
        else:
            extra = below if (len(below) > len(shared) or sum(p.numel() for p in below) > sum(p.numel() for p in shared)) \
                else []
        if extra:
            raise ConfigError("balancer.backward: reduce_gradients=False at feature level cannot serve task-specific "
                              "parameters below the features (a routed model's gates); use reduce_gradients=True "
                              "(strategy: ddp)")

    def _backward_external(self, losses: Mapping[str, Tensor], vec: Tensor, features: Tensor,
                           task_features: Tensor | None, group: Any, counts: Any, loss_scale: Tensor | None,
                           params: list[Tensor], shared: list[Tensor]) -> Tensor:
        """Feature level with the wrapper reducing (:mod:`polytask.balance.dist`): the feature Jacobian of this
        rank's scaled losses (``autograd.grad`` to the features only: through the heads, no parameter), the
        weights from the global Gramian (one ``T x T`` all-reduce) and this rank's combined feature gradient
        ``u``, then ONE ``Tensor.backward`` of ``R Σ_t c_rt L_rt`` whose gradient at the features is replaced
        by ``R u``: every head gets its own task's gradient, the trunk ``∂z/∂θ^T u``, and the wrapper's hooks
        (FSDP2's reduce-scatter, an average over the ``R`` ranks) see both. The skip decision adds one
        all-reduce of a flag (:func:`~polytask.balance.base.external_grads_ok`).

        The parameters below ``features`` all receive the combined gradient: the model's promise is that the
        losses reach them through ``features`` only; task-specific ones below it (a routed model's gates) are
        refused (:meth:`_check_below`)."""
        names = list(losses)
        key = (tuple(names), "external", tuple(id(p) for p in shared))
        if key not in self._graph_cache:  # checked once per task set: graphs repeat from step to step
            find_task_parameters(losses, [], features)  # every loss reaches the features
            self._check_below(features, shared)
            self._graph_cache[key] = True
        losses, vec = self._enter_step(losses, vec, features, task_features, group, counts, loss_scale)
        try:
            n = vec.shape[0]
            if task_features is not None and tuple(task_features.shape[1:]) == tuple(features.shape):
                # the heads read per-task copies of z: one pass gives every ∂L_t/∂z (slice t)
                rows = torch.autograd.grad(vec.sum(), task_features, retain_graph=True)[0].reshape(n, -1)
            else:
                rows = task_jacobian(list(losses.values()), [features], batched=bool(self.batched))[0].reshape(n, -1)
            local, weights, ok, before = self._combine_rows(rows, features, 0)
            world = dist.world_size(group)
            replace = local.detach().view_as(features).to(features.dtype) * world
            handle = features.register_hook(lambda _grad: replace)
            try:
                torch.autograd.backward(vec.sum() * world)
            finally:
                handle.remove()
            ok = external_grads_ok(params, ok, group)
            self._check_finite(ok, lambda: torch.cat([rows.detach(), self._ctx.global_losses[:, None].to(rows.dtype)], dim=1),
                               names)
            self._commit(ok, before)
            gate_local_grads(params, ok, self._ctx.fill)
            return torch.where(ok, weights, torch.zeros_like(weights)).detach()
        finally:
            self._ctx = None

    # -- gradient accumulation (Balancer.accumulate) ---------------------------------------------

    def _check_accumulable(self) -> None:
        if self.mode == "features" and not agg.gramian_only(self.aggregator):
            raise ConfigError(f"balancer {type(self.aggregator).__name__} at feature level cannot accumulate "
                              "micro-batches (it works per feature coordinate); use mode='parameters'")

    def _accumulates_gramian(self) -> bool:
        return self.mode == "features"

    def _combine_accumulated(self, surrogates: Mapping[str, Tensor], shared: list[Tensor] | None, features: Tensor | None,
                             params: list[Tensor], gramian: Tensor | None, loss_scale: Tensor | None) -> Tensor:
        """Parameter level: the engine's own path on the surrogate losses. Feature level: the weights of
        the whole batch's feature Gramian, applied to the per-task gradients of the shared parameters
        (through the features, ``∂z/∂θ^T Σ_t w_t ∇_z L_t = Σ_t w_t ∇_θ L_t``); heads their own gradient."""
        if self.mode == "parameters":
            return self.backward(surrogates, shared, None, loss_scale=loss_scale)
        shared_list = [p for p in (shared or []) if p.requires_grad]
        shared_ids = {id(p) for p in shared_list}
        heads = [p for p in params if id(p) not in shared_ids]
        vec = torch.stack(list(surrogates.values()))
        per_task = [torch.autograd.grad(loss, [*shared_list, *heads], retain_graph=True, allow_unused=True,
                                        materialize_grads=True) for loss in surrogates.values()]
        jac = torch.stack([torch.cat([g.reshape(-1) for g in row[: len(shared_list)]]) for row in per_task])
        head_grads = [sum(row[len(shared_list) + i] for row in per_task) for i in range(len(heads))]
        before = self._snapshot()
        weights = self.aggregator.weights(gramian.to(agg._SOLVE_DTYPE)).to(jac.dtype)
        update = weights @ jac
        ok = all_finite(vec.detach(), gramian, weights, update, *head_grads)
        self._check_finite(ok, lambda: torch.cat([jac, vec.detach()[:, None]], dim=1), list(surrogates))
        self._commit(ok, before)
        fill = 0.0 if loss_scale is None else float("nan")
        if loss_scale is not None:
            update = update * loss_scale.to(update)
            head_grads = [g * loss_scale.to(g) for g in head_grads]
        _accumulate_flat(shared_list, update, ok, fill)
        for p, g in zip(heads, head_grads):
            _accumulate(p, _gate(ok, g, fill))
        return torch.where(ok, weights, torch.zeros_like(weights)).detach()

    def _seed_generator(self, device: torch.device, group: Any) -> None:
        """Random aggregators (PCGrad's and GradVac's orders, GradDrop's masks) draw from a generator
        seeded with ``seed`` -- under a process group always, so that every rank draws alike
        (:func:`~polytask.balance.dist.shared_seed`: rank 0's seed broadcast once if ``seed`` is None).
        Without either, the global generator, as before."""
        if not hasattr(self.aggregator, "generator") or (self.seed is None and group is None):
            return
        current = self.aggregator.generator
        if current is not None and current.device == device:
            return
        if self.seed is None:  # first step under a group: rank 0's seed, kept (and saved) from now on
            self.seed = dist.shared_seed(group, device)
            self.register_buffer("rng_state", torch.zeros(0, dtype=torch.uint8))
        gen = torch.Generator(device=device)
        saved = getattr(self, "rng_state", None)
        if saved is not None and saved.numel():
            gen.set_state(saved.cpu())
        else:
            gen.manual_seed(self.seed)
        self.aggregator.generator = gen

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        gen = getattr(self.aggregator, "generator", None)
        if gen is not None and "rng_state" in self._buffers:
            self.rng_state = gen.get_state()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "rng_state")
        if isinstance(saved, Tensor):
            self.register_buffer("rng_state", torch.zeros(saved.shape, dtype=torch.uint8))
            if self.seed is None:
                self.seed = 0  # the saved generator state decides the draws
            if hasattr(self.aggregator, "generator"):
                self.aggregator.generator = None  # rebuilt from the loaded state at the next step
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _enter_step(self, losses: Mapping[str, Tensor], vec: Tensor, features: Tensor | None, task_features: Tensor | None,
                    group: Any, counts: Any, loss_scale: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
        """Reduce the losses (one small all-reduce) and scale each task's local loss by ``c_rt`` (and the loss
        scale): gradients of the scaled losses sum over the ranks to the global batch's (dist module docstring)."""
        sync = None
        if group is not None:
            rows = (task_features.shape[1] if task_features is not None
                    else features.shape[0] if features is not None else 0)
            sync = dist.sync_losses(vec, dist.task_counts(counts, list(losses), vec), group, rows=rows)
        mult = torch.ones_like(vec.detach()) if sync is None else sync.scale
        if loss_scale is not None:
            mult = mult * loss_scale.to(device=vec.device, dtype=vec.dtype)
        scaled = {name: loss.reshape(()) * mult[i] for i, (name, loss) in enumerate(losses.items())}
        self._ctx = _StepContext(group, sync, loss_scale, vec.detach() if sync is None else sync.losses)
        return scaled, torch.stack(list(scaled.values()))

    def _reduce_rows(self, jac: Tensor, head_grads: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Parameter level under a group: the ``T x D`` Jacobian and the heads' gradients summed over the ranks
        in ONE all-reduce; the Jacobian unscaled (``loss_scale``), the heads' gradients left as ``.grad`` wants them."""
        ctx = self._ctx
        if ctx is None:
            return jac, head_grads
        jac, *head_grads = ctx.reduce([jac, *head_grads])
        if ctx.loss_scale is not None:
            jac = jac / ctx.loss_scale.to(jac)
        return jac, head_grads

    def _step_on_jacobian(self, jac: Tensor, head_grads: list[Tensor], shared: list[Tensor], vec: Tensor,
                          names: list[str]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Parameter level, with the ``T x D`` Jacobian of the shared parameters in hand (from per-task passes or
        through the trunk): reduce it over the ranks, aggregate, add the update to the shared ``.grad``. Returns
        ``(weights, ok, head_grads)``, the heads' gradients reduced (for :meth:`_add_head_grads`)."""
        jac, head_grads = self._reduce_rows(jac, head_grads)
        self.aggregator.parameter_sizes = [p.numel() for p in shared]
        update, weights, ok = self._aggregate(jac, head_grads, vec, names)
        _accumulate_flat(shared, self._scaled_update(update), ok, self._fill())
        return weights, ok, head_grads

    def _add_head_grads(self, heads: list[Tensor], head_grads: list[Tensor], ok: Tensor) -> None:
        """Each task-specific parameter its own task's gradient; on a skipped step zero (NaN under a loss scale)."""
        if ok.device.type == "cpu" and bool(ok):  # the common case read once (no sync on the CPU), not per parameter
            accumulate_grads(heads, head_grads)
            return
        for p, g in zip(heads, head_grads):
            _accumulate(p, _gate(ok, g, self._fill()))

    def _scaled_update(self, update: Tensor) -> Tensor:
        """The aggregated (unscaled) update as ``.grad`` wants it: times the loss scale, if any."""
        ctx = self._ctx
        return update if ctx is None or ctx.loss_scale is None else update * ctx.loss_scale.to(update)

    def _fill(self) -> float:
        return 0.0 if self._ctx is None else self._ctx.fill

    def _features_step(self, rows: Tensor, source: Tensor, batch_dim: int, shared: list[Tensor], heads: list[Tensor],
                       head_grads: list[Tensor], names: list[str], gramian: Tensor | None = None,
                       combine: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Feature level under a process group / loss scale. ``rows``: ``(T, m)``, this rank's feature Jacobian of its
        scaled losses at ``source`` (rows ``batch_dim`` of ``source`` are this rank's samples).

        Gramian methods: the global Gramian is the sum of the ranks' (disjoint samples): one ``T x T`` all-reduce;
        every rank solves the same weights and back-propagates its own rows' combination; the trunk's and
        heads' gradients are then summed in one all-reduce. Other methods (GradDrop, per coordinate): the
        rows are gathered, aggregated identically, and each rank keeps its own samples' part. ``gramian`` and
        ``combine`` (weights -> this rank's combined feature gradient) replace ``rows @ rows.T`` and
        ``weights @ rows`` where the Gramian comes without the rows (linear heads; ``rows`` then only name
        bad tasks).
        """
        ctx = self._ctx
        n = rows.shape[0]
        local, weights, ok, before = self._combine_rows(rows, source, batch_dim, gramian, combine)
        trunk = list(torch.autograd.grad(source, shared, grad_outputs=local.view_as(source).to(source.dtype),
                                         allow_unused=True, materialize_grads=True)) if source.grad_fn is not None else \
            [torch.zeros_like(p) for p in shared]
        grads = ctx.reduce([*trunk, *head_grads])
        ok = ok & all_finite(*grads)
        self._check_finite(ok, lambda: torch.cat([rows.detach().reshape(n, -1), ctx.global_losses[:, None]], dim=1), names)
        self._commit(ok, before)
        for p, g in zip([*shared, *heads], grads):
            _accumulate(p, _gate(ok, g, ctx.fill))
        return torch.where(ok, weights, torch.zeros_like(weights)).detach()

    def _combine_rows(self, rows: Tensor, source: Tensor, batch_dim: int, gramian: Tensor | None = None,
                      combine: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, dict]:
        """``(local, weights, ok, before)`` of :meth:`_features_step`: this rank's combined feature gradient (flat,
        scaled as ``rows``), the global weights, whether the global inputs are finite, the state before solving."""
        ctx = self._ctx
        n = rows.shape[0]
        before = self._snapshot()
        scale = None if ctx.loss_scale is None else ctx.loss_scale.to(rows)
        if agg.gramian_only(self.aggregator):
            (gramian,) = ctx.reduce([rows.detach() @ rows.detach().T if gramian is None else gramian.detach()])
            if scale is not None:
                gramian = gramian / (scale * scale)
            weights = self.aggregator.weights(gramian.to(agg._SOLVE_DTYPE)).to(rows.dtype)
            local = weights @ rows.detach() if combine is None else combine(weights)  # scaled as the rows are
            ok = all_finite(ctx.global_losses, gramian, weights)
        else:
            shaped = rows.detach().view(n, *source.shape)
            full = shaped if ctx.group is None else dist.all_gather_rows(shaped, ctx.sync.rows, ctx.group, dim=1 + batch_dim)
            glob = full.reshape(n, -1) if scale is None else full.reshape(n, -1) / scale
            update, weights = self.aggregator.aggregate(glob)
            offset = 0 if ctx.group is None else int(ctx.sync.rows[: dist.rank(ctx.group)].sum().item())
            local = update.view(full.shape[1:]).narrow(batch_dim, offset, source.shape[batch_dim]).reshape(-1)
            local = local if scale is None else local * scale
            ok = all_finite(ctx.global_losses, update, weights)
        return local, weights, ok, before

    # -- the two modes -------------------------------------------------------------------------

    def _task_parameters(self, losses: Mapping[str, Tensor], shared: list[Tensor], features: Tensor | None) -> list[Tensor]:
        key = (tuple(losses), tuple(id(p) for p in shared), features is None)
        if key not in self._graph_cache:  # walked once per task set: graphs repeat from step to step
            found = find_task_parameters(losses, shared if features is None else [], features)
            shared_ids = {id(p) for p in shared}
            heads = [p for p in found if id(p) not in shared_ids]
            self._graph_cache[key] = heads + (self._task_parameters_below(losses, shared, heads) if features is not None else [])
        return self._graph_cache[key]

    @staticmethod
    def _task_parameters_below(losses: Mapping[str, Tensor], shared: list[Tensor], above: list[Tensor]) -> list[Tensor]:
        """Task-specific parameters under the features (a routed model's task gates): not shared, not above."""
        if not shared:
            return []
        known = {id(p) for p in shared} | {id(p) for p in above}
        return [p for p in find_task_parameters(losses, shared) if id(p) not in known]

    def _backward_parameters(self, losses: Mapping[str, Tensor], vec: Tensor, shared: list[Tensor]) -> Tensor:
        heads = self._task_parameters(losses, shared, None)
        n, params = vec.shape[0], [*shared, *heads]
        if self.batched:
            grads = task_jacobian(list(losses.values()), params, batched=True)
            jac = torch.cat([g.reshape(n, -1) for g in grads[: len(shared)]], dim=1)
            head_grads = [g.sum(0) for g in grads[len(shared):]]
        else:  # one pass per task, its shared gradient written straight into row t of J
            jac = torch.empty(n, sum(p.numel() for p in shared), dtype=shared[0].dtype, device=shared[0].device)
            head_grads = [torch.zeros_like(p) for p in heads]
            for t, loss in enumerate(losses.values()):
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                torch.cat([torch.zeros(p.numel(), dtype=jac.dtype, device=jac.device) if g is None else g.reshape(-1)
                           for p, g in zip(shared, grads[: len(shared)])], out=jac[t])
                for acc, g in zip(head_grads, grads[len(shared):]):
                    if g is not None:
                        acc.add_(g)
        weights, ok, head_grads = self._step_on_jacobian(jac, head_grads, shared, vec, list(losses))
        self._add_head_grads(heads, head_grads, ok)
        return weights

    def _backward_features(self, losses: Mapping[str, Tensor], vec: Tensor, shared: list[Tensor], features: Tensor) -> Tensor:
        heads = self._task_parameters(losses, shared, features)
        # Per-task gradients at z: each pass visits one task's head only (a vectorised pass would
        # carry T rows through every head, T^2 work when heads are separate modules).
        jz = task_jacobian(list(losses.values()), [features], batched=bool(self.batched))[0]
        n = vec.shape[0]
        # Heads: one backward of sum_t L_t, which stops at z (only paths to the heads run).
        head_grads = list(torch.autograd.grad(vec.sum(), heads, retain_graph=True, allow_unused=True,
                                              materialize_grads=True)) if heads else []
        if self._ctx is not None:
            return self._features_step(jz.reshape(n, -1), features, 0, shared, heads, head_grads, list(losses))
        update, weights, ok = self._aggregate(jz.reshape(n, -1), head_grads, vec, list(losses))
        for p, g in zip(heads, head_grads):
            _accumulate(p, _gate(ok, g))
        self._fill_trunk(features, shared, _gate(ok, update).view_as(features), ok)
        return weights

    def _check_task_features(self, losses: Mapping[str, Tensor], shared: list[Tensor], features: Tensor | None,
                             task_features: Tensor) -> tuple[bool, list[Tensor]]:
        """``(copies, heads)``: whether ``task_features`` copies ``features`` per task, and the task-specific parameters.

        Those are the heads above ``task_features`` and any below it (a routed model's task gates):
        the one backward of ``Σ_t L_t`` gives each its own task's gradient either way.
        """
        n = len(losses)
        if task_features.ndim < 2 or task_features.shape[0] != n:
            raise ConfigError(f"balancer.backward: task_features must have shape (T={n}, B, ...), got {tuple(task_features.shape)}")
        copies = features is not None and features is not task_features
        if copies and tuple(task_features.shape[1:]) != tuple(features.shape):
            raise ConfigError(f"balancer.backward: task_features {tuple(task_features.shape)} must be (T, *features.shape) "
                              f"with features {tuple(features.shape)}, or the per-task features themselves")
        key = (tuple(losses), tuple(id(p) for p in shared), "task_features", copies)
        if key not in self._graph_cache:  # walked once per task set: graphs repeat from step to step
            found = find_task_parameters(losses, [], task_features)
            shared_ids = {id(p) for p in shared}
            if any(id(p) in shared_ids for p in found):  # its slice would miss that path's gradient
                raise ConfigError("balancer.backward: a task loss reaches the shared parameters other than through "
                                  "task_features; pass features= only (or fix the model's task_features)")
            self._graph_cache[key] = found + self._task_parameters_below(losses, shared, found)
        return copies, self._graph_cache[key]

    def _backward_one_pass(self, losses: Mapping[str, Tensor], vec: Tensor, shared: list[Tensor], features: Tensor | None,
                           task_features: Tensor) -> Tensor:
        """Both modes from one backward of ``Σ_t L_t`` to ``task_features`` and the heads (module docstring)."""
        copies, heads = self._check_task_features(losses, shared, features, task_features)
        if self.mode == "features" and copies and agg.gramian_only(self.aggregator):
            layer = self._linear_head_layer(losses, features, task_features, heads)
            if layer is not None:
                return self._backward_linear_heads(losses, vec, shared, features, heads, layer)
        n = vec.shape[0]
        grads = torch.autograd.grad(vec.sum(), [task_features, *heads], retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
        slices, head_grads = grads[0].reshape(n, -1), list(grads[1:])  # slices[t] = dL_t/d(task t's copy)
        source = features if copies else task_features  # what the trunk's backward starts from
        if self.mode == "features" and not copies and agg.gramian_only(self.aggregator):
            if self._ctx is not None:  # the same diagonal Gramian, summed over ranks
                return self._features_step(slices, task_features, 1, shared, heads, head_grads, list(losses),
                                           gramian=torch.diag((slices * slices).sum(1)),
                                           combine=lambda w: (w.unsqueeze(1) * slices.detach()).reshape(-1))
            return self._backward_block_diagonal(losses, vec, shared, task_features, slices, heads, head_grads)
        if copies:
            rows = slices  # (T, m): the feature Jacobian at z itself
        else:  # per-task representations: row t of J is slice t in block t, zeros elsewhere
            rows = (torch.eye(n, dtype=slices.dtype, device=slices.device).unsqueeze(-1) * slices.unsqueeze(1)).reshape(n, -1)
        if self.mode == "features":
            if self._ctx is not None:
                return self._features_step(rows, source, 0 if copies else 1, shared, heads, head_grads, list(losses))
            update, weights, ok = self._aggregate(rows, head_grads, vec, list(losses))
            combined = _gate(ok, update).view_as(source)
            self._fill_trunk(source, shared, combined, ok)
        else:
            jac = self._trunk_jacobian(source, shared, rows.view(n, *source.shape))
            weights, ok, head_grads = self._step_on_jacobian(jac, head_grads, shared, vec, list(losses))
        self._add_head_grads(heads, head_grads, ok)
        return weights

    def _backward_block_diagonal(self, losses: Mapping[str, Tensor], vec: Tensor, shared: list[Tensor],
                                 task_features: Tensor, slices: Tensor, heads: list[Tensor],
                                 head_grads: list[Tensor]) -> Tensor:
        """Feature mode on per-task representations (routed models) for a Gramian-only method.

        Row ``t`` of the feature Jacobian is slice ``t`` in block ``t`` and zeros elsewhere, so
        ``G = diag(|slice_t|^2)`` and block ``t`` of ``J^T w`` is ``w_t slice_t``: the same weights and
        update as the dense ``T x (T m)`` rows (``_aggregate``), without forming them or their product
        (``T^2 m`` memory and work; measured 13 of the 27 ms that MGDA at feature level added to an
        EW step of MMoE, ``benchmarks/scale.py``)."""
        def solve() -> tuple[Tensor, Tensor]:
            w = self.aggregator.solve(torch.diag((slices * slices).sum(1)))
            return w.unsqueeze(1) * slices, w

        update, weights, ok = self._guarded(solve, slices, head_grads, vec, list(losses))
        self._fill_trunk(task_features, shared, _gate(ok, update).view_as(task_features), ok)
        self._add_head_grads(heads, head_grads, ok)
        return weights

    def _linear_head_layer(self, losses: Mapping[str, Tensor], features: Tensor, task_features: Tensor,
                           heads: list[Tensor]) -> Any:
        """This step's ``_CopiesLinear`` graph node if the Gramian-only source applies and is cheaper, else None.

        Not with task-specific parameters below the heads (they need the backward through the copies)."""
        if not _HAS_GRADIENT_EDGE:
            return None
        key = (tuple(losses), "linear_heads", self._ctx is not None)  # scaled losses' graphs have one more node
        if key not in self._graph_cache:
            self._graph_cache[key] = linear_head_path(list(losses.values()), task_features)
        found = self._graph_cache[key]
        if found is None:
            return None
        cls, path, above = found
        if any(id(p) not in above for p in heads):
            return None
        node = next(iter(losses.values())).grad_fn
        for i in path:  # replay the path found once; the graph's shape repeats
            node = node.next_functions[i][0] if node is not None and i < len(node.next_functions) else None
        if not isinstance(node, cls) or node.next_functions[0][0] is not task_features.grad_fn:
            return None
        width, in_features = node.saved_tensors[1].shape[2], node.saved_tensors[1].shape[1]
        batch = features.numel() // max(in_features, 1)
        # (B + d)(T o)^2 for the Gramian vs T^2 B d for the Jacobian's (+ its T B o d per-copy backward)
        return node if width * width * (batch + in_features) <= batch * in_features else None

    def _backward_linear_heads(self, losses: Mapping[str, Tensor], vec: Tensor, shared: list[Tensor], features: Tensor,
                               heads: list[Tensor], layer: Any) -> Tensor:
        """Feature mode from the Gramian alone (module docstring): ``U`` at the heads' first linear layer."""
        from torch.autograd.graph import GradientEdge

        n = vec.shape[0]
        _, weight = layer.saved_tensors  # (T, d, o)
        own = {id(child.variable) for child, _ in layer.next_functions[1:] if child is not None and hasattr(child, "variable")}
        others = [p for p in heads if id(p) not in own]
        grads = torch.autograd.grad(vec.sum(), [GradientEdge(layer, 0), *others], retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
        u = grads[0].to(weight.dtype)  # (T, B, o): u[t] = ∂L_t/∂y_t (tower t reads slice t only); autocast: as W
        batch, width, d = u.shape[1], u.shape[2], weight.shape[1]
        u_wide = u.transpose(0, 1).reshape(batch, n * width)
        w_wide = weight.detach().transpose(1, 2).reshape(n * width, d)
        z = features.detach().reshape(batch, d).to(weight.dtype)
        head_grads = dict(zip(map(id, others), grads[1:]))
        weight_param, bias_param = (child.variable if child is not None else None for child, _ in layer.next_functions[1:3])
        # as _CopiesLinear's backward, in its orientation ((T o, B) @ (B, d): CPU BLAS runs it faster for small T o)
        head_grads[id(weight_param)] = (u_wide.T @ z).reshape(n, width, d).transpose(1, 2)
        if bias_param is not None:
            head_grads[id(bias_param)] = u.sum(1, keepdim=True)

        ordered = [head_grads[id(p)] for p in heads]
        if self._ctx is not None:  # the Gramian sums over samples, so over ranks: one T x T all-reduce
            return self._features_step(
                u.reshape(n, -1), features, 0, shared, heads, ordered, list(losses),
                gramian=linear_head_gramian(u_wide, w_wide, n),
                combine=lambda w: (u_wide * w.to(u_wide.dtype).repeat_interleave(width)) @ w_wide)

        def solve() -> tuple[Tensor, Tensor]:
            gramian = linear_head_gramian(u_wide, w_wide, n)
            w = self.aggregator.weights(gramian.to(agg._SOLVE_DTYPE)).to(u.dtype)
            per_column = w if width == 1 else w.repeat_interleave(width)
            return (u_wide * per_column) @ w_wide, w  # Σ_t w_t U_t W_t^T

        update, weights, ok = self._guarded(solve, u.reshape(n, -1), ordered, vec, list(losses))
        self._add_head_grads(heads, ordered, ok)
        self._fill_trunk(features, shared, _gate(ok, update).view_as(features).to(features.dtype), ok)
        return weights

    def _trunk_jacobian(self, source: Tensor, shared: list[Tensor], rows: Tensor) -> Tensor:
        """``(T, D)``: ``∂source/∂θ`` applied to each row of ``rows`` ``(T, *source.shape)`` (trunk only)."""
        n = rows.shape[0]
        if source.grad_fn is None:  # the trunk has no parameters: no path from the shared ones
            raise ConfigError("balancer mode 'parameters': the features do not depend on the shared parameters")
        if self.trunk_batched:
            try:
                grads = torch.autograd.grad(source, shared, grad_outputs=rows, is_grads_batched=True, retain_graph=True,
                                            allow_unused=True, materialize_grads=True)
                return torch.cat([g.reshape(n, -1) for g in grads], dim=1)
            except RuntimeError as err:  # an op without a vmap rule: per-task passes below
                if "vmap" not in str(err).lower() and "batch" not in str(err).lower():
                    raise
        jac = torch.empty(n, sum(p.numel() for p in shared), dtype=shared[0].dtype, device=shared[0].device)
        for t in range(n):
            grads = torch.autograd.grad(source, shared, grad_outputs=rows[t], retain_graph=True, allow_unused=True,
                                        materialize_grads=True)
            torch.cat([g.reshape(-1) for g in grads], out=jac[t])
        return jac

    @staticmethod
    def _fill_trunk(source: Tensor, shared: list[Tensor], combined: Tensor, ok: Tensor) -> None:
        """ONE backward of the combined feature gradient through the trunk."""
        if source.grad_fn is not None and shared:
            trunk = torch.autograd.grad(source, shared, grad_outputs=combined, allow_unused=True, materialize_grads=True)
            if ok.device.type == "cpu" and bool(ok):  # the common case read once (no sync on the CPU), not per parameter
                accumulate_grads(shared, trunk)
                return
            for p, g in zip(shared, trunk):
                _accumulate(p, _gate(ok, g))
        elif source.requires_grad:  # shared parameters not given: fill whatever the features depend on
            torch.autograd.backward(source, grad_tensors=combined)

    def _aggregate(self, jac: Tensor, head_grads: list[Tensor], losses: Tensor,
                   names: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Aggregate; on a non-finite loss or result return ``ok=False`` and keep the aggregator's state."""
        return self._guarded(lambda: self.aggregator.aggregate(jac.detach()), jac, head_grads, losses, names)

    def _guarded(self, solve: Callable[[], tuple[Tensor, Tensor]], rows: Tensor, head_grads: list[Tensor], losses: Tensor,
                 names: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """``(update, weights, ok)`` of ``solve()``; ``ok=False`` on a non-finite loss or result, and then the
        balancer's state is restored (:meth:`Balancer._commit`). ``rows`` (``(T, ...)``, per task) name the bad
        tasks for ``nan_policy="raise"``. Under a process group every input here is already global, so every
        rank decides alike."""
        before = self._snapshot()
        update, weights = solve()
        check = losses.detach() if self._ctx is None else self._ctx.global_losses
        ok = all_finite(update, check, *head_grads)
        if ok.device.type == "cpu" and bool(ok):  # no sync on the CPU: the common case needs none of the masking below
            return update, weights.detach(), ok
        self._check_finite(ok, lambda: torch.cat([rows.detach().reshape(rows.shape[0], -1), check[:, None].to(rows.dtype)], dim=1),
                           names)
        self._commit(ok, before)
        weights = torch.where(ok, weights, torch.zeros_like(weights))
        return update, weights.detach(), ok
