"""Calibration from the station's own camera: grab distinct known-good parts.

A camera delivers the same part in many frames while it sits in the ROI (and
a stopped line delivers one part forever). Calibration needs different parts,
so a frame counts only when its prepared crop differs from the last accepted
one by at least `min_change` grey levels, mean absolute difference.

Why 5.0: two captures of an unchanged scene differ only by sensor noise; with
sigma 3 grey levels per capture the difference has sigma 3*sqrt(2) and its
mean absolute value is 3*sqrt(2)*sqrt(2/pi) = 3.39 (3.4 to 3.7 measured over
a 36x26 crop; resizing a larger ROI down averages it lower still). Two
consecutive different parts of the simulated line differ by 6.6 or more
(median 29): pose jitter moves the bright body's edges over the dark belt.
5.0 sits ~1.5x above noise and below every consecutive pair; a rare near
twin that falls under it is skipped, which costs one part, not accuracy.
A darker, noisier camera (sigma 5 -> 5.6) needs `--min-change` raised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration import workflow
from calibration.thresholds import DEFAULT_TARGET_FALSE_REJECT, MIN_GOOD_PARTS_CALIBRATE, CalibrationError
from station.core.reference_set import writing
from station.core.state_dir import StateLock, open_state_dir
from station.runtime.sources import open_source
from station.core.embedder import Embedder, same_input
from station.core.errors import ConfigError
from station.core.preprocess import InputSpec, Roi, prepare_crop
from station.core.tiles import crop_tiles, split_tiles

log = logging.getLogger(__name__)

DEFAULT_MIN_CHANGE = 5.0


@dataclass(frozen=True)
class GrabbedCrops:
    crops: np.ndarray  # uint8 (n, height, width), as the model will see them
    sources: list[str]  # where each accepted crop came from (file, frame number)
    frames_seen: int
    skipped: int  # frames too similar to the last accepted crop

    def __len__(self) -> int:
        return len(self.crops)


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def grab_distinct_crops(
    frames: Iterable,
    roi: Roi | None,
    spec: InputSpec,
    count: int,
    min_change: float = DEFAULT_MIN_CHANGE,
    progress: bool = False,
    tiles: list[Roi] | None = None,
) -> GrabbedCrops:
    """Up to `count` crops of distinct parts from `frames` (a FrameSource, or Frames, or images).
    `tiles`: a tiled station's tiles (frame pixels): each crop is every tile's, side by side
    (height, tiles * width), as the station's own crop of a tiled part is.

    Stops as soon as `count` parts are in (a FrameSource is closed then); fewer
    come back when the frames end first: the caller decides whether that is enough.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    crops: list[np.ndarray] = []
    sources: list[str] = []
    seen = skipped = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, desc="distinct parts", unit="part", leave=False)  # stderr by default
    iterator = iter(frames)
    try:
        for item in iterator:
            image = getattr(item, "image", item)
            seen += 1
            crop = prepare_crop(image, spec, roi) if tiles is None else np.hstack(list(crop_tiles(image, spec, tiles)))
            if crops and mean_abs_difference(crop, crops[-1]) < min_change:
                skipped += 1
                if bar is not None:
                    bar.set_postfix(skipped=skipped, refresh=False)
                continue
            crops.append(crop)
            sources.append(str(getattr(item, "source", seen - 1)))
            if bar is not None:
                bar.update(1)
            elif len(crops) % 10 == 0:  # no terminal (journal): a line every 10 parts
                log.info("%d/%d distinct parts (%d frames, %d unchanged skipped)", len(crops), count, seen, skipped)
            if len(crops) >= count:
                break
    finally:
        if bar is not None:
            bar.close()
        for stoppable in (iterator, frames):  # the generator's cleanup stops a camera reader thread
            close = getattr(stoppable, "close", None)
            if close is not None:
                close()
    log.info("grabbed %d distinct parts from %d frames (%d unchanged skipped)", len(crops), seen, skipped)
    width = spec.width * (1 if tiles is None else len(tiles))
    stacked = np.stack(crops) if crops else np.empty((0, spec.height, width), np.uint8)
    return GrabbedCrops(stacked, sources, seen, skipped)


