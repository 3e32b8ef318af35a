"""The calibration and evaluation workflows behind `station calibrate` and `station evaluate`.

Images -> station preprocessing -> embedder -> fit -> reference set (+ report).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration import positions, report, thresholds, tiles as tiled
from calibration.evaluate import Evaluation, evaluate_embeddings
from station.core.reference_set import ReferenceSet, check_product_name, save, verify_for_model, writing
from station.core.errors import DataError, ImageReadError
from station.core.imagefolder import GOOD, LabeledImage, image_digest, list_images, read_image, scan_dataset
from station.core.preprocess import Roi, prepare_crop, to_model_input
from station.core.tiles import RECORD_KEY, TileGeometry, crop_tiles

MAX_NAMED_FAILURES = 20


@dataclass(frozen=True)
class EmbeddedImages:
    embeddings: np.ndarray
    crops: np.ndarray | None  # uint8 (n, h, w): what the model saw, for contact sheets (None: tiled parts)
    paths: list[Path]
    classes: list[str]


def embed_items(embedder, items: list[LabeledImage], roi: Roi | None = None, progress: bool = False) -> EmbeddedImages:
    """Read, preprocess and embed images; every unreadable file is named before failing."""
    if not items:
        raise DataError("no images to embed")
    crops, failures = [], []
    for item in tqdm_if(items, progress):
        try:
            crops.append(prepare_crop(read_image(item.path), embedder.input_spec, roi))
        except (ImageReadError, DataError) as exc:
            failures.append(str(exc) if isinstance(exc, ImageReadError) else f"{item.path}: {exc}")
    if failures:
        raise DataError(_failures_text(failures))
    return embed_crops(embedder, np.stack(crops), [i.path for i in items], [i.defect_class for i in items])


def embed_tiled_items(
    embedder, items: list[LabeledImage], roi: Roi | None, geometry: TileGeometry, progress: bool = False
) -> EmbeddedImages:
    """Read, cut into tiles (station/core/tiles.py, prepare_crop per tile) and embed: embeddings are
    (parts, tiles, dim). The tiles are not kept (hundreds a part): crops is None. Without an roi the
    region is at each photo's top-left, as the station cuts it (station/runtime/inspector.py)."""
    if not items:
        raise DataError("no images to embed")
    origin = (roi.x, roi.y) if roi is not None else (0, 0)
    rois = [tile for _, tile in geometry.tiles(*origin)]
    embeddings, failures = [], []
    for item in tqdm_if(items, progress):
        try:
            image = read_image(item.path)
            if roi is None and (image.shape[0] < geometry.region_height or image.shape[1] < geometry.region_width):
                raise DataError(
                    f"a {image.shape[1]}x{image.shape[0]} photo does not hold the tiles' "
                    f"{geometry.region_width}x{geometry.region_height} region"
                )
            tiles = crop_tiles(image, embedder.input_spec, rois)
        except (ImageReadError, DataError) as exc:
            failures.append(str(exc) if isinstance(exc, ImageReadError) else f"{item.path}: {exc}")
            continue
        embeddings.append(embedder.embed(to_model_input(tiles, embedder.input_spec)))
    if failures:
        raise DataError(_failures_text(failures))
    return EmbeddedImages(np.stack(embeddings), None, [i.path for i in items], [i.defect_class for i in items])


def common_size(paths: list[Path]) -> tuple[int, int]:
    """(width, height) every photo holds from its top-left corner: a tiled calibration's region."""
    if not paths:
        raise DataError("no images to measure")
    shapes = [read_image(path).shape[:2] for path in paths]
    return min(shape[1] for shape in shapes), min(shape[0] for shape in shapes)


def tqdm_if(items, progress: bool):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="reading", unit="img", leave=False)


def _failures_text(failures: list[str]) -> str:
    shown = "\n  ".join(failures[:MAX_NAMED_FAILURES])
    more = f"\n  ... and {len(failures) - MAX_NAMED_FAILURES} more" if len(failures) > MAX_NAMED_FAILURES else ""
    return f"{len(failures)} image(s) cannot be used:\n  {shown}{more}"


def embed_crops(embedder, crops: np.ndarray, paths: list[Path], classes: list[str]) -> EmbeddedImages:
    """Embed prepared uint8 crops (n, h, w) in batches (from files or from the camera)."""
    if not len(crops):
        raise DataError("no images to embed")
    embeddings = np.concatenate(
        [
            embedder.embed(to_model_input(crops[start : start + 512], embedder.input_spec))
            for start in range(0, len(crops), 512)
        ]
    )
    return EmbeddedImages(embeddings, crops, list(paths), list(classes))


