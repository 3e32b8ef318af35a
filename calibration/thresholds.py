"""Fit a reference model to good parts and choose thresholds out of fold.

The threshold is a high quantile of good parts' scores, but scored by a
reference those parts did not help build: a part always sits closer to a mean
it pulled towards itself, and a threshold fitted in-sample then flags most new
good parts (the known failure of thresholds fitted to good parts only).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import math

import numpy as np
from scipy.stats import beta, rankdata

from calibration.cost_rule import kernel_widths, smoothed_cost_cut
from station.core import metrics
from station.core.errors import StationError
from station.core.scoring import SCORES, PositionReference, ReferenceModel, score

FOLDS = 5
# The fewest good parts a threshold is computed from: five folds of two, and MIN_DISTINCT_PARTS for a spread.
# `station fit` calibrates with it: its data check (fit/data_check.py MIN_GOOD) already asks for 50 good parts,
# a fifth of which set the threshold, and its figures come from a test part kept out of everything.
MIN_GOOD_PARTS = 10
# `station calibrate`'s default --min-good: there the parts given are all the station's thresholds rest on,
# with no test part behind them, so the command asks for three times the floor (with none rejected, 30 good
# parts bound the false-reject rate at about 10 %, rule of three; 10 bound it only at 30 %).
MIN_GOOD_PARTS_CALIBRATE = 30
MIN_DISTINCT_PARTS = 10  # distinct good embeddings needed for a spread
# Above this out-of-fold false-reject rate a threshold is refused outright.
MAX_ACCEPTABLE_FALSE_REJECT = 0.5
DEFAULT_TARGET_FALSE_REJECT = 0.005
# Rule of three: with n good parts and none rejected, the 95 % upper bound of
# the false-reject rate is about 3/n, so a target t needs n >= 3/t good parts.
RULE_OF_THREE = 3.0
# `station calibrate -c` grabs this many parts by default: the default target's
# rule-of-three minimum, so the default path does not warn (the CLI reads it).
DEFAULT_CAMERA_COUNT = math.ceil(RULE_OF_THREE / DEFAULT_TARGET_FALSE_REJECT - 1e-9)  # 600
CONFIDENCE = 0.95
MIN_KISSME_DEFECTS = 10  # fewer defects than this: no KISSME metric is learned
DEFAULT_DEFECT_RATE = 0.05
DEFAULT_ESCAPE_COST = 20.0  # one escape costs as much as this many false rejects


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
    expected_cost: float | None = None  # (1-p) FRR + p c ER at the threshold, when chosen by cost
    kernel_widths: tuple[float, float] | None = None  # (good, defect) in log-score space, when chosen by cost

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
        if self.expected_cost is not None:
            out["expected_cost"] = round(float(self.expected_cost), 6)
        if self.kernel_widths is not None:
            out["kernel_widths_log"] = {
                "good": round(self.kernel_widths[0], 6),
                "defect": round(self.kernel_widths[1], 6),
            }
        return out


@dataclass(frozen=True)
class Calibration:
    model: ReferenceModel | PositionReference
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
    target_false_reject: float = DEFAULT_TARGET_FALSE_REJECT,
    default_metric: str = "mahalanobis",
    min_good: int = MIN_GOOD_PARTS,
) -> Calibration:
    """Reference model from all good parts; thresholds and quality figures per metric.

    ``metric="auto"`` picks the best AUROC when defects are given, else ``default_metric``.
    """
    if not 0 < target_false_reject < 0.5:
        raise CalibrationError(f"target false-reject rate {target_false_reject} must lie between 0 and 0.5")
    good = np.asarray(good_embeddings, dtype=np.float64)
    model, shrinkage, oof = _fit_goods(good, min_good)
    fits = {}
    for name in SCORES:
        defect_scores = (
            None if defect_embeddings is None or not len(defect_embeddings) else score(defect_embeddings, model, name)
        )
        fits[name] = fit_metric(oof[name], defect_scores, target_false_reject)
    chosen = _choose_metric(metric, fits, default_metric)
    warnings = [w for w in [too_few_goods_warning(len(good), target_false_reject)] if w]
    return Calibration(model=model, covariance_shrinkage=shrinkage, fits=fits, metric=chosen, warnings=warnings)


def _fit_goods(good: np.ndarray, min_good: int) -> tuple[ReferenceModel, float, dict[str, np.ndarray]]:
    """Reference model, covariance shrinkage and out-of-fold scores of the good parts."""
    if len(good) < min_good:
        raise CalibrationError(f"{len(good)} good parts are too few to calibrate (at least {min_good})")
    _require_varied(good)
    try:
        model, shrinkage = fit_reference_model(good)
        return model, shrinkage, out_of_fold_scores(good)
    except np.linalg.LinAlgError as exc:  # nearly identical parts: no covariance to invert
        raise CalibrationError(
            f"the good parts vary too little to calibrate ({exc}): varied parts are needed, "
            "photographed as the line shows them"
        ) from None


def _require_varied(good: np.ndarray):
    """One image copied many times, or blank frames, embed as one point: nothing to learn a spread from."""
    distinct = len(np.unique(np.round(good, 6), axis=0))
    if distinct < min(len(good), MIN_DISTINCT_PARTS):
        raise CalibrationError(
            f"the good parts are identical ({len(good)} images give {distinct} distinct embedding"
            f"{'s' if distinct != 1 else ''}: one image repeated, or blank frames): varied parts are needed, "
            "one photo per real part"
        )


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


# -- figures a quality engineer can sign ---------------------------------------


def goods_needed(target_false_reject: float) -> int:
    """Good parts needed to support a false-reject target (rule of three)."""
    return math.ceil(RULE_OF_THREE / target_false_reject - 1e-9)


def too_few_goods_warning(n_good: int, target_false_reject: float) -> str | None:
    needed = goods_needed(target_false_reject)
    if n_good >= needed:
        return None
    return (
        f"only {n_good} good parts: a {target_false_reject:.2%} false-reject target needs at least {needed} "
        f"(rule of three); the smallest target these parts support is {supported_target(n_good):.2%}"
    )


def supported_target(n_good: int) -> float:
    """The smallest false-reject target n good parts can support (3/n)."""
    return min(RULE_OF_THREE / max(n_good, 1), MAX_ACCEPTABLE_FALSE_REJECT - 1e-9)


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | tuple[None, None]:
    """Exact (Clopper-Pearson) interval of a rate k/n; (None, None) without trials."""
    if n <= 0:
        return None, None
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def cost_threshold(good_scores, defect_scores, defect_rate: float, escape_cost: float) -> tuple[float, float]:
    """The threshold of least *smoothed* expected cost, (threshold, cost).

    Where the held-out good and defective parts do not overlap, every cut between them costs
    nothing on the sample, and the midpoint is set by the two most extreme parts. Each score is
    smeared instead by a Gaussian kernel in log-score space: the cut then follows the shape of
    both tails, which is what the next parts are drawn from. The kernels' widths: `class_widths`.
    NaN/inf scores count as highest.
    """
    if not 0 < defect_rate < 1 or escape_cost <= 0:
        raise CalibrationError(f"defect rate {defect_rate} must lie in (0, 1) and escape cost {escape_cost} be > 0")
    return smoothed_cost_cut(good_scores, defect_scores, defect_rate, escape_cost)


def out_of_fold_kissme(good: np.ndarray, defect: np.ndarray, folds: int = FOLDS, seed: int = 0):
    """Good and defect parts each scored by a KISSME metric and reference learned without them."""
    good_oof, defect_oof = np.empty(len(good)), np.empty(len(defect))
    rng = np.random.default_rng(seed)
    k = min(folds, len(good), len(defect))
    good_folds = np.array_split(rng.permutation(len(good)), k)
    defect_folds = np.array_split(rng.permutation(len(defect)), k)
    for g_out, d_out in zip(good_folds, defect_folds):
        g_keep, d_keep = np.setdiff1d(np.arange(len(good)), g_out), np.setdiff1d(np.arange(len(defect)), d_out)
        matrix = metrics.kissme_matrix(good[g_keep], defect[d_keep])
        reference = good[g_keep].mean(axis=0)
        good_oof[g_out] = metrics.mahalanobis(good[g_out], reference, matrix)
        defect_oof[d_out] = metrics.mahalanobis(defect[d_out], reference, matrix)
    return good_oof, defect_oof


def calibrate_held_out(
    good_embeddings: np.ndarray,
    defect_embeddings: np.ndarray | None = None,
    metric: str = "auto",
    target_false_reject: float = DEFAULT_TARGET_FALSE_REJECT,
    defect_rate: float = DEFAULT_DEFECT_RATE,
    escape_cost: float = DEFAULT_ESCAPE_COST,
    min_good: int = MIN_GOOD_PARTS,
) -> Calibration:
    """`station fit`'s calibration, on parts the model never trained on.

    With defects: each metric's threshold minimizes the expected cost on held-out
    scores (good parts out of fold; KISSME's defects out of fold too, the others'
    defects never fitted); ``auto`` takes the least cost, AUROC breaking ties.
    Without defects: the false-reject target, raised to the smallest one the
    good parts support (3/n) when they are too few for it, with a warning.
    """
    good = np.asarray(good_embeddings, dtype=np.float64)
    model, shrinkage, oof = _fit_goods(good, min_good)
    if defect_embeddings is None or not len(defect_embeddings):
        return _goods_only(model, shrinkage, oof, metric, target_false_reject)
    defect = np.asarray(defect_embeddings, dtype=np.float64)
    defect_scores = {name: score(defect, model, name) for name in SCORES}
    warnings = []
    if len(defect) >= MIN_KISSME_DEFECTS:
        oof["kissme"], defect_scores["kissme"] = out_of_fold_kissme(good, defect)
        model = replace(model, kissme=metrics.kissme_matrix(good, defect))
    else:
        warnings.append(f"only {len(defect)} defects: no KISSME metric learned (needs {MIN_KISSME_DEFECTS})")
    fits = {name: cost_fit(oof[name], defect_scores[name], defect_rate, escape_cost) for name in oof}
    if metric == "auto":
        usable = [name for name, f in fits.items() if f.problem is None] or list(fits)
        metric = min(usable, key=lambda n: (round(fits[n].expected_cost, 9), -fits[n].auroc))
    _check_choice(metric, fits)
    return Calibration(model=model, covariance_shrinkage=shrinkage, fits=fits, metric=metric, warnings=warnings)


def cost_fit(good_oof: np.ndarray, defect_scores: np.ndarray, defect_rate: float, escape_cost: float) -> MetricFit:
    threshold, cost = cost_threshold(good_oof, defect_scores, defect_rate, escape_cost)
    false_reject = float(np.mean(~(good_oof <= threshold)))
    problem = None
    if false_reject > MAX_ACCEPTABLE_FALSE_REJECT:
        problem = f"the threshold {threshold:.4g} would flag {false_reject:.0%} of good parts"
    escape = float(np.mean(defect_scores <= threshold))
    widths = kernel_widths(good_oof, defect_scores)
    return MetricFit(
        threshold,
        good_oof,
        defect_scores,
        auroc(good_oof, defect_scores),
        false_reject,
        escape,
        problem,
        expected_cost=cost,
        kernel_widths=widths,
    )


def _goods_only(model, shrinkage, oof, metric, target_false_reject) -> Calibration:
    warnings = []
    problem = too_few_goods_warning(len(oof["mahalanobis"]), target_false_reject)
    if problem:
        target_false_reject = supported_target(len(oof["mahalanobis"]))
        warnings.append(f"{problem}: using {target_false_reject:.2%}")
    fits = {name: fit_metric(oof[name], None, target_false_reject) for name in SCORES}
    chosen = _choose_metric(metric, fits, "mahalanobis")
    return Calibration(model=model, covariance_shrinkage=shrinkage, fits=fits, metric=chosen, warnings=warnings)


def _check_choice(metric: str, fits: dict[str, MetricFit]):
    if metric not in fits:
        raise CalibrationError(f"unknown metric {metric!r}; one of {', '.join(fits)} or auto")
    if fits[metric].problem:
        raise CalibrationError(f"{metric}: {fits[metric].problem}; refusing this threshold")
