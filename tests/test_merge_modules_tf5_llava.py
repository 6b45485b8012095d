"""LLaVA-family merges (modules inferred from tensor names) and LoRA adapters across key layouts.

Tiny random LLaVA and LLaVA-NeXT models are built from transformers configs and saved by the
installed transformers (5.x) in three layouts: its in-memory names (``save_original_format=False``:
``model.language_model.layers.*``, ``model.vision_tower.*``), its default ``save_pretrained``
(``language_model.model.*``, ``vision_tower.*``) and the published checkpoints' (that one with the
CLIP tower under ``vision_tower.vision_model.``, which is what transformers 5 reads back).

Peers: mergekit 0.1.5 under transformers 5 infers the modules from the in-memory names (it builds
the model), so it merges the 5.x copies with configs naming ``model.language_model.layers``; where
it cannot build the model (as under transformers 4) it infers them from the file's names, so it
merges the published copies with configs naming ``language_model.model.layers``. polytask must
give their tensors bit for bit on every layout and with either config, renamed by polytask's table
(itself checked tensor by tensor against transformers' own saves). LoRA adapters are PEFT's (which
names modules as the model held them: 5.x names) and checked against PEFT's merge_and_unload.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
from _merge_helpers import cli, run_mergekit, run_ours
import torch
import yaml
from safetensors.torch import load_file, save_file

from polytask.merge import load_state_dict, run_merge
from polytask.merge.modules import naming_of, namings_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning", "ignore::FutureWarning")


def _tf():
    return pytest.importorskip("transformers")


TEXT = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=40)
CLIP = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, image_size=8, patch_size=4, projection_dim=16)


def _llava():
    return _tf().LlavaForConditionalGeneration(_tf().LlavaConfig(text_config=TEXT, vision_config=CLIP,
                                                                 image_token_index=39))


def _llava_next():
    return _tf().LlavaNextForConditionalGeneration(_tf().LlavaNextConfig(text_config=TEXT, vision_config=CLIP,
                                                                         image_token_index=39))


BUILD = {"LlavaForConditionalGeneration": _llava, "LlavaNextForConditionalGeneration": _llava_next}
LAYOUTS = ("new", "default", "published")
NAMING_OF_LAYOUT = {"published": 0, "new": 1, "default": 2}  # index in namings_of(arch)


def _published(name: str) -> str:
    """The CLIP/SigLIP towers' names as published LLaVA checkpoints have them."""
    return re.sub(r"^(vision_tower|image_tower|video_tower)\.(?!vision_model\.)", r"\1.vision_model.", name)


def _random_model(arch: str, seed: int, build=None):
    torch.manual_seed(seed)
    model = (build or BUILD[arch])()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor distinct (no constant norms), so a wrong pairing shows
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.config.architectures = [arch]
    return model


