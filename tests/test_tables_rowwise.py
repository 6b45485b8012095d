"""Row-wise Adagrad (polytask.train.rowwise) by hand and against torch.optim.Adagrad, and its place in a
table run (data.params.ids.<column>.sparse: rowwise_adagrad)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from polytask.errors import CheckpointError, ConfigError
from polytask.train.rowwise import RowWiseAdagrad


def _sparse(rows, values, shape):
    return torch.sparse_coo_tensor(torch.tensor([rows]), torch.tensor(values, dtype=torch.float64), shape)


def test_hand_case_two_steps_with_duplicate_rows():
    w = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    opt = RowWiseAdagrad([w], lr=0.5, eps=0.0)
    # step 1: row 0 gets [3, 4]; row 2 gets [1, 0] twice (coalesced: [2, 0]); row 1 nothing
    w.grad = _sparse([0, 2, 2], [[3.0, 4.0], [1.0, 0.0], [1.0, 0.0]], (3, 2))
    opt.step()
    # s0 = (9 + 16) / 2 = 12.5; w0 = -0.5 * [3, 4] / sqrt(12.5)
    # s2 = (4 + 0) / 2 = 2;     w2 = -0.5 * [2, 0] / sqrt(2)
    s0, s2 = 12.5, 2.0
    want = torch.tensor([[-1.5 / math.sqrt(s0), -2.0 / math.sqrt(s0)], [0.0, 0.0], [-1.0 / math.sqrt(s2), 0.0]],
                        dtype=torch.float64)
    torch.testing.assert_close(w.detach(), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(opt.state[w]["sum"], torch.tensor([s0, 0.0, s2], dtype=torch.float64))
    # step 2: row 0 gets [1, -1] -> s0 = 12.5 + 1 = 13.5; row 1 gets [0, 2] -> s1 = 2
    w.grad = _sparse([1, 0], [[0.0, 2.0], [1.0, -1.0]], (3, 2))
    opt.step()
    want[0] += torch.tensor([-0.5, 0.5], dtype=torch.float64) / math.sqrt(13.5)
    want[1] = torch.tensor([0.0, -1.0], dtype=torch.float64) / math.sqrt(2.0)
    torch.testing.assert_close(w.detach(), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(opt.state[w]["sum"], torch.tensor([13.5, 2.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e6])
def test_equals_torch_adagrad_when_rows_have_width_one(scale):
    # width 1: the row's mean square is the entry's square, so row-wise = diagonal Adagrad
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 1, dtype=torch.float64, generator=g)
    ours, ref, ref_sparse = (torch.nn.Parameter(w0.clone()) for _ in range(3))
    opt = RowWiseAdagrad([ours], lr=0.1)
    opt_ref = torch.optim.Adagrad([ref], lr=0.1)
    opt_sparse = torch.optim.Adagrad([ref_sparse], lr=0.1)
    for step in range(6):
        rows = torch.randint(0, 7, (4,), generator=g).tolist()  # repeats and untouched rows
        vals = (torch.randn(4, 1, dtype=torch.float64, generator=g) * scale).tolist()
        if step == 3:
            vals[0] = [0.0]  # a touched row with a zero gradient
        grad = _sparse(rows, vals, (7, 1))
        ours.grad, ref.grad, ref_sparse.grad = grad.clone(), grad.to_dense(), grad.clone()
        for o in (opt, opt_ref, opt_sparse):
            o.step()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-12, atol=1e-12 * scale)
        torch.testing.assert_close(ours.detach(), ref_sparse.detach(), rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(opt.state[ours]["sum"], opt_ref.state[ref]["sum"].reshape(-1))


def test_dense_and_sparse_gradients_agree_and_untouched_rows_stay():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(6, 4, dtype=torch.float64, generator=g)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    oa, ob = RowWiseAdagrad([a], lr=0.3), RowWiseAdagrad([b], lr=0.3)
    for _ in range(3):
        grad = _sparse([1, 4, 1], torch.randn(3, 4, dtype=torch.float64, generator=g).tolist(), (6, 4))
        a.grad, b.grad = grad, grad.to_dense()
        oa.step()
        ob.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-13)
    untouched = [0, 2, 3, 5]
    assert torch.equal(a.detach()[untouched], w0[untouched])
    assert (a.detach()[[1, 4]] != w0[[1, 4]]).all()
    # the state is one number per row (not per entry) and survives a state_dict round trip
    assert oa.state[a]["sum"].shape == (6,)
    c = torch.nn.Parameter(a.detach().clone())
    oc = RowWiseAdagrad([c], lr=0.3)
    oc.load_state_dict(copy.deepcopy(oa.state_dict()))  # a copy: torch shares the state tensors
    grad = _sparse([4], [[1.0, 2.0, 3.0, 4.0]], (6, 4))
    a.grad, c.grad = grad, grad.clone()
    oa.step()
    oc.step()
    assert torch.equal(a.detach(), c.detach())


def test_bad_hyperparameters_name_the_option():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        RowWiseAdagrad([w], lr=0.0)
    with pytest.raises(ConfigError, match="eps must be >= 0"):
        RowWiseAdagrad([w], eps=-1.0)


# ----------------------------------------------------------------------------- in a table run
pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from polytask.train.tables import write_synthetic_splits

    return write_synthetic_splits(tmp_path_factory.mktemp("log"), 1500, row_group_rows=500)


def _config(paths, out, ids, optim="adam"):
    p = {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "dense": ["price", "hour"],
         "ids": ids, "labels": {"click": "click", "conversion": "conversion"}, "embed_dim": 4, "shuffle_rows": 500}
    return {"name": "t", "out_dir": str(out), "device": "cpu", "seed": 3, "data": {"name": "table", "params": p},
            "model": {"arch": "mmoe", "params": {"num_experts": 2}}, "optim": {"name": optim, "lr": 0.05},
            "train": {"epochs": 1, "batch_size": 128, "eval_batch_size": 500, "early_stopping": None}}


def test_table_run_uses_rowwise_adagrad_per_column_and_checks_the_key(data, tmp_path):
    from polytask.train import Trainer
    from polytask.train.config import parse_config

    # item_id hashed into more buckets than the train split has items: untouched rows exist
    ids = {"user_id": {"min_count": 2, "sparse": True}, "item_id": {"hash": 4096, "sparse": "rowwise_adagrad"},
           "category": {}}
    trainer = Trainer(parse_config(_config(data, tmp_path / "r", ids)), progress=False)
    opt = trainer.optimizer
    assert opt.rules == ["adam", "rowwise_adagrad"]
    user = trainer.model.input.tables["item_id"].weight
    assert isinstance(opt.row_optimizers[1], RowWiseAdagrad)
    assert opt.row_optimizers[1].param_groups[0]["params"] == [user]
    before = user.detach().clone()
    trainer.fit()
    acc = opt.row_optimizers[1].state[user]["sum"]
    moved = (user.detach() != before).any(1)
    # exactly the rows that received gradient moved, and they alone have an accumulator
    assert torch.equal(moved, acc > 0) and 0 < int(moved.sum()) < user.shape[0]
    # the state round trip keeps the rules; another rule set is refused in one line
    state = opt.state_dict()
    assert state["sparse"]["rules"] == ["adam", "rowwise_adagrad"]
    opt.load_state_dict(state)
    other = Trainer(parse_config(_config(data, tmp_path / "o", {**ids, "item_id": {"hash": 4096, "sparse": True}})),
                    progress=False)
    with pytest.raises(CheckpointError, match="row-wise rules"):
        other.optimizer.load_state_dict(state)
    bad = _config(data, tmp_path / "b", {**ids, "user_id": {"sparse": "adagrd"}})
    with pytest.raises(ConfigError, match=r"^data\.params\.ids\.user_id\.sparse: must be true, false or one of"):
        parse_config(bad) and Trainer(parse_config(bad), progress=False)


def test_cli_refuses_an_unknown_rule_with_exit_2(data, tmp_path, capsys, monkeypatch):
    import sys

    import yaml

    from polytask.cli import main

    cfg = _config(data, tmp_path / "r", {"user_id": {"sparse": "adagrad2"}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sys, "argv", ["polytask", "train", str(path)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "data.params.ids.user_id.sparse" in err and "'adagrad2'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
