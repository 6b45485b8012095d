"""Faults and bad input through ``polytask merge`` (issue 18): each case asserts the promise --
exit status 2 with exactly one line, the inputs byte for byte intact, nothing stray beside the
output -- or, for the cases that must work, the right result."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from polytask.cli import main
from polytask.errors import ConfigError, MergeError
from polytask.merge import load_state_dict, merge_checkpoints, merge_state_dicts, save_state_dict


def _state(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {"embed.weight": torch.randn(12, 4, generator=g), "head.weight": torch.randn(3, 4, generator=g),
                "head.bias": torch.randn(3, generator=g), "step": torch.tensor([5])}
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.items()}


@pytest.fixture
def work(tmp_path: Path, monkeypatch):
    """tmp_path holds base/ (with config.json), m0/, m1/; the working directory is tmp_path."""
    base = _state(0)
    save_state_dict(base, tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "toy"}))
    for i in range(2):
        save_state_dict(_state(i + 1, base), tmp_path / f"m{i}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks not followed) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _cli(args, capsys, monkeypatch) -> tuple[int, str, str]:
    """Run ``polytask ARGS`` in this process through the real entry point (errors -> exit 2)."""
    monkeypatch.setattr(sys, "argv", ["polytask", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code or 0, captured.out, captured.err


def _refused(args, capsys, monkeypatch, root: Path, *must_say: str) -> str:
    """Assert the CLI refuses: exit 2, one line, the named words, nothing changed under root."""
    before = _digest(root)
    listing = sorted(os.listdir(root))
    code, out, err = _cli(args, capsys, monkeypatch)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and out == "", err
    for word in must_say:
        assert word in err, err
    assert _digest(root) == before  # inputs (and anything else) intact, byte for byte
    assert sorted(os.listdir(root)) == listing  # no output, partial or lock file left behind
    return err


def _cfg(root: Path, body: str, name: str = "merge.yaml") -> Path:
    path = root / name
    path.write_text(textwrap.dedent(body))
    return path


TA = "merge_method: task_arithmetic\nbase_model: base\nmodels: [m0, m1]\n"


# -- 1. an output that is, contains or is inside an input ------------------------------------------
@pytest.mark.parametrize(("out", "how"), [
    ("m0", "is input model"),
    ("base", "is base model"),
    (".", "contains input model"),
    ("m1/sub", "is inside input model"),
    ("link_to_m0", "is input model"),  # a symlink is resolved
])
def test_output_overlapping_an_input_is_refused(work, capsys, monkeypatch, out, how):
    cfg = _cfg(work, TA)
    (work / "link_to_m0").symlink_to(work / "m0")
    _refused(["merge", cfg, out, "--overwrite"], capsys, monkeypatch, work, how, repr(out))


def test_input_given_through_a_symlink_is_protected_too(work, capsys, monkeypatch):
    (work / "alias").symlink_to(work / "m0")
    cfg = _cfg(work, "merge_method: task_arithmetic\nbase_model: base\nmodels: [alias, m1]\n")
    _refused(["merge", cfg, "m0", "--overwrite"], capsys, monkeypatch, work, "'alias'")


# -- 2. non-finite results and parameters ---------------------------------------------------------
@pytest.mark.parametrize(("body", "says"), [
    # weights 1 and -1 with normalize: the divisor sum(w) is 0
    ("merge_method: linear\nmodels: [{model: m0, parameters: {weight: 1}}, {model: m1, parameters: {weight: -1}}]\n",
     "parameters.normalize"),
    # same with a near-zero sum (1e-9 relative): still refused
    ("merge_method: task_arithmetic\nbase_model: base\nparameters: {normalize: true}\n"
     "models: [{model: m0, parameters: {weight: 1.0}}, {model: m1, parameters: {weight: -0.9999999}}]\n",
     "parameters.normalize"),
    # TIES' disjoint mean with weights of both signs can divide by zero at some entries
    ("merge_method: ties\nbase_model: base\nmodels: [{model: m0, parameters: {weight: 2}}, "
     "{model: m1, parameters: {weight: -1}}]\n", "weights of both signs"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: m0, parameters: {weight: .inf}}, m1]\n",
     "model m0: parameters.weight"),
    # finite in Python, infinite as the float32 the weights are computed in
    ("merge_method: linear\nmodels: [{model: m0, parameters: {weight: 1e+39}}, m1]\n", "fit in float32"),
    ("merge_method: ties\nbase_model: base\nmodels: [m0, m1]\nparameters: {density: .nan}\n",
     "parameters.density: must be a finite number"),
    ("merge_method: dare_ties\nbase_model: base\nmodels: [{model: m0, parameters: {density: 0}}, m1]\n",
     "parameters.density: must be in (0, 1], got 0"),
    ("merge_method: breadcrumbs\nbase_model: base\nmodels: [m0, m1]\nparameters: {gamma: 1.5}\n",
     "parameters.gamma"),
    ("merge_method: task_arithmetic\nbase_model: base\nmodels: [m0, m1]\nparameters: {lambda: -.inf}\n",
     "parameters.lambda: must be a finite number"),
    ("merge_method: slerp\nbase_model: base\nmodels: [m0]\nparameters: {t: 1.5}\n", "parameters.t: must be in [0, 1]"),
    ("merge_method: tsv\nbase_model: base\nmodels: [m0, m1]\nparameters: {alpha: .nan}\n", "parameters.alpha"),
    ("merge_method: pcb\nbase_model: base\nmodels: [m0, m1]\nparameters: {ratio: 0}\n", "parameters.ratio"),
])
def test_bad_numbers_are_refused_naming_the_key(work, capsys, monkeypatch, body, says):
    cfg = _cfg(work, body)
    _refused(["merge", cfg, "out"], capsys, monkeypatch, work, says)


@pytest.mark.parametrize(("body", "says"), [
    ("merge_method: ties\nbase_model: base\nmodels: [{model: m0, parameters: {density: abc}}, m1]\n",
     "model m0: parameters.density: must be a number, got 'abc'"),  # per model: merge/checks.py
    ("merge_method: ties\nbase_model: base\nmodels: [m0, m1]\nparameters: {lambda: abc}\n",
     "parameters.lambda: "),  # a method's keyword: the registry's type check or merge/checks.py
    ("merge_method: ties\nbase_model: base\nmodels: [m0, m1]\nparameters: {normalize: 'no'}\n",
     "parameters.normalize: "),
    ("merge_method: linear\nmodels: [{model: m0, parameters: {weight: true}}, m1]\n", "parameters.weight"),
    ("merge_method: consensus\nbase_model: base\nmodels: [m0, m1]\nparameters: {k: 1.5}\n", "parameters.k"),
    ("merge_method: dare_linear\nbase_model: base\nmodels: [m0]\nparameters: {rescale: l3}\n", "parameters.rescale"),
    ("merge_method: model_stock\nbase_model: base\nmodels: [m0, m1]\nparameters: {filter_wise: 1}\n",
     "parameters.filter_wise"),

    (TA + "max_shard_size: infGB\n", "shard size 'infGB'"),
    (TA + "max_shard_size: 0\n", "positive size"),
])
def test_wrong_types_are_one_line(work, capsys, monkeypatch, body, says):
    cfg = _cfg(work, body)
    _refused(["merge", cfg, "out"], capsys, monkeypatch, work, says)


def _with_nan(work: Path) -> None:
    state = load_state_dict(work / "m1")
    state["head.bias"][1] = float("nan")
    save_state_dict(state, work / "m1", overwrite=True)


def test_nan_in_an_input_stops_the_merge_naming_the_tensor(work, capsys, monkeypatch):
    _with_nan(work)
    cfg = _cfg(work, TA)
    _refused(["merge", cfg, "out"], capsys, monkeypatch, work, "'head.bias'", "1 of 3", "--allow-nonfinite")
    # the parents it had to create for the output are gone too
    _refused(["merge", cfg, "new/deeper/out"], capsys, monkeypatch, work, "'head.bias'")


def test_allow_nonfinite_writes_with_one_warning(work, capsys, monkeypatch):
    _with_nan(work)
    cfg = _cfg(work, TA)
    code, out, err = _cli(["merge", cfg, "out", "--allow-nonfinite"], capsys, monkeypatch)
    assert code == 0, err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "'head.bias'" in err
    merged = load_state_dict(work / "out")
    assert torch.isnan(merged["head.bias"]).sum() == 1 and torch.isfinite(merged["head.weight"]).all()


def test_overflow_of_the_output_dtype_is_caught_as_written(work, capsys, monkeypatch):
    # every input is finite, and so is the float32 result (2 * 4e4 = 8e4); float16 tops out at
    # 65504, so the tensor as written is inf: a check on the float32 result would miss it
    for i in range(2):
        state = load_state_dict(work / f"m{i}")
        state["head.weight"][0, 0] = 4e4
        save_state_dict(state, work / f"m{i}", overwrite=True)
    base = load_state_dict(work / "base")
    base["head.weight"][0, 0] = 0.0
    save_state_dict(base, work / "base", overwrite=True)
    (work / "base" / "config.json").write_text("{}")
    cfg = _cfg(work, TA + "dtype: float32\n")
    assert _cli(["merge", cfg, "ok32"], capsys, monkeypatch)[0] == 0
    cfg = _cfg(work, TA + "dtype: float16\n")
    _refused(["merge", cfg, "out"], capsys, monkeypatch, work, "'head.weight'", "float16")


def test_api_checks_the_same(work):
    a = {"x": torch.ones(3)}
    with pytest.raises(ConfigError, match="parameters.normalize"):
        merge_state_dicts("linear", [a, a], model_params=[{"weight": 1.0}, {"weight": -1.0}])
    with pytest.raises(ConfigError, match=r"model #0: parameters.density: must be in \(0, 1\], got 0"):
        merge_state_dicts("ties", [a], a, model_params=[{"density": 0.0}])
    nan = {"x": torch.tensor([1.0, float("nan"), 0.0])}
    with pytest.raises(MergeError, match="'x'"):
        merge_state_dicts("task_arithmetic", [nan], a)
    with pytest.warns(RuntimeWarning, match="'x'"):
        out = merge_state_dicts("task_arithmetic", [nan], a, allow_nonfinite=True)
    assert torch.isnan(out["x"][1])
    # YAML 1.1 leaves "5e-1" a string; it is read as the number it spells
    out = merge_state_dicts("ties", [a], {"x": torch.zeros(3)}, model_params=[{"density": "5e-1"}])
    assert torch.count_nonzero(out["x"]) == 1  # int(0.5 * 3) = 1 entry kept
    # without normalize, opposite weights are fine (task negation)
    out = merge_state_dicts("linear", [a, a], model_params=[{"weight": 1.0}, {"weight": -1.0}], normalize=False)
    assert torch.equal(out["x"], torch.zeros(3))


def test_output_under_a_file_is_one_line(work, capsys, monkeypatch):
    cfg = _cfg(work, TA)
    (work / "notes.txt").write_text("x")
    _refused(["merge", cfg, "notes.txt/out"], capsys, monkeypatch, work, "'notes.txt' is not a directory")
    _refused(["merge", cfg, "notes.txt", "--overwrite"], capsys, monkeypatch, work, "not a directory")


# -- 3. one merge at a time into one output -------------------------------------------------------
def test_second_concurrent_merge_into_the_same_output_is_refused(work):
    cfg = _cfg(work, TA)
    seen: list[subprocess.CompletedProcess] = []

    def second_merge(name: str) -> None:
        if seen:
            return
        partials = [p for p in work.iterdir() if p.name.startswith(".out.partial-")]
        assert len(partials) == 1  # the first merge is writing
        # another process, while the first merge holds the lock
        seen.append(subprocess.run([sys.executable, "-m", "polytask.cli", "merge", str(cfg), "out"],
                                   capture_output=True, text=True, cwd=work, timeout=300))
        assert partials[0].is_dir()  # the live merge's partial output was not touched

    merge_checkpoints("task_arithmetic", [work / "m0", work / "m1"], work / "base", work / "out",
                      on_tensor=second_merge)
    proc = seen[0]
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "another process" in proc.stderr and "'out'" in proc.stderr
    # the first merge finished normally, and released its lock
    assert (work / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["base", "m0", "m1", "merge.yaml", "out"]
    merge_checkpoints("task_arithmetic", [work / "m0"], work / "base", work / "out", overwrite=True)


def test_output_that_appears_while_waiting_for_the_lock_is_refused(work, monkeypatch):
    from polytask.merge import io

    acquire = io._OutputLock.acquire

    def another_writer_finishes_first(self):
        (work / "out").mkdir()  # between our first check and our lock, another merge committed
        acquire(self)

    monkeypatch.setattr(io._OutputLock, "acquire", another_writer_finishes_first)
    with pytest.raises(MergeError, match="already exists"):
        merge_checkpoints("task_arithmetic", [work / "m0"], work / "base", work / "out")
    assert sorted(os.listdir(work)) == ["base", "m0", "m1", "out"] and not os.listdir(work / "out")


def test_lock_is_per_output(work):
    done = []

    def other_output(name: str) -> None:
        if not done:  # another output beside it is not blocked
            done.append(merge_checkpoints("task_arithmetic", [work / "m0"], work / "base", work / "out2"))

    merge_checkpoints("task_arithmetic", [work / "m1"], work / "base", work / "out1", on_tensor=other_output)
    assert (work / "out1" / "model.safetensors").is_file() and (work / "out2" / "model.safetensors").is_file()


# -- 4. a killed merge's partial output is removed by the next one, and nothing else -------------
def test_killed_merge_leftovers_are_cleaned_by_the_next_merge(work, capsys, monkeypatch):
    script = textwrap.dedent("""
        import os, signal
        from polytask.merge import merge_checkpoints
        def die(name):
            os.kill(os.getpid(), signal.SIGKILL)
        merge_checkpoints("task_arithmetic", ["m0", "m1"], "base", "out", on_tensor=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, timeout=300)
    assert proc.returncode == -9
    stale = [p for p in work.iterdir() if p.name.startswith(".out.partial-")]
    assert len(stale) == 1 and (stale[0] / "model.safetensors").is_file()  # the fault happened
    # look-alikes that are not ours to remove, and a live merge's partial output
    keep = {
        ".out.partial-nomarker": False,      # our name, no marker
        ".out.partial-abcd12345": True,      # marker, but not a name we create (9 characters)
        "out.partial-abcd1234": True,        # marker, but not hidden: not a name we create
        ".busy.partial-abcd1234": True,      # marker, but its output's lock is held (below)
    }
    # stale partials of other outputs (killed writers, nobody holds their locks) go too
    gone = [".other.partial-abcd1234", ".out.partial-x.old-abcd1234"]
    for name, marked in [*keep.items(), *((g, True) for g in gone)]:
        (work / name).mkdir()
        (work / name / "keep.txt").write_text("x")
        if marked:
            (work / name / ".polytask-partial").write_text("")
    from polytask.merge import io

    live = io._OutputLock(work / "busy", "busy")
    assert live.try_acquire()
    try:
        cfg = _cfg(work, TA)
        code, out, err = _cli(["merge", cfg, "out"], capsys, monkeypatch)
    finally:
        live.release()
    assert code == 0, err
    assert not stale[0].exists() and not (work / ".out.lock").exists()
    for name in keep:
        assert (work / name / "keep.txt").is_file(), name
    for name in gone:
        assert not (work / name).exists(), name
    assert sorted(os.listdir(work)) == sorted(["base", "m0", "m1", "merge.yaml", "out", *keep])


