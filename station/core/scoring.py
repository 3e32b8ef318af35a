"""Scores of part embeddings against a reference: higher means less like the good parts.

Three scores, each a distance from what known-good parts look like:
- ``minkowski``: p=4 distance from the reference vector (mean good embedding);
- ``mahalanobis``: distance from the good parts, scaled by their (shrunk) covariance;
- ``soart3``: the RT method: the Mahalanobis distance of a part's SOART3 features
  (log_beta, eta, gamma) from the good parts' "unit space". A part whose log_beta
  is not finite (beta <= 0: it points away from the reference) scores inf: NG.

A learned fourth score, ``kissme``, exists only where calibration saw defects:
the distance from the reference under a KISSME metric (metrics.kissme_matrix)
learned from good and defective parts; reference sets without it score as before.

A per-position model (its metadata names a feature grid, station/core/embedder.py) is scored by
``position`` alone: one Gaussian per map position (mean, OAS-shrunk covariance; PaDiM, Defard et al.
2020), the score the largest Mahalanobis distance over the positions, and that position is where the
part looks least like the good ones. The whole-embedding scores make little sense on a flattened map
(a defect moves a few of its thousands of values; a full covariance of 2,500+ values from a few hundred
parts is mostly shrinkage), so a position reference set carries none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from station.core import metrics
from station.core.preprocess import FeatureGrid

SCORES = ("minkowski", "soart3", "mahalanobis")
LEARNED_SCORES = ("kissme",)  # need defects to learn; present only when calibrated with them
POSITION_SCORES = ("position",)  # per-position models only
ALL_SCORES = SCORES + LEARNED_SCORES
MINKOWSKI_P = 4


@dataclass(frozen=True)
class ReferenceModel:
    """The arrays scoring needs; built by calibration, stored in a reference set."""

    reference: np.ndarray  # (d,) mean embedding of good parts
    precision: np.ndarray  # (d, d) inverse of their shrunk covariance
    soart3_mean: np.ndarray  # (3,) mean SOART3 features of good parts
    soart3_precision: np.ndarray  # (3, 3)
    kissme: np.ndarray | None = None  # (d, d) learned PSD metric, when calibrated with defects

    @property
    def embedding_dim(self) -> int:
        return int(self.reference.shape[0])

    @property
    def scores(self) -> tuple[str, ...]:
        """The scores this model can give."""
        return ALL_SCORES if self.kissme is not None else SCORES


@dataclass(frozen=True)
class PositionReference:
    """One Gaussian per position of a per-position model's map; built by calibration, stored in a format-3 set."""

    mean: np.ndarray  # (P, C) float32: mean of the good parts at each position
    precision: np.ndarray  # (P, C, C) float32: inverse of their OAS-shrunk covariance there
    typical: np.ndarray  # (P,) float32: the good parts' median distance there (out of fold), to locate
    grid: FeatureGrid  # rows x cols = P, channels = C, stride, offset (the model's metadata)

    @property
    def embedding_dim(self) -> int:
        return self.grid.size

    @property
    def scores(self) -> tuple[str, ...]:
        return POSITION_SCORES


@dataclass(frozen=True)
class PositionScores:
    """The worst position of each part: its distance (the score) and its index (row-major)."""

    score: np.ndarray  # (n,)
    index: np.ndarray  # (n,) int
    per_position: np.ndarray  # (n, P): every position's distance


def position_scores(embeddings: np.ndarray, model: PositionReference) -> PositionScores:
    """(n, P*C) maps -> each part's largest per-position Mahalanobis distance, and where it is.

    A part whose map is not finite anywhere scores inf (NG) at its first non-finite position.
    """
    embeddings = np.atleast_2d(embeddings)
    maps = embeddings.reshape(len(embeddings), model.grid.positions, model.grid.channels)
    per_position = metrics.position_mahalanobis(maps, model.mean, model.precision)
    per_position = np.where(np.isfinite(per_position), per_position, np.inf)
    index = np.argmax(per_position, axis=1) if len(per_position) else np.zeros(0, dtype=int)
    return PositionScores(per_position[np.arange(len(per_position)), index], index, per_position)


