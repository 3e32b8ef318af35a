"""The page's pictures, made in the web thread's worker from what the loop handed over (feed.py).

The live frame is scaled down to at most LIVE_WIDTH pixels wide and encoded at most every
LIVE_INTERVAL seconds, however many browsers ask (they share the last picture); the regions are drawn
in green with their names, the worst position of a per-position verdict in red. Thumbnails come from
the crops the daemon keeps (STATE/crops/{NG,OK}/<verdict id>.png), read only when asked for and kept
in a small cache.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

LIVE_WIDTH = 960
LIVE_INTERVAL = 0.2  # seconds: a few pictures a second at most, however many browsers watch
CROP_SCALE = 4  # the model's crop is tiny (e.g. 36x26): shown 4 times larger, pixel for pixel
THUMB_HEIGHT = 96
THUMB_CACHE = 400
REGION_BGR, WORST_BGR = (60, 200, 60), (0, 0, 255)
VERDICT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """8-bit BGR of a gray, BGR or BGRA frame of 8 or 16 bits (what the sources deliver)."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image.copy()


def _jpeg(picture: np.ndarray, quality: int = 80) -> bytes:
    ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return encoded.tobytes()


def _boxes(latest) -> list[tuple[str, tuple[int, int, int, int], tuple]]:
    """(label, (x, y, w, h) frame pixels, colour) of what is drawn on the live frame."""
    inspector, message = latest.inspector, latest.message
    boxes = [(r.name, (r.roi.x, r.roi.y, r.roi.width, r.roi.height), REGION_BGR) for r in inspector.regions]
    if not boxes and inspector.roi is not None:
        roi = inspector.roi
        boxes.append(("roi", (roi.x, roi.y, roi.width, roi.height), REGION_BGR))
    worst = message.get("worst_position")
    if worst is not None:
        boxes.append(("worst", (worst["x"], worst["y"], worst["width"], worst["height"]), WORST_BGR))
    return boxes


def live_picture(latest) -> bytes:
    """The latest judged frame as a JPEG, scaled to LIVE_WIDTH at most, with its regions and worst position."""
    picture = to_bgr8(latest.frame.image)
    height, width = picture.shape[:2]
    scale = min(1.0, LIVE_WIDTH / width)
    if scale < 1.0:
        picture = cv2.resize(picture, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    thickness = max(2, round(max(picture.shape[:2]) / 300))
    for label, (x, y, w, h), colour in _boxes(latest):
        x0, y0 = round(x * scale), round(y * scale)
        x1, y1 = round((x + w) * scale) - 1, round((y + h) * scale) - 1
        cv2.rectangle(picture, (x0, y0), (x1, y1), colour, thickness)
        if colour == REGION_BGR and label != "roi":
            cv2.putText(
                picture, label, (x0 + 2, max(y0 - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA
            )
    return _jpeg(picture)


def model_crop(latest) -> bytes:
    """The crop the model saw (gray, its input size; several regions side by side), enlarged as a PNG."""
    crop = latest.inspector.crop(latest.frame.image)
    enlarged = cv2.resize(
        crop, (crop.shape[1] * CROP_SCALE, crop.shape[0] * CROP_SCALE), interpolation=cv2.INTER_NEAREST
    )
    ok, encoded = cv2.imencode(".png", enlarged)
    if not ok:
        raise ValueError("PNG encoding failed")
    return encoded.tobytes()


class LivePictures:
    """The live frame and the model's crop of one judged part, made together at most every LIVE_INTERVAL
    seconds and shared by every browser. /api/live answers with the part these pictures show, and the
    pictures asked for by its number are that part's: the verdict beside a picture is always its own."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()  # two requests at once: one makes, the other waits and shares
        self._shown: list[tuple] = []  # (latest, made at, frame JPEG, crop PNG): the last two made

    def current(self, latest) -> tuple:
        """(latest, made at, frame JPEG, crop PNG) of the part shown now; made anew from `latest` when due."""
        with self._lock:
            shown = self._shown[-1] if self._shown else None
            if shown is None or (shown[0].number != latest.number and self._clock() - shown[1] >= LIVE_INTERVAL):
                shown = (latest, self._clock(), live_picture(latest), model_crop(latest))
                self._shown = [*self._shown[-1:], shown]
            return shown

    def picture(self, kind: str, number: int | None, latest) -> bytes:
        """The frame ("frame") or crop ("crop") of the part `number` when it is one of the last two shown,
        else of the part shown now."""
        with self._lock:
            found = next((shown for shown in self._shown if shown[0].number == number), None)
        shown = found or self.current(latest)
        return shown[2] if kind == "frame" else shown[3]


class Thumbnails:
    """JPEG thumbnails of kept crops by verdict id; None when no crop was kept (or not yet written)."""

    def __init__(self, crops_folder: Path):
        self.folder = Path(crops_folder)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, verdict_id: str, full: bool = False) -> tuple[bytes, str] | None:
        """(bytes, content type): the kept PNG itself when full, else a small JPEG of it."""
        if not VERDICT_ID.match(verdict_id):
            return None
        path = next(
            (
                p
                for p in (self.folder / "NG" / f"{verdict_id}.png", self.folder / "OK" / f"{verdict_id}.png")
                if p.is_file()
            ),
            None,
        )
        if path is None:
            return None
        if full:
            return path.read_bytes(), "image/png"
        with self._lock:
            if verdict_id in self._cache:
                self._cache.move_to_end(verdict_id)
                return self._cache[verdict_id], "image/jpeg"
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            return None  # being written, or damaged: the page shows "no crop"
        picture = to_bgr8(image)
        height, width = picture.shape[:2]
        scale = THUMB_HEIGHT / height
        picture = cv2.resize(
            picture,
            (max(1, round(width * scale)), THUMB_HEIGHT),
            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST,
        )
        data = _jpeg(picture, 85)
        with self._lock:
            self._cache[verdict_id] = data
            while len(self._cache) > THUMB_CACHE:
                self._cache.popitem(last=False)
        return data, "image/jpeg"
