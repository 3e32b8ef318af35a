"""Running figures for the stats topic: rates, counts, yield, latency percentiles."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from station.core.verdict import OK
from station.runtime.mqtt.messages import utc_timestamp


class StationStats:
    """Counters since start plus a window of recent latencies; cheap to update per part."""

    def __init__(self, latency_window: int = 2048, clock=time.monotonic):
        self._clock = clock
        self.started, self.started_wall = clock(), time.time()  # uptime from the first, start time for people
        self._latencies = deque(maxlen=latency_window)
        self.processed = 0
        self.ok = self.ng = 0
        self._last_report = clock()
        self._last_counts = (0, 0, 0)

    def part_judged(self, verdict: str, latency_ms: float):
        self.processed += 1
        if verdict == OK:
            self.ok += 1
        else:
            self.ng += 1
        self._latencies.append(latency_ms)

    def report(self, captured: int, dropped: int, outbox_depth: int, camera_state: str, camera_reconnects: int) -> dict:
        """The stats message; rates are over the time since the previous report.

        Capture counts come from the camera side, which the loop does not own.
        """
        now = self._clock()
        elapsed = max(now - self._last_report, 1e-9)
        counts = (captured, self.processed, dropped)
        rates = [(c - p) / elapsed for c, p in zip(counts, self._last_counts)]
        self._last_report, self._last_counts = now, counts
        latencies = np.fromiter(self._latencies, float) if self._latencies else None
        judged = self.ok + self.ng
        return {
            "fps_captured": round(rates[0], 2),
            "fps_processed": round(rates[1], 2),
            "fps_dropped": round(rates[2], 2),
            "captured": captured,
            "processed": self.processed,
            "dropped": dropped,
            "ok": self.ok,
            "ng": self.ng,
            "yield": round(self.ok / judged, 5) if judged else None,
            "latency_ms_p50": None if latencies is None else round(float(np.percentile(latencies, 50)), 3),
            "latency_ms_p99": None if latencies is None else round(float(np.percentile(latencies, 99)), 3),
            "camera_state": camera_state,
            "camera_reconnects": camera_reconnects,
            "outbox_depth": outbox_depth,
            "started": utc_timestamp(self.started_wall),
            "uptime_s": round(now - self.started, 3),
        }


@dataclass(frozen=True)
class Figures:
    """The counts the stats topic and /metrics both report, read once from the daemon's parts."""

    captured: int | None  # frames the camera delivered; None before the capture has started
    dropped: int  # frames not judged: a live camera faster than judging, frames drained while paused
    camera_reconnects: int
    crops_not_kept: int
    mqtt_refused: int
    outbox_write_errors: int


def figures(daemon) -> Figures:
    """Also read from /metrics' HTTP thread, from the moment the daemon starts: parts made only when the loop
    starts (the capture, the source) may not be there yet."""
    capture = getattr(daemon, "feed", None) or getattr(daemon, "latest", None)
    return Figures(
        captured=getattr(capture, "captured", None),
        dropped=getattr(capture, "dropped", 0) + daemon._unjudged_frames,
        camera_reconnects=getattr(getattr(daemon, "source", None), "reconnects", 0),
        crops_not_kept=daemon.crop_keeper.skipped + daemon.crop_keeper.failed,
        mqtt_refused=daemon.publisher.delivery.refused,
        outbox_write_errors=daemon.recorder.write_errors,
    )


def stats_message(daemon) -> dict:
    """The stats message of a running daemon (station/runtime/daemon.py): the figures of every part of it."""
    counted = figures(daemon)
    stats = daemon.stats.report(
        captured=daemon.stats.processed if counted.captured is None else counted.captured,
        dropped=counted.dropped,
        outbox_depth=daemon.outbox.depth(),
        camera_state=daemon.source.state,
        camera_reconnects=counted.camera_reconnects,
    )
    stats["verdicts_live"] = daemon.recorder.live_verdicts
    stats["crops_not_kept"] = counted.crops_not_kept
    stats["mqtt_refused"] = counted.mqtt_refused
    stats["outbox_write_errors"] = counted.outbox_write_errors
    stats["frames_not_judged"] = daemon.frame_sizes.not_judged
    stats.update(daemon.source.counters())  # GenICam: camera_lost_packets, camera_incomplete_frames
    gate = daemon.gate
    if gate is not None:
        stats.update(
            parts=gate.parts, no_verdicts=gate.missed, skipped_frames=gate.skipped_frames, belt_relearned=gate.relearned
        )
    return {"station": daemon.config.station, "ts": utc_timestamp(time.time()), **stats}
