"""Built-in chat templates: every template mergekit 0.1.5 ships is a polytask built-in whose
rendering of a conversation equals mergekit's file rendered by transformers (strings compared,
not template text), directly and through a whole merge of each tool; plus hand-written cases
from the Alpaca and EXAONE formats (mergekit is skipped inside each test that uses it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_merge_tokenizer import CONFIGS, _mergekit, _models, _ours  # noqa: E402

from polytask.merge.tokenizer import _CHAT_TEMPLATES, chat_template_text  # noqa: E402

CHATS = {
    "system first": [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": " hi "},
                     {"role": "assistant", "content": "w1\n"}, {"role": "user", "content": "w2"}],
    "one user turn": [{"role": "user", "content": "only"}],
    "alpaca input": [{"role": "user", "content": "q"}, {"role": "user_context", "content": "ctx"},
                     {"role": "assistant", "content": "a"}],
    "system last": [{"role": "user", "content": "q"}, {"role": "system", "content": "late"}],
    "two systems, empty and tool turns": [{"role": "system", "content": "s1"}, {"role": "system", "content": "s2 "},
                                          {"role": "user", "content": ""}, {"role": "tool", "content": "t"}],
    "assistant first, blank lines inside": [{"role": "assistant", "content": "  first  "},
                                            {"role": "user", "content": "u\n\nv"}],
}
# mistral's template refuses roles that do not alternate: only the conversations it takes
MISTRAL_CHATS = ("one user turn",)


def _mergekit_templates() -> dict[str, str]:
    pytest.importorskip("mergekit")
    import importlib.resources

    from mergekit._data import chat_templates

    return {f.name.removesuffix(".jinja"): f.read_text()
            for f in importlib.resources.files(chat_templates).iterdir() if f.name.endswith(".jinja")}


def _render(template: str, chat: list[dict[str, str]], generation: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[chat], chat_template=template,
                                        add_generation_prompt=generation, bos_token="<s>", eos_token="</s>")
    return rendered[0]


def test_every_template_mergekit_ships_is_builtin():
    shipped = _mergekit_templates()
    assert {"alpaca", "exaone"} <= set(shipped)
    assert set(shipped) <= set(_CHAT_TEMPLATES), sorted(set(shipped) - set(_CHAT_TEMPLATES))
    for name in shipped:
        assert chat_template_text(name) == _CHAT_TEMPLATES[name]


@pytest.mark.parametrize("name, chat", [(n, c) for n in ("alpaca", "chatml", "exaone", "llama3", "mistral")
                                         for c in CHATS if n != "mistral" or c in MISTRAL_CHATS])
def test_builtin_renders_as_mergekit_file(name, chat):
    theirs = _mergekit_templates()[name]
    for generation in (False, True):
        assert _render(_CHAT_TEMPLATES[name], CHATS[chat], generation) == _render(theirs, CHATS[chat], generation)


def test_alpaca_by_hand():
    # Alpaca's sections, each "### <Section>:\n<text trimmed>", joined by a blank line; the last
    # system message (trimmed) and a blank line first; the generation prompt right after the
    # last section (mergekit's file puts no blank line there)
    chat = [{"role": "system", "content": "old"}, {"role": "system", "content": " Be brief. "},
            {"role": "user", "content": " Add the numbers. "}, {"role": "user_context", "content": "2, 3"}]
    assert _render(_CHAT_TEMPLATES["alpaca"], chat, True) == (
        "Be brief.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3### Response:\n")
    # no system message: an empty first line and the blank line; no generation prompt after an answer
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello "}]
    assert _render(_CHAT_TEMPLATES["alpaca"], chat, True) == "\n\n### Instruction:\nHi\n\n### Response:\nHello"


def test_exaone_by_hand():
    # "[|role|]content" per turn, "[|endofturn|]" after all but user turns, an empty system turn
    # first when the chat has none; mergekit's file adds 4 spaces before a turn, a newline and 8
    # spaces after its content, and a blank line after its end
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert _render(_CHAT_TEMPLATES["exaone"], chat, True) == (
        "        [|system|][|endofturn|]\n\n"
        "    [|user|]Hi\n        \n\n"
        "    [|assistant|]Hello\n        [|endofturn|]\n\n"
        "    [|assistant|]\n")
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert _render(_CHAT_TEMPLATES["exaone"], chat, False) == (
        "    [|system|]S\n        [|endofturn|]\n\n    [|user|]Q\n        \n\n")


def test_published_exaone_template_is_told_apart():
    # LG's own template (no indentation) renders differently from mergekit's file: the comparison
    # above can fail, and polytask's built-in follows mergekit's rendering, not LG's
    published = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                 "{{ '[|system|][|endofturn|]\\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + "
                 "message['content'] }}{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}"
                 "{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '[|assistant|]' }}{% endif %}")
    chat = CHATS["one user turn"]
    assert _render(published, chat, True) == "[|system|][|endofturn|]\n[|user|]only\n[|assistant|]"
    assert _render(published, chat, True) != _render(_mergekit_templates()["exaone"], chat, True)


@pytest.mark.parametrize("name", ["alpaca", "exaone"])
def test_merged_tokenizer_renders_as_mergekit(name, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    root = _models(tmp_path / "m")
    text = CONFIGS["base_ties"] + f"chat_template: {name}\n"
    theirs = AutoTokenizer.from_pretrained(_mergekit(text, root, tmp_path / "theirs", monkeypatch))
    ours = AutoTokenizer.from_pretrained(_ours(text, root, tmp_path / "ours", monkeypatch))
    assert ours.chat_template == _CHAT_TEMPLATES[name]
    for chat in CHATS.values():
        for generation in (False, True):
            assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation) == \
                theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
