"""Calibration of a per-position model (PaDiM-style, Defard et al. 2020): one Gaussian per map position.

A per-position model's embedding is its feature map (station/core/embedder.py: the `positions`
metadata). Each position gets the good parts' mean and OAS-shrunk covariance; a part scores its worst
position's Mahalanobis distance (the `position` metric, station/core/scoring.py). As for the other
metrics (calibration/thresholds.py), the threshold comes from the good parts' OUT-OF-FOLD scores: each is
scored by Gaussians fitted without it. The whole-embedding metrics are not fitted on a map.
"""

from __future__ import annotations

import numpy as np

from calibration.thresholds import (
    DEFAULT_DEFECT_RATE,
    DEFAULT_ESCAPE_COST,
    DEFAULT_TARGET_FALSE_REJECT,
    FOLDS,
    MIN_GOOD_PARTS,
    Calibration,
    CalibrationError,
    _check_choice,
    _require_varied,
    cost_fit,
    fit_metric,
    supported_target,
    too_few_goods_warning,
)
from station.core import metrics
from station.core.preprocess import FeatureGrid
from station.core.scoring import POSITION_SCORES, PositionReference, position_scores, score


def fit_position_model(
    good_embeddings: np.ndarray, grid: FeatureGrid, typical: np.ndarray | None = None
) -> tuple[PositionReference, float]:
    """Mean and OAS-shrunk covariance of the good parts at every position; (model, median shrinkage).
    `typical`: the good parts' median out-of-fold distance per position (zeros when not given)."""
    maps = _as_maps(good_embeddings, grid)
    covariances, shrinkage = metrics.oas_covariances(maps)
    precision = metrics.precisions_from_covariances(covariances)
    typical = np.zeros(grid.positions) if typical is None else typical
    model = PositionReference(
        mean=maps.mean(axis=0).astype(np.float32),
        precision=precision.astype(np.float32),
        typical=np.asarray(typical, dtype=np.float32),
        grid=grid,
    )
    return model, float(np.median(shrinkage))


def _as_maps(embeddings: np.ndarray, grid: FeatureGrid) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or embeddings.shape[1] != grid.size:
        raise CalibrationError(
            f"embeddings of shape {embeddings.shape} are not maps of {grid.rows}x{grid.cols} "
            f"positions x {grid.channels} channels"
        )
    return embeddings.reshape(len(embeddings), grid.positions, grid.channels)


def out_of_fold_position_distances(
    good_embeddings: np.ndarray, grid: FeatureGrid, folds: int = FOLDS, seed: int = 0
) -> np.ndarray:
    """(n, P): every position of each good part against Gaussians fitted without it; the part's
    out-of-fold score is the row's largest."""
    n = len(good_embeddings)
    order = np.random.default_rng(seed).permutation(n)
    distances = np.empty((n, grid.positions))
    for held_out in np.array_split(order, min(folds, n)):
        kept = np.setdiff1d(order, held_out)
        model, _ = fit_position_model(good_embeddings[kept], grid)
        distances[held_out] = position_scores(good_embeddings[held_out], model).per_position
    return distances


def _fit_position_goods(good: np.ndarray, grid: FeatureGrid, min_good: int):
    if len(good) < min_good:
        raise CalibrationError(f"{len(good)} good parts are too few to calibrate (at least {min_good})")
    _require_varied(good)
    _as_maps(good, grid)
    try:
        oof = out_of_fold_position_distances(good, grid)
        model, shrinkage = fit_position_model(good, grid, typical=np.median(oof, axis=0))
        return model, shrinkage, oof.max(axis=1)
    except np.linalg.LinAlgError as exc:
        raise CalibrationError(
            f"the good parts vary too little to calibrate ({exc}): varied parts are needed, "
            "photographed as the line shows them"
        ) from None


def _position_metric(metric: str) -> str:
    if metric not in ("auto", *POSITION_SCORES):
        raise CalibrationError(
            f"a per-position model is judged by {POSITION_SCORES[0]!r} (its worst position), "
            f"not {metric!r}; use --metric auto or {POSITION_SCORES[0]}"
        )
    return POSITION_SCORES[0]


def calibrate_positions(
    good_embeddings: np.ndarray,
    grid: FeatureGrid,
    defect_embeddings: np.ndarray | None = None,
    metric: str = "auto",
    target_false_reject: float = DEFAULT_TARGET_FALSE_REJECT,
    min_good: int = MIN_GOOD_PARTS,
) -> Calibration:
    """`calibrate` for a per-position model: the `position` metric, its threshold the (1 - target)
    quantile of the good parts' out-of-fold scores; defects give AUROC and escapes, as for the others."""
    if not 0 < target_false_reject < 0.5:
        raise CalibrationError(f"target false-reject rate {target_false_reject} must lie between 0 and 0.5")
    name = _position_metric(metric)
    good = np.asarray(good_embeddings, dtype=np.float64)
    model, shrinkage, oof = _fit_position_goods(good, grid, min_good)
    defect_scores = None
    if defect_embeddings is not None and len(defect_embeddings):
        defect_scores = score(np.asarray(defect_embeddings, dtype=np.float64), model, name)
    fits = {name: fit_metric(oof, defect_scores, target_false_reject)}
    _check_choice(name, fits)
    warnings = [w for w in [too_few_goods_warning(len(good), target_false_reject)] if w]
    return Calibration(model=model, covariance_shrinkage=shrinkage, fits=fits, metric=name, warnings=warnings)


def calibrate_positions_held_out(
    good_embeddings: np.ndarray,
    grid: FeatureGrid,
    defect_embeddings: np.ndarray | None = None,
    target_false_reject: float = DEFAULT_TARGET_FALSE_REJECT,
    defect_rate: float = DEFAULT_DEFECT_RATE,
    escape_cost: float = DEFAULT_ESCAPE_COST,
    min_good: int = MIN_GOOD_PARTS,
) -> Calibration:
    """`calibrate_held_out` for a per-position model (`station fit`): with defects the threshold of
    least smoothed expected cost on held-out scores, without them the false-reject target (raised
    to what the good parts support)."""
    good = np.asarray(good_embeddings, dtype=np.float64)
    model, shrinkage, oof = _fit_position_goods(good, grid, min_good)
    name, warnings = POSITION_SCORES[0], []
    if defect_embeddings is None or not len(defect_embeddings):
        problem = too_few_goods_warning(len(good), target_false_reject)
        if problem:
            target_false_reject = supported_target(len(good))
            warnings.append(f"{problem}: using {target_false_reject:.2%}")
        fits = {name: fit_metric(oof, None, target_false_reject)}
    else:
        defect_scores = score(np.asarray(defect_embeddings, dtype=np.float64), model, name)
        fits = {name: cost_fit(oof, defect_scores, defect_rate, escape_cost)}
    _check_choice(name, fits)
    return Calibration(model=model, covariance_shrinkage=shrinkage, fits=fits, metric=name, warnings=warnings)
