"""What the station judges with: the model, the product's reference set, the ROI.

An Inspector is immutable. Reloads and changeovers build a new one and swap it
in whole, so a frame is never judged by a model from one load and a reference
from another, and a bad new file leaves the old Inspector running.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from station.core import reference_set as reference_sets
from station.core.embedder import Embedder
from station.core.preprocess import Roi, prepare_crop, regions_problem, to_model_input
from station.core.errors import ConfigError, StationError
from station.core.tiles import TileGeometry, recorded_geometry, reference_geometry_problem
from station.core.verdict import judge
from station.runtime.config.station import StationConfig
from station.runtime.model_forms import FormChoice, choose, form_of
from station.runtime.regions import Region, bounding_roi, crop_regions, judge_regions, split_crops


@dataclass(frozen=True)
class Inspector:
    embedder: Embedder
    reference_set: reference_sets.ReferenceSet
    product: str
    roi: Roi | None  # with regions: the box around them all (the daemon checks it fits the frames)
    regions: tuple[Region, ...] = ()  # rois: in station.yaml (station/runtime/regions.py)
    tiles_over_frame: bool = False  # tiles: without roi: any frame holding the tiles' region is judged
    form: FormChoice | None = None  # with model: {FORM: PATH}, the form judging and what each cost here

    @classmethod
    def load(
        cls,
        model: Path,
        reference: Path,
        product: str | None,
        roi: Roi | None,
        threads: int = 1,
        embedder: Embedder | None = None,
    ) -> "Inspector":
        """Load and cross-check model and reference set; StationError when they do not fit."""
        embedder = embedder or Embedder(model, threads=threads)
        loaded = reference_sets.load(reference, model=embedder.info)
        embedder.warm_up()
        return cls(embedder, loaded, product or loaded.product, roi)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The uint8 crop the model sees (DataError when the frame cannot give one)."""
        if self.regions:  # every region's crop, side by side
            return crop_regions(image, self.embedder.input_spec, self.regions)
        return prepare_crop(image, self.embedder.input_spec, self.roi)

    def view(self) -> tuple:
        """What its crops show: the regions and the model's input size (the presence gate's belt is learned for one)."""
        spec = self.embedder.input_spec
        return self.roi, tuple(r.roi for r in self.regions), spec.width, spec.height

    @property
    def whole_frame(self) -> bool:
        """No ROI and no regions: each frame is the part, at its own size (a folder of photos)."""
        return (self.roi is None and not self.regions) or self.tiles_over_frame

    def frame_problem(self, frame_shape: tuple | None) -> str | None:
        """Why frames of this shape cannot be judged (the ROI or a named region outside it, or too small for the
        model); None when they can. Without a shape: whether the configured regions are large enough."""
        named = [(r.name, r.roi) for r in self.regions] if self.regions else [(None, self.roi)]
        return regions_problem(named, frame_shape, self.embedder.input_spec)

    def judge_crops(self, crops: np.ndarray) -> list:
        """One Judgement per crop; with regions one PartJudgement per frame, every region of every frame in ONE embedder call."""
        if self.regions:
            crops = split_crops(crops, len(self.regions))
        embeddings = self.embedder.embed(to_model_input(crops, self.embedder.input_spec))
        spec = self.embedder.input_spec  # with a per-position model, the worst position is placed through it
        if self.regions:
            return judge_regions(embeddings, self.regions, spec)
        return judge(embeddings, self.reference_set, spec, self.roi)

    def describe(self) -> dict:
        return {
            "product": self.product,
            "model": self.embedder.info.short_id,
            "reference": self.reference_set.version,
            "metric": self.reference_set.metric,
            "threshold": self.reference_set.threshold,
            **(self.form.describe() if self.form else {"model_form": form_of(self.embedder.info.quantization)}),
        }


def load_inspector(config: StationConfig, product: str | None = None, embedder: Embedder | None = None) -> Inspector:
    """The inspector for a configured product (default: the config's), loaded and cross-checked; `embedder`: one
    already loaded from config.model (`station check` has), so the model is not loaded twice. With a model in
    several forms, the faster on this CPU (or the pinned one) judges, with its own reference sets."""
    form = None
    if isinstance(config.model, dict):
        form = choose(config)
        config, embedder = config.for_form(form.form), form.embedder
    name, path = config.reference_for(product)
    roi = config.roi.to_roi() if config.roi else None
    inspector = Inspector.load(config.model, path, name, roi, threads=config.runtime.threads, embedder=embedder)
    geometry = tile_geometry(config, inspector.reference_set, path)
    problem = reference_geometry_problem(
        inspector.reference_set.statistics,
        geometry,
        f"the reference set {path} (v{inspector.reference_set.version:04d})",
    )
    if problem:
        raise ConfigError(f"{'tiles' if geometry else 'reference'}: {problem}")
    if geometry is not None:
        inspector = with_tiles(inspector, geometry)
    elif config.rois:
        inspector = with_regions(inspector, config)
    inspector = replace(inspector, form=form) if form else inspector
    problem = inspector.frame_problem(None)
    if problem:
        raise ConfigError(f"{'rois' if config.rois else 'tiles' if geometry else 'roi'}: {problem}")
    return inspector


def tile_geometry(config: StationConfig, reference_set, path) -> TileGeometry | None:
    """The configured tiles over the roi, or without one over the region the reference set records."""
    if not config.tiles:
        return None
    if config.roi is not None:
        return config.tiles.geometry(config.roi)
    recorded = recorded_geometry(reference_set.statistics)
    if recorded is None:
        raise ConfigError(
            f"tiles: the reference set {path} (v{reference_set.version:04d}) was calibrated on whole "
            "parts, not tiles: recalibrate with these tiles (station calibrate --tiles)"
        )
    try:
        return config.tiles.geometry(Roi(0, 0, int(recorded["region_width"]), int(recorded["region_height"])))
    except (KeyError, TypeError, ValueError, StationError) as exc:
        raise ConfigError(
            f"tiles: the reference set {path} records tiles that do not fit its own region ({exc}): recalibrate"
        ) from None


def with_tiles(inspector: Inspector, geometry: TileGeometry) -> Inspector:
    """The inspector judging the roi cut into tiles (station/core/tiles.py): every tile a region of the
    station's product, all against its ONE reference set, calibrated on these tiles. Without an roi the
    tiles sit at the frame's top-left, and any frame holding them is judged (each photo is its part)."""
    roi = inspector.roi or Roi(0, 0, geometry.region_width, geometry.region_height)
    regions = tuple(
        Region(name, tile, inspector.product, inspector.reference_set) for name, tile in geometry.tiles(roi.x, roi.y)
    )
    return replace(inspector, roi=roi, regions=regions, tiles_over_frame=inspector.roi is None)


def with_regions(inspector: Inspector, config: StationConfig) -> Inspector:
    """The inspector judging config.rois, each region against its product's reference set (loaded once each)."""
    loaded = {inspector.product: inspector.reference_set}
    regions = []
    for region in config.rois:
        product = region.product or inspector.product
        if product not in loaded:
            path = config.reference_for(product)[1]
            loaded[product] = reference_sets.load(path, model=inspector.embedder.info)
            problem = reference_geometry_problem(loaded[product].statistics, None, f"the reference set {path}")
            if problem:
                raise ConfigError(f"rois: region {region.name}: {problem}")
        regions.append(Region(region.name, region.to_roi(), product, loaded[product]))
    regions = tuple(regions)
    return replace(inspector, roi=bounding_roi(regions), regions=regions)
