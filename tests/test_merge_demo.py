"""``polytask demo --merge`` (polytask.merge.demo): the merged checkpoints against hand arithmetic
on the saved fine-tunes, the printed scores against a re-evaluation of the saved checkpoints, the
set-up's premise (each fine-tune beats the base on its own task) and the all-or-nothing output."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polytask.data.builtin import load
from polytask.errors import ConfigError, MergeError
from polytask.merge import demo as merge_demo_module
from polytask.merge.demo import DEMO_TASKS, MODEL_FILE, MergeDemoSettings, merge_demo
from polytask.nn import build_model

SEED = 0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run at the default settings (a few seconds)."""
    out = tmp_path_factory.mktemp("merge_demo") / "out"
    return merge_demo(out, SEED)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(directory / "model.safetensors").items()}


def _inputs(out: Path):
    base = _weights(out / "base")
    fts = [_weights(out / f"finetuned-{t}") for t in DEMO_TASKS]
    return base, fts


# -- the merged checkpoints are the methods' combinations of the saved fine-tunes ----------------------------
def test_task_arithmetic_is_base_plus_lambda_sum_of_task_vectors(demo):
    base, fts = _inputs(demo.out_dir)
    merged = _weights(demo.out_dir / "merged-task_arithmetic")
    assert set(merged) == set(base)
    for name, b in base.items():
        # Ilharco et al.: theta = theta_0 + lambda * sum_t tau_t, lambda = 0.5, weights 1
        expected = b + 0.5 * sum(ft[name] - b for ft in fts)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)


def test_heads_are_frozen_so_every_merge_keeps_the_base_heads(demo):
    base, fts = _inputs(demo.out_dir)
    heads = [k for k in base if k.startswith("heads.")]
    trunk = [k for k in base if not k.startswith("heads.")]
    assert heads and trunk
    for ft in fts:
        assert all(torch.equal(ft[k], base[k]) for k in heads)
        assert all(not torch.equal(ft[k], base[k]) for k in trunk)  # the trunk did move
    for method in ("task_arithmetic", "ties", "dare_ties"):
        merged = _weights(demo.out_dir / f"merged-{method}")
        assert all(torch.equal(merged[k], base[k]) for k in heads), method


def _ties_by_hand(base: torch.Tensor, fts: list[torch.Tensor], density: float) -> torch.Tensor:
    """Yadav et al. (NeurIPS 2023), Algorithm 1 with weights 1 and lambda 1: trim each task vector to
    its int(density * numel) largest magnitudes, elect the sign of the summed trimmed values (+ on a
    zero sum), average the trimmed values that carry the elected sign (none: 0)."""
    trimmed = []
    for ft in fts:
        tau = (ft - base).reshape(-1)
        k = int(density * tau.numel())
        keep = torch.zeros_like(tau, dtype=torch.bool)
        keep[tau.abs().argsort(descending=True)[:k]] = True
        trimmed.append(torch.where(keep, tau, torch.zeros_like(tau)))
    t = torch.stack(trimmed)
    elected = torch.where(t.sum(0) >= 0, 1.0, -1.0).double()
    agree = (t != 0) & (t.sign() == elected)
    count = agree.sum(0).clamp_min(1)
    return base + ((t * agree).sum(0) / count).reshape(base.shape)


def test_ties_is_trim_elect_disjoint_mean_of_task_vectors(demo):
    base, fts = _inputs(demo.out_dir)
    merged = _weights(demo.out_dir / "merged-ties")
    for name in [k for k in base if not k.startswith("heads.")]:
        expected = _ties_by_hand(base[name], [ft[name] for ft in fts], density=0.2)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)
        # about 20 % of each task vector survives the trim, so many entries are left at the base's
        changed = (merged[name] != base[name]).double().mean()
        assert 0.15 < changed <= 0.2 * len(fts) + 1e-9, (name, changed)


