"""LoRA adapters as merge inputs and outputs, and LoRA extraction, checked through PEFT on a tiny
random Llama built from a config (no downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from polytask.errors import CheckpointError, ConfigError  # noqa: E402
from polytask.merge import load_state_dict, merge_checkpoints  # noqa: E402
from polytask.merge.lora import extract_lora, merge_adapters  # noqa: E402


def _config(hidden: int = 16) -> "transformers.LlamaConfig":
    return transformers.LlamaConfig(vocab_size=48, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=32, tie_word_embeddings=False)


def _model(seed: int, hidden: int = 16) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(_config(hidden)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _save_adapter(base_dir: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT adapter of the saved base with random (non-zero) A and B."""
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out)
    return out


def _peft_full(base_dir: Path, adapter: Path, out: Path) -> Path:
    """The full model PEFT makes of an adapter (merge_and_unload), saved."""
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = root / "base"
    _model(0).save_pretrained(base)
    a1 = _save_adapter(base, root / "a1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    # rsLoRA, per-module ranks and alphas, an embedding LoRA, other targets
    a2 = _save_adapter(base, root / "a2", 2, r=2, lora_alpha=3, use_rslora=True,
                       target_modules=["q_proj", "o_proj", "embed_tokens", "up_proj"],
                       rank_pattern={"layers.1.self_attn.q_proj": 5}, alpha_pattern={"o_proj": 7})
    cfg2 = json.loads((a2 / "adapter_config.json").read_text())
    assert cfg2["use_rslora"] and cfg2["rank_pattern"]
    f1, f2 = _peft_full(base, a1, root / "f1"), _peft_full(base, a2, root / "f2")
    return {"root": root, "base": base, "a1": a1, "a2": a2, "f1": f1, "f2": f2}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(0, 40, 3).reshape(1, -1) % 48
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = [
    ("task_arithmetic", [{"weight": 0.7}, {"weight": -0.4}], {"lambda_": 0.9}),
    ("ties", [{"weight": 1.0, "density": 0.5}, {"weight": -0.6, "density": 0.7}], {"normalize": False}),
    ("linear", [{"weight": 2.0}, {"weight": 1.0}], {}),
]


@pytest.mark.parametrize("method,per_model,params", CASES, ids=[c[0] for c in CASES])
def test_adapters_merge_like_peft_merged_full_models(setup, tmp_path, method, per_model, params) -> None:
    s = setup
    out_a = merge_checkpoints(method, [s["a1"], s["a2"]], s["base"], tmp_path / "from_adapters",
                              model_params=per_model, method_params=params)
    out_f = merge_checkpoints(method, [s["f1"], s["f2"]], s["base"], tmp_path / "from_full",
                              model_params=per_model, method_params=params)
    got, want = load_state_dict(out_a), load_state_dict(out_f)
    base = load_state_dict(s["base"])
    assert got.keys() == want.keys()
    changed = 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
        changed += int(not torch.equal(got[k], base[k]))
    # the adapters' modules moved: q, v, down (a1), o, up, embed (a2) in both layers
    assert changed >= 11


def test_adapter_merge_from_a_config(setup, tmp_path) -> None:
    from polytask.merge import run_merge

    s = setup
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {s['base']}\nmodels:\n"
                   f"  - model: {s['a1']}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {s['a2']}\n    parameters: {{weight: -1.0}}\n")
    out = run_merge(cfg, tmp_path / "out")
    want = merge_checkpoints("task_arithmetic", [s["f1"], s["f2"]], s["base"], tmp_path / "ref",
                             model_params=[{"weight": 0.5}, {"weight": -1.0}])
    got, ref = load_state_dict(out), load_state_dict(want)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)
    # transformers loads the merged model
    transformers.LlamaForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("method,per_model,params", [CASES[0], CASES[2]], ids=["task_arithmetic", "linear"])
def test_merged_adapter_is_exact_for_linear_methods(setup, tmp_path, method, per_model, params) -> None:
    s = setup
    out, errors = merge_adapters(method, [s["a1"], s["a2"]], s["base"], tmp_path / "ad",
                                 model_params=per_model, method_params=params)
    assert set(errors.values()) == {0.0}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 5  # concatenated: a1's 4 + a2's largest (rank_pattern 5), zero-padded elsewhere
    full = merge_checkpoints(method, [s["f1"], s["f2"]], s["base"], tmp_path / "full",
                             model_params=per_model, method_params=params)
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(s["base"]), out).eval()
    ref = transformers.LlamaForCausalLM.from_pretrained(full).eval()
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=1e-4, atol=1e-4)
    # and the weights PEFT merges equal the full-model merge
    merged = model.merge_and_unload().state_dict()
    want = load_state_dict(full)
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-5, msg=k)


