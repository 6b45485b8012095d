"""The ``polytask`` command line.

Heavy modules (torch, matplotlib, ...) are imported inside the commands that need them, so that
``polytask --help`` starts fast. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import os

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from polytask.errors import ConfigError, PolytaskError

app = typer.Typer(
    name="polytask",
    help="Multi-task learning for PyTorch: train one model on many tasks with balanced gradients, "
    "see how tasks help or hurt each other, and merge models fine-tuned per task.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: re-wraps docstrings and skips importing rich
)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory that receives the run directories.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Random seed of every run.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    epochs_scale: Annotated[float, typer.Option(help="Multiply every run's epochs (e.g. 0.2 for a smoke run).")] = 1.0,
    merge: Annotated[bool, typer.Option(
        "--merge", help="Instead: fine-tune one model per digits task from a shared base, merge them "
        "(task_arithmetic, ties, dare_ties) with `polytask merge`'s code, and print every model's per-task "
        "accuracy (on the CPU; seconds). Writes OUT/merge (refused if it exists, unless --overwrite).")] = False,
    overwrite: Annotated[bool, typer.Option(help="With --merge: replace OUT/merge if it exists.")] = False,
) -> None:
    """Train shared-bottom and single-task baselines on the built-in data (digits, synthetic) and
    print the per-task test table with Δm%. About a minute on 2 CPU cores."""
    if merge:
        from polytask.merge.demo import merge_demo_main

        typer.echo(merge_demo_main(out / "merge", seed, overwrite=overwrite, epochs_scale=epochs_scale, device=device))
        return
    if overwrite:
        raise ConfigError("--overwrite: only with --merge (the plain demo replaces its own runs)")
    from polytask.train.demo import demo_main

    typer.echo(demo_main(out, seed, device, epochs_scale))


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run config (see examples/).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: --set train.epochs=5")] = None,
    device: Annotated[Optional[str], typer.Option(help="Override the config's device.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run directory's latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over in a run directory that already holds a run.")] = False,
    nproc: Annotated[int, typer.Option(help="Processes on this machine (torchrun's launcher; gloo on CPU, nccl "
                                            "on CUDA); train.batch_size is the global batch.")] = 1,
) -> None:
    """Train one model from a YAML config; writes the run directory (config, metrics.jsonl, best
    checkpoint, summary.md, plots) and prints the best epoch's test metrics. Across machines:
    torchrun --nnodes M --nproc-per-node N -m polytask train CONFIG."""
    from polytask.report.summary import metrics_table
    from polytask.train import Trainer, load_config

    overrides = list(set_ or [])
    if device is not None:
        overrides.append(f"device={device}")
    cfg = load_config(config, overrides)
    if nproc != 1 and cfg.data.name == "table":  # refused before any process starts
        from polytask.train.tables import check_multiprocess

        check_multiprocess(cfg)
    if nproc != 1:
        from polytask.train import dist
        from polytask.train.trainer import resolve_device

        dist.check_config(cfg, nproc, resolve_device(cfg.device))  # refuse here, before starting workers
    from polytask.train.rundir import claim_run_dir, is_primary, mode_of

    # the run directory is checked, locked and (--overwrite) its previous run moved aside before any
    # work; workers started by --nproc inherit the claim (train/rundir.py)
    with claim_run_dir(cfg.run_dir, cfg, mode_of(resume, overwrite), primary=is_primary()):
        if nproc != 1:
            dist.launch(["train", str(config), *[a for o in overrides for a in ("--set", o)],
                         *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])], nproc,
                         run_dir=cfg.run_dir)
            return
        trainer = Trainer(cfg)
        result = trainer.fit(resume=resume, overwrite=overwrite)
        trainer.dist.close()
    if trainer.dist.is_main:
        typer.echo(metrics_table(trainer.tasks, {"val (best)": result.val, "test (best)": result.test}))
        typer.echo(f"best epoch {result.best_epoch}; run directory: {result.run_dir}")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a run trained on table data (data.name: table) or on words (token_file with a tokenizer).")],
    data: Annotated[str, typer.Argument(help="Parquet/CSV file, folder or glob to score (a words run: one .parquet/.jsonl table).")],
    out: Annotated[Path, typer.Argument(help="Output Parquet file (a words run: .parquet or .jsonl; appears only when complete).")],
    keep: Annotated[str, typer.Option(help="Comma list of input columns copied to OUT (e.g. ids).")] = "",
    batch_size: Annotated[int, typer.Option(help="Rows per record batch (a words run: sequences per forward, at most 64).")] = 65536,
) -> None:
    """Score a Parquet/CSV input with the run's best model: one probability column per task (and
    the --keep columns) in a Parquet file, streamed; ids the run's vocabularies never saw go to the
    out-of-vocabulary bucket and are counted. A run trained on words (token_file with a tokenizer)
    scores a words table (.parquet/.jsonl): one prediction per word for its word-labelled tasks."""
    from polytask.data.words import is_word_run

    cols = [c.strip() for c in keep.split(",") if c.strip()]
    if is_word_run(run_dir):
        from polytask.data.words import predict_word_run

        rows = predict_word_run(run_dir, data, out, tuple(cols), batch_size=min(batch_size, 64))
        typer.echo(f"scored {rows} rows: {out}")
        return
    from polytask.train.tables import predict_table

    rows, oov = predict_table(run_dir, data, out, cols, batch_size, progress=sys.stderr.isatty())
    typer.echo(f"scored {rows} rows: {out}")
    if oov:
        typer.echo("unseen ids (out-of-vocabulary bucket): " + ", ".join(f"{c} {n}" for c, n in oov.items()))


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a run trained on table data (data.name: table).")],
    out: Annotated[Path, typer.Argument(help="Output .pt2 file (torch.export; appears only when complete).")],
) -> None:
    """Export the run's best model with its id lookups (vocabularies, hashing) as one torch.export
    program: inputs dense float32 (N, n_dense) and the 64-bit FNV-1a hashes of the raw ids (N, n_ids)
    (and of list columns' elements, with their lengths); outputs each task's probability, equal to
    `polytask predict`'s (see polytask.export)."""
    from polytask.export import export_run

    typer.echo(f"exported: {export_run(run_dir, out)}")


@app.command("export-adapters")
def export_adapters_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a run with model.arch: adapters.")],
    out: Annotated[Path, typer.Argument(help="New output folder.")],
    peft: Annotated[bool, typer.Option(help="PEFT's format (LoRA: one task, --task; Poly/MHR: all tasks).")] = False,
    task: Annotated[Optional[str], typer.Option(help="With --peft: the task whose LoRA is written.")] = None,
) -> None:
    """Write the run's best adapters alone (not the backbone): polytask's format plus the towers, or
    with --peft an adapter that peft.PeftModel.from_pretrained loads onto the backbone."""
    from polytask.train.backbone import export_adapters

    typer.echo(f"adapters: {export_adapters(run_dir, out, peft_task=task, peft=peft)}")


