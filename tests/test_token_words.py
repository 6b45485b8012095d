"""Word-labelled token tasks: words split by a fast tokenizer, word labels spread with word_ids() (the
rule of Hugging Face's token-classification guide), metrics per word at the first sub-token.

The tokenizer is built here from a tiny WordPiece vocabulary with ``tokenizers`` (no download). The
alignment is checked by hand and against the guide's loop written independently below; the metrics
against scikit-learn on the words."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polytask import data
from polytask.data.builtin import split_indices
from polytask.data.words import encode_words, first_subtokens, load_tokenizer, spread_labels, word_outputs
from polytask.errors import ConfigError, DataError
from polytask.tasks import Task
from polytask.token_tasks import IGNORE_INDEX, TokenTask, WordTask

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
PIECES = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "un", "##believ", "##able", "##s", "##ly", "quick"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + PIECES)}
PAD, UNK, CLS, SEP = range(4)


def ids(*tokens):
    return [VOCAB[t] for t in tokens]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A BERT-like fast tokenizer: WordPiece over whitespace/punctuation words, [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(VOCAB, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS),
                                                                                               ("[SEP]", SEP)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(folder))
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write(path, rows):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    return write_jsonl(path, rows)


SPLIT = (0.5, 0.25, 0.25)


def load_in_file_order(path, **params):
    """token_file's three splits put back in the file's row order (split_indices gives the permutation)."""
    s = data.load("token_file", path=str(path), split=list(SPLIT), seed=0, **params)
    parts = [s.train, s.val, s.test]
    order = torch.cat([torch.as_tensor(i) for i in split_indices(sum(map(len, parts)), SPLIT, 0)])
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order))
    inputs = {k: torch.cat([p.inputs[k] for p in parts])[back] for k in parts[0].inputs}
    targets = {k: torch.cat([p.targets[k] for p in parts])[back] for k in parts[0].targets}
    masks = {k: torch.cat([p.masks.get(k, torch.ones(len(p), dtype=torch.bool)) for p in parts])[back]
             for k in parts[0].targets}
    return s.tasks, inputs, targets, masks


# three words split into 1, 2 and 3 sub-words; an empty words list; a one-word row
HAND_ROWS = [{"words": ["the", "cats", "unbelievable"], "labels.ner": [3, 1, 2], "labels.r": [0.5, None, 2.0]},
             {"words": [], "labels.ner": [], "labels.r": []},
             {"words": ["sat"], "labels.ner": [0], "labels.r": [1.5]},
             {"words": ["a", "dog"], "labels.ner": [0, 1], "labels.r": [-1.0, 4.0]}]
N = IGNORE_INDEX
NAN = float("nan")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_alignment_by_hand_both_modes_and_truncation(tmp_path, tokenizer_dir, fmt):
    path = write(tmp_path / f"w.{fmt}", HAND_ROWS)
    #            [CLS] the  cat  ##s   un  ##believ ##able [SEP]
    full_ids = [CLS, *ids("the", "cat", "##s", "un", "##believ", "##able"), SEP]
    expect = {  # (max_length, label_all) -> row 0's labels; word ids [-, 0, 1, 1, 2, 2, 2, -]
        (512, False): [N, 3, 1, N, 2, N, N, N],
        (512, True): [N, 3, 1, 1, 2, 2, 2, N],
        # max_length 6: [CLS] the cat ##s un [SEP]: 'unbelievable' cut after its first sub-token keeps its label
        (6, False): [N, 3, 1, N, 2, N],
        (6, True): [N, 3, 1, 1, 2, N],
    }
    for (max_length, label_all), row0 in expect.items():
        tasks, inputs, targets, masks = load_in_file_order(path, tokenizer=str(tokenizer_dir), max_length=max_length,
                                                           label_all_subtokens=label_all)
        width = len(row0)
        assert inputs["input_ids"].tolist() == [full_ids[:width - 1] + [SEP],
                                                [CLS, SEP] + [PAD] * (width - 2),
                                                [CLS, VOCAB["sat"], SEP] + [PAD] * (width - 3),
                                                [CLS, *ids("a", "dog"), SEP] + [PAD] * (width - 4)]
        assert inputs["attention_mask"].sum(1).tolist() == [width, 2, 3, 4]
        assert inputs["word_ids"][0].tolist() == [-1, 0, 1, 1, 2, 2, 2, -1][:width - 1] + [-1]
        assert isinstance(tasks[0], WordTask) and tasks[0].num_classes == 4
        ner = targets["ner"]
        assert ner.shape == (4, width, 2)
        assert ner[..., 0].tolist() == [row0, [N] * width, [N, 0, N] + [N] * (width - 3),
                                        [N, 0, 1, N] + [N] * (width - 4)]
        # the first-sub-token channel marks each word's first token, whatever the mode
        assert ner[0, :, 1].tolist() == [0, 1, 1, 0, 1, 0, 0, 0][:width]
        assert masks["ner"].tolist() == [True, False, True, True]  # the empty words list is unlabelled
        r = targets["r"][0, :, 0]
        want = {False: [NAN, 0.5, NAN, NAN, 2.0, NAN, NAN, NAN], True: [NAN, 0.5, NAN, NAN, 2.0, 2.0, 2.0, NAN]}
        torch.testing.assert_close(r, torch.tensor(want[label_all][:width - 1] + [NAN], dtype=r.dtype), equal_nan=True)


def hf_guide_labels(tokenizer, words, labels, max_length, label_all):
    """The loop of Hugging Face's token-classification guide (tokenize_and_align_labels), written out."""
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    out = []
    for i, label in enumerate(labels):
        previous, row = None, []
        for word in enc.word_ids(batch_index=i):
            if word is None:
                row.append(-100)
            elif word != previous:
                row.append(label[word])
            else:
                row.append(label[word] if label_all else -100)
            previous = word
        out.append(row)
    return enc["input_ids"], out