# -- 5. permissions follow the umask --------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_permissions_follow_the_umask(work, capsys, monkeypatch, mask):
    cfg = _cfg(work, TA)
    old = os.umask(mask)
    try:
        code, _, err = _cli(["merge", cfg, "out"], capsys, monkeypatch)
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((work / "out").stat().st_mode) == 0o777 & ~mask
    files = list((work / "out").iterdir())
    assert {"model.safetensors", "config.json", "polytask_merge.yaml"} <= {f.name for f in files}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name


# -- 6. messages ----------------------------------------------------------------------------------
def test_pickles_and_other_files_get_one_clear_line(work, capsys, monkeypatch):
    torch.save(load_state_dict(work / "m0"), work / "m0.bin")
    cfg = _cfg(work, "merge_method: task_arithmetic\nbase_model: base\nmodels: [m0.bin]\n")
    _refused(["merge", cfg, "out"], capsys, monkeypatch, work, "pickled", "--allow-pickle")
    code, _, err = _cli(["merge", cfg, "out", "--allow-pickle"], capsys, monkeypatch)
    assert code == 0, err

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, work / "evil.bin")
    cfg = _cfg(work, "merge_method: task_arithmetic\nbase_model: base\nmodels: [evil.bin]\n")
    _refused(["merge", cfg, "out2", "--allow-pickle"], capsys, monkeypatch, work, "evil.bin", "weights_only=True")
    (work / "train.py").write_text("print('hello')\n")
    cfg = _cfg(work, "merge_method: task_arithmetic\nbase_model: base\nmodels: [train.py]\n")
    err = _refused(["merge", cfg, "out2"], capsys, monkeypatch, work, "train.py", "not a checkpoint format")
    assert "pickled" not in err


