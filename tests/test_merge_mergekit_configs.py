"""mergekit YAML configs run unchanged: dtype as the compute dtype, slices, per-layer gradients,
filters, passthrough and the methods of mergekit 0.1.5, each compared bit for bit with mergekit
itself on small Llama-shaped checkpoints written here (mergekit is skipped inside each test)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from polytask.cli import main
from polytask.errors import ConfigError
from polytask.merge import load_state_dict, merge_state_dicts, run_merge
from polytask.merge.plan import evaluate_setting, layer_structure

N_LAYERS = 6


def _llama(path: Path, seed: int, dtype: torch.dtype, base: dict | None = None, n_layers: int = N_LAYERS,
           scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A Llama-shaped checkpoint (hidden 16, 2 heads) with a config.json mergekit recognises."""
    g = torch.Generator().manual_seed(seed)
    h, inter, vocab = 16, 32, 48
    sd: dict[str, torch.Tensor] = {}

    def add(name: str, *shape: int) -> None:
        v = torch.randn(*shape, generator=g)
        sd[name] = (v if base is None else base[name].float() + scale * v).to(dtype)

    add("model.embed_tokens.weight", vocab, h)
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        add(pre + "input_layernorm.weight", h)
        add(pre + "post_attention_layernorm.weight", h)
        for n in "qkvo":
            add(pre + f"self_attn.{n}_proj.weight", h, h)
        add(pre + "mlp.gate_proj.weight", inter, h)
        add(pre + "mlp.up_proj.weight", inter, h)
        add(pre + "mlp.down_proj.weight", h, inter)
    add("model.norm.weight", h)
    add("lm_head.weight", vocab, h)
    path.mkdir(parents=True)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": n_layers, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "torch_dtype": str(dtype).removeprefix("torch."), "tie_word_embeddings": False}))
    return sd


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["f32-ckpts", "bf16-ckpts"])
def llamas(request, tmp_path: Path) -> Path:
    """base, a, b, c: a base and three fine-tunes (a, b, c) in tmp_path."""
    base = _llama(tmp_path / "base", 0, request.param)
    for i, name in enumerate("abc"):
        _llama(tmp_path / name, i + 1, request.param, base=base)
    return tmp_path


def _mergekit(text: str, folder: Path, out: Path, monkeypatch) -> dict[str, torch.Tensor]:
    """Run mergekit itself on the config ``text`` (model paths relative to ``folder``)."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # absolute paths: mergekit caches loaders by model name across runs
    text = re.sub(r"(model: )(\w+)", lambda m: m.group(1) + str(folder / m.group(2)), text)
    mergekit_run(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
                 MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False, random_seed=0))
    return load_state_dict(out)


def _ours(text: str, folder: Path, out: Path) -> dict[str, torch.Tensor]:
    cfg = folder / f"{out.name}.yaml"
    cfg.write_text(text)
    return load_state_dict(run_merge(cfg, out))


def _assert_same_bits(theirs: dict, ours: dict) -> None:
    assert theirs.keys() == ours.keys()
    bad = [k for k in theirs if theirs[k].dtype != ours[k].dtype or not torch.equal(theirs[k], ours[k])]
    assert not bad, f"{len(bad)} of {len(theirs)} tensors differ, e.g. {bad[:3]}"


# -- the same bits as mergekit ------------------------------------------------------------------
LAZY_SLERP = """
slices:
  - sources:
      - model: a
        layer_range: [0, 6]
      - model: b
        layer_range: [0, 6]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""

