"""Faults of the commands that write outputs (a review of session 18): predict onto its own input,
fixed temporary names of predict/export, export-adapters written in place, a LoRA adapter deleted
before its replacement is in place, a stale intermediate reused by a multi-document merge, and the
adapters' config errors that named the wrong key.

Every test here failed on the code before its fix (checked by running it against the previous
commit's ``src`` on PYTHONPATH). Kills are ``os._exit`` at a write point in a forked child.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from polytask.train import Trainer, parse_config  # noqa: E402
from polytask.train.tables import write_synthetic_splits  # noqa: E402

from test_faults_train import assert_one_line_exit_2, cli  # noqa: E402

KILLED = 77


def _fork(fn):
    """Run ``fn`` in a forked child; its exit status (77: killed by the test's os._exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            import traceback

            traceback.print_exc(file=sys.__stderr__)
            code = 3
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _partials(folder, name):
    """Our temporary files for output ``name`` in ``folder`` (hidden, ``.partial``)."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name.startswith(f".{name}.") and p.name.endswith(".partial"))


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    paths = write_synthetic_splits(tmp_path_factory.mktemp("log"), 1200, row_group_rows=300)
    out = tmp_path_factory.mktemp("runs") / "r"
    p = {"train": str(paths[0]), "val": str(paths[1]), "test": str(paths[2]), "dense": ["price", "hour"],
         "ids": {"user_id": {"min_count": 2}, "item_id": {"hash": 64}, "category": {}},
         "labels": {"click": "click", "conversion": "conversion"}, "embed_dim": 4, "shuffle_rows": 300}
    cfg = parse_config({"name": "t", "out_dir": str(out), "device": "cpu", "seed": 1,
                        "data": {"name": "table", "params": p}, "model": {"arch": "mmoe", "params": {"num_experts": 2}},
                        "train": {"epochs": 1, "batch_size": 128, "eval_batch_size": 500, "early_stopping": None}})
    Trainer(cfg, progress=False).fit()
    return paths, out


# ----------------------------------------------------------------------------- 1. predict onto its input
def test_predict_refuses_an_output_that_is_an_input_file(table_run, tmp_path, monkeypatch, capsys):
    """OUT equal to the input, a symbolic link to it, or a hard link of it: one line, exit 2, and
    the input keeps its bytes (before: exit 0 and the data replaced by the score columns)."""
    paths, run = table_run
    data = tmp_path / "in.parquet"
    data.write_bytes(Path(paths[2]).read_bytes())
    before = _digest(data)
    (tmp_path / "link.parquet").symlink_to(data)
    os.link(data, tmp_path / "hard.parquet")
    for out in (data, tmp_path / "link.parquet", tmp_path / "hard.parquet", tmp_path / "." / "in.parquet"):
        assert_one_line_exit_2(cli(monkeypatch, capsys, "predict", run, data, out), "in.parquet", "OUT")
        assert _digest(data) == before, out
    # a folder input whose files include OUT (a rerun into the data folder)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(data.read_bytes())
    assert_one_line_exit_2(cli(monkeypatch, capsys, "predict", run, folder, folder / "a.parquet"), "a.parquet")
    assert _digest(folder / "a.parquet") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "hard.parquet", "in.parquet", "link.parquet"]
    code, _, err = cli(monkeypatch, capsys, "predict", run, data, tmp_path / "scores.parquet")
    assert code == 0, err
    assert pq.read_table(tmp_path / "scores.parquet").column_names == ["click", "conversion"]


# ----------------------------------------------------------------------------- 2. temporary names
def _killed_predict(run, data, out):
    def go():
        import pyarrow.parquet as pq_mod

        def write_then_die(self, table, *a, **k):
            real_write(self, table, *a, **k)
            os._exit(KILLED)  # after the first record batch is on disk

        real_write = pq_mod.ParquetWriter.write_table
        pq_mod.ParquetWriter.write_table = write_then_die
        from polytask.train.tables import predict_table

        predict_table(run, str(data), out, batch_size=100)
    return go


def test_killed_predicts_leave_unique_hidden_names_that_the_next_predict_removes(table_run, tmp_path,
                                                                                 monkeypatch, capsys):
    """A predict killed mid-write leaves a hidden temporary file of its own (before: ``OUT.tmp``,
    shared by every predict into OUT and removed by none); the next predict into OUT removes those
    of dead processes and leaves a live one's (a predict still writing beside it)."""
    paths, run = table_run
    out = tmp_path / "scores.parquet"
    assert _fork(_killed_predict(run, paths[2], out)) == KILLED
    first = _partials(tmp_path, out.name)
    assert len(first) == 1 and sorted(p.name for p in tmp_path.iterdir()) == first, sorted(tmp_path.iterdir())
    live = tmp_path / f".{out.name}.{os.getpid()}.abcd_123.partial"  # a predict still writing (this process)
    live.write_bytes(b"x")
    assert _fork(_killed_predict(run, paths[2], out)) == KILLED  # removes the first, leaves the live one
    second = _partials(tmp_path, out.name)
    assert len(second) == 2 and live.name in second and first[0] not in second
    code, _, err = cli(monkeypatch, capsys, "predict", run, paths[2], out)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, out.name])
    assert pq.read_table(out).num_rows == pq.read_metadata(paths[2]).num_rows


