"""Contract tests run on every architecture of issue 4: shapes, gradients, the shared/task-specific
split, masks, determinism, safetensors round trip, bad configuration."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from polytask.errors import ConfigError, DataError, PolytaskError
from polytask.nn import ARCHITECTURES, build_model
from polytask.tasks import Task

MIXED = [Task("a", "binary"), Task("b", "multiclass", num_classes=3), Task("c", "regression", num_outputs=2)]
FUNNEL = [Task("a", "binary"), Task("b", "binary"), Task("c", "binary")]
D, B = 6, 12

# name -> (params, tasks, image input?)
CASES = {
    "mmoe": (dict(num_experts=3, expert=(8,), tower=(4,)), MIXED, False),
    "omoe": (dict(num_experts=3, expert=(8,), tower=(4,)), MIXED, False),
    "cgc": (dict(specific_experts=2, shared_experts=1, expert=(8,), tower=(4,)), MIXED, False),
    "ple": (dict(num_levels=2, specific_experts=1, shared_experts=2, expert=(8,), tower=(4,)), MIXED, False),
    "dselect_k": (dict(num_experts=4, k=2, expert=(8,), tower=(4,)), MIXED, False),
    "adatt": (dict(num_levels=2, task_experts=1, shared_experts=1, expert=(8,), tower=(4,)), MIXED, False),
    "home": (dict(task_groups=[["a"], ["b", "c"]], shared_experts=1, group_experts=1, task_experts=1, expert=(8,),
                  feature_gate_rank=2, tower=(4,)), MIXED, False),
    "cross_stitch": (dict(hidden=(8, 8)), MIXED, False),
    "mtan": (dict(channels=(4, 8)), MIXED, True),
    "esmm": (dict(tower=(8,)), FUNNEL, False),
    "aitm": (dict(tower=(8,)), FUNNEL, False),
    "task_moe": (dict(num_layers=2, num_experts=3, hidden=8, routing="soft"), MIXED, False),
    "task_token": (dict(d_model=8, num_heads=2, num_layers=1, ffn=16), MIXED, False),
}
ROUTED = ["mmoe", "omoe", "cgc", "ple", "dselect_k", "adatt", "home", "task_moe", "task_token"]


def make(name: str, seed: int = 0):
    params, tasks, image = CASES[name]
    torch.manual_seed(seed)
    model = build_model(name, 3 if image else D, tasks, **params)
    return model, tasks, image


def data(tasks, image: bool, seed: int = 1, rows: int = B):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, 8, 8, generator=g) if image else torch.randn(rows, D, generator=g)
    y = {}
    for t in tasks:
        if t.kind == "binary":
            y[t.name] = torch.randint(0, 2, (rows,), generator=g).float()
        elif t.kind == "multiclass":
            y[t.name] = torch.randint(0, t.num_classes, (rows,), generator=g)
        else:
            y[t.name] = torch.randn(rows, t.num_outputs, generator=g)
    return x, y


def total_loss(model, tasks, out, y, mask=None):
    loss = sum(t.loss(out[t.name], y[t.name], None if mask is None else mask[t.name]) for t in tasks)
    aux = getattr(model, "aux_loss", None)
    return loss + aux if aux is not None else loss


def test_every_issue4_architecture_is_registered():
    for name in CASES:
        assert name in ARCHITECTURES


@pytest.mark.parametrize("name", CASES)
def test_output_shape_per_task_kind(name):
    model, tasks, image = make(name)
    x, _ = data(tasks, image)
    out = model(x)
    assert list(out) == [t.name for t in tasks]
    for t in tasks:
        assert out[t.name].shape == (B, t.output_dim), t.name
        assert torch.isfinite(out[t.name]).all()
    assert model.shared_features is not None


@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_every_parameter(name):
    model, tasks, image = make(name)
    x, y = data(tasks, image)
    total_loss(model, tasks, model(x), y).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("name", CASES)
def test_shared_parameters_serve_every_task(name):
    """The split is a partition, and every shared parameter gets gradient from every task's loss."""
    model, tasks, image = make(name)
    shared = list(model.shared_parameters())
    specific = list(model.task_specific_parameters())
    ids = [id(p) for p in shared + specific]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert specific, "a multi-task model has task-specific parameters"
    x, y = data(tasks, image)
    for t in tasks:
        model.zero_grad()
        t.loss(model(x)[t.name], y[t.name]).backward()
        cold = [i for i, p in enumerate(shared) if p.grad is None or p.grad.abs().sum() == 0]
        assert not cold, f"task {t.name!r} does not reach shared parameter(s) #{cold}"