@pytest.mark.parametrize("label_all", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_alignment_equals_the_hf_guide_on_random_sentences(tmp_path, tokenizer_dir, label_all, seed):
    rng = np.random.default_rng(seed)
    lexicon = ["the", "a", "cat", "cats", "dog", "dogs", "sat", "ran", "on", "mat", "unbelievable", "unbelievably",
               "quick", "quickly", "zebra", "un"]                    # zebra: [UNK]; quickly: quick ##ly
    rows = []
    for _ in range(30):
        words = [str(w) for w in rng.choice(lexicon, int(rng.integers(0, 9)))]
        rows.append({"words": words, "labels.ner": [int(v) for v in rng.integers(0, 5, len(words))]})
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    max_length = int(rng.integers(4, 20))
    tok = load_tokenizer(tokenizer_dir)
    want_ids, want = hf_guide_labels(tok, [r["words"] for r in rows], [r["labels.ner"] for r in rows], max_length,
                                     label_all)
    _, inputs, targets, _ = load_in_file_order(path, tokenizer=str(tokenizer_dir), max_length=max_length,
                                               label_all_subtokens=label_all)
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert [row[:n] for row, n in zip(inputs["input_ids"].tolist(), lengths)] == want_ids
    assert [row[:n] for row, n in zip(targets["ner"][..., 0].tolist(), lengths)] == want
    assert all(set(row[n:]) <= {N} for row, n in zip(targets["ner"][..., 0].tolist(), lengths))
    assert sum(v != N for row in want for v in row) > 20  # the comparison covers labelled tokens


def test_spread_labels_and_word_outputs_by_hand():
    # two rows of word ids: [-, 0, 1, 1, -] and [-, 0, 0, 0, 1] (the second truncated: no [SEP])
    word_ids = torch.tensor([[-1, 0, 1, 1, -1], [-1, 0, 0, 0, 1]])
    labels = torch.tensor([7, 8, 5, 6, 9])                   # row 0: 7 8; row 1: 5 6 (its 3rd word cut off: 9)
    counts = torch.tensor([2, 3])
    assert spread_labels(labels, counts, word_ids).tolist() == [[N, 7, 8, N, N], [N, 5, N, N, 6]]
    assert spread_labels(labels, counts, word_ids, True).tolist() == [[N, 7, 8, 8, N], [N, 5, 5, 5, 6]]
    assert first_subtokens(word_ids).long().tolist() == [[0, 1, 1, 0, 0], [0, 1, 0, 0, 1]]
    out = torch.arange(10.0).reshape(2, 5, 1)
    got = word_outputs(out, word_ids)
    assert [g.reshape(-1).tolist() for g in got] == [[1.0, 2.0], [6.0, 9.0]]
    empty = spread_labels(torch.zeros(0), torch.tensor([0]), torch.tensor([[-1, -1]]))
    assert torch.isnan(empty).all()


def test_encode_words_refuses_a_slow_tokenizer():
    slow = transformers.ByT5Tokenizer()  # a Python tokenizer: no word_ids()
    with pytest.raises(ConfigError, match=r"^data.params.tokenizer is a slow tokenizer \(ByT5Tokenizer\)"):
        encode_words(slow, [["a"]])


# ------------------------------------------------------------------------------------ metrics per word
def word_case(tmp_path, tokenizer_dir, label_all, kind="ner"):
    rng = np.random.default_rng(3)
    lexicon = ["the", "cats", "unbelievable", "dog", "quickly", "on", "zebra"]
    rows = [{"words": [str(w) for w in rng.choice(lexicon, int(rng.integers(1, 7)))]} for _ in range(40)]
    for r in rows:
        r["labels.ner"] = [int(v) for v in rng.integers(0, 3, len(r["words"]))]
        r["labels.ner"][0] = None if len(r["words"]) > 2 else r["labels.ner"][0]   # some words unlabelled
        r["labels.r"] = [float(v) for v in rng.normal(size=len(r["words"]))]
    path = write_jsonl(tmp_path / f"m{label_all}.jsonl", rows)
    tasks, inputs, targets, masks = load_in_file_order(path, tokenizer=str(tokenizer_dir),
                                                       label_all_subtokens=label_all)
    return rows, {t.name: t for t in tasks}, inputs, targets, masks


def words_and_outputs(rows, inputs, output, key):
    """The labelled words' labels and their first sub-token's outputs, from the file rows directly."""
    firsts = word_outputs(output, inputs["word_ids"])
    labels, outs = [], []
    for row, first in zip(rows, firsts):
        for label, out in zip(row[key], first):
            if label is not None:
                labels.append(label)
                outs.append(out)
    return np.array(labels), torch.stack(outs)


@pytest.mark.parametrize("label_all", [False, True])
def test_word_metrics_equal_sklearn_on_the_words(tmp_path, tokenizer_dir, label_all):
    rows, tasks, inputs, targets, masks = word_case(tmp_path, tokenizer_dir, label_all)
    task = tasks["ner"]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*inputs["input_ids"].shape, 3, generator=g, dtype=torch.float64)
    later = ~first_subtokens(inputs["word_ids"]) & (inputs["word_ids"] >= 0)
    logits[later] = torch.tensor([9.0, -9.0, -9.0], dtype=torch.float64)  # later sub-tokens say class 0, confidently
    y, out = words_and_outputs(rows, inputs, logits, "labels.ner")
    p = out.argmax(-1).numpy()
    got = task.evaluate(logits, targets["ner"], masks["ner"])
    assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, p, average="macro"), abs=1e-12)
    prob = torch.softmax(out, -1).numpy()
    # Task.evaluate computes in float32
    assert got["logloss"] == pytest.approx(sklearn_metrics.log_loss(y, prob, labels=[0, 1, 2]), rel=1e-6)
    assert len(y) > 60 and later.sum() > 20
    if label_all:  # scoring every labelled sub-token (a TokenTask) would give another accuracy: the test can fail
        plain = TokenTask("ner", "multiclass", num_classes=3).evaluate(logits, targets["ner"][..., 0], masks["ner"])
        assert abs(plain["accuracy"] - got["accuracy"]) > 0.02
        # the loss trains on every labelled sub-token: mean cross-entropy with ignore_index over them
        loss = task.loss(logits, targets["ner"], masks["ner"])
        want = F.cross_entropy(logits.reshape(-1, 3), targets["ner"][..., 0].reshape(-1), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("label_all", [False, True])
def test_word_regression_metrics_equal_sklearn(tmp_path, tokenizer_dir, label_all):
    rows, tasks, inputs, targets, masks = word_case(tmp_path, tokenizer_dir, label_all)
    task = tasks["r"]
    assert isinstance(task, WordTask) and task.kind == "regression"
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(*inputs["input_ids"].shape, 1, generator=g, dtype=torch.float64)
    pred[~first_subtokens(inputs["word_ids"]) & (inputs["word_ids"] >= 0)] = 100.0  # would dominate if read
    y, out = words_and_outputs(rows, inputs, pred, "labels.r")
    got = task.evaluate(pred, targets["r"], masks["r"])
    assert got["mse"] == pytest.approx(sklearn_metrics.mean_squared_error(y, out[:, 0].numpy()), rel=1e-6)
    assert got["mae"] == pytest.approx(sklearn_metrics.mean_absolute_error(y, out[:, 0].numpy()), rel=1e-6)


def test_word_task_target_shape_is_checked():
    task = WordTask("ner", "multiclass", num_classes=3)
    task.check_target(torch.zeros(2, 5, 2, dtype=torch.long), rows=2)
    with pytest.raises(DataError, match=r"task 'ner' \(word-level multiclass\): target has shape \(2, 5\)"):
        task.check_target(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(DataError, match="expected 3 rows"):
        task.check_target(torch.zeros(2, 5, 2, dtype=torch.long), rows=3)


def test_a_batch_without_labelled_words_gives_zero_loss_and_zero_gradient():
    task = WordTask("ner", "multiclass", num_classes=3)
    target = torch.stack([torch.full((2, 4), N), torch.zeros(2, 4, dtype=torch.long)], -1)
    out = torch.randn(2, 4, 3, requires_grad=True)
    loss = task.loss(out, target, torch.tensor([True, False]))
    loss.backward()
    assert loss.item() == 0.0 and out.grad.abs().sum().item() == 0.0
    assert all(np.isnan(v) for v in task.evaluate(out, target).values())


def test_word_loss_and_backward_make_no_host_sync(monkeypatch):
    """The word task's loss (label channel split off, masked mean) stays on the device: a step's part
    that is ours may not call item/tolist/bool/float/int on a tensor."""
    task = WordTask("ner", "multiclass", num_classes=3)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (4, 6), generator=g).masked_fill(torch.rand(4, 6, generator=g) < 0.4, N)
    target = torch.stack([labels, (torch.rand(4, 6, generator=g) < 0.5).long()], -1)
    out = torch.randn(4, 6, 3, requires_grad=True)
    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        def guarded(self, *args, **kwargs):
            raise AssertionError("host synchronisation inside a training step")

        monkeypatch.setattr(torch.Tensor, attr, guarded)
    loss = task.loss(out, target, torch.tensor([True, True, False, True]))
    loss.backward()
    monkeypatch.undo()
    want = F.cross_entropy(out[[0, 1, 3]].reshape(-1, 3), labels[[0, 1, 3]].reshape(-1), ignore_index=N)
    torch.testing.assert_close(loss, want)


# ------------------------------------------------------------------------------------ errors
def test_bad_tokenizer_slow_tokenizer_and_length_mismatch_are_one_line(tmp_path, tokenizer_dir):
    good = write_jsonl(tmp_path / "g.jsonl", HAND_ROWS)
    with pytest.raises(ConfigError, match=r"^data.params.tokenizer: '[^']*nope' does not exist \(give a local"):
        data.load("token_file", path=str(good), tokenizer=str(tmp_path / "nope"))
    slow = tmp_path / "slow"
    transformers.ByT5Tokenizer().save_pretrained(str(slow))
    with pytest.raises(ConfigError, match=r"^data.params.tokenizer: '.*slow' is a slow tokenizer \(ByT5Tokenizer\)"):
        data.load("token_file", path=str(good), tokenizer=str(slow))
    bad = write_jsonl(tmp_path / "b.jsonl", [HAND_ROWS[0], {"words": ["a", "dog", "sat"], "labels.ner": [0, 1]}])
    with pytest.raises(DataError, match=rf"^{bad}: column 'labels.ner', row 1: 2 labels for 3 words \(words\)"):
        data.load("token_file", path=str(bad), tokenizer=str(tokenizer_dir))
    with pytest.raises(ConfigError, match=r"^data.params.tokenizer: .* gives words, not input_ids"):
        data.load("token_file", path=str(good))
    both = write_jsonl(tmp_path / "both.jsonl", [{"words": ["a"], "input_ids": [4], "labels.ner": [0]}])
    with pytest.raises(DataError, match="has both 'words' and 'input_ids'"):
        data.load("token_file", path=str(both), tokenizer=str(tokenizer_dir))
    nulls = write_jsonl(tmp_path / "n.jsonl", [HAND_ROWS[0], {"words": None, "labels.ner": None}])
    with pytest.raises(DataError, match=rf"^{nulls}: column 'words', row 1: no words \(null\)"):
        data.load("token_file", path=str(nulls), tokenizer=str(tokenizer_dir))
    torch.save({"input_ids": torch.ones(4, 3, dtype=torch.long), "labels.t": torch.zeros(4)}, tmp_path / "t.pt")
    with pytest.raises(ConfigError, match="data.params.tokenizer: .* holds token ids"):
        data.load("token_file", path=str(tmp_path / "t.pt"), tokenizer=str(tokenizer_dir))
    with pytest.raises(ConfigError, match=r"^data.params.label_all_subtokens: .*needs data.params.tokenizer"):
        data.load("token_file", path=str(tmp_path / "t.pt"), label_all_subtokens=True)
    # a tokenizer.json file works as well as the folder
    tasks, _, targets, _ = load_in_file_order(good, tokenizer=str(tokenizer_dir / "tokenizer.json"))
    assert targets["ner"][0, :, 0].tolist() == [N, 3, 1, N, 2, N, N, N]


# ------------------------------------------------------------------------------------ CLI
BERT = {"model_type": "bert", "vocab_size": len(VOCAB), "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}


def tagging_rows(n=48, seed=0):
    """Sentences whose word label is its part of speech (0 det, 1 noun, 2 verb/other): learnable."""
    rng = np.random.default_rng(seed)
    pos = {"the": 0, "a": 0, "cat": 1, "cats": 1, "dog": 1, "dogs": 1, "mat": 1, "sat": 2, "ran": 2, "on": 2,
           "unbelievable": 2, "quickly": 2}
    words = list(pos)
    rows = []
    for i in range(n):
        ws = [str(w) for w in rng.choice(words, int(rng.integers(1, 7)))]
        rows.append({"words": ws, "labels.pos": [pos[w] for w in ws], "labels.long": int(len(ws) > 3)})
    return rows


def config(tmp_path, data_params):
    return {"name": "words", "seed": 0, "device": "cpu", "out_dir": str(tmp_path / "run"),
            "data": {"name": "token_file", "params": data_params},
            "model": {"arch": "adapters", "params": {"backbone": {"config": BERT}, "method": "lora",
                                                     "target_modules": ["query", "value"], "rank": 2}},
            "balancer": {"name": "equal"}, "optim": {"lr": 0.01}, "train": {"epochs": 2, "batch_size": 16}}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "polytask.cli", *args], capture_output=True, text=True)


