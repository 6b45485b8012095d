"""Multi-module merges end to end for T5, Whisper, Llama 4, Qwen3-VL and Qwen3-VL-MoE.

Tiny random models (a base and two "fine-tunes", every tensor distinct) are built from
transformers 5 configs and saved with its default ``save_pretrained``, whose names are mergekit
0.1.5's for these architectures. The same config (linear, task arithmetic, TIES, a frankenmerge
that drops and repeats layers) is merged by polytask and by mergekit (run here); every tensor must
be equal bit for bit, and the output must load with ``from_pretrained`` (no key missing or
unexpected) and run a forward. mergekit 0.1.5 cannot merge Whisper's decoder under its real names
(its definition's prefix ``model.decoder`` lacks the dot: "Tensor model.decoderembed_tokens.weight
required but not present"): it merges copies whose decoder tensors are named that way, its output
is renamed back, and the decoder is also checked by hand on the real names. TIES and task
arithmetic run on bfloat16 copies too (the fused kernels), and T5 in its published layout (the
embedding in three copies, an untied head).

Mllama (modules inferred: mergekit 0.1.5 has no definition) has two key layouts; polytask's table
is checked against transformers' saves, mixed-layout merges against mergekit (which names the
5.x copies' modules), a frankenmerge that repeats the cross-attention layer loads, and a PEFT
LoRA merged over the published layout equals PEFT's merge_and_unload.

``tokenizer_source: union`` on T5: its embedding ``shared.weight`` is token-indexed (its rows aligned by
token, as mergekit's T5 definition gives it ``vocabulary_axis`` 0)."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
from _merge_helpers import run_mergekit, run_ours
import torch
import yaml
from safetensors.torch import load_file, save_file

from polytask.merge import load_state_dict, run_merge

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tf():
    return pytest.importorskip("transformers")


VOCAB = 64


def _t5():
    cfg = _tf().T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3,
                         num_heads=2, feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    return _tf().T5ForConditionalGeneration(cfg)


def _whisper():
    cfg = _tf().WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, encoder_layers=2, decoder_layers=3, d_model=16,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                              decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16,
                              decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              suppress_tokens=None, begin_suppress_tokens=None)
    return _tf().WhisperForConditionalGeneration(cfg)


def _llama4():
    # 4 text layers, layers 1 and 3 MoE (2 experts), layer 3 without RoPE
    cfg = _tf().Llama4Config(
        text_config=dict(hidden_size=16, intermediate_size=32, intermediate_size_mlp=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=VOCAB,
                         num_local_experts=2, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4, vision_output_dim=16, projector_input_dim=16,
                           projector_output_dim=16))
    return _tf().Llama4ForConditionalGeneration(cfg)


def _qwen3_vl(moe: bool):
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]})
    if moe:
        text.update(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, decoder_sparse_step=1)
    vision = dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0, 1, 2],
                  num_position_embeddings=16)
    tf = _tf()
    config, model = ((tf.Qwen3VLMoeConfig, tf.Qwen3VLMoeForConditionalGeneration) if moe else
                     (tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration))
    return model(config(text_config=text, vision_config=vision, tie_word_embeddings=False))


BUILD = {"T5ForConditionalGeneration": _t5, "WhisperForConditionalGeneration": _whisper,
         "Llama4ForConditionalGeneration": _llama4,
         "Qwen3VLForConditionalGeneration": lambda: _qwen3_vl(False),
         "Qwen3VLMoeForConditionalGeneration": lambda: _qwen3_vl(True)}
IDS = ["t5", "whisper", "llama4", "qwen3_vl", "qwen3_vl_moe"]

#: each architecture's modules, the one frankenmerged (its layers) first
MODULES = {"T5ForConditionalGeneration": ["decoder", "encoder", "shared"],
           "WhisperForConditionalGeneration": ["decoder", "encoder"],
           "Llama4ForConditionalGeneration": ["text_decoder", "vision_model", "multi_modal_projector"],
           "Qwen3VLForConditionalGeneration": ["text_decoder", "vision_tower", "multi_modal_projector"],
           "Qwen3VLMoeForConditionalGeneration": ["text_decoder", "vision_tower", "multi_modal_projector"]}

#: the frankenmerge's slices of the first module, each a list of (model, first layer, end): output
#: layers from source layers 0, 1, a repeated 1 and (but Llama 4) a repeated 0 or 1, the last layer
#: dropped (Llama 4) or merged with another. T5's block 0 alone holds relative_attention_bias and
#: Llama 4 alternates dense and MoE layers, so the sources of a slice hold the same kind of layer.
_QWEN3_SLICES = [[("a", 0, 2), ("b", 1, 3)], [("a", 1, 2), ("b", 1, 2)], [("b", 0, 1)]]
SLICES = {
    "T5ForConditionalGeneration": [[("a", 0, 2), ("b", 0, 2)], [("a", 1, 2), ("b", 1, 2)], [("a", 1, 2), ("b", 2, 3)]],
    "WhisperForConditionalGeneration": _QWEN3_SLICES,
    "Llama4ForConditionalGeneration": [[("a", 0, 2), ("b", 0, 2)], [("a", 1, 2), ("b", 3, 4)]],
    "Qwen3VLForConditionalGeneration": _QWEN3_SLICES,
    "Qwen3VLMoeForConditionalGeneration": _QWEN3_SLICES,
}
#: the frankenmerge's output layers (the source layers above: 4 out of 3, or Llama 4's 3 out of 4)
SLICED_LAYERS = {arch: 3 if arch.startswith("Llama4") else 4 for arch in SLICES}


def _config(name: str, arch: str) -> str:
    """The YAML of merge ``name`` for ``arch`` (model names base, a, b)."""
    first, *others = MODULES[arch]
    if name == "linear":  # top-level models: every module; the gradient runs over each module's layers
        return ("merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: [0.2, 0.8]}}\n"
                "  - {model: b, parameters: {weight: 0.5}}\n  - {model: base, parameters: {weight: 0.3}}\n")
    if name == "task_arithmetic":
        return ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                "  - {model: a, parameters: {weight: 0.7}}\n  - {model: b, parameters: {weight: [0.4, -0.2]}}\n")
    if name == "ties":  # per module: a density gradient over the first module's layers
        lines = ["merge_method: ties", "base_model: base", "modules:",
                 f"  {first}:", "    models:", "      - {model: a, parameters: {weight: 1.0, density: [0.9, 0.4]}}",
                 "      - {model: b, parameters: {weight: 0.6, density: 0.5}}"]
        for k, m in enumerate(others):
            density = 0.3 + k / 5
            lines += [f"  {m}:", "    models:",
                      f"      - {{model: a, parameters: {{weight: 0.8, density: {density}}}}}",
                      "      - {model: b, parameters: {weight: 0.5, density: 0.7}}"]
        return "\n".join(lines + ["parameters: {normalize: true}", ""])
    assert name == "slices"
    lines = ["merge_method: linear", "modules:", f"  {first}:", "    slices:"]
    for sources in SLICES[arch]:
        lines.append("      - sources:")
        lines += [f"          - {{model: {m}, layer_range: [{lo}, {hi}]}}" for m, lo, hi in sources]
    lines.append("    parameters: {weight: [0.3, 0.9]}")
    for m in others:
        lines += [f"  {m}:", "    models:", "      - {model: a, parameters: {weight: 0.25}}",
                  "      - {model: b, parameters: {weight: 0.75}}"]
    return "\n".join(lines + [""])


#: the merges; "@bf16": on bfloat16 copies of the inputs (the fused kernels, where numba is installed)
CONFIGS = ["linear", "task_arithmetic", "ties", "slices", "ties@bf16", "task_arithmetic@bf16"]


def _save(arch: str, seed: int, folder: Path) -> None:
    torch.manual_seed(seed)
    model = BUILD[arch]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor distinct (no constant norms), so a wrong pairing shows
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.config.architectures = [arch]
    model.save_pretrained(folder)


_WHISPER_DECODER = re.compile(r"^model\.decoder\.")


def _undotted(folder: Path, out: Path) -> None:
    """Whisper's checkpoint in ``folder`` with ``model.decoder.`` written ``model.decoder`` (the
    names mergekit 0.1.5's definition looks for: its decoder prefix lacks the dot, so on the real
    names it stops at "Tensor model.decoderembed_tokens.weight required but not present")."""
    out.mkdir(parents=True)
    sd = load_file(folder / "model.safetensors")
    save_file({_WHISPER_DECODER.sub("model.decoder", k): v for k, v in sd.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    (out / "config.json").write_text((folder / "config.json").read_text())


def _dotted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"^model\.decoder(?!\.)", "model.decoder.", k): v for k, v in state.items()}


@pytest.fixture(scope="module", params=list(BUILD), ids=IDS)
def saved(request, tmp_path_factory) -> tuple[str, Path]:
    """base, a, b of one architecture (and for Whisper their copies for mergekit under ``mk/``)."""
    root = tmp_path_factory.mktemp(request.param)
    for seed, name in enumerate(["base", "a", "b"]):
        _save(request.param, seed, root / name)
        if request.param.startswith("Whisper"):
            _undotted(root / name, root / "mk" / name)
    return request.param, root


def _paths(text: str, folder: Path) -> str:
    return re.sub(r"((?:model|base_model): )(base|a|b)\b", lambda m: m.group(1) + str(folder / m.group(2)), text)


def _mergekit(text: str, folder: Path, out: Path, monkeypatch) -> dict[str, torch.Tensor]:
    run_mergekit(_paths(text, folder), out, monkeypatch)
    return load_state_dict(out)


def _ours(text: str, folder: Path, out: Path) -> Path:
    return run_ours(_paths(text, folder), out, quiet=True)


def _forward(model, arch: str) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 7, 3]])
    if arch.startswith("T5"):
        return model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
    if arch.startswith("Whisper"):
        feats = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
        return model(input_features=feats, decoder_input_ids=ids[:, :3]).logits
    return model(input_ids=ids).logits


def _loads_and_runs(out: Path, arch: str) -> None:
    """transformers loads every tensor of ``out`` (none missing, unexpected or mismatched, each
    equal to the file's) and runs a forward to finite logits."""
    saved = load_state_dict(out)
    model, info = getattr(_tf(), arch).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = model.state_dict()
    from polytask.merge.modules import naming_of, namings_of

    if namings_of(arch):  # Mllama: a file in the published names is held under 5.x's
        memory, file = namings_of(arch)[1], naming_of(arch, saved)
        saved = {memory.from_mergekit(file.to_mergekit(k)): v for k, v in saved.items()}
    assert not [k for k, v in saved.items() if not torch.equal(state[k], v)]
    logits = _forward(model, arch)
    assert logits.shape[-1] == VOCAB and torch.isfinite(logits).all()


def _bf16_copy(folder: Path, out: Path) -> None:
    for model in ("base", "a", "b"):
        (out / model).mkdir(parents=True)
        sd = load_file(folder / model / "model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, out / model / "model.safetensors",
                  metadata={"format": "pt"})
        (out / model / "config.json").write_text((folder / model / "config.json").read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_same_tensors_as_mergekit_and_loads(saved, name, tmp_path, monkeypatch):
    arch, root = saved
    name, _, dtype = name.partition("@")
    if dtype:
        _bf16_copy(root, tmp_path / "in")
        if arch.startswith("Whisper"):
            _bf16_copy(root / "mk", tmp_path / "in" / "mk")
        root = tmp_path / "in"
    text = _config(name, arch)
    if arch.startswith("Whisper"):  # mergekit merges the decoder only under its prefix without the dot
        theirs = _dotted(_mergekit(text, root / "mk", tmp_path / "theirs", monkeypatch))
    else:
        theirs = _mergekit(text, root, tmp_path / "theirs", monkeypatch)
    out = _ours(text, root, tmp_path / "ours")
    ours = load_state_dict(out)
    assert ours.keys() == theirs.keys()
    bad = [k for k in theirs if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not bad, f"{len(bad)} of {len(theirs)} tensors differ, e.g. {bad[:3]}"
    assert {v.dtype for v in ours.values()} == {torch.bfloat16 if dtype else torch.float32}
    # each module's layer count is mergekit's (its config keys, where the file has them)
    from polytask.merge.modules import ARCHITECTURES

    cfg_o, cfg_t = (json.loads((d / "config.json").read_text()) for d in (out, tmp_path / "theirs"))
    counts = {}
    for module_name, module in ARCHITECTURES[arch].items():
        for key in module.layers_keys[:1]:
            *parents, leaf = key.split(".")
            node_o, node_t = cfg_o, cfg_t
            for p in parents:
                node_o, node_t = node_o[p], node_t[p]
            if leaf in node_t:
                assert node_o[leaf] == node_t[leaf], key
                counts[module_name] = node_o[leaf]
    if name == "slices":
        assert counts[MODULES[arch][0]] == SLICED_LAYERS[arch]
    _loads_and_runs(out, arch)


def test_t5_published_layout_untied_head_as_mergekit_and_loads(tmp_path, monkeypatch):
    # T5 v1.1 / FLAN-T5 files hold the embedding three times (shared, encoder.embed_tokens,
    # decoder.embed_tokens: equal) and an untied lm_head (transformers 5 forces the config's
    # tie_word_embeddings to True and unties on load where the values differ); the encoder's and
    # decoder's copies belong to their modules, lm_head to shared, each merged as mergekit does
    arch = "T5ForConditionalGeneration"
    for seed, model in enumerate(["base", "a", "b"]):
        _save(arch, seed, tmp_path / model)
        f = tmp_path / model / "model.safetensors"
        sd = load_file(f)
        head = torch.randn(sd["shared.weight"].shape, generator=torch.Generator().manual_seed(seed + 7))
        save_file({**sd, "encoder.embed_tokens.weight": sd["shared.weight"].clone(),
                   "decoder.embed_tokens.weight": sd["shared.weight"].clone(), "lm_head.weight": head}, f,
                  metadata={"format": "pt"})
    for name in ("ties", "slices"):
        text = _config(name, arch)
        theirs = _mergekit(text, tmp_path, tmp_path / f"theirs_{name}", monkeypatch)
        out = _ours(text, tmp_path, tmp_path / f"ours_{name}")
        ours = load_state_dict(out)
        assert ours.keys() == theirs.keys() and "lm_head.weight" in ours and "decoder.embed_tokens.weight" in ours
        assert not [k for k in theirs if not torch.equal(ours[k], theirs[k])]
        # TIES' shared module and the decoder merge their copies of the embedding apart
        assert not torch.equal(ours["shared.weight"], ours["lm_head.weight"])
        _loads_and_runs(out, arch)


def test_whisper_decoder_by_hand(tmp_path):
    # mergekit 0.1.5 merges Whisper's decoder only on renamed copies (above): the real names'
    # decoder checked by hand. Task arithmetic, b's weight a gradient [0.4, -0.2] over the 3
    # decoder layers: 0.4, 0.1, -0.2 for layers 0, 1, 2 (t = i / 2); the tensors outside the layers
    # (embeddings before them, the final layer norm after) take t = 0 (0.4), as in mergekit's
    # plan_module (one ConfigReader at t = 0 for pre and post weights); a's weight 0.7 everywhere
    arch = "WhisperForConditionalGeneration"
    for seed, name in enumerate(["base", "a", "b"]):
        _save(arch, seed, tmp_path / name)
    got = load_state_dict(_ours(_config("task_arithmetic", arch), tmp_path, tmp_path / "out"))
    base, a, b = (load_state_dict(tmp_path / n) for n in ("base", "a", "b"))
    decoder = [k for k in base if k.startswith("model.decoder.")]
    assert len(decoder) > 40 and got.keys() == base.keys()
    for k in decoder:
        layer = re.match(r"model\.decoder\.layers\.(\d)\.", k)
        w_b = 0.4 - 0.3 * int(layer.group(1)) if layer else 0.4
        want = base[k] + 0.7 * (a[k] - base[k]) + w_b * (b[k] - base[k])
        torch.testing.assert_close(got[k], want, rtol=0, atol=2e-6, msg=k)


# -- Mllama (Llama 3.2 Vision): modules inferred (mergekit 0.1.5 has no definition), two layouts --
MLLAMA = "MllamaForConditionalGeneration"


def _mllama():
    # pad_token_id within the tiny vocabulary: the default (128004) is past it and the embedding's
    # padding_idx check stops the build (the earlier failure was this, not a transformers limit)
    cfg = _tf().MllamaConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, cross_attention_layers=[1], pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, image_size=16, patch_size=4, vision_output_dim=32,
                           intermediate_layers_indices=[0], max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2]]))
    return _tf().MllamaForConditionalGeneration(cfg)