CONFIGS = {
    # LazyMergekit's SLERP template, verbatim but for the model names
    "lazymergekit_slerp": LAZY_SLERP,
    "ties_bf16": """
merge_method: ties
base_model: base
models:
  - model: base
  - model: a
    parameters: {weight: 1.0, density: 0.5}
  - model: b
    parameters: {weight: 0.5, density: 0.7}
  - model: c
    parameters: {weight: 0.3, density: 0.3}
parameters: {normalize: true, int8_mask: true}
dtype: bfloat16
""",
    "ties_gradient_density_fp16": """
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: 1.0
      density: [0.2, 0.9, 0.5]
  - model: b
    parameters:
      weight: [0.3, 1.0]
      density:
        - filter: self_attn
          value: 0.4
        - value: 0.8
parameters: {lambda: 0.8}
dtype: float16
""",
    "task_arithmetic_slices_fp16": """
slices:
  - sources:
      - model: base
        layer_range: [0, 6]
      - model: a
        layer_range: [0, 6]
        parameters:
          weight: [0.2, 0.9, 0.4]
      - model: b
        layer_range: [0, 6]
        parameters:
          weight:
            - filter: mlp
              value: [1.0, 0.3]
            - value: 0.7
merge_method: task_arithmetic
base_model: base
parameters:
  lambda: 0.9
dtype: float16
""",
    "linear_gradient_bf16": """
models:
  - model: a
    parameters: {weight: [0.3, 0.8]}
  - model: b
    parameters: {weight: 0.6}
merge_method: linear
dtype: bfloat16
""",
    "linear_slices": """
slices:
  - sources:
      - model: a
        layer_range: [0, 3]
      - model: b
        layer_range: [3, 6]
    parameters:
      weight: 0.5
merge_method: linear
dtype: bfloat16
""",
    "frankenmerge_passthrough": """
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
  - sources:
      - model: b
        layer_range: [2, 6]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - filter: down_proj
              value: [0.0, 1.0]
            - value: 1.0
merge_method: passthrough
dtype: bfloat16
""",
    "breadcrumbs_ties_bf16": """
merge_method: breadcrumbs_ties
base_model: base
models:
  - model: a
    parameters: {weight: 1.0, density: 0.6, gamma: 0.05}
  - model: b
    parameters: {weight: 0.7, density: 0.5, gamma: 0.1}
dtype: bfloat16
""",
    "slice_bases": """
slices:
  - sources:
      - {model: base, layer_range: [0, 3]}
      - {model: a, layer_range: [0, 3]}
  - sources:
      - {model: a, layer_range: [3, 6]}
      - {model: b, layer_range: [3, 6], parameters: {weight: [1.0, 0.2]}}
    base_model: a
merge_method: task_arithmetic
base_model: base
parameters: {weight: 0.5}
dtype: bfloat16
""",
    "no_dtype": """
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: 0.7}
  - model: b
    parameters: {weight: 0.4}
""",
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_bits_as_mergekit(llamas, name, tmp_path, monkeypatch):
    text = CONFIGS[name]
    ours = _ours(text, llamas, tmp_path / "ours")
    theirs = _mergekit(text, llamas, tmp_path / "theirs", monkeypatch)
    _assert_same_bits(theirs, ours)
    # dtype is the compute and output dtype; without it, the checkpoints' dtype
    written = yaml.safe_load(text).get("dtype")
    ckpt_dtype = load_state_dict(llamas / "a")["lm_head.weight"].dtype
    assert {t.dtype for t in ours.values()} == {getattr(torch, written) if written else ckpt_dtype}


def test_frankenmerge_layers_and_config(llamas, tmp_path):
    out = run_merge(_write(llamas, "f.yaml", CONFIGS["frankenmerge_passthrough"]), tmp_path / "out")
    got = load_state_dict(out)
    a, b = load_state_dict(llamas / "a"), load_state_dict(llamas / "b")
    # 4 layers of a, then b's layers 2..5 as output layers 4..7: 8 layers
    assert layer_structure(list(got), "out").num_layers == 8
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 8
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"].bfloat16())
    assert torch.equal(got["model.layers.5.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"].bfloat16())
    # o_proj times 0.5; down_proj's gradient [0, 1] over the slice's 4 layers: t = 1/3 at its 2nd layer
    o = b["model.layers.2.self_attn.o_proj.weight"].bfloat16()
    assert torch.equal(got["model.layers.4.self_attn.o_proj.weight"], o * 0.5)
    d = b["model.layers.3.mlp.down_proj.weight"].bfloat16()
    assert torch.equal(got["model.layers.5.mlp.down_proj.weight"], d * (1 / 3))
    assert torch.equal(got["model.layers.4.mlp.down_proj.weight"], torch.zeros_like(d))
    # embeddings from the first slice's model, final norm and head from the last slice's
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"].bfloat16())


def test_compute_dtype_float32_is_an_explicit_option(llamas, tmp_path):
    if load_state_dict(llamas / "a")["lm_head.weight"].dtype != torch.float32:
        pytest.skip("float32 checkpoints show the difference")
    body = CONFIGS["ties_bf16"]
    bf16 = _ours(body, llamas, tmp_path / "bf16")
    f32 = _ours(body + "compute_dtype: float32\n", llamas, tmp_path / "f32")
    names = ["base", "a", "b", "c"]
    sds = {n: load_state_dict(llamas / n) for n in names}
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.7}, {"weight": 0.3, "density": 0.3}]
    for compute, got in (("float32", f32), ("bfloat16", bf16)):
        expected = merge_state_dicts("ties", [sds[n] for n in "abc"], sds["base"], model_params=params,
                                     dtype="bfloat16", compute_dtype=compute)
        _assert_same_bits(expected, got)
    assert all(t.dtype == torch.bfloat16 for t in f32.values())
    # auto: the checkpoints' dtype (float32 here), so the same as float32
    _assert_same_bits(f32, _ours(body + "compute_dtype: auto\n", llamas, tmp_path / "auto"))
    # the two computations differ (bf16 arithmetic rounds the inputs and every step)
    assert sum(int((f32[k] != bf16[k]).sum()) for k in f32) > 100


