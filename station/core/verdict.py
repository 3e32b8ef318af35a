"""From scores to verdicts: the verdict words (OK, NG) are defined here and nowhere else."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from station.core.scoring import distances, is_defect

OK, NG = "OK", "NG"


@dataclass(frozen=True)
class Judgement:
    verdict: str
    score: float
    distances: dict[str, float]


def judge(embeddings: np.ndarray, reference_set) -> list[Judgement]:
    """One judgement per embedding row, all metrics computed in one vectorized pass."""
    all_distances = distances(embeddings, reference_set.model)
    scores = all_distances[reference_set.metric]
    flagged = is_defect(scores, reference_set.threshold)
    names = list(all_distances)
    columns = np.column_stack([all_distances[name] for name in names]).tolist()
    return [
        Judgement(NG if bad else OK, float(value), dict(zip(names, row)))
        for bad, value, row in zip(flagged.tolist(), scores.tolist(), columns)
    ]