def _save_layouts(model, root: Path, name: str, published: bool = True) -> None:
    """``model`` saved under ``root/<layout>/name``; ``published``: its tower is CLIP/SigLIP (not
    InternVL's, which has no ``vision_model.`` in any file)."""
    model.save_pretrained(root / "new" / name, save_original_format=False)
    model.save_pretrained(root / "default" / name)
    model.save_pretrained(root / "published" / name)
    f = root / "published" / name / "model.safetensors"
    if published:
        save_file({_published(k): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=list(BUILD), ids=["llava", "llava_next"])
def saved(request, tmp_path_factory) -> tuple[str, Path]:
    """base, a, b of one architecture in each layout of :data:`LAYOUTS`."""
    root = tmp_path_factory.mktemp(request.param)
    for seed, name in enumerate(["base", "a", "b"]):
        _save_layouts(_random_model(request.param, seed), root, name)
    return request.param, root


def _to_new(arch: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict renamed into transformers 5's in-memory names by polytask's table."""
    own, new = naming_of(arch, sd), namings_of(arch)[1]
    return {new.from_mergekit(own.to_mergekit(k)): v for k, v in sd.items()}


def test_naming_matches_transformers(saved):
    # each layout is recognised, and renaming any of them to 5.x names by polytask's table gives
    # the name transformers gave the same tensor (matched by value: all tensors are distinct);
    # transformers reads the published copy back to the same model
    arch, root = saved
    new = load_file(root / "new/a/model.safetensors")
    by_value = {v.numpy().tobytes(): k for k, v in new.items()}
    assert len(by_value) == len(new) > 60
    for layout in LAYOUTS:
        naming = namings_of(arch)[NAMING_OF_LAYOUT[layout]]
        sd = load_file(root / layout / "a/model.safetensors")
        assert naming_of(arch, sd) == naming
        assert _to_new(arch, sd).keys() == new.keys()
        assert {naming.to_mergekit(k) for k in sd} == {namings_of(arch)[1].to_mergekit(k) for k in new}
        assert all(by_value[v.numpy().tobytes()] == k for k, v in _to_new(arch, sd).items())
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.1.") for k in
               load_file(root / "published/a/model.safetensors"))
    model = getattr(_tf(), arch).from_pretrained(root / "published" / "a")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in new.items())
    if arch.startswith("LlavaNext"):
        assert "model.image_newline" in new
        assert namings_of(arch)[1].to_mergekit("model.image_newline") == "image_newline"


SIGLIP = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, image_size=8, patch_size=4)
MORE = {
    "VipLlavaForConditionalGeneration": lambda: _tf().VipLlavaForConditionalGeneration(_tf().VipLlavaConfig(
        text_config=TEXT, vision_config=CLIP, image_token_index=39, vision_feature_layers=[-2, -1])),
    "PaliGemmaForConditionalGeneration": lambda: _tf().PaliGemmaForConditionalGeneration(_tf().PaliGemmaConfig(
        text_config=dict(TEXT, model_type="gemma", head_dim=8), vision_config=SIGLIP, image_token_index=39)),
    "LlavaNextVideoForConditionalGeneration": lambda: _tf().LlavaNextVideoForConditionalGeneration(
        _tf().LlavaNextVideoConfig(text_config=TEXT, vision_config=CLIP, image_token_index=39, video_token_index=38)),
    "LlavaOnevisionForConditionalGeneration": lambda: _tf().LlavaOnevisionForConditionalGeneration(
        _tf().LlavaOnevisionConfig(text_config=dict(TEXT, model_type="qwen2"), vision_config=SIGLIP,
                                   image_token_index=39, video_token_index=38)),
    "AyaVisionForConditionalGeneration": lambda: _tf().AyaVisionForConditionalGeneration(_tf().AyaVisionConfig(
        text_config=dict(TEXT, model_type="cohere2"), vision_config=SIGLIP, image_token_index=39,
        downsample_factor=2)),
    "InternVLForConditionalGeneration": lambda: _tf().InternVLForConditionalGeneration(_tf().InternVLConfig(
        text_config=dict(TEXT, model_type="qwen2"), image_token_id=39, downsample_ratio=0.5,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[8, 8], patch_size=[4, 4]))),
    "VideoLlavaForConditionalGeneration": lambda: _tf().VideoLlavaForConditionalGeneration(_tf().VideoLlavaConfig(
        text_config=TEXT, vision_config=CLIP, image_token_index=39, video_token_index=38)),
}


@pytest.mark.parametrize("arch", list(MORE), ids=["vipllava", "paligemma", "llava_next_video", "llava_onevision",
                                                   "aya_vision", "internvl", "video_llava"])
def test_naming_matches_transformers_other_families(arch, tmp_path):
    # the other architectures of the table: each saved layout renamed to 5.x names by polytask's
    # table gives transformers' names of the same tensors, and the published copy loads back
    clip_like = not arch.startswith("InternVL")
    _save_layouts(_random_model(arch, 3, MORE[arch]), tmp_path, "a", published=clip_like)
    new = load_file(tmp_path / "new/a/model.safetensors")
    by_value = {v.numpy().tobytes(): k for k, v in new.items()}
    assert len(by_value) == len(new) > 40
    for layout in LAYOUTS:
        sd = load_file(tmp_path / layout / "a/model.safetensors")
        want = NAMING_OF_LAYOUT["default" if layout == "published" and not clip_like else layout]
        assert naming_of(arch, sd) == namings_of(arch)[want]
        assert {k: by_value[v.numpy().tobytes()] for k, v in sd.items()} == dict(zip(sd, _to_new(arch, sd)))
    model = getattr(_tf(), arch).from_pretrained(tmp_path / "published" / "a")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in new.items())


@pytest.mark.parametrize("arch", ["InternVLForConditionalGeneration", "VideoLlavaForConditionalGeneration"],
                         ids=["internvl", "video_llava"])
def test_other_families_mixed_layouts_as_mergekit(arch, tmp_path, monkeypatch):
    # InternVL (a tower never named vision_model.) and Video-LLaVA (two CLIP towers): base in
    # 5.x names, a and b in the other two layouts; the output keeps the base's names and is
    # mergekit's merge of the 5.x copies, bit for bit
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions

    for seed, name in enumerate(["base", "a", "b"]):
        _save_layouts(_random_model(arch, seed, MORE[arch]), tmp_path, name,
                      published=not arch.startswith("InternVL"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, layout in (("base", "new"), ("a", "default"), ("b", "published")):
        (mixed / name).symlink_to(tmp_path / layout / name)
    text = CONFIGS["ties"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mergekit_run(MergeConfiguration.model_validate(yaml.safe_load(_paths(text, tmp_path / "new"))),
                 str(tmp_path / "theirs"), MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    ours = load_state_dict(_ours(text, mixed, tmp_path / "ours"))
    assert naming_of(arch, ours) == namings_of(arch)[1]
    _same(ours, load_state_dict(tmp_path / "theirs"))


# configs in the module names mergekit 0.1.5 infers under transformers 5 (the in-memory names)
CONFIGS = {
    # text layers: a's 0-1 with b's 1-2 (a gradient for a), then a's 2 with b's 2; the rest linear
    "linear_slices": """
merge_method: linear
modules:
  model.language_model.layers:
    slices:
      - sources:
          - {model: a, layer_range: [0, 2], parameters: {weight: [0.2, 0.8]}}
          - {model: b, layer_range: [1, 3], parameters: {weight: 0.5}}
      - sources:
          - {model: a, layer_range: [2, 3]}
          - {model: b, layer_range: [2, 3]}
  model.vision_tower.encoder.layers:
    models:
      - {model: a, parameters: {weight: 0.3}}
      - {model: b, parameters: {weight: 0.7}}
  default:
    models:
      - {model: a, parameters: {weight: 0.4}}
      - {model: b}
parameters: {weight: 1.0}
""",
    "ties": """
merge_method: ties
base_model: base
models:
  - {model: a, parameters: {weight: 1.0, density: [0.9, 0.4]}}
  - {model: b, parameters: {weight: 0.6, density: 0.5}}
parameters: {normalize: true}
""",
    "slerp": """
merge_method: slerp
base_model: a
modules:
  model.language_model.layers:
    models: [{model: a}, {model: b}]
    parameters: {t: [0.1, 0.9]}
  model.vision_tower.encoder.layers:
    models: [{model: a}, {model: b}]
    parameters: {t: 0.3}
  default:
    models: [{model: a}, {model: b}]
parameters: {t: 0.6}
""",
}


def _old_names(text: str) -> str:
    """A config naming the modules as mergekit infers them from published checkpoints' names."""
    return (text.replace("model.language_model.layers", "language_model.model.layers")
            .replace("model.vision_tower.encoder.layers", "vision_tower.vision_model.encoder.layers"))


def _paths(text: str, folder: Path) -> str:
    return re.sub(r"((?:model|base_model): )(base|a|b|foo|ad\w*)\b", lambda m: m.group(1) + str(folder / m.group(2)),
                  text)


_THEIRS: dict[tuple[str, str, bool], dict[str, torch.Tensor]] = {}


def _mergekit(arch: str, name: str, root: Path, out: Path, monkeypatch, *, file_names: bool = False):
    """mergekit 0.1.5's merge of config ``name`` (renamed into 5.x names): on the 5.x copies as it
    runs under transformers 5, or (``file_names``) on the published copies with the modules
    inferred from the file's names, as where it cannot build the model."""
    key = (arch, name, file_names)
    if key not in _THEIRS:
        pytest.importorskip("mergekit")
        import mergekit.architecture.auto as auto

        text = CONFIGS[name]
        if file_names:
            monkeypatch.setattr(auto, "get_transformers_info", lambda *a, **k: (None, None, None, None))
            text = _old_names(text)
        auto.infer_architecture_info.cache_clear()
        folder = root / ("published" if file_names else "new")
        run_mergekit(_paths(text, folder), out, monkeypatch)
        auto.infer_architecture_info.cache_clear()
        _THEIRS[key] = _to_new(arch, load_state_dict(out))
    return _THEIRS[key]


def _ours(text: str, folder: Path, out: Path) -> Path:
    return run_ours(_paths(text, folder), out)


def _loads_and_runs(out: Path) -> None:
    """transformers loads every tensor of ``out`` (none missing or unexpected) and runs a forward."""
    saved = load_state_dict(out)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    model, info = getattr(_tf(), arch).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in _to_new(arch, saved).items())
    logits = model(input_ids=torch.tensor([[1, 5, 7, 3]])).logits
    assert logits.shape == (1, 4, 40) and torch.isfinite(logits).all()


def _same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    bad = [k for k in theirs if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not bad, f"{len(bad)} of {len(theirs)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("old_names", [False, True], ids=["5x_module_names", "4x_module_names"])
def test_same_tensors_as_mergekit_in_every_layout(saved, name, old_names, tmp_path, monkeypatch):
    # one config (module names in either layout) on each layout's copies: the output keeps the
    # inputs' layout, and renamed to 5.x names it is mergekit's merge bit for bit
    arch, root = saved
    theirs = _mergekit(arch, name, root, tmp_path / "theirs", monkeypatch, file_names=old_names)
    assert len(theirs) == len(load_file(root / "new/a/model.safetensors"))
    if old_names:  # both mergekit runs give the same merge
        assert not [k for k in theirs if not torch.equal(
            theirs[k], _mergekit(arch, name, root, tmp_path / "theirs5", monkeypatch)[k])]
    text = _old_names(CONFIGS[name]) if old_names else CONFIGS[name]
    for layout in LAYOUTS:
        out = _ours(text, root / layout, tmp_path / f"ours_{layout}")
        ours = load_state_dict(out)
        assert naming_of(arch, ours) == naming_of(arch, load_file(root / layout / "a/model.safetensors"))
        _same(_to_new(arch, ours), theirs)
        if layout != "default" and not old_names:
            _loads_and_runs(out)
    if name == "linear_slices":
        # by hand: output text layer 2 is (a[2] + b[2]) / 2; layer 0 is (0.2 a[0] + 0.5 b[1]) / 0.7
        a, b = load_state_dict(root / "new" / "a"), load_state_dict(root / "new" / "b")
        q = "model.language_model.layers.{}.self_attn.q_proj.weight"
        got = _to_new(arch, ours)
        torch.testing.assert_close(got[q.format(2)], 0.5 * a[q.format(2)] + 0.5 * b[q.format(2)], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[q.format(0)], (0.2 * a[q.format(0)] + 0.5 * b[q.format(1)]) / 0.7, rtol=0,
                                   atol=1e-6)


@pytest.mark.parametrize("layout", ["new", "published"])
def test_frankenmerge_sets_the_text_layer_count(saved, layout, tmp_path):
    # 5 text layers out of 3 (a's 0-2 then b's 1-2), 1 vision layer out of 2: the output config
    # says so (mergekit knows no key for inferred modules and keeps 3 and 2), no warning, and
    # transformers loads the output and runs it
    arch, root = saved
    text = """
merge_method: passthrough
modules:
  language_model.model.layers:
    slices:
      - sources: [{model: a, layer_range: [0, 3]}]
      - sources: [{model: b, layer_range: [1, 3]}]
  vision_tower.vision_model.encoder.layers:
    slices:
      - sources: [{model: b, layer_range: [1, 2]}]
  default: {models: [{model: a}]}
"""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = _ours(text, root / layout, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["text_config"]["num_hidden_layers"], cfg["vision_config"]["num_hidden_layers"]) == (5, 1)
    got = _to_new(arch, load_state_dict(out))
    a, b = (load_state_dict(root / "new" / n) for n in ("a", "b"))
    q = "model.language_model.layers.{}.mlp.down_proj.weight"
    assert [torch.equal(got[q.format(i)], src[q.format(j)]) for i, (src, j) in
            enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2)])] == [True] * 5
    v = "model.vision_tower.encoder.layers.{}.mlp.fc1.weight"
    assert torch.equal(got[v.format(0)], b[v.format(1)]) and v.format(1) not in got
    _loads_and_runs(out)


