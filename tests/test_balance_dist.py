"""Issue 19: every registered balancer is exact under torch.distributed.

Two gloo processes over 127.0.0.1 (ONE spawn for every case, float64): each rank passes the losses
of its own part of a global batch with ``process_group=``; after 3 optimisation steps the
parameters and the balancer's state must equal those of ONE process on the concatenated batch
(polytask itself is the peer), and be bit-identical on the two ranks (no divergence: the MGDA and
Nash-MTL bug of the issue). Variants: equal halves without counts; masks with unequal rows per rank
and unequal labelled counts (a task with no labelled row on one rank), with ``counts=``; the
one-pass ``task_features`` path; a model wrapped in ``DistributedDataParallel`` run under
``no_sync()`` (with an unused parameter and ``find_unused_parameters=True``).
"""

from __future__ import annotations

import os
import sys
import socket
from contextlib import contextmanager, nullcontext
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from polytask import balance
from polytask.balance import GradientBalancer
from polytask.balance.aggregators import gramian_only as _gramian_only
from polytask.balance.registry import BALANCERS
from polytask.nn import build_model
from polytask.tasks import Task
from polytask.errors import ConfigError

TASKS = 3
STEPS = 3
RANDOM_SEEDED = {"rlw", "random", "pcgrad", "gradvac", "graddrop"}  # built with seed= (identical draws everywhere)


def _methods() -> list[str]:
    first: dict[object, str] = {}
    for name in balance.names():
        if getattr(balance.get(name), "needs_heldout", False):  # Auto-Lambda: tests/test_balance_recent.py
            continue
        first.setdefault(BALANCERS.lookup(name), name)
    return sorted(first.values())


def _cases() -> list[tuple[str, str | None, str, tuple]]:
    """``(name, mode, variant, extra kwargs)`` for every balancer."""
    cases = []
    for name in _methods():
        b = balance.get(name)
        if isinstance(b, GradientBalancer):
            modes = ["parameters"] + ([] if b.aggregator.parameter_space_only else ["features"])
            for mode in modes:
                for variant in ("plain", "masked", "task_features"):
                    cases.append((name, mode, variant, ()))
                if mode == "features" and _gramian_only(b.aggregator):
                    cases.append((name, mode, "linear_heads", ()))  # the engine's Gramian-only source
                    cases.append((name, mode, "routed", ()))  # per-task representations: diagonal Gramian
        else:
            for variant in ("plain", "masked", "nosync"):
                cases.append((name, None, variant, ()))
    cases.append(("gradnorm", None, "masked", (("layer", "features"),)))
    for name, mode in (("ew", None), ("uw", None), ("famo", None), ("db_mtl", None), ("gradnorm", None), ("rlw", None),
                       ("mgda", "parameters"), ("nash_mtl", "features"), ("pcgrad", "features"), ("moco", "parameters")):
        cases.append((name, mode, "accumulate", ()))  # 2 micro-batches per rank and step
    for name, mode in (("rlw", None), ("pcgrad", "parameters"), ("graddrop", "features")):
        cases.append((name, mode, "unseeded", ()))
    for name in _methods():  # a NaN loss, or a NaN gradient under a finite loss, on rank 1 only at step 2
        mode = "features" if name in ("mgda_ub", "graddrop") else None
        cases.append((name, mode, "nan", ()))
        cases.append((name, mode, "gradnan", ()))  # rank 0's seed, broadcast: the ranks still agree
    for name, mode in (("ew", None), ("uw", None), ("famo", None), ("mgda", "parameters"), ("nash_mtl", "features"),
                       ("pcgrad", "parameters")):
        cases.append((name, mode, "ddp", ()))
    for name in _methods():  # the wrapper reduces: FSDP2's fully_shard, or DDP outside no_sync()
        if balance.get(name).supports_external_reduction:
            cases.append((name, None, "fsdp", ()))
            cases.append((name, None, "ddp_reduces", ()))
    for name in ("ew", "uw", "famo"):
        cases.append((name, None, "fsdp_nan", ()))  # a NaN loss on rank 1: every rank zeroes FSDP's reduced .grad
    return cases


CASES = _cases()


def _ids(case) -> str:
    name, mode, variant, extra = case
    return "-".join([name] + ([mode] if mode else []) + [variant] + [f"{k}={v}" for k, v in extra])


def build(case):
    name, mode, _, extra = case
    kwargs = dict(extra)
    if mode is not None:
        kwargs["mode"] = mode
    if name in RANDOM_SEEDED and case[2] != "unseeded":
        kwargs["seed"] = 11
    return balance.get(name, **kwargs)


