"""Sparse embedding tables with balancers, on one process and on two gloo processes.

Two ranks, each with its slice of a global batch, under DDP's ``no_sync`` with the balancer reducing (what
``polytask train --nproc 2`` runs), must reach the parameters of one process on the whole batch: loss
balancers and a gradient balancer at feature level, row-wise Adagrad and SparseAdam on the tables; and with
every row labelled, DDP's own reducer (which all-reduces sparse gradients on gloo) is the peer. On one
process, sparse tables must get exactly the dense tables' gradients under a gradient balancer, at feature level
(the tables in the trunk) and at parameter level (the rows each batch touches, TouchedRows).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
from _ranks import run_ranks
import torch

from polytask.errors import ConfigError

WORKER = r'''
import os, pickle, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import polytask.balance as balance_lib
from polytask.data.dataset import Batch
from polytask.train.config import OptimConfig
from polytask.train.dist import labelled_counts, shard_bounds
from polytask.train.tables import SparseDenseOptimizer

sys.path.insert(0, os.environ["TESTS"])
from test_tables_sparse_dist import build, global_batches

balancer_name, params = pickle.loads(bytes.fromhex(sys.argv[1]))
out = sys.argv[2]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
group = None
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=rank, world_size=world)
    group = dist.group.WORLD
model, tasks = build(sparse=True)
balancer = balance_lib.get("ew" if balancer_name == "ddp" else balancer_name, **params)
if hasattr(model, "expose_task_features") and getattr(balancer, "mode", None) == "features":
    model.expose_task_features()
step_model = DistributedDataParallel(model, process_group=group) if world > 1 else model
tables = [model.input.tables[c].weight for c in ("user", "item")]
opt = SparseDenseOptimizer([{"params": list(model.parameters())}], tables, OptimConfig(name="adam", lr=0.05),
                           ["rowwise_adagrad", True])
names = [t.name for t in tasks]
params_all = [p for p in model.parameters() if p.requires_grad]
native = balancer_name == "ddp"  # DDP's own reducer (no balancer): the peer for the sum of the task losses
for batch in global_batches(full=bool(os.environ.get("FULL"))):
    lo, hi = shard_bounds(len(batch.targets["a"]), rank, world)
    part = Batch({k: v[lo:hi] for k, v in batch.inputs.items()}, {k: v[lo:hi] for k, v in batch.targets.items()},
                 {k: v[lo:hi] for k, v in batch.mask.items()})
    opt.zero_grad(set_to_none=True)
    if native:
        outputs = step_model(part.inputs)
        sum(t.loss(outputs[t.name], part.targets[t.name], part.mask[t.name]) for t in tasks).backward()
        opt.step()
        continue
    ctx = step_model.no_sync() if world > 1 else __import__("contextlib").nullcontext()
    with ctx:
        outputs = step_model(part.inputs)
        losses = {t.name: t.loss(outputs[t.name], part.targets[t.name], part.mask[t.name]) for t in tasks}
        kwargs = {"process_group": group, "counts": labelled_counts(part, names, torch.device("cpu")),
                  "parameters": params_all} if world > 1 else {}
        extra = {"task_features": model.task_features} if getattr(model, "task_features", None) is not None else {}
        balancer.backward(losses, shared=list(model.shared_parameters()), features=model.shared_features, **extra,
                          **kwargs)
    assert all(t.grad is not None and t.grad.is_sparse for t in tables)
    opt.step()
with open(out, "wb") as fh:
    pickle.dump({k: v.detach().clone() for k, v in model.state_dict().items()}, fh)
if world > 1:
    dist.barrier()
    os._exit(0)  # gloo's teardown at interpreter exit can abort (SIGABRT)
'''


def build(sparse: bool):
    """MMoE over a dense block and two id columns (float64), the same weights for every call."""
    from polytask.data.features import DenseFeature, FeatureSpec, SparseFeature
    from polytask.nn import build_model
    from polytask.tasks import Task

    spec = FeatureSpec((DenseFeature("dense", 3), SparseFeature("user", 40, 4), SparseFeature("item", 25, 4)))
    tasks = [Task("a", "binary"), Task("b", "binary")]
    torch.manual_seed(0)
    model = build_model("mmoe", spec, tasks, num_experts=2).double()
    if sparse:
        for c in ("user", "item"):
            model.input.tables[c].sparse = True
    return model, tasks


def global_batches(steps: int = 3, rows: int = 24, full: bool = False):
    """Global batches with repeated ids, ids absent from the batch, and missing labels (none with ``full``)."""
    from polytask.data.dataset import Batch

    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        inputs = {"dense": torch.randn(rows, 3, generator=g, dtype=torch.float64),
                  "user": torch.randint(0, 12, (rows,), generator=g),
                  "item": torch.randint(0, 25, (rows,), generator=g)}
        targets = {t: torch.randint(0, 2, (rows,), generator=g).double() for t in ("a", "b")}
        mask = {t: (torch.rand(rows, generator=g) > 0.2) | full for t in ("a", "b")}
        yield Batch(inputs, targets, mask)


def _run(tmp_path: Path, balancer: str, params: dict, world: int, full: bool = False) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return run_ranks(script, world, [pickle.dumps((balancer, params)).hex()],
                     env={"TESTS": str(Path(__file__).parent), "FULL": "1" if full else ""})


@pytest.mark.parametrize("balancer,params", [("uw", {}), ("mgda", {"mode": "features"})])
def test_two_ranks_with_sparse_tables_equal_one_process_on_the_global_batch(tmp_path, balancer, params):
    (one,) = _run(tmp_path, balancer, params, 1)
    two = _run(tmp_path, balancer, params, 2)
    model, _ = build(sparse=True)
    start = model.state_dict()
    for key, want in one.items():
        for r, got in enumerate(two):
            torch.testing.assert_close(got[key], want, rtol=1e-9, atol=1e-11, msg=f"rank {r}: {key}")
    # the tables moved (only on rows some batch used): the comparison is not between untouched tensors
    user = "input.tables.user.weight"
    moved = (one[user] != start[user]).any(1)
    assert moved[:12].any() and not moved[12:].any()


def test_sparse_reduction_equals_ddp_own_reducer_on_gloo(tmp_path):
    # the peer: DDP's own reducer (outside no_sync) all-reduces sparse gradients on gloo and averages them;
    # with every row labelled and equal shards that is the global batch's gradient, as the balancer's
    (ours,) = _run(tmp_path, "ew", {}, 1, full=True)
    ddp = _run(tmp_path, "ddp", {}, 2, full=True)
    mine = _run(tmp_path, "ew", {}, 2, full=True)
    for key, want in ours.items():
        for got in (*ddp, *mine):
            torch.testing.assert_close(got[key], want, rtol=1e-9, atol=1e-11, msg=key)


def test_feature_level_gradient_balancer_gives_sparse_tables_the_dense_tables_gradient():
    import polytask.balance as balance_lib

    grads = []
    for sparse in (False, True):
        model, tasks = build(sparse)
        model.expose_task_features()
        batch = next(global_batches(1))
        out = model(batch.inputs)
        losses = {t.name: t.loss(out[t.name], batch.targets[t.name], batch.mask[t.name]) for t in tasks}
        balance_lib.get("mgda", mode="features").backward(losses, shared=list(model.shared_parameters()),
                                                          features=model.shared_features,
                                                          task_features=model.task_features)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        want = grads[0][name]
        if "tables" in name:
            assert g.is_sparse
            g = g.to_dense()
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-14, msg=name)
    assert grads[0]["input.tables.user.weight"].abs().sum() > 0


def test_sparse_all_reduce_sum_alone_and_gated():
    from polytask.balance.dist import all_reduce_sum
    from polytask.balance.engine import _gate

    s = torch.sparse_coo_tensor(torch.tensor([[2, 0, 2]]), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), (4, 2))
    dense = torch.arange(3.0)
    got_dense, got_sparse = all_reduce_sum([dense, s], None)
    assert torch.equal(got_dense, dense) and got_sparse.is_sparse
    torch.testing.assert_close(got_sparse.to_dense(), s.to_dense())
    assert torch.equal(_gate(torch.tensor(False), s).to_dense(), torch.zeros(4, 2))
    assert torch.isnan(_gate(torch.tensor(False), s, float("nan")).coalesce().values()).all()
    assert torch.equal(_gate(torch.tensor(True), s).to_dense(), s.to_dense())


def _balanced_grads(balancer_name: str, params: dict, sparse: bool, steps: int = 2):
    """Parameters after ``steps`` SGD steps of a parameter-level gradient balancer, dense tables or sparse tables
    through TouchedRows (as the Trainer wires them), and the last step's gradients (dense)."""
    import polytask.balance as balance_lib
    from polytask.train.tables import TouchedRows

    model, tasks = build(sparse)
    balancer = balance_lib.get(balancer_name, **params)
    tables = [model.input.tables[c] for c in ("user", "item")]
    touched = TouchedRows(tables) if sparse else None
    shared = list(model.shared_parameters())
    if touched is not None:
        shared = touched.shared(shared)
    for batch in global_batches(steps):
        model.zero_grad(set_to_none=True)
        out = model(batch.inputs)
        losses = {t.name: t.loss(out[t.name], batch.targets[t.name], batch.mask[t.name]) for t in tasks}
        balancer.backward(losses, shared=shared)
        if touched is not None:
            touched.flush()
        grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.1)
    if sparse:
        assert all(t.weight.grad.is_sparse for t in tables)
    return model.state_dict(), grads


