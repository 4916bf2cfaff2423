"""Harvard-FairVLMed loader and data check on a hand-made official-layout folder (no synthetic generator)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

from fairbook.data import fairvlmed as fv
from fairbook.data.fairvlmed import DataError

# name, glaucoma, race, gender, ethnicity, language, maritalstatus (-1 = unknown)
ROWS = {
    "Training": [
        ("data_00001.npz", 1, 0, 0, 0, 0, 0),
        ("data_00002.npz", 0, 1, 1, 1, 1, 1),
        ("data_00003.npz", 1, 2, 0, -1, 0, -1),  # unknown ethnicity: kept in training
        ("data_00004.npz", 0, 2, 1, 0, -1, 2),  # unknown language: kept in training
        ("data_00005.npz", 1, 1, 0, 0, 2, 3),
    ],
    "Validation": [
        ("data_00006.npz", 1, 0, 1, 0, 0, 4),
        ("data_00007.npz", 0, 2, 0, -1, 0, 0),  # dropped officially
        ("data_00008.npz", 1, 1, 0, 0, 0, 1),
    ],
    "Testing": [
        ("data_00009.npz", 0, 2, 0, 0, 0, 0),
        ("data_00010.npz", 1, -1, 1, 0, 0, 1),  # unknown race: dropped officially
        ("data_00011.npz", 1, 1, 1, 1, 0, 2),
        ("data_00012.npz", 0, 0, 0, 0, -1, 3),  # unknown language: dropped officially
    ],
}
LONG_NOTE = " ".join(["glaucoma suspect with cupping"] * 10)  # 299 characters
NOTES = {"data_00001.npz": LONG_NOTE, "data_00002.npz": "  normal optic nerve  ",
         "data_00012.npz": ""}  # data_00012 has a row with an empty summary


def write_npz(path: Path, glaucoma, race, gender, ethnicity, language, marital, index, drop=()):
    arrays = {
        "slo_fundus": np.full((8, 6), 10 * index, dtype=np.uint8),
        "glaucoma": np.array(glaucoma), "race": np.array(race), "gender": np.array(gender),
        "ethnicity": np.array(ethnicity), "language": np.array(language), "maritalstatus": np.array(marital),
        "age": np.array(50.0 + index), "md": np.array(-0.5 * index), "tds": np.zeros(52, np.float32),
    }
    save = np.savez_compressed if index == 5 else np.savez  # the loader must read both
    save(path, **{k: v for k, v in arrays.items() if k not in drop})


def write_dataset(root: Path, notes_name: str = "gpt-4_summarized_notes.csv",
                  header: str = "filename,note,gpt4_summary") -> Path:
    index = 0
    for split, rows in ROWS.items():
        (root / split).mkdir(parents=True)
        for name, *values in rows:
            index += 1
            write_npz(root / split / name, *values, index=index)
    lines = [header] if header else []
    for name, summary in NOTES.items():
        lines.append(f'{name},"original note","{summary}"')
    for split in ROWS.values():
        lines += [f"{name},orig,summary of {name[:-4]}" for name, *_ in split if name not in NOTES]
    (root / notes_name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "fairvlmed")


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------- folders, notes
def test_split_dir_accepts_aliases_and_testing_folder(root):
    assert fv.split_dir(root, "Test") == root / "Testing"
    assert fv.split_dir(root, "test") == root / "Testing"
    assert fv.split_dir(root, "val") == root / "Validation"
    assert fv.split_dir(str(root), "train") == root / "Training"
    (root / "Test").mkdir()
    assert fv.split_dir(root, "test") == root / "Test"  # the release name wins when both exist
    assert "Training, Validation, Test" in one_line_error(fv.split_dir, root, "holdout")


def test_read_notes_by_header_strips_values(root):
    notes = fv.read_notes(root)
    assert len(notes) == 12
    assert notes["data_00002.npz"] == "normal optic nerve"
    assert notes["data_00005.npz"] == "summary of data_00005"
    assert notes["data_00012.npz"] == ""


@pytest.mark.parametrize("header", ["File Name,Original Note,Summarized Note", "a,b,c", ""])
def test_read_notes_upstream_name_by_header_position_or_headerless(tmp_path, header):
    root = write_dataset(tmp_path / "d", notes_name="gpt4_summarized_notes.csv", header=header)
    assert fv.notes_file(root).name == "gpt4_summarized_notes.csv"
    notes = fv.read_notes(root)
    assert len(notes) == 12
    assert notes["data_00001.npz"] == LONG_NOTE


def test_read_notes_finds_columns_by_name_in_any_order(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "gpt-4_summarized_notes.csv").write_text("gpt4_summary,use,filename\nsome text,train,data_1.npz\n")
    assert fv.read_notes(root) == {"data_1.npz": "some text"}


def test_truncate_note_cuts_at_last_space_like_upstream():
    assert fv.truncate_note("short note") == "short note"
    assert fv.truncate_note("aaa bbb ccc", 9) == "aaa bbb"
    assert fv.truncate_note("aaa bbb ccc", 7) == "aaa"  # the space after "bbb" lies outside the first 7 characters
    assert fv.truncate_note("aaa bbb ccc", 11) == "aaa bbb ccc"
    assert fv.truncate_note("  aaa bbb  ", 7) == "aaa bbb"
    assert fv.truncate_note("abcdefghij", 4) == "abcd"
    cut = fv.truncate_note(LONG_NOTE)
    assert len(cut) == 179 and cut == LONG_NOTE[:179] and LONG_NOTE[179] == " "


# --------------------------------------------------------------------------------------------------------- metadata
def test_load_metadata_official_drop_and_switch(root):
    sizes = {split: {d: len(fv.load_metadata(root, split, d)) for d in (None, True, False)} for split in fv.SPLITS}
    assert sizes == {
        "Training": {None: 5, True: 3, False: 5},
        "Validation": {None: 2, True: 2, False: 3},
        "Test": {None: 2, True: 2, False: 4},
    }
    assert fv.load_metadata(root, "test")["filename"].tolist() == ["data_00009.npz", "data_00011.npz"]
    assert fv.load_metadata(root, "train", drop_unknown=True)["filename"].tolist() == [
        "data_00001.npz", "data_00002.npz", "data_00005.npz"]


def test_load_metadata_columns_values_and_names(root):
    meta = fv.load_metadata(root, "Training")
    assert meta.columns.tolist() == [
        "filename", "path", "split", "glaucoma", "race", "gender", "ethnicity", "language", "maritalstatus",
        "age", "md",
        "race_name", "gender_name", "ethnicity_name", "language_name", "maritalstatus_name", "note",
    ]
    row = meta.iloc[1]
    assert (row["glaucoma"], row["race"], row["gender"], row["ethnicity"], row["language"]) == (0, 1, 1, 1, 1)
    assert (row["race_name"], row["gender_name"], row["ethnicity_name"], row["language_name"],
            row["maritalstatus_name"]) == ("Black", "Male", "Hispanic", "Spanish", "Single")
    assert row["age"] == 52.0 and row["md"] == -1.0 and row["split"] == "Training"
    assert row["path"] == str(root / "Training" / "data_00002.npz")
    assert meta["ethnicity_name"].tolist() == ["Non-Hispanic", "Hispanic", "Unknown", "Non-Hispanic", "Non-Hispanic"]
    assert meta["maritalstatus_name"].tolist()[2] == "Unknown"
    compressed = meta.iloc[4]  # written with np.savez_compressed
    assert (compressed["language_name"], compressed["age"], compressed["md"]) == ("Other", 55.0, -2.5)
    assert meta["race"].dtype == np.int64 and meta["age"].dtype == np.float64
    test = fv.load_metadata(root, "Test", drop_unknown=False)
    assert test["race_name"].tolist() == ["White", "Unknown", "Black", "Asian"]
    assert test["note"].tolist() == ["summary of data_00009", "summary of data_00010", "summary of data_00011", ""]


def test_load_metadata_reflects_changed_files(root):
    assert len(fv.load_metadata(root, "val", drop_unknown=False)) == 3
    write_npz(root / "Validation" / "data_00013.npz", 1, 2, 1, 0, 0, 0, index=13)
    meta = fv.load_metadata(root, "val", drop_unknown=False, notes=False)  # the new file has no notes row yet
    assert len(meta) == 4 and meta["glaucoma"].sum() == 3 and set(meta["note"]) == {""}


# ---------------------------------------------------------------------------------------------------------- dataset
def count_tokenizer(text):
    """Stand-in for open_clip's tokenizer: a (1, 2) tensor of character and word counts."""
    return torch.tensor([[len(text), len(text.split())]])


