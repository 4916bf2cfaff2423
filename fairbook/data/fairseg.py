"""Harvard-FairSeg (Tian et al., "FairSeg", ICLR 2024): SLO fundus images with pixel-wise optic disc and cup masks
and the FairVLMed demographic attributes, for segmentation fairness.

Layout: a folder of ``data_XXXXX.npz`` files with the split given either by lists (``train.txt`` and ``test.txt``,
one file name per line, as FairSeg's code ships them in ``lists/FairSeg_final/``; ``val.txt`` optional) or by
FairVLMed-style split folders (``Training/``, ``Validation/``, ``Test/``). FairSeg has no validation split: when
none is given, a seeded ``val_fraction`` of the training files (10 % by default) is carved out as validation and
the rest is training, so that epochs and thresholds can still be chosen without the test split.

The release is described two ways, and :func:`read_case` accepts both key sets, file by file:

========================  ==========================================  ==========================================
field                     README                                      released loader (the files as shipped)
========================  ==========================================  ==========================================
image                     ``slo_fundus``                              ``fundus_slo``
mask                      ``disc_cup_mask``                           ``disc_cup``
ethnicity                 ``ethnicity``                               ``hispanic``
race                      0 Asian, 1 Black, 2 White                   2 Asian, 3 Black, 7 White
========================  ==========================================  ==========================================

Race is read with the coding of the file's key set. The age is read in years, and an age above
:data:`AGE_IN_DAYS_ABOVE` is taken to be in days (the released files store days) and divided by 365.25. Mask codes
are {0, -1, -2} (released) or {0, 1, 2}: background, neuroretinal rim, cup; the optic disc is rim and cup together.
Every other value is an error naming the file, the key and the fix (:class:`fairbook.data.DataError`).

:func:`write_fairseg` writes a SynthFairVLMed folder in this layout (either key set), so that everything downstream
runs on data the handbook makes itself.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fairbook.data.attributes import ATTRIBUTES, FILTER_ATTRIBUTES, SPLITS, UNKNOWN
from fairbook.data.fairvlmed import DataError, load_image
from fairbook.data.fairvlmed import describe as describe_fairvlmed
from fairbook.data.synthetic import MANIFEST
from fairbook.files import replace_dir, resolve, temporary_sibling

__all__ = ["AGE_IN_DAYS_ABOVE", "CLASSES", "FairSeg", "KEY_SETS", "as_fairseg", "check_fairseg", "describe",
           "load_cases", "read_case", "write_fairseg"]

#: The two key sets seen in the wild: name -> {field: npz key}.
KEY_SETS = {
    "readme": {"image": "slo_fundus", "mask": "disc_cup_mask", "ethnicity": "ethnicity"},
    "released": {"image": "fundus_slo", "mask": "disc_cup", "ethnicity": "hispanic"},
}
#: Race codes of the released files -> FairVLMed's (0 Asian, 1 Black, 2 White).
RELEASED_RACE = {2: 0, 3: 1, 7: 2}
#: An age above this many "years" is read as days.
AGE_IN_DAYS_ABOVE = 130
#: Segmentation classes, as FairSeg's training code numbers them (its mask codes -1 and -2 become 1 and 2).
CLASSES = ("background", "rim", "cup")
_MASK_CODES = {0: 0, -1: 1, -2: 2, 1: 1, 2: 2}
_LISTS = {"Training": "train.txt", "Validation": "val.txt", "Test": "test.txt"}
_ATTRIBUTES = (*FILTER_ATTRIBUTES, "maritalstatus")


def _key_set(keys, path: Path) -> str:
    for name, fields in KEY_SETS.items():
        if fields["image"] in keys and fields["mask"] in keys:
            return name
    raise DataError(f"{path}: no FairSeg image and mask (found keys {sorted(keys)}): a FairSeg npz holds "
                    "slo_fundus + disc_cup_mask (README) or fundus_slo + disc_cup (released files)")


def read_case(path: str | os.PathLike, image: bool = True) -> dict:
    """One FairSeg npz as ``{"image": H x W float32 grey levels, "mask": H x W int64 classes (0 background, 1 rim,
    2 cup), "age": years, "race", "gender", "ethnicity", "language", "maritalstatus": FairVLMed codes,
    "key_set": "readme" or "released"}``, checked as the module docstring says. ``image=False`` leaves the image
    out (not decoded; the case table of :func:`load_cases` needs only the mask and the attributes)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            key_set = _key_set(npz.files, path)
            fields = KEY_SETS[key_set]
            data = {key: npz[key] for key in npz.files if key != fields["image"]}
    except DataError:
        raise
    except Exception as exc:  # zip, pickle and numpy raise many types for a damaged file
        raise DataError(f"cannot read {path} ({type(exc).__name__}): the file is corrupt or not an npz; download "
                        "it again") from None
    mask = np.asarray(data[fields["mask"]])
    codes = set(np.unique(mask).tolist())
    if mask.ndim != 2 or not codes <= set(_MASK_CODES) or (codes & {-1, -2} and codes & {1, 2}):
        raise DataError(f"{path}: {fields['mask']} must be a 2-D mask coded {{0, -1, -2}} or {{0, 1, 2}} "
                        f"(background, rim, cup); got shape {mask.shape} and values {sorted(codes)[:6]}")
    classes = np.array([_MASK_CODES[c] for c in range(-2, 3)], dtype=np.int64)   # codes -2..2 -> classes
    case = {"mask": classes[mask.astype(np.int64) + 2], "key_set": key_set}
    if image:
        case["image"] = load_image(path, key=fields["image"])
    if image and case["image"].shape != mask.shape:
        raise DataError(f"{path}: image {case['image'].shape} and mask {mask.shape} differ in size: the mask must "
                        "label every pixel of the image")
    names = {**{a: a for a in _ATTRIBUTES}, "ethnicity": fields["ethnicity"]}
    for attribute, key in names.items():
        if key not in data:
            raise DataError(f"{path}: no {key!r} key: every FairSeg npz carries {', '.join(names.values())} and age")
        code = int(np.asarray(data[key]).item())
        if attribute == "race" and key_set == "released":
            code = RELEASED_RACE.get(code, code if code == UNKNOWN else -99)
        if code not in ATTRIBUTES[attribute] and code != UNKNOWN:
            raise DataError(f"{path}: {key}={int(np.asarray(data[key]).item())} is not a code of {attribute} "
                            f"({'2, 3, 7' if attribute == 'race' and key_set == 'released' else ATTRIBUTES[attribute]}"
                            "; -1 unknown): fix the file or drop it from the split list")
        case[attribute] = code
    if "age" not in data:
        raise DataError(f"{path}: no 'age' key: every FairSeg npz carries the age (years or days)")
    age = float(np.asarray(data["age"]).item())
    case["age"] = age / 365.25 if age > AGE_IN_DAYS_ABOVE else age
    return case


