"""LoRA adapters as task vectors: merge inputs, merged adapters, and extraction from fine-tunes.

A PEFT LoRA adapter (a folder with ``adapter_config.json`` and ``adapter_model.safetensors``) of a
base model ``W0`` is the fine-tuned model ``W0 + dW`` with ``dW = s * B @ A`` per target module,
``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``; ``rank_pattern`` / ``alpha_pattern`` per module)
(Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; Kalajdzievski,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023).

- :class:`AdapterCheckpoint` shows an adapter as the full model it stands for, tensor by tensor
  (base tensor + its ``dW``, computed when read), so every merge method and the streaming engine
  take adapters as inputs (:func:`~polytask.merge.engine.merge_checkpoints`, merge configs).
- :func:`merge_adapters` merges adapters into an adapter: exactly for ``linear`` and
  ``task_arithmetic`` (the factors concatenated, each model's coefficient and sign folded into
  its ``B``), otherwise through the merged ``dW`` and a truncated SVD to ``rank``, with the
  relative reconstruction error per module.
- :func:`extract_lora` makes an adapter from a full fine-tune by a truncated SVD of
  ``W_ft - W_base`` on the Linear weights (as ``mergekit-extract-lora``).

Key layouts (:func:`~polytask.merge.modules.namings_of`: Gemma 3, Mistral 3, Qwen2-VL/2.5-VL, the
LLaVA family): PEFT names an adapter's modules as the model held them in memory
(``model.language_model.layers.N...`` under transformers 5) and loads adapters in either layout.
An adapter read over a base saved in another layout is renamed into the base's; adapters
written here (merged, extracted) name their modules in transformers 5's in-memory layout, since
PEFT matches ``target_modules`` against those names whichever file layout the base came from.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.errors import CheckpointError, ConfigError
from polytask.merge.io import Checkpoint, TensorSpec

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "is_adapter", "split_lora_path", "LoraAdapter", "AdapterCheckpoint",
           "merge_adapters", "merge_config_to_adapter", "extract_lora"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# a factor's name: module.lora_A[.adapter].weight, or module.lora_embedding_A[.adapter]
_FACTOR = re.compile(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?")


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json`` or
    ``adapter_model.safetensors``; a missing one is named when it is opened)."""
    p = Path(path)
    return p.is_dir() and ((p / ADAPTER_CONFIG).is_file() or (p / ADAPTER_WEIGHTS).is_file())


