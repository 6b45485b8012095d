"""QM9 multi-task benchmark: 11 regression targets, one MPNN, any balancer, the published protocol.

Protocol of Navon et al., "Multi-Task Learning as a Bargaining Game" (Nash-MTL, ICML 2022),
Sec. 6.2, reused by Liu et al., "FAMO: Fast Adaptive Multitask Optimization" (NeurIPS 2023):

- molecules shuffled with the seed: 10,000 test, 10,000 validation, the rest (~110k) train;
- targets z-scored with the training mean and std; per-target MSE losses; MAE in the original
  units (:data:`polytask.data.qm9.UNITS`) for evaluation;
- MPNN of Gilmer et al. (ICML 2017) (:class:`polytask.nn.mpnn.MPNN`); Adam lr 1e-3; batch 120;
  300 epochs; ``ReduceLROnPlateau`` on the validation Δm% (factor 0.7, patience 5, min lr 1e-5);
- reported: test MAE per target at the epoch of best validation Δm%, and its Δm% (Maninis et
  al., CVPR 2019) against single-task MAEs.

Protocols (:data:`PROTOCOLS`, ``protocol=`` / ``bench qm9 --protocol``): ``nash_mtl`` is the
schedule above; ``ntkmtl`` is the revised schedule that recent papers use (NTKMTL, NeurIPS 2025):
batch 60, plateau patience 10, and single-task baselines retrained with that same schedule as the
Δm% reference instead of the published STL row. Both z-score the targets with the training
split's mean and std (:func:`scale_targets`) and report MAE in the original units; FAMO's public
QM9 script dropped that scaling, which changes every loss's scale and so every balancer's input.

The default single-task reference is the published one (:data:`PUBLISHED_STL_MAE`);
:func:`run_stl` trains our own single-task baselines with the same budget instead. The
reduced budget (``train_size``, ``epochs``, ``val_size``, ``test_size``) is the same protocol on
fewer molecules and epochs, for CPUs. On a CPU each batch (the same molecules as the protocol's
shuffled batch) is built ordered by size for the MPNN's unpadded path, and evaluation runs in
batches of 1000 under inference mode: the reported numbers change only by float rounding.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from polytask.data.qm9 import TARGETS, UNITS, QM9Graphs, load_qm9, require_qm9_dependencies, split_indices
from polytask.errors import ConfigError, TrainingError
from polytask.tasks import Task, delta_m

#: Single-task MAEs of the published table (Navon et al., ICML 2022, Table 2, "STL" row); the
#: unrounded values are those of the authors' released code (``experiments/quantum_chemistry/
#: utils.py``), which Liu et al. (FAMO, NeurIPS 2023) also use. Units: :data:`UNITS`.
PUBLISHED_STL_MAE: dict[str, float] = {
    "mu": 0.0671,
    "alpha": 0.1814,
    "homo": 60.576,
    "lumo": 53.915,
    "r2": 0.5027,
    "zpve": 4.539,
    "U0": 58.838,
    "U": 64.244,
    "H": 63.852,
    "G": 66.223,
    "cv": 0.07212,
}

#: Published test Δm% (lower is better) on QM9, 300 epochs, mean of 3 seeds: Navon et al. (ICML
#: 2022, Table 2) for LS..Nash-MTL and Liu et al. (NeurIPS 2023, Table 3) for FAMO.
PUBLISHED_DELTA_M: dict[str, float] = {
    "ls": 177.6,
    "uw": 108.0,
    "mgda": 120.5,
    "pcgrad": 125.7,
    "cagrad": 112.8,
    "imtl_g": 77.2,
    "nash_mtl": 62.0,
    "famo": 58.5,
}

#: Display names of the published rows.
PUBLISHED_LABELS: dict[str, str] = {
    "ls": "LS", "uw": "UW", "mgda": "MGDA", "pcgrad": "PCGrad", "cagrad": "CAGrad",
    "imtl_g": "IMTL-G", "nash_mtl": "Nash-MTL", "famo": "FAMO",
}


@dataclass(frozen=True)
class Protocol:
    """A QM9 training schedule: batch size, ``ReduceLROnPlateau`` patience, and whether the Δm%
    reference must be single-task runs retrained with the same schedule."""

    batch_size: int
    lr_patience: int
    retrained_stl: bool
    source: str


#: The published QM9 schedules (both: Adam 1e-3, 300 epochs, plateau factor 0.7, min lr 1e-5,
#: z-scored targets). The NTKMTL row's patience is the plateau scheduler's, the only patience of
#: the Nash-MTL schedule it revises.
PROTOCOLS: dict[str, Protocol] = {
    "nash_mtl": Protocol(batch_size=120, lr_patience=5, retrained_stl=False,
                         source="Navon et al., ICML 2022, Sec. 6.2 (also FAMO, NeurIPS 2023)"),
    "ntkmtl": Protocol(batch_size=60, lr_patience=10, retrained_stl=True,
                       source="NTKMTL (NeurIPS 2025): revised schedule, single-task baselines retrained"),
}


def protocol(name: str) -> Protocol:
    """The schedule ``name`` of :data:`PROTOCOLS`; ConfigError naming the known ones otherwise."""
    if name not in PROTOCOLS:
        raise ConfigError(f"qm9: unknown protocol {name!r} (known: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]


def scale_targets(y: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y_z, mean, std)``: every column of ``y`` z-scored with the mean and (unbiased) std of the
    training rows ``train`` only, as both protocols do; predictions go back to the original units
    as ``y_z * std + mean`` (errors: ``|Δy_z| * std``)."""
    mean, std = y[train].mean(0), y[train].std(0)
    return ((y - mean) / std).float(), mean, std


