"""Multi-module merges of checkpoints in transformers 5's key layout (``model.language_model.*``).

Tiny random Gemma 3, Mistral 3 and Qwen2-VL models are built from transformers configs and saved
by the installed transformers twice: in its in-memory layout (``save_original_format=False``) and
with its default ``save_pretrained``, which writes mergekit's names back (Gemma 3's vision tower
without ``vision_model.``: renamed here to the published checkpoints' names). mergekit 0.1.5 merges
the second copy; its output renamed to the 5.x names must equal ours on the first, bit for bit.
The rename is checked against transformers' own (tensor by tensor, by value). Outputs load with
``from_pretrained`` and run a forward. Bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
from _merge_helpers import cli, run_mergekit, run_ours
import torch
from safetensors.torch import load_file, save_file

from polytask.errors import MergeError
from polytask.merge import load_state_dict
from polytask.merge.modules import NAMINGS, naming_of



def _tf():
    """transformers, or a skip of the test that needs it (the by-hand tests run without it)."""
    return pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
            head_dim=8, vocab_size=64)


def _gemma3():
    return _tf().Gemma3ForConditionalGeneration(_tf().Gemma3Config(
        text_config=dict(TEXT, num_key_value_heads=1, layer_types=["sliding_attention", "full_attention",
                                                                    "sliding_attention"]), mm_tokens_per_image=4,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4, vision_use_head=False)))


def _mistral3():
    return _tf().Mistral3ForConditionalGeneration(_tf().Mistral3Config(
        text_config=dict(TEXT, model_type="mistral", tie_word_embeddings=False), tie_word_embeddings=False,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           head_dim=8, patch_size=4, image_size=16)))


def _qwen2_vl():
    text = {k: v for k, v in TEXT.items() if k != "head_dim"}
    return _tf().Qwen2VLForConditionalGeneration(_tf().Qwen2VLConfig(
        text_config=dict(text, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2), bos_token_id=1, eos_token_id=2))


def _qwen2_5_vl():
    text = {k: v for k, v in TEXT.items() if k != "head_dim"}
    return _tf().Qwen2_5_VLForConditionalGeneration(_tf().Qwen2_5_VLConfig(
        text_config=dict(text, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           patch_size=4, fullatt_block_indexes=[1]), bos_token_id=1, eos_token_id=2))


BUILD = {"Gemma3ForConditionalGeneration": _gemma3, "Mistral3ForConditionalGeneration": _mistral3,
         "Qwen2VLForConditionalGeneration": _qwen2_vl, "Qwen2_5_VLForConditionalGeneration": _qwen2_5_vl}


def _published(name: str) -> str:
    """Gemma 3's vision tower as its published checkpoints (and mergekit) name it."""
    return re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", name)