@pytest.mark.parametrize("base_layout", ["new", "published"])
def test_mixed_layouts_are_renamed_to_the_base(saved, base_layout, tmp_path, monkeypatch):
    # base, a and b each in another layout: the output keeps the base's names and is mergekit's merge
    arch, root = saved
    theirs = _mergekit(arch, "ties", root, tmp_path / "theirs", monkeypatch)
    others = [x for x in LAYOUTS if x != base_layout]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, layout in (("base", base_layout), ("a", others[0]), ("b", others[1])):
        (mixed / name).symlink_to(root / layout / name)
    out = _ours(CONFIGS["ties"], mixed, tmp_path / "ours")
    ours = load_state_dict(out)
    assert naming_of(arch, ours) == naming_of(arch, load_file(root / base_layout / "a/model.safetensors"))
    _same(_to_new(arch, ours), theirs)
    # module names in the other layout than the base's, with the inputs mixed
    slices = _ours(_old_names(CONFIGS["slerp"]), mixed, tmp_path / "slerp")
    _same(_to_new(arch, load_state_dict(slices)), _mergekit(arch, "slerp", root, tmp_path / "t2", monkeypatch))
    _loads_and_runs(out)


# -- LoRA adapters ---------------------------------------------------------------------------------

def _other_builders():
    sys.path.insert(0, str(Path(__file__).parent))
    import test_merge_modules_tf5 as tf5

    return {"Gemma3ForConditionalGeneration": tf5._gemma3, "Qwen2VLForConditionalGeneration": tf5._qwen2_vl}


