"""Feature specs and the embedding layer: pooling by hand, bad inputs named, end to end with models."""

from __future__ import annotations

import pytest
import torch

from polytask.errors import ConfigError, DataError
from polytask.nn import DenseFeature, FeatureEmbedding, FeatureSpec, SequenceFeature, SparseFeature, build_model
from polytask.nn.embedding import spec_from_dict
from polytask.tasks import Task

SPEC = FeatureSpec((DenseFeature("num", 3), SparseFeature("user", 10, 4), SequenceFeature("hist", 20, 4, "mean"),
                    SequenceFeature("tags", 20, 2, "max"), SequenceFeature("clicks", 20, 2, "sum")))


def _batch():
    return {
        "num": torch.randn(3, 3),
        "user": torch.tensor([1, 2, 9]),
        "hist": torch.tensor([[3, 4, 0], [5, 0, 0], [0, 0, 0]]),
        "tags": torch.tensor([[1, 2, 0], [7, 0, 0], [0, 0, 0]]),
        "clicks": torch.tensor([[1, 1, 0], [2, 0, 0], [0, 0, 0]]),
    }


def test_embedding_concatenates_dense_and_pooled_features_by_hand():
    emb = FeatureEmbedding(SPEC)
    x = _batch()
    out = emb(x)
    assert out.shape == (3, SPEC.output_dim) == (3, 3 + 4 + 4 + 2 + 2)
    t = emb.tables
    torch.testing.assert_close(out[:, :3], x["num"])
    torch.testing.assert_close(out[:, 3:7], t["user"].weight[x["user"]])
    hist = out[:, 7:11]
    torch.testing.assert_close(hist[0], (t["hist"].weight[3] + t["hist"].weight[4]) / 2)  # mean over non-padding
    torch.testing.assert_close(hist[1], t["hist"].weight[5])
    torch.testing.assert_close(hist[2], torch.zeros(4))  # all padding
    tags = out[:, 11:13]
    torch.testing.assert_close(tags[0], torch.maximum(t["tags"].weight[1], t["tags"].weight[2]))
    torch.testing.assert_close(tags[2], torch.zeros(2))
    torch.testing.assert_close(out[0, 13:15], 2 * t["clicks"].weight[1])


def test_padding_rows_get_no_gradient():
    emb = FeatureEmbedding(SPEC)
    emb(_batch()).sum().backward()
    assert emb.tables["hist"].weight.grad[0].abs().sum() == 0
    assert emb.tables["hist"].weight.grad[3].abs().sum() > 0


@pytest.mark.parametrize("change, message", [
    (lambda x: x.pop("user"), "'user'"),
    (lambda x: x.__setitem__("num", torch.randn(3, 4)), "'num'.*\\(N, 3\\)"),
    (lambda x: x.__setitem__("user", torch.ones(3, 2, dtype=torch.long)), "'user'"),
    (lambda x: x.__setitem__("hist", torch.ones(3, dtype=torch.long)), "'hist'"),
    (lambda x: x.__setitem__("user", torch.ones(3)), "'user'.*integers"),
])
def test_bad_feature_tensors_name_the_feature(change, message):
    emb = FeatureEmbedding(SPEC)
    x = _batch()
    change(x)
    with pytest.raises(DataError, match=message):
        emb(x)


def test_a_tensor_given_to_a_feature_model_is_refused():
    with pytest.raises(DataError, match="named features"):
        FeatureEmbedding(SPEC)(torch.randn(3, 15))


@pytest.mark.parametrize("features, message", [
    ((), "at least one"),
    ((DenseFeature("a"), SparseFeature("a", 3)), "duplicate.*'a'"),
    ((SparseFeature("u", 0),), "'u'"),
    ((SequenceFeature("s", 5, pooling="median"),), "'s'.*pooling"),
    ((DenseFeature("d", 0),), "'d'"),
])
def test_bad_specs_are_config_errors(features, message):
    with pytest.raises(ConfigError, match=message):
        FeatureSpec(features)


def test_spec_from_config_entries():
    spec = spec_from_dict([{"name": "d", "kind": "dense", "dim": 2}, {"name": "u", "kind": "sparse", "vocab_size": 5}])
    assert spec.output_dim == 2 + 16
    with pytest.raises(ConfigError, match=r"features\[0\]"):
        spec_from_dict([{"name": "d", "kind": "dense", "width": 2}])
    with pytest.raises(ConfigError, match="kind"):
        spec_from_dict([{"name": "d", "kind": "image"}])


@pytest.mark.parametrize("arch", ["mmoe", "ple", "esmm", "task_token", "home"])
def test_models_train_on_named_features(arch):
    torch.manual_seed(0)
    tasks = [Task("click", "binary"), Task("buy", "binary")]
    model = build_model(arch, SPEC, tasks)
    x = _batch()
    out = model(x)
    loss = sum(t.loss(out[t.name], torch.tensor([1.0, 0.0, 1.0])) for t in tasks)
    loss.backward()
    table = next(p for n, p in model.named_parameters() if n.endswith("tables.user.weight"))
    assert table.grad.abs().sum() > 0
    assert all(o.shape == (3, 1) for o in out.values())