def _save(arch: str, seed: int, new: Path, old: Path | None, published: bool = True) -> None:
    torch.manual_seed(seed)
    model = BUILD[arch]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor distinct (no constant norms), so a wrong pairing shows
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.config.architectures = [arch]
    model.save_pretrained(new, save_original_format=False)
    if old is not None:
        model.save_pretrained(old)
        if arch.startswith("Gemma3") and published:
            f = old / "model.safetensors"
            save_file({_published(k): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
        if arch.startswith("Qwen2"):  # mergekit reads the layer count at the top level, as 4.x wrote it
            cfg = json.loads((old / "config.json").read_text())
            cfg["num_hidden_layers"] = cfg["text_config"]["num_hidden_layers"]
            (old / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module", params=list(BUILD), ids=["gemma3", "mistral3", "qwen2_vl", "qwen2_5_vl"])
def saved(request, tmp_path_factory) -> tuple[str, Path]:
    """base, a, b of one architecture under ``new/`` (5.x names) and ``old/`` (mergekit's)."""
    root = tmp_path_factory.mktemp(request.param)
    for seed, name in enumerate(["base", "a", "b"]):
        _save(request.param, seed, root / "new" / name, root / "old" / name)
    return request.param, root


def test_naming_matches_transformers(saved):
    # every 5.x name, renamed to mergekit's by polytask's table, is the name transformers' default
    # save_pretrained gave the same tensor (matched by value: all tensors are distinct)
    arch, root = saved
    new, old = load_file(root / "new/a/model.safetensors"), load_file(root / "old/a/model.safetensors")
    assert len(new) == len(old) > 20
    by_value = {v.numpy().tobytes(): k for k, v in old.items()}
    assert len(by_value) == len(old)
    naming = naming_of(arch, new)
    assert naming.name.startswith("transformers 5") and naming_of(arch, old) == NAMINGS[arch][0]
    assert {k: naming.to_mergekit(k) for k in new} == {k: by_value[v.numpy().tobytes()] for k, v in new.items()}
    assert any(k.startswith("model.language_model.layers.2.") for k in new)


CONFIGS = {
    # text: 3 layers out of a's 0-1 with b's 1-2, then a's layer 1 with b's 1 again (a's layer 1 and
    # b's 1 repeated, b's 0 dropped), a gradient for a over the first slice; the projector from a and base
    "linear_frankenmerge": """
merge_method: linear
base_model: base
modules:
  text_decoder:
    slices:
      - sources:
          - {model: a, layer_range: [0, 2], parameters: {weight: [0.2, 0.8]}}
          - {model: b, layer_range: [1, 3], parameters: {weight: 0.5}}
      - sources:
          - {model: a, layer_range: [1, 2]}
          - {model: b, layer_range: [1, 2]}
  vision_tower:
    models:
      - {model: a, parameters: {weight: 0.3}}
      - {model: b, parameters: {weight: 0.7}}
  multi_modal_projector:
    models: [{model: a}, {model: base}]
parameters: {weight: 1.0}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: base
models:
  - {model: a, parameters: {weight: 0.7}}
  - {model: b, parameters: {weight: 0.4}}
""",
    # TIES with a density gradient over the text layers only (mergekit reads Qwen2-VL's projector
    # MLP as two layers: a gradient there differs on purpose, see polytask.merge.modules)
    "ties": """
merge_method: ties
base_model: base
modules:
  text_decoder:
    models:
      - {model: a, parameters: {weight: 1.0, density: [0.9, 0.4]}}
      - {model: b, parameters: {weight: 0.6, density: 0.5}}
  vision_tower:
    models:
      - {model: a, parameters: {weight: 1.0, density: 0.3}}
      - {model: b, parameters: {weight: 0.5, density: 0.7}}
  multi_modal_projector:
    models:
      - {model: a, parameters: {weight: 0.8, density: 0.5}}
      - {model: b, parameters: {weight: 0.8, density: 0.5}}
parameters: {normalize: true}
""",
    "slerp_per_module": """
merge_method: slerp
base_model: a
modules:
  text_decoder:
    models: [{model: a}, {model: b}]
    parameters: {t: [0.1, 0.9]}
  vision_tower:
    models: [{model: a}, {model: b}]
    parameters: {t: 0.3}
  multi_modal_projector:
    models: [{model: a}, {model: b}]
parameters: {t: 0.6}
""",
}


def _paths(text: str, folder: Path) -> str:
    return re.sub(r"((?:model|base_model): )(base|a|b|c|t|x)\b", lambda m: m.group(1) + str(folder / m.group(2)), text)


def _mergekit(text: str, folder: Path, out: Path, monkeypatch, copy_tokenizer: bool = False) -> dict[str, torch.Tensor]:
    run_mergekit(_paths(text, folder), out, monkeypatch, copy_tokenizer)
    return load_state_dict(out)


def _ours(text: str, folder: Path, out: Path) -> Path:
    return run_ours(_paths(text, folder), out)


def _loads_and_runs(out: Path) -> None:
    """transformers loads every tensor of ``out`` (none missing or unexpected) and runs a forward."""
    saved = load_state_dict(out)
    cfg = json.loads((out / "config.json").read_text())
    cls = getattr(_tf(), cfg["architectures"][0])
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    arch = cfg["architectures"][0]
    naming = naming_of(arch, state)  # in memory: 5.x names; a file in mergekit's names is renamed
    file_naming = naming_of(arch, saved)
    for k, v in saved.items():
        assert torch.equal(state[naming.from_mergekit(file_naming.to_mergekit(k))], v), k
    logits = model(input_ids=torch.tensor([[1, 5, 7, 3]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tensors_as_mergekit_on_the_old_names(saved, name, tmp_path, monkeypatch):
    arch, root = saved
    text = CONFIGS[name]
    theirs = _mergekit(text, root / "old", tmp_path / "theirs", monkeypatch)
    naming = NAMINGS[arch][1]
    theirs = {naming.from_mergekit(k): v for k, v in theirs.items()}
    out = _ours(text, root / "new", tmp_path / "ours")
    ours = load_state_dict(out)
    assert ours.keys() == theirs.keys()
    assert all(k.startswith(("model.", "lm_head.")) for k in ours)
    bad = [k for k in theirs if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not bad, f"{len(bad)} of {len(theirs)} tensors differ, e.g. {bad[:3]}"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 3 and cfg["architectures"] == [arch]
    if name == "linear_frankenmerge":
        # by hand: output layer 2 is 0.5 a[1] + 0.5 b[1] (t = 1 in a one-layer slice; weights 1, 1 normalised)
        a, b = load_state_dict(root / "new" / "a"), load_state_dict(root / "new" / "b")
        q = "model.language_model.layers.{}.self_attn.q_proj.weight"
        torch.testing.assert_close(ours[q.format(2)], 0.5 * a[q.format(1)] + 0.5 * b[q.format(1)], rtol=0, atol=1e-6)
        # layer 0 at t = 0: a[0] weighted 0.2, b[1] 0.5, normalised by 0.7
        torch.testing.assert_close(ours[q.format(0)], (0.2 * a[q.format(0)] + 0.5 * b[q.format(1)]) / 0.7, rtol=0,
                                   atol=1e-6)
    _loads_and_runs(out)


def test_frankenmerge_changes_the_layer_count(saved, tmp_path):
    # 5 text layers out of 3 (a's 0-2 then b's 1-2): the config's text_config.num_hidden_layers
    # is 5 and transformers loads the output and runs it
    arch, root = saved
    text = """
merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources: [{model: a, layer_range: [0, 3]}]
      - sources: [{model: b, layer_range: [1, 3]}]
  vision_tower: {models: [{model: a}]}
  multi_modal_projector: {models: [{model: a}]}
"""
    out = _ours(text, root / "new", tmp_path / "out")
    got, a, b = (load_state_dict(p) for p in (out, root / "new" / "a", root / "new" / "b"))
    q = "model.language_model.layers.{}.mlp.down_proj.weight"
    assert [torch.equal(got[q.format(i)], src[q.format(j)]) for i, (src, j) in
            enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2)])] == [True] * 5
    assert q.format(5) not in got
    text_cfg = json.loads((out / "config.json").read_text())["text_config"]
    assert text_cfg["num_hidden_layers"] == 5
    if arch.startswith("Gemma3"):  # each layer keeps its attention type: source layers 0, 1, 2, 1, 2 of s, f, s
        assert text_cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention",
                                           "full_attention", "sliding_attention"]
    _loads_and_runs(out)


def test_layer_types_follow_the_output_layers_by_hand():
    from polytask.merge.plan import set_layer_count

    node = {"num_hidden_layers": 3, "layer_types": ["s", "f", "s"]}
    assert set_layer_count(node, "num_hidden_layers", 4, [2, 1, 1, 0])
    assert node == {"num_hidden_layers": 4, "layer_types": ["s", "f", "f", "s"]}
    # same count, layers reordered: the types change with them
    node = {"num_hidden_layers": 3, "layer_types": ["s", "f", "x"]}
    assert set_layer_count(node, "num_hidden_layers", 3, [2, 0, 1]) and node["layer_types"] == ["x", "s", "f"]
    # identity: nothing changes; no layer_types (transformers 4 configs): only the count
    node = {"num_hidden_layers": 3, "layer_types": ["s", "f", "x"]}
    assert not set_layer_count(node, "num_hidden_layers", 3, [0, 1, 2])
    node = {"num_hidden_layers": 3}
    assert set_layer_count(node, "num_hidden_layers", 2, [0, 0]) and node == {"num_hidden_layers": 2}
    # a source layer past the reference's list (a deeper donor): the list's pattern repeated
    node = {"num_hidden_layers": 2, "layer_types": ["s", "f"]}
    assert set_layer_count(node, "num_hidden_layers", 3, [0, 3, 4]) and node["layer_types"] == ["s", "f", "s"]
    # Llama 4: RoPE flags per layer, MoE layers by number (layers 1 and 3 of 4 are MoE)
    node = {"num_hidden_layers": 4, "no_rope_layers": [1, 1, 1, 0], "moe_layers": [1, 3]}
    assert set_layer_count(node, "num_hidden_layers", 5, [0, 1, 1, 2, 3])
    assert node == {"num_hidden_layers": 5, "no_rope_layers": [1, 1, 1, 1, 0], "moe_layers": [1, 2, 4]}


def test_one_module_frankenmerge_config_loads(tmp_path):
    # a text-only model (one module) saved by transformers 5 with layer_types: the output config
    # of a 4-layer frankenmerge lists 4 types, so from_pretrained accepts it (it refused before)
    cfg = _tf().Qwen2Config(**{k: v for k, v in TEXT.items() if k != "head_dim"},
                                   layer_types=["full_attention"] * 3, architectures=["Qwen2ForCausalLM"])
    for seed, name in enumerate(["a", "b"]):
        torch.manual_seed(seed)
        _tf().Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / name)
    text = ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
            "  - sources: [{model: b, layer_range: [1, 3]}]\n")
    out = _ours(text, tmp_path, tmp_path / "out")
    got = json.loads((out / "config.json").read_text())
    assert got["num_hidden_layers"] == 4 and got["layer_types"] == ["full_attention"] * 4
    model = _tf().Qwen2ForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4


@pytest.mark.parametrize("base_layout", ["old", "new"])
def test_mixed_layouts_are_renamed_to_the_base(saved, base_layout, tmp_path, monkeypatch):
    # a in the other layout than the base and b: the output keeps the base's names and equals
    # mergekit's on all-old copies (renamed when the base is new)
    arch, root = saved
    other = "new" if base_layout == "old" else "old"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, layout in (("base", base_layout), ("a", other), ("b", base_layout)):
        (mixed / name).symlink_to(root / layout / name)
    text = CONFIGS["ties"]
    theirs = _mergekit(text, root / "old", tmp_path / "theirs", monkeypatch)
    if base_layout == "new":
        theirs = {NAMINGS[arch][1].from_mergekit(k): v for k, v in theirs.items()}
    out = _ours(text, mixed, tmp_path / "ours")
    ours = load_state_dict(out)
    assert ours.keys() == theirs.keys()
    assert not [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    _loads_and_runs(out)


def test_mixed_layouts_bf16_views_same_bits(saved, tmp_path, monkeypatch):
    # bfloat16 inputs merged by the fused kernels from views of the mapped files: the renamed
    # model's views are used (a spy counts them) and the bits equal the all-old merge's
    from polytask.merge.modules import RenamedSource

    arch, root = saved
    for layout in ("old", "new"):
        for name in ("base", "a", "b"):
            d = tmp_path / layout / name
            d.mkdir(parents=True)
            sd = load_file(root / layout / name / "model.safetensors")
            save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, d / "model.safetensors")
            (d / "config.json").write_text((root / layout / name / "config.json").read_text())
    (tmp_path / "mixed").mkdir()
    for name, layout in (("base", "old"), ("a", "new"), ("b", "old")):
        (tmp_path / "mixed" / name).symlink_to(tmp_path / layout / name)
    text = CONFIGS["task_arithmetic"] + "dtype: bfloat16\n"
    seen: list[str] = []
    view = RenamedSource.view
    monkeypatch.setattr(RenamedSource, "view", lambda self, n, rows=None: seen.append(n) or view(self, n, rows))
    want = load_state_dict(_ours(text, tmp_path / "old", tmp_path / "want"))
    assert not seen
    got = load_state_dict(_ours(text, tmp_path / "mixed", tmp_path / "got"))
    assert seen and not [n for n in seen if re.search(NAMINGS[arch][1].marker, n)]  # read under the base's names
    assert got.keys() == want.keys() and all(v.dtype == torch.bfloat16 for v in got.values())
    assert not [k for k in want if not torch.equal(got[k], want[k])]


def test_renamed_source_reads_the_old_names(saved):
    from polytask.merge.engine import _CheckpointSource
    from polytask.merge.io import Checkpoint
    from polytask.merge.modules import RenamedSource

    arch, root = saved
    naming = NAMINGS[arch][1]
    with Checkpoint(root / "new" / "a") as ckpt:
        inner = _CheckpointSource(ckpt, "a")
        src = RenamedSource(inner, {n: naming.to_mergekit(n) for n in inner.names()})
        old = "language_model.model.embed_tokens.weight" if not arch.startswith("Qwen") else "model.embed_tokens.weight"
        new = "model.language_model.embed_tokens.weight"
        assert old in src and new not in src and old in src.names() and len(src.names()) == len(inner.names())
        assert src.spec(old).shape == inner.spec(new).shape
        assert torch.equal(src.load(old), inner.load(new))
        out = torch.empty(3, inner.spec(new).shape[1])
        src.read_rows_into(old, out, 2, 5)
        assert torch.equal(out, inner.load(new)[2:5])
        buf = torch.empty(inner.spec(new).shape)
        src.read_into(old, buf)
        assert torch.equal(buf, inner.load(new)) and torch.equal(src.view(old, (1, 4)), inner.load(new)[1:4])
        with pytest.raises(KeyError):
            src.spec(new)


def test_gemma3_default_save_pretrained_names(tmp_path, monkeypatch):
    # transformers 5's default save of a Gemma 3 it built writes vision_tower.* without
    # vision_model.: a layout of its own, merged with the others and kept as the base's
    arch = "Gemma3ForConditionalGeneration"
    for seed, name in enumerate(["base", "a", "b"]):
        _save(arch, seed, tmp_path / "new" / name, None)
    plain = tmp_path / "plain"
    for seed, name in enumerate(["base", "a"]):
        _save(arch, seed, tmp_path / "unused" / name, plain / name, published=False)
    (plain / "b").symlink_to(tmp_path / "new" / "b")
    assert naming_of(arch, load_state_dict(plain / "base")).name.startswith("transformers 5 save_pretrained")
    out = _ours(CONFIGS["task_arithmetic"], plain, tmp_path / "ours")
    ours = load_state_dict(out)
    base, a, b = (load_state_dict(tmp_path / "new" / n) for n in ("base", "a", "b"))
    w = "model.vision_tower.encoder.layers.1.mlp.fc2.weight"
    want = base[w] + 0.7 * (a[w] - base[w]) + 0.4 * (b[w] - base[w])
    torch.testing.assert_close(ours["vision_tower.encoder.layers.1.mlp.fc2.weight"], want, rtol=0, atol=1e-6)
    assert not [k for k in ours if k.startswith(("model.", "vision_tower.vision_model."))]
    _loads_and_runs(out)


def test_tensor_outside_every_module_is_named(saved, tmp_path):
    # as for mergekit's names: written nowhere, named in a warning
    arch, root = saved
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("base", "a", "b"):
        (folder / name).symlink_to(root / "new" / name)
    x = folder / "x"
    x.mkdir()
    sd = load_file(root / "new/b/model.safetensors")
    save_file({**sd, "model.extra_head.weight": torch.ones(2, 2)}, x / "model.safetensors")
    (x / "config.json").write_text((root / "new/b/config.json").read_text())
    text = CONFIGS["task_arithmetic"].replace("model: b,", "model: x,").replace("base_model: base", "base_model: x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _ours(text, folder, tmp_path / "out")
    said = [str(w.message) for w in caught if "belong to no module" in str(w.message)]
    assert len(said) == 1 and "'model.extra_head.weight'" in said[0] and "1 tensor(s)" in said[0], said
    assert "model.extra_head.weight" not in load_state_dict(out)


ONE = "merge_method: linear\nmodules:\n  {module}:\n    models:\n      - model: {a}\n      - model: {b}\n"
BAD = {
    "unknown module": (ONE.format(module="vision", a="a", b="b"),
                       ["modules.vision", "has no module 'vision'",
                        "multi_modal_projector, text_decoder, vision_tower"]),
    "module missing from a model": (ONE.format(module="vision_tower", a="a", b="t"),
                                    ["modules.vision_tower", "model t", "no tensor of module vision_tower",
                                     "names starting model.vis"]),
    "two layouts in one checkpoint": (ONE.format(module="text_decoder", a="a", b="x"),
                                      ["model x", "two key layouts", "transformers 5", "mergekit's"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_no_output(saved, case, tmp_path, capsys, monkeypatch):
    arch, root = saved
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / name).symlink_to(root / "new" / name)
    new, old = load_file(root / "new/b/model.safetensors"), load_file(root / "old/b/model.safetensors")
    for name, sd in (("t", {k: v for k, v in new.items() if k.startswith(("model.language_model.", "lm_head."))}),
                     ("x", {**{k: v for k, v in new.items() if "language_model" in k},
                            **{k: v for k, v in old.items() if "language_model" not in k}})):
        (folder / name).mkdir()
        save_file(sd, folder / name / "model.safetensors")
        (folder / name / "config.json").write_text((root / "new/b/config.json").read_text())
    text, must = BAD[case]
    (folder / "bad.yaml").write_text(text)
    out = tmp_path / "out"
    code, err = cli(["merge", folder / "bad.yaml", out], capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1, err
    for m in must:
        assert m in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_naming_by_hand():
    # Qwen2-VL: mergekit's model.layers / visual. against 5.x's model.language_model / model.visual.
    arch = "Qwen2VLForConditionalGeneration"
    old, new = NAMINGS[arch]
    assert naming_of(arch, ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]) == old
    assert naming_of(arch, ["lm_head.weight"]) == old  # nothing says otherwise: mergekit's
    assert naming_of(arch, ["model.visual.blocks.0.attn.qkv.weight", "lm_head.weight"]) == new
    assert new.from_mergekit("model.layers.0.mlp.up_proj.weight") == "model.language_model.layers.0.mlp.up_proj.weight"
    assert new.to_mergekit("model.visual.merger.mlp.0.weight") == "visual.merger.mlp.0.weight"
    assert new.to_mergekit("lm_head.weight") == "lm_head.weight"
    with pytest.raises(MergeError, match=r"model m: .*two key layouts.*'visual\.blocks\.0\.w'"):
        naming_of(arch, ["model.language_model.layers.0.w", "visual.blocks.0.w"], "m")
    # Gemma 3's text prefix "language_model." splits into the two 5.x prefixes
    from polytask.merge.modules import ARCHITECTURES, module_of

    g = NAMINGS["Gemma3ForConditionalGeneration"][1].modules(ARCHITECTURES["Gemma3ForConditionalGeneration"])
    assert g["text_decoder"].prefixes == ("model.language_model.", "lm_head.")
    assert g["text_decoder"].stack == "model.language_model.layers."
    assert g["vision_tower"].stack == "model.vision_tower.encoder.layers."
    assert module_of("model.vision_tower.post_layernorm.weight", g) == "vision_tower"
    assert module_of("model.multi_modal_projector.mm_input_projection_weight", g) == "multi_modal_projector"


def test_union_tokenizer_with_mixed_layouts_as_mergekit(tmp_path, monkeypatch):
    # vocabularies of 23, 26 and 15 words; base in mergekit's names, a and c in 5.x's: the text
    # decoder's embedding and head rows are aligned by token as mergekit aligns them on all-old
    # copies, and the output keeps the base's names
    sys.path.insert(0, str(Path(__file__).parent))
    from test_merge_tokenizer import VOCABS, _same_by_token, _tokenizer

    arch = "Mistral3ForConditionalGeneration"
    for seed, name in enumerate(["base", "a", "c"]):
        monkeypatch.setitem(TEXT, "vocab_size", len(VOCABS[name]))
        _save(arch, seed, tmp_path / "new" / name, tmp_path / "old" / name)
        for layout in ("new", "old"):
            _tokenizer(VOCABS[name], tmp_path / layout / name)
    (tmp_path / "mixed").mkdir()
    for name, layout in (("base", "old"), ("a", "new"), ("c", "new")):
        (tmp_path / "mixed" / name).symlink_to(tmp_path / layout / name)
    text = """
merge_method: linear
base_model: base
modules:
  text_decoder:
    models:
      - {model: a, parameters: {weight: 0.5}}
      - {model: c, parameters: {weight: 0.3}}
  vision_tower:
    models:
      - {model: a, parameters: {weight: 0.5}}
      - {model: c, parameters: {weight: 0.5}}
parameters: {weight: 0.2}
tokenizer_source: union
"""
    _mergekit(text, tmp_path / "old", tmp_path / "theirs", monkeypatch, copy_tokenizer=True)
    ours = _ours(text, tmp_path / "mixed", tmp_path / "ours")
    _same_by_token(tmp_path / "theirs", ours)
    assert json.loads((ours / "config.json").read_text())["text_config"]["vocab_size"] == 26


def test_renaming_that_would_merge_two_tensors_is_refused(tmp_path):
    # a Qwen2-VL in 5.x names holding model.extra.w (text decoder in 4.x terms is "model.") and
    # model.language_model.extra.w: both would be model.extra.w under the 4.x base's names
    from polytask.merge.modules import same_naming

    class Names:
        def __init__(self, names):
            self._names = names

        def names(self):
            return list(self._names)

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    base = Names(["model.layers.0.w", "model.extra.w"])
    other = Names(["model.language_model.layers.0.w", "model.language_model.extra.w", "model.extra.w"])
    with pytest.raises(MergeError, match=r"^model o: tensors 'model\.language_model\.extra\.w' and "
                                         r"'model\.extra\.w' \(transformers 5.*\) are both named 'model\.extra\.w' "
                                         r"in the layout of model b \(mergekit's"):
        same_naming(tmp_path, [base, other], ["b", "o"], 0)
    got = same_naming(tmp_path, [base, Names(other.names()[:2])], ["b", "o"], 0)
    assert got[0] is base and got[1].names() == ["model.layers.0.w", "model.extra.w"]


def test_every_layout_keeps_mergekit_modules():
    # each weight mergekit 0.1.5 defines for a module, renamed into each key layout, falls in the
    # module of the same name in that layout's table, and its layer templates in that module's stack
    pytest.importorskip("mergekit")
    from mergekit.architecture.json_definitions import NAME_TO_ARCH

    from polytask.merge.modules import ARCHITECTURES, module_of

    checked = 0
    for arch, namings in NAMINGS.items():
        (definition,) = NAME_TO_ARCH[arch]
        for naming in namings:
            table = naming.modules(ARCHITECTURES[arch])
            assert set(table) == set(definition.modules)
            for module, d in definition.modules.items():
                prefix = d.weight_prefix or ""
                spec = d.architecture.definition
                for w in [*spec.pre_weights, *spec.post_weights]:
                    full = naming.from_mergekit(prefix + w.name)
                    assert module_of(full, table) == module, (arch, naming.name, full)
                    checked += 1
                for w in spec.layer_templates.weights:
                    full = naming.from_mergekit(prefix + w.name.replace("${layer_index}", "0"))
                    assert module_of(full, table) == module, (arch, naming.name, full)
                    if "${layer_index}" in w.name:
                        assert full.startswith(table[module].stack + "0."), (arch, naming.name, full)
                    checked += 1
    assert checked > 200


def test_llama4_frankenmerge_loads(tmp_path):
    # Llama 4 keeps mergekit's names in transformers 5; a frankenmerge of MoE and dense layers
    # (layers 1 and 3 of 4 are MoE) loads only if moe_layers and no_rope_layers follow the layers
    cfg = _tf().Llama4Config(
        text_config=dict(hidden_size=16, intermediate_size=32, intermediate_size_mlp=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=64, num_local_experts=2,
                         interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4, vision_output_dim=16, projector_input_dim=16,
                           projector_output_dim=16))
    cfg.architectures = ["Llama4ForConditionalGeneration"]
    assert cfg.text_config.moe_layers == [1, 3]
    for seed, name in enumerate(["a", "b"]):
        torch.manual_seed(seed)
        _tf().Llama4ForConditionalGeneration(cfg).save_pretrained(tmp_path / name)
    text = """
merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources: [{model: a, layer_range: [0, 2]}]
      - sources: [{model: b, layer_range: [1, 4]}]
  vision_model: {models: [{model: a}]}
  multi_modal_projector: {models: [{model: a}]}
"""
    out = _ours(text, tmp_path, tmp_path / "out")
    text_cfg = json.loads((out / "config.json").read_text())["text_config"]
    assert (text_cfg["num_hidden_layers"], text_cfg["moe_layers"], text_cfg["no_rope_layers"]) == (
        5, [1, 2, 4], [1, 1, 1, 1, 0])
    assert text_cfg["layer_types"] == ["chunked_attention"] * 4 + ["full_attention"]
    got, b = load_state_dict(out), load_state_dict(tmp_path / "b")
    e = "language_model.model.layers.{}.feed_forward.experts.gate_up_proj"
    assert torch.equal(got[e.format(4)], b[e.format(3)])
    model, info = _tf().Llama4ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    logits = model(input_ids=torch.tensor([[1, 5, 7, 3]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()
