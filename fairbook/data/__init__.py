"""Data: Harvard-FairVLMed attribute codes, the real-data loader, the SynthFairVLMed generator and summaries; the
Harvard-FairSeg layout for segmentation (:mod:`fairbook.data.fairseg`)."""
from fairbook.data import fairseg
from fairbook.data.attributes import (
    ATTRIBUTES,
    BINARY_ATTRIBUTES,
    FILTER_ATTRIBUTES,
    ITEM_ATTRIBUTES,
    SPLITS,
    UNKNOWN,
    binarise,
    check_attribute,
    decode,
    source_attribute,
)
from fairbook.data.fairvlmed import (
    DataError,
    FairVLMed,
    check,
    describe,
    format_check,
    load_metadata,
    load_pixels,
    read_notes,
    truncate_note,
)
from fairbook.data.summary import (
    group_table,
    image_statistics,
    intersection_table,
    note_lengths,
    split_table,
    vertical_cdr,
    wilson_interval,
)
from fairbook.data.synthetic import SynthConfig, generate
