"""A procedural inspection line: small bright metal terminals on a dark belt.

Each part is a body with two or three pins, drawn at 4x resolution and
reduced with INTER_AREA, with the jitter a real station sees (position,
rotation, brightness, contrast, sensor noise). About a third are defective,
and every defect is partial: it touches only a small area of the crop.

Byte-identical output for the same seed: every part draws from its own
generator seeded by (seed, part index).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from station.core.imagefolder import GOOD
from station.core.preprocess import Roi
from station.core.verdict import NG, OK

DEFECT_CLASSES = ("missing_pin", "bent_pin", "scratch", "burr", "contamination", "crack")
DEFECT_FRACTION = 1.0 / 3.0
CROP_WIDTH, CROP_HEIGHT = 36, 26
FRAME_WIDTH, FRAME_HEIGHT = 320, 240
# Where the part sits in a full frame: the inspection ROI of the demo config.
FRAME_ROI = Roi(x=142, y=107, width=CROP_WIDTH, height=CROP_HEIGHT)
SUPERSAMPLE = 4

BACKGROUND_LEVEL = 55.0
BODY_LEVEL = 185.0
PIN_LEVEL = 215.0

# Part geometry in crop pixels (before jitter).
BODY = (8.0, 3.0, 28.0, 13.0)  # x0, y0, x1, y1
PIN_WIDTH = 2.6
PIN_BOTTOM = 23.0


@dataclass(frozen=True)
class SimulatedPart:
    index: int
    defect_class: str  # "good" or one of DEFECT_CLASSES
    crop: np.ndarray  # uint8, CROP_HEIGHT x CROP_WIDTH

    @property
    def label(self) -> str:
        return OK if self.defect_class == GOOD else NG


def _pin_centres(pins: int) -> list[float]:
    body_x0, _, body_x1, _ = BODY
    step = (body_x1 - body_x0) / (pins + 1)
    return [body_x0 + step * (i + 1) for i in range(pins)]


class _Canvas:
    """A supersampled float canvas addressed in crop pixel coordinates."""

    def __init__(self):
        self.image = np.full((CROP_HEIGHT * SUPERSAMPLE, CROP_WIDTH * SUPERSAMPLE), BACKGROUND_LEVEL, np.float32)

    def _pts(self, points) -> np.ndarray:
        return np.round(np.asarray(points, dtype=np.float64) * SUPERSAMPLE).astype(np.int32)

    def polygon(self, points, level: float):
        cv2.fillPoly(self.image, [self._pts(points)], float(level), lineType=cv2.LINE_AA)

    def polyline(self, points, level: float, width: float):
        thickness = max(1, int(round(width * SUPERSAMPLE)))
        cv2.polylines(self.image, [self._pts(points)], False, float(level), thickness, cv2.LINE_AA)

    def disc(self, centre, radius: float, level: float):
        cx, cy = self._pts(centre)
        cv2.circle(self.image, (int(cx), int(cy)), int(round(radius * SUPERSAMPLE)), float(level), -1, cv2.LINE_AA)


def _pin_polygon(x_centre: float, angle_deg: float = 0.0) -> np.ndarray:
    """A pin hanging from the body's lower edge, optionally bent about its root."""
    top = BODY[3] - 0.5
    half = PIN_WIDTH / 2
    corners = np.array([[-half, 0.0], [half, 0.0], [half, PIN_BOTTOM - top], [-half, PIN_BOTTOM - top]])
    theta = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return corners @ rotation.T + [x_centre, top]


def _draw_part(canvas: _Canvas, pins: int, defect: str, rng: np.random.Generator):
    body_x0, body_y0, body_x1, body_y1 = BODY
    centres = _pin_centres(pins)
    missing = int(rng.integers(pins)) if defect == "missing_pin" else -1
    bent = int(rng.integers(pins)) if defect == "bent_pin" else -1
    for i, x in enumerate(centres):
        if i == missing:
            continue
        angle = float(rng.choice([-1, 1]) * rng.uniform(22, 38)) if i == bent else 0.0
        canvas.polygon(_pin_polygon(x, angle), PIN_LEVEL)
    canvas.polygon([[body_x0, body_y0], [body_x1, body_y0], [body_x1, body_y1], [body_x0, body_y1]], BODY_LEVEL)
    # A brighter top edge: light falls on the part from above, as on a real station.
    canvas.polyline([[body_x0 + 0.5, body_y0 + 0.6], [body_x1 - 0.5, body_y0 + 0.6]], BODY_LEVEL + 30, 0.8)
    _draw_surface_defect(canvas, defect, rng)


def _point_on_body(rng: np.random.Generator, margin: float = 2.0) -> np.ndarray:
    body_x0, body_y0, body_x1, body_y1 = BODY
    return np.array([rng.uniform(body_x0 + margin, body_x1 - margin), rng.uniform(body_y0 + margin, body_y1 - margin)])


