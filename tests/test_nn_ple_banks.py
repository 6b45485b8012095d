"""PLE/CGC banks of their own widths run together (polytask.nn.ragged.RaggedBanks): equal to the
per-bank loop they replace (float64, 1e-12, outputs and gradients) for equal and unequal widths,
width 1, deep experts, one to three levels, no or several shared experts; a checkpoint written by
the loop predicts as before; op counts do not grow with the number of tasks; the multiply-adds run
are counted (torch's FLOP counter against the formula and a hand count); hooks fall back to the
loop (pruning's activation scores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from polytask import nn as pnn
from polytask.nn.ragged import RaggedBanks, bank_shapes, matmul_macs, width_groups
from polytask.tasks import Task

DATA = Path(__file__).parent / "data" / "ple_banks"

CASES = {  # name: (tasks, params)
    "cgc-equal": (2, dict(num_levels=1, specific_experts=2, shared_experts=1, expert=(5, 3),
                          bank_widths={"t0": [5], "t1": [5], "shared": [5]})),
    "cgc-unequal": (3, dict(num_levels=1, specific_experts=2, shared_experts=2, expert=(6, 4),
                            bank_widths={"t0": [1], "t1": [6], "t2": [3], "shared": [2]})),
    "ple-deep": (3, dict(num_levels=3, specific_experts=2, shared_experts=3, expert=(6, 5, 4, 3),
                         bank_widths={"t0": [1, 5, 1], "t1": [6, 2, 4], "t2": [3, 3, 3], "shared": [4, 1, 2]})),
    "ple-width1": (2, dict(num_levels=2, specific_experts=1, shared_experts=1, expert=(4, 4, 1),
                           bank_widths={"t0": [1, 1], "t1": [4, 1], "shared": [1, 4]})),
    "ple-no-shared": (2, dict(num_levels=2, specific_experts=3, shared_experts=0, expert=(6, 2),
                              bank_widths={"t0": [2], "t1": [6]})),
    "ple-one-layer": (2, dict(num_levels=2, specific_experts=2, shared_experts=1, expert=(3,),
                              bank_widths={"t0": [], "t1": [], "shared": []})),
}


def _tasks(n):
    return [Task(f"t{i}", "regression") for i in range(n)]


def _model(case, seed=0, activation="relu"):
    tasks, params = CASES[case]
    torch.manual_seed(seed)
    return pnn.build_model("ple", 7, _tasks(tasks), tower=(2,), activation=activation, **params).double()


@pytest.fixture
def looped(monkeypatch):
    """Make every level run its banks one after the other, as before RaggedBanks (the reference)."""
    def use_loop(on: bool):
        monkeypatch.setattr(RaggedBanks, "hooked", staticmethod(lambda banks: on))
    return use_loop


def _forward_backward(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in out.values())
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return out, grads


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_batched_banks_equal_the_loop_outputs_and_gradients(case, activation, looped):
    model = _model(case, seed=1, activation=activation)
    x = torch.randn(11, 7, dtype=torch.float64) * 3
    looped(False)
    out, grads = _forward_backward(model, x)
    looped(True)
    ref, ref_grads = _forward_backward(model, x)
    for t in ref:
        torch.testing.assert_close(out[t], ref[t], rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads[1:])  # the gradients are not all zero


def test_several_training_steps_follow_the_loop(looped):
    """Adam on both paths from the same init: same parameters after 4 steps (padding stays zero)."""
    def train(loop):
        looped(loop)
        model = _model("ple-deep", seed=2)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        torch.manual_seed(9)
        for _ in range(4):
            x = torch.randn(8, 7, dtype=torch.float64)
            loss = sum((o ** 2).mean() for o in model(x).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.state_dict()

    fast, ref = train(False), train(True)
    for key in ref:
        torch.testing.assert_close(fast[key], ref[key], rtol=0, atol=1e-12)


def test_a_banked_checkpoint_written_by_the_loop_predicts_as_before():
    from safetensors.torch import load_file

    saved = load_file(DATA / "banked_ple.safetensors")  # written by the per-bank loop (before RaggedBanks)
    tasks = [Task("a", "regression"), Task("b", "regression")]
    model = pnn.build_model("ple", 5, tasks, num_levels=2, specific_experts=2, shared_experts=1, expert=(6, 4, 3),
                            tower=(2,), bank_widths={"a": [1, 4], "b": [6, 2], "shared": [3, 3]}).double().eval()
    model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
    out = model(saved["input"])
    for t in ("a", "b"):
        torch.testing.assert_close(out[t], saved[f"output.{t}"], rtol=0, atol=1e-12)
    assert set(model.state_dict()) == {k[6:] for k in saved if k.startswith("model.")}  # no new keys


def _count_ops(fn) -> int:
    """Ops that run a kernel (views left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += not func.is_view  # kernels; gathering the banks' parameters takes one view each
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("level", [0, 1])
def test_the_op_count_does_not_grow_with_the_tasks(level, looped):
    """The loop ran a bank per task (its ops grow with T); the batched form runs the same ops for 4, 8 or 12 tasks."""
    def ops(num_tasks, loop):
        looped(loop)
        torch.manual_seed(0)
        widths = {f"t{i}": [1 + i % 4] for i in range(num_tasks)} | {"shared": [3]}
        model = pnn.build_model("ple", 7, _tasks(num_tasks), num_levels=2, specific_experts=2, expert=(5, 3),
                                bank_widths=widths)
        lv = model.levels[level]
        x = torch.randn(4, 7) if level == 0 else torch.randn(num_tasks + 1, 4, 3)
        lv._experts(x)  # the first call builds the index tables
        return _count_ops(lambda: lv._experts(x))

    assert ops(4, False) == ops(8, False) == ops(12, False)  # same width groups (and a reordering) for each
    assert ops(8, True) > ops(4, True)  # the count can tell the loop from the batched form


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", ["cgc-unequal", "ple-deep", "ple-width1", "cgc-equal"])
def test_the_multiply_adds_run_are_the_counted_ones(case, looped):
    model = _model(case)
    for i, level in enumerate(model.levels):
        banks = [*level.task_experts, *([level.shared_experts] if level.shared_experts is not None else [])]
        d = bank_shapes(banks)[1][0][0]
        x = torch.randn(5, d, dtype=torch.float64) if i == 0 else torch.randn(len(banks), 5, d, dtype=torch.float64)
        run, exact = matmul_macs(*bank_shapes(banks), 5, streams=i > 0)
        looped(False)
        assert _flops(lambda: level.ragged(x, banks)) == 2 * run
        looped(True)
        assert _flops(lambda: level.ragged(x, banks)) == 2 * exact
        if i == 0:  # every bank reads the same input: the first layer is one exact GEMM
            first = sum(b.layers[0].weight.numel() for b in banks)
            deep_run = run // 5 - first
            assert deep_run >= exact // 5 - first
        if case == "cgc-equal":
            assert run == exact  # equal widths: nothing padded


def test_a_hand_counted_case():
    """Banks of 2, 2 and 1 experts, dims [4, 1, 3], [4, 3, 3], [4, 2, 3].
    Exact MACs per row: 2·(4·1 + 1·3) + 2·(4·3 + 3·3) + 1·(4·2 + 2·3) = 14 + 42 + 14 = 70.
    Shared input: layer 1 one GEMM of 4 × (2·1 + 2·3 + 1·2 = 10) = 40. Layer 2, banks sorted by its
    size per expert (1·3, 2·3, 3·3: banks 0, 2, 1): one group padded to 3 × 3 costs 5·9 = 45; cut
    after bank 0: 2·1·3 + 3·3·3 = 33, after bank 2: 3·2·3 + 2·3·3 = 36; 33 < 45·7/8, so groups
    [0], [2, 1]: run 40 + 33 = 73. Streams: layer 1 per group, its streams padded to its widest
    (bank widths 2·1, 2·3, 1·2): group [0] 1·4·2 = 8, group [2, 1] 2·4·6 = 48; run 56 + 33 = 89
    (one bmm over all three streams would be 3·4·6 = 72).
    Banks of 2 and 2, dims [4, 8, 3], [4, 7, 3]: one group 4·8·3 = 96, two 2·7·3 + 2·8·3 = 90 ≥ 84:
    one group; run 4·(16 + 14) + 96 = 216, exact 120 + 90 = 210."""
    counts, dims = [2, 2, 1], [[4, 1, 3], [4, 3, 3], [4, 2, 3]]
    assert width_groups(counts, dims) == [[0], [2, 1]]
    assert matmul_macs(counts, dims, 1, streams=False) == (73, 70)
    assert matmul_macs(counts, dims, 10, streams=True) == (890, 700)
    assert width_groups([2, 2], [[4, 8, 3], [4, 7, 3]]) == [[1, 0]]
    assert matmul_macs([2, 2], [[4, 8, 3], [4, 7, 3]], 1, streams=False) == (216, 210)


def test_a_hooked_bank_runs_its_own_modules():
    """polytask prune's activation scores hook the banks' layers: they must still see them run."""
    model = _model("cgc-unequal")
    seen = []
    handle = model.levels[0].task_experts[1].layers[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        model(torch.randn(3, 7, dtype=torch.float64))
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 3, 6])]
    seen.clear()
    model(torch.randn(3, 7, dtype=torch.float64))
    assert seen == []
    layer = model.levels[0].shared_experts.layers[2]  # a backward hook too (taylor-style scores)
    handle = layer.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
    try:
        sum(o.sum() for o in model(torch.randn(3, 7, dtype=torch.float64)).values()).backward()
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 3, 4])]


