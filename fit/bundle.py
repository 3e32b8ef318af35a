"""What `station fit` writes: the model (export never dead-ends), station.yaml, fit.json.

BUNDLE/model.onnx            the chosen trunk in fp32, gated against torch
BUNDLE/model.export.json     its export report
BUNDLE/model.int8.onnx       the same trunk in int8, when an int8 mode passed the gate (the pretrained conv
                             backbone: static QDQ first, else dynamic; the others: dynamic first, else static)
BUNDLE/model.int8.export.json  its export report
BUNDLE/trunk.pt              the checkpoint it was exported from
BUNDLE/reference/            the fp32 form's reference set (station.yaml's reference: {fp32: ...})
BUNDLE/reference.int8/       the int8 form's, calibrated on the same threshold slice
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
# The station runs whichever form is faster on its own CPU (station/runtime/model_forms.py): which one is
# depends on the CPU, not the model, so the bundle carries every form that passed the gate.
FORM_FILES = {"fp32": (MODEL, REFERENCE), "int8": ("model.int8.onnx", "reference.int8")}
# Static QDQ first for the pretrained conv backbone: its convolutions hold the cost, and dynamic int8
# quantizes only the matrix products. The small from-scratch trunks keep dynamic first: on a 3-member
# cnn static ran 0.71x fp32's speed against dynamic's 0.88x (2-core EPYC, docs/fit.md).
STATIC_FIRST_ARCHS = ("lite0", "lite0ft")
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


def export_forms(checkpoint: Path, folder: Path, sample_dir: Path, arch: str, say=print) -> dict[str, ExportChoice]:
    """{form: export} of every form that passed the gate: fp32 always (else ExportGateError), int8 when one
    of its modes passes. `sample_dir` (the train part) calibrates static int8 and feeds the gates."""
    int8_order = EXPORT_MODES[:2] if arch not in STATIC_FIRST_ARCHS else (EXPORT_MODES[1], EXPORT_MODES[0])
    forms = {
        "fp32": export_with_fallback(checkpoint, folder / FORM_FILES["fp32"][0], sample_dir, say, (EXPORT_MODES[2],))
    }
    try:
        forms["int8"] = export_with_fallback(checkpoint, folder / FORM_FILES["int8"][0], sample_dir, say, int8_order)
    except ExportGateError as exc:
        say(f"export: no int8 form in the bundle: {exc}")
    return forms


def export_with_fallback(checkpoint: Path, out: Path, sample_dir: Path, say=print, modes=EXPORT_MODES) -> ExportChoice:
    """The first of `modes` that passes the gate (default: int8 dynamic, else static, else fp32). Says which and why."""
    from export import onnx_export

    attempts, refusals = [], []
    for mode, kwargs in modes:
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
        why = (
            "the first mode tried; it passed the export gate"
            if not refusals
            else "; ".join(refusals) + f"; {mode} passed"
        )
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


def station_yaml(product: str, roi_size: tuple[int, int], fingerprint: str, forms=("fp32",)) -> str:
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
{forms_yaml(forms)}"""


def forms_yaml(forms) -> str:
    """station.yaml's model and reference for the forms the bundle holds (one form: today's two lines)."""
    if list(forms) == ["fp32"]:
        return f"model: {MODEL}\nreference: {REFERENCE}\n"
    models = ", ".join(f"{form}: {FORM_FILES[form][0]}" for form in forms)
    references = ", ".join(f"{form}: {FORM_FILES[form][1]}" for form in forms)
    return (
        f"# A model in each form, each with its reference set: the station runs the faster on its own CPU\n"
        f"# (timed at start: the log, the state and `station check` say which); model_form: int8 or fp32 pins one.\n"
        f"model: {{{models}}}\nreference: {{{references}}}\nmodel_form: auto\n"
    )


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
