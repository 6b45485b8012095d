"""Issue 19, FSDP: feature-level gradient balancers under FSDP2's ``fully_shard`` are exact.

Two gloo processes (ONE spawn for every case, float64): the model is sharded with ``fully_shard``
(the root alone, or one unit per trunk and per head then the root, as ``polytask train`` does), each
rank passes the losses of its own part of the global batch with ``reduce_gradients=False``; FSDP2's
reduce-scatter fills the sharded ``.grad``. After 3 SGD steps the gathered parameters and the
balancer's state must equal ONE process on the concatenated batch (the ordinary single-process
feature-level path), and be bit-identical on the two ranks. Parameter level is refused in one line.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_balance_dist import (STEPS, Problem, _free_port, _worker, check_two_ranks_equal_one_process, global_batch,
                               losses_of, no_host_sync, rows_of)

from polytask import balance
from polytask.balance import GradientBalancer
from polytask.errors import ConfigError

SEEDED = {"pcgrad", "gradvac", "graddrop"}


def _feature_methods() -> list[str]:
    first: dict[object, str] = {}
    for name in balance.names():
        b = balance.get(name)
        if isinstance(b, GradientBalancer) and not b.aggregator.parameter_space_only:
            first.setdefault(type(b.aggregator), name)
    return sorted(first.values())


METHODS = _feature_methods()
# (method, wrapping, inputs): every feature-level method in the hardest wrapping (the heads resharded between
# the per-task passes) with label masks and counts; the other wrappings/inputs on a few methods.
CASES = ([(m, "units", "masked") for m in METHODS]
         + [(m, "root", "plain") for m in ("mgda", "nash_mtl", "pcgrad")]
         + [(m, "units", "task_features") for m in ("mgda", "upgrad", "graddrop")]
         + [(m, "units", "nan") for m in ("mgda", "nash_mtl")]
         + [(m, "units", "nosync") for m in ("imtl_g", "aligned_mtl")])  # solvers without a host sync


def _ids(case) -> str:
    return "-".join(case)


def build(name: str):
    return balance.get(name, mode="features", **({"seed": 11} if name in SEEDED else {}))


def train(case, rank: int | None, group=None):
    """3 SGD steps on this rank's rows (all rows when ``rank`` is None: the one-process reference, unsharded)."""
    name, wrapping, variant = case
    masked = variant in ("masked", "nosync")
    copies = variant == "task_features"
    model, b = Problem(), build(name)
    kwargs = {}
    if group is not None:
        from torch.distributed.fsdp import fully_shard

        if wrapping == "units":
            fully_shard(model.trunk)
            for head in model.heads:
                fully_shard(head)
        fully_shard(model)
        kwargs = {"parameters": list(model.parameters()), "reduce_gradients": False, "process_group": group}
    for step in range(STEPS):
        x, y, mask = global_batch(step, masked)
        part = rows_of(rank, masked)
        x, y, mask = x[part], y[part], mask[part]
        for p in model.parameters():
            p.grad = None
        step_kwargs = dict(kwargs, **({"counts": mask.sum(0)} if masked and group is not None else {}))
        # the FSDP path reads nothing on the host (step 0 walks the graph; the one-process path reads its CPU flag)
        guard = no_host_sync() if variant == "nosync" and step > 0 and group is not None else _null()
        with guard:
            losses = losses_of(model(x, copies) if copies else model(x), y, mask)
            if variant == "nan" and step == 1 and rank != 0:  # rank 1 (or the one process) only
                losses["t1"] = losses["t1"] * float("nan")
            b.backward(losses, shared=list(model.trunk.parameters()), features=model.z,
                       **({"task_features": model.task_features} if copies else {}), **step_kwargs)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    params = torch.cat([p.detach().reshape(-1) for p in full])
    state = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    return params, state


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _refusal(group) -> str:
    """The one-line refusal of a parameter-level method under ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard

    model = Problem()
    fully_shard(model)
    x, y, mask = global_batch(0, False)
    losses = losses_of(model(x[:6]), y[:6], mask[:6])
    try:
        balance.get("mgda").backward(losses, shared=list(model.trunk.parameters()), features=model.z,
                                     process_group=group, parameters=list(model.parameters()), reduce_gradients=False)
    except ConfigError as exc:
        return str(exc)
    return "no error"


class Gated(Problem):
    """A task-specific parameter (a gate) below the shared features."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x, copies=False):
        self.z = self.trunk(x) * self.gate
        return [head(self.z) for head in self.heads]