data_app = typer.Typer(help="Data helpers (needs polytask[tables]).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder that receives train/val/test.parquet.")],
    rows: Annotated[int, typer.Option(help="Rows of the whole log (split 80/10/10 in row order).")] = 100_000,
    seed: Annotated[int, typer.Option(help="Seed of the generator (ids, signal, labels).")] = 0,
) -> None:
    """Write a synthetic click/conversion log (raw string ids, Zipf-distributed, a known signal,
    missing labels) as train/val/test Parquet files, for examples/parquet_mmoe.yaml."""
    from polytask.train.tables import write_synthetic_splits

    for path in write_synthetic_splits(out_dir, rows, seed=seed):
        typer.echo(str(path))


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="YAML merge config (mergekit-style; see examples/merge_*.yaml).")],
    out_dir: Annotated[Path, typer.Argument(help="Output directory (appears only when the merge is complete).")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists (never an input).")] = False,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Read pickled .bin/.pt/.pth/.ckpt checkpoints with torch.load(weights_only=True) "
        "(default: the config's allow_pickle, false). Only for files you trust.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Write merged tensors holding NaN or inf with a warning (default: stop "
        "with an error naming the tensor).")] = False,
    intermediate_dir: Annotated[Optional[Path], typer.Option(
        "--intermediate-dir", "-I", help="Where the named merges of a multi-document CONFIG go (mergekit-multi; "
        "default: OUT_DIR.parts beside OUT_DIR, or OUT_DIR itself when every merge is named).")] = None,
    adapter: Annotated[bool, typer.Option(
        "--adapter", help="Write a PEFT LoRA adapter, not a full model (every model a LoRA adapter of "
        "base_model; exact for task_arithmetic, else a truncated SVD to --rank).")] = False,
    rank: Annotated[Optional[int], typer.Option(
        "--rank", help="With --adapter: the output rank (default: the sum of the inputs' ranks).")] = None,
) -> None:
    """Merge fine-tuned checkpoints (safetensors files, directories or shards) tensor by tensor
    into one sharded safetensors checkpoint with the base's config and tokenizer files. Relative
    paths in CONFIG are read from its folder when they exist there, else from the working
    directory."""
    import warnings

    if adapter or rank is not None:
        from polytask.merge.lora import merge_config_to_adapter

        if not adapter:
            raise ConfigError("--rank: only with --adapter (the rank of the merged adapter)")
        done, errors = merge_config_to_adapter(config, out_dir, rank=rank, overwrite=overwrite)
        worst = max(errors, key=errors.__getitem__)
        typer.echo(f"largest relative reconstruction error: {errors[worst]:.3e} ({worst})")
        typer.echo(f"merged LoRA adapter: {done}")
        return

    from polytask.merge import run_merge

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        out = run_merge(config, out_dir, overwrite=overwrite, allow_pickle=allow_pickle or None,
                        allow_nonfinite=allow_nonfinite, intermediate_dir=intermediate_dir)
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    typer.echo(f"merged checkpoint: {out}")


