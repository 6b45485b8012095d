"""``train.grad_clip`` with sparse embedding tables (polytask.train.rowwise.clip_grad_norm): what
``torch.nn.utils.clip_grad_norm_`` does on a dense twin (same init, dense tables) over several
steps with SGD, Adam (SparseAdam on the tables) and row-wise Adagrad, with duplicate ids, a zero
gradient, a NaN or an infinite loss; a hand case that rejects the norm of uncoalesced values; no
host sync; a trainer run with sparse tables equal to the dense run; two gloo ranks equal to one
process on the global batch (the norm taken after the reduction)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _ranks import run_ranks
import torch

from polytask.train.config import OptimConfig
from polytask.train.rowwise import RowWiseAdagrad, clip_grad_norm
from polytask.train.tables import SparseDenseOptimizer

sys.path.insert(0, str(Path(__file__).parent))
from test_tables_sparse_dist import build, global_batches  # noqa: E402  (the MMoE over two id columns)

TABLES = ("user", "item")
MAX_NORM = 0.29  # the plain steps' norms are 0.25-0.33: some clipped, some not


def _losses(model, tasks, batch, kind):
    out = model(batch.inputs)
    losses = [t.loss(out[t.name], batch.targets[t.name], batch.mask[t.name]) for t in tasks]
    if kind == "zero":  # every gradient zero: the norm is 0 and nothing is scaled
        return (losses[0] + losses[1]) * 0.0
    return losses[0] * (float("nan") if kind == "nan" else 1.0) + losses[1]  # a NaN in one loss


class DenseTwin:
    """The dense model's optimiser doing what SparseDenseOptimizer does on the tables: SGD on all
    (untouched rows get a zero gradient: no move); SparseAdam fed the dense gradient's touched rows;
    row-wise Adagrad on the dense gradient (a zero row moves by 0, documented and tested)."""

    def __init__(self, model, rule, lr):
        tables = [model.input.tables[c].weight for c in TABLES]
        ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if id(p) not in ids]
        self.tables, self.rule = tables, rule
        if rule == "sgd":
            self.opts = [torch.optim.SGD(model.parameters(), lr=lr)]
        elif rule == "adam":
            self.opts = [torch.optim.Adam(dense, lr=lr), torch.optim.SparseAdam(tables, lr=lr)]
        else:
            self.opts = [torch.optim.Adam(dense, lr=lr), RowWiseAdagrad(tables, lr=lr)]

    def step(self, batch):
        if self.rule == "adam":  # the lazy Adam sees the batch's rows only, as the sparse gradient has them
            for c, p in zip(TABLES, self.tables):
                rows = torch.unique(batch.inputs[c])
                p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), p.grad[rows], p.shape, is_coalesced=True,
                                                 check_invariants=True)
        for opt in self.opts:
            opt.step()


STEPS = ["plain", "plain", "zero", "plain", "plain"]


def _comparable(got, want, name, batch, kind):
    """Both tensors, but after a NaN loss only the batch's rows of a table: torch scales the dense
    twin's zero rows by NaN too, while a sparse gradient has no entry for an untouched row (its row
    stays as it is; checked here)."""
    column = name.split(".")[2] if name.startswith("input.tables.") else None
    if kind != "nan" or column is None:
        return got, want
    rows = torch.unique(batch.inputs[column])
    untouched = torch.ones(got.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert torch.isfinite(got[untouched]).all()
    return got[rows], want[rows]


@pytest.mark.parametrize("rule", ["sgd", "adam", "rowwise_adagrad"])
@pytest.mark.parametrize("last", ["plain", "nan"])
def test_sparse_clipping_equals_torch_on_the_dense_twin_over_steps(rule, last):
    sparse_model, tasks = build(sparse=True)
    dense_model, _ = build(sparse=False)
    lr = 0.05
    name = "sgd" if rule == "sgd" else "adam"
    sparse_opt = SparseDenseOptimizer([{"params": list(sparse_model.parameters())}],
                                      [sparse_model.input.tables[c].weight for c in TABLES],
                                      OptimConfig(name=name, lr=lr, momentum=0.0), [rule, rule])
    twin = DenseTwin(dense_model, rule, lr)
    kinds = [*STEPS, last]
    clipped = []
    for kind, batch in zip(kinds, global_batches(steps=len(kinds))):
        for model in (sparse_model, dense_model):
            model.zero_grad(set_to_none=True)
            _losses(model, tasks, batch, kind).backward()
        assert not sparse_model.input.tables["user"].weight.grad.is_coalesced()  # duplicate ids in the batch
        total = clip_grad_norm(sparse_model.parameters(), MAX_NORM)
        want = torch.nn.utils.clip_grad_norm_(dense_model.parameters(), MAX_NORM)
        torch.testing.assert_close(total, want, rtol=1e-12, atol=0, equal_nan=True)
        clipped.append(bool(want > MAX_NORM))
        for (n, p), q in zip(sparse_model.named_parameters(), dense_model.parameters()):
            g = p.grad.to_dense() if p.grad.is_sparse else p.grad
            torch.testing.assert_close(*_comparable(g, q.grad, n, batch, kind), rtol=1e-12, atol=1e-15,
                                       equal_nan=True, msg=n)
        sparse_opt.step()
        twin.step(batch)
        for (n, p), q in zip(sparse_model.named_parameters(), dense_model.parameters()):
            torch.testing.assert_close(*_comparable(p, q, n, batch, kind), rtol=1e-12, atol=1e-14, equal_nan=True,
                                       msg=n)
    plain = [c for c, k in zip(clipped, kinds) if k == "plain"]
    assert any(plain) and not all(plain) and not clipped[2]  # cut and left alone, the zero step too
    user = sparse_model.input.tables["user"].weight
    if last == "plain":
        assert torch.isfinite(user).all()
    else:  # torch's rule: a NaN norm turns every update into NaN (here: every touched row's)
        assert torch.isnan(user).any() and torch.isfinite(user[12:]).all()  # ids 12.. never occur


def test_hand_case_duplicate_rows_add_before_the_norm():
    """Dense gradient [3, 0]; sparse rows 1, 1 with values [1, 2] and [3, -2]: row 1 is [4, 0].
    Total = sqrt(3² + 4²) = 5 (the uncoalesced values would give sqrt(9 + 1 + 4 + 9 + 4) = sqrt(27)).
    Scale 1 / (5 + 1e-6): dense [0.6, 0], row 1 [0.8, 0] (to 1e-6)."""
    a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    a.grad = torch.tensor([3.0, 0.0], dtype=torch.float64)
    values = torch.tensor([[1.0, 2.0], [3.0, -2.0]], dtype=torch.float64)
    t.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), values, (3, 2), check_invariants=True)
    total = clip_grad_norm([a, t], 1.0)
    assert total.item() == 5.0
    scale = 1.0 / (5.0 + 1e-6)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 0.0], dtype=torch.float64) * scale, rtol=1e-15, atol=0)
    torch.testing.assert_close(t.grad.to_dense(), torch.tensor([[0, 0], [4.0, 0], [0, 0]], dtype=torch.float64) * scale,
                               rtol=1e-15, atol=0)
    # below the bound nothing moves; without sparse gradients it is torch's function
    b = torch.zeros(2, requires_grad=True)
    b.grad = torch.tensor([0.3, 0.4])
    assert clip_grad_norm([b], 1.0).item() == pytest.approx(0.5) and torch.equal(b.grad, torch.tensor([0.3, 0.4]))


def test_an_infinite_gradient_zeroes_the_finite_entries_as_torch_does():
    """An infinite entry (a NaN-free overflow): total inf, scale max / (inf + 1e-6) = 0, so finite
    entries become 0 and the infinite one NaN (inf · 0), in torch's function on the dense twin too."""
    def grads():
        a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        t = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
        a.grad = torch.tensor([float("inf"), 1.0], dtype=torch.float64)
        rows, values = torch.tensor([[3, 0, 3]]), torch.tensor([[1.0, -2.0], [5.0, 0.5], [2.0, float("-inf")]])
        t.grad = torch.sparse_coo_tensor(rows, values.double(), (4, 2), check_invariants=True)
        return a, t

    a, t = grads()
    total = clip_grad_norm([a, t], 1.0)
    da, dt = grads()
    dt.grad = dt.grad.to_dense()
    want = torch.nn.utils.clip_grad_norm_([da, dt], 1.0)
    assert total.item() == want.item() == float("inf")
    torch.testing.assert_close(a.grad, da.grad, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(t.grad.to_dense(), dt.grad, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(t.grad.to_dense()[3, 1]) and t.grad.to_dense()[0].eq(0).all()


def test_clipping_makes_no_host_sync(monkeypatch):
    model, tasks = build(sparse=True)
    _losses(model, tasks, next(global_batches(1)), "plain").backward()

    def refuse(*_a, **_k):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    clip_grad_norm(model.parameters(), MAX_NORM)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    pytest.importorskip("pyarrow")
    from polytask.train.tables import write_synthetic_splits

    return write_synthetic_splits(tmp_path_factory.mktemp("log"), 600, row_group_rows=300)


@pytest.mark.parametrize("balancer", ["ew", "mgda"])
def test_a_table_run_with_sparse_tables_and_grad_clip_equals_the_dense_run(data, tmp_path, balancer):
    """SGD without momentum, so the sparse tables' rule is the dense one; mgda at parameter level
    gives the tables their touched rows' gradient (TouchedRows.flush), which must come before the clip."""
    from polytask.train import Trainer
    from polytask.train.config import parse_config

    def run(sparse):
        p = {"train": str(data[0]), "val": str(data[1]), "test": str(data[2]), "dense": ["price"],
             "ids": {"user_id": {"sparse": sparse}, "item_id": {"sparse": sparse}}, "embed_dim": 4,
             "labels": {"click": "click", "conversion": "conversion"}}
        cfg = {"name": "t", "out_dir": str(tmp_path / str(sparse)), "device": "cpu", "seed": 1,
               "data": {"name": "table", "params": p}, "model": {"arch": "mmoe", "params": {"num_experts": 2}},
               "balancer": {"name": balancer},
               "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.0},
               "train": {"epochs": 1, "batch_size": 64, "grad_clip": 0.05, "early_stopping": None}}
        trainer = Trainer(parse_config(cfg), progress=False)
        assert (trainer._touched is not None) == (sparse and balancer == "mgda")
        norms = []

        def spy(params, max_norm):  # the step imports it from polytask.train.rowwise when it clips
            norms.append(clip_grad_norm(params, max_norm))
            return norms[-1]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("polytask.train.rowwise.clip_grad_norm", spy)
            trainer.fit()
        return trainer.model.state_dict(), torch.stack(norms)

    (sparse, sparse_norms), (dense, dense_norms) = run(True), run(False)
    assert len(sparse_norms) > 3 and (sparse_norms > 0.05).all()  # every step was clipped
    torch.testing.assert_close(sparse_norms, dense_norms, rtol=1e-5, atol=0)
    for k in dense:
        torch.testing.assert_close(sparse[k], dense[k], rtol=1e-5, atol=1e-6, msg=k)


WORKER = r'''
import os, pickle, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import polytask.balance as balance_lib
from polytask.data.dataset import Batch
from polytask.train.config import OptimConfig
from polytask.train.dist import labelled_counts, shard_bounds
from polytask.train.rowwise import clip_grad_norm
from polytask.train.tables import SparseDenseOptimizer

sys.path.insert(0, os.environ["TESTS"])
from test_tables_sparse_dist import build, global_batches

out = sys.argv[1]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
group = None
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=rank, world_size=world)
    group = dist.group.WORLD
model, tasks = build(sparse=True)
balancer = balance_lib.get("ew")
step_model = DistributedDataParallel(model, process_group=group) if world > 1 else model
tables = [model.input.tables[c].weight for c in ("user", "item")]
opt = SparseDenseOptimizer([{"params": list(model.parameters())}], tables, OptimConfig(name="adam", lr=0.05),
                           ["rowwise_adagrad", True])
names = [t.name for t in tasks]
params_all = [p for p in model.parameters() if p.requires_grad]
norms = []
for batch in global_batches(steps=4):
    lo, hi = shard_bounds(len(batch.targets["a"]), rank, world)
    part = Batch({k: v[lo:hi] for k, v in batch.inputs.items()}, {k: v[lo:hi] for k, v in batch.targets.items()},
                 {k: v[lo:hi] for k, v in batch.mask.items()})
    opt.zero_grad(set_to_none=True)
    ctx = step_model.no_sync() if world > 1 else __import__("contextlib").nullcontext()
    with ctx:
        outputs = step_model(part.inputs)
        losses = {t.name: t.loss(outputs[t.name], part.targets[t.name], part.mask[t.name]) for t in tasks}
        kwargs = {"process_group": group, "counts": labelled_counts(part, names, torch.device("cpu")),
                  "parameters": params_all} if world > 1 else {}
        balancer.backward(losses, shared=list(model.shared_parameters()), features=model.shared_features, **kwargs)
    norms.append(clip_grad_norm(model.parameters(), float(os.environ["MAX_NORM"])))  # after the reduction
    opt.step()
with open(out, "wb") as fh:
    pickle.dump(({k: v.detach().clone() for k, v in model.state_dict().items()}, torch.stack(norms)), fh)
if world > 1:
    dist.barrier()
    os._exit(0)  # gloo's teardown at interpreter exit can abort (SIGABRT)
'''


def _launch(tmp_path: Path, world: int) -> list:
    script = tmp_path / "clip_worker.py"
    script.write_text(WORKER)
    return run_ranks(script, world, env={"TESTS": str(Path(__file__).parent), "MAX_NORM": "0.1"}, tag="clip")


def test_two_gloo_ranks_clip_by_the_global_norm_like_one_process(tmp_path):
    ((one, one_norms),) = _launch(tmp_path, 1)
    two = _launch(tmp_path, 2)
    assert (one_norms > 0.1).all()  # every step clipped: a per-rank norm would scale differently
    for state, norms in two:
        torch.testing.assert_close(norms, one_norms, rtol=1e-10, atol=0)
        for key, want in one.items():
            torch.testing.assert_close(state[key], want, rtol=1e-9, atol=1e-11, msg=key)
