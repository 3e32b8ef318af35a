"""What every camera source is: iterate a FrameSource, get Frames.

    source = open_source("sim://?seed=3&count=100", loop=False, fps=10)
    for frame in source:          # ends for finite sources, never raises for live ones
        ...
    source.state                  # "ok" | "reconnecting" | "ended"
    source.problem                # why no frames come now, or why a finite source ended early; else None

Every kind follows one rule when its media goes away: a live or looping source
reconnects with exponential backoff + jitter (state "reconnecting", `problem`
saying why); a finite source ends, and `problem` says why when it ended without
its frames (nothing to read, gone mid-way). Live sources (device, URL, video
file) read in a thread of their own: a read that hangs (a dead RTSP stream can
block for half a minute) is noticed after `stall_timeout`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from station.core.backoff import Backoff

log = logging.getLogger(__name__)

OK, RECONNECTING, ENDED = "ok", "reconnecting", "ended"
STARTING = "starting"  # no source yet: the daemon has not opened its camera
STATES = (STARTING, OK, RECONNECTING, ENDED)  # what state, stats and /metrics may say of the camera
STALL_TIMEOUT = 2.0  # seconds without a frame before a live source counts as lost


@dataclass(frozen=True)
class Frame:
    image: np.ndarray
    source: str  # file name, frame number in a video, device or URL (without credentials)
    frame_no: int  # counts every frame this source delivered, from 0
    grabbed_at: float  # time.monotonic() when grabbed
    camera_ts: int | None = None  # the camera's own timestamp (ns, its clock): GenICam cameras
    part_id: str | None = None  # the camera's trigger counted parts (trigger: hardware)
    # Why this part's image cannot be judged (an unreadable file): it still gets a no_verdict, never a silent skip.
    problem: str | None = None


class FrameSource:
    """Iterate for frames. `state` and `reconnects` may be read from any thread."""

    def __init__(self, description: str, fps: float = 0.0):
        self.description = description
        self.state = OK
        self.problem: str | None = None  # for the state's problems: "camera: ..."
        self.reconnects = 0
        self.backoff = Backoff(first=0.5, ceiling=30.0)
        self._closed = threading.Event()
        self._period = 1.0 / fps if fps > 0 else 0.0
        self._next_due = 0.0
        self._count = itertools.count()

    def __iter__(self) -> Iterator[Frame]:
        try:
            yield from self._frames()
        finally:
            self.state = ENDED

    def close(self):
        """Stop: the iterator ends at its next frame (or wait) at the latest."""
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    def counters(self) -> dict:
        """Source figures for the stats message (GenICam: lost packets, incomplete frames)."""
        return {}

    def _lost(self, why: str, level: int = logging.WARNING) -> bool:
        """The media went away: say why (state and problem), wait the backoff; True, for `lost_before`."""
        self.state, self.problem = RECONNECTING, why
        delay = self.backoff.next()
        log.log(level, "%s; retrying in %.1f s", why, delay)
        self._closed.wait(delay)
        return True

    def _back(self, lost_before: bool):
        """Frames again: a source that was lost says it is back."""
        if lost_before:
            self.reconnects += 1
            log.info("camera %s is back (reconnect %d)", self.description, self.reconnects)
        self.state, self.problem = OK, None

    def _ended_without_frames(self, why: str):
        """A finite source that cannot give (all) its frames: said once, kept in `problem`."""
        self.problem = why
        log.error("camera %s: %s", self.description, why)

    def _frame(self, image: np.ndarray, source: str, grabbed_at: float | None = None) -> Frame:
        return Frame(image, source, next(self._count), time.monotonic() if grabbed_at is None else grabbed_at)

    def _unreadable(self, source: str, why: str) -> Frame:
        """A part whose image cannot be read: no pixels, the reason for its no_verdict."""
        return Frame(np.zeros((0, 0), np.uint8), source, next(self._count), time.monotonic(), problem=why)

    def _pace(self) -> bool:
        """Hold to the fps cap; False when closed meanwhile."""
        if self._period:
            now = time.monotonic()
            if now < self._next_due:
                self._closed.wait(self._next_due - now)
            self._next_due = max(now, self._next_due) + self._period
        return not self._closed.is_set()

    def __repr__(self):
        return f"<{type(self).__name__} {self.description} {self.state}>"
