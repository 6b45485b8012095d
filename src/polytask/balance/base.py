"""Balancer interface: per-task losses (and, if needed, per-task gradients) -> one update.

A balancer is an ``nn.Module`` so that its state (learned log-variances, moving averages, warm
starts) travels with ``state_dict()`` into checkpoints. It is usable in any training loop::

    balancer = balance.get("ew")
    losses = {t: task.loss(out[t], y[t], mask[t]) for t, task in tasks.items()}
    balancer.backward(losses, shared=model.shared_parameters(), features=model.shared_features)
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from polytask.balance.graph import task_jacobian
from polytask.errors import ConfigError, TrainingError


def stack_losses(losses: Mapping[str, Tensor]) -> Tensor:
    """Stack a ``{task: scalar}`` mapping into a ``(T,)`` tensor, naming a non-scalar loss."""
    if not losses:
        raise ConfigError("balancer.backward: no task losses were given")
    for name, value in losses.items():
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(f"balancer.backward: loss of task {name!r} must be a scalar tensor, got {shape}")
    return torch.stack([v if v.ndim == 0 else v.reshape(()) for v in losses.values()])


class _Saved(NamedTuple):
    """One buffer as :meth:`Balancer._snapshot` left it: the tensor, its version counter then, and a copy
    (None where the step replaces the tensor rather than changing it in place)."""

    tensor: Tensor
    version: int
    copy: Tensor | None


class Balancer(nn.Module):
    """Base class of every balancer.

    Subclasses implement :meth:`backward`, which must fill ``.grad`` of every parameter that the
    losses depend on (accumulating, like ``Tensor.backward``) and return the task weights it
    used as a detached ``(T,)`` tensor on the losses' device (no host synchronisation).

    Methods that need the losses of the same batch re-evaluated after ``optimizer.step()``
    (FAMO) set ``needs_post_step_losses = True``; the training loop then makes that extra
    forward pass explicitly and calls :meth:`post_step` with the new losses.

    A step whose losses or gradients are not finite (NaN/inf) is skipped by every balancer, with
    one mechanism (:meth:`_snapshot`, :meth:`_commit`): nothing but zeros is added to ``.grad``,
    the balancer's state (every buffer: learned log-variances, moving averages, warm starts) is
    left as it was, and the ``skipped_steps`` buffer counts it -- all decided on the device with
    ``torch.where`` (no host synchronisation). Only the random draw of that step (RLW's weights,
    PCGrad's order...) is consumed. ``nan_policy="raise"`` instead synchronises and raises
    :class:`~polytask.errors.TrainingError` naming the tasks.
    """

    needs_post_step_losses: bool = False
    #: With ``process_group=`` given, ``backward`` leaves ``.grad`` reduced over the ranks (the
    #: global batch's gradient): a training loop runs it under DDP's ``no_sync()`` and must not
    #: reduce again (see :mod:`polytask.balance.dist`).
    reduces_gradients: bool = True
    #: Whether ``backward(..., reduce_gradients=False)`` is available: the balancer then back-propagates
    #: one weighted loss with ``Tensor.backward`` and leaves the reduction to the wrapper (FSDP2's
    #: reduce-scatter, or DDP outside ``no_sync()``). True for the loss balancers that need nothing
    #: but the losses and for gradient methods at feature level (``GradientBalancer``: per-task gradients
    #: w.r.t. the features only); methods that take per-task gradients w.r.t. the parameters cannot.
    supports_external_reduction: bool = False
    #: The buffers of this module that a step changes in place: the non-finite guard copies only these before a
    #: step (:meth:`_snapshot`). None (the default): every buffer. A module whose steps replace their buffers
    #: (``self.x = new``) says ``()``; the guard raises (our bug) if a buffer it did not copy was changed in place,
    #: checked whenever it commits (every step, but for the gradient engine's finite steps on the CPU).
    _state_updated_in_place: tuple[str, ...] | None = None
    #: Buffers a checkpoint of an older version may lack; loading it keeps their current value.
    _optional_state: tuple[str, ...] = ("skipped_steps",)

    def __init__(self, nan_policy: str = "skip") -> None:
        super().__init__()
        if nan_policy not in ("skip", "raise"):
            raise ConfigError(f"balancer nan_policy must be 'skip' or 'raise', got {nan_policy!r}")
        self.nan_policy = nan_policy
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self._optional_state:
            if prefix + name not in state_dict and name in self._buffers and self._buffers[name] is not None:
                state_dict[prefix + name] = self._buffers[name].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the non-finite guard, shared by every balancer -----------------------------------------

    def _snapshot(self) -> dict[tuple[str, str], _Saved]:
        """What :meth:`_commit` needs to restore the balancer's buffers: a reference to each, its version
        counter, and a copy of those a step changes in place (a module's ``_state_updated_in_place``; every
        buffer of a module that does not say). A buffer that a step replaces (``self.x = new``) or leaves
        alone keeps its old value in the old tensor: no copy."""
        saved: dict[tuple[str, str], _Saved] = {}
        for mod_name, mod in self.named_modules():
            in_place = getattr(mod, "_state_updated_in_place", None)
            for buf_name, buf in mod._buffers.items():
                if buf is None or (mod is self and buf_name == "skipped_steps"):
                    continue
                copy = buf.clone() if in_place is None or buf_name in in_place else None
                saved[mod_name, buf_name] = _Saved(buf, buf._version, copy)
        return saved

    def _commit(self, ok: Tensor, before: Mapping[tuple[str, str], _Saved]) -> None:
        """Keep this step's state where ``ok`` (a 0-d bool tensor), else restore ``before``; count a skip.

        A buffer that the step resized (lazily sized state, created at a method's first step) is
        put back as it was if the step is skipped, which reads ``ok`` on the host: once per buffer
        and run, at that first step, never in the steady state. A buffer the step did not touch is
        left as it is (no ``torch.where``).
        """
        for (mod_name, buf_name), (tensor, version, copy) in before.items():
            mod = self.get_submodule(mod_name) if mod_name else self
            new = mod._buffers.get(buf_name)
            if new is None:
                continue
            if copy is None and tensor._version != version:  # our bug: its value before the step is gone
                raise RuntimeError(f"{type(mod).__name__}.{buf_name} was changed in place by a step, but is not in "
                                   "its _state_updated_in_place: the non-finite guard could not restore it")
            if new is tensor and new._version == version:
                continue
            old = tensor if copy is None else copy
            if new.shape != old.shape:
                if not bool(ok):
                    mod._buffers[buf_name] = old
                continue
            mod._buffers[buf_name] = torch.where(ok.to(new.device), new, old.to(new.dtype))
        self.skipped_steps += (~ok).long().to(self.skipped_steps.device)

    def _check_finite(self, ok: Tensor, per_task: Tensor | Callable[[], Tensor], names: Sequence[str]) -> None:
        """Under ``nan_policy="raise"``: TrainingError naming the tasks whose ``per_task`` entry is
        not finite (an explicit, opt-in host synchronisation). Nothing otherwise. ``per_task`` may be
        a function making it, called only then (the rows it joins are as large as the feature Jacobian:
        copying them every step cost ~1 ms of a 20 ms step)."""
        if self.nan_policy != "raise" or bool(ok):
            return
        if callable(per_task):
            per_task = per_task()
        finite = torch.isfinite(per_task.reshape(per_task.shape[0], -1)).all(1)
        bad = [n for n, good in zip(names, finite.tolist()) if not good] or list(names)
        raise TrainingError(f"non-finite loss or gradient for task(s) {', '.join(map(repr, bad))}")

    # -- gradient accumulation (K micro-batches = one batch K times larger) ----------------------

    def accumulate(self, losses: Mapping[str, Tensor], shared: Iterable[nn.Parameter] | None = None,
                   features: Tensor | None = None, *, task_features: Tensor | None = None,
                   counts: Tensor | Sequence[float] | Mapping[str, Any] | None = None,
                   loss_scale: Tensor | None = None, parameters: Iterable[Tensor] | None = None) -> None:
        """Add one micro-batch (not the last) of a step; the next :meth:`backward` adds the last one and
        makes the ONE update of the whole batch, exactly as if it had been one batch::

            for k, (x, y, mask) in enumerate(micro_batches):          # K of them
                out = model(x)
                losses = ...
                if k < K - 1:
                    balancer.accumulate(losses, shared=..., features=..., counts=...)
                else:
                    balancer.backward(losses, shared=..., features=..., counts=..., process_group=...)
            optimizer.step()

        What is accumulated is per task, never the combined update: the per-task gradients of every
        parameter the losses reach (``T x P`` numbers, one backward per task and micro-batch), the
        losses and labelled counts (``counts=``: exact masked means over the whole batch), and, for
        gradient methods at feature level, the ``T x T`` Gramian of the feature Jacobian (samples of
        different micro-batches are disjoint: Gramians add up). ``.grad`` is not touched until the
        last micro-batch. Under a process group the accumulated quantities are reduced once, at the
        last micro-batch (one all-reduce of ``2T + T P + T^2`` numbers), replacing the per-step
        exchange. Trade-off: memory ``T x P`` and ``T`` backward passes per micro-batch, for every
        family (a loss-based method's weights depend on the losses of the whole batch, known only
        at the end; the activations of earlier micro-batches are freed, not kept). Not available:
        feature-level GradDrop (per-coordinate, it needs the features of every micro-batch) and
        GradNorm with ``layer="features"``.
        """
        from polytask.balance import dist  # task_counts

        self._check_accumulable()
        vec = stack_losses(losses)
        n = dist.task_counts(counts, list(losses), vec)
        n = torch.ones_like(vec.detach()) if n is None else n
        leaves = ([p for p in parameters if p.requires_grad] if parameters is not None
                  else graph_leaves(list(losses.values())))
        feats = [features] if self._accumulates_gramian() else []
        if feats and features is None:
            raise ConfigError("balancer.accumulate: mode 'features' needs features= (the model's shared_features)")
        scaled = vec if loss_scale is None else vec * loss_scale.to(vec)
        # (T, *shape) per input: one backward per task (the per-task cost accumulation documents)
        rows = task_jacobian(list(scaled.unbind()), [*feats, *leaves], batched=False)
        unscale = 1.0 if loss_scale is None else 1.0 / loss_scale.to(vec)
        acc = self.__dict__.get("_pending")
        if acc is None:
            acc = self.__dict__["_pending"] = {"names": tuple(losses), "loss": torch.zeros_like(vec.detach()),
                                                "count": torch.zeros_like(vec.detach()), "grads": {}, "gramian": None}
        elif acc["names"] != tuple(losses):
            raise ConfigError(f"balancer.accumulate: micro-batches of one step must have the same tasks, got "
                              f"{', '.join(acc['names'])} then {', '.join(losses)}")
        acc["loss"] += n * vec.detach()
        acc["count"] += n
        for i, p in enumerate(leaves):
            g = rows[len(feats) + i].detach() * unscale
            g = g * n.view(-1, *([1] * p.ndim)).to(g.dtype)
            if id(p) in acc["grads"]:
                acc["grads"][id(p)][1].add_(g)
            else:
                acc["grads"][id(p)] = (p, g)
        if feats:
            z = rows[0].reshape(rows[0].shape[0], -1).detach() * unscale * n[:, None]
            gram = z @ z.T
            acc["gramian"] = gram if acc["gramian"] is None else acc["gramian"] + gram

    @property
    def accumulating(self) -> bool:
        """Whether micro-batches are waiting for the :meth:`backward` that ends the step."""
        return self.__dict__.get("_pending") is not None

    def _check_accumulable(self) -> None:
        """ConfigError if this balancer cannot accumulate micro-batches exactly (see :meth:`accumulate`)."""

    def _accumulates_gramian(self) -> bool:
        """Whether :meth:`accumulate` keeps the feature Gramian (gradient methods at feature level)."""
        return False

    def _backward_accumulated(self, losses: Mapping[str, Tensor], shared: Iterable[nn.Parameter] | None,
                              features: Tensor | None, *, task_features: Tensor | None, process_group: Any,
                              counts: Any, loss_scale: Tensor | None, parameters: Iterable[Tensor] | None) -> Tensor:
        """The last micro-batch: add it, reduce over the ranks (one all-reduce), and make the update with
        surrogate losses whose values are the whole batch's losses and whose gradients are its per-task
        gradients (:class:`_Surrogate`) -- the balancer's own single-process code does the rest."""
        from polytask.balance import dist

        shared = None if shared is None else list(shared)
        self.accumulate(losses, shared, features, task_features=task_features, counts=counts, loss_scale=loss_scale,
                        parameters=parameters)
        acc = self.__dict__.pop("_pending")
        params = [p for p, _ in acc["grads"].values()]
        grads = [g for _, g in acc["grads"].values()]
        extra = [acc["gramian"]] if acc["gramian"] is not None else []
        loss, count, *rest = dist.all_reduce_sum([acc["loss"], acc["count"], *grads, *extra], process_group) \
            if process_group is not None else [acc["loss"], acc["count"], *grads, *extra]
        grads, extra = rest[: len(grads)], rest[len(grads):]
        safe = torch.where(count > 0, count, torch.ones_like(count))
        loss = torch.where(count > 0, loss / safe, loss)
        grads = [g / safe.view(-1, *([1] * (g.ndim - 1))).to(g.dtype) for g in grads]
        gramian = extra[0] / (safe[:, None] * safe[None, :]).to(extra[0].dtype) if extra else None
        surrogates = {name: _Surrogate.apply(loss[t], tuple(g[t] for g in grads), *params)
                      for t, name in enumerate(acc["names"])}
        return self._combine_accumulated(surrogates, shared, features, params, gramian, loss_scale)

    def _begin_backward(self, losses: Mapping[str, Tensor], shared: Iterable[nn.Parameter] | None,
                        features: Tensor | None, *, task_features: Tensor | None, process_group: Any, counts: Any,
                        loss_scale: Tensor | None, parameters: Iterable[Tensor] | None,
                        reduce_gradients: bool) -> Tensor | None:
        """The prologue every :meth:`backward` shares: refuse ``reduce_gradients=False`` where it is not available,
        and end accumulated micro-batches (:meth:`accumulate`). Returns that step's weights when it did the step,
        None when the caller's own step follows."""
        if not reduce_gradients:
            check_external_reduction(self, parameters)
        if not self.accumulating:
            return None
        return self._backward_accumulated(losses, shared, features, task_features=task_features,
                                          process_group=process_group, counts=counts, loss_scale=loss_scale,
                                          parameters=parameters)

    def _combine_accumulated(self, surrogates: Mapping[str, Tensor], shared: list[Tensor] | None, features: Tensor | None,
                             params: list[Tensor], gramian: Tensor | None, loss_scale: Tensor | None) -> Tensor:
        """The update from the whole batch's surrogate losses (default: this balancer's own ``backward``)."""
        return self.backward(surrogates, shared, features, loss_scale=loss_scale, parameters=params)

    def post_step(self, losses: Mapping[str, Tensor], *, process_group: Any = None,
                  counts: Tensor | Sequence[float] | Mapping[str, Any] | None = None) -> None:
        """Receive the losses of the same batch after the optimizer step (default: ignore).

        Under ``torch.distributed`` pass the same ``process_group`` and ``counts`` as to ``backward``.
        """

    def end_epoch(self) -> None:
        """Called by the training loop after each training epoch (default: ignore).

        Methods defined on per-epoch quantities (DWA's epoch-average losses) close their
        running record here.
        """

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter] | None = None,
        features: Tensor | None = None,
        *,
        task_features: Tensor | None = None,
        process_group: Any = None,
        counts: Tensor | Sequence[float] | Mapping[str, Any] | None = None,
        loss_scale: Tensor | None = None,
        parameters: Iterable[Tensor] | None = None,
        reduce_gradients: bool = True,
    ) -> Tensor:
        """Fill ``.grad`` with the balanced update of ``losses``; return the detached ``(T,)`` weights.

        Args:
            losses: ``{task: scalar loss}`` of this step (this rank's micro-batch under a group).
            shared: the model's shared parameters (gradient methods, DB-MTL, GradNorm).
            features: the shared representation the heads read (feature-level methods).
            task_features: the model's per-task copies of ``features`` (one-pass engine paths).
            process_group: a ``torch.distributed`` group: the update of the global batch on every
                rank (:mod:`polytask.balance.dist`); None: this process alone.
            counts: labelled rows per task on this rank (exact global losses under masks).
            loss_scale: a mixed-precision loss scale (device tensor); ``.grad`` ends up scaled.
            parameters: every parameter to reduce over the ranks (default: those the losses reach).
            reduce_gradients: False (where :attr:`supports_external_reduction`): leave the gradient reduction to the
                wrapper -- ``Tensor.backward`` of this rank's weighted loss, scaled so that the wrapper's
                average over the ranks is the global gradient; ``parameters`` (the wrapper's, e.g. FSDP's
                sharded ones) is then required, and a skipped step sets their ``.grad`` to 0 (or NaN
                under ``loss_scale``) after one more all-reduce of a flag.
        """
        raise NotImplementedError


