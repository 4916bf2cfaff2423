"""Harvard-FairVLMed attribute codes and their names.

The codes are those of the official npz files (see the FairCLIP release): scalars stored as 0-d arrays.
``-1`` means unknown wherever it occurs. The official evaluation drops validation and test samples whose
race, gender, ethnicity or language is unknown; :data:`FILTER_ATTRIBUTES` lists those four.
"""
from __future__ import annotations

UNKNOWN = -1

ATTRIBUTES: dict[str, dict[int, str]] = {
    "race": {0: "Asian", 1: "Black", 2: "White"},
    "gender": {0: "Female", 1: "Male"},
    "ethnicity": {0: "Non-Hispanic", 1: "Hispanic", -1: "Unknown"},
    "language": {0: "English", 1: "Spanish", 2: "Other", -1: "Unknown"},
    "maritalstatus": {
        0: "Married/Partnered", 1: "Single", 2: "Divorced", 3: "Widowed",
        4: "Legally Separated", -1: "Unknown",
    },
}

#: Attributes the official code uses to drop validation/test samples with an unknown value.
FILTER_ATTRIBUTES = ("race", "gender", "ethnicity", "language")

#: Keys every official npz carries (``note``/``note_extra`` are often missing upstream and never required).
REQUIRED_NPZ_KEYS = (
    "slo_fundus", "glaucoma", "race", "gender", "ethnicity", "language", "maritalstatus", "age", "md", "tds",
)

#: What a FairVLMed item's ``attributes`` row holds: the codes of the four attributes, then the age in whole years
#: (rounded down, so ``age >= 60`` is unchanged).
ITEM_ATTRIBUTES = (*FILTER_ATTRIBUTES, "age")

#: FairMedFM's binary attributes (Jin et al., NeurIPS 2024 D&B, Sec. 4 and App. C): name -> (FairVLMed attribute,
#: the group kept; every other value, unknown included, becomes "non-<group>"; a number is an age cut-off). Sex is
#: gender as it is (Female, Male); race is White / non-White; language is English / non-English, and FairMedFM's code
#: puts an unknown language in non-English; age is ">= 60" / "< 60" as the paper states it (the released
#: preprocessing puts 60 itself in the younger group).
BINARY_ATTRIBUTES: dict[str, tuple[str, str | int | None]] = {
    "sex": ("gender", None), "age-60": ("age", 60), "race-binary": ("race", "White"),
    "language-binary": ("language", "English"),
}

SPLITS = ("Training", "Validation", "Test")
#: Some upstream scripts call the test folder ``Testing``; both are accepted.
SPLIT_ALIASES = {"Test": ("Test", "Testing")}
#: The release names the notes file ``gpt-4_summarized_notes.csv``; upstream scripts default to the other name.
NOTES_FILES = ("gpt-4_summarized_notes.csv", "gpt4_summarized_notes.csv")


def check_attribute(name: str) -> str:
    """Return ``name`` if it is a known attribute, else raise a one-line error listing the valid ones."""
    if name not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {name!r}; choose one of: {', '.join(ATTRIBUTES)}")
    return name


def source_attribute(name: str) -> str:
    """The FairVLMed attribute behind ``name``: itself, or the one a binary attribute is made from
    (``source_attribute("sex") == "gender"``)."""
    return BINARY_ATTRIBUTES[name][0] if name in BINARY_ATTRIBUTES else name


def binarise(name: str, labels) -> list[str]:
    """Group names of a binary attribute (:data:`BINARY_ATTRIBUTES`) from the names of its source attribute, e.g.
    ``binarise("race-binary", ["Asian", "White"]) == ["non-White", "White"]``."""
    if name not in BINARY_ATTRIBUTES:
        raise ValueError(f"unknown binary attribute {name!r}; choose one of: {', '.join(BINARY_ATTRIBUTES)}")
    kept = BINARY_ATTRIBUTES[name][1]
    if isinstance(kept, int):
        return [f">= {kept}" if float(v) >= kept else f"< {kept}" for v in labels]
    return [str(v) if kept is None else (kept if v == kept else f"non-{kept}") for v in labels]


def decode(attribute: str, code: int) -> str:
    """Name of an attribute code, e.g. ``decode("race", 1) == "Black"``; an age is its number of years."""
    if attribute == "age":
        return str(int(code))
    table = ATTRIBUTES[check_attribute(attribute)]
    if int(code) not in table:
        raise ValueError(f"code {code} is not valid for {attribute!r}; valid codes: {sorted(table)}")
    return table[int(code)]
