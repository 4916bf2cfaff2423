"""Every notebook executes under params/<stem>/smoke.yaml; the book built from those runs renders in Chromium."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fairbook import runs

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("[0-9]*.py"))


def test_every_notebook_has_parameters_and_params_files():
    assert NOTEBOOKS, "no notebooks found"
    for nb in NOTEBOOKS:
        defaults = runs.notebook_parameters(nb)
        for config in ("smoke", "default"):
            assert (ROOT / "params" / nb.stem / f"{config}.yaml").exists(), f"missing {config}.yaml for {nb.stem}"
        for path in sorted((ROOT / "params" / nb.stem).glob("*.yaml")):  # paper-scale and real-data files too
            runs.check_params(nb, runs.load_params([path]))  # raises on a key the notebook does not declare
        assert defaults, f"{nb.name} declares no parameters"


def test_code_lines_fit_the_book_column():
    """No line of a code cell is wider than the book's code column, so no code scrolls sideways (issue #13);
    markdown cells are prose and wrap by themselves."""
    import jupytext

    from fairbook.plots import CODE_COLUMN

    too_long = [f"{nb.name}: {line}" for nb in NOTEBOOKS for cell in jupytext.read(nb).cells
                if cell.cell_type == "code" for line in cell.source.splitlines() if len(line) > CODE_COLUMN]
    assert too_long == [], f"{len(too_long)} code lines over {CODE_COLUMN} characters, e.g. {too_long[:3]}"


@pytest.fixture(scope="module")
def smoke_runs(smoke_data):
    """Every chapter under its smoke parameters, in order, into runs/<stem>/smoke/ of the checkout: later chapters
    read earlier ones' smoke runs (chapter 10's checkpoint, chapter 11's baseline), exactly as the default
    configuration chains runs/<stem>/default/. The default runs are never touched."""
    runs_dir = ROOT / "runs"
    for nb in NOTEBOOKS:
        runs.run_notebook(nb, [ROOT / "params" / nb.stem / "smoke.yaml"], name="smoke", runs_dir=runs_dir, force=True)
    return runs_dir


@pytest.mark.notebook
@pytest.mark.parametrize("stem", [nb.stem for nb in NOTEBOOKS])
def test_notebook_executes_under_smoke_parameters(smoke_runs, stem):
    out = smoke_runs / stem / "smoke"
    assert runs.is_complete(out)
    assert (out / f"{stem}.ipynb").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "synthetic" in json.dumps(metrics).lower(), "a notebook's metrics must say which data they describe"
    assert metrics["config"] == f"{stem}/smoke", "a notebook's metrics must say which configuration produced them"


@pytest.mark.notebook
def test_data_chapter_numbers_match_the_loader(smoke_runs, smoke_data):
    from fairbook.data import load_metadata

    metrics = json.loads((smoke_runs / "01-data-exploration" / "smoke" / "metrics.json").read_text())
    train = load_metadata(smoke_data, "Training")
    assert metrics["n"]["Training"] == len(train)
    assert metrics["group_n"]["race"] == train["race_name"].value_counts().reindex(
        metrics["group_n"]["race"].keys(), fill_value=0).to_dict()
    figures = sorted(p.name for p in (smoke_runs / "01-data-exploration" / "smoke" / "figures").glob("*.png"))
    assert "prevalence-by-group.png" in figures and "examples-by-race.png" in figures


@pytest.mark.browser
def test_book_built_from_the_smoke_runs_renders_offline(smoke_runs, tmp_path):
    """The real chapters, executed under smoke parameters, built into the book and opened in Chromium: every page
    loads offline and reads well (issue #13's checks, `test_book.assert_reads_well`)."""
    from browser import CHROMIUM, check_book_in_browser
    from fairbook.book import build_book
    from test_book import assert_reads_well, copy_book_sources

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    book_dir = tmp_path / "book"
    copy_book_sources(book_dir)
    index = build_book(config="smoke", runs_dir=smoke_runs, book_dir=book_dir)
    result = check_book_in_browser(index.parent)
    pages = {Path(p["page"]).stem: p for p in result["pages"]}
    for nb in NOTEBOOKS:
        assert nb.stem in pages, f"{nb.stem} missing from the book"
    assert len(pages["01-data-exploration"]["images"]) >= 6, "the data chapter's figures are missing"
    assert all(img["width"] > 0 for img in result["images"]), "an image failed to load"
    assert result["external_requests"] == [], result["external_requests"]
    assert_reads_well(result, "smoke")
    assert result["failed_requests"] == [] and result["js_errors"] == []


@pytest.mark.parametrize("grid", sorted((ROOT / "params" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_files_expand_to_valid_runs(grid):
    points = runs.expand_grid(grid)
    assert points
    for point in points:
        runs.check_params(ROOT / point["notebook"], runs.load_params(point["params"], point["overrides"]))


@pytest.mark.notebook
def test_data_chapter_runs_on_an_official_layout_folder_by_changing_one_parameter(tmp_path):
    """The real-data path: a folder in the official layout (Testing/, no masks, no synthetic manifest)."""
    from test_fairvlmed import write_dataset

    root = write_dataset(tmp_path / "FairVLMed")
    nb = ROOT / "notebooks" / "01-data-exploration.py"
    out = runs.run_notebook(nb, [ROOT / "params" / nb.stem / "smoke.yaml"], {"data_root": str(root)},
                            runs_dir=tmp_path / "runs")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == f"Harvard-FairVLMed (real data at {root})"
    assert metrics["n"] == {"Training": 5, "Validation": 2, "Test": 2}  # unknown attributes dropped from val/test
    assert not (out / "figures" / "cdr-by-race.png").exists(), "no masks in real data, so no CDR figure"


def official_copy(synthetic: Path, dest: Path) -> Path:
    """The smoke SynthFairVLMed rearranged as the official release can look: Testing/ instead of Test/, the other
    notes file name, and no synthetic manifest (so the loader treats it as real data). npz files are hard links."""
    for split, name in (("Training", "Training"), ("Validation", "Validation"), ("Test", "Testing")):
        (dest / name).mkdir(parents=True)
        for npz in (synthetic / split).glob("*.npz"):
            os.link(npz, dest / name / npz.name)
    shutil.copy(synthetic / "gpt-4_summarized_notes.csv", dest / "gpt4_summarized_notes.csv")
    return dest


@pytest.mark.notebook
def test_fine_tuning_chapters_run_on_an_official_layout_folder(smoke_runs, smoke_data, tmp_path):
    """Chapters 11 and 12 on a folder in the official layout, changing only where the data (and the baseline) is."""
    root = official_copy(smoke_data, tmp_path / "Harvard-FairVLMed")
    label = f"Harvard-FairVLMed (real data at {root})"
    nb11, nb12 = ROOT / "notebooks" / "11-clip-baseline.py", ROOT / "notebooks" / "12-fairclip.py"
    out11 = runs.run_notebook(nb11, [ROOT / "params" / nb11.stem / "smoke.yaml"],
                              {"data_root": str(root), "control_root": None},
                              runs_dir=tmp_path / "runs")
    out12 = runs.run_notebook(nb12, [ROOT / "params" / nb12.stem / "smoke.yaml"],
                              {"data_root": str(root), "baseline_run": str(out11), "attributes": ["race"]},
                              runs_dir=tmp_path / "runs")
    for out in (out11, out12):
        assert json.loads((out / "metrics.json").read_text())["data"] == label
    saved = sorted(p.relative_to(out12).as_posix() for p in (out12 / "predictions").glob("*/*/*/test.csv"))
    assert saved == ["predictions/FairCLIP/race/seed-0/test.csv", "predictions/FairCLIP/race/seed-1/test.csv"]


@pytest.mark.notebook
def test_fine_tuning_chapters_save_predictions_that_the_results_chapter_reads(smoke_runs):
    from fairbook import results

    assert runs.notebook_parameters(ROOT / "notebooks" / "90-results.py")["chapters"] == []  # found, not listed
    record = json.loads((smoke_runs / "90-results" / "smoke" / "metrics.json").read_text())
    method_chapters = {"11-clip-baseline", "12-fairclip", "13-fair-moe", "20-ablation-fo-moe", "21-ablation-fol",
                       "22-ablation-components"}
    assert method_chapters <= set(record["chapters"]), "the results chapter reads every method chapter"
    found = results.collect(*(smoke_runs / chapter / "smoke" for chapter in record["chapters"]))
    assert {"CLIP", "FairCLIP", "Fair-MoE", "FairCLIP w. FO-MoE", "Fair-MoE w/o FOL"} <= set(found["method"])
    assert set(found["chapter"]) == set(record["chapters"]), "every chapter it read saved predictions"
    assert {row["Model"] for row in record["leaderboard"]} == set(found["method"])  # one leaderboard row each
    per_seed = pd.read_csv(smoke_runs / "90-results" / "smoke" / "per-seed.csv")
    assert len(per_seed) == 5 * len(found)  # every model under the four attributes and race & gender
    metrics = json.loads((smoke_runs / "11-clip-baseline" / "smoke" / "metrics.json").read_text())
    assert len(metrics["control_differences"]) == 8, "the bias-free control compares every pair of groups"


def papermill(stem: str, out: Path, params: dict) -> subprocess.Popen:
    """``papermill`` itself, as a user runs it (not fairbook's runner): the chapter converted with jupytext, then
    executed with the smoke parameters file and extra ``-p`` values, from the checkout."""
    import jupytext

    notebook = out.with_name(f"{stem}-source.ipynb")
    jupytext.write(jupytext.read(ROOT / "notebooks" / f"{stem}.py"), notebook)
    extra = [a for k, v in params.items() for a in ("-p", k, str(v))]
    command = [str(Path(sys.executable).with_name("papermill")), str(notebook), str(out), "-f",
               str(ROOT / "params" / stem / "smoke.yaml"), "-k", "fairbook", "--log-level", "ERROR", *extra]
    env = {k: v for k, v in os.environ.items() if k not in (runs.RUN_DIR_ENV, runs.RUN_CONFIG_ENV)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def executed_folder(out: Path) -> Path:
    """The run folder an executed notebook says it wrote to (printed near the top)."""
    for cell in json.loads(out.read_text())["cells"][:12]:
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", ""))
            if text.startswith("results of this execution:"):
                return ROOT / text.splitlines()[1]          # relative to the checkout, or absolute
    raise AssertionError(f"{out} does not say where its results went")


def execute(stem: str, out: Path, params: dict) -> Path:
    """:func:`papermill` to the end, which must succeed; returns the run folder the executed notebook names."""
    process = papermill(stem, out, params)
    log = process.communicate(timeout=900)[0]
    assert process.returncode == 0, log[-2000:]
    return executed_folder(out)


@pytest.mark.notebook
def test_papermill_used_directly_gives_every_execution_its_own_complete_folder(smoke_data, tmp_path):
    runs.ensure_kernel()
    executions = [("02-fairness-metrics", {}), ("01-data-exploration", {}), ("02-fairness-metrics", {"n_boot": 20})]
    folders = []
    try:
        for i, (stem, params) in enumerate(executions):
            folders.append(execute(stem, tmp_path / f"out-{i}.ipynb", params))
        assert len(set(folders)) == 3
        assert [f.parent.name for f in folders] == [stem for stem, _ in executions]
        assert folders[0].name.startswith("defaults__") and folders[2].name != folders[0].name
        assert "n_boot-20" in folders[2].name
        for folder, (stem, params) in zip(folders, executions):
            assert runs.is_complete(folder), f"{folder} is not a complete run"
            recorded = runs.read_yaml(folder / "params.yaml")
            expected = {**runs.load_params([ROOT / "params" / stem / "smoke.yaml"]), **params}
            assert {k: recorded[k] for k in expected} == expected
            metrics = json.loads((folder / "metrics.json").read_text())
            assert metrics["config"] == f"{stem}/{folder.name}"
            assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))
        assert not (ROOT / "runs" / "interactive").exists() or not any(
            (ROOT / "runs" / "interactive").glob("metrics.json")), "nothing may land in the shared folder"
        again = execute("02-fairness-metrics", tmp_path / "again.ipynb", {"n_boot": 20})
        assert again == folders[2] and runs.is_complete(folders[2])
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.notebook
def test_two_papermill_executions_in_parallel_keep_their_files_apart(smoke_data, tmp_path):
    runs.ensure_kernel()
    boots = [21, 22]
    processes = [papermill("02-fairness-metrics", tmp_path / f"par-{b}.ipynb", {"n_boot": b}) for b in boots]
    logs = [p.communicate(timeout=900)[0] for p in processes]
    folders = [executed_folder(tmp_path / f"par-{b}.ipynb") for b in boots]
    try:
        assert all(p.returncode == 0 for p in processes), [log[-1500:] for log in logs]
        assert folders[0] != folders[1]
        for folder, boot in zip(folders, boots):
            assert runs.read_yaml(folder / "params.yaml")["n_boot"] == boot
            assert json.loads((folder / "metrics.json").read_text())["config"].endswith(folder.name)
            names = {p.relative_to(folder) for p in folder.rglob("*")}
            other = folders[1 - folders.index(folder)]
            assert names and names == {p.relative_to(other) for p in other.rglob("*")}   # same kinds of files
            assert runs.is_complete(folder)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.notebook
def test_run_dir_names_the_folder_and_fairbook_run_refuses_it(smoke_data, tmp_path):
    runs.ensure_kernel()
    target = tmp_path / "chosen"
    chosen = execute("02-fairness-metrics", tmp_path / "chosen.ipynb", {"run_dir": str(target)})
    assert chosen == target and runs.is_complete(target)
    assert runs.read_yaml(target / "params.yaml")["run_dir"] == str(target)
    broken = papermill("02-fairness-metrics", tmp_path / "broken.ipynb",
                       {"run_dir": str(tmp_path / "broken"), "data_root": str(tmp_path / "nowhere")})
    broken.communicate(timeout=900)
    assert broken.returncode != 0 and not (tmp_path / "broken").exists()
    assert (tmp_path / "broken.failed" / "params.yaml").is_file()    # a failed execution never looks complete
    with pytest.raises(runs.ParameterError, match="pass --name instead"):
        runs.run_notebook(ROOT / "notebooks" / "02-fairness-metrics.py", [], {"run_dir": "x"})
    with pytest.raises(runs.ParameterError, match="from the run_dir parameter"):
        runs.begin("02-fairness-metrics", {"run_dir": "../elsewhere"})
