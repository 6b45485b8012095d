"""Ranking metrics that recommendation teams report: GAUC and calibration.

Both take whole evaluation arrays (Tensors or numpy arrays) and return a float; they are for
evaluation, not for the training step (they use numpy and synchronise). ``mask`` (bool, True =
labelled) drops unlabelled rows, as in the batch convention.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from polytask.errors import DataError


def _np(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        a = a.reshape(-1)
    return a


def _select(mask: Any, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    n = {len(a) for a in arrays}
    if len(n) != 1:
        raise DataError(f"metric inputs have different lengths: {[len(a) for a in arrays]}")
    if mask is None:
        return arrays
    m = _np(mask, "mask").astype(bool)
    if len(m) != len(arrays[0]):
        raise DataError(f"mask has {len(m)} rows, scores have {len(arrays[0])}")
    return tuple(a[m] for a in arrays)


def group_auc(scores: Any, labels: Any, groups: Any, mask: Any = None) -> dict[str, np.ndarray]:
    """Per group: ``groups`` (the distinct group keys), ``auc`` (NaN for a one-class group) and
    ``count`` (impressions). Vectorised: one sort by (group, score), average ranks for ties."""
    s, y, g = _select(mask, _np(scores, "scores").astype(np.float64), _np(labels, "labels") > 0.5,
                      _np(groups, "groups"))
    keys, gid = np.unique(g, return_inverse=True)
    k = len(keys)
    order = np.lexsort((s, gid))
    gs, ss, ys = gid[order], s[order], y[order].astype(np.float64)
    n = len(ss)
    count = np.bincount(gs, minlength=k)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    rank = np.arange(n) - start[gs] + 1.0  # 1-based rank inside the group
    new_tie = np.ones(n, dtype=bool)
    if n > 1:
        new_tie[1:] = (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])
    tie = np.cumsum(new_tie) - 1
    avg = (np.bincount(tie, weights=rank) / np.bincount(tie))[tie]
    n_pos = np.bincount(gs, weights=ys, minlength=k)
    n_neg = count - n_pos
    r_pos = np.bincount(gs, weights=avg * ys, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return {"groups": keys, "auc": auc, "count": count}


def gauc(scores: Any, labels: Any, groups: Any, mask: Any = None) -> float:
    """Group AUC: the AUC of each group (e.g. each user), averaged weighted by the group's
    impressions (rows). Groups with only positives or only negatives have no AUC and are
    skipped (they neither count nor weigh), as in Zhou et al., "Deep Interest Network for
    Click-Through Rate Prediction", KDD 2018, eq. 1. NaN when no group has both classes."""
    per = group_auc(scores, labels, groups, mask)
    ok = ~np.isnan(per["auc"])
    if not ok.any():
        return float("nan")
    w = per["count"][ok].astype(np.float64)
    return float((per["auc"][ok] * w).sum() / w.sum())


def calibration(probs: Any, labels: Any, mask: Any = None) -> float:
    """Predicted / observed click-through rate: ``sum(probs) / sum(labels)`` (1.0 is calibrated,
    above 1 over-predicts). ``probs`` are probabilities (apply a sigmoid to logits first).
    NaN when there is no positive label."""
    p, y = _select(mask, _np(probs, "probs").astype(np.float64), _np(labels, "labels").astype(np.float64))
    pos = y.sum()
    return float(p.sum() / pos) if pos > 0 else float("nan")


__all__ = ["calibration", "gauc", "group_auc"]
