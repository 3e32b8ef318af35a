"""A procedural large part with small defects: a machined plate seen at native resolution.

The plate fills a 480 x 192 photo: vertical segments divided by thin grooves (a commutator's
look), brushed-metal grain along them, soft shading from the light, and the jitter a real
station sees (a few pixels of shift, brightness, contrast, sensor noise). About a third are
defective, and every defect is small against the photo: a hair-thin crack a few dozen pixels
long, a pit, a short bright scratch or a chipped groove edge, under 0.5 % of its pixels. Shrunk
to a 36 x 26 model input, a crack is a tenth of a pixel wide: only native resolution or tiles
can see it.

Byte-identical output for the same seed: every part draws from its own generator seeded by
(seed, part index).
"""

from __future__ import annotations

import cv2
import numpy as np

from station.core.imagefolder import GOOD

SURFACE_DEFECT_CLASSES = ("crack", "pit", "scratch", "chip")
DEFECT_FRACTION = 1.0 / 3.0
PLATE_WIDTH, PLATE_HEIGHT = 480, 192
SEGMENTS = 12
METAL_LEVEL = 150.0
GROOVE_LEVEL = 60.0


def surface_class(seed: int, index: int) -> str:
    rng = np.random.default_rng([seed, index, 10])
    if rng.random() < DEFECT_FRACTION:
        return SURFACE_DEFECT_CLASSES[int(rng.integers(len(SURFACE_DEFECT_CLASSES)))]
    return GOOD


def _plate(rng: np.random.Generator) -> np.ndarray:
    """Segments, grooves, grain and shading, shifted by up to 3 px."""
    shift_x, shift_y = rng.uniform(-3, 3, size=2)
    xs = np.arange(PLATE_WIDTH, dtype=np.float32)[None, :] + shift_x
    ys = np.arange(PLATE_HEIGHT, dtype=np.float32)[:, None] + shift_y
    pitch = PLATE_WIDTH / SEGMENTS
    in_groove = np.abs(((xs + pitch / 2) % pitch) - pitch / 2) < 1.5
    shading = 18.0 * np.cos(np.pi * (ys / PLATE_HEIGHT - 0.5)) + 6.0 * np.sin(2 * np.pi * xs / PLATE_WIDTH)
    grain = cv2.GaussianBlur(
        rng.normal(0.0, 6.0, (PLATE_HEIGHT, PLATE_WIDTH)).astype(np.float32), (1, 0), sigmaX=0.6, sigmaY=6.0
    )
    plate = np.where(in_groove, GROOVE_LEVEL, METAL_LEVEL + shading) + grain
    return plate.astype(np.float32)


def _draw_defect(plate: np.ndarray, defect: str, rng: np.random.Generator):
    x, y = rng.uniform(30, PLATE_WIDTH - 30), rng.uniform(25, PLATE_HEIGHT - 25)
    if defect == "crack":  # a dark hairline wandering mostly along the segment
        steps = rng.normal(0.0, 1.0, (8, 2)) * [1.2, 1.0] + [0.0, rng.choice([-1, 1]) * rng.uniform(3, 5)]
        points = np.vstack([[x, y], [x, y] + np.cumsum(steps, axis=0)]).round().astype(np.int32)
        cv2.polylines(plate, [points], False, float(METAL_LEVEL - rng.uniform(55, 80)), 1, cv2.LINE_AA)
    elif defect == "pit":
        cv2.circle(plate, (int(x), int(y)), int(rng.integers(1, 3)), float(rng.uniform(50, 80)), -1, cv2.LINE_AA)
    elif defect == "scratch":  # short and bright, across the grain
        angle = rng.uniform(-0.5, 0.5)
        length = rng.uniform(14, 24)
        end = (int(x + length * np.cos(angle)), int(y + length * np.sin(angle)))
        cv2.line(plate, (int(x), int(y)), end, float(METAL_LEVEL + rng.uniform(50, 80)), 1, cv2.LINE_AA)
    elif defect == "chip":  # a notch broken out of a groove's edge
        pitch = PLATE_WIDTH / SEGMENTS
        gx = int(round(x / pitch) * pitch)
        notch = np.array([[gx, y - 3], [gx + rng.choice([-1, 1]) * rng.uniform(3, 5), y], [gx, y + 3]], np.int32)
        cv2.fillPoly(plate, [notch], GROOVE_LEVEL, cv2.LINE_AA)


def render_surface(seed: int, index: int, defect_class: str | None = None) -> tuple[str, np.ndarray]:
    """(class, grey uint8 photo of PLATE_HEIGHT x PLATE_WIDTH) of part ``index``; same inputs, same pixels."""
    defect = surface_class(seed, index) if defect_class is None else defect_class
    plate = _plate(np.random.default_rng([seed, index, 11]))
    if defect != GOOD:
        _draw_defect(plate, defect, np.random.default_rng([seed, index, 12]))
    light = np.random.default_rng([seed, index, 13])
    image = (plate - 128.0) * light.uniform(0.92, 1.08) + 128.0 * light.uniform(0.92, 1.08)
    image += light.normal(0.0, 2.5, image.shape)
    return defect, np.clip(np.round(image), 0, 255).astype(np.uint8)
