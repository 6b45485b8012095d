"""Merged tokenizers and token-aligned embeddings: the same tensors (bit for bit) and the same
tokenizer files as mergekit 0.1.5 on small Llama-shaped models with different WordLevel
vocabularies written here (mergekit is skipped inside each test that runs it)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from polytask.cli import main
from polytask.merge import load_state_dict, run_merge
from polytask.merge.vocab import VocabPlan, align_rows

SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(20)]
# base: 23 tokens; a: the base's + xa, xb, zz (the only new tokens); b: lacks w0-w4, the rest
# reordered, and zz; c: w0-w9, xa and zz. With base, a, b, c: w0-w4 and w10-w19 take the base's
# row where missing, xb a's, xa the mean of 2 rows, zz the mean of 3
VOCABS = {
    "base": SPECIAL + WORDS,
    "a": SPECIAL + WORDS + ["xa", "xb", "zz"],
    "b": SPECIAL + WORDS[:4:-1] + ["zz"],
    "c": SPECIAL + WORDS[:10] + ["xa", "zz"],
}


def _tokenizer(words: list[str], path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)


def _model(path: Path, words: list[str], seed: int, dtype: torch.dtype, tied: bool = False,
           tokenizer: bool = True) -> None:
    """A 2-layer Llama-shaped checkpoint (hidden 16) whose rows are ``words``."""
    g = torch.Generator().manual_seed(seed)
    h, inter, vocab = 16, 32, len(words)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g)}
    for i in range(2):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = torch.randn(h, generator=g)
        sd[pre + "post_attention_layernorm.weight"] = torch.randn(h, generator=g)
        for n in "qkvo":
            sd[pre + f"self_attn.{n}_proj.weight"] = torch.randn(h, h, generator=g)
        sd[pre + "mlp.gate_proj.weight"] = torch.randn(inter, h, generator=g)
        sd[pre + "mlp.up_proj.weight"] = torch.randn(inter, h, generator=g)
        sd[pre + "mlp.down_proj.weight"] = torch.randn(h, inter, generator=g)
    sd["model.norm.weight"] = torch.randn(h, generator=g)
    if not tied:
        sd["lm_head.weight"] = torch.randn(vocab, h, generator=g)
    path.mkdir(parents=True)
    save_file({k: v.to(dtype) for k, v in sd.items()}, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "torch_dtype": str(dtype).removeprefix("torch."), "tie_word_embeddings": tied}))
    if tokenizer:
        _tokenizer(words, path)


def _models(root: Path, dtype: torch.dtype = torch.float32, tied: bool = False, **extra: list[str]) -> Path:
    for seed, (name, words) in enumerate({**VOCABS, **extra}.items()):
        _model(root / name, words, seed, dtype, tied)
    return root


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def models(request, tmp_path: Path) -> Path:
    return _models(tmp_path / "m", request.param)


def _mergekit(text: str, folder: Path, out: Path, monkeypatch) -> Path:
    """Run mergekit itself on ``text`` (model names relative to ``folder``)."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = re.sub(r"((?:model|base_model): )(base|a|b|c|d|t|u)\b", lambda m: m.group(1) + str(folder / m.group(2)), text)
    text = re.sub(r"((?:source|tokenizer_source): )(a|b|c|d|t|u)\b", lambda m: m.group(1) + str(folder / m.group(2)),
                  text)  # "base" there is the keyword
    mergekit_run(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
                 MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False, random_seed=0))
    return out


def _ours(text: str, folder: Path, out: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as for mergekit: transformers notes it in tokenizer_config.json
    cfg = folder / f"{out.name}.yaml"
    cfg.write_text(text)
    return run_merge(cfg, out)


def _same_tensors(theirs: Path, ours: Path) -> None:
    a, b = load_state_dict(theirs), load_state_dict(ours)
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} of {len(a)} tensors differ, e.g. {bad[:3]}"


def _same_files(theirs: Path, ours: Path, names=("tokenizer.json", "tokenizer_config.json")) -> None:
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
    assert {p.name for p in ours.iterdir()} & tokenizer_files == {p.name for p in theirs.iterdir()} & tokenizer_files
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == \
        json.loads((theirs / "config.json").read_text())["vocab_size"]


