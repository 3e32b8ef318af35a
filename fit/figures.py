"""The report a quality engineer looks at, from the TEST part only."""

from __future__ import annotations

import numpy as np

from calibration import report
from calibration.evaluate import Evaluation
from station.core.imagefolder import read_image

WORST_PARTS = 24
ENLARGE = 4  # each stored pixel becomes a 4x4 square (nearest-neighbour)


def test_report(evaluation: Evaluation, paths: list) -> dict[str, bytes]:
    """roc.png (0-5 % false rejects), histogram.png (log counts, escapes marked), worst_parts.png."""
    truth = evaluation.is_defect_truth
    files = {
        "histogram.png": report.log_histogram(
            evaluation.scores,
            evaluation.classes,
            evaluation.threshold,
            evaluation.metric,
            title=f"{evaluation.metric} scores of the held-out test parts",
        )
    }
    if truth.any() and (~truth).any():
        files["roc.png"] = report.roc_zoomed(
            evaluation.scores[~truth],
            evaluation.scores[truth],
            evaluation.threshold,
            title="ROC of the held-out test parts",
        )
    picks = worst_parts(evaluation)
    captions = [
        f"{evaluation.classes[i]} {evaluation.scores[i]:.3g}{' ESC' if truth[i] and not _flagged(evaluation, i) else ''}"
        f"\n{paths[i].name}"
        for i in picks
    ]
    files["worst_parts.png"] = report.native_sheet([read_image(paths[i]) for i in picks], captions, scale=ENLARGE)
    return files


def _flagged(evaluation: Evaluation, index: int) -> bool:
    return not evaluation.scores[index] <= evaluation.threshold


def worst_parts(evaluation: Evaluation, count: int = WORST_PARTS) -> list[int]:
    """Escapes and the lowest-scoring defects, then the highest-scoring good parts."""
    truth = evaluation.is_defect_truth
    order = np.argsort(np.nan_to_num(evaluation.scores, nan=np.inf, posinf=np.inf), kind="stable")
    defects = [int(i) for i in order if truth[i]]
    goods = [int(i) for i in order[::-1] if not truth[i]]
    half = count // 2 if defects else 0
    return defects[:half] + goods[: count - min(half, len(defects))]
