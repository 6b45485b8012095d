"""Multi-module merges (mergekit's ``modules:``) on tiny random Qwen3-VL checkpoints built from a
transformers config: the same tensors as mergekit 0.1.5 bit for bit (mergekit run in the test,
skipped inside each test that needs it), a frankenmerge checked by hand, polytask's module
table checked against mergekit's architecture definitions, and bad input as one line, exit 2."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from polytask.cli import main
from polytask.errors import MergeError
from polytask.merge import load_state_dict, run_merge
from polytask.merge.modules import ARCHITECTURES, architecture_of, inferred_modules, module_of

ARCH = "Qwen3VLForConditionalGeneration"


@pytest.fixture(scope="module")
def shapes() -> tuple[dict[str, tuple[int, ...]], dict]:
    """Tensor names and shapes of a tiny Qwen3-VL (3 text layers, 3 vision blocks, 3 deepstack
    mergers) from transformers, built on the meta device (no weights, no download)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=8, vocab_size=40,
                         rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           deepstack_visual_indexes=[0, 1, 2], num_position_embeddings=16),
        tie_word_embeddings=False)
    cfg.architectures = [ARCH]
    with torch.device("meta"):
        model = transformers.Qwen3VLForConditionalGeneration(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, cfg.to_dict()


def _write(path: Path, shapes, seed: int, dtype=torch.float32, keep=lambda name: True) -> None:
    names, cfg = shapes
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g).to(dtype) for k, s in sorted(names.items()) if keep(k)}
    path.mkdir(parents=True)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": str(dtype).removeprefix("torch.")}))


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def models(request, shapes, tmp_path) -> Path:
    for seed, name in enumerate(["base", "a", "b"]):
        _write(tmp_path / "m" / name, shapes, seed, request.param)
    return tmp_path / "m"


def _mergekit(text: str, folder: Path, out: Path, monkeypatch, copy_tokenizer: bool = False) -> Path:
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = re.sub(r"((?:model|base_model): )(base|a|b|c)\b", lambda m: m.group(1) + str(folder / m.group(2)), text)
    mergekit_run(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
                 MergeOptions(copy_tokenizer=copy_tokenizer, quiet=True, write_model_card=False, random_seed=0))
    return out


