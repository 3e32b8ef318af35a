"""Tiles: a large part's region cut into a grid of overlapping tiles, each judged at the model's input.

A small defect on a large part is a few pixels once the whole region is shrunk to the model's input
(a crack on a 500x1260 commutator photo is a pixel wide at 96x96). Cut into tiles of about the
model's input size, the part is seen at (or near) its own resolution, each tile judged like a
region of `rois:` (station/runtime/regions.py): all tiles of a part in one embedder call, one
verdict per part, NG when any tile is.

The grid covers the region fully: tiles start every stride from the region's left (top) edge, and
when the last one does not end on the right (bottom) edge one more is added flush with it, so the
last overlap may be larger than the others. Everything here is shared by the station, calibration
and `station fit`, so the tiles calibrated on are the tiles judged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from station.core.errors import DataError
from station.core.preprocess import InputSpec, Roi, prepare_crop

# A part of 1260x500 pixels in 64x64 tiles at stride 48 has 26x10 = 260; more than this is a
# configuration mistake (a tile of a few pixels), not a part.
MAX_TILES = 1024
RECORD_KEY = "tiles"  # the reference set's statistics key holding the geometry it was calibrated on


@dataclass(frozen=True)
class TileGeometry:
    """Tiles of width x height pixels every stride_x, stride_y pixels over a region_width x region_height region."""

    width: int
    height: int
    stride_x: int
    stride_y: int
    region_width: int
    region_height: int

    def __post_init__(self):
        problem = geometry_problem(
            self.width, self.height, self.stride_x, self.stride_y, self.region_width, self.region_height
        )
        if problem:
            raise DataError(problem)

    @property
    def columns(self) -> tuple[int, ...]:
        return _starts(self.region_width, self.width, self.stride_x)

    @property
    def rows(self) -> tuple[int, ...]:
        return _starts(self.region_height, self.height, self.stride_y)

    @property
    def count(self) -> int:
        return len(self.columns) * len(self.rows)

    def tiles(self, origin_x: int = 0, origin_y: int = 0) -> list[tuple[str, Roi]]:
        """(name, Roi) of every tile, row-major, in the pixels of a frame whose region starts at the origin."""
        return [
            (tile_name(r, c), Roi(origin_x + x, origin_y + y, self.width, self.height))
            for r, y in enumerate(self.rows)
            for c, x in enumerate(self.columns)
        ]

    def record(self) -> dict:
        """What a reference set keeps of the geometry it was calibrated on (reference.yaml)."""
        return {
            "width": self.width,
            "height": self.height,
            "stride_x": self.stride_x,
            "stride_y": self.stride_y,
            "region_width": self.region_width,
            "region_height": self.region_height,
            "count": self.count,
        }

    def text(self) -> str:
        return (
            f"{self.count} tiles of {self.width}x{self.height} at stride {self.stride_x}x{self.stride_y} "
            f"over a {self.region_width}x{self.region_height} region"
        )


def tile_name(row: int, col: int) -> str:
    return f"tile-r{row}c{col}"


def _starts(extent: int, size: int, stride: int) -> tuple[int, ...]:
    starts = list(range(0, extent - size + 1, stride))
    if starts[-1] != extent - size:  # the last tile flush with the edge: the region is covered fully
        starts.append(extent - size)
    return tuple(starts)


def geometry_problem(
    width: int, height: int, stride_x: int, stride_y: int, region_width: int, region_height: int
) -> str | None:
    """Why these tiles cannot cover the region (None when they can); worded with the configuration's keys."""
    for key, value in (("width", width), ("height", height), ("stride_x", stride_x), ("stride_y", stride_y)):
        if value < 1:
            return f"{key} must be at least 1, got {value}"
    if width > region_width or height > region_height:
        return (
            f"a {width}x{height} tile is larger than the {region_width}x{region_height} region it cuts: "
            "give tiles no larger than the roi"
        )
    if stride_x > width or stride_y > height:
        return (
            f"stride {stride_x}x{stride_y} is larger than the {width}x{height} tile: the tiles would leave "
            "gaps, and a defect in a gap is never judged"
        )
    count = len(_starts(region_width, width, stride_x)) * len(_starts(region_height, height, stride_y))
    if count > MAX_TILES:
        return f"these tiles would cut the region into {count}, more than {MAX_TILES}: give larger tiles or strides"
    return None


def crop_tiles(image: np.ndarray, spec: InputSpec, rois: list[Roi]) -> np.ndarray:
    """Every tile's model-size crop (tiles, height, width) uint8: prepare_crop per tile, the one path."""
    return np.stack([prepare_crop(image, spec, roi) for roi in rois])


def split_tiles(pictures: np.ndarray, count: int) -> np.ndarray:
    """(parts, height, count*width) side-by-side tiles -> (parts*count, height, width), part-major."""
    parts, height, total = pictures.shape
    width = total // count
    return pictures.reshape(parts, height, count, width).transpose(0, 2, 1, 3).reshape(parts * count, height, width)


def recorded_geometry(statistics: dict) -> dict | None:
    """The tile geometry a reference set was calibrated on (None: whole regions)."""
    record = (statistics or {}).get(RECORD_KEY)
    return dict(record) if isinstance(record, dict) else None


def reference_geometry_problem(statistics: dict, geometry: TileGeometry | None, where: str) -> str | None:
    """Why a reference set cannot judge parts cut this way: its scores and threshold hold only for the
    geometry it was calibrated on (a tile's score depends on what a tile shows, a part's maximum on
    how many tiles there are). None when it can."""
    recorded = recorded_geometry(statistics)
    if geometry is None:
        if recorded is None:
            return None
        return (
            f"{where} was calibrated on tiles ({_said(recorded)}) but this station judges whole regions: "
            "add the same tiles: to the configuration, or recalibrate on whole parts"
        )
    if recorded is None:
        return (
            f"{where} was calibrated on whole parts, not tiles, but this station cuts {geometry.text()}: "
            "recalibrate with these tiles (station calibrate -c station.yaml)"
        )
    wanted = geometry.record()
    if {k: recorded.get(k) for k in wanted} != wanted:
        return (
            f"{where} was calibrated on {_said(recorded)}, but this station cuts {geometry.text()}: "
            "make tiles: and roi: as they were, or recalibrate with these"
        )
    return None


def _said(record: dict) -> str:
    try:
        return TileGeometry(
            *(int(record[k]) for k in ("width", "height", "stride_x", "stride_y", "region_width", "region_height"))
        ).text()
    except (KeyError, TypeError, ValueError, DataError):
        return f"tiles {record}"
