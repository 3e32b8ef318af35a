"""Pictures a quality engineer can look at: score histograms, ROC, contact sheet.

Rendered with matplotlib's Agg backend (no screen on a line PC) to PNG bytes,
so callers decide where they go (a reference-set version folder, a report dir).
"""
from __future__ import annotations

import io

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def score_histogram(scores: np.ndarray, classes: list[str], threshold: float, metric: str, title: str = "") -> bytes:
    """Histogram of scores stratified by class (good first), with the threshold line."""
    plt = _pyplot()
    classes_arr = np.array(classes)
    names = ["good"] + sorted(set(classes) - {"good"})
    finite = _finite(scores)
    bins = np.linspace(finite.min(), max(finite.max(), threshold) * 1.02, 50) if finite.size else 10
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name in names:
        values = _finite(scores[classes_arr == name])
        if values.size:
            axes.hist(values, bins=bins, alpha=0.55 if name == "good" else 0.5, label=f"{name} (n={values.size})",
                      histtype="stepfilled" if name == "good" else "step", linewidth=1.6)
    axes.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {threshold:.4g}")
    axes.set_xlabel(f"{metric} score")
    axes.set_ylabel("parts")
    axes.set_title(title or f"{metric} scores by class")
    axes.legend(fontsize=8)
    return _png(figure)


def roc_curve(good_scores: np.ndarray, defect_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-reject and catch rates over every threshold (NaN/inf count as highest)."""
    good = np.nan_to_num(np.asarray(good_scores, float), nan=np.inf, posinf=np.inf)
    defect = np.nan_to_num(np.asarray(defect_scores, float), nan=np.inf, posinf=np.inf)
    thresholds = np.unique(np.concatenate([good, defect, [-np.inf]]))[::-1]
    false_reject = np.array([np.mean(good > t) for t in thresholds])
    caught = np.array([np.mean(defect > t) for t in thresholds])
    return false_reject, caught


def roc_figure(per_metric: dict[str, tuple[np.ndarray, np.ndarray]], aurocs: dict[str, float]) -> bytes:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 5))
    for name, (good, defect) in per_metric.items():
        fpr, tpr = roc_curve(good, defect)
        axes.plot(fpr, tpr, label=f"{name} (AUROC {aurocs[name]:.4f})")
    axes.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("good parts rejected (false-reject rate)")
    axes.set_ylabel("defects caught")
    axes.set_title("ROC")
    axes.legend(fontsize=8, loc="lower right")
    return _png(figure)


def contact_sheet(crops: list[np.ndarray], captions: list[str], title: str, columns: int = 8) -> bytes:
    """Enlarged crops in a grid with a caption under each."""
    plt = _pyplot()
    rows = max(1, int(np.ceil(len(crops) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.3 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, crop, caption in zip(axes.flat, crops, captions):
        ax.imshow(crop, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(caption, fontsize=6)
    figure.suptitle(title, fontsize=9)
    return _png(figure)
