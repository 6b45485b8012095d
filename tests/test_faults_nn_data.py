"""Issue 18 faults in architectures, data and the registry: the repository stands alone, parameters
are type-checked once in the registry (naming the config key), and a NaN input feature is blamed on
the file and column (or the array and column index), never on the loss."""

from __future__ import annotations

import fnmatch
import math
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from polytask import balance, data, nn
from polytask.data import MultiTaskDataset, Splits
from polytask.data.builtin import DATASETS
from polytask.data.recsys import SAMPLES_DIR, ali_ccp, census_income
from polytask.errors import ConfigError, DataError
from polytask.merge.methods import MERGE_METHODS
from polytask.nn import ARCHITECTURES
from polytask.registry import Registry, _type_hints, check_params
from polytask.tasks import Task
from polytask.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
REGISTRIES = {"model.params": ARCHITECTURES, "data.params": DATASETS, "balancer.params": balance.BALANCERS,
              "parameters": MERGE_METHODS}


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "polytask.cli", *args], capture_output=True, text=True, cwd=cwd)


# ------------------------------------------------------------------ the repository stands alone
def _repo_text_files():
    for top in ("src", "tests", "examples", "benchmarks", "docs", ".ci"):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".yaml", ".yml", ".md", ".toml", ".txt", ".cfg", ""} \
                    and "__pycache__" not in path.parts and not any(p.endswith(".egg-info") for p in path.parts):
                yield path
    for name in ("README.md", "Makefile", "pyproject.toml"):
        yield ROOT / name


def test_nothing_reads_from_outside_the_repository():
    # a clone has no ../shared: no code, test, example, benchmark, doc or README line may point there
    outside = re.compile(r"\.\./" + "shared" + r"|/work/" + "shared" + r"|parents\[\d\]\.parent\s*/\s*['\"]shared")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in _repo_text_files() if p != Path(__file__).resolve()
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert offenders == []
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
    assert (ROOT / "docs" / "architecture.md").is_file()


def test_the_checker_above_would_see_a_shared_path():
    pattern = re.compile(r"\.\./" + "shared")
    assert pattern.search('root: ../shared/data/recsys') and not pattern.search("shared_parameters()")


def test_recsys_loaders_need_no_root_and_no_particular_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing relative to the checkout
    sizes = {"census_income": (80, 20, 20), "aliexpress": (80, 20, 20), "ali_ccp": (100, 50, 50)}
    for name, (n_train, n_val, n_test) in sizes.items():
        splits = data.load(name)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (n_train, n_val, n_test)
    assert SAMPLES_DIR.is_relative_to(Path(data.__file__).resolve().parent)


def test_the_samples_are_package_data_with_their_licence():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["polytask"]
    shipped = sorted(p.relative_to(SAMPLES_DIR.parents[1]).as_posix() for p in SAMPLES_DIR.iterdir() if p.is_file())
    assert len([p for p in shipped if p.endswith(".csv")]) == 8
    not_packaged = [p for p in shipped if not any(fnmatch.fnmatch(p, g) for g in globs)]
    assert not_packaged == []
    assert "MIT" in (SAMPLES_DIR / "LICENSE").read_text() and "Datawhale" in (SAMPLES_DIR / "LICENSE").read_text()
    assert "LICENSE" in (SAMPLES_DIR / "README.md").read_text()


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")
                                           if "merge_method" not in p.read_text()))
def test_every_training_example_builds_from_anywhere(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "examples" / example)
    if cfg.data.name == "table":  # generated data, where the example's header says: polytask data synth data/synth
        from polytask.train.tables import table_splits, write_synthetic_splits

        public = {"census_income_table.yaml": "census_income", "aliexpress_table.yaml": "aliexpress",
                  "ali_ccp_table.yaml": "ali_ccp"}
        if example in public:  # a public data set's example: the shipped sample of its format stands in
            for split in ("train", "val", "test"):
                sample = SAMPLES_DIR / f"{public[example]}_{split}_sample.csv"
                target = tmp_path / cfg.data.params[split]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(sample if sample.is_file() else SAMPLES_DIR / f"{public[example]}_test_sample.csv", target)
        else:
            write_synthetic_splits(tmp_path / "data" / "synth", 2000)
        splits = table_splits(cfg)
    else:
        splits = data.load(cfg.data.name, **cfg.data.params)
    model = nn.build_model(cfg.model.arch, splits.input_spec, splits.tasks, **cfg.model.params)
    assert set(model.task_names) == {t.name for t in splits.tasks}
    balance.get(cfg.balancer.name, **cfg.balancer.params)