class Problem(nn.Module):
    """Shared trunk, one linear head per task (float64), an unused parameter (DDP's unused-parameter case);
    with ``copies`` the heads read per-task copies of the shared features (``task_features``)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        self.heads = nn.ModuleList(nn.Linear(3, 1).double() for _ in range(TASKS))
        self.unused = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
        self.z = self.task_features = None

    def forward(self, x: torch.Tensor, copies: bool = False) -> list[torch.Tensor]:
        self.z = self.trunk(x)
        if copies:
            self.task_features = self.z.unsqueeze(0).expand(TASKS, *self.z.shape)
            return [head(self.task_features[t]) for t, head in enumerate(self.heads)]
        self.task_features = None
        return [head(self.z) for head in self.heads]


def global_batch(step: int, masked: bool):
    """12 rows; with ``masked``, per-task label masks (task 2 has no labelled row in rows 0-4 at step 1)."""
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randn(12, TASKS, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    mask = torch.rand(12, TASKS, generator=g) < 0.7 if masked else torch.ones(12, TASKS, dtype=torch.bool)
    mask[0, :] = True  # every task labelled somewhere
    mask[11, :] = True
    if masked and step == 1:
        mask[1:5, 2] = False
        mask[0, 2] = False
    return x, y, mask


def rows_of(rank: int | None, masked: bool) -> slice:
    """Rank 0's and rank 1's rows: halves, or 5 and 7 rows under masks; all rows for one process."""
    if rank is None:
        return slice(0, 12)
    cut = 5 if masked else 6
    return slice(0, cut) if rank == 0 else slice(cut, 12)


def losses_of(outputs, y, mask):
    out = {}
    for t, pred in enumerate(outputs):
        m = mask[:, t].to(pred.dtype)
        out[f"t{t}"] = (((pred[:, 0] - y[:, t]) ** 2) * m).sum() / m.sum().clamp_min(1)
    return out


@contextmanager
def no_host_sync():
    """Make every host synchronisation of a tensor (``item``, ``tolist``, ``bool`` ...) raise, as
    ``tests/test_balance_loss.py::test_backward_makes_no_host_sync`` does in one process."""
    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation inside a training step")

    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, refuse)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def _train_polytask_model(case, rank: int | None, group, model, task_features_of, spied: str, took_path) -> tuple:
    """``train`` for a polytask model: 3 SGD steps on masked rows; ``spied`` (a GradientBalancer method)
    must run at every step, each call judged by ``took_path(kwargs)``."""
    b = build(case)
    calls = []
    original = getattr(b, spied)
    setattr(b, spied, lambda *args, **kwargs: (calls.append(took_path(kwargs)), original(*args, **kwargs))[1])
    names = list(model.task_names)
    for step in range(STEPS):
        x, y, mask = global_batch(step, True)
        part = rows_of(rank, True)
        x, y, mask = x[part], y[part], mask[part]
        model.zero_grad(set_to_none=True)
        out = model(x)
        losses = losses_of([out[t] for t in names], y, mask)
        kwargs = {} if group is None else {"process_group": group, "counts": mask.sum(0)}
        b.backward(losses, shared=list(model.shared_parameters()), features=model.shared_features,
                   task_features=task_features_of(model), **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    assert calls == [True] * STEPS, f"{spied} ran {calls} in {STEPS} steps"
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return params, {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}


def train_linear_heads(case, rank: int | None, group=None):
    """``train`` for a polytask shared-bottom model whose heads read per-task copies (``task_features``): the
    feature Gramian comes from the heads' linear layer without the feature Jacobian (spied: it must run)."""
    tasks = [Task(f"t{t}", "regression") for t in range(TASKS)]
    torch.manual_seed(0)
    model = build_model("shared_bottom", 4, tasks, bottom=(9, 20), tower=()).double().expose_task_features()
    return _train_polytask_model(case, rank, group, model, lambda m: m.task_features, "_backward_linear_heads",
                                 lambda kwargs: True)


def train_routed(case, rank: int | None, group=None):
    """``train`` for MMoE, whose per-task mixtures are per-task representations (``task_features`` is
    ``shared_features``; the gates are task-specific parameters below them): the feature Jacobian is
    block-diagonal, so the engine sums diagonal Gramians over the ranks (spied: that path must run)."""
    tasks = [Task(f"t{t}", "regression") for t in range(TASKS)]
    torch.manual_seed(0)
    model = build_model("mmoe", 4, tasks, num_experts=3, expert=(6,), tower=(3,)).double()
    spied = "_backward_block_diagonal" if group is None else "_features_step"
    return _train_polytask_model(case, rank, group, model, lambda m: m.shared_features, spied,
                                 lambda kwargs: group is None or kwargs.get("gramian") is not None)