def _split_files(root: Path, val_fraction: float, seed: int) -> dict[str, list[Path]]:
    """The npz files of each split: from split folders or lists, with validation carved from training if absent."""
    if (root / "Training").is_dir():
        found = {s: sorted((root / s).glob("*.npz")) for s in SPLITS if (root / s).is_dir()}
        if "Test" not in found and (root / "Testing").is_dir():
            found["Test"] = sorted((root / "Testing").glob("*.npz"))
    elif (root / _LISTS["Training"]).is_file():
        found = {}
        for split, name in _LISTS.items():
            if (root / name).is_file():
                names = [line.strip() for line in (root / name).read_text().splitlines() if line.strip()]
                missing = [n for n in names if not (root / n).is_file()]
                if missing:
                    raise DataError(f"{root / name} lists {missing[0]}, which is not in {root} ({len(missing)} "
                                    "missing): put the npz files next to the lists")
                found[split] = [root / n for n in names]
    else:
        raise DataError(f"{root} has neither split lists (train.txt, test.txt) nor split folders (Training/, Test/): "
                        "copy FairSeg's lists/FairSeg_final/*.txt next to the npz files")
    if "Test" not in found:
        raise DataError(f"{root} has no test split (test.txt or Test/): FairSeg ships test.txt with its code")
    if "Validation" not in found:
        files = found["Training"]
        n_val = max(1, int(round(val_fraction * len(files))))
        pick = set(np.random.default_rng(seed).choice(len(files), size=n_val, replace=False).tolist())
        found["Validation"] = [f for i, f in enumerate(files) if i in pick]
        found["Training"] = [f for i, f in enumerate(files) if i not in pick]
    return {split: found[split] for split in SPLITS}


