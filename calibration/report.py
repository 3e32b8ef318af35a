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


class ScoreBins:
    """Histogram bins over the finite scores and the threshold, plus one bin at the right for
    scores that are not finite (SOART3's NaN where a part points away from the reference, inf),
    so that every part appears in the figure: such parts are NG, and the bin says so."""

    def __init__(self, scores: np.ndarray, threshold: float, count: int):
        finite = _finite(scores)
        low = min(finite.min(), threshold) if finite.size else threshold - 1.0
        high = max(finite.max(), threshold) if finite.size else threshold + 1.0
        margin = 0.03 * (high - low) if high > low else 1.0
        self.edges = np.linspace(low, high + margin, count + 1)
        width = self.edges[1] - self.edges[0]
        self.not_finite_bin = (self.edges[-1] + width, self.edges[-1] + 3 * width)
        self.any_not_finite = bool(np.any(~np.isfinite(np.asarray(scores, dtype=float))))
        if self.any_not_finite:
            self.edges = np.append(self.edges, self.not_finite_bin)

    def place(self, values: np.ndarray) -> np.ndarray:
        """Every value, the ones that are not finite moved into their own bin."""
        values = np.asarray(values, dtype=float)
        return np.where(np.isfinite(values), values, sum(self.not_finite_bin) / 2.0)

    @staticmethod
    def label(name: str, values: np.ndarray) -> str:
        not_finite = int(np.sum(~np.isfinite(np.asarray(values, dtype=float))))
        return f"{name} (n={len(values)}" + (f", {not_finite} not finite)" if not_finite else ")")

    def mark(self, axes):
        if self.any_not_finite:
            axes.axvspan(*self.not_finite_bin, color="0.92", zorder=0)
            axes.annotate(
                "not finite",
                (sum(self.not_finite_bin) / 2.0, 1.0),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                fontsize=7,
            )


def score_histogram(scores: np.ndarray, classes: list[str], threshold: float, metric: str, title: str = "") -> bytes:
    """Histogram of scores stratified by class (good first), with the threshold line; every part counted."""
    plt = _pyplot()
    scores = np.asarray(scores, float)
    classes_arr = np.array(classes)
    names = ["good"] + sorted(set(classes) - {"good"})
    bins = ScoreBins(scores, threshold, 50)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name in names:
        values = scores[classes_arr == name]
        if values.size:
            axes.hist(
                bins.place(values),
                bins=bins.edges,
                alpha=0.55 if name == "good" else 0.5,
                label=bins.label(name, values),
                histtype="stepfilled" if name == "good" else "step",
                linewidth=1.6,
            )
    bins.mark(axes)
    return _threshold_and_labels(figure, axes, threshold, metric, "parts", title or f"{metric} scores by class")


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