def test_dare_ties_entries_are_sums_of_same_signed_task_vector_subsets(demo):
    """DARE with density 0.5 rescales kept entries by 2, and lambda is 0.5: each merged entry minus
    the base is the sum of the task vectors kept there and agreeing with the elected sign, i.e. of
    a subset of the models whose values share one sign. Every entry must match such a subset, and
    the drops must make more than one subset occur (a missing drop would always give the full set)."""
    base, fts = _inputs(demo.out_dir)
    merged = _weights(demo.out_dir / "merged-dare_ties")
    name = "bottom.0.weight"
    taus = torch.stack([ft[name] - base[name] for ft in fts]).reshape(len(fts), -1)
    delta = (merged[name] - base[name]).reshape(-1)
    best = torch.full_like(delta, float("inf"))
    chosen = torch.zeros_like(delta, dtype=torch.long)
    for code, subset in enumerate(itertools.product([0, 1], repeat=len(fts))):
        s = torch.tensor(subset, dtype=torch.bool)
        vals = taus[s]
        same_sign = (vals >= 0).all(0) | (vals <= 0).all(0) if s.any() else torch.ones_like(delta, dtype=torch.bool)
        err = torch.where(same_sign, (delta - vals.sum(0)).abs(), torch.full_like(delta, float("inf")))
        chosen = torch.where(err < best, code, chosen)
        best = torch.minimum(best, err)
    assert best.max() < 1e-6
    assert len(chosen.unique()) >= 4


def test_dare_ties_config_reruns_bit_identically_through_polytask_merge(demo, tmp_path):
    from polytask.merge import run_merge

    again = run_merge(demo.out_dir / "merge-dare_ties.yaml", tmp_path / "again", progress=False)
    first = load_file(demo.out_dir / "merged-dare_ties" / "model.safetensors")
    second = load_file(again / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)


# -- the table is what the saved checkpoints score --------------------------------------------------------------
def _accuracy_by_hand(directory: Path) -> dict[str, float]:
    spec = json.loads((directory / MODEL_FILE).read_text())
    splits = load("digits", seed=SEED).select_tasks(DEMO_TASKS)
    model = build_model("shared_bottom", 64, splits.tasks, bottom=spec["bottom"], tower=[])
    model.load_state_dict(load_file(directory / "model.safetensors"))
    model.eval()
    test = splits.test
    with torch.no_grad():
        out = model(test.inputs)
    return {
        "digit": (out["digit"].argmax(1) == test.targets["digit"]).double().mean().item(),
        "odd": ((out["odd"].reshape(-1) > 0) == (test.targets["odd"] > 0.5)).double().mean().item(),
        "ge5": ((out["ge5"].reshape(-1) > 0) == (test.targets["ge5"] > 0.5)).double().mean().item(),
    }


def test_table_scores_equal_a_reevaluation_of_the_saved_checkpoints(demo):
    expected_rows = ["base", *(f"finetuned-{t}" for t in DEMO_TASKS),
                     "merged-task_arithmetic", "merged-ties", "merged-dare_ties"]
    assert list(demo.scores) == expected_rows
    stored = json.loads((demo.out_dir / "scores.json").read_text())
    table = (demo.out_dir / "table.md").read_text()
    for row in expected_rows:
        by_hand = _accuracy_by_hand(demo.out_dir / row)
        assert demo.scores[row] == pytest.approx(by_hand, abs=1e-12), row
        assert stored[row] == pytest.approx(by_hand, abs=1e-12), row
        mean = sum(by_hand.values()) / 3
        assert f"| {row} | " + " | ".join(f"{by_hand[t]:.4f}" for t in DEMO_TASKS) + f" | {mean:.4f} |" in table
    assert len(set(map(str, demo.scores.values()))) == len(expected_rows)  # not one model scored seven times


def test_each_finetune_beats_the_base_on_its_own_task(demo):
    for t in DEMO_TASKS:
        # a property of the set-up (base trained 3 epochs, fine-tunes 10 more on one task at a lower
        # learning rate); at seeds 0-4 the smallest margin was 3.6 points
        assert demo.scores[f"finetuned-{t}"][t] > demo.scores["base"][t] + 0.02, t


def test_every_merge_has_a_higher_mean_accuracy_than_the_base(demo):
    # the demo's point, a property of the set-up: at seeds 0-4 the smallest margin was 1.6 points
    def mean(row):
        return sum(demo.scores[row].values()) / len(DEMO_TASKS)

    for method in ("task_arithmetic", "ties", "dare_ties"):
        assert mean(f"merged-{method}") > mean("base") + 0.01, method


# -- the output appears whole or not at all -----------------------------------------------------------------
TINY = MergeDemoSettings(bottom=(16,), base_epochs=1, finetune_epochs=1)


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_existing_output_is_refused_untouched_and_replaced_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"output directory .*out' already exists \(pass --overwrite"):
        merge_demo(out, SEED, settings=TINY)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and _siblings(out) == []
    # a killed writer's marked partial is removed by the next one
    stale = tmp_path / ".out.partial-abcd1234"
    stale.mkdir()
    (stale / ".polytask-partial").write_text("")
    merge_demo(out, SEED, overwrite=True, settings=TINY)
    assert not (out / "mine.txt").exists() and (out / "merged-ties" / "model.safetensors").is_file()
    assert not (out / ".polytask-partial").exists()
    assert _siblings(out) == []


