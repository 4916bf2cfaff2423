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