def _ours(text: str, folder: Path, out: Path) -> Path:
    cfg = folder / f"{out.name}.yaml"
    cfg.write_text(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = run_merge(cfg, out)
    # a module left out of modules: is named in a warning (mergekit drops it silently)
    dropped = [str(w.message) for w in caught if "not listed" in str(w.message)]
    listed = yaml.safe_load(text).get("modules")
    assert bool(dropped) == (listed is not None and len(listed) < 3), dropped
    if dropped:
        assert ("multi_modal_projector" if "text_decoder" in text else "vision_tower") in dropped[0]
    return done


CONFIGS = {
    # text: a frankenmerge of 2 layers (a's 0-1 with b's 1-2) with a per-layer gradient; vision:
    # whole towers, a filter in the module's parameters; the projector left out (not written)
    "linear_slices_and_models": """
merge_method: linear
base_model: base
modules:
  text_decoder:
    slices:
      - sources:
          - model: a
            layer_range: [0, 2]
          - model: b
            layer_range: [1, 3]
        parameters: {weight: [0.2, 0.8]}
  vision_tower:
    models:
      - model: a
        parameters: {weight: 0.3}
      - model: b
        parameters: {weight: 0.7}
    parameters:
      weight: [{filter: blocks.1, value: 0.5}]
parameters: {weight: 1.0}
""",
    # top-level models: every module (the deepstack mergers are the projector's 3 layers, so the
    # gradient runs over them too), TIES in the dtype
    "ties_models_every_module": """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: [0.3, 1.0], density: 0.5}
  - model: b
    parameters: {weight: 0.6, density: [0.9, 0.4]}
parameters: {normalize: true}
dtype: float32
""",
    # a base per slice, slerp's t over the layers of each module, modules with different inputs
    "slerp_per_module": """
merge_method: slerp
base_model: a
modules:
  text_decoder:
    models:
      - model: a
      - model: b
    parameters: {t: [0.1, 0.9]}
  vision_tower:
    slices:
      - sources:
          - model: a
            layer_range: [1, 3]
          - model: b
            layer_range: [0, 2]
        base_model: a
  multi_modal_projector:
    models:
      - model: a
      - model: base
parameters:
  t:
    - filter: merger
      value: 0.7
    - value: [0, 1]
""",
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tensors_as_mergekit(models, name, tmp_path, monkeypatch):
    text = CONFIGS[name]
    theirs = load_state_dict(_mergekit(text, models, tmp_path / "theirs", monkeypatch))
    ours_dir = _ours(text, models, tmp_path / "ours")
    ours = load_state_dict(ours_dir)
    assert ours.keys() == theirs.keys()
    bad = [k for k in theirs if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not bad, f"{len(bad)} of {len(theirs)} tensors differ, e.g. {bad[:3]}"
    # the output config counts each module's layers as mergekit's does
    cfg_t = json.loads((tmp_path / "theirs" / "config.json").read_text())
    cfg_o = json.loads((ours_dir / "config.json").read_text())
    for key in ("num_hidden_layers",):
        assert cfg_o["text_config"][key] == cfg_t["text_config"][key]
    assert cfg_o["vision_config"]["depth"] == cfg_t["vision_config"]["depth"]


@pytest.fixture(scope="module")
def t5_shapes() -> tuple[dict[str, tuple[int, ...]], dict]:
    """A tiny T5 v1.1 (gated FFN, as mergekit's definition; 2 encoder, 3 decoder blocks, untied head)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3,
                                num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    cfg.architectures = ["T5ForConditionalGeneration"]
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, cfg.to_dict()


T5_CONFIGS = {
    # the encoder whole, 2 of the 3 decoder blocks with a gradient, the shared embedding and head
    "linear_modules": """
merge_method: linear
base_model: base
modules:
  encoder:
    models:
      - model: a
        parameters: {weight: 0.3}
      - model: b
        parameters: {weight: 0.7}
  decoder:
    slices:
      - sources:
          - model: a
            layer_range: [0, 2]
          - model: b
            layer_range: [0, 2]
        parameters: {weight: [0.2, 0.8]}
  shared:
    models:
      - model: a
      - model: b
parameters: {weight: 1.0}
""",
    # every module; relative_attention_bias exists in block 0 only
    "task_arithmetic_models": """
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: [0.5, 1.0]}
  - model: b
    parameters: {weight: 0.4}
""",
}


@pytest.mark.parametrize("name", list(T5_CONFIGS))
def test_encoder_decoder_same_tensors_as_mergekit(t5_shapes, name, tmp_path, monkeypatch):
    for seed, model in enumerate(["base", "a", "b"]):
        _write(tmp_path / "m" / model, t5_shapes, seed)
    text = T5_CONFIGS[name]
    theirs = load_state_dict(_mergekit(text, tmp_path / "m", tmp_path / "theirs", monkeypatch))
    cfg = tmp_path / "m" / "ours.yaml"
    cfg.write_text(text)
    ours_dir = run_merge(cfg, tmp_path / "ours")
    ours = load_state_dict(ours_dir)
    assert ours.keys() == theirs.keys()
    assert not [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    for key in ("num_layers", "num_decoder_layers"):
        assert json.loads((ours_dir / "config.json").read_text())[key] == \
            json.loads((tmp_path / "theirs" / "config.json").read_text())[key]


def test_decoder_blocks_with_different_tensors_are_refused(t5_shapes, tmp_path):
    # decoder block 0 has relative_attention_bias, block 1 not: merging a's block 0 with b's
    # block 1 is refused naming the tensor and model (mergekit merges a's tensor alone)
    for seed, model in enumerate(["a", "b"]):
        _write(tmp_path / "m" / model, t5_shapes, seed)
    cfg = tmp_path / "m" / "x.yaml"
    cfg.write_text("merge_method: linear\nmodules:\n  decoder:\n    slices:\n      - sources:\n"
                   "          - {model: a, layer_range: [0, 2]}\n          - {model: b, layer_range: [1, 3]}\n"
                   "parameters: {weight: 1.0}\n")
    with pytest.raises(MergeError, match=r"modules\.decoder: .*relative_attention_bias.* missing from model b"):
        run_merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_union_tokenizer_in_the_text_module_as_mergekit(shapes, tmp_path, monkeypatch):
    # different vocabularies (23, 26 and 15 words): the text decoder's embedding and head rows are
    # aligned by token over the text module's models, as mergekit does, and the config's
    # text_config.vocab_size is the union's
    sys.path.insert(0, str(Path(__file__).parent))
    from test_merge_tokenizer import VOCABS, _same_by_token, _tokenizer

    names, cfg = shapes
    vocab_rows = ("lm_head.weight", "model.language_model.embed_tokens.weight")
    for seed, model in enumerate(["base", "a", "c"]):
        words = VOCABS[model]
        sized = {k: (len(words), *v[1:]) if k in vocab_rows else v for k, v in names.items()}
        sized_cfg = {**cfg, "text_config": {**cfg["text_config"], "vocab_size": len(words)}}
        _write(tmp_path / "m" / model, (sized, sized_cfg), seed)
        _tokenizer(words, tmp_path / "m" / model)
    text = """
merge_method: linear
base_model: base
modules:
  text_decoder:
    models:
      - model: a
        parameters: {weight: 0.5}
      - model: c
        parameters: {weight: 0.3}
  vision_tower:
    models:
      - model: a
        parameters: {weight: 0.5}
      - model: c
        parameters: {weight: 0.5}
parameters: {weight: 0.2}
tokenizer_source: union
"""
    theirs = _mergekit(text, tmp_path / "m", tmp_path / "theirs", monkeypatch, copy_tokenizer=True)
    ours = _ours(text, tmp_path / "m", tmp_path / "ours")
    _same_by_token(theirs, ours)
    assert json.loads((ours / "config.json").read_text())["text_config"]["vocab_size"] == 26


@pytest.fixture(scope="module")
def mistral3_shapes() -> tuple[dict[str, tuple[int, ...]], dict]:
    """A tiny Mistral 3 (3 text layers, 2 Pixtral vision layers) with its tensors named as in the
    published checkpoints mergekit's definition follows (``language_model.model.*``,
    ``vision_tower.*``); transformers 5 itself names them ``model.language_model.*``."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Mistral3Config(
        text_config=dict(model_type="mistral", hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, vocab_size=40),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           head_dim=8, patch_size=4, image_size=16))
    cfg.architectures = ["Mistral3ForConditionalGeneration"]
    with torch.device("meta"):
        model = transformers.Mistral3ForConditionalGeneration(cfg)
    published = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))

    def name(key: str) -> str:
        return next(new + key[len(old):] for old, new in published if key.startswith(old))

    return {name(k): tuple(v.shape) for k, v in model.state_dict().items()}, cfg.to_dict()


