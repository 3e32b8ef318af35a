"""Input sizes of the pretrained candidates: the photos' aspect ratio, sides multiples of the stride.

The first pretrained input is about PRETRAINED_AREA pixels whatever the photos' size (a short budget
measures it early, and small photos are enlarged to it). Above it, a ladder of larger inputs, each
about LADDER_RATIO^2 times the pixels of the one before, the photos' own size (sides floored to a
multiple of the stride) last, never above it: a larger input helped the pretrained trunk (docs/fit.md).
Which of them run is decided by the budget (they come last in the list, cheapest first) and by
--max-ms-per-part (each one's cost is measured before it trains: fit/candidates.py).
"""

from __future__ import annotations

import math

PRETRAINED_AREA = 96 * 96
PRETRAINED_STEP = 16  # the backbone's stride at the cut
LADDER_RATIO = 5 / 3  # in side: 96 -> 160 -> 267 -> 444 pixels for square photos
# A rung must add at least this share of pixels to the one below it: a near copy costs a training
# and gives the choice one more chance to pick noise.
MIN_GAIN = 1.3


def pretrained_size(
    native_size: tuple[int, int], area: float = PRETRAINED_AREA, within: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(width, height) of about `area` pixels in the photos' aspect ratio, sides multiples of 16
    (at least 32), each at most `within`'s when given."""
    width, height = native_size
    scale = math.sqrt(area / max(width * height, 1))
    sides = [
        max(PRETRAINED_STEP * 2, PRETRAINED_STEP * round(side * scale / PRETRAINED_STEP)) for side in (width, height)
    ]
    if within is not None:
        sides = [min(side, limit) for side, limit in zip(sides, within)]
    return tuple(sides)


def native_ceiling(native_size: tuple[int, int]) -> tuple[int, int]:
    """The photos' own size, each side floored to a multiple of the stride (at least 32)."""
    return tuple(max(PRETRAINED_STEP * 2, PRETRAINED_STEP * (side // PRETRAINED_STEP)) for side in native_size)


def larger_pretrained_sizes(native_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The ladder above pretrained_size(native_size), smallest first, the photos' own size last."""
    top = native_ceiling(native_size)
    top_area = top[0] * top[1]
    below = pretrained_size(native_size)
    sizes, area = [], float(PRETRAINED_AREA)
    while True:
        area *= LADDER_RATIO**2
        size = pretrained_size(native_size, area, within=top)
        if size[0] * size[1] * MIN_GAIN > top_area:  # the photos' own size takes this rung's place
            break
        if size[0] * size[1] >= MIN_GAIN * below[0] * below[1]:
            sizes.append(size)
            below = size
    if top_area >= MIN_GAIN * below[0] * below[1]:
        sizes.append(top)
    return sizes
