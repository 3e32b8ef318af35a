"""The export gate's figures: how far int8 moved the embeddings, and whether it may ship.

Pure numpy on embeddings (no torch, no onnxruntime): export/onnx_export.py
computes the embeddings and calls these.
"""
from __future__ import annotations

import numpy as np

from station.core.metrics import minkowski

# Gate limits.
MAX_TORCH_ONNX_DIFF = 1e-4
MIN_MEAN_COSINE = 0.999
MIN_VERDICT_AGREEMENT = 0.995
# The quick reference of the verdict check: Minkowski p=4 to the mean good
# embedding, threshold at this quantile of the good distances.
REFERENCE_P = 4
REFERENCE_QUANTILE = 0.99


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def quick_reference(embeddings: np.ndarray, is_good: np.ndarray) -> tuple[np.ndarray, float]:
    """A station's reference from the good crops: mean good embedding and a
    threshold at a high quantile of the good parts' Minkowski distances."""
    reference = embeddings[is_good].mean(axis=0)
    distances = minkowski(embeddings[is_good], reference, p=REFERENCE_P)
    return reference, float(np.quantile(distances, REFERENCE_QUANTILE))


def defect_verdicts(embeddings: np.ndarray, reference: np.ndarray, threshold: float) -> np.ndarray:
    return minkowski(embeddings, reference, p=REFERENCE_P) > threshold


def int8_figures(fp32_emb: np.ndarray, int8_emb: np.ndarray, is_good: np.ndarray) -> dict:
    """How far int8 moved the embeddings, and whether the verdicts change.

    The gate's agreement gives each model its own quick reference, because a
    station is calibrated with the model it runs: a small common shift of all
    embeddings (static int8 shifts the cnn's by ~0.13) is absorbed by the
    reference. The agreement against the float model's reference is reported
    too, to show that shift.
    """
    cosine = row_cosine(fp32_emb, int8_emb)
    fp32_ref, fp32_threshold = quick_reference(fp32_emb, is_good)
    int8_ref, int8_threshold = quick_reference(int8_emb, is_good)
    fp32_defect = defect_verdicts(fp32_emb, fp32_ref, fp32_threshold)
    int8_defect = defect_verdicts(int8_emb, int8_ref, int8_threshold)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "verdict_agreement": float(np.mean(fp32_defect == int8_defect)),
        "verdicts_changed": int(np.sum(fp32_defect != int8_defect)),
        "verdict_agreement_on_fp32_reference": float(
            np.mean(fp32_defect == defect_verdicts(int8_emb, fp32_ref, fp32_threshold))),
        "reference_shift": float(np.linalg.norm(int8_ref - fp32_ref)),
        "reference_threshold_fp32": fp32_threshold,
        "reference_threshold_int8": int8_threshold,
    }


def gate_failures(figures: dict) -> list[str]:
    """Why the exported model must not ship; empty when it may."""
    failures = []
    if figures["torch_vs_fp32_max_abs_diff"] > MAX_TORCH_ONNX_DIFF:
        failures.append(
            f"fp32 ONNX differs from torch by {figures['torch_vs_fp32_max_abs_diff']:.2e} (limit {MAX_TORCH_ONNX_DIFF:.0e})"
        )
    int8 = figures.get("int8")
    if int8 is not None:
        if int8["cosine_mean"] < MIN_MEAN_COSINE:
            failures.append(f"int8 mean cosine to fp32 is {int8['cosine_mean']:.5f} (limit {MIN_MEAN_COSINE})")
        if int8["verdict_agreement"] < MIN_VERDICT_AGREEMENT:
            failures.append(
                f"int8 verdicts agree with fp32 on {int8['verdict_agreement']:.2%} of parts "
                f"(limit {MIN_VERDICT_AGREEMENT:.1%})"
            )
    return failures