def train(case, rank: int | None, group=None):
    """3 SGD steps of ``case`` on this rank's rows (all rows when ``rank`` is None); parameters and state."""
    name, mode, variant, _ = case
    if variant == "linear_heads":
        return train_linear_heads(case, rank, group)
    if variant == "routed":
        return train_routed(case, rank, group)
    masked = variant in ("masked", "accumulate", "nosync")
    copies = variant == "task_features"
    model = Problem()
    b = build(case)
    runner = model
    extra_kwargs = {}
    if variant in ("ddp", "ddp_reduces") and group is not None:
        runner = nn.parallel.DistributedDataParallel(model, process_group=group, find_unused_parameters=True)
        if b.__class__.__name__ != "GradientBalancer" or variant == "ddp_reduces":
            extra_kwargs = {"parameters": list(model.parameters())}  # reduce every parameter, used or not
        if variant == "ddp_reduces":
            extra_kwargs["reduce_gradients"] = False
    if variant in ("fsdp", "fsdp_nan") and group is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        extra_kwargs = {"parameters": list(model.parameters()), "reduce_gradients": False}
    for step in range(STEPS):
        x, y, mask = global_batch(step, masked)
        part = rows_of(rank, masked)
        x, y, mask = x[part], y[part], mask[part]
        for p in model.parameters():
            p.grad = None
        kwargs = {}
        if group is not None:
            kwargs.update(extra_kwargs)
            kwargs["process_group"] = group
            if masked:
                kwargs["counts"] = mask.sum(0)
        if variant == "accumulate" and group is not None:  # this rank's rows in two micro-batches
            half = x.shape[0] // 2
            for sub in (slice(0, half), slice(half, x.shape[0])):
                losses = losses_of(model(x[sub]), y[sub], mask[sub])
                call = b.accumulate if sub.start == 0 else partial(b.backward, process_group=group)
                call(losses, shared=list(model.trunk.parameters()), features=model.z, counts=mask[sub].sum(0))
            losses = None
        sync = runner.no_sync() if variant == "ddp" and group is not None else nullcontext()
        guard = no_host_sync() if variant == "nosync" and step > 0 else nullcontext()  # step 0 binds, walks
        with sync, guard:
            if variant != "accumulate" or group is None:
                outputs = runner(x, copies) if copies else runner(x)
                losses = losses_of(outputs, y, mask)
                if variant in ("nan", "gradnan", "fsdp_nan") and step == 1 and rank != 0:  # rank 1 (or the one process) only
                    losses["t1"] = losses["t1"] * float("nan") if variant == "nan" else \
                        losses["t1"] + torch.sqrt(model.z.sum() * 0.0)
                b.backward(losses, shared=list(model.trunk.parameters()), features=model.z,
                           **({"task_features": model.task_features} if copies else {}), **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
            if b.needs_post_step_losses:
                b.post_step(losses_of(model(x), y, mask),
                            **{k: v for k, v in kwargs.items() if k not in ("parameters", "reduce_gradients")})
                if hasattr(model, "reshard"):  # FSDP2 keeps the root unsharded after a forward without backward
                    model.reshard()
        b.end_epoch()
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]  # FSDP: gathered
    params = torch.cat([p.detach().reshape(-1) for p in full])
    state = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    return params, state