CONFIGS = {
    "union_linear": """
merge_method: linear
base_model: base
models:
  - model: a
    parameters: {weight: 0.5}
  - model: b
    parameters: {weight: 0.3}
  - model: c
    parameters: {weight: 0.4}
parameters: {weight: 0.2}
tokenizer_source: union
""",
    "union_task_arithmetic_bf16": """
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: 0.7}
  - model: c
    parameters: {weight: 0.4}
  - model: b
    parameters: {weight: 0.3}
tokenizer_source: union
dtype: bfloat16
""",
    "base_ties": """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 0.7, density: 0.5}
  - model: b
    parameters: {weight: 0.5, density: 0.5}
tokenizer_source: base
""",
    "model_source_slerp": """
merge_method: slerp
base_model: a
models:
  - model: a
  - model: c
parameters: {t: 0.3}
tokenizer_source: a
""",
    "block_tokens_force_pad": """
merge_method: linear
base_model: base
models:
  - model: a
    parameters: {weight: 0.5}
  - model: b
    parameters: {weight: 0.5}
parameters: {weight: 1.0}
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    "<|im_start|>":
      source: {kind: zero}
    w3:
      source: a
      force: true
    xb:
      source: {kind: model_token, model: b, token: w9}
    w1:
      source: {kind: model_token, model: base, token_id: 7}
""",
    "slices_union": """
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
      - model: c
        layer_range: [0, 2]
merge_method: slerp
base_model: a
parameters: {t: [0, 1]}
tokenizer_source: union
""",
}


def _token_ids(out: Path) -> dict[str, int]:
    spec = json.loads((out / "tokenizer.json").read_text())
    ids = dict(spec["model"]["vocab"])
    ids.update({e["content"]: e["id"] for e in spec["added_tokens"]})
    return ids


def _same_by_token(theirs: Path, ours: Path, base_tokens: list[str] = VOCABS["base"]) -> None:
    """The same tensors and tokenizer up to the order of the union's new tokens, which mergekit
    takes from a set and a hash map (it may change from run to run): each token's rows are equal
    bit for bit; padding rows (a mean over the rows, summed in another order) to rounding."""
    it, io = _token_ids(theirs), _token_ids(ours)
    assert it.keys() == io.keys()
    assert {t: i for t, i in io.items() if t in base_tokens} == {t: i for t, i in it.items() if t in base_tokens}
    assert (ours / "tokenizer_config.json").read_bytes() == (theirs / "tokenizer_config.json").read_bytes()
    a, b = load_state_dict(theirs), load_state_dict(ours)
    assert a.keys() == b.keys()
    order = sorted(it)
    for name in a:
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) or name == "shared.weight":  # T5's embedding
            assert torch.equal(a[name][[it[t] for t in order]], b[name][[io[t] for t in order]]), name
            torch.testing.assert_close(a[name][len(it):], b[name][len(io):])
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tensors_and_tokenizer_as_mergekit(models, name, tmp_path, monkeypatch):
    text = CONFIGS[name]
    theirs = _mergekit(text, models, tmp_path / "theirs", monkeypatch)
    ours = _ours(text, models, tmp_path / "ours", monkeypatch)
    if "union" in text:
        _same_by_token(theirs, ours)
        new = [t for t, _ in sorted(_token_ids(ours).items(), key=lambda kv: kv[1])][len(VOCABS["base"]):]
        assert new[:2] == ["xa", "xb"]  # polytask: config order, then each model's ids
    else:
        _same_tensors(theirs, ours)
        _same_files(theirs, ours)