def test_merge_help_lists_the_options(capsys, monkeypatch):
    code, out, _ = _cli(["merge", "--help"], capsys, monkeypatch)
    assert code == 0
    for option in ("--allow-pickle", "--allow-nonfinite", "--overwrite"):
        assert option in out


# -- 7. relative paths: from the config's folder when they exist there, else as given -----------
def test_relative_paths_resolve_from_the_config_folder(work, capsys, monkeypatch):
    proj = work / "proj"
    proj.mkdir()
    for name in ("base", "m0"):
        os.rename(work / name, proj / name)
    # base and m0 only beside the config; m1 only in the working directory
    cfg = _cfg(proj, TA)
    code, _, err = _cli(["merge", cfg, "out"], capsys, monkeypatch)
    assert code == 0, err
    expected = merge_state_dicts("task_arithmetic", [load_state_dict(proj / "m0"), load_state_dict(work / "m1")],
                                 load_state_dict(proj / "base"))
    got = load_state_dict(work / "out")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (work / "out" / "config.json").is_file()  # copied from the base beside the config
    # a name that exists in both places: the config's folder wins
    save_state_dict(load_state_dict(work / "m1"), proj / "m1")
    monkeypatch.chdir(work / "m1")  # from elsewhere: nothing relative to the cwd
    code, _, err = _cli(["merge", cfg, work / "out_b"], capsys, monkeypatch)
    assert code == 0, err
    # and a path in neither place names the path as written
    cfg = _cfg(proj, "merge_method: task_arithmetic\nbase_model: base\nmodels: [nowhere]\n", "b.yaml")
    _refused(["merge", cfg, work / "out_c"], capsys, monkeypatch, work, "'nowhere'")