@pytest.fixture(scope="module")
def mllama(tmp_path_factory) -> Path:
    """base, a, b under ``new/`` (transformers 5's in-memory names) and ``old/`` (its default
    save_pretrained: the published checkpoints' names)."""
    root = tmp_path_factory.mktemp("mllama")
    for seed, name in enumerate(["base", "a", "b"]):
        torch.manual_seed(seed)
        model = _mllama()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.config.architectures = [MLLAMA]
        model.save_pretrained(root / "new" / name, save_original_format=False)
        model.save_pretrained(root / "old" / name)
    return root


def test_mllama_naming_matches_transformers(mllama):
    # every 5.x name, renamed to the published layout by polytask's table, is the name
    # transformers' default save gave the same tensor (matched by value: all tensors distinct)
    from polytask.merge.modules import naming_of, namings_of

    new, old = (load_file(mllama / d / "a" / "model.safetensors") for d in ("new", "old"))
    assert len(new) == len(old) > 60
    by_value = {v.numpy().tobytes(): k for k, v in old.items()}
    assert len(by_value) == len(old)
    published, memory = namings_of(MLLAMA)
    assert naming_of(MLLAMA, new) is memory and naming_of(MLLAMA, old) is published
    assert {k: memory.to_mergekit(k) for k in new} == {k: by_value[v.numpy().tobytes()] for k, v in new.items()}
    assert memory.from_mergekit("language_model.lm_head.weight") == "lm_head.weight"