def test_rows_really_move(tmp_path, monkeypatch):
    """The aligned rows are the models' own rows of the same token (not a copy by position)."""
    root = _models(tmp_path / "m")
    text = "merge_method: linear\nmodels:\n  - model: b\n    parameters: {weight: 1.0}\ntokenizer_source: base\n" \
           "base_model: base\nparameters: {weight: 0.0}\n"
    out = load_state_dict(_ours(text, root, tmp_path / "ours", monkeypatch))
    b = load_state_dict(root / "b")
    base = load_state_dict(root / "base")
    # w7 is row 10 of the base (3 specials + 7) and row 3 + (19 - 7) = 15 of b
    torch.testing.assert_close(out["model.embed_tokens.weight"][10], b["model.embed_tokens.weight"][15], rtol=0, atol=0)
    # w0 is missing from b: the base's row (the base is an input of the tensor)
    torch.testing.assert_close(out["lm_head.weight"][3], base["lm_head.weight"][3], rtol=0, atol=0)


def test_default_rows_by_hand():
    """mergekit's rules for a token some inputs lack, on a 4-token vocabulary, models (m0, m1, base)."""
    vocab = {"all": 0, "one": 1, "two": 2, "none": 3}
    perms = {0: torch.tensor([0, -1, 1, -1]), 1: torch.tensor([0, 1, 1, -1]), 2: torch.tensor([1, -1, -1, -1])}
    plan = VocabPlan(tokenizer=None, vocab=vocab, rows=4, perms=perms, base=2)
    x = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [4.0]]), torch.tensor([[5.0], [6.0]])]
    with pytest.warns(RuntimeWarning, match="'none' is in no model"):
        out = align_rows(plan, [0, 1, 2], x, torch.float32, "lm_head.weight", ["m0", "m1", "base"])
    # "all": own rows (1, 3, 6); "one": only m1 has it -> 4 everywhere; "two": m0 and m1, not the
    # base -> mean (2 + 4) / 2 = 3 in the base, own rows elsewhere; "none": zeros
    assert out[0].flatten().tolist() == [1.0, 4.0, 2.0, 0.0]
    assert out[1].flatten().tolist() == [3.0, 4.0, 4.0, 0.0]
    assert out[2].flatten().tolist() == [6.0, 4.0, 3.0, 0.0]


def test_union_with_new_tokens_in_several_models_matches_by_token(tmp_path, monkeypatch):
    """With new tokens in two models, mergekit's union order follows a set (it may change between
    runs); polytask's follows the config. Each token's rows are the same."""
    root = _models(tmp_path / "m", d=SPECIAL + WORDS[:5] + ["yd", "xa"])
    text = """
merge_method: linear
base_model: base
models:
  - model: a
    parameters: {weight: 0.5}
  - model: d
    parameters: {weight: 0.3}
parameters: {weight: 0.2}
tokenizer_source: union
"""
    theirs = _mergekit(text, root, tmp_path / "theirs", monkeypatch)
    ours = _ours(text, root, tmp_path / "ours", monkeypatch)
    _same_by_token(theirs, ours)
    io = _token_ids(ours)
    assert [t for t, _ in sorted(io.items(), key=lambda kv: kv[1])][-4:] == ["xa", "xb", "zz", "yd"]  # config order


def test_tied_embeddings(tmp_path, monkeypatch):
    root = _models(tmp_path / "m", tied=True)
    text = CONFIGS["union_linear"]
    theirs = _mergekit(text, root, tmp_path / "theirs", monkeypatch)
    ours = _ours(text, root, tmp_path / "ours", monkeypatch)
    assert "lm_head.weight" not in load_state_dict(ours)
    _same_by_token(theirs, ours)


def test_tied_model_among_untied_ones(tmp_path, monkeypatch):
    """A model with tied embeddings (no lm_head) among untied ones: its embedding is read as its
    head, as mergekit does; with the same vocabulary (no tokenizer key) and with a union."""
    root = _models(tmp_path / "m")
    _model(root / "t", VOCABS["base"], 7, torch.float32, tied=True)
    _model(root / "u", VOCABS["c"], 8, torch.float32, tied=True)
    same = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n" \
           "  - model: t\n    parameters: {weight: 0.7}\n"
    _same_tensors(_mergekit(same.replace("model: a", "model: base"), root, tmp_path / "theirs_same", monkeypatch),
                  _ours(same.replace("model: a", "model: base"), root, tmp_path / "ours_same", monkeypatch))
    union = CONFIGS["union_linear"].replace("model: c", "model: u")
    _same_by_token(_mergekit(union, root, tmp_path / "theirs", monkeypatch),
                   _ours(union, root, tmp_path / "ours", monkeypatch))


