"""Token-level tasks: one label per token of a sequence (tagging, per-token regression).

A :class:`TokenTask` is a :class:`~polytask.tasks.Task` whose model output has one row per token,
``(B, L, width)``, and whose target is ``(B, L)`` (``(B, L, k)`` for a ``k``-wide regression). A
token without a label holds Hugging Face's ignore index ``-100`` (classification) or NaN
(regression); padding tokens hold it too (:mod:`polytask.data.sequences` writes it there from the
attention mask). The batch's row mask (``mask[task]``, ``(B,)``) still marks rows without any
labelled token, as for every task.

Loss and metrics flatten the valid tokens (label given, row labelled) and reuse the row-level
:class:`Task`: the loss is the mean over the batch's valid tokens (as ``transformers``' token
classification heads do: ``CrossEntropyLoss(ignore_index=-100)``, a mean over the labelled
tokens, not per sequence first); a batch without a valid token gives exactly 0 with a zero
gradient, the same "absent task" a row-level task without labelled rows gives, decided without a
host synchronisation. Metrics (token accuracy, macro-F1, log-loss, AUC; MSE, MAE for regression)
are computed over all valid tokens of the whole split.

A :class:`WordTask` is a token-level task labelled per word (``token_file`` with ``words`` and a
tokenizer, :mod:`polytask.data.words`): trained on its labelled tokens, scored per word at each
word's first sub-token.

Declared in data as ``level: token`` (``data.params.tasks.<name>: {kind: multiclass, level:
token}`` for ``token_file``), or found from a label tensor with one column per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from polytask.errors import ConfigError, DataError
from polytask.tasks import Task

#: label of a token that has none (Hugging Face's ``ignore_index``; float targets use NaN)
IGNORE_INDEX = -100

LEVELS = ("row", "token")

TOKEN_DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("accuracy", "macro_f1", "auc", "logloss"),
    "multiclass": ("accuracy", "macro_f1", "logloss"),
    "regression": ("mse", "mae"),
}


@dataclass(frozen=True)
class TokenTask(Task):
    """A task labelled per token (see the module docstring); same fields as :class:`Task`.

    Kinds: ``binary`` (one logit per token), ``multiclass`` (tagging: ``num_classes`` logits per
    token) and ``regression``; ``multilabel`` per token is not supported.
    """

    level = "token"  # class attribute (not a field): row-level tasks have none (see level_of)

    def __post_init__(self) -> None:
        if self.kind not in TOKEN_DEFAULT_METRICS:
            raise ConfigError(f"task {self.name!r}: a token-level task must be binary, multiclass or regression, "
                              f"got kind {self.kind!r}")
        if not self.metrics:
            object.__setattr__(self, "metrics", TOKEN_DEFAULT_METRICS[self.kind])
        super().__post_init__()

    def check_target(self, target: Tensor, rows: int | None = None) -> None:
        """DataError unless ``target`` is ``(N, L)`` integer labels (classification) or ``(N, L)`` /
        ``(N, L, num_outputs)`` floats (regression)."""
        shape = tuple(target.shape)
        if self.kind == "regression":
            ok = target.is_floating_point() and (target.ndim == 2 and self.num_outputs == 1 or
                                                 target.ndim == 3 and target.shape[2] == self.num_outputs)
            expect = "(N, L) floats (NaN: no label)" if self.num_outputs == 1 else \
                f"(N, L, {self.num_outputs}) floats (NaN: no label)"
        else:
            ok = target.ndim == 2 and not target.is_floating_point()
            expect = f"(N, L) integer labels ({IGNORE_INDEX}: no label)"
        if rows is not None and (len(shape) == 0 or shape[0] != rows):
            raise DataError(f"task {self.name!r}: target has shape {shape}, expected {rows} rows")
        if not ok:
            raise DataError(f"task {self.name!r} (token-level {self.kind}): target has shape {shape} and dtype "
                            f"{str(target.dtype).replace('torch.', '')}, expected {expect}")

    def valid_tokens(self, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, L)`` bool: tokens with a label, in rows labelled for this task (``mask``, ``(B,)``)."""
        if target.is_floating_point():
            valid = ~torch.isnan(target) if target.ndim == 2 else ~torch.isnan(target).any(-1)
        else:
            valid = target != IGNORE_INDEX
        return valid if mask is None else valid & mask.reshape(-1, 1)

    def flatten(self, output: Tensor, target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(B * L, width)`` outputs, ``(B * L, ...)`` targets and the ``(B * L,)`` valid-token mask.

        ConfigError when ``output`` has no token axis (a model that reads pooled rows only): that
        shape is known without running anything on the device."""
        if output.ndim != 3 or tuple(output.shape[:2]) != tuple(target.shape[:2]):
            raise ConfigError(f"task {self.name!r} is token-level: its output must have shape (rows, tokens, width) "
                              f"= {tuple(target.shape[:2])} + (width,), got {tuple(output.shape)} (model.arch must "
                              f"give token outputs: adapters)")
        valid = TokenTask.valid_tokens(self, target, mask).reshape(-1)  # a TokenTask target, also from WordTask
        return output.reshape(-1, output.shape[-1]), target.reshape(-1, *target.shape[2:]), valid

    # loss_per_row stays Task's: the flattened tokens are its rows (Task.loss and evaluate call it)

    def loss(self, output: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean loss over the valid tokens of the batch; exactly 0 with a zero gradient when there is none."""
        out, tgt, valid = self.flatten(output, target, mask)
        return super().loss(out, tgt, valid)

    @torch.no_grad()
    def evaluate(self, output: Tensor, target: Tensor, mask: Tensor | None = None) -> dict[str, float]:
        """Every metric (plus ``loss``) over the valid tokens of a whole split; NaN when there is none."""
        out, tgt, valid = self.flatten(output, target, mask)
        return super().evaluate(out, tgt, valid)


@dataclass(frozen=True)
class WordTask(TokenTask):
    """A token-level task labelled per word (:mod:`polytask.data.words`), scored per word.

    Its target carries one more channel than a :class:`TokenTask`'s, last: 1 at the first sub-token of
    each word, else 0; classification ``(N, L, 2)`` integers ``[label, first]``, regression
    ``(N, L, k + 1)`` floats ``[values..., first]``. The loss reads every labelled token (the first
    sub-tokens, or all of a word's with ``label_all_subtokens``); the metrics read the labelled first
    sub-tokens only, i.e. one prediction per word, however many sub-tokens the word got (Devlin et al.,
    "BERT", NAACL 2019, §5.3; Hugging Face's token-classification guide evaluates the same tokens).
    """

    def split(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(labels, first)``: the :class:`TokenTask` target and the ``(N, L)`` bool first-sub-token flag."""
        labels = target[..., :-1]
        if self.kind != "regression" or self.num_outputs == 1:
            labels = labels.squeeze(-1)
        return labels, target[..., -1] == 1

    def check_target(self, target: Tensor, rows: int | None = None) -> None:
        """DataError unless ``target`` is a :class:`TokenTask` target with the first-sub-token channel appended."""
        if target.ndim < 3 or target.shape[-1] < 2:
            raise DataError(f"task {self.name!r} (word-level {self.kind}): target has shape {tuple(target.shape)}, "
                            f"expected (N, L, 2) [label, first sub-token] (regression: (N, L, k + 1))")
        super().check_target(self.split(target)[0], rows)

    def valid_tokens(self, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return super().valid_tokens(self.split(target)[0], mask)

    def flatten(self, output: Tensor, target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`TokenTask.flatten` on the labels (the first-sub-token channel dropped)."""
        return super().flatten(output, self.split(target)[0], mask)

    @torch.no_grad()
    def evaluate(self, output: Tensor, target: Tensor, mask: Tensor | None = None) -> dict[str, float]:
        """Every metric (plus ``loss``, per word too: with ``label_all_subtokens`` it differs from the
        training loss, which also reads the later sub-tokens) over the labelled words of a whole split,
        each read at its first sub-token; NaN when there is none. Words cut off by truncation have no
        token and are not scored."""
        out, tgt, valid = self.flatten(output, target, mask)
        return Task.evaluate(self, out, tgt, valid & self.split(target)[1].reshape(-1))


def word_task(task: TokenTask) -> WordTask:
    """The word-level task with ``task``'s fields."""
    return WordTask(task.name, task.kind, task.num_classes, task.num_outputs, task.metrics, task.regression_loss)


def with_first_subtokens(target: Tensor, first: Tensor) -> Tensor:
    """A :class:`WordTask` target: ``target`` (a :class:`TokenTask`'s) with the ``(N, L)`` flag appended."""
    flag = first.to(target.dtype).unsqueeze(-1)
    return torch.cat([target if target.ndim == 3 else target.unsqueeze(-1), flag], -1)


def level_of(task: Task) -> str:
    """``token`` for a :class:`TokenTask`, else ``row``."""
    return getattr(task, "level", "row")


def token_task(task: Task) -> TokenTask:
    """The token-level task with ``task``'s fields (its default metrics when it had the row-level defaults)."""
    return TokenTask(task.name, task.kind, task.num_classes, task.num_outputs, (), task.regression_loss)


def check_token_outputs(arch: str, factory: object, tasks: Sequence[Task]) -> None:
    """ConfigError naming the first token-level task when architecture ``arch`` gives pooled outputs only
    (its builder ``factory`` lacks ``token_outputs = True``); checked before the model is built."""
    token = [t.name for t in tasks if level_of(t) == "token"]
    if token and not getattr(factory, "token_outputs", False):
        raise ConfigError(f"model.arch: task {token[0]!r} is token-level (one label per token) but "
                          f"{arch!r} gives one output per row; use model.arch: adapters")


__all__ = ["IGNORE_INDEX", "LEVELS", "TOKEN_DEFAULT_METRICS", "TokenTask", "WordTask", "check_token_outputs",
           "level_of", "token_task", "with_first_subtokens", "word_task"]
