"""The export gate's figures: how far int8 moved the embeddings, and whether it may ship.

Pure numpy/scipy on embeddings (no torch, no onnxruntime): export/onnx_export.py
computes the embeddings and calls these.

A verdict flip is only evidence against int8 where the sample can tell which side of the
threshold a part is on. The threshold is a high quantile of a few hundred good parts'
distances; its confidence interval (from the binomial law of the order statistics) is a band
of the float model's distances in which the sample cannot place the threshold. A part inside
that band may fall either way under any model trained or calibrated again, so its flip is not
counted; what int8 does to the ranking as a whole is measured by rank figures, which do not
hang on one cut.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom, spearmanr

from export.dataset import auroc
from station.core.metrics import minkowski

# Gate limits.
MAX_TORCH_ONNX_DIFF = 1e-4
MIN_MEAN_COSINE = 0.999
# Of the parts whose side the sample resolves in both models.
MIN_VERDICT_AGREEMENT = 0.995
# Spearman correlation of all parts' distances, int8 against fp32.
MIN_RANK_CORRELATION = 0.99
# Loss of AUROC (good against defect) from fp32 to int8, when the sample holds defects.
MAX_AUROC_LOSS = 0.01
# The quick reference of the verdict check: Minkowski p=4 to the mean good
# embedding, threshold at this quantile of the good distances.
REFERENCE_P = 4
REFERENCE_QUANTILE = 0.99
# Two-sided confidence of the band around the threshold that the sample cannot resolve.
BAND_CONFIDENCE = 0.99


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def quick_reference(embeddings: np.ndarray, is_good: np.ndarray) -> tuple[np.ndarray, float]:
    """A station's reference from the good crops: mean good embedding and a
    threshold at a high quantile of the good parts' Minkowski distances."""
    reference = embeddings[is_good].mean(axis=0)
    distances = minkowski(embeddings[is_good], reference, p=REFERENCE_P)
    return reference, float(np.quantile(distances, REFERENCE_QUANTILE))


def unresolved_band(
    good_distances: np.ndarray, quantile: float = REFERENCE_QUANTILE, confidence: float = BAND_CONFIDENCE
) -> tuple[float, float]:
    """(low, high): the distances between which the sample cannot place its quantile.

    The number of goods below the true quantile is Binomial(n, quantile); its central
    `confidence` interval, read off the sorted distances, bounds the threshold. Above the
    largest good distance the sample says nothing more, so the band ends there.
    """
    ordered = np.sort(good_distances)
    n = len(ordered)
    tail = (1.0 - confidence) / 2.0
    low_rank = int(binom.ppf(tail, n, quantile))  # goods at or below the band's low end
    high_rank = int(binom.ppf(1.0 - tail, n, quantile)) + 1
    return float(ordered[max(low_rank - 1, 0)]), float(ordered[min(high_rank, n) - 1])


def _side(embeddings: np.ndarray, is_good: np.ndarray) -> dict:
    """One model's quick reference and what it says of every part."""
    reference, threshold = quick_reference(embeddings, is_good)
    distances = minkowski(embeddings, reference, p=REFERENCE_P)
    low, high = unresolved_band(distances[is_good])
    return {
        "reference": reference,
        "threshold": threshold,
        "distances": distances,
        "defect": distances > threshold,
        "resolved": (distances < low) | (distances > high),
        "band": (low, high),
    }


def rank_correlation(fp32_distances: np.ndarray, int8_distances: np.ndarray) -> float:
    """Spearman's rho; 0 where int8 made every distance equal (it ranks nothing), 1 where both did."""
    if np.ptp(int8_distances) == 0.0 or np.ptp(fp32_distances) == 0.0:
        return float(np.ptp(int8_distances) == np.ptp(fp32_distances))
    return float(spearmanr(fp32_distances, int8_distances).statistic)