def locate_worst(per_position: np.ndarray, typical: np.ndarray, grid: FeatureGrid) -> tuple[float, float]:
    """(row, col), fractional, of where one part's map departs most from the good parts.

    A defect smaller than a cell moves its neighbours too, and the worst cell alone is often the one
    beside it (a blob on a cell's edge). The centre is the worst cell's 3x3 neighbourhood weighted by
    the squared excess of each cell's distance over the good parts' median there: on simulated parts
    with a 5-pixel blob, a 1.5-stride box around it held the blob 38-40 times in 40 against 18-27 for
    the worst cell's own block (docs/calibration.md).
    """
    distances = np.asarray(per_position, dtype=np.float64).reshape(grid.rows, grid.cols)
    if not np.all(np.isfinite(distances)):
        row, col = divmod(int(np.argmax(np.where(np.isfinite(distances), -np.inf, 1.0))), grid.cols)
        return float(row), float(col)
    row, col = divmod(int(np.argmax(distances)), grid.cols)
    r0, r1, c0, c1 = max(row - 1, 0), min(row + 2, grid.rows), max(col - 1, 0), min(col + 2, grid.cols)
    excess = np.maximum(distances - np.asarray(typical, np.float64).reshape(grid.rows, grid.cols), 0.0)[r0:r1, c0:c1]
    weights = excess**2
    if not weights.sum() > 0:
        return float(row), float(col)
    rows, cols = np.mgrid[r0:r1, c0:c1]
    return float((weights * rows).sum() / weights.sum()), float((weights * cols).sum() / weights.sum())


def soart3_score(features: np.ndarray, model: ReferenceModel) -> np.ndarray:
    """RT-method distance of (n, 3) SOART3 features from the unit space; inf if not finite."""
    features = np.atleast_2d(features)
    finite = np.all(np.isfinite(features), axis=1)
    safe = np.where(finite[:, None], features, model.soart3_mean)
    distance = metrics.mahalanobis(safe, model.soart3_mean, model.soart3_precision)
    return np.where(finite, distance, np.inf)


def distances(embeddings: np.ndarray, model) -> dict[str, np.ndarray]:
    """Every score plus SOART3's three features, each an (n,) array (a PositionReference: `position` only)."""
    embeddings = np.atleast_2d(embeddings)
    if isinstance(model, PositionReference):
        return {"position": position_scores(embeddings, model).score}
    features = metrics.soart3(embeddings, model.reference)
    out = {
        "minkowski": metrics.minkowski(embeddings, model.reference, p=MINKOWSKI_P),
        "mahalanobis": metrics.mahalanobis(embeddings, model.reference, model.precision),
        "soart3": soart3_score(features, model),
        "log_beta": features[:, 0],
        "eta": features[:, 1],
        "gamma": features[:, 2],
    }
    if model.kissme is not None:
        out["kissme"] = metrics.mahalanobis(embeddings, model.reference, model.kissme)
    return out


def score(embeddings: np.ndarray, model: ReferenceModel, metric: str) -> np.ndarray:
    """One score per row by the named metric."""
    embeddings = np.atleast_2d(embeddings)
    if isinstance(model, PositionReference):
        if metric not in POSITION_SCORES:
            raise ValueError(f"a per-position reference scores by {POSITION_SCORES[0]!r} only, not {metric!r}")
        return position_scores(embeddings, model).score
    if metric == "minkowski":
        return metrics.minkowski(embeddings, model.reference, p=MINKOWSKI_P)
    if metric == "mahalanobis":
        return metrics.mahalanobis(embeddings, model.reference, model.precision)
    if metric == "soart3":
        return soart3_score(metrics.soart3(embeddings, model.reference), model)
    if metric == "kissme" and model.kissme is not None:
        return metrics.mahalanobis(embeddings, model.reference, model.kissme)
    raise ValueError(f"unknown metric {metric!r}; one of {model.scores}")


def is_defect(scores: np.ndarray, threshold: float) -> np.ndarray:
    """NG where the score exceeds the threshold (NaN and inf are NG)."""
    return ~(np.asarray(scores) <= threshold)
