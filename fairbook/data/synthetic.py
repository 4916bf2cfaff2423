"""SynthFairVLMed: a procedural stand-in for Harvard-FairVLMed with controllable bias mechanisms.

The generator writes the on-disk layout of the real release (:mod:`fairbook.data.fairvlmed` describes it):
``Training/``, ``Validation/``, ``Test/`` folders of globally numbered ``data_XXXXX.npz`` files,
``gpt-4_summarized_notes.csv`` and ``data_summary.csv``, so that every loader written for the real data runs
unchanged on it. It adds three things the real data does not have: ``disc_mask``/``cup_mask`` in each npz
(for a segmentation chapter), ``synthetic_truth.csv`` (the true label, cup-to-disc ratio and artefact flag
behind each sample) and ``synthetic.json`` (the manifest: generator version, full config, counts).

Disease model. Glaucoma is an optic neuropathy whose structural hallmark is enlargement of the optic cup
relative to the disc (cup-to-disc ratio, CDR) with thinning of the neuroretinal rim, typically at the
inferior and superior poles first (the ISNT pattern). Each sample draws a vertical CDR from a Gaussian whose
mean depends on the true label; the two Gaussians overlap, so the best possible image classifier has
AUC = Phi(delta / (sd * sqrt(2))) (binormal model), about 0.90 with the default knobs (delta = 0.20,
sd = 0.11), before label noise. Rim notching and vertical cup elongation are deterministic functions of the
CDR, so they add no information beyond it. Visual-field mean deviation (md) and the 52 total-deviation
values (tds, 24-2 pattern without the two blind-spot points) worsen with the CDR and with the true label.

Bias mechanisms (each a :class:`SynthConfig` knob; ``SynthConfig.preset("none")`` switches them all off):
(a) group imbalance, (b) group-dependent prevalence, (c) group-linked acquisition shift and anatomy,
(d) group-dependent label noise and under-documentation in the notes, (e) a spurious device marker that
correlates with the label in the Training split only.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from fairbook.data.attributes import ATTRIBUTES, SPLITS
from fairbook.files import resolve, temporary_sibling

GENERATOR = "SynthFairVLMed"
VERSION = "1.0"
MANIFEST = "synthetic.json"
NOTES_FILE = "gpt-4_summarized_notes.csv"
SUMMARY_FILE = "data_summary.csv"
TRUTH_FILE = "synthetic_truth.csv"

# Codes in the order of the probability tuples of SynthConfig ("unknown" last, stored as -1).
ETHNICITY_CODES = (0, 1, -1)
LANGUAGE_CODES = (0, 1, 2, -1)
MARITAL_CODES = (0, 1, 2, 3, 4, -1)


class SynthConfigError(ValueError):
    """A SynthConfig value or a generate() target folder is invalid."""


@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the SynthFairVLMed generator. Defaults = the ``"default"`` preset (moderate bias).

    Tuples "by race" are indexed by race code (Asian, Black, White); "by language" by
    (English, Spanish, Other, Unknown).

    Size and images
        seed: master seed; every random draw derives from it through ``numpy.random.SeedSequence``.
        n_train, n_val, n_test: split sizes (the real release has 7,000 / 1,000 / 2,000).
        height, width: image shape. The real SLO images are 664 wide x 512 tall; 166 x 128 keeps the aspect
            at 1/16 of the pixels. CLIP preprocessing centre-crops the square middle, which holds the disc.
        disc_radius: vertical optic-disc radius as a fraction of the height. 0.2 (disc diameter 40 % of the
            height) zooms in a little more than a real optic-nerve-head scan (about 30 %) so that the cup
            still spans several pixels after resizing to a small model's input.

    Demographics (group imbalance, mechanism a; drawn per split by exact quotas, independently of each other)
        race_probs: (Asian, Black, White) = published FairVLMed shares 8.2 / 14.9 / 76.9 %.
        gender_probs: (Female, Male) = 57.1 / 42.9 %.
        ethnicity_probs: (Non-Hispanic, Hispanic, Unknown) = 90.3 / 4.3 / 5.4 %.
        language_probs: (English, Spanish, Other, Unknown); mostly English, as in a US clinic.
        marital_probs: (married/partnered, single, divorced, widowed, legally separated, unknown).
        age_mean, age_sd, age_min, age_max: age ~ clipped Normal(60, 15), independent of everything else.

    Disease
        prevalence: P(glaucoma) by race (mechanism b). Default (0.48, 0.62, 0.48) gives about 50 % overall;
            primary open-angle glaucoma is several times more prevalent in people of African ancestry
            (population surveys such as the Baltimore Eye Survey), hence the higher rate for Black patients.
        cdr_healthy, cdr_glaucoma, cdr_sd: vertical CDR ~ Normal(mean by true label, sd), clipped to
            [0.1, 0.9]. Overlapping on purpose: the binormal Bayes AUC is about 0.90.

    Acquisition and anatomy (mechanism c)
        disc_scale: mean optic-disc size multiplier by race. Default (1, 1.1, 1): discs of Black individuals
            are larger on average, with proportionally larger physiological cups; a model that learns cup
            *area* instead of the *ratio* over-calls glaucoma there.
        brightness, contrast: multipliers by race. Default darker and lower-contrast images for Black
            patients, a stand-in for the stronger light absorption of a more pigmented fundus.
        noise: additive Gaussian noise sd (intensity units 0..1) by race; blur: Gaussian blur sigma (pixels)
            by race. Default lower quality for Black patients (pupil size, media, device differences).

    Labels and notes (mechanism d)
        label_noise: probability that the recorded label (npz ``glaucoma``) is the flip of the true one, by
            race. Rationale: less complete work-ups (fewer visual fields and OCT) in under-served groups make
            the chart diagnosis less reliable. Images are rendered from the true label.
        note_reveal: probability that a note states the recorded diagnosis explicitly, by language; each
            finding (IOP, CDR, field, OCT...) is kept with probability note_reveal + 0.25. Lower for
            non-English speakers: visits through an interpreter tend to produce shorter notes.
            Notes that hide the diagnosis still report findings (IOP, CDR, fields), as real notes do.

    Spurious artefact (mechanism e)
        artefact_race: race code whose images can carry a small bright device marker (top-left of the
            centre square, so it survives CLIP's centre crop), or None for no marker at all. Rationale: a
            clinic that serves mostly one group and sees mostly referred glaucoma patients uses a device that
            burns a label into the image.
        artefact_strength: in Training, P(marker | group, recorded label y) = 0.5 + strength * (y - 0.5);
            in Validation and Test P(marker | group) = 0.5 whatever the label. 0 removes the shortcut.

    name: name of the preset the config was derived from (a label only; recorded in the manifest).
    """

    name: str = "default"
    seed: int = 0
    n_train: int = 7000
    n_val: int = 1000
    n_test: int = 2000
    height: int = 128
    width: int = 166
    disc_radius: float = 0.2
    race_probs: tuple[float, ...] = (0.082, 0.149, 0.769)
    gender_probs: tuple[float, ...] = (0.571, 0.429)
    ethnicity_probs: tuple[float, ...] = (0.903, 0.043, 0.054)
    language_probs: tuple[float, ...] = (0.91, 0.035, 0.025, 0.03)
    marital_probs: tuple[float, ...] = (0.55, 0.17, 0.10, 0.11, 0.01, 0.06)
    age_mean: float = 60.0
    age_sd: float = 15.0
    age_min: float = 18.0
    age_max: float = 90.0
    prevalence: tuple[float, ...] = (0.48, 0.62, 0.48)
    cdr_healthy: float = 0.40
    cdr_glaucoma: float = 0.60
    cdr_sd: float = 0.11
    disc_scale: tuple[float, ...] = (1.0, 1.1, 1.0)
    brightness: tuple[float, ...] = (0.95, 0.85, 1.0)
    contrast: tuple[float, ...] = (1.0, 0.8, 1.0)
    noise: tuple[float, ...] = (0.03, 0.045, 0.03)
    blur: tuple[float, ...] = (0.5, 0.8, 0.5)
    label_noise: tuple[float, ...] = (0.04, 0.10, 0.02)
    note_reveal: tuple[float, ...] = (0.75, 0.45, 0.45, 0.6)
    artefact_race: int | None = 1
    artefact_strength: float = 0.6

    def __post_init__(self) -> None:
        probs = {"race_probs": 3, "gender_probs": 2, "ethnicity_probs": 3, "language_probs": 4, "marital_probs": 6}
        for name, size in probs.items():
            p = getattr(self, name)
            if len(p) != size or min(p) < 0 or abs(sum(p) - 1) > 1e-6:
                raise SynthConfigError(f"{name} must be {size} non-negative numbers summing to 1, got {p}")
        by_race = ("prevalence", "disc_scale", "brightness", "contrast", "noise", "blur", "label_noise")
        for name in by_race + ("note_reveal",):
            if len(getattr(self, name)) != (4 if name == "note_reveal" else 3):
                raise SynthConfigError(f"{name} needs one value per {'language' if name == 'note_reveal' else 'race'}")
        for name in ("prevalence", "label_noise", "note_reveal"):
            if not all(0 <= v <= 1 for v in getattr(self, name)):
                raise SynthConfigError(f"{name} values are probabilities and must lie in [0, 1]")
        if min(self.n_train, self.n_val, self.n_test) < 1 or self.n_train + self.n_val + self.n_test > 99999:
            raise SynthConfigError("split sizes must be >= 1 and total at most 99,999 (five-digit file names)")
        if self.artefact_race not in (None, 0, 1, 2) or not 0 <= self.artefact_strength <= 1:
            raise SynthConfigError("artefact_race must be None or a race code 0-2, artefact_strength in [0, 1]")
        if self.height < 32 or self.width < self.height:
            raise SynthConfigError("image must be at least 32 px high and not taller than wide (landscape SLO)")

    @classmethod
    def preset(cls, name: str = "default", **overrides) -> SynthConfig:
        """Config of a named preset with field overrides, e.g. ``SynthConfig.preset("none", n_train=500)``.

        ``"default"``: mechanisms (b)-(e) on at moderate strength, published group proportions.
        ``"none"``: the control. All groups are exchangeable given their attributes: same prevalence (0.5),
        same acquisition and anatomy, no label noise, same documentation rate, no artefact. Group
        proportions stay at the published (imbalanced) values, so imbalance acts only through sample size;
        pass e.g. ``race_probs=(1/3, 1/3, 1/3)`` to balance them too.
        """
        if name not in PRESETS:
            raise SynthConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise SynthConfigError(f"unknown SynthConfig field(s) {unknown}; see help(SynthConfig)")
        return cls(**{"name": name, **PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> SynthConfig:
        """Inverse of :meth:`to_dict` (lists from JSON become tuples)."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SynthConfigError(f"unknown SynthConfig field(s) {unknown}; see help(SynthConfig)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def split_sizes(self) -> dict[str, int]:
        return dict(zip(SPLITS, (self.n_train, self.n_val, self.n_test)))


PRESETS: dict[str, dict] = {
    "default": {},
    "none": dict(
        prevalence=(0.5, 0.5, 0.5), disc_scale=(1.0, 1.0, 1.0), brightness=(1.0, 1.0, 1.0),
        contrast=(1.0, 1.0, 1.0), noise=(0.03, 0.03, 0.03), blur=(0.5, 0.5, 0.5), label_noise=(0.0, 0.0, 0.0),
        note_reveal=(0.7, 0.7, 0.7, 0.7), artefact_race=None, artefact_strength=0.0,
    ),
}


# --------------------------------------------------------------------------------------------------- images

def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Zero-mean smooth random field: Gaussian noise on a coarse grid, upsampled bicubically."""
    coarse = Image.fromarray(rng.normal(size=cells).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((shape[1], shape[0]), Image.BICUBIC), dtype=np.float64)


def _vessels(rng: np.random.Generator, shape: tuple[int, int], origin: tuple[float, float], scale: float) -> np.ndarray:
    """Vessel map in [0, 1]: four arcades and a few branches as tapering random walks from the disc centre.

    Drawn with PIL on a 2x canvas and box-downsampled for anti-aliasing. Independent of the label.
    """
    h, w = shape
    canvas = Image.new("L", (2 * w, 2 * h), 0)
    draw = ImageDraw.Draw(canvas)
    main = [-0.95, 0.95, -2.2, 2.2]  # superotemporal, inferotemporal, superonasal, inferonasal (radians)
    angles = [a + rng.normal(0, 0.15) for a in main] + list(rng.uniform(-math.pi, math.pi, rng.integers(2, 6)))
    for k, angle in enumerate(angles):
        y, x = 2 * origin[0] + rng.normal(0, 1.5), 2 * origin[1] + rng.normal(0, 1.5)
        width = (rng.uniform(4.0, 5.5) if k < 4 else rng.uniform(2.0, 3.5)) * scale
        bend = -0.07 * np.sign(angle) if k < 4 else rng.normal(0, 0.05)  # arcades curve toward the horizontal
        for _ in range(24):
            step = rng.uniform(8, 12)
            ny, nx = y + step * math.sin(angle), x + step * math.cos(angle)
            draw.line([(x, y), (nx, ny)], fill=255, width=max(1, int(round(width))))
            y, x, angle, width = ny, nx, angle + bend + rng.normal(0, 0.12), width * 0.96
    small = canvas.resize((w, h), Image.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _cup_boundary(theta: np.ndarray, cdr: float) -> np.ndarray:
    """Cup radius (in disc-normalised units) along direction theta for a vertical CDR.

    Glaucomatous cups elongate vertically (horizontal/vertical ratio falls as the CDR rises) and notch the
    inferior rim first (ISNT rule); both effects are deterministic functions of the CDR.
    """
    horizontal = cdr * (1.0 - 0.5 * max(cdr - 0.45, 0.0))
    ellipse = 1.0 / np.sqrt((np.cos(theta) / horizontal) ** 2 + (np.sin(theta) / cdr) ** 2)
    notch = 0.8 * max(cdr - 0.5, 0.0) * np.exp(-((np.angle(np.exp(1j * (theta - 1.75)))) ** 2) / (2 * 0.35**2))
    return np.minimum(ellipse * (1.0 + notch), 0.93)


def render_fundus(
    rng: np.random.Generator,
    cdr: float,
    height: int = 128,
    width: int = 166,
    disc_radius: float = 0.2,
    disc_scale: float = 1.0,
    brightness: float = 1.0,
    contrast: float = 1.0,
    noise: float = 0.03,
    blur: float = 0.5,
    marker: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one ONH-centred SLO-like image and its disc and cup masks.

    Scene (reflectance in 0..1): textured background 0.42, neuroretinal rim 0.56, pale cup 0.9 with a
    sloping edge, dark vessels; then group acquisition (contrast around 0.45, brightness), a random
    illumination gradient with vignetting, blur, additive noise, and optionally the device marker.
    Returns (uint8 image, uint8 disc mask, uint8 cup mask), each of shape (height, width).
    """
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = h / 2 + rng.normal(0, 2), w / 2 + rng.normal(0, 2)
    ry = disc_radius * h * disc_scale * math.exp(rng.normal(0, 0.07))
    rx = ry / rng.uniform(1.03, 1.13)  # discs are slightly vertically oval
    u, v = (xx - cx) / rx, (yy - cy) / ry
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    cup_r = _cup_boundary(theta, cdr)

    scene = 0.42 + 0.05 * _smooth_field(rng, (h, w), (5, 6)) + 0.02 * _smooth_field(rng, (h, w), (16, 20))
    edge = 0.8 / ry  # about 0.8 px
    disc_soft = 1.0 / (1.0 + np.exp((rho - 1.0) / edge))
    cup_soft = 1.0 / (1.0 + np.exp((rho - cup_r) / (1.5 * edge)))
    scene = scene + disc_soft * (0.14 + 0.34 * cup_soft)
    scene = scene * (1.0 - 0.4 * _vessels(rng, (h, w), (cy, cx), scale=ry / (0.2 * 128)))

    scene = 0.45 + contrast * math.exp(rng.normal(0, 0.08)) * (scene - 0.45)
    phi, g = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.25)
    x1, y1 = xx / w * 2 - 1, yy / h * 2 - 1
    light = (1 + g * (math.cos(phi) * x1 + math.sin(phi) * y1)) * (1 - rng.uniform(0.1, 0.3) * (x1**2 + y1**2) / 2)
    scene = scene * light * brightness * math.exp(rng.normal(0, 0.08))
    scene = gaussian_filter(scene, blur) + rng.normal(0, noise, (h, w))
    image = np.clip(np.rint(scene * 255), 0, 255).astype(np.uint8)
    if marker:
        (top, bottom), (left, right) = marker_box(h, w)
        image[top:bottom, left:right] = 20
        image[top + 1:bottom - 1, left + 1:right - 1] = 240
    return image, (rho < 1.0).astype(np.uint8), (rho < cup_r).astype(np.uint8)


def marker_box(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) pixel bounds of the device marker (mechanism e) in an image of that size:
    a 6 x 6 square, 4 rows from the top and 6 columns into the centred square that CLIP's crop keeps."""
    top, left = 4, (width - height) // 2 + 6
    return (top, top + 6), (left, left + 6)


def marker_mask(height: int, width: int) -> np.ndarray:
    """(height, width) float mask, 1 on the device marker's square (:func:`marker_box`), 0 elsewhere."""
    mask = np.zeros((height, width))
    (top, bottom), (left, right) = marker_box(height, width)
    mask[top:bottom, left:right] = 1.0
    return mask


def load_truth(root: str | os.PathLike) -> pd.DataFrame:
    """``synthetic_truth.csv`` of a SynthFairVLMed folder, indexed by filename: the true label, the recorded
    label, the cup-to-disc ratio, the device-marker flag and whether the note reveals the diagnosis."""
    path = Path(root) / TRUTH_FILE
    if not path.is_file():
        raise SynthConfigError(f"no {TRUTH_FILE} in {root}: the ground truth exists only for SynthFairVLMed "
                               "folders; make one with `fairbook data synth DIR`")
    return pd.read_csv(path).set_index("filename")


def note_reveal_shares(root: str | os.PathLike, split: str = "Test", attribute: str = "language"
                       ) -> pd.DataFrame | None:
    """Per group of ``attribute`` in ``split``: ``n`` and the share of notes that state the diagnosis (the
    designed signal of the note, mechanism d), from ``synthetic_truth.csv``, over the samples the evaluation keeps
    (:func:`fairbook.data.load_metadata`'s official drop); None for a folder without one (real data)."""
    from fairbook.data.fairvlmed import load_metadata

    if not (Path(root) / TRUTH_FILE).is_file():
        return None
    metadata = load_metadata(root, split)
    reveals = metadata["filename"].map(load_truth(root)["note_reveals_diagnosis"])
    table = reveals.groupby(metadata[f"{attribute}_name"]).agg(["size", "mean"])
    table.columns = ["n", "share of notes stating the diagnosis"]
    return table.rename_axis(attribute)


# ------------------------------------------------------------------------------------------- visual fields

def _field_points() -> np.ndarray:
    """(x, y) degrees of the 52 Humphrey 24-2 test points (54-point grid without the two blind-spot points)."""
    rows = {21: 4, 15: 6, 9: 8, 3: 9, -3: 9, -9: 8, -15: 6, -21: 4}
    pts = []
    for y, count in rows.items():
        xs = np.arange(count) * 6 - (count - 1) * 3 - (3 if count == 9 else 0)
        pts += [(x, y) for x in xs if not (x == 15 and abs(y) == 3)]
    return np.array(pts, dtype=np.float64)


FIELD_POINTS = _field_points()


def _visual_field(rng: np.random.Generator, cdr: float, glaucoma: int) -> tuple[float, np.ndarray]:
    """Total deviation at the 52 points and their mean (used as md), worse with larger CDR and with disease.

    Loss concentrates in a superior arcuate band (eccentricity 10-20 degrees), the field counterpart of the
    inferior rim notch drawn by :func:`_cup_boundary`.
    """
    depth = 22.0 * max(cdr - 0.5, 0.0) + glaucoma * (2.0 + rng.exponential(2.0))
    ecc = np.hypot(FIELD_POINTS[:, 0], FIELD_POINTS[:, 1])
    pattern = 0.4 + np.exp(-(((ecc - 15) / 6) ** 2)) * (FIELD_POINTS[:, 1] > 0)
    tds = 0.3 + rng.normal(0, 1.0) - depth * pattern / pattern.mean() + rng.normal(0, 1.0, len(pattern))
    tds = np.clip(np.round(tds, 2), -35.0, 5.0)
    return float(np.round(tds.mean(), 2)), tds


# ----------------------------------------------------------------------------------------------------- notes

_GLAUCOMA_MEDS = ["latanoprost 0.005% qhs OU", "timolol 0.5% BID OU", "dorzolamide-timolol BID", "brimonidine TID OS",
                  "bimatoprost qhs OU", "netarsudil qhs", "latanoprost and timolol", "s/p SLT OU, on latanoprost"]
_OTHER_MEDS = ["artificial tears PRN", "no ocular medications", "no eye drops", "olopatadine PRN",
               "preservative-free tears QID"]
_HISTORY = ["type 2 diabetes", "hypertension", "hyperlipidemia", "dry eye", "mild cataract OU",
            "pseudophakia OU", "myopia", "migraine", "sleep apnea", "family history of glaucoma"]
_REASONS = ["routine eye exam", "annual dilated exam", "evaluation of the optic nerves", "follow-up of IOP",
            "blurred vision at distance", "referral from optometry for disc cupping", "diabetic eye exam",
            "new glasses and eye check", "follow-up visit", "second opinion on the optic nerves"]
_GLAUCOMA_DX = ["primary open-angle glaucoma", "POAG", "normal-tension glaucoma", "open-angle glaucoma",
                "chronic open-angle glaucoma"]
_NO_DX = ["no glaucoma", "no evidence of glaucoma", "healthy optic nerves, glaucoma ruled out",
          "ocular hypertension without glaucomatous damage", "physiologic cupping, not glaucoma"]
_PLANS = ["RTC 6 months with repeat testing.", "Will review with attending.", "Return in 1 year.",
          "Discussed findings with patient.", "Repeat fields next visit.", "Follow up as scheduled."]
_STAGES = ["mild stage", "moderate stage", "severe stage", "stable", "progressing"]


def _pick(rng: np.random.Generator, options):
    """One element of a sequence, uniformly (faster than Generator.choice for short Python lists)."""
    return options[int(rng.random() * len(options))]


def _race_word(rng: np.random.Generator, race: int) -> str:
    return _pick(rng, [["Asian", "Asian American"], ["Black", "African American"], ["White", "Caucasian"]][race])


def _note(rng: np.random.Generator, s: dict, documentation: float) -> tuple[str, str]:
    """(clinical note, summary <=180 chars) for sample record ``s``.

    The diagnosis (recorded label) is stated only when ``s["reveal"]``; each finding is included with
    probability ``documentation``, so under-documented groups get shorter notes.
    """
    age, female = int(round(s["age"])), s["gender"] == 0
    sex = _pick(rng, ["female", "woman"] if female else ["male", "man"])
    letter = "F" if female else "M"
    who = f"{_race_word(rng, s['race'])} {sex}" if rng.random() < 0.5 else sex
    reveal, y = s["reveal"], s["glaucoma"]
    reason = _pick(rng, ["glaucoma follow-up", "glaucoma check", "POAG management"] if reveal and y else _REASONS)
    opening = _pick(rng, [
        f"{age}-year-old {who} presenting for {reason}.",
        f"Pt is a {age} y/o {who} seen for {reason}.",
        f"{age}{letter} here for {reason}.",
        f"Patient ({age}, {letter}) returns for {reason}.",
        f"This {age} year old {who} comes in for {reason}.",
    ])
    iop = np.clip(np.round(rng.normal(16 + 5 * s["true"], 3.5, 2)), 8, 40).astype(int)
    cd = np.clip(np.round((s["cdr"] + rng.normal(0, 0.05, 2)) * 20) / 20, 0.1, 0.95)
    md = s["md"]
    field_defect = _pick(rng, ["superior arcuate defect.", "superior nasal step.", "paracentral scotoma superiorly."])
    findings = {
        "iop": _pick(rng, [f"IOP {iop[0]}/{iop[1]} mmHg.", f"Tappl {iop[0]} OD, {iop[1]} OS.",
                           f"Intraocular pressures {iop[0]} and {iop[1]}."]),
        "cdr": _pick(rng, [f"C/D {cd[0]:.2f} OD, {cd[1]:.2f} OS.", f"Cup-to-disc ratio {cd.mean():.1f} OU.",
                           f"CDR about {cd[0]:.2f}."]),
        "vf": f"HVF 24-2 MD {md:.1f} dB, " + (field_defect if md < -3 else "reliable, within normal limits."),
        "oct": "OCT RNFL thinning inferiorly." if s["cdr"] > 0.55 else "OCT RNFL within normal limits.",
        "exam": _pick(rng, ["Gonio open to CBB OU.", "Angles open.", "CCT 545/550.", "Lens clear.",
                            "Mild nuclear sclerosis OU.", "Anterior segment quiet."]),
        "history": f"History of {_pick(rng, _HISTORY)}.",
    }
    keep = [k for k in findings if rng.random() < documentation]
    rng.shuffle(keep)
    parts = [opening] + [findings[k] for k in keep]
    if reveal:
        meds = _pick(rng, _GLAUCOMA_MEDS if y else _OTHER_MEDS)
        dx = f"{_pick(rng, _GLAUCOMA_DX)}, {_pick(rng, _STAGES)}" if y else _pick(rng, _NO_DX)
        parts += [f"Meds: {meds}.", _pick(rng, [f"Assessment: {dx}.", f"Impression: {dx}.", f"Dx: {dx}."])]
    parts.append(_pick(rng, _PLANS))
    note = " ".join(parts)

    lead = _pick(rng, [f"The patient, {age}, {sex},", f"{age}-year-old {sex}", f"Patient ({age} y/o {sex})"])
    if reveal:
        summary = f"{lead} {'has' if y else 'shows'} {dx}; meds: {meds}."
    else:
        summary = f"{lead} was seen for {reason}."
    for key in keep:
        if key in ("iop", "cdr", "vf", "oct") and len(summary) + 1 + len(findings[key]) <= 180:
            summary += " " + findings[key]
    return note, summary


# ---------------------------------------------------------------------------------------------- metadata

def _quota(rng: np.random.Generator, n: int, probs: tuple[float, ...], codes: tuple[int, ...]) -> np.ndarray:
    """n codes with counts n*p rounded by largest remainder, in random order (exact proportions per split)."""
    exact = np.asarray(probs) * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.asarray(codes), counts))


def _split_records(cfg: SynthConfig, split_index: int, n: int, first: int) -> list[dict]:
    """Per-sample metadata, labels, CDR, visual field, marker and note for one split (runs in the main process)."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0, split_index)))
    race = _quota(rng, n, cfg.race_probs, (0, 1, 2))
    gender = _quota(rng, n, cfg.gender_probs, (0, 1))
    ethnicity = _quota(rng, n, cfg.ethnicity_probs, ETHNICITY_CODES)
    language = _quota(rng, n, cfg.language_probs, LANGUAGE_CODES)
    marital = _quota(rng, n, cfg.marital_probs, MARITAL_CODES)
    age = np.round(np.clip(rng.normal(cfg.age_mean, cfg.age_sd, n), cfg.age_min, cfg.age_max), 1)
    true = (rng.random(n) < np.asarray(cfg.prevalence)[race]).astype(int)
    flip = rng.random(n) < np.asarray(cfg.label_noise)[race]
    observed = np.where(flip, 1 - true, true)
    cdr = np.clip(rng.normal(np.where(true == 1, cfg.cdr_glaucoma, cfg.cdr_healthy), cfg.cdr_sd), 0.1, 0.9)
    lang_index = np.array([LANGUAGE_CODES.index(c) for c in language])
    reveal = rng.random(n) < np.asarray(cfg.note_reveal)[lang_index]
    in_group = race == cfg.artefact_race if cfg.artefact_race is not None else np.zeros(n, bool)
    p_marker = 0.5 + cfg.artefact_strength * (observed - 0.5) if split_index == 0 else np.full(n, 0.5)
    marker = in_group & (cfg.artefact_strength > 0) & (rng.random(n) < p_marker)
    records = []
    for i in range(n):
        idx = first + i
        r = dict(index=idx, split=SPLITS[split_index], filename=f"data_{idx:05d}.npz", race=int(race[i]),
                 gender=int(gender[i]), ethnicity=int(ethnicity[i]), language=int(language[i]),
                 maritalstatus=int(marital[i]), age=float(age[i]), glaucoma=int(observed[i]), true=int(true[i]),
                 cdr=float(cdr[i]), reveal=bool(reveal[i]), marker=bool(marker[i]))
        srng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2, idx)))
        r["md"], r["tds"] = _visual_field(srng, r["cdr"], r["true"])
        r["note"], r["summary"] = _note(srng, r, min(1.0, cfg.note_reveal[lang_index[i]] + 0.25))
        records.append(r)
    return records


# -------------------------------------------------------------------------------------------- writing

def sample_records(config: SynthConfig = SynthConfig()) -> list[dict]:
    """Every sample's metadata, labels, CDR, visual field, marker flag and note, without rendering images.

    Keys: index, split, filename, race, gender, ethnicity, language, maritalstatus, age, glaucoma (recorded
    label), true (label the image is rendered from), cdr, reveal (note states the diagnosis), marker, md, tds,
    note, summary. Exactly what :func:`generate` writes, at a fraction of the cost.
    """
    records, first = [], 1
    for k, n in enumerate(config.split_sizes.values()):
        records += _split_records(config, k, n, first)
        first += n
    return records


def _write_sample(job: tuple[dict, dict, str]) -> None:
    """Render and save one npz (worker entry point; the image depends only on the seed and sample index)."""
    r, cfg, folder = job
    rng = np.random.default_rng(np.random.SeedSequence(cfg["seed"], spawn_key=(1, r["index"])))
    race = r["race"]
    image, disc, cup = render_fundus(
        rng, r["cdr"], cfg["height"], cfg["width"], cfg["disc_radius"], cfg["disc_scale"][race],
        cfg["brightness"][race], cfg["contrast"][race], cfg["noise"][race], cfg["blur"][race], r["marker"])
    arrays = dict(slo_fundus=image, glaucoma=np.array(r["glaucoma"], dtype=np.int64),
                  **{k: np.array(r[k], dtype=np.int64) for k in ATTRIBUTES},
                  age=np.array(r["age"], dtype=np.float64), md=np.array(r["md"], dtype=np.float64),
                  tds=np.asarray(r["tds"], dtype=np.float64), disc_mask=disc, cup_mask=cup)
    np.savez_compressed(os.path.join(folder, r["split"], r["filename"]), **arrays)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _word(attribute: str, code: int) -> str:
    return ATTRIBUTES[attribute][code].lower()


def _write_tables(folder: Path, records: list[dict]) -> None:
    _write_csv(folder / NOTES_FILE, ["filename", "note", "gpt4_summary"],
               [[r["filename"], r["note"], r["summary"]] for r in records])
    _write_csv(folder / SUMMARY_FILE,
               ["filename", "age", "gender", "race", "ethnicity", "language", "maritalstatus", "note",
                "gpt4_summary", "glaucoma", "use"],
               [[r["filename"], r["age"], _word("gender", r["gender"]), _word("race", r["race"]),
                 _word("ethnicity", r["ethnicity"]), _word("language", r["language"]),
                 _word("maritalstatus", r["maritalstatus"]), r["note"], r["summary"],
                 "yes" if r["glaucoma"] else "no", r["split"].lower()] for r in records])
    _write_csv(folder / TRUTH_FILE,
               ["filename", "use", "glaucoma_true", "glaucoma", "cdr", "marker", "note_reveals_diagnosis"],
               [[r["filename"], r["split"].lower(), r["true"], r["glaucoma"], round(r["cdr"], 4), int(r["marker"]),
                 int(r["reveal"])] for r in records])


def _manifest(cfg: SynthConfig, records: list[dict]) -> dict:
    counts = {s: sum(r["split"] == s for r in records) for s in SPLITS}
    positives = {s: sum(r["glaucoma"] for r in records if r["split"] == s) for s in SPLITS}
    return {"generator": GENERATOR, "version": VERSION, "config": cfg.to_dict(), "counts": counts,
            "glaucoma_positive": positives}


def _existing(out_dir: Path, cfg: SynthConfig) -> dict | None:
    """The manifest in out_dir if it matches cfg; None if out_dir is absent or empty; else a one-line error."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return None
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if manifest and manifest.get("version") == VERSION and manifest.get("config") == cfg.to_dict():
        return manifest
    raise SynthConfigError(f"{out_dir} already holds other data (a different SynthFairVLMed config or version, or "
                           f"not a SynthFairVLMed folder); delete it or choose another folder")


def generate(out_dir: str | os.PathLike, config: SynthConfig = SynthConfig(), workers: int = 2,
             progress: bool = True) -> dict:
    """Generate SynthFairVLMed in ``out_dir`` (FairVLMed layout) and return its manifest.

    Deterministic given ``config.seed`` and independent of ``workers``. Idempotent: if ``out_dir`` already
    holds a dataset generated with the same config it is returned untouched. Atomic: the data are written to
    a temporary sibling folder that is renamed to ``out_dir`` only when complete; the temporary folders of killed
    generations of ``out_dir`` are removed by the next one (:func:`fairbook.files.temporary_sibling`).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    found = _existing(out_dir, config)
    if found is not None:
        return found
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out_dir)  # also removes what killed generations of this folder left behind
    tmp.mkdir()
    try:
        for split in SPLITS:
            (tmp / split).mkdir()
        records = sample_records(config)
        cfg = dataclasses.asdict(config)
        jobs = [(r, cfg, str(tmp)) for r in records]
        bar = tqdm(total=len(jobs), desc="SynthFairVLMed", unit="img", disable=not progress)
        if workers <= 1:
            for job in jobs:
                _write_sample(job)
                bar.update()
        else:
            with multiprocessing.Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_sample, jobs, chunksize=16):
                    bar.update()
        bar.close()
        _write_tables(tmp, records)
        manifest = _manifest(config, records)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked by _existing); a concurrent writer makes this fail loudly
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest of a generated folder (``synthetic.json``)."""
    return json.loads((Path(out_dir) / MANIFEST).read_text())


# ----------------------------------------------------------------------------------------- pretraining corpus
def pretrain_val_size(n_train: int) -> int:
    """Validation samples of :func:`pretrain_corpus` for ``n_train`` training samples: ``n_train // 4`` clipped to
    [64, 500] (enough for a stable validation AUC, small enough to stay cheap)."""
    return min(500, max(64, int(n_train) // 4))


#: Test samples of a pretraining corpus: the FairVLMed layout needs a test split; the pretraining never reads it.
PRETRAIN_TEST_SIZE = 32


def pretrain_corpus(seed: int, n_train: int, root: str | os.PathLike = "data", workers: int = 2) -> Path:
    """Write (or reuse) a SynthFairVLMed corpus for contrastive pretraining of a CLIP and return its folder.

    The corpus is the generator's default population (:class:`fairbook.data.synthetic.SynthConfig`, bias preset
    ``"default"``) drawn with its own ``seed``: ``n_train`` training samples, :func:`pretrain_val_size` validation
    samples (for choosing the epoch) and :data:`PRETRAIN_TEST_SIZE` test samples (never read). With a seed other
    than the evaluation data's, every image, note and label is an independent draw, so the corpus shares no
    sample with the evaluation data. The folder is ``<root>/synth-pretrain-<seed>-<n_train>`` (a relative
    ``root`` starts at the checkout); :func:`fairbook.data.synthetic.generate` is idempotent, so a folder written
    earlier with the same settings is reused as it is.
    """
    config = SynthConfig.preset("default", seed=int(seed), n_train=int(n_train),
                                n_val=pretrain_val_size(n_train), n_test=PRETRAIN_TEST_SIZE)
    folder = resolve(root) / f"synth-pretrain-{int(seed)}-{int(n_train)}"
    generate(folder, config, workers=workers, progress=False)
    return folder


__all__ = ["SynthConfig", "SynthConfigError", "PRESETS", "generate", "sample_records", "render_fundus", "load_manifest",
           "FIELD_POINTS", "load_truth", "marker_box", "marker_mask", "note_reveal_shares", "PRETRAIN_TEST_SIZE",
           "pretrain_corpus", "pretrain_val_size"]