def test_a_failed_merge_leaves_no_output_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import polytask.merge.config as merge_config

    real = merge_config.run_merge
    calls = []

    def second_merge_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise MergeError("disk full (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_config, "run_merge", second_merge_fails)
    out = tmp_path / "made" / "by" / "out"
    with pytest.raises(MergeError, match="disk full"):
        merge_demo(out, SEED, settings=TINY)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []  # the folders it made are gone too
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    calls.clear()
    with pytest.raises(MergeError, match="disk full"):
        merge_demo(out, SEED, overwrite=True, settings=TINY)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and _siblings(out) == []


def test_cli_demo_merge_prints_the_table_and_refuses_a_second_run(tmp_path):
    from typer.testing import CliRunner

    from polytask.cli import app

    runner = CliRunner()
    args = ["demo", "--merge", "--out", str(tmp_path), "--epochs-scale", "0.5"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    table = (tmp_path / "merge" / "table.md").read_text().strip()
    assert table in res.output and "| merged-dare_ties |" in table
    res = runner.invoke(app, args)
    assert isinstance(res.exception, ConfigError) and "already exists" in str(res.exception)
    res = runner.invoke(app, ["demo", "--out", str(tmp_path), "--overwrite"])
    assert isinstance(res.exception, ConfigError) and "--overwrite: only with --merge" in str(res.exception)


def test_bad_options_are_one_line_config_errors_before_any_output(tmp_path):
    with pytest.raises(ConfigError, match="--epochs-scale must be a positive number, got 0"):
        merge_demo_module.merge_demo_main(tmp_path / "out", epochs_scale=0.0)
    with pytest.raises(ConfigError, match="--device: --merge runs on the CPU .*got 'cuda'"):
        merge_demo_module.merge_demo_main(tmp_path / "out", device="cuda")
    with pytest.raises(ConfigError, match="finetune_lr: a positive number, got nan"):
        MergeDemoSettings(finetune_lr=float("nan"))
    with pytest.raises(ConfigError, match=r"bottom: positive layer widths, got \[16, 0\]"):
        MergeDemoSettings(bottom=(16, 0))
    with pytest.raises(ConfigError, match="base_epochs: a positive integer, got 0"):
        MergeDemoSettings(base_epochs=0)
    bad_method = MergeDemoSettings(bottom=(16,), base_epochs=1, finetune_epochs=1, methods={"tiez": ({}, {})})
    with pytest.raises(ConfigError, match="tiez"):  # refused by the merge config's own check
        merge_demo(tmp_path / "out", SEED, settings=bad_method)
    assert list(tmp_path.iterdir()) == []


def test_same_seed_same_scores_and_the_callers_rng_is_left_alone(tmp_path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = merge_demo(tmp_path / "a", 5, settings=TINY)
    assert torch.equal(torch.rand(3), expected_draw)
    second = merge_demo(tmp_path / "b", 5, settings=TINY)
    assert first.scores == second.scores
    a, b = _weights(tmp_path / "a" / "merged-dare_ties"), _weights(tmp_path / "b" / "merged-dare_ties")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_merges_equal_mergekit_on_the_saved_checkpoints_with_the_saved_config(demo, method):
    """mergekit 0.1.5 (the peer) merging the saved tensors with the parameters the saved YAML gives."""
    import yaml

    api = pytest.importorskip("mergekit.merge_methods.api")
    config = yaml.safe_load((demo.out_dir / f"merge-{method}.yaml").read_text())
    assert config["base_model"] == "base" and [m["model"] for m in config["models"]] == [
        f"finetuned-{t}" for t in DEMO_TASKS]
    params = {**config["parameters"], **config["models"][0]["parameters"]}  # the same for every model
    assert all(m["parameters"] == config["models"][0]["parameters"] for m in config["models"])
    base = load_file(demo.out_dir / "base" / "model.safetensors")
    fts = [load_file(demo.out_dir / f"finetuned-{t}" / "model.safetensors") for t in DEMO_TASKS]
    merged = load_file(demo.out_dir / f"merged-{method}" / "model.safetensors")
    for name in base:
        expected = api.merge_tensors([base[name], *(ft[name] for ft in fts)], method, parameters=params,
                                     base_index=0)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)
