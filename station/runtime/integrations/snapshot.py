"""The latest NG part as a picture: a retained JPEG of the region at the camera's resolution.

At most one every `snapshot.interval` seconds, at most `snapshot.max_kb`: the
JPEG quality steps down, then the picture is scaled down, until it fits.
The loop only hands over the region (a copy); a thread encodes and publishes,
so a large region never holds up judging. Published live (QoS 0, retained):
while offline a snapshot is dropped and the next NG part's supersedes it.
With a per-position model the verdict's worst position is drawn on it (a red box), so an operator
sees where the defect is.
"""

from __future__ import annotations

import logging
import threading
import time

import cv2
import numpy as np

log = logging.getLogger(__name__)

QUALITIES = (90, 75, 60, 45, 30)
SHRINK = 0.7  # scale per step once the lowest quality is still too large
MARK_BGR = (0, 0, 255)  # the worst position's box: red


def mark_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """A BGR copy of the picture with a box (x, y, width, height, picture pixels) drawn around it: a red
    frame about 1/100 of the picture's larger side thick (at least 2 pixels: JPEG keeps colour at half
    resolution, and a 1-pixel red line fades to grey), just outside the box where there is room, so
    what is inside stays visible."""
    picture = to_bgr8(image)
    picture = cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR) if picture.ndim == 2 else picture.copy()
    height, width = picture.shape[:2]
    thickness = max(2, round(max(height, width) / 100))
    x, y, w, h = box
    outer = (
        max(y - thickness, 0),
        min(y + h + thickness, height),
        max(x - thickness, 0),
        min(x + w + thickness, width),
    )
    inner = (max(y, 0), min(y + h, height), max(x, 0), min(x + w, width))
    inside = picture[inner[0] : inner[1], inner[2] : inner[3]].copy()
    picture[outer[0] : outer[1], outer[2] : outer[3]] = MARK_BGR
    picture[inner[0] : inner[1], inner[2] : inner[3]] = inside
    return picture


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """8-bit gray or BGR for JPEG, from gray, BGR or BGRA of 8 or 16 bits."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    return image


def encode_jpeg(image: np.ndarray, max_bytes: int) -> bytes:
    """The best JPEG of the image within max_bytes (lower quality first, then smaller)."""
    picture = to_bgr8(image)
    while True:
        for quality in QUALITIES:
            ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and len(encoded) <= max_bytes:
                return encoded.tobytes()
        height, width = picture.shape[:2]
        if min(height, width) <= 8:
            return encoded.tobytes()  # a picture this small fits any sensible bound
        picture = cv2.resize(
            picture, (max(1, int(width * SHRINK)), max(1, int(height * SHRINK))), interpolation=cv2.INTER_AREA
        )


class Snapshots:
    """Takes NG regions from the loop, at most one per interval; a thread encodes and publishes them."""

    def __init__(self, publisher, interval: float, max_bytes: int, clock=time.monotonic):
        self.publisher, self.interval, self.max_bytes, self._clock = publisher, interval, max_bytes, clock
        self.published = 0
        self._last = -float("inf")
        self._slot: tuple | None = None  # (region, box)
        self._ready = threading.Condition()
        self._closed = False
        self._generation = 0  # advanced by clear(): a picture taken before a changeover is not published after it
        self._thread = threading.Thread(target=self._run, name="snapshot", daemon=True)
        self._thread.start()

    def wants(self) -> bool:
        """Is it time for another snapshot? (cheap: called for every NG part)"""
        return self._clock() - self._last >= self.interval

    def offer(self, region: np.ndarray, box: tuple[int, int, int, int] | None = None):
        """The region of an NG part (a view is fine: it is copied here); `box`: where its worst position is,
        (x, y, width, height) in the region's pixels, drawn by the encoding thread."""
        self._last = self._clock()
        with self._ready:
            self._slot = (region.copy(), box)
            self._ready.notify()

    def clear(self):
        """Changeover: the retained picture is emptied, and a waiting one forgotten."""
        with self._ready:
            self._slot = None
            self._generation += 1
        self.publisher.clear_snapshot()

    def close(self, timeout: float = 2.0):
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout)

    def _run(self):
        while True:
            with self._ready:
                while self._slot is None and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                (region, box), self._slot, generation = self._slot, None, self._generation
            try:
                jpeg = encode_jpeg(region if box is None else mark_box(region, box), self.max_bytes)
            except cv2.error as exc:  # an image OpenCV cannot encode: the verdict stands, the picture is skipped
                log.warning("NG snapshot not encoded: %s", exc)
                continue
            if generation == self._generation and self.publisher.publish_snapshot(jpeg):
                self.published += 1
