"""What `station fit` writes: the model (export never dead-ends), station.yaml, fit.json.

    BUNDLE/model.onnx            the chosen trunk, gated (int8 dynamic, else static, else fp32)
    BUNDLE/model.export.json     its export report
    BUNDLE/trunk.pt              the checkpoint it was exported from
    BUNDLE/reference/            the reference set (station.yaml's reference:)
    BUNDLE/report/               roc.png, histogram.png, worst_parts.png of the test part
    BUNDLE/station.yaml          model and reference filled in; camera and roi to fill
    BUNDLE/fit.json              the held-out test figures and how they were made
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from station.core.config_model import MAX_STATION_ID, STATION_ID_CHARACTERS
from station.core.errors import ExportGateError
from station.core.imagefolder import LabeledImage

MODEL = "model.onnx"
REFERENCE = "reference"
REPORT = "report"
STATION_YAML = "station.yaml"
FIT_JSON = "fit.json"
CHECKPOINT = "trunk.pt"
# The order export falls back in; fp32 has no int8 gate to fail.
EXPORT_MODES = (("int8-dynamic", {"int8": "dynamic"}), ("int8-static", {"int8": "static"}), ("fp32", {"fp32": True}))


@dataclass(frozen=True)
class ExportChoice:
    mode: str
    why: str
    attempts: list[dict]
    report: dict


def export_with_fallback(checkpoint: Path, out: Path, sample_dir: Path, say=print) -> ExportChoice:
    """int8 dynamic (the default); if its gate refuses, int8 static; then fp32. Says which and why."""
    from export import onnx_export

    attempts, refusals = [], []
    for mode, kwargs in EXPORT_MODES:
        options = onnx_export.ExportOptions(calib_data=sample_dir, **kwargs)
        try:
            report = onnx_export.export_model(checkpoint, out, options)
        except ExportGateError:
            failures = _failures(onnx_export.report_path(out))
            attempts.append({"mode": mode, "passed": False, "failures": failures})
            refusals.append(f"{mode} refused by the gate ({'; '.join(failures)})")
            say(f"export: {refusals[-1]}; trying the next mode")
            continue
        attempts.append({"mode": mode, "passed": True, "failures": []})
        why = "the default; it passed the export gate" if not refusals else "; ".join(refusals) + f"; {mode} passed"
        return ExportChoice(mode, why, attempts, report)
    raise ExportGateError(f"{checkpoint}: no export mode passed the gate: " + "; ".join(refusals))


def _failures(report_file: Path) -> list[str]:
    try:
        return list(json.loads(report_file.read_text()).get("failures", []))
    except (OSError, ValueError):
        return ["no report"]


def link_folder(items: list[LabeledImage], folder: Path) -> Path:
    """An image folder (class subfolders) of symlinks to the items: what export's gate samples."""
    for index, item in enumerate(items):
        target = folder / item.defect_class / f"{index:06d}_{item.path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(item.path).resolve(), target)
    return folder


def station_id(name: str) -> str:
    cleaned = re.sub(rf"[^{STATION_ID_CHARACTERS}]+", "-", name).strip("-")[:MAX_STATION_ID]
    return cleaned or "station"


def station_yaml(product: str, roi_size: tuple[int, int], fingerprint: str) -> str:
    width, height = roi_size
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"""\
# station.yaml written by `station fit` on {created}
# (data fingerprint {fingerprint[:16]}). model and reference are filled in, relative to
# this file. Fill in camera and roi for your line, then: station check -c station.yaml
station: {station_id(product)}
# camera:
#   source: /dev/video0   # device index, /dev/videoN, rtsp://..., a video file or an image folder
# roi: {{x: 0, y: 0, width: {width}, height: {height}}}   # where the part sits in the frame (pixels)
model: {MODEL}
reference: {REFERENCE}
"""


def write_json(path: Path, content: dict):
    path.write_text(json.dumps(content, indent=2, default=_plain) + "\n")


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