MLLAMA_SLICES = """
merge_method: linear
modules:
  model.language_model.layers:
    slices:
      - sources: [{model: a, layer_range: [0, 2]}]
      - sources: [{model: a, layer_range: [1, 2]}, {model: b, layer_range: [1, 2]}]
      - sources: [{model: b, layer_range: [2, 3]}]
  model.vision_model.transformer.layers:
    slices:
      - sources: [{model: b, layer_range: [0, 1]}]
      - sources: [{model: a, layer_range: [0, 2]}]
  model.vision_model.global_transformer.layers: {models: [{model: a}, {model: b}]}
  default: {models: [{model: a, parameters: {weight: 0.3}}, {model: b}]}
parameters: {weight: 1.0}
"""


@pytest.mark.parametrize("name", ["ties", "slices"])
def test_mllama_mixed_layouts_as_mergekit_and_loads(mllama, name, tmp_path, monkeypatch):
    # base published, a in 5.x names, b published: the output keeps the reference's names and equals
    # mergekit's merge of the 5.x copies (mergekit under transformers 5 infers the modules from
    # the model it builds: 5.x names) renamed. The frankenmerge (text layers 0, 1, 1, 2 with the
    # cross-attention layer 1 repeated; vision layers 0, 0, 1) loads: cross_attention_layers
    # [1, 2] and the vision count 3 (mergekit writes neither)
    from polytask.merge.modules import namings_of

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for model, layout in (("base", "old"), ("a", "new"), ("b", "old")):
        (mixed / model).symlink_to(mllama / layout / model)
    text = (_config("ties", "T5ForConditionalGeneration").split("modules:")[0] +
            "models:\n  - {model: a, parameters: {weight: 1.0, density: [0.9, 0.4]}}\n"
            "  - {model: b, parameters: {weight: 0.6, density: 0.5}}\nparameters: {normalize: true}\n"
            if name == "ties" else MLLAMA_SLICES)
    theirs = _mergekit(text, mllama / "new", tmp_path / "theirs", monkeypatch)
    published, memory = namings_of(MLLAMA)
    out = _ours(text, mixed, tmp_path / "ours")
    ours = {memory.from_mergekit(k): v for k, v in load_state_dict(out).items()}
    # the reference's layout: the base's (published) for TIES, else the first model's (a: 5.x's)
    assert {k.startswith(("model.", "lm_head.")) for k in load_state_dict(out)} == {name == "slices"}
    assert ours.keys() == theirs.keys()
    bad = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not bad, f"{len(bad)} of {len(theirs)} tensors differ, e.g. {bad[:3]}"
    cfg = json.loads((out / "config.json").read_text())
    if name == "slices":
        assert (cfg["text_config"]["num_hidden_layers"], cfg["text_config"]["cross_attention_layers"],
                cfg["vision_config"]["num_hidden_layers"]) == (4, [1, 2], 3)
    _loads_and_runs(out, MLLAMA)


