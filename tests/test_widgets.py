"""Interactive views: live widgets in JupyterLab, a static first state under `fairbook run`."""
import numpy as np
import pandas as pd
import pytest

from fairbook import widgets
from fairbook.runs import RUN_DIR_ENV


@pytest.fixture
def meta(tmp_path):
    rows = []
    for i, (race, label) in enumerate([("White", 0), ("Black", 1), ("White", 1)]):
        path = tmp_path / f"data_{i:05d}.npz"
        np.savez(path, slo_fundus=np.full((8, 10), 40 * i, np.uint8))
        rows.append({"filename": path.name, "path": str(path), "glaucoma": label, "race_name": race,
                     "gender_name": "Female", "note": f"note {i}"})
    return pd.DataFrame(rows)


def test_filter_samples(meta):
    assert list(widgets.filter_samples(meta, "race", "White", "1")["note"]) == ["note 2"]
    assert len(widgets.filter_samples(meta, "race")) == 3
    assert list(widgets.filter_samples(meta, "race", label="0")["note"]) == ["note 0"]


def test_live_notebook_gets_widgets(meta, monkeypatch):
    import ipywidgets

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert not widgets.interactive()                  # papermill used directly: headless, no widgets
    monkeypatch.setenv("JPY_SESSION_NAME", "notebooks/01-data-exploration.py")   # what Jupyter Server sets
    assert widgets.interactive()
    browser = widgets.sample_browser(meta, ("race", "gender"))
    assert isinstance(browser, ipywidgets.VBox)
    explorer = widgets.threshold_explorer([0, 1, 0, 1], [0.2, 0.8, 0.6, 0.4], ["a", "a", "b", "b"], [0.3, 0.5, 0.7])
    assert explorer.children[0].value == 0.5


def test_batch_run_draws_the_first_state_without_widgets(meta, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    assert not widgets.interactive()
    assert widgets.sample_browser(meta, ("race",)) is None
    assert "data_00000.npz · glaucoma=0 · race=White" in capsys.readouterr().out
    assert widgets.threshold_explorer([0, 1, 0, 1], [0.2, 0.8, 0.6, 0.4], ["a", "a", "b", "b"], [0.3, 0.5, 0.7]) is None
    # at 0.5: a -> yhat (0, 1): selection 1/2; b -> yhat (1, 0): selection 1/2; TPR a 1, b 0 -> EOD 1
    assert "threshold 0.50: DPD = 0.000, EOD (worst case) = 1.000" in capsys.readouterr().out