def test_dataset_items_without_preprocess(root):
    data = fv.FairVLMed(root, "train")
    assert len(data) == 5 and data.attribute_names == ("race", "gender", "ethnicity", "language", "age")
    item = data[2]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 8, 6)
    assert torch.equal(item["image"], torch.full((1, 8, 6), 30.0))
    assert item["label"].dtype == torch.int64 and item["label"].item() == 1
    assert item["attributes"].tolist() == [2, 0, -1, 0, 53] and item["attributes"].dtype == torch.int64
    assert item["index"] == 2 and item["text"] == "summary of data_00003"
    assert data[0]["text"] == LONG_NOTE[:179]
    assert fv.FairVLMed(root, "train", max_note_chars=40)[0]["text"] == "glaucoma suspect with cupping glaucoma"
    assert data.groups("race").tolist() == [0, 1, 2, 2, 1]
    assert data.groups("maritalstatus").tolist() == [0, 1, -1, 2, 3]


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloader_batches_with_preprocess_and_tokenizer(root, workers):
    preprocess = transforms.Compose([transforms.Resize((4, 4)), transforms.ToTensor()])
    data = fv.FairVLMed(root, "val", preprocess=preprocess, tokenizer=count_tokenizer)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2, num_workers=workers)))
    assert batch["image"].shape == (2, 1, 4, 4) and batch["image"].dtype == torch.float32
    assert torch.allclose(batch["image"][:, 0].mean((1, 2)), torch.tensor([60.0, 80.0]))  # files 6 and 8
    assert batch["label"].tolist() == [1, 1]
    assert batch["attributes"].tolist() == [[0, 1, 0, 0, 56], [1, 0, 0, 0, 58]]  # the age last, in years
    assert batch["text"].tolist() == [[21, 3], [21, 3]]
    assert batch["index"].tolist() == [0, 1]


