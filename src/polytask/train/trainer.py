"""The Trainer: one multi-task training run from a :class:`RunConfig`.

Each epoch trains on the train split with the configured balancer, then evaluates every task on
the whole validation and test splits. The best epoch is chosen on validation only (mean over
tasks of the validation loss relative to the untrained model's, so tasks of different scales
count alike); the test split is reported, never used to choose. Every epoch ends with an atomic
checkpoint, so a killed run resumes where it stopped and repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polytask import balance as balance_lib
from polytask import data as data_lib
from polytask import nn as nn_lib
from polytask.data.dataset import MultiTaskDataset, Splits
from polytask.errors import CheckpointError, ConfigError, DataError, TrainingError
from polytask.tasks import Task
from polytask.train import dist as dist_lib
from polytask.train import backbone as _backbone  # noqa: F401  (registers model.arch 'adapters')
from polytask.train import rundir
from polytask.train.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint, save_model_file
from polytask.train.checkpoint import describe_mismatch, kept_checkpoint
from polytask.train.config import RunConfig, dump_config

Metrics = dict[str, dict[str, float]]  # task -> metric -> value


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return device


@torch.no_grad()
def predict(model: nn.Module, dataset: MultiTaskDataset, batch_size: int) -> dict[str, Tensor]:
    """Model outputs over a whole split, concatenated per task."""
    was_training = model.training
    model.eval()
    chunks: dict[str, list[Tensor]] = {}
    for batch in dataset.batches(batch_size):
        for name, out in model(batch.inputs).items():
            chunks.setdefault(name, []).append(out.float())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in chunks.items()}


def evaluate(model: nn.Module, dataset: MultiTaskDataset, tasks: Sequence[Task], batch_size: int = 4096) -> Metrics:
    """Every metric of every task over the whole split (never averaged over batches)."""
    outputs = predict(model, dataset, batch_size)
    return {t.name: t.evaluate(outputs[t.name], dataset.targets[t.name], dataset.masks.get(t.name)) for t in tasks}


@dataclass
class EpochRecord:
    epoch: int
    score: float
    train: dict[str, dict[str, float]]
    val: Metrics
    test: Metrics


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns: the best epoch (on validation) and its metrics."""

    run_dir: Path
    best_epoch: int
    val: Metrics
    test: Metrics
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False


