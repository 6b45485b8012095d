"""Balancing across processes (``torch.distributed``): every balancer exact on the global batch.

Contract (DESIGN.md, "Many processes")::

    balancer.backward(losses, shared=..., features=..., task_features=...,
                      process_group=group, counts=counts)

With ``process_group=None`` (the default) nothing here runs: single-process behaviour, bit for bit.
With a group of world size ``R``, each rank passes the losses of its own disjoint micro-batch
(each task's loss a mean over that rank's labelled rows); after the call, on every rank:

- the ``.grad`` of every parameter the losses reach (shared and task-specific) holds exactly what
  ONE process gets on the concatenated global batch (gradients averaged over the batch, as DDP
  does), **added** to what ``.grad`` held before (like ``Tensor.backward``);
- the balancer's state (``state_dict()``) is identical;
- a non-finite step (any rank's loss or gradient) is skipped on every rank together, and counted
  once in ``skipped_steps``.

The global loss of task ``t`` is ``L_t = Σ_r n_rt L_rt / Σ_r n_rt`` with ``n_rt`` the labelled rows
of task ``t`` on rank ``r``: pass ``counts=`` (a ``(T,)`` tensor in the losses' order, a sequence,
or a ``{task: count}`` mapping) to make this exact under masks; without counts every rank weighs
the same (``n_rt = 1``: exact when the ranks' batches are labelled alike). A task with no labelled
row on any rank has global loss 0 and no gradient.

How: :func:`sync_losses` first, then the method's one exchange; everything after step 1 is a
gradient of the scaled local losses ``c_rt L_rt``, whose SUM over the ranks is the global quantity.

1. :func:`sync_losses` -- ONE all-reduce of ``[n_rt L_rt, n_rt, rows_r]`` (``2T + R`` numbers):
   every rank gets the global losses ``L_t``, the counts ``N_t`` and its loss scales
   ``c_rt = n_rt / N_t`` (``Σ_r c_rt ∇L_rt = ∇L_t``). A NaN/inf loss on any rank makes the global
   loss non-finite everywhere, so every rank skips that step.
2. The method's exchange (each row one flat all-reduce of packed tensors, :func:`all_reduce_sum`):

   ===============================  ===========================================================  =====================
   balancer                         reduced per step after step 1                                 numbers
   ===============================  ===========================================================  =====================
   ew, uw, dwa, rlw, gls, imtl_l,   the gradients of ``Σ_t w_t c_rt L_rt`` (what DDP reduces      ``P``
   famo, stch, constant, mean,      anyway); the weights come from the global losses
   pbi, cosmos, go4align
   famo's ``post_step``             the post-step losses (as step 1)                              ``2T + R``
   gradnorm, ``last_shared``        ``c_rt ∇_W L_rt``, then the gradients                         ``T |W|``, then ``P``
   gradnorm, ``features``           ``c_rt^2 ‖∇_z L_rt‖^2`` (disjoint rows add up), then ``P``    ``T``, then ``P``
   ntkmtl_sr                        the largest squared row of ``c_rt ∇_z L_rt`` (MAX) and its    ``2T``, then ``P``
                                    non-zero rows (SUM) per task, then the gradients
   db_mtl                           ``c_rt ∇_θ L_rt / (L_t + eps)`` and the heads' gradients;     ``T D + P - D``
                                    the update is then identical on every rank
   gradient methods, parameter      the ``T x D`` Jacobian of the scaled losses and the heads'    ``T D + P - D``
   level (``mode="parameters"``)    gradients; the update is then identical on every rank
   Gramian methods, feature level   the ``T x T`` Gramian of the feature Jacobian (rank rows are   ``T^2``, then ``P``
   (also ntkmtl, sdmgrad, modo,     disjoint: it is the sum of the ranks'); then the trunk's
   cr_mogm, pcd, krum: their        and heads' gradients
   state is updated from the
   global Gramian, alike on every
   rank)
   the same, ``reduce_gradients=    the ``T x T`` Gramian, then the wrapper reduces the           ``T^2`` + 1, then
   False`` (FSDP2)                  gradients of one backward (FSDP2: reduce-scatter); a flag     FSDP's ``P``
   graddrop, trimmed_mean,          an all-gather of the ``T x b x d`` feature Jacobian (its      ``T B d`` gathered,
   feature level                    draws / trims are per coordinate), each rank keeps its own    then ``P``
                                    rows (the ranks' row counts are read on the host: a sync)
   auto_lambda                      not available: one process only (its held-out lookahead       --
                                    moves the parameters; ConfigError under a process group)
   ===============================  ===========================================================  =====================

   ``T`` tasks, ``D`` shared parameter entries, ``P`` all parameter entries the losses reach,
   ``|W|`` GradNorm's layer, ``d`` feature width, ``b`` / ``B`` rows on one rank / in the global
   batch, ``R`` ranks; bytes = numbers x the element size of the losses' dtype (8 for float64).
   Never a ``T x D`` gather: parameter-level Jacobians are summed in place. The engine's one-pass
   paths with ``task_features`` (including the linear-head Gramian, which also sums over samples)
   run on each rank's scaled losses with the same exchanges.
3. Random methods draw from a generator seeded identically on every rank: the balancer's
   ``seed`` if given, else rank 0's draw, broadcast once at the first step (:func:`shared_seed`)
   and kept (and saved in ``state_dict()`` as ``rng_state``).

Every rank decides from the same reduced numbers, so the weights, the state and the skip decision
(a non-finite loss, Gramian, update or reduced gradient) agree on every rank.

Gradient accumulation (``balancer.accumulate(...)`` for micro-batches 1..K-1, then ``backward``
for the last, see :meth:`polytask.balance.Balancer.accumulate`): the per-task quantities of the K
micro-batches are kept locally and reduced ONCE, at the last micro-batch (``2T + T P`` numbers, plus
``T^2`` at feature level), instead of the per-step exchanges above.

Every rank must reach the same parameters in the same order: loss balancers reduce what their
graph walk finds unless ``parameters=`` is given (pass ``model.parameters()`` for routed models
whose graph differs between ranks); gradient methods reduce ``shared`` and the task-specific
parameters found by their walk, which must then be alike on every rank.

A user's own DDP loop: the balancer owns the reduction, so run the forward AND ``backward`` under
``ddp_model.no_sync()`` (DDP then only broadcasts buffers in forward), or do not wrap in DDP at all
(broadcast the initial parameters once). ``find_unused_parameters=True`` is harmless (tested
with an unused parameter); DDP's own all-reduce never runs, so no "marked ready twice"::

    with ddp_model.no_sync():
        out = ddp_model(x)
        losses = {t: task.loss(out[t], y[t], mask[t]) for t, task in tasks.items()}
        balancer.backward(losses, shared=model.shared_parameters(), features=model.shared_features,
                          process_group=dist.group.WORLD, counts={t: mask[t].sum() for t in tasks})
    optimizer.step()

:attr:`polytask.balance.Balancer.reduces_gradients` is ``True`` for every balancer: with a process
group, ``.grad`` is already the global gradient (a trainer must not reduce it again).

Letting the wrapper reduce (FSDP2, or DDP outside ``no_sync()``): balancers with
:attr:`~polytask.balance.Balancer.supports_external_reduction` (the loss balancers that need only the losses: ew,
uw, dwa, rlw, gls, imtl_l, famo, stch; every gradient method at feature level) take
``reduce_gradients=False, parameters=model.parameters()``: the weights still come from the global
losses (step 1), then ONE ``Tensor.backward`` of this rank's weighted loss times ``R`` runs the
wrapper's hooks (its average over the ranks is the global gradient), and one all-reduce of a flag
makes every rank skip a non-finite step together (``.grad`` then set to 0). Gradient methods at
feature level (``features=`` required) first take this rank's feature Jacobian with
``autograd.grad`` to the features only (through the heads; no parameter's gradient is taken, and
FSDP2 re-gathers resharded heads for it), solve the weights from the all-reduced ``T x T`` Gramian
(GradDrop: the gathered rows), then back-propagate ``R Σ_t c_rt L_rt`` with the gradient at the
features replaced by ``R`` times this rank's combined feature gradient (a tensor hook): the heads
get their own task's gradient, the trunk the combined one, exactly as without FSDP -- on the
model's promise that the losses reach the parameters below the features only through them. Methods
that need per-task gradients w.r.t. the parameters (gradient methods at parameter level, DB-MTL,
GradNorm) refuse it: FSDP's sharded parameters are not the leaves of the graph. With FSDP2,
call ``model.reshard()`` after a forward that has no backward (FAMO's post-step evaluation): the
root module keeps its gathered parameters otherwise, and the next step does not reach the shards::

    fully_shard(model)
    ...
    balancer.backward(losses, process_group=group, counts=counts, parameters=list(model.parameters()),
                      reduce_gradients=False)
    optimizer.step()
    if balancer.needs_post_step_losses:
        with torch.no_grad():
            balancer.post_step(loss_fn(model(x)), process_group=group, counts=counts)
        model.reshard()

Mixed precision: ``loss_scale=`` (the loss scaler's scale as a device tensor: no host sync) --
the balancer back-propagates the losses times ``loss_scale`` so the backward does not underflow,
computes weights from UNSCALED gradients/Gramians (the Gramian of scaled gradients is not the
Gramian), and leaves ``.grad`` SCALED, as ``GradScaler.step`` expects (it unscales). On a
non-finite step ``.grad`` receives NaN instead of zeros so that the scaler sees the overflow, skips
the optimizer step and lowers its scale; the balancer counts it in ``skipped_steps`` and keeps its
state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as torch_dist
from torch import Tensor

from polytask.errors import ConfigError

__all__ = [
    "StepSync",
    "all_gather_rows",
    "all_reduce_sum",
    "rank",
    "shared_seed",
    "sync_losses",
    "task_counts",
    "world_size",
]


def world_size(group: Any) -> int:
    """Number of processes in ``group`` (1 for ``None``)."""
    return 1 if group is None else torch_dist.get_world_size(group)


def rank(group: Any) -> int:
    """This process's rank in ``group`` (0 for ``None``)."""
    return 0 if group is None else torch_dist.get_rank(group)


