"""QM9 benchmark protocols (Nash-MTL's and NTKMTL's revised schedule): targets z-scored with the
training split as each protocol says (FAMO's public script dropped it), the schedule's batch size and
plateau patience reaching the training loop, NTKMTL's retrained single-task reference, old result
files still comparable, and the multi-seed significance section of the comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from polytask.errors import ConfigError

SAMPLE = Path(__file__).parent / "data" / "qm9" / "sample.csv"


@pytest.fixture(scope="module")
def graphs():
    pd = pytest.importorskip("pandas")
    pytest.importorskip("rdkit")
    pytest.importorskip("torch_geometric")
    from polytask.data.qm9 import build_graphs

    torch.set_num_threads(1)
    return build_graphs(pd.read_csv(SAMPLE), progress=False)


def test_protocol_table_and_unknown_name() -> None:
    from polytask.bench import qm9 as bench

    assert (bench.protocol("nash_mtl").batch_size, bench.protocol("nash_mtl").lr_patience) == (120, 5)
    assert (bench.protocol("ntkmtl").batch_size, bench.protocol("ntkmtl").lr_patience) == (60, 10)
    assert bench.protocol("ntkmtl").retrained_stl and not bench.protocol("nash_mtl").retrained_stl
    with pytest.raises(ConfigError, match=r"unknown protocol 'famo' \(known: nash_mtl, ntkmtl\)"):
        bench.protocol("famo")


def test_scale_targets_by_hand() -> None:
    from polytask.bench.qm9 import scale_targets

    # Column 0 on the training rows 0..2: (1, 2, 3): mean 2, std 1; column 1: (10, 10, 40): mean 20,
    # std sqrt((100 + 100 + 400) / 2) = sqrt(300). Row 3 is not a training row: scaled, not used.
    y = torch.tensor([[1.0, 10.0], [2.0, 10.0], [3.0, 40.0], [100.0, -5.0]], dtype=torch.float64)
    y_z, mean, std = scale_targets(y, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(mean, torch.tensor([2.0, 20.0], dtype=torch.float64))
    torch.testing.assert_close(std, torch.tensor([1.0, 300 ** 0.5], dtype=torch.float64))
    expected = torch.tensor([[-1.0, -10 / 300 ** 0.5], [0.0, -10 / 300 ** 0.5], [1.0, 20 / 300 ** 0.5],
                             [98.0, -25 / 300 ** 0.5]])
    torch.testing.assert_close(y_z, expected)


@pytest.mark.parametrize("name", ["nash_mtl", "ntkmtl"])
def test_training_sees_z_scored_targets_and_the_schedule(graphs, monkeypatch, name: str) -> None:
    """Spies on the batches and the LR scheduler of one epoch: the targets the losses see are the
    raw targets z-scored with the training rows (not raw: FAMO's script), the batch size and the
    plateau patience are the protocol's, and the MAE comes back in the original units."""
    from polytask.bench import qm9 as bench
    from polytask.data.qm9 import TARGETS, split_indices

    schedule = bench.protocol(name)
    seen: dict[str, object] = {}
    batches = type(graphs).batches

    def spy_batches(self, idx, batch_size, *args, y=None, **kwargs):  # noqa: ANN001, ANN202
        if kwargs.get("shuffle"):  # the training batches (evaluation runs its own, of 1000)
            seen["y"], seen["batch_size"] = y, batch_size
        return batches(self, idx, batch_size, *args, y=y, **kwargs)

    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau

    class SpyPlateau(plateau):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            seen["patience"] = kwargs["patience"]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(type(graphs), "batches", spy_batches)
    monkeypatch.setattr(torch.optim.lr_scheduler, "ReduceLROnPlateau", SpyPlateau)
    targets = ["mu", "U0"]  # U0: ~ -1e4 eV raw; a missing scaling could not go unnoticed
    bench.train_once(graphs, "ew", seed=3, targets=targets, epochs=1, val_size=4, test_size=4, progress=False,
                     device="cpu", batch_size=schedule.batch_size, lr_patience=schedule.lr_patience)
    assert seen["batch_size"] == schedule.batch_size and seen["patience"] == schedule.lr_patience
    split = split_indices(len(graphs), 3, test=4, val=4, train=None)
    raw = graphs.y[:, [TARGETS.index(t) for t in targets]].double()
    train = raw[split["train"]]
    expected = (raw - train.mean(0)) / train.std(0)
    torch.testing.assert_close(seen["y"].double(), expected, rtol=1e-6, atol=1e-6)
    assert seen["y"][split["train"]].mean(0).abs().max() < 1e-5
    assert (seen["y"][split["train"]].std(0) - 1).abs().max() < 1e-5


def _result(method: str, deltas: list[float], **settings):
    """A result whose seed ``i`` has Δm% ``deltas[i]`` against a unit reference (one target, mu)."""
    from polytask.bench.qm9 import QM9Result, SeedResult

    runs = [SeedResult(i, 0, 0.0, {"mu": 1.0 + d / 100}) for i, d in enumerate(deltas)]
    return QM9Result(method, ("mu",), runs, {"mu": 1.0}, "unit", settings={"epochs": 5, **settings})


def test_significance_section_marks_only_what_the_seeds_support() -> None:
    from polytask.bench.qm9 import comparison_markdown, significance_markdown

    scipy_stats = pytest.importorskip("scipy.stats")
    a = [10.0, 12.0, 11.0, 10.5, 11.5]
    b = [10.5, 11.6, 11.3, 10.3, 11.6]   # a + (0.5, -0.4, 0.3, -0.2, 0.1): mean 0.06 worse, noise
    c = [30.0, 33.0, 29.0, 31.0, 32.0]   # clearly worse
    assert scipy_stats.ttest_rel(b, a).pvalue > 0.5 and 2 * scipy_stats.ttest_rel(c, a).pvalue < 0.05
    results = [_result("ew", a), _result("uw", b), _result("mgda", c)]
    text = significance_markdown(results)
    table = text.split("```")[1].strip().splitlines()  # the seed table; the matrix is the second block
    assert table[0].split()[:2] == ["method", "Δm%"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    # Columns: Δm% then mu MAE, each "mean ± std" with '*' after the std when in the best group.
    assert rows["ew"][1:4] == ["11", "±", "0.79*"]
    assert rows["uw"][3].endswith("*")             # not separable from the best with these seeds
    assert not rows["mgda"][3].endswith("*")       # significantly worse
    matrix = text.split("```")[3].strip().splitlines()
    assert {line.split()[0]: line.split()[1:] for line in matrix[1:]} == {
        "ew": ["=", "<"], "uw": ["=", "<"], "mgda": [">", ">"]}
    assert "seeds [0, 1, 2, 3, 4]" in text
    main = comparison_markdown(results)
    assert "significance over seeds" in main.lower()
    cells = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in main.splitlines()
             if line.startswith("| ") and line.split("|")[1].strip() in ("ew", "uw", "mgda")}
    # std of uw: deviations (-.56, .54, .24, -.76, .54), squares sum 1.532, /4 -> 0.62
    assert cells == {"ew": "+11.0 ± 0.8*", "uw": "+11.1 ± 0.6*", "mgda": "+31.0 ± 1.6"}
    # One seed: nothing to test, no section.
    assert significance_markdown([_result("ew", [1.0]), _result("uw", [2.0])]) == ""
    # Paired by seed value: a method without seed 4 is compared on seeds 0-3 only.
    assert "seeds [0, 1, 2, 3]" in significance_markdown([results[0], _result("uw", b[:4])])


def test_result_files_from_before_protocols_count_as_nash_mtl(tmp_path) -> None:
    from polytask.bench import qm9 as bench

    old = _result("ew", [1.0], train_size=20, val_size=4, test_size=4, batch_size=120, lr=1e-3, seeds=[0])
    new = _result("uw", [2.0], train_size=20, val_size=4, test_size=4, batch_size=120, lr=1e-3, seeds=[0],
                  lr_patience=5)
    for r in (old, new):
        (tmp_path / f"qm9_{r.method}.json").write_text(json.dumps(r.to_json()))
    assert [r.method for r in bench.load_results(tmp_path)] == ["ew", "uw"]
    ntk = _result("mgda", [3.0], train_size=20, val_size=4, test_size=4, batch_size=120, lr=1e-3, seeds=[0],
                  lr_patience=10)
    (tmp_path / "qm9_mgda.json").write_text(json.dumps(ntk.to_json()))
    with pytest.raises(ConfigError, match="lr_patience 5 vs 10|lr_patience 10 vs 5"):
        bench.load_results(tmp_path)
    budget = dict(epochs=5, train_size=20, val_size=4, test_size=4, batch_size=120, lr=1e-3, seeds=[0])
    assert bench._done_with(old, budget, {}) and not bench._done_with(old, {**budget, "lr_patience": 10}, {})


def test_cli_ntkmtl_protocol_retrains_single_task_with_its_schedule(monkeypatch, capsys, tmp_path) -> None:
    """`bench qm9 --protocol ntkmtl`: the single-task reference is trained (as with --stl) and every
    run gets batch 60 and patience 10; the training itself is replaced by a recorder."""
    pytest.importorskip("torch_geometric")
    from typer.testing import CliRunner

    from polytask import cli
    from polytask.bench import qm9 as bench

    calls: list[tuple[str, dict]] = []

    def fake_run_stl_into(out, graphs, **budget):  # noqa: ANN001, ANN202
        calls.append(("stl", budget))
        return _result("stl", [0.0])

    def fake_run(balancer, **kwargs):  # noqa: ANN001, ANN202
        calls.append((balancer, kwargs))
        return _result(balancer, [5.0])

    monkeypatch.setattr(bench, "run_stl_into", fake_run_stl_into)
    monkeypatch.setattr(bench, "saved_stl", lambda out, **budget: None)
    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "format_result", lambda r: f"result {r.method}")
    monkeypatch.setattr("polytask.data.qm9.load_qm9", lambda cache=None, **k: object())
    monkeypatch.setattr("polytask.data.qm9.require_qm9_dependencies", lambda *a, **k: None)
    res = CliRunner().invoke(cli.app, ["bench", "qm9", "-b", "ew", "--protocol", "ntkmtl", "--epochs", "1",
                                       "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert [c[0] for c in calls] == ["stl", "ew"]
    for _, budget in calls:
        assert budget["batch_size"] == 60 and budget["lr_patience"] == 10
    assert calls[1][1]["reference"] == {"mu": 1.0}  # the retrained single-task MAE, not the published row
    monkeypatch.setattr("sys.argv", ["polytask", "bench", "qm9", "--protocol", "famo", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err == "error: qm9: unknown protocol 'famo' (known: nash_mtl, ntkmtl)"
    assert not (tmp_path / "bad").exists()  # nothing written