class Trainer:
    """Trains one model from a :class:`RunConfig`.

    ``splits`` and ``model`` may be passed in (e.g. from Python); by default they are built from
    the config. A callback is either a function ``cb(trainer, step)`` called after each optimizer
    step, or an object with any of ``on_step(trainer, step)``, ``on_epoch_end(trainer, record)``
    and ``on_fit_end(trainer, result)``. During ``on_step`` the step's batch is
    ``trainer.last_batch``. The step number is a Python int: nothing is synchronised for callbacks.
    """

    def __init__(self, config: RunConfig, splits: Splits | None = None, model: nn.Module | None = None,
                 callbacks: Sequence[Callable[[Trainer, int], None]] = (), progress: bool | None = None) -> None:
        self.config = config
        # more than one process (torchrun, or `polytask train --nproc N`): join the group, check the
        # config fits the world size and is the same on every rank (train/dist.py)
        self.dist, self.device = dist_lib.setup(resolve_device(config.device))
        dist_lib.check_config(config, self.dist.world_size, self.device)
        dist_lib.check_same_config(self.dist, dump_config(config), self.device)
        torch.manual_seed(config.seed)
        streaming = splits is None and config.data.name == "table"
        if streaming:  # Parquet/CSV read in record batches (train/tables.py); tasks chosen there
            from polytask.train.tables import table_splits

            splits = table_splits(config, self.dist, self.device)
        elif splits is None:
            splits = data_lib.load(config.data.name, **config.data.params)
        if config.data.tasks is not None and not streaming:
            unknown = [t for t in config.data.tasks if t not in {x.name for x in splits.tasks}]
            if unknown:
                raise ConfigError(f"data.tasks: unknown task(s) {', '.join(map(repr, unknown))}; "
                                  f"{splits.name} has {', '.join(t.name for t in splits.tasks)}")
            splits = splits.select_tasks(config.data.tasks)
        if not streaming:  # streamed rows are checked as they are read
            splits.validate()
            check_labelled_rows(splits)
        self.streaming = streaming
        self.splits = splits
        self.tasks = splits.tasks
        self.train_set = splits.train.to(self.device)
        self.val_set = splits.val.to(self.device)
        self.test_set = splits.test.to(self.device)
        self.model = (model if model is not None else
                      nn_lib.build_model(config.model.arch, splits.input_spec, self.tasks, **config.model.params))
        self.model.to(self.device)
        missing = [t.name for t in self.tasks if t.name not in getattr(self.model, "task_names", [t.name])]
        if missing:
            raise ConfigError(f"model has no head for task(s) {', '.join(map(repr, missing))}")
        self.balancer = balance_lib.get(config.balancer.name, **config.balancer.params).to(self.device)
        self._sparse: list[nn.Parameter] = []  # table data: embeddings with sparse gradients (train/tables.py)
        self._touched = None  # with a parameter-level gradient balancer: the rows each batch touches
        if streaming and splits.sparse:
            from polytask.train.tables import touched_rows, use_sparse_embeddings

            self._sparse = use_sparse_embeddings(self.model, splits.sparse, config, self.balancer,
                                                 self.dist.world_size)
            self._touched = touched_rows(self.model, splits.sparse, self.balancer)
        # gradient balancers get every task's feature gradient from one backward when the model
        # exposes per-task copies of its shared features (see nn.base.MultiTaskModel)
        from polytask.balance.engine import GradientBalancer

        self._pass_task_features = isinstance(self.balancer, GradientBalancer) and hasattr(
            self.model, "expose_task_features")
        if self._pass_task_features:
            self.model.expose_task_features()
        # the module the step runs: DDP (forward and balanced backward under no_sync: the balancer
        # reduces the gradients itself) or the model sharded in place by FSDP2; self.model stays the
        # plain module (FSDP: the same object) for evaluation and state
        dist_lib.check_balancer(config, self.balancer, self.dist)
        if getattr(self.balancer, "needs_heldout", False):  # before anything is written (CLI: exit 2)
            split = self._heldout_split()
            source = getattr(self, f"{split}_set")
            rows = len(source) if isinstance(source, MultiTaskDataset) else 0
            if self.dist.world_size > 1 or rows == 0:
                raise ConfigError(f"balancer.name: {config.balancer.name!r} needs held-out batches from an in-memory "
                                  f"{split} split in one process, got {rows} in-memory {split} rows and "
                                  f"{self.dist.world_size} process(es)")
        if streaming and self.dist.is_main:  # after every refusal: a refused config prints one line
            from polytask.train.tables import embedding_report

            print(embedding_report(self.model), file=sys.stderr)
        self._step_model = dist_lib.wrap_model(self.model, self.dist, config.train.strategy, self.device)
        self.precision = dist_lib.Precision(config.train.precision, self.device)
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.callbacks = list(callbacks)
        self._step_hooks = [getattr(cb, "on_step", cb) for cb in self.callbacks
                            if callable(getattr(cb, "on_step", cb))]
        self.last_batch: Any = None
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.run_dir = config.run_dir
        self.step = 0
        self.epoch = 0
        self.best_epoch = -1
        self.best_score = math.inf
        self.bad_epochs = 0
        self.reference_losses: dict[str, float] | None = None

    # ------------------------------------------------------------------ build
    def _trainable(self) -> list[dict[str, Any]]:
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        # balancers with learnable weights (e.g. UW's log-variances) train with the model's optimizer
        extra = [p for p in self.balancer.parameters() if p.requires_grad]
        if extra and not getattr(self.balancer, "optimizes_itself", False):
            groups.append({"params": extra, "weight_decay": 0.0})
        return groups

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        if self._sparse:  # a row-wise optimiser for the sparse embedding tables, o for the rest
            from polytask.train.tables import SparseDenseOptimizer

            return SparseDenseOptimizer(self._trainable(), self._sparse, o, getattr(self.splits, "sparse_rules", None))
        if o.name == "sgd":
            return torch.optim.SGD(self._trainable(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return cls(self._trainable(), lr=o.lr, weight_decay=o.weight_decay)

    def _build_scheduler(self) -> Any:
        s, opt = self.config.scheduler, self.optimizer
        if s.name == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.config.train.epochs, eta_min=s.min_lr)
        if s.name == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
        if s.name == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=s.factor, patience=s.patience,
                                                              min_lr=s.min_lr)
        return None

    # ------------------------------------------------------------------ steps
    def _heldout_split(self) -> str:
        """Where a ``needs_heldout`` balancer's batches come from: its ``heldout_split`` ("train" or "val")."""
        return getattr(self.balancer, "heldout_split", "val")

    def _heldout(self, batch: Any) -> Any:
        """What a balancer with ``needs_heldout`` (Auto-Lambda) reads besides the step's losses
        (:class:`polytask.balance.recent.HeldOut`): the next batch of its ``heldout_split`` (the train split:
        a second pass in its own shuffled order, as the Auto-Lambda authors do; or the validation split),
        reshuffled pass after pass from its own generator; this batch's losses again; the optimizer's lr."""
        from polytask.balance.recent import HeldOut

        def heldout_losses() -> dict[str, Tensor]:
            held = self._next_heldout_batch()
            with self.precision.autocast():
                return self._losses(self._step_model(held.inputs), held.targets, held.mask)

        def train_losses() -> dict[str, Tensor]:
            with self.precision.autocast():
                return self._losses(self._step_model(batch.inputs), batch.targets, batch.mask)

        params = [p for p in self.model.parameters() if p.requires_grad]
        group = self.optimizer.param_groups[0]
        momentum = group.get("momentum", 0.0)  # SGD's term of the virtual step: buffer x coefficient (Adam: none)
        buffers = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in params] if momentum else []
        terms = [None if buf is None else buf * momentum for buf in buffers] or None
        return HeldOut(params, train_losses, heldout_losses, float(group["lr"]), float(group.get("weight_decay", 0.0)),
                       terms)

    def _next_heldout_batch(self) -> Any:
        """The next held-out batch; a new shuffled pass when one ends. Its position (the generator's
        state at the pass's start, batches drawn since) goes in the checkpoint: a resumed run draws the
        batches the uninterrupted one does."""
        if getattr(self, "_heldout_batches", None) is None:
            self._heldout_at = [torch.Generator().manual_seed(self.config.seed + 1).get_state(), 0]
            self._heldout_batches = self._heldout_pass(*self._heldout_at)
        held = next(self._heldout_batches, None)
        if held is None:  # a new pass over the held-out split
            self._heldout_at = [self._heldout_generator.get_state(), 0]
            self._heldout_batches = self._heldout_pass(*self._heldout_at)
            held = next(self._heldout_batches)
        self._heldout_at[1] += 1
        return held

    def _heldout_pass(self, state: Tensor, drawn: int) -> Any:
        """The held-out pass shuffled from generator ``state``, its first ``drawn`` batches skipped."""
        self._heldout_generator = torch.Generator()
        self._heldout_generator.set_state(state)
        source = getattr(self, f"{self._heldout_split()}_set")
        batches = source.batches(self.config.train.batch_size, shuffle=True, generator=self._heldout_generator)
        for _ in range(drawn):
            next(batches, None)
        return batches

    def _losses(self, outputs: dict[str, Tensor], targets: dict[str, Tensor],
                mask: dict[str, Tensor] | None) -> dict[str, Tensor]:
        return {t.name: t.loss(outputs[t.name], targets[t.name], None if mask is None else mask.get(t.name))
                for t in self.tasks}

    def _train_epoch(self) -> dict[str, dict[str, float]]:
        """One pass over the train split. Host syncs happen once, at the end of the epoch."""
        cfg = self.config.train
        self.model.train()
        dev = self.device
        loss_sum = torch.zeros(len(self.tasks), device=dev)
        weight_sum = torch.zeros(len(self.tasks), device=dev)
        first_bad = torch.full((len(self.tasks),), -1, dtype=torch.long, device=dev)
        batches = 0
        shared = list(shared_parameters_of(self.model))
        if self._sparse:  # sparse tables: the touched rows, or no table (train/tables.py)
            from polytask.train.tables import shared_for_balancer

            shared = shared_for_balancer(shared, self._sparse, self._touched, self.balancer)
        step = dist_lib.StepContext(self, cfg)
        if self.streaming:
            self.train_set.set_epoch(self.epoch)  # the shuffle is seeded by (seed, epoch): resumable
        for batch in self.train_set.batches(cfg.batch_size, shuffle=True, generator=self.generator,
                                            shard=step.shard):
            first, last = step.begin()  # train.accumulate: this batch's place in the optimizer step
            if first:
                self.optimizer.zero_grad(set_to_none=True)
            batch = step.prepare(batch)
            with step.no_sync(), self.precision.autocast():
                outputs = self._step_model(batch.inputs)
                losses = self._losses(outputs, batch.targets, batch.mask)
            vec = torch.stack([v.detach() for v in losses.values()])
            # remember the first step at which each task's loss stopped being finite (no sync)
            bad_now = ~torch.isfinite(vec) & (first_bad < 0)
            first_bad = torch.where(bad_now, torch.full_like(first_bad, self.step), first_bad)
            aux = getattr(self.model, "aux_loss", None)
            if isinstance(aux, Tensor) and aux.requires_grad:
                step.aux_backward(aux)
            extra = {"task_features": self.model.task_features} if self._pass_task_features else {}
            if getattr(self.balancer, "needs_heldout", False):  # Auto-Lambda: a held-out batch per step
                self.balancer.heldout = self._heldout(batch)
            with step.no_sync():
                if not last:  # an earlier micro-batch: the balancer keeps its per-task quantities
                    self.balancer.accumulate(losses, shared=shared, features=getattr(self.model, "shared_features", None),
                                             **extra, **step.accumulate_kwargs())
                    step.keep(batch, vec)
                    continue
                weights = self.balancer.backward(losses, shared=shared,
                                                 features=getattr(self.model, "shared_features", None), **extra,
                                                 **step.balancer_kwargs(batch))
            if self._touched is not None:
                self._touched.flush()
            step.optimizer_step(cfg.grad_clip)
            if self.balancer.needs_post_step_losses:  # the step's batch (all its micro-batches) again
                after, kwargs = step.post_step_losses(batch, self._losses)
                self.balancer.post_step(after, **kwargs)
            vec = step.logged_losses(vec)
            loss_sum += vec
            weight_sum += weights.to(dev, torch.float32)
            batches += 1
            self.step += 1
            self.last_batch = batch
            for cb in self._step_hooks:
                cb(self, self.step)
        self.balancer.end_epoch()  # per-epoch methods (DWA) close their epoch's record here
        loss_sum, weight_sum, first_bad = step.end_epoch(loss_sum, weight_sum, first_bad)
        bad = [(step, task.name) for task, step in zip(self.tasks, first_bad.tolist()) if step >= 0]
        if bad:
            step, name = min(bad)  # the task that went first; the others follow through shared weights
            raise TrainingError(f"loss of task {name!r} became NaN or infinite at step {step} "
                                f"(epoch {self.epoch}); {kept_checkpoint(self.run_dir / 'checkpoints')}")
        mean_loss = (loss_sum / max(batches, 1)).tolist()
        mean_weight = (weight_sum / max(batches, 1)).tolist()
        return {t.name: {"loss": l, "weight": w} for t, l, w in zip(self.tasks, mean_loss, mean_weight)}

    def _evaluate(self) -> tuple[Metrics, Metrics]:
        bs = self.config.train.eval_batch_size
        if self.streaming:
            from polytask.train.tables import evaluate_stream

            autocast = self.precision.autocast if self.precision.enabled else None
            return tuple(evaluate_stream(self.model, split, self.tasks, bs, autocast)
                         for split in (self.val_set, self.test_set))
        if self.dist.enabled or self.precision.enabled:  # each rank one shard; metrics on the gathered outputs
            return tuple(dist_lib.sharded_evaluate(self.model, split, self.tasks, bs, self.dist, self.precision)
                         for split in (self.val_set, self.test_set))
        return evaluate(self.model, self.val_set, self.tasks, bs), evaluate(self.model, self.test_set, self.tasks, bs)

    def _score(self, val: Metrics) -> float:
        """Validation score for model selection: mean relative validation loss (lower is better)."""
        assert self.reference_losses is not None
        ratios = [val[t]["loss"] / max(self.reference_losses[t], 1e-12) for t in val
                  if not math.isnan(val[t]["loss"])]
        return sum(ratios) / len(ratios) if ratios else math.inf

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "model": dist_lib.full_state_dict(self.model),  # FSDP: gathered whole (every rank calls it)
            "optimizer": dist_lib.full_state_dict(self.optimizer),
            "balancer": self.balancer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "trainer": {
                "epoch": self.epoch, "step": self.step, "best_epoch": self.best_epoch,
                "best_score": self.best_score, "bad_epochs": self.bad_epochs,
                "reference_losses": self.reference_losses,
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "grad_scaler": self.precision.state_dict(),  # fp16: the loss scale and its growth tracker
                "heldout": getattr(self, "_heldout_at", None),  # Auto-Lambda's held-out position
            },
        }

    def load_state(self, parts: dict[str, Any]) -> None:
        """Restore everything :meth:`state` saved; CheckpointError if it does not fit this run."""
        problem = describe_mismatch(self.model.state_dict(), parts.get("model") or {})
        if problem:  # names the tensors (torch's message is several lines)
            raise CheckpointError(f"checkpoint in {self.run_dir / 'checkpoints'} does not fit this run: {problem}")
        try:
            dist_lib.load_full_state(self.model, self.optimizer, parts["model"], parts["optimizer"])
            self.balancer.load_state_dict(parts["balancer"])
            if self.scheduler is not None and parts.get("scheduler") is not None:
                self.scheduler.load_state_dict(parts["scheduler"])
            t = parts["trainer"]
        except (KeyError, RuntimeError, ValueError) as exc:
            msg = " ".join(str(exc).split())[:300] if str(exc) else type(exc).__name__
            raise CheckpointError(f"checkpoint in {self.run_dir / 'checkpoints'} does not fit this run: {msg}") from None
        self.epoch, self.step = int(t["epoch"]), int(t["step"])
        self.best_epoch, self.best_score = int(t["best_epoch"]), float(t["best_score"])
        self.bad_epochs, self.reference_losses = int(t["bad_epochs"]), t["reference_losses"]
        self.generator.set_state(t["generator"])
        torch.set_rng_state(t["torch_rng"])
        if t["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(t["cuda_rng"])
        self.precision.load_state_dict(t.get("grad_scaler"))
        if t.get("heldout") is not None:  # the held-out pass resumes where the checkpoint was taken
            self._heldout_at = [t["heldout"][0], int(t["heldout"][1])]
            self._heldout_batches = self._heldout_pass(*self._heldout_at)

    # ------------------------------------------------------------------ run
    def fit(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train for ``config.train.epochs`` epochs (or until early stopping); ``resume`` continues
        from the run directory's latest checkpoint (the config may change only in safe keys),
        ``overwrite`` starts over in a directory that holds a run (kept until the new run has its
        first checkpoint). The run directory is locked meanwhile (see :mod:`polytask.train.rundir`)."""
        with rundir.claim_run_dir(self.run_dir, self.config, rundir.mode_of(resume, overwrite),
                                  primary=rundir.is_primary()):
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainResult:
        run_dir = self.run_dir
        ckpt_dir = run_dir / "checkpoints"
        metrics_path = run_dir / "metrics.jsonl"
        main = self.dist.is_main  # rank 0 alone writes the run directory
        if resume:
            epoch, parts = dist_lib.read_checkpoint(load_checkpoint, ckpt_dir, self.dist, self.device)
            self.load_state(parts)
            if main:
                _truncate_metrics(metrics_path, epoch)
        else:
            if main:
                run_dir.mkdir(parents=True, exist_ok=True)
                if ckpt_dir.exists():
                    shutil.rmtree(ckpt_dir)
                metrics_path.write_text("")
            torch.manual_seed(self.config.seed)  # dropout & co. draw from the global RNG: restart it
        if main:
            atomic_write_text(run_dir / "config.yaml", dump_config(self.config))
            if self.streaming:
                self.splits.save(run_dir)  # the vocabularies, for resume and `polytask predict`
        history = dist_lib.broadcast_object(_read_history(metrics_path) if main else None, self.dist, self.device)
        if self.reference_losses is None:  # epoch 0: the untrained model, the reference for selection
            val, test = self._evaluate()
            self.reference_losses = {t: m["loss"] for t, m in val.items()}
            record = EpochRecord(0, self._score(val), {}, val, test)
            if main:
                _append_metrics(metrics_path, record)
            history.append(record)
        stopped = False
        epochs = range(self.epoch + 1, self.config.train.epochs + 1)
        bar = _progress(epochs, self.progress, desc=self.config.name)
        for epoch in bar:
            self.epoch = epoch
            train = self._train_epoch()
            val, test = self._evaluate()
            score = self._score(val)
            record = EpochRecord(epoch, score, train, val, test)
            if main:
                _append_metrics(metrics_path, record)
            history.append(record)
            self._notify("on_epoch_end", record)
            if score < self.best_score:
                self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
                self._save_best(record)
            else:
                self.bad_epochs += 1
            if self.scheduler is not None:
                if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.scheduler.step(score)
                else:
                    self.scheduler.step()
            state = self.state()  # every rank: FSDP gathers the full tensors collectively
            if main:
                save_checkpoint(ckpt_dir, epoch, state)
                rundir.checkpoint_written(run_dir)  # an overwritten previous run can go now
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(score=f"{score:.4f}", best=self.best_epoch)
            patience = self.config.train.early_stopping
            if patience is not None and self.bad_epochs >= patience:
                stopped = True
                break
        if hasattr(bar, "close"):
            bar.close()
        best = next(r for r in history if r.epoch == self.best_epoch) if self.best_epoch >= 0 else history[-1]
        result = TrainResult(run_dir, best.epoch, best.val, best.test, history, stopped)
        from polytask.report.summary import write_summary

        if main:
            write_summary(result, self.tasks, self.config)
        self._notify("on_fit_end", result)
        return result

    def _notify(self, hook: str, arg: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, arg)

    def _save_best(self, record: EpochRecord) -> None:
        weights = dist_lib.full_state_dict(self.model)  # every rank (FSDP gathers); rank 0 writes
        if not self.dist.is_main:
            return
        best_dir = self.run_dir / "best"
        best_dir.mkdir(parents=True, exist_ok=True)
        save_model_file(weights, best_dir / "model.safetensors")
        atomic_write_text(best_dir / "metrics.json", json.dumps(
            {"epoch": record.epoch, "score": record.score, "val": record.val, "test": record.test}, indent=1))


def shared_parameters_of(model: nn.Module):
    """The model's shared parameters (all parameters if it does not say)."""
    fn = getattr(model, "shared_parameters", None)
    return fn() if callable(fn) else model.parameters()


def _progress(it: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="epoch", leave=False)


def _append_metrics(path: Path, record: EpochRecord) -> None:
    """One JSON line per (epoch, split, task), the epoch's lines appended in one write."""
    rows = []
    for split, metrics in (("train", record.train), ("val", record.val), ("test", record.test)):
        for task, values in metrics.items():
            rows.append({"epoch": record.epoch, "split": split, "task": task, **_clean(values)})
    rows.append({"epoch": record.epoch, "split": "val", "task": "*", "score": _clean1(record.score)})
    rundir.append_jsonl(path, rows)


def _clean1(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))) else v


