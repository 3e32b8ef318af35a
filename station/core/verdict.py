"""From scores to verdicts: the verdict words (OK, NG) are defined here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from station.core.preprocess import InputSpec, Roi, box_in_frame
from station.core.scoring import PositionReference, distances, is_defect, locate_worst, position_scores

OK, NG = "OK", "NG"


@dataclass(frozen=True)
class WorstPosition:
    """Where a per-position model finds a part least like the good ones: a cell of its feature map.

    `row`, `col`: the worst cell; `box`: where the departure is centred (scoring.locate_worst), 1.5
    strides wide, in model-input pixels (x0, y0, x1, y1); `roi`: the region the crop came from (None:
    the whole frame), so `in_frame` can say where it is on the camera's picture.
    """

    index: int  # row-major position in the map
    row: int
    col: int
    box: tuple[int, int, int, int]
    spec: InputSpec
    roi: Roi | None = None

    def in_frame(self, frame_shape: tuple) -> tuple[int, int, int, int]:
        """(x, y, width, height) in frame pixels (station/core/preprocess.py: box_in_frame)."""
        return box_in_frame(self.box, self.spec, self.roi, frame_shape)


@dataclass(frozen=True)
class Judgement:
    verdict: str
    score: float
    distances: dict[str, float]
    position: WorstPosition | None = None  # per-position models only


def judge(
    embeddings: np.ndarray, reference_set, spec: InputSpec | None = None, roi: Roi | None = None
) -> list[Judgement]:
    """One judgement per embedding row, all metrics computed in one vectorized pass.

    A per-position reference set also names each part's worst position; `spec` (the model's input)
    and `roi` (where the crops were cut) place it on the frame.
    """
    if isinstance(reference_set.model, PositionReference):
        return _judge_positions(embeddings, reference_set, spec, roi)
    all_distances = distances(embeddings, reference_set.model)
    scores = all_distances[reference_set.metric]
    flagged = is_defect(scores, reference_set.threshold)
    names = list(all_distances)
    columns = np.column_stack([all_distances[name] for name in names]).tolist()
    return [
        Judgement(NG if bad else OK, float(value), dict(zip(names, row)))
        for bad, value, row in zip(flagged.tolist(), scores.tolist(), columns)
    ]


def _judge_positions(embeddings, reference_set, spec: InputSpec | None, roi: Roi | None) -> list[Judgement]:
    model: PositionReference = reference_set.model
    worst = position_scores(embeddings, model)
    flagged = is_defect(worst.score, reference_set.threshold)
    grid = model.grid
    spec = spec or InputSpec(width=grid.cols * grid.stride, height=grid.rows * grid.stride, layout="nchw")
    out = []
    for bad, value, index, distances_ in zip(
        flagged.tolist(), worst.score.tolist(), worst.index.tolist(), worst.per_position
    ):
        row, col = divmod(index, grid.cols)
        centre = locate_worst(distances_, model.typical, grid)
        place = WorstPosition(index, row, col, grid.box_around(*centre, spec), spec, roi)
        out.append(Judgement(NG if bad else OK, float(value), {"position": float(value)}, place))
    return out