def _draw_surface_defect(canvas: _Canvas, defect: str, rng: np.random.Generator):
    if defect == "scratch":
        start = _point_on_body(rng)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(5, 8)
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        end = np.clip(end, [BODY[0] + 1, BODY[1] + 1], [BODY[2] - 1, BODY[3] - 1])  # stays on the body
        canvas.polyline([start, end], BODY_LEVEL - rng.uniform(80, 110), 0.7)
    elif defect == "contamination":
        canvas.disc(_point_on_body(rng, 2.5), rng.uniform(1.4, 2.2), rng.uniform(45, 75))
    elif defect == "crack":
        start = _point_on_body(rng)
        steps = rng.normal(0, 1, (4, 2)) * [1.4, 1.0] + [1.8, 0.6 * rng.choice([-1, 1])]
        points = np.vstack([start, start + np.cumsum(steps, axis=0)])
        canvas.polyline(points, rng.uniform(40, 70), 0.6)
    elif defect == "burr":
        body_x0, body_y0, body_x1, _ = BODY
        on_top = rng.random() < 0.5
        if on_top:
            x = rng.uniform(body_x0 + 2, body_x1 - 2)
            spike = [[x - 1.4, body_y0 + 0.5], [x + 1.4, body_y0 + 0.5], [x + rng.uniform(-1, 1), body_y0 - 2.6]]
        else:
            edge = body_x0 if rng.random() < 0.5 else body_x1
            side = -1 if edge == body_x0 else 1
            y = rng.uniform(BODY[1] + 2, BODY[3] - 2)
            spike = [
                [edge - side * 0.5, y - 1.4],
                [edge - side * 0.5, y + 1.4],
                [edge + side * 3.0, y + rng.uniform(-1, 1)],
            ]
        canvas.polygon(spike, BODY_LEVEL + 20)


def _jitter(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Shift +-2 px, rotate +-3 deg, then reduce to crop size."""
    shift = rng.uniform(-2, 2, size=2) * SUPERSAMPLE
    angle = rng.uniform(-3, 3)
    centre = (CROP_WIDTH * SUPERSAMPLE / 2, CROP_HEIGHT * SUPERSAMPLE / 2)
    matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
    matrix[:, 2] += shift
    moved = cv2.warpAffine(
        canvas.image,
        matrix,
        canvas.image.shape[::-1],
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=BACKGROUND_LEVEL,
    )
    return cv2.resize(moved, (CROP_WIDTH, CROP_HEIGHT), interpolation=cv2.INTER_AREA)


def _expose(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting and sensor: +-10 % brightness and contrast, Gaussian noise."""
    contrast = rng.uniform(0.9, 1.1)
    brightness = rng.uniform(0.9, 1.1)
    # A fixed pivot (not the image mean) so a defect changes only its own pixels.
    pivot = 128.0
    image = ((image - pivot) * contrast + pivot) * brightness
    image = image + rng.normal(0.0, 3.0, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def part_class(seed: int, index: int) -> str:
    """The class of part ``index``: good, or a defect with probability 1/3."""
    rng = np.random.default_rng([seed, index, 0])
    if rng.random() < DEFECT_FRACTION:
        return DEFECT_CLASSES[int(rng.integers(len(DEFECT_CLASSES)))]
    return GOOD


def render_part(seed: int, index: int, pins: int = 3, defect_class: str | None = None) -> SimulatedPart:
    """Part number ``index`` of the line with this seed; same inputs, same pixels.

    ``defect_class`` overrides the drawn class while keeping the part's jitter,
    lighting and noise, so one part can be seen with and without its defect.
    """
    defect = part_class(seed, index) if defect_class is None else defect_class
    defect_rng = np.random.default_rng([seed, index, 1])
    pose_rng = np.random.default_rng([seed, index, 2])
    canvas = _Canvas()
    _draw_part(canvas, pins, defect, defect_rng)
    crop = _expose(_jitter(canvas, pose_rng), pose_rng)
    return SimulatedPart(index=index, defect_class=defect, crop=crop)


def render_belt(seed: int, index: int, travel: int = 0, frame_no: int | None = None) -> np.ndarray:
    """The empty belt (gray uint8): a slow gradient plus cross slats that move with the belt.

    `travel` (pixels) moves the slats; `frame_no` draws fresh sensor noise per frame of a dwell video.
    """
    key = [seed, index, 3] if frame_no is None else [seed, index, 3, frame_no]
    rng = np.random.default_rng(key)
    cols = np.arange(FRAME_WIDTH, dtype=np.float32)[None, :]
    belt = BACKGROUND_LEVEL - 8 + 10 * (cols / FRAME_WIDTH) + 6 * (((cols + 7 * index + travel) % 40) < 3)
    frame = belt + rng.normal(0.0, 3.0, (FRAME_HEIGHT, FRAME_WIDTH))
    return np.clip(np.round(frame), 0, 255).astype(np.uint8)


def render_frame(
    part: SimulatedPart | None,
    seed: int,
    index: int | None = None,
    x_offset: int = 0,
    travel: int = 0,
    frame_no: int | None = None,
) -> np.ndarray:
    """A full BGR camera frame: the belt, with the part inside FRAME_ROI moved by x_offset (None: empty belt)."""
    index = part.index if index is None else index
    frame = render_belt(seed, index, travel, frame_no)
    if part is not None:
        roi = FRAME_ROI
        left = roi.x + x_offset
        first, last = max(left, 0), min(left + roi.width, FRAME_WIDTH)  # the part may be partly out of frame
        if first < last:
            frame[roi.y : roi.y + roi.height, first:last] = part.crop[:, first - left : last - left]
    return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
