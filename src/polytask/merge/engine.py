"""The merge engine: validate the inputs, then walk tensor by tensor.

:func:`merge_state_dicts` merges in-memory state dicts; :func:`merge_checkpoints` streams
checkpoints on disk: a thread pool reads the next tensors of every model (straight into the
merge's buffers when no dtype conversion is needed, else converted to the compute dtype in the
reading thread) while the current one is merged, and a second pool writes finished tensors into
the pre-laid-out output shards. At most ``prefetch_bytes`` (default 128 MB) of inputs are read
ahead and as much again of free buffers is kept for reuse, and at most three merged tensors wait
to be written, so peak memory is a few tensors per model, whatever the model size.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from polytask.errors import ConfigError, MergeError
from polytask.merge import checks, kernels
from polytask.merge.io import Checkpoint, CheckpointWriter, TensorSpec, parse_dtype, parse_size
from polytask.merge.lora import AdapterCheckpoint, is_adapter, split_lora_path
from polytask.merge.methods import MERGE_METHODS, MergeMethod, TensorContext

__all__ = [
    "merge_state_dicts",
    "merge_checkpoints",
    "merge_planned",
    "build_method",
    "resolve_model_params",
    "check_output_apart",
    "TensorJob",
    "compute_dtype_of",
]


@dataclass
class TensorJob:
    """One output tensor: which input tensors it is merged from, by which method and parameters.

    ``inputs`` and ``base`` are ``(source index, tensor name)``; a job without ``method`` copies
    ``inputs[0]`` (or the base) as it is (integer buffers).
    """

    name: str
    inputs: list[tuple[int, str]]
    base: tuple[int, str] | None
    method: MergeMethod | None
    params: dict[str, Tensor] = field(default_factory=dict)
    #: Only rows ``start:stop`` (dim 0) of the tensor: a chunk of an elementwise method's job.
    rows: tuple[int, int] | None = None

    def reads(self) -> list[tuple[int, str]]:
        return [*self.inputs, *([self.base] if self.base is not None else [])]


def compute_dtype_of(choice: str | torch.dtype | None, specs: Sequence[TensorSpec]) -> torch.dtype:
    """The dtype a tensor is merged in: ``choice``, or with ``None``/``"auto"`` the promoted dtype
    of its inputs (mergekit's rule when a config has no ``dtype``)."""
    if choice is not None and choice != "auto":
        return parse_dtype(choice)
    dtype = specs[0].dtype
    for s in specs[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    return dtype


def _work_dtype(method: MergeMethod, compute: torch.dtype) -> torch.dtype:
    """The dtype ``method.merge`` sees: the compute dtype for native methods, else float32 (or
    float64 when computing in float64)."""
    if type(method).native_dtype or compute == torch.float64:
        return compute
    return torch.float32


class _Source(Protocol):
    label: str

    def names(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def spec(self, name: str) -> TensorSpec: ...
    def load(self, name: str) -> Tensor: ...


class _DictSource:
    """A state dict seen through the same interface as a :class:`Checkpoint`."""

    def __init__(self, state: Mapping[str, Tensor], label: str) -> None:
        self.state = state
        self.label = label

    def names(self) -> list[str]:
        return list(self.state)

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def spec(self, name: str) -> TensorSpec:
        t = self.state[name]
        return TensorSpec(tuple(t.shape), t.dtype)

    def load(self, name: str) -> Tensor:
        return self.state[name].detach()


def _split_rows(jobs: Sequence[TensorJob], sources: Sequence[_Source], budget: int) -> list[TensorJob]:
    """Jobs of elementwise methods (each output entry depends only on the same entry of the
    inputs: task arithmetic, linear) on tensors larger than ``budget`` split into row chunks of
    about ``budget`` each, so that an embedding is never held whole: read, merged and written
    rows ``start:stop`` at a time (contiguous bytes in safetensors)."""
    out: list[TensorJob] = []
    for job in jobs:
        spec = sources[job.reads()[0][0]].spec(job.reads()[0][1])
        nbytes = len(job.reads()) * spec.numel * 4  # float32 at most
        chunkable = (job.method is not None and type(job.method).elementwise and len(spec.shape) >= 1
                     and spec.shape[0] > 1 and all(hasattr(sources[i], "read_rows_into") for i, _ in job.reads()))
        if not chunkable or nbytes <= budget:
            out.append(job)
            continue
        step = max(1, spec.shape[0] * budget // nbytes)
        for start in range(0, spec.shape[0], step):
            stop = min(start + step, spec.shape[0])
            out.append(TensorJob(job.name, job.inputs, job.base, job.method, job.params, rows=(start, stop)))
    return out


class _CheckpointSource:
    def __init__(self, ckpt: Checkpoint, label: str) -> None:
        self.ckpt = ckpt
        self.label = label

    def names(self) -> list[str]:
        return self.ckpt.names()

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt

    def spec(self, name: str) -> TensorSpec:
        return self.ckpt.spec(name)

    def load(self, name: str) -> Tensor:
        return self.ckpt.load(name)

    def read_into(self, name: str, out: Tensor) -> None:
        self.ckpt.read_into(name, out)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> Tensor | None:
        return self.ckpt.view(name, rows)

    def __getattr__(self, attr: str) -> Any:
        if attr == "read_rows_into" and hasattr(self.ckpt, "read_rows_into"):  # plain checkpoints only
            return self.ckpt.read_rows_into
        raise AttributeError(attr)


def build_method(method: str | MergeMethod, params: Mapping[str, Any] | None = None) -> MergeMethod:
    """A method instance from a registered name and its global parameters (ConfigError if bad)."""
    if isinstance(method, MergeMethod):
        if params:
            raise ConfigError("pass global parameters either to the method instance or by name, not both")
        return method
    given = dict(params or {})
    sig = inspect.signature(MERGE_METHODS.lookup(method))
    for name, p in sig.parameters.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in given:
            raise ConfigError(f"{checks.key(name)}: merge method {method!r} needs this parameter (it has no "
                              "default), got none")
    return MERGE_METHODS.build(method, **given)


def resolve_model_params(
    method: MergeMethod, per_model: Sequence[Mapping[str, Any] | None], labels: Sequence[str]
) -> dict[str, Tensor]:
    """Per-model parameters as ``(N,)`` float64 tensors, defaults filled in, unknown keys refused.

    Every value must be a finite number in its range (:data:`~polytask.merge.checks.MODEL_PARAM_RANGES`),
    and the method checks that they fit its settings (e.g. no normalisation by a zero weight sum).
    Errors name the model and the key: ``model ./math: parameters.density: must be in (0, 1], got 1.5``.
    """
    accepted = type(method).model_params
    out = {key: torch.full((len(per_model),), float(default), dtype=torch.float64)
           for key, default in accepted.items()}
    for i, (params, label) in enumerate(zip(per_model, labels)):
        for key, value in (params or {}).items():
            if key not in accepted:
                known = ", ".join(accepted) or "none"
                raise ConfigError(
                    f"model {label}: method {type(method).__name__} has no per-model parameter "
                    f"{key!r} (it takes: {known})"
                )
            out[key][i] = checks.model_param(f"model {label}: parameters.{key}", key, value)
    method.check_model_params(out)
    return out


def check_output_apart(
    out_dir: str | os.PathLike[str], inputs: Sequence[tuple[str, str, str | os.PathLike[str]]]
) -> None:
    """Refuse an output directory that is, contains or is inside one of ``inputs``, given as
    ``(role, label, path)`` (e.g. ``("input model", "./math", "/configs/math")``).

    Symlinks are resolved, so a link to an input is that input. Without this check,
    ``overwrite=True`` would replace (delete) an input model.
    """
    out = Path(out_dir).resolve()
    for role, label, path in inputs:
        src = Path(path).resolve()
        if out == src or out in src.parents or src in out.parents:
            how = "is" if out == src else ("contains" if out in src.parents else "is inside")
            raise ConfigError(f"output {str(out_dir)!r} {how} {role} {label!r}; write the merge elsewhere")


def _check_finite(name: str, out: Tensor, allow: bool, bad: list[str]) -> None:
    """Refuse (or, with ``allow``, record in ``bad``) an output tensor that is not finite.

    Called on each tensor as it is written, in its output dtype (a float32 value that overflows
    float16 counts), so no second pass over the data is needed.
    """
    if not out.is_floating_point() or kernels.all_finite(out):
        return
    if allow:
        bad.append(name)
        return
    count = int(out.numel() - torch.isfinite(out).sum())
    raise MergeError(
        f"tensor {name!r}: {count} of {out.numel()} merged values are NaN or infinite "
        f"({str(out.dtype).removeprefix('torch.')}); check the inputs and parameters, or pass "
        "--allow-nonfinite / allow_nonfinite=True to write them anyway"
    )


def _warn_nonfinite(bad: list[str]) -> None:
    if bad:
        warnings.warn(f"{len(bad)} merged tensor(s) hold NaN or infinite values (first: {bad[0]!r})",
                      RuntimeWarning, stacklevel=3)


def _check_counts(method: MergeMethod | type[MergeMethod], n_models: int, has_base: bool) -> None:
    cls = method if isinstance(method, type) else type(method)
    if cls.requires_base and not has_base:
        raise ConfigError(f"merge method {cls.__name__} needs a base model (base_model)")
    if n_models < cls.min_models:
        raise ConfigError(f"merge method {cls.__name__} needs at least {cls.min_models} models, got {n_models}")
    if cls.max_models is not None and n_models > cls.max_models:
        raise ConfigError(f"merge method {cls.__name__} takes at most {cls.max_models} models besides the base, got {n_models}")


def _plan(base: _Source | None, models: Sequence[_Source], strict_dtypes: bool) -> dict[str, TensorSpec]:
    """Check that every input has the same tensors, shapes (and dtypes); return the output plan."""
    ref = base if base is not None else models[0]
    ref_names = ref.names()
    ref_set = set(ref_names)
    role = "base" if base is not None else "first model"
    for m in models:
        if m is ref:
            continue
        for name in ref_names:
            if name not in m:
                raise MergeError(f"tensor {name!r} is in {role} {ref.label} but missing from model {m.label}")
        for name in m.names():
            if name not in ref_set:
                raise MergeError(f"tensor {name!r} of model {m.label} is missing from {role} {ref.label}")
        for name in ref_names:
            a, b = ref.spec(name), m.spec(name)
            if a.shape != b.shape:
                raise MergeError(
                    f"tensor {name!r} has shape {list(a.shape)} in {role} {ref.label} but "
                    f"{list(b.shape)} in model {m.label}"
                )
            if a.dtype != b.dtype and (strict_dtypes or not (a.dtype.is_floating_point and b.dtype.is_floating_point)):
                raise MergeError(
                    f"tensor {name!r} is {str(a.dtype).removeprefix('torch.')} in {role} {ref.label} but "
                    f"{str(b.dtype).removeprefix('torch.')} in model {m.label} (set strict_dtypes: false to "
                    "merge mixed float dtypes)"
                )
    return {name: ref.spec(name) for name in ref_names}


def _tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator that depends only on the run seed and the tensor name (order-independent)."""
    mixed = (zlib.crc32(name.encode()) ^ (int(seed) * 0x9E3779B97F4A7C15)) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator().manual_seed(mixed)


def _merge_tensor(
    method: MergeMethod, name: str, stacked: Tensor | list[Tensor], base: Tensor | None, params: dict[str, Tensor],
    seed: int, out: Tensor | None = None, scratch: Callable[[tuple[int, ...], torch.dtype], Tensor] | None = None,
) -> Tensor:
    ctx = TensorContext(name=name, generator=_tensor_generator(seed, name) if type(method).random else None, out=out,
                        scratch=scratch)
    try:
        out = method.merge(stacked, base, params, ctx)
    except (RuntimeError, ValueError) as exc:  # e.g. a non-converging SVD on a degenerate tensor
        if isinstance(exc, ConfigError):
            raise
        raise MergeError(f"tensor {name!r}: {type(method).__name__} failed: {exc}") from exc
    expected = stacked[0].shape if isinstance(stacked, list) else stacked.shape[1:]
    if out.shape != expected:
        raise MergeError(f"tensor {name!r}: method returned shape {list(out.shape)}, expected {list(expected)}")
    return out


def _out_dtype(spec: TensorSpec, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if (dtype is not None and spec.dtype.is_floating_point) else spec.dtype


def merge_state_dicts(
    method: str | MergeMethod,
    models: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor] | None = None,
    *,
    model_params: Sequence[Mapping[str, Any] | None] | None = None,
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype | None = "float32",
    seed: int = 0,
    strict_dtypes: bool = True,
    allow_nonfinite: bool = False,
    **method_params: Any,
) -> dict[str, Tensor]:
    """Merge in-memory state dicts with a per-tensor method.

    ``method`` is a name from :data:`~polytask.merge.methods.MERGE_METHODS` (global parameters as
    keyword arguments, e.g. ``lambda_=0.5``) or a method instance. ``model_params[i]`` holds the
    per-model parameters of ``models[i]`` (``weight``, ``density``...). Computation is in
    ``compute_dtype`` (default float32; ``None`` or ``"auto"``: the inputs' promoted dtype, as
    mergekit without ``dtype``); floating outputs take ``dtype`` (default: the base's dtype). Non-floating tensors
    (integer buffers) are copied from the base (or the first model). ``seed`` drives random
    methods (DARE), per tensor, so a run with the same seed repeats. A merged tensor with NaN
    or infinite values raises MergeError naming it (a RuntimeWarning with ``allow_nonfinite``).
    """
    if not models:
        raise ConfigError("no models to merge")
    labels = [f"#{i}" for i in range(len(models))]
    sources: list[_Source] = [_DictSource(m, label) for m, label in zip(models, labels)]
    base_src = _DictSource(base, "base") if base is not None else None
    instance = build_method(method, method_params)
    _check_counts(instance, len(models), base is not None)
    params = resolve_model_params(instance, model_params or [None] * len(models), labels)
    plan = _plan(base_src, sources, strict_dtypes)
    all_sources = [*sources, *([base_src] if base_src is not None else [])]
    jobs = _same_name_jobs(plan, len(models), base_src is not None, instance, params)
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    result: dict[str, Tensor] = {}
    nonfinite: list[str] = []
    for job in jobs:
        specs = [all_sources[i].spec(n) for i, n in job.reads()]
        if job.method is None:
            i, n = job.reads()[0]
            result[job.name] = all_sources[i].load(n).clone()
            continue
        cd = compute_dtype_of(compute_dtype, specs)
        work = _work_dtype(job.method, cd)
        stacked = torch.stack([all_sources[i].load(n).to(cd).to(work) for i, n in job.inputs])
        base_t = None
        if job.base is not None:
            i, n = job.base
            base_t = all_sources[i].load(n).to(cd).to(work)
        merged = _merge_tensor(job.method, job.name, stacked, base_t, job.params, seed)
        result[job.name] = merged.to(cd).to(_out_dtype(specs[-1] if job.base else specs[0], out_dtype))
        _check_finite(job.name, result[job.name], allow_nonfinite, nonfinite)
    _warn_nonfinite(nonfinite)
    return result


def _same_name_jobs(
    plan: Mapping[str, TensorSpec], n_models: int, has_base: bool, method: MergeMethod, params: dict[str, Tensor]
) -> list[TensorJob]:
    """One job per tensor name, merging that tensor of every model (sources: models, then base)."""
    jobs = []
    for name, spec in plan.items():
        base = (n_models, name) if has_base else None
        if not spec.dtype.is_floating_point:
            jobs.append(TensorJob(name, [base or (0, name)], None, None))
        else:
            jobs.append(TensorJob(name, [(i, name) for i in range(n_models)], base, method, params))
    return jobs


def _heap_trimmer() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere): hands the free pages of every malloc arena
    back to the system. Temporaries under glibc's mmap threshold (up to 32 MB) stay in the
    arena of the thread that freed them (the trim's selection threads, the readers, the
    writers), so without it a merge's resident memory creeps up to the sum of the arenas' peaks."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


#: Jobs reading at least this much trim the heap after merging (a few ms per call, and the pages
#: handed back fault in again: after the large jobs only, whose temporaries would stay in the arenas).
_TRIM_AFTER_BYTES = 256 * 2**20


#: Aliases nothing (for :meth:`_BufferPool.give` of a buffer known to be free).
_NOTHING = torch.empty(0)


def _lend(pool: _BufferPool, lent: list[Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A pool buffer for a method's scratch, remembered in ``lent`` to be given back after."""
    t = pool.take(shape, dtype)
    lent.append(t)
    return t


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _BufferPool:
    """Scratch buffers reused across tensors of the same shape (main thread only).

    Llama-like checkpoints repeat a handful of shapes per layer; reusing their buffers avoids
    allocating and page-faulting gigabytes of fresh memory for every tensor.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.free: dict[tuple[int, ...], list[Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        stack = self.free.get((*shape, dtype))
        if stack:
            t = stack.pop()
            self.held -= t.numel() * t.element_size()
            return t
        return torch.empty(shape, dtype=dtype)

    def clear(self) -> None:
        self.free.clear()
        self.held = 0

    def give(self, t: Tensor | None, *, unless_aliased_by: Tensor) -> None:
        if t is None or t.untyped_storage().data_ptr() == unless_aliased_by.untyped_storage().data_ptr():
            return
        nbytes = t.numel() * t.element_size()
        if self.held + nbytes <= self.max_bytes:
            self.free.setdefault((*t.shape, t.dtype), []).append(t)
            self.held += nbytes


def _progress(total: int, enabled: bool | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return None
    return tqdm(total=total, unit="tensor", desc="merge", leave=False)


def merge_checkpoints(
    method: str | MergeMethod,
    models: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    model_params: Sequence[Mapping[str, Any] | None] | None = None,
    method_params: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype | None = "float32",
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    io_threads: int = 4,
    prefetch_bytes: int | str = "128MB",
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    strict_dtypes: bool = True,
    copy_files_from: str | os.PathLike[str] | None = None,
    extra_files: Mapping[str, str | None] | None = None,
    progress: bool | None = None,
    on_tensor: Callable[[str], None] | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Merge checkpoints on disk into ``out_dir``, streaming tensor by tensor.

    ``models`` and ``base`` are safetensors files or directories (HF-style shards included);
    pickled ``.bin`` files only with ``allow_pickle``. A model may be a PEFT LoRA adapter folder
    (``adapter_config.json``) of ``base``: it is read as ``base + dW`` tensor by tensor
    (:mod:`polytask.merge.lora`). Tensors are merged in ``compute_dtype``
    (default float32; ``None``/``"auto"``: the inputs' dtype, as mergekit) and written as
    safetensors shards of at most ``max_shard_size`` in ``dtype`` (default: the base's dtype), with the
    non-weight files (config, tokenizer) of ``copy_files_from`` (default: the base, else the
    first model) and ``extra_files`` (name -> text). It appears at ``out_dir`` only when
    complete; on any error (or Ctrl-C) nothing is left behind. ``out_dir`` may not be, contain or
    lie inside an input; while the merge runs it is locked (a second merge into it fails), and
    the partial outputs that killed merges left beside it are removed. A merged tensor with NaN or infinite
    values stops the merge (MergeError naming it) unless ``allow_nonfinite`` (then a
    RuntimeWarning). ``labels`` name ``models`` and then ``base`` in error messages (default:
    their paths; a config passes them as written). Returns ``out_dir``.
    """
    if not models:
        raise ConfigError("no models to merge")
    instance = build_method(method, method_params)
    _check_counts(instance, len(models), base is not None)
    paths = [*models, *([base] if base is not None else [])]
    names = [str(p) for p in paths] if labels is None else list(labels)
    if len(names) != len(paths):
        raise ValueError(f"labels: expected {len(paths)} (models, then base), got {len(names)}")
    roles = ["input model"] * len(models) + (["base model"] if base is not None else [])

    def plan_jobs(sources: Sequence[_Source]) -> list[TensorJob]:
        models_src = list(sources[: len(models)])
        base_src = sources[len(models)] if base is not None else None
        params = resolve_model_params(instance, model_params or [None] * len(models), [s.label for s in models_src])
        plan = _plan(base_src, models_src, strict_dtypes)
        return _same_name_jobs(plan, len(models), base is not None, instance, params)

    if copy_files_from is None:
        copy_files_from = base if base is not None else models[0]
        copy_role = None
    else:
        copy_role = "the model whose files are copied"
    return merge_planned(
        paths, names, roles, plan_jobs, out_dir, dtype=dtype, compute_dtype=compute_dtype, seed=seed,
        max_shard_size=max_shard_size, io_threads=io_threads, prefetch_bytes=prefetch_bytes,
        allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, overwrite=overwrite,
        copy_files_from=copy_files_from, copy_role=copy_role, extra_files=extra_files, progress=progress,
        on_tensor=on_tensor,
    )


def merge_planned(
    paths: Sequence[str | os.PathLike[str]],
    labels: Sequence[str],
    roles: Sequence[str],
    plan_jobs: Callable[[Sequence[_Source]], list[TensorJob]],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype | None = "float32",
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    io_threads: int = 4,
    prefetch_bytes: int | str = "128MB",
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    copy_files_from: str | os.PathLike[str] | None = None,
    copy_role: str | None = None,
    extra_files: Mapping[str, str | None] | None = None,
    progress: bool | None = None,
    on_tensor: Callable[[str], None] | None = None,
    wrap_sources: Callable[[list[Any]], list[Any]] | None = None,
) -> Path:
    """Open the checkpoints ``paths`` (named ``labels`` in errors, with their ``roles``), let
    ``plan_jobs`` turn them into :class:`TensorJob` s (it validates everything: nothing is written
    before it returns), and stream the jobs into ``out_dir`` as :func:`merge_checkpoints` does.
    ``dtype`` is the output dtype of floating tensors (default: the job's reference input, the
    base if any, else the first input). ``wrap_sources`` may replace the opened sources before
    planning (vocabulary alignment: :mod:`polytask.merge.tokenizer`); nothing is written before
    it returns either."""
    checked = sorted(((role, label, p) for role, label, p in zip(roles, labels, paths)),
                     key=lambda r: r[0] != "input model")  # stable: inputs are named first
    if copy_role is not None and copy_files_from is not None:
        checked.append((copy_role, str(copy_files_from), copy_files_from))
    check_output_apart(out_dir, checked)
    opened: list[Any] = []
    try:
        ckpts: list[Any] = [None] * len(paths)
        for k, p in enumerate(paths):
            if not is_adapter(p):  # a checkpoint, or mergekit's model+adapter
                ckpts[k] = AdapterCheckpoint.open_plus(p, allow_pickle=allow_pickle) or Checkpoint(
                    p, allow_pickle=allow_pickle)
                opened.append(ckpts[k])
        base_k = roles.index("base model") if "base model" in roles else None
        for k, p in enumerate(paths):
            if ckpts[k] is None:  # a LoRA adapter: read as base + dW, the base being the merge's
                if base_k is None or ckpts[base_k] is None:
                    raise ConfigError(f"model {labels[k]}: a LoRA adapter needs the merge's base_model (a full "
                                      "model) to be its base")
                ckpts[k] = AdapterCheckpoint(p, ckpts[base_k], labels[base_k])
                opened.append(ckpts[k])
        sources = [_CheckpointSource(c, label) for c, label in zip(ckpts, labels)]
        if wrap_sources is not None:
            sources = wrap_sources(sources)
        jobs = plan_jobs(sources)
        out_dtype = parse_dtype(dtype) if dtype is not None else None
        if compute_dtype is not None and compute_dtype != "auto":
            parse_dtype(compute_dtype)
        out_specs: dict[str, TensorSpec] = {}
        for job in jobs:
            ref_i, ref_n = job.base if job.base is not None else job.inputs[0]
            spec = sources[ref_i].spec(ref_n)
            out_specs[job.name] = TensorSpec(spec.shape, _out_dtype(spec, out_dtype))
        writer = CheckpointWriter(out_dir, out_specs, max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite)
        with writer:
            nonfinite: list[str] = []
            _stream(jobs, sources, writer, compute_dtype, seed, io_threads, parse_size(prefetch_bytes),
                    progress, on_tensor, allow_nonfinite, nonfinite)
            src_path = Path(copy_files_from) if copy_files_from is not None else None
            if src_path is not None and split_lora_path(src_path) is not None:  # model+adapter: the model's files
                src_path = Path(split_lora_path(src_path)[0])  # type: ignore[index]
            writer.copy_extras(src_path if src_path is not None and src_path.is_dir() else None, out_dtype)
            for fname, text in (extra_files or {}).items():
                writer.add_file(fname, text)
            committed = writer.commit()
        _warn_nonfinite(nonfinite)
        return committed
    finally:
        for c in opened:
            c.close()


def _stream(
    jobs: Sequence[TensorJob],
    sources: Sequence[_Source],
    writer: CheckpointWriter,
    compute_dtype: str | torch.dtype | None,
    seed: int,
    io_threads: int,
    prefetch_bytes: int,
    progress: bool | None,
    on_tensor: Callable[[str], None] | None,
    allow_nonfinite: bool,
    nonfinite: list[str],
) -> None:
    bar = _progress(len(jobs), progress)
    jobs = _split_rows(jobs, sources, prefetch_bytes)
    readers = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="polytask-read")
    writers = ThreadPoolExecutor(2, thread_name_prefix="polytask-write")

    def fill(dst: Tensor, src: _Source, name: str, rows: tuple[int, int] | None = None) -> None:
        if rows is not None:
            src.read_rows_into(name, dst, *rows)  # type: ignore[attr-defined]
            return
        reader = getattr(src, "read_into", None)
        if reader is not None:
            reader(name, dst)
        else:
            dst.copy_(src.load(name))

    costs: dict[int, int] = {}

    def cost(job: TensorJob) -> int:
        """Bytes of the buffers that reading ``job`` takes (asked many times per job while
        reading ahead: computed once)."""
        if id(job) not in costs:
            costs[id(job)] = _read_cost(job)
        return costs[id(job)]

    def _read_cost(job: TensorJob) -> int:
        if job.method is None:
            i, n = job.inputs[0]
            return sources[i].spec(n).nbytes
        specs = [sources[i].spec(n) for i, n in job.reads()]
        size = torch.empty((), dtype=compute_dtype_of(compute_dtype, specs)).element_size()
        numel = specs[0].numel
        if job.rows is not None:
            numel = numel // specs[0].shape[0] * (job.rows[1] - job.rows[0])
        return len(job.reads()) * numel * size

    def views(job: TensorJob, cd: torch.dtype, specs: list[TensorSpec]) -> tuple[list[Tensor], Tensor | None] | None:
        """The inputs as read-only views of the mapped files, for methods whose fused kernels read
        them in place (no copy into buffers); None where that does not apply."""
        if not (type(job.method).reads_views and job.method.fused(cd) and all(s.dtype == cd for s in specs)):
            return None
        if not all(callable(getattr(sources[i], "view", None)) for i, _ in job.reads()):
            return None
        got = [sources[i].view(n, job.rows) for i, n in job.reads()]
        if any(v is None for v in got):
            return None
        return (got[:-1], got[-1]) if job.base is not None else (got, None)

    def submit(job: TensorJob) -> tuple[TensorJob, Tensor | list[Tensor] | None, Tensor | None, list[Future[Any]], int, Any]:
        if job.method is None:
            i, n = job.inputs[0]
            fut = readers.submit(sources[i].load, n)
            return job, None, None, [fut], sources[i].spec(n).nbytes, None
        specs = [sources[i].spec(n) for i, n in job.reads()]
        cd = compute_dtype_of(compute_dtype, specs)
        if cost(job) > prefetch_bytes:
            pool.clear()  # a tensor larger than the budget (embeddings): the pool's buffers cannot serve it
        mapped = views(job, cd, specs)
        if mapped is not None:
            return job, mapped[0], mapped[1], [], cost(job), cd
        shape = tuple(specs[0].shape)
        if job.rows is not None:
            shape = (job.rows[1] - job.rows[0], *shape[1:])
        stacked = pool.take((len(job.inputs), *shape), cd)
        futs = [readers.submit(fill, stacked[k], sources[i], n, job.rows) for k, (i, n) in enumerate(job.inputs)]
        base_t = None
        if job.base is not None:
            base_t = pool.take(shape, cd)
            futs.append(readers.submit(fill, base_t, sources[job.base[0]], job.base[1], job.rows))
        return job, stacked, base_t, futs, cost(job), cd

    trim_heap = _heap_trimmer()
    pool = _BufferPool(prefetch_bytes)  # free buffers count against the same budget as reads ahead
    inflight: deque[tuple[TensorJob, Tensor | None, Tensor | None, list[Future[Any]], int, Any]] = deque()
    inflight_bytes = 0
    pending_writes: deque[tuple[Future[Any], Tensor | None]] = deque()
    next_i = 0
    try:
        for _ in jobs:
            # read ahead within the budget; a job larger than what is left waits until it is the next
            # one to merge (else a large embedding read ahead doubles the peak)
            while next_i < len(jobs) and (not inflight or inflight_bytes + cost(jobs[next_i]) <= prefetch_bytes):
                item = submit(jobs[next_i])
                inflight.append(item)
                inflight_bytes += item[4]
                next_i += 1
            job, stacked, base_t, futs, nbytes, cd = inflight.popleft()
            for f in futs:
                f.result()
            inflight_bytes -= nbytes
            if nbytes > prefetch_bytes:
                pool.clear()  # free buffers returned since it was submitted: not held through a large merge
            offered = None
            if stacked is None:
                out = futs[0].result()
            else:
                mapped = isinstance(stacked, list)  # read-only views: no buffers of ours to give back
                work = cd if mapped else _work_dtype(job.method, cd)
                x = stacked if work == cd else stacked.to(work)
                b = base_t if (base_t is None or work == cd) else base_t.to(work)
                # a pooled output buffer for methods that fill one: recycled once written, so merges
                # need not page-fault a fresh output each time
                shape = tuple(x[0].shape) if mapped else tuple(x.shape[1:])
                offered = pool.take(shape, work) if type(job.method).writes_out else None
                lent: list[Tensor] = []
                merged = _merge_tensor(job.method, job.name, x, b, job.params, seed, offered,
                                       scratch=lambda shape, dtype: _lend(pool, lent, shape, dtype))
                del x, b
                out = merged.to(cd).to(writer.specs[job.name].dtype)
                del merged
                # buffers of ours go back to the pool now, but the one the output lives in (the
                # offered one, or a method's scratch or input buffer it wrote over): once written
                ours = [t for t in (offered, *lent, *([] if mapped else [stacked, base_t])) if t is not None]
                offered = next((t for t in ours if _same_storage(t, out)), None)
                for t in ours:
                    if t is not offered:
                        pool.give(t, unless_aliased_by=out)
                del stacked, base_t, lent, ours
                _check_finite(job.name, out, allow_nonfinite, nonfinite)
            if nbytes >= _TRIM_AFTER_BYTES:
                trim_heap()
            if job.rows is None:
                written = writers.submit(writer.write, job.name, out)
            else:
                written = writers.submit(writer.write_rows, job.name, job.rows[0], out)
            pending_writes.append((written, offered))  # offered: the buffer out lives in, or None
            del out
            while len(pending_writes) > 2 or (pending_writes and pending_writes[0][0].done()):
                done, recycled = pending_writes.popleft()
                done.result()
                pool.give(recycled, unless_aliased_by=_NOTHING)
            if job.rows is not None and job.rows[1] < writer.specs[job.name].shape[0]:
                continue  # more chunks of this tensor follow
            if bar is not None:
                bar.update(1)
            if on_tensor is not None:
                on_tensor(job.name)
        while pending_writes:
            pending_writes.popleft()[0].result()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
