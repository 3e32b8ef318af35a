"""`station fit`'s tiled candidates: a large part's photo cut into overlapping tiles near its own resolution.

When the photos have many times the pixels of the whole-image candidates' input (MIN_AREA_RATIO),
a small defect is shrunk away there: a crack one pixel wide at 500x1260 is a tenth of a pixel at
the pretrained candidate's ~96x96. A tiled candidate cuts the photo into tiles of TILE_INPUT
pixels at the model's input, each seen at `scale` photo pixels per input pixel, and judges every
tile of a part in one batch (station/core/tiles.py, the station's `tiles:`).

The embedder needs no tile labels (defects are labelled per photo, not per tile): EfficientNet-
Lite0's frozen ImageNet features (export/backbone.py) at stride 8, pooled over the tile both by
their mean (what the tile looks like) and their maximum (a feature that fires in one place only:
a small defect moves the mean of a 4x4 map by a sixteenth, its maximum fully). Nothing is trained,
so the candidate costs an export and the embedding of its calibration part, and its figures come
from parts whose photos it never saw either way.

Tile size and stride are chosen here with the rest: for each overlap in OVERLAPS the finest scale
whose MEASURED cost (every tile of a part in one onnxruntime batch, one thread, as the station
runs it) is within --max-ms-per-part; each becomes a candidate, judged on the calibration part by
its PART-level figures (a part's worst tile, calibration/tiles.py), so fit/choice.py compares it
with the whole-image candidates on the same footing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from station.core.errors import DataError, ExportGateError, StationError
from station.core.tiles import TileGeometry

ARCH = "lite0-tiles"
CUT = 8  # Lite0 cut at stride 8: 40 channels, a quarter of stride 16's cost per pixel (measured here, 2 cores)
TILE_INPUT = 32  # model-input pixels a side; at stride 8 a 4x4 map
# A tiled candidate only when the photos hold this many times the whole-image input's pixels: below
# it a tile sees hardly finer than the whole-image candidate does.
MIN_AREA_RATIO = 8.0
WHOLE_IMAGE_AREA = 96 * 96  # fit/candidates.py: PRETRAINED_AREA, the whole-image pretrained input
SCALES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0)  # photo pixels per input pixel
OVERLAPS = (0.25, 0.5)  # of a tile side; a defect up to `overlap` tiles across lies whole in some tile
HEADROOM = 0.9  # a geometry is measured when its estimate is within this share of the limit


@dataclass(frozen=True)
class TiledCandidate:
    """Tiles of tile_size photo pixels every stride over the region, each resized to TILE_INPUT a side."""

    tile: tuple[int, int]  # (width, height) in photo pixels
    stride: tuple[int, int]
    region: tuple[int, int]  # (width, height): the part's region, the box every photo holds
    overlap: float
    arch: str = ARCH
    loss: str = "frozen"
    seed: int = 0

    @property
    def input_size(self) -> tuple[int, int]:
        return (TILE_INPUT, TILE_INPUT)

    @property
    def size(self) -> tuple[int, int]:
        return self.input_size

    @property
    def geometry(self) -> TileGeometry:
        return TileGeometry(*self.tile, *self.stride, *self.region)

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.tile[0]}x{self.tile[1]}@{self.stride[0]}x{self.stride[1]}/{self.geometry.count}tiles"


def is_tiled(candidate) -> bool:
    return isinstance(candidate, TiledCandidate)


def common_region(items) -> tuple[int, int]:
    """(width, height) every photo holds from its top-left corner: the tiles' region (read from headers)."""
    from PIL import Image

    widths, heights = [], []
    for item in items:
        try:
            with Image.open(item.path) as image:
                width, height = image.size
        except (OSError, ValueError) as exc:
            raise DataError(f"{item.path}: cannot read its size ({exc})") from None
        widths.append(width)
        heights.append(height)
    return min(widths), min(heights)


def wanted(region: tuple[int, int]) -> bool:
    """The general rule: photos with MIN_AREA_RATIO times the whole-image candidates' pixels get tiles."""
    return region[0] * region[1] >= MIN_AREA_RATIO * WHOLE_IMAGE_AREA