# ------------------------------------------------------------------ parameters typed in the registry
T2 = [Task("a", "regression"), Task("b", "binary")]


@pytest.mark.parametrize("build, message", [
    (lambda: nn.build_model("mmoe", 4, T2, num_experts="abc"), "model.params.num_experts: expected int, got 'abc'"),
    (lambda: nn.build_model("shared_bottom", 4, T2, bottom="abc"),
     "model.params.bottom: expected a list of int, got 'abc'"),
    (lambda: nn.build_model("shared_bottom", 4, T2, bottom=[8, "x"]), "model.params.bottom: expected a list of int"),
    (lambda: nn.build_model("mmoe", 4, T2, num_experts=True), "model.params.num_experts: expected int, got True"),
    (lambda: nn.build_model("mmoe", 4, T2, num_experts=2.5), "model.params.num_experts: expected int, got 2.5"),
    (lambda: nn.build_model("task_moe", 4, T2, routing="hard"),
     "model.params.routing: expected one of 'soft', 'topk', got 'hard'"),
    (lambda: nn.build_model("mmoe", 4, T2, dropout="0.1"), "model.params.dropout: expected float, got '0.1'"),
    (lambda: nn.build_model("mmoe", 4, T2, num_expert=3), "model.params.num_expert: .*did you mean num_experts"),
    (lambda: data.load("synthetic", num_tasks="abc"), "data.params.num_tasks: expected int, got 'abc'"),
    (lambda: data.load("synthetic", split=0.7), "data.params.split: expected a list of float, got 0.7"),
    (lambda: data.load("census_income", root=3), "data.params.root: expected str or None, got 3"),
    (lambda: balance.get("cagrad", c="abc"), "balancer.params.c: expected float, got 'abc'"),
    (lambda: balance.get("cagrad", mode="both"), "balancer.params.mode: expected one of 'parameters', 'features'"),
    (lambda: balance.get("uw", optimizer="rms"), "balancer.params.optimizer: expected one of 'adam', 'sgd'"),
    (lambda: balance.get("nash_mtl", max_norm=True), "balancer.params.max_norm: expected float, got True"),
    (lambda: balance.get("rlw", seed="x"), "balancer.params.seed: expected int or None, got 'x'"),
    (lambda: MERGE_METHODS.build("ties", lambda_="abc"), "parameters.lambda: expected float, got 'abc'"),
])
def test_wrong_types_name_the_config_key(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_lax_conversions_and_accepted_values():
    model = nn.build_model("mmoe", 4, T2, num_experts=3.0, expert=(8,), tower=[4])  # 3.0 is a whole number
    assert model.num_experts == 3 and isinstance(model.num_experts, int)
    # YAML 1.1 leaves 1e-2 a string; a float parameter takes it as the number
    assert nn.build_model("task_moe", 4, T2, balance_weight="1e-2").balance_weight == pytest.approx(0.01)
    assert balance.get("cagrad", c=1).aggregator.c == 1  # an int for a float
    splits = data.load("synthetic", num_tasks=2, num_rows=40, split=[0.5, 0.25, 0.25], seed=np.int64(3))
    assert len(splits.train) == 20
    assert balance.get("rlw", seed=None) is not None
    with pytest.raises(ConfigError, match="expected float, got '1e-2x'"):
        nn.build_model("task_moe", 4, T2, balance_weight="1e-2x")


def test_every_registry_passes_its_prefix_and_every_annotation_resolves():
    for prefix, registry in REGISTRIES.items():
        assert registry.prefix == prefix
        for name in registry.names():
            factory = registry.lookup(name)
            import inspect

            params = {n: p for n, p in inspect.signature(factory).parameters.items()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            annotated = {n for n, p in params.items() if p.annotation is not inspect.Parameter.empty}
            unresolved = annotated - set(_type_hints(factory, params))
            assert unresolved == set(), f"{prefix} {name}: annotations not checked: {unresolved}"


def test_check_params_on_a_hand_written_signature():
    from typing import Literal, Optional, Sequence

    def method(a: int = 1, b: float = 0.5, c: Optional[Sequence[int]] = None, d: Literal["x", "y"] = "x",
               e: bool = False, f: "int | str" = 0, g: tuple[int, float] = (1, 1.0)) -> None: ...

    ok = check_params(method, dict(a=2, b=3, c=(1, 2), d="y", e=True, f="s", g=[1, 2]), "m", prefix="p")
    assert ok["g"] == [1, 2]
    for bad, key in [(dict(a="1"), "p.a"), (dict(b=[1.0]), "p.b"), (dict(c=[1, 2.5]), "p.c"), (dict(d="z"), "p.d"),
                     (dict(e=1), "p.e"), (dict(f=1.5), "p.f"), (dict(g=[1]), "p.g"), (dict(g=[1, "x"]), "p.g")]:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected"):
            check_params(method, bad, "m", prefix="p")
    assert Registry("thing").prefix == ""


@pytest.mark.parametrize("setting, message", [
    ("model.params.bottom=abc", "model.params.bottom: expected a list of int, got 'abc'"),
    ("data.params.num_tasks=abc", "data.params.num_tasks: expected int, got 'abc'"),
    ("balancer.params.c=abc", "balancer.params.c: expected float, got 'abc'"),
])
def test_cli_wrong_typed_params_exit_2_with_one_line(tmp_path, setting, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: {name: synthetic, params: {num_tasks: 2, num_rows: 100}}\nbalancer: {name: cagrad}\n"
                   f"out_dir: {tmp_path}/run\ntrain: {{epochs: 1}}\n")
    res = _cli("train", str(cfg), "--set", setting, "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ NaN features: the file and column
def _copy_samples(tmp_path, prefix):
    for p in SAMPLES_DIR.glob(f"{prefix}_*.csv"):
        (tmp_path / p.name).write_text(p.read_text())
    return tmp_path


def _edit_cell(path, row, column, value):
    lines = path.read_text().splitlines()
    header = next(iter(__import__("csv").reader([lines[0]])))
    cells = lines[row + 1].split(",")
    cells[header.index(column)] = value
    lines[row + 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("value", ["nan", "", "inf"])
def test_a_bad_dense_feature_names_the_file_line_and_column(tmp_path, value):
    root = _copy_samples(tmp_path, "census_income")
    path = root / "census_income_val_sample.csv"
    _edit_cell(path, 6, "capital gains", value)
    _edit_cell(path, 9, "capital gains", value)
    with pytest.raises(DataError, match=re.escape(f"{path}: feature column 'capital gains' has 2 missing, NaN or "
                                                  "infinite value(s) (first on line 8)")):
        census_income(str(root))


def test_a_missing_categorical_id_is_named_too(tmp_path):
    root = _copy_samples(tmp_path, "ali_ccp")
    path = root / "ali_ccp_test_sample.csv"
    column = next(c for c in path.read_text().splitlines()[0].split(",") if c not in ("click", "purchase")
                  and not c.startswith("D"))
    _edit_cell(path, 0, column, "")
    with pytest.raises(DataError, match=re.escape(f"{path}: feature column {column!r} has 1") + ".*line 2"):
        ali_ccp(str(root))


def test_empty_labels_are_unlabelled_rows_not_errors(tmp_path):
    root = _copy_samples(tmp_path, "census_income")
    _edit_cell(root / "census_income_train_sample.csv", 4, "income", "")
    _edit_cell(root / "census_income_train_sample.csv", 5, "marital status", "nan")
    splits = census_income(str(root))
    assert not splits.train.masks["income"][4] and splits.train.masks["income"].sum() == 79
    assert not splits.train.masks["marital"][5] and splits.train.masks["marital"].sum() == 79
    assert torch.isfinite(splits.train.inputs["dense"]).all()


def test_a_cell_that_is_not_a_number_names_its_line_and_column(tmp_path):
    root = _copy_samples(tmp_path, "census_income")
    path = root / "census_income_test_sample.csv"
    _edit_cell(path, 2, "age", "abc")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 4, column 'age': 'abc' is not a number")):
        census_income(str(root))


def test_nan_in_arrays_names_the_input_and_column_and_targets_stay_unlabelled():
    x = np.random.default_rng(0).normal(size=(12, 5))
    y = np.arange(12.0)
    y[3] = np.nan
    ds = MultiTaskDataset.from_numpy(x, {"t": y})  # NaN target: unlabelled, fine
    assert not ds.masks["t"][3] and ds.masks["t"].sum() == 11
    x[7, 3] = np.nan
    x[9, 3] = np.inf
    with pytest.raises(DataError, match=re.escape("inputs column 3 has 2 NaN or infinite value(s) (first in row 7)")):
        MultiTaskDataset.from_numpy(x, {"t": y})
    with pytest.raises(DataError, match=re.escape("input 'dense' column 3 has 2")):
        MultiTaskDataset.from_numpy({"dense": x, "ids": np.arange(12)}, {"t": y})
    frame = pd.DataFrame(x, columns=list("abcde")).assign(t=y)
    with pytest.raises(DataError, match="DataFrame column 'd' has 2 missing, NaN or infinite value"):
        MultiTaskDataset.from_pandas(frame, list("abcde"), {"t": "t"})
    images = torch.zeros(4, 2, 3, 3)
    images[2, 1, 0, 2] = math.nan
    with pytest.raises(DataError, match=re.escape(r"inputs feature (1, 0, 2) has 1 NaN")):
        MultiTaskDataset(images, {"t": torch.zeros(4)}).validate([Task("t", "regression")])


def test_a_dataset_built_by_hand_is_caught_before_training(tmp_path):
    # the Trainer validates the splits it is given: a DataError naming the split, not a NaN loss
    from polytask.train import Trainer
    from polytask.train.config import parse_config

    task = [Task("y", "regression")]
    clean = MultiTaskDataset(torch.randn(8, 3), {"y": torch.randn(8)})
    dirty = torch.randn(8, 3)
    dirty[5, 2] = math.nan
    splits = Splits("mine", task, MultiTaskDataset(dirty, {"y": torch.randn(8)}), clean, clean, 3)
    cfg = parse_config({"out_dir": str(tmp_path / "run"), "device": "cpu", "train": {"epochs": 1}})
    with pytest.raises(DataError, match=re.escape("mine train split: inputs column 2 has 1 NaN or infinite value(s) "
                                                  "(first in row 5)")):
        Trainer(cfg, splits=splits)


def test_data_loaders_do_not_import_nn():
    # FeatureSpec lives in polytask.data.features: readers of tables need nothing from nn
    code = ("import sys, polytask.data, polytask.data.recsys; "
            "print(sorted(m for m in sys.modules if m.startswith('polytask.nn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from polytask.data.features import FeatureSpec
    assert nn.FeatureSpec is FeatureSpec and census_income().input_spec.__class__ is FeatureSpec


@pytest.mark.parametrize("params, message", [
    (dict(num_tasks=0), r"data.params.num_tasks must be >= 1, got 0"),
    (dict(num_rows=5), r"data.params.num_rows must be >= 10, got 5"),
    (dict(correlation=1.5), r"data.params.correlation must be in \[0, 1\]"),
    (dict(num_tasks=3, clusters=4), r"data.params.clusters must be between 1 and num_tasks=3, got 4"),
    (dict(split=[0.5, 0.5, 0.5]), r"data.params.split must be three positive fractions"),
])
def test_out_of_range_data_params_name_their_key(params, message):
    with pytest.raises(ConfigError, match=message):
        data.load("synthetic", **params)


def test_ids_outside_a_vocabulary_name_the_feature_and_row():
    from polytask.data.features import FeatureSpec, SequenceFeature, SparseFeature

    spec = FeatureSpec((SparseFeature("city", 5), SequenceFeature("clicks", 7, padding_idx=0)))
    task = [Task("y", "binary")]

    def splits(city, clicks):
        ds = MultiTaskDataset({"city": torch.tensor(city), "clicks": torch.tensor(clicks)},
                              {"y": torch.zeros(len(city))})
        return Splits("mine", task, ds, ds, ds, spec)

    splits([0, 4, 2], [[1, 6], [0, 0], [3, 0]]).validate()  # in range (0 is padding for clicks)
    with pytest.raises(DataError, match=re.escape("mine train split: feature 'city': id 5 in row 1 is outside "
                                                  "its vocabulary [0, 5) (1 row(s) affected)")):
        splits([0, 5, 2], [[1, 6], [0, 0], [3, 0]]).validate()
    with pytest.raises(DataError, match=re.escape("feature 'clicks': id -1 in row 2")):
        splits([0, 1, 2], [[1, 6], [0, 0], [3, -1]]).validate()
