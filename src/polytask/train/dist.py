"""More than one process: process groups, launch, data shards, sharded evaluation, checkpoints.

Everything here sits on PyTorch's own distributed engine: processes are started by torchrun's
elastic launcher (``polytask train --nproc N`` calls it with a localhost c10d rendezvous, exactly
as ``torchrun --standalone`` would), collectives are ``torch.distributed``'s (gloo on CPU, nccl on
CUDA, chosen from the device), models are wrapped in ``DistributedDataParallel`` or sharded with
FSDP2's ``fully_shard``. Nothing here launches, rendezvous or reduces by hand.

What one step exchanges is the balancer's business (``polytask.balance``: ``balancer.backward(...,
process_group=group, counts=...)``); this module gives it the group and each rank's labelled-row
counts. The rules that make a run at world size W equal to one process on the same global batch:

- every rank draws the same global batch order (same seeded generator) and reads its own
  contiguous slice of each global batch (:func:`shard_bounds`), so ``train.batch_size`` is the
  global batch and must be divisible by W;
- evaluation splits the rows the same way, pads the last shard, gathers the outputs in rank order
  and computes every metric over the whole split (:func:`sharded_predict`), so AUC, log-loss, MAE
  ... are one process's numbers;
- checkpoints hold full (unsharded) tensors in the single-process format, written by rank 0
  alone, so a run resumes at any world size (:func:`full_state_dict`, :func:`load_full_state`);
- rank 0 alone writes the run directory; a resumed checkpoint is read by rank 0 and broadcast, so
  only rank 0 needs to see the run directory;
- ``train.accumulate: K``: K batches per optimizer step through the balancer's ``accumulate()``
  (the update of one batch K times larger); ``train.precision``: autocast, and for fp16 a
  GradScaler whose scale the balancer receives as ``loss_scale=`` (:class:`Precision`);
- ``train.strategy: fsdp``: the model sharded in place by ``fully_shard``; the loss balancers that
  need only the losses leave the reduction to FSDP's reduce-scatter (``reduce_gradients=False``),
  the others are refused (:func:`check_balancer`).

Failures: a user error in a worker comes back to ``polytask train --nproc`` through torchelastic's
error file and is printed once; a rank that dies is named, the others are stopped by torchelastic
(or, under torchrun across machines, fail their next collective: :class:`PeerFailure`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from polytask.errors import CheckpointError, ConfigError, PolytaskError, TrainingError, error_from_name

#: Set by :func:`launch` for the workers it starts: they report user errors through torchelastic's
#: error file instead of printing, so that the launcher prints exactly one line.
LAUNCHED_ENV = "POLYTASK_LAUNCHED"
#: Seconds a collective waits for a silent peer before the survivors stop (default 300).
TIMEOUT_ENV = "POLYTASK_DIST_TIMEOUT"


class PeerFailure(TrainingError):
    """Another rank stopped (died, or failed) while this one waited for it in a collective."""


@dataclass
class DistContext:
    """Where this process stands: its rank among ``world_size`` and the group they share.

    ``DistContext()`` is one process (no group); :func:`setup` builds the real one from torchrun's
    environment. ``owned`` is True when :func:`setup` created the process group (and
    :meth:`close` destroys it); a group the user created is left alone.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None
    backend: str = ""
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Wait for every rank (rank 0 may still be writing the run directory), then destroy the
        group if :func:`setup` created it: a rank that tears down its group while a peer still
        holds connections to it can abort the peer."""
        if self.owned and dist.is_initialized():
            try:
                dist.barrier(group=self.group)
            except (RuntimeError, dist.DistError):  # a peer already gone: nothing to wait for
                pass
            dist.destroy_process_group()
            self.owned = False


def env_world_size() -> int:
    """World size torchrun (or our launcher) set for this process; 1 outside a launch."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun's environment describes (or the one already initialised).

    Returns the context and this rank's device: ``cuda:LOCAL_RANK`` on CUDA (nccl), the given
    device otherwise (gloo). Outside a launch this is one process and creates nothing.
    """
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        return DistContext(rank, world, local, dist.group.WORLD, dist.get_backend(), owned=False), device
    world = env_world_size()
    if world <= 1:
        return DistContext(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
        if per_node > gpus:  # nccl cannot put two ranks of one communicator on the same GPU
            raise ConfigError(f"--nproc: {per_node} processes per machine on CUDA need as many GPUs, this machine "
                              f"has {gpus}; use at most {gpus} (or device: cpu)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "300")))
    dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.group.WORLD, backend, owned=True), device


# ---------------------------------------------------------------------------- config checks
def check_config(config: Any, world_size: int, device: torch.device) -> None:
    """Refuse, in one line naming the key, what cannot run at this world size on this device."""
    t = config.train
    if world_size < 1:
        raise ConfigError(f"--nproc: expected a positive number of processes, got {world_size}")
    if world_size > 1 and t.batch_size % world_size:
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by the world size {world_size} "
                          f"(each rank reads batch_size / world size rows of every global batch)")
    if t.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision: fp16 needs a CUDA device (this run is on {device.type}); "
                          "use bf16 or fp32")
    if t.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision: bf16 is not supported on {torch.cuda.get_device_name(device)}")


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(ctx: DistContext, text: str, device: torch.device) -> None:
    """All-gather a hash of every rank's resolved config; ConfigError naming the first rank whose
    config differs from rank 0's (raised on every rank, so they stop together)."""
    if not ctx.enabled:
        return
    digest = config_hash(text)
    mine = torch.tensor([int(digest[i:i + 15], 16) for i in range(0, 60, 15)], dtype=torch.long, device=device)
    every = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    collective(dist.all_gather, every, mine, group=ctx.group)
    rows = torch.stack(every).cpu()
    bad = [r for r in range(ctx.world_size) if not torch.equal(rows[r], rows[0])]
    if bad:
        raise ConfigError(f"the config of rank {bad[0]} differs from rank 0's (resolved configs hash differently); "
                          "start every rank with the same config file and --set options")


