"""The contract every polytask model keeps (docs/architecture.md, "Data flow of one training step").

A model is an ``nn.Module`` whose ``forward`` returns ``dict[task, Tensor]``; it says which
parameters are shared (``shared_parameters()``) and, where it has one, exposes the shared
representation the heads read as ``shared_features`` after each forward (for feature-level
gradients).

A model may also expose ``task_features``: a ``(T, B, ...)`` tensor whose slice ``t`` is read by
task ``t``'s head only (and nothing else of any loss reads the trunk). Either the heads' per-task
copies of ``shared_features`` (``shared_features.expand(T, ...)``, as :class:`TaskHeads` makes
them), or the per-task representations themselves (a routed model's expert mixtures, then
``task_features is shared_features``). Then ``∂(Σ_t L_t)/∂task_features`` has slice ``t`` equal to
``∂L_t/∂(slice t)``: every task's feature gradient from ONE backward through the heads, which the
gradient engine uses (:class:`~polytask.balance.engine.GradientBalancer`, ``task_features=``).
:class:`TaskHeads` makes its copies only once switched on (:meth:`MultiTaskModel.expose_task_features`):
their per-task gradient is a ``(T, B, H)`` tensor that a plain summed-loss step does not need.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.nn.layers import BatchedMLP
from polytask.tasks import Task


class _Transient:
    """Holds a tensor of the last forward (with its graph); copies and pickles as empty.

    A non-leaf tensor cannot be deep-copied, so a model (or head) that keeps one from its last
    forward would break ``copy.deepcopy(model)``; the value means nothing outside that step.
    """

    __slots__ = ("value",)

    def __init__(self, value: Tensor | None = None) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> _Transient:
        return _Transient()

    def __getstate__(self) -> tuple[()]:
        return ()  # not None: pickle then calls __setstate__

    def __setstate__(self, state: tuple[()]) -> None:
        self.value = None


def _transient_property(name: str, doc: str) -> property:
    """A ``Tensor | None`` attribute ``name`` kept in a :class:`_Transient` (see there)."""
    slot = "_transient_" + name

    def get(self) -> Tensor | None:
        holder = self.__dict__.get(slot)
        return None if holder is None else holder.value

    def set(self, value: Tensor | None) -> None:
        self.__dict__[slot] = _Transient(value)

    return property(get, set, doc=doc)


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    """ConfigError naming ``model.params.<name>`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.params.{name} must be an integer >= {minimum}, got {value!r}")


def check_widths(name: str, widths: Sequence[int], allow_empty: bool = False) -> tuple[int, ...]:
    """ConfigError naming ``model.params.<name>`` unless ``widths`` is a (non-empty) list of positive ints."""
    widths = tuple(widths)
    if (not widths and not allow_empty) or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                                               for w in widths):
        need = "a list of positive integers" + ("" if allow_empty else " with at least one entry")
        raise ConfigError(f"model.params.{name} must be {need}, got {list(widths)!r}")
    return widths


class MultiTaskModel(nn.Module):
    """Base class: holds the tasks and splits parameters into shared and task-specific ones.

    Subclasses put task-specific modules under ``self.heads`` (any module); every other
    parameter counts as shared, unless the subclass overrides :meth:`shared_parameters`.
    """

    shared_features: Tensor | None
    task_features = _transient_property("task_features", "(T, B, ...) per-task copies or representations the heads "
                                        "read (None if the model exposes none); set by the last forward")

    def __init__(self, tasks: Sequence[Task]) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("a model needs at least one task")
        self.tasks = list(tasks)
        self.task_names = [t.name for t in self.tasks]
        self.shared_features = None
        self.task_features = None

    def expose_task_features(self, enabled: bool = True) -> MultiTaskModel:
        """Let every :class:`TaskHeads` of the model read per-task copies of its input, exposed as
        ``task_features`` after each forward (for the one-backward gradient engine); returns ``self``.

        Outputs do not change; a plain summed-loss backward gets somewhat slower (it forms the
        ``(T, B, H)`` per-copy gradient), so it is off by default and meant for gradient balancers.
        """
        for module in self.modules():
            if isinstance(module, TaskHeads):
                module.copies = enabled
        return self

    def read_heads(self, x: Tensor) -> dict[str, Tensor]:
        """Run ``self.heads`` (a :class:`TaskHeads`) on ``x`` and expose what the towers read as
        ``task_features``: ``x`` itself when it is per task ``(T, B, H)``, else the per-task copies
        (when switched on). Models whose towers read only their own task's slice call this."""
        out = self.heads(x)
        self.task_features = self.heads.task_features
        return out

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss depends on (the ones gradient balancing acts on)."""
        head_ids = {id(p) for p in self.task_specific_parameters()}
        return (p for p in self.parameters() if id(p) not in head_ids)

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that belong to the task heads."""
        heads = getattr(self, "heads", None)
        return iter(()) if heads is None else heads.parameters()


class _CopiesLinear(torch.autograd.Function):
    """Tower ``t``'s first linear layer on slice ``t`` of ``copies = x.expand(T, B, in)``.

    The forward is the one wide GEMM of the shared input (bit-identical to
    :class:`~polytask.nn.layers.BatchedLinear` on ``(B, in)``); the backward returns the per-copy
    gradient ``(T, B, in)`` and the weight gradient as one GEMM too. A batched matmul on the
    stride-0 copies computes the same but made a whole EW step about twice as slow on CPU
    (T=16 linear heads, ``benchmarks/balance_speed.py``).
    """

    # forward takes ctx (no separate setup_context): with setup_context, Function.apply binds the
    # arguments through inspect.signature on every call (~40 us, 3x the GEMM at T=2)
    @staticmethod
    def forward(ctx, copies: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        n, (batch, width), out = weight.shape[0], copies.shape[1:], weight.shape[2]
        wide = weight.permute(1, 0, 2).reshape(width, n * out)
        y = copies[0] @ wide if bias is None else torch.addmm(bias.reshape(-1), copies[0], wide)
        ctx.save_for_backward(copies, weight)
        ctx.has_bias = bias is not None
        return y.reshape(batch, n, out).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        copies, weight = ctx.saved_tensors
        n, batch, out = grad.shape
        grad_copies = None
        if ctx.needs_input_grad[0]:  # (T, B, out) @ (T, out, in); an outer product for out = 1 (bmm is slow there)
            wt = weight.transpose(1, 2).to(grad.dtype)  # under autocast (fp16/bf16) grad and weight differ
            grad_copies = (grad * wt if out == 1 else torch.bmm(grad.contiguous(), wt)).to(copies.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # (T*out, B) @ (B, in): the same product as (in, B) @ (B, T*out), but CPU BLAS runs this
            # orientation 1.1-8x faster when T*out is small (T=2: 14 vs 119 us at B = in = 256)
            wide = grad.transpose(0, 1).reshape(batch, n * out).transpose(0, 1) @ copies[0].to(grad.dtype)
            grad_weight = wide.reshape(n, out, -1).transpose(1, 2).to(weight.dtype)
        grad_bias = grad.sum(1, keepdim=True) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_copies, grad_weight, grad_bias


class TaskHeads(nn.Module):
    """One tower per task, all run as a single batched MLP.

    Towers share a shape (``hidden``); each task's last layer has the task's output width, so
    the last layer is padded to the widest task and each task reads its own slice.

    With ``copies = True`` (see :meth:`MultiTaskModel.expose_task_features`) a shared ``(B, in)``
    input is expanded (a view, no copy) to ``task_features`` ``(T, B, in)``, slice ``t`` read by
    tower ``t`` only, so that one backward of ``Σ_t L_t`` yields every task's gradient w.r.t. the
    input (see the module docstring). A ``(T, B, in)`` input is its own ``task_features``.
    ``task_features`` is set after each forward (``None`` for a shared input without copies).
    """

    def __init__(self, tasks: Sequence[Task], in_features: int, hidden: Sequence[int] = (), act: str = "relu",
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.names = [t.name for t in tasks]
        self.widths = [t.output_dim for t in tasks]
        self.towers = BatchedMLP(len(tasks), in_features, hidden, max(self.widths), act=act, dropout=dropout)
        self.copies = False
        self.task_features = None

    task_features = _transient_property("task_features", "the (T, B, in) input of the towers in the last forward")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x``: ``(B, in)`` shared by all tasks, or ``(T, B, in)`` one input per task."""
        if x.ndim == 2 and not self.copies:
            self.task_features = None
            out = self.towers(x)
        elif x.ndim == 2:  # one stride-0 copy per tower: each tower's gradient lands in its own slice
            copies = x.unsqueeze(0).expand(len(self.names), *x.shape)
            self.task_features = copies
            first, rest = self.towers.layers[0], self.towers.layers[1:]
            out = rest(_CopiesLinear.apply(copies, first.weight, first.bias))  # (T, B, max_width)
        else:
            self.task_features = x
            out = self.towers(x)  # (T, B, max_width)
        return {n: out[i, :, :w] for i, (n, w) in enumerate(zip(self.names, self.widths))}


def param_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