def _worker(rank: int, port: int, out_dir: str, cases, train_fn=None, ids_fn=None, extras=()) -> None:
    """One rank: every case through ``train_fn`` (default :func:`train`), then each ``(key, fn)`` of
    ``extras`` as ``fn(group)``; the results saved as ``out_dir/rank{rank}.pt``."""
    train_fn, ids_fn = train_fn or train, ids_fn or _ids
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for case in cases:
            try:
                results[ids_fn(case)] = train_fn(case, rank, dist.group.WORLD)
            except Exception as exc:  # reported by the test of that case, the other cases still run
                results[ids_fn(case)] = repr(exc)
        for key, fn in extras:
            results[key] = fn(dist.group.WORLD)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # done: leave before the interpreter's teardown, which gloo's threads can abort (SIGABRT)
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case at world size 2, in ONE spawn of two gloo processes."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out), CASES), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def check_two_ranks_equal_one_process(two_ranks, key, case, train_fn, skipped_variants=("nan", "gradnan", "fsdp_nan")):
    """Both ranks bit-identical (no divergence), and rank 0 equal to ``train_fn(case, None)``: one process
    on the concatenated batch (parameters and balancer state). Also used by test_balance_fsdp."""
    got0, got1 = two_ranks[0][key], two_ranks[1][key]
    assert not isinstance(got0, str), got0
    assert not isinstance(got1, str), got1
    (p0, s0), (p1, s1) = got0, got1
    if case[2] in skipped_variants:  # every rank skipped the step together, and counted it once
        assert int(s0["skipped_steps"]) == 1 and int(s1["skipped_steps"]) == 1
    # no divergence: the ranks hold the same parameters and state, to the bit
    assert torch.equal(p0, p1)
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert torch.isfinite(p0).all()
    if case[2] == "unseeded":  # draws from the global generator in one process: no peer to compare with
        return
    # one process on the concatenated batch
    torch.manual_seed(0)
    ref_params, ref_state = train_fn(case, None)
    torch.testing.assert_close(p0, ref_params, rtol=1e-9, atol=1e-11)
    assert s0.keys() == ref_state.keys()
    for k in s0:
        if s0[k].dtype.is_floating_point:
            torch.testing.assert_close(s0[k], ref_state[k], rtol=1e-9, atol=1e-11, equal_nan=True, msg=k)
        elif k != "rng_state":
            assert torch.equal(s0[k], ref_state[k]), k


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks, case):
    check_two_ranks_equal_one_process(two_ranks, _ids(case), case, train)


def test_the_comparison_can_fail_each_rank_alone_is_not_the_global_step(two_ranks):
    """A rank that balanced its own half alone (no process group) differs from the global step."""
    case = ("mgda", "parameters", "plain", ())
    alone, _ = train(case, 0)
    ref, _ = train(case, None)
    assert not torch.allclose(alone, ref, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------ mixed precision
def _one_step(b, scale=None, fault=False):
    model = Problem()
    x, y, mask = global_batch(0, True)
    losses = losses_of(model(x), y, mask)
    if fault:
        losses["t1"] = losses["t1"] * float("nan")
    kwargs = {} if scale is None else {"loss_scale": torch.tensor(scale, dtype=torch.float64)}
    b.backward(losses, shared=list(model.trunk.parameters()), features=model.z, **kwargs)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == "plain"], ids=[_ids(c) for c in CASES if c[2] == "plain"])
def test_loss_scale_leaves_grad_scaled_and_balances_the_unscaled_gradients(case):
    """With ``loss_scale=s`` the balancer's weights come from the UNSCALED gradients (the Gramian of
    scaled gradients is not the Gramian) and ``.grad`` is ``s`` times the unscaled step, as a
    GradScaler expects; a non-finite step leaves NaN in ``.grad`` (the scaler must see the overflow)
    and is counted."""
    plain, scaled = build(case), build(case)
    reference = _one_step(plain)
    got = _one_step(scaled, 1024.0)
    torch.testing.assert_close(got, 1024.0 * reference, rtol=1e-10, atol=1e-12)
    s_plain, s_scaled = plain.state_dict(), scaled.state_dict()
    for k in s_plain:
        if s_plain[k].dtype.is_floating_point:
            torch.testing.assert_close(s_scaled[k], s_plain[k], rtol=1e-10, atol=1e-12, equal_nan=True, msg=k)
    bad = _one_step(scaled, 1024.0, fault=True)
    assert torch.isnan(bad).all() and int(scaled.skipped_steps) == 1


def test_a_wrong_variant_is_caught_scaled_gradients_change_nash_mtl_weights():
    """Proof that the test above can fail: Nash-MTL's weights solve ``G w = 1/w``, so on gradients scaled
    by s they scale by 1/s: balancing scaled gradients is not the same step."""
    b = balance.get("nash_mtl")
    model = Problem()
    x, y, mask = global_batch(0, True)
    losses = losses_of(model(x), y, mask)
    w_plain = b.backward(losses, shared=list(model.trunk.parameters()))
    model2 = Problem()
    losses2 = {k: v * 1e-6 for k, v in losses_of(model2(x), y, mask).items()}
    w_small = b.backward(losses2, shared=list(model2.trunk.parameters()))
    assert not torch.allclose(w_plain, w_small, rtol=1e-6)