def test_kept_items_are_read_once_and_equal_fresh_reads(root, monkeypatch):
    preprocess = transforms.Compose([transforms.Resize((4, 4)), transforms.ToTensor()])
    kept = fv.FairVLMed(root, "val", preprocess, count_tokenizer, keep_items=True)
    fresh = fv.FairVLMed(root, "val", preprocess, count_tokenizer)
    first = [kept[i] for i in range(len(kept))]
    for i, item in enumerate(first):
        again = fresh[i]
        assert torch.equal(item["image"], again["image"]) and torch.equal(item["text"], again["text"])
    monkeypatch.setattr(fv, "load_image", lambda path: pytest.fail(f"{path} was read a second time"))
    assert all(kept[i] is item for i, item in enumerate(first))
    part = kept.subset(1, seed=0)  # a subset numbers its items anew, so nothing kept carries over
    with pytest.raises(pytest.fail.Exception, match="read a second time"):
        part[0]
    random = transforms.Compose([transforms.RandomResizedCrop(4), transforms.ToTensor()])
    message = one_line_error(fv.FairVLMed, root, "val", random, keep_items=True)
    assert message.startswith("keep_items=True would freeze the random RandomResizedCrop of this preprocess")


def test_dataset_keeps_text_strings_in_batches(root):
    batch = next(iter(torch.utils.data.DataLoader(fv.FairVLMed(root, "test", drop_unknown=False), batch_size=4)))
    assert batch["text"] == ["summary of data_00009", "summary of data_00010", "summary of data_00011", ""]
    assert batch["image"].shape == (4, 1, 8, 6)


