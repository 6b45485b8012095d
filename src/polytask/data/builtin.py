"""Built-in data sets: generated (``synthetic``) or shipped by an installed package (``digits``).

Nothing is downloaded. ``load(name, **params)`` returns :class:`~polytask.data.dataset.Splits`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from polytask.data.dataset import MultiTaskDataset, Splits
from polytask.errors import ConfigError
from polytask.registry import Registry
from polytask.tasks import Task

DATASETS: Registry = Registry("dataset", prefix="data.params")


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """A seeded permutation of ``range(n)`` cut into consecutive parts of the given fractions."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"data.params.split must be three positive fractions summing to 1, got {list(fractions)}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return [order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]]


def _splits(name: str, tasks: list[Task], full: MultiTaskDataset, fractions: Sequence[float], seed: int,
            input_spec: int) -> Splits:
    tr, va, te = split_indices(len(full), fractions, seed)
    return Splits(name, tasks, full.subset(tr), full.subset(va), full.subset(te), input_spec)


def task_weight_vectors(num_tasks: int, correlation: float, input_dim: int, clusters: int,
                        generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """``(T, d)`` task weight vectors whose pairwise cosine is ``correlation`` within a cluster and
    0 across clusters.

    Two tasks in one cluster use the construction of Ma et al. (KDD 2018):
    ``w1 = c·u1, w2 = c·(p·u1 + sqrt(1-p²)·u2)`` with orthonormal ``u1, u2`` (any p in [-1, 1]).
    More tasks use the symmetric extension ``w_t = c·(sqrt(p)·u_g + sqrt(1-p)·u_t)`` with ``u_g``
    the cluster's shared direction, which gives cosine ``p`` for every pair (p in [0, 1]).
    """
    if clusters < 1 or clusters > num_tasks:
        raise ConfigError(f"data.params.clusters must be between 1 and num_tasks={num_tasks}, got {clusters}")
    p = float(correlation)
    pairwise_paper = num_tasks == 2 and clusters == 1
    if not -1.0 <= p <= 1.0 or (p < 0 and not pairwise_paper):
        raise ConfigError(f"data.params.correlation must be in [0, 1] (or [-1, 1] for two tasks), got {p}")
    needed = num_tasks + clusters
    if input_dim < needed:
        raise ConfigError(f"data.params.input_dim must be at least num_tasks + clusters = {needed}, got {input_dim}")
    q, _ = torch.linalg.qr(torch.randn(input_dim, needed, generator=generator, dtype=torch.float64))
    u = q.T  # rows are orthonormal
    if pairwise_paper:
        w = torch.stack([u[0], p * u[0] + math.sqrt(1 - p * p) * u[1]])
    else:
        group = torch.arange(num_tasks) * clusters // num_tasks  # tasks split evenly into clusters
        w = math.sqrt(p) * u[num_tasks + group] + math.sqrt(1 - p) * u[:num_tasks]
    return scale * w


@DATASETS.register("synthetic", "mmoe_synthetic")
def synthetic(num_tasks: int = 2, correlation: float = 0.5, num_rows: int = 12000, input_dim: int = 100,
              clusters: int = 1, num_sines: int = 10, scale: float = 1.0, noise_std: float = 0.1,
              split: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> Splits:
    """Synthetic regression tasks with controlled correlation (Ma et al., "Modeling Task
    Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018, §4).

    ``y_t = w_tᵀx + Σ_{i=1..m} sin(α_i w_tᵀx + β_i) + ε``, ``x ~ N(0, I_d)``, ``ε ~ N(0, noise_std²)``
    (the paper uses variance 0.01), ``α_i, β_i ~ N(0, 1)`` drawn once and shared by the tasks; the
    cosine of the weight vectors is ``correlation`` (see :func:`task_weight_vectors`). With
    ``clusters > 1`` the tasks form that many groups, correlated within and independent across.
    """
    if num_tasks < 1:
        raise ConfigError(f"data.params.num_tasks must be >= 1, got {num_tasks}")
    if num_rows < 10:
        raise ConfigError(f"data.params.num_rows must be >= 10, got {num_rows}")
    g = torch.Generator().manual_seed(seed)
    w = task_weight_vectors(num_tasks, correlation, input_dim, clusters, g, scale)
    alpha = torch.randn(num_sines, generator=g, dtype=torch.float64)
    beta = torch.randn(num_sines, generator=g, dtype=torch.float64)
    x = torch.randn(num_rows, input_dim, generator=g, dtype=torch.float64)
    proj = x @ w.T  # (N, T)
    y = proj + torch.sin(proj.unsqueeze(-1) * alpha + beta).sum(-1)
    y = y + noise_std * torch.randn(y.shape, generator=g, dtype=torch.float64)
    tasks = [Task(f"task{t}", "regression", metrics=("mse", "mae")) for t in range(num_tasks)]
    full = MultiTaskDataset(x.float(), {t.name: y[:, i].float() for i, t in enumerate(tasks)})
    return _splits("synthetic", tasks, full, split, seed, input_dim)


@DATASETS.register("digits")
def digits(split: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> Splits:
    """scikit-learn's shipped 8×8 handwritten digits (1,797 images) as four tasks on the same images:
    ``digit`` (10-class), ``odd`` (binary), ``ge5`` (binary: digit ≥ 5) and ``value`` (regression on
    the digit's value). Pixels are scaled to [0, 1]; the split is fixed by ``seed``.
    """
    from sklearn.datasets import load_digits

    x, label = load_digits(return_X_y=True)
    x = torch.as_tensor(x / 16.0, dtype=torch.float32)
    label = torch.as_tensor(label, dtype=torch.long)
    tasks = [
        Task("digit", "multiclass", num_classes=10, metrics=("accuracy", "logloss")),
        Task("odd", "binary", metrics=("auc", "accuracy")),
        Task("ge5", "binary", metrics=("auc", "accuracy")),
        Task("value", "regression", metrics=("mae", "rmse")),
    ]
    targets = {"digit": label, "odd": (label % 2).float(), "ge5": (label >= 5).float(), "value": label.float()}
    return _splits("digits", tasks, MultiTaskDataset(x, targets), split, seed, x.shape[1])


def load(name: str, **params) -> Splits:
    """Load the built-in data set ``name`` (``synthetic``, ``digits``, ...) with ``params``."""
    splits = DATASETS.build(name, **params)
    splits.validate()
    return splits