def load_cases(root: str | os.PathLike, split: str, val_fraction: float = 0.1, seed: int = 0) -> pd.DataFrame:
    """One row per case of ``split`` (Training, Validation or Test): ``path``, ``filename``, the attribute codes,
    ``age`` in years and their ``<attribute>_name`` columns. Reads every file's scalars (and checks its mask) once
    per process: the table is kept for the folder and reread when a file of the folder changes (its listing's or
    any npz's modification time)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    root = resolve(root)
    if not root.is_dir():
        raise DataError(f"no FairSeg folder at {root}: give the folder of the npz files (or make one with "
                        "`fairbook data synth DIR --format fairseg`)")
    files = _split_files(root, val_fraction, seed)[split]
    key = (str(root), split, val_fraction, seed, tuple((f.name, f.stat().st_mtime_ns) for f in files))
    if key not in _CASES:
        _CASES[key] = _read_cases(files)
    return _CASES[key].copy()


#: The tables :func:`load_cases` read, by folder, split and file times.
_CASES: dict[tuple, pd.DataFrame] = {}


def _read_cases(files: list[Path]) -> pd.DataFrame:
    rows = []
    for path in files:
        case = read_case(path, image=False)
        rows.append({"path": str(path), "filename": path.name, "key_set": case["key_set"],
                     **{a: case[a] for a in _ATTRIBUTES}, "age": case["age"]})
    frame = pd.DataFrame(rows)
    for attribute in _ATTRIBUTES:
        frame[f"{attribute}_name"] = frame[attribute].map(lambda c, a=attribute: ATTRIBUTES[a].get(c, "Unknown"))
    return frame


class FairSeg(torch.utils.data.Dataset):
    """A FairSeg split as a torch dataset of ``size x size`` cases for a segmentation model.

    Each item: ``image`` (3 x size x size float32: the grey image resized bilinearly, scaled to [0, 1] and
    normalised with ``mean``/``std``, ImageNet's by default as SAM's processor does), ``mask`` (size x size int64
    classes of :data:`CLASSES`, resized by nearest neighbour), ``attributes`` (int64 codes of race, gender,
    ethnicity, language, then the age in whole years, as FairVLMed items) and ``index``. :meth:`original_mask`
    gives a case's mask at the file's resolution. ``keep_items=True`` keeps each item in memory after its first
    read (the preprocessing is deterministic), so that a split read at every epoch is decoded once.
    """

    attribute_names = (*FILTER_ATTRIBUTES, "age")

    def __init__(self, root: str | os.PathLike, split: str, size: int = 128, val_fraction: float = 0.1,
                 seed: int = 0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), keep_items: bool = False):
        self._kept: dict[int, dict] | None = {} if keep_items else None
        self.metadata = load_cases(root, split, val_fraction, seed)
        self.size = int(size)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        codes = self.metadata[list(self.attribute_names)].to_numpy(np.float64)
        self._attributes = np.floor(codes).astype(np.int64)

    def __len__(self) -> int:
        return len(self.metadata)

    def subset(self, n: int | None, seed: int = 0) -> FairSeg:
        """A random ``n``-case subset (drawn without replacement with ``seed``, kept in file order), as
        :meth:`fairbook.data.FairVLMed.subset`; ``None`` or ``n >= len(self)`` returns ``self``."""
        if n is None or int(n) >= len(self):
            return self
        if int(n) < 1:
            raise DataError(f"subset size must be at least 1 (got {n}); pass None to keep all {len(self)} cases")
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size=int(n), replace=False))
        part = copy.copy(self)
        part.metadata = self.metadata.iloc[rows].reset_index(drop=True)
        part._attributes = self._attributes[rows]
        part._kept = None if self._kept is None else {}  # item numbers change: kept items do not carry over
        return part

    @property
    def keeps_items(self) -> bool:
        """Whether items are kept in memory after their first read (``keep_items``)."""
        return self._kept is not None

    def original_mask(self, index: int) -> np.ndarray:
        return read_case(self.metadata["path"].iloc[index])["mask"]

    def __getitem__(self, index: int) -> dict:
        if self._kept is not None and index in self._kept:
            return dict(self._kept[index])
        case = read_case(self.metadata["path"].iloc[index])
        image = torch.from_numpy(case["image"] / 255.0).float()[None, None]
        image = F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        image = (image.expand(3, -1, -1) - self.mean) / self.std
        mask = torch.from_numpy(case["mask"])[None, None].float()
        mask = F.interpolate(mask, size=(self.size, self.size), mode="nearest")[0, 0].long()
        item = {"image": image, "mask": mask, "attributes": torch.from_numpy(self._attributes[index].copy()),
                "index": index}
        if self._kept is not None:
            self._kept[index] = item
        return dict(item)


def check_fairseg(root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Read every case of every split (keys, codes, masks) and summarise: ``{"root", "key_sets",
    "splits": {split: n}, "groups": {attribute: {group: n}}, "cup_to_disc": mean area ratio}``; the first broken
    file raises a one-line :class:`DataError`."""
    frames = {split: load_cases(root, split, val_fraction, seed) for split in SPLITS}
    every = pd.concat(frames.values(), ignore_index=True)
    return {"root": str(resolve(root)), "key_sets": sorted(set(every["key_set"])),
            "splits": {split: len(frame) for split, frame in frames.items()},
            "groups": {a: every[f"{a}_name"].value_counts().to_dict() for a in _ATTRIBUTES}}


