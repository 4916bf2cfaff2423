"""The `fairbook` command: user errors are one line on stderr with exit status 2."""
import numpy as np
import pytest

from fairbook.cli import main


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fairbook: error: ")
    return err[0]


def test_data_check_on_a_missing_folder(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    line = _one_error_line(capsys)
    assert "no Harvard-FairVLMed folder" in line and "fairbook data synth" in line


def test_data_check_on_an_empty_split(tmp_path, capsys):
    for split in ("Training", "Validation", "Test"):
        (tmp_path / split).mkdir()
    (tmp_path / "gpt-4_summarized_notes.csv").write_text("filename,note,gpt4_summary\n")
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "no .npz files in" in _one_error_line(capsys)


def test_data_check_names_a_corrupt_file(smoke_data, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(smoke_data, copy)
    victim = sorted((copy / "Validation").glob("*.npz"))[3]
    victim.write_bytes(b"not a zip file")
    assert main(["data", "check", str(copy)]) == 2
    assert victim.name in _one_error_line(capsys)


def test_data_check_prints_counts(smoke_data, capsys):
    from fairbook.data import load_metadata

    assert main(["data", "check", str(smoke_data)]) == 0
    out = capsys.readouterr().out
    n_train = len(load_metadata(smoke_data, "Training"))
    assert f"{n_train}" in out and "race" in out and "prevalence" in out.lower()


def test_run_rejects_an_unknown_parameter(capsys):
    assert main(["run", "notebooks/01-data-exploration.py", "--set", "data_rot=x"]) == 2
    line = _one_error_line(capsys)
    assert "unknown parameter 'data_rot'" in line and "data_root" in line


def test_synth_refuses_a_folder_with_another_config(smoke_data, capsys):
    assert main(["data", "synth", str(smoke_data), "--n-train", "7", "--n-val", "7", "--n-test", "7"]) == 2
    assert str(smoke_data) in _one_error_line(capsys)


def _predictions(path, n=300, seed=0, **changes):
    import pandas as pd

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    frame = pd.DataFrame({"y_true": y, "y_score": np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1),
                          "race": rng.choice(["Asian", "Black", "White"], n, p=[0.2, 0.3, 0.5]),
                          "gender": rng.integers(0, 2, n)})
    for column, values in changes.items():
        frame[column] = values
    frame.to_csv(path, index=False)
    return frame


def test_metrics_writes_the_documented_json(tmp_path, capsys):
    import json

    from sklearn.metrics import roc_auc_score

    test = _predictions(tmp_path / "test.csv")
    _predictions(tmp_path / "val.csv", seed=1)
    out = tmp_path / "report.json"
    assert main(["metrics", str(tmp_path / "test.csv"), "--attributes", "race,gender", "--val",
                 str(tmp_path / "val.csv"), "--n-boot", "200", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    race = report["attributes"]["race"]
    for key in ("auc", "es_auc", "dpd", "eod", "group_auc", "threshold", "ci"):
        assert key in race, key
    assert race["auc"] == pytest.approx(roc_auc_score(test["y_true"], test["y_score"]))
    white = test["race"] == "White"
    assert race["group_auc"]["White"] == pytest.approx(roc_auc_score(test["y_true"][white], test["y_score"][white]))
    lo, hi = race["ci"]["auc"]
    assert lo < race["auc"] < hi
    assert "validation" in report["threshold_note"]


@pytest.mark.parametrize("change,expected", [
    ({"y_score": None}, "y_score"),                       # a missing column
    ({"y_true": 2}, "binary"),                             # labels that are not 0/1
    ({"y_score": 1.5}, "[0, 1]"),                          # scores that are not probabilities
    ({"y_score": np.nan}, "NaN"),                          # NaN scores
])
def test_metrics_input_errors_are_one_line(tmp_path, capsys, change, expected):

    frame = _predictions(tmp_path / "test.csv")
    (column, value), = change.items()
    if value is None:
        frame = frame.drop(columns=[column])
    else:
        frame.loc[frame.index[:5], column] = value
    frame.to_csv(tmp_path / "test.csv", index=False)
    assert main(["metrics", str(tmp_path / "test.csv"), "--attributes", "race", "--n-boot", "0"]) == 2
    assert expected in _one_error_line(capsys)
