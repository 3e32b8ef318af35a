"""Synthetic anomalies drawn on good crops: negatives when real defects are few or none.

At a changeover a line often has good parts only. A trunk still learns what
"not this part" looks like from local damage drawn on good crops:

    cutpaste  a patch of another good crop (or of the same one, elsewhere),
              sometimes rotated or relit, pasted at a random place
    noise     a small region with strong Gaussian noise
    scratch   a thin bright or dark line, straight or bent once
    blob      a small bright or dark spot with soft edges
    missing   a chunk cut in from an edge, filled with the crop's darkest or
              brightest grey, whichever differs more (a broken corner, excess material)
    stain     a large, soft, low-contrast bright or dark patch (uneven surface)

Sizes are fractions of the crop, so the same anomalies fit any model input.
All of it is numpy/OpenCV on uint8 crops with an explicit Generator.
"""

from __future__ import annotations

import cv2
import numpy as np

from station.core.errors import DataError

KINDS = ("cutpaste", "noise", "scratch", "blob", "missing", "stain")
# Goods-only training, cnn (export/train.py's table protocol), test AUROC / accuracy,
# simulated lines and magnetic-tile: the first four 0.984/0.954 and 0.827/0.789;
# all six 0.973/0.943 and 0.810/0.822. "missing" and "stain" stay available, not default.
DEFAULT_KINDS = KINDS[:4]
SYNTHETIC_MODES = ("auto", "always", "never")
FEW_DEFECTS = 30  # "auto" mixes synthetic anomalies in below this many real training defects
SYNTHETIC_SHARE = 0.5  # of each batch's negatives, when real and synthetic are mixed
SYNTHETIC_CLASS = "synthetic"
# Contrast of a drawn anomaly against its surroundings, grey levels.
MIN_CONTRAST, MAX_CONTRAST = 35.0, 110.0


def synthesize(
    goods: np.ndarray, count: int, rng: np.random.Generator, kinds: tuple[str, ...] = DEFAULT_KINDS
) -> np.ndarray:
    """`count` anomalous crops, each drawn on a randomly chosen good crop."""
    goods = np.asarray(goods)
    if goods.ndim != 3 or goods.dtype != np.uint8 or len(goods) == 0:
        raise ValueError(f"synthesize wants uint8 good crops (n, height, width), got {goods.dtype} {goods.shape}")
    bases = rng.integers(0, len(goods), count)
    chosen = rng.integers(0, len(kinds), count)
    out = np.empty((count,) + goods.shape[1:], np.uint8)
    for i in range(count):
        out[i] = draw(goods[bases[i]], kinds[chosen[i]], rng, goods)
    return out


def draw(crop: np.ndarray, kind: str, rng: np.random.Generator, donors: np.ndarray | None = None) -> np.ndarray:
    """One anomaly of `kind` on a copy of `crop` (uint8, height x width)."""
    image = crop.astype(np.float32)
    if kind == "cutpaste":
        image = _cutpaste(image, rng, crop if donors is None else donors[rng.integers(len(donors))])
    elif kind == "noise":
        image = _noise(image, rng)
    elif kind == "scratch":
        image = _scratch(image, rng)
    elif kind == "blob":
        image = _blob(image, rng)
    elif kind == "missing":
        image = _missing(image, rng)
    elif kind == "stain":
        image = _stain(image, rng)
    else:
        raise ValueError(f"unknown synthetic anomaly {kind!r}: choose one of {', '.join(KINDS)}")
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _signed_contrast(rng) -> float:
    return float(rng.uniform(MIN_CONTRAST, MAX_CONTRAST) * rng.choice([-1.0, 1.0]))


def _box(rng, height: int, width: int, low: float, high: float) -> tuple[int, int, int, int]:
    """(y, x, h, w) of a random box whose sides are low..high of the crop's."""
    h = max(2, int(round(height * rng.uniform(low, high))))
    w = max(2, int(round(width * rng.uniform(low, high))))
    y = int(rng.integers(0, max(1, height - h + 1)))
    x = int(rng.integers(0, max(1, width - w + 1)))
    return y, x, min(h, height - y), min(w, width - x)


def _cutpaste(image: np.ndarray, rng, donor: np.ndarray) -> np.ndarray:
    height, width = image.shape
    y, x, h, w = _box(rng, height, width, 0.15, 0.4)
    sy = int(rng.integers(0, height - h + 1))
    sx = int(rng.integers(0, width - w + 1))
    patch = donor[sy : sy + h, sx : sx + w].astype(np.float32)
    if rng.random() < 0.5:
        patch = patch[::-1, ::-1]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    # Relit: a pasted patch of the same texture alone can be invisible.
    patch = (patch - patch.mean()) * rng.uniform(0.6, 1.6) + patch.mean() + _signed_contrast(rng) * 0.6
    image[y : y + h, x : x + w] = patch
    return image