@pytest.mark.parametrize("balancer,params", [("mgda", {}), ("pcgrad", {"seed": 3}), ("cagrad", {}),
                                             ("upgrad", {}), ("imtl_g", {}), ("aligned_mtl", {}), ("nash_mtl", {})])
def test_parameter_level_balancer_on_touched_rows_equals_dense_tables(balancer, params):
    dense_state, dense_grads = _balanced_grads(balancer, params, sparse=False)
    sparse_state, sparse_grads = _balanced_grads(balancer, params, sparse=True)
    for name, want in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], want, rtol=1e-9, atol=1e-12, msg=name)
    for name, want in dense_state.items():
        torch.testing.assert_close(sparse_state[name], want, rtol=1e-9, atol=1e-12, msg=name)
    # the tables' gradients are not trivial: some rows moved, rows outside every batch did not
    user = dense_grads["input.tables.user.weight"]
    assert user[:12].abs().sum() > 0 and user[12:].abs().sum() == 0


def test_touched_rows_leave_evaluation_lookups_alone():
    from polytask.train.tables import TouchedRows

    model, _ = build(True)
    batch = next(global_batches(1))
    with torch.no_grad():
        before = model(batch.inputs)
    touched = TouchedRows([model.input.tables[c] for c in ("user", "item")])
    model.eval()
    with torch.no_grad():
        after = model(batch.inputs)
    assert touched.rows == [None, None]
    model.train()
    out = model(batch.inputs)  # training: the lookups go through the leaves, same values
    assert touched.leaves[0].shape[0] >= len(touched.rows[0]) > 0
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
        torch.testing.assert_close(out[k].detach(), before[k], rtol=1e-15, atol=1e-15)


