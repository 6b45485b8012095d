"""The merge engine: validate the inputs, then walk tensor by tensor.

:func:`merge_state_dicts` merges in-memory state dicts; :func:`merge_checkpoints` streams
checkpoints on disk: a thread pool reads the next tensors of every model (converted to float32 in
the reading thread) while the current one is merged, and a second pool writes finished tensors
into the pre-laid-out output shards. At most ``prefetch_bytes`` of float32 inputs are in flight,
so peak memory is a few tensors per model plus the output buffers, whatever the model size.
"""

from __future__ import annotations

import os
import sys
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from polytask.errors import ConfigError, MergeError
from polytask.merge import checks
from polytask.merge.io import Checkpoint, CheckpointWriter, TensorSpec, parse_dtype, parse_size
from polytask.merge.methods import MERGE_METHODS, MergeMethod, TensorContext

__all__ = ["merge_state_dicts", "merge_checkpoints", "build_method", "resolve_model_params", "check_output_apart"]


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


def build_method(method: str | MergeMethod, params: Mapping[str, Any] | None = None) -> MergeMethod:
    """A method instance from a registered name and its global parameters (ConfigError if bad)."""
    if isinstance(method, MergeMethod):
        if params:
            raise ConfigError("pass global parameters either to the method instance or by name, not both")
        return method
    return MERGE_METHODS.build(method, **dict(params or {}))


def resolve_model_params(
    method: MergeMethod, per_model: Sequence[Mapping[str, Any] | None], labels: Sequence[str]
) -> dict[str, Tensor]:
    """Per-model parameters as ``(N,)`` float32 tensors, defaults filled in, unknown keys refused.

    Every value must be a finite number in its range (:data:`~polytask.merge.checks.MODEL_PARAM_RANGES`),
    and the method checks that they fit its settings (e.g. no normalisation by a zero weight sum).
    Errors name the model and the key: ``model ./math: parameters.density: must be in (0, 1], got 1.5``.
    """
    accepted = type(method).model_params
    out = {key: torch.full((len(per_model),), float(default)) for key, default in accepted.items()}
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
    if not out.is_floating_point() or bool(torch.isfinite(out).all()):
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


def _check_counts(method: MergeMethod, n_models: int, has_base: bool) -> None:
    cls = type(method)
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
    method: MergeMethod, name: str, stacked: Tensor, base: Tensor | None, params: dict[str, Tensor], seed: int
) -> Tensor:
    ctx = TensorContext(name=name, generator=_tensor_generator(seed, name) if type(method).random else None)
    try:
        out = method.merge(stacked, base, params, ctx)
    except (RuntimeError, ValueError) as exc:  # e.g. a non-converging SVD on a degenerate tensor
        if isinstance(exc, ConfigError):
            raise
        raise MergeError(f"tensor {name!r}: {type(method).__name__} failed: {exc}") from exc
    if out.shape != stacked.shape[1:]:
        raise MergeError(f"tensor {name!r}: method returned shape {list(out.shape)}, expected {list(stacked.shape[1:])}")
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
    seed: int = 0,
    strict_dtypes: bool = True,
    allow_nonfinite: bool = False,
    **method_params: Any,
) -> dict[str, Tensor]:
    """Merge in-memory state dicts with a per-tensor method.

    ``method`` is a name from :data:`~polytask.merge.methods.MERGE_METHODS` (global parameters as
    keyword arguments, e.g. ``lambda_=0.5``) or a method instance. ``model_params[i]`` holds the
    per-model parameters of ``models[i]`` (``weight``, ``density``...). Computation is in
    float32; floating outputs take ``dtype`` (default: the base's dtype). Non-floating tensors
    (integer buffers) are copied from the base (or the first model). ``seed`` drives random
    methods (DARE), per tensor, so a run with the same seed repeats. A merged tensor with NaN
    or infinite values raises MergeError naming it (a RuntimeWarning with ``allow_nonfinite``).
    """
    if not models:
        raise ConfigError("no models to merge")
    labels = [f"#{i}" for i in range(len(models))]
    sources = [_DictSource(m, label) for m, label in zip(models, labels)]
    base_src = _DictSource(base, "base") if base is not None else None
    instance = build_method(method, method_params)
    _check_counts(instance, len(models), base is not None)
    params = resolve_model_params(instance, model_params or [None] * len(models), labels)
    plan = _plan(base_src, sources, strict_dtypes)
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    ref = base_src if base_src is not None else sources[0]
    result: dict[str, Tensor] = {}
    nonfinite: list[str] = []
    for name, spec in plan.items():
        if not spec.dtype.is_floating_point:
            result[name] = ref.load(name).clone()
            continue
        stacked = torch.stack([s.load(name).float() for s in sources])
        base_t = base_src.load(name).float() if base_src is not None else None
        merged = _merge_tensor(instance, name, stacked, base_t, params, seed)
        result[name] = merged.to(_out_dtype(spec, out_dtype))
        _check_finite(name, result[name], allow_nonfinite, nonfinite)
    _warn_nonfinite(nonfinite)
    return result