def test_a_seeded_random_method_resumes_its_draws_from_the_state_dict():
    case = ("pcgrad", "parameters", "plain", ())
    a = build(case)
    _one_step(a)
    b = build(case)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(_one_step(b), _one_step(a), rtol=0, atol=0)


# ------------------------------------------------------------------------------ gradient accumulation
def train_accumulated(case, micro: int | None):
    """3 SGD steps on the masked 12-row batches: one batch per step (``micro=None``) or ``micro`` micro-batches
    through ``accumulate`` + ``backward`` (with labelled counts)."""
    model, b = Problem(), build(case)
    for step in range(STEPS):
        x, y, mask = global_batch(step, True)
        for p in model.parameters():
            p.grad = None
        parts = [slice(0, 12)] if micro is None else [slice(0, 5), slice(5, 12)]
        for k, part in enumerate(parts):
            losses = losses_of(model(x[part]), y[part], mask[part])
            kwargs = {} if micro is None else {"counts": mask[part].sum(0)}
            call = b.backward if k == len(parts) - 1 else b.accumulate
            call(losses, shared=list(model.trunk.parameters()), features=model.z, **kwargs)
        assert not b.accumulating
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
            if b.needs_post_step_losses:  # the whole batch's losses after the step
                b.post_step(losses_of(model(x), y, mask))
        b.end_epoch()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return params, {k: v for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}


ACC_CASES = [c for c in CASES if c[2] == "plain"] + [("gradnorm", None, "plain", (("layer", "features"),))]


@pytest.mark.parametrize("case", ACC_CASES, ids=[_ids(c) for c in ACC_CASES])
def test_accumulating_two_micro_batches_equals_one_double_batch(case):
    name, mode, _, extra = case
    per_coordinate = mode == "features" and not _gramian_only(balance.get(name).aggregator)  # graddrop, trimmed_mean
    if per_coordinate or dict(extra).get("layer") == "features":
        with pytest.raises(ConfigError, match="cannot accumulate"):
            train_accumulated(case, 2)
        return
    got, got_state = train_accumulated(case, 2)
    ref, ref_state = train_accumulated(case, None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    for k in ref_state:
        if ref_state[k].dtype.is_floating_point:
            torch.testing.assert_close(got_state[k], ref_state[k], rtol=1e-9, atol=1e-11, equal_nan=True, msg=k)


def test_accumulation_can_fail_combining_each_micro_batch_is_not_the_batch_step():
    """The wrong variant -- balance each micro-batch and add the updates -- differs for MGDA."""
    case = ("mgda", "parameters", "plain", ())
    model, b = Problem(), build(case)
    x, y, mask = global_batch(0, True)
    for part in (slice(0, 5), slice(5, 12)):
        b.backward(losses_of(model(x[part]), y[part], mask[part]), shared=list(model.trunk.parameters()))
    wrong = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model2, b2 = Problem(), build(case)
    b2.backward(losses_of(model2(x), y, mask), shared=list(model2.trunk.parameters()))
    right = torch.cat([p.grad.reshape(-1) for p in model2.parameters() if p.grad is not None])
    assert not torch.allclose(wrong / 2, right, rtol=1e-4)


def test_bad_counts_and_mismatched_micro_batches_are_named():
    model, b = Problem(), balance.get("ew")
    x, y, mask = global_batch(0, True)
    with pytest.raises(ConfigError, match="'t2'"):
        b.accumulate(losses_of(model(x), y, mask), counts={"t0": 3, "t1": 4})
    with pytest.raises(ConfigError, match="2 entries for 3 tasks"):
        b.accumulate(losses_of(model(x), y, mask), counts=torch.tensor([1.0, 2.0]))
    b.accumulate(losses_of(model(x), y, mask))
    assert b.accumulating
    losses = losses_of(model(x), y, mask)
    with pytest.raises(ConfigError, match="same tasks"):
        b.backward({"t0": losses["t0"], "t1": losses["t1"]})


def test_methods_with_per_task_parameter_gradients_refuse_external_reduction():
    model = Problem()
    x, y, mask = global_batch(0, False)
    for name in ("mgda", "db_mtl", "gradnorm"):
        b = balance.get(name)
        assert not b.supports_external_reduction
        with pytest.raises(ConfigError, match="reduce_gradients"):
            b.backward(losses_of(model(x), y, mask), shared=list(model.trunk.parameters()), features=model.z,
                       parameters=list(model.parameters()), reduce_gradients=False)
    with pytest.raises(ConfigError, match="parameters="):
        balance.get("ew").backward(losses_of(model(x), y, mask), reduce_gradients=False)