def product_reference(config, product: str | None) -> tuple[str, Path]:
    """(product, reference set folder) to calibrate: a product the config lists, default the active one."""
    products = config.product_references
    if product is None:
        product = config.product if config.products is not None else next(iter(products))
    if product not in products:
        if config.products is None:
            raise ConfigError(
                f"product {product!r} is not in the configuration: it has a single reference: "
                f"{config.reference} (product {next(iter(products))!r}); list several under products:"
            )
        raise ConfigError(
            f"product {product!r} is not in the configuration's products: "
            f"{', '.join(sorted(products))}; add it under products: first"
        )
    return product, products[product] if isinstance(products[product], dict) else Path(products[product])


@dataclass(frozen=True)
class LiveCalibration:
    saved: object  # station.core.reference_set.ReferenceSet (the first form's, with several)
    calibration: object  # calibration.thresholds.Calibration
    grabbed: GrabbedCrops
    warnings: list[str]
    # form -> (saved, calibration): with model: {FORM: PATH} each form's own reference set, from the same
    # parts (an int8 embedding is not the fp32 one: neither's threshold fits the other); {None: ...} else.
    forms: dict = None


def region_to_calibrate(config, region: str | None, product: str | None) -> tuple[object | None, str | None]:
    """(the region's Roi, the product to calibrate) for `--roi NAME`; a station with rois: must name one."""
    regions = {r.name: r for r in config.rois or ()}
    if region is None:
        if regions:
            raise ConfigError(
                f"this station judges named regions ({', '.join(regions)}): name the one to calibrate with --roi NAME"
            )
        return (config.roi.to_roi() if config.roi is not None else None), product
    if region not in regions:
        known = f"its regions are {', '.join(regions)}" if regions else "it has no rois: (named regions)"
        raise ConfigError(f"--roi {region!r} is not a region of the configuration: {known}")
    judged_as = regions[region].product
    if product is not None and judged_as is not None and product != judged_as:
        raise ConfigError(
            f"region {region!r} is judged against product {judged_as!r}, not {product!r}: "
            "drop --product, or change the region's product: in the configuration"
        )
    return regions[region].to_roi(), product or judged_as


def calibrate_from_camera(
    config,
    product: str | None,
    count: int,
    min_good: int = MIN_GOOD_PARTS_CALIBRATE,
    min_change: float = DEFAULT_MIN_CHANGE,
    metric: str = "auto",
    target_false_reject: float = DEFAULT_TARGET_FALSE_REJECT,
    progress: bool = False,
    credentials: tuple[str, str] | None = None,
    region: str | None = None,
) -> LiveCalibration:
    """Grab `count` distinct parts from the configured camera and save a new reference set version;
    `region`: the named region (rois:) whose crops calibrate its product's reference set."""
    roi, product = region_to_calibrate(config, region, product)
    product, _ = product_reference(config, product)
    if min_good < 1:
        raise ConfigError(f"--min-good must be at least 1, got {min_good}")
    if count < min_good:
        raise ConfigError(f"--count {count} is below the minimum of {min_good} good parts (--min-good)")
    if min_change < 0:
        raise ConfigError(f"--min-change must be >= 0, got {min_change}")
    # Every form of the model gets its reference set from the same parts, each in the folder the configuration names.
    outs = {form: product_reference(config.for_form(form), product)[1] for form in config.model_paths}
    # Held from the start: a second calibration of these folders is refused before the camera is taken.
    with ExitStack() as held:
        for form_out in outs.values():
            held.enter_context(writing(form_out, f"station calibrate -c, product {product}"))
        return _grab_and_save(
            config,
            outs,
            product,
            roi,
            count,
            min_good,
            min_change,
            metric,
            target_false_reject,
            progress,
            credentials,
            region,
        )


