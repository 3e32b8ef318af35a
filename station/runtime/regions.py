"""Several named regions of one part (`rois:`), judged in ONE embedder call, one verdict per part.

The regions' crops sit side by side in one uint8 picture per frame (height x
regions*width): the daemon, the presence gate and the crop keeper handle it as
they handle a single crop, and a kept NG picture shows every region. Judging
splits it back into one crop per region, embeds every region of every frame in
one batch (the model is batch-independent: a region's score is the same alone
and in the batch), and scores each region against its own product's reference set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from station.core import reference_set as reference_sets
from station.core.preprocess import Roi, prepare_crop
from station.core.tiles import split_tiles
from station.core.verdict import NG, OK, WorstPosition, judge


@dataclass(frozen=True)
class Region:
    name: str
    roi: Roi
    product: str
    reference_set: reference_sets.ReferenceSet


@dataclass(frozen=True)
class RegionJudgement:
    name: str
    product: str
    verdict: str
    score: float
    distances: dict[str, float]
    threshold: float
    metric: str
    reference: int  # reference set version
    position: WorstPosition | None = None  # per-position models: the region's worst cell, placed in its own ROI
    roi: Roi | None = None  # where the region is in the frame (a verdict names its worst region's)


@dataclass(frozen=True)
class PartJudgement:
    """A part judged region by region: NG when any region is NG. verdict, score and distances (and the
    message's threshold, metric and reference) are those of the region furthest past, or nearest to, its threshold."""

    verdict: str
    score: float
    distances: dict[str, float]
    worst: RegionJudgement
    regions: tuple[RegionJudgement, ...]

    @property
    def position(self) -> WorstPosition | None:
        """The worst region's worst position (per-position models), as a single crop's judgement has it."""
        return self.worst.position


def _margin(region: RegionJudgement) -> float:
    """How far past its threshold a region is, relative to it (non-finite scores are the furthest)."""
    if not math.isfinite(region.score):
        return math.inf
    return (region.score - region.threshold) / (abs(region.threshold) or 1.0)


def part_judgement(regions: list[RegionJudgement]) -> PartJudgement:
    worst = max(regions, key=lambda r: (r.verdict == NG, _margin(r)))
    verdict = NG if any(r.verdict == NG for r in regions) else OK
    return PartJudgement(verdict, worst.score, worst.distances, worst, tuple(regions))


def bounding_roi(regions: tuple[Region, ...]) -> Roi:
    """The box around every region: it fits a frame exactly when every region does."""
    x, y = min(r.roi.x for r in regions), min(r.roi.y for r in regions)
    right = max(r.roi.x + r.roi.width for r in regions)
    bottom = max(r.roi.y + r.roi.height for r in regions)
    return Roi(x, y, right - x, bottom - y)


def crop_regions(image: np.ndarray, spec, regions: tuple[Region, ...]) -> np.ndarray:
    """Every region's model-size crop, side by side: (height, regions * width) uint8."""
    return np.hstack([prepare_crop(image, spec, region.roi) for region in regions])


def split_crops(pictures: np.ndarray, count: int) -> np.ndarray:
    """(frames, height, count*width) side-by-side crops -> (frames*count, height, width), frame-major."""
    return split_tiles(pictures, count)  # the one split, shared with the calibration of tiles


def judge_regions(embeddings: np.ndarray, regions: tuple[Region, ...], spec=None) -> list[PartJudgement]:
    """(frames*regions, dim) embeddings, frame-major -> one PartJudgement per frame.
    Regions of one product are scored together, in one vectorized pass per reference set; `spec`
    (the model's input) places a per-position model's worst cell in each region's ROI."""
    count = len(regions)
    frames = len(embeddings) // count
    per_frame: list[list] = [[None] * count for _ in range(frames)]
    by_product: dict[str, list[int]] = {}
    for index, region in enumerate(regions):
        by_product.setdefault(region.product, []).append(index)
    for indices in by_product.values():
        references = regions[indices[0]].reference_set
        rows = (np.arange(frames)[:, None] * count + np.asarray(indices)[None, :]).reshape(-1)
        for row, judgement in zip(rows.tolist(), judge(embeddings[rows], references, spec)):
            frame, index = divmod(row, count)
            position = judgement.position and replace(judgement.position, roi=regions[index].roi)  # its own ROI
            per_frame[frame][index] = RegionJudgement(
                regions[index].name,
                regions[index].product,
                judgement.verdict,
                judgement.score,
                judgement.distances,
                references.threshold,
                references.metric,
                references.version,
                position,
                regions[index].roi,
            )
    return [part_judgement(judgements) for judgements in per_frame]
