"""Gradient aggregators: the ``T x D`` matrix of task gradients -> one update direction.

Each aggregator is a small ``nn.Module``. ``aggregator(J)`` returns the aggregated ``D``-vector;
``aggregator.aggregate(J)`` returns ``(vector, weights)``. Most methods only need the Gramian
``G = J J^T`` (:class:`GramianWeighting`: ``weights(G)``, update ``J^T w``); the others read the
Jacobian itself (:class:`GradDrop`, :class:`ExcessMTL`, :class:`MoCo`, :class:`MetaBalance`).

All solvers run in torch on the Jacobian's device with fixed iteration counts (no scipy, no host
synchronisation), in float64 on the ``T x T`` problem for accuracy; on CUDA their loops (and PCGrad's
and GradVac's) replay CUDA graphs (:func:`~polytask.balance.solvers.cuda_graphed`). Exceptions, documented per
class: :class:`IMTLG`, :class:`AlignedMTL` and :class:`ConFIG` need an eigendecomposition or
pseudo-inverse, which synchronises on CUDA.

State (GradVac's targets, Nash-MTL's warm start, MoCo's tracking, ExcessMTL's statistics, MetaBalance's norms) lives in
buffers only, step counters included, so ``state_dict()`` saves and restores it and the engine's
guard can undo a skipped step (:class:`~polytask.balance.aggregators._base._LazyStateMixin`).

Non-finite input: every aggregator returns a non-finite update (NaN/inf in, NaN/inf out), without
raising and without a host synchronisation, so the engine skips the step. The methods that
decompose the Gramian (eigh, pinv would raise) solve on the identity instead and return NaN
weights (:func:`~polytask.balance.aggregators._base._finite_or_identity`).

The methods live in family modules (re-exported here, the names users and configs know):
:mod:`~polytask.balance.aggregators.mgda` (MGDA, CAGrad, UPGrad, DualProj),
:mod:`~polytask.balance.aggregators.conflict` (PCGrad, GradVac, GradDrop),
:mod:`~polytask.balance.aggregators.fairness` (IMTL-G, Aligned-MTL, ConFIG, Nash-MTL, FairGrad) and
:mod:`~polytask.balance.aggregators.jacobian` (ExcessMTL, MoCo, MetaBalance), on the bases of ``_base``.
"""

from __future__ import annotations

from polytask.balance.aggregators._base import _SOLVE_DTYPE, Aggregator, GramianWeighting, gramian_only
from polytask.balance.aggregators.conflict import GradDrop, GradVac, PCGrad, gradvac_coefficients, pcgrad_coefficients
from polytask.balance.aggregators.fairness import AlignedMTL, ConFIG, FairGrad, IMTLG, NashMTL
from polytask.balance.aggregators.jacobian import ExcessMTL, MetaBalance, MoCo
from polytask.balance.aggregators.mgda import CAGrad, DualProj, MGDA, UPGrad

__all__ = [
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "gradvac_coefficients",
    "GramianWeighting",
    "gramian_only",
    "IMTLG",
    "MetaBalance",
    "MGDA",
    "MoCo",
    "NashMTL",
    "PCGrad",
    "pcgrad_coefficients",
    "UPGrad",
]
