"""`station fit`'s one measurement of what a part costs: a model's ONNX session in onnxruntime, as the
station runs it (one thread, the station's session), on one part's batch.

Every candidate is held to --max-ms-per-part by this (fit/candidates.py: the trained trunks and the
per-position models at batch 1; fit/tiles.py: every tile of a part in one batch). A busy machine slows
a measurement, never speeds it up: one over the limit is taken again, up to COST_TRIES in all, and the
lowest median kept (under other work one lite0 measured 16.5 ms where it measures 1.7 ms alone; a
65-tile plate 26-38 ms where it measures 7.7 ms).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

COST_WARMUP, COST_RUNS = 5, 40
COST_TRIES = 3


def session_ms(session, batch: np.ndarray, limit_ms: float | None = None) -> float:
    """Median milliseconds of one run of `session` on `batch` (median of COST_RUNS after COST_WARMUP);
    while over `limit_ms`, measured again up to COST_TRIES times in all, the lowest median kept."""
    from station.core.embedder import INPUT_NAME, OUTPUT_NAME

    feed = {INPUT_NAME: batch}
    best = np.inf
    for _ in range(COST_TRIES):
        times = []
        for _ in range(COST_WARMUP + COST_RUNS):
            started = time.perf_counter()
            session.run([OUTPUT_NAME], feed)
            times.append(time.perf_counter() - started)
        best = min(best, statistics.median(times[COST_WARMUP:]) * 1000.0)
        if limit_ms is None or best <= limit_ms:
            break
    return best


def onnx_ms(path: Path, sample_shape: tuple, limit_ms: float | None = None, count: int = 1) -> float:
    """session_ms of the ONNX model at `path` in the station's session, on a batch of `count` samples."""
    from station.core.embedder import build_session

    return session_ms(build_session(path), np.zeros((count,) + tuple(sample_shape), np.float32), limit_ms)
