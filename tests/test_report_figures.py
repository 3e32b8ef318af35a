"""The report's figures count every tested part, those whose score is not finite in their own bin."""

from __future__ import annotations

import numpy as np
import pytest

from calibration import report


@pytest.mark.parametrize(
    "scores",
    [
        np.array([0.1, 0.2, 0.3, np.nan, np.inf, 0.25, np.nan]),
        np.array([np.nan, np.nan, np.inf]),  # no finite score at all
        np.array([-3.0, -2.0, -2.5]),  # negative scores (log_beta): bins must still span them
    ],
)
def test_every_score_falls_in_a_bin(scores):
    bins = report.ScoreBins(scores, threshold=0.22, count=20)
    counts, _ = np.histogram(bins.place(scores), bins=bins.edges)
    assert counts.sum() == len(scores)
    not_finite = int(np.sum(~np.isfinite(scores)))
    assert counts[-1] == not_finite if not_finite else bins.edges[-1] > max(scores.max(), 0.22)


def test_histograms_label_the_parts_that_are_not_finite():
    # The commutators' test part: 10 defects, 5 of them and 1 good part with an infinite SOART3 score.
    good = np.concatenate([np.linspace(0.1, 0.3, 49), [np.inf]])
    defect = np.concatenate([np.linspace(0.5, 0.9, 5), [np.nan, np.inf, np.nan, np.inf, np.nan]])
    assert report.ScoreBins.label("defect", defect) == "defect (n=10, 5 not finite)"
    assert report.ScoreBins.label("good", good) == "good (n=50, 1 not finite)"
    scores = np.concatenate([good, defect])
    classes = ["good"] * 50 + ["crack"] * 10
    for draw in (report.score_histogram, report.log_histogram):
        png = draw(scores, classes, threshold=0.35, metric="soart3")
        assert png.startswith(b"\x89PNG") and len(png) > 5000