@pytest.mark.parametrize("name", CASES)
def test_unlabelled_rows_do_not_change_the_gradient(name):
    model, tasks, image = make(name)
    model.eval()  # batch norm in train mode couples rows by design
    x, y = data(tasks, image)
    mask = {t.name: torch.arange(B) % 3 != 0 for t in tasks}
    mask[tasks[0].name] = torch.zeros(B, dtype=torch.bool)  # a task with no label in the batch

    def grads(targets):
        model.zero_grad()
        total_loss(model, tasks, model(x), targets, mask).backward()
        return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]

    before = grads(y)
    _, other = data(tasks, image, seed=7)
    y2 = {k: torch.where(mask[k].reshape(-1, *[1] * (v.ndim - 1)), v, other[k]) for k, v in y.items()}
    assert any(not torch.equal(y2[k], y[k]) for k in y)
    for a, b in zip(before, grads(y2)):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_same_seed_same_model_and_outputs(name):
    m1, tasks, image = make(name, seed=3)
    m2, _, _ = make(name, seed=3)
    m3, _, _ = make(name, seed=4)
    x, _ = data(tasks, image)
    o1, o2, o3 = m1(x), m2(x), m3(x)
    assert all(torch.equal(o1[k], o2[k]) for k in o1)
    assert not all(torch.equal(o1[k], o3[k]) for k in o1)


@pytest.mark.parametrize("name", CASES)
def test_safetensors_round_trip(name, tmp_path):
    src, tasks, image = make(name, seed=0)
    x, y = data(tasks, image)
    # one training step so batch-norm statistics and weights differ from a fresh model
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    total_loss(src, tasks, src(x), y).backward()
    opt.step()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst, _, _ = make(name, seed=1)
    dst.load_state_dict(load_file(str(path)), strict=True)
    src.eval(), dst.eval()
    o_src, o_dst = src(x), dst(x)
    assert all(torch.equal(o_src[k], o_dst[k]) for k in o_src)


@pytest.mark.parametrize("name", ROUTED)
def test_gate_weights_exposed_per_task(name):
    model, tasks, image = make(name)
    x, _ = data(tasks, image)
    model(x)
    assert set(model.gate_weights) == {t.name for t in tasks}
    for w in model.gate_weights.values():
        assert w.ndim == 2 and (w >= 0).all()
        if name != "home":  # HoME adds self-gate weights on top of its softmax gate; it is the softmax part
            assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)


@pytest.mark.parametrize("name", [n for n in CASES if n != "mtan"])
def test_wrong_input_width_is_a_data_error(name):
    model, tasks, _ = make(name)
    with pytest.raises(DataError, match=r"\(N, 6\)"):
        model(torch.randn(4, D + 1))
    with pytest.raises(DataError):
        model({"x": torch.randn(4, D)})


def test_mtan_rejects_non_images():
    model, _, _ = make("mtan")
    with pytest.raises(DataError, match="images"):
        model(torch.randn(4, 5, 8, 8))


def test_unknown_architecture_and_option():
    with pytest.raises(ConfigError, match="mmoee.*did you mean mmoe"):
        build_model("mmoee", D, MIXED)
    with pytest.raises(ConfigError, match="num_expert'"):
        build_model("mmoe", D, MIXED, num_expert=3)


@pytest.mark.parametrize("name, params, option", [
    ("mmoe", dict(num_experts=0), "num_experts"),
    ("mmoe", dict(expert=()), "expert"),
    ("omoe", dict(tower=(4, 0)), "tower"),
    ("ple", dict(num_levels=0), "num_levels"),
    ("ple", dict(specific_experts=0), "specific_experts"),
    ("cgc", dict(shared_experts=-1), "shared_experts"),
    ("dselect_k", dict(num_experts=4, k=5), "model.params.k"),
    ("dselect_k", dict(num_experts=1), "num_experts"),
    ("adatt", dict(task_experts=0), "task_experts"),
    ("home", dict(task_groups=[["a", "b"]]), "task_groups"),
    ("home", dict(task_groups=[["a", "zz"], ["b", "c"]]), "task_groups"),
    ("cross_stitch", dict(stitch_self=1.5), "stitch_self"),
    ("task_moe", dict(routing="hard"), "routing"),
    ("task_moe", dict(num_experts=3, k=4), "model.params.k"),
    ("task_token", dict(d_model=10, num_heads=4), "num_heads"),
    ("mtan", dict(channels=()), "channels"),
])
def test_configs_that_do_not_fit_name_the_option(name, params, option):
    with pytest.raises(ConfigError, match=option):
        build_model(name, 3 if name == "mtan" else D, MIXED, **params)


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_funnel_models_need_binary_tasks(name):
    with pytest.raises(ConfigError, match="'b'"):
        build_model(name, D, MIXED)
    with pytest.raises(ConfigError, match="two tasks"):
        build_model(name, D, MIXED[:1])


def test_a_task_without_a_head_is_refused_by_the_trainer():
    train = pytest.importorskip("polytask.train")
    splits = pytest.importorskip("polytask.data").load("synthetic", num_tasks=3, num_rows=60, input_dim=D)
    model = build_model("mmoe", D, splits.tasks[:2], num_experts=2, expert=(4,))
    config = train.RunConfig(data={"name": "synthetic"}, device="cpu")
    with pytest.raises(ConfigError, match="task2"):
        train.Trainer(config, splits=splits, model=model, progress=False)


def test_errors_are_polytask_errors():
    assert issubclass(ConfigError, PolytaskError) and issubclass(DataError, PolytaskError)