# -- gradients and filters, by hand -------------------------------------------------------------
def test_gradient_interpolation_by_hand():
    grad = [0, 0.5, 0.3, 0.7, 1]
    # 6 layers: t = i/5; scaled = t * 4 = 0, 0.8, 1.6, 2.4, 3.2, 4
    # layer 1: 0.2*0 + 0.8*0.5 = 0.4; layer 2: 0.4*0.5 + 0.6*0.3 = 0.38; layer 3: 0.6*0.3 + 0.4*0.7 = 0.46
    # layer 4: 0.8*0.7 + 0.2*1 = 0.76
    expected = [0.0, 0.4, 0.38, 0.46, 0.76, 1.0]
    got = [evaluate_setting("parameters.t", grad, "x", i / 5) for i in range(6)]
    assert got == pytest.approx(expected, abs=1e-12)
    conds = [{"filter": "self_attn", "value": grad}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    assert evaluate_setting("p", conds, "model.layers.0.self_attn.q_proj.weight", 0.2) == pytest.approx(0.4)
    assert evaluate_setting("p", conds, "model.layers.0.mlp.up_proj.weight", 0.2) == 0.9
    assert evaluate_setting("p", conds, "model.norm.weight", 0.2) == 0.5
    # no match: None, so the next scope (or the default) decides
    assert evaluate_setting("p", conds[:2], "model.norm.weight", 0.2) is None
    # non-numbers are picked, not interpolated; "1e-3" (a YAML 1.1 string) is a number
    assert evaluate_setting("p", ["sum", "count"], "x", 0.6) == "sum"
    assert evaluate_setting("p", ["1e-3", 1.0], "x", 0.5) == pytest.approx(0.5005)


def test_scopes_source_then_slice_then_top(llamas, tmp_path):
    text = """
slices:
  - sources:
      - model: base
        layer_range: [0, 6]
      - model: a
        layer_range: [0, 6]
        parameters: {weight: 0.25}
      - model: b
        layer_range: [0, 6]
    parameters:
      weight:
        - filter: mlp
          value: 0.5
parameters:
  weight: 2.0
merge_method: task_arithmetic
base_model: base
dtype: float32
"""
    got = _ours(text, llamas, tmp_path / "out")
    base, a, b = (load_state_dict(llamas / n) for n in ("base", "a", "b"))
    for name, wb in (("model.layers.2.mlp.up_proj.weight", 0.5), ("model.layers.2.self_attn.q_proj.weight", 2.0)):
        # a: its own 0.25 everywhere; b: the slice's 0.5 on mlp, else the top-level 2.0
        want = base[name].float() + (0.25 * (a[name].float() - base[name].float())
                                     + wb * (b[name].float() - base[name].float()))
        assert torch.allclose(got[name], want, atol=1e-5), name


# -- bad input: one line naming key and model, exit 2, no output --------------------------------
def _write(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.write_text(text)
    return p


def _cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["polytask", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code or 0, captured.out, captured.err


BAD = {
    "range_outside": (LAZY_SLERP.replace("[0, 6]\n      - model: b", "[0, 7]\n      - model: b"),
                      ["slices[0].sources[0].layer_range", "model a", "6 layers"]),
    "range_empty": (LAZY_SLERP.replace("[0, 6]", "[3, 3]"), ["layer_range", "[3, 3]"]),
    "lengths_differ": (LAZY_SLERP.replace("[0, 6]\n      - model: b\n        layer_range: [0, 6]",
                                          "[0, 6]\n      - model: b\n        layer_range: [0, 5]"),
                       ["slices[0].sources", "same number of layers"]),
    "gradient_too_long": (CONFIGS["linear_slices"].replace("weight: 0.5", "weight: [0.1, 0.2, 0.3, 0.4]"),
                          ["slices[0].parameters.weight", "4 values", "3 layer(s)", "model a"]),
    "gradient_empty": (CONFIGS["no_dtype"].replace("{weight: 0.4}", "{weight: []}"),
                       ["parameters.weight", "empty list"]),
    "base_not_a_source": (LAZY_SLERP.replace("base_model: a", "base_model: c"),
                          ["slices[0]", "base_model", "not one of its sources"]),
    "gradient_value_out_of_range": (CONFIGS["ties_bf16"].replace("density: 0.7", "density: [0.7, 1.5]"),
                                    ["model b", "parameters.density", "must be in (0, 1]", "got 1.5"]),
    "gradient_value_out_of_range_top": (CONFIGS["linear_slices"].replace("weight: 0.5", "weight: [0.5, .inf]"),
                                        ["slices[0].parameters.weight", "finite", "got inf"]),
    "required_parameter_missing": ("merge_method: nearswap\nbase_model: a\nmodels: [{model: a}, {model: b}]\n",
                                   ["parameters.t", "needs this parameter"]),
    "nonfinite_output": (CONFIGS["frankenmerge_passthrough"].replace("value: 0.5", "value: 1.0e+6").replace(
        "bfloat16", "float16"), ["model.layers.4.self_attn.o_proj.weight", "NaN or infinite"]),
    "bad_compute_dtype": (CONFIGS["ties_bf16"] + "compute_dtype: float8\n", ["compute_dtype", "float8"]),
    "unknown_per_model_key": (CONFIGS["ties_bf16"].replace("density: 0.7", "densty: 0.7"),
                              ["model b", "densty"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_no_output(llamas, case, capsys, monkeypatch):
    text, must_say = BAD[case]
    cfg = _write(llamas, "bad.yaml", text)
    code, out, err = _cli(["merge", cfg, llamas / "out"], capsys, monkeypatch)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for words in must_say:
        assert words in err, (words, err)
    assert not (llamas / "out").exists()
    assert not [p for p in os.listdir(llamas) if p.startswith(".out")]


def test_filter_matching_nothing_is_named_in_a_warning(llamas, capsys, monkeypatch):
    text = LAZY_SLERP.replace("filter: self_attn", "filter: self_atn")
    code, out, err = _cli(["merge", _write(llamas, "w.yaml", text), llamas / "out"], capsys, monkeypatch)
    assert code == 0, err
    assert "parameters.t" in err and "'self_atn' matches no tensor" in err
    # and the tensors it meant fall through to the next condition (mlp's or the plain 0.5)
    got = load_state_dict(llamas / "out")
    a, b = load_state_dict(llamas / "a"), load_state_dict(llamas / "b")
    name = "model.layers.0.self_attn.q_proj.weight"
    from polytask.merge.methods import slerp

    want = slerp(0.5, a[name].bfloat16().float(), b[name].bfloat16().float()).bfloat16()
    assert torch.equal(got[name], want)


def test_per_model_global_key_is_ignored_with_a_warning(llamas, tmp_path):
    text = CONFIGS["ties_bf16"].replace("{weight: 1.0, density: 0.5}", "{weight: 1.0, density: 0.5, lambda: 3.0}")
    with pytest.warns(RuntimeWarning, match=r"models\[1\].parameters.lambda"):
        got = _ours(text, llamas, tmp_path / "out")
    _assert_same_bits(_ours(CONFIGS["ties_bf16"], llamas, tmp_path / "plain"), got)


def test_layer_structure_refuses_mixed_stacks():
    with pytest.raises(Exception, match="several prefixes"):
        layer_structure(["model.layers.0.w", "encoder.layers.0.w"], "m")
    s = layer_structure(["transformer.h.0.attn.w", "transformer.h.1.attn.w", "wte.weight"], "gpt2")
    assert s.num_layers == 2 and s.prefix == "transformer.h." and s.others == ["wte.weight"]
    with pytest.raises(ConfigError, match="empty list"):
        evaluate_setting("parameters.t", [], "x", 0.0)


# -- the methods of mergekit 0.1.5 that polytask lacked -----------------------------------------
def _trio(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, 16, generator=g)
    models = [base + 0.1 * torch.randn(24, 16, generator=g) for _ in range(3)]
    return base.to(dtype), [m.to(dtype) for m in models]


W3 = [0.3, 0.9, 0.5]
# (name, models, with base, mergekit parameters, our global parameters, our per-model weights)
METHOD_CASES = [
    ("nearswap", 1, True, {"t": 0.05}, {"t": 0.05}, None),
    ("sce", 3, True, {"select_topk": 0.5}, {"select_topk": 0.5}, None),
    ("sce", 3, True, {}, {}, None),
    ("arcee_fusion", 1, True, {}, {}, None),
    ("ram", 3, True, {"epsilon": 0.05}, {"epsilon": 0.05}, None),
    ("ramplus_tl", 3, True, {"epsilon": 0.05, "r": 0.5, "alpha": 0.3}, {"epsilon": 0.05, "r": 0.5, "alpha": 0.3}, None),
    ("karcher", 3, False, {}, {}, None),
    ("karcher", 2, False, {"max_iter": 2}, {"max_iter": 2}, None),
    ("nuslerp", 2, True, {"weight": W3[:2]}, {}, W3[:2]),
    ("nuslerp", 2, False, {"weight": W3[:2], "nuslerp_flatten": False, "nuslerp_row_wise": True},
     {"nuslerp_flatten": False, "nuslerp_row_wise": True}, W3[:2]),
    ("multislerp", 3, True, {"weight": W3}, {}, W3),
    ("multislerp", 3, False, {"weight": W3, "normalize_weights": False}, {"normalize_weights": False}, W3),
    ("ties", 3, True, {"weight": [1.0, 0.5, 0.7], "density": [0.3, 0.5, 1.0], "rescale": True}, {"rescale": True},
     None),
    ("breadcrumbs_ties", 3, True, {"weight": [1.0, 0.5, 0.7], "density": [0.3, 0.5, 0.9], "gamma": 0.05,
                                    "rescale": True}, {"rescale": True}, None),
    ("model_stock", 3, True, {}, {}, None),
    ("model_stock", 2, True, {"filter_wise": True}, {"filter_wise": True}, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", METHOD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(METHOD_CASES)])
def test_new_methods_same_bits_as_mergekit(case, dtype):
    api = pytest.importorskip("mergekit.merge_methods.api")
    name, n, with_base, theirs_params, ours_params, weights = case
    base, models = _trio(dtype)
    models = models[:n]
    if with_base:
        theirs = api.merge_tensors([base, *models], name, parameters=theirs_params, base_index=0)
    else:
        theirs = api.merge_tensors(models, name, parameters=theirs_params)
    if name in ("ties", "breadcrumbs_ties"):
        per_model = [{k: (v[i] if isinstance(v, list) else v) for k, v in theirs_params.items() if k != "rescale"}
                     for i in range(n)]
    else:
        per_model = [{"weight": w} for w in weights] if weights else None
    ours = merge_state_dicts(name, [{"w": m} for m in models], {"w": base} if with_base else None, dtype=dtype,
                             compute_dtype=dtype, model_params=per_model, **ours_params)["w"]
    # mergekit returns float32 from arcee_fusion/ramplus_tl on bf16 inputs; its values are bf16's
    assert torch.equal(theirs.to(dtype), ours)
    assert not torch.equal(ours, base)


DELLA_CONFIGS = {
    "sce_config": """
merge_method: sce
base_model: base
models: [{model: a}, {model: b}, {model: c}]
parameters: {select_topk: 0.6}
dtype: bfloat16
""",
    "nuslerp_slices": """
slices:
  - sources:
      - {model: a, layer_range: [0, 6], parameters: {weight: [0.2, 0.8]}}
      - {model: b, layer_range: [0, 6], parameters: {weight: 0.5}}
merge_method: nuslerp
dtype: bfloat16
""",
    "multislerp_base": """
merge_method: multislerp
base_model: base
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: b, parameters: {weight: 0.3}}
  - {model: c, parameters: {weight: 0.2}}
dtype: bfloat16
""",
    "nearswap": """
merge_method: nearswap
base_model: a
models: [{model: a}, {model: b}]
parameters: {t: [0.001, 0.1]}
dtype: float32
""",
    "karcher_with_base": """
merge_method: karcher
base_model: base
models: [{model: a}, {model: b}]
parameters: {max_iter: 5}
dtype: bfloat16
""",
    "linear_with_base": """
merge_method: linear
base_model: base
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: b, parameters: {weight: 0.25}}
parameters: {weight: 2.0}
dtype: float32
""",
    "ram_karcher_like": """
merge_method: ramplus_tl
base_model: base
models: [{model: a}, {model: b}]
parameters: {epsilon: 0.02, r: 0.5}
dtype: float32
""",
}


@pytest.mark.parametrize("name", list(DELLA_CONFIGS))
def test_new_method_configs_same_bits_as_mergekit(llamas, name, tmp_path, monkeypatch):
    text = DELLA_CONFIGS[name]
    ours = _ours(text, llamas, tmp_path / "ours")
    theirs = _mergekit(text, llamas, tmp_path / "theirs", monkeypatch)
    theirs = {k: v.to(ours[k].dtype) for k, v in theirs.items()}  # ramplus_tl: float32 there
    _assert_same_bits(theirs, ours)


def test_della_matches_mergekit_in_distribution():
    api = pytest.importorskip("mergekit.merge_methods.api")
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(200, 500)
    models = [torch.randn(200, 500, generator=g) for _ in range(2)]
    for name in ("della_linear", "della"):
        torch.manual_seed(0)
        theirs = api.merge_tensors([base, *models], name, base_index=0,
                                   parameters={"weight": 1.0, "density": 0.3, "epsilon": 0.1})
        ours = merge_state_dicts(name, [{"w": m} for m in models], {"w": base}, rescale="l1",
                                 model_params=[{"density": 0.3, "epsilon": 0.1}] * 2)["w"]
        # kept by one model or both: 1 - 0.7^2; L1 mass; and MagPrune favours large entries
        for x in (theirs, ours):
            assert abs((x != 0).float().mean().item() - 0.51) < 0.01
        assert abs(theirs.abs().sum().item() / ours.abs().sum().item() - 1) < 0.02
        kept = [models[0][x != 0].abs().mean().item() for x in (theirs, ours)]
        assert abs(kept[0] - kept[1]) < 0.02 and kept[1] > models[0].abs().mean().item() + 0.02


def test_della_magprune_by_hand():
    from polytask.merge.methods import della_drop

    # one row [1, -2, 3]: ranks 0, 1, 2 of 2 -> p = 0.5 - 0.2 + 0.4 * (0, 0.5, 1) = 0.3, 0.5, 0.7
    tau = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([della_drop(tau.clone().unsqueeze(0), torch.tensor([0.5], dtype=torch.float64),
                                    torch.tensor([0.2], dtype=torch.float64), True, g)[0, 0]
                         for _ in range(20000)])
    kept = (draws != 0).double().mean(dim=0)
    assert torch.allclose(kept, torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64), atol=0.015)
    # each kept entry is divided by its p: unbiased
    assert torch.allclose(draws.mean(dim=0), tau[0], atol=0.06)
    assert set(draws[:, 0].unique().tolist()) == {0.0, 1 / 0.3}
    with pytest.raises(ConfigError, match="parameters.epsilon"):
        merge_state_dicts("della", [{"w": tau}], {"w": tau * 0}, model_params=[{"density": 0.9, "epsilon": 0.15}])


def test_selection_methods_by_hand():
    base = torch.zeros(2)
    # nearswap, t = 0.1: |diff| 0.01 -> w = 1 (swap in); 0.5 -> w = 0.2 -> 0.1
    out = merge_state_dicts("nearswap", [{"w": torch.tensor([0.01, 0.5])}], {"w": base}, t=0.1)["w"]
    assert torch.allclose(out, torch.tensor([0.01, 0.1]))
    # RAM: entry 0 changed by both (mean 1), entry 1 by one model only (kept whole, 2)
    out = merge_state_dicts("ram", [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 2.0])}], {"w": base})["w"]
    assert torch.equal(out, torch.tensor([1.0, 2.0]))
    # passthrough: one model, times scale
    out = merge_state_dicts("passthrough", [{"w": torch.tensor([1.0, -2.0])}], model_params=[{"scale": 0.5}])["w"]
    assert torch.equal(out, torch.tensor([0.5, -1.0]))
    # Karcher of two orthogonal unit vectors: the midpoint direction, mean norm 1
    out = merge_state_dicts("karcher", [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}])["w"]
    assert torch.allclose(out, torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]), atol=1e-6)


def test_every_mergekit_method_is_registered_with_its_paper():
    from polytask.merge import MERGE_METHODS

    names = ["linear", "slerp", "nuslerp", "multislerp", "passthrough", "model_stock", "arcee_fusion", "karcher",
             "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
             "della_linear", "sce", "nearswap", "ram", "ramplus_tl"]
    mk = pytest.importorskip("mergekit.merge_methods")
    assert {m.spec.name for m in mk.registered_methods()} <= set(names)
    for name in names:
        doc = MERGE_METHODS.lookup(name).__doc__
        assert "mergekit:" in doc, name


# -- keys mergekit accepts; every bad key at once -----------------------------------------------
def test_keys_mergekit_accepts(llamas, tmp_path, monkeypatch):
    text = """
name: my-merge
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: 0.7}
  - model: b
    parameters: {weight: 0.4}
parameters: {rescale: false, int8_mask: true, normalize: false}
dtype: bfloat16
"""
    _assert_same_bits(_mergekit(text, llamas, tmp_path / "theirs", monkeypatch), _ours(text, llamas, tmp_path / "ours"))


def test_every_bad_key_named_at_once(llamas, capsys, monkeypatch):
    text = CONFIGS["ties_bf16"].replace("density: 0.7", "densty: 0.7").replace(
        "{normalize: true, int8_mask: true}", "{normalise: true, lambda: 1, int8_mask: true, lamda: 2}")
    code, out, err = _cli(["merge", _write(llamas, "k.yaml", text), llamas / "out"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    for words in ("3 unknown parameters", "parameters.normalise", "did you mean normalize", "parameters.lamda",
                  "did you mean lambda", "model b", "'densty'"):
        assert words in err, (words, err)
    assert "lambda_" not in err  # user key names only
    text = CONFIGS["ties_bf16"].replace("merge_method: ties", "merge_methd: ties\ntokenizer_sourc: base").replace(
        "    parameters: {weight: 0.5, density: 0.7}", "    paramters: {weight: 0.5, density: 0.7}")
    code, out, err = _cli(["merge", _write(llamas, "k2.yaml", text), llamas / "out"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    text = text.replace("dtype: bfloat16", "dtype: bfloat16\nchat_template: chatml")
    code, out, err = _cli(["merge", _write(llamas, "k2.yaml", text), llamas / "out"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    for words in ("unknown keys", "merge_methd", "tokenizer_sourc", "models[2].paramters", "merge_method: Field required"):
        assert words in err, (words, err)
    assert not (llamas / "out").exists()


MULTI = """
name: ab
merge_method: ties
base_model: base
models:
  - {model: a, parameters: {weight: 1.0, density: 0.5}}
  - {model: b, parameters: {weight: 0.6, density: 0.5}}
dtype: bfloat16
---
merge_method: slerp
base_model: ab
models: [{model: ab}, {model: c}]
parameters:
  t: [0.2, 0.8]
dtype: bfloat16
"""


def test_multi_document_config_runs_as_mergekit_multi(llamas, tmp_path, monkeypatch, capsys):
    # mergekit, document by document, the name replaced by the first merge's folder
    first, second = MULTI.split("---")
    _mergekit(first, llamas, llamas / "ab_mk", monkeypatch)
    theirs = _mergekit(second.replace("ab", "ab_mk"), llamas, tmp_path / "theirs", monkeypatch)
    code, out, err = _cli(["merge", _write(llamas, "multi.yaml", MULTI), tmp_path / "final"], capsys, monkeypatch)
    assert code == 0, err
    _assert_same_bits(theirs, load_state_dict(tmp_path / "final"))
    assert (tmp_path / "final.parts" / "ab" / "model.safetensors").is_file()
    # the named merge is kept when it exists (mergekit-multi --lazy): a second run only writes the final
    stamp = (tmp_path / "final.parts" / "ab" / "model.safetensors").stat().st_mtime_ns
    code, out, err = _cli(["merge", llamas / "multi.yaml", tmp_path / "final2", "-I", tmp_path / "final.parts"],
                          capsys, monkeypatch)
    assert code == 0, err
    assert (tmp_path / "final.parts" / "ab" / "model.safetensors").stat().st_mtime_ns == stamp
    _assert_same_bits(theirs, load_state_dict(tmp_path / "final2"))


@pytest.mark.parametrize(("text", "must_say"), [
    (MULTI.replace("name: ab", "merge_methd: x\nname: ab").replace("t: [0.2, 0.8]", "t: [0.2, 0.8]\nbogus: 1"),
     ["document 1: unknown key merge_methd", "document 2: unknown key bogus"]),
    (MULTI.replace("name: ab\n", ""), ["documents 1, 2 have no name"]),
    (MULTI.replace("merge_method: slerp", "name: cd\nmerge_method: slerp").replace("base_model: base", "base_model: cd"),
     ["loop", "ab -> cd -> ab"]),
])
def test_multi_document_errors(llamas, tmp_path, capsys, monkeypatch, text, must_say):
    code, out, err = _cli(["merge", _write(llamas, "m.yaml", text), tmp_path / "final"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    for words in must_say:
        assert words in err, (words, err)
    assert sorted(os.listdir(tmp_path)) == sorted(p for p in os.listdir(tmp_path) if not p.startswith("final"))


# -- mergekit's repository examples (examples/*.yml), model names and layer ranges rewritten -----
# orca_mini_v3_13b -> a, Platypus2-13B -> b, WizardLM/WizardMath -> c, Llama-2-13B / Mistral-7B -> base;
# 40 layers -> 6 (orcamini-platy-44layer: [0, 24] + [20, 40] -> [0, 4] + [2, 6])
REPO_EXAMPLES = {
    "gradient-slerp.yml": LAZY_SLERP.replace("bfloat16", "float16").replace("filter:", "pattern:"),
    "orcamini-platy-44layer.yml": """
slices:
  - sources:
    - model: a
      layer_range: [0, 4]
  - sources:
    - model: b
      layer_range: [2, 6]
merge_method: passthrough
dtype: float16
""",
    "linear.yml": """
models:
  - model: a
    parameters:
      weight: 1.0
  - model: c
    parameters:
      weight: 0.3
  - model: b
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "bio-merge.yml": """
models:
  - model: a
    parameters:
      density: 0.5
      weight: 0.5
  - model: b
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: base
parameters:
  normalize: false
  int8_mask: true
dtype: float16""",
}

MEGA = """
slices:
  - sources:
      - model: a
        layer_range: [0, 6]
      - model: b
        layer_range: [0, 6]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
out_path: ./models/gradient-slerp
---
models:
  - model: ./models/gradient-slerp
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: c
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
out_path: ./models/gradient-slerp-ties
"""


@pytest.mark.parametrize("name", list(REPO_EXAMPLES))
def test_mergekit_repository_examples(llamas, name, tmp_path, monkeypatch):
    text = REPO_EXAMPLES[name]
    if "pattern:" in text:
        # the example still says pattern:, which mergekit 0.1.5 ignores; polytask reads it as filter: and says so
        with pytest.warns(RuntimeWarning, match="'pattern: self_attn' is read as 'filter: self_attn'"):
            ours = _ours(text, llamas, tmp_path / "ours")
        text = text.replace("pattern:", "filter:")
    else:
        ours = _ours(text, llamas, tmp_path / "ours")
    _assert_same_bits(_mergekit(text, llamas, tmp_path / "theirs", monkeypatch), ours)


def test_mergekit_mega_example(llamas, tmp_path, monkeypatch, capsys):
    first, second = MEGA.split("---")
    _mergekit(first, llamas, tmp_path / "gs", monkeypatch)
    theirs = _mergekit(second.replace("./models/gradient-slerp", str(tmp_path / "gs")), llamas,
                       tmp_path / "theirs", monkeypatch)
    code, out, err = _cli(["merge", _write(llamas, "mega.yml", MEGA), tmp_path / "unused"], capsys, monkeypatch)
    assert code == 0, err
    assert (llamas / "models" / "gradient-slerp" / "model.safetensors").is_file()
    _assert_same_bits(theirs, load_state_dict(llamas / "models" / "gradient-slerp-ties"))
    assert str(llamas / "models" / "gradient-slerp-ties") in out


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("merge_*.yaml")))
def test_examples_run_on_small_llamas(example, llamas, tmp_path):
    """Every examples/merge_*.yaml runs once its paths (and 32-layer ranges) fit the test models."""
    text = (EXAMPLES / example).read_text()
    for old, new in (("./checkpoints/model-a", "a"), ("./checkpoints/model-b", "b"), ("./checkpoints/base", "base"),
                     ("./checkpoints/math", "a"), ("./checkpoints/code", "b"), ("./checkpoints/chat", "c"),
                     ("./checkpoints/task_a", "a"), ("./checkpoints/task_b", "b"), ("./checkpoints/task_c", "c"),
                     ("[0, 32]", "[0, 6]"), ("[0, 24]", "[0, 4]"), ("[8, 32]", "[2, 6]")):
        text = text.replace(old, new)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error", RuntimeWarning)  # no filter may miss, no key be ignored
        got = _ours(text, llamas, tmp_path / "out")
    assert got.keys() >= {"lm_head.weight", "model.layers.3.mlp.up_proj.weight"}
    assert all(torch.isfinite(t).all() for t in got.values())


def test_whole_model_configs_keep_their_checks(llamas, tmp_path):
    from safetensors.torch import load_file

    from polytask.errors import MergeError

    # a model with one more tensor than the base: refused (mergekit would drop it silently)
    sd = load_file(llamas / "b" / "model.safetensors")
    save_file({**sd, "extra.weight": torch.zeros(2)}, llamas / "b" / "model.safetensors")
    with pytest.raises(MergeError, match="'extra.weight' of model b is missing from base base"):
        _ours(CONFIGS["no_dtype"], llamas, tmp_path / "o1")
    # mixed dtypes: refused unless strict_dtypes: false
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.float16)
    save_file(sd, llamas / "b" / "model.safetensors")
    with pytest.raises(MergeError, match="'model.norm.weight' is float16 in model b"):
        _ours(CONFIGS["no_dtype"], llamas, tmp_path / "o2")
    got = _ours(CONFIGS["no_dtype"] + "strict_dtypes: false\n", llamas, tmp_path / "o3")
    assert got["model.norm.weight"].dtype == load_file(llamas / "base" / "model.safetensors")["model.norm.weight"].dtype
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_every_bad_value_named_at_once(llamas, capsys, monkeypatch):
    text = CONFIGS["ties_bf16"].replace("density: 0.7", "density: [0.7, 1.5]").replace(
        "density: 0.3}", "density: -1}").replace("{normalize: true, int8_mask: true}", "{normalize: maybe, lambda: abc}")
    code, out, err = _cli(["merge", _write(llamas, "v.yaml", text), llamas / "out"], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    for words in ("model b: parameters.density", "got 1.5", "model c: parameters.density", "got -1",
                  "parameters.normalize", "'maybe'", "parameters.lambda", "'abc'"):
        assert words in err, (words, err)
    assert "lambda_" not in err


def test_more_methods_by_hand():
    base = torch.zeros(2)
    # SCE, tau_1 = [1, 2], tau_2 = [3, -1]: elected signs + (sums 4, 1): tau_2's -1 is erased;
    # eta = mean squares 2.5, 5 over 7.5 = 1/3, 2/3 -> [(1/3 + 2) / 1, (2/3) / (1/3)] = [7/3, 2]
    out = merge_state_dicts("sce", [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -1.0])}], {"w": base})["w"]
    assert torch.allclose(out, torch.tensor([7 / 3, 2.0]))
    # RAM+, r = 0.5, alpha = 0.2: tau_1 = [1, 0, 1], tau_2 = [1, 2, 0]; each model has 1 shared and 1 unique
    # change: rho = 1 -> clamp 0.2 -> lambda = 1.1; shared entry 0 averaged (1), unique ones times 1.1
    out = merge_state_dicts("ramplus_tl", [{"w": torch.tensor([1.0, 0.0, 1.0])}, {"w": torch.tensor([1.0, 2.0, 0.0])}],
                            {"w": torch.zeros(3)}, r=0.5, alpha=0.2)["w"]
    assert torch.allclose(out, torch.tensor([1.0, 2.2, 1.1]))
    # NuSLERP of orthogonal unit vectors: weights 1, 1 -> t = 1/2, the midpoint; weights 1, 0 -> t = 0
    e1, e2 = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    out = merge_state_dicts("nuslerp", [e1, e2], model_params=[{"weight": 1.0}, {"weight": 1.0}])["w"]
    assert torch.allclose(out, torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]))
    out = merge_state_dicts("nuslerp", [e1, e2], model_params=[{"weight": 1.0}, {"weight": 0.0}])["w"]
    assert torch.allclose(out, e1["w"])
    # Multi-SLERP: the result's norm is the weighted mean of the norms (here 2 and 4, weights 1/4, 3/4)
    out = merge_state_dicts("multislerp", [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}],
                            model_params=[{"weight": 1.0}, {"weight": 3.0}])["w"]
    assert torch.allclose(out.norm(), torch.tensor(0.25 * 2 + 0.75 * 4))
    assert out[1] > out[0] > 0  # pulled towards the heavier model
    # Arcee Fusion keeps, entry by entry, either the base or the other model, and takes at least one change
    g = torch.Generator().manual_seed(0)
    b, o = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    out = merge_state_dicts("arcee_fusion", [{"w": o}], {"w": b})["w"]
    taken = out != b
    assert torch.allclose(out[taken], o[taken], atol=1e-6) and 0 < int(taken.sum()) < out.numel()


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_in_bf16_match_mergekit_in_distribution(name):
    api = pytest.importorskip("mergekit.merge_methods.api")
    g = torch.Generator().manual_seed(7)
    base = torch.zeros(200, 500, dtype=torch.bfloat16)
    models = [torch.randn(200, 500, generator=g).bfloat16() for _ in range(2)]
    params = {"weight": 1.0, "density": 0.4, **({"epsilon": 0.1} if "della" in name else {})}
    torch.manual_seed(0)
    theirs = api.merge_tensors([base, *models], name, parameters=params, base_index=0)
    ours = merge_state_dicts(name, [{"w": m} for m in models], {"w": base}, rescale="l1", dtype="bfloat16",
                             compute_dtype="bfloat16", model_params=[{k: v for k, v in params.items()}] * 2)["w"]
    assert theirs.dtype == ours.dtype == torch.bfloat16
    kept = [(x != 0).float().mean().item() for x in (theirs, ours)]
    assert abs(kept[0] - kept[1]) < 0.01 and abs(kept[1] - (1 - 0.6 ** 2)) < 0.01
    assert abs(theirs.float().abs().sum().item() / ours.float().abs().sum().item() - 1) < 0.02
