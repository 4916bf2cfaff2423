"""Are the saved predictions of two run folders the same? The check behind "a refactor changed no result".

    python bench/compare_runs.py BEFORE_RUN_DIR AFTER_RUN_DIR [...more pairs]

Prints one line per run pair (models compared, byte-identical CSVs, largest |difference| of y_score) and every
(method, attribute, seed, split) that differs or exists on one side only (:func:`fairbook.results.compare_runs`).
Exits 1 when any prediction differs.
"""
from __future__ import annotations

import sys

from fairbook.results import compare_runs


def main(paths: list[str]) -> int:
    if len(paths) < 2 or len(paths) % 2:
        print(__doc__)
        return 2
    differs = False
    for before, after in zip(paths[::2], paths[1::2]):
        table = compare_runs(before, after)
        same = table["identical"].sum()
        print(f"{before} vs {after}: {len(table)} prediction files, {same} byte-identical, "
              f"max |diff| {table['max_abs_diff'].max():.3g}")
        bad = table[~table["identical"]]
        if len(bad):
            differs = True
            print(bad.to_string(index=False))
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