def collective(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one torch.distributed collective; a peer that died or timed out becomes
    :class:`PeerFailure` (one line) instead of a backend traceback. Other errors propagate."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # gloo/nccl report a lost peer as RuntimeError (or its Dist* subclasses)
        failure = as_peer_failure(exc)
        if failure is None:
            raise
        raise failure from None


# ---------------------------------------------------------------------------- data shards
def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a global batch of ``rows`` that ``rank`` reads: contiguous slices
    whose sizes differ by at most one (equal when ``world_size`` divides ``rows``)."""
    return rows * rank // world_size, rows * (rank + 1) // world_size


def labelled_counts(batch: Any, task_names: Sequence[str], device: torch.device) -> Tensor:
    """``(T,)`` number of labelled rows of each task in this rank's batch (float32, no host sync)."""
    rows = _rows(batch.inputs)
    out = []
    for name in task_names:
        m = None if batch.mask is None else batch.mask.get(name)
        out.append(torch.full((), float(rows), device=device) if m is None else m.sum().to(torch.float32))
    return torch.stack(out)


def with_full_masks(batch: Any, task_names: Sequence[str]) -> Any:
    """The batch with an explicit mask for every task (all True where there was none): a rank's
    slice of a short last batch may be empty, and a masked mean over no rows is 0, not NaN."""
    rows = _rows(batch.inputs)
    device = _first(batch.inputs).device
    mask = dict(batch.mask or {})
    for name in task_names:
        if name not in mask:
            mask[name] = torch.ones(rows, dtype=torch.bool, device=device)
    return type(batch)(batch.inputs, batch.targets, mask)


def _first(inputs: Any) -> Tensor:
    return inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))


def _rows(inputs: Any) -> int:
    return _first(inputs).shape[0]


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def sharded_predict(model: nn.Module, dataset: Any, batch_size: int, ctx: DistContext,
                    autocast: Any = None) -> dict[str, Tensor]:
    """Model outputs over a whole split, each rank predicting one contiguous shard of it.

    Every rank runs the same number of forward passes on the same number of rows (the last shard
    is padded with row 0), so FSDP's per-forward all-gathers line up; the outputs are all-gathered
    in rank order and cut back to the split's rows: the same tensor one process would produce.
    """
    n = len(dataset)
    per = math.ceil(n / ctx.world_size)
    start = min(ctx.rank * per, n)
    stop = min(start + per, n)
    device = dataset.device
    idx = torch.arange(start, stop, device=device)
    if stop - start < per:  # pad (row 0) so that every rank holds ``per`` rows
        idx = torch.cat([idx, torch.zeros(per - (stop - start), dtype=torch.long, device=device)])
    was_training = model.training
    model.eval()
    chunks: dict[str, list[Tensor]] = {}
    for s in range(0, per, batch_size):
        batch = dataset.batch(idx[s:s + batch_size])
        with autocast() if autocast is not None else nullcontext():
            outputs = model(batch.inputs)
        for name, out in outputs.items():
            chunks.setdefault(name, []).append(out.float())
    model.train(was_training)
    if ctx.enabled and callable(getattr(model, "reshard", None)):  # FSDP2: forwards without backward
        model.reshard()
    result = {}
    for name in sorted(chunks):  # same order on every rank: one all_gather per task
        local = torch.cat(chunks[name]).contiguous()
        if not ctx.enabled:
            result[name] = local[:n]
            continue
        parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
        collective(dist.all_gather, parts, local, group=ctx.group)
        result[name] = torch.cat(parts)[:n]
    return result


