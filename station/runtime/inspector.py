"""What the station judges with: the model, the product's reference set, the ROI.

An Inspector is immutable. Reloads and changeovers build a new one and swap it
in whole, so a frame is never judged by a model from one load and a reference
from another, and a bad new file leaves the old Inspector running.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from station.core import reference_set as reference_sets
from station.core.embedder import Embedder
from station.core.preprocess import Roi, prepare_crop, to_model_input
from station.core.errors import StationError
from station.core.verdict import Judgement, judge
from station.runtime.config import StationConfig


@dataclass(frozen=True)
class Inspector:
    embedder: Embedder
    reference_set: reference_sets.ReferenceSet
    product: str
    roi: Roi | None

    @classmethod
    def load(cls, model: Path, reference: Path, product: str | None, roi: Roi | None, threads: int = 1,
             embedder: Embedder | None = None) -> "Inspector":
        """Load and cross-check model and reference set; StationError when they do not fit."""
        embedder = embedder or Embedder(model, threads=threads)
        loaded = reference_sets.load(reference)
        reference_sets.verify_for_model(loaded, embedder.info.sha256, embedder.info.embedding_dim)
        embedder.warm_up()
        return cls(embedder, loaded, product or loaded.product, roi)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The uint8 crop the model sees (DataError when the frame cannot give one)."""
        return prepare_crop(image, self.embedder.input_spec, self.roi)

    def judge_crops(self, crops: np.ndarray) -> list[Judgement]:
        embeddings = self.embedder.embed(to_model_input(crops, self.embedder.input_spec))
        return judge(embeddings, self.reference_set)

    def describe(self) -> dict:
        return {
            "product": self.product,
            "model": self.embedder.info.short_id,
            "reference": self.reference_set.version,
            "metric": self.reference_set.metric,
            "threshold": self.reference_set.threshold,
        }


def load_inspector(config: StationConfig, product: str | None = None) -> Inspector:
    """The inspector for a configured product (default: the config's), loaded and cross-checked."""
    if config.products is None:
        path, name = config.reference, None
    else:
        name = product or config.product
        if name not in config.products:
            raise StationError(f"unknown product {name!r}; configured: {', '.join(sorted(config.products))}")
        path = config.products[name]
    roi = config.roi.to_roi() if config.roi else None
    return Inspector.load(config.model, path, name, roi, threads=config.runtime.threads)