def _peft_adapter(model, folder: Path, seed: int, targets=("q_proj", "v_proj", "fc1")):
    """A PEFT LoRA (random A and B) on ``model``, saved to ``folder``; returns the PEFT model."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(targets),
                                                     init_lora_weights=False))
    pm.save_pretrained(folder)
    return pm


def _old_adapter(arch: str, src: Path, dst: Path) -> None:
    """The adapter at ``src`` with its modules in the published checkpoints' names (PEFT reads
    either into a 5.x model)."""
    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    pre = "base_model.model."
    old = namings_of(arch)[0]
    sd = load_file(src / "adapter_model.safetensors")
    renamed = {pre + old.from_mergekit(namings_of(arch)[1].to_mergekit(k.removeprefix(pre))): v for k, v in sd.items()}
    save_file(renamed, dst / "adapter_model.safetensors", metadata={"format": "pt"})


LORA_ARCHS = ["LlavaForConditionalGeneration", "Gemma3ForConditionalGeneration", "Qwen2VLForConditionalGeneration"]


@pytest.fixture(scope="module", params=LORA_ARCHS, ids=["llava", "gemma3", "qwen2_vl"])
def lora(request, tmp_path_factory):
    """A base in two layouts (5.x names, transformers' default save), a PEFT adapter of it (5.x
    names) and the same adapter in the old names, and PEFT's merge_and_unload of it."""
    arch = request.param
    build = BUILD.get(arch) or _other_builders()[arch]
    root = tmp_path_factory.mktemp("lora")
    base = _random_model(arch, 0, build)
    base.save_pretrained(root / "new" / "base", save_original_format=False)
    base.save_pretrained(root / "old" / "base")
    pm = _peft_adapter(base, root / "adapter", 1)
    _old_adapter(arch, root / "adapter", root / "adapter_old")
    merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return arch, root, merged


