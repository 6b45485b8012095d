"""polytask.adapters: exact init, hand-checked routing, batched experts vs loops, PEFT equality, training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from polytask import adapters, balance
from polytask.errors import CheckpointError, ConfigError

METHODS = [("lora", {}), ("mtlora", {}), ("hydralora", {"num_experts": 3}),
           ("molora", {"num_experts": 4, "top_k": 2}), ("smora", {"top_k": 2}),
           ("mhr", {"n_skills": 3, "n_splits": 2}), ("arrow", {"top_k": 1}),
           ("loramoe", {"num_experts": 4, "task_groups": [0, 1]})]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5)).double()


def tiny_bert(seed: int = 0, hidden: int = 16):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).double().eval()


def tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter parameter (B factors included) random values, so deltas are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.shared_parameters(model) + adapters.task_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


# ------------------------------------------------------------------------------------ init = base
@pytest.mark.parametrize("method,kw", METHODS)
def test_wrapped_bert_equals_base_at_init_and_base_is_frozen(method, kw):
    base = tiny_bert()
    model = adapters.apply(copy.deepcopy(base), method, ["a", "b"], ["query", "value"], rank=4, alpha=8, **kw)
    layers = adapters.adapter_layers(model)
    assert len(layers) == 4 and all(n.endswith(("query", "value")) for n in layers)   # 2 layers x (query, value)
    ids = torch.randint(0, 40, (3, 7))
    adapters.set_task(model, "b")
    ref = base(ids).last_hidden_state
    assert torch.equal(model(ids).last_hidden_state, ref)                # B = 0: exactly the base model
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapters.shared_parameters(model) + adapters.task_parameters(model)}
    randomize(model)                                                     # the check can fail: now it differs
    assert not torch.allclose(model(ids).last_hidden_state, ref)


# ------------------------------------------------------------------------------------ per-task LoRA
def test_lora_selects_each_task_and_per_sample_ids_match_single_task_batches():
    base = mlp()
    model = adapters.apply(copy.deepcopy(base), "lora", ["a", "b", "c"], ["0"], rank=2, alpha=6)
    randomize(model)
    lay = model[0]
    x = torch.randn(5, 6, dtype=torch.double)
    for t, name in enumerate(["a", "b", "c"]):
        with adapters.task_context(model, name):
            got = model(x)
        # Hu et al. eq. 3 by hand: W0 x + (alpha / r) B A x, alpha / r = 3
        h = base[0](x) + 3.0 * x @ lay.lora_A[t].T @ lay.lora_B[t].T
        assert torch.allclose(got, base[2](torch.tanh(h)), atol=1e-12)
    ids = torch.tensor([2, 0, 1, 1, 0])
    adapters.set_task(model, ids)
    mixed = model(x)
    for i, t in enumerate(ids):
        adapters.set_task(model, int(t))
        assert torch.allclose(mixed[i], model(x[i:i + 1])[0], atol=1e-12)
    # a 3-d input (batch, tokens, features) with per-sample ids
    x3 = torch.randn(2, 4, 6, dtype=torch.double)
    adapters.set_task(model, torch.tensor([1, 2]))
    out3 = lay(x3)
    adapters.set_task(model, 2)
    assert torch.allclose(out3[1], lay(x3[1]), atol=1e-12)


def test_mtlora_is_shared_plus_task_lora():
    model = adapters.apply(mlp(), "mtlora", ["a", "b"], ["0"], rank=2, alpha=2)
    randomize(model)
    lay = model[0]
    x = torch.randn(4, 6, dtype=torch.double)
    adapters.set_task(model, "b")
    want = lay.base(x) + x @ lay.shared_A.T @ lay.shared_B.T + x @ lay.lora_A[1].T @ lay.lora_B[1].T
    assert torch.allclose(lay(x), want, atol=1e-12)
    assert len(adapters.shared_parameters(model)) == 2 and len(adapters.task_parameters(model)) == 2


# ------------------------------------------------------------------------------------ routing by hand
def test_topk_gates_and_load_balancing_loss_by_hand():
    # 2 tokens, 3 experts. token 0 logits log([0.5, 0.3, 0.2]) -> probs (0.5, 0.3, 0.2), top-2 = {0, 1},
    # renormalised gates (0.625, 0.375, 0). token 1 logits log([0.1, 0.2, 0.7]) -> top-2 = {2, 1},
    # gates (0, 0.2/0.9, 0.7/0.9).
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], dtype=torch.double))
    gates, probs = adapters.topk_gates(logits, 2)
    assert torch.allclose(gates, torch.tensor([[0.625, 0.375, 0.0], [0.0, 2 / 9, 7 / 9]], dtype=torch.double))
    # f = assignments per expert / 4 = (1, 2, 1) / 4; P = mean probs = (0.3, 0.25, 0.45)
    # loss = E * sum f P = 3 * (0.25*0.3 + 0.5*0.25 + 0.25*0.45) = 3 * 0.3125 = 0.9375
    loss = adapters.load_balancing_loss(gates, probs)
    assert loss.item() == pytest.approx(0.9375, abs=1e-12)
    # perfectly uniform routing gives 1; everything on one expert with probability ~1 gives ~E
    uni = torch.zeros(6, 3, dtype=torch.double)
    g, p = adapters.topk_gates(uni + torch.eye(3, dtype=torch.double).repeat(2, 1) * 1e-9, 1)
    assert adapters.load_balancing_loss(g, p).item() == pytest.approx(1.0, abs=1e-6)
    g, p = adapters.topk_gates(torch.tensor([[50.0, 0, 0]] * 4, dtype=torch.double), 1)
    assert adapters.load_balancing_loss(g, p).item() == pytest.approx(3.0, abs=1e-9)


def test_padding_tokens_are_left_out_of_the_load_balancing_loss():
    # the hand case above plus a padding token routed to expert 0 with probability ~1: masked, the loss is 0.9375
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [1.0, 1e-9, 1e-9]], dtype=torch.double))
    gates, probs = adapters.topk_gates(logits, 2)
    mask = torch.tensor([1, 1, 0])
    assert adapters.load_balancing_loss(gates, probs, mask).item() == pytest.approx(0.9375, abs=1e-9)
    assert adapters.load_balancing_loss(gates, probs).item() != pytest.approx(0.9375, abs=1e-3)
    # through a model: the layer's aux loss with a (B, L) mask equals the loss of the unpadded tokens alone
    model = adapters.apply(mlp(), "molora", ["a"], ["0"], rank=2, num_experts=3, top_k=1)
    x = torch.randn(2, 4, 6, dtype=torch.double)
    pad = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adapters.set_token_mask(model, pad)
    model(x)
    masked = model[0].aux_loss
    adapters.set_token_mask(model, None)
    model(x[pad.bool()])
    assert torch.allclose(masked, model[0].aux_loss, atol=1e-12)


def test_molora_batched_experts_equal_a_per_expert_loop():
    model = adapters.apply(mlp(), "molora", ["a", "b"], ["0", "2"], rank=3, alpha=6, num_experts=4, top_k=2)
    randomize(model, seed=3)
    lay = model[0]
    x = torch.randn(2, 5, 6, dtype=torch.double)
    got = lay(x)
    flat = x.reshape(-1, 6)
    probs = torch.softmax(flat @ lay.router.T, -1)
    ref = lay.base(flat).clone()
    for n in range(flat.shape[0]):                            # reference: loops over tokens and experts
        top = sorted(range(4), key=lambda e: -probs[n, e].item())[:2]
        z = sum(probs[n, e] for e in top)
        for e in top:
            ref[n] += 2.0 * probs[n, e] / z * (lay.lora_B[e] @ (lay.lora_A[e] @ flat[n]))
    assert torch.allclose(got.reshape(-1, 10), ref, atol=1e-12)
    # the stored aux loss is the Switch loss of exactly these gates (recomputed from the loop's top-k)
    gates = torch.zeros_like(probs)
    for n in range(flat.shape[0]):
        top = probs[n].topk(2).indices
        gates[n, top] = probs[n, top] / probs[n, top].sum()
    assert torch.allclose(lay.aux_loss, adapters.load_balancing_loss(gates, probs), atol=1e-12)
    model(x.reshape(-1, 6))
    assert torch.allclose(adapters.aux_loss(model), model[0].aux_loss + model[2].aux_loss)
    twin = copy.deepcopy(model)                 # a graph-holding aux loss does not block deepcopy
    assert twin[0].aux_loss is None and torch.equal(twin[0].lora_B, lay.lora_B)


def test_hydralora_shares_one_A_and_equals_a_loop_over_heads():
    model = adapters.apply(mlp(), "hydralora", ["a", "b"], ["0"], rank=2, alpha=4, num_experts=3)
    randomize(model, seed=4)
    lay = model[0]
    assert tuple(lay.lora_A.shape) == (2, 6) and tuple(lay.lora_B.shape) == (3, 10, 2)
    x = torch.randn(7, 6, dtype=torch.double)
    w = torch.softmax(x @ lay.router.T, -1)
    ref = lay.base(x) + 2.0 * sum(w[:, e:e + 1] * (x @ lay.lora_A.T @ lay.lora_B[e].T) for e in range(3))
    assert torch.allclose(lay(x), ref, atol=1e-12)


def test_smora_routes_ranks_by_hand_and_equals_a_loop():
    model = adapters.apply(mlp(), "smora", ["a"], ["0"], rank=3, alpha=3, top_k=2)
    lay = model[0]
    with torch.no_grad():
        lay.lora_A.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]]))
        lay.lora_B.zero_()
        lay.lora_B[:3, :3] = torch.eye(3)
        lay.router.zero_()
        lay.router[:3, :3] = torch.eye(3) * math.log(2.0)
    # x = (1, 2, 3, 0, 0, 0): A x = (1, 2, 3); router logits = log2 * (1, 2, 3) -> probs ∝ (2, 4, 8),
    # top-2 = ranks {1, 2} with renormalised gates (4/12, 8/12); delta = B (g * A x) = (0, 2/3, 2), scaling 1
    x = torch.tensor([[1.0, 2.0, 3.0, 0, 0, 0]], dtype=torch.double)
    want = torch.zeros(1, 10, dtype=torch.double)
    want[0, 1], want[0, 2] = 2 / 3, 2.0
    assert torch.allclose(lay(x) - lay.base(x), want, atol=1e-12)
    randomize(model, seed=5)
    xs = torch.randn(9, 6, dtype=torch.double)
    probs = torch.softmax(xs @ lay.router.T, -1)
    ref = lay.base(xs).clone()
    for n in range(9):                                      # reference: a loop over tokens and active ranks
        top = probs[n].topk(2).indices
        for r in top:
            ref[n] += probs[n, r] / probs[n, top].sum() * (lay.lora_A[r] @ xs[n]) * lay.lora_B[:, r]
    assert torch.allclose(lay(xs), ref, atol=1e-12)
    with pytest.raises(ConfigError, match="top_k: must be between 1 and rank=2, got 3"):
        adapters.apply(mlp(), "smora", ["a"], ["0"], rank=2, top_k=3)
    with pytest.raises(ConfigError, match="top_k: must be between 1 and rank=1, got 2"):
        adapters.apply(mlp(), "smora", ["a"], ["0"], rank=1)         # the default top_k=2 is checked too


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_problem():
    with pytest.raises(ConfigError, match="matches no nn.Linear"):
        adapters.apply(mlp(), "lora", ["a"], ["query"], rank=2)
    with pytest.raises(ConfigError, match="adapters.rank.*got 0"):
        adapters.apply(mlp(), "lora", ["a"], ["0"], rank=0)
    with pytest.raises(ConfigError, match="larger than module '2'"):
        adapters.apply(mlp(), "lora", ["a"], ["0", "2"], rank=6)       # layer 2 is 10 -> 5
    with pytest.raises(ConfigError, match="unknown method 'lorra'"):
        adapters.apply(mlp(), "lorra", ["a"], ["0"], rank=2)
    with pytest.raises(ConfigError, match="top_k.*num_experts=2, got 3"):
        adapters.apply(mlp(), "molora", ["a"], ["0"], rank=2, num_experts=2, top_k=3)
    mha = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.raises(ConfigError, match="module '0.out_proj' is the output projection of an nn.MultiheadAttention"):
        adapters.apply(mha, "lora", ["a"], ["out_proj"], rank=2)
    with pytest.raises(ConfigError, match="adapters.top_kk: method 'molora' takes no such parameter"):
        adapters.apply(mlp(), "molora", ["a"], ["0"], rank=2, top_kk=1)
    model = adapters.apply(mlp(), "lora", ["a", "b"], ["0"], rank=2)
    with pytest.raises(ConfigError, match="no task set"):
        model(torch.randn(2, 6, dtype=torch.double))
    with pytest.raises(ConfigError, match="unknown task 'c'"):
        adapters.set_task(model, "c")
    with pytest.raises(ConfigError, match="unknown task 5"):
        adapters.set_task(model, 5)
    adapters.set_task(model, torch.tensor([0, 1, 1]))
    with pytest.raises(ConfigError, match="3 ids for a batch of 2"):
        model(torch.randn(2, 6, dtype=torch.double))
    with pytest.raises(ConfigError, match="already has adapters"):
        adapters.apply(model, "lora", ["a"], ["2"], rank=2)


@pytest.mark.parametrize("method,kw", METHODS)
def test_training_forward_backward_makes_no_host_sync(method, kw, monkeypatch):
    kw = {**kw, "top_k": 1} if method in ("molora", "smora", "arrow") else kw
    targets = ["0"] if method == "mhr" else ["0", "2"]             # MHR's 2 splits do not divide layer 2's 5 outputs
    model = adapters.apply(mlp(), method, ["a", "b"], targets, rank=2, **kw).train()
    x = torch.randn(3, 6, dtype=torch.double)
    adapters.set_task(model, torch.tensor([0, 1, 0]))
    model(x)                                          # first call: Arrow's prototypes (one SVD, cached)

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation inside a training step")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    adapters.set_task(model, torch.tensor([0, 1, 0]))
    (model(x).sum() + adapters.aux_loss(model)).backward()


# ------------------------------------------------------------------------------------ training with a balancer
@pytest.mark.parametrize("method,kw", [("hydralora", {"num_experts": 2}), ("mtlora", {}),
                                       ("molora", {"num_experts": 3, "top_k": 2})])
def test_two_task_training_with_nash_mtl_trains_adapters_only(method, kw):
    model = adapters.apply(tiny_bert(seed=2), method, ["a", "b"], ["query", "value", "dense"], rank=4, alpha=8, **kw)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ours = {id(p) for p in adapters.shared_parameters(model) + adapters.task_parameters(model)}
    assert {n for n, p in model.named_parameters() if id(p) not in ours} == set(frozen)
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (8, 6))
    y = {"a": torch.randn(8, dtype=torch.double), "b": torch.randn(8, dtype=torch.double)}
    heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in y}).double()
    params = adapters.shared_parameters(model) + adapters.task_parameters(model) + list(heads.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    balancer = balance.get("nash_mtl")

    def losses():
        out = {}
        for t in y:                         # one forward per task: the task picks its task-specific LoRA
            adapters.set_task(model, t)
            pooled = model(ids).last_hidden_state[:, 0]
            out[t] = ((heads[t](pooled).squeeze(-1) - y[t]) ** 2).mean() + 0.01 * adapters.aux_loss(model)
        return out

    first = {t: v.item() for t, v in losses().items()}
    for _ in range(25):
        opt.zero_grad()
        balancer.backward(losses(), shared=adapters.shared_parameters(model))
        opt.step()
    last = {t: v.item() for t, v in losses().items()}
    assert all(last[t] < 0.7 * first[t] for t in y), (first, last)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.shared_parameters(model))


# ------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("method,kw", METHODS)
def test_save_load_round_trip_gives_the_same_outputs(method, kw, tmp_path):
    base = tiny_bert()
    model = adapters.apply(copy.deepcopy(base), method, ["a", "b"], ["query", "value"], rank=4, alpha=8, **kw)
    randomize(model)
    adapters.save(model, tmp_path / "ad")
    loaded = adapters.load(copy.deepcopy(base), tmp_path / "ad")
    ids = torch.randint(0, 40, (3, 5))
    for task in ("a", torch.tensor([1, 0, 1])):
        adapters.set_task(model, task)
        adapters.set_task(loaded, task)
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)
    with pytest.raises(CheckpointError, match=r"tensor 'encoder\.layer\.0\.attention\.self\.query\.lora_A'.*shape"):
        adapters.load(tiny_bert(hidden=24), tmp_path / "ad")       # a different base: shape mismatch
    with pytest.raises(CheckpointError, match="cannot read"):
        adapters.load(copy.deepcopy(base), tmp_path / "missing")


def test_save_on_a_full_disk_keeps_the_previous_files(tmp_path, monkeypatch):
    import errno

    import polytask.adapters.io as aio

    model = adapters.apply(mlp(), "molora", ["a"], ["0"], rank=2)
    adapters.save(model, tmp_path)
    before = (tmp_path / aio.WEIGHTS).read_bytes()
    randomize(model)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(aio, "save_file", full)
    with pytest.raises(CheckpointError, match="adapters.safetensors"):
        adapters.save(model, tmp_path)
    assert (tmp_path / aio.WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [aio.CONFIG, aio.WEIGHTS]      # no partial file left


# ------------------------------------------------------------------------------------ PEFT equality
@pytest.mark.parametrize("build,targets", [(tiny_bert, ["query", "value"]), (tiny_llama, ["q_proj", "v_proj"])])
def test_per_task_lora_saved_in_peft_format_loads_in_peft_with_equal_outputs(build, targets, tmp_path):
    peft = pytest.importorskip("peft")
    base = build()
    model = adapters.apply(copy.deepcopy(base), "lora", ["a", "b"], targets, rank=4, alpha=12)
    randomize(model)
    ids = torch.randint(0, 40, (2, 6))
    out = (lambda m: m(ids).last_hidden_state) if build is tiny_bert else (lambda m: m(ids).logits)
    for task in ("a", "b"):
        adapters.save_peft(model, tmp_path / task, task=task)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / task)).eval()
        adapters.set_task(model, task)
        assert torch.allclose(out(theirs), out(model), atol=1e-10)
    assert not torch.allclose(out(base), out(model))                  # the adapters matter
    # and back: PEFT's directory loaded into a fresh polytask model gives the same task outputs
    fresh = adapters.apply(copy.deepcopy(base), "lora", ["x", "b"], targets, rank=4, alpha=12)
    adapters.load_peft(fresh, tmp_path / "b", task="b")
    adapters.set_task(fresh, "b")
    assert torch.allclose(out(fresh), out(model), atol=1e-12)
    with pytest.raises(ConfigError, match="r=4, lora_alpha=12"):
        adapters.load_peft(adapters.apply(copy.deepcopy(base), "lora", ["b"], targets, rank=2, alpha=12),
                           tmp_path / "b", task="b")
    with pytest.raises(ConfigError, match="save_peft: takes methods .* got method 'hydralora'"):
        adapters.save_peft(adapters.apply(copy.deepcopy(base), "hydralora", ["b"], targets, rank=4), tmp_path / "h",
                           task="b")


@pytest.mark.parametrize("n_splits", [1, 2])                     # Poly, and MHR with 2 heads
def test_poly_and_mhr_equal_peft_with_copied_weights_and_via_peft_format(n_splits, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PolyConfig(
        r=2, target_modules=["query", "value"], n_tasks=3, n_skills=4, n_splits=n_splits, init_weights=False))
    theirs = theirs.double().eval()
    ours = adapters.apply(copy.deepcopy(base), "poly", ["a", "b", "c"], ["query", "value"], rank=2, alpha=1,
                          n_skills=4, n_splits=n_splits)
    g = torch.Generator().manual_seed(7)
    sd = theirs.state_dict()
    with torch.no_grad():
        for name, lay in adapters.adapter_layers(ours).items():
            pre = f"base_model.model.{name}."
            sd[pre + "poly_router.default.module_logits"].copy_(torch.randn(3, n_splits * 4, generator=g))
            lay.lora_A.copy_(sd[pre + "poly_lora_A.default"])
            lay.lora_B.copy_(sd[pre + "poly_lora_B.default"])
            lay.router.copy_(sd[pre + "poly_router.default.module_logits"])
    ids = torch.randint(0, 40, (3, 6))
    tids = torch.tensor([2, 0, 1])
    adapters.set_task(ours, tids)
    want = theirs.base_model(input_ids=ids, task_ids=tids).last_hidden_state   # PeftModel.forward drops task_ids
    assert torch.allclose(ours(ids).last_hidden_state, want, atol=1e-10)
    assert not torch.allclose(base(ids).last_hidden_state, want)
    adapters.set_task(ours, "c")                                # one task for the batch = ids all 2
    assert torch.allclose(ours(ids).last_hidden_state,
                          theirs.base_model(input_ids=ids, task_ids=torch.full((3,), 2)).last_hidden_state, atol=1e-10)
    # training mode: the same RelaxedBernoulli draws given the same seed
    ours.train(), theirs.train()
    adapters.set_task(ours, tids)
    torch.manual_seed(11)
    got = ours(ids).last_hidden_state
    torch.manual_seed(11)
    assert torch.allclose(got, theirs.base_model(input_ids=ids, task_ids=tids).last_hidden_state, atol=1e-10)
    ours.eval()
    # PEFT format: PEFT loads our directory onto the base and gives the same outputs
    adapters.save_peft(ours, tmp_path / "poly")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "poly")).double().eval()
    adapters.set_task(ours, tids)
    assert torch.allclose(loaded.base_model(input_ids=ids, task_ids=tids).last_hidden_state,
                          ours(ids).last_hidden_state, atol=1e-10)


def test_poly_splits_must_divide_the_layer():
    with pytest.raises(ConfigError, match="n_splits: must divide the features of module '2' \\(10 -> 5\\), got 2"):
        adapters.apply(mlp(), "mhr", ["a"], ["0", "2"], rank=2, n_splits=2)


def test_arrow_prototypes_and_routing_by_hand():
    model = adapters.apply(mlp(), "arrow", ["u", "v"], ["0"], rank=1, alpha=1, top_k=1)
    lay = model[0].eval()
    a = torch.tensor([[3.0, 4.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]], dtype=torch.double)
    b = torch.zeros(2, 10, dtype=torch.double)
    b[0, 0], b[1, 1] = 1.0, 2.0
    with torch.no_grad():
        lay.lora_A.copy_(a[:, None, :])
        lay.lora_B.copy_(b[:, :, None])
    # rank 1: ΔW_e = b_e a_e^T, its top right singular vector is ±a_e/|a_e| = ±(0.6, 0.8, 0...), ±e_3
    protos = lay.refresh()
    assert torch.allclose(protos.abs(), (a / a.norm(dim=1, keepdim=True)).abs(), atol=1e-12)
    # x = (1, 0, 2, 0...): scores |0.6| and |2| -> expert v alone (top-1, coefficient 1): delta = b_v (a_v . x) = 4 e_2
    x = torch.tensor([[1.0, 0, 2.0, 0, 0, 0]], dtype=torch.double)
    want = torch.zeros(1, 10, dtype=torch.double)
    want[0, 1] = 4.0
    assert torch.allclose(lay(x) - lay.base(x), want, atol=1e-12)
    # top-2, temperature 1: coefficients softmax(0.6, 2) -> delta = c_u * 3 e_1 + c_v * 4 e_2
    lay.top_k = 2
    c = torch.softmax(torch.tensor([0.6, 2.0], dtype=torch.double), 0)
    want[0, 0], want[0, 1] = c[0] * 3.0, c[1] * 4.0
    assert torch.allclose(lay(x) - lay.base(x), want, atol=1e-12)
    with pytest.raises(ConfigError, match="top_k: must be between 1 and the number of tasks \\(LoRAs\\)=2, got 3"):
        adapters.apply(mlp(), "arrow", ["u", "v"], ["0"], rank=1)


def test_arrow_over_a_peft_lora_library_equals_peft_arrow(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    lib = adapters.apply(copy.deepcopy(base), "lora", ["t0", "t1", "t2"], ["query", "value"], rank=2, alpha=4)
    randomize(lib, seed=8)
    with torch.no_grad():                      # a clear top singular value, so PEFT's 15 power iterations converge
        for lay in adapters.adapter_layers(lib).values():
            lay.lora_A[:, 0] *= 6.0
            lay.lora_B[:, :, 0] *= 6.0
    dirs = [str(adapters.save_peft(lib, tmp_path / t, task=t)) for t in ("t0", "t1", "t2")]
    theirs = peft.create_arrow_model(copy.deepcopy(base), dirs, peft.ArrowConfig(top_k=2, router_temperature=0.5,
                                                                                   rng_seed=0)).double().eval()
    ours = adapters.apply(copy.deepcopy(base), "arrow", ["t0", "t1", "t2"], ["query", "value"], rank=2, alpha=4,
                          top_k=2, temperature=0.5)
    for t, d in zip(("t0", "t1", "t2"), dirs):
        adapters.load_peft(ours, d, task=t)
    ids = torch.randint(0, 40, (2, 6))
    want = theirs(input_ids=ids).last_hidden_state
    assert torch.allclose(ours(ids).last_hidden_state, want, atol=1e-8)
    assert not torch.allclose(base(ids).last_hidden_state, want, atol=1e-3)


def test_expert_usage_per_task_by_hand():
    model = adapters.apply(mlp(), "molora", ["a", "b", "c"], ["0"], rank=2, num_experts=2, top_k=1)
    lay = model[0]
    with torch.no_grad():
        lay.router.zero_()
        lay.router[0, 0], lay.router[1, 0] = 5.0, -5.0       # expert 0 iff feature 0 > 0 (top-1: gate 1)
    # 3 samples x 2 tokens, sample tasks (a, b, a); feature 0 signs: s0 (+, +), s1 (-, -), s2 (-, -)
    # task a: s0's 2 tokens -> expert 0, s2's 2 -> expert 1: (0.5, 0.5); b: both tokens -> expert 1: (0, 1);
    # c: no token -> zeros
    x = torch.zeros(3, 2, 6, dtype=torch.double)
    x[..., 0] = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]])
    adapters.set_task(model, torch.tensor([0, 1, 0]))
    model(x)
    usage = adapters.expert_usage(model)["0"]
    assert torch.allclose(usage, torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.0, 0.0]], dtype=torch.double))
    adapters.set_task(model, "c")                          # one task for the batch: all 6 tokens, 2 to expert 0
    model(x)
    assert torch.allclose(adapters.expert_usage(model)["0"],
                          torch.tensor([[0.0, 0.0], [0.0, 0.0], [1 / 3, 2 / 3]], dtype=torch.double))


def test_mbc_clusters_tasks_by_their_lora_parameters():
    model = adapters.apply(mlp(), "lora", ["a", "b", "c", "d", "e"], ["0", "2"], rank=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                  # two families: (a, c, e) near one direction, (b, d) near another
        for lay in adapters.adapter_layers(model).values():
            for p in (lay.lora_A, lay.lora_B):
                u, w = torch.randn(p.shape[1:], generator=g), torch.randn(p.shape[1:], generator=g)
                for t, centre in enumerate([u, w, u, w, u]):
                    p[t] = centre + 0.05 * torch.randn(p.shape[1:], generator=g)
    sim = adapters.lora_similarity(model)
    assert torch.allclose(sim.diagonal(), torch.ones(5, dtype=torch.double))
    assert sim[0, 2] > 0.9 and sim[1, 3] > 0.9 and sim[0, 1].abs() < 0.5
    assert adapters.mbc_clusters(model, 2) == [["a", "c", "e"], ["b", "d"]]
    assert adapters.mbc_clusters(model, 1) == [["a", "b", "c", "d", "e"]]
    assert len(adapters.mbc_clusters(model, 5)) == 5
    with pytest.raises(ConfigError, match="mbc.k: must be between 1 and the number of tasks \\(5\\), got 6"):
        adapters.mbc_clusters(model, 6)


def test_repr_shows_the_hyperparameters():
    model = adapters.apply(mlp(), "molora", ["a"], ["0"], rank=2, alpha=4, num_experts=3, top_k=1)
    assert "MoLoRALinear(\n    in_features=6, out_features=10, rank=2, alpha=4.0, num_experts=3, top_k=1\n" in repr(model)
    model = adapters.apply(mlp(), "mhr", ["a"], ["0"], rank=2, n_skills=5, n_splits=2)
    assert "rank=2, alpha=2.0, n_skills=5, n_splits=2" in repr(model[0])


@pytest.mark.parametrize("method", ["lora", "mtlora"])
def test_unwrap_restores_the_base_or_folds_one_task_in(method):
    base = tiny_bert()
    ids = torch.randint(0, 40, (2, 5))
    model = adapters.apply(copy.deepcopy(base), method, ["a", "b"], ["query", "value", "dense"], rank=2, alpha=6)
    randomize(model)
    adapters.set_task(model, "b")
    adapted = model(ids).last_hidden_state
    merged = adapters.unwrap(copy.deepcopy(model), merge_task="b")
    assert not any(isinstance(m, adapters.AdapterLinear) for m in merged.modules())
    assert torch.allclose(merged(ids).last_hidden_state, adapted, atol=1e-10)
    plain = adapters.unwrap(model)
    assert torch.equal(plain(ids).last_hidden_state, base(ids).last_hidden_state)
    assert set(dict(plain.named_parameters())) == set(dict(base.named_parameters()))
    adapters.apply(plain, "lora", ["z"], ["query"], rank=2)            # unwrapped: can be wrapped again
    with pytest.raises(ConfigError, match="merge_task needs a per-task LoRA"):
        adapters.unwrap(adapters.apply(copy.deepcopy(base), "molora", ["a"], ["query"], rank=2), merge_task="a")


def test_mixed_task_batch_gradients_reach_only_each_samples_task():
    model = adapters.apply(tiny_bert(), "mtlora", ["a", "b"], ["query", "value"], rank=2, alpha=4)
    randomize(model)
    ids = torch.randint(0, 40, (4, 5))
    tids = torch.tensor([1, 0, 1, 1])
    adapters.set_task(model, tids)
    out = model(ids).last_hidden_state
    loss_b = out[tids == 1].pow(2).sum()                 # the task-b samples' loss, from the mixed batch
    layer = adapters.adapter_layers(model)["encoder.layer.1.attention.self.value"]
    grads = torch.autograd.grad(loss_b, [layer.lora_A, layer.lora_B, layer.shared_A])
    assert grads[0][0].abs().max() == 0 and grads[0][1].abs().max() > 0     # task a's row: no gradient
    adapters.set_task(model, "b")                         # the same samples alone, one task for the batch
    alone = model(ids[tids == 1]).last_hidden_state.pow(2).sum()
    want = torch.autograd.grad(alone, [layer.lora_A, layer.lora_B, layer.shared_A])
    for g, w in zip(grads, want):
        assert torch.allclose(g, w, atol=1e-10)
