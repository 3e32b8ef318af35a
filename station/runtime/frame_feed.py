"""Between a camera source and the daemon's loop: a capture thread per source.

FrameFeed (continuous mode) queues frames, losslessly for stored media;
LatestFrame (trigger mode) keeps only the freshest frame.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from station.runtime.sources import Frame, FrameSource

log = logging.getLogger(__name__)


def _no_wait_for_a_trigger(source: FrameSource, timeout: float) -> float:
    """A camera that waits for its trigger (GenICam, trigger: hardware or mqtt) has no frame to peek at."""
    return 0.0 if getattr(source, "waits_for_trigger", False) else timeout


class LatestFrame:
    """For trigger mode: drains a source in a thread and keeps only the freshest frame."""

    def __init__(self, source: FrameSource):
        self.source = source
        self._latest: Frame | None = None
        self._taken = -1
        self._ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._drain, daemon=True, name="latest-frame")
        self._thread.start()

    def _drain(self):
        try:
            for frame in self.source:
                with self._changed:
                    self._latest = frame
                    self._changed.notify_all()
        except Exception:  # a source bug must not leave get() waiting forever
            log.exception("frame source %s failed", self.source.description)
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def exhausted(self) -> bool:
        """The source ended with no readable frame left to take."""
        with self._changed:
            return self._ended and (
                self._latest is None or self._latest.problem is not None or self._latest.frame_no <= self._taken
            )

    def peek(self, timeout: float) -> Frame | None:
        """The freshest frame, left for get(); None when none came within timeout."""
        timeout = _no_wait_for_a_trigger(self.source, timeout)
        with self._changed:
            self._changed.wait_for(lambda: self._ended or self._latest is not None, timeout)
            return self._latest

    def get(self, timeout: float | None = None) -> Frame | None:
        """The freshest frame not returned before; None on timeout or when the source ended."""
        with self._changed:
            fresh = lambda: self._ended or (self._latest is not None and self._latest.frame_no > self._taken)
            if not self._changed.wait_for(fresh, timeout) or self._latest is None:
                return None
            if self._latest.frame_no <= self._taken:
                return None  # ended with nothing new
            self._taken = self._latest.frame_no
            return self._latest

    def for_trigger(self, timeout: float) -> tuple[Frame | None, str | None]:
        """(frame, error) for an MQTT trigger: a camera with a software trigger (GenICam) takes the
        part's frame now; other sources give their freshest frame."""
        fire = getattr(self.source, "software_trigger", None)
        if fire is not None:
            self.get(timeout=0)  # a frame taken before this trigger is not this part's
            error = fire()
            if error is not None:
                return None, error
        return self.get(timeout=timeout), None

    def close(self, timeout: float = 3.0):
        self.source.close()
        self._thread.join(timeout)


class FrameFeed:
    """For continuous mode: a capture thread hands frames to the processing loop.

    The loop waits at most `timeout` per call, so commands, stats and the
    watchdog keep running while a camera is away. Finite sources (files,
    folders, sim with a count) are lossless: capture waits for the loop, with
    at most `max_frames` frames or `max_bytes` of pixels queued (full video
    frames are large: the memory goal holds for any frame size). Live cameras
    are not lossless: when the loop falls behind, the oldest frame is dropped
    and counted, so a verdict is never about a stale part.
    """

    LIVE_DEPTH = 4

    def __init__(self, source: FrameSource, lossless: bool, max_frames: int = 256, max_bytes: int = 16 << 20):
        self.source = source
        self.lossless = lossless
        self.max_frames = max_frames if lossless else self.LIVE_DEPTH
        self.max_bytes = max_bytes
        self.dropped = 0
        self.captured = 0
        self.readable = 0  # captured frames with pixels (an unreadable file is captured, not readable)
        self._frames: deque[Frame] = deque()
        self._bytes = 0
        self._changed = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._capture, daemon=True, name="frame-feed")
        self._thread.start()

    def _capture(self):
        try:
            for frame in self.source:
                self.captured += 1
                self.readable += frame.problem is None
                self._put(frame)
        except Exception:  # a source bug ends the feed; the daemon reports it, never hangs
            log.exception("frame source %s failed", self.source.description)
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def _full(self, size: int) -> bool:
        # Always room for one frame, however large.
        return bool(self._frames) and (len(self._frames) >= self.max_frames or self._bytes + size > self.max_bytes)

    def _put(self, frame: Frame):
        size = frame.image.nbytes
        with self._changed:
            while self._full(size):
                if not self.lossless:
                    self._bytes -= self._frames.popleft().image.nbytes
                    self.dropped += 1
                elif self.source.closed:
                    return
                else:
                    self._changed.wait(0.2)
            self._frames.append(frame)
            self._bytes += size
            self._changed.notify_all()

    def peek(self, timeout: float) -> Frame | None:
        """The first readable frame, left in the queue; None when none came within timeout (or the source ended)."""
        timeout = _no_wait_for_a_trigger(self.source, timeout)
        with self._changed:
            self._changed.wait_for(lambda: self._first_readable() is not None or self._ended, timeout)
            return self._first_readable()

    def _first_readable(self) -> Frame | None:
        return next((frame for frame in self._frames if frame.problem is None), None)

    @property
    def exhausted(self) -> bool:
        """The source ended and no readable frame waits (unreadable files may)."""
        with self._changed:
            return self._ended and self._first_readable() is None

    def get_batch(self, max_frames: int, timeout: float) -> list[Frame]:
        """Wait up to `timeout` for a frame, then take whatever else is ready (up to max_frames)."""
        with self._changed:
            if not self._frames and not self._ended:
                self._changed.wait(timeout)
            batch = []
            while self._frames and len(batch) < max_frames:
                frame = self._frames.popleft()
                self._bytes -= frame.image.nbytes
                batch.append(frame)
            if batch:
                self._changed.notify_all()
            return batch

    @property
    def ended(self) -> bool:
        """The source is exhausted and every frame was taken."""
        with self._changed:
            return self._ended and not self._frames

    def close(self, timeout: float = 3.0):
        self.source.close()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout)