def task_counts(counts: Tensor | Sequence[float] | Mapping[str, Any] | None, names: Sequence[str],
                like: Tensor) -> Tensor | None:
    """``counts`` as a ``(T,)`` tensor in ``names`` order, on ``like``'s device and dtype (None stays None).

    A mapping must name every task; a tensor or sequence must have one entry per task.
    """
    if counts is None:
        return None
    if isinstance(counts, Mapping):
        missing = [n for n in names if n not in counts]
        if missing:
            raise ConfigError(f"balancer.backward: counts has no entry for task(s) {', '.join(map(repr, missing))}")
        values = [counts[n] for n in names]
        out = torch.stack([torch.as_tensor(v, device=like.device).to(like.dtype).reshape(()) for v in values])
    else:
        out = torch.as_tensor(counts, device=like.device).to(like.dtype).reshape(-1)
    if out.shape[0] != len(names):
        raise ConfigError(f"balancer.backward: counts has {out.shape[0]} entries for {len(names)} tasks")
    return out


class StepSync(NamedTuple):
    """What :func:`sync_losses` returns: the step's global view, identical on every rank.

    ``losses``: ``(T,)`` global losses ``L_t`` (detached); ``scale``: ``(T,)`` this rank's loss
    scales ``c_rt`` (``Σ_r c_rt L_rt = L_t``); ``counts``: ``(T,)`` global ``N_t``; ``rows``:
    ``(R,)`` every rank's ``rows`` argument; ``world``: ``R``; ``group``: the process group.
    """

    losses: Tensor
    scale: Tensor
    counts: Tensor
    rows: Tensor
    world: int
    group: Any


