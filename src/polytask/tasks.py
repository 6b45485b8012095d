"""Tasks: what each output of a multi-task model predicts, how it is scored, and Δm%.

A :class:`Task` knows its kind (binary, multiclass, multilabel, regression), its loss (a masked
mean over the labelled rows of a batch) and its metrics, each with a direction. Metrics are
computed over a whole evaluation split, never averaged over batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.errors import ConfigError, DataError

Kind = Literal["binary", "multiclass", "multilabel", "regression"]
KINDS: tuple[str, ...] = ("binary", "multiclass", "multilabel", "regression")

#: Whether a larger value of each metric is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "auc": True,
    "accuracy": True,
    "macro_f1": True,
    "logloss": False,
    "mae": False,
    "rmse": False,
    "mse": False,
    "loss": False,
}

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auc", "logloss", "accuracy"),
    "multiclass": ("accuracy", "logloss"),
    "multilabel": ("auc", "logloss"),
    "regression": ("mae", "rmse"),
}

ALLOWED_METRICS: dict[str, frozenset[str]] = {
    "binary": frozenset({"auc", "logloss", "accuracy", "macro_f1"}),
    "multiclass": frozenset({"accuracy", "logloss", "macro_f1"}),
    "multilabel": frozenset({"auc", "logloss", "accuracy"}),
    "regression": frozenset({"mae", "rmse", "mse"}),
}


@dataclass(frozen=True)
class Task:
    """One prediction target of a multi-task model.

    Args:
        name: key of the task in model outputs, targets and masks.
        kind: ``binary`` (one logit per row, 0/1 target), ``multiclass`` (``num_classes`` logits,
            integer target), ``multilabel`` (``num_classes`` logits, 0/1 target per label) or
            ``regression`` (``num_outputs`` values per row).
        num_classes: number of classes (multiclass) or labels (multilabel).
        num_outputs: width of a regression target (1 for a scalar target).
        metrics: metric names; the first is the task's main metric (used for Δm% and plots).
            Defaults depend on the kind (``DEFAULT_METRICS``).
        regression_loss: ``mse`` (default) or ``l1`` for regression tasks.
    """

    name: str
    kind: Kind
    num_classes: int = 0
    num_outputs: int = 1
    metrics: tuple[str, ...] = field(default=())
    regression_loss: Literal["mse", "l1"] = "mse"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r}: unknown kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind in ("multiclass", "multilabel") and self.num_classes < 2:
            raise ConfigError(f"task {self.name!r}: kind {self.kind} needs num_classes >= 2")
        if self.regression_loss not in ("mse", "l1"):
            raise ConfigError(f"task {self.name!r}: regression_loss must be 'mse' or 'l1'")
        metrics = tuple(self.metrics) or DEFAULT_METRICS[self.kind]
        for m in metrics:
            if m not in ALLOWED_METRICS[self.kind]:
                raise ConfigError(
                    f"task {self.name!r}: metric {m!r} does not apply to kind {self.kind}; "
                    f"use one of {', '.join(sorted(ALLOWED_METRICS[self.kind]))}"
                )
        object.__setattr__(self, "metrics", metrics)

    @property
    def output_dim(self) -> int:
        """Width of the head's output for this task."""
        if self.kind == "binary":
            return 1
        if self.kind in ("multiclass", "multilabel"):
            return self.num_classes
        return self.num_outputs

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    # ----------------------------------------------------------------- shapes
    def check_target(self, target: Tensor, rows: int | None = None) -> None:
        """Raise DataError if ``target`` does not fit this task's kind."""
        shape = tuple(target.shape)
        if rows is not None and (len(shape) == 0 or shape[0] != rows):
            raise DataError(f"task {self.name!r}: target has shape {shape}, expected {rows} rows")
        if self.kind == "multiclass":
            ok = target.ndim == 1 and not target.is_floating_point()
            expect = "(N,) integer class ids"
        elif self.kind == "multilabel":
            ok = target.ndim == 2 and target.shape[1] == self.num_classes
            expect = f"(N, {self.num_classes}) 0/1 labels"
        elif self.kind == "binary":
            ok = target.ndim == 1 or (target.ndim == 2 and target.shape[1] == 1)
            expect = "(N,) 0/1 labels"
        else:
            ok = (target.ndim == 1 and self.num_outputs == 1) or (
                target.ndim == 2 and target.shape[1] == self.num_outputs
            )
            expect = f"(N,) or (N, {self.num_outputs}) values"
        if not ok:
            raise DataError(
                f"task {self.name!r} ({self.kind}): target has shape {shape} and dtype "
                f"{str(target.dtype).replace('torch.', '')}, expected {expect}"
            )

    def _prepare(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if self.kind == "binary":
            return output.reshape(-1), target.reshape(-1).to(output.dtype)
        if self.kind == "regression":
            if self.num_outputs == 1:
                return output.reshape(-1), target.reshape(-1).to(output.dtype)
            return output, target.to(output.dtype)
        if self.kind == "multilabel":
            return output, target.to(output.dtype)
        return output, target.long()

    # ------------------------------------------------------------------ loss
    def loss_per_row(self, output: Tensor, target: Tensor) -> Tensor:
        """Unreduced loss, one value per row."""
        out, tgt = self._prepare(output, target)
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(out, tgt, reduction="none")
        if self.kind == "multiclass":
            return F.cross_entropy(out, tgt, reduction="none")
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(out, tgt, reduction="none").mean(dim=1)
        per = (out - tgt).abs() if self.regression_loss == "l1" else (out - tgt).square()
        return per if per.ndim == 1 else per.mean(dim=1)

    def loss(self, output: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean loss over the labelled rows (``mask`` True).

        A batch with no labelled row gives a loss of exactly 0 with a zero gradient: the task
        contributes nothing to that step. No host synchronisation is needed to decide that.
        """
        if mask is None:
            return self.loss_per_row(output, target).mean()
        # unlabelled rows may hold placeholders (NaN): zero them first, or NaN*0 would reach the grad
        row_mask = mask.reshape(-1, *([1] * (target.ndim - 1)))
        target = torch.where(row_mask, target, torch.zeros_like(target))
        per_row = self.loss_per_row(output, target) * mask.to(output.dtype)
        return per_row.sum() / mask.sum().clamp_min(1).to(per_row.dtype)

    # --------------------------------------------------------------- metrics
    @torch.no_grad()
    def evaluate(self, output: Tensor, target: Tensor, mask: Tensor | None = None) -> dict[str, float]:
        """All metrics of this task (plus ``loss``) over a whole split; NaN when no row is labelled."""
        if mask is not None:
            output, target = output[mask], target[mask]
        if target.shape[0] == 0:
            return {m: float("nan") for m in ("loss", *self.metrics)}
        out, tgt = self._prepare(output.float(), target)
        result = {"loss": float(self.loss_per_row(output.float(), target).mean())}
        for m in self.metrics:
            result[m] = float(_METRIC_FNS[m](self, out, tgt))
        return result


# ----------------------------------------------------------------------------- metric functions
def roc_auc(scores: Tensor, labels: Tensor) -> Tensor:
    """Area under the ROC curve, via the Mann-Whitney U statistic with average ranks for ties.

    Returns NaN when only one class is present (AUC is undefined there).
    """
    scores = scores.reshape(-1).double()
    labels = labels.reshape(-1) > 0.5
    n_pos = labels.sum()
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.tensor(float("nan"))
    uniq, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # rank of a group of ties = mean of the 1-based positions it occupies
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2
    ranks = avg_rank[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _auc(task: Task, out: Tensor, tgt: Tensor) -> Tensor:
    if task.kind == "binary":
        return roc_auc(out, tgt)
    # multilabel: macro average over labels that have both classes
    aucs = torch.stack([roc_auc(out[:, j], tgt[:, j]) for j in range(out.shape[1])])
    valid = ~aucs.isnan()
    return aucs[valid].mean() if valid.any() else torch.tensor(float("nan"))


def _logloss(task: Task, out: Tensor, tgt: Tensor) -> Tensor:
    if task.kind == "multiclass":
        return F.cross_entropy(out, tgt)
    return F.binary_cross_entropy_with_logits(out, tgt)


def _accuracy(task: Task, out: Tensor, tgt: Tensor) -> Tensor:
    if task.kind == "multiclass":
        return (out.argmax(dim=1) == tgt).double().mean()
    return ((out > 0) == (tgt > 0.5)).double().mean()


def macro_f1(pred: Tensor, target: Tensor) -> Tensor:
    """Macro-averaged F1 of integer class predictions: the mean over the classes that occur in
    ``target`` or ``pred`` of ``2 TP / (2 TP + FP + FN)`` (scikit-learn's ``f1_score(average="macro")``,
    whose labels are the union of both; a class that occurs nowhere is left out, not counted as 0)."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    n = int(torch.maximum(pred.max(), target.max())) + 1 if pred.numel() else 1
    true_pos = torch.bincount(target[pred == target], minlength=n).double()
    support = torch.bincount(pred, minlength=n).double() + torch.bincount(target, minlength=n).double()
    present = support > 0  # = 2 TP + FP + FN > 0
    return (2 * true_pos[present] / support[present]).mean()


def _macro_f1(task: Task, out: Tensor, tgt: Tensor) -> Tensor:
    if task.kind == "multiclass":
        return macro_f1(out.argmax(dim=1), tgt)
    return macro_f1((out > 0).long(), (tgt > 0.5).long())


_METRIC_FNS = {
    "auc": _auc,
    "logloss": _logloss,
    "accuracy": _accuracy,
    "macro_f1": _macro_f1,
    "mae": lambda task, out, tgt: (out - tgt).abs().mean(),
    "mse": lambda task, out, tgt: (out - tgt).square().mean(),
    "rmse": lambda task, out, tgt: (out - tgt).square().mean().sqrt(),
}


# ----------------------------------------------------------------------------- Δm%
def delta_m(
    mtl: Mapping[str, Mapping[str, float]],
    single: Mapping[str, Mapping[str, float]],
    tasks: Sequence[Task] | None = None,
    metrics: Mapping[str, Sequence[str]] | None = None,
) -> float:
    """Δm% of Maninis et al., "Attentive Single-Tasking of Multiple Tasks" (CVPR 2019).

    ``Δm% = 100 / K · Σ_k (-1)^{h_k} (M_mtl,k − M_single,k) / M_single,k`` over the K (task, metric)
    pairs, where ``h_k`` is 1 when a higher value of metric k is better. It is the mean relative
    *drop* against single-task baselines: lower is better, negative means multi-task beats them.

    Args:
        mtl, single: ``{task: {metric: value}}``.
        tasks: if given, each task's own metrics are used (all of them).
        metrics: explicit ``{task: [metric, ...]}``; overrides ``tasks``.
    """
    if metrics is None:
        if tasks is not None:
            metrics = {t.name: t.metrics for t in tasks}
        else:
            metrics = {t: [m for m in single[t] if m != "loss"] for t in single}
    terms = []
    for name, names in metrics.items():
        for m in names:
            if m not in HIGHER_IS_BETTER:
                raise ConfigError(f"delta_m: unknown direction of metric {m!r} (task {name!r})")
            try:
                ours, base = float(mtl[name][m]), float(single[name][m])
            except KeyError as exc:
                raise DataError(f"delta_m: no value of metric {m!r} for task {name!r}") from exc
            sign = -1.0 if HIGHER_IS_BETTER[m] else 1.0
            terms.append(sign * (ours - base) / base)
    if not terms:
        raise DataError("delta_m: no (task, metric) pair to compare")
    return 100.0 * sum(terms) / len(terms)


def tasks_from_config(entries: Sequence[Mapping]) -> list[Task]:
    """Build tasks from config entries (dicts with Task's fields, and ``level: row | token``: a token-level
    task is a :class:`polytask.token_tasks.TokenTask`), naming a bad entry."""
    from polytask.token_tasks import LEVELS, TokenTask

    out = []
    for i, e in enumerate(entries):
        e = dict(e)
        if "name" not in e or "kind" not in e:
            raise ConfigError(f"tasks[{i}]: each task needs 'name' and 'kind'")
        level = e.pop("level", "row")
        unknown = set(e) - set(Task.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"tasks[{i}] ({e['name']!r}): unknown key(s) {', '.join(sorted(unknown))}")
        if level not in LEVELS:
            raise ConfigError(f"tasks[{i}] ({e['name']!r}): level must be row or token, got {level!r}")
        if "metrics" in e:
            e["metrics"] = tuple(e["metrics"])
        out.append(TokenTask(**e) if level == "token" else Task(**e))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: duplicate task names in {names}")
    return out
