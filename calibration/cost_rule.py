"""The least-expected-cost cut between good and defective parts' scores, smoothed (calibration/thresholds.py:
cost_threshold checks its arguments and owns the rule's defaults)."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


def smoothed_cost_cut(good_scores, defect_scores, defect_rate: float, escape_cost: float) -> tuple[float, float]:
    """(threshold, cost) of least (1 - p) FRR + p c ER, each score smeared by a Gaussian kernel in
    log-score space (`class_widths`); NaN/inf scores count as highest."""
    good, good_inf = _log_scores(good_scores)
    defect, defect_inf = _log_scores(defect_scores)
    width_g, width_d = class_widths(good, defect)
    both = np.concatenate([good, defect])
    if both.size == 0:  # every score infinite: no cut separates anything
        return float("inf"), 1.0 - defect_rate
    grid = np.linspace(both.min() - 3 * width_g, both.max() + 3 * width_d, 4001)
    false_reject = (norm.sf((grid[:, None] - good[None, :]) / width_g).sum(axis=1) + good_inf) / max(
        len(good) + good_inf, 1
    )
    escape = norm.cdf((grid[:, None] - defect[None, :]) / width_d).sum(axis=1) / max(len(defect) + defect_inf, 1)
    costs = (1.0 - defect_rate) * false_reject + defect_rate * escape_cost * escape
    best = int(np.argmin(costs))
    return float(np.exp(grid[best])), float(costs[best])


def kernel_widths(good_scores, defect_scores) -> tuple[float, float]:
    """The kernels' widths (log space) `smoothed_cost_cut` smears the two classes' scores with."""
    return class_widths(_log_scores(good_scores)[0], _log_scores(defect_scores)[0])


def _log_scores(scores) -> tuple[np.ndarray, int]:
    values = np.asarray(scores, dtype=float)
    finite = np.isfinite(values)
    return np.log(np.maximum(values[finite], 1e-12)), int((~finite).sum())


def class_widths(good_log: np.ndarray, defect_log: np.ndarray) -> tuple[float, float]:
    """Kernel widths of the good and the defect scores (log space): Silverman's rule for each class,
    0.9 * spread * n ** -0.2 with the class's own n, but the spread of the good parts for both.

    Silverman's rule assumes one Gaussian-like sample. The good parts are one kind and several times
    more numerous; the defects mix kinds, some the metric cannot see: their own spread measures the
    gap between those kinds, not how far a new defect's score strays from a seen one, and smeared
    the defects that score inside the good parts into the cut (docs/fit.md: 3 of 14 held-out defects
    among the goods made the defect kernel 6.7 times the goods' and the threshold rejected 14.7 % of
    new good parts). The fewer defects, the wider their kernel still (the n ** -0.2). Without two
    finite good scores each class falls back to its own spread (`_bandwidth`).
    """
    if good_log.size < 2:
        return _bandwidth(good_log), _bandwidth(defect_log)
    spread = _spread(good_log)
    return _width(spread, good_log.size), _width(spread, max(defect_log.size, 1))


def _bandwidth(log_scores: np.ndarray) -> float:
    """Silverman's rule of thumb on a class's own spread, never zero (1 without scores: they are all infinite)."""
    if log_scores.size < 2:
        return 1.0
    return _width(_spread(log_scores), log_scores.size)


def _spread(log_scores: np.ndarray) -> float:
    """Silverman's robust spread: the smaller of the standard deviation and the quartile range / 1.34."""
    spread = np.std(log_scores)
    quartiles = np.subtract(*np.percentile(log_scores, [75, 25])) / 1.34
    return float(min(spread, quartiles) if quartiles > 0 else spread)


def _width(spread: float, n: int) -> float:
    return max(0.9 * spread * n**-0.2, 1e-3)
