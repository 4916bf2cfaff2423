"""fairbook.plots: figure helpers draw the data they are given."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fairbook import plots  # noqa: E402

HISTORY = [{"epoch": 1, "train_loss": 3.5, "reg_loss": 0.0, "val_auc": 0.61, "seconds": 1.0},
           {"epoch": 2, "train_loss": 3.2, "reg_loss": 0.0, "val_auc": 0.74, "seconds": 1.0},
           {"epoch": 3, "train_loss": 3.0, "reg_loss": 0.0, "val_auc": 0.70, "seconds": 1.0}]


def test_training_curve_draws_loss_and_validation_auc_per_epoch():
    fig = plots.training_curve(HISTORY, best_epoch=2)
    loss_ax, auc_ax = fig.axes
    assert np.array_equal(loss_ax.lines[0].get_xydata(), [[1, 3.5], [2, 3.2], [3, 3.0]])
    assert np.array_equal(auc_ax.lines[0].get_xydata(), [[1, 0.61], [2, 0.74], [3, 0.70]])
    assert (loss_ax.get_ylabel(), auc_ax.get_ylabel(), auc_ax.get_xlabel()) == (
        "training loss", "validation auc", "epoch")
    for ax in (loss_ax, auc_ax):                                   # the chosen epoch is marked on both panels
        assert [list(line.get_xdata()) for line in ax.lines[1:]] == [[2, 2]]
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)


def test_training_curve_without_a_chosen_epoch_has_no_marker():
    fig = plots.training_curve(HISTORY[:1])
    assert [len(ax.lines) for ax in fig.axes] == [1, 1]
    plt.close(fig)


def test_differences_draws_one_interval_per_row_around_zero():
    import pandas as pd

    frame = pd.DataFrame({"pair": ["a − b", "a − c", "b − c"], "d": [0.1, -0.2, 0.0], "lo": [0.05, -0.3, -0.1],
                          "hi": [0.2, -0.1, 0.1], "attribute": ["race", "race", "gender"]})
    fig = plots.differences(frame, "d", "lo", "hi", label="pair", by="attribute", xlabel="AUC difference")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["gender: b − c", "race: a − c", "race: a − b"]
    markers = [line for line in ax.lines if line.get_marker() == "o"]  # the points
    xy = sorted((float(m.get_ydata()[0]), float(m.get_xdata()[0])) for m in markers)
    assert xy == [(0.0, 0.0), (1.0, -0.2), (2.0, 0.1)]  # rows drawn top to bottom in frame order
    segments = sorted((tuple(map(tuple, seg)) for c in ax.collections for seg in c.get_segments()),
                      key=lambda seg: seg[0][1])  # by row
    assert segments == [((-0.1, 0.0), (0.1, 0.0)), ((-0.3, 1.0), (-0.1, 1.0)), ((0.05, 2.0), (0.2, 2.0))]
    assert [list(line.get_xdata()) for line in ax.lines if line.get_linestyle() == "--"] == [[0, 0]]
    plt.close(fig)


def test_validation_curve_marks_the_chosen_setting():
    import pandas as pd

    table = pd.DataFrame({"method": ["a", "b", "c"], "val_auc": [0.80, 0.79, 0.70],
                          "val_es_auc": [0.70, 0.74, 0.75], "eligible": [True, True, False],
                          "chosen": [False, True, False]})
    fig = plots.validation_curve(table, [1, 10, 100], "lambda")
    left, right = fig.axes
    assert left.get_xscale() == "log" and right.get_ylabel() == "validation ES-AUC"
    assert [line.get_xdata()[0] for line in left.lines if line.get_linestyle() == "--"] == [10]
    plt.close(fig)


def test_say_wraps_printed_summaries_at_the_book_column_and_keeps_line_breaks(capsys):
    plots.say("zero-shot test AUC 0.481 [0.396, 0.581] with the fairmedfm prompts;",
              {"worst race group": "Black", "race AUC gap": 0.14}, "\nsecond paragraph")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["zero-shot test AUC 0.481 [0.396, 0.581] with the fairmedfm prompts;",
                     "  {'worst race group': 'Black', 'race AUC gap': 0.14}",
                     "second paragraph"]
    plots.say("word " * 40, "x" * 100)
    wrapped = capsys.readouterr().out.splitlines()
    assert max(map(len, wrapped)) == plots.CODE_COLUMN  # a token longer than the column is cut, not left to spill
    assert all(line.startswith("  ") for line in wrapped[1:])
    assert "".join(line.strip() for line in wrapped[-3:]).endswith("x" * 100)


def test_tradeoff_draws_each_point_with_its_interval_and_clips_an_interval_that_misses_its_point():
    import pandas as pd

    from fairbook import plots

    frame = pd.DataFrame({"method": ["LP", "LoRA"], "x": [2.0, 1.0], "x_lo": [2.5, 0.5], "x_hi": [3.0, 1.5],
                          "y": [80.0, 82.0]})
    fig = plots.tradeoff(frame, "x", "y", label="method", diagonal=True)
    ax = fig.axes[0]
    bars = [c for c in ax.containers]
    assert len(bars) == 2  # one errorbar per row
    segments = bars[0].lines[2][0].get_segments()[0]  # LP's x bar: from its point (the lower end misses it) to 3.0
    assert segments[0][0] == pytest.approx(2.0) and segments[1][0] == pytest.approx(3.0)
    assert len(ax.lines) >= 3  # two markers and the diagonal