@pytest.mark.parametrize("adapter", ["adapter", "adapter_old"])
@pytest.mark.parametrize("base_layout", ["new", "old"])
def test_lora_merge_into_either_layout_equals_peft(lora, adapter, base_layout, tmp_path):
    # the adapter as a merge input over a base saved in either layout (and as mergekit's
    # model+adapter): the model it stands for is PEFT's merge_and_unload, bit for bit
    arch, root, merged = lora
    keys = list(load_file(root / adapter / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.model.language_model." if adapter == "adapter" else
                            ("base_model.model.language_model.model.", "base_model.model.model.layers.")) for k in keys)
    (tmp_path / "base").symlink_to(root / base_layout / "base")
    (tmp_path / "ad").symlink_to(root / adapter)
    # linear merges the base too (as mergekit): weight 0 there, so the output is the adapter's model exactly
    text = ("merge_method: linear\nbase_model: base\nmodels:\n  - {model: ad, parameters: {weight: 1.0}}\n"
            "  - {model: base, parameters: {weight: 0.0}}\n")
    plus = f"merge_method: linear\nmodels:\n  - {{model: {tmp_path / 'base'}+{tmp_path / 'ad'}}}\n"
    for cfg_text, name in ((text, "ours"), (plus, "plus")):
        out = _ours(cfg_text, tmp_path, tmp_path / name)
        ours = load_state_dict(out)
        assert naming_of(arch, ours) == naming_of(arch, load_state_dict(root / base_layout / "base"))
        got = {namings_of(arch)[1].from_mergekit(naming_of(arch, ours).to_mergekit(k)): v for k, v in ours.items()}
        changed = [k for k in got if not torch.equal(got[k], merged[k])]
        assert not changed, [(k, float((got[k] - merged[k]).abs().max())) for k in changed[:3]]
        base_sd = _to_new_any(arch, load_state_dict(root / base_layout / "base"))
        assert sum(not torch.equal(got[k], base_sd[k]) for k in got) >= 6  # the adapter did change weights