def all_reduce_sum(tensor: Tensor, ctx: DistContext) -> Tensor:
    """Sum of ``tensor`` over ranks (in place; returned). Used once per epoch for logged values."""
    if ctx.enabled:
        collective(dist.all_reduce, tensor, group=ctx.group)
    return tensor


def all_reduce_min(tensor: Tensor, ctx: DistContext) -> Tensor:
    if ctx.enabled:
        collective(dist.all_reduce, tensor, op=dist.ReduceOp.MIN, group=ctx.group)
    return tensor


# ---------------------------------------------------------------------------- models
def wrap_model(model: nn.Module, ctx: DistContext, strategy: str, device: torch.device) -> nn.Module:
    """The module the training step runs: ``model`` at world size 1, ``DistributedDataParallel``
    for ``ddp``, ``model`` itself sharded in place with FSDP2's ``fully_shard`` for ``fsdp``.

    The model is built from the same seed on every rank; rank 0's weights are broadcast anyway
    (DDP does it when wrapping; FSDP2 shards rank 0's full tensors).
    """
    if not ctx.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        full = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for v in full.values():
            collective(dist.broadcast, v, src=0, group=ctx.group)
        # one FSDP unit per direct child that holds parameters, then the root
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        load_full_state(model, None, full, None)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   process_group=ctx.group)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, Mapping):
        return {k: _full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_full(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_full(v) for v in value)
    return value


def full_state_dict(module: nn.Module | torch.optim.Optimizer) -> dict[str, Any]:
    """``state_dict()`` with every FSDP-sharded tensor gathered whole (a collective: every rank
    calls it, in the same order); unchanged for unsharded modules and optimizers."""
    return _full(module.state_dict())


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    model_state: Mapping[str, Tensor] | None, optimizer_state: Mapping[str, Any] | None) -> None:
    """Load full (unsharded) states into a model and optimizer, sharding each tensor the way the
    corresponding FSDP parameter is sharded. Plain modules load as they always do."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if model_state is not None:
        if is_sharded(model):
            current = model.state_dict()
            sharded = {}
            for k, v in model_state.items():
                cur = current.get(k)
                if isinstance(cur, DTensor):
                    if tuple(v.shape) != tuple(cur.shape):
                        raise RuntimeError(f"size mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(cur.shape)}")
                    sharded[k] = distribute_tensor(v.to(cur.device, cur.dtype), cur.device_mesh, cur.placements)
                else:
                    sharded[k] = v
            model.load_state_dict(sharded)
        else:
            model.load_state_dict(model_state)
    if optimizer is not None and optimizer_state is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if any(isinstance(p, DTensor) for p in params):
            state = {}
            for key, entry in optimizer_state["state"].items():
                p = params[int(key)]
                if isinstance(p, DTensor):
                    entry = {n: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                             if isinstance(v, Tensor) and tuple(v.shape) == tuple(p.shape) else v
                             for n, v in entry.items()}
                state[key] = entry
            optimizer_state = {**optimizer_state, "state": state}
        optimizer.load_state_dict(optimizer_state)


def broadcast_object(obj: Any, ctx: DistContext, device: torch.device) -> Any:
    """Rank 0's ``obj`` on every rank (pickled through torch.distributed)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    collective(dist.broadcast_object_list, box, src=0, group=ctx.group,
               device=device if ctx.backend == "nccl" else None)
    return box[0]


