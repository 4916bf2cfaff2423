"""The papermill runner: parameter checking, atomic runs, skipping unchanged runs, resumable sweeps."""
import json

import pytest
import yaml

from fairbook import files, runs

NOTEBOOK = '''# %% [markdown]
# A toy notebook for the runner tests.

# %%
from pathlib import Path
from fairbook import files, runs

# %% tags=["parameters"]
x = 1
fail = False
counter = ""

# %%
if counter:
    with open(counter, "a") as f:
        f.write(f"{x}\\n")
assert not fail, "asked to fail"
runs.save_metrics({"x2": x * 2})
'''


@pytest.fixture
def toy(tmp_path):
    nb = tmp_path / "99-toy.py"
    nb.write_text(NOTEBOOK)
    return nb, tmp_path / "runs", tmp_path / "counter.txt"


def _count(counter):
    return counter.read_text().splitlines() if counter.exists() else []


def test_parameters_are_read_from_the_parameters_cell(toy):
    nb, _, _ = toy
    assert runs.notebook_parameters(nb) == {"x": 1, "fail": False, "counter": ""}


def test_unknown_parameter_lists_the_valid_ones(toy):
    nb, runs_dir, _ = toy
    with pytest.raises(runs.ParameterError, match=r"unknown parameter 'y' for 99-toy; valid: x, fail, counter"):
        runs.run_notebook(nb, overrides={"y": 3}, runs_dir=runs_dir)
    assert not runs_dir.exists()


def test_parameter_files_merge_left_to_right(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("x: 1\nfail: true\n")
    b.write_text("x: 2\n")
    assert runs.load_params([a, b], {"counter": "c"}) == {"x": 2, "fail": True, "counter": "c"}
    assert runs.config_name([a, b], {"x": 3}) == "a+b__x-3"
    assert runs.parse_set(["x=4", "fail=true", "name=race"]) == {"x": 4, "fail": True, "name": "race"}
    with pytest.raises(runs.ParameterError, match="key=value"):
        runs.parse_set(["x"])


def test_run_writes_outputs_and_skips_an_unchanged_run(toy):
    nb, runs_dir, counter = toy
    out = runs.run_notebook(nb, overrides={"x": 5, "counter": str(counter)}, name="five", runs_dir=runs_dir)
    assert out == runs_dir / "99-toy" / "five"
    assert json.loads((out / "metrics.json").read_text()) == {"x2": 10, "config": "99-toy/five"}
    assert yaml.safe_load((out / "params.yaml").read_text())["x"] == 5
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert (out / "99-toy.ipynb").exists()
    runs.run_notebook(nb, overrides={"x": 5, "counter": str(counter)}, name="five", runs_dir=runs_dir)
    assert _count(counter) == ["5"], "an unchanged run must not execute again"
    runs.run_notebook(nb, overrides={"x": 6, "counter": str(counter)}, name="five", runs_dir=runs_dir)
    assert _count(counter) == ["5", "6"], "changed parameters must execute again"
    assert json.loads((out / "metrics.json").read_text())["x2"] == 12


def test_a_crashed_run_never_looks_complete_and_names_the_cell(toy):
    nb, runs_dir, _ = toy
    good = runs.run_notebook(nb, name="cfg", runs_dir=runs_dir)
    with pytest.raises(runs.RunError, match=r"99-toy \[cfg\] failed in cell \d+ .*AssertionError: asked to fail"):
        runs.run_notebook(nb, overrides={"fail": True}, name="cfg", runs_dir=runs_dir)
    # the earlier complete result is untouched, the failed attempt is kept aside, nothing half-written remains
    assert json.loads((good / "metrics.json").read_text()) == {"x2": 2, "config": "99-toy/cfg"}
    assert (runs_dir / "99-toy" / "cfg.failed" / "99-toy.ipynb").exists()
    assert [p.name for p in (runs_dir / "99-toy").iterdir() if ".tmp-" in p.name] == []
    assert not runs.is_complete(runs_dir / "99-toy" / "cfg", runs.fingerprint(nb, {"fail": True}))


def test_a_killed_run_is_not_complete(tmp_path):
    leftover = tmp_path / ".cfg.tmp-1234"
    leftover.mkdir()
    (leftover / "metrics.json").write_text("{}")
    assert not runs.is_complete(leftover)
    assert not runs.is_complete(tmp_path / "cfg")


def test_sweep_expands_the_grid_and_resumes(toy, tmp_path):
    nb, runs_dir, counter = toy
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"notebook": str(nb), "grid": {"x": [1, 2], "fail": [False, True]},
                                    "params": []}, sort_keys=False))
    points = runs.expand_grid(grid)
    assert [p["overrides"] for p in points] == [
        {"x": 1, "fail": False}, {"x": 1, "fail": True}, {"x": 2, "fail": False}, {"x": 2, "fail": True}]
    with pytest.raises(runs.RunError, match="2 of 4 runs failed"):
        runs.sweep(grid, runs_dir=runs_dir, progress=False)
    done = sorted(p.name for p in (runs_dir / "99-toy").iterdir() if runs.is_complete(p))
    assert done == ["defaults__x-1__fail-False", "defaults__x-2__fail-False"]