# ----------------------------------------------------------------------------- results
@dataclass
class SeedResult:
    """One training run (one seed)."""

    seed: int
    best_epoch: int
    val_criterion: float
    test_mae: dict[str, float]
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_cpu_seconds: list[float] = field(default_factory=list)
    final_lr: float = float("nan")


@dataclass
class QM9Result:
    """All seeds of one method, with the reference used for Δm%."""

    method: str
    targets: tuple[str, ...]
    runs: list[SeedResult]
    reference: dict[str, float]
    reference_name: str
    settings: dict[str, Any] = field(default_factory=dict)

    def test_mae(self) -> dict[str, tuple[float, float]]:
        """Per target: (mean, std over seeds) of the test MAE."""
        out = {}
        for t in self.targets:
            vals = torch.tensor([r.test_mae[t] for r in self.runs], dtype=torch.float64)
            out[t] = (float(vals.mean()), float(vals.std()) if len(vals) > 1 else 0.0)
        return out

    def delta_m(self) -> tuple[float, float]:
        """(mean, std over seeds) of the test Δm% against :attr:`reference`."""
        vals = torch.tensor([_delta_m(r.test_mae, self.reference, self.targets) for r in self.runs],
                            dtype=torch.float64)
        return float(vals.mean()), float(vals.std()) if len(vals) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QM9Result:
        runs = [SeedResult(**r) for r in data["runs"]]
        return cls(method=data["method"], targets=tuple(data["targets"]), runs=runs,
                   reference=dict(data["reference"]), reference_name=data["reference_name"],
                   settings=dict(data.get("settings", {})))


def _delta_m(mae: Mapping[str, float], reference: Mapping[str, float], targets: Sequence[str]) -> float:
    return delta_m({t: {"mae": mae[t]} for t in targets}, {t: {"mae": reference[t]} for t in targets},
                   metrics={t: ["mae"] for t in targets})


# ----------------------------------------------------------------------------- checks
def check_targets(targets: Sequence[str] | None) -> tuple[str, ...]:
    """The requested targets in the canonical order; ConfigError naming an unknown one."""
    if targets is None:
        return TARGETS
    for t in targets:
        if t not in TARGETS:
            raise ConfigError(f"qm9: unknown target {t!r}; known: {', '.join(TARGETS)}")
    if not targets:
        raise ConfigError("qm9: no target selected")
    return tuple(t for t in TARGETS if t in set(targets))


def make_balancer(name: str, params: Mapping[str, Any] | None = None, seed: int | None = None):
    """The registered balancer ``name`` (ConfigError for an unknown one); a ``seed`` parameter,
    where the method has one, gets the run's seed unless given."""
    from polytask import balance

    params = dict(params or {})
    factory = balance.BALANCERS.lookup(name)
    try:
        accepts_seed = "seed" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts_seed = False
    if accepts_seed and "seed" not in params and seed is not None:
        params["seed"] = seed
    return balance.get(name, **params)


def params_accepted_by(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``params`` that the balancer ``name`` takes (for one setting across methods)."""
    from polytask import balance

    factory = balance.BALANCERS.lookup(name)
    try:
        sig = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(params)
    # only named parameters: a bare **kwargs (e.g. nn.Module pass-through) does not count
    named = {n for n, p in sig.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in params.items() if k in named}


def published_key(method: str) -> str | None:
    """The row of :data:`PUBLISHED_DELTA_M` that ``method`` (a balancer name or alias) is."""
    from polytask import balance

    try:
        cls = balance.BALANCERS.lookup(method)
    except ConfigError:
        return None
    for key in PUBLISHED_DELTA_M:
        for candidate in (key, key.replace("_", "")):
            if candidate in balance.BALANCERS and balance.BALANCERS.lookup(candidate) is cls:
                return key
    return None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None): CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"qm9: bad device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"qm9: device {device!r} requested but CUDA is not available")
    return dev


# ----------------------------------------------------------------------------- training
def evaluate_mae(model: torch.nn.Module, graphs: QM9Graphs, mols: torch.Tensor, y_z: torch.Tensor,
                 std: torch.Tensor, targets: Sequence[str], device: torch.device,
                 batch_size: int = 1000, by_size: bool = True) -> torch.Tensor:
    """Per-target MAE in original units over the molecules ``mols`` (a ``(T,)`` tensor on device).

    Runs under inference mode, which keeps no activations, so its batches can be larger than the
    training batch; ``by_size`` batches take the MPNN's unpadded path (same numbers to float
    rounding).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(len(targets), dtype=torch.float64, device=device)
    with torch.inference_mode():
        for batch in graphs.batches(mols, batch_size, y=y_z, by_size=by_size):
            batch = batch.to(device, non_blocking=True)
            out = model(batch)
            pred = torch.cat([out[t] for t in targets], dim=1)
            total += ((pred - batch.y).abs().double() * std).sum(0)
    model.train(was_training)
    return total / len(mols)