# ---------------------------------------------------------------------------- one training step
class Precision:
    """``train.precision``: ``fp32`` (nothing), ``bf16`` (autocast), ``fp16`` (autocast and a
    ``torch.amp.GradScaler``; CUDA only, :func:`check_config` refuses it elsewhere).

    Under fp16 the balancer receives the scaler's scale as ``loss_scale=`` (a device tensor, no host
    sync): it weighs tasks on unscaled gradients and leaves ``.grad`` scaled for ``scaler.step``;
    an overflow step gives NaN gradients on every rank, which the scaler skips on every rank, and
    the balancer counts it once in ``skipped_steps``.
    """

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> Any:
        """A fresh autocast context (or a no-op one for fp32)."""
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def loss_scale(self) -> Tensor | None:
        """The scaler's current scale as a device tensor (the balancer's ``loss_scale=``)."""
        if self.scaler is None:
            return None
        if self.scaler._scale is None:  # created lazily by the first scale(): do it now, on device
            self.scaler.scale(torch.ones((), device=self.device))
        return self.scaler._scale

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def check_balancer(config: Any, balancer: nn.Module, ctx: DistContext) -> None:
    """Refuse, in one line, what the balancer cannot do exactly in this run.

    - ``train.accumulate: K > 1`` needs the balancer to accumulate per-task quantities (gradients,
      Gramians, losses) across micro-batches before combining them (a callable ``accumulate``).
    - ``train.strategy: fsdp`` at world size > 1: FSDP2's sharded parameters receive gradients only
      through its backward hooks (reduce-scatter). The balancers that need nothing but the losses
      (``supports_external_reduction``: ew, uw, dwa, rlw, gls, imtl_l, famo, stch) back-propagate
      one weighted loss through them (``reduce_gradients=False``), and so do the gradient methods at
      feature level (``mode: features``: the feature Gramian all-reduced, then one backward of the
      combined objective); methods that take per-task gradients of the parameters with
      ``torch.autograd.grad`` (gradient methods at parameter level, DB-MTL, GradNorm), and gradient
      accumulation, cannot: refused.
    """
    fsdp = ctx.enabled and config.train.strategy == "fsdp"
    if fsdp and getattr(balancer, "mode", None) == "parameters":
        raise ConfigError(f"train.strategy: fsdp is not supported with balancer {config.balancer.name!r} at parameter "
                          "level (it needs per-task gradients of the sharded parameters, which FSDP2's reduce-scatter "
                          "never sees); use balancer.params.mode: features, or strategy: ddp")
    if fsdp and not getattr(balancer, "supports_external_reduction", False):
        raise ConfigError(f"train.strategy: fsdp is not supported with balancer {config.balancer.name!r} (it takes "
                          "per-task gradients with autograd.grad, which FSDP2's sharded parameters do not receive); "
                          "use strategy: ddp, which gives the same update")
    if fsdp and config.train.accumulate > 1:
        raise ConfigError("train.accumulate: micro-batches are not supported with strategy: fsdp (the balancer "
                          "keeps per-task gradients of the parameters); use strategy: ddp")
    check_accumulate(config, balancer)


def check_accumulate(config: Any, balancer: nn.Module) -> None:
    """``train.accumulate: K > 1``: refused unless the balancer accumulates (see :func:`check_balancer`)."""
    k = config.train.accumulate
    if k > 1 and not callable(getattr(balancer, "accumulate", None)):  # balance.Balancer.accumulate
        raise ConfigError(f"train.accumulate: {k} micro-batches per step is not supported for balancer "
                          f"{config.balancer.name!r} (it would combine each micro-batch's gradients, not the "
                          f"whole batch's); use accumulate: 1 with train.batch_size {k * config.train.batch_size}")


