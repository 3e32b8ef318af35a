"""Calibration of a tiled station (station/core/tiles.py): one reference set for every tile, one threshold per PART.

The reference model (mean and shrunk covariance, or per-position Gaussians) is fitted to every tile of
every good part: a tile of a good part is a good tile, wherever it sits. The threshold is NOT a
quantile of tile scores: a part is NG when its worst tile is past the threshold, so a per-tile
false-reject target t would reject about 1 - (1 - t)^tiles of the good parts (65 tiles at 0.5 %:
28 %). It is set on each good part's MAXIMUM tile score, out of fold BY PART (a part's tiles are
scored by a reference none of its tiles helped build), so the false-reject target holds per part.
Defects are labelled per photo, not per tile: a defective part's score is its maximum too, which
is what AUROC, escapes and `station fit`'s comparison with whole-part candidates see.

No KISSME metric: it is learned from defective embeddings, and which tiles of a defective photo
show the defect is not known.
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
    _choose_metric,
    _require_varied,
    cost_fit,
    fit_metric,
    fit_reference_model,
    supported_target,
    too_few_goods_warning,
)
from calibration.positions import _position_metric, fit_position_model
from station.core.scoring import POSITION_SCORES, SCORES, position_scores, score

NO_KISSME = "tiles: no KISSME metric (it learns from defective tiles, and a photo's defect is not labelled by tile)"


def part_maxima(tile_scores: np.ndarray, tiles: int) -> np.ndarray:
    """(parts * tiles,) scores, part-major -> each part's worst tile; a non-finite tile makes its part infinite."""
    values = np.asarray(tile_scores, dtype=np.float64).reshape(-1, tiles)
    return np.where(np.isnan(values), np.inf, values).max(axis=1)


def _parts(embeddings: np.ndarray, what: str) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 3 or embeddings.shape[1] < 1:
        raise CalibrationError(f"{what}: tiled embeddings must be (parts, tiles, dim), got {embeddings.shape}")
    return embeddings


def _fit_model(rows: np.ndarray, grid, typical=None):
    if grid is None:
        return fit_reference_model(rows)
    return fit_position_model(rows, grid, typical=typical)


def _names(grid) -> tuple[str, ...]:
    return SCORES if grid is None else POSITION_SCORES


def out_of_fold_part_maxima(good: np.ndarray, grid=None, folds: int = FOLDS, seed: int = 0):
    """({metric: (parts,)} each good part's worst tile against a reference fitted without ANY of its tiles,
    and, for a per-position model, the median out-of-fold distance per position over all tiles)."""
    parts, tiles, dim = good.shape
    order = np.random.default_rng(seed).permutation(parts)
    maxima = {name: np.empty(parts) for name in _names(grid)}
    per_position = []
    for held_out in np.array_split(order, min(folds, parts)):
        kept = np.setdiff1d(order, held_out)
        model, _ = _fit_model(good[kept].reshape(-1, dim), grid)
        rows = good[held_out].reshape(-1, dim)
        if grid is not None:
            found = position_scores(rows, model)
            maxima[POSITION_SCORES[0]][held_out] = part_maxima(found.score, tiles)
            per_position.append(found.per_position)
        else:
            for name in maxima:
                maxima[name][held_out] = part_maxima(score(rows, model, name), tiles)
    typical = np.median(np.concatenate(per_position), axis=0) if per_position else None
    return maxima, typical


def _fit_goods(good: np.ndarray, grid, min_good: int):
    parts, tiles, dim = good.shape
    if parts < min_good:
        raise CalibrationError(
            f"{parts} good parts are too few to calibrate (at least {min_good}; a part's "
            f"{tiles} tiles count as one part: they are not independent)"
        )
    rows = good.reshape(-1, dim)
    _require_varied(rows)
    try:
        oof, typical = out_of_fold_part_maxima(good, grid)
        model, shrinkage = _fit_model(rows, grid, typical)
        return model, shrinkage, oof
    except np.linalg.LinAlgError as exc:
        raise CalibrationError(
            f"the good parts' tiles vary too little to calibrate ({exc}): varied parts are "
            "needed, photographed as the line shows them"
        ) from None


def _defect_maxima(defect_embeddings, model, grid) -> dict[str, np.ndarray] | None:
    if defect_embeddings is None or not len(defect_embeddings):
        return None
    defect = _parts(defect_embeddings, "defects")
    rows, tiles = defect.reshape(-1, defect.shape[2]), defect.shape[1]
    return {name: part_maxima(score(rows, model, name), tiles) for name in _names(grid)}


