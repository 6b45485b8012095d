"""One self-contained HTML page for a run directory: curves, metric tables, diagnostics matrices
and expert usage. Figures are embedded as base64 PNG and styles inline, so the page reads offline
and travels as one file.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polytask.analyze.io import ANALYSIS_DIR, from_jsonable, read_json
from polytask.errors import DataError

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;display:block;margin:.6em 0}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
.note{color:#555;font-size:.85em}
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return _esc(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    """An HTML table; floats shown with 4 significant digits, NaN as n/a."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in r) + "</tr>" for r in rows)
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def matrix_table(matrix: torch.Tensor, rows: Sequence[str], cols: Sequence[str] | None = None,
                 corner: str = "") -> str:
    """A matrix as an HTML table with task names on both axes."""
    cols = list(rows) if cols is None else list(cols)
    m = matrix.double().tolist()
    return table([corner, *cols], [[r, *vals] for r, vals in zip(rows, m)])


def image(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as base64."""
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _heatmap_img(matrix: torch.Tensor, rows: Sequence[str], alt: str, **kwargs: Any) -> str:
    from polytask.report.heatmap import figure_png, heatmap_figure

    return image(figure_png(heatmap_figure(matrix, rows, **kwargs)), alt)


# ----------------------------------------------------------------------------- run pieces
def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    from polytask.train.rundir import read_jsonl

    return read_jsonl(run_dir / "metrics.jsonl")  # a torn last line (a killed run) is absent


def _curves_section(rows: list[dict[str, Any]]) -> str:
    """Per task: its main metric on val/test and train/val loss per epoch."""
    from polytask.report.heatmap import figure_png
    from polytask.report.plots import _pyplot

    tasks = list(dict.fromkeys(r["task"] for r in rows if r["task"] != "*"))
    if not tasks:
        return ""
    main = {}
    for t in tasks:
        keys = next((list(r) for r in rows if r["task"] == t and r["split"] == "val"), [])
        metrics = [k for k in keys if k not in ("epoch", "split", "task", "loss", "weight")]
        main[t] = metrics[0] if metrics else "loss"
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 5.2), squeeze=False)
    for j, t in enumerate(tasks):
        for split, key, ax in (("val", main[t], axes[0, j]), ("test", main[t], axes[0, j]),
                               ("train", "loss", axes[1, j]), ("val", "loss", axes[1, j])):
            pts = [(r["epoch"], r[key]) for r in rows if r["task"] == t and r["split"] == split
                   and r.get(key) is not None]
            if pts:
                ax.plot([e for e, _ in pts], [v for _, v in pts], marker=".", label=split)
                ax.legend(fontsize=7)
        axes[0, j].set_title(f"{t}: {main[t]}", fontsize=9)
        axes[1, j].set_title(f"{t}: loss", fontsize=9)
        axes[1, j].set_xlabel("epoch")
    fig.tight_layout()
    return "<h2>Training curves</h2>" + image(figure_png(fig), "training curves")


def _metrics_section(run_dir: Path) -> str:
    path = run_dir / "best" / "metrics.json"
    if not path.exists():
        return ""
    best = json.loads(path.read_text())
    rows = []
    for task, vals in best.get("val", {}).items():
        for metric, v in vals.items():
            rows.append([task, metric, v, best.get("test", {}).get(task, {}).get(metric)])
    return (f"<h2>Metrics at the best epoch ({_esc(best.get('epoch'))}, chosen on validation)</h2>"
            + table(["task", "metric", "val", "test"], rows))


def _conflict_section(p: dict[str, Any]) -> str:
    tasks = p["tasks"]
    m = {k: from_jsonable(v) for k, v in p["matrices"].items()}
    parts = [f"<h2>Gradient conflict</h2><p class='note'>{_esc(p['samples'])} samples over training; "
             "cosine of per-task gradients on the shared parameters (Yu et al., NeurIPS 2020).</p>",
             _heatmap_img(m["cosine"], tasks, "gradient cosine heatmap", title="gradient cosine"),
             "<h3>Mean cosine</h3>", matrix_table(m["cosine"], tasks),
             "<h3>Conflict rate (share of samples with cosine &lt; 0)</h3>", matrix_table(m["conflict_rate"], tasks),
             "<h3>Gradient magnitude similarity</h3>", matrix_table(m["magnitude_similarity"], tasks),
             "<h3>Mean gradient norm per task</h3>",
             table(["task", "norm"], list(zip(tasks, from_jsonable(p["norm"]).tolist())))]
    history = p.get("history") or []
    if history:
        parts.append(_cosine_history_img(from_jsonable(history), p.get("steps", []), tasks))
    groups = p.get("groups", [])
    if len(groups) > 1:
        off = ~torch.eye(len(tasks), dtype=torch.bool)
        rows = []
        for g in groups:
            c = from_jsonable(p["per_group"][g]["cosine"])[off]
            r = from_jsonable(p["per_group"][g]["conflict_rate"])[off]
            rows.append([g, float(c.nanmean()), float(r.nanmean())])
        parts += ["<h3>Per layer group (mean over task pairs)</h3>",
                  table(["group", "mean cosine", "mean conflict rate"], rows)]
    return "".join(parts)


def _cosine_history_img(history: torch.Tensor, steps: Sequence[int], tasks: Sequence[str]) -> str:
    """Cosine of every task pair at each sample (pairs listed in the legend up to 15)."""
    from polytask.report.heatmap import figure_png
    from polytask.report.plots import _pyplot

    plt = _pyplot()
    steps = list(steps) if len(steps) == history.shape[0] else list(range(1, history.shape[0] + 1))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    for i, j in pairs:
        ax.plot(steps, history[:, i, j].tolist(), lw=1, label=f"{tasks[i]}–{tasks[j]}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient cosine")
    if len(pairs) <= 15:
        ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    return image(figure_png(fig), "gradient cosine over training")


def _affinity_section(p: dict[str, Any]) -> str:
    tasks, a = p["tasks"], from_jsonable(p["matrices"]["affinity"])
    return ("<h2>Inter-task affinity</h2><p class='note'>Z(i→j) = 1 − L_j(θ − η∇L_i)/L_j(θ), "
            "row i: step on task i, "
            f"column j: effect on task j (Fifty et al., NeurIPS 2021); η = {_num(p['lr'])}, "
            f"{_esc(p['samples'])} samples.</p>"
            + _heatmap_img(a, tasks, "affinity heatmap", title="inter-task affinity", fmt="{:.2g}")
            + matrix_table(a, tasks, corner="step on ↓ / loss of →"))


def _grouping_section(p: dict[str, Any], check: dict[str, Any] | None) -> str:
    rows = [[", ".join(g), t] for g, t in zip(p["groups"], p.get("group_totals", [None] * len(p["groups"])))]
    out = (f"<h2>Task grouping</h2><p class='note'>{len(p['groups'])} groups, "
           f"{'overlapping (Fifty et al.)' if p['overlap'] else 'disjoint partition'}, search: {_esc(p['method'])}; "
           f"predicted total affinity {_num(p['total'])}.</p>" + table(["group", "predicted score"], rows)
           + table(["task", "predicted score", "served by group"],
                   [[t, p["task_scores"][t], ", ".join(p["groups"][p["serving"][t]])] for t in p["tasks"]]))
    if check is not None:
        rows = [[", ".join(g), pr, d]
                for g, pr, d in zip(check["groups"], check["predicted"], check["measured_delta_m"])]
        rows.append(["all tasks, each served by its group", None, check["overall_delta_m"]])
        out += "<h3>Check: trained groups</h3>" + table(
            ["group", "predicted score", "measured Δm% (lower is better)"], rows)
    return out


def _transfer_section(p: dict[str, Any]) -> str:
    tasks, g = p["tasks"], from_jsonable(p["matrices"]["gain"])
    out = ("<h2>Measured pairwise transfer</h2><p class='note'>gain[i][j]: % gain of task j's main test metric "
           "when trained with task i, vs alone.</p>"
           + _heatmap_img(g, tasks, "pairwise transfer heatmap", title="measured gain (%)", fmt="{:.1f}")
           + matrix_table(g, tasks, corner="with ↓ / gain of →"))
    if p.get("rank_agreement"):
        out += "<h3>Agreement of cheap estimates with the measured gains (Spearman)</h3>" + table(
            ["estimate", "Spearman ρ"], list(p["rank_agreement"].items()))
    return out


def _experts_section(p: dict[str, Any]) -> str:
    tasks = p["tasks"]
    mean = from_jsonable(p["matrices"]["mean_weight"])
    near = from_jsonable(p["matrices"]["near_zero_share"])
    experts = [f"expert {e}" for e in range(mean.shape[1])]
    ent = from_jsonable(p["entropy"]).tolist()
    return ("<h2>Expert usage</h2>"
            + _heatmap_img(mean, tasks, "expert usage heatmap", cols=experts, title="mean gate weight",
                           diverging=False, scale_off_diagonal=False)
            + "<h3>Mean gate weight</h3>" + matrix_table(mean, tasks, experts)
            + f"<h3>Share of rows with gate weight &lt; {_num(p['threshold'])}</h3>"
            + matrix_table(near, tasks, experts)
            + "<h3>Gate entropy (nats)</h3>" + table(["task", "entropy", "uniform"],
                                                    [[t, e, math.log(mean.shape[1])] for t, e in zip(tasks, ent)]))


def _other_matrices(name: str, p: dict[str, Any]) -> str:
    tasks = p.get("tasks", [])
    out = f"<h2>{_esc(name)}</h2>"
    for key, value in p.get("matrices", {}).items():
        m = from_jsonable(value)
        if m.ndim == 2 and m.shape[0] == len(tasks):
            out += f"<h3>{_esc(key)}</h3>" + _heatmap_img(m, tasks, f"{name} {key} heatmap", title=key) \
                + matrix_table(m, tasks, [str(c) for c in range(m.shape[1])] if m.shape[1] != len(tasks) else None)
    return out


def render_report(run_dir: Path) -> str:
    """The HTML text of the report of ``run_dir`` (DataError if it is not a run directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"report: {str(run_dir)!r} is not a directory")
    analysis = run_dir / ANALYSIS_DIR
    found = {f.stem: read_json(f) for f in sorted(analysis.glob("*.json"))} if analysis.is_dir() else {}
    if not (run_dir / "metrics.jsonl").exists() and not found:
        raise DataError(f"report: {str(run_dir)!r} has neither metrics.jsonl nor {ANALYSIS_DIR}/*.json")
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    parts = [f"<h1>polytask run report: {_esc(run_dir.name)}</h1>"]
    if config:
        parts.append("<h2>Configuration</h2><pre>" + _esc(config) + "</pre>")
    parts += [_metrics_section(run_dir), _curves_section(_read_metrics(run_dir))]
    sections = {"conflict": _conflict_section, "affinity": _affinity_section, "transfer": _transfer_section,
                "experts": _experts_section}
    for name, fn in sections.items():
        if name in found:
            parts.append(fn(found[name]))
    if "grouping" in found:
        parts.append(_grouping_section(found["grouping"], found.get("grouping_check")))
    for name, payload in found.items():
        if name not in sections and name not in ("grouping", "grouping_check") and "matrices" in payload:
            parts.append(_other_matrices(name, payload))
    body = "\n".join(p for p in parts if p)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>polytask report: "
            f"{_esc(run_dir.name)}</title><style>{_STYLE}</style></head><body>{body}</body></html>")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``) atomically:
    a failed report leaves no partial file. DataError for an ``out`` that is a folder or whose
    folder does not exist."""
    from polytask.train.checkpoint import atomic_write_text

    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise DataError(f"report --out {out} is a folder; give a file name, e.g. {out / 'report.html'}")
        if not out.parent.is_dir():
            raise DataError(f"report --out {out}: folder {out.parent} does not exist")
    text = render_report(run_dir)  # DataError if run_dir is not a run directory
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    stale = out.with_name(out.name + ".tmp")  # what a failed report of earlier versions left
    if stale.is_file():
        stale.unlink()
    return atomic_write_text(out, text, error=DataError)