def test_killed_export_leaves_no_visible_file_and_the_next_export_cleans_up(table_run, tmp_path,
                                                                            monkeypatch, capsys):
    """``export`` killed while saving: no ``OUT.tmp.pt2`` (before: left, and shared by two exports);
    a hidden temporary file that the next export into OUT removes."""
    from polytask.export import load_serving

    _, run = table_run
    out = tmp_path / "model.pt2"

    def go():
        real = torch.export.save

        def save_then_die(program, f, *a, **k):
            real(program, f, *a, **k)
            os._exit(KILLED)

        torch.export.save = save_then_die
        from polytask.export import export_run

        export_run(run, out)

    assert _fork(go) == KILLED
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left == _partials(tmp_path, out.name), left
    code, _, err = cli(monkeypatch, capsys, "export", run, out)
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    _, meta = load_serving(out)
    assert meta["tasks"] == ["click", "conversion"]


# ----------------------------------------------------------------------------- 3. export-adapters
@pytest.fixture(scope="module")
def adapters_run(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_adapters_train import config

    root = tmp_path_factory.mktemp("adapters")
    Trainer(config(root, "lora", epochs=1), progress=False).fit()
    return root / "run"


@pytest.mark.parametrize("peft", [False, True])
def test_export_adapters_killed_leaves_no_out_and_the_rerun_succeeds(adapters_run, tmp_path, monkeypatch, capsys,
                                                                      peft):
    """Killed before the towers (polytask's format) or mid-way through PEFT's files: no OUT (before:
    OUT without heads.safetensors, and every rerun refused with "'OUT' exists"); the rerun removes
    the killed build and writes OUT whole."""
    from polytask import adapters as adapters_mod
    from polytask.train import checkpoint

    out = tmp_path / "exported"
    args = ["--peft", "--task", "task1"] if peft else []

    def go():
        if peft:
            real = adapters_mod.save_peft

            def save_then_die(model, path, task=None):
                real(model, path, task=task)
                os._exit(KILLED)  # the adapter files are written, the command not finished

            adapters_mod.save_peft = save_then_die
        else:
            def die(path, *a, **k):
                os._exit(KILLED)  # before heads.safetensors

            checkpoint.atomic_write = die
        from polytask.train.backbone import export_adapters

        export_adapters(adapters_run, out, peft_task="task1" if peft else None, peft=peft)

    assert _fork(go) == KILLED
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".exported.") and left[0].endswith(".partial"), left
    code, _, err = cli(monkeypatch, capsys, "export-adapters", adapters_run, out, *args)
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]
    want = {"adapter_config.json", "adapter_model.safetensors"} if peft else {"heads.safetensors"}
    assert want <= {p.name for p in out.iterdir()}
    assert_one_line_exit_2(cli(monkeypatch, capsys, "export-adapters", adapters_run, out, *args), "exists")


