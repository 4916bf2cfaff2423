"""The Harvard-FairSeg loader on fixtures written here by hand (not by the generator), in both key sets the release
is described with, and the synthetic data written in that layout."""
from __future__ import annotations

import numpy as np
import pytest

from fairbook.data import DataError
from fairbook.data.fairseg import FairSeg, check_fairseg, load_cases, read_case, write_fairseg
from fairbook.data.synthetic import SynthConfig, generate


def case(key_set: str, race: int, age: float, rim_code: int, cup_code: int, **changes) -> dict:
    image = np.tile(np.arange(12, dtype=np.uint8) * 20, (10, 1))
    mask = np.zeros((10, 12), np.int64)
    mask[2:8, 3:9] = rim_code
    mask[4:6, 5:7] = cup_code
    keys = {"readme": ("slo_fundus", "disc_cup_mask", "ethnicity"), "released": ("fundus_slo", "disc_cup", "hispanic")}
    image_key, mask_key, ethnicity_key = keys[key_set]
    data = {image_key: image, mask_key: mask, "race": race, "gender": 1, ethnicity_key: 0, "language": 2,
            "maritalstatus": -1, "age": age, "pid": "p1"}
    data.update(changes)
    return data


def write(folder, name, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, **{k: np.asarray(v) for k, v in data.items()})


def test_both_key_sets_read_to_the_same_case(tmp_path):
    write(tmp_path, "a.npz", case("readme", race=1, age=70.0, rim_code=1, cup_code=2))
    write(tmp_path, "b.npz", case("released", race=3, age=70.0 * 365.25, rim_code=-1, cup_code=-2))
    a, b = read_case(tmp_path / "a.npz"), read_case(tmp_path / "b.npz")
    assert (a["key_set"], b["key_set"]) == ("readme", "released")
    for key in ("race", "gender", "ethnicity", "language", "maritalstatus"):
        assert a[key] == b[key]
    assert a["race"] == 1 and a["language"] == 2 and a["maritalstatus"] == -1     # Black, Other, Unknown
    assert a["age"] == pytest.approx(70.0) and b["age"] == pytest.approx(70.0)    # days read as years
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert a["mask"].sum() == 1 * (36 - 4) + 2 * 4                                 # 32 rim pixels, 4 cup pixels


@pytest.mark.parametrize("change, message", [
    (dict(disc_cup=np.array([[0, 3], [0, 0]])), "coded {0, -1, -2} or {0, 1, 2}"),
    (dict(disc_cup=np.array([[0, -1], [1, 0]])), "coded {0, -1, -2} or {0, 1, 2}"),
    (dict(race=0), "race=0 is not a code of race"),
    (dict(gender=5), "gender=5 is not a code of gender"),
])
def test_bad_codes_are_one_line_errors_naming_file_key_and_fix(tmp_path, change, message):
    data = case("released", race=7, age=60.0, rim_code=-1, cup_code=-2)
    data.update(change)
    if "disc_cup" in change:
        data["fundus_slo"] = np.zeros(change["disc_cup"].shape)
    write(tmp_path, "bad.npz", data)
    with pytest.raises(DataError, match=message) as err:
        read_case(tmp_path / "bad.npz")
    assert "bad.npz" in str(err.value) and "\n" not in str(err.value)


def test_missing_image_key_names_both_key_sets(tmp_path):
    write(tmp_path, "x.npz", {"image": np.zeros((4, 4)), "mask": np.zeros((4, 4))})
    with pytest.raises(DataError, match="slo_fundus \\+ disc_cup_mask .* fundus_slo \\+ disc_cup"):
        read_case(tmp_path / "x.npz")


def test_split_lists_with_validation_carved_from_training(tmp_path):
    names = [f"data_{i:05d}.npz" for i in range(1, 13)]
    for i, name in enumerate(names):
        write(tmp_path, name, case("released", race=(2, 3, 7)[i % 3], age=50.0 * 365, rim_code=-1, cup_code=-2))
    (tmp_path / "train.txt").write_text("\n".join(names[:10]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(names[10:]) + "\n")
    train, val, test = (load_cases(tmp_path, s, val_fraction=0.2, seed=1) for s in ("Training", "Validation", "Test"))
    assert (len(train), len(val), len(test)) == (8, 2, 2)
    assert not set(train["filename"]) & set(val["filename"]) and set(test["filename"]) == set(names[10:])
    assert list(load_cases(tmp_path, "Validation", val_fraction=0.2, seed=1)["filename"]) == list(val["filename"])
    assert sorted(set(train["race_name"]) | set(val["race_name"])) == ["Asian", "Black", "White"]
    (tmp_path / "test.txt").write_text("data_99999.npz\n")
    with pytest.raises(DataError, match="lists data_99999.npz, which is not in"):
        load_cases(tmp_path, "Test")


def test_no_layout_is_an_error_with_the_fix(tmp_path):
    with pytest.raises(DataError, match="neither split lists .* nor split folders"):
        load_cases(tmp_path, "Training")


def test_synthetic_data_in_both_layouts_agree_with_the_source(tmp_path):
    source = tmp_path / "synth"
    generate(source, SynthConfig.preset("default", n_train=12, n_val=4, n_test=6), progress=False)
    readme, released = write_fairseg(source, tmp_path / "a", "readme"), write_fairseg(source, tmp_path / "b")
    report = check_fairseg(released)
    assert report["key_sets"] == ["released"] and sum(report["splits"].values()) == 22
    a, b = FairSeg(readme, "Test", size=32), FairSeg(released, "Test", size=32)
    with np.load(source / "Test" / a.metadata["filename"].iloc[0]) as npz:
        disc, cup = npz["disc_mask"] > 0, npz["cup_mask"] > 0
        race = int(npz["race"])
    mask = a.original_mask(0)
    np.testing.assert_array_equal(mask > 0, disc)
    np.testing.assert_array_equal(mask == 2, cup)
    np.testing.assert_array_equal(b.original_mask(0), mask)
    assert int(a[0]["attributes"][0]) == int(b[0]["attributes"][0]) == race
    assert a[0]["image"].shape == (3, 32, 32) and a[0]["mask"].shape == (32, 32)
