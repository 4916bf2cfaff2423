"""Harvard-FairVLMed: the on-disk dataset of FairCLIP (Luo et al., CVPR 2024), loaded the way the official code does.

Layout (as released by the FairCLIP authors): ``<root>/{Training,Validation,Test or Testing}/*.npz``, one npz per
sample with the keys of :data:`~fairbook.data.attributes.REQUIRED_NPZ_KEYS` (scalars as 0-d arrays), and a notes
CSV (``gpt-4_summarized_notes.csv`` or ``gpt4_summarized_notes.csv``) mapping each npz file name to a GPT-4 summary of
its clinical note. The split is the folder; extra npz keys (``note``, ``disc_mask``...) and files are ignored.

Official behaviour reproduced here, with a documented switch where a choice exists:

* validation and test samples whose race, gender, ethnicity or language is ``-1`` (unknown) are dropped, training
  samples are kept (``drop_unknown=None``; ``True``/``False`` force it for every split);
* the caption is the summary truncated to 180 characters at the last space (:func:`truncate_note`);
* the image is the float32 ``slo_fundus`` array made into a PIL mode ``"F"`` image and passed to the CLIP preprocess.

What is checked (every bad input raises :class:`DataError`, one line naming the file, the key and the fix):

* ``glaucoma`` is 0 or 1; race, gender, ethnicity, language and maritalstatus are whole numbers in the codes of
  :data:`~fairbook.data.attributes.ATTRIBUTES`, with -1 as unknown; age and md are numbers;
* ``slo_fundus`` is a 2-D numeric array of finite values in [0, 255] (the grey levels PIL keeps when the CLIP
  preprocess converts the image to RGB). **Float images in [0, 1] are multiplied by 255** (integer images never
  are); any other range is refused with the range named. An image whose shorter side is under half the model's
  input size is upscaled with a warning (:class:`SmallImageWarning`);
* the notes file has exactly one row per npz file name: a duplicate row, or an npz without a row, is an error.
  The official FairCLIP dataset reads the note of every sample in every split (it is the caption), so notes are
  required wherever a :class:`FairVLMed` dataset or :func:`load_metadata` is used; only image-only readers that the
  official code also runs without notes skip them (``notes=False``; :func:`load_pixels`, for pixel baselines).
"""
from __future__ import annotations

import collections
import copy
import functools
import io
import json
import math
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fairbook.data.attributes import (
    ATTRIBUTES,
    FILTER_ATTRIBUTES,
    ITEM_ATTRIBUTES,
    NOTES_FILES,
    REQUIRED_NPZ_KEYS,
    SPLIT_ALIASES,
    SPLITS,
    UNKNOWN,
)
from fairbook.files import one_line

#: The npz scalars read into the metadata (the image and ``tds`` are never read by :func:`load_metadata`).
SCALAR_KEYS = ("glaucoma", "race", "gender", "ethnicity", "language", "maritalstatus", "age", "md")

_SPLIT_NAMES = {
    "training": "Training", "train": "Training",
    "validation": "Validation", "val": "Validation",
    "test": "Test", "testing": "Test",
}
_SYNTHETIC_MANIFEST = "synthetic.json"


class DataError(ValueError):
    """A dataset folder or file that cannot be used; the message is one line naming the problem and the fix."""


class SmallImageWarning(UserWarning):
    """An image far smaller than the model's input, which the preprocess will upscale."""


# --------------------------------------------------------------------------------------------------- folders, files
def _root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"no Harvard-FairVLMed folder at {root}: point data_root at the dataset or run `fairbook data synth {root}`"
        )
    return path


def _split_name(split: str) -> str:
    name = _SPLIT_NAMES.get(str(split).lower())
    if name is None:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)} (or train, val, test)")
    return name


def _attribute(name: str) -> str:
    if name not in ATTRIBUTES:
        raise DataError(f"unknown attribute {name!r}: choose one of {', '.join(ATTRIBUTES)}")
    return name


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """Folder of ``split`` ("Training", "Validation", "Test"; or "train", "val", "test"); the test split may be
    called ``Test/`` (the release) or ``Testing/`` (some upstream scripts)."""
    base, name = _root(root), _split_name(split)
    candidates = SPLIT_ALIASES.get(name, (name,))
    for candidate in candidates:
        if (base / candidate).is_dir():
            return base / candidate
    looked = " or ".join(f"{c}/" for c in candidates)
    raise DataError(
        f"no {name} split in {base} (looked for {looked}): the dataset needs Training/, Validation/ and Test/ "
        "(or Testing/) folders of npz files; point data_root at the folder that holds them"
    )