def test_the_forward_and_backward_make_no_host_sync(monkeypatch):
    model = _model("ple-deep")
    x = torch.randn(4, 7, dtype=torch.float64)
    model(x)  # index tables built (once per shape, on the host)

    def refuse(*_a, **_k):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    sum(o.sum() for o in model(x).values()).backward()


@pytest.mark.slow
def test_the_banked_ple_compiles_as_one_graph():
    """torch.compile (aot_eager: no C++ compiler needed) traces the whole forward without a break
    (slow: ~20 s of dynamo on 2 shared cores)."""
    model = _model("ple-deep")
    x = torch.randn(4, 7, dtype=torch.float64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, ref = compiled(x), model(x)
    for t in ref:
        torch.testing.assert_close(out[t], ref[t], rtol=0, atol=1e-12)


def test_the_cases_cover_one_and_two_width_groups_and_a_reordering():
    """So that the equality tests above run every layout: one group, two groups in bank order, two
    groups whose experts must be put back in bank order."""
    layouts = set()
    for case in CASES:
        level = _model(case).levels[0]
        banks = [*level.task_experts, *([level.shared_experts] if level.shared_experts is not None else [])]
        level.ragged(torch.randn(2, 7, dtype=torch.float64), banks)
        tables = level.ragged.tables(banks, torch.device("cpu"))
        layouts.add((len(tables.groups), tables.order is not None))
    assert layouts >= {(1, False), (2, False), (2, True)}
