"""Tests of the SynthFairVLMed generator (fairbook.data.synthetic): layout, determinism, proportions, bias knobs."""
from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from fairbook.data import synthetic
from fairbook.data.attributes import ATTRIBUTES, FILTER_ATTRIBUTES, REQUIRED_NPZ_KEYS, SPLITS
from fairbook.data.synthetic import (
    SynthConfig,
    SynthConfigError,
    generate,
    load_manifest,
    load_truth,
    marker_mask,
    sample_records,
)

TINY = dict(n_train=60, n_val=20, n_test=40)
INT_KEYS = ("glaucoma", "race", "gender", "ethnicity", "language", "maritalstatus")


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_all(root) -> dict[str, dict[str, np.ndarray]]:
    """{split/filename: {key: array}} for every npz under root."""
    out = {}
    for split in SPLITS:
        for path in sorted((root / split).glob("*.npz")):
            with np.load(path) as d:
                out[f"{split}/{path.name}"] = {k: d[k] for k in d.files}
    return out


def mask_cdr(sample: dict) -> float:
    return sample["cup_mask"].any(axis=1).sum() / sample["disc_mask"].any(axis=1).sum()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    manifest = generate(root, SynthConfig(**TINY), workers=2, progress=False)
    return root, manifest, load_all(root)


@pytest.fixture(scope="module")
def records():
    """Metadata of a larger default dataset (no images): 6,000 training and 3,000 test samples."""
    return sample_records(SynthConfig(n_train=6000, n_val=10, n_test=3000))


@pytest.fixture(scope="module")
def records_none():
    return sample_records(SynthConfig.preset("none", n_train=6000, n_val=10, n_test=10))


def by(recs, **conditions) -> list[dict]:
    return [r for r in recs if all(r[k] == v for k, v in conditions.items())]


def rate(recs, key) -> float:
    return float(np.mean([r[key] for r in recs]))


def test_layout_and_dtypes(tiny):
    root, manifest, data = tiny
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(SPLITS)
    expected = {"Training": range(1, 61), "Validation": range(61, 81), "Test": range(81, 121)}
    for split, numbers in expected.items():
        assert sorted(p.name for p in (root / split).iterdir()) == [f"data_{i:05d}.npz" for i in numbers]
    assert manifest["counts"] == {"Training": 60, "Validation": 20, "Test": 40}
    assert load_manifest(root) == manifest and manifest["config"] == SynthConfig(**TINY).to_dict()
    for sample in data.values():
        assert set(sample) == set(REQUIRED_NPZ_KEYS) | {"disc_mask", "cup_mask"}
        assert sample["slo_fundus"].dtype == np.uint8 and sample["slo_fundus"].shape == (128, 166)
        for key in INT_KEYS + ("age", "md"):
            assert sample[key].shape == ()
        for key in ATTRIBUTES:
            assert int(sample[key]) in ATTRIBUTES[key]
        assert int(sample["glaucoma"]) in (0, 1) and 18 <= float(sample["age"]) <= 90
        assert sample["tds"].shape == (52,) and sample["tds"].dtype == np.float64
        assert float(sample["md"]) == pytest.approx(sample["tds"].mean(), abs=0.01)
        disc, cup = sample["disc_mask"], sample["cup_mask"]
        assert disc.dtype == np.uint8 and disc.shape == (128, 166) and set(np.unique(disc)) == {0, 1}
        assert np.all(cup <= disc) and 0 < cup.sum() < disc.sum()
    assert not [p for p in root.parent.iterdir() if ".tmp-" in p.name]


