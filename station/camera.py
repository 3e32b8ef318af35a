"""Camera sources behind one interface: iterate a FrameSource, get Frames.

    source = open_source("sim://?seed=3&count=100", loop=False, fps=10)
    for frame in source:          # ends for finite sources, never raises for live ones
        ...
    source.state                  # "ok" | "reconnecting" | "ended"

Live sources (device, URL, video file) read in a thread of their own: a read
that hangs (a dead RTSP stream can block for half a minute) is noticed after
`stall_timeout` and the source reconnects with exponential backoff + jitter.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from station.backoff import Backoff
from station.errors import DataError

log = logging.getLogger(__name__)

OK, RECONNECTING, ENDED = "ok", "reconnecting", "ended"
STALL_TIMEOUT = 2.0  # seconds without a frame before a live source counts as lost
URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")


@dataclass(frozen=True)
class Frame:
    image: np.ndarray
    source: str  # file name, frame number in a video, device or URL (without credentials)
    frame_no: int  # counts every frame this source delivered, from 0
    grabbed_at: float  # time.monotonic() when grabbed


class FrameSource:
    """Iterate for frames. `state` and `reconnects` may be read from any thread."""

    def __init__(self, description: str, fps: float = 0.0):
        self.description = description
        self.state = OK
        self.reconnects = 0
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

    def _frame(self, image: np.ndarray, source: str, grabbed_at: float | None = None) -> Frame:
        return Frame(image, source, next(self._count), time.monotonic() if grabbed_at is None else grabbed_at)

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


class FolderSource(FrameSource):
    """Images below a folder, recursively, sorted; `source` is the path inside the folder."""

    def __init__(self, folder: Path, loop: bool = False, fps: float = 0.0):
        super().__init__(str(folder), fps)
        self.folder = Path(folder)
        self.loop = loop
        self.skipped = 0

    def _frames(self) -> Iterator[Frame]:
        from station.imagefolder import list_images, read_image

        while not self.closed:
            try:
                paths = list_images(self.folder)
            except DataError as exc:
                log.error("image folder source: %s", exc)
                return
            delivered = 0
            for path in paths:
                try:
                    image = read_image(path)
                except DataError as exc:
                    self.skipped += 1
                    log.warning("skipped unreadable image %s", exc)
                    continue
                if not self._pace():
                    return
                delivered += 1
                yield self._frame(image, str(path.relative_to(self.folder)))
            if not self.loop or delivered == 0:  # looping over nothing readable would spin
                if delivered == 0 and self.loop:
                    log.error("image folder %s has no readable images: source ended", self.folder)
                return


class SimSource(FrameSource):
    """The simulated line (station.simulate): one full frame per part, endless unless count."""

    def __init__(self, seed: int = 0, count: int | None = None, loop: bool = False, fps: float = 0.0):
        super().__init__(f"sim://?seed={seed}" + (f"&count={count}" if count else ""), fps)
        self.seed, self.count, self.loop = seed, count, loop

    def _frames(self) -> Iterator[Frame]:
        from station.simulate import render_frame, render_part

        while True:
            indices = itertools.count() if self.count is None else range(self.count)
            for index in indices:
                if not self._pace():
                    return
                image = render_frame(render_part(self.seed, index), self.seed)
                yield self._frame(image, f"sim:{self.seed}:{index}")
            if not self.loop:
                return


class _Reader(threading.Thread):
    """Owns one cv2.VideoCapture: reads into a queue until the stream fails or it is told to stop."""

    END = None

    def __init__(self, capture, keep_latest: bool):
        super().__init__(daemon=True, name="camera-reader")
        self.capture = capture
        self.keep_latest = keep_latest  # live cameras: freshest frame; files: every frame
        self.frames: queue.Queue = queue.Queue(maxsize=1 if keep_latest else 4)
        self.stopped = threading.Event()

    def run(self):
        try:
            while not self.stopped.is_set():
                ok, image = self.capture.read()
                if not ok or image is None:
                    break
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
        super().__init__(_without_credentials(target) if kind == "url" else str(target), fps)
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
            if outcome == "eof" and not self.loop:
                log.info("video %s ended", self.description)
                return
            if outcome == "lost":
                lost_before = self._lost(f"camera {self.description} lost")

    def _lost(self, why: str) -> bool:
        self.state = RECONNECTING
        delay = self.backoff.next()
        log.warning("%s; retrying in %.1f s", why, delay)
        self._closed.wait(delay)
        return True

    def _open(self) -> _Reader | None:
        import cv2

        if self.kind == "device":
            capture = cv2.VideoCapture(self.target, cv2.CAP_V4L2)
        elif self.kind == "url":
            timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000,
                        cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.stall_timeout * 1000)]
            capture = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, timeouts)
        else:
            capture = cv2.VideoCapture(str(self.target)) if Path(self.target).is_file() else None
        if capture is None or not capture.isOpened():
            if capture is not None:
                capture.release()
            return None
        reader = _Reader(capture, keep_latest=self.kind != "file")
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
                return "eof" if self.kind == "file" and Path(self.target).is_file() else "lost"
            self.backoff.reset()
            if not self._pace():
                break
            image, grabbed_at = item
            position = next(in_file)
            yield self._frame(image, str(position) if self.kind == "file" else self.description, grabbed_at)
        return "closed"


def _without_credentials(url: str) -> str:
    """rtsp://user:pass@host/x -> rtsp://host/x: never log a camera password."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def open_source(source: int | str | Path, loop: bool = False, fps: float = 0.0) -> FrameSource:
    """Pick the source type from the configured `camera.source`."""
    if isinstance(source, bool):
        raise DataError(f"camera source {source!r} is not a device, URL, file or folder")
    if isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
        return CaptureSource(int(source), "device", fps=fps)
    text = str(source)
    if text.startswith("sim://"):
        from station.config import parse_sim_source

        try:
            seed, count = parse_sim_source(text)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        return SimSource(seed, count, loop, fps)
    if text.startswith("/dev/video"):
        return CaptureSource(text, "device", fps=fps)
    if text.startswith(URL_SCHEMES):
        return CaptureSource(text, "url", fps=fps)
    if Path(text).is_dir():
        return FolderSource(Path(text), loop, fps)
    return CaptureSource(text, "file", loop, fps)


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


def is_finite(source: FrameSource) -> bool:
    """Files, folders and counted sim sources end; cameras and streams do not."""
    if isinstance(source, FolderSource):
        return not source.loop
    if isinstance(source, SimSource):
        return source.count is not None and not source.loop
    return isinstance(source, CaptureSource) and source.kind == "file" and not source.loop


def is_lossless(source: FrameSource) -> bool:
    """Every frame matters (stored media); live cameras only need the freshest."""
    return not (isinstance(source, CaptureSource) and source.kind in ("device", "url"))