def write_fairseg(source: str | os.PathLike, target: str | os.PathLike, key_set: str = "released") -> Path:
    """Write a SynthFairVLMed folder (its ``disc_mask`` and ``cup_mask``) in the FairSeg layout: flat npz files with
    the ``key_set``'s keys and codes (released: race 2/3/7, age in days, mask {0, -1, -2}; readme: FairVLMed codes,
    age in years, mask {0, 1, 2}), and ``train.txt`` (training and validation files, as FairSeg has no validation)
    and ``test.txt``. Written to a temporary sibling and renamed, so a killed write never looks complete."""
    if key_set not in KEY_SETS:
        raise DataError(f"unknown key set {key_set!r}: choose one of {', '.join(KEY_SETS)}")
    source, target = resolve(source), resolve(target)
    fields = KEY_SETS[key_set]
    to_released = {v: k for k, v in RELEASED_RACE.items()}
    tmp = temporary_sibling(target)
    tmp.mkdir(parents=True)
    lists: dict[str, list[str]] = {"train.txt": [], "test.txt": []}
    try:
        for split in SPLITS:
            for path in sorted((source / split).glob("*.npz")):
                with np.load(path) as npz:
                    data = {key: npz[key] for key in npz.files}
                if "disc_mask" not in data:
                    raise DataError(f"{path} has no disc_mask: write_fairseg converts a SynthFairVLMed folder "
                                    "(`fairbook data synth DIR`)")
                rim = (data["disc_mask"] > 0) & ~(data["cup_mask"] > 0)
                mask = np.where(data["cup_mask"] > 0, 2, np.where(rim, 1, 0))
                race, age = int(data["race"]), float(data["age"])
                out = {fields["image"]: data["slo_fundus"], fields["ethnicity"]: data["ethnicity"],
                       **{k: data[k] for k in ("gender", "language", "maritalstatus")}}
                mask = mask.astype(np.int8)
                if key_set == "released":
                    out.update(disc_cup=-mask, race=np.array(to_released.get(race, race)),
                               age=np.array(age * 365.25), pid=np.array(path.stem))
                else:
                    out.update(disc_cup_mask=mask, race=np.array(race), age=np.array(age))
                np.savez_compressed(tmp / path.name, **out)
                lists["test.txt" if split == "Test" else "train.txt"].append(path.name)
        for name, files in lists.items():
            (tmp / name).write_text("\n".join(files) + "\n")
        if (source / MANIFEST).is_file():   # what as_fairseg compares to reuse the copy
            shutil.copy(source / MANIFEST, tmp / MANIFEST)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def as_fairseg(root: str | os.PathLike) -> Path:
    """A folder in the FairSeg layout for ``root``: ``root`` itself when it has split lists (``train.txt``, real
    Harvard-FairSeg or ``fairbook data synth --format fairseg``); for a SynthFairVLMed folder, its copy
    ``<root>-fairseg`` written by :func:`write_fairseg` (released keys), reused while it was written from the same
    generator manifest and written again when the source changed."""
    root = resolve(root)
    if (root / _LISTS["Training"]).is_file():
        return root
    if not (root / MANIFEST).is_file():
        raise DataError(f"{root} is neither a FairSeg folder (train.txt, test.txt) nor a SynthFairVLMed folder "
                        "(synthetic.json): give Harvard-FairSeg's folder or one written by `fairbook data synth`")
    target = root.with_name(root.name + "-fairseg")
    if not ((target / MANIFEST).is_file() and (target / MANIFEST).read_bytes() == (root / MANIFEST).read_bytes()):
        write_fairseg(root, target)
    return target


def describe(root: str | os.PathLike) -> str:
    """One-line label of a FairSeg-layout folder: the SynthFairVLMed label (:func:`fairbook.data.describe`) with
    ", FairSeg layout" for a synthetic copy, else "Harvard-FairSeg (real data at PATH)"."""
    root = resolve(root)
    if (root / MANIFEST).is_file():
        return f"{describe_fairvlmed(root)}, FairSeg layout"
    return f"Harvard-FairSeg (real data at {root})"