def test_sparse_tables_refused_where_the_balancer_cannot_take_them(tmp_path):
    pytest.importorskip("pyarrow")
    from polytask.train import Trainer
    from polytask.train.config import parse_config
    from polytask.train.tables import TouchedRows, use_sparse_embeddings, write_synthetic_splits

    paths = write_synthetic_splits(tmp_path / "log", 600, row_group_rows=300)
    p = {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "dense": ["price"],
         "ids": {"user_id": {"sparse": True}}, "labels": {"click": "click", "conversion": "conversion"},
         "embed_dim": 4}
    cfg = {"name": "t", "out_dir": str(tmp_path / "r"), "device": "cpu", "data": {"name": "table", "params": p},
           "model": {"arch": "mmoe", "params": {"num_experts": 2}}, "balancer": {"name": "excessmtl"},
           "train": {"epochs": 1, "batch_size": 64, "early_stopping": None}}
    with pytest.raises(ConfigError, match=r"^data\.params\.ids\.user_id\.sparse: .*'excessmtl' keeps state per shared"):
        Trainer(parse_config(cfg), progress=False)
    cfg["balancer"] = {"name": "mgda"}
    trainer = Trainer(parse_config(cfg), progress=False)
    assert isinstance(trainer._touched, TouchedRows)
    trainer.fit()
    assert trainer.model.input.tables["user_id"].sparse
    # several processes: each rank touches other rows, so a parameter-level Jacobian cannot be summed
    with pytest.raises(ConfigError, match="at parameter level on 2 processes"):
        use_sparse_embeddings(trainer.model, ["user_id"], parse_config(cfg), trainer.balancer, 2)


