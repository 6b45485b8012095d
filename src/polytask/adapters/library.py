"""A library of per-task LoRAs: similarity of their parameters and MBC task clustering.

Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs", ICML 2024,
sec. 3.2 (Model-Based Clustering, MBC): train a LoRA per task briefly, take the cosine similarity
of the tasks' flattened LoRA parameters, and cluster the tasks with k-means on those vectors; one
LoRA is then trained per cluster. Here the vectors are every wrapped layer's ``A`` and ``B`` rows
of the task, concatenated, L2-normalised; k-means is spherical (cosine), started from the
farthest-point seeding of task 0 (deterministic), with a fixed number of iterations. Not a
training-step function: it reads the host.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polytask import adapters as _api
from polytask.errors import ConfigError


def task_vectors(model: nn.Module) -> Tensor:
    """``(T, P)`` unit vectors: each task's LoRA parameters (``lora``/``mtlora``/``arrow``), flattened."""
    layers = _api.adapter_layers(model)
    if _api._state(model)["method"] not in ("lora", "mtlora", "arrow"):
        raise ConfigError(f"adapters.mbc: needs per-task LoRAs ('lora', 'mtlora', 'arrow'), got method "
                          f"{_api._state(model)['method']!r}")
    parts = [p.detach().reshape(p.shape[0], -1).double() for lay in layers.values() for p in (lay.lora_A, lay.lora_B)]
    vec = torch.cat(parts, dim=1)
    return vec / vec.norm(dim=1, keepdim=True).clamp_min(1e-12)


def lora_similarity(model: nn.Module) -> Tensor:
    """``(T, T)`` cosine similarity of the tasks' LoRA parameters."""
    v = task_vectors(model)
    return v @ v.T


def mbc_clusters(model: nn.Module, k: int, iters: int = 50) -> list[list[str]]:
    """Group the tasks into ``k`` clusters by their LoRA parameters (MBC); lists of task names, by first task."""
    tasks = _api._state(model)["tasks"]
    if not isinstance(k, int) or not 1 <= k <= len(tasks):
        raise ConfigError(f"adapters.mbc.k: must be between 1 and the number of tasks ({len(tasks)}), got {k!r}")
    v = task_vectors(model)
    centres = [0]
    for _ in range(1, k):                          # farthest point: least similar to every chosen centre
        centres.append(int((v @ v[centres].T).max(dim=1).values.argmin()))
    c = v[centres].clone()
    assign = torch.zeros(len(tasks), dtype=torch.long)
    for _ in range(iters):                         # Lloyd iterations, sequential by construction
        assign = (v @ c.T).argmax(dim=1)
        for j in range(k):
            members = v[assign == j]
            if members.shape[0]:
                mean = members.sum(0)
                c[j] = mean / mean.norm().clamp_min(1e-12)
    groups: dict[int, list[str]] = {}
    for i, j in enumerate(assign.tolist()):
        groups.setdefault(j, []).append(tasks[i])
    return sorted(groups.values(), key=lambda g: tasks.index(g[0]))