# ----------------------------------------------------------------------------- 4. LoRA adapters replaced
def test_extract_lora_overwrite_killed_before_the_new_adapter_is_in_place_keeps_the_old(tmp_path, monkeypatch,
                                                                                         capsys):
    """``extract-lora OUT --overwrite`` killed as it puts the new adapter in place: the old adapter
    is still OUT, byte for byte (before: deleted first, then a kill left no OUT and a
    ``.OUT.partial-<pid>`` that nothing removes); the next run replaces it and leaves nothing else."""
    pytest.importorskip("transformers")
    from test_merge_lora import _model

    from polytask.merge.lora import extract_lora

    _model(0).save_pretrained(tmp_path / "base")
    _model(1).save_pretrained(tmp_path / "ft")
    out = tmp_path / "out"
    extract_lora(tmp_path / "base", tmp_path / "ft", out, rank=2)
    before = {p.name: _digest(p) for p in out.iterdir() if not p.name.startswith(".")}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(before)

    def go():
        real_replace, real_rename = os.replace, os.rename

        def guarded(fn):
            def call(src, dst, *a, **k):
                if Path(src) == out or Path(dst) == out:
                    os._exit(KILLED)  # the new adapter is complete; OUT is about to change
                return fn(src, dst, *a, **k)
            return call

        os.replace, os.rename = guarded(real_replace), guarded(real_rename)
        extract_lora(tmp_path / "base", tmp_path / "ft", out, rank=3, overwrite=True)

    assert _fork(go) == KILLED
    # the writer's hidden marker aside, OUT holds the old adapter's files
    assert {p.name: _digest(p) for p in out.iterdir() if not p.name.startswith(".")} == before
    code, _, err = cli(monkeypatch, capsys, "extract-lora", tmp_path / "base", tmp_path / "ft", out, "--rank", "3",
                       "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "out"]
    assert yaml.safe_load((out / "adapter_config.json").read_text())["r"] == 3


# ----------------------------------------------------------------------------- 5. multi-document merges
MULTI = """
name: ab
merge_method: linear
models:
  - {model: a, parameters: {weight: WA}}
  - {model: b, parameters: {weight: 1.0}}
dtype: float32
---
merge_method: linear
models:
  - {model: ab, parameters: {weight: 1.0}}
  - {model: c, parameters: {weight: 1.0}}
dtype: float32
"""


def _three_models(tmp_path):
    """Tiny random transformers a, b, c saved under ``tmp_path``; their state dicts by name."""
    pytest.importorskip("transformers")
    from test_merge_lora import _model

    from polytask.merge.io import load_state_dict

    models = {}
    for seed, name in enumerate("abc"):
        _model(seed).save_pretrained(tmp_path / name)
        models[name] = load_state_dict(tmp_path / name)
    return models


def test_multi_document_merge_rebuilds_an_intermediate_made_from_another_config(tmp_path, monkeypatch, capsys):
    """The final merge killed, document 1 edited, the same command again: the intermediate is
    rebuilt from the edited document (before: the stale one was reused silently), checked against
    the linear merge by hand, ``(wa * a + b) / (wa + 1)`` then ``(ab + c) / 2``. An unchanged
    document's intermediate is still kept (mergekit-multi --lazy)."""
    from polytask.merge import config as merge_config
    from polytask.merge.io import load_state_dict

    models = _three_models(tmp_path)
    spec, out, parts = tmp_path / "multi.yaml", tmp_path / "final", tmp_path / "final.parts"
    spec.write_text(MULTI.replace("WA", "1.0"))
    real = merge_config._run_one

    def go():
        def die_at_final(cfg, config_path, text, target, **kw):
            if Path(target) == out:
                os._exit(KILLED)
            return real(cfg, config_path, text, target, **kw)

        merge_config._run_one = die_at_final
        merge_config.run_merge(spec, out)

    assert _fork(go) == KILLED
    assert (parts / "ab" / "model.safetensors").is_file() and not out.exists()
    spec.write_text(MULTI.replace("WA", "3.0"))  # document 1 edited
    code, _, err = cli(monkeypatch, capsys, "merge", spec, out)
    assert code == 0, err
    ab, final = load_state_dict(parts / "ab"), load_state_dict(out)
    a, b, c = models["a"], models["b"], models["c"]
    for k in a:
        torch.testing.assert_close(ab[k], (3 * a[k] + b[k]) / 4, rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(final[k], (ab[k] + c[k]) / 2, rtol=0, atol=1e-6, msg=k)
    # unchanged: kept as it is (not rewritten)
    stamp = (parts / "ab" / "model.safetensors").stat().st_mtime_ns
    code, _, err = cli(monkeypatch, capsys, "merge", spec, tmp_path / "final2", "-I", parts)
    assert code == 0, err
    assert (parts / "ab" / "model.safetensors").stat().st_mtime_ns == stamp
    # an intermediate without its record is refused, in one line, rather than trusted
    (parts / "ab" / "polytask_merge.yaml").unlink()
    assert_one_line_exit_2(cli(monkeypatch, capsys, "merge", spec, tmp_path / "final3", "-I", parts),
                           "polytask_merge.yaml", "document 1")
    assert not (tmp_path / "final3").exists()


# ----------------------------------------------------------------------------- 6. adapters config errors
ADAPTER_ERRORS = [
    ({"method": "lorra"}, "model.params.method: unknown method 'lorra'"),
    ({"method": "molora", "method_params": {"num_experts": 2, "top_k": 3}},
     "model.params.method_params.top_k: must be between 1 and num_experts=2"),
    ({"method_params": {"top_k": 1}}, "model.params.method_params.top_k: method 'lora' takes no such parameter"),
    ({"rank": 64}, "model.params.rank: 64 is larger than module"),
    ({"target_modules": ["nope"]}, "model.params.target_modules: ['nope'] matches no nn.Linear"),
    ({"backbone": {"path": "./nope"}}, "model.params.backbone.path: no such folder: './nope'"),
]


@pytest.mark.parametrize("params,message", ADAPTER_ERRORS)
def test_adapters_config_errors_name_the_key_the_user_wrote(tmp_path, monkeypatch, capsys, params, message):
    """A bad adapters setting: one line, exit 2, naming the run config's key (before: the adapters
    API's ``adapters.method``, and for a missing backbone folder transformers' Hub repo-id rule)."""
    pytest.importorskip("transformers")
    from test_adapters_train import BERT

    monkeypatch.chdir(tmp_path)
    model = {"backbone": {"config": BERT}, "method": "lora", "target_modules": ["query", "value"], "rank": 2}
    cfg = {"name": "t", "seed": 0, "device": "cpu", "out_dir": str(tmp_path / "run"),
           "data": {"name": "sequence_tasks", "params": {"num_tasks": 2, "num_rows": 60, "vocab_size": 40,
                                                         "max_length": 8}},
           "model": {"arch": "adapters", "params": {**model, **params}}, "train": {"epochs": 1, "batch_size": 32}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    line = assert_one_line_exit_2(cli(monkeypatch, capsys, "train", tmp_path / "c.yaml"), message)
    assert "adapters." not in line.replace("model.params.", "") and "repo" not in line.lower(), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    if "backbone" in params:
        (tmp_path / "file").write_text("x")  # a file where the folder should be
        cfg["model"]["params"]["backbone"] = {"path": "file"}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert_one_line_exit_2(cli(monkeypatch, capsys, "train", tmp_path / "c.yaml"),
                               "model.params.backbone.path: is not a folder: 'file'")


def test_adapter_killed_between_its_two_renames_is_put_back_by_the_next_writer(tmp_path, monkeypatch, capsys):
    """The old adapter renamed aside (``.out.old-*``), killed before the new one took its place: the
    next writer into OUT puts the old one back before it starts (before: deleted it as stale), so a
    second failure still leaves the old adapter; a writer without --overwrite is then refused."""
    pytest.importorskip("transformers")
    from test_merge_lora import _model

    from polytask.merge.lora import extract_lora

    _model(0).save_pretrained(tmp_path / "base")
    _model(1).save_pretrained(tmp_path / "ft")
    out = tmp_path / "out"
    extract_lora(tmp_path / "base", tmp_path / "ft", out, rank=2)
    before = {p.name: _digest(p) for p in out.iterdir() if not p.name.startswith(".")}

    def killed(when):
        def go():
            real = os.rename

            def rename(src, dst, *a, **k):
                if when(Path(src), Path(dst)):
                    os._exit(KILLED)
                return real(src, dst, *a, **k)

            os.rename = rename
            extract_lora(tmp_path / "base", tmp_path / "ft", out, rank=3, overwrite=True)
        return go

    # the new adapter onto OUT, after OUT went aside
    assert _fork(killed(lambda src, dst: dst == out and src.name.startswith(".out.partial-"))) == KILLED
    assert not out.exists() and any(p.name.startswith(".out.old-") for p in tmp_path.iterdir())
    # the rerun killed before it replaces anything: the old adapter is OUT again
    assert _fork(killed(lambda src, dst: src == out)) == KILLED
    assert {p.name: _digest(p) for p in out.iterdir() if not p.name.startswith(".")} == before
    code, _, err = cli(monkeypatch, capsys, "extract-lora", tmp_path / "base", tmp_path / "ft", out, "--rank", "3")
    assert code == 2 and "exists" in err
    code, _, err = cli(monkeypatch, capsys, "extract-lora", tmp_path / "base", tmp_path / "ft", out, "--rank", "3",
                       "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "out"]


CHAIN = MULTI.replace("""merge_method: linear
models:
  - {model: ab""", """name: abc
merge_method: linear
models:
  - {model: ab""") + """---
merge_method: linear
models:
  - {model: abc, parameters: {weight: 1.0}}
  - {model: a, parameters: {weight: 1.0}}
dtype: float32
"""


def test_multi_document_merge_rebuilds_what_uses_a_rebuilt_intermediate(tmp_path, monkeypatch, capsys):
    """ab <- abc <- final: document 1 edited after a killed final merge; abc's own document is
    unchanged, but it was made from the old ab, so it is rebuilt too: abc = (ab + c) / 2 with the new
    ab = (3a + b) / 4, final = (abc + a) / 2."""
    from polytask.merge import config as merge_config
    from polytask.merge.io import load_state_dict

    m = _three_models(tmp_path)
    spec, out, parts = tmp_path / "chain.yaml", tmp_path / "final", tmp_path / "final.parts"
    spec.write_text(CHAIN.replace("WA", "1.0"))
    real = merge_config._run_one

    def go():
        merge_config._run_one = lambda cfg, path, text, target, **kw: (
            os._exit(KILLED) if Path(target) == out else real(cfg, path, text, target, **kw))
        merge_config.run_merge(spec, out)

    assert _fork(go) == KILLED
    assert (parts / "abc" / "model.safetensors").is_file() and not out.exists()
    spec.write_text(CHAIN.replace("WA", "3.0"))
    code, _, err = cli(monkeypatch, capsys, "merge", spec, out)
    assert code == 0, err
    abc, final = load_state_dict(parts / "abc"), load_state_dict(out)
    for k in m["a"]:
        ab = (3 * m["a"][k] + m["b"][k]) / 4
        torch.testing.assert_close(abc[k], (ab + m["c"][k]) / 2, rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(final[k], (abc[k] + m["a"][k]) / 2, rtol=0, atol=1e-6, msg=k)