def roc_zoomed(
    good_scores: np.ndarray,
    defect_scores: np.ndarray,
    threshold: float,
    max_false_reject: float = 0.05,
    title: str = "",
) -> bytes:
    """ROC limited to 0..max_false_reject false rejects, where a line actually runs, with the operating point."""
    plt = _pyplot()
    fpr, tpr = roc_curve(good_scores, defect_scores)
    good = np.nan_to_num(np.asarray(good_scores, float), nan=np.inf)
    defect = np.nan_to_num(np.asarray(defect_scores, float), nan=np.inf)
    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    axes.step(fpr * 100, tpr * 100, where="post", label="held-out test parts")
    point = (np.mean(good > threshold) * 100, np.mean(defect > threshold) * 100)
    outside = " (outside this zoom)" if point[0] > max_false_reject * 100 else ""
    axes.plot(
        [min(point[0], max_false_reject * 100)],
        [point[1]],
        "o",
        color="crimson",
        label=f"threshold {threshold:.4g}: {point[0]:.1f} % rejected, {point[1]:.1f} % caught{outside}",
    )
    axes.set_xlim(0, max_false_reject * 100)
    start = tpr[fpr == 0].max() if np.any(fpr == 0) else 0.0
    axes.set_ylim(max(0.0, min(start * 100, point[1]) - 5), 100.5)
    axes.set_xlabel("good parts rejected (%)")
    axes.set_ylabel("defects caught (%)")
    axes.set_title(title or f"ROC, false rejects 0-{max_false_reject:.0%}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    return _png(figure)


def log_histogram(scores: np.ndarray, classes: list[str], threshold: float, metric: str, title: str = "") -> bytes:
    """Score histogram with log counts (rare tails visible); escapes, defects at or below
    the threshold, marked one by one with their class; every part counted."""
    plt = _pyplot()
    scores = np.asarray(scores, float)
    classes_arr = np.array(classes)
    bins = ScoreBins(scores, threshold, 60)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    good, defect = scores[classes_arr == "good"], scores[classes_arr != "good"]
    axes.hist(bins.place(good), bins=bins.edges, alpha=0.6, label=bins.label("good", good), log=True)
    if defect.size:
        axes.hist(bins.place(defect), bins=bins.edges, alpha=0.6, label=bins.label("defect", defect), log=True)
    bins.mark(axes)
    escaped = np.flatnonzero((classes_arr != "good") & (scores <= threshold))
    for i in escaped:
        axes.axvline(scores[i], color="black", linewidth=0.8, ymax=0.25)
        axes.annotate(classes[i], (scores[i], 1), rotation=90, fontsize=6, va="bottom")
    return _threshold_and_labels(
        figure, axes, threshold, metric, "parts (log)", title or f"{metric} scores; {escaped.size} escape(s) marked"
    )


def _threshold_and_labels(figure, axes, threshold: float, metric: str, ylabel: str, title: str) -> bytes:
    axes.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {threshold:.4g}")
    axes.set_xlabel(f"{metric} score")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _png(figure)


MAX_TILE_SIDE = 640  # pixels: 24 photos of 2000x1500 enlarged 4x made a 203 MB, 1.2-gigapixel sheet


def native_sheet(images: list[np.ndarray], captions: list[str], scale: int = 4, columns: int = 6) -> bytes:
    """Images at native resolution, each enlarged by an integer factor (at most `scale`, a tile's longer side
    at most MAX_TILE_SIDE) with nearest-neighbour (every stored pixel a visible square, nothing smoothed),
    captioned, tiled into one PNG; a photo larger than a tile is shrunk to it (INTER_AREA)."""
    import cv2

    tiles = []
    for image, caption in zip(images, captions):
        grey = image if image.ndim == 2 else cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
        if grey.dtype != np.uint8:
            grey = (grey.astype(np.float64) / max(float(grey.max()), 1.0) * 255).astype(np.uint8)
        side = max(grey.shape[:2])
        if side > MAX_TILE_SIDE:
            shrink = MAX_TILE_SIDE / side
            big = cv2.resize(
                grey,
                (max(1, round(grey.shape[1] * shrink)), max(1, round(grey.shape[0] * shrink))),
                interpolation=cv2.INTER_AREA,
            )
        else:
            factor = max(1, min(scale, MAX_TILE_SIDE // side))
            big = cv2.resize(grey, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
        label = np.full((28, big.shape[1]), 255, np.uint8)
        for row, text in enumerate(caption.split("\n")[:2]):
            cv2.putText(
                label,
                text[: max(4, big.shape[1] // 7)],
                (2, 11 + 13 * row),
                cv2.FONT_HERSHEY_PLAIN,
                0.8,
                0,
                1,
                cv2.LINE_AA,
            )
        tiles.append(np.vstack([big, label]))
    if not tiles:
        tiles = [np.full((28, 120), 255, np.uint8)]
    height = max(t.shape[0] for t in tiles) + 6
    width = max(t.shape[1] for t in tiles) + 6
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * height, min(columns, len(tiles)) * width), 255, np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        sheet[r * height + 3 : r * height + 3 + tile.shape[0], c * width + 3 : c * width + 3 + tile.shape[1]] = tile
    ok, encoded = cv2.imencode(".png", sheet)
    return encoded.tobytes()