def _npz_entries(folder: Path) -> list[tuple[str, int, int]]:
    """(name, mtime_ns, size) of the npz files in ``folder``, sorted; hidden files (macOS ``._*``) are skipped."""
    with os.scandir(folder) as it:
        entries = [
            (e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in it
            if e.name.endswith(".npz") and not e.name.startswith(".") and e.is_file()
        ]
    if not entries:
        raise DataError(
            f"no .npz files in {folder}: copy that split's npz files there or point data_root at the complete dataset"
        )
    return sorted(entries)


# ------------------------------------------------------------------------------------------------------ npz reading
class NotAScalar(ValueError):
    """An npz member that should hold one value holds an array (its shape is the argument)."""


@functools.lru_cache(maxsize=256)
def _npy_header(prefix: bytes) -> np.dtype:
    """dtype of a ``.npy`` member from its magic + header bytes (memoised: every file repeats the same headers)."""
    stream = io.BytesIO(prefix)
    version = np.lib.format.read_magic(stream)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(stream)
    if int(np.prod(shape)) != 1:
        raise NotAScalar(shape)
    return dtype


def _npy_scalar(raw: bytes) -> int | float:
    """The single value of a ``.npy`` file's bytes (``np.load(...).item()`` without the slow generic header parser)."""
    if raw[6] == 1:
        start = 10 + int.from_bytes(raw[8:10], "little")
    else:
        start = 12 + int.from_bytes(raw[8:12], "little")
    return np.frombuffer(raw, _npy_header(raw[:start]), count=1, offset=start)[0].item()


def _unreadable(path: Path, exc: BaseException) -> DataError:
    return DataError(
        f"cannot read {path} ({one_line(exc)}): the file is corrupt or truncated; "
        "replace it with a fresh copy from the dataset"
    )


def read_scalars(path: str | os.PathLike) -> tuple:
    """The :data:`SCALAR_KEYS` values of one npz, after checking it opens, has every required key and holds valid
    values (:func:`check_scalars`).

    Reads the zip members directly (about 2.5x faster than ``np.load`` per file); the image is not read.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            present = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
            missing = [key for key in REQUIRED_NPZ_KEYS if key not in present]
            if not missing:
                values = []
                for key in SCALAR_KEYS:
                    try:
                        values.append(_npy_scalar(archive.read(f"{key}.npy")))
                    except NotAScalar as exc:
                        raise DataError(f"{path}: {key} is an array of shape {exc.args[0]}, expected a single "
                                        "value; fix or remove the file") from None
    except DataError:
        raise
    except Exception as exc:  # zipfile, zlib and numpy raise many types for a damaged file
        raise _unreadable(path, exc) from exc
    if missing:
        raise DataError(
            f"{path} lacks required key(s) {', '.join(missing)}: it is not a Harvard-FairVLMed npz; replace it with "
            "the file from the dataset release (or regenerate the synthetic data)"
        )
    return check_scalars(path, tuple(values))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value) -> bool:
    return _is_number(value) and math.isfinite(value) and float(value).is_integer()


def check_scalars(path: str | os.PathLike, values: tuple) -> tuple:
    """``values`` (in :data:`SCALAR_KEYS` order) with the label and the attribute codes as ints, or a
    :class:`DataError` naming the file, the key and the valid values."""
    row = dict(zip(SCALAR_KEYS, values))
    label = row["glaucoma"]
    if not _whole(label) or int(label) not in (0, 1):
        raise DataError(f"{path}: glaucoma = {label!r}, expected 0 (no) or 1 (yes); fix or remove the file")
    for attribute, table in ATTRIBUTES.items():
        code = row[attribute]
        if not _whole(code) or int(code) not in set(table) | {UNKNOWN}:
            valid = ", ".join(f"{c} {n}" for c, n in {**table, UNKNOWN: "Unknown"}.items())
            raise DataError(f"{path}: {attribute} = {code!r}, expected a whole-number code ({valid}); "
                            "fix or remove the file")
    for key in ("age", "md"):
        if not _is_number(row[key]):
            raise DataError(f"{path}: {key} = {row[key]!r}, expected a number; fix or remove the file")
    return tuple(int(v) if k in ("glaucoma", *ATTRIBUTES) else float(v) for k, v in row.items())


def load_image(path: str | os.PathLike, key: str = "slo_fundus") -> np.ndarray:
    """The ``slo_fundus`` image (or the image under ``key``, e.g. FairSeg's ``fundus_slo``) of one npz as a 2-D
    float32 array of grey levels in [0, 255] (what the official loader feeds to PIL).

    The rule for pixel values: integer images are taken as they are and must lie in [0, 255]; float images in
    [0, 1] are multiplied by 255, float images in [0, 255] are taken as they are, and any other range is refused.
    Non-numeric, non-2-D (e.g. RGB) or non-finite (NaN, inf) images are refused. Every refusal is a one-line
    :class:`DataError` naming the file.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = npz[key]
    except Exception as exc:
        raise _unreadable(Path(path), exc) from exc
    fix = "replace the file with a 2-D grayscale image (H x W) of grey levels"
    if raw.dtype.kind not in "uif":
        raise DataError(f"{path}: {key} has dtype {raw.dtype}, expected a numeric image; {fix}")
    if raw.ndim != 2:
        raise DataError(f"{path}: {key} has shape {raw.shape}, expected a 2-D grayscale image (convert RGB to "
                        f"grey); {fix}")
    if raw.size == 0:
        raise DataError(f"{path}: {key} is empty (shape {raw.shape}); {fix}")
    image = raw.astype(np.float32)
    finite = np.isfinite(image)
    if not finite.all():
        raise DataError(f"{path}: {key} has {int((~finite).sum()):,} non-finite pixels (NaN or inf); {fix}")
    lo, hi = float(image.min()), float(image.max())
    if raw.dtype.kind == "f" and lo >= 0 and hi <= 1:
        return image * 255.0
    if lo < 0 or hi > 255:
        scale = " (float images in [0, 1] are scaled by 255)" if raw.dtype.kind == "f" else ""
        raise DataError(f"{path}: {key} values lie in [{lo:g}, {hi:g}], expected grey levels in [0, 255]"
                        f"{scale}; rescale the image")
    return image


_RECORDS: dict[str, tuple[tuple, list[tuple]]] = {}


def _records(folder: Path) -> tuple[list[str], list[tuple]]:
    """File names and checked scalars of a split folder, cached in memory per folder on its file names, mtimes and
    sizes."""
    entries = _npz_entries(folder)
    key, fingerprint = str(folder.resolve()), tuple(entries)
    cached = _RECORDS.get(key)
    if cached is None or cached[0] != fingerprint:
        rows = [read_scalars(folder / name) for name, _, _ in entries]
        _RECORDS[key] = cached = (fingerprint, rows)
    return [name for name, _, _ in entries], cached[1]


# ------------------------------------------------------------------------------------------------------------ notes
def notes_file(root: str | os.PathLike) -> Path:
    """The notes CSV: ``gpt-4_summarized_notes.csv`` (the release) or ``gpt4_summarized_notes.csv`` (upstream code)."""
    base = _root(root)
    for name in NOTES_FILES:
        if (base / name).is_file():
            return base / name
    raise DataError(
        f"no notes file in {base}: expected {NOTES_FILES[0]} or {NOTES_FILES[1]} (npz filename -> GPT-4 summary); "
        "copy it from the dataset release next to the split folders"
    )


def _normalise(header: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(header).lower())


def _note_columns(header: list[str]) -> tuple[int, int] | None:
    """(filename column, summary column) when a header row names both, else None."""
    names = [_normalise(cell) for cell in header]
    file_col = next((i for i, n in enumerate(names) if n in ("filename", "file", "npzfile", "npz")), None)
    summary_col = next((i for i, n in enumerate(names) if "summar" in n), None)
    return None if file_col is None or summary_col is None else (file_col, summary_col)


def read_notes(root: str | os.PathLike) -> dict[str, str]:
    """npz file name -> GPT-4 summary, from the notes CSV of :func:`notes_file`.

    Columns are found by header (a ``filename``/``File Name`` column and one whose name contains "summar", e.g.
    ``gpt4_summary`` or ``Summarized Note``); otherwise by position as the official code does (file name first,
    summary third), with or without a header row. Names and summaries are stripped; a path is reduced to its name.
    """
    path = notes_file(root)
    try:
        table = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot parse notes file {path} ({type(exc).__name__}): replace it with the release's CSV"
        ) from exc
    columns = _note_columns(table.iloc[0].tolist())
    body = table.iloc[1:]
    if columns is None:
        if table.shape[1] < 3:
            raise DataError(
                f"cannot find the filename and summary columns of {path}: expected a header with 'filename' and a "
                "summary column (e.g. gpt4_summary), or file name first and summary third"
            )
        columns = (0, 2)
        if str(table.iat[0, 0]).strip().endswith(".npz"):  # no header row at all
            body = table
    file_col, summary_col = columns
    names = [Path(name.strip()).name for name in body.iloc[:, file_col]]
    notes = {name: summary.strip() for name, summary in zip(names, body.iloc[:, summary_col]) if name}
    if len(notes) < sum(1 for name in names if name):
        duplicate = next(name for name, count in collections.Counter(names).items() if name and count > 1)
        raise DataError(f"{path} has {names.count(duplicate)} rows for {duplicate}: keep one row per npz file "
                        "(which summary is the caption would otherwise be a guess)")
    return notes


def truncate_note(text: str, max_chars: int = 180) -> str:
    """Caption text of the official FairCLIP code: the stripped note cut to ``max_chars`` characters, then back to
    the last space inside them so that no word is split (a note that fits is returned whole).

    As upstream, the cut is at the last space *within* the first ``max_chars`` characters, so a word ending exactly at
    ``max_chars`` is dropped too. Unlike upstream, a text without any space is hard-cut at ``max_chars`` (upstream
    would drop only its last character).
    """
    text = text.strip()
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > 0 else cut


# --------------------------------------------------------------------------------------------------------- metadata
def _names(frame: pd.DataFrame, attribute: str) -> pd.Series:
    """Decoded names of an attribute column whose codes :func:`check_scalars` has validated."""
    table = {**ATTRIBUTES[attribute], UNKNOWN: "Unknown"}
    return frame[attribute].map(table)


def unknown_mask(metadata: pd.DataFrame) -> pd.Series:
    """True for the samples the official filter removes: race, gender, ethnicity or language is -1 (unknown)."""
    return (metadata[list(FILTER_ATTRIBUTES)] == UNKNOWN).any(axis=1)


def _attach_notes(frame: pd.DataFrame, root: str | os.PathLike, folder: Path) -> pd.DataFrame:
    notes = read_notes(root)
    found = [notes.get(f, notes.get(f[:-4])) for f in frame["filename"]]
    missing = [f for f, note in zip(frame["filename"], found) if note is None]
    if missing:
        count = f"{len(missing):,} npz file{'s' if len(missing) > 1 else ''} of {folder.name}/ without a row"
        raise DataError(f"{notes_file(root)} has no row for {folder / missing[0]} ({count}): add the summaries or "
                        "remove those files")
    frame["note"] = found
    return frame


def load_metadata(
    root: str | os.PathLike, split: str, drop_unknown: bool | None = None, notes: bool = True,
) -> pd.DataFrame:
    """One row per npz of ``split``, sorted by file name.

    Columns: ``filename, path, split, glaucoma, race, gender, ethnicity, language, maritalstatus, age, md``, then
    ``<attribute>_name`` (decoded names, "Unknown" for -1) for every attribute, then ``note`` (the GPT-4 summary;
    every npz must have one, see the module docstring; ``notes=False`` reads no notes file and leaves '' for
    image-only uses). Only the scalar keys are read (about 0.35 ms per file); the result is cached in memory per
    folder, keyed on its file names, mtimes and sizes.

    ``drop_unknown`` switches the official filter (FairCLIP's dataset class): ``None`` (default) = official
    behaviour, drop Validation/Test samples whose race, gender, ethnicity or language is -1 and keep all Training
    samples; ``True`` drops them in every split; ``False`` keeps every sample.
    """
    folder, name = split_dir(root, split), _split_name(split)
    if notes:
        notes_file(root)  # a missing notes file is named before the (slower) npz scan
    files, rows = _records(folder)
    frame = pd.DataFrame(rows, columns=list(SCALAR_KEYS))
    frame = frame.astype({key: "int64" for key in SCALAR_KEYS[:6]} | {"age": "float64", "md": "float64"})
    frame.insert(0, "filename", files)
    frame.insert(1, "path", [str(folder / f) for f in files])
    frame.insert(2, "split", name)
    for attribute in ATTRIBUTES:
        frame[f"{attribute}_name"] = _names(frame, attribute)
    frame = _attach_notes(frame, root, folder) if notes else frame.assign(note="")
    drop = name != "Training" if drop_unknown is None else bool(drop_unknown)
    if drop:
        frame = frame[~unknown_mask(frame)].reset_index(drop=True)
    return frame


# ---------------------------------------------------------------------------------------------------------- dataset
class FairVLMed(torch.utils.data.Dataset):
    """Harvard-FairVLMed split as a torch dataset, item for item like FairCLIP's ``fair_vl_med_dataset``.

    Each item is a dict: ``image`` (float32 ``slo_fundus`` -> PIL mode "F" -> ``preprocess``; without a preprocess a
    float32 tensor of shape (1, H, W) with the raw grey values), ``label`` (glaucoma, int64), ``text`` (the note
    truncated by :func:`truncate_note`, tokenised as ``tokenizer(text)[0]`` when a tokenizer is given), ``attributes``
    (int64 codes of :attr:`attribute_names`: race, gender, ethnicity, language, then the age in whole years) and
    ``index`` (row of
    :attr:`metadata`). ``drop_unknown`` is the switch of :func:`load_metadata`. Works with the default collate and
    worker processes.

    ``keep_items=True`` keeps each item in memory after its first read, so that a split scored after every epoch
    is read and preprocessed once. Only for a deterministic preprocess (a random augmentation would be frozen, so a
    preprocess with a ``Random*`` step is refused). The kept tensors must not be changed in place.

    Pixels follow the rule of :func:`load_image`. The first image whose shorter side is under half the
    preprocess's output size raises a :class:`SmallImageWarning` (once per dataset and worker): it is upscaled, and
    an 8 x 8 image upscaled to 224 x 224 carries no anatomy.
    """

    attribute_names: tuple[str, ...] = ITEM_ATTRIBUTES

    def __init__(
        self, root: str | os.PathLike, split: str, preprocess=None, tokenizer=None,
        drop_unknown: bool | None = None, max_note_chars: int = 180, keep_items: bool = False,
    ) -> None:
        random_steps = [type(step).__name__ for step in getattr(preprocess, "transforms", [])
                        if type(step).__name__.startswith("Random")]
        if keep_items and random_steps:
            raise DataError(f"keep_items=True would freeze the random {', '.join(random_steps)} of this preprocess: "
                            "keep items only with a deterministic (evaluation) preprocess")
        self.metadata = load_metadata(root, split, drop_unknown)
        self._kept: dict[int, dict] | None = {} if keep_items else None
        self.preprocess, self.tokenizer, self.max_note_chars = preprocess, tokenizer, max_note_chars
        self.input_size = input_size(preprocess)
        self._warned_small = False
        self._paths = self.metadata["path"].tolist()
        self._notes = self.metadata["note"].tolist()
        self._labels = self.metadata["glaucoma"].to_numpy(np.int64)
        self._attributes = np.floor(self.metadata[list(self.attribute_names)].to_numpy(np.float64)).astype(np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def subset(self, n: int | None, seed: int = 0) -> FairVLMed:
        """A random ``n``-sample subset (drawn without replacement with ``seed``, kept in file order) sharing this
        dataset's preprocess and tokenizer; ``None`` or ``n >= len(self)`` returns ``self``. Unlike
        ``torch.utils.data.Subset`` the result is a :class:`FairVLMed`, so ``groups()`` and ``metadata`` follow."""
        if n is None or int(n) >= len(self):
            return self
        if int(n) < 1:
            raise DataError(f"subset size must be at least 1 (got {n}); pass None to keep all {len(self)} samples")
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size=int(n), replace=False))
        part = copy.copy(self)
        part.metadata = self.metadata.iloc[rows].reset_index(drop=True)
        part._paths, part._notes = [self._paths[i] for i in rows], [self._notes[i] for i in rows]
        part._labels, part._attributes = self._labels[rows], self._attributes[rows]
        part._kept = None if self._kept is None else {}  # item numbers change: kept items do not carry over
        return part

    def groups(self, attribute: str) -> np.ndarray:
        """Code of ``attribute`` (any of the dataset's attributes, e.g. "race") for every sample, in item order."""
        return self.metadata[_attribute(attribute)].to_numpy(np.int64)

    def __getitem__(self, index: int) -> dict:
        if self._kept is None:
            return self._read(index)
        if index not in self._kept:
            self._kept[index] = self._read(index)
        return self._kept[index]

    def _read(self, index: int) -> dict:
        image = load_image(self._paths[index])
        if self.input_size and not self._warned_small and 2 * min(image.shape) < self.input_size:
            self._warned_small = True
            warnings.warn(f"{self._paths[index]}: slo_fundus is {image.shape[0]} x {image.shape[1]}, far smaller than "
                          f"the model's {self.input_size}-pixel input; it is upscaled and fine detail cannot be "
                          "recovered (check that these are the full-size images)", SmallImageWarning, stacklevel=2)
        if self.preprocess is None:
            pixels = torch.from_numpy(image)[None]
        else:
            pixels = self.preprocess(Image.fromarray(image))  # float32 2-D array -> PIL mode "F"
        text = truncate_note(self._notes[index], self.max_note_chars)
        if self.tokenizer is not None:
            text = self.tokenizer(text)[0]
        return {
            "image": pixels,
            "label": torch.tensor(self._labels[index]),
            "text": text,
            "attributes": torch.from_numpy(self._attributes[index].copy()),
            "index": index,
        }


