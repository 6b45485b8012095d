"""The ``polytask`` command line.

Heavy modules (torch, matplotlib, ...) are imported inside the commands that need them, so that
``polytask --help`` starts fast. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from polytask.errors import PolytaskError

app = typer.Typer(
    name="polytask",
    help="Multi-task learning for PyTorch: train one model on many tasks with balanced gradients, "
    "see how tasks help or hurt each other, and merge models fine-tuned per task.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory that receives the run directories.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Random seed of every run.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    epochs_scale: Annotated[float, typer.Option(help="Multiply every run's epochs (e.g. 0.2 for a smoke run).")] = 1.0,
) -> None:
    """Train shared-bottom and single-task baselines on the built-in data (digits, synthetic) and
    print the per-task test table with Δm%. About a minute on 2 CPU cores."""
    from polytask.train.demo import demo_main

    typer.echo(demo_main(out, seed, device, epochs_scale))


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run config (see examples/).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: --set train.epochs=5")] = None,
    device: Annotated[Optional[str], typer.Option(help="Override the config's device.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run directory's latest checkpoint.")] = False,
) -> None:
    """Train one model from a YAML config; writes the run directory (config, metrics.jsonl, best
    checkpoint, summary.md, plots) and prints the best epoch's test metrics."""
    from polytask.report.summary import metrics_table
    from polytask.train import Trainer, load_config

    overrides = list(set_ or [])
    if device is not None:
        overrides.append(f"device={device}")
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg)
    result = trainer.fit(resume=resume)
    typer.echo(metrics_table(trainer.tasks, {"val (best)": result.val, "test (best)": result.test}))
    typer.echo(f"best epoch {result.best_epoch}; run directory: {result.run_dir}")


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="YAML merge config (mergekit-style; see examples/merge_*.yaml).")],
    out_dir: Annotated[Path, typer.Argument(help="Output directory (appears only when the merge is complete).")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Merge fine-tuned checkpoints (safetensors files, directories or shards) tensor by tensor
    into one sharded safetensors checkpoint with the base's config and tokenizer files."""
    from polytask.merge import run_merge

    typer.echo(f"merged checkpoint: {run_merge(config, out_dir, overwrite=overwrite)}")


@app.command()
def analyze(
    target: Annotated[Path, typer.Argument(help="YAML run config (trained with monitors) or a run directory.")],
    what: Annotated[str, typer.Option(help="Comma list of conflict, affinity, grouping, experts, transfer, "
                                           "check (or all). transfer and check train extra models.")]
    = "conflict,affinity,grouping,experts",
    k: Annotated[int, typer.Option(help="Number of task groups.")] = 2,
    overlap: Annotated[bool, typer.Option(help="Let groups overlap (Fifty et al.); default: a partition.")] = False,
    every: Annotated[int, typer.Option(help="Sample conflict/affinity every N steps.")] = 10,
    lr: Annotated[Optional[float], typer.Option(help="Lookahead step size (default: the optimizer's lr).")] = None,
    groups: Annotated[str, typer.Option(help="Layer groups for conflict: module, layer or tensor.")] = "module",
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of each transfer/check run.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key.")] = None,
) -> None:
    """Show how tasks help or hurt each other: gradient conflict, inter-task affinity, task
    grouping, expert usage, measured pairwise transfer; JSON and heatmaps into the run directory."""
    from polytask.analyze.runner import AnalyzeOptions, analyze as run_analyze, parse_what

    options = AnalyzeOptions(what=parse_what(what), every=every, lr=lr, groups=groups, k=k, overlap=overlap,
                             epochs=epochs)
    _, notes = run_analyze(target, options, list(set_ or []))
    typer.echo("\n\n".join(notes))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (after train and/or analyze).")],
    out: Annotated[Optional[Path], typer.Option(help="Output file (default RUN_DIR/report.html).")] = None,
) -> None:
    """Write one self-contained HTML page (figures embedded) with the run's curves, metric tables,
    diagnostics matrices and expert usage."""
    from polytask.report.html import write_report

    typer.echo(f"report: {write_report(run_dir, out)}")


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit status 2."""
    try:
        app()
    except PolytaskError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