class _Surrogate(torch.autograd.Function):
    """A scalar whose value is ``value`` and whose gradient w.r.t. each of ``params`` is the given tensor
    (times the incoming gradient): an accumulated task loss, handed to a balancer's own ``backward``."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: tuple[Tensor, ...], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
        return (None, None, *(grad_out.to(g.dtype) * g for g in ctx.grads))


def graph_leaves(roots: Sequence[Tensor]) -> list[Tensor]:
    """The leaf tensors requiring grad that ``roots`` depend on (one walk of their autograd graph),
    in a deterministic order (depth first from the first root)."""
    seen: set[Any] = set()
    found: dict[int, Tensor] = {}
    stack = [r.grad_fn for r in reversed(roots) if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            found.setdefault(id(var), var)
            continue
        stack.extend(child for child, _ in reversed(node.next_functions))
    return list(found.values())


def all_finite(*tensors: Tensor) -> Tensor:
    """Whether every entry of every floating-point tensor is finite, as a 0-d bool tensor (no host sync).

    ``t . 0`` is exactly 0 unless an entry is inf/NaN (``0 * inf = NaN``): one BLAS dot per tensor,
    several times cheaper than ``isfinite(t).all()`` on a large gradient; the dots' sum is 0 or NaN.
    """
    dense = (t.coalesce().values() if t.is_sparse else t for t in tensors)  # sparse embedding gradients: their rows
    dots = [torch.dot(flat, torch.zeros_like(flat)) for flat in (t.reshape(-1) for t in dense)
            if flat.is_floating_point() and flat.numel()]
    if not dots:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device)
    if len(dots) == 1:
        return torch.isfinite(dots[0])
    dtype = dots[0].dtype
    return torch.isfinite(torch.stack([d if d.dtype == dtype else d.to(dtype) for d in dots]).sum())


def accumulate_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None], ok: Tensor | None = None,
                     fill: float = 0.0) -> None:
    """``p.grad += g`` for each pair (``None``: nothing); where ``ok`` is False, ``fill`` instead
    (0: a skipped step adds nothing; NaN: a skipped step a loss scaler must see). No host sync."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        if g.requires_grad:
            g = g.detach()
        if g.dtype != p.dtype:  # (checked here: even a no-op .to() is a dispatched call per parameter and step)
            g = g.to(p.dtype)
        if ok is not None and g.is_sparse:  # a sparse embedding gradient: scale its rows (where is dense-only)
            g = g * torch.where(ok, torch.ones((), dtype=g.dtype, device=g.device),
                                torch.full((), fill, dtype=g.dtype, device=g.device))
        elif ok is not None:
            g = torch.where(ok, g, torch.full((), fill, dtype=g.dtype, device=g.device))
        if p.grad is None:
            p.grad = g if g is not p else g.clone()
        else:
            p.grad.add_(g)