def test_csv_files_match_npz(tiny):
    root, _, data = tiny
    names = [k.split("/")[1] for k in data]
    notes = read_csv(root / "gpt-4_summarized_notes.csv")
    assert list(notes[0]) == ["filename", "note", "gpt4_summary"]
    assert [r["filename"] for r in notes] == names
    assert all(len(r["gpt4_summary"]) <= 180 and len(r["note"]) > len(r["gpt4_summary"]) // 2 for r in notes)
    assert len({r["note"] for r in notes}) == len(notes)
    summary = read_csv(root / "data_summary.csv")
    assert list(summary[0]) == ["filename", "age", "gender", "race", "ethnicity", "language", "maritalstatus",
                                "note", "gpt4_summary", "glaucoma", "use"]
    for row, (key, sample) in zip(summary, data.items()):
        split = key.split("/")[0]
        assert row["filename"] == key.split("/")[1] and row["use"] == split.lower()
        assert row["glaucoma"] == ("yes" if sample["glaucoma"] == 1 else "no")
        for attr in ATTRIBUTES:
            assert row[attr] == ATTRIBUTES[attr][int(sample[attr])].lower()
        assert float(row["age"]) == pytest.approx(float(sample["age"]))


def test_unknown_codes_in_every_split(tiny):
    _, _, data = tiny
    for split in SPLITS:
        samples = [s for k, s in data.items() if k.startswith(split + "/")]
        assert any(int(s[a]) == -1 for s in samples for a in FILTER_ATTRIBUTES), split


def test_same_seed_same_arrays_whatever_workers(tiny, tmp_path):
    root, manifest, data = tiny
    again = tmp_path / "again"
    assert generate(again, SynthConfig(**TINY), workers=1, progress=False) == manifest
    other = load_all(again)
    assert list(other) == list(data)
    for key, sample in data.items():
        for name, array in sample.items():
            assert other[key][name].dtype == array.dtype and other[key][name].tobytes() == array.tobytes()
    for name in ("gpt-4_summarized_notes.csv", "data_summary.csv", "synthetic_truth.csv"):
        assert (again / name).read_bytes() == (root / name).read_bytes()


def test_different_seed_differs(tiny, tmp_path):
    _, _, data = tiny
    generate(tmp_path / "s1", SynthConfig(**TINY, seed=1), workers=2, progress=False)
    other = load_all(tmp_path / "s1")
    same = [np.array_equal(other[k]["slo_fundus"], s["slo_fundus"]) for k, s in data.items()]
    assert not any(same)
    assert [int(s["race"]) for s in other.values()] != [int(s["race"]) for s in data.values()]


def test_published_proportions():
    recs = sample_records(SynthConfig(n_train=1400, n_val=200, n_test=400))
    published = {"race": {2: 0.769, 1: 0.149, 0: 0.082}, "gender": {0: 0.571, 1: 0.429},
                 "ethnicity": {0: 0.903, 1: 0.043, -1: 0.054}}
    for attr, shares in published.items():
        for code, share in shares.items():
            assert np.mean([r[attr] == code for r in recs]) == pytest.approx(share, abs=0.005), (attr, code)
    language = np.array([r["language"] for r in recs])
    assert np.mean(language == 0) > 0.85 and all(np.any(language == c) for c in (1, 2, -1))
    assert np.any(np.array([r["maritalstatus"] for r in recs]) == -1)
    ages = np.array([r["age"] for r in recs])
    assert ages.mean() == pytest.approx(60, abs=1.5) and ages.std() == pytest.approx(15, abs=1.5)
    assert np.mean([r["glaucoma"] for r in recs]) == pytest.approx(0.5, abs=0.04)


def test_prevalence_and_label_noise_follow_config(records):
    cfg = SynthConfig()
    train = by(records, split="Training")
    for race in range(3):
        group = by(train, race=race)
        se = math.sqrt(0.25 / len(group))
        assert rate(group, "true") == pytest.approx(cfg.prevalence[race], abs=4 * se)
        flips = np.mean([r["true"] != r["glaucoma"] for r in group])
        assert flips == pytest.approx(cfg.label_noise[race], abs=4 * math.sqrt(0.1 * 0.9 / len(group)) + 0.005)
    assert rate(by(train, race=1), "true") - rate(by(train, race=2), "true") > 0.08


def test_none_preset_makes_groups_exchangeable(records_none):
    cfg = SynthConfig.preset("none")
    for knob in ("prevalence", "disc_scale", "brightness", "contrast", "noise", "blur", "label_noise", "note_reveal"):
        assert len(set(getattr(cfg, knob))) == 1, knob
    for race in range(3):
        group = by(records_none, race=race)
        assert rate(group, "true") == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / len(group)))
    assert all(r["true"] == r["glaucoma"] and not r["marker"] for r in records_none)
    assert cfg.race_probs == SynthConfig().race_probs  # proportions stay at the published values


