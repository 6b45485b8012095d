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
                                    ["model b", "parameters.density", "must be in (0, 1]"]),
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
