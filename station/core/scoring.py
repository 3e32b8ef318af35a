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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from station.core import metrics

SCORES = ("minkowski", "soart3", "mahalanobis")
LEARNED_SCORES = ("kissme",)  # need defects to learn; present only when calibrated with them
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


def soart3_score(features: np.ndarray, model: ReferenceModel) -> np.ndarray:
    """RT-method distance of (n, 3) SOART3 features from the unit space; inf if not finite."""
    features = np.atleast_2d(features)
    finite = np.all(np.isfinite(features), axis=1)
    safe = np.where(finite[:, None], features, model.soart3_mean)
    distance = metrics.mahalanobis(safe, model.soart3_mean, model.soart3_precision)
    return np.where(finite, distance, np.inf)


def distances(embeddings: np.ndarray, model: ReferenceModel) -> dict[str, np.ndarray]:
    """Every score plus SOART3's three features, each an (n,) array."""
    embeddings = np.atleast_2d(embeddings)
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
