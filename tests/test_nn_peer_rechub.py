"""MMoE and PLE against torch-rechub's MMOE / PLE (PyPI) with the same weights.

torch-rechub's MLPs put a BatchNorm after every linear layer (gates included); in eval mode with
fresh statistics and ``eps = 0`` a BatchNorm is exactly the identity, so both models compute the
same function once our weights are copied into theirs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polytask.nn import MMoE, PLE
from polytask.nn.layers import BatchedLinear
from polytask.tasks import Task

rechub_mt = pytest.importorskip("torch_rechub.models.multi_task")
rechub_features = pytest.importorskip("torch_rechub.basic.features")

D, B = 7, 16
TASKS = [Task("ctr", "binary"), Task("cvr", "binary"), Task("dwell", "regression")]
TYPES = ["classification", "classification", "regression"]


def _features():
    return [rechub_features.DenseFeature(f"d{i}") for i in range(D)]


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _batched(module: nn.Module) -> list[BatchedLinear]:
    return [m for m in module.modules() if isinstance(m, BatchedLinear)]


def _copy(dst: nn.Linear, src: BatchedLinear, i: int) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight[i].T)
        dst.bias.copy_(src.bias[i, 0])


def _identity_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eps = 0.0


def _copy_bank(dst_mlps, bank: nn.Module, offset: int = 0) -> None:
    """Expert ``offset + i`` of a BatchedMLP bank -> torch-rechub MLP ``dst_mlps[i]``."""
    layers = _batched(bank)
    for i, dst in enumerate(dst_mlps):
        for dst_lin, src_lin in zip(_linears(dst), layers):
            _copy(dst_lin, src_lin, offset + i)


def _copy_heads(dst_towers, heads) -> None:
    for t, tower in enumerate(dst_towers):
        for dst_lin, src_lin in zip(_linears(tower), _batched(heads)):
            _copy(dst_lin, src_lin, t)


def _compare(ours, theirs) -> None:
    ours.eval(), theirs.eval()
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(0))
    out = ours(x)
    ref = theirs({f"d{i}": x[:, i] for i in range(D)})  # (B, T): probabilities / regression values
    expected = torch.stack([torch.sigmoid(out["ctr"][:, 0]), torch.sigmoid(out["cvr"][:, 0]), out["dwell"][:, 0]], 1)
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-6)


def test_mmoe_matches_torch_rechub():
    torch.manual_seed(0)
    ours = MMoE(D, TASKS, num_experts=4, expert=(16, 8), tower=(5,))
    theirs = rechub_mt.MMOE(_features(), TYPES, 4, {"dims": [16, 8]}, [{"dims": [5]}] * 3)
    _identity_batchnorm(theirs)
    _copy_bank(theirs.experts, ours.experts)
    for t, gate in enumerate(theirs.gates):
        _copy(_linears(gate)[0], ours.gates, t)
    _copy_heads(theirs.towers, ours.heads)
    _compare(ours, theirs)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ple_matches_torch_rechub(levels):
    torch.manual_seed(0)
    ours = PLE(D, TASKS, num_levels=levels, specific_experts=2, shared_experts=2, expert=(8,), tower=(5,))
    theirs = rechub_mt.PLE(_features(), TYPES, levels, 2, 2, {"dims": [8]}, [{"dims": [5]}] * 3)
    _identity_batchnorm(theirs)
    for ours_level, cgc in zip(ours.levels, theirs.cgc_layers):
        _copy_bank(cgc.experts_specific, ours_level.specific_experts)
        _copy_bank(cgc.experts_shared, ours_level.shared_experts)
        for t, gate in enumerate(cgc.gates_specific):
            _copy(_linears(gate)[0], ours_level.task_gates, t)
        if ours_level.shared_gate is not None:
            with torch.no_grad():
                lin = _linears(cgc.gate_shared)[0]
                lin.weight.copy_(ours_level.shared_gate.weight)
                lin.bias.copy_(ours_level.shared_gate.bias)
    _copy_heads(theirs.towers, ours.heads)
    _compare(ours, theirs)