def geometry_at(
    region: tuple[int, int], scale: float, overlap: float
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    side = int(round(TILE_INPUT * scale))
    if side > min(region):
        return None
    stride = max(1, int(round(side * (1.0 - overlap))))
    return (side, side), (stride, stride)


def tile_model(workdir: Path):
    """The frozen tile embedder exported once (fp32, gated against torch), with its Embedder."""
    from station.core.embedder import Embedder

    path = Path(workdir) / "tiles.onnx"
    if not path.exists():
        export_tile_model(path)
    return path, Embedder(path)


def measured_ms(embedder, count: int, limit_ms: float | None = None) -> float:
    """Milliseconds one part's `count` tiles take in ONE onnxruntime batch: fit/cost.py's measurement,
    the one every candidate gets (re-measured while over `limit_ms`, the lowest median kept)."""
    from fit.cost import session_ms

    batch = np.random.default_rng(0).random((count,) + embedder.input_spec.sample_shape, np.float32)
    return session_ms(embedder.session, batch, limit_ms)


def tiled_candidates(items, workdir: Path, max_ms_per_part: float, say=print) -> tuple[list[TiledCandidate], list[str]]:
    """The tiled candidates these photos get (none when they are not large), and why not, for fit.json."""
    region = common_region(items)
    if not wanted(region):
        return [], []
    try:
        _, embedder = tile_model(workdir)
    except (StationError, ImportError) as exc:
        return [], [f"{ARCH}: the tile embedder could not be built ({exc})"]
    per_tile = measured_ms(embedder, 16) / 16
    whole_scale = math.sqrt(region[0] * region[1] / WHOLE_IMAGE_AREA)
    found, notes = [], []
    for overlap in OVERLAPS:
        chosen = None
        for scale in (s for s in SCALES if s < whole_scale):
            shape = geometry_at(region, scale, overlap)
            if shape is None:
                break
            try:
                geometry = TileGeometry(*shape[0], *shape[1], *region)
            except DataError:  # more tiles than a station takes: far over any cost limit too
                continue
            if per_tile * geometry.count > HEADROOM * max_ms_per_part:
                continue
            cost = measured_ms(embedder, geometry.count, max_ms_per_part)
            if cost <= max_ms_per_part:
                chosen = TiledCandidate(shape[0], shape[1], region, overlap)
                say(f"tiles: {geometry.text()} ({scale:g} photo pixels per input pixel) cost {cost:.2f} ms a part")
                break
        if chosen is None:
            notes.append(
                f"{ARCH} with {overlap:.0%} overlap: no tile scale finer than the whole-image input "
                f"fits --max-ms-per-part {max_ms_per_part:g} ({per_tile:.3f} ms a tile measured)"
            )
        elif chosen not in found:
            found.append(chosen)
    return found, notes


def embed_parts(embedder, items, geometry: TileGeometry, progress: bool = False):
    """(parts, tiles, dim) embeddings of photos cut as the station cuts them (calibration/workflow.py)."""
    from calibration import workflow

    return workflow.embed_tiled_items(embedder, items, None, geometry, progress)


def measure(candidate: TiledCandidate, calibration_items, workdir: Path, options, outcome):
    """Fill `outcome` (fit/candidates.py: Outcome) with the candidate's PART-level calibration figures and cost."""
    from calibration.tiles import calibrate_tiles_held_out

    started = time.perf_counter()
    try:
        path, embedder = tile_model(workdir)
        geometry = candidate.geometry
        outcome.checkpoint = path
        goods = [i for i in calibration_items if not i.is_defect]
        defects = [i for i in calibration_items if i.is_defect]
        good_set = embed_parts(embedder, goods, geometry, options.progress)
        defect_set = embed_parts(embedder, defects, geometry, options.progress) if defects else None
        calibration = calibrate_tiles_held_out(
            good_set.embeddings,
            None if defect_set is None else defect_set.embeddings,
            target_false_reject=options.target_false_reject,
            defect_rate=options.defect_rate,
            escape_cost=options.escape_cost,
        )
        chosen = calibration.fits[calibration.metric]
        outcome.metric, outcome.threshold = calibration.metric, float(chosen.threshold)
        outcome.escape_rate, outcome.auroc = chosen.escape_rate, chosen.auroc
        outcome.false_reject_rate, outcome.expected_cost = float(chosen.false_reject_rate), chosen.expected_cost
        outcome.n_good, outcome.n_defect = len(goods), len(defects)
        outcome.good_scores, outcome.defect_scores = chosen.good_scores, chosen.defect_scores
        outcome.ms_per_part = measured_ms(embedder, geometry.count, options.max_ms_per_part)
        if outcome.ms_per_part > options.max_ms_per_part:
            outcome.error = (
                f"{outcome.ms_per_part:.2f} ms a part ({geometry.count} tiles in one batch, measured "
                f"here) is over --max-ms-per-part {options.max_ms_per_part:g}"
            )
    except StationError as exc:
        outcome.error = str(exc)
    outcome.seconds = time.perf_counter() - started
    return outcome


def build(candidate: TiledCandidate, held: list, folder: Path, options, data, trained: int, what: str):
    """The bundle's (or audit's) tiled model: the frozen embedder exported to folder/model.onnx and
    calibrated per part on `held`. Nothing is trained, so every photo of the pool is one the model
    never fitted on: all of them set the threshold (out of fold by part), not a 15 % slice."""
    from calibration import workflow
    from calibration.tiles import calibrate_tiles_held_out
    from fit import bundle
    from fit.forms import BuiltForm
    from fit.pipeline import BuiltModel, _threshold_rule
    from station.core.embedder import Embedder

    geometry = candidate.geometry
    options.say(f"{what}: {candidate.name}, frozen (nothing trained), its threshold on {len(held)} photos")
    folder.mkdir(parents=True, exist_ok=True)
    report = export_tile_model(folder / bundle.MODEL, sample_items=held)
    embedder = Embedder(folder / bundle.MODEL)
    good_set = embed_parts(embedder, [i for i in held if not i.is_defect], geometry)
    defects = [i for i in held if i.is_defect]
    defect_set = embed_parts(embedder, defects, geometry) if defects else None
    calibration = calibrate_tiles_held_out(
        good_set.embeddings,
        None if defect_set is None else defect_set.embeddings,
        target_false_reject=options.target_false_reject,
        defect_rate=options.defect_rate,
        escape_cost=options.escape_cost,
    )
    rule = _threshold_rule(calibration, options) + "; on each part's worst tile"
    saved = workflow.save_calibration(
        embedder,
        calibration,
        good_set,
        defect_set,
        folder / bundle.REFERENCE,
        options.product_name,
        {"fit": rule, "data_fingerprint": data.fingerprint, "model_form": "fp32", "tiles": geometry.record()},
    )
    # One form: the frozen backbone in fp32 (its int8 forms are not gated here yet).
    export = bundle.ExportChoice(
        "fp32",
        "a frozen backbone: fp32, gated against torch",
        [{"mode": "fp32", "passed": True, "failures": []}],
        report,
    )
    form = BuiltForm("fp32", export, embedder, calibration, saved, rule)
    return BuiltModel(export, calibration, saved, embedder, trained, rule, held, {"fp32": form})


def evaluate(embedder, reference_set, items, geometry: TileGeometry):
    """(evaluation, embedded parts) of the test part judged as the station judges a tiled part: each photo's
    worst tile (the pair fit/forms.py: test_figures gives per form)."""
    from calibration.tiles import evaluate_tiled

    tested = embed_parts(embedder, items, geometry)
    return evaluate_tiled(tested.embeddings, tested.classes, reference_set), tested


def station_yaml_section(candidate: TiledCandidate) -> str:
    """No roi: as the photos were fitted, each frame is the part, its tiles from the top-left corner over
    the region the reference set records (every fitted photo held it)."""
    (width, height), (stride_x, stride_y) = candidate.tile, candidate.stride
    region_width, region_height = candidate.region
    return (
        f"# {candidate.geometry.count} tiles over the {region_width}x{region_height} region at each frame's "
        "top-left (an roi: of that size places it); chosen by station fit, the reference set was calibrated "
        "on them\n"
        f"tiles: {{width: {width}, height: {height}, stride_x: {stride_x}, stride_y: {stride_y}}}\n"
    )


# -- the tile embedder ----------------------------------------------------------------------------


def _module():
    import torch
    from torch import nn

    from export.backbone import PretrainedFeatures

    class TileFeatures(nn.Module):
        """Grey (n, 1, H, W) in [0, 1] -> (n, 2C): Lite0's stride-8 map pooled by mean and by maximum."""

        def __init__(self):
            super().__init__()
            self.features = PretrainedFeatures(cut=CUT, head="map")
            self.eval()

        def forward(self, x):
            fmap = self.features(x)
            return torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)

    return TileFeatures()


