"""OpenCV captures as a camera: a V4L2 device, an RTSP/HTTP(MJPEG) URL or a video file.

The capture reads in a thread of its own: a read that hangs (a dead RTSP
stream can block for half a minute) is noticed after `stall_timeout` and the
source reconnects with exponential backoff + jitter. A video file read once
(not looping) is finite: when it cannot be read, or goes away mid-way, it ends
and says why instead of reading its frames again from the start.

OpenCV's FFmpeg backend scales every decoded frame to the size the stream had
when it was opened: a camera that changes its frame size mid-stream would be
rescaled without a word. MJPEG (HTTP cameras, videos OpenCV writes) is therefore
read as undecoded packets and decoded here, so each frame keeps its real size
and the daemon sees the change.
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
from station.runtime.sources.base import STALL_TIMEOUT, Frame, FrameSource
from station.runtime.sources.kinds import DEVICE, FILE, URL, without_credentials

log = logging.getLogger(__name__)


class _Reader(threading.Thread):
    """Owns one cv2.VideoCapture: reads into a queue until the stream fails or it is told to stop."""

    END = None

    def __init__(self, capture, keep_latest: bool, jpeg_packets: bool = False):
        super().__init__(daemon=True, name="camera-reader")
        self.capture = capture
        self.jpeg_packets = jpeg_packets  # read undecoded MJPEG packets: decoded here, at their own size
        self.undecodable = 0
        self.keep_latest = keep_latest  # live cameras: freshest frame; files: every frame
        self.frames: queue.Queue = queue.Queue(maxsize=1 if keep_latest else 4)
        self.stopped = threading.Event()
        self.read = 0  # frames decoded so far (undecodable MJPEG packets are counted apart)
        self.expected = 0  # frames a video file's header announces (0: unknown)

    def run(self):
        try:
            while not self.stopped.is_set():
                ok, image = self.capture.read()
                if not ok or image is None:
                    break
                if self.jpeg_packets and (image := self._decode(image)) is None:
                    continue
                self.read += 1
                self._put((image, time.monotonic()))
        finally:
            # Released here (VideoCapture is not safe to release from another thread), and before END:
            # a process that exits on END while FFmpeg is still closing the file aborts.
            self.capture.release()
            self._put(self.END)

    def _decode(self, packet):
        import cv2

        image = cv2.imdecode(packet, cv2.IMREAD_COLOR)
        if image is None:
            self.undecodable += 1
            if self.undecodable == 1:  # a damaged stream would say it for every frame
                log.warning("a frame of %d bytes is not a JPEG: skipped (further ones are counted)", packet.size)
        return image

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

    def __init__(
        self,
        target: int | str,
        kind: str,
        loop: bool = False,
        fps: float = 0.0,
        stall_timeout: float = STALL_TIMEOUT,
        backoff: Backoff | None = None,
    ):
        super().__init__(without_credentials(target) if kind == URL else str(target), fps)
        self.target, self.kind, self.loop = target, kind, loop
        self.stall_timeout = stall_timeout
        self.backoff = backoff or Backoff(first=0.5, ceiling=30.0)
        self._mjpeg: bool | None = None  # known once opened

    @property
    def finite(self) -> bool:
        return self.kind == FILE and not self.loop

    def _frames(self) -> Iterator[Frame]:
        lost_before = False
        while not self.closed:
            reader, why = self._open()
            if reader is None:
                if self.finite:
                    self._ended_without_frames(why)
                    return
                lost_before = self._lost(why)
                continue
            self._back(lost_before)
            lost_before = False
            try:
                outcome = yield from self._read(reader)
            finally:  # also when the consumer stops iterating
                reader.stopped.set()
            if outcome == "eof":
                why = self._report_end(reader)
                if why and self.finite:
                    self._ended_without_frames(why)
                    return
                if why:
                    lost_before = self._lost(why)  # a looping video without frames would spin
                elif not self.loop:
                    return
            elif outcome == "lost" and self.finite:
                self._ended_without_frames(
                    f"video {self.description} stalled after {reader.read} frames: ended "
                    "(not read again from the start: its parts were judged)"
                )
                return
            elif outcome == "lost":
                lost_before = self._lost(f"camera {self.description} lost")

    def _report_end(self, reader: "_Reader") -> str | None:
        """Say how a video ended; why, when it gave no frame."""
        if reader.read == 0:
            return f"video {self.description} holds no frame that can be decoded (empty or damaged)"
        if reader.read + reader.undecodable < reader.expected:
            log.warning(
                "video %s ended after %d of the %d frames its header announces: the file is truncated or damaged",
                self.description,
                reader.read,
                reader.expected,
            )
        else:
            log.info("video %s ended (%d frames)", self.description, reader.read)
        return None

    def _open(self) -> tuple[_Reader | None, str]:
        """A started reader, or None and why the media cannot be opened."""
        import cv2

        if self.kind == FILE and not Path(self.target).is_file():
            exists = Path(self.target).exists()
            return None, f"video {self.description} {'is not a file' if exists else 'does not exist'}"
        raw = self.kind != DEVICE and self._mjpeg is not False  # V4L2 frames keep their size
        capture, jpeg_packets = self._capture(cv2, raw)
        if capture is not None and raw and not jpeg_packets:  # not MJPEG: OpenCV decodes it
            capture.release()
            capture, _ = self._capture(cv2, raw=False)
        if capture is not None:
            self._mjpeg = jpeg_packets  # the stream's codec does not change on a reconnect
        if capture is None:
            if self.kind == FILE:
                return None, (
                    f"{self.description} cannot be opened as a video (not a video file, or a codec OpenCV lacks here)"
                )
            return None, f"cannot open {self.description}"
        reader = _Reader(capture, keep_latest=self.kind != FILE, jpeg_packets=bool(jpeg_packets))
        reader.expected = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if self.kind == FILE else 0
        reader.start()
        return reader, ""

    def _capture(self, cv2, raw: bool):
        """(an opened VideoCapture or None, whether it gives MJPEG packets); raw: ask for undecoded packets."""
        params = [cv2.CAP_PROP_FORMAT, -1] if raw else []
        if self.kind == DEVICE:
            capture = cv2.VideoCapture(self.target, cv2.CAP_V4L2)
        elif self.kind == URL:
            params += [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                5000,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                int(self.stall_timeout * 1000),
            ]
            capture = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, params)
        else:
            capture = cv2.VideoCapture(str(self.target), cv2.CAP_FFMPEG, params)
        if not capture.isOpened():
            capture.release()
            return None, False
        fourcc = int(capture.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
        return capture, raw and fourcc.to_bytes(4, "little").upper() == b"MJPG"

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
                # A video read once ends where its reader stopped (a rename or delete leaves the open file
                # readable; a shortened one is said truncated); a looping one that vanished is lost.
                return "eof" if self.finite or (self.kind == FILE and Path(self.target).is_file()) else "lost"
            self.backoff.reset()
            if not self._pace():
                break
            image, grabbed_at = item
            position = next(in_file)
            yield self._frame(image, str(position) if self.kind == FILE else self.description, grabbed_at)
        return "closed"