def test_mllama_lora_into_the_published_layout_equals_peft(mllama, tmp_path):
    # a PEFT adapter of the 5.x model (its modules in 5.x names) merged over the base saved by
    # transformers' default save (published names): PEFT's merge_and_unload, bit for bit, in the
    # base's names
    peft = pytest.importorskip("peft")
    from polytask.merge.modules import namings_of

    published, memory = namings_of(MLLAMA)
    model = getattr(_tf(), MLLAMA).from_pretrained(mllama / "old" / "base")
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"],
                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    assert any(k.startswith("base_model.model.model.language_model.")
               for k in load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    (tmp_path / "base").symlink_to(mllama / "old" / "base")
    text = ("merge_method: linear\nbase_model: base\nmodels:\n  - {model: ad, parameters: {weight: 1.0}}\n"
            "  - {model: base, parameters: {weight: 0.0}}\n")
    ours = load_state_dict(_ours(text, tmp_path, tmp_path / "out"))
    assert not [k for k in ours if k.startswith("model.")]
    got = {memory.from_mergekit(k): v for k, v in ours.items()}
    assert got.keys() == merged.keys()
    assert not [k for k in got if not torch.equal(got[k], merged[k])]
    base = {memory.from_mergekit(k): v for k, v in load_state_dict(mllama / "old" / "base").items()}
    assert sum(not torch.equal(got[k], base[k]) for k in got) >= 6  # the adapter did change weights


def test_t5_union_tokenizer_as_mergekit(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_merge_tokenizer import VOCABS, _same_by_token, _tokenizer

    for seed, (model, words) in enumerate((("base", VOCABS["base"]), ("a", VOCABS["a"]), ("b", VOCABS["c"]))):
        cfg = _tf().T5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3,
                             num_heads=2, feed_forward_proj="gated-gelu", decoder_start_token_id=0)
        torch.manual_seed(seed)
        m = _tf().T5ForConditionalGeneration(cfg)
        m.config.architectures = ["T5ForConditionalGeneration"]
        m.save_pretrained(tmp_path / model)
        _tokenizer(words, tmp_path / model)
    text = ("merge_method: linear\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 0.5}}\n"
            "  - {model: b, parameters: {weight: 0.3}}\n  - {model: base, parameters: {weight: 0.2}}\n"
            "tokenizer_source: union\n")
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mergekit_run(MergeConfiguration.model_validate(yaml.safe_load(_paths(text, tmp_path))), str(tmp_path / "theirs"),
                 MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False, random_seed=0))
    assert load_state_dict(tmp_path / "theirs")["shared.weight"].shape[0] == 26
    _same_by_token(tmp_path / "theirs", _ours(text, tmp_path, tmp_path / "ours"))


