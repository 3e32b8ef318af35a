"""Training data: crops through station.core.preprocess, splits, pairs (augmentation: export/augment.py).

Everything is numpy with an explicit Generator, in one thread, so the same
seed draws the same splits, pairs and augmentations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from station.core.errors import DataError
from station.core.imagefolder import LabeledImage, read_image
from station.core.preprocess import InputSpec, prepare_crop, to_model_input


@dataclass
class CropSet:
    """Prepared uint8 crops (n, height, width) with their classes."""

    crops: np.ndarray
    classes: np.ndarray  # str per crop, "good" or the defect folder
    items: list[LabeledImage]

    @property
    def is_defect(self) -> np.ndarray:
        return self.classes != "good"

    def subset(self, indices: np.ndarray) -> "CropSet":
        return CropSet(self.crops[indices], self.classes[indices], [self.items[i] for i in indices])

    def join(self, other: "CropSet") -> "CropSet":
        return CropSet(
            np.concatenate([self.crops, other.crops]),
            np.concatenate([self.classes, other.classes]),
            self.items + other.items,
        )


def load_crops(items: list[LabeledImage], spec: InputSpec, progress: bool = False) -> CropSet:
    """Read and prepare every image exactly as the station will (prepare_crop)."""
    crops = np.empty((len(items), spec.height, spec.width), np.uint8)
    for i, item in enumerate(tqdm(items, desc="reading images", unit="img", disable=not progress)):
        crops[i] = prepare_crop(read_image(item.path), spec)
    return CropSet(crops, np.array([item.defect_class for item in items], dtype=str), list(items))


def stratified_split(classes: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices; every class keeps about `fraction` of its images for
    validation, at least one when it has two or more."""
    train, val = [], []
    for name in sorted(set(classes.tolist())):
        members = rng.permutation(np.flatnonzero(classes == name))
        n_val = int(round(len(members) * fraction))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:
            n_val = 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.array(train, int)), np.sort(np.array(val, int))


def require_goods(crop_set: CropSet, what: str, minimum: int = 2):
    n_good = int(np.sum(~crop_set.is_defect))
    if n_good < minimum:
        raise DataError(f"{what} needs at least {minimum} good images, found {n_good}")


def sample_pairs(is_defect: np.ndarray, count: int, rng: np.random.Generator):
    """Balanced Siamese pairs: half good-good (similar), half good-defect.

    Returns (first, second, similar) index arrays; `first` is always good.
    """
    good = np.flatnonzero(~is_defect)
    defect = np.flatnonzero(is_defect)
    similar = np.arange(count) % 2 == 0
    first = rng.choice(good, count)
    second = np.where(similar, rng.choice(good, count), rng.choice(defect, count))
    return first, second, similar.astype(np.float32)


def mean_crop(crops: np.ndarray) -> np.ndarray:
    """The mean image of crops, rounded back to uint8 like any other crop
    (so it goes through the same to_model_input)."""
    return np.clip(np.round(crops.astype(np.float64).mean(axis=0)), 0, 255).astype(np.uint8)


def model_batch(crops: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 crops -> float32 batch, through the station's one preprocessing."""
    return to_model_input(crops, spec)


# ---- figures on held-out crops ----------------------------------------------------------


def auroc(good_scores: np.ndarray, defect_scores: np.ndarray) -> float:
    """P(defect scores above good), ties counted half (Mann-Whitney)."""
    scores = np.concatenate([good_scores, defect_scores])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, counts)
    n_good, n_defect = len(good_scores), len(defect_scores)
    return float((ranks[n_good:].sum() - n_defect * (n_defect + 1) / 2.0) / (n_good * n_defect))


def fit_threshold(distances: np.ndarray, similar: np.ndarray) -> float:
    """The distance cut that classifies the most pairs right (similar: below)."""
    order = np.sort(distances)
    candidates = np.concatenate([[order[0] - 1e-6], (order[1:] + order[:-1]) / 2, [order[-1] + 1e-6]])
    accuracies = [np.mean((distances < c) == similar.astype(bool)) for c in candidates]
    return float(candidates[int(np.argmax(accuracies))])