class _BufferPool:
    """Float32 scratch buffers reused across tensors of the same shape (main thread only).

    Llama-like checkpoints repeat a handful of shapes per layer; reusing their buffers avoids
    allocating and page-faulting gigabytes of fresh memory for every tensor.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.free: dict[tuple[int, ...], list[Tensor]] = {}

    def take(self, shape: tuple[int, ...]) -> Tensor:
        stack = self.free.get(shape)
        if stack:
            t = stack.pop()
            self.held -= t.numel() * 4
            return t
        return torch.empty(shape, dtype=torch.float32)

    def give(self, t: Tensor | None, *, unless_aliased_by: Tensor) -> None:
        if t is None or t.untyped_storage().data_ptr() == unless_aliased_by.untyped_storage().data_ptr():
            return
        nbytes = t.numel() * 4
        if self.held + nbytes <= self.max_bytes:
            self.free.setdefault(tuple(t.shape), []).append(t)
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
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    io_threads: int = 4,
    prefetch_bytes: int | str = "1GB",
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    strict_dtypes: bool = True,
    copy_files_from: str | os.PathLike[str] | None = None,
    extra_files: Mapping[str, str] | None = None,
    progress: bool | None = None,
    on_tensor: Callable[[str], None] | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Merge checkpoints on disk into ``out_dir``, streaming tensor by tensor.

    ``models`` and ``base`` are safetensors files or directories (HF-style shards included);
    pickled ``.bin`` files only with ``allow_pickle``. The output is written as safetensors
    shards of at most ``max_shard_size`` in ``dtype`` (default: the base's dtype), with the
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
    roles = [("input model", name, p) for name, p in zip(names, models)]
    if base is not None:
        roles.append(("base model", names[-1], base))
    if copy_files_from is not None:
        roles.append(("the model whose files are copied", str(copy_files_from), copy_files_from))
    check_output_apart(out_dir, roles)
    opened: list[Checkpoint] = []
    try:
        def open_ckpt(p: str | os.PathLike[str], label: str) -> _CheckpointSource:
            ckpt = Checkpoint(p, allow_pickle=allow_pickle)
            opened.append(ckpt)
            return _CheckpointSource(ckpt, label)

        sources = [open_ckpt(p, name) for p, name in zip(models, names)]
        base_src = open_ckpt(base, names[-1]) if base is not None else None
        params = resolve_model_params(instance, model_params or [None] * len(models), [s.label for s in sources])
        plan = _plan(base_src, sources, strict_dtypes)
        out_dtype = parse_dtype(dtype) if dtype is not None else None
        ref = base_src if base_src is not None else sources[0]
        out_specs = {n: TensorSpec(s.shape, _out_dtype(s, out_dtype)) for n, s in plan.items()}
        writer = CheckpointWriter(out_dir, out_specs, max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite)
        with writer:
            nonfinite: list[str] = []
            _stream(instance, plan, sources, base_src, ref, params, writer, seed, io_threads,
                    parse_size(prefetch_bytes), progress, on_tensor, allow_nonfinite, nonfinite)
            src_dir = copy_files_from if copy_files_from is not None else (base if base is not None else models[0])
            src_path = Path(src_dir)
            writer.copy_extras(src_path if src_path.is_dir() else None, out_dtype)
            for fname, text in (extra_files or {}).items():
                writer.add_file(fname, text)
            committed = writer.commit()
        _warn_nonfinite(nonfinite)
        return committed
    finally:
        for c in opened:
            c.close()


def _stream(
    method: MergeMethod,
    plan: dict[str, TensorSpec],
    sources: Sequence[_Source],
    base: _Source | None,
    ref: _Source,
    params: dict[str, Tensor],
    writer: CheckpointWriter,
    seed: int,
    io_threads: int,
    prefetch_bytes: int,
    progress: bool | None,
    on_tensor: Callable[[str], None] | None,
    allow_nonfinite: bool,
    nonfinite: list[str],
) -> None:
    n = len(sources)
    names = list(plan)
    bar = _progress(len(names), progress)
    readers = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="polytask-read")
    writers = ThreadPoolExecutor(2, thread_name_prefix="polytask-write")

    def fill(dst: Tensor, src: _Source, name: str) -> None:
        reader = getattr(src, "read_into", None)
        if reader is not None:
            reader(name, dst)
        else:
            dst.copy_(src.load(name))

    def submit(name: str) -> tuple[str, Tensor | None, Tensor | None, list[Future[Any]], int]:
        spec = plan[name]
        if not spec.dtype.is_floating_point:
            fut = readers.submit(ref.load, name)
            return name, None, None, [fut], spec.nbytes
        stacked = pool.take((n, *spec.shape))
        futs = [readers.submit(fill, stacked[i], s, name) for i, s in enumerate(sources)]
        base_t = None
        if base is not None:
            base_t = pool.take(tuple(spec.shape))
            futs.append(readers.submit(fill, base_t, base, name))
        return name, stacked, base_t, futs, (n + 1) * spec.numel * 4

    pool = _BufferPool(max(prefetch_bytes, 2**28))
    inflight: deque[tuple[str, Tensor | None, Tensor | None, list[Future[Any]], int]] = deque()
    inflight_bytes = 0
    pending_writes: deque[Future[Any]] = deque()
    next_i = 0
    try:
        for _ in names:
            while next_i < len(names) and (not inflight or inflight_bytes < prefetch_bytes):
                item = submit(names[next_i])
                inflight.append(item)
                inflight_bytes += item[4]
                next_i += 1
            name, stacked, base_t, futs, nbytes = inflight.popleft()
            for f in futs:
                f.result()
            inflight_bytes -= nbytes
            if stacked is None:
                out = futs[0].result()
            else:
                merged = _merge_tensor(method, name, stacked, base_t, params, seed)
                pool.give(stacked, unless_aliased_by=merged)
                pool.give(base_t, unless_aliased_by=merged)
                del stacked, base_t
                out = merged.to(writer.specs[name].dtype)
                del merged
                _check_finite(name, out, allow_nonfinite, nonfinite)
            pending_writes.append(writers.submit(writer.write, name, out))
            del out
            while len(pending_writes) > 4 or (pending_writes and pending_writes[0].done()):
                pending_writes.popleft().result()
            if bar is not None:
                bar.update(1)
            if on_tensor is not None:
                on_tensor(name)
        while pending_writes:
            pending_writes.popleft().result()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
