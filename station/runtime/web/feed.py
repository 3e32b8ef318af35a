"""What the judging loop hands the page: references and counters it already has, nothing computed for the page.

The loop (Integrations.judged, .state) appends the batch's verdict messages to two bounded rings (all
results, NG ones), adds them to the tallies, and keeps a reference to the latest judged frame with
its verdict and the inspector that judged it. That is a few list operations per batch under a lock
held only for them; the page's thread copies what it shows under the same lock and does everything
else (JPEG, JSON, thumbnails) outside it, so a slow or stalled browser never holds up judging.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from station.core.verdict import NG


@dataclass
class Tally:
    """Counts and processing time (grab -> judged, the messages' latency_ms) over a span of parts."""

    since: float = field(default_factory=time.time)
    ok: int = 0
    ng: int = 0
    no_verdicts: int = 0
    latency_min: float | None = None
    latency_max: float | None = None
    latency_sum: float = 0.0

    def add(self, ok: int, ng: int, no_verdicts: int, low: float | None, high: float | None, total: float):
        """One batch's figures (worked out once for both tallies: the loop pays for them once)."""
        self.ok += ok
        self.ng += ng
        self.no_verdicts += no_verdicts
        if low is not None:
            self.latency_min = low if self.latency_min is None or low < self.latency_min else self.latency_min
            self.latency_max = high if self.latency_max is None or high > self.latency_max else self.latency_max
            self.latency_sum += total

    def figures(self) -> dict:
        judged = self.ok + self.ng
        return {
            "since": self.since,
            "parts": judged + self.no_verdicts,
            "ok": self.ok,
            "ng": self.ng,
            "no_verdicts": self.no_verdicts,
            "yield": round(self.ok / judged, 5) if judged else None,
            "processing_ms": {
                "min": self.latency_min,
                "max": self.latency_max,
                "avg": round(self.latency_sum / judged, 3) if judged else None,
            },
        }


class Latest(NamedTuple):
    """The latest judged frame, its verdict message and the inspector that judged it (never copied: the
    frame is immutable once grabbed, and an Inspector is swapped whole at a reload)."""

    frame: object
    message: dict
    inspector: object
    number: int  # counts the Latest handed over: the page encodes a new picture only when it changed


class WebFeed:
    def __init__(self, results: int):
        self._lock = threading.Lock()
        self._results: deque[dict] = deque(maxlen=results)
        self._ng: deque[dict] = deque(maxlen=results)
        self.since_start = Tally()
        self.since_reset = Tally()
        self.dropped_at_reset = 0
        self.latest: Latest | None = None  # assigned whole: read without the lock
        self.state: dict | None = None  # the retained state as last published
        self._handed = 0

    # -- the loop's side: called from the judging thread

    def judged(self, inspector, messages: list[dict], frames: list):
        """A stored batch (Integrations.judged): verdict and no_verdict messages in order, the frames judged."""
        verdicts = [m for m in messages if "verdict" in m]
        ng = [m for m in verdicts if m["verdict"] == NG]
        latencies = [m["latency_ms"] for m in verdicts]
        figures = (
            len(verdicts) - len(ng),
            len(ng),
            len(messages) - len(verdicts),
            min(latencies, default=None),
            max(latencies, default=None),
            sum(latencies),
        )
        with self._lock:
            self._results.extend(messages)
            self._ng.extend(ng)
            self.since_start.add(*figures)
            self.since_reset.add(*figures)
        shown = min(len(verdicts), len(frames))  # verdicts and the frames they judged, pair by pair
        if shown:
            self._handed += 1
            self.latest = Latest(frames[shown - 1], verdicts[shown - 1], inspector, self._handed)

    def state_changed(self, state: dict):
        self.state = state

    # -- the page's side: called from the web thread

    def results(self, count: int, ng_only: bool = False, after: int | None = None) -> list[dict]:
        """The newest `count` results, newest first; with `after`, only those of a later seq (a page that has
        the others asks for what is new: a few results a second instead of the whole ring)."""
        newest = []
        with self._lock:  # walked from the newest end: with `after`, only as far as what is new
            for message in reversed(self._ng if ng_only else self._results):
                if len(newest) >= count or (after is not None and message["seq"] <= after):
                    break
                newest.append(message)
        return newest

    def result(self, verdict_id: str) -> dict | None:
        with self._lock:
            found = [m for ring in (self._results, self._ng) for m in ring if m.get("id") == verdict_id]
        return found[-1] if found else None

    def tallies(self) -> tuple[dict, dict]:
        with self._lock:
            return self.since_start.figures(), self.since_reset.figures()

    def reset(self, dropped_now: int):
        """An operator's reset: the since-reset figures start again from zero."""
        with self._lock:
            self.since_reset = Tally()
            self.dropped_at_reset = dropped_now