# ------------------------------------------------------------------------------------------------------- data check
def test_check_report_numbers(root):
    report = fv.check(root)
    assert report["notes_file"] == "gpt-4_summarized_notes.csv"
    assert report["source"] == f"Harvard-FairVLMed (real data at {root})"
    assert report["splits"] == {
        "Training": {"folder": "Training", "samples": 5, "with_unknown": 2, "official_drop": 0, "official_kept": 5,
                     "with_note": 5},
        "Validation": {"folder": "Validation", "samples": 3, "with_unknown": 1, "official_drop": 1,
                       "official_kept": 2, "with_note": 3},
        "Test": {"folder": "Testing", "samples": 4, "with_unknown": 2, "official_drop": 2, "official_kept": 2,
                 "with_note": 3},
    }
    race = report["attributes"]["race"]
    assert list(race) == ["Asian", "Black", "White", "Unknown"]
    assert {g: race[g]["all"]["n"] for g in race} == {"Asian": 3, "Black": 4, "White": 4, "Unknown": 1}
    assert race["Asian"]["all"]["prevalence"] == pytest.approx(2 / 3)
    assert race["Black"]["all"]["prevalence"] == pytest.approx(3 / 4)
    assert race["White"]["all"]["prevalence"] == pytest.approx(1 / 4)
    assert race["Unknown"]["all"]["prevalence"] == 1.0
    assert race["Unknown"]["Training"] == {"n": 0, "prevalence": None}
    assert race["Black"]["Training"] == {"n": 2, "prevalence": 0.5}
    gender = report["attributes"]["gender"]
    assert (gender["Female"]["all"]["n"], gender["Male"]["all"]["n"]) == (7, 5)
    assert gender["Female"]["all"]["prevalence"] == pytest.approx(4 / 7)
    assert gender["Male"]["all"]["prevalence"] == pytest.approx(3 / 5)
    ethnicity = report["attributes"]["ethnicity"]
    assert {g: (v["all"]["n"], v["all"]["prevalence"]) for g, v in ethnicity.items()} == {
        "Non-Hispanic": (8, 5 / 8), "Hispanic": (2, 0.5), "Unknown": (2, 0.5)}
    assert list(report["attributes"]["language"]) == ["English", "Spanish", "Other", "Unknown"]
    json.dumps(report)  # plain data


def test_format_check_shows_the_numbers(root):
    text = fv.format_check(fv.check(root))
    lines = text.splitlines()
    assert lines[0] == f"Harvard-FairVLMed (real data at {root})"
    assert lines[1] == "notes: gpt-4_summarized_notes.csv, a summary for 11 of 12 samples"
    assert lines[5].split() == ["Validation", "Validation", "3", "1", "1", "2"]
    assert lines[6].split() == ["Test", "Testing", "4", "2", "2", "2"]
    asian = next(line for line in lines if line.strip().startswith("Asian"))
    assert asian.split() == ["Asian", "1", "(100.0%)", "1", "(100.0%)", "1", "(0.0%)", "3", "(66.7%)"]
    unknown_race = lines[lines.index(next(line for line in lines if line.startswith("race"))) + 4]
    assert unknown_race.split() == ["Unknown", "0", "(-)", "0", "(-)", "1", "(100.0%)", "1", "(100.0%)"]


def test_describe_synthetic_manifest(root):
    counts = {"Training": 7000, "Validation": 1000, "Test": 2000}
    manifest = {"config": {"seed": 0, "bias": "default"}, "counts": counts}
    (root / "synthetic.json").write_text(json.dumps(manifest))
    assert fv.describe(root) == "SynthFairVLMed (synthetic; seed 0, bias default; 10,000 samples)"
    (root / "synthetic.json").write_text(json.dumps({"config": {"name": "none", "seed": 2}, "counts": counts}))
    assert fv.describe(root) == "SynthFairVLMed (synthetic; seed 2, bias none; 10,000 samples)"
    (root / "synthetic.json").write_text("{not json")
    assert fv.describe(root) == "SynthFairVLMed (synthetic)"
    (root / "synthetic.json").write_text(json.dumps({"seed": 3, "counts": 12}))
    assert fv.describe(root) == "SynthFairVLMed (synthetic; seed 3; 12 samples)"


# ------------------------------------------------------------------------------------------------- broken inputs
def test_missing_folder(tmp_path):
    message = one_line_error(fv.check, tmp_path / "nowhere")
    assert message.startswith(f"no Harvard-FairVLMed folder at {tmp_path / 'nowhere'}")
    assert f"fairbook data synth {tmp_path / 'nowhere'}" in message
    one_line_error(fv.FairVLMed, tmp_path / "nowhere", "train")


def test_missing_split_folder(root):
    (root / "Validation").rename(root / "val-old")
    message = one_line_error(fv.check, root)
    assert "no Validation split" in message and "Validation/" in message


def test_split_without_npz(root):
    for path in (root / "Testing").iterdir():
        path.unlink()
    (root / "Testing" / "readme.txt").write_text("x")
    message = one_line_error(fv.load_metadata, root, "test")
    assert message.startswith(f"no .npz files in {root / 'Testing'}")
    one_line_error(fv.check, root)


def test_npz_missing_required_key(root):
    bad = root / "Validation" / "data_00007.npz"
    write_npz(bad, 0, 2, 0, 0, 0, 0, index=7, drop=("tds", "language"))
    message = one_line_error(fv.check, root)
    assert message.startswith(f"{bad} lacks required key(s) language, tds")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_npz_names_the_file(root, damage):
    bad = root / "Training" / "data_00004.npz"
    bad.write_bytes(b"not an npz at all" if damage == "garbage" else bad.read_bytes()[:200])
    message = one_line_error(fv.check, root)
    assert message.startswith(f"cannot read {bad}") and "corrupt" in message