def split_lora_path(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """mergekit's ``model+adapter`` syntax: ``(model, adapter)`` when ``path`` does not exist as
    written and its part after the last ``+`` is an adapter folder, else None."""
    text = str(path)
    if "+" not in text or Path(text).exists():
        return None
    model, adapter = text.rsplit("+", 1)
    return (model, adapter) if model and is_adapter(adapter) else None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class _Module:
    name: str  # module name in the base model, e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    rank: int
    scaling: float
    embedding: bool


class LoraAdapter:
    """A PEFT LoRA adapter read from its folder; factors are read from disk when asked for.

    ``modules`` maps each target module to its factors and scaling; ``replaced`` maps base tensors
    to the trained copies the adapter saves (``modules_to_save``, embedding layers). Bad adapters
    (missing files, another PEFT type, DoRA, trained biases, inconsistent ranks) raise
    :class:`~polytask.errors.CheckpointError` naming the file or tensor.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        cfg_path = self.path / ADAPTER_CONFIG
        weights = self.path / ADAPTER_WEIGHTS
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: adapter config is missing")
        if not weights.is_file():
            raise CheckpointError(f"{weights}: adapter weights are missing")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{cfg_path}: not a JSON object")
        self.config = cfg
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{cfg_path}: DoRA adapters (use_dora: true) are not supported")
        if cfg.get("bias", "none") != "none":
            raise CheckpointError(f"{cfg_path}: bias {cfg.get('bias')!r} is not supported (only 'none')")
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self.ckpt = Checkpoint(weights)
        try:
            self.modules = self._read_modules(cfg, cfg_path)
        except BaseException:
            self.ckpt.close()
            raise

    def _read_modules(self, cfg: dict[str, Any], cfg_path: Path) -> dict[str, _Module]:
        r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))
        found: dict[str, dict[str, str]] = {}
        # base tensor -> its saved, trained copy (modules_to_save, PEFT's save_embedding_layers)
        self.replaced: dict[str, str] = {}
        for key in self.ckpt.names():
            name = key.removeprefix(_PREFIX)
            m = _FACTOR.fullmatch(name)
            if m is None:  # checked against the base in check_base
                self.replaced[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = key
                continue
            module, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            found.setdefault(module, {})[part] = key
        modules: dict[str, _Module] = {}
        for module, parts in found.items():
            emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a, b = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
            if a not in parts or b not in parts:
                missing = a if a not in parts else b
                raise CheckpointError(f"{self.path / ADAPTER_WEIGHTS}: module {module!r} has no {missing}")
            sa, sb = self.ckpt.spec(parts[a]), self.ckpt.spec(parts[b])
            if len(sa.shape) != 2 or len(sb.shape) != 2 or sa.shape[0] != sb.shape[1]:
                raise CheckpointError(f"{self.path / ADAPTER_WEIGHTS}: module {module!r}: {a} {list(sa.shape)} "
                                      f"and {b} {list(sb.shape)} are not LoRA factors of one rank")
            rank = sa.shape[0]
            r = _pattern_value(rank_pattern, module, r0)
            if int(r) != rank:
                raise CheckpointError(f"{cfg_path}: module {module!r} has rank {rank} in the weights but r {r} in "
                                      "the config")
            alpha = float(_pattern_value(alpha_pattern, module, alpha0))
            scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
            modules[module] = _Module(module, parts[a], parts[b], rank, scaling, emb)
        if not modules:
            raise CheckpointError(f"{self.path / ADAPTER_WEIGHTS}: holds no LoRA factors")
        return modules

    def target(self, module: str) -> str:
        """The base tensor a module changes."""
        return f"{module}.weight"

    def factors(self, module: str) -> tuple[Tensor, Tensor]:
        """``(B * scaling, A)`` in float32: ``B @ A`` is the module's update in PEFT's factor layout."""
        m = self.modules[module]
        return self.ckpt.load(m.b_key).float() * m.scaling, self.ckpt.load(m.a_key).float()

    def transposed(self, module: str) -> bool:
        """Whether the weight is ``(B @ A).T`` (embeddings, fan_in_fan_out Conv1D)."""
        return self.modules[module].embedding or self.fan_in_fan_out

    def delta(self, module: str) -> Tensor:
        """The module's weight update ``dW`` (float32, the base weight's layout), as PEFT merges it."""
        m = self.modules[module]
        b, a = self.ckpt.load(m.b_key).float(), self.ckpt.load(m.a_key).float()
        d = b @ a
        return (d.T if self.transposed(module) else d) * m.scaling

    def rename_to_layout_of(self, base: Any, base_label: str) -> str:
        """Rename the adapter's modules into the key layout of ``base`` (a checkpoint whose folder's
        ``config.json`` names an architecture of :func:`~polytask.merge.modules.namings_of`): PEFT
        names them as the model it trained held them (``model.language_model.layers.N...`` under
        transformers 5, ``language_model.model.layers.N...`` under 4.x) and loads either into
        either. Returns the two layouts' names when they differ ("" otherwise) for messages."""
        from polytask.merge.modules import architecture_name, naming_of, namings_of

        path = Path(getattr(base, "path", ""))
        arch = architecture_name(path if path.is_dir() else path.parent)
        if not namings_of(arch):
            return ""
        target = naming_of(arch, base.names(), base_label)
        own = naming_of(arch, [*self.modules, *self.replaced], f"adapter {self.path}")
        if own == target:
            return ""

        def move(name: str) -> str:  # a module name is a prefix that ends before its dot
            return target.from_mergekit(own.to_mergekit(name + "."))[:-1]

        self.modules = {move(m): replace(spec, name=move(m)) for m, spec in self.modules.items()}
        self.replaced = {move(t): key for t, key in self.replaced.items()}
        return f" (renamed from the adapter's layout, {own.name}, to the base's, {target.name})"

    def check_base(self, base: Any, base_label: str) -> None:
        """Refuse an adapter whose modules are not in ``base`` or do not fit its shapes (after
        renaming them into the base's key layout, :meth:`rename_to_layout_of`)."""
        renamed = self.rename_to_layout_of(base, base_label)
        for t, key in self.replaced.items():
            if t not in base or tuple(base.spec(t).shape) != tuple(self.ckpt.spec(key).shape):
                raise CheckpointError(f"adapter {self.path}: saved layer {key!r} does not fit tensor {t!r} of base "
                                      f"{base_label}{renamed}; is the adapter for another base?")
        for module, m in self.modules.items():
            t = self.target(module)
            if t not in base:
                raise CheckpointError(f"adapter {self.path}: module {module!r} is not in base {base_label} "
                                      f"(no tensor {t!r}){renamed or _layout_hint(t, base)}; is the adapter for "
                                      "another base?")
            shape = tuple(base.spec(t).shape)
            b_rows = self.ckpt.spec(m.b_key).shape[0]
            a_cols = self.ckpt.spec(m.a_key).shape[1]
            want = (a_cols, b_rows) if self.transposed(module) else (b_rows, a_cols)
            if shape != want:
                raise CheckpointError(f"adapter {self.path}: module {module!r} updates a {list(want)} weight but "
                                      f"{t!r} is {list(shape)} in base {base_label}; is the adapter for another base?")

    def close(self) -> None:
        """Close the weights file."""
        self.ckpt.close()


