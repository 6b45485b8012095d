"""``model.arch: adapters``: a Hugging Face ``transformers`` backbone wrapped with multi-task adapters.

The backbone is frozen and wrapped in place by :func:`polytask.adapters.apply`; one tower per
task (:class:`~polytask.nn.base.TaskHeads`) reads a pooled token representation (``cls``: the
first token, ``mean``: the mean over real tokens, ``last``: the last real token, for decoder
models with right padding). A token-level task (:class:`~polytask.token_tasks.TokenTask`:
tagging, per-token regression) has its tower applied to every token's last hidden state instead
(its output ``(B, L, width)``; the loss averages over the labelled real tokens, see
:mod:`polytask.token_tasks`). The run config names the backbone by a local path or an inline
config (a tiny random model in tests; nothing is downloaded)::

    model:
      arch: adapters
      params:
        backbone: {config: {model_type: bert, hidden_size: 32, num_hidden_layers: 2, ...}}   # or {path: ./my-model}
        method: molora          # any name of polytask.adapters (lora, mtlora, hydralora, molora, loramoe, ...)
        target_modules: [query, value]
        rank: 4
        method_params: {num_experts: 4, top_k: 2}
        pooling: cls

How a batch runs (inputs from :mod:`polytask.data.sequences`):

- with ``task_ids`` in the inputs (a mixed-task batch, each row labelled for one task): one
  forward, each row under its own task;
- else, for a method whose layers read the task (``lora``, ``mtlora``, ``poly``/``mhr``,
  ``loramoe``'s balancing loss): the batch repeated once per task, ``T * B`` rows in one forward,
  block ``t`` under task ``t``; the towers read their own block (``task_features``, ``(T, B, H)``);
- else (token routers: ``hydralora``, ``molora``, ``smora``, ``arrow``): one forward of ``B`` rows,
  the pooled ``(B, H)`` representation shared by the towers (``shared_features``).

With a token-level task the representation the towers read is the last hidden state itself:
``shared_features`` is ``(B, L, H)`` (``(T, B, L, H)`` when the batch ran once per task), pooled
towers pool it and token towers read every token. For a gradient balancer
(:meth:`AdapterModel.expose_task_features`) ``task_features`` is ``(T, B, L, H)``, slice ``t`` read by
task ``t``'s tower only (a stride-0 copy per task when the batch ran once for all).
Padding tokens are left out of the routers' balancing losses and expert usage
(:func:`polytask.adapters.set_token_mask`) and of the token tasks' losses and metrics (they carry
no label).

``arrow`` routes zero-shot over a given library (``peft_adapters``): its LoRAs stay frozen and
only the towers train.

``shared_parameters()`` are the adapter parameters every task uses (what a gradient balancer
balances); the per-task adapter rows and the towers are task-specific. Checkpoints hold the
adapters, the towers and a digest of the frozen backbone, not the backbone itself: the backbone
is rebuilt from the config, and a checkpoint taken on a different backbone is refused.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polytask import adapters
from polytask.errors import CheckpointError, ConfigError
from polytask.nn.base import MultiTaskModel, TaskHeads
from polytask.nn.registry import ARCHITECTURES
from polytask.tasks import Task
from polytask.token_tasks import level_of

#: methods whose layers read the task of each row (the rest route tokens without it)
TASK_CONDITIONED = frozenset({"lora", "mtlora", "poly", "mhr", "loramoe"})


def load_backbone(spec: dict[str, Any]) -> nn.Module:
    """A ``transformers`` base model (``AutoModel``) from ``{path: dir}`` or ``{config: {model_type: ..., ...}}``."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec), None) not in ("path", "config"):
        raise ConfigError(f"model.params.backbone: give exactly one of 'path' (a local model folder) or 'config' "
                          f"(an inline transformers config with model_type), got {spec!r}")
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.params.backbone: needs the transformers package (pip install polytask[adapters])") \
            from None
    transformers.logging.set_verbosity_error()
    if "path" in spec:
        folder = Path(str(spec["path"])).expanduser()
        if not folder.is_dir():  # before transformers, which reads a missing folder as a Hub repo id
            what = "is not a folder" if folder.exists() else "no such folder"
            raise ConfigError(f"model.params.backbone.path: {what}: {str(spec['path'])!r}")
        try:
            return transformers.AutoModel.from_pretrained(str(spec["path"]), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"model.params.backbone.path: cannot load a model from {str(spec['path'])!r}: {line}") \
                from None
    cfg = dict(spec["config"] or {})
    model_type = cfg.pop("model_type", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
        return transformers.AutoModel.from_config(config)
    except (ValueError, TypeError, KeyError) as exc:
        line = str(exc).strip().splitlines()[0][:200]
        raise ConfigError(f"model.params.backbone.config: cannot build model_type {model_type!r}: {line}") from None


#: the run config key of each argument of :func:`polytask.adapters.apply` (the rest are method_params)
_CONFIG_KEYS = {"method": "model.params.method", "rank": "model.params.rank", "alpha": "model.params.alpha",
                "target_modules": "model.params.target_modules", "tasks": "data.tasks"}


def config_key_message(message: str) -> str:
    """An error of :func:`polytask.adapters.apply` (``adapters.KEY: ...``, its Python API's names)
    worded with the key of the run config that the user wrote (``model.params.method``,
    ``model.params.method_params.top_k``, ...)."""
    head, sep, rest = message.partition(":")
    if not sep or not head.startswith("adapters.") or not head[len("adapters."):].isidentifier():
        return message
    key = head[len("adapters."):]
    if key == "apply":  # not a key: "the model already has adapters"
        return message
    return f"{_CONFIG_KEYS.get(key, f'model.params.method_params.{key}')}:{rest}"


def _task_rows(index: list[int]) -> slice | list[int]:
    """Rows ``index`` of a per-task ``(T, ...)`` tensor: a slice (a view) when they are consecutive,
    as when the pooled tasks come before the token tasks; else the list (indexing copies)."""
    consecutive = bool(index) and index == list(range(index[0], index[-1] + 1))
    return slice(index[0], index[-1] + 1) if consecutive else index


def _digest(params: Sequence[Tensor]) -> Tensor:
    """Sum and sum of squares of the frozen backbone's weights (float64): tells one backbone from another."""
    flat = [p.detach().double().reshape(-1) for p in params]
    if not flat:
        return torch.zeros(2, dtype=torch.float64)
    return torch.stack([sum(f.sum() for f in flat), sum(f.square().sum() for f in flat)])


class AdapterModel(MultiTaskModel):
    """A frozen transformers backbone with multi-task adapters and one tower per task (see the module docstring).

    Args:
        input_dim: the data's input spec (unused: the backbone reads token ids).
        tasks: the tasks, one tower each.
        backbone: ``{path: ...}`` or ``{config: {...}}`` (:func:`load_backbone`).
        method, target_modules, rank, alpha, method_params: passed to :func:`polytask.adapters.apply`.
        pooling: ``cls``, ``mean`` or ``last`` (see the module docstring).
        head_hidden: hidden widths of each task's tower (empty: a linear head).
        aux_weight: weight of the routers' balancing loss (``aux_loss``; methods without one: unused).
        one_adapter: one set of adapters for all tasks (the "one shared LoRA" baseline): the
            adapters are built for a single task that every row runs under, and all their
            parameters are shared.
        peft_adapters: ``{task: folder}``: start each named task's LoRA from a PEFT LoRA adapter
            (:func:`polytask.adapters.load_peft`; e.g. an Arrow library). CheckpointError naming the
            tensor when an adapter was trained on a different base (shape mismatch).
    """

    def __init__(self, input_dim: Any, tasks: Sequence[Task], backbone: dict[str, Any], method: str = "lora",
                 target_modules: str | list[str] = ("query", "value"), rank: int = 8, alpha: float | None = None,
                 method_params: dict[str, Any] | None = None, pooling: Literal["cls", "mean", "last"] = "cls",
                 head_hidden: Sequence[int] = (), aux_weight: float = 0.01, one_adapter: bool = False,
                 peft_adapters: dict[str, str] | None = None) -> None:
        super().__init__(tasks)
        if pooling not in ("cls", "mean", "last"):
            raise ConfigError(f"model.params.pooling must be cls, mean or last, got {pooling!r}")
        if not isinstance(aux_weight, (int, float)) or aux_weight < 0:
            raise ConfigError(f"model.params.aux_weight must be a number >= 0, got {aux_weight!r}")
        self.backbone = load_backbone(backbone)
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.one_adapter = bool(one_adapter)
        try:
            adapters.apply(self.backbone, method, ["all"] if self.one_adapter else self.task_names, targets,
                           rank=rank, alpha=alpha, **(method_params or {}))
        except ConfigError as exc:
            raise ConfigError(config_key_message(str(exc))) from None
        self.method = adapters.method_of(self.backbone)
        for task, folder in (peft_adapters or {}).items():
            if task not in self.task_names:
                raise ConfigError(f"model.params.peft_adapters: unknown task {task!r}; "
                                  f"known: {', '.join(self.task_names)}")
            adapters.load_peft(self.backbone, folder, task=task)
        if self.method == "arrow":  # zero-shot routing over a given library: training it would stale the prototypes
            for p in adapters.task_parameters(self.backbone):
                p.requires_grad_(False)
        self.task_conditioned = self.method in TASK_CONDITIONED and not self.one_adapter
        self.pooling, self.aux_weight = pooling, float(aux_weight)
        width = self.backbone.config.hidden_size
        token = [i for i, t in enumerate(tasks) if level_of(t) == "token"]
        pooled = [i for i in range(len(tasks)) if i not in token]
        # all pooled (the usual case): one TaskHeads named ``heads``, as before token towers existed
        self.heads = TaskHeads([tasks[i] for i in pooled], width, hidden=tuple(head_hidden)) if pooled else None
        self.token_heads = TaskHeads([tasks[i] for i in token], width, hidden=tuple(head_hidden)) if token else None
        self._pooled_rows, self._token_rows = _task_rows(pooled), _task_rows(token)
        self._copies = False  # expose_task_features: per-task copies of the hidden states (token towers)
        self._frozen_keys = self._backbone_keys()
        state = super().state_dict()
        self.register_buffer("backbone_digest", _digest([state[k] for k in sorted(self._frozen_keys)
                                                         if state[k].is_floating_point()]))
        self._owner: Tensor | None = None      # task of each row of the last forward (None: every task)

    def _backbone_keys(self) -> frozenset[str]:
        """State-dict keys of the frozen backbone (left out of checkpoints): not an adapter's, not trainable."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        for name, layer in adapters.adapter_layers(self.backbone).items():
            prefix = f"backbone.{name}."
            keep |= {prefix + k for k in layer.state_dict() if not k.startswith("base.")}
        return frozenset(k for k in super().state_dict() if k.startswith("backbone.") and k not in keep)

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise ConfigError("model.arch adapters: inputs must be a dict with 'input_ids' (a token-sequence data "
                              "set: sequence_tasks or token_file)")
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        rows, t = ids.shape[0], len(self.task_names)
        task_ids = None if self.one_adapter else inputs.get("task_ids")
        expand = task_ids is None and self.task_conditioned
        if expand:  # every row once per task, in one forward: block t serves task t
            ids, mask = ids.repeat(t, 1), mask.repeat(t, 1)
            task_ids = torch.arange(t, device=ids.device).repeat_interleave(rows)
        self._owner = task_ids
        adapters.set_task(self.backbone, 0 if self.one_adapter else task_ids)
        adapters.set_token_mask(self.backbone, mask)
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.token_heads is not None:
            return self._read_tokens(hidden, mask, t if expand else 0)
        pooled = self._pool(hidden, mask)
        if expand:
            pooled = pooled.reshape(t, rows, -1)
        self.shared_features = pooled
        return self.read_heads(pooled)

    def _pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """``(..., B, L, H)`` hidden states, ``(B, L)`` mask -> ``(..., B, H)`` (leading per-task dims kept)."""
        if self.pooling == "cls":
            return hidden[..., 0, :]
        m = mask.to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * m[..., None]).sum(-2) / m.sum(-1, keepdim=True).clamp_min(1)
        last = (mask.long().sum(1) - 1).clamp_min(0)          # right padding: the last real token
        index = last.view(-1, 1, 1).expand(*hidden.shape[:-2], 1, hidden.shape[-1])
        return hidden.gather(-2, index).squeeze(-2)

    def _read_tokens(self, hidden: Tensor, mask: Tensor, blocks: int) -> dict[str, Tensor]:
        """Pooled and token towers on the hidden states (``blocks``: the batch ran once per task, block
        ``t`` of the rows under task ``t``; 0: once for all). Token tower ``t`` maps each of the ``B * L``
        tokens (padding too: it carries no label) to ``(B, L, width)``."""
        t = len(self.task_names)
        if blocks:  # (T*B, L, H) -> per-task blocks, read by their own task only
            rows = hidden.shape[0] // t
            per_task, mask = hidden.reshape(t, rows, *hidden.shape[1:]), mask[:rows]
            self.shared_features = self.task_features = per_task
        elif self._copies:  # one stride-0 copy per task: one backward gives each task's feature gradient
            per_task = hidden.unsqueeze(0).expand(t, *hidden.shape)
            self.shared_features, self.task_features = hidden, per_task
        else:
            per_task = None
            self.shared_features, self.task_features = hidden, None
        out: dict[str, Tensor] = {}
        if self.heads is not None:
            pooled = self._pool(hidden if per_task is None else per_task[self._pooled_rows], mask)
            out.update(self.heads(pooled))
        source = hidden if per_task is None else per_task[self._token_rows]
        tokens = self.token_heads(source.flatten(-3, -2))      # (B * L, H) or (T_token, B * L, H) rows
        shape = hidden.shape[-3:-1] if per_task is None else per_task.shape[1:3]
        out.update({name: y.reshape(*shape, y.shape[-1]) for name, y in tokens.items()})
        return {name: out[name] for name in self.task_names}

    @property
    def aux_loss(self) -> Tensor | None:
        """``aux_weight`` times the routers' balancing losses of the last forward (None without a router loss)."""
        layers = adapters.adapter_layers(self.backbone).values()
        if self.aux_weight == 0 or not any(getattr(m, "aux_loss", None) is not None for m in layers):
            return None
        return self.aux_weight * adapters.aux_loss(self.backbone)

    # ------------------------------------------------------------------ parameters
    def shared_parameters(self) -> list[nn.Parameter]:
        """The adapter parameters every task uses (empty for one LoRA per task: nothing to balance)."""
        shared = adapters.shared_parameters(self.backbone)
        return shared + adapters.task_parameters(self.backbone) if self.one_adapter else shared

    def expose_task_features(self, enabled: bool = True) -> AdapterModel:
        """As :meth:`MultiTaskModel.expose_task_features` (the Trainer calls it for a gradient balancer);
        ConfigError when no trainable parameter is shared: such a balancer would have nothing to balance."""
        if enabled and not self.shared_parameters():
            raise ConfigError(f"balancer.name: a gradient balancer needs adapter parameters shared by the tasks; "
                              f"method {self.method!r} has none here (use a loss balancer such as ew, or a method "
                              f"with shared parameters: mtlora, hydralora, molora, loramoe, smora, poly)")
        super().expose_task_features(enabled)
        self._copies = enabled
        return self

    def task_specific_parameters(self) -> list[nn.Parameter]:
        own = [] if self.one_adapter else adapters.task_parameters(self.backbone)
        towers = [h for h in (self.heads, self.token_heads) if h is not None]
        return own + [p for h in towers for p in h.parameters()]

    # ------------------------------------------------------------------ state: adapters and towers only
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in self._frozen_keys:
            state.pop(prefix + key, None)
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        saved = state.get("backbone_digest")
        if saved is not None and not torch.allclose(saved.double().cpu(), self.backbone_digest.cpu(),
                                                    rtol=1e-9, atol=1e-6):
            raise CheckpointError("backbone_digest: the checkpoint's adapters were trained on a different backbone "
                                  f"(digest {saved.tolist()} vs this model's {self.backbone_digest.tolist()})")
        full = super().state_dict()
        merged = {**{k: full[k] for k in self._frozen_keys}, **state}
        result = super().load_state_dict(merged, strict=strict, assign=assign)
        for layer in adapters.adapter_layers(self.backbone).values():
            if hasattr(layer, "refresh"):
                layer.refresh()                  # Arrow: prototypes of the loaded library
        return result


class RoutedAdapterModel(AdapterModel):
    """An :class:`AdapterModel` whose adapters route tokens: exposes ``gate_weights`` for expert usage."""

    @property
    def gate_weights(self) -> dict[str, Tensor] | None:
        """``{task: (tokens, E)}``: the routers' gates of the last forward, mean over the routed layers,
        for the real tokens of the rows serving each task (every row serves every task when the
        batch ran once for all). For analysis (boolean indexing synchronises with the device)."""
        context = adapters.adapter_layers(self.backbone)
        gates = [m.gate_weights for m in context.values() if m.gate_weights is not None]
        mask = adapters.token_mask(self.backbone)
        if not gates or mask is None:
            return None
        n = mask.numel()
        gates = [g for g in gates if g.shape[0] == n and g.shape[1] == gates[0].shape[1]]
        if not gates:
            return None
        g = torch.stack(gates).mean(0)                       # (rows * L, E)
        real = mask.reshape(-1) != 0
        if self._owner is None:
            return {name: g[real] for name in self.task_names}
        owner = self._owner.repeat_interleave(mask.shape[1])
        return {name: g[real & (owner == i)] for i, name in enumerate(self.task_names)}


@ARCHITECTURES.register("adapters", "transformer_adapters")
def build_adapter_model(input_dim: Any, tasks: Sequence[Task], backbone: dict[str, Any], method: str = "lora",
                        target_modules: str | list[str] = ("query", "value"), rank: int = 8,
                        alpha: float | None = None, method_params: dict[str, Any] | None = None,
                        pooling: str = "cls", head_hidden: Sequence[int] = (), aux_weight: float = 0.01,
                        one_adapter: bool = False, peft_adapters: dict[str, str] | None = None) -> AdapterModel:
    """Build an :class:`AdapterModel` (a :class:`RoutedAdapterModel` for a method whose layers route tokens)."""
    try:
        key = adapters.canonical_method(method)
    except ConfigError as exc:
        raise ConfigError(config_key_message(str(exc))) from None
    cls = RoutedAdapterModel if adapters.is_routed_method(key) else AdapterModel
    return cls(input_dim, tasks, backbone, method, target_modules, rank, alpha, method_params, pooling,
               head_hidden, aux_weight, one_adapter, peft_adapters)


build_adapter_model.token_outputs = True  # towers for token-level tasks (polytask.token_tasks.check_token_outputs)


def export_adapters(run_dir: str | Path, out: str | Path, peft_task: str | None = None, peft: bool = False) -> Path:
    """Write a run's best adapters alone into the new folder ``out``; returns it.

    Default: polytask's format (:func:`polytask.adapters.save`: every adapter tensor and the
    method's config) plus the towers (``heads.safetensors``; token-level towers under ``token_heads.``).
    ``peft=True``: PEFT's format (:func:`polytask.adapters.save_peft`), which
    ``peft.PeftModel.from_pretrained`` loads onto the backbone: one task's LoRA (``peft_task``) for ``lora``/``mtlora``, all tasks for ``poly``/``mhr``.
    ConfigError for a run that is not ``model.arch: adapters``, an existing ``out`` or an unknown
    task; CheckpointError when the run has no best checkpoint or it does not fit.
    """
    from safetensors.torch import save_file

    from polytask.train.checkpoint import PARTIAL, atomic_write, load_model_file, load_state_checked
    from polytask.train.config import load_config
    from polytask.train.rundir import remove_stale_builds
    from polytask.train.trainer import Trainer

    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise ConfigError(f"export-adapters: {str(out)!r} exists; give a new folder")
    config = load_config(run_dir / "config.yaml")
    if ARCHITECTURES.lookup(config.model.arch) is not build_adapter_model:
        raise ConfigError(f"export-adapters: {str(run_dir)!r} is a {config.model.arch!r} run, not model.arch adapters")
    best = run_dir / "best" / "model.safetensors"
    if not best.exists():
        raise CheckpointError(f"export-adapters: {str(best)!r} not found (train the run first)")
    model = Trainer(config, progress=False).model
    load_state_checked(model, load_model_file(best), best)
    # built whole in a hidden sibling, renamed at the end: a kill leaves no OUT (which would refuse
    # every rerun) but .OUT.<pid>.partial, which the next export into OUT removes
    remove_stale_builds(out)
    tmp = out.parent / f".{out.name}.{os.getpid()}{PARTIAL}"
    try:
        if peft or peft_task is not None:
            adapters.save_peft(model.backbone, tmp, task=peft_task)
        else:
            adapters.save(model.backbone, tmp)
            towers = {**({} if model.heads is None else model.heads.state_dict()),
                      **({} if model.token_heads is None else
                         {f"token_heads.{k}": v for k, v in model.token_heads.state_dict().items()})}
            heads = {k: v.detach().cpu().contiguous() for k, v in towers.items()}
            atomic_write(tmp / "heads.safetensors", lambda f: save_file(heads, f))
        if out.exists():  # another command created it meanwhile (a rename would replace an empty folder)
            raise ConfigError(f"export-adapters: {str(out)!r} exists; give a new folder")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
