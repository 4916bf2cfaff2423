"""Bad input, as a careless or unlucky user gives it: every kind below ends in exactly one line
``fairbook: error: ...`` naming the problem, a non-zero exit status and no traceback.

Each case builds its input in a temporary project (``FAIRBOOK_ROOT``) holding a small official-layout dataset and a
toy notebook, then calls the command. The table covers data, notes, runs, sweeps, metrics, checkpoints, the
generator and the command line itself.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fairbook.cli import main
from test_fairvlmed import write_dataset

TOY = '''# %% tags=["parameters"]
x = 1
pretrained = ""

# %%
if pretrained:
    import fairbook as fb
    fb.models.create_clip("fairbook-tiny", pretrained=pretrained, device="cpu")
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A temporary project root with notebooks/99-toy.py and an official-layout dataset in data/ (12 samples)."""
    monkeypatch.setenv("FAIRBOOK_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "99-toy.py").write_text(TOY)
    write_dataset(tmp_path / "data")
    return tmp_path


# ------------------------------------------------------------------------------------------- ways to break things
# Each helper changes the project and returns None, so that a case reads ``lambda r: helper(r) or argv``.
def victim(root):
    return root / "data" / "Training" / "data_00002.npz"


def npz(root, **values):
    """Rewrite Training/data_00002.npz with some values changed (a value None drops the key)."""
    arrays = dict(np.load(victim(root)))
    for key, value in values.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = np.asarray(value)
    np.savez(victim(root), **arrays)


def damage(root, change):
    victim(root).write_bytes(change(victim(root).read_bytes()))


def empty_split(root):
    for path in (root / "data" / "Validation").iterdir():
        path.unlink()


def notes(root, content: str | bytes):
    path = root / "data" / "gpt-4_summarized_notes.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def duplicate_note(root):
    path = root / "data" / "gpt-4_summarized_notes.csv"
    path.write_text(path.read_text() + "data_00002.npz,orig,a second summary\n")


def drop_note(root):
    path = root / "data" / "gpt-4_summarized_notes.csv"
    path.write_text("".join(line for line in path.read_text().splitlines(True) if "data_00003" not in line))


def write(root, name, text):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def sweep(root, text):
    return ["sweep", write(root, "grid.yaml", text)]


def predictions(root, name="test.csv", **changes):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    columns = {"y_true": y, "y_score": np.clip(0.3 * y + 0.7 * rng.random(200), 0, 1),
               "race": rng.integers(0, 3, 200)}
    columns.update(changes)
    lines = [",".join(columns)] + [",".join(str(v[i]) for v in columns.values()) for i in range(200)]
    return write(root, name, "\n".join(lines) + "\n")


def checkpoint(root, payload):
    path = root / "ckpt.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    return ["run", "notebooks/99-toy.py", "--set", f"pretrained={path}", "--name", "ckpt"]


class Payload:
    """A pickled object that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (print, ("this must never run",))


CHECK = ["data", "check", "data"]
DECODE = ["data", "check", "data", "--decode"]
RUN = ["run", "notebooks/99-toy.py"]
GOOD_SWEEP = "notebook: notebooks/99-toy.py\ngrid: {x: [1, 2]}\n"

# (id, set-up: project root -> argv, fragment of the one error line)
CASES = [
    # data: labels, attribute codes and scalars in the npz files
    ("glaucoma-2", lambda r: npz(r, glaucoma=2) or CHECK, "glaucoma = 2, expected 0 (no) or 1 (yes)"),
    ("glaucoma-negative", lambda r: npz(r, glaucoma=-1) or CHECK, "glaucoma = -1, expected 0"),
    ("glaucoma-fraction", lambda r: npz(r, glaucoma=0.5) or CHECK, "glaucoma = 0.5"),
    ("glaucoma-string", lambda r: npz(r, glaucoma="yes") or CHECK, "glaucoma = 'yes'"),
    ("race-fraction", lambda r: npz(r, race=1.7) or CHECK, "race = 1.7, expected a whole-number code"),
    ("race-out-of-set", lambda r: npz(r, race=7) or CHECK, "race = 7, expected a whole-number code (0 Asian"),
    ("gender-out-of-set", lambda r: npz(r, gender=2) or CHECK, "gender = 2"),
    ("language-nan", lambda r: npz(r, language=np.nan) or CHECK, "language = nan"),
    ("marital-out-of-set", lambda r: npz(r, maritalstatus=9) or CHECK, "maritalstatus = 9"),
    ("age-string", lambda r: npz(r, age="fifty") or CHECK, "age = 'fifty', expected a number"),
    ("label-array", lambda r: npz(r, glaucoma=[0, 1]) or CHECK,
     "glaucoma is an array of shape (2,), expected a single"),
    ("missing-key", lambda r: npz(r, tds=None) or CHECK, "lacks required key(s) tds"),
    ("corrupt-npz", lambda r: damage(r, lambda b: b"not a zip") or CHECK, "data_00002.npz (BadZipFile"),
    ("truncated-npz", lambda r: damage(r, lambda b: b[:300]) or CHECK, "corrupt or truncated"),
    # data: folders
    ("no-dataset", lambda r: ["data", "check", "nowhere"], "no Harvard-FairVLMed folder at nowhere"),
    ("dataset-is-a-file", lambda r: ["data", "check", write(r, "file.txt", "x")], "no Harvard-FairVLMed folder"),
    ("missing-split", lambda r: shutil.rmtree(r / "data" / "Validation") or CHECK, "no Validation split"),
    ("empty-split", lambda r: empty_split(r) or CHECK, "no .npz files in"),
    # data: pixels (found by data check --decode, before any run)
    ("rgb-image", lambda r: npz(r, slo_fundus=np.zeros((8, 6, 3), np.uint8)) or DECODE,
     "shape (8, 6, 3), expected a 2-D grayscale image"),
    ("string-image", lambda r: npz(r, slo_fundus=np.array([["a", "b"], ["c", "d"]])) or DECODE,
     "slo_fundus has dtype <U1, expected a numeric image"),
    ("bool-image", lambda r: npz(r, slo_fundus=np.ones((8, 6), bool)) or DECODE, "dtype bool"),
    ("nan-pixels", lambda r: npz(r, slo_fundus=np.where(np.eye(8, 6), np.nan, 0.5)) or DECODE,
     "6 non-finite pixels (NaN or inf)"),
    ("inf-pixels", lambda r: npz(r, slo_fundus=np.full((8, 6), np.inf)) or DECODE, "48 non-finite pixels"),
    ("float-out-of-range", lambda r: npz(r, slo_fundus=np.linspace(-1, 1, 48).reshape(8, 6)) or DECODE,
     "values lie in [-1, 1], expected grey levels in [0, 255] (float images in [0, 1] are scaled by 255)"),
    ("uint16-image", lambda r: npz(r, slo_fundus=np.full((8, 6), 1000, np.uint16)) or DECODE,
     "values lie in [1000, 1000]"),
    ("empty-image", lambda r: npz(r, slo_fundus=np.zeros((0, 6))) or DECODE, "slo_fundus is empty"),
    # notes
    ("no-notes-file", lambda r: (r / "data" / "gpt-4_summarized_notes.csv").unlink() or CHECK,
     "no notes file in"),
    ("duplicate-notes", lambda r: duplicate_note(r) or CHECK, "has 2 rows for data_00002.npz"),
    ("missing-note-row", lambda r: drop_note(r) or CHECK, "has no row for"),
    ("notes-not-text", lambda r: notes(r, b"\xff\xfe\x00") or CHECK, "cannot parse notes file"),
    ("notes-two-columns", lambda r: notes(r, "a,b\nc,d\n") or CHECK, "cannot find the filename and summary columns"),
    # runs: configuration names
    ("name-dot", lambda r: RUN + ["--name", "."], "invalid configuration name '.' (from --name)"),
    ("name-dotdot", lambda r: RUN + ["--name", ".."], "invalid configuration name '..'"),
    ("name-parent", lambda r: RUN + ["--name", "../escape"], "invalid configuration name '../escape'"),
    ("name-absolute", lambda r: RUN + ["--name", "/tmp/x"], "invalid configuration name '/tmp/x'"),
    ("name-empty", lambda r: RUN + ["--name", ""], "invalid configuration name ''"),
    ("name-hidden", lambda r: RUN + ["--name", ".hidden"], "invalid configuration name '.hidden'"),
    ("name-failed", lambda r: RUN + ["--name", "x.failed"], "no .failed ending"),
    ("stem-dot", lambda r: RUN + ["-p", write(r, "..yaml", "x: 2\n")], "(from the parameter-file stems"),
    ("stem-hidden", lambda r: RUN + ["-p", write(r, ".x.yaml", "x: 2\n")], "invalid configuration name '.x'"),
    ("book-config", lambda r: ["book", "--config", "../x"], "invalid configuration name '../x' (from --config)"),
    # runs: notebooks and parameter files
    ("notebook-folder", lambda r: ["run", "notebooks"], "is a folder, not a notebook"),
    ("notebook-missing", lambda r: ["run", "notebooks/nope.py"], "no notebook at"),
    ("notebook-stem-dot", lambda r: ["run", write(r, "notebooks/..py", TOY)],
     "cannot read notebook"),
    ("yaml-malformed", lambda r: RUN + ["-p", write(r, "p.yaml", "x: [1, 2\n")], "cannot parse"),
    ("yaml-unsafe", lambda r: RUN + ["-p", write(r, "p.yaml", "x: !!python/object/apply:os.system [ls]\n")],
     "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("yaml-list", lambda r: RUN + ["-p", write(r, "p.yaml", "- x\n- 1\n")], "found a list"),
    ("yaml-binary", lambda r: RUN + ["-p", str(victim(r))], "cannot read parameter file"),
    ("params-missing", lambda r: RUN + ["-p", "nope.yaml"], "no parameter file at"),
    ("params-folder", lambda r: RUN + ["-p", "notebooks"], "is a folder: give the path of a parameter file"),
    ("unknown-parameter", lambda r: RUN + ["--set", "y=1"], "unknown parameter 'y' for 99-toy; valid: x"),
    ("set-without-value", lambda r: RUN + ["--set", "x"], "--set expects key=value"),
    ("set-bad-yaml", lambda r: RUN + ["--set", "x=[1"], "the value is not valid YAML"),
    # sweeps
    ("sweep-missing", lambda r: ["sweep", "nope.yaml"], "no sweep file at"),
    ("sweep-malformed", lambda r: sweep(r, "grid: {x: [1\n"), "cannot parse"),
    ("sweep-unsafe", lambda r: sweep(r, "notebook: !!python/name:os.system\ngrid: {x: [1]}\n"), "!!python tags"),
    ("sweep-not-mapping", lambda r: sweep(r, "- 1\n"), "must be a mapping with 'notebook'"),
    ("sweep-no-grid", lambda r: sweep(r, "notebook: notebooks/99-toy.py\n"), "lacks grid"),
    ("grid-list", lambda r: sweep(r, "notebook: notebooks/99-toy.py\ngrid: [1, 2]\n"), "(found a list)"),
    ("grid-empty", lambda r: sweep(r, "notebook: notebooks/99-toy.py\ngrid: {}\n"), "(found an empty grid)"),
    ("grid-empty-list", lambda r: sweep(r, "notebook: notebooks/99-toy.py\ngrid: {x: []}\n"),
     "(found x: an empty list)"),
    ("grid-scalar", lambda r: sweep(r, "notebook: notebooks/99-toy.py\ngrid: {x: 3}\n"), "(found x: 3)"),
    ("sweep-notebook-missing", lambda r: sweep(r, GOOD_SWEEP.replace("99-toy", "nope")), "is not a notebook file"),
    ("sweep-unknown-parameter", lambda r: sweep(r, GOOD_SWEEP.replace("{x:", "{y:")), "unknown parameter 'y'"),
    ("sweep-bad-stem", lambda r: sweep(r, GOOD_SWEEP + f"params: [{write(r, '..yaml', 'x: 1')}]\n"),
     "invalid configuration name"),
    # metrics
    ("n-boot-negative", lambda r: ["metrics", predictions(r), "--attributes", "race", "--n-boot", "-5"],
     "argument --n-boot: invalid non-negative integer value: '-5'"),
    ("n-boot-text", lambda r: ["metrics", predictions(r), "--attributes", "race", "--n-boot", "many"],
     "invalid non-negative integer value: 'many'"),
    ("json-folder", lambda r: ["metrics", predictions(r), "--attributes", "race", "--n-boot", "0",
                               "--json", str(r / "notebooks")], "is a folder: give the path of a file to write"),
    ("predictions-missing", lambda r: ["metrics", "nope.csv", "--attributes", "race"], "not found"),
    ("predictions-folder", lambda r: ["metrics", "notebooks", "--attributes", "race"], "is a folder"),
    ("labels-not-binary", lambda r: ["metrics", predictions(r, y_true=np.full(200, 2)), "--attributes", "race"],
     "binary"),
    ("attribute-missing", lambda r: ["metrics", predictions(r), "--attributes", "gender"],
     "column 'gender' not found"),
    ("threshold-unknown", lambda r: ["metrics", predictions(r), "--attributes", "race", "--threshold", "magic"],
     "magic"),
    # checkpoints (through a run whose notebook loads one)
    ("checkpoint-missing", lambda r: RUN + ["--set", "pretrained=nope.pt", "--name", "ckpt"],
     "pretrained weights 'nope.pt' not found"),
    ("checkpoint-corrupt", lambda r: checkpoint(r, b"garbage"), "the file is corrupt, truncated or not a torch"),
    ("checkpoint-pickled", lambda r: checkpoint(r, {"state_dict": Payload()}), "holds pickled Python objects"),
    ("checkpoint-wrong-model", lambda r: checkpoint(r, {"state_dict": {"w": torch.zeros(2)}}),
     "does not fit fairbook-tiny"),
    # the generator
    ("synth-unknown-preset", lambda r: ["data", "synth", "out", "--bias", "strong"], "unknown preset 'strong'"),
    ("synth-zero-size", lambda r: ["data", "synth", "out", "--n-train", "0"], "invalid positive integer value: '0'"),
    ("synth-too-large", lambda r: ["data", "synth", "out", "--n-train", "99999"], "split sizes must be"),
    ("synth-zero-workers", lambda r: ["data", "synth", "out", "--workers", "0"], "invalid positive integer"),
    ("synth-over-other-data", lambda r: ["data", "synth", "data"], "already holds other data"),
    ("synth-over-a-file", lambda r: ["data", "synth", write(r, "file.txt", "x")], "already holds other data"),
    # the command line
    ("unknown-command", lambda r: ["train"], "invalid choice: 'train'"),
    ("unknown-option", lambda r: CHECK + ["--fast"], "unrecognized arguments: --fast"),
]


@pytest.mark.parametrize("make,fragment", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line(project, capsys, make, fragment):
    argv = make(project)
    assert isinstance(argv, list), "a case must return the command line"
    capsys.readouterr()
    status = main(argv)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert status == 2, out
    assert len(lines) == 1 and lines[0].startswith("fairbook: error: "), lines
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in out.err + out.out
    if os.environ.get("FAIRBOOK_SHOW_ERRORS"):  # the table of messages for a closing note
        with open(os.environ["FAIRBOOK_SHOW_ERRORS"], "a") as table:
            table.write(f"{lines[0]}\n")


def test_the_table_has_forty_kinds_and_unique_names():
    names = [case[0] for case in CASES]
    assert len(names) >= 40 and len(set(names)) == len(names)


# ----------------------------------------------------------------------------------------------- what is kept safe
def _complete_run(folder: Path, marker: str) -> None:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text('{"status": "complete"}')
    (folder / "kept.txt").write_text(marker)


@pytest.mark.parametrize("argv", [["--name", "."], ["--name", ".."], ["-p", "..yaml"]], ids=["dot", "dotdot", "stem"])
def test_an_invalid_name_leaves_every_other_run_intact(project, capsys, argv):
    (project / "..yaml").write_text("x: 2\n")
    chapter = project / "runs" / "99-toy"
    for config in ("default", "seed-1"):
        _complete_run(chapter / config, config)
    before = sorted(p.relative_to(project) for p in (project / "runs").rglob("*"))
    assert main(RUN + argv) == 2
    assert sorted(p.relative_to(project) for p in (project / "runs").rglob("*")) == before
    assert (chapter / "default" / "kept.txt").read_text() == "default"
    assert (chapter / "seed-1" / "kept.txt").read_text() == "seed-1"


def test_json_into_a_folder_leaves_no_temporary_file(project, capsys):
    folder = project / "reports"
    folder.mkdir()
    assert main(["metrics", predictions(project), "--attributes", "race", "--n-boot", "0", "--json", str(folder)]) == 2
    assert list(folder.iterdir()) == [] and [p.name for p in project.glob(".reports*")] == []


def test_an_unexpected_error_is_one_line_with_status_1(monkeypatch, capsys):
    import fairbook.data.fairvlmed as fv

    monkeypatch.setattr(fv, "check", lambda *a, **k: 1 / 0)
    assert main(["data", "check", "anywhere"]) == 1
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fairbook: error: unexpected ZeroDivisionError: division by zero")
    assert "FAIRBOOK_DEBUG" in line


def test_python_dash_m_fairbook_is_the_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fairbook", "data", "check", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fairbook: error: no Harvard-FairVLMed folder at {tmp_path / 'nowhere'}: point data_root at the dataset or "
        f"run `fairbook data synth {tmp_path / 'nowhere'}`"]
    help_text = subprocess.run([sys.executable, "-m", "fairbook", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "usage: fairbook" in help_text.stdout