def test_cli_bad_tokenizer_slow_tokenizer_and_length_mismatch_exit_2_in_one_line(tmp_path, tokenizer_dir):
    import yaml

    good = write_jsonl(tmp_path / "g.jsonl", tagging_rows(8))
    bad = write_jsonl(tmp_path / "b.jsonl", [{"words": ["a", "dog"], "labels.pos": [0, 1, 1]}] * 4)
    slow = tmp_path / "slow"
    transformers.ByT5Tokenizer().save_pretrained(str(slow))
    cases = [({"path": str(good), "tokenizer": str(tmp_path / "nope")}, "data.params.tokenizer: '"),
             ({"path": str(good), "tokenizer": str(slow)}, "is a slow tokenizer (ByT5Tokenizer)"),
             ({"path": str(bad), "tokenizer": str(tokenizer_dir)}, "column 'labels.pos', row 0: 3 labels for 2 words")]
    for i, (params, message) in enumerate(cases):
        (tmp_path / f"c{i}.yaml").write_text(yaml.safe_dump(config(tmp_path, params)))
        res = cli("train", str(tmp_path / f"c{i}.yaml"))
        assert res.returncode == 2, res.stderr
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "run").exists()


def test_cli_train_word_task_metrics_equal_a_reevaluation_on_the_words(tmp_path, tokenizer_dir):
    import yaml

    from polytask.train import Trainer, predict
    from polytask.train.checkpoint import load_model_file, load_state_checked
    from polytask.train.config import load_config

    rows = tagging_rows()
    path = write_jsonl(tmp_path / "pos.jsonl", rows)
    params = {"path": str(path), "tokenizer": str(tokenizer_dir), "label_all_subtokens": True,
              "split": [0.5, 0.25, 0.25]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(tmp_path, params)))
    res = cli("train", str(tmp_path / "c.yaml"))
    assert res.returncode == 0, res.stderr
    assert "pos" in res.stdout and "macro_f1" in res.stdout
    saved = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())

    trainer = Trainer(load_config(tmp_path / "run" / "config.yaml"), progress=False)
    best = tmp_path / "run" / "best" / "model.safetensors"
    load_state_checked(trainer.model, load_model_file(best), best)
    test_set = trainer.test_set
    assert isinstance({t.name: t for t in trainer.tasks}["pos"], WordTask)
    logits = predict(trainer.model, test_set, 5)["pos"]
    # the test rows of the file, in the split's order, and each word's first sub-token prediction
    test_rows = [rows[i] for i in split_indices(len(rows), (0.5, 0.25, 0.25), 0)[2]]
    firsts = word_outputs(logits, test_set.inputs["word_ids"])
    assert [len(f) for f in firsts] == [len(r["words"]) for r in test_rows]   # no word lost to truncation
    y = np.concatenate([r["labels.pos"] for r in test_rows])
    out = torch.cat(firsts)
    p = out.argmax(-1).numpy()
    assert saved["test"]["pos"]["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p), rel=1e-6)
    assert saved["test"]["pos"]["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, p, average="macro"),
                                                             rel=1e-6)
    prob = torch.softmax(out.double(), -1).numpy()
    assert saved["test"]["pos"]["logloss"] == pytest.approx(sklearn_metrics.log_loss(y, prob, labels=[0, 1, 2]),
                                                            rel=1e-5)
    assert saved["test"]["long"]["accuracy"] == pytest.approx(
        Task("long", "binary").evaluate(predict(trainer.model, test_set, 5)["long"],
                                        test_set.targets["long"])["accuracy"], rel=1e-6)

    # `polytask predict` on the test sentences: one class per word, the argmax at its first sub-token
    score = write_jsonl(tmp_path / "score.jsonl", [{"words": r["words"], "id": i} for i, r in enumerate(test_rows)])
    res = cli("predict", str(tmp_path / "run"), str(score), str(tmp_path / "pred.jsonl"), "--keep", "id")
    assert res.returncode == 0, res.stderr
    written = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [w["id"] for w in written] == list(range(len(test_rows)))
    assert [w["pos"] for w in written] == [f.argmax(-1).tolist() for f in firsts]
    long_prob = torch.sigmoid(predict(trainer.model, test_set, 5)["long"].float().squeeze(-1))
    assert [w["long"] for w in written] == pytest.approx(long_prob.tolist(), abs=1e-6)
    res = cli("predict", str(tmp_path / "run"), str(tmp_path / "missing.jsonl"), str(tmp_path / "p2.jsonl"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "missing.jsonl" in res.stderr
    assert not (tmp_path / "p2.jsonl").exists()


def test_a_label_list_starting_with_null_in_the_first_row_reads_right(tmp_path, tokenizer_dir):
    # pyarrow 26's JSON reader drops such a leading null while it infers the item type (a table that
    # fails validation); token_file reads the file again with the inferred schema
    path = write_jsonl(tmp_path / "n.jsonl", [{"words": ["a", "dog"], "labels.ner": [None, 1]},
                                               {"words": ["sat"], "labels.ner": [2]}] * 2)
    _, _, targets, _ = load_in_file_order(path, tokenizer=str(tokenizer_dir))
    assert targets["ner"][:2, :, 0].tolist() == [[N, N, 1, N], [N, 2, N, N]]
    ids_path = write_jsonl(tmp_path / "i.jsonl", [{"input_ids": [4, 5], "labels.t": [None, 1]},
                                                   {"input_ids": [6], "labels.t": [2]}] * 2)
    tensors = __import__("polytask.data.sequences", fromlist=["_read_table"])._read_table(ids_path)
    assert tensors["labels.t"].tolist() == [[N, 1], [2, N]] * 2


# ------------------------------------------------------------------------------------ predictions per word
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_predict_words_writes_one_prediction_per_word_read_at_its_first_subtoken(tmp_path, tokenizer_dir, suffix):
    from polytask.data.words import predict_words
    from polytask.nn import build_model

    train = write_jsonl(tmp_path / "train.jsonl", tagging_rows(12))
    splits = data.load("token_file", path=str(train), tokenizer=str(tokenizer_dir), split=[0.5, 0.25, 0.25])
    torch.manual_seed(0)
    model = build_model("adapters", None, splits.tasks, backbone={"config": BERT}, method="lora",
                        target_modules=["query", "value"], rank=2)
    with torch.no_grad():  # random adapters and heads (the backbone as built): predictions differ between words
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    sentences = [["the", "cats", "unbelievable", "sat"], [], ["quickly"], ["a", "dog", "ran", "on", "the", "mat"]]
    score = write_jsonl(tmp_path / "score.jsonl", [{"id": i, "words": w} for i, w in enumerate(sentences)])
    out = tmp_path / f"pred{suffix}"
    max_length = 6  # the last row loses its last words; the first keeps half of 'unbelievable'
    assert predict_words(model, splits.tasks, score, out, load_tokenizer(tokenizer_dir), max_length=max_length,
                         batch_size=3, keep=("id",)) == 4
    if suffix == ".jsonl":
        got = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        got = pq.read_table(out).to_pylist()
    tok = load_tokenizer(tokenizer_dir)
    model.eval()
    for row, words in zip(got, sentences):  # each sentence alone, no padding, the guide's word_ids walk
        assert row["words"] == words and row["id"] == sentences.index(words)
        enc = tok([words], is_split_into_words=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            outputs = model({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        want, previous = [None] * len(words), None
        for j, w in enumerate(enc.word_ids(0)):
            if w is not None and w != previous:
                want[w] = int(outputs["pos"][0, j].argmax())
            previous = w
        assert row["pos"] == want
        assert row["long"] == pytest.approx(float(torch.sigmoid(outputs["long"].reshape(-1)[0])), rel=1e-5)
    # [CLS] the cat ##s un [SEP]: half of 'unbelievable' keeps its prediction, 'sat' has none
    assert [v is None for v in got[0]["pos"]] == [False, False, False, True] and got[1]["pos"] == []
    assert [v is None for v in got[3]["pos"]] == [False] * 4 + [True] * 2
    assert len(set(v for r in got for v in r["pos"] if v is not None)) > 1  # not a constant prediction
    with pytest.raises(ConfigError, match="keep: column 'pos' has the name of an output column"):
        predict_words(model, splits.tasks, score, tmp_path / "x.jsonl", tok, keep=("pos",))
    assert not (tmp_path / "x.jsonl").exists()