def folder_items(good: Path, defect_folders: list[Path]) -> tuple[list[LabeledImage], list[LabeledImage]]:
    """Good parts from one folder; defects from several, each read recursively.

    A defect folder that follows the image-folder convention (has class subfolders)
    labels by subfolder; otherwise its name is the class.
    """
    if _dataset_root(Path(good)):  # its defect folders would count as good parts
        raise DataError(
            f"--good {good} holds a {GOOD}/ folder and the defect folders beside it: give "
            f"--good {Path(good) / GOOD} and each defect folder with --defects"
        )
    good_items = [LabeledImage(p, "good") for p in list_images(good)]
    if not good_items:
        raise DataError(f"{good}: no images of good parts")
    good_files = {item.path.resolve() for item in good_items}
    defect_items = []
    for folder in defect_folders:
        found = [LabeledImage(p, _defect_class(Path(folder), p)) for p in list_images(folder)]
        if not found:
            raise DataError(f"{folder}: no images of defective parts")
        both = [item.path for item in found if item.path.resolve() in good_files or not item.is_defect]
        if both:
            raise DataError(
                f"--defects {folder} holds {len(both)} good part(s) ({both[0]}"
                f"{', ...' if len(both) > 1 else ''}), which would count as defects: give the defect "
                f"class folders only (--defects {Path(folder) / 'CLASS'}, repeated)"
            )
        defect_items.extend(found)
    return good_items, defect_items


def _dataset_root(folder: Path) -> bool:
    """good/ beside other class folders: an image-folder dataset, not a folder of good parts."""
    if not (folder / GOOD).is_dir():
        return False
    return any(p.is_dir() and p.name != GOOD and not p.name.startswith(".") for p in folder.iterdir())


def _defect_class(folder: Path, path: Path) -> str:
    relative = path.relative_to(folder).parts
    return relative[0] if len(relative) > 1 else folder.name


def calibrate_folders(
    embedder,
    good: Path,
    defect_folders: list[Path],
    out: Path,
    product: str,
    metric: str = "auto",
    target_false_reject: float = thresholds.DEFAULT_TARGET_FALSE_REJECT,
    roi: Roi | None = None,
    min_good: int = thresholds.MIN_GOOD_PARTS,
    progress: bool = False,
    tiles: TileGeometry | None = None,
) -> tuple[ReferenceSet, thresholds.Calibration]:
    """`tiles`: a tiled station's geometry: each photo (its roi) cut into tiles, the threshold per part."""
    check_product_name(product)
    # Held from the start: a second calibration of this folder is refused now, not after the embedding.
    with writing(out, f"station calibrate --good {good}, product {product}"):
        good_items, defect_items = folder_items(good, defect_folders)
        good_items, defect_items, notes = set_aside_trained(embedder, good_items, defect_items, min_good)
        good_set = _embed(embedder, good_items, roi, tiles, progress)
        defect_set = _embed(embedder, defect_items, roi, tiles, progress) if defect_items else None
        return calibrate_embedded(
            embedder,
            good_set,
            defect_set,
            out,
            product,
            metric,
            target_false_reject,
            min_good,
            notes=notes,
            tiles=tiles,
        )


def _embed(embedder, items: list[LabeledImage], roi: Roi | None, tiles: TileGeometry | None, progress: bool):
    return (
        embed_items(embedder, items, roi, progress)
        if tiles is None
        else embed_tiled_items(embedder, items, roi, tiles, progress)
    )


def set_aside_trained(embedder, good_items: list, defect_items: list, min_good: int) -> tuple[list, list, list[str]]:
    """Parts the model trained on score tighter than the parts it will judge: a threshold set on
    them rejects good parts on the line. The model's metadata names them (image digests); they are
    set aside when enough unseen good parts remain, and said either way."""
    trained = set(filter(None, embedder.info.extra.get("trained_on", "").split(",")))
    if not trained:
        return good_items, defect_items, []
    seen_good = [item for item in good_items if _digest(item) in trained]
    if not seen_good:
        return good_items, defect_items, []
    unseen_good = [item for item in good_items if _digest(item) not in trained]
    if len(unseen_good) < min_good:
        return (
            good_items,
            defect_items,
            [
                f"{len(seen_good)} of the {len(good_items)} good parts trained the model and only {len(unseen_good)} did "
                f"not (at least {min_good} are needed to set them aside): thresholds set on trained parts reject more "
                "good parts on the line than these figures say; calibrate on parts kept out of training (station fit does)"
            ],
        )
    unseen_defects = [item for item in defect_items if _digest(item) not in trained]
    return (
        unseen_good,
        unseen_defects,
        [
            f"{len(seen_good)} of the {len(good_items)} good parts and {len(defect_items) - len(unseen_defects)} of the "
            f"{len(defect_items)} defective parts trained the model: set aside; thresholds come from the "
            f"{len(unseen_good)} good and {len(unseen_defects)} defective parts it never saw"
        ],
    )


def _digest(item: LabeledImage) -> str | None:
    """None for a file that cannot be read: it trained nothing, and embedding names it with the rest."""
    try:
        return image_digest(item.path)
    except ImageReadError:
        return None