def test_example_with_sparse_tables_and_a_gradient_balancer_trains(tmp_path):
    pytest.importorskip("pyarrow")
    import yaml

    from polytask.train import Trainer
    from polytask.train.config import parse_config
    from polytask.train.tables import write_synthetic_splits

    example = Path(__file__).resolve().parents[1] / "examples" / "parquet_sparse_balanced.yaml"
    raw = yaml.safe_load(example.read_text())
    paths = write_synthetic_splits(tmp_path / "log", 900, row_group_rows=300)
    raw["data"]["params"].update(train=str(paths[0]), val=str(paths[1]), test=str(paths[2]), shuffle_rows=300)
    raw.update(out_dir=str(tmp_path / "runs"), device="cpu")
    raw["model"]["params"]["num_experts"] = 2
    raw["train"].update(epochs=1, batch_size=64, eval_batch_size=300)
    trainer = Trainer(parse_config(raw), progress=False)
    assert trainer.optimizer.rules == ["adam", "rowwise_adagrad"] and trainer._touched is not None
    result = trainer.fit()
    assert all(0.0 < result.test[t]["auc"] < 1.0 for t in ("click", "conversion"))


def test_gradnorm_measures_a_dense_layer_and_db_mtl_is_refused(tmp_path):
    pytest.importorskip("pyarrow")
    from polytask.train import Trainer
    from polytask.train.config import parse_config
    from polytask.train.tables import shared_for_balancer, write_synthetic_splits

    paths = write_synthetic_splits(tmp_path / "log", 600, row_group_rows=300)
    p = {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "dense": ["price"],
         "ids": {"user_id": {"sparse": True}, "item_id": {"hash": 64, "sparse": "rowwise_adagrad"}},
         "labels": {"click": "click", "conversion": "conversion"}, "embed_dim": 4}
    cfg = {"name": "t", "out_dir": str(tmp_path / "r"), "device": "cpu", "data": {"name": "table", "params": p},
           "model": {"arch": "mmoe", "params": {"num_experts": 2}}, "balancer": {"name": "gradnorm"},
           "train": {"epochs": 1, "batch_size": 64, "early_stopping": None}}
    trainer = Trainer(parse_config(cfg), progress=False)
    shared = shared_for_balancer(list(trainer.model.shared_parameters()), trainer._sparse, None, trainer.balancer)
    tables = {id(t) for t in trainer._sparse}
    assert len(tables) == 2 and not any(id(q) in tables for q in shared)
    result = trainer.fit()
    assert all(0.0 < result.test[t]["auc"] < 1.0 for t in ("click", "conversion"))
    layer = trainer.balancer._last_layer[1]  # the layer GradNorm measured: dense, not a table
    assert id(layer) not in tables and not layer.grad.is_sparse
    cfg["balancer"] = {"name": "db_mtl"}
    with pytest.raises(ConfigError, match=r"^data\.params\.ids\.user_id\.sparse: the balancer 'db_mtl' keeps"):
        Trainer(parse_config(cfg), progress=False)


def test_cli_refuses_a_balancer_that_cannot_take_sparse_tables_with_exit_2(tmp_path, capsys, monkeypatch):
    pytest.importorskip("pyarrow")
    import yaml

    from polytask.cli import main
    from polytask.train.tables import write_synthetic_splits

    paths = write_synthetic_splits(tmp_path / "log", 300, row_group_rows=300)
    p = {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "dense": ["price"],
         "ids": {"user_id": {"sparse": True}}, "labels": {"click": "click", "conversion": "conversion"}}
    cfg = {"name": "t", "out_dir": str(tmp_path / "runs"), "device": "cpu", "data": {"name": "table", "params": p},
           "model": {"arch": "mmoe", "params": {"num_experts": 2}}, "balancer": {"name": "metabalance"},
           "train": {"epochs": 1, "batch_size": 64}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sys, "argv", ["polytask", "train", str(path)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "data.params.ids.user_id.sparse" in err and "'metabalance'" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
