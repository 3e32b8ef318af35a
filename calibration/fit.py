"""Fit a reference model to good parts and choose thresholds out of fold.

The threshold is a high quantile of good parts' scores, but scored by a
reference those parts did not help build: a part always sits closer to a mean
it pulled towards itself, and a threshold fitted in-sample then flags most new
good parts (the known failure of thresholds fitted to good parts only).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

from station.core import metrics
from station.core.errors import StationError
from station.core.scoring import SCORES, ReferenceModel, score

FOLDS = 5
MIN_GOOD_PARTS = 10
# Above this out-of-fold false-reject rate a threshold is refused outright.
MAX_ACCEPTABLE_FALSE_REJECT = 0.5


class CalibrationError(StationError):
    exit_code = 65


@dataclass(frozen=True)
class MetricFit:
    """What calibration learned about one metric."""

    threshold: float
    good_scores: np.ndarray  # out of fold
    defect_scores: np.ndarray | None
    auroc: float | None
    false_reject_rate: float  # out of fold, at the threshold
    escape_rate: float | None
    problem: str | None = None  # why this metric cannot be used, if it cannot

    def summary(self) -> dict:
        good = self.good_scores[np.isfinite(self.good_scores)]
        out = {
            "threshold": float(self.threshold),
            "false_reject_rate_oof": round(float(self.false_reject_rate), 6),
            "good_score_median": float(np.median(good)) if good.size else None,
            "good_score_p99": float(np.quantile(good, 0.99)) if good.size else None,
        }
        if self.problem:
            out["problem"] = self.problem
        if self.auroc is not None:
            out["auroc"] = round(float(self.auroc), 6)
            out["escape_rate"] = round(float(self.escape_rate), 6)
        return out


@dataclass(frozen=True)
class Calibration:
    model: ReferenceModel
    covariance_shrinkage: float
    fits: dict[str, MetricFit]
    metric: str
    warnings: list[str] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        return self.fits[self.metric].threshold


def fit_reference_model(good_embeddings: np.ndarray) -> tuple[ReferenceModel, float]:
    """Reference vector, shrunk covariance and the SOART3 unit space of good parts."""
    good = np.asarray(good_embeddings, dtype=np.float64)
    reference = good.mean(axis=0)
    covariance, shrinkage = metrics.oas_covariance(good)
    features = _held_out_soart3_features(good)
    features = features[np.all(np.isfinite(features), axis=1)]
    if len(features) < 2:
        raise CalibrationError("the good parts' SOART3 features are not finite: the embeddings are degenerate")
    soart3_covariance, _ = metrics.oas_covariance(features)
    model = ReferenceModel(
        reference=reference,
        precision=metrics.precision_from_covariance(covariance),
        soart3_mean=features.mean(axis=0),
        soart3_precision=metrics.precision_from_covariance(soart3_covariance),
    )
    return model, shrinkage


def _held_out_soart3_features(good: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """SOART3 features of each good part against a mean built without it.

    A part measured against a mean it helped build looks closer than any new
    part will (its residual is smaller), so a unit space of in-sample features
    is too tight and rejects new good parts; measured held-out, it is not.
    """
    n = len(good)
    features = np.empty((n, 3))
    for held_out in np.array_split(np.arange(n), min(folds, n)):
        kept = np.ones(n, dtype=bool)
        kept[held_out] = False
        features[held_out] = metrics.soart3(good[held_out], good[kept].mean(axis=0))
    return features


def out_of_fold_scores(good_embeddings: np.ndarray, folds: int = FOLDS, seed: int = 0) -> dict[str, np.ndarray]:
    """Each good part scored by a reference built without it, for every metric."""
    n = len(good_embeddings)
    order = np.random.default_rng(seed).permutation(n)
    scores = {metric: np.empty(n) for metric in SCORES}
    for held_out in np.array_split(order, min(folds, n)):
        kept = np.setdiff1d(order, held_out)
        model, _ = fit_reference_model(good_embeddings[kept])
        for metric in SCORES:
            scores[metric][held_out] = score(good_embeddings[held_out], model, metric)
    return scores


def quantile_threshold(good_scores: np.ndarray, target_false_reject: float) -> float:
    """The (1 - target) quantile of good scores; non-finite scores count as highest."""
    scores = np.nan_to_num(np.asarray(good_scores, dtype=np.float64), nan=np.inf, posinf=np.inf)
    return float(np.quantile(scores, 1.0 - target_false_reject, method="higher"))


def auroc(good_scores: np.ndarray, defect_scores: np.ndarray) -> float:
    """Probability that a defect scores above a good part (ties count half)."""
    values = np.concatenate([good_scores, defect_scores])
    values = np.where(np.isnan(values), np.inf, values)  # NaN scores are NG
    ranks = rankdata(values)
    n_good, n_defect = len(good_scores), len(defect_scores)
    rank_sum = ranks[n_good:].sum()
    return float((rank_sum - n_defect * (n_defect + 1) / 2) / (n_good * n_defect))


def fit_metric(good_oof: np.ndarray, defect_scores: np.ndarray | None, target_false_reject: float) -> MetricFit:
    threshold = quantile_threshold(good_oof, target_false_reject)
    false_reject = float(np.mean(~(good_oof <= threshold)))
    problem = None
    if not np.isfinite(threshold):
        problem = "too many good parts score not-finite (they point away from the reference)"
    elif false_reject > MAX_ACCEPTABLE_FALSE_REJECT:
        problem = f"the threshold {threshold:.4g} would flag {false_reject:.0%} of good parts"
    auc = escape = None
    if defect_scores is not None and len(defect_scores):
        auc = auroc(good_oof, defect_scores)
        escape = float(np.mean(defect_scores <= threshold))
    return MetricFit(threshold, good_oof, defect_scores, auc, false_reject, escape, problem)


def calibrate(
    good_embeddings: np.ndarray,
    defect_embeddings: np.ndarray | None = None,
    metric: str = "auto",
    target_false_reject: float = 0.005,
    default_metric: str = "mahalanobis",
    min_good: int = MIN_GOOD_PARTS,
) -> Calibration:
    """Reference model from all good parts; thresholds and quality figures per metric.

    ``metric="auto"`` picks the best AUROC when defects are given, else ``default_metric``.
    """
    good = np.asarray(good_embeddings, dtype=np.float64)
    if len(good) < min_good:
        raise CalibrationError(f"{len(good)} good parts are too few to calibrate (at least {min_good})")
    if not 0 < target_false_reject < 0.5:
        raise CalibrationError(f"target false-reject rate {target_false_reject} must lie between 0 and 0.5")
    model, shrinkage = fit_reference_model(good)
    oof = out_of_fold_scores(good)
    fits = {}
    for name in SCORES:
        defect_scores = None if defect_embeddings is None or not len(defect_embeddings) else score(defect_embeddings, model, name)
        fits[name] = fit_metric(oof[name], defect_scores, target_false_reject)
    chosen = _choose_metric(metric, fits, default_metric)
    warnings = []
    if len(good) < 100:
        warnings.append(f"only {len(good)} good parts: the threshold for a {target_false_reject:.1%} false-reject rate is rough (100+ recommended)")
    return Calibration(model=model, covariance_shrinkage=shrinkage, fits=fits, metric=chosen, warnings=warnings)


def _choose_metric(metric: str, fits: dict[str, MetricFit], default_metric: str) -> str:
    if metric == "auto":
        usable = {name: fit for name, fit in fits.items() if fit.problem is None}
        with_auroc = {name: fit.auroc for name, fit in usable.items() if fit.auroc is not None}
        if with_auroc:
            # Best AUROC; among equals, the lower escape rate at the threshold.
            metric = max(with_auroc, key=lambda name: (round(with_auroc[name], 4), -usable[name].escape_rate))
        elif default_metric in usable:
            metric = default_metric
        elif usable:
            metric = sorted(usable)[0]
        else:
            metric = default_metric  # reported as unusable below
    if metric not in fits:
        raise CalibrationError(f"unknown metric {metric!r}; one of {', '.join(SCORES)} or auto")
    if fits[metric].problem:
        raise CalibrationError(f"{metric}: {fits[metric].problem}; refusing this threshold")
    return metric