def int8_figures(fp32_emb: np.ndarray, int8_emb: np.ndarray, is_good: np.ndarray) -> dict:
    """How far int8 moved the embeddings, and whether the verdicts change.

    Each model gets its own quick reference, because a station is calibrated with the
    model it runs: a small common shift of all embeddings is absorbed by the reference.
    """
    cosine = row_cosine(fp32_emb, int8_emb)
    fp32, int8 = _side(fp32_emb, is_good), _side(int8_emb, is_good)
    resolved = fp32["resolved"]  # the float model says clearly which side; int8 must agree
    flipped = fp32["defect"] != int8["defect"]
    figures = {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "resolved_parts": int(resolved.sum()),  # outside the float model's band
        "verdict_agreement": float(1.0 - np.mean(flipped[resolved])) if resolved.any() else 1.0,
        "verdicts_changed": int(np.sum(flipped & resolved)),
        "verdicts_changed_in_band": int(np.sum(flipped & ~resolved)),
        "verdict_agreement_all_parts": float(1.0 - np.mean(flipped)),
        "rank_correlation": rank_correlation(fp32["distances"], int8["distances"]),
        "auroc_fp32": None,
        "auroc_int8": None,
        "reference_shift": float(np.linalg.norm(int8["reference"] - fp32["reference"])),
        "reference_threshold_fp32": fp32["threshold"],
        "reference_threshold_int8": int8["threshold"],
        "band_fp32": list(fp32["band"]),
        "band_int8": list(int8["band"]),
    }
    if (~is_good).any():
        figures["auroc_fp32"] = auroc(fp32["distances"][is_good], fp32["distances"][~is_good])
        figures["auroc_int8"] = auroc(int8["distances"][is_good], int8["distances"][~is_good])
    return figures


def gate_failures(figures: dict) -> list[str]:
    """Why the exported model must not ship; empty when it may."""
    failures = []
    # A map output's limit scales with its values (onnx_export.torch_onnx_figures says why); 1 otherwise.
    scale = figures.get("torch_vs_fp32_scale", 1.0)
    if figures["torch_vs_fp32_max_abs_diff"] > MAX_TORCH_ONNX_DIFF * scale:
        limit = (
            f"{MAX_TORCH_ONNX_DIFF:.0e}"
            if scale == 1.0
            else f"{MAX_TORCH_ONNX_DIFF:.0e} x the output's scale {scale:.3g}"
        )
        failures.append(f"fp32 ONNX differs from torch by {figures['torch_vs_fp32_max_abs_diff']:.2e} (limit {limit})")
    int8 = figures.get("int8")
    if int8 is not None:
        failures += _int8_failures(int8)
    return failures


def _int8_failures(int8: dict) -> list[str]:
    failures = []
    if int8["cosine_mean"] < MIN_MEAN_COSINE:
        failures.append(f"int8 mean cosine to fp32 is {int8['cosine_mean']:.5f} (limit {MIN_MEAN_COSINE})")
    if int8["verdict_agreement"] < MIN_VERDICT_AGREEMENT:
        failures.append(
            f"int8 verdicts agree with fp32 on {int8['verdict_agreement']:.2%} of the {int8['resolved_parts']} parts "
            f"clear of the threshold (limit {MIN_VERDICT_AGREEMENT:.1%})"
        )
    if int8["rank_correlation"] < MIN_RANK_CORRELATION:
        failures.append(
            f"int8 distances rank the parts unlike fp32: Spearman {int8['rank_correlation']:.4f} "
            f"(limit {MIN_RANK_CORRELATION})"
        )
    if int8["auroc_fp32"] is not None and int8["auroc_fp32"] - int8["auroc_int8"] > MAX_AUROC_LOSS:
        failures.append(
            f"int8 AUROC {int8['auroc_int8']:.4f} against fp32 {int8['auroc_fp32']:.4f} "
            f"(at most {MAX_AUROC_LOSS} lower)"
        )
    return failures