def _noise(image: np.ndarray, rng) -> np.ndarray:
    height, width = image.shape
    y, x, h, w = _box(rng, height, width, 0.15, 0.35)
    image[y : y + h, x : x + w] += rng.normal(0.0, rng.uniform(20, 50), (h, w)).astype(np.float32)
    return image


def _scratch(image: np.ndarray, rng) -> np.ndarray:
    height, width = image.shape
    diagonal = float(np.hypot(height, width))
    start = rng.uniform([0, 0], [width, height])
    length = diagonal * rng.uniform(0.25, 0.7)
    angle = rng.uniform(0, np.pi)
    middle = start + 0.5 * length * np.array([np.cos(angle), np.sin(angle)])
    bend = angle + rng.uniform(-0.5, 0.5)
    end = middle + 0.5 * length * np.array([np.cos(bend), np.sin(bend)])
    points = np.round(np.stack([start, middle, end]) * 4).astype(np.int32)  # 2 fractional bits
    mask = np.zeros((height, width), np.float32)
    cv2.polylines(mask, [points.reshape(-1, 1, 2)], False, 1.0, thickness=1, lineType=cv2.LINE_AA, shift=2)
    return image + mask * _signed_contrast(rng)


def _blob(image: np.ndarray, rng) -> np.ndarray:
    height, width = image.shape
    radius = max(1.0, min(height, width) * rng.uniform(0.05, 0.15))
    axes = (radius * rng.uniform(0.7, 1.5), radius * rng.uniform(0.7, 1.5))
    center = rng.uniform([0, 0], [width, height])
    mask = np.zeros((height, width), np.float32)
    cv2.ellipse(
        mask,
        tuple(int(round(v * 4)) for v in center),
        tuple(max(1, int(round(v * 4))) for v in axes),
        float(rng.uniform(0, 180)),
        0,
        360,
        1.0,
        -1,
        cv2.LINE_AA,
        2,
    )
    mask = cv2.GaussianBlur(mask, (0, 0), 0.6)
    return image + mask / max(float(mask.max()), 1e-6) * _signed_contrast(rng)


def _missing(image: np.ndarray, rng) -> np.ndarray:
    height, width = image.shape
    # A triangle or quadrilateral with one side on a random edge.
    edge = int(rng.integers(4))
    along = sorted(rng.uniform(0, 1, 2))
    depth = rng.uniform(0.15, 0.4)
    if along[1] - along[0] < 0.15:
        along = [max(0.0, along[0] - 0.1), min(1.0, along[1] + 0.1)]
    tip = (along[0] + along[1]) / 2 + rng.uniform(-0.1, 0.1)
    points = np.array([[along[0], 0.0], [along[1], 0.0], [tip, depth]])  # (u along the edge, v inward)
    u, v = points[:, 0], points[:, 1]
    xy = {
        0: (u * width, v * height),
        1: (u * width, (1 - v) * height),
        2: (v * width, u * height),
        3: ((1 - v) * width, u * height),
    }[edge]
    mask = np.zeros((height, width), np.float32)
    cv2.fillPoly(mask, [np.round(np.stack(xy, axis=1) * 4).astype(np.int32).reshape(-1, 1, 2)], 1.0, cv2.LINE_AA, 2)
    # The extreme grey farthest from what the chunk shows now: always a visible change.
    inside = float((image * mask).sum() / max(float(mask.sum()), 1e-6))
    fill = max(np.percentile(image, [2, 98]), key=lambda grey: abs(grey - inside))
    return image * (1 - mask) + fill * mask


def _stain(image: np.ndarray, rng) -> np.ndarray:
    height, width = image.shape
    sigma = min(height, width) * rng.uniform(0.15, 0.3)
    center = rng.uniform([0, 0], [width, height])
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    bump = np.exp(-((x - center[0]) ** 2 + (y - center[1]) ** 2) / (2 * sigma**2))
    return image + bump * _signed_contrast(rng) * 0.6


class Negatives:
    """Draws negative crops for a batch: real defects and/or fresh synthetic anomalies."""

    def __init__(self, crops: np.ndarray, is_defect: np.ndarray, mode: str):
        self.defects = crops[is_defect]
        self.goods = crops[~is_defect]
        n_real = len(self.defects)
        if mode == "never" or (mode == "auto" and n_real >= FEW_DEFECTS):
            self.share = 0.0
        elif n_real == 0:
            self.share = 1.0
        else:
            self.share = SYNTHETIC_SHARE
        if n_real == 0 and self.share == 0.0:
            raise DataError(
                "training needs defect images with --synthetic-anomalies never; "
                "found none (use auto to draw synthetic ones on the good parts)"
            )

    def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        n_synthetic = int(rng.binomial(count, self.share)) if 0 < self.share < 1 else int(round(count * self.share))
        parts = []
        if count - n_synthetic:
            parts.append(self.defects[rng.integers(0, len(self.defects), count - n_synthetic)])
        if n_synthetic:
            parts.append(synthesize(self.goods, n_synthetic, rng))
        return np.concatenate(parts)