def train_once(
    graphs: QM9Graphs,
    balancer: str = "nash_mtl",
    *,
    seed: int = 0,
    targets: Sequence[str] | None = None,
    epochs: int = 300,
    train_size: int | None = None,
    val_size: int = 10_000,
    test_size: int = 10_000,
    batch_size: int = 120,
    lr: float = 1e-3,
    lr_patience: int = 5,
    device: str | torch.device | None = "auto",
    reference: Mapping[str, float] | None = None,
    balancer_params: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    checkpoint: Path | str | None = None,
) -> SeedResult:
    """Train one MPNN with ``balancer`` under the protocol (module doc) and return the test MAE
    at the best validation epoch.

    With a single target the selection and LR-schedule criterion is that target's validation
    MAE (the single-task protocol); otherwise the validation Δm% against ``reference``
    (default :data:`PUBLISHED_STL_MAE`).

    ``checkpoint``: a file written (whole, then renamed) after every epoch with everything the
    run needs to go on -- weights, Adam, LR schedule, balancer state, data order and RNG states,
    best-so-far -- and, at the end, the result. A run started again with the same file and the
    same settings continues where it stopped and gives the same result as an uninterrupted run;
    a finished one returns its result at once; other settings are a ConfigError naming the file.
    """
    from tqdm.auto import tqdm

    from polytask.nn.mpnn import MPNN

    names = check_targets(targets)
    reference = dict(reference or PUBLISHED_STL_MAE)
    if epochs < 1:
        raise ConfigError(f"qm9: epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"qm9: batch size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    bal = make_balancer(balancer, balancer_params, seed).to(dev)
    split = split_indices(len(graphs), seed, test=test_size, val=val_size, train=train_size)
    gen = torch.Generator().manual_seed(seed)

    cols = [TARGETS.index(t) for t in names]
    y_z, _, std = scale_targets(graphs.y[:, cols], split["train"])
    std_dev = std.to(dev)
    tasks = [Task(t, "regression") for t in names]

    cuda_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)  # the model's initial weights depend on the seed only
        model = MPNN(graphs.x.shape[1], tasks).to(dev)
    shared = list(model.shared_parameters())
    # unpadded size groups for the factorised convolution on a CPU; on a GPU the padded layout's
    # few large kernels are faster than one small kernel per size group (H100: 16.5 vs 39.7 ms
    # per training step of 120 molecules)
    by_size = model.conv_kind == "factorised" and dev.type == "cpu"
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.7, patience=lr_patience,
                                                           min_lr=1e-5)

    def criterion(val_mae: dict[str, float]) -> float:
        if len(names) == 1:
            return val_mae[names[0]]
        return _delta_m(val_mae, reference, names)

    best = SeedResult(seed=seed, best_epoch=-1, val_criterion=math.inf, test_mae={})
    best_state: dict[str, torch.Tensor] = {}
    epoch_seconds: list[float] = []
    epoch_cpu: list[float] = []  # CPU time of all threads: the machine is shared, wall time is not ours
    identity = dict(balancer=balancer, seed=seed, targets=list(names), epochs=epochs, train_size=train_size,
                    val_size=val_size, test_size=test_size, batch_size=batch_size, lr=lr, lr_patience=lr_patience,
                    balancer_params=dict(balancer_params or {}), reference=reference, num_molecules=len(graphs))
    first_epoch = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        saved = _load_checkpoint(Path(checkpoint), identity, dev)
        if saved.get("result") is not None:
            return SeedResult(**saved["result"])
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        bal.load_state_dict(saved["balancer"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        best, best_state = SeedResult(**saved["best"]), saved["best_state"]
        epoch_seconds, epoch_cpu, first_epoch = saved["epoch_seconds"], saved["epoch_cpu"], saved["epoch"] + 1

    def save(epoch: int, result: SeedResult | None = None) -> None:
        if checkpoint is not None:
            _save_checkpoint(Path(checkpoint), dict(
                identity=identity, epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), balancer=bal.state_dict(), generator=gen.get_state(),
                torch_rng=torch.get_rng_state(), best=asdict(best), best_state=best_state,
                epoch_seconds=epoch_seconds, epoch_cpu=epoch_cpu,
                result=asdict(result) if result is not None else None))

    bar = tqdm(range(first_epoch, epochs), desc=f"qm9 {balancer} seed {seed}", unit="epoch", initial=first_epoch,
               total=epochs,
               disable=not progress or None)
    for epoch in bar:
        start, cpu_start = time.perf_counter(), time.process_time()
        model.train()
        loss_sum = torch.zeros(len(names), device=dev)
        for batch in graphs.batches(split["train"], batch_size, shuffle=True, generator=gen, y=y_z, by_size=by_size):
            batch = batch.to(dev, non_blocking=True)
            out = model(batch)
            losses = {t.name: t.loss(out[t.name], batch.y[:, i]) for i, t in enumerate(tasks)}
            optimizer.zero_grad(set_to_none=True)
            bal.backward(losses, shared=shared, features=model.shared_features)
            optimizer.step()
            if bal.needs_post_step_losses:
                with torch.no_grad():
                    out = model(batch)
                    bal.post_step({t.name: t.loss(out[t.name], batch.y[:, i]) for i, t in enumerate(tasks)})
            loss_sum += torch.stack([v.detach() for v in losses.values()])
        if hasattr(bal, "end_epoch"):
            bal.end_epoch()
        bad = ~torch.isfinite(loss_sum)
        if bool(bad.any()):  # one sync per epoch
            raise TrainingError(f"qm9: the loss of target {names[int(bad.nonzero()[0])]!r} became "
                                f"NaN/inf in epoch {epoch} ({balancer}, seed {seed})")
        val = evaluate_mae(model, graphs, split["val"], y_z, std_dev, names, dev, by_size=by_size).tolist()
        val_mae = dict(zip(names, val))
        crit = criterion(val_mae)
        scheduler.step(crit)
        if crit <= best.val_criterion:
            best = SeedResult(seed=seed, best_epoch=epoch, val_criterion=crit, test_mae={})
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        epoch_seconds.append(time.perf_counter() - start)
        epoch_cpu.append(time.process_time() - cpu_start)
        bar.set_postfix(val=f"{crit:.2f}", best=f"{best.val_criterion:.2f}", lr=optimizer.param_groups[0]["lr"])
        if log is not None:
            log(f"epoch {epoch}: train loss {float(loss_sum.sum()):.4f}, val {crit:.3f}, "
                f"best epoch {best.best_epoch}, {epoch_seconds[-1]:.1f}s wall, {epoch_cpu[-1]:.1f}s CPU")
        save(epoch)
    best.final_lr = optimizer.param_groups[0]["lr"]
    if not best_state:
        raise TrainingError(f"qm9: no finite validation result in {epochs} epoch(s) ({balancer}, seed {seed})")
    # the test split is evaluated once, with the weights of the best validation epoch
    model.load_state_dict(best_state)
    test = evaluate_mae(model, graphs, split["test"], y_z, std_dev, names, dev, by_size=by_size).tolist()
    best.test_mae = dict(zip(names, test))
    best.epoch_seconds = epoch_seconds
    best.epoch_cpu_seconds = epoch_cpu
    save(epochs - 1, best)
    return best


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Through the one atomic writer (``train.checkpoint.atomic_write``): a kill mid-write leaves the
    previous epoch's checkpoint, a full disk is one line naming the file, no temporary file stays."""
    from polytask.train.checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp), kept="the previous epoch's checkpoint is kept")