def calibrate_tiles(
    good_embeddings: np.ndarray,
    defect_embeddings: np.ndarray | None = None,
    grid=None,
    metric: str = "auto",
    target_false_reject: float = DEFAULT_TARGET_FALSE_REJECT,
    min_good: int = MIN_GOOD_PARTS,
) -> Calibration:
    """`station calibrate` for a tiled station: (parts, tiles, dim) embeddings; `grid`: a per-position
    model's FeatureGrid (None: whole-embedding metrics). The threshold is the (1 - target) quantile of
    the good parts' out-of-fold worst-tile scores; defects give AUROC and escapes per part."""
    if not 0 < target_false_reject < 0.5:
        raise CalibrationError(f"target false-reject rate {target_false_reject} must lie between 0 and 0.5")
    if grid is not None:
        metric = _position_metric(metric)
    good = _parts(good_embeddings, "good parts")
    model, shrinkage, oof = _fit_goods(good, grid, min_good)
    defects = _defect_maxima(defect_embeddings, model, grid)
    fits = {
        name: fit_metric(oof[name], None if defects is None else defects[name], target_false_reject) for name in oof
    }
    chosen = _choose_metric(metric, fits, "mahalanobis" if grid is None else POSITION_SCORES[0])
    warnings = [w for w in [too_few_goods_warning(len(good), target_false_reject)] if w]
    return Calibration(model=model, covariance_shrinkage=shrinkage, fits=fits, metric=chosen, warnings=warnings)


def calibrate_tiles_held_out(
    good_embeddings: np.ndarray,
    defect_embeddings: np.ndarray | None = None,
    grid=None,
    target_false_reject: float = DEFAULT_TARGET_FALSE_REJECT,
    defect_rate: float = DEFAULT_DEFECT_RATE,
    escape_cost: float = DEFAULT_ESCAPE_COST,
    min_good: int = MIN_GOOD_PARTS,
) -> Calibration:
    """`station fit`'s calibration of a tiled candidate (calibration/thresholds.py: calibrate_held_out), per part:
    with defects each metric's threshold of least smoothed expected cost on the parts' worst tiles,
    the least cost chosen (AUROC breaking ties); without them the false-reject target, raised to what
    the good parts support."""
    good = _parts(good_embeddings, "good parts")
    model, shrinkage, oof = _fit_goods(good, grid, min_good)
    defects = _defect_maxima(defect_embeddings, model, grid)
    warnings = []
    if defects is None:
        problem = too_few_goods_warning(len(good), target_false_reject)
        if problem:
            target_false_reject = supported_target(len(good))
            warnings.append(f"{problem}: using {target_false_reject:.2%}")
        fits = {name: fit_metric(oof[name], None, target_false_reject) for name in oof}
        usable = [name for name, f in fits.items() if f.problem is None] or list(fits)
        metric = "mahalanobis" if grid is None and "mahalanobis" in usable else usable[0]
    else:
        if grid is None:
            warnings.append(NO_KISSME)
        fits = {name: cost_fit(oof[name], defects[name], defect_rate, escape_cost) for name in oof}
        usable = [name for name, f in fits.items() if f.problem is None] or list(fits)
        metric = min(usable, key=lambda n: (round(fits[n].expected_cost, 9), -fits[n].auroc))
    _check_choice(metric, fits)
    return Calibration(model=model, covariance_shrinkage=shrinkage, fits=fits, metric=metric, warnings=warnings)


def evaluate_tiled(embeddings: np.ndarray, classes: list[str], reference_set):
    """calibration/evaluate.py's Evaluation of tiled parts, (parts, tiles, dim): every metric's score of a
    part is its worst tile's, as the station judges it."""
    from calibration.evaluate import Evaluation
    from station.core.scoring import distances

    parts = _parts(embeddings, "parts")
    tiles = parts.shape[1]
    per_metric = {
        name: part_maxima(values, tiles)
        for name, values in distances(parts.reshape(-1, parts.shape[2]), reference_set.model).items()
    }
    return Evaluation(
        scores=per_metric[reference_set.metric],
        is_defect_truth=np.array([c != "good" for c in classes]),
        classes=list(classes),
        threshold=reference_set.threshold,
        metric=reference_set.metric,
        per_metric_scores={name: per_metric[name] for name in reference_set.model.scores},
    )