def _gated_refusal(group) -> str:
    """Under ``fully_shard`` the gathered parameters are not the ``shared`` ones: the check counts them."""
    from torch.distributed.fsdp import fully_shard

    model = Gated()
    fully_shard(model.trunk)
    fully_shard(model)
    x, y, mask = global_batch(0, False)
    losses = losses_of(model(x[:6]), y[:6], mask[:6])
    try:
        build("mgda").backward(losses, shared=list(model.trunk.parameters()), features=model.z, process_group=group,
                               parameters=list(model.parameters()), reduce_gradients=False)
    except ConfigError as exc:
        return str(exc)
    return "no error"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("FSDP2 (fully_shard) is not available")
    out = tmp_path_factory.mktemp("fsdp")
    extras = (("refusal", _refusal), ("gated", _gated_refusal))
    mp.spawn(_worker, args=(_free_port(), str(out), CASES, train, _ids, extras), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_every_feature_level_gradient_method_is_covered():
    assert {"mgda", "nash_mtl", "imtl_g", "cagrad", "upgrad", "dualproj", "aligned_mtl", "fairgrad", "pcgrad",
            "gradvac", "config", "graddrop"} <= set(METHODS)
    assert all(build(m).supports_external_reduction for m in METHODS)
    assert not balance.get("mgda").supports_external_reduction  # parameter level


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_fully_shard_at_two_ranks_equals_one_process_on_the_concatenated_batch(two_ranks, case):
    check_two_ranks_equal_one_process(two_ranks, _ids(case), case, train, skipped_variants=("nan",))

def test_the_comparison_can_fail_weights_of_the_local_gramian_are_not_the_global_step(two_ranks):
    """Each rank balancing its own rows alone differs from the global step (MGDA), so equality above means something."""
    alone, _ = train(("mgda", "units", "masked"), 0)
    ref, _ = train(("mgda", "units", "masked"), None)
    assert not torch.allclose(alone, ref, rtol=1e-6, atol=1e-8)


def test_parameter_level_under_fully_shard_is_refused_in_one_line_saying_why(two_ranks):
    for msg in (two_ranks[0]["refusal"], two_ranks[1]["refusal"]):
        assert "\n" not in msg
        assert "parameter level" in msg and "per-task gradients" in msg and "mode='features'" in msg, msg


def test_a_gate_below_the_features_is_refused_under_fully_shard(two_ranks):
    for results in two_ranks:
        assert "below the features" in results["gated"], results["gated"]


# ------------------------------------------------------------------------------ one process, no spawn
def _step(b, external: bool, scale=None, fault=False, model=None):
    """One step on the masked global batch: ``.grad`` of every parameter, flat, and the weights."""
    model = model or Problem()
    x, y, mask = global_batch(0, True)
    losses = losses_of(model(x), y, mask)
    if fault:
        losses["t1"] = losses["t1"] * float("nan")
    kwargs = {} if scale is None else {"loss_scale": torch.tensor(scale, dtype=torch.float64)}
    if external:
        kwargs.update(parameters=list(model.parameters()), reduce_gradients=False)
    w = b.backward(losses, shared=list(model.trunk.parameters()), features=model.z, **kwargs)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return grads, w


@pytest.mark.parametrize("name", METHODS)
def test_the_external_path_in_one_process_is_the_feature_level_step(name):
    """``reduce_gradients=False`` without a group (world size 1): the same ``.grad`` (heads their own task's gradient,
    trunk the combined one) and weights as the ordinary feature-level path; ``loss_scale`` leaves ``.grad`` scaled."""
    ref, w_ref = _step(build(name), False)
    got, w = _step(build(name), True)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    scaled, _ = _step(build(name), True, scale=1024.0)
    torch.testing.assert_close(scaled, 1024.0 * ref, rtol=1e-10, atol=1e-10)


def test_a_non_finite_step_on_the_external_path_is_skipped_counted_and_nan_under_a_loss_scale():
    b = build("nash_mtl")
    grads, w = _step(b, True, fault=True)
    assert torch.equal(grads, torch.zeros_like(grads)) and torch.equal(w, torch.zeros_like(w))
    assert int(b.skipped_steps) == 1
    grads, _ = _step(b, True, scale=1024.0, fault=True)
    assert torch.isnan(grads).all() and int(b.skipped_steps) == 2
    with pytest.raises(Exception, match="'t1'"):
        _step(balance.get("mgda", mode="features", nan_policy="raise"), True, fault=True)


def test_task_specific_parameters_below_the_features_are_refused_on_the_external_path():
    """A routed model's gate below the features would get the combined gradient, not its task's: refused."""
    with pytest.raises(ConfigError, match="below the features"):
        _step(build("mgda"), True, model=Gated())
    with pytest.raises(ConfigError, match="features= "):
        build("mgda").backward(losses_of(Problem()(global_batch(0, False)[0]), *global_batch(0, False)[1:]),
                               shared=None, features=None, parameters=[], reduce_gradients=False)