def test_merged_adapter_through_svd_for_ties(setup, tmp_path) -> None:
    s = setup
    method, per_model, params = CASES[1]
    full = load_state_dict(merge_checkpoints(method, [s["f1"], s["f2"]], s["base"], tmp_path / "full",
                                             model_params=per_model, method_params=params))
    base = load_state_dict(s["base"])

    def adapter_weights(rank: int | None, name: str) -> tuple[dict, dict]:
        out, errors = merge_adapters(method, [s["a1"], s["a2"]], s["base"], tmp_path / name,
                                     model_params=per_model, method_params=params, rank=rank)
        model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(s["base"]), out)
        return model.merge_and_unload().state_dict(), errors

    # full rank (16 = min dimension of every target here): exact up to rounding
    exact, errors = adapter_weights(16, "r16")
    assert max(errors.values()) < 1e-5
    for k, v in full.items():
        torch.testing.assert_close(exact[k], v, rtol=0, atol=1e-5, msg=k)
    # rank 2: the reported error is the true relative error of dW
    low, errors = adapter_weights(2, "r2")
    assert min(errors.values()) > 0.05
    for module, err in errors.items():
        k = f"{module}.weight"
        true_dw, got_dw = full[k] - base[k], low[k] - base[k]
        actual = float((got_dw - true_dw).norm() / true_dw.norm())
        assert actual == pytest.approx(err, rel=1e-3, abs=1e-5), module


@pytest.mark.parametrize("method", ["dare_ties", "breadcrumbs_ties"])
def test_merged_adapter_random_and_pruning_methods_at_full_rank(setup, tmp_path, method) -> None:
    """At full rank the SVD path reproduces the full-model merge, DARE's random masks included
    (drawn per tensor from the seed, in the weight's layout, the embedding LoRA's too)."""
    s = setup
    per_model = [{"weight": 1.0, "density": 0.6}, {"weight": -0.5, "density": 0.8}]
    full = load_state_dict(merge_checkpoints(method, [s["f1"], s["f2"]], s["base"], tmp_path / "full",
                                             model_params=per_model, seed=3))
    out, errors = merge_adapters(method, [s["a1"], s["a2"]], s["base"], tmp_path / "ad", model_params=per_model,
                                 rank=48, seed=3)
    assert max(errors.values()) < 1e-5
    got = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(s["base"]), out) \
        .merge_and_unload().state_dict()
    for k, v in full.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)