class LossWeighting(Balancer):
    """A balancer that needs loss values only: ``backward`` of ``Σ_t w_t L_t`` (cost: one backward).

    Subclasses implement :meth:`weights`, given the detached ``(T,)`` losses of this step (the
    global losses under a process group); stateful ones update their state from the same losses
    in :meth:`after_backward`. The template :meth:`backward` skips a non-finite step (the base
    class's guard) and, under a process group, reduces the losses first and the gradients last
    (:mod:`polytask.balance.dist`).

    Args:
        nan_policy: ``"skip"`` (default) or ``"raise"`` (see :class:`Balancer`).
    """

    supports_external_reduction = True

    def weights(self, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def before_weights(self, losses: Mapping[str, Tensor], vec: Tensor) -> None:
        """Hook before the weights: check the tasks, create per-task state (default: nothing)."""

    def join_group(self, group: Any, device: torch.device) -> None:
        """Hook at each step under a process group, before anything is drawn: random methods make their
        draws identical on every rank here (default: nothing)."""

    def prepare(self, losses: Mapping[str, Tensor], vec: Tensor, sync: Any, shared: Iterable[nn.Parameter] | None,
                features: Tensor | None) -> None:
        """Hook after the losses' reduction, before the weights: statistics a method needs besides
        the losses (GradNorm's gradient norms), global under a process group (``sync``: the
        :class:`~polytask.balance.dist.StepSync`, None alone). Default: nothing."""

    def after_backward(self, losses: Tensor, weights: Tensor) -> None:
        """Hook after the backward: update the method's state from the (global) detached ``losses``
        (default: nothing). A skipped step's changes are undone by the guard."""

    def _leaves(self, losses: Mapping[str, Tensor], parameters: Iterable[Tensor] | None) -> list[Tensor]:
        """The tensors to fill: ``parameters`` if given, else the leaves the losses reach, found by a
        walk of this step's graph (a few hundredths of a millisecond for the built-in models; not
        cached, so a graph that reaches other parameters from step to step is served exactly)."""
        if parameters is not None:
            return [p for p in parameters if p.requires_grad]
        return graph_leaves(list(losses.values()))

    def backward(self, losses, shared=None, features=None, *, task_features=None, process_group=None,
                 counts=None, loss_scale=None, parameters=None, reduce_gradients=True) -> Tensor:
        from polytask.balance import dist  # the collectives: only with a process group

        done = self._begin_backward(losses, shared, features, task_features=task_features, process_group=process_group,
                                    counts=counts, loss_scale=loss_scale, parameters=parameters,
                                    reduce_gradients=reduce_gradients)
        if done is not None:
            return done
        vec = stack_losses(losses)
        self.before_weights(losses, vec)
        sync = None
        if process_group is not None:
            self.join_group(process_group, vec.device)
            sync = dist.sync_losses(vec, dist.task_counts(counts, list(losses), vec), process_group)
        global_vec = vec.detach() if sync is None else sync.losses
        before = self._snapshot()
        self.prepare(losses, vec, sync, shared, features)
        w = self.weights(global_vec)
        local = w if sync is None else w * sync.scale
        objective = (local * vec).sum()
        if loss_scale is not None:
            objective = objective * loss_scale
        if not reduce_gradients:
            return self._backward_external(objective, w, global_vec, list(losses), before, list(parameters),
                                           process_group, loss_scale)
        params = self._leaves(losses, parameters)
        grads = list(torch.autograd.grad(objective, params, allow_unused=True))
        if sync is not None:
            grads = dist.all_reduce_sum([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)],
                                        process_group)
        ok = all_finite(global_vec, w, *(g for g in grads if g is not None))
        self._check_finite(ok, global_vec, list(losses))
        self.after_backward(global_vec, w.detach())
        self._commit(ok, before)
        self._last_ok = ok  # FAMO's post_step follows only a step that was applied
        accumulate_grads(params, grads, ok, fill=0.0 if loss_scale is None else float("nan"))
        return torch.where(ok, w.detach(), torch.zeros_like(w)).detach()

    def _backward_external(self, objective: Tensor, w: Tensor, global_vec: Tensor, names: list[str],
                           before: Mapping[str, Tensor], params: list[Tensor], group: Any,
                           loss_scale: Tensor | None) -> Tensor:
        """``reduce_gradients=False``: ``Tensor.backward`` of this rank's weighted loss times ``R`` (the wrapper
        averages over the ``R`` ranks), so the wrapper's hooks (FSDP2's reduce-scatter, DDP's all-reduce) run;
        then the skip decision from the global losses and the reduced gradients (one all-reduce of a flag,
        every rank decides alike) and, on a skipped step, ``.grad`` set to 0 (NaN under a loss scale)."""
        from polytask.balance import dist

        (objective * dist.world_size(group)).backward()
        ok = external_grads_ok(params, all_finite(global_vec, w), group)
        self._check_finite(ok, global_vec, names)
        self.after_backward(global_vec, w.detach())
        self._commit(ok, before)
        self._last_ok = ok
        gate_local_grads(params, ok, 0.0 if loss_scale is None else float("nan"))
        return torch.where(ok, w.detach(), torch.zeros_like(w)).detach()