@pytest.mark.parametrize("saved", ["Llama4ForConditionalGeneration"], indirect=True)
def test_llama4_dense_with_moe_layer_is_one_line_exit_2(saved, tmp_path, capsys, monkeypatch):
    # a's dense layer 0 with b's MoE layer 1 in one slice: the tensors only one source has are
    # refused naming the tensor and the model. mergekit 0.1.5 (its definition marks them optional)
    # writes both sets, the dense MLP from a alone and the experts from b alone: a layer
    # transformers loads as neither
    from polytask.cli import main

    arch, root = saved
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(_paths("merge_method: linear\nmodules:\n  text_decoder:\n    slices:\n      - sources:\n"
                          "          - {model: a, layer_range: [0, 1]}\n          - {model: b, layer_range: [1, 2]}\n"
                          "parameters: {weight: 1.0}\n", root))
    monkeypatch.setattr(sys, "argv", ["polytask", "merge", str(cfg), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "modules.text_decoder" in err and "feed_forward" in err and "model " in err, err
    assert not (tmp_path / "out").exists()


def test_layer_lists_follow_the_output_layers_by_hand():
    from polytask.merge.plan import set_layer_count

    # Qwen2.5-VL: blocks 1 and 3 of 4 have full attention; output blocks from 0, 1, 1, 3, 2
    node = {"depth": 4, "fullatt_block_indexes": [1, 3]}
    assert set_layer_count(node, "depth", 5, [0, 1, 1, 3, 2])
    assert node == {"depth": 5, "fullatt_block_indexes": [1, 2, 3]}
    # Mllama: the cross-attention layer 1 repeated and layer 3 dropped
    node = {"num_hidden_layers": 4, "cross_attention_layers": [1, 3]}
    assert set_layer_count(node, "num_hidden_layers", 3, [0, 1, 1]) and node["cross_attention_layers"] == [1, 2]
    # tapped layers stay in place: kept silently; moved (layer 1 is source 0) or gone (no layer 2): a warning
    node = {"depth": 3, "deepstack_visual_indexes": [0, 1, 2]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_layer_count(node, "depth", 4, [0, 1, 2, 2])
    assert node["deepstack_visual_indexes"] == [0, 1, 2]
    with pytest.warns(RuntimeWarning, match=r"^deepstack_visual_indexes: .* \[0, 1, 2\] come from .* \[0, 0, None\]"):
        set_layer_count(node, "depth", 2, [0, 0])
    assert node == {"depth": 2, "deepstack_visual_indexes": [0, 1, 2]}


@pytest.mark.parametrize("saved", ["Qwen3VLForConditionalGeneration"], indirect=True)
def test_qwen3_vl_vision_frankenmerge_warns_on_deepstack(saved, tmp_path):
    # vision blocks 0, 0, 1 out of 0, 1, 2: the deepstack mergers read blocks 0, 1, 2, now sources
    # 0, 0, 1: named in a warning, the list kept (three mergers), the output loads
    arch, root = saved
    text = ("merge_method: passthrough\nmodules:\n  vision_tower:\n    slices:\n"
            "      - sources: [{model: a, layer_range: [0, 1]}]\n      - sources: [{model: b, layer_range: [0, 2]}]\n"
            "  text_decoder: {models: [{model: a}]}\n  multi_modal_projector: {models: [{model: a}]}\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_paths(text, root))
    with pytest.warns(RuntimeWarning, match=r"deepstack_visual_indexes: .* \[0, 1, 2\] come from .* \[0, 0, 1\]"):
        out = run_merge(cfg, tmp_path / "out")
    vision = json.loads((out / "config.json").read_text())["vision_config"]
    assert (vision["depth"], vision["deepstack_visual_indexes"]) == (3, [0, 1, 2])
    _loads_and_runs(out, arch)