def calibrate_embedded(
    embedder,
    good_set: EmbeddedImages,
    defect_set: EmbeddedImages | None,
    out: Path,
    product: str,
    metric: str,
    target_false_reject: float,
    min_good: int,
    extra_statistics: dict | None = None,
    notes: list[str] | None = None,
    tiles: TileGeometry | None = None,
) -> tuple[ReferenceSet, thresholds.Calibration]:
    """Fit, build the reference set and its report, save it as a new version.

    `extra_statistics` (e.g. where the parts came from) is recorded in reference.yaml; `tiles`: the
    sets' embeddings are (parts, tiles, dim), and the geometry is recorded too (the station refuses
    a set calibrated on other tiles).
    """
    defects = None if defect_set is None else defect_set.embeddings
    grid = embedder.info.positions
    if tiles is not None:  # every tile to the reference, the threshold on each part's worst tile
        calibration = tiled.calibrate_tiles(
            good_set.embeddings,
            defects,
            grid,
            metric=metric,
            target_false_reject=target_false_reject,
            min_good=min_good,
        )
        extra_statistics = {**(extra_statistics or {}), RECORD_KEY: tiles.record()}
    elif grid is not None:  # a per-position model: its worst position (calibration/positions.py)
        calibration = positions.calibrate_positions(
            good_set.embeddings,
            grid,
            defects,
            metric=metric,
            target_false_reject=target_false_reject,
            min_good=min_good,
        )
    else:
        calibration = thresholds.calibrate(
            good_set.embeddings, defects, metric=metric, target_false_reject=target_false_reject, min_good=min_good
        )
    calibration.warnings[:0] = notes or []  # shown first and kept in reference.yaml
    return save_calibration(
        embedder,
        calibration,
        good_set,
        defect_set,
        out,
        product,
        {"target_false_reject": target_false_reject, **(extra_statistics or {})},
    ), calibration


def save_calibration(
    embedder,
    calibration: thresholds.Calibration,
    good_set: EmbeddedImages,
    defect_set: EmbeddedImages | None,
    out: Path,
    product: str,
    extra_statistics: dict | None = None,
) -> ReferenceSet:
    """A fitted calibration as a new reference-set version, with its report."""
    statistics = {
        "n_defect": 0 if defect_set is None else len(defect_set.embeddings),
        "covariance_shrinkage": round(calibration.covariance_shrinkage, 6),
        "metrics": {name: metric_fit.summary() for name, metric_fit in calibration.fits.items()},
        "warnings": calibration.warnings,
        **(extra_statistics or {}),
    }
    reference_set = ReferenceSet(
        model=calibration.model,
        metric=calibration.metric,
        thresholds={name: f.threshold for name, f in calibration.fits.items()},
        product=product,
        model_sha256=embedder.info.sha256,
        n_good=len(good_set.embeddings),
        statistics=statistics,
    )
    return save(out, reference_set, _calibration_report(calibration, good_set, defect_set))


def _calibration_report(calibration: thresholds.Calibration, good_set: EmbeddedImages, defect_set) -> dict[str, bytes]:
    chosen = calibration.fits[calibration.metric]
    scores = chosen.good_scores
    classes = ["good"] * len(scores)
    if defect_set is not None:
        scores = np.concatenate([scores, chosen.defect_scores])
        classes += defect_set.classes
    files = {
        "histogram.png": report.score_histogram(
            scores,
            classes,
            chosen.threshold,
            calibration.metric,
            title=f"{calibration.metric}: good parts out of fold vs defects",
        )
    }
    if defect_set is not None:
        files["roc.png"] = report.roc_figure(
            {n: (f.good_scores, f.defect_scores) for n, f in calibration.fits.items()},
            {n: f.auroc for n, f in calibration.fits.items()},
        )
    return files


def evaluate_folder(
    embedder, reference_set: ReferenceSet, data: Path, roi: Roi | None = None, progress: bool = False
) -> tuple[Evaluation, EmbeddedImages]:
    verify_for_model(reference_set, embedder.info.sha256, embedder.info.embedding_dim)
    embedded = embed_items(embedder, scan_dataset(data), roi, progress)
    return evaluate_embeddings(embedded.embeddings, embedded.classes, reference_set), embedded


def evaluation_report(evaluation: Evaluation, embedded: EmbeddedImages, per_sheet: int = 24) -> dict[str, bytes]:
    """histogram.png, roc.png and worst_parts.png for a report folder."""
    figures = evaluation.figures()
    files = {
        "histogram.png": report.score_histogram(
            evaluation.scores, evaluation.classes, evaluation.threshold, evaluation.metric
        )
    }
    truth = evaluation.is_defect_truth
    if truth.any() and (~truth).any():
        files["roc.png"] = report.roc_figure(
            {n: (s[~truth], s[truth]) for n, s in evaluation.per_metric_scores.items()}, figures["per_metric_auroc"]
        )
    order = np.argsort(np.nan_to_num(evaluation.scores, nan=np.inf, posinf=np.inf))
    worst_good = [i for i in order[::-1] if not truth[i]][: per_sheet // 2]
    best_defects = [i for i in order if truth[i]][: per_sheet // 2]
    picks = worst_good + best_defects
    captions = [
        f"{'good' if not truth[i] else evaluation.classes[i]} {evaluation.scores[i]:.3g}\n{embedded.paths[i].name[:18]}"
        for i in picks
    ]
    files["worst_parts.png"] = report.contact_sheet(
        [embedded.crops[i] for i in picks],
        captions,
        f"highest-scoring good parts, then lowest-scoring defects (threshold {evaluation.threshold:.4g})",
    )
    return files