def test_chat_template_literal_and_builtin(models, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    text = CONFIGS["base_ties"] + f"chat_template: {json.dumps(literal)}\n"
    theirs = _mergekit(text, models, tmp_path / "theirs", monkeypatch)
    ours = _ours(text, models, tmp_path / "ours", monkeypatch)
    _same_files(theirs, ours, names=("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "w1"}, {"role": "user", "content": "w2"}]
    for name in ("chatml", "llama3"):
        t = CONFIGS["union_linear"] + f"chat_template: {name}\n"
        th = _mergekit(t, models, tmp_path / f"theirs_{name}", monkeypatch)
        _same_by_token(th, ou := _ours(t, models, tmp_path / f"ours_{name}", monkeypatch))
        for gen in (False, True):
            want, got = (AutoTokenizer.from_pretrained(p).apply_chat_template(chat, tokenize=False,
                                                                               add_generation_prompt=gen) for p in (th, ou))
            assert got == want
    # a chat template alone: the base's tokenizer re-saved with it, as mergekit does
    t = "merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: 1.0}\n" \
        f"chat_template: {json.dumps(literal)}\n"
    _same_files(_mergekit(t, models, tmp_path / "theirs_alone", monkeypatch),
                _ours(t, models, tmp_path / "ours_alone", monkeypatch),
                names=("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))


def test_chat_template_auto_takes_the_most_common(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    root = _models(tmp_path / "m")
    common = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    for name, template in (("base", common), ("a", common), ("c", "{% for m in messages %}{{ m['content'] }}{% endfor %}")):
        tok = AutoTokenizer.from_pretrained(root / name)
        tok.chat_template = template
        tok.save_pretrained(root / name)
    text = CONFIGS["union_linear"] + "chat_template: auto\n"
    theirs = _mergekit(text, root, tmp_path / "theirs", monkeypatch)
    ours = _ours(text, root, tmp_path / "ours", monkeypatch)
    assert (ours / "chat_template.jinja").read_text() == (theirs / "chat_template.jinja").read_text() == common


def test_mistral_template_renders_as_mergekit(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    root = _models(tmp_path / "m")
    chat = [{"role": "system", "content": "sys"}, {"role": "user", "content": "w1"},
            {"role": "assistant", "content": "w2"}]
    t = CONFIGS["base_ties"] + "chat_template: mistral\n"
    th = _mergekit(t, root, tmp_path / "theirs", monkeypatch)
    ou = _ours(t, root, tmp_path / "ours", monkeypatch)
    assert AutoTokenizer.from_pretrained(ou).apply_chat_template(chat, tokenize=False) == \
        AutoTokenizer.from_pretrained(th).apply_chat_template(chat, tokenize=False)


MODULES = """
merge_method: linear
base_model: base
modules:
  default:
    models:
      - model: a
        parameters: {weight: 0.6}
      - model: c
        parameters: {weight: 0.2}
    parameters:
      weight:
        - filter: mlp
          value: 0.5
parameters: {weight: 0.1}
tokenizer_source: base
"""


def test_modules_form_same_as_mergekit(models, tmp_path, monkeypatch):
    theirs = _mergekit(MODULES, models, tmp_path / "theirs", monkeypatch)
    ours = _ours(MODULES, models, tmp_path / "ours", monkeypatch)
    _same_tensors(theirs, ours)


def test_cli_end_to_end_loads_in_transformers(tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    root = _models(tmp_path / "m")
    cfg = root / "merge.yaml"
    cfg.write_text(CONFIGS["union_linear"] + "chat_template: chatml\n")
    out = tmp_path / "out"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _cli(["merge", cfg, out], capsys, monkeypatch)[0] == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["xa", "xb", "zz", "w0"]) == [23, 24, 25, 3]
    assert load_state_dict(out)["model.embed_tokens.weight"].shape == (26, 16)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 26
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()


BAD = {
    "unknown tokenizer model": ("tokenizer_source: nowhere\n", ["tokenizer_source", "nowhere"]),
    "unknown token source": ("tokenizer:\n  tokens:\n    xa:\n      source: nowhere\n",
                             ["tokenizer.tokens['xa'].source", "nowhere"]),
    "unknown source token": ("tokenizer:\n  tokens:\n    xa:\n      source: {kind: model_token, model: a, token: qq}\n",
                             ["tokenizer.tokens['xa'].source", "qq"]),
    "both keys": ("tokenizer_source: base\ntokenizer: {source: union}\n", ["tokenizer_source or tokenizer"]),
    "unknown built-in template": ("tokenizer_source: base\nchat_template: vicuna\n", ["chat_template", "vicuna"]),
    "two modules": (None, ["modules.vision"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_no_output(case, tmp_path, capsys, monkeypatch):
    root = _models(tmp_path / "m")
    tail, must = BAD[case]
    if tail is None:
        text = MODULES.replace("modules:\n", "modules:\n  vision:\n    models: [a]\n")
    else:
        text = "merge_method: linear\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n" \
               "  - model: b\n    parameters: {weight: 1.0}\nparameters: {weight: 1.0}\n" + tail
    _expect_refused(root, text, must, tmp_path, capsys, monkeypatch)


def _cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["polytask", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code or 0, captured.out, captured.err


def _expect_refused(root, text, must, tmp_path, capsys, monkeypatch):
    cfg = root / "bad.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _cli(["merge", cfg, out], capsys, monkeypatch)
    assert code == 2
    err = err.strip()
    assert len(err.splitlines()) == 1, err
    for m in must:
        assert m in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_model_without_tokenizer_files_is_refused_or_assumed(tmp_path, capsys, monkeypatch):
    root = _models(tmp_path / "m")
    _model(root / "e", SPECIAL + WORDS[:10], 9, torch.float32, tokenizer=False)  # 13 rows, no tokenizer
    text = CONFIGS["base_ties"].replace("- model: b", "- model: e")
    _expect_refused(root, text, ["tokenizer_source", "model e", "no tokenizer files"], tmp_path, capsys, monkeypatch)
    # the same vocabulary size as the base: assumed to share its tokenizer (mergekit's rule), with a warning
    _model(root / "f", VOCABS["base"], 10, torch.float32, tokenizer=False)
    with pytest.warns(RuntimeWarning, match="no tokenizer files; assuming"):
        _ours(CONFIGS["base_ties"].replace("- model: b", "- model: f"), root, tmp_path / "ours_f", monkeypatch)


def test_vocab_rows_that_cannot_be_aligned(tmp_path, capsys, monkeypatch):
    root = _models(tmp_path / "m")
    cfg = json.loads((root / "b" / "config.json").read_text())
    cfg["vocab_size"] = 40  # more tokens than the 19 rows of its embeddings
    (root / "b" / "config.json").write_text(json.dumps(cfg))
    _expect_refused(root, CONFIGS["base_ties"], ["tokenizer_source", "model b", "vocab_size 40"],
                    tmp_path, capsys, monkeypatch)


def test_different_vocabularies_without_tokenizer_source_are_refused(tmp_path, capsys, monkeypatch):
    root = _models(tmp_path / "m")
    text = CONFIGS["base_ties"].replace("tokenizer_source: base\n", "")
    _expect_refused(root, text, ["tokenizer_source", "model b has 19 token rows", "model a has 26"], tmp_path, capsys,
                    monkeypatch)


def test_multi_document_tokenizer_from_an_earlier_merge(tmp_path, monkeypatch):
    """mergekit-multi: a tokenizer_source naming an earlier merge runs after it and takes its tokenizer."""
    root = _models(tmp_path / "m")
    text = """
merge_method: linear
base_model: base
models:
  - model: base
  - model: ab
    parameters: {weight: 0.5}
parameters: {weight: 0.5}
tokenizer_source: ab
---
name: ab
merge_method: linear
base_model: base
models:
  - model: a
    parameters: {weight: 0.5}
parameters: {weight: 0.5}
tokenizer_source: union
"""
    out = _ours(text, root, tmp_path / "out", monkeypatch)
    assert _token_ids(out) == _token_ids(tmp_path / "out.parts" / "ab")
    assert load_state_dict(out)["lm_head.weight"].shape == (26, 16)


def _bpe(corpus: list[str], size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=size, special_tokens=SPECIAL, show_progress=False))
    return t


def _bpe_model(path: Path, tok, rows: int, vocab_size: int, seed: int) -> None:
    """A model whose tokenizer is the BPE ``tok``, with ``rows`` embedding rows and ``vocab_size``."""
    from transformers import PreTrainedTokenizerFast

    _model(path, ["?"] * rows, seed, torch.float32, tokenizer=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab_size}))


def test_bpe_tokenizers_stripped_and_padded(tmp_path, monkeypatch):
    """BPE tokenizers: the base's has 2 added tokens past its vocab_size (stripped from the output,
    as mergekit), the other model's embeddings have 3 padding rows past its tokenizer."""
    from tokenizers import AddedToken

    base_tok = _bpe(["the cat sat on the mat", "the dog ran far away"] * 3, 40)
    n_base = base_tok.get_vocab_size()
    base_tok.add_special_tokens([AddedToken("<extra_0>", special=True), AddedToken("<extra_1>", special=True)])
    other_tok = _bpe(["a bird flew over the hill", "the cat ran to the hill"] * 3, 44)
    n_other = other_tok.get_vocab_size()
    root = tmp_path / "m"
    _bpe_model(root / "base", base_tok, n_base, n_base, 0)
    _bpe_model(root / "a", other_tok, n_other + 3, n_other + 3, 1)
    base_tokens = [t for t, i in base_tok.get_vocab().items() if i < n_base]
    for source in ("base", "union"):
        text = f"""
merge_method: linear
base_model: base
models:
  - model: a
    parameters: {{weight: 0.6}}
parameters: {{weight: 0.4}}
tokenizer_source: {source}
"""
        theirs = _mergekit(text, root, tmp_path / f"theirs_{source}", monkeypatch)
        ours = _ours(text, root, tmp_path / f"ours_{source}", monkeypatch)
        assert "<extra_0>" not in _token_ids(ours)
        if source == "base":
            _same_tensors(theirs, ours)
            _same_files(theirs, ours)
            assert len(_token_ids(ours)) == n_base
        else:
            _same_by_token(theirs, ours, base_tokens)


def test_bpe_strip_drops_the_merges_that_make_a_stripped_token(tmp_path, monkeypatch):
    """The base's last 2 BPE tokens (merge results) are past its vocab_size: the output tokenizer
    lacks them and their merges, so it loads and splits those words into the kept pieces
    (mergekit keeps those merges and its output cannot be loaded)."""
    from transformers import AutoTokenizer

    base_tok = _bpe(["the cat sat on the mat", "the dog ran far away"] * 3, 40)
    n = base_tok.get_vocab_size()
    dropped = sorted(base_tok.get_vocab(), key=base_tok.get_vocab().get)[-2:]
    root = tmp_path / "m"
    _bpe_model(root / "base", base_tok, n - 2, n - 2, 0)
    _bpe_model(root / "a", base_tok, n - 2, n - 2, 1)
    text = "merge_method: linear\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n" \
           "parameters: {weight: 0.5}\ntokenizer_source: base\n"
    out = _ours(text, root, tmp_path / "ours", monkeypatch)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == n - 2 and not set(dropped) & set(tok.get_vocab())
    for word in dropped:
        pieces = tok.tokenize(word)
        assert len(pieces) > 1 and "".join(pieces) == word and "<unk>" not in pieces


def test_wordlevel_tokens_past_vocab_size_cannot_be_stripped(tmp_path, capsys, monkeypatch):
    """mergekit strips only BPE tokenizers of the tokens past vocab_size; a WordLevel one is refused."""
    root = _models(tmp_path / "m")
    cfg = json.loads((root / "base" / "config.json").read_text())
    (root / "base" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 20}))
    _expect_refused(root, CONFIGS["base_ties"], ["tokenizer_source", "model base", "WordLevel", "only BPE"],
                    tmp_path, capsys, monkeypatch)