# -- the success path still works end to end --------------------------------------------------------
def test_overwrite_of_a_plain_output_replaces_it(work, capsys, monkeypatch):
    cfg = _cfg(work, TA)
    assert _cli(["merge", cfg, "out"], capsys, monkeypatch)[0] == 0
    (work / "out" / "stale.txt").write_text("old run")
    _refused(["merge", cfg, "out"], capsys, monkeypatch, work, "already exists")
    assert _cli(["merge", cfg, "out", "--overwrite"], capsys, monkeypatch)[0] == 0
    assert not (work / "out" / "stale.txt").exists()
    assert sorted(p.name for p in work.iterdir()) == ["base", "m0", "m1", "merge.yaml", "out"]


def test_overwrite_of_a_symlinked_output_replaces_the_link_not_its_target(work, capsys, monkeypatch):
    cfg = _cfg(work, TA)
    (work / "elsewhere").mkdir()
    (work / "elsewhere" / "keep.txt").write_text("not ours")
    (work / "out").symlink_to(work / "elsewhere")
    assert _cli(["merge", cfg, "out", "--overwrite"], capsys, monkeypatch)[0] == 0
    assert (work / "elsewhere" / "keep.txt").read_text() == "not ours"
    assert not (work / "out").is_symlink() and (work / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["base", "elsewhere", "m0", "m1", "merge.yaml", "out"]