def all_reduce_sum(tensors: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Sum each tensor over the ranks of ``group`` with ONE all-reduce of a flat buffer; new tensors.

    The buffer has the promoted dtype of the inputs; each result is cast back to its input's dtype.
    """
    if not tensors:
        return []
    if any(t.is_sparse for t in tensors):  # sparse embedding gradients: reduced apart, the rest as before
        dense = all_reduce_sum([t for t in tensors if not t.is_sparse], group)[::-1]
        return [_all_reduce_sparse(t, group) if t.is_sparse else dense.pop() for t in tensors]
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    if group is not None:
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM, group=group)
    return [piece.view(t.shape).to(t.dtype) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _all_reduce_sparse(t: Tensor, group: Any) -> Tensor:
    """A sparse COO tensor (an embedding table's gradient: the rows of this rank's batch) summed over the ranks.

    gloo reduces sparse tensors natively (it exchanges the indices and values, never the dense table, as
    DDP does for sparse gradients); other backends (nccl has no sparse all-reduce) get the dense sum,
    made sparse again: exact, at the cost of the table's size. Coalescing synchronises on CUDA (the
    number of distinct rows)."""
    t = t.coalesce()
    if group is None:
        return t
    if torch_dist.get_backend(group) == "gloo":
        out = t.clone()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM, group=group)
        return out.coalesce()
    dense = t.to_dense()
    torch_dist.all_reduce(dense, op=torch_dist.ReduceOp.SUM, group=group)
    return dense.to_sparse(t.sparse_dim())


def sync_losses(losses: Tensor, counts: Tensor | None, group: Any, rows: int = 0) -> StepSync:
    """Step 1 of the module docstring: ONE all-reduce of ``[n_rt L_rt, n_rt, rows_r]``.

    ``losses``: this rank's ``(T,)`` losses (detached here); ``counts``: this rank's labelled rows
    per task (:func:`task_counts`) or None (each rank counts 1); ``rows``: a number every rank
    learns from every rank (the batch rows, for :func:`all_gather_rows`). A non-finite local loss
    makes the global one non-finite on every rank (NaN propagates through the sum), so all ranks
    skip the step together.
    """
    vec = losses.detach()
    n = torch.ones_like(vec) if counts is None else counts.to(vec.dtype)
    world, me = world_size(group), rank(group)
    row_slot = torch.zeros(world, dtype=vec.dtype, device=vec.device)
    row_slot[me] = rows
    weighted, total, row_all = all_reduce_sum([n * vec, n, row_slot], group)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    # a task with no labelled row anywhere: 0 (NaN if a rank's loss was NaN: every rank skips)
    global_losses = torch.where(total > 0, weighted / safe, weighted)
    scale = torch.where(total > 0, n / safe, torch.zeros_like(n))
    return StepSync(global_losses, scale, total, row_all, world, group)


def all_gather_rows(x: Tensor, rows: Tensor, group: Any, dim: int = 1) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order); ``rows`` ``(R,)`` are the sizes along ``dim``.

    Ranks may hold different sizes: each pads to the largest, one all-gather, padding dropped.
    ``rows`` comes from :func:`sync_losses` (no extra exchange for the sizes).
    """
    if group is None:
        return x
    sizes = [int(s) for s in rows.tolist()]  # known on every rank; one small read per step
    biggest = max(sizes)
    pad = list(x.shape)
    pad[dim] = biggest - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim=dim) if pad[dim] else x.contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    torch_dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)


def shared_seed(group: Any, device: torch.device | str = "cpu", seed: int | None = None) -> int:
    """A seed identical on every rank: ``seed`` if given (no communication), else rank 0's draw from
    the global generator, broadcast (once per balancer: the generator built from it is then kept)."""
    if seed is not None or group is None:
        return int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
    value = torch.randint(0, 2**62, (1,), dtype=torch.long)
    if torch_dist.get_backend(group) == "nccl":
        value = value.to(device)
    torch_dist.broadcast(value, src=torch_dist.get_global_rank(group, 0), group=group)
    return int(value.item())
