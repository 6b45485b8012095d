"""What the merge tests share: mergekit 0.1.5 run on a config, our merge on the same config, and the
CLI's exit status with its stderr."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import yaml

from polytask.merge import run_merge


def run_mergekit(text: str, out: Path, monkeypatch, copy_tokenizer: bool = False) -> None:
    """mergekit's merge of the YAML ``text`` (model paths already absolute) into ``out``, offline,
    quiet, seeded; the test is skipped where mergekit is not installed."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mergekit_run(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
                 MergeOptions(copy_tokenizer=copy_tokenizer, quiet=True, write_model_card=False, random_seed=0))


def run_ours(text: str, out: Path, quiet: bool = False) -> Path:
    """Our merge of the YAML ``text`` (written beside ``out``) into ``out``; ``quiet`` hides its
    RuntimeWarnings (notes on kept config lists)."""
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(text)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", RuntimeWarning)
        return run_merge(cfg, out)


def cli(args, capsys, monkeypatch) -> tuple[int, str]:
    """``polytask ARGS``: its exit status and its stderr, stripped."""
    from polytask.cli import main

    monkeypatch.setattr(sys, "argv", ["polytask", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code or 0, capsys.readouterr().err.strip()
