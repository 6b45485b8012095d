"""The gradient engine and GradientBalancer end to end on a small shared-bottom model.

Reference values are computed here by hand: one ``torch.autograd.grad`` per task, the
aggregator applied to the resulting Jacobian, and plain ``backward`` for the heads.
"""

from __future__ import annotations

import pytest
import torch

from polytask import balance
from polytask.balance import aggregators as agg
from polytask.balance.engine import GradientBalancer, task_jacobian
from polytask.errors import ConfigError, TrainingError
from polytask.nn import build_model
from polytask.tasks import Task

TASKS = [Task("a", "regression"), Task("b", "binary"), Task("c", "regression", num_outputs=2)]


def _data(seed: int, rows: int):
    """Inputs and targets for TASKS (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=g, dtype=torch.float64)
    y = {"a": torch.randn(rows, 1, generator=g, dtype=torch.float64),
         "b": (torch.rand(rows, generator=g) > 0.5).double(),
         "c": torch.randn(rows, 2, generator=g, dtype=torch.float64)}
    return x, y


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("shared_bottom", 6, TASKS, bottom=(10, 7), tower=(5,)).double().expose_task_features()
    return (model, *_data(seed, 12))


def _losses(model, x, y):
    out = model(x)
    return {t.name: t.loss(out[t.name], y[t.name]) for t in TASKS}


def _manual(model, x, y):
    """Per-task gradients by one autograd.grad per task: (J shared (T, D), per-task head grads)."""
    shared = list(model.shared_parameters())
    heads = list(model.task_specific_parameters())
    rows, head_rows = [], []
    for name in [t.name for t in TASKS]:
        losses = _losses(model, x, y)
        g = torch.autograd.grad(losses[name], shared + heads, allow_unused=True)
        rows.append(torch.cat([gi.reshape(-1) for gi in g[: len(shared)]]))
        head_rows.append([torch.zeros_like(p) if gi is None else gi for p, gi in zip(heads, g[len(shared):])])
    heads_sum = [sum(r[i] for r in head_rows) for i in range(len(heads))]
    return torch.stack(rows), heads_sum


def _shared_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])


def test_task_jacobian_batched_equals_loop():
    model, x, y = _setup()
    vec = list(_losses(model, x, y).values())
    params = list(model.parameters())
    batched = task_jacobian(vec, params, batched=True)
    looped = task_jacobian(vec, params, batched=False)
    for a, b in zip(batched, looped):
        assert torch.allclose(a, b, atol=1e-12)
    jac, _ = _manual(model, x, y)
    n_shared = len(list(model.shared_parameters()))
    assert torch.allclose(torch.cat([g.reshape(3, -1) for g in batched[:n_shared]], 1), jac, atol=1e-12)


@pytest.mark.parametrize("name", ["mgda", "upgrad", "dualproj", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "config",
                                  "fairgrad", "pcgrad", "graddrop", "gradvac", "moco", "excess_mtl"])
def test_parameter_mode_equals_aggregator_on_manual_jacobian(name):
    model, x, y = _setup()
    jac, heads = _manual(model, x, y)
    balancer = balance.get(name, mode="parameters")
    reference = balance.get(name, mode="parameters").aggregator
    torch.manual_seed(1)
    expected = reference(jac)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    weights = balancer.backward(_losses(model, x, y), shared=model.shared_parameters(), features=model.shared_features)
    assert weights.shape == (3,) and not weights.requires_grad
    assert torch.allclose(_shared_grad(model), expected, rtol=1e-9, atol=1e-12)
    for p, g in zip(model.task_specific_parameters(), heads):  # heads: their own task's plain gradient
        assert torch.allclose(p.grad, g, atol=1e-12)


@pytest.mark.parametrize("name", ["mgda_ub", "upgrad", "cagrad", "nash_mtl", "pcgrad", "graddrop"])
def test_feature_mode_combines_feature_gradients(name):
    model, x, y = _setup()
    losses = _losses(model, x, y)
    z = model.shared_features
    jz = torch.stack([torch.autograd.grad(losses[t.name], z, retain_graph=True)[0].reshape(-1) for t in TASKS])
    torch.manual_seed(2)
    gz = balance.get(name, mode="features").aggregator(jz)
    trunk = list(model.shared_parameters())
    expected = torch.autograd.grad(z, trunk, grad_outputs=gz.view_as(z), retain_graph=True)
    _, heads = _manual(model, x, y)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    balance.get(name, mode="features").backward(_losses(model, x, y), shared=model.shared_parameters(),
                                                features=model.shared_features)
    for p, e in zip(trunk, expected):
        assert torch.allclose(p.grad, e, rtol=1e-9, atol=1e-12)
    for p, g in zip(model.task_specific_parameters(), heads):
        assert torch.allclose(p.grad, g, atol=1e-12)


def test_feature_mode_weights_equal_weighted_parameter_backward():
    # For a method that outputs task weights, feature mode = backward of sum_t w_t L_t into the
    # trunk with the weights it returned (MGDA-UB, Sener & Koltun 2018).
    model, x, y = _setup(3)
    w = balance.get("mgda_ub").backward(_losses(model, x, y), shared=model.shared_parameters(), features=model.shared_features)
    got = _shared_grad(model)
    assert abs(w.sum().item() - 1) < 1e-9 and (w >= 0).all()
    model.zero_grad(set_to_none=True)
    losses = _losses(model, x, y)
    sum(wi * losses[t.name] for wi, t in zip(w, TASKS)).backward()
    assert torch.allclose(got, _shared_grad(model), rtol=1e-9, atol=1e-12)


def test_grads_accumulate_like_backward():
    model, x, y = _setup()
    balancer = balance.get("upgrad")
    balancer.backward(_losses(model, x, y), shared=model.shared_parameters())
    once = [p.grad.clone() for p in model.parameters()]
    balancer.backward(_losses(model, x, y), shared=model.shared_parameters())
    for p, g in zip(model.parameters(), once):
        assert torch.allclose(p.grad, 2 * g)


def test_nan_gradient_skips_step_and_keeps_state():
    model, x, y = _setup()
    balancer = balance.get("moco")
    balancer.backward(_losses(model, x, y), shared=model.shared_parameters())
    tracked = balancer.aggregator.tracked.clone()
    model.zero_grad(set_to_none=True)
    losses = _losses(model, x, y)
    losses["b"] = losses["b"] * float("nan")
    weights = balancer.backward(losses, shared=model.shared_parameters())
    for p in model.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0  # nothing but zeros written
    assert int(balancer.skipped_steps) == 1
    assert torch.equal(balancer.aggregator.tracked, tracked)
    assert torch.isfinite(weights).all()
    # feature mode too
    fb = balance.get("upgrad", mode="features")
    losses = _losses(model, x, y)
    losses["a"] = losses["a"] + float("inf")
    fb.backward(losses, shared=model.shared_parameters(), features=model.shared_features)
    assert int(fb.skipped_steps) == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_nan_policy_raise_names_task():
    model, x, y = _setup()
    losses = _losses(model, x, y)
    losses["c"] = losses["c"] * float("nan")
    with pytest.raises(TrainingError, match="'c'"):
        balance.get("mgda", nan_policy="raise").backward(losses, shared=model.shared_parameters())


def test_task_without_path_to_shared_parameters_is_named():
    model, x, y = _setup()
    losses = _losses(model, x, y)
    head = next(model.task_specific_parameters())
    losses["b"] = head.pow(2).sum()  # depends on a head only
    with pytest.raises(ConfigError, match="'b'"):
        balance.get("upgrad").backward(losses, shared=model.shared_parameters())
    losses = _losses(model, x, y)
    losses["a"] = torch.tensor(1.0, dtype=torch.float64)  # a constant
    with pytest.raises(ConfigError, match="'a'"):
        balance.get("cagrad", mode="features").backward(losses, shared=model.shared_parameters(), features=model.shared_features)


def test_bad_configuration_errors():
    with pytest.raises(ConfigError, match="cc"):
        balance.get("cagrad", cc=0.4)
    with pytest.raises(ConfigError, match="mode"):
        balance.get("moco", mode="features")
    with pytest.raises(ConfigError, match="c must be"):
        balance.get("cagrad", c=-1.0)
    model, x, y = _setup()
    with pytest.raises(ConfigError, match="features"):
        balance.get("mgda_ub").backward(_losses(model, x, y), shared=model.shared_parameters())
    with pytest.raises(ConfigError, match="shared"):
        balance.get("mgda").backward(_losses(model, x, y))
    losses = _losses(model, x, y)
    losses["a"] = torch.ones(2, requires_grad=True)
    with pytest.raises(ConfigError, match="'a'"):
        balance.get("mgda").backward(losses, shared=model.shared_parameters())


def test_balancer_state_dict_roundtrip():
    model, x, y = _setup()
    a = balance.get("nash_mtl", update_weights_every=3)
    a.backward(_losses(model, x, y), shared=model.shared_parameters())
    state = a.state_dict()
    b = balance.get("nash_mtl", update_weights_every=3)
    b.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    wa = a.backward(_losses(model, x, y), shared=model.shared_parameters())
    wb = b.backward(_losses(model, x, y), shared=model.shared_parameters())
    assert torch.equal(wa, wb) and int(b.aggregator.steps) == 2


def test_custom_aggregator_in_any_loop():
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    balancer = GradientBalancer(agg.UPGrad(), mode="features")
    before = _losses(model, x, y)
    for _ in range(5):
        opt.zero_grad()
        balancer.backward(_losses(model, x, y), shared=model.shared_parameters(), features=model.shared_features)
        opt.step()
    after = _losses(model, x, y)
    assert all(after[k] < before[k] for k in before)  # UPGrad's update never conflicts


# -- task_features: every task's feature gradient from one backward ------------------------------


def test_task_heads_copies_keep_outputs_and_gradients():
    # Outputs: bit-identical to the shared-input GEMM of BatchedLinear. Gradients (first, second
    # order): those of the plain batched towers applied to the expanded copies (baddbmm).
    model, x, y = _setup()
    out = model(x)
    z = model.shared_features
    assert model.task_features.shape == (3, *z.shape) and model.task_features.data_ptr() == z.data_ptr()
    towers = model.heads.towers(z)  # the (B, in) path of BatchedLinear: one wide GEMM
    for i, t in enumerate(TASKS):
        assert torch.equal(out[t.name], towers[i, :, : t.output_dim])
    plain = model.expose_task_features(False)(x)  # off (the default): no copies, same outputs
    assert model.task_features is None and all(torch.equal(plain[k], out[k]) for k in out)
    model.expose_task_features()
    heads = list(model.heads.parameters())
    w = torch.randn(3, 12, 2, dtype=torch.float64)

    def grads(use_heads, create_graph=False):
        zt = z.detach().requires_grad_().unsqueeze(0).expand(3, *z.shape)
        o = model.heads(zt[0]) if use_heads else None
        copies = model.heads.task_features if use_heads else zt
        if not use_heads:  # the towers' padding columns (beyond a task's width) are not outputs
            mask = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64)
            full = model.heads.towers(copies) * mask
        else:
            full = torch.stack([torch.nn.functional.pad(o[t.name], (0, 2 - t.output_dim)) for t in TASKS])
        return torch.autograd.grad((full * w).pow(2).sum(), [copies, *heads], create_graph=create_graph)

    for a, b in zip(grads(True), grads(False)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    second = [torch.autograd.grad(g.pow(2).sum(), heads[0], retain_graph=True)[0] for g in grads(True, True)[:2]]
    reference = [torch.autograd.grad(g.pow(2).sum(), heads[0], retain_graph=True)[0] for g in grads(False, True)[:2]]
    for a, b in zip(second, reference):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_one_backward_feature_jacobian_equals_per_task_rows():
    model, x, y = _setup(4)
    losses = _losses(model, x, y)
    z, zt = model.shared_features, model.task_features
    rows = torch.stack([torch.autograd.grad(losses[t.name], z, retain_graph=True)[0] for t in TASKS])
    one = torch.autograd.grad(sum(losses.values()), zt)[0]
    assert torch.allclose(one, rows, rtol=1e-12, atol=1e-15)
    assert torch.count_nonzero(rows[0] - rows[1]) > 0  # tasks really differ: the test can fail


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _run(model, x, y, name, mode, use_task_features, **kw):
    model.zero_grad(set_to_none=True)
    balancer = balance.get(name, mode=mode)
    for k, v in kw.items():
        setattr(balancer, k, v)
    losses = _losses(model, x, y)
    extra = {"task_features": model.task_features} if use_task_features else {}
    torch.manual_seed(5)
    w = balancer.backward(losses, shared=model.shared_parameters(), features=model.shared_features, **extra)
    return w, _grads(model)


@pytest.mark.parametrize("name", ["mgda_ub", "upgrad", "cagrad", "nash_mtl", "pcgrad", "imtl_g", "graddrop"])
def test_feature_mode_with_task_features_equals_per_task_path(name):
    model, x, y = _setup(1)
    w_old, old = _run(model, x, y, name, "features", False)
    w_new, new = _run(model, x, y, name, "features", True)
    assert torch.allclose(w_old, w_new, rtol=1e-9, atol=1e-12)
    for a, b in zip(old, new):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("trunk_batched", [True, False])
@pytest.mark.parametrize("name", ["mgda", "upgrad", "cagrad", "nash_mtl", "pcgrad", "aligned_mtl", "moco"])
def test_parameter_mode_with_task_features_equals_per_task_path(name, trunk_batched):
    model, x, y = _setup(2)
    jac, heads = _manual(model, x, y)
    w_old, old = _run(model, x, y, name, "parameters", False)
    w_new, new = _run(model, x, y, name, "parameters", True, trunk_batched=trunk_batched)
    assert torch.allclose(w_old, w_new, rtol=1e-9, atol=1e-12)
    for a, b in zip(old, new):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    for p, g in zip(model.task_specific_parameters(), heads):  # heads: own task's plain gradient
        assert torch.allclose(p.grad, g, atol=1e-12)


def test_trunk_jacobian_equals_manual_jacobian():
    model, x, y = _setup(6)
    jac, _ = _manual(model, x, y)
    for trunk_batched in (True, False):
        seen = {}

        class Spy(agg.Aggregator):
            def aggregate(self, jacobian):
                seen["J"] = jacobian
                n = jacobian.shape[0]
                return jacobian.mean(0), torch.full((n,), 1.0 / n, dtype=jacobian.dtype)

        b = GradientBalancer(Spy(), trunk_batched=trunk_batched)
        b.backward(_losses(model, x, y), shared=model.shared_parameters(), task_features=model.task_features,
                   features=model.shared_features)
        assert torch.allclose(seen["J"], jac, rtol=1e-10, atol=1e-13)


def _routed(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("mmoe", 6, TASKS, num_experts=3, expert=(8,), tower=(4,)).double()
    return (model, *_data(seed, 10))


@pytest.mark.parametrize("mode", ["features", "parameters"])
@pytest.mark.parametrize("name", ["upgrad", "mgda", "cagrad"])
def test_routed_per_task_features_equal_per_task_path(name, mode):
    # MMoE: the (T, B, H) mixtures are per-task representations (task_features is shared_features);
    # the one backward must reproduce the block-diagonal Jacobian of the per-task passes, and the
    # task gates (below the mixtures) their own task's gradient.
    model, x, y = _routed()
    shared = list(model.shared_parameters())

    def run(one_pass):
        model.zero_grad(set_to_none=True)
        losses = _losses(model, x, y)
        z = model.shared_features
        extra = {"task_features": z} if one_pass else {}
        b = balance.get(name, mode=mode)
        w = b.backward(losses, shared=shared, features=z, **extra)
        return w, _grads(model)

    w_old, old = run(False)
    w_new, new = run(True)
    assert torch.allclose(w_old, w_new, rtol=1e-9, atol=1e-12)
    for a, b in zip(old, new):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # task-specific parameters (towers and gates) hold the plain gradient of the summed losses
    model.zero_grad(set_to_none=True)
    sum(_losses(model, x, y).values()).backward()
    for p in model.task_specific_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    expected = {id(p): p.grad.clone() for p in model.task_specific_parameters()}
    run(True)
    for p in model.task_specific_parameters():
        assert torch.allclose(p.grad, expected[id(p)], rtol=1e-9, atol=1e-12)


def test_task_features_errors():
    model, x, y = _setup()
    losses = _losses(model, x, y)
    with pytest.raises(ConfigError, match="task_features"):
        balance.get("upgrad").backward(losses, shared=model.shared_parameters(), features=model.shared_features,
                                       task_features=model.task_features[:2])
    losses = _losses(model, x, y)
    losses["a"] = losses["a"] + model.shared_features.sum()  # reads z outside its head: its slice would miss it
    with pytest.raises(ConfigError, match="task_features"):
        balance.get("upgrad", mode="features").backward(losses, shared=model.shared_parameters(),
                                                        features=model.shared_features, task_features=model.task_features)


def test_task_features_are_not_copied_or_pickled():
    import copy
    import io

    model, x, y = _setup()
    model(x)
    model.shared_features = None  # (a non-leaf tensor: the caller's to drop, as before)
    clone = copy.deepcopy(model)
    assert clone.task_features is None and clone.heads.task_features is None
    assert model.task_features is not None  # the original keeps its step's tensor
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.task_features is None and set(loaded.state_dict()) == set(model.state_dict())


def test_routed_feature_mode_takes_the_block_diagonal_gramian(monkeypatch):
    # per-task representations: a Gramian-only method gets G = diag(|slice_t|^2) without the dense
    # T x (T m) rows; the equality with the per-task path is test_routed_per_task_features_equal_per_task_path
    from polytask.balance.engine import GradientBalancer

    calls = []
    original = GradientBalancer._backward_block_diagonal

    def spy(self, *args, **kwargs):
        calls.append(type(self.aggregator).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradientBalancer, "_backward_block_diagonal", spy)
    model, x, y = _routed()
    for name, mode in [("mgda", "features"), ("upgrad", "features"), ("mgda", "parameters")]:
        losses = _losses(model, x, y)
        balance.get(name, mode=mode).backward(losses, shared=list(model.shared_parameters()),
                                              features=model.shared_features, task_features=model.shared_features)
    assert calls == ["MGDA", "UPGrad"]