def input_size(preprocess) -> int | None:
    """The side of the square a torchvision preprocess (e.g. open_clip's) produces: the largest ``size`` of its
    resize and crop steps; None when there is no preprocess or it has no such step."""
    sizes = []
    for step in getattr(preprocess, "transforms", []):
        size = getattr(step, "size", None)
        size = size if isinstance(size, (list, tuple)) else [size]
        sizes += [int(v) for v in size if isinstance(v, int) and not isinstance(v, bool)]
    return max(sizes) if sizes else None


# ------------------------------------------------------------------------------------------------------ data check
def _group_counts(frame: pd.DataFrame, attribute: str) -> dict[str, dict]:
    """{group name: {"n", "prevalence"}} in code order, "Unknown" last and only when present."""
    known = [name for code, name in ATTRIBUTES[attribute].items() if code != UNKNOWN]
    stats = frame.groupby(f"{attribute}_name")["glaucoma"].agg(["size", "mean"])
    order = known + (["Unknown"] if "Unknown" in stats.index else [])
    return {
        group: {
            "n": int(stats.at[group, "size"]) if group in stats.index else 0,
            "prevalence": float(stats.at[group, "mean"]) if group in stats.index else None,
        }
        for group in order
    }


def check(root: str | os.PathLike, decode: bool = False) -> dict:
    """Validate a Harvard-FairVLMed folder and summarise it; raises :class:`DataError` on the first broken input.

    Every npz of every split is opened and checked for the required keys, labels in {0, 1} and valid attribute
    codes, and every npz must have exactly one notes row (see the module docstring). With ``decode=True`` every
    image is also decoded and checked by :func:`load_image` (about 1 ms per image), so that pixel problems surface
    here and not an hour into a run. The report is plain JSON-able data::

        {"source", "root", "notes_file",
         "splits": {split: {"folder", "samples", "with_unknown", "official_drop", "official_kept", "with_note"}},
         "attributes": {attribute: {group: {split or "all": {"n", "prevalence"}}}},
         "images": {"decoded", "smallest", "largest"}}   # only with decode=True: (height, width) extremes

    ``official_drop`` is what FairCLIP's filter removes (unknown race/gender/ethnicity/language in Validation and
    Test; nothing in Training). Group counts and glaucoma prevalence are over all samples, before that drop.
    """
    base = _root(root)
    frames = {split: load_metadata(base, split, drop_unknown=False) for split in SPLITS}
    report: dict = {"source": describe(base), "root": str(base), "notes_file": notes_file(base).name,
                    "splits": {}, "attributes": {}}
    for split, frame in frames.items():
        unknown = int(unknown_mask(frame).sum())
        dropped = 0 if split == "Training" else unknown
        report["splits"][split] = {
            "folder": split_dir(base, split).name, "samples": len(frame), "with_unknown": unknown,
            "official_drop": dropped, "official_kept": len(frame) - dropped,
            "with_note": int((frame["note"] != "").sum()),
        }
    if decode:
        shapes = [load_image(path).shape for frame in frames.values() for path in frame["path"]]
        report["images"] = {"decoded": len(shapes), "smallest": list(min(shapes, key=min)),
                            "largest": list(max(shapes, key=min))}
    frames["all"] = pd.concat(frames.values(), ignore_index=True)
    for attribute in ATTRIBUTES:
        per_split = {split: _group_counts(frame, attribute) for split, frame in frames.items()}
        report["attributes"][attribute] = {
            group: {split: per_split[split].get(group, {"n": 0, "prevalence": None}) for split in frames}
            for group in per_split["all"]
        }
    return report