def test_corrupt_image_in_getitem_names_the_file(root):
    data = fv.FairVLMed(root, "train")
    bad = root / "Training" / "data_00001.npz"
    bad.write_bytes(b"PK\x03\x04 broken")
    message = one_line_error(data.__getitem__, 0)
    assert message.startswith(f"cannot read {bad}")


def test_missing_notes_file(root):
    (root / "gpt-4_summarized_notes.csv").unlink()
    message = one_line_error(fv.load_metadata, root, "train")
    assert "gpt-4_summarized_notes.csv" in message and "gpt4_summarized_notes.csv" in message
    assert message.startswith(f"no notes file in {root}")


def test_unknown_attribute(root):
    message = one_line_error(fv.FairVLMed(root, "train").groups, "eye_colour")
    assert message == ("unknown attribute 'eye_colour': choose one of race, gender, ethnicity, language, "
                       "maritalstatus")


def test_invalid_attribute_code_names_the_file(root):
    bad = root / "Training" / "data_00002.npz"
    write_npz(bad, 0, 7, 1, 1, 1, 1, index=2)
    message = one_line_error(fv.load_metadata, root, "train")
    assert message.startswith(f"{bad}: race = 7, expected a whole-number code (0 Asian, 1 Black, 2 White, -1 Unknown)")


def test_subset_is_seeded_keeps_file_order_and_its_groups(root):
    ds = fv.FairVLMed(root, "Training")
    part = ds.subset(3, seed=1)
    again = ds.subset(3, seed=1)
    assert len(part) == 3 and list(part.metadata["filename"]) == list(again.metadata["filename"])
    assert list(part.metadata["filename"]) == sorted(part.metadata["filename"])
    rows = [list(ds.metadata["filename"]).index(f) for f in part.metadata["filename"]]
    np.testing.assert_array_equal(part.groups("race"), ds.groups("race")[rows])
    for i, row in enumerate(rows):
        assert int(part[i]["label"]) == int(ds[row]["label"]) and part[i]["text"] == ds[row]["text"]
    assert ds.subset(None) is ds and ds.subset(99) is ds
    assert one_line_error(ds.subset, 0).startswith("subset size must be at least 1")


# ------------------------------------------------------------------------------------------------- pixel rules
def _image(root, array):
    path = root / "Training" / "data_00001.npz"
    arrays = dict(np.load(path))
    arrays["slo_fundus"] = array
    np.savez(path, **arrays)
    return path


def test_float_images_in_unit_range_are_scaled_to_grey_levels(root):
    unit = np.linspace(0, 1, 48, dtype=np.float32).reshape(8, 6)
    path = _image(root, unit)
    np.testing.assert_allclose(fv.load_image(path), unit * 255, rtol=1e-6)
    grey = (unit * 200).astype(np.float64)  # already grey levels: taken as they are
    np.testing.assert_array_equal(fv.load_image(_image(root, grey)), grey.astype(np.float32))
    ones = np.ones((8, 6), np.uint8)  # integer images are never scaled
    np.testing.assert_array_equal(fv.load_image(_image(root, ones)), ones)
    assert fv.check(root, decode=True)["images"] == {"decoded": 12, "smallest": [8, 6], "largest": [8, 6]}


def test_a_small_image_warns_once_per_dataset(root):
    preprocess = transforms.Compose([transforms.Resize(96), transforms.CenterCrop(96), transforms.ToTensor()])
    data = fv.FairVLMed(root, "train", preprocess=preprocess)
    assert data.input_size == 96
    with pytest.warns(fv.SmallImageWarning, match=r"slo_fundus is 8 x 6, far smaller than the model's 96-pixel"):
        data[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data[1]  # no second warning
        fv.FairVLMed(root, "train", preprocess=transforms.Compose([transforms.Resize(12)]))[0]  # 6 >= 12 / 2


def test_notes_are_optional_only_for_image_only_readers(root):
    (root / "gpt-4_summarized_notes.csv").unlink()
    assert one_line_error(fv.load_metadata, root, "train").startswith("no notes file")
    X, meta = fv.load_pixels(root, "train", size=4)
    assert X.shape == (5, 16) and set(meta["note"]) == {""}