def test_lora_saved_layers_follow_the_base_layout(tmp_path):
    # an adapter that saves a trained copy of a layer (PEFT's modules_to_save: the projector's
    # linear_1) as well as LoRA factors, merged over a base in either layout, is PEFT's
    # merge_and_unload bit for bit: the saved layer replaces the base's under the base's name
    peft = pytest.importorskip("peft")
    arch = "LlavaForConditionalGeneration"
    base = _random_model(arch, 0)
    base.save_pretrained(tmp_path / "new" / "base", save_original_format=False)
    base.save_pretrained(tmp_path / "old" / "base")
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                   modules_to_save=["linear_1"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(1.0)
    pm.save_pretrained(tmp_path / "ad")
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in load_file(
        tmp_path / "ad" / "adapter_model.safetensors")
    merged = pm.merge_and_unload().state_dict()
    for layout in ("new", "old"):
        text = (f"merge_method: linear\nbase_model: {layout}/base\nmodels:\n"
                f"  - {{model: ad, parameters: {{weight: 1.0}}}}\n"
                f"  - {{model: {layout}/base, parameters: {{weight: 0.0}}}}\n")
        (tmp_path / f"{layout}.yaml").write_text(text)
        got = _to_new(arch, load_state_dict(run_merge(tmp_path / f"{layout}.yaml", tmp_path / f"out_{layout}")))
        assert got.keys() == merged.keys() and not [k for k in got if not torch.equal(got[k], merged[k])]
        w = "model.multi_modal_projector.linear_1.weight"
        assert not torch.equal(got[w], _to_new(arch, load_state_dict(tmp_path / layout / "base"))[w])


def _to_new_any(arch, sd):
    own, new = naming_of(arch, sd), namings_of(arch)[1]
    return {new.from_mergekit(own.to_mergekit(k)): v for k, v in sd.items()}


def _targets(adapter: Path) -> set[str]:
    """The base tensors an adapter's modules change, by its key names."""
    keys = load_file(adapter / "adapter_model.safetensors")
    return {re.sub(r"\.lora_[AB]\.weight$", ".weight", k.removeprefix("base_model.model.")) for k in keys}


def test_lora_adapters_merge_into_an_adapter_and_extract(lora, tmp_path, capsys, monkeypatch):
    # two adapters in different layouts merged into an adapter of the old-layout base (exact,
    # task arithmetic): PEFT loading it onto the model and merging gives
    # the full-model merge; extract-lora from the 5.x-layout fine-tune against the old-layout base
    # gives an adapter that PEFT merges back to the fine-tune
    peft = pytest.importorskip("peft")
    arch, root, merged = lora
    for name, target in (("base", root / "old" / "base"), ("a1", root / "adapter"), ("a2", root / "adapter_old")):
        (tmp_path / name).symlink_to(target)
    text = ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - {model: a1, parameters: {weight: 0.6}}\n"
            "  - {model: a2, parameters: {weight: 0.3}}\n")
    (tmp_path / "m.yaml").write_text(_paths(text, tmp_path))
    code, _ = cli(["merge", tmp_path / "m.yaml", tmp_path / "adout", "--adapter"], capsys, monkeypatch)
    assert code == 0
    # named as PEFT names them (transformers 5's in-memory names), whatever the base file's layout
    new_names = set(load_state_dict(root / "new" / "base"))
    assert _targets(tmp_path / "adout") <= new_names and len(_targets(tmp_path / "adout")) >= 6
    full = _to_new_any(arch, load_state_dict(_ours(text, tmp_path, tmp_path / "full")))
    cls = getattr(_tf(), arch)
    via_peft = peft.PeftModel.from_pretrained(cls.from_pretrained(root / "old" / "base"), tmp_path / "adout")
    got = via_peft.merge_and_unload().state_dict()
    for k, v in full.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # extract-lora: fine-tune = PEFT's merged model saved in 5.x names; base in the old names
    ft = tmp_path / "ft"
    model = cls.from_pretrained(root / "new" / "base")
    model.load_state_dict(merged)
    model.save_pretrained(ft, save_original_format=False)
    code, _ = cli(["extract-lora", root / "old" / "base", ft, tmp_path / "ex", "--rank", "2"], capsys, monkeypatch)
    assert code == 0
    assert _targets(tmp_path / "ex") <= new_names and len(_targets(tmp_path / "ex")) >= 6
    back = peft.PeftModel.from_pretrained(cls.from_pretrained(root / "old" / "base"), tmp_path / "ex")
    got = back.merge_and_unload().state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)