def test_extract_lora_round_trip(setup, tmp_path) -> None:
    s = setup
    ft = _model(0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n.endswith("proj.weight") and "layers.0" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ft.save_pretrained(tmp_path / "ft")
    want, base = load_state_dict(tmp_path / "ft"), load_state_dict(s["base"])

    out, errors = extract_lora(s["base"], tmp_path / "ft", tmp_path / "full_rank", rank=64)
    assert set(errors) == {n.removesuffix(".weight") for n in want if "layers.0" in n and n.endswith("proj.weight")}
    assert max(errors.values()) < 1e-6
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(s["base"]), out)
    got = model.merge_and_unload().state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)

    out, errors = extract_lora(s["base"], tmp_path / "ft", tmp_path / "r3", rank=3)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    got = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(s["base"]), out) \
        .merge_and_unload().state_dict()
    for module, err in errors.items():
        k = f"{module}.weight"
        actual = float((got[k] - want[k]).norm() / (want[k] - base[k]).norm())
        assert actual == pytest.approx(err, rel=1e-3), module
        assert 0.1 < err < 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polytask.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_extract_lora_cli(setup, tmp_path) -> None:
    s = setup
    r = _cli("extract-lora", str(s["base"]), str(s["f1"]), str(tmp_path / "out"), "--rank", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("layers.1.self_attn.q_proj" in ln and "relative error" in ln for ln in lines)
    # a1 is rank 4: rank 4 recovers it exactly
    errs = [float(ln.rsplit(" ", 1)[1]) for ln in lines if "relative error" in ln]
    assert len(errs) == 6 and max(errs) < 1e-5
    bad = _cli("extract-lora", str(s["base"]), str(s["f1"]), str(tmp_path / "bad"), "--rank", "0")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "rank" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_bad_adapters(setup, tmp_path) -> None:
    s = setup
    # an adapter of another base (hidden 8 instead of 16)
    other = tmp_path / "other_base"
    _model(3, hidden=8).save_pretrained(other)
    wrong = _save_adapter(other, tmp_path / "wrong", 4, r=2, target_modules=["q_proj"])
    with pytest.raises(CheckpointError, match=r"q_proj.*another base"):
        merge_checkpoints("task_arithmetic", [s["a1"], wrong], s["base"], tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    # a module the base lacks
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    from safetensors.torch import load_file, save_file

    t = load_file(s["a1"] / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "qkv_proj"): v for k, v in t.items()}, renamed / "adapter_model.safetensors")
    (renamed / "adapter_config.json").write_text((s["a1"] / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match=r"qkv_proj.*not in base"):
        merge_adapters("ties", [s["a1"], renamed], s["base"], tmp_path / "o2", rank=2)
    assert not (tmp_path / "o2").exists()
    # missing weights file: named
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        merge_checkpoints("task_arithmetic", [empty], s["base"], tmp_path / "o3")
    # an adapter without a base model
    with pytest.raises(ConfigError, match="base_model"):
        merge_checkpoints("linear", [s["a1"], s["f1"]], None, tmp_path / "o4")
    with pytest.raises(ConfigError, match="rank"):
        merge_adapters("ties", [s["a1"]], s["base"], tmp_path / "o5", rank=0)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("o", ".o")) and p.name[-1].isdigit()]
    # through the CLI: one line, exit 2
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {s['base']}\nmodels:\n  - model: {wrong}\n")
    r = _cli("merge", str(cfg), str(tmp_path / "o6"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "q_proj" in r.stderr, r.stderr
    assert not (tmp_path / "o6").exists()


def test_mergekit_model_plus_lora_syntax(setup, tmp_path) -> None:
    """``model+adapter`` in a config (mergekit's syntax), relative to the config's folder, also
    as the base; the adapter may belong to a model other than the merge's base."""
    from polytask.merge import run_merge

    s = setup
    root = s["root"]
    cfg = root / "plus.yaml"
    cfg.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                   "  - model: base+a1\n    parameters: {weight: 0.5}\n"
                   "  - model: f1+a2\n    parameters: {weight: -1.0}\n")
    out = run_merge(cfg, tmp_path / "out")
    f1_a2 = _peft_full(s["f1"], s["a2"], tmp_path / "f1_a2")
    want = load_state_dict(merge_checkpoints("task_arithmetic", [s["f1"], f1_a2], s["base"], tmp_path / "ref",
                                             model_params=[{"weight": 0.5}, {"weight": -1.0}]))
    got = load_state_dict(out)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    assert (out / "config.json").is_file()
    # the base itself written as model+adapter: its config is copied from the model
    cfg.write_text("merge_method: linear\nbase_model: base+a1\nmodels:\n  - model: f2\n  - model: base+a1\n")
    out = run_merge(cfg, tmp_path / "out2")
    assert (out / "config.json").is_file()
    f1, f2 = load_state_dict(s["f1"]), load_state_dict(s["f2"])
    got = load_state_dict(out)
    for k in f1:
        torch.testing.assert_close(got[k], (f1[k] + f2[k]) / 2, rtol=0, atol=1e-6, msg=k)


def test_adapter_missing_config_or_mismatched_rank_is_named(setup, tmp_path) -> None:
    s = setup
    only_weights = tmp_path / "only_weights"
    only_weights.mkdir()
    (only_weights / "adapter_model.safetensors").write_bytes((s["a1"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        merge_checkpoints("task_arithmetic", [only_weights], s["base"], tmp_path / "o1")
    # a config whose r disagrees with the weights (scaling would be wrong): refused, not guessed
    lying = tmp_path / "lying"
    lying.mkdir()
    (lying / "adapter_model.safetensors").write_bytes((s["a1"] / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((s["a1"] / "adapter_config.json").read_text())
    (lying / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(CheckpointError, match=r"rank 4 in the weights but r 8"):
        merge_adapters("task_arithmetic", [lying], s["base"], tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_merge_cli_writes_an_adapter(setup, tmp_path) -> None:
    """``polytask merge CONFIG OUT --adapter``: the adapter stands for the full-model merge of the
    same config (exactly for task arithmetic; at full rank for TIES)."""
    from polytask.merge import run_merge

    s = setup
    for method, extra, rank in (("task_arithmetic", "parameters: {lambda: 0.8}\n", None),
                                ("ties", "parameters: {normalize: false, density: 0.6}\n", 16)):
        cfg = tmp_path / f"{method}.yaml"
        cfg.write_text(f"merge_method: {method}\nbase_model: {s['base']}\n{extra}models:\n"
                       f"  - model: {s['a1']}\n    parameters: {{weight: 0.5}}\n"
                       f"  - model: {s['a2']}\n    parameters: {{weight: -1.0}}\n")
        args = ["merge", str(cfg), str(tmp_path / f"{method}_ad"), "--adapter"]
        r = _cli(*args, *(["--rank", str(rank)] if rank else []))
        assert r.returncode == 0, r.stderr
        assert "merged LoRA adapter" in r.stdout
        full = load_state_dict(run_merge(cfg, tmp_path / f"{method}_full"))
        model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(s["base"]),
                                               tmp_path / f"{method}_ad")
        got = model.merge_and_unload().state_dict()
        for k, v in full.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)
    # a full model among the inputs, or a method that does not merge around the base: one line, exit 2
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"merge_method: ties\nbase_model: {s['base']}\nmodels:\n  - model: {s['a1']}\n"
                   f"  - model: {s['f2']}\n")
    r = _cli("merge", str(cfg), str(tmp_path / "bad_out"), "--adapter")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "f2" in r.stderr, r.stderr
    cfg.write_text(f"merge_method: slerp\nbase_model: {s['base']}\nparameters: {{t: 0.5}}\nmodels:\n"
                   f"  - model: {s['a1']}\n  - model: {s['a2']}\n")
    r = _cli("merge", str(cfg), str(tmp_path / "bad_out"), "--adapter")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "slerp" in r.stderr, r.stderr
    assert not (tmp_path / "bad_out").exists()


def test_knots(setup, tmp_path) -> None:
    """KnOTS: task arithmetic in the aligned basis is plain task arithmetic; TIES on the aligned
    V_i is what a by-hand construction gives, and differs from TIES on dW."""
    from polytask.merge import merge_state_dicts

    s = setup
    per_model = [{"weight": 0.7, "density": 0.5}, {"weight": -0.4, "density": 0.5}]
    base = load_state_dict(s["base"])

    ta_weights = [{"weight": 0.7}, {"weight": -0.4}]

    def weights(method: str, knots: bool, name: str) -> dict:
        out, errors = merge_adapters(method, [s["a1"], s["a2"]], s["base"], tmp_path / name,
                                     model_params=per_model if method == "ties" else ta_weights,
                                     method_params={"normalize": False} if method == "ties" else None, knots=knots)
        assert set(errors.values()) == {0.0} or not knots
        return peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(s["base"]), out) \
            .merge_and_unload().state_dict()

    plain, aligned = weights("task_arithmetic", False, "ta"), weights("task_arithmetic", True, "ta_k")
    for k, v in plain.items():
        torch.testing.assert_close(aligned[k], v, rtol=0, atol=1e-5, msg=k)

    ties_k = weights("ties", True, "ties_k")
    # by hand for one module both adapters target: q_proj of layer 1 (a2 has rank 5 there)
    from safetensors.torch import load_file

    a1w, a2w = load_file(s["a1"] / "adapter_model.safetensors"), load_file(s["a2"] / "adapter_model.safetensors")
    mod = "base_model.model.model.layers.1.self_attn.q_proj"
    d1 = a1w[f"{mod}.lora_B.weight"] @ a1w[f"{mod}.lora_A.weight"] * (8 / 4)
    d2 = a2w[f"{mod}.lora_B.weight"] @ a2w[f"{mod}.lora_A.weight"] * (3 / 5 ** 0.5)
    u, sv, vh = torch.linalg.svd(torch.cat([d1, d2], 1).double(), full_matrices=False)
    k = 9
    v1, v2 = vh[:k, :16].float(), vh[:k, 16:].float()
    mv = merge_state_dicts("ties", [{"v": v1}, {"v": v2}], {"v": torch.zeros_like(v1)}, model_params=per_model,
                           normalize=False)["v"]
    want = (u[:, :k] * sv[:k]).float() @ mv
    got = ties_k["model.layers.1.self_attn.q_proj.weight"] - base["model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    plain_ties = weights("ties", False, "ties")
    assert not torch.allclose(plain_ties["model.layers.1.self_attn.q_proj.weight"],
                              ties_k["model.layers.1.self_attn.q_proj.weight"], atol=1e-3)


def test_adapter_with_modules_to_save(setup, tmp_path) -> None:
    """A trained saved module (modules_to_save: lm_head) replaces the base's tensor in the full-model
    merge, as PEFT's merge_and_unload does; adapter output refuses it (it is not a LoRA)."""
    s = setup
    a3 = _save_adapter(s["base"], tmp_path / "a3", 7, r=2, target_modules=["k_proj"], modules_to_save=["lm_head"])
    f3 = _peft_full(s["base"], a3, tmp_path / "f3")
    assert not torch.equal(load_state_dict(f3)["lm_head.weight"], load_state_dict(s["base"])["lm_head.weight"])
    per_model = [{"weight": 0.6}, {"weight": -0.3}]
    got = load_state_dict(merge_checkpoints("task_arithmetic", [s["a1"], a3], s["base"], tmp_path / "m1",
                                            model_params=per_model))
    want = load_state_dict(merge_checkpoints("task_arithmetic", [s["f1"], f3], s["base"], tmp_path / "m2",
                                             model_params=per_model))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    with pytest.raises(ConfigError, match="lm_head"):
        merge_adapters("task_arithmetic", [s["a1"], a3], s["base"], tmp_path / "m3")
    assert not (tmp_path / "m3").exists()
