"""Interference between task vectors of models fine-tuned from one base (pure functions on
state dicts).

- Task vectors (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023):
  ``τ_t = θ_t − θ_base``; :func:`task_vector_cosine` gives the pairwise cosine over the whole
  model and per tensor (near 0: the fine-tunes moved in unrelated directions; large: they
  compete for the same weights).
- Singular-subspace overlap (Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri and Rodolà,
  "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025): each 2-D
  layer's task matrix ``Δ_t = U_t Σ_t V_tᵀ`` is cut to its top ``k`` singular triplets (``k`` =
  ``fraction`` of the rank; the paper uses ``1/T``). Per layer we give

  * the paper's Singular Task Interference ``STI = ‖(UᵀU − I) Σ (VᵀV − I)‖₁`` with
    ``U = [U_1 … U_T]``, ``V = [V_1 … V_T]``, ``Σ = blockdiag(Σ_1 … Σ_T)`` (entry-wise L1 norm):
    0 when the task subspaces are mutually orthogonal;
  * a pairwise view (ours): ``overlap[i, j] = (‖U_iᵀU_j‖²_F + ‖V_iᵀV_j‖²_F) / (2k)``, the mean
    squared cosine of the principal angles between the two tasks' subspaces (1 on the diagonal,
    0 for orthogonal subspaces).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polytask.analyze.io import analysis_path, write_json
from polytask.errors import MergeError

StateDict = Mapping[str, Tensor]


def task_vectors(base: StateDict, finetuned: Mapping[str, StateDict]) -> dict[str, dict[str, Tensor]]:
    """``{task: {tensor: θ_task − θ_base}}`` over the floating-point tensors of ``base``
    (MergeError naming a missing tensor or a shape mismatch)."""
    out: dict[str, dict[str, Tensor]] = {}
    for task, sd in finetuned.items():
        vec = {}
        for name, b in base.items():
            if not torch.is_floating_point(b):
                continue
            if name not in sd:
                raise MergeError(f"task vector of {task!r}: tensor {name!r} is missing")
            if sd[name].shape != b.shape:
                raise MergeError(f"task vector of {task!r}: tensor {name!r} has shape {tuple(sd[name].shape)}, "
                                 f"base has {tuple(b.shape)}")
            vec[name] = sd[name].detach().float() - b.detach().float()
        out[task] = vec
    if len(out) < 2:
        raise MergeError("task-vector interference needs at least two fine-tuned models")
    return out


def _cosine_from_gram(gram: Tensor) -> Tensor:
    norm = gram.diagonal().clamp_min(0).sqrt()
    outer = norm[:, None] * norm[None, :]
    return torch.where(outer > 0, gram / outer.clamp_min(1e-30), torch.full_like(gram, float("nan")))


@dataclass
class TaskVectorCosine:
    """Pairwise cosine of task vectors: ``overall`` (T, T) and ``per_tensor[name]`` (T, T)."""

    tasks: list[str]
    overall: Tensor
    per_tensor: dict[str, Tensor]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "task_vector_cosine", "tasks": self.tasks, "matrices": {"cosine": self.overall},
                "per_tensor": self.per_tensor}

    def save(self, run_dir) -> Any:
        """Write ``analysis/task_vector_cosine.json`` (shown by ``polytask report``)."""
        return write_json(analysis_path(run_dir, "task_vector_cosine"), self.to_json())


def task_vector_cosine(base: StateDict, finetuned: Mapping[str, StateDict]) -> TaskVectorCosine:
    """Cosine between the task vectors of ``finetuned`` models w.r.t. ``base``."""
    vectors = task_vectors(base, finetuned)
    tasks = list(vectors)
    per: dict[str, Tensor] = {}
    total = None
    for name in next(iter(vectors.values())):
        flat = torch.stack([vectors[t][name].reshape(-1) for t in tasks]).double()
        gram = flat @ flat.T
        total = gram if total is None else total + gram
        per[name] = _cosine_from_gram(gram)
    assert total is not None
    return TaskVectorCosine(tasks, _cosine_from_gram(total), per)


def _top_k(deltas: Tensor, fraction: float) -> tuple[Tensor, Tensor, Tensor, int]:
    """Batched SVD of ``(T, m, n)`` task matrices, truncated to the top ``k`` triplets."""
    u, s, vh = torch.linalg.svd(deltas.double(), full_matrices=False)
    k = max(1, int(fraction * s.shape[-1]))
    return u[..., :k], s[..., :k], vh[..., :k, :].transpose(-1, -2), k


def singular_task_interference(deltas: Tensor, fraction: float | None = None) -> Tensor:
    """STI of Gargiulo et al. (CVPR 2025) for one layer's ``(T, m, n)`` task matrices."""
    t = deltas.shape[0]
    u, s, v, k = _top_k(deltas, fraction if fraction is not None else 1.0 / t)
    big_u = u.permute(1, 0, 2).reshape(u.shape[1], t * k)  # [U_1 … U_T]
    big_v = v.permute(1, 0, 2).reshape(v.shape[1], t * k)
    eye = torch.eye(t * k, dtype=big_u.dtype)
    sigma = torch.diag(s.reshape(-1))  # blockdiag of diagonal blocks = one diagonal
    return ((big_u.T @ big_u - eye) @ sigma @ (big_v.T @ big_v - eye)).abs().sum()


