"""OpenCV captures as a camera: a V4L2 device, an RTSP/HTTP(MJPEG) URL or a video file.

The capture reads in a thread of its own: a read that hangs (a dead RTSP
stream can block for half a minute) is noticed after `stall_timeout` and the
source reconnects with exponential backoff + jitter.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from station.core.backoff import Backoff
from station.runtime.sources.base import OK, RECONNECTING, STALL_TIMEOUT, Frame, FrameSource
from station.runtime.sources.kinds import DEVICE, FILE, URL, without_credentials

log = logging.getLogger(__name__)


class _Reader(threading.Thread):
    """Owns one cv2.VideoCapture: reads into a queue until the stream fails or it is told to stop."""

    END = None

    def __init__(self, capture, keep_latest: bool):
        super().__init__(daemon=True, name="camera-reader")
        self.capture = capture
        self.keep_latest = keep_latest  # live cameras: freshest frame; files: every frame
        self.frames: queue.Queue = queue.Queue(maxsize=1 if keep_latest else 4)
        self.stopped = threading.Event()
        self.read = 0  # frames decoded so far
        self.expected = 0  # frames a video file's header announces (0: unknown)

    def run(self):
        try:
            while not self.stopped.is_set():
                ok, image = self.capture.read()
                if not ok or image is None:
                    break
                self.read += 1
                self._put((image, time.monotonic()))
            self._put(self.END)
        finally:
            self.capture.release()  # only here: VideoCapture is not safe to release from another thread

    def _put(self, item):
        while not self.stopped.is_set():
            try:
                self.frames.put(item, timeout=0.2)
                return
            except queue.Full:
                if self.keep_latest:
                    try:
                        self.frames.get_nowait()
                    except queue.Empty:
                        pass


class CaptureSource(FrameSource):
    """A V4L2 device, an RTSP/HTTP(MJPEG) URL or a video file, reconnecting when lost."""

    def __init__(self, target: int | str, kind: str, loop: bool = False, fps: float = 0.0,
                 stall_timeout: float = STALL_TIMEOUT, backoff: Backoff | None = None):
        super().__init__(without_credentials(target) if kind == URL else str(target), fps)
        self.target, self.kind, self.loop = target, kind, loop
        self.stall_timeout = stall_timeout
        self.backoff = backoff or Backoff(first=0.5, ceiling=30.0)

    def _frames(self) -> Iterator[Frame]:
        lost_before = False
        while not self.closed:
            reader = self._open()
            if reader is None:
                lost_before = self._lost(f"cannot open {self.description}")
                continue
            if lost_before:
                self.reconnects += 1
                log.info("camera %s is back (reconnect %d)", self.description, self.reconnects)
            self.state, lost_before = OK, False
            try:
                outcome = yield from self._read(reader)
            finally:  # also when the consumer stops iterating
                reader.stopped.set()
            if outcome == "eof":
                self._report_end(reader)
                if not self.loop:
                    return
            if outcome == "lost":
                lost_before = self._lost(f"camera {self.description} lost")

    def _report_end(self, reader: "_Reader"):
        """A video that ends before the frame count its header announces is truncated: say so."""
        if 0 < reader.read < reader.expected:
            log.warning("video %s ended after %d of the %d frames its header announces: the file is "
                        "truncated or damaged", self.description, reader.read, reader.expected)
        else:
            log.info("video %s ended (%d frames)", self.description, reader.read)

    def _lost(self, why: str) -> bool:
        self.state = RECONNECTING
        delay = self.backoff.next()
        log.warning("%s; retrying in %.1f s", why, delay)
        self._closed.wait(delay)
        return True

    def _open(self) -> _Reader | None:
        import cv2

        if self.kind == DEVICE:
            capture = cv2.VideoCapture(self.target, cv2.CAP_V4L2)
        elif self.kind == URL:
            timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000,
                        cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.stall_timeout * 1000)]
            capture = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, timeouts)
        else:
            capture = cv2.VideoCapture(str(self.target)) if Path(self.target).is_file() else None
        if capture is None or not capture.isOpened():
            if capture is not None:
                capture.release()
            return None
        reader = _Reader(capture, keep_latest=self.kind != FILE)
        reader.expected = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if self.kind == FILE else 0
        reader.start()
        return reader

    def _read(self, reader: _Reader) -> Iterator[Frame]:
        """Frames until the stream ends ("eof"), fails or stalls ("lost"), or close ("closed")."""
        in_file = itertools.count()
        waited = 0.0
        while not self.closed:
            try:
                item = reader.frames.get(timeout=0.2)  # short waits keep close() responsive
            except queue.Empty:
                waited += 0.2
                if waited >= self.stall_timeout:
                    log.warning("no frame from %s for %.1f s", self.description, waited)
                    return "lost"
                continue
            waited = 0.0
            if item is _Reader.END:
                # A video file that is still there ended; one that vanished is lost.
                return "eof" if self.kind == FILE and Path(self.target).is_file() else "lost"
            self.backoff.reset()
            if not self._pace():
                break
            image, grabbed_at = item
            position = next(in_file)
            yield self._frame(image, str(position) if self.kind == FILE else self.description, grabbed_at)
        return "closed"