def _clean(values: dict[str, float]) -> dict[str, float | None]:
    return {k: _clean1(v) for k, v in values.items()}


def _read_history(path: Path) -> list[EpochRecord]:
    """Rebuild epoch records from metrics.jsonl (after a resume; a torn last line is absent)."""
    by_epoch: dict[int, EpochRecord] = {}
    for row in rundir.read_jsonl(path):
        rec = by_epoch.setdefault(row["epoch"], EpochRecord(row["epoch"], math.inf, {}, {}, {}))
        values = {k: (math.nan if v is None else v) for k, v in row.items() if k not in ("epoch", "split", "task")}
        if row["task"] == "*":
            rec.score = values["score"]
        else:
            getattr(rec, row["split"])[row["task"]] = values
    return [by_epoch[e] for e in sorted(by_epoch)]


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop lines of epochs after the checkpoint (written by a run killed before checkpointing)."""
    if not path.exists():
        return
    keep = [row for row in rundir.read_jsonl(path) if row["epoch"] <= last_epoch]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


def check_labelled_rows(splits: Splits) -> None:
    """DataError naming every (task, split) without a labelled row: such a task cannot be trained
    (train), selected on (val) or reported (test)."""
    empty = []
    for split in ("train", "val", "test"):
        data = getattr(splits, split)
        for task in splits.tasks:
            mask = data.masks.get(task.name)
            labelled = len(data) if mask is None else int(mask.sum())
            if labelled == 0:
                empty.append(f"task {task.name!r} in the {split} split")
    if empty:
        raise DataError(f"{splits.name}: no labelled rows for {', '.join(empty)}; drop the task (data.tasks) or "
                        "give it labels")