def _cell(stats: dict) -> str:
    prevalence = "-" if stats["prevalence"] is None else f"{stats['prevalence']:.1%}"
    return f"{stats['n']:,} ({prevalence})"


def format_check(report: dict) -> str:
    """Plain-text rendering of a :func:`check` report: a split table and, per attribute, n (glaucoma prevalence)."""
    splits = report["splits"]
    total = sum(s["samples"] for s in splits.values())
    with_note = sum(s["with_note"] for s in splits.values())
    lines = [
        report["source"],
        f"notes: {report['notes_file']}, a summary for {with_note:,} of {total:,} samples",
        "",
        f"{'split':<12}{'folder':<12}{'samples':>9}{'any unknown':>13}{'official drop':>15}{'used':>9}",
    ]
    for name, s in splits.items():
        lines.append(f"{name:<12}{s['folder']:<12}{s['samples']:>9,}{s['with_unknown']:>13,}"
                     f"{s['official_drop']:>15,}{s['official_kept']:>9,}")
    lines += ["", "n (glaucoma prevalence) per group, all samples before the official drop"]
    for attribute, groups in report["attributes"].items():
        columns = list(next(iter(groups.values())))
        lines.append(f"{attribute:<20}" + "".join(f"{c:>18}" for c in columns))
        for group, by_split in groups.items():
            lines.append(f"  {group:<18}" + "".join(f"{_cell(by_split[c]):>18}" for c in columns))
    if "images" in report:
        images = report["images"]
        lines += ["", f"images: {images['decoded']:,} decoded, all 2-D and finite, grey levels in [0, 255]; "
                      f"smallest {images['smallest'][0]} x {images['smallest'][1]}, "
                      f"largest {images['largest'][0]} x {images['largest'][1]}"]
    return "\n".join(lines)