def export_tile_model(out: Path, sample_items: list | None = None) -> dict:
    """The frozen tile embedder as fp32 ONNX at TILE_INPUT a side, checked against torch on sample
    tiles (noise without them) by export/gate.py's scale-relative limit; moved into place only then."""
    import torch

    from export.backbone import CUT_CHANNELS, WEIGHTS_PACKAGE, WEIGHTS_SHA256, WEIGHTS_VERSION
    from export.dataset import model_batch
    from export.gate import gate_failures
    from export.onnx_export import export_fp32, model_metadata, noise_sample, torch_onnx_figures, write_metadata
    from station.core.embedder import Embedder
    from station.core.preprocess import InputSpec, prepare_crop
    from station.core.imagefolder import read_image

    spec = InputSpec(width=TILE_INPUT, height=TILE_INPUT, layout="nchw")
    model = _module()
    crops = noise_sample(spec).crops
    if sample_items:
        crops = np.stack([prepare_crop(read_image(item.path), spec) for item in sample_items[:64]])
    batch = model_batch(crops, spec)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        path = workdir / "fp32.onnx"
        export_fp32(model, spec, path)
        props = model_metadata(
            {"embedding_dim": 2 * CUT_CHANNELS[CUT], "arch": f"{ARCH}-s{CUT}", "members": 1}, spec, "fp32"
        )
        props["backbone"] = (
            f"efficientnet-lite0 ({WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}, sha256 {WEIGHTS_SHA256[:16]}), "
            f"frozen, cut at stride {CUT}, mean and max pooled per tile"
        )
        write_metadata(path, props)
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        got = Embedder(path).embed(batch)
        gate = {**torch_onnx_figures(expected, got, relative=True), "int8": None}
        failures = gate_failures(gate)
        report = {"quantization": "fp32", "metadata": props, "gate": gate, "passed": not failures, "failures": failures}
        out.with_name(out.stem + ".export.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if failures:
            raise ExportGateError(f"tile embedder: export refused, nothing written to {out}: " + "; ".join(failures))
        os.replace(path, out)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