def test_sweep_rejects_unknown_parameters_before_running(toy, tmp_path):
    nb, runs_dir, _ = toy
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"notebook": str(nb), "grid": {"seed": [0, 1]}}))
    with pytest.raises(runs.ParameterError, match="unknown parameter 'seed'"):
        runs.sweep(grid, runs_dir=runs_dir, progress=False)
    assert not runs_dir.exists()


def test_figures_reach_the_executed_notebook_even_with_mplbackend_agg(tmp_path, monkeypatch):
    import nbformat

    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = tmp_path / "98-figure.py"
    nb.write_text('# %%\nimport matplotlib.pyplot as plt\n\n# %% tags=["parameters"]\nn = 2\n\n'
                  '# %%\nfig, ax = plt.subplots()\nax.plot(range(n))\n')
    out = runs.run_notebook(nb, runs_dir=tmp_path / "runs")
    executed = nbformat.read(out / "98-figure.ipynb", as_version=4)
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
    assert runs.os.environ["MPLBACKEND"] == "Agg", "the caller's environment is restored"


def test_to_jsonable_turns_pandas_into_plain_json():
    import pandas as pd

    frame = pd.DataFrame({"auc": [0.7, float("nan")]}, index=pd.Index(["race", "gender"], name="attribute"))
    assert files.to_jsonable(frame) == [{"attribute": "race", "auc": 0.7}, {"attribute": "gender", "auc": None}]
    assert files.to_jsonable(frame["auc"]) == {"race": 0.7, "gender": None}
    assert json.loads(json.dumps(files.to_jsonable({"t": frame}))) == {"t": files.to_jsonable(frame)}


def test_long_override_values_give_a_short_unique_config_name():
    long_a = {"data_root": "/tmp/" + "a" * 300}
    long_b = {"data_root": "/tmp/" + "a" * 299 + "b"}
    name_a, name_b = runs.config_name(["smoke.yaml"], long_a), runs.config_name(["smoke.yaml"], long_b)
    assert len(name_a) == runs.MAX_CONFIG_NAME and name_a.startswith("smoke__data_root-_tmp_aaa")
    assert name_a != name_b
    assert runs.config_name(["smoke.yaml"], {"seed": 1}) == "smoke__seed-1"


def _dead_pid() -> int:
    """The id of a process that has ended (what a killed run's temporary folder carries)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_run_removes_what_killed_runs_left_and_keeps_live_ones(toy):
    nb, runs_dir, _ = toy
    chapter = runs_dir / "99-toy"
    killed = [chapter / f".cfg.tmp-{_dead_pid()}", chapter / f".cfg.old-{_dead_pid()}"]
    live = chapter / ".cfg.tmp-1"  # pid 1 is alive: another writer's work in progress is never touched
    other = chapter / f".other.tmp-{_dead_pid()}"  # a different configuration: cleaned by its own next run
    for folder in (*killed, live, other):
        folder.mkdir(parents=True)
        (folder / "99-toy.ipynb").write_text("{}")
    out = runs.run_notebook(nb, name="cfg", runs_dir=runs_dir)
    assert runs.is_complete(out)
    assert not any(p.exists() for p in killed)
    assert live.exists() and other.exists()


@pytest.mark.parametrize("name", [".", "..", "", ".hidden", "a/b", "../b", "/abs", "x.failed", "a" * 121])
def test_invalid_configuration_names_are_refused(name):
    with pytest.raises(runs.ParameterError, match="invalid configuration name"):
        runs.check_config_name(name)


@pytest.mark.parametrize("name", ["default", "paper-b16", "smoke__seed-1", "a+b__lr-0.001", "x.y", "-1"])
def test_valid_configuration_names_pass(name):
    assert runs.check_config_name(name) == name


def test_a_parameter_file_stem_that_is_not_a_name_is_refused(tmp_path):
    with pytest.raises(runs.ParameterError, match=r"invalid configuration name '\.' \(from the parameter-file stems"):
        runs.config_name([tmp_path / "..yaml"])
    with pytest.raises(runs.ParameterError, match=r"invalid configuration name '\.hidden__seed-1'"):
        runs.config_name([tmp_path / ".hidden.yaml"], {"seed": 1})