def test_vision_language_slices_same_as_mergekit(mistral3_shapes, tmp_path, monkeypatch):
    # frankenmerges of both stacks (4 text layers, 3 vision layers out); the vision tower's
    # patch_conv and ln_pre come from its first slice (b), the text head from its last (b)
    for seed, model in enumerate(["base", "a", "b"]):
        _write(tmp_path / "m" / model, mistral3_shapes, seed)
    text = """
merge_method: linear
base_model: base
modules:
  text_decoder:
    slices:
      - sources:
          - model: a
            layer_range: [0, 2]
      - sources:
          - model: b
            layer_range: [1, 3]
  vision_tower:
    slices:
      - sources:
          - model: b
            layer_range: [0, 1]
      - sources:
          - model: a
            layer_range: [0, 2]
  multi_modal_projector:
    models:
      - model: a
        parameters: {weight: 0.3}
      - model: b
        parameters: {weight: 0.7}
parameters: {weight: 1.0}
"""
    theirs_dir = _mergekit(text, tmp_path / "m", tmp_path / "theirs", monkeypatch)
    ours_dir = _ours(text, tmp_path / "m", tmp_path / "ours")
    theirs, ours = load_state_dict(theirs_dir), load_state_dict(ours_dir)
    assert ours.keys() == theirs.keys() and len(ours) == 72
    assert not [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    b = load_state_dict(tmp_path / "m" / "b")
    assert torch.equal(ours["vision_tower.patch_conv.weight"], b["vision_tower.patch_conv.weight"])
    for d in (theirs_dir, ours_dir):
        cfg = json.loads((d / "config.json").read_text())
        assert (cfg["text_config"]["num_hidden_layers"], cfg["vision_config"]["num_hidden_layers"]) == (4, 3)


@pytest.fixture(scope="module")
def llava_shapes() -> tuple[dict[str, tuple[int, ...]], dict]:
    """A tiny LLaVA (Llama text decoder of 3 layers, CLIP vision encoder of 2): an architecture
    mergekit 0.1.5 has no definition of, whose modules it infers from the tensor names."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=40),
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=8, patch_size=4, projection_dim=16),
        image_token_index=39)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, cfg.to_dict()


LLAVA_CONFIGS = {
    # every inferred module: the gradient runs over each stack's own layers
    "models": """
merge_method: linear
base_model: base
models:
  - model: a
    parameters: {weight: [0.2, 0.8]}
  - model: b
    parameters: {weight: 0.5}
parameters: {weight: 1.0}
""",
    # mergekit's inferred module names: a frankenmerge of the text layers, the tensors outside
    # the layers (default), the vision encoder's layers left out
    "modules": """
merge_method: linear
base_model: base
modules:
  model.language_model.layers:
    slices:
      - sources:
          - model: a
            layer_range: [0, 2]
          - model: b
            layer_range: [1, 3]
        parameters: {weight: [0.2, 0.8]}
  default:
    models:
      - model: a
        parameters: {weight: 0.4}
      - model: b
parameters: {weight: 1.0}
""",
}


@pytest.mark.parametrize("name", list(LLAVA_CONFIGS))
def test_inferred_modules_same_as_mergekit(llava_shapes, name, tmp_path, monkeypatch):
    for seed, model in enumerate(["base", "a", "b"]):
        _write(tmp_path / "m" / model, llava_shapes, seed)
    text = LLAVA_CONFIGS[name]
    theirs = load_state_dict(_mergekit(text, tmp_path / "m", tmp_path / "theirs", monkeypatch))
    ours = load_state_dict(_ours(text, tmp_path / "m", tmp_path / "ours"))
    assert ours.keys() == theirs.keys()
    assert not [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert len(ours) == (73 if name == "models" else 73 - 2 * 16 - 9)


def test_inferred_modules_by_hand():
    # stacks are named by the text before the first ".<i>." (mergekit's rule); the rest is default
    names = ["model.language_model.layers.0.mlp.w", "model.language_model.layers.1.mlp.w",
             "model.vision_tower.encoder.layers.0.fc.w", "model.vision_tower.embeddings.patch.w", "lm_head.weight",
             "model.language_model.layers.0.experts.3.w"]
    modules = inferred_modules(names)
    assert set(modules) == {"model.language_model.layers", "model.vision_tower.encoder.layers", "default"}
    assert [module_of(n, modules) for n in names] == [
        "model.language_model.layers", "model.language_model.layers", "model.vision_tower.encoder.layers",
        "default", "default", "model.language_model.layers"]
    # one stack (a Llama): one module, planned as today; no loose tensor: no default module
    assert inferred_modules(names[:2] + names[3:5]) is None
    assert "default" not in inferred_modules(names[:3])


def test_frankenmerge_by_hand(shapes, tmp_path):
    # text: output layer 0 is a's layer 0 and output layer 1 b's layer 2 (weights 1/0 and 0/1 at the
    # two ends of the slice, no normalisation); vision: 0.25 a + 0.75 b; projector: not written;
    # the output config says 2 text layers and keeps the 3 vision blocks
    for seed, name in enumerate(["a", "b"]):
        _write(tmp_path / "m" / name, shapes, seed + 10)
    text = """
merge_method: linear
modules:
  text_decoder:
    slices:
      - sources:
          - model: a
            layer_range: [0, 2]
            parameters: {weight: [1, 0]}
          - model: b
            layer_range: [1, 3]
            parameters: {weight: [0, 1]}
  vision_tower:
    models:
      - model: a
        parameters: {weight: 0.25}
      - model: b
        parameters: {weight: 0.75}
parameters: {normalize: false}
"""
    out = _ours(text, tmp_path / "m", tmp_path / "out")
    got = load_state_dict(out)
    a, b = load_state_dict(tmp_path / "m" / "a"), load_state_dict(tmp_path / "m" / "b")
    q = "model.language_model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(got[q.format(0)], a[q.format(0)])
    assert torch.equal(got[q.format(1)], b[q.format(2)])
    assert q.format(2) not in got
    # embeddings from the first slice's sources at t = 0 (a: 1, b: 0), the head at t = 0 too
    assert torch.equal(got["model.language_model.embed_tokens.weight"], a["model.language_model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], a["lm_head.weight"])
    w = "model.visual.blocks.2.attn.qkv.weight"
    torch.testing.assert_close(got[w], 0.25 * a[w] + 0.75 * b[w], rtol=0, atol=1e-6)
    assert not [k for k in got if "merger" in k]
    assert len(got) == 2 * 11 + 3 + 3 + 3 * 12
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["text_config"]["num_hidden_layers"], cfg["vision_config"]["depth"]) == (2, 3)


def test_table_matches_mergekit_definitions():
    # every weight mergekit 0.1.5 defines for a module of its multi-module architectures falls in
    # the module of that name here, and its layer templates in the module's stack (Whisper's
    # decoder and Qwen2-VL's projector "layers" differ on purpose: see polytask.merge.modules)
    pytest.importorskip("mergekit")
    from mergekit.architecture.json_definitions import NAME_TO_ARCH

    modular = {name for name, archs in NAME_TO_ARCH.items() for a in archs if len(a.modules) > 1}
    assert modular == set(ARCHITECTURES)
    checked = 0
    for name in modular:
        (arch,) = NAME_TO_ARCH[name]
        assert set(arch.modules) == set(ARCHITECTURES[name])
        for module, definition in arch.modules.items():
            d = definition.architecture.definition
            prefix = definition.weight_prefix or ""
            if name.startswith("Whisper") and module == "decoder":
                assert prefix == "model.decoder"  # no dot: mergekit looks for "model.decoderlayers.0..."
                prefix += "."
            ours = ARCHITECTURES[name][module]
            for before, weights in ((True, d.pre_weights), (False, d.post_weights)):
                for w in weights:
                    assert module_of(prefix + w.name, ARCHITECTURES[name]) == module, (name, w.name)
                    if ours.stack is not None:  # before or after the layers matters only around layers
                        assert bool(re.search(ours.pre, prefix + w.name)) == before, (name, w.name)
                    checked += 1
            for w in d.layer_templates.weights:
                full = prefix + w.name.replace("${layer_index}", "0")
                assert module_of(full, ARCHITECTURES[name]) == module, (name, full)
                if "${layer_index}" in w.name:
                    assert ours.stack is not None and full.startswith(ours.stack + "0."), (name, full)
                else:
                    assert name.startswith("Qwen2") and module == "multi_modal_projector", (name, full)
                checked += 1
    assert checked > 300


def test_architecture_of_reads_config(tmp_path, shapes):
    _write(tmp_path / "q", shapes, 0)
    assert architecture_of(tmp_path / "q")[0] == ARCH
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert architecture_of(tmp_path / "l") is None and architecture_of(tmp_path / "none") is None


def _cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["polytask", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code or 0, captured.out, captured.err


TEXT_ONLY = """
merge_method: linear
modules:
  text_decoder:
    models: [a, b]
"""

BAD = {
    "unknown module": (TEXT_ONLY.replace("text_decoder", "vision"),
                       ["modules.vision", ARCH, "multi_modal_projector, text_decoder, vision_tower"]),
    "module missing from a model": (TEXT_ONLY.replace("text_decoder", "vision_tower").replace("[a, b]", "[a, t]"),
                                    ["modules.vision_tower", "model t", "no tensor of module vision_tower"]),
    "default module": (TEXT_ONLY.replace("text_decoder", "default"), ["modules.default", "no module 'default'"]),
    "top-level slices": ("merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n"
                         "      - {model: b, layer_range: [0, 2]}\n", ["slices:", "several modules"]),
    "layer range outside the module": (
        TEXT_ONLY.replace("models: [a, b]", "slices:\n      - sources:\n          - {model: a, layer_range: [0, 2]}\n"
                                            "          - {model: b, layer_range: [2, 4]}"),
        ["modules.text_decoder", "slices[0].sources[1].layer_range", "3 layers"]),
    "no module": ("merge_method: linear\nmodules: {}\n", ["modules", "at least 1"]),
    "module gradient longer than its layers": (TEXT_ONLY + "    parameters: {weight: [1, 2, 3, 4]}\n",
                                               ["modules.text_decoder.parameters.weight", "4 values", "at most 3"]),
    "unknown parameter in a module": (TEXT_ONLY + "    parameters: {wieght: 1}\n",
                                      ["modules.text_decoder", "wieght", "weight"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_no_output(case, shapes, tmp_path, capsys, monkeypatch):
    root = tmp_path / "m"
    for seed, name in enumerate(["a", "b"]):
        _write(root / name, shapes, seed)
    _write(root / "t", shapes, 5, keep=lambda n: "visual" not in n)  # the text decoder only
    text, must = BAD[case]
    cfg = root / "bad.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    code, _, err = _cli(["merge", cfg, out], capsys, monkeypatch)
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for m in must:
        assert m in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_sequential_indices_and_models_without_config_are_one_module(tmp_path):
    from polytask.merge.modules import inferred_modules, layout_of

    names = ["bottom.0.weight", "bottom.2.weight", "heads.0.0.weight", "heads.1.0.weight"]
    assert inferred_modules(names) is None  # 0, 2: nn.Sequential children, not layers 0..N-1
    stacked = ["a.layers.0.w", "a.layers.1.w", "b.blocks.0.w", "embed.w"]
    assert set(inferred_modules(stacked)) == {"a.layers", "b.blocks", "default"}
    assert layout_of(tmp_path, stacked) is None  # no config.json: not a transformers model
    (tmp_path / "config.json").write_text('{"architectures": ["Foo"]}')
    assert layout_of(tmp_path, stacked)[0] == "Foo"