def test_acquisition_shift_darkens_one_group_only_with_bias(tiny, tmp_path):
    def race_gap(data):
        mean = {race: np.mean([s["slo_fundus"].mean() for s in data.values() if s["race"] == race]) for race in (1, 2)}
        return mean[2] - mean[1]

    none_root = tmp_path / "none"
    generate(none_root, SynthConfig.preset("none", **TINY), workers=2, progress=False)
    assert race_gap(tiny[2]) > 10  # White minus Black mean grey level, default preset
    assert abs(race_gap(load_all(none_root))) < 5


def test_artefact_correlates_with_label_in_training_only(records, tiny):
    strength = SynthConfig().artefact_strength
    for split, expected in (("Training", strength), ("Test", 0.0)):
        black = by(records, split=split, race=1)
        gap = rate(by(black, glaucoma=1), "marker") - rate(by(black, glaucoma=0), "marker")
        assert gap == pytest.approx(expected, abs=0.1), split
    assert not any(r["marker"] for r in records if r["race"] != 1)
    root, _, data = tiny
    truth = {r["filename"]: r["marker"] == "1" for r in read_csv(root / "synthetic_truth.csv")}
    left = (166 - 128) // 2 + 6
    for key, sample in data.items():
        drawn = bool(np.all(sample["slo_fundus"][5:9, left + 1 : left + 5] == 240))
        assert drawn == truth[key.split("/")[1]], key
    # the marker's mask is the drawn square: rows 4-9, columns left-1 .. left+4 (6 x 6)
    mask = marker_mask(128, 166)
    assert mask.sum() == 36 and mask[4:10, left:left + 6].all()
    marked = next(s["slo_fundus"] for k, s in data.items() if truth[k.split("/")[1]])
    assert (marked[mask == 1] != 240).sum() == 20  # the 20-pixel dark border, the 16 inner pixels bright
    assert load_truth(root).loc[sorted(truth)[0], "marker"] == int(truth[sorted(truth)[0]])
    with pytest.raises(ValueError, match="no synthetic_truth.csv"):
        load_truth(root / "Training")


def test_disease_signal_in_masks_and_visual_field(records, tiny):
    _, _, data = tiny
    truth = {r["filename"]: r for r in read_csv(tiny[0] / "synthetic_truth.csv")}
    measured = np.array([mask_cdr(s) for s in data.values()])
    drawn = np.array([float(truth[k.split("/")[1]]["cdr"]) for k in data])
    assert np.corrcoef(measured, drawn)[0, 1] > 0.95
    cfg = SynthConfig()
    cdr, true = np.array([r["cdr"] for r in records]), np.array([r["true"] for r in records])
    binormal = norm.cdf((cfg.cdr_glaucoma - cfg.cdr_healthy) / (cfg.cdr_sd * math.sqrt(2)))
    assert roc_auc_score(true, cdr) == pytest.approx(binormal, abs=0.02)
    assert 0.85 < binormal < 0.95
    assert np.corrcoef(cdr, [r["md"] for r in records])[0, 1] < -0.5


def test_notes_reveal_diagnosis_at_configured_rates(records):
    cfg = SynthConfig()
    english, others = by(records, language=0), [r for r in records if r["language"] in (1, 2)]
    assert rate(english, "reveal") == pytest.approx(cfg.note_reveal[0], abs=0.03)
    assert rate(others, "reveal") == pytest.approx(cfg.note_reveal[1], abs=0.08)
    revealed = [r for r in records if r["reveal"]]
    assert all(("glaucoma" in r["summary"].lower() or "poag" in r["summary"].lower()) for r in revealed)
    hidden = [r for r in records if not r["reveal"]]
    assert not any("Assessment:" in r["note"] or "Meds:" in r["note"] for r in hidden)