def _layout_hint(name: str, base: Any) -> str:
    """Where the base's architecture has no layout tables but ``name`` is in the base under
    another LLaVA-style layout's name: a note naming both layouts."""
    from polytask.merge.modules import other_layout_of

    found = other_layout_of(name, base)
    if found is None:
        return ""
    return (f" (the adapter is in one key layout, {found[0].name}, the base in another, {found[1].name}, and polytask "
            "has no layout table for this architecture: save the base in the adapter's layout)")


class AdapterCheckpoint:
    """An adapter seen as the full model it stands for: the base's tensors, each target weight
    read as ``W0 + dW`` (computed in float32, returned in the base tensor's dtype).

    It has :class:`~polytask.merge.io.Checkpoint`'s reading interface, so the merge engine streams
    it like any checkpoint; the base's file handles stay owned by the caller.
    """

    def __init__(self, path: str | os.PathLike[str], base: Checkpoint, base_label: str,
                 *, owns_base: bool = False) -> None:
        self.path = Path(path)
        self.owns_base = owns_base
        try:
            self.adapter = LoraAdapter(path)
        except BaseException:
            if owns_base:
                base.close()
            raise
        try:
            self.adapter.check_base(base, base_label)
        except BaseException:
            self.close_all(base)
            raise
        self.base = base
        self._by_target = {self.adapter.target(m): m for m in self.adapter.modules}

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def spec(self, name: str) -> TensorSpec:
        return self.base.spec(name)

    def load(self, name: str) -> Tensor:
        saved = self.adapter.replaced.get(name)
        w = self.base.load(name) if saved is None else self.adapter.ckpt.load(saved).to(self.base.spec(name).dtype)
        module = self._by_target.get(name)
        if module is None:
            return w
        return (w.float() + self.adapter.delta(module)).to(w.dtype)

    def read_into(self, name: str, out: Tensor) -> None:
        out.copy_(self.load(name))

    def close_all(self, base: Checkpoint) -> None:
        self.adapter.close()
        if self.owns_base:
            base.close()

    def close(self) -> None:
        """Close the adapter's file (and the base's, when this object opened it)."""
        self.close_all(self.base)

    @classmethod
    def open_plus(cls, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> AdapterCheckpoint | None:
        """``model+adapter`` (mergekit's syntax) opened as that model with the adapter applied;
        None when ``path`` is not written so."""
        split = split_lora_path(path)
        if split is None:
            return None
        return cls(split[1], Checkpoint(split[0], allow_pickle=allow_pickle), split[0], owns_base=True)

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({str(self.path)!r})"


# -- writing adapters ----------------------------------------------------------------------------
def _adapter_config(r: int, modules: Sequence[str], *, base: str, fan_in_fan_out: bool,
                    task_type: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": False, "target_modules": sorted(modules),
        "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "base_model_name_or_path": base, "task_type": task_type,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }


def _pad(b: Tensor, a: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Zero-pad factors to rank ``r`` (a zero row/column adds nothing to ``B @ A``)."""
    k = a.shape[0]
    if k == r:
        return b, a
    return (torch.cat([b, b.new_zeros(b.shape[0], r - k)], 1), torch.cat([a, a.new_zeros(r - k, a.shape[1])], 0))


def _write_adapter(out_dir: str | os.PathLike[str], factors: Mapping[str, tuple[Tensor, Tensor, bool]],
                   config: dict[str, Any], overwrite: bool) -> Path:
    """Write ``module -> (B, A, embedding)`` (already of rank ``config['r']``) as a PEFT adapter
    folder through :class:`~polytask.merge.io.CheckpointWriter`: built in ``.OUT.partial-XXXXXXXX``
    under OUT's lock, it appears at ``out_dir`` only when complete, an existing OUT (``overwrite``)
    is renamed aside only then (so a kill before never loses it), and what a killed write left is
    removed by the next writer into OUT."""
    from polytask.merge.io import CheckpointWriter, TensorSpec

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"output {str(out_dir)!r} exists; pass overwrite (--overwrite) to replace it")
    tensors: dict[str, Tensor] = {}
    for module, (b, a, emb) in factors.items():
        if emb:
            tensors[f"{_PREFIX}{module}.lora_embedding_A"] = a.contiguous()
            tensors[f"{_PREFIX}{module}.lora_embedding_B"] = b.contiguous()
        else:
            tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.contiguous()
            tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    specs = {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}
    one_shard = sum(spec.nbytes for spec in specs.values()) + 1  # PEFT reads one file
    with CheckpointWriter(out, specs, max_shard_bytes=one_shard, overwrite=overwrite,
                          metadata={"format": "pt"}, preallocate=False) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
        writer.add_file(ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        (shard,) = writer.shard_names
        os.rename(writer.tmp_dir / shard, writer.tmp_dir / ADAPTER_WEIGHTS)  # PEFT's name; the open fd follows
        writer.commit()
    return out


def _svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``B``, ``A`` of rank ``min(rank, full)`` with ``B @ A`` the best approximation of ``delta``
    (singular values split evenly), and the relative Frobenius error of that approximation."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    total = float(s.square().sum())
    err = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    return (u[:, :k] * root).float(), (root[:, None] * vh[:k]).float(), err


def _check_rank(rank: int | None) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank: must be a positive integer, got {rank!r}")


# -- merging adapters into an adapter ------------------------------------------------------------
def _is_task_vector_method(cls: type) -> bool:
    """Methods whose result is ``base + f(models - base)`` with ``f`` elementwise-weighted sums of
    the deltas (so merging the ``dW`` alone around a zero base is the same merge): linear and the
    task-arithmetic family."""
    from polytask.merge.methods import _WeightedSum

    return issubclass(cls, _WeightedSum)


def merge_adapters(
    method: str | Any,
    adapters: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model_params: Sequence[Mapping[str, Any] | None] | None = None,
    method_params: Mapping[str, Any] | None = None,
    rank: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    knots: bool = False,
) -> tuple[Path, dict[str, float]]:
    """Merge LoRA adapters of ``base`` into one PEFT adapter at ``out_dir``.

    The result stands for the same model as :func:`~polytask.merge.engine.merge_checkpoints` with
    the adapters as models and ``base`` as base. ``linear`` and ``task_arithmetic`` (without
    ``rescale``) are exact with ``rank=None``: the factors are concatenated (rank = the sum of the
    ranks), each model's coefficient (``lambda * w_i``, divided by the summed weights with
    ``normalize``) folded into its ``B`` with its sign. Every other method (TIES, DARE...) merges
    the ``dW`` of each module (an adapter without the module counts as zero) and factors the
    result by a truncated SVD to ``rank`` (default: the sum of the ranks). Returns the output path
    and the relative Frobenius reconstruction error per module (0 where exact).

    ``knots``: KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025): per
    module, the updates side by side ``[dW_1 ... dW_n] = U S [V_1 ... V_n]^T`` (computed from the
    factors: a QR of the stacked ``B`` and an SVD of a ``sum(r) x n*d_in`` matrix), the method
    merges the aligned ``V_i^T`` and the result is ``U S V^T``: exact at rank ``sum(r)``, no SVD
    truncation. Task arithmetic with KnOTS equals plain task arithmetic.
    """
    from polytask.merge.engine import _merge_tensor, build_method, check_output_apart, resolve_model_params
    from polytask.merge.methods import Linear, TaskArithmetic

    _check_rank(rank)
    if not adapters:
        raise ConfigError("no adapters to merge")
    instance = build_method(method, method_params)
    if not _is_task_vector_method(type(instance)):
        raise ConfigError(f"merge method {type(instance).__name__}: adapters merge into an adapter only by linear "
                          "and the task-vector methods (task_arithmetic, ties, dare_*, breadcrumbs*, della*); "
                          "merge them into a full model instead")
    labels = [str(a) for a in adapters]
    check_output_apart(out_dir, [*(("input adapter", l, a) for l, a in zip(labels, adapters)),
                                 ("base model", str(base), base)])
    params = resolve_model_params(instance, model_params or [None] * len(adapters), labels)
    opened: list[Any] = []
    try:
        base_ckpt = Checkpoint(base)
        opened.append(base_ckpt)
        loras: list[LoraAdapter] = []
        for a in adapters:
            lora = LoraAdapter(a)
            opened.append(lora)
            lora.check_base(base_ckpt, str(base))
            loras.append(lora)
        for lo in loras:
            for t, key in lo.replaced.items():
                if not torch.equal(lo.ckpt.load(key), base_ckpt.load(t)):
                    raise ConfigError(f"adapter {lo.path}: its saved layer {key!r} differs from the base's {t!r}; "
                                      "merge it into a full model instead (merge_checkpoints)")
        ff = {lo.fan_in_fan_out for lo in loras}
        if len(ff) > 1:
            raise ConfigError("the adapters disagree on fan_in_fan_out; merge adapters of one layout")
        modules = sorted({m for lo in loras for m in lo.modules})
        for m in modules:
            kinds = {lo.modules[m].embedding for lo in loras if m in lo.modules}
            if len(kinds) > 1:
                raise ConfigError(f"module {m!r} is an embedding LoRA in some adapters and not in others")
        if knots and rank is not None:
            raise ConfigError("rank: KnOTS merges are exact at the summed rank of the inputs; give no rank")
        exact = rank is None and (type(instance) is Linear or (type(instance) is TaskArithmetic
                                                               and not getattr(instance, "rescale", False)))
        weights = params["weight"]
        coef = weights * getattr(instance, "lambda_", 1.0)
        if getattr(instance, "normalize", False):
            coef = coef / weights.sum()
        factors: dict[str, tuple[Tensor, Tensor, bool]] = {}
        errors: dict[str, float] = {}
        for m in modules:
            have = [(i, lo) for i, lo in enumerate(loras) if m in lo.modules]
            emb = have[0][1].modules[m].embedding
            if knots:
                b, a = _knots_merge(instance, m, have, len(loras), params, seed)
                factors[m] = (b, a, emb)
                errors[m] = 0.0
                continue
            if exact:
                bs, as_ = [], []
                for i, lo in have:
                    b, a = lo.factors(m)
                    bs.append(b * float(coef[i]))
                    as_.append(a)
                factors[m] = (torch.cat(bs, 1), torch.cat(as_, 0), emb)
                errors[m] = 0.0
                continue
            deltas = []  # in the weight's layout, so random masks are drawn as in the full-model merge
            for i, lo in enumerate(loras):
                if m in lo.modules:
                    deltas.append(lo.delta(m))
                else:
                    deltas.append(None)
            ref = next(d for d in deltas if d is not None)
            stacked = torch.stack([d if d is not None else torch.zeros_like(ref) for d in deltas])
            merged = _merge_tensor(instance, have[0][1].target(m), stacked, torch.zeros_like(ref), params, seed)
            want = rank if rank is not None else sum(lo.modules[m].rank for _, lo in have)
            flip = have[0][1].transposed(m)
            b, a, err = _svd_factors(merged.float().T if flip else merged.float(), want)
            factors[m] = (b, a, emb)
            errors[m] = err
        r = max(a.shape[0] for _, a, _ in factors.values())
        factors = {m: (*_pad(b, a, r), emb) for m, (b, a, emb) in factors.items()}
        factors, errors = _named_for_peft(base, base_ckpt.names(), str(base), factors, errors)
        modules = list(factors)
        tasks = {lo.config.get("task_type") for lo in loras}
        cfg = _adapter_config(r, modules, base=str(loras[0].config.get("base_model_name_or_path") or base),
                              fan_in_fan_out=ff.pop(), task_type=tasks.pop() if len(tasks) == 1 else None)
        return _write_adapter(out_dir, factors, cfg, overwrite), errors
    finally:
        for o in opened:
            o.close()


def _knots_merge(instance: Any, module: str, have: list[tuple[int, LoraAdapter]], n: int,
                 params: dict[str, Tensor], seed: int) -> tuple[Tensor, Tensor]:
    """KnOTS for one module: ``(B, A)`` of ``U S merge(V_i^T)`` (B @ A layout)."""
    from polytask.merge.engine import _merge_tensor

    parts = {i: lo.factors(module) for i, lo in have}
    bs = torch.cat([parts[i][0] for i, _ in have], 1).double()
    q, r = torch.linalg.qr(bs)  # [B_1..B_n] = Q R
    d_in = parts[have[0][0]][1].shape[1]
    blocks, col = [], 0
    for i in range(n):
        if i in parts:
            k = parts[i][1].shape[0]
            blocks.append(r[:, col:col + k] @ parts[i][1].double())
            col += k
        else:
            blocks.append(r.new_zeros(r.shape[0], d_in))
    u, s, vh = torch.linalg.svd(torch.cat(blocks, 1), full_matrices=False)
    keep = int((s > s[0] * 1e-10).sum()) if s.numel() and float(s[0]) > 0 else 0
    keep = max(keep, 1)
    v = vh[:keep].reshape(keep, n, d_in).transpose(0, 1)  # (n, k, d_in): each model's aligned V_i^T
    merged = _merge_tensor(instance, f"{module}.knots", v.float().contiguous(), torch.zeros_like(v[0]).float(),
                           params, seed)
    return ((q @ u[:, :keep]) * s[:keep]).float(), merged.float()


# -- extraction ----------------------------------------------------------------------------------
_NOT_LINEAR = re.compile(r"(^|\.)(embed_tokens|embed_positions|embeddings?|wte|wpe|word_embeddings|"
                         r"position_embeddings|token_type_embeddings)\.weight$")


def extract_lora(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    rank: int,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> tuple[Path, dict[str, float]]:
    """A PEFT LoRA adapter of ``base`` approximating the full fine-tune ``finetuned``.

    For each 2-D weight of a Linear layer (embeddings are left out) that differs between the two,
    ``W_ft - W_base`` is factored by a truncated SVD to ``rank`` (capped by the matrix's full
    rank, so a large enough ``rank`` reconstructs exactly); one weight is in memory at a time.
    Returns the output path and the relative Frobenius error per module (as
    ``mergekit-extract-lora``; Hu et al. 2022 for LoRA).
    """
    from polytask.merge.engine import check_output_apart

    _check_rank(rank)
    if rank is None:
        raise ConfigError("rank: must be a positive integer, got None")
    check_output_apart(out_dir, [("base model", str(base), base), ("fine-tuned model", str(finetuned), finetuned)])
    with Checkpoint(base, allow_pickle=allow_pickle) as b_ckpt, \
            Checkpoint(finetuned, allow_pickle=allow_pickle) as f_ckpt:
        in_ft, renamed = _names_in_layout_of(base, b_ckpt.names(), f_ckpt.names(), str(base), str(finetuned))
        names = []
        for name in b_ckpt.names():
            spec = b_ckpt.spec(name)
            if not (name.endswith(".weight") and len(spec.shape) == 2 and spec.dtype.is_floating_point):
                continue
            if _NOT_LINEAR.search(name):
                continue
            if in_ft(name) not in f_ckpt:
                raise CheckpointError(f"tensor {name!r} is in base {base} but {in_ft(name)!r} is missing from "
                                      f"fine-tuned {finetuned}{renamed}")
            if tuple(f_ckpt.spec(in_ft(name)).shape) != tuple(spec.shape):
                raise CheckpointError(f"tensor {name!r} is {list(spec.shape)} in base {base} but "
                                      f"{list(f_ckpt.spec(in_ft(name)).shape)} in fine-tuned {finetuned}")
            names.append(name)
        factors: dict[str, tuple[Tensor, Tensor, bool]] = {}
        errors: dict[str, float] = {}
        for name in names:  # named in the base's layout here, as PEFT names them when written
            delta = f_ckpt.load(in_ft(name)).double() - b_ckpt.load(name).double()
            if not bool(delta.any()):
                continue
            b, a, err = _svd_factors(delta, rank)
            module = name.removesuffix(".weight")
            factors[module] = (b, a, False)
            errors[module] = err
        if not factors:
            raise CheckpointError(f"no Linear weight of {finetuned} differs from base {base}; nothing to extract")
        r = max(a.shape[0] for _, a, _ in factors.values())
        factors = {m: (*_pad(b, a, r), emb) for m, (b, a, emb) in factors.items()}
        factors, errors = _named_for_peft(base, b_ckpt.names(), str(base), factors, errors)
        cfg = _adapter_config(r, list(factors), base=str(base), fan_in_fan_out=False, task_type=None)
        return _write_adapter(out_dir, factors, cfg, overwrite), errors


def _named_for_peft(base: str | os.PathLike[str], base_names: Sequence[str], base_label: str,
                    factors: dict[str, Any], errors: dict[str, float]) -> tuple[dict[str, Any], dict[str, float]]:
    """``factors`` and ``errors`` with their modules (named in the base's key layout) renamed to
    transformers 5's in-memory names where the architecture has other layouts: PEFT names an
    adapter's modules so and matches ``target_modules`` against them, whichever layout the base
    was loaded from (a ``language_model.model.layers.0.q_proj`` target matches no module of a
    5.x model, so such an adapter would load as no change)."""
    from polytask.merge.modules import architecture_name, memory_naming, naming_of

    folder = Path(base) if Path(base).is_dir() else Path(base).parent
    arch = architecture_name(folder)
    target = memory_naming(arch)
    if target is None:
        return factors, errors
    own = naming_of(arch, base_names, base_label)
    if own == target:
        return factors, errors

    def move(module: str) -> str:
        return target.from_mergekit(own.to_mergekit(module + "."))[:-1]

    return {move(m): f for m, f in factors.items()}, {move(m): e for m, e in errors.items()}


def _names_in_layout_of(base: str | os.PathLike[str], base_names: Sequence[str], other_names: Sequence[str],
                        base_label: str, other_label: str) -> tuple[Any, str]:
    """A map from the base's tensor names to another checkpoint's (both of the architecture the
    base folder's ``config.json`` names), renaming across key layouts
    (:func:`~polytask.merge.modules.namings_of`), and a note naming both layouts when they differ."""
    from polytask.merge.modules import architecture_name, naming_of, namings_of

    folder = Path(base) if Path(base).is_dir() else Path(base).parent
    arch = architecture_name(folder)
    if not namings_of(arch):
        return (lambda name: name), ""
    own, other = naming_of(arch, base_names, base_label), naming_of(arch, other_names, other_label)
    if own == other:
        return (lambda name: name), ""
    return (lambda name: other.from_mergekit(own.to_mergekit(name))), (
        f" (read in its layout, {other.name}, for the base's, {own.name})")


def merge_config_to_adapter(
    config_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    rank: int | None = None,
    overwrite: bool = False,
) -> tuple[Path, dict[str, float]]:
    """Run a merge config whose models are all LoRA adapters of its ``base_model`` into an adapter
    (:func:`merge_adapters`) instead of a full model: ``polytask merge CONFIG OUT --adapter``.

    Takes a one-document ``models:`` config of a task-vector method (one that merges around the
    base: task_arithmetic, ties, dare_*, breadcrumbs*, della*...) with plain numbers as
    parameters; anything else is a one-line ConfigError naming the key or model.
    """
    from polytask.merge.config import load_merge_config
    from polytask.merge.methods import MERGE_METHODS
    from polytask.merge.plan import IGNORED, RENAMED

    written = load_merge_config(config_path)
    cfg = written.with_paths_from(Path(config_path).parent)
    if cfg.models is None:
        raise ConfigError(f"{config_path}: adapter output takes a models: config (not slices)")
    if cfg.base_model is None:
        raise ConfigError(f"{config_path}: adapter output needs base_model (the adapters' base)")
    method_cls = MERGE_METHODS.lookup(cfg.merge_method)
    if not (_is_task_vector_method(method_cls) and method_cls.requires_base):
        raise ConfigError(f"{config_path}: merge_method: adapter output needs a method that merges around the "
                          f"base (task_arithmetic, ties, dare_ties...), got {cfg.merge_method!r}")

    def plain(where: str, params: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in params.items():
            if key in IGNORED:
                continue
            if isinstance(value, (list, dict)):
                raise ConfigError(f"{config_path}: {where}{key}: per-layer values (gradients, filters) are not "
                                  "supported for adapter output; give one number")
            out[RENAMED.get(key, key)] = value
        return out

    entries = [(e, w) for e, w in zip(cfg.models, written.models or [])
               if os.path.normpath(e.model) != os.path.normpath(cfg.base_model)]
    for e, w in entries:
        if not is_adapter(e.model):
            raise ConfigError(f"{config_path}: model {w.model}: adapter output needs every model to be a LoRA "
                              "adapter folder of base_model")
    if not entries:
        raise ConfigError(f"{config_path}: models: no adapters to merge")
    glob = plain("parameters.", cfg.parameters)
    per_model_keys = set(getattr(method_cls, "model_params", {}))
    defaults = {k: v for k, v in glob.items() if k in per_model_keys}  # mergekit: top-level per-model defaults
    glob = {k: v for k, v in glob.items() if k not in per_model_keys}
    return merge_adapters(
        cfg.merge_method, [e.model for e, _ in entries], cfg.base_model, out_dir,
        model_params=[{**defaults, **plain(f"model {w.model}: parameters.", e.parameters)} for e, w in entries],
        method_params=glob, rank=rank, seed=cfg.seed, overwrite=overwrite)
