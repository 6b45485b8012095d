"""Word-labelled tagging (CoNLL style) with a Hugging Face tokenizer that splits words into sub-words.

The data give a list of words per sentence and one label per word (``labels.pos``: a part-of-speech
tag), plus a sentence-level label (``labels.long``). ``token_file`` tokenises the words with the
tokenizer named by ``data.params.tokenizer`` (a local folder or tokenizer.json; never downloaded) and
spreads each word's label over its sub-words with ``word_ids()``: the first sub-token carries it, the
others and the special tokens get -100 (``label_all_subtokens: true``: every sub-token carries it).
Metrics are per word (each word read at its first sub-token), and ``predict_words`` writes one
prediction per word.

This script builds a tiny WordPiece tokenizer and generated sentences so that it runs offline:

    python examples/word_labels_tagging.py runs/word-tagging

then the same run from the command line:  polytask train runs/word-tagging/config.yaml --overwrite
With your data: words + labels.<task> lists in a .jsonl/.parquet, and the folder of the tokenizer
of your backbone (e.g. one saved with AutoTokenizer.save_pretrained), with the backbone's config or
weights under model.params.backbone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import yaml

# part of speech of each word: 0 determiner, 1 noun, 2 verb, 3 other; some words are two or three sub-words
LEXICON = {"the": 0, "a": 0, "cat": 1, "cats": 1, "dog": 1, "dogs": 1, "mat": 1, "sat": 2, "ran": 2, "sleeps": 2,
           "on": 3, "quickly": 3, "unbelievable": 3, "unbelievably": 3}
PIECES = ["the", "a", "cat", "dog", "mat", "sat", "ran", "sleep", "on", "quick", "un", "##believ", "##able", "##ably",
          "##s", "##ly"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def build_tokenizer(folder: Path) -> None:
    """A BERT-like fast tokenizer (WordPiece, [CLS] ... [SEP]) saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + PIECES)}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(str(folder))


def sentences(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = list(LEXICON)
    rows = []
    for _ in range(n):
        ws = [str(w) for w in rng.choice(words, int(rng.integers(2, 9)))]
        rows.append({"words": ws, "labels.pos": [LEXICON[w] for w in ws], "labels.long": int(len(ws) > 5)})
    return rows


def main(out: Path) -> None:
    from polytask.data.words import load_tokenizer, predict_words
    from polytask.report.summary import metrics_table
    from polytask.train import Trainer
    from polytask.train.checkpoint import load_model_file, load_state_checked
    from polytask.train.config import load_config

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out / "tokenizer")
    (out / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentences(600, 0)))
    config = {
        "name": "word-tagging", "seed": 0, "device": "cpu", "out_dir": str(out / "run"),
        "data": {"name": "token_file",
                 "params": {"path": str(out / "pos.jsonl"), "tokenizer": str(out / "tokenizer"), "max_length": 32,
                            "label_all_subtokens": False}},
        "model": {"arch": "adapters",
                  "params": {"backbone": {"config": {"model_type": "bert", "vocab_size": len(SPECIALS + PIECES),
                                                     "hidden_size": 32, "num_hidden_layers": 2,
                                                     "num_attention_heads": 2, "intermediate_size": 64,
                                                     "max_position_embeddings": 32}},
                             "method": "mtlora", "target_modules": ["query", "value"], "rank": 4, "alpha": 8}},
        "balancer": {"name": "pcgrad"}, "optim": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 6, "batch_size": 32}}
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    trainer = Trainer(load_config(out / "config.yaml"), progress=False)
    result = trainer.fit(overwrite=True)
    print(metrics_table(trainer.tasks, {"val (best)": result.val, "test (best)": result.test}))

    best = out / "run" / "best" / "model.safetensors"
    load_state_checked(trainer.model, load_model_file(best), best)   # the best epoch's weights, not the last
    fresh = [{"words": r["words"]} for r in sentences(3, 1)]          # no labels needed to predict
    (out / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fresh))
    predict_words(trainer.model, trainer.tasks, out / "new.jsonl", out / "predictions.jsonl",
                  load_tokenizer(out / "tokenizer"), max_length=32)
    print((out / "predictions.jsonl").read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/word-tagging"))