def test_rerun_is_idempotent_and_other_config_is_refused(tiny, tmp_path):
    root, manifest, _ = tiny
    stamp = os.stat(root / "synthetic.json").st_mtime_ns
    assert generate(root, SynthConfig(**TINY), progress=False) == manifest
    assert os.stat(root / "synthetic.json").st_mtime_ns == stamp
    with pytest.raises(SynthConfigError, match="delete it or choose another folder"):
        generate(root, SynthConfig(**TINY, seed=1), progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(SynthConfigError, match="delete it or choose another folder"):
        generate(foreign, SynthConfig(**TINY), progress=False)


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_tables", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(tmp_path / "out", SynthConfig(n_train=3, n_val=2, n_test=2), workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_config_validation_and_presets():
    with pytest.raises(SynthConfigError, match="race_probs"):
        SynthConfig(race_probs=(0.5, 0.5, 0.5))
    with pytest.raises(SynthConfigError, match="unknown preset"):
        SynthConfig.preset("strong")
    with pytest.raises(SynthConfigError, match="unknown SynthConfig field"):
        SynthConfig.preset("none", n_training=5)
    cfg = SynthConfig.preset("none", n_train=10, seed=3)
    assert cfg.name == "none" and cfg.n_train == 10 and cfg.artefact_race is None
    assert SynthConfig.from_dict(cfg.to_dict()) == cfg
    assert SynthConfig() == SynthConfig.preset("default")


def test_the_next_generation_removes_what_killed_ones_left(tmp_path):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    killed = tmp_path / f".out.tmp-{child.pid}"
    (killed / "Training").mkdir(parents=True)
    (killed / "Training" / "data_00001.npz").write_bytes(b"half written")
    live = tmp_path / ".out.tmp-1"  # a generation still running in process 1 is left alone
    live.mkdir()
    generate(tmp_path / "out", SynthConfig(n_train=3, n_val=2, n_test=2), workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-1", "out"]


# ------------------------------------------------------------------------------------------- pretraining corpus
def test_pretrain_val_size_is_a_quarter_clipped_to_64_500():
    assert [synthetic.pretrain_val_size(n) for n in (8, 96, 256, 400, 2000, 5000)] == [64, 64, 64, 100, 500, 500]


def test_pretrain_corpus_writes_its_own_folder_once_and_reuses_it(tmp_path):
    import json

    folder = synthetic.pretrain_corpus(7, 8, root=tmp_path, workers=1)
    assert folder == tmp_path / "synth-pretrain-7-8"
    manifest = json.loads((folder / "synthetic.json").read_text())
    config = manifest["config"]
    assert (config["seed"], config["name"], config["n_train"], config["n_val"], config["n_test"]) == (
        7, "default", 8, 64, synthetic.PRETRAIN_TEST_SIZE)
    assert manifest["counts"] == {"Training": 8, "Validation": 64, "Test": synthetic.PRETRAIN_TEST_SIZE}
    stamp = (folder / "synthetic.json").stat().st_mtime_ns
    assert synthetic.pretrain_corpus(7, 8, root=tmp_path, workers=1) == folder              # reused, not rewritten
    assert (folder / "synthetic.json").stat().st_mtime_ns == stamp
    other = synthetic.pretrain_corpus(8, 8, root=tmp_path, workers=1)                       # another seed: new folder
    assert other.name == "synth-pretrain-8-8"
    with np.load(folder / "Training" / "data_00001.npz") as a, np.load(other / "Training" / "data_00001.npz") as b:
        assert not np.array_equal(a["slo_fundus"], b["slo_fundus"])                    # independent draws


def test_note_reveal_shares_count_the_truth_files_flags_per_language(tiny, tmp_path):
    from fairbook.data.fairvlmed import load_metadata
    from fairbook.data.synthetic import note_reveal_shares

    tiny = tiny[0]
    with open(tiny / "synthetic_truth.csv") as f:
        reveals = {row["filename"]: int(row["note_reveals_diagnosis"]) for row in csv.DictReader(f)}
    kept = load_metadata(tiny, "Test")                       # what the evaluation keeps (official drop)
    table = note_reveal_shares(tiny)
    for language, rows in kept.groupby("language_name"):
        flags = [reveals[name] for name in rows["filename"]]
        assert table.loc[language, "n"] == len(flags)
        assert table.loc[language, "share of notes stating the diagnosis"] == pytest.approx(np.mean(flags))
    assert note_reveal_shares(tmp_path) is None              # no ground truth: real data
