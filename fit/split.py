"""The honest split: train / calibration / test, stratified by class, grouped, seeded.

train        trains the trunk (and nothing else)
calibration  builds the reference set, sets the threshold, chooses the candidate
test         only measured: every figure `station fit` reports comes from here

Near-duplicate groups (fit.data_check) go whole to one part. Within each class
the groups are shuffled with the seed and each goes to the part furthest below
its share, ties to test first, then calibration: a class of three lands once in
each part, so small defect classes are measured where it matters.
"""

from __future__ import annotations

import numpy as np

from station.core.errors import DataError
from station.core.imagefolder import LabeledImage

PARTS = ("train", "calibration", "test")
DEFAULT_FRACTIONS = {"train": 0.6, "calibration": 0.2, "test": 0.2}
_TIE_ORDER = ("test", "calibration", "train")


def split_parts(
    items: list[LabeledImage], groups: np.ndarray, seed: int, fractions: dict[str, float] = DEFAULT_FRACTIONS
) -> list[str]:
    """The part of each item (same order as items)."""
    groups = np.asarray(groups)
    sizes = np.bincount(groups)
    group_class = {int(g): items[int(np.flatnonzero(groups == g)[0])].defect_class for g in np.unique(groups)}
    rng = np.random.default_rng([seed, 15])
    part_of_group: dict[int, str] = {}
    for name in sorted(set(group_class.values())):
        members = rng.permutation(sorted(g for g, c in group_class.items() if c == name))
        total = float(sum(sizes[g] for g in members))
        filled = dict.fromkeys(PARTS, 0.0)
        for g in members:
            part = max(
                _TIE_ORDER, key=lambda p: (1.0 - filled[p] / (fractions[p] * total)) if fractions[p] else -np.inf
            )
            part_of_group[int(g)] = part
            filled[part] += sizes[g]
    return [part_of_group[int(g)] for g in groups]


def select(items: list, parts: list[str], part: str) -> list:
    return [item for item, p in zip(items, parts) if p == part]


def require_goods(items: list[LabeledImage], parts: list[str]):
    for part in PARTS:
        if not any(not item.is_defect for item in select(items, parts, part)):
            raise DataError(f"the {part} part of the split has no good parts; add good parts")


def split_table(items: list[LabeledImage], parts: list[str]) -> dict[str, dict[str, int]]:
    """Images per class in each part, for the summary and fit.json."""
    table: dict[str, dict[str, int]] = {part: {} for part in PARTS}
    for item, part in zip(items, parts):
        table[part][item.defect_class] = table[part].get(item.defect_class, 0) + 1
    return {part: dict(sorted(counts.items())) for part, counts in table.items()}
