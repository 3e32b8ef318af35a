"""The frozen per-position model (PaDiM-style: export/positions.py) as a `station fit` candidate.

Nothing trains. As a candidate the model is exported, embeds the calibration part and is
calibrated on it by calibration/positions.py as the trained candidates are by calibration/fit.py:
the good parts' scores out of fold, the defects scored by the Gaussians of every good part, never
fitted on; so fit/choice.py compares its AUROC with theirs on the same parts. Its cost per part is
the exported graph's, measured with onnxruntime as the others' (fit/cost.py: onnx_ms) before anything is embedded,
plus scoring one part against Gaussians of its grid (one (1xC)(CxC) product per position).

Chosen, its audit and bundle models are the same frozen network, each calibrated on its whole pool
(the audit model's: train and calibration parts; the bundle's: every photo): no photo trained
it, so every good part's score is out of fold and every one of them is a threshold part; a
trained candidate must keep 15 % aside for that. The reference set is format 3 (`position`).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from calibration import workflow
from calibration.positions import calibrate_positions_held_out
from fit import bundle
from fit.candidates import Candidate, Outcome, pretrained_size
from fit.cost import onnx_ms
from fit.sizes import larger_pretrained_sizes
from station.core.errors import StationError

POSITIONS = "positions"
# Both cuts: stride 8 judged the simulated line better, stride 16 the tiles (docs/calibration.md).
CUTS = (8, 16)
GATE_SAMPLE = 64  # photos the export's torch-vs-onnx check runs on
SCORE_RUNS = 40


def position_candidates(native_size: tuple[int, int]) -> list[Candidate]:
    """Both cuts at the pretrained ladder's first larger input (the base input when the photos have no more)."""
    larger = larger_pretrained_sizes(native_size)
    size = larger[0] if larger else pretrained_size(native_size)
    return [Candidate(POSITIONS, f"frozen-s{cut}", 0, size) for cut in CUTS]


def cut_of(candidate: Candidate) -> int:
    return int(candidate.loss.rsplit("-s", 1)[1])


def export_frozen(candidate: Candidate, items: list, out: Path) -> dict:
    """The per-position model for the candidate's input at `out`, its export checked on up to GATE_SAMPLE of `items`."""
    from export.positions import export_position_model

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    picked = items
    if len(items) > GATE_SAMPLE:
        picked = [items[i] for i in np.linspace(0, len(items) - 1, GATE_SAMPLE).round().astype(int)]
    sample = bundle.link_folder(picked, Path(tempfile.mkdtemp(prefix=".gate-", dir=Path(out).parent)))
    try:
        return export_position_model(cut_of(candidate), candidate.size, out, data_dir=sample)
    finally:
        shutil.rmtree(sample, ignore_errors=True)


def scoring_ms(grid) -> float:
    """Milliseconds scoring one part costs against Gaussians of `grid` (median of SCORE_RUNS)."""
    from station.core.scoring import PositionReference, position_scores

    eye = np.broadcast_to(np.eye(grid.channels, dtype=np.float32), (grid.positions, grid.channels, grid.channels))
    reference = PositionReference(
        mean=np.zeros((grid.positions, grid.channels), np.float32),
        precision=np.ascontiguousarray(eye),
        typical=np.zeros(grid.positions, np.float32),
        grid=grid,
    )
    part = np.random.default_rng(0).normal(size=(1, grid.size)).astype(np.float32)
    times = []
    for _ in range(5 + SCORE_RUNS):
        started = time.perf_counter()
        position_scores(part, reference)
        times.append(time.perf_counter() - started)
    return statistics.median(times[5:]) * 1000.0


def measure_position_candidate(candidate: Candidate, calibration_items: list, model_path: Path, options) -> Outcome:
    """Export, time, embed the calibration part and calibrate on it: the candidate's Outcome."""
    from station.core.embedder import Embedder

    outcome = Outcome(candidate)
    started = time.perf_counter()
    try:
        export_frozen(candidate, calibration_items, model_path)
        embedder = Embedder(model_path)
        scoring = scoring_ms(embedder.info.positions)
        outcome.ms_per_part = scoring + onnx_ms(
            model_path, embedder.input_spec.sample_shape, options.max_ms_per_part - scoring
        )
        if outcome.ms_per_part > options.max_ms_per_part:
            outcome.error = (
                f"{outcome.ms_per_part:.2f} ms a part (the frozen model and its scoring, measured here) "
                f"is over --max-ms-per-part {options.max_ms_per_part:g}"
            )
            outcome.over_limit = True
        else:
            calibration, good_set, _ = calibrate(embedder, calibration_items, options)
            chosen = calibration.fits[calibration.metric]
            outcome.checkpoint, outcome.metric, outcome.threshold = (
                Path(model_path),
                calibration.metric,
                float(chosen.threshold),
            )
            outcome.escape_rate, outcome.auroc = chosen.escape_rate, chosen.auroc
            outcome.false_reject_rate, outcome.expected_cost = float(chosen.false_reject_rate), chosen.expected_cost
            outcome.n_good = len(good_set.embeddings)
            outcome.n_defect = 0 if chosen.defect_scores is None else len(chosen.defect_scores)
            outcome.good_scores, outcome.defect_scores = chosen.good_scores, chosen.defect_scores
    except StationError as exc:
        outcome.error = str(exc)
    outcome.seconds = time.perf_counter() - started
    return outcome


def calibrate(embedder, items: list, options):
    """(Calibration, good EmbeddedImages, defect EmbeddedImages or None) of `items` (calibration/positions.py)."""
    goods = [item for item in items if not item.is_defect]
    defects = [item for item in items if item.is_defect]
    good_set = workflow.embed_items(embedder, goods)
    defect_set = workflow.embed_items(embedder, defects) if defects else None
    calibration = calibrate_positions_held_out(
        good_set.embeddings,
        embedder.info.positions,
        None if defect_set is None else defect_set.embeddings,
        target_false_reject=options.target_false_reject,
        defect_rate=options.defect_rate,
        escape_cost=options.escape_cost,
    )
    return calibration, good_set, defect_set


def build_position_model(candidate: Candidate, items: list, groups: list, folder: Path, options, data, what: str):
    """fit/pipeline.py's build_model for a per-position candidate: export, calibrate on every photo of
    `items` (out of fold), save the format-3 reference set; a BuiltModel whose threshold slice is `items`."""
    from fit.pipeline import BuiltModel, _threshold_rule
    from station.core.embedder import Embedder

    folder.mkdir(parents=True, exist_ok=True)
    options.say(
        f"{what}: {candidate.name}, frozen (nothing trained), its Gaussians and threshold from the "
        f"{len(items)} photos, good parts scored out of fold"
    )
    report = export_frozen(candidate, items, folder / bundle.MODEL)
    export = bundle.ExportChoice(
        "fp32",
        "a frozen per-position model is exported in fp32 (there is no int8 path for "
        "it); its torch-vs-onnx check passed",
        [{"mode": "fp32", "passed": True, "failures": []}],
        report,
    )
    embedder = Embedder(folder / bundle.MODEL)
    calibration, good_set, defect_set = calibrate(embedder, items, options)
    rule = _threshold_rule(calibration, options)
    saved = workflow.save_calibration(
        embedder,
        calibration,
        good_set,
        defect_set,
        folder / bundle.REFERENCE,
        options.product_name,
        {"fit": rule, "data_fingerprint": data.fingerprint},
    )
    from fit.forms import BuiltForm

    form = BuiltForm("fp32", export, embedder, calibration, saved, rule)
    return BuiltModel(export, calibration, saved, embedder, 0, rule, list(items), {"fp32": form})