def _load_checkpoint(path: Path, identity: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The checkpoint at ``path``; ConfigError if it is unreadable or from other settings."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        saved = state["identity"]
    except Exception as exc:  # noqa: BLE001  (any unreadable file: say which)
        raise ConfigError(f"qm9: checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
    diff = [k for k in identity if saved.get(k, _BEFORE_PROTOCOLS.get(k)) != identity[k]]
    if diff:
        what = ", ".join(f"{k} {saved.get(k)!r} vs {identity[k]!r}" for k in diff)
        raise ConfigError(f"qm9: checkpoint {path} is from other settings ({what}); delete it or use another --out")
    # RNG states are CPU byte tensors whatever the device
    for key in ("generator", "torch_rng"):
        state[key] = state[key].cpu()
    return state


def run(
    balancer: str = "nash_mtl",
    *,
    seeds: Sequence[int] = (0,),
    epochs: int = 300,
    train_size: int | None = None,
    val_size: int = 10_000,
    test_size: int = 10_000,
    batch_size: int = 120,
    lr: float = 1e-3,
    lr_patience: int = 5,
    device: str | torch.device | None = "auto",
    targets: Sequence[str] | None = None,
    reference: Mapping[str, float] | None = None,
    reference_name: str = "published STL (Navon et al. 2022)",
    balancer_params: Mapping[str, Any] | None = None,
    graphs: QM9Graphs | None = None,
    cache: Path | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    checkpoint_dir: Path | str | None = None,
) -> QM9Result:
    """Run the QM9 protocol for one balancer over ``seeds`` (defaults: the published protocol).

    ``train_size`` / ``epochs`` / ``val_size`` / ``test_size`` give the reduced budget;
    ``reference`` replaces the published single-task MAEs (e.g. :func:`run_stl`'s);
    ``graphs`` replaces the cached full set (e.g. a subset for a quick run);
    ``checkpoint_dir``: one resumable checkpoint per seed there (:func:`train_once`), which a
    rerun continues from (:func:`remove_checkpoints` once the result is saved).
    """
    require_qm9_dependencies(("torch_geometric",))  # qm9pack and rdkit: only to build the cache
    names = check_targets(targets)
    make_balancer(balancer, balancer_params)  # unknown name / parameter: fail before any work
    if reference is not None:
        missing = [t for t in names if t not in reference]
        if missing:
            raise ConfigError(f"qm9: the reference has no MAE for target(s) {', '.join(missing)}")
    graphs = graphs if graphs is not None else load_qm9(cache, progress=progress)
    runs = [
        train_once(graphs, balancer, seed=s, targets=names, epochs=epochs, train_size=train_size,
                   val_size=val_size, test_size=test_size, batch_size=batch_size, lr=lr, lr_patience=lr_patience,
                   device=device, reference=reference, balancer_params=balancer_params, progress=progress, log=log,
                   checkpoint=checkpoint_path(checkpoint_dir, balancer, s) if checkpoint_dir is not None else None)
        for s in seeds
    ]
    settings = dict(epochs=epochs, train_size=train_size, val_size=val_size, test_size=test_size,
                    batch_size=batch_size, lr=lr, lr_patience=lr_patience, device=str(resolve_device(device)),
                    seeds=list(seeds),
                    balancer_params=dict(balancer_params or {}), num_molecules=len(graphs))
    return QM9Result(method=balancer, targets=names, runs=runs, reference=dict(reference or PUBLISHED_STL_MAE),
                     reference_name=reference_name if reference is not None else
                     "published STL (Navon et al. 2022)", settings=settings)


def checkpoint_path(checkpoint_dir: Path | str, method: str, seed: int) -> Path:
    """Where :func:`run` keeps the resumable checkpoint of ``method`` (e.g. ``stl_mu``) and ``seed``."""
    return Path(checkpoint_dir) / f"qm9_{method}_seed{seed}.ckpt"


def remove_checkpoints(checkpoint_dir: Path | str, method: str) -> None:
    """Delete the checkpoints of ``method`` (``stl``: of every single-task run) once its result is saved."""
    pattern = "qm9_stl_*_seed*.ckpt" if method == "stl" else f"qm9_{method}_seed*.ckpt"
    for f in Path(checkpoint_dir).glob(pattern):
        f.unlink(missing_ok=True)


def run_stl(
    *,
    seeds: Sequence[int] = (0,),
    targets: Sequence[str] | None = None,
    graphs: QM9Graphs | None = None,
    cache: Path | str | None = None,
    progress: bool = True,
    checkpoint_dir: Path | str | None = None,
    **kwargs: Any,
) -> QM9Result:
    """Single-task baselines: one MPNN per target, same budget and selection on its own
    validation MAE. Returns a result whose per-target test MAE (mean over seeds) can serve as
    ``reference`` of :func:`run`."""
    require_qm9_dependencies(("torch_geometric",))  # qm9pack and rdkit: only to build the cache
    names = check_targets(targets)
    graphs = graphs if graphs is not None else load_qm9(cache, progress=progress)
    runs = []
    for s in seeds:
        mae: dict[str, float] = {}
        seconds: list[float] = []
        cpu: list[float] = []
        for t in names:
            ckpt = checkpoint_path(checkpoint_dir, f"stl_{t}", s) if checkpoint_dir is not None else None
            r = train_once(graphs, "ew", seed=s, targets=[t], progress=progress, checkpoint=ckpt, **kwargs)
            mae[t] = r.test_mae[t]
            seconds += r.epoch_seconds
            cpu += r.epoch_cpu_seconds
        runs.append(SeedResult(seed=s, best_epoch=-1, val_criterion=float("nan"), test_mae=mae,
                               epoch_seconds=seconds, epoch_cpu_seconds=cpu))
    return QM9Result(method="stl", targets=names, runs=runs, reference=dict(PUBLISHED_STL_MAE),
                     reference_name="published STL (Navon et al. 2022)",
                     settings={**{k: v for k, v in kwargs.items() if k != "log"}, "seeds": list(seeds)})


def stl_reference(stl: QM9Result) -> dict[str, float]:
    """Mean test MAE per target of single-task runs, for use as ``reference``."""
    return {t: m for t, (m, _) in stl.test_mae().items()}


def saved_stl(out_dir: Path | str, **budget: Any) -> QM9Result | None:
    """``qm9_stl.json`` in ``out_dir`` if it was run with ``budget`` (:func:`run_stl`'s arguments)
    and has every target asked for; else None."""
    path = Path(out_dir) / "qm9_stl.json"
    if not path.is_file():
        return None
    done = QM9Result.from_json(json.loads(path.read_text()))
    names = check_targets(budget.get("targets"))
    return done if _done_with(done, budget, {}) and set(names) <= set(done.targets) else None


def run_stl_into(out_dir: Path | str, graphs: QM9Graphs, **budget: Any) -> QM9Result:
    """:func:`run_stl` with its checkpoints in ``out_dir`` (so it continues an interrupted run, and
    collects at once the runs that other processes finished there), then ``qm9_stl.json`` written
    and the checkpoints removed."""
    out = Path(out_dir)
    single = run_stl(graphs=graphs, checkpoint_dir=out, **budget)
    save_result(single, out / "qm9_stl.json")
    remove_checkpoints(out, "stl")
    return single


def use_reference(results: Sequence[QM9Result], stl: QM9Result, name: str) -> None:
    """Make the single-task runs ``stl`` every result's Δm% reference (``name`` says which runs)."""
    reference = stl_reference(stl)
    missing = sorted({t for r in results for t in r.targets if t not in reference})
    if missing:
        raise ConfigError(f"qm9: {name} have no single-task MAE for target(s) {', '.join(missing)}")
    for r in results:
        r.reference, r.reference_name = dict(reference), name


# ----------------------------------------------------------------------------- reports
def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"


def format_result(result: QM9Result) -> str:
    """Per-target test MAE next to the single-task reference, then Δm% next to the published row."""
    mae = result.test_mae()
    lines = [
        f"QM9, {result.method}: test MAE at the best validation epoch "
        f"({len(result.runs)} seed(s); mean ± std)",
        f"{'target':8} {'unit':12} {'ours':>18} {'single-task':>12}",
    ]
    for t in result.targets:
        m, s = mae[t]
        lines.append(f"{t:8} {UNITS[t]:12} {_fmt(m) + ' ± ' + _fmt(s):>18} {_fmt(result.reference[t]):>12}")
    dm, ds = result.delta_m()
    key = published_key(result.method)
    published = f"; published {PUBLISHED_LABELS[key]}: {PUBLISHED_DELTA_M[key]:+.1f}" if key else ""
    lines.append(f"Δm% = {dm:+.1f} ± {ds:.1f} (vs {result.reference_name}){published}")
    secs = [s for r in result.runs for s in r.epoch_seconds]
    cpu = [s for r in result.runs for s in r.epoch_cpu_seconds]
    if secs and cpu:
        lines.append(f"epochs: best {[r.best_epoch for r in result.runs]}; median epoch time "
                     f"{sorted(secs)[len(secs) // 2]:.1f}s wall, {sorted(cpu)[len(cpu) // 2]:.1f}s CPU "
                     f"({torch.get_num_threads()} threads) on {result.settings.get('device', '?')}")
    lines.append("published Δm% (300 epochs, full data): " +
                 ", ".join(f"{PUBLISHED_LABELS[k]} {v:.1f}" for k, v in PUBLISHED_DELTA_M.items()))
    return "\n".join(lines)


def mean_ranks(results: Sequence[QM9Result]) -> list[float]:
    """Mean rank of each method over the targets (rank 1 = lowest test MAE; ties share ranks)."""
    if not results:
        return []
    targets = results[0].targets
    mae = torch.tensor([[r.test_mae()[t][0] for t in targets] for r in results], dtype=torch.float64)
    # rank of each entry within its column, averaging ties
    less = (mae.unsqueeze(0) < mae.unsqueeze(1)).sum(1).double()  # strictly better methods
    equal = (mae.unsqueeze(0) == mae.unsqueeze(1)).sum(1).double()
    ranks = less + (equal + 1) / 2
    return ranks.mean(1).tolist()


def comparison_markdown(results: Sequence[QM9Result]) -> str:
    """Markdown table: per-target test MAE, Δm%, published Δm% and mean rank of every method."""
    if not results:
        raise ConfigError("qm9: nothing to compare")
    targets = results[0].targets
    ranks = mean_ranks(results)
    head = ["method", *[f"{t} [{UNITS[t]}]" for t in targets], "Δm% (ours)", "Δm% (published)", "MR"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = results[0].reference
    rows.append("| single-task ref. | " + " | ".join(_fmt(ref[t]) for t in targets) + " | 0 | 0 | |")
    order = sorted(range(len(results)), key=lambda i: results[i].delta_m()[0])
    tied = best_group(results)
    for i in order:
        r = results[i]
        mae = r.test_mae()
        key = published_key(r.method)
        pub = f"{PUBLISHED_DELTA_M[key]:.1f}" if key else "–"
        dm, ds = r.delta_m()
        params = r.settings.get("balancer_params") or {}
        label = r.method + (f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else "")
        rows.append(f"| {label} | " + " | ".join(_fmt(mae[t][0]) for t in targets) +
                    f" | {dm:+.1f} ± {ds:.1f}{'*' if tied and tied[i] else ''} | {pub} | {ranks[i]:.2f} |")
    s = results[0].settings
    ordering = ordering_against_published(results)
    note = (f"\nBudget: {s.get('epochs')} epochs, train size {s.get('train_size') or 'all'}, "
            f"val {s.get('val_size')}, test {s.get('test_size')}, seeds {s.get('seeds')}, device "
            f"{s.get('device')}. Δm% against {results[0].reference_name}; published Δm% are for "
            "300 epochs on the full training set (Navon et al. 2022; Liu et al. 2023). "
            "MR: mean rank over the targets' test MAE (1 = best)."
            + (" *: best Δm% or not significantly worse than it over the seeds (see below)." if tied else "") + "\n")
    significance = significance_markdown(results)
    return ("\n".join(rows) + "\n" + note + (f"\n{ordering}\n" if ordering else "")
            + (f"\n{significance}\n" if significance else ""))


def _paired_seeds(results: Sequence[QM9Result]) -> list[int]:
    """The seeds every result ran (sorted): what the paired tests use."""
    return sorted(set.intersection(*({run.seed for run in r.runs} for r in results))) if results else []


def best_group(results: Sequence[QM9Result], alpha: float = 0.05) -> list[bool] | None:
    """Per result: best Δm% or not significantly worse than it over the common seeds (paired t-test,
    Holm; :func:`polytask.report.significance.not_worse_than_best`); None with fewer than two seeds."""
    from polytask.report import significance as sig

    seeds = _paired_seeds(results)
    if len(seeds) < 2:
        return None
    by_seed = [{run.seed: run for run in r.runs} for r in results]
    deltas = {i: [_delta_m(runs[s].test_mae, r.reference, r.targets) for s in seeds]
              for i, (r, runs) in enumerate(zip(results, by_seed))}
    marks = sig.not_worse_than_best(deltas, alpha=alpha)
    return [marks[i] for i in range(len(results))]


def significance_markdown(results: Sequence[QM9Result], alpha: float = 0.05) -> str:
    """Over the seeds every method ran (paired by seed): Δm% and each target's test MAE as mean ± std,
    ``*`` on the methods not significantly worse than the best of each column, and the pairwise
    Δm% matrix (paired t-test, Holm; :mod:`polytask.report.significance`). '' with fewer than two
    common seeds or methods."""
    from polytask.report import significance as sig

    seeds = _paired_seeds(results)
    if len(seeds) < 2 or len(results) < 2:
        return ""
    labels = [r.method for r in results]
    if len(set(labels)) < len(labels):  # the same method with other parameters: tell the rows apart
        labels = [f"{r.method}#{i}" for i, r in enumerate(results)]
    by_seed = [{run.seed: run for run in r.runs} for r in results]
    targets = results[0].targets
    columns = {"Δm%": {lab: [_delta_m(runs[s].test_mae, r.reference, targets) for s in seeds]
                       for lab, r, runs in zip(labels, results, by_seed)}}
    for t in targets:
        columns[f"{t} MAE"] = {lab: [runs[s].test_mae[t] for s in seeds] for lab, runs in zip(labels, by_seed)}
    table = sig.seed_table(columns, {c: True for c in columns}, labels, alpha=alpha)
    matrix = sig.pairwise_matrix(sig.pairwise(columns["Δm%"], alpha=alpha), labels)
    return (f"Significance over seeds {seeds} (paired by seed; mean ± std; * = best or not significantly "
            f"worse than the best, two-sided paired t-test, Holm over the comparisons with the best, "
            f"alpha {alpha}; with {len(seeds)} seeds the t-test assumes normal differences and an exact "
            f"Wilcoxon test could not go below p = {2 / 2 ** len(seeds):.3g}):\n\n```\n{table}\n```\n\n"
            f"Pairwise Δm% (row vs column; paired t-test, Holm over all pairs): < better, > worse, "
            f"= not significantly different:\n\n```\n{matrix}\n```")


def ordering_against_published(results: Sequence[QM9Result]) -> str:
    """How the Δm% order of the methods with a published row compares with the published order:
    both orders, Spearman's ρ, Kendall's τ and the pairs ordered the other way ('' if < 2 such methods)."""
    ours = {}
    for r in results:
        key = published_key(r.method)
        if key is not None and key not in ours:
            ours[key] = r.delta_m()[0]
    keys = [k for k in PUBLISHED_DELTA_M if k in ours]
    n = len(keys)
    if n < 2:
        return ""
    ours_order = sorted(keys, key=lambda k: ours[k])
    published_order = sorted(keys, key=lambda k: PUBLISHED_DELTA_M[k])
    rank_ours = {k: i + 1 for i, k in enumerate(ours_order)}
    rank_pub = {k: i + 1 for i, k in enumerate(published_order)}
    rho = 1 - 6 * sum((rank_ours[k] - rank_pub[k]) ** 2 for k in keys) / (n * (n * n - 1))
    swapped = [(a, b) for i, a in enumerate(published_order) for b in published_order[i + 1:]
               if ours[a] > ours[b]]  # published: a better than b; ours: the other way round
    pairs = n * (n - 1) // 2
    tau = (pairs - 2 * len(swapped)) / pairs
    label = PUBLISHED_LABELS
    lines = [
        f"Ordering of the {n} published methods by Δm% (best first): published "
        + " < ".join(label[k] for k in published_order) + "; ours " + " < ".join(label[k] for k in ours_order) + ".",
        f"Spearman ρ = {rho:+.2f}, Kendall τ = {tau:+.2f}; {len(swapped)} of {pairs} pairs ordered the other way"
        + (": " + ", ".join(f"{label[b]} ahead of {label[a]}" for a, b in swapped) if swapped else "") + ".",
    ]
    return "\n".join(lines)


def comparison_png(results: Sequence[QM9Result], path: Path) -> Path:
    """The comparison as a figure: Δm% ours vs published per method, with mean ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = mean_ranks(results)
    order = sorted(range(len(results)), key=lambda i: results[i].delta_m()[0])
    labels = [f"{results[i].method} (MR {ranks[i]:.1f})" for i in order]
    ours = [results[i].delta_m()[0] for i in order]
    err = [results[i].delta_m()[1] for i in order]
    pub = [PUBLISHED_DELTA_M.get(published_key(results[i].method) or "", float("nan")) for i in order]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(order) + 1.5))
    ypos = torch.arange(len(order)).double()
    ax.barh(ypos - 0.2, ours, height=0.4, xerr=err, label="ours (reduced budget)" if
            results[0].settings.get("epochs", 300) < 300 else "ours")
    ax.barh(ypos + 0.2, pub, height=0.4, label="published (300 epochs, full data)")
    ax.set_yticks(ypos.tolist(), labels)
    ax.invert_yaxis()
    ax.set_xlabel("Δm% vs single-task (lower is better)")
    ax.set_title("QM9: multi-task balancers")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)  # below: never over a bar
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def distinct_balancers() -> list[str]:
    """One name per registered balancer class (the first name in sorted order)."""
    from polytask import balance

    seen: dict[Any, str] = {}
    for name in balance.names():
        cls = balance.BALANCERS.lookup(name)
        preferred = published_key(name)
        if cls not in seen or (preferred is not None and name == preferred):
            seen[cls] = name
    return sorted(seen.values())


def run_all(
    out_dir: Path | str,
    balancers: Sequence[str] | None = None,
    *,
    graphs: QM9Graphs | None = None,
    cache: Path | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> tuple[list[QM9Result], Path, Path]:
    """Run every balancer (or ``balancers``) with the same settings; ``balancer_params`` go to
    each method that takes them (e.g. ``mode="features"`` to the gradient methods). Write one JSON per method
    (a rerun skips methods already done with the same settings and continues an interrupted one
    from its checkpoint), ``qm9_comparison.md`` and
    ``qm9_comparison.png``. Returns the results and the two report paths."""
    require_qm9_dependencies(("torch_geometric",))  # qm9pack and rdkit: only to build the cache
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(balancers) if balancers else distinct_balancers()
    common = dict(kwargs.pop("balancer_params", None) or {})
    per_method = {n: params_accepted_by(n, common) for n in names}
    for n in names:
        make_balancer(n, per_method[n])  # unknown names fail before any training
    graphs = graphs if graphs is not None else load_qm9(cache, progress=progress)
    results = []
    for n in names:
        path = out / f"qm9_{n}.json"
        if path.is_file():
            done = QM9Result.from_json(json.loads(path.read_text()))
            if _done_with(done, kwargs, per_method[n]):
                results.append(done)
                continue
        result = run(n, graphs=graphs, progress=progress, log=log, balancer_params=per_method[n],
                     checkpoint_dir=out, **kwargs)
        save_result(result, path)
        remove_checkpoints(out, n)
        if log is not None:
            log(format_result(result))
        results.append(result)
    md, png = write_report(out, results)
    return results, md, png


def _done_with(done: QM9Result, run_kwargs: Mapping[str, Any], balancer_params: Mapping[str, Any]) -> bool:
    """Whether the saved ``done`` was run with the budget and balancer parameters that
    ``run(**run_kwargs, balancer_params=balancer_params)`` would use (its defaults filled in)."""
    defaults = {k: p.default for k, p in inspect.signature(run).parameters.items() if k in BUDGET_KEYS}
    wanted = {k: run_kwargs.get(k, defaults[k]) for k in BUDGET_KEYS}
    wanted["seeds"] = list(wanted["seeds"])
    saved = {k: done.settings.get(k, _BEFORE_PROTOCOLS.get(k)) for k in BUDGET_KEYS}
    return saved == wanted and dict(done.settings.get("balancer_params") or {}) == dict(balancer_params)


def save_result(result: QM9Result, path: Path | str) -> Path:
    """Write ``result`` as JSON, whole or not at all (temporary file, then rename)."""
    from polytask.train.checkpoint import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result.to_json(), indent=1))
    return path


def run_in_processes(out_dir: Path | str, names: Sequence[str], workers: int, child_args: Sequence[str],
                     log: Callable[[str], None] | None = None) -> list[str]:
    """Run each job of ``names`` in its own process, at most ``workers`` at a time.

    A method's process is ``python -m polytask.cli bench qm9 --all --balancers <method> --out
    <out_dir> *child_args`` (so it skips a method already done with the same budget, and writes
    ``qm9_<method>.json``); a job ``stl_<target>`` trains that target's single-task run
    (``--stl-target``) and leaves its finished checkpoint in ``out_dir`` for :func:`run_stl_into`.
    A job's output goes to ``log_<job>.txt`` in ``out_dir``. On a CPU, e.g. 2 workers with
    ``--threads 1`` on 2 cores; on a GPU, several processes share the device.
    Returns the jobs whose process failed.
    """
    import subprocess
    import sys

    if workers < 1:
        raise ConfigError(f"qm9: workers must be at least 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    queue, running, failed = list(names), [], []
    while queue or running:
        while queue and len(running) < workers:
            name = queue.pop(0)
            job = ["--stl-target", name[4:]] if name.startswith("stl_") else ["--all", "--balancers", name]
            cmd = [sys.executable, "-m", "polytask.cli", "bench", "qm9", *job, "--out", str(out), *child_args]
            handle = open(out / f"log_{name}.txt", "w")  # noqa: SIM115  (closed when the process ends)
            running.append((name, subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT), handle))
            if log is not None:
                log(f"started {name} (log: {out / f'log_{name}.txt'})")
        time.sleep(0.2)
        for item in [r for r in running if r[1].poll() is not None]:
            name, proc, handle = item
            handle.close()
            running.remove(item)
            if proc.returncode != 0:
                failed.append(name)
            if log is not None:
                log(f"{name}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}")
    return failed


#: Settings that must agree for results to share one comparison table.
BUDGET_KEYS = ("epochs", "train_size", "val_size", "test_size", "batch_size", "lr", "lr_patience", "seeds")

#: What result files and checkpoints written before ``lr_patience`` existed ran with.
_BEFORE_PROTOCOLS: dict[str, Any] = {"lr_patience": 5}


def load_results(out_dir: Path | str) -> list[QM9Result]:
    """Every method's result JSON (``qm9_<method>.json``) in ``out_dir``, for one comparison.

    If ``qm9_stl.json`` (our single-task runs, ``--stl``) is there too, it becomes every result's
    Δm% reference (DESIGN.md: single-task baselines with the same budget). ConfigError when there
    is no result, a file does not parse, or two files (single-task included) differ in budget.
    """
    out = Path(out_dir)
    files = sorted(f for f in out.glob("qm9_*.json") if f.name != "qm9_stl.json")
    if not files:
        raise ConfigError(f"qm9: no result files (qm9_<method>.json) in {out}")
    results, first = [], None
    stl_file = out / "qm9_stl.json"
    for f in [*files, stl_file] if stl_file.is_file() else files:
        try:
            result = QM9Result.from_json(json.loads(f.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"qm9: {f} is not a QM9 result file ({exc})") from exc
        budget = {k: result.settings.get(k, _BEFORE_PROTOCOLS.get(k)) for k in BUDGET_KEYS}
        if first is None:
            first = (f, budget)
        elif budget != first[1]:
            diff = ", ".join(f"{k} {first[1][k]} vs {budget[k]}" for k in BUDGET_KEYS if budget[k] != first[1][k])
            raise ConfigError(f"qm9: {f.name} and {first[0].name} were run with different budgets ({diff})")
        results.append(result)
    if stl_file.is_file():
        stl = results.pop()
        use_reference(results, stl, "our single-task runs (qm9_stl.json, same budget)")
    return results


def write_report(out_dir: Path | str, results: Sequence[QM9Result]) -> tuple[Path, Path]:
    """``qm9_comparison.md`` and ``qm9_comparison.png`` in ``out_dir`` (each written whole, then renamed)."""
    from polytask.train.checkpoint import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "qm9_comparison.md", out / "qm9_comparison.png"
    # per-process temporary name: processes sharing out_dir (run_in_processes) never share one
    png_tmp = comparison_png(results, out / f"qm9_comparison.{os.getpid()}.tmp.png")
    atomic_write_text(md, "# QM9 balancer comparison\n\n" + comparison_markdown(results))
    png_tmp.replace(png)
    return md, png