def subspace_overlap(deltas: Tensor, fraction: float | None = None) -> Tensor:
    """``(T, T)`` mean squared cosine of principal angles between the tasks' top-k singular
    subspaces (left and right averaged) for one layer's ``(T, m, n)`` task matrices."""
    t = deltas.shape[0]
    u, _, v, k = _top_k(deltas, fraction if fraction is not None else 1.0 / t)
    left = torch.einsum("imk,jml->ijkl", u, u).square().sum((-1, -2))
    right = torch.einsum("imk,jml->ijkl", v, v).square().sum((-1, -2))
    return (left + right) / (2 * k)


@dataclass
class SubspaceInterference:
    """Per 2-D tensor: pairwise ``overlap`` (T, T) and the paper's ``sti`` (scalar)."""

    tasks: list[str]
    overlap: dict[str, Tensor]
    sti: dict[str, float]
    fraction: float

    def mean_overlap(self) -> Tensor:
        """Pairwise overlap averaged over the layers."""
        return torch.stack(list(self.overlap.values())).mean(0)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "tsv_interference", "tasks": self.tasks, "fraction": self.fraction,
                "matrices": {"mean_overlap": self.mean_overlap()}, "per_tensor": self.overlap, "sti": self.sti}

    def save(self, run_dir) -> Any:
        """Write ``analysis/tsv_interference.json`` (shown by ``polytask report``)."""
        return write_json(analysis_path(run_dir, "tsv_interference"), self.to_json())


def tsv_interference(base: StateDict, finetuned: Mapping[str, StateDict],
                     fraction: float | None = None) -> SubspaceInterference:
    """Singular-subspace overlap and STI of every 2-D tensor's task matrices (TSV, CVPR 2025).

    ``fraction``: share of each task matrix's singular triplets kept (default ``1/T``, as in the
    paper). Tensors that are not matrices (biases, norms) are skipped, as in the paper.
    """
    vectors = task_vectors(base, finetuned)
    tasks = list(vectors)
    frac = fraction if fraction is not None else 1.0 / len(tasks)
    if not 0 < frac <= 1:
        raise MergeError(f"tsv_interference: fraction must be in (0, 1], got {fraction}")
    overlap, sti = {}, {}
    for name, first in next(iter(vectors.values())).items():
        if first.ndim != 2:
            continue
        deltas = torch.stack([vectors[t][name] for t in tasks])
        overlap[name] = subspace_overlap(deltas, frac)
        sti[name] = float(singular_task_interference(deltas, frac))
    if not overlap:
        raise MergeError("tsv_interference: no 2-D tensor in the state dicts")
    return SubspaceInterference(tasks, overlap, sti, frac)
