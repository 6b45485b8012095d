"""The CUDA path gives what the CPU path gives: every architecture, every balancer, the MPNN.

Each test builds the same model twice (same seed, float64 so that TF32 and summation order cannot
hide a real difference), runs it on the CPU and on the GPU, and compares outputs and gradients.
Skipped where no CUDA device is present (CI has none; run on a GPU machine with
``pytest tests/test_cuda.py``).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from polytask import balance
from polytask.nn import build_model
from polytask.tasks import Task

# POLYTASK_TEST_SECOND_DEVICE=cpu runs the comparisons CPU against CPU (to check the tests themselves)
GPU = torch.device(os.environ.get("POLYTASK_TEST_SECOND_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(GPU.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

from test_nn_architectures import CASES, data, make, total_loss  # noqa: E402


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _to(value, device):
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device)


@pytest.mark.parametrize("name", sorted(CASES))
def test_architecture_same_outputs_and_grads_on_gpu(name):
    model, tasks, image = make(name)
    model = model.double()
    x, y = data(tasks, image)
    x = x.double()
    y = {k: v.double() if v.is_floating_point() else v for k, v in y.items()}
    gpu_model = copy.deepcopy(model).to(GPU)
    model.train(), gpu_model.train()
    torch.manual_seed(3)
    out = model(x)
    total_loss(model, tasks, out, y).backward()
    torch.manual_seed(3)
    gpu_out = gpu_model(x.to(GPU))
    total_loss(gpu_model, tasks, gpu_out, _to(y, GPU)).backward()
    for t in tasks:
        torch.testing.assert_close(gpu_out[t.name].cpu(), out[t.name], rtol=1e-9, atol=1e-10)
    cpu_g, gpu_g = _grads(model), _grads(gpu_model)
    assert cpu_g.keys() == gpu_g.keys()
    for key in cpu_g:
        torch.testing.assert_close(gpu_g[key], cpu_g[key], rtol=1e-8, atol=1e-10, msg=key)


TASKS = [Task("a", "regression"), Task("b", "binary"), Task("c", "regression", num_outputs=2), Task("d", "regression")]
RANDOM = {"rlw", "random", "graddrop", "pcgrad", "gradvac"}  # draw random numbers (weights, task orders): CPU and CUDA generators differ


def _balancer_names() -> list[str]:
    seen, names = set(), []
    for n in balance.names():
        cls = balance.BALANCERS.lookup(n)
        if getattr(cls, "needs_heldout", False):  # Auto-Lambda: tests/test_balance_recent.py (held-out batches)
            continue
        if cls not in seen and n not in RANDOM:
            seen.add(cls)
            names.append(n)
    return names


@pytest.mark.parametrize("name", _balancer_names())
def test_balancer_same_grads_on_gpu(name):
    torch.manual_seed(0)
    model = build_model("shared_bottom", 6, TASKS, bottom=(16, 8), tower=(5,)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y = {"a": torch.randn(32, 1, generator=g, dtype=torch.float64),
         "b": (torch.rand(32, generator=g) > 0.5).double(),
         "c": torch.randn(32, 2, generator=g, dtype=torch.float64),
         "d": torch.randn(32, 1, generator=g, dtype=torch.float64)}
    runs = []
    for device in (torch.device("cpu"), GPU):
        torch.manual_seed(5)  # methods that shuffle the task order (GradVac) draw the same order
        m = copy.deepcopy(model).to(device)
        bal = balance.get(name).to(device)
        grads = []
        for _ in range(3):  # several steps: stateful methods (UW, DWA, Nash-MTL warm starts, ...) too
            out = m(x.to(device))
            losses = {t.name: t.loss(out[t.name], y[t.name].to(device)) for t in TASKS}
            m.zero_grad(set_to_none=True)
            bal.backward(losses, shared=list(m.shared_parameters()), features=m.shared_features)
            grads.append(_grads(m))
            with torch.no_grad():
                for p in m.parameters():
                    if p.grad is not None:
                        p -= 0.01 * p.grad
            if bal.needs_post_step_losses:
                with torch.no_grad():
                    out = m(x.to(device))
                    bal.post_step({t.name: t.loss(out[t.name], y[t.name].to(device)) for t in TASKS})
            if hasattr(bal, "end_epoch"):
                bal.end_epoch()
        runs.append(grads)
    for step, (cpu_g, gpu_g) in enumerate(zip(*runs)):
        assert cpu_g.keys() == gpu_g.keys()
        for key in cpu_g:
            # iterative solvers (Nash-MTL, CAGrad, FairGrad) stop on tolerances: 1e-6 relative
            torch.testing.assert_close(gpu_g[key], cpu_g[key], rtol=1e-6, atol=1e-9, msg=f"{name} step {step} {key}")


def test_mpnn_same_outputs_on_gpu():
    pytest.importorskip("torch_geometric")
    from polytask.nn.mpnn import MPNN

    torch.manual_seed(0)
    tasks = [Task(f"t{i}", "regression") for i in range(3)]
    model = MPNN(11, tasks).double()
    gpu_model = copy.deepcopy(model).to(GPU)

    class Batch:  # two molecules of 3 and 2 atoms, fully connected
        pass

    g = torch.Generator().manual_seed(0)
    b = Batch()
    b.x = torch.randn(5, 11, generator=g, dtype=torch.float64)
    pairs = [(i, j) for lo, hi in ((0, 3), (3, 5)) for i in range(lo, hi) for j in range(lo, hi) if i != j]
    b.edge_index = torch.tensor(pairs).t().contiguous()
    b.edge_attr = torch.randn(len(pairs), 5, generator=g, dtype=torch.float64)
    b.batch = torch.tensor([0, 0, 0, 1, 1])
    b.ptr = torch.tensor([0, 3, 5])
    b.max_nodes = 3
    gb = Batch()
    for k, v in vars(b).items():
        setattr(gb, k, v.to(GPU) if isinstance(v, torch.Tensor) else v)
    out, gpu_out = model(b), gpu_model(gb)
    sum(v.sum() for v in out.values()).backward()
    sum(v.sum() for v in gpu_out.values()).backward()
    for t in tasks:
        torch.testing.assert_close(gpu_out[t.name].cpu(), out[t.name], rtol=1e-9, atol=1e-10)
    for key, grad in _grads(model).items():
        torch.testing.assert_close(_grads(gpu_model)[key], grad, rtol=1e-8, atol=1e-10, msg=key)
