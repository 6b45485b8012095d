"""Loaders of the recommendation samples shipped in the package (polytask/data/samples: real rows, small)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from polytask.data.recsys import SAMPLES_DIR, ali_ccp, aliexpress, census_income, read_table
from polytask.errors import DataError
from polytask.nn import FeatureSpec, build_model

ROOT = SAMPLES_DIR


@pytest.mark.parametrize("loader, tasks, sizes", [
    (census_income, ["income", "marital"], (80, 20, 20)),
    (aliexpress, ["click", "conversion"], (80, 20, 20)),  # no val file: 20% of 100 train rows
    (ali_ccp, ["click", "purchase"], (100, 50, 50)),
])
def test_loaders_read_the_samples(loader, tasks, sizes):
    splits = loader(str(ROOT))
    splits.validate()
    assert [t.name for t in splits.tasks] == tasks
    assert (len(splits.train), len(splits.val), len(splits.test)) == sizes
    spec = splits.input_spec
    assert isinstance(spec, FeatureSpec) and set(splits.train.inputs) == set(spec.names)
    for f in spec.embedded:  # every id fits its table, in every split
        for part in (splits.train, splits.val, splits.test):
            assert int(part.inputs[f.name].max()) < f.vocab_size
    for y in splits.train.targets.values():
        assert set(y.unique().tolist()) <= {0.0, 1.0}


def test_census_columns_against_the_csv():
    splits = census_income(str(ROOT))
    header, values = read_table(ROOT / "census_income_test_sample.csv")
    col = header.index
    torch.testing.assert_close(splits.test.targets["marital"], torch.as_tensor(values[:, col("marital status")],
                                                                              dtype=torch.float32))
    torch.testing.assert_close(splits.test.inputs["dense"][:, 0], torch.as_tensor(values[:, col("age")],
                                                                                  dtype=torch.float32))
    assert torch.equal(splits.test.inputs["education"], torch.as_tensor(values[:, col("education")].astype(np.int64)))
    assert "marital status" not in splits.test.inputs and "income" not in splits.test.inputs
    assert splits.input_spec.features[0].dim == 7


def test_ali_ccp_trains_end_to_end_with_esmm():
    splits = ali_ccp(str(ROOT), embed_dim=4)
    torch.manual_seed(0)
    model = build_model("esmm", splits.input_spec, splits.tasks, tower=(16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = splits.train.inputs, splits.train.targets
    losses = []
    for _ in range(30):
        out = model(x)
        loss = sum(t.loss(out[t.name], y[t.name]) for t in splits.tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_bad_tables_are_data_errors(tmp_path):
    (tmp_path / "ali_ccp_train.csv").write_text("click,purchase,101\n0,0,1\n1,0,2\n")
    with pytest.raises(DataError, match="no test file"):
        ali_ccp(str(tmp_path))
    (tmp_path / "ali_ccp_test.csv").write_text("click,purchase,101\n0,0,-1\n")
    with pytest.raises(DataError, match="'101'"):
        ali_ccp(str(tmp_path))
    (tmp_path / "ali_ccp_test.csv").write_text("click,purchase,101\n0,2,1\n")
    with pytest.raises(DataError, match="'purchase'"):
        ali_ccp(str(tmp_path))
    (tmp_path / "ali_ccp_test.csv").write_text("click,buy,101\n0,1,1\n")
    with pytest.raises(DataError, match="columns differ"):
        ali_ccp(str(tmp_path))
