"""Streaming checkpoint I/O, the on-disk merge engine and YAML configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from polytask.errors import CheckpointError, ConfigError, MergeError, PolytaskError
from polytask.merge import (
    Checkpoint,
    load_state_dict,
    merge_checkpoints,
    merge_state_dicts,
    run_merge,
    save_state_dict,
)


def _state(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {
            "embed.weight": torch.randn(40, 8, generator=g).bfloat16(),
            "layers.0.mlp.weight": torch.randn(16, 8, generator=g).bfloat16(),
            "layers.0.norm.weight": torch.ones(8).bfloat16(),
            "step": torch.tensor([3]),
        }
    return {k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()}


@pytest.fixture
def ckpts(tmp_path: Path):
    """A base (directory with config/tokenizer, one file) and three sharded fine-tunes."""
    base = _state(0)
    models = [_state(i + 1, base) for i in range(3)]
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(base, base_dir / "model.safetensors", metadata={"format": "pt"})
    (base_dir / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "bfloat16"}))
    (base_dir / "tokenizer.json").write_text("{}")
    paths = []
    for i, m in enumerate(models):
        paths.append(save_state_dict(m, tmp_path / f"m{i}", max_shard_bytes=800))
    return base, models, base_dir, paths


def test_reader_reads_safetensors_files_dirs_and_shards(ckpts, tmp_path):
    base, models, base_dir, paths = ckpts
    assert (paths[0] / "model.safetensors.index.json").is_file()
    assert len(list(paths[0].glob("*.safetensors"))) > 1
    for path, expected in [(base_dir, base), (base_dir / "model.safetensors", base), (paths[1], models[1])]:
        got = load_state_dict(path)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in got)
    # shards without an index: every .safetensors file of the directory
    (paths[2] / "model.safetensors.index.json").unlink()
    assert load_state_dict(paths[2]).keys() == base.keys()


def test_writer_output_loads_with_safetensors(ckpts, tmp_path):
    _, models, _, paths = ckpts
    index = json.loads((paths[0] / "model.safetensors.index.json").read_text())
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(paths[0] / shard))
    assert loaded.keys() == models[0].keys()
    assert all(torch.equal(loaded[k], models[0][k]) for k in loaded)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in models[0].values())


def test_streamed_merge_equals_state_dict_merge(ckpts, tmp_path):
    base, models, base_dir, paths = ckpts
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.7}, {"weight": 2.0, "density": 0.3}]
    out = merge_checkpoints("ties", paths, base_dir, tmp_path / "out", model_params=params,
                            dtype="float16", max_shard_size=1000, io_threads=3, prefetch_bytes=1)
    expected = merge_state_dicts("ties", models, base, model_params=params, dtype="float16")
    got = load_state_dict(out)
    assert got.keys() == expected.keys()
    for k in got:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    assert got["layers.0.mlp.weight"].dtype == torch.float16 and got["step"].dtype == torch.int64
    # config/tokenizer copied, config dtype updated, no leftovers next to the output
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert (out / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "m0", "m1", "m2", "out"]


def test_dare_streamed_is_seeded_and_order_independent(ckpts, tmp_path):
    base, models, base_dir, paths = ckpts
    params = [{"density": 0.5}] * 3
    a = merge_checkpoints("dare_ties", paths, base_dir, tmp_path / "a", model_params=params, seed=7, io_threads=1)
    b = merge_checkpoints("dare_ties", paths, base_dir, tmp_path / "b", model_params=params, seed=7, io_threads=4)
    expected = merge_state_dicts("dare_ties", models, base, model_params=params, seed=7)
    sa, sb = load_state_dict(a), load_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], expected[k]) for k in sa)


def test_interrupted_run_leaves_no_output(ckpts, tmp_path):
    _, _, base_dir, paths = ckpts
    seen = []

    def stop(name):
        seen.append(name)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints("task_arithmetic", paths, base_dir, tmp_path / "out", on_tensor=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "m0", "m1", "m2"]


def test_existing_output_refused_then_replaced(ckpts, tmp_path):
    _, _, base_dir, paths = ckpts
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(MergeError, match="already exists"):
        merge_checkpoints("task_arithmetic", paths, base_dir, out)
    merge_checkpoints("task_arithmetic", paths, base_dir, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_bad_checkpoints(ckpts, tmp_path):
    base, _, base_dir, paths = ckpts
    with pytest.raises(CheckpointError, match="does not exist"):
        merge_checkpoints("ties", [tmp_path / "nope"], base_dir, tmp_path / "out")
    # a model missing a tensor, named in the error together with the models
    partial = dict(base)
    del partial["layers.0.norm.weight"]
    save_state_dict(partial, tmp_path / "partial")
    with pytest.raises(MergeError, match=r"'layers.0.norm.weight' is in base .*base but missing from model .*partial"):
        merge_checkpoints("ties", [paths[0], tmp_path / "partial"], base_dir, tmp_path / "out")
    # a base that does not match (other shapes)
    other = {k: torch.zeros(2) if k == "embed.weight" else v for k, v in base.items()}
    save_state_dict(other, tmp_path / "other")
    with pytest.raises(MergeError, match=r"'embed.weight' has shape \[2\] in base"):
        merge_checkpoints("ties", paths, tmp_path / "other", tmp_path / "out")
    # truncated file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((paths[0] / "model-00001-of-00002.safetensors").read_bytes()[:-10]
                    if (paths[0] / "model-00001-of-00002.safetensors").exists() else b"\x00" * 4)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        Checkpoint(bad)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pickled_checkpoints_need_the_flag(ckpts, tmp_path):
    base, models, base_dir, paths = ckpts
    torch.save(models[0], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled checkpoint.*allow_pickle"):
        Checkpoint(tmp_path / "pytorch_model.bin")
    loaded = load_state_dict(tmp_path / "pytorch_model.bin", allow_pickle=True)
    assert all(torch.equal(loaded[k], models[0][k]) for k in loaded)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint(tmp_path / "evil.bin", allow_pickle=True)


def test_full_disk_is_reported_before_compute(ckpts, tmp_path, monkeypatch):
    import os

    _, _, base_dir, paths = ckpts

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(MergeError, match="not enough disk space"):
        merge_checkpoints("task_arithmetic", paths, base_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "m0", "m1", "m2"]


# -- YAML configs --------------------------------------------------------------------------------
def test_mergekit_style_yaml(ckpts, tmp_path):
    base, models, base_dir, paths = ckpts
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"""
merge_method: ties
base_model: {base_dir}
models:
  - model: {base_dir}
  - model: {paths[0]}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {paths[1]}
    parameters: {{weight: 0.5}}
  - model: {paths[2]}