def _total(counts) -> int | None:
    if isinstance(counts, bool):
        return None
    if isinstance(counts, int):
        return counts
    if isinstance(counts, dict):
        values = [v for v in counts.values() if isinstance(v, int) and not isinstance(v, bool)]
        return sum(values) if values else None
    return None


def describe(root: str | os.PathLike) -> str:
    """One-line label of the data source for figure captions and tables.

    ``root/synthetic.json`` marks fairbook's synthetic stand-in ("SynthFairVLMed (synthetic; seed 0, bias default;
    10,000 samples)": ``config.seed``, ``config.bias`` or else the preset ``config.name``, and the sum of ``counts``;
    read defensively, missing fields are left out); anything else is the real dataset
    ("Harvard-FairVLMed (real data at PATH)").
    """
    base = _root(root)
    manifest = base / _SYNTHETIC_MANIFEST
    if not manifest.is_file():
        return f"Harvard-FairVLMed (real data at {base})"
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        info = {}
    info = info if isinstance(info, dict) else {}
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    settings = []
    for key, fallback in (("seed", "seed"), ("bias", "name")):  # the generator records its bias preset as "name"
        value = next((d[k] for k in (key, fallback) for d in (config, info) if d.get(k) is not None), None)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            settings.append(f"{key} {value}")
        elif value is not None:
            settings.append(f"{key} custom")
    total = _total(info.get("counts"))
    parts = ["synthetic", ", ".join(settings), f"{total:,} samples" if total is not None else ""]
    return f"SynthFairVLMed ({'; '.join(p for p in parts if p)})"


def load_pixels(root: str | os.PathLike, split: str, size: int = 32, drop_unknown: bool | None = None):
    """``(X, metadata)``: every image of a split centre-cropped to a square, resized to ``size`` x ``size`` with
    area averaging, scaled to [0, 1] and flattened (``X`` is ``n x size²`` float32). Input for pixel baselines.
    """
    from PIL import Image

    meta = load_metadata(root, split, drop_unknown=drop_unknown, notes=False)
    rows = []
    for path in meta["path"]:
        image = load_image(path)
        h, w = image.shape
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        square = Image.fromarray(image[top:top + s, left:left + s], mode="F").resize((size, size), Image.BOX)
        rows.append(np.asarray(square, np.float32).ravel() / 255.0)
    return np.stack(rows) if rows else np.zeros((0, size * size), np.float32), meta