def _grab_and_save(
    config,
    outs: dict,
    product: str,
    roi,
    count: int,
    min_good: int,
    min_change: float,
    metric: str,
    target_false_reject: float,
    progress: bool,
    credentials,
    region: str | None,
) -> LiveCalibration:
    embedders = {form: Embedder(path, threads=config.runtime.threads) for form, path in config.model_paths.items()}
    same_input(embedders, config.model_paths)
    embedder = next(iter(embedders.values()))  # every form takes the same crop
    if config.tiles is not None and config.roi is None:
        raise ConfigError(
            "tiles: without roi: the tiles' region comes from the photos calibrated on: set roi: "
            "(where the part sits in the camera's frames) to calibrate from the camera, or "
            "calibrate photos with station calibrate --tiles"
        )
    geometry = config.tiles.geometry(config.roi) if config.tiles is not None else None
    # The camera is the station's: never while it runs (AlreadyRunningError, exit 75).
    with StateLock(open_state_dir(config.state_dir), f"station calibrate -c (product {product})"):
        # Never loop for calibration: a replayed folder or video would count the same parts again.
        source = open_source(
            config.camera.source,
            loop=False,
            fps=config.camera.fps,
            max_pixels=config.camera.max_pixels,
            credentials=credentials,
            genicam=config.camera.genicam,  # a GenICam camera set as `station run` sets it
            trigger="hardware" if config.trigger == "hardware" else None,
        )  # then a frame per part
        grabbed = grab_distinct_crops(
            source,
            roi,
            embedder.input_spec,
            count,
            min_change,
            progress,
            None if geometry is None else [tile for _, tile in geometry.tiles(roi.x, roi.y)],
        )
    where = f"camera {source.description}"
    if len(grabbed) < min_good:
        raise CalibrationError(
            f"{where} ended after {len(grabbed)} distinct parts ({grabbed.frames_seen} frames, "
            f"{grabbed.skipped} unchanged); at least {min_good} are needed: nothing was saved"
        )
    warnings = []
    if len(grabbed) < count:
        warnings.append(f"{where} ended after {len(grabbed)} of the {count} parts asked for")
    statistics = {
        "source": {
            "camera": where.removeprefix("camera "),
            **({"region": region} if region else {}),
            "frames_seen": grabbed.frames_seen,
            "skipped_unchanged": grabbed.skipped,
            "min_change": float(min_change),
        }
    }
    forms = {}
    for form, form_embedder in embedders.items():
        forms[form] = workflow.calibrate_embedded(
            form_embedder,
            _good_set(form_embedder, grabbed, geometry),
            None,
            outs[form],
            product,
            metric,
            target_false_reject,
            min_good,
            extra_statistics=statistics,
            tiles=geometry,
        )
    saved, calibration = next(iter(forms.values()))
    said = list(dict.fromkeys(warning for _, fitted in forms.values() for warning in fitted.warnings))
    return LiveCalibration(saved, calibration, grabbed, warnings + said, forms)


def _good_set(embedder, grabbed: GrabbedCrops, geometry):
    """The grabbed crops embedded: (parts, dim), or for a tiled station (parts, tiles, dim) from the
    side-by-side tiles, split as the station splits them (station/core/tiles.py)."""
    paths, classes = [Path(s) for s in grabbed.sources], ["good"] * len(grabbed)
    if geometry is None:
        return workflow.embed_crops(embedder, grabbed.crops, paths, classes)
    split = split_tiles(grabbed.crops, geometry.count)
    embedded = workflow.embed_crops(embedder, split, paths * geometry.count, classes * geometry.count)
    return workflow.EmbeddedImages(embedded.embeddings.reshape(len(grabbed), geometry.count, -1), None, paths, classes)