parameters:
  density: 0.3
  normalize: false
  lambda: 0.8
  int8_mask: true
dtype: bfloat16
""")
    out = run_merge(cfg, tmp_path / "out")
    expected = merge_state_dicts(
        "ties", models, base, normalize=False, lambda_=0.8, dtype="bfloat16", compute_dtype="bfloat16",
        model_params=[{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.3}, {"density": 0.3}],
    )
    got = load_state_dict(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (out / "polytask_merge.yaml").read_text() == cfg.read_text()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("merge_method: tiez\nbase_model: B\nmodels: [M]\n", "unknown merge method 'tiez'"),
        ("merge_method: ties\nbase_model: B\nmodels: [M]\nparameters: {densty: 0.5}\n", "no parameter 'densty'"),
        ("merge_method: ties\nbase_model: B\nmodels: [{model: M, parameters: {t: 0.5}}]\n", "per-model parameter 't'"),
        ("merge_method: ties\nbase_model: B\nmodels: [M]\nmodel_typo: 1\n", "model_typo"),
        ("merge_method: ties\nmodels: [M]\n", "needs a base"),
        ("merge_method: ties\nbase_model: B\nmodels: [M]\nparameters: {density: [0.1, 0.5]}\n", "does not fit"),
        ("slices: []\nmerge_method: slerp\n", "slices"),
        ("merge_method: [", "invalid YAML"),
    ],
)
def test_bad_configs(ckpts, tmp_path, body, match):
    _, _, base_dir, paths = ckpts
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(body.replace("B", str(base_dir)).replace(": M", f": {paths[0]}").replace("[M]", f"[{paths[0]}]"))
    with pytest.raises(PolytaskError, match=match):
        run_merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_error_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        run_merge(tmp_path / "missing.yaml", tmp_path / "out")


def test_linear_yaml_averages_every_listed_model(ckpts, tmp_path):
    base, models, base_dir, paths = ckpts
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(f"merge_method: linear\nbase_model: {base_dir}\nmodels:\n  - model: {base_dir}\n"
                   f"  - model: {paths[0]}\n    parameters: {{weight: 3.0}}\ndtype: float32\n")
    got = load_state_dict(run_merge(cfg, tmp_path / "out"))
    k = "layers.0.mlp.weight"
    assert torch.allclose(got[k], (base[k].float() + 3 * models[0][k].float()) / 4)
    assert (tmp_path / "out" / "config.json").is_file()


def test_cli_merge(ckpts, tmp_path):
    import subprocess
    import sys

    from typer.testing import CliRunner

    from polytask.cli import app

    base, models, base_dir, paths = ckpts
    cfg = tmp_path / "ta.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base_dir}\nmodels: [{paths[0]}, {paths[1]}]\n")
    result = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # a user error: one line on stderr, exit status 2, no traceback
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base_dir}\nmodels: [{paths[0]}]\nparameters: {{lamda: 1}}\n")
    proc = subprocess.run([sys.executable, "-m", "polytask.cli", "merge", str(cfg), str(tmp_path / "out2")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "lamda" in proc.stderr
