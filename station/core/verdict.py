"""From scores to verdicts, and verdicts to the JSON the plant's dashboards read."""
from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from station.core.scoring import distances, is_defect

OK, NG = "OK", "NG"


@dataclass(frozen=True)
class Judgement:
    verdict: str
    score: float
    distances: dict[str, float]


def judge(embeddings: np.ndarray, reference_set) -> list[Judgement]:
    """One judgement per embedding row, all metrics computed in one vectorized pass."""
    all_distances = distances(embeddings, reference_set.model)
    scores = all_distances[reference_set.metric]
    flagged = is_defect(scores, reference_set.threshold)
    names = list(all_distances)
    columns = np.column_stack([all_distances[name] for name in names]).tolist()
    return [
        Judgement(NG if bad else OK, float(value), dict(zip(names, row)))
        for bad, value, row in zip(flagged.tolist(), scores.tolist(), columns)
    ]


def utc_timestamp(epoch_seconds: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-22T06:30:00.123Z."""
    moment = datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite_or_none(value: float) -> float | None:
    # JSON has no inf or NaN; a part that points away from the reference scores null (and is NG).
    return value if math.isfinite(value) else None


def verdict_message(
    *, station: str, seq: int, source: str, part_id: str | None, product: str, judgement: Judgement,
    threshold: float, metric: str, model_id: str, reference_version: int, latency_ms: float, ts: str,
    verdict_id: str | None = None,
) -> dict:
    return {
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


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