# -- bad input ------------------------------------------------------------------------------------

def _bad_adapter(root: Path, folder: Path, rename) -> None:
    folder.mkdir()
    (folder / "adapter_config.json").write_text((root / "adapter" / "adapter_config.json").read_text())
    sd = load_file(root / "adapter" / "adapter_model.safetensors")
    save_file(dict(rename(sd)), folder / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("lora", ["LlavaForConditionalGeneration"], indirect=True, ids=["llava"])
def test_bad_lora_one_line_exit_2_no_output(lora, tmp_path, capsys, monkeypatch):
    arch, root, _ = lora
    (tmp_path / "base").symlink_to(root / "old" / "base")
    # a module the base lacks (text layer 7 of 3), renamed to the base's layout first
    _bad_adapter(root, tmp_path / "deep",
                 lambda sd: ((k.replace(".layers.2.", ".layers.7."), v) for k, v in sd.items()))
    # half the modules in each layout
    _bad_adapter(root, tmp_path / "both", lambda sd: ((k.replace("model.model.vision_tower.", "model.vision_tower."), v)
                                                      for k, v in sd.items()))
    cases = {"deep": ["adapter", "deep", "is not in base", "'language_model.model.layers.7.self_attn.q_proj'",
                      "renamed from the adapter's layout, transformers 5",
                      "to the base's, transformers 5 save_pretrained"],
             "both": ["adapter", "both", "two key layouts", "transformers 5 (model.language_model.*)",
                      "transformers 5 save_pretrained"]}
    # an architecture without layout tables (a LLaVA called otherwise): the layouts named as a hint
    foo = tmp_path / "foo"
    foo.mkdir()
    (foo / "model.safetensors").symlink_to(root / "old" / "base" / "model.safetensors")
    cfg = json.loads((root / "old" / "base" / "config.json").read_text())
    (foo / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooVLForConditionalGeneration"]}))
    (tmp_path / "adapter").symlink_to(root / "adapter")
    cases["adapter"] = ["adapter", "is not in base", "'model.language_model.layers.0.self_attn.q_proj'",
                        "one key layout, transformers 5 (model.language_model.*)", "the base in another, published",
                        "no layout table"]
    for name, must in cases.items():
        text = (f"merge_method: linear\nbase_model: {'foo' if name == 'adapter' else 'base'}\nmodels:\n"
                f"  - {{model: {name}}}\n")
        (tmp_path / f"{name}.yaml").write_text(_paths(text, tmp_path))
        out = tmp_path / f"out_{name}"
        code, err = cli(["merge", tmp_path / f"{name}.yaml", out], capsys, monkeypatch)
        assert code == 2 and len(err.splitlines()) == 1, err
        for m in must:
            assert m in err, (m, err)
        assert not out.exists()
    # extract-lora from a fine-tune in another layout that lacks a tensor of the base
    ft = tmp_path / "ft"
    ft.mkdir()
    sd = load_file(root / "new" / "base" / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".layers.2.self_attn.q_proj" not in k}, ft / "model.safetensors")
    (ft / "config.json").write_text((root / "new" / "base" / "config.json").read_text())
    code, err = cli(["extract-lora", tmp_path / "base", ft, tmp_path / "ex"], capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1, err
    for m in ("'model.language_model.layers.2.self_attn.q_proj.weight' is missing", "read in its layout",
              "transformers 5 (model.language_model.*)"):
        assert m in err, (m, err)
    assert not (tmp_path / "ex").exists()


BAD = {
    "module twice": ("merge_method: linear\nmodules:\n"
                     "  language_model.model.layers: {models: [{model: a}, {model: b}]}\n"
                     "  model.language_model.layers: {models: [{model: a}]}\n",
                     ["modules.model.language_model.layers", "the same module as modules.language_model.model.layers",
                      "another key layout"]),
    "unknown module": ("merge_method: linear\nmodules:\n  language_model.layers: {models: [{model: a}, {model: b}]}\n",
                       ["modules.language_model.layers", "has no module", "model.language_model.layers"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_one_line_exit_2_no_output(saved, case, tmp_path, capsys, monkeypatch):
    arch, root = saved
    text, must = BAD[case]
    (tmp_path / "bad.yaml").write_text(_paths(text, root / "new"))
    out = tmp_path / "out"
    code, err = cli(["merge", tmp_path / "bad.yaml", out], capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1, err
    for m in must:
        assert m in err, (m, err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_module_names_in_layout_by_hand():
    from polytask.merge.modules import inferred_modules, module_names_in_layout

    arch = "LlavaForConditionalGeneration"
    new = ["model.language_model.layers.0.w", "model.vision_tower.encoder.layers.0.w", "lm_head.weight"]
    modules = inferred_modules(new)
    got = module_names_in_layout(arch, modules, ["language_model.model.layers", "vision_tower.encoder.layers",
                                                 "vision_tower.vision_model.encoder.layers", "default",
                                                 "model.language_model.layers", "nothing.layers"], new)
    assert got == {"language_model.model.layers": "model.language_model.layers",
                   "vision_tower.encoder.layers": "model.vision_tower.encoder.layers",
                   "vision_tower.vision_model.encoder.layers": "model.vision_tower.encoder.layers"}
    old = ["language_model.model.layers.0.w", "vision_tower.vision_model.encoder.layers.0.w", "image_newline"]
    assert module_names_in_layout(arch, inferred_modules(old), ["model.vision_tower.encoder.layers"], old) == {
        "model.vision_tower.encoder.layers": "vision_tower.vision_model.encoder.layers"}
    # an architecture without layout tables: nothing renamed
    assert module_names_in_layout("FooForCausalLM", modules, ["language_model.model.layers"], new) == {}
