"""`polytask analyze` end to end on a tiny config, and the self-contained HTML report, checked in
headless Chromium (figures decoded, tables present)."""

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from polytask.analyze.runner import AnalyzeOptions, analyze, parse_what
from polytask.errors import ConfigError, DataError
from polytask.report.html import render_report, write_report

TASKS = ["task0", "task1", "task2", "task3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    cfg = {"name": "clusters", "seed": 0, "device": "cpu", "out_dir": str(root / "{name}"),
           "data": {"name": "synthetic", "params": {"num_tasks": 4, "clusters": 2, "correlation": 0.9,
                                                    "num_rows": 400, "input_dim": 10}},
           "model": {"arch": "mmoe", "params": {"num_experts": 3, "expert": [8], "tower": [4]}},
           "train": {"epochs": 2, "batch_size": 50, "early_stopping": None}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run, notes = analyze(path, AnalyzeOptions(every=2, progress=False))
    assert any("grouping into 2" in n for n in notes)
    return run


def test_analyze_writes_every_matrix_as_json(run_dir):
    files = {p.stem: json.loads(p.read_text()) for p in (run_dir / "analysis").glob("*.json")}
    assert set(files) == {"conflict", "affinity", "grouping", "experts"}
    for name in ("conflict", "affinity", "experts"):
        assert files[name]["tasks"] == TASKS
        for matrix in files[name]["matrices"].values():
            assert len(matrix) == 4
    groups = files["grouping"]["groups"]
    assert len(groups) == 2 and sorted(sum(groups, [])) == TASKS  # a partition by default
    assert files["conflict"]["samples"] == 2 * 6 // 2  # 2 epochs × ceil(280 train rows / 50), every 2 steps
    for png in ("conflict", "affinity", "experts"):
        assert (run_dir / "plots" / f"{png}.png").stat().st_size > 1000


def test_analyze_run_dir_reuses_results_and_regroups(run_dir):
    before = (run_dir / "analysis" / "affinity.json").read_text()
    _, notes = analyze(run_dir, AnalyzeOptions(what=parse_what("grouping"), k=3, overlap=True, progress=False))
    assert (run_dir / "analysis" / "affinity.json").read_text() == before
    grouping = json.loads((run_dir / "analysis" / "grouping.json").read_text())
    assert len(grouping["groups"]) == 3 and grouping["overlap"]
    analyze(run_dir, AnalyzeOptions(what=parse_what("grouping"), progress=False))  # back to k=2 for the report


def test_parse_what_and_bad_targets(tmp_path):
    assert parse_what("grouping") == ["affinity", "grouping"]
    assert parse_what("all")[-1] == "check"
    with pytest.raises(ConfigError, match="'gradients'"):
        parse_what("conflict,gradients")
    with pytest.raises(ConfigError, match="neither a config file nor a run directory"):
        analyze(tmp_path / "missing", AnalyzeOptions())
    with pytest.raises(DataError, match="neither metrics.jsonl"):
        render_report(tmp_path)


def test_cli_user_errors_exit_2_in_one_line(tmp_path, monkeypatch, capsys):
    from polytask import cli

    for args in (["analyze", str(tmp_path / "nope.yaml")], ["report", str(tmp_path / "nope")],
                 ["analyze", str(tmp_path), "--what", "bogus"]):
        monkeypatch.setattr(sys, "argv", ["polytask", *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_report_html_contents(run_dir):
    text = write_report(run_dir).read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text  # nothing fetched
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', text)
    alts = {a for a, _ in images}
    assert {"training curves", "gradient cosine heatmap", "gradient cosine over training", "affinity heatmap",
            "expert usage heatmap"} <= alts
    for _, data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    affinity = json.loads((run_dir / "analysis" / "affinity.json").read_text())["matrices"]["affinity"]
    assert f"{affinity[0][1]:.4g}" in text  # the matrix is tabulated, not only drawn
    for heading in ("Gradient conflict", "Inter-task affinity", "Task grouping", "Expert usage", "Metrics at the best"):
        assert heading in text


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    page = tmp_path / "report.html"
    # count, in the browser, the images that decoded and the tables that were laid out
    probe = ("<script>window.addEventListener('load',()=>{const ok=[...document.images].filter("
             "i=>i.complete&&i.naturalWidth>0).length;document.body.setAttribute('data-images-ok',ok);"
             "document.body.setAttribute('data-tables',document.querySelectorAll('table tbody tr').length);});"
             "</script></body>")
    page.write_text(write_report(run_dir).read_text().replace("</body>", probe))
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = res.stdout
    assert "<h1>polytask run report: clusters</h1>" in dom, res.stderr[-2000:]
    n_images = len(re.findall(r"<img ", dom))
    assert n_images >= 4
    assert f'data-images-ok="{n_images}"' in dom  # every embedded PNG decoded
    rows = int(re.search(r'data-tables="(\d+)"', dom).group(1))
    assert rows >= 4 * 5  # task rows of the conflict, affinity, expert and metric tables
    assert dom.count("<table>") >= 6 and "task3" in dom


def test_report_shows_task_vector_interference(tmp_path):
    from polytask.analyze import task_vector_cosine, tsv_interference

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(4, 4)}
    models = {n: {"w": torch.randn(4, 4, generator=g)} for n in ("math", "code", "chat")}
    task_vector_cosine(base, models).save(tmp_path)
    tsv_interference(base, models).save(tmp_path)
    text = render_report(tmp_path)
    assert "<h2>task_vector_cosine</h2>" in text and "<h2>tsv_interference</h2>" in text
    assert 'alt="tsv_interference mean_overlap heatmap"' in text
    assert all(name in text for name in models)