def external_grads_ok(params: Sequence[Tensor], ok: Tensor, group: Any) -> Tensor:
    """After a backward whose reduction the wrapper did (``reduce_gradients=False``): ``ok`` (already the same on
    every rank) and whether every rank's shard of every ``.grad`` is finite -- one all-reduce of a flag, so every
    rank decides alike. No host sync."""
    from polytask.balance import dist

    local = [_local(p.grad) for p in params if p.grad is not None]
    bad = (~all_finite(*local)).to(torch.float32) if local else torch.zeros((), device=ok.device)
    (bad,) = dist.all_reduce_sum([bad.reshape(1).to(ok.device)], group)
    return ok & (bad[0] == 0)


def gate_local_grads(params: Sequence[Tensor], ok: Tensor, fill: float) -> None:
    """Where ``ok`` is False, set this rank's shard of every ``.grad`` to ``fill`` (0, or NaN for a loss scaler)."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                g = _local(p.grad)
                g.copy_(torch.where(ok.to(g.device), g, torch.full((), fill, dtype=g.dtype, device=g.device)))


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2's sharded gradients), a plain tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def check_external_reduction(balancer: Balancer, parameters: Iterable[Tensor] | None) -> None:
    """ConfigError unless ``balancer`` can leave the gradient reduction to a wrapper (``reduce_gradients=False``)."""
    if not balancer.supports_external_reduction:
        raise ConfigError(f"balancer {type(balancer).__name__} takes per-task gradients w.r.t. the parameters and reduces "
                          "them itself: use reduce_gradients=True (under DDP's no_sync()), not FSDP")
    if parameters is None:
        raise ConfigError("balancer.backward: reduce_gradients=False needs parameters= (the wrapped model's parameters)")