@app.command("extract-lora")
def extract_lora(
    base: Annotated[Path, typer.Argument(help="Base model (safetensors file or directory).")],
    finetuned: Annotated[Path, typer.Argument(help="Fully fine-tuned model of the same architecture.")],
    out_dir: Annotated[Path, typer.Argument(help="Output PEFT adapter folder (appears only when complete).")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank (capped by each weight's full rank).")] = 16,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists (never an input).")] = False,
) -> None:
    """Extract a LoRA adapter from a full fine-tune: a truncated SVD of W_ft - W_base on every
    Linear weight that changed, written as a PEFT adapter (adapter_config.json +
    adapter_model.safetensors); prints each module's relative reconstruction error."""
    from polytask.merge.lora import extract_lora as run_extract

    out, errors = run_extract(base, finetuned, out_dir, rank, overwrite=overwrite)
    width = max(len(m) for m in errors)
    for module, err in errors.items():
        typer.echo(f"{module:<{width}}  relative error {err:.3e}")
    typer.echo(f"LoRA adapter: {out}")


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
    groups: Annotated[str, typer.Option(help="Layer groups for conflict: module, layer or tensor.")] = "layer",
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of each transfer/check run.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key.")] = None,
    overwrite: Annotated[bool, typer.Option(help="On a config whose run directory holds a run: train it again "
                                                 "(the previous run is kept until the new one has a checkpoint).")]
    = False,
) -> None:
    """Show how tasks help or hurt each other: gradient conflict, inter-task affinity, task
    grouping, expert usage, measured pairwise transfer; JSON and heatmaps into the run directory."""
    from polytask.analyze.runner import AnalyzeOptions, analyze as run_analyze, parse_what

    options = AnalyzeOptions(what=parse_what(what), every=every, lr=lr, groups=groups, k=k, overlap=overlap,
                             epochs=epochs, overwrite=overwrite)
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


bench_app = typer.Typer(help="Benchmarks on real data next to published tables (needs extras, e.g. polytask[qm9]).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("qm9", context_settings={"allow_extra_args": True})
def bench_qm9(
    ctx: typer.Context,
    balancer: Annotated[str, typer.Option("--balancer", "-b", help="Registered balancer name.")] = "nash_mtl",
    all_: Annotated[bool, typer.Option("--all", help="Run every registered balancer; write Markdown + PNG.")] = False,
    balancers: Annotated[Optional[str], typer.Option(help="With --all: comma list instead of every balancer.")] = None,
    stl: Annotated[bool, typer.Option("--stl", help="Our own single-task baselines as the Δm% reference (trained, "
                                      "or qm9_stl.json in --out if it has the same budget).")] = False,
    stl_target: Annotated[Optional[str], typer.Option(hidden=True, help="Internal (--workers): train this target's "
                                                      "single-task run, leave its checkpoint in --out.")] = None,
    workers: Annotated[int, typer.Option(help="With --all: methods (and --stl's targets) run at once, one process "
                                         "each (log_<job>.txt in --out); e.g. 2 with --threads 1 on 2 cores.")] = 1,
    report: Annotated[bool, typer.Option("--report", help="Train nothing: write the comparison (Markdown + PNG) "
                                         "from the result files already in --out (Δm% against qm9_stl.json "
                                         "there, if any).")] = False,
    epochs: Annotated[int, typer.Option(help="Epochs (published: 300).")] = 300,
    train_size: Annotated[Optional[int], typer.Option(help="Training molecules (default: all ~110k).")] = None,
    val_size: Annotated[int, typer.Option(help="Validation molecules.")] = 10_000,
    test_size: Annotated[int, typer.Option(help="Test molecules.")] = 10_000,
    protocol: Annotated[str, typer.Option(help="nash_mtl (Navon et al. 2022: batch 120, LR patience 5, published STL) "
                                          "or ntkmtl (batch 60, LR patience 10, single-task runs retrained: --stl).")
                        ] = "nash_mtl",
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (default: the protocol's).")] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seeds: Annotated[Optional[list[int]], typer.Option(help="Seeds: --seeds 0 1 2 (default 0).")] = None,
    targets: Annotated[Optional[str], typer.Option(help="Comma list of targets (default: all 11).")] = None,
    features: Annotated[str, typer.Option(help="rdkit (aromaticity, hybridisation) or pyg (as PyG's QM9).")] = "rdkit",
    param: Annotated[Optional[list[str]], typer.Option(
        help="Balancer parameter KEY=VALUE (repeatable; with --all, given to the methods that take it).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (1 is fastest on a busy machine).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for result JSON, Markdown and PNG.")] = Path("runs/qm9"),
    cache_dir: Annotated[Optional[Path], typer.Option(help="Processed-data cache (default: user cache dir).")] = None,
) -> None:
    """QM9 (11 targets, MPNN) with the protocol of Nash-MTL / FAMO (or NTKMTL's, --protocol ntkmtl); prints
    per-target test MAE and Δm% next to the published table, and with several seeds which differences
    the seeds support. Reduced budget: e.g. --train-size 20000 --epochs 30."""
    import json

    import yaml

    from polytask.errors import ConfigError

    if report:
        from polytask.bench import qm9 as bench

        results = bench.load_results(out)
        md, png = bench.write_report(out, results)
        typer.echo(md.read_text())
        typer.echo(f"written: {md}, {png}")
        return
    extra_seeds = []
    for arg in ctx.args:  # "--seeds 0 1 2": click leaves "1 2" as extra arguments
        if not arg.lstrip("-").isdigit():
            raise ConfigError(f"bench qm9: unexpected argument {arg!r}")
        extra_seeds.append(int(arg))
    seed_list = [*(seeds or [0] if not extra_seeds else seeds or []), *extra_seeds]
    if features not in ("rdkit", "pyg"):
        raise ConfigError(f"bench qm9: --features must be rdkit or pyg, got {features!r}")
    from polytask.bench.qm9 import protocol as qm9_protocol

    schedule = qm9_protocol(protocol)
    batch_size = schedule.batch_size if batch_size is None else batch_size
    stl = stl or schedule.retrained_stl
    params = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bench qm9: --param needs KEY=VALUE, got {item!r}")
        params[key.strip()] = yaml.safe_load(value)
    # idle OpenMP threads sleep instead of spinning: on a busy machine spinning made 2 threads
    # twice as slow as 1 (1158 vs 628 ms per step); only effective before torch is imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from polytask.bench import qm9 as bench
    from polytask.data.qm9 import load_qm9, require_qm9_dependencies

    if threads is not None:
        torch.set_num_threads(threads)
    require_qm9_dependencies(("torch_geometric",))  # qm9pack and rdkit: only to build the cache
    names = bench.check_targets(targets.split(",") if targets else None)
    if all_:
        todo = [b.strip() for b in balancers.split(",")] if balancers else bench.distinct_balancers()
    else:
        todo = [balancer]
    for name in todo:
        bench.make_balancer(name, bench.params_accepted_by(name, params) if all_ else params)
    budget = dict(epochs=epochs, train_size=train_size, val_size=val_size, test_size=test_size,
                  batch_size=batch_size, lr=lr, lr_patience=schedule.lr_patience, device=device, targets=names,
                  seeds=seed_list)

    def load_graphs():
        graphs = load_qm9(cache_dir)
        return graphs.pyg_compatible() if features == "pyg" else graphs

    if stl_target is not None:  # one job of --stl --workers: its finished checkpoint is its result
        bench.run_stl(graphs=load_graphs(), checkpoint_dir=out, **{**budget, "targets": bench.check_targets([stl_target])})
        typer.echo(f"single-task run of {stl_target} finished (checkpoint in {out})")
        return
    stl_name = "our single-task runs (--stl)"
    if workers != 1:
        if workers < 1 or not all_:
            raise ConfigError("bench qm9: --workers needs --all and a count of at least 1 "
                              f"(got {workers}{'' if all_ else ', no --all'})")
        child = [f"--epochs={epochs}", f"--val-size={val_size}", f"--test-size={test_size}",
                 f"--batch-size={batch_size}", f"--lr={lr}", f"--protocol={protocol}", f"--features={features}",
                 f"--device={device}",
                 *(f"--param={item}" for item in param or []), "--seeds", *map(str, seed_list)]
        for flag, value in (("--train-size", train_size), ("--targets", targets), ("--threads", threads),
                            ("--cache-dir", cache_dir)):
            if value is not None:
                child.insert(0, f"{flag}={value}")
        single = bench.saved_stl(out, **budget) if stl else None
        stl_jobs = [f"stl_{t}" for t in names] if stl and single is None else []
        failed = bench.run_in_processes(out, [*stl_jobs, *todo], workers, child, log=typer.echo)
        done = [bench.QM9Result.from_json(json.loads((out / f"qm9_{n}.json").read_text()))
                for n in todo if n not in failed and (out / f"qm9_{n}.json").is_file()]
        if stl_jobs and not set(stl_jobs) & set(failed):
            single = bench.run_stl_into(out, load_graphs(), **budget)  # collects the finished checkpoints
        if single is not None:
            bench.use_reference(done, single, stl_name)
        if done:
            md, png = bench.write_report(out, done)
            typer.echo(md.read_text())
            typer.echo(f"written: {md}, {png}")
        if failed:
            from polytask.errors import TrainingError

            raise TrainingError(f"bench qm9: {len(failed)} job(s) failed: {', '.join(failed)} "
                                f"(see log_<job>.txt in {out})")
        return
    graphs = load_graphs()
    reference, reference_name = None, "published STL (Navon et al. 2022)"
    out.mkdir(parents=True, exist_ok=True)
    if stl:
        single = bench.saved_stl(out, **budget) or bench.run_stl_into(out, graphs, **budget)
        reference, reference_name = bench.stl_reference(single), stl_name
        typer.echo(bench.format_result(single))
    if all_:
        results, md, png = bench.run_all(out, todo, graphs=graphs, reference=reference, balancer_params=params,
                                         reference_name=reference_name, log=typer.echo, **budget)
        typer.echo(md.read_text())
        typer.echo(f"written: {md}, {png}")
        return
    result = bench.run(balancer, graphs=graphs, reference=reference, reference_name=reference_name,
                       balancer_params=params, checkpoint_dir=out, **budget)
    bench.save_result(result, out / f"qm9_{balancer}.json")
    bench.remove_checkpoints(out, balancer)
    typer.echo(bench.format_result(result))


@app.command()
def prune(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a finished run (config.yaml, best/model.safetensors).")],
    target: Annotated[str, typer.Option(help="FLOPs left, as a fraction of the model's: flops=0.5.")] = "flops=0.5",
    method: Annotated[str, typer.Option(help="pagcp (task-aware), taylor, l1 or random.")] = "pagcp",
    keep_task_floor: Annotated[Optional[float], typer.Option(help="No task's main validation metric may get worse "
                                                                   "by more than this many percent.")] = None,
    finetune_epochs: Annotated[int, typer.Option(help="Epochs of fine-tuning with the run's balancer (0: none).")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="New run directory (default: RUN_DIR-METHOD-flopsX).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random method's draws (fine-tuning uses the run's seed).")] = 0,
    latency_device: Annotated[str, typer.Option(help="Where latency is measured: cpu, cuda, auto.")] = "cpu",
) -> None:
    """Prune a trained run's shared trunk (shared-bottom layers, MMoE/OMoE expert units, PLE/CGC expert hidden units
    per bank, MTAN trunk channels, task-token attention heads) to a FLOPs budget and write a new run directory with the pruned weights, per-layer keep ratios and a table of
    parameters, FLOPs, latency, metrics and Δm% against the unpruned model (prune.md)."""
    key, _, value = target.partition("=")
    if key.strip() != "flops" or not value:
        raise ConfigError(f"--target: expected flops=<fraction in (0, 1)>, got {target!r}")
    from polytask.prune.run import PruneOptions, prune_run

    result = prune_run(run_dir, PruneOptions(method, value.strip(), keep_task_floor, finetune_epochs, out, seed,
                                             latency_device),
                       progress=sys.stderr.isatty())
    typer.echo((result.out_dir / "prune.md").read_text().rstrip())
    typer.echo(f"pruned run directory: {result.out_dir}")


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit status 2.

    A worker of a multi-process run that finished cleanly leaves with ``os._exit(0)`` once its
    output is flushed: gloo's C++ threads can abort the interpreter's own teardown ("terminate
    called without an active exception", pytorch/pytorch#190489) even after
    ``destroy_process_group``, which the launcher would report as a failed rank."""
    try:
        _main()
    except SystemExit as exc:
        if exc.code in (0, None):
            _leave_if_worker()
        raise
    _leave_if_worker()


def _leave_if_worker() -> None:
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _main() -> None:
    try:
        app()
    except PolytaskError as exc:
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # a worker of a multi-process run
            from polytask.train.dist import report_error

            if not report_error(exc):  # the launcher (or rank 0) prints it, once
                sys.exit(2)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # a worker whose peer died: one line, not a backend traceback
        if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
            raise
        from polytask.train.dist import as_peer_failure, report_error

        failure = as_peer_failure(exc)
        if failure is None:
            raise
        if report_error(failure):
            typer.echo(f"error: {failure}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
