"""The MQTT contract's payloads: every JSON message the station publishes is built here.

Each carries `schema_version` first; the JSON Schemas in schemas/ describe
version SCHEMA_VERSION, and tests/test_contract.py checks them, the code and
the README's examples against each other. Bump it when a payload changes in
a way a dashboard could notice (a field removed, renamed or retyped).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from datetime import datetime, timezone

from station.core.verdict import Judgement

SCHEMA_VERSION = 1


def encode(message: dict) -> bytes:
    """Compact JSON with schema_version as the first key; no NaN or inf (JSON has none)."""
    versioned = {"schema_version": SCHEMA_VERSION, **message}
    return json.dumps(versioned, separators=(",", ":"), allow_nan=False).encode()


def is_verdict(message: dict) -> bool:
    """A verdict message, not a no_verdict (a part seen but not judged): only a verdict carries `verdict`."""
    return "verdict" in message


def utc_timestamp(epoch_seconds: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-22T06:30:00.123Z."""
    moment = datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite_or_none(value: float) -> float | None:
    # JSON has no inf or NaN; a part that points away from the reference scores null (and is NG).
    return value if math.isfinite(value) else None


def verdict_message(
    *,
    station: str,
    seq: int,
    source: str,
    part_id: str | None,
    product: str,
    judgement: Judgement,
    threshold: float,
    metric: str,
    model_id: str,
    reference_version: int,
    latency_ms: float,
    ts: str,
    verdict_id: str | None = None,
    camera_ts: int | None = None,
    frame_shape: tuple | None = None,
) -> dict:
    """`camera_ts`: the camera's own timestamp of the frame (GenICam), in ns of its clock; only then in the message.
    `frame_shape`: the judged frame's (height, width, ...), to place a per-position model's worst cell
    (`worst_position`, frame pixels) when the crop was the whole frame."""
    message = {
        "station": station,
        "seq": seq,
        "id": verdict_id or str(uuid.uuid4()),
        "ts": ts,
        "source": source,
        "part_id": part_id,
        "product": product,
        "verdict": judgement.verdict,
        "score": _finite_or_none(judgement.score),
        "threshold": threshold,
        "metric": metric,
        "distances": {name: _finite_or_none(value) for name, value in judgement.distances.items()},
        "model": model_id,
        "reference": reference_version,
        "latency_ms": round(latency_ms, 3),
    }
    if camera_ts is not None:
        message["camera_ts_ns"] = camera_ts
    if getattr(judgement, "position", None) is not None:  # a per-position model
        message["worst_position"] = worst_position(judgement.position, frame_shape)
    if getattr(judgement, "regions", None):  # rois: (station/runtime/regions.py)
        message.update(_regions_fields(judgement, frame_shape))
    return message


def worst_position(position, frame_shape: tuple | None) -> dict:
    """Where a per-position model found the part least like the good ones: a box in frame pixels, and the
    feature-map cell (row, col) it stands for. Without a frame shape a whole-frame crop is placed at the
    model's input size."""
    shape = frame_shape if frame_shape is not None else (position.spec.height, position.spec.width)
    x, y, width, height = position.in_frame(shape)
    return {"x": x, "y": y, "width": width, "height": height, "row": position.row, "col": position.col}


def _regions_fields(part, frame_shape: tuple | None) -> dict:
    """A part judged in several regions: threshold, metric and reference of its worst region, and every region."""
    worst = part.worst
    return {
        "threshold": worst.threshold,
        "metric": worst.metric,
        "reference": worst.reference,
        "worst_roi": {"name": worst.name, **_box(worst.roi)},
        "rois": [
            {
                "name": r.name,
                "product": r.product,
                "verdict": r.verdict,
                "score": _finite_or_none(r.score),
                "threshold": r.threshold,
                "metric": r.metric,
                "reference": r.reference,
                "distances": {name: _finite_or_none(value) for name, value in r.distances.items()},
                **({} if r.position is None else {"worst_position": worst_position(r.position, frame_shape)}),
            }
            for r in part.regions
        ],
    }


def _box(roi) -> dict:
    return {} if roi is None else {"x": roi.x, "y": roi.y, "width": roi.width, "height": roi.height}


def no_verdict_message(
    *, station: str, seq: int, source: str, product: str, ts: str, reason: str, part_id: str | None = None
) -> dict:
    """A part seen but not judged (trigger: presence), or a trigger not judged (trigger: mqtt, with its
    part_id when it gave one): said, never silence. Shares the verdicts' seq."""
    message = {"station": station, "seq": seq, "id": str(uuid.uuid4()), "ts": ts, "source": source}
    if part_id is not None:
        message["part_id"] = part_id
    return {**message, "product": product, "reason": reason}


def part_messages(station: str, product: str, reference, model_id: str, ready: float, part_id: str | None = None):
    """build(seq, frame, judgement) for the recorder, one batch's: a verdict, or a no_verdict where the
    judgement is the text of why the part got none. `reference` is the ReferenceSet that judged."""
    ts = utc_timestamp(time.time())  # one batch, one moment: formatted once

    def build(seq, frame, judgement) -> dict:
        if isinstance(judgement, str):
            return no_verdict_message(
                station=station, seq=seq, source=frame.source, product=product, ts=ts, reason=judgement
            )
        return verdict_message(
            station=station,
            seq=seq,
            source=frame.source,
            part_id=part_id or frame.part_id,
            camera_ts=frame.camera_ts,
            product=product,
            judgement=judgement,
            threshold=reference.threshold,
            metric=reference.metric,
            model_id=model_id,
            reference_version=reference.version,
            latency_ms=(ready - frame.grabbed_at) * 1000.0,
            ts=ts,
            frame_shape=frame.image.shape,
        )

    return build