class StepContext:
    """What one epoch of :class:`~polytask.train.Trainer` needs from the process group: which slice of
    each global batch this rank reads, the balancer's keyword arguments (group, labelled counts,
    loss scale), DDP's ``no_sync``, the optimizer step (through the GradScaler under fp16), and
    the epoch-end reduction of the logged values (one all-reduce per epoch; none per step).
    """

    def __init__(self, trainer: Any, train_config: Any) -> None:
        self.ctx: DistContext = trainer.dist
        self.model: nn.Module = trainer.model
        self.step_model: nn.Module = trainer._step_model
        self.optimizer = trainer.optimizer
        self.precision: Precision = trainer.precision
        self.names = [t.name for t in trainer.tasks]
        self.device = trainer.device
        self.shard = (self.ctx.rank, self.ctx.world_size) if self.ctx.enabled else None
        self.fsdp = self.ctx.enabled and is_sharded(self.model)  # FSDP2 reduces (reduce_gradients=False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.counts: Tensor | None = None
        self.rows = 0
        # train.accumulate: K batches of batch_size rows make one optimizer step (the last step of
        # an epoch takes what is left), exactly one batch K times larger (the balancer accumulates)
        self.k = train_config.accumulate
        self.batches = math.ceil(len(trainer.train_set) / train_config.batch_size)
        self.index = 0
        self.group_size = 1
        self.group: list[tuple[Any, Tensor, Tensor | None]] = []  # earlier micro-batches of this step
        self._num: list[Tensor] = []
        self._den: list[Tensor] = []

    def begin(self) -> tuple[bool, bool]:
        """Whether the next batch opens an optimizer step, and whether it closes it."""
        i = self.index
        self.index += 1
        self.group_size = min(self.k, self.batches - i // self.k * self.k)
        return i % self.k == 0, (i + 1) % self.k == 0 or i + 1 == self.batches

    def prepare(self, batch: Any) -> Any:
        """This rank's batch with a mask for every task, and its labelled counts per task."""
        if not self.ctx.enabled and self.k == 1:
            return batch
        if self.ctx.enabled:
            batch = with_full_masks(batch, self.names)
        self.rows = _rows(batch.inputs)
        self.counts = labelled_counts(batch, self.names, self.device)
        return batch

    def keep(self, batch: Any, vec: Tensor) -> None:
        """Remember an earlier micro-batch of this step (for the logged loss and FAMO's post-step)."""
        self.group.append((batch, vec, self.counts))

    def accumulate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"counts": self.counts}
        if self.ctx.enabled:
            kwargs["parameters"] = self.params
        scale = self.precision.loss_scale()
        if scale is not None:
            kwargs["loss_scale"] = scale
        return kwargs

    def no_sync(self) -> Any:
        """DDP's ``no_sync()``: the balancer reduces the gradients itself (once per step)."""
        fn = getattr(self.step_model, "no_sync", None)
        return fn() if self.ctx.enabled and callable(fn) else nullcontext()

    def balancer_kwargs(self, batch: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.ctx.enabled:
            kwargs.update(process_group=self.ctx.group, counts=self.counts, parameters=self.params)
            if self.fsdp:
                kwargs["reduce_gradients"] = False
        elif self.k > 1:
            kwargs["counts"] = self.counts
        scale = self.precision.loss_scale()
        if scale is not None:
            kwargs["loss_scale"] = scale
        return kwargs

    def post_step_losses(self, batch: Any, losses_of: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The losses of the step's batch after the optimizer step (FAMO), and ``post_step``'s
        keyword arguments: with micro-batches, each is evaluated again and their masked means are
        combined into the whole batch's (labelled counts passed along)."""
        batches = [b for b, _, _ in self.group] + [batch]
        counts = [c for _, _, c in self.group] + [self.counts]
        with torch.no_grad(), self.precision.autocast():
            each = [losses_of(self.model(b.inputs), b.targets, b.mask) for b in batches]
        if self.fsdp:  # a forward without backward leaves FSDP2's root unsharded: reshard it
            self.model.reshard()
        kwargs: dict[str, Any] = {"process_group": self.ctx.group} if self.ctx.enabled else {}
        if len(each) == 1:
            if self.counts is not None:
                kwargs["counts"] = self.counts
            return each[0], kwargs
        total = torch.stack(counts).sum(0)
        combined = {name: sum(e[name] * c[i] for e, c in zip(each, counts)) / total[i].clamp_min(1)
                    for i, name in enumerate(self.names)}
        kwargs["counts"] = total
        return combined, kwargs

    def aux_backward(self, aux: Tensor) -> None:
        """A model's auxiliary loss (a mean over the batch's rows): its global-batch gradient is the
        row-weighted sum of the ranks' gradients, reduced here in one all-reduce."""
        scale = self.precision.loss_scale()
        if scale is not None:
            aux = aux * scale
        if self.k > 1:  # micro-batches of one step: their mean (exact for equal micro-batches)
            aux = aux / self.group_size
        if not self.ctx.enabled:
            aux.backward(retain_graph=True)
            return
        if self.fsdp:
            raise ConfigError(f"train.strategy: fsdp does not support the auxiliary loss of "
                              f"{type(self.model).__name__} (its gradient is taken with autograd.grad); use strategy: ddp")
        grads = torch.autograd.grad(aux * self.rows, self.params, retain_graph=True, allow_unused=True)
        flat = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        rows = torch.full((1,), float(self.rows), device=self.device)
        from polytask.balance.dist import all_reduce_sum as reduce_flat

        *summed, total = reduce_flat([*flat, rows], self.ctx.group)
        for p, g in zip(self.params, summed):
            g = g / total.clamp_min(1)
            p.grad = g if p.grad is None else p.grad + g

    def optimizer_step(self, grad_clip: float | None) -> None:
        from polytask.train.rowwise import clip_grad_norm  # torch's clip_grad_norm_, sparse tables included

        scaler = self.precision.scaler
        if scaler is not None:
            if grad_clip is not None:
                scaler.unscale_(self.optimizer)
                clip_grad_norm(self.model.parameters(), grad_clip)
            scaler.step(self.optimizer)
            scaler.update()
            return
        if grad_clip is not None:
            clip_grad_norm(self.model.parameters(), grad_clip)
        self.optimizer.step()

    def logged_losses(self, vec: Tensor) -> Tensor:
        """The step's task losses for the log: with micro-batches, their masked means combined; under
        a process group, this rank's share is kept for the epoch-end reduction."""
        if not self.ctx.enabled and self.k == 1:
            return vec
        parts = [(v, c) for _, v, c in self.group] + [(vec, self.counts)]
        self.group = []
        num = sum(torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) * c for v, c in parts)
        den = sum(c for _, c in parts)
        if self.ctx.enabled:
            self._num.append(num)
            self._den.append(den)
            return vec
        return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))

    def end_epoch(self, loss_sum: Tensor, weight_sum: Tensor, first_bad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The epoch's logged values over all ranks: the sum over steps of each global-batch task
        loss, and the first step at which any rank saw a non-finite loss (one all-reduce each)."""
        if not self.ctx.enabled or not self._num:
            return loss_sum, weight_sum, first_bad
        from polytask.balance.dist import all_reduce_sum as reduce_flat

        num, den = reduce_flat([torch.stack(self._num), torch.stack(self._den)], self.ctx.group)
        per_step = torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))
        never = torch.iinfo(first_bad.dtype).max
        bad = torch.where(first_bad < 0, torch.full_like(first_bad, never), first_bad)
        all_reduce_min(bad, self.ctx)
        first_bad = torch.where(bad == never, torch.full_like(bad, -1), bad)
        self._num, self._den = [], []
        return per_step.sum(0).to(loss_sum.dtype), weight_sum, first_bad


def sharded_evaluate(model: nn.Module, dataset: Any, tasks: Sequence[Any], batch_size: int, ctx: DistContext,
                     precision: Precision | None = None) -> dict[str, dict[str, float]]:
    """Every metric of every task over the whole split, from :func:`sharded_predict`'s gathered
    outputs: the numbers one process computes (AUC, log-loss, MAE, ... are not averaged)."""
    outputs = sharded_predict(model, dataset, batch_size, ctx, precision.autocast if precision else None)
    return {t.name: t.evaluate(outputs[t.name], dataset.targets[t.name], dataset.masks.get(t.name)) for t in tasks}


def read_checkpoint(loader: Any, ckpt_dir: Any, ctx: DistContext, device: torch.device) -> tuple[int, Any]:
    """``loader(ckpt_dir)`` on rank 0, its result (or its user error) broadcast to every rank: only
    rank 0 needs to see the run directory, and every rank fails alike."""
    if not ctx.enabled:
        return loader(ckpt_dir)
    got: Any = None
    if ctx.is_main:
        try:
            got = ("ok", loader(ckpt_dir))
        except PolytaskError as exc:
            got = ("error", type(exc).__name__, str(exc))
    got = broadcast_object(got, ctx, device)
    if got[0] == "error":
        raise error_from_name(got[1], got[2])
    return got[1]


def on_main(fn: Any, ctx: DistContext, device: torch.device) -> Any:
    """``fn()`` on rank 0 alone, its result (or its user error) broadcast to every rank (table data:
    the vocabularies are built once)."""
    return read_checkpoint(lambda _: fn(), None, ctx, device)


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled; for evaluation outputs, once per epoch)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    collective(dist.all_gather_object, out, obj, group=ctx.group)
    return out


# ---------------------------------------------------------------------------- launch
def report_error(exc: PolytaskError) -> bool:
    """In a worker, hand a user error to the launcher; returns True when this process should
    also print it (one process prints: rank 0, or a rank that saw a peer stop)."""
    if env_world_size() <= 1:
        return True
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        try:
            raise exc
        except PolytaskError:
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(exc)
    if os.environ.get(LAUNCHED_ENV):
        return False  # polytask's launcher prints the root cause once
    return env_rank() == 0 or isinstance(exc, PeerFailure)


def as_peer_failure(exc: BaseException) -> PeerFailure | None:
    """A collective's error caused by another rank stopping (gloo: connection closed or reset;
    nccl: a communicator error; a timeout), as one line; None for anything else."""
    dist_errors = tuple(getattr(dist, n) for n in ("DistBackendError", "DistNetworkError", "DistError") if hasattr(dist, n))
    text = str(exc)
    peer = isinstance(exc, dist_errors) or (isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo/transport",
                            "NCCL communicator", "Timed out waiting", "timed out", "Broken pipe")))
    if not peer:
        return None
    first = " ".join(text.split())[:160]
    return PeerFailure(f"another rank stopped while this one waited for it ({first}); this rank stops too")


def _user_error_names() -> set[str]:
    names, todo = set(), [PolytaskError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def launch(args: Sequence[str], nproc: int, run_dir: Any = None) -> None:
    """Run ``python -m polytask ARGS`` in ``nproc`` processes on this machine through torchrun's
    elastic launcher (c10d rendezvous on 127.0.0.1, no restarts) and wait for them.

    A worker's user error comes back through torchelastic's error file and is raised here as the
    same one line; a worker that dies (signal, crash) stops the others (torchelastic does that)
    and becomes a :class:`TrainingError` naming its rank. The last checkpoint, written by rank 0
    atomically, is intact either way.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ConfigError(f"--nproc: expected a positive number of processes, got {nproc}")
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):  # the launcher prints one line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHED_ENV] = "1"
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: do not oversubscribe the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"polytask-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.2, local_addr="127.0.0.1")
    try:
        elastic_launch(config, sys.executable)("-m", "polytask", *args)
    except ChildFailedError as exc:
        user = _user_error_names()
        failures = sorted(exc.failures.items())
        kinds = {rank: _message(failure).partition(": ") for rank, failure in failures}
        for rank, (kind, _, message) in kinds.items():  # a user error (the root cause, not a peer's echo)
            if kind in user and kind != "PeerFailure" and message:
                raise error_from_name(kind, message) from None
        dead = [(r, f) for r, f in failures if kinds[r][0] != "PeerFailure"]
        # the root cause: not a rank torchelastic itself stopped (SIGTERM) once another had failed
        rank, failure = (min(dead, key=lambda rf: (rf[1].exitcode == -15, rf[1].timestamp, rf[0])) if dead
                         else exc.get_first_failure())
        if not dead:
            raise PeerFailure(kinds[rank][2]) from None
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        text = _message(failure)
        detail = text.splitlines()[0] if text and "pytorch.org" not in text and "Signal" not in text else ""
        ckpt = None if run_dir is None else os.path.join(str(run_dir), "checkpoints")
        kept = ("no checkpoint was written yet" if ckpt is not None and not os.path.exists(os.path.join(ckpt, "latest.json"))
                else f"the last checkpoint{' in ' + ckpt if ckpt else ''} is kept (--resume continues from it)")
        raise TrainingError(f"rank {rank} {how}{': ' + detail[:200] if detail else ''}; the other ranks were "
                            f"stopped; {kept}") from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)


def _message(failure: Any) -> str:
    """A torchelastic ProcessFailure's message as text (the error file's may be nested)."""
    message = failure.message
    while isinstance(message, dict):
        message = message.get("message", "")
    return str(message or "")


__all__ = [
    "DistContext", "PeerFailure", "Precision", "StepContext", "all_reduce_min", "all_reduce_sum", "as_peer_failure",
    "broadcast_object", "check_accumulate", "check_balancer", "check_config", "check_same_config", "collective",
    "full_state_dict", "is_sharded", "labelled_counts", "launch", "load_full_state", "read_checkpoint", "report_error",
    "setup", "shard_bounds",
    "sharded_evaluate", "sharded_predict", "with_full_masks", "wrap_model",
]
