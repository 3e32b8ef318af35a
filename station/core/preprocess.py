"""The one and only preprocessing, shared by training, export checks,
calibration, evaluation and the daemon.

frame -> ROI crop -> grayscale -> resize (INTER_AREA) -> float32 * pixel_scale -> layout

Keeping this in one place is the point: a model judged on pixels prepared
differently from the ones it was trained on fails quietly (anomalib's lesson).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from station.core.errors import DataError, RoiError

LAYOUTS = ("flat", "nchw")
# The most a region may be enlarged, per side, to the model's input. Beyond 4x, fewer than one in 16 of
# the model's pixels is a camera pixel and the rest is interpolation: the model measures blur, not the
# part, and its distances call every such part NG (a 1-pixel frame becomes a uniform crop).
MAX_ENLARGEMENT = 4


@dataclass(frozen=True)
class Roi:
    """Region of interest in frame pixels: top-left corner and size."""

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self):
        if min(self.x, self.y) < 0 or min(self.width, self.height) < 1:
            raise RoiError(f"ROI {self} must have x, y >= 0 and width, height >= 1")


@dataclass(frozen=True)
class InputSpec:
    """What the model expects; read from the model's metadata, never hard-coded."""

    width: int = 36
    height: int = 26
    layout: str = "flat"
    pixel_scale: float = 1.0 / 255.0

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise DataError(f"input layout {self.layout!r} is not one of {LAYOUTS}")
        if self.width < 1 or self.height < 1:
            raise DataError(f"input size {self.width}x{self.height} must be positive")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed sample, without the batch axis."""
        if self.layout == "flat":
            return (self.width * self.height,)
        return (1, self.height, self.width)


def roi_problem(roi: Roi | None, frame_shape: tuple) -> str | None:
    """Why the ROI cannot be cut from frames of this shape (height, width, ...); None when it can."""
    height, width = frame_shape[:2]
    if roi is None or (roi.x + roi.width <= width and roi.y + roi.height <= height):
        return None
    return f"ROI x={roi.x} y={roi.y} {roi.width}x{roi.height} does not fit in a {width}x{height} frame"


def size_problem(what: str, width: int, height: int, spec: "InputSpec") -> str | None:
    """Why a region of width x height pixels is too small to be judged by this model; None when it is not."""
    least_width, least_height = (math.ceil(side / MAX_ENLARGEMENT) for side in (spec.width, spec.height))
    if width >= least_width and height >= least_height:
        return None
    return (
        f"{what} of {width}x{height} pixels is too small for the model's {spec.width}x{spec.height} input: "
        f"a region needs at least {least_width}x{least_height} (enlarged more than {MAX_ENLARGEMENT}x a side, "
        "the model would judge interpolated pixels, not the part)"
    )


def region_problem(roi: Roi | None, frame_shape: tuple | None, spec: "InputSpec") -> str | None:
    """Why this region cannot be judged in frames of this shape (outside, or too few pixels); None when it can.
    roi None: the whole frame. Without a frame shape only a configured ROI's own size is checked."""
    if roi is None:
        return (
            None
            if frame_shape is None
            else size_problem("the whole frame (no roi is set)", frame_shape[1], frame_shape[0], spec)
        )
    outside = roi_problem(roi, frame_shape) if frame_shape is not None else None
    return outside or size_problem(f"ROI x={roi.x} y={roi.y}", roi.width, roi.height, spec)


def regions_problem(
    regions: Sequence[tuple[str | None, Roi | None]], frame_shape: tuple | None, spec: "InputSpec"
) -> str | None:
    """The one rule for what a frame must give the model: every (name, roi) region inside it and large
    enough (roi None: the whole frame; name None: the single roi). Used at check, at start, per frame."""
    problems = [
        f"region {name}: {problem}" if name else problem
        for name, roi in regions
        if (problem := region_problem(roi, frame_shape, spec))
    ]
    return "; ".join(problems) or None


def crop(frame: np.ndarray, roi: Roi | None) -> np.ndarray:
    """Cut the ROI out of a frame (a view, no copy); None means the whole frame."""
    if frame.ndim not in (2, 3) or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise DataError(f"frame of shape {frame.shape} is not an image")
    if roi is None:
        return frame
    problem = roi_problem(roi, frame.shape)
    if problem:
        raise RoiError(problem)
    return frame[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width]


def to_gray8(image: np.ndarray) -> np.ndarray:
    """Gray uint8 from gray, BGR or BGRA images of 8 or 16 bits."""
    if image.dtype == np.uint16:
        # 16-bit sensors: keep the top byte so pixel_scale means the same thing.
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DataError(f"image pixels of type {image.dtype} are not supported (uint8 or uint16)")
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels == 1:
        return image[:, :, 0]
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    raise DataError(f"image with {channels} channels is not supported (1, 3 or 4)")


def prepare_crop(frame: np.ndarray, spec: InputSpec, roi: Roi | None = None) -> np.ndarray:
    """Crop, gray and resize one frame: uint8 array of the model's height x width."""
    # Crop first, so a colour frame is converted only where the part is.
    gray = to_gray8(crop(frame, roi))
    if gray.shape != (spec.height, spec.width):
        gray = cv2.resize(gray, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
    return gray


def to_model_input(crops: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Stacked uint8 crops (n, height, width) -> float32 batch in the model's layout."""
    batch = crops.astype(np.float32) * np.float32(spec.pixel_scale)
    return batch.reshape((len(crops),) + spec.sample_shape)


# -- where a model-input pixel came from ------------------------------------------------------


@dataclass(frozen=True)
class FeatureGrid:
    """A per-position model's map: rows x cols cells of `channels` each, one cell per `stride` model-input pixels.

    Read from the model's metadata (station/core/embedder.py: `positions`, `position_channels`,
    `position_stride`, `position_offset`); the embedding is the map row-major, positions then channels.
    Cell (row, col) stands for the stride x stride block of model-input pixels starting at
    (col * stride + offset, row * stride + offset): where a small blob moves that cell most
    (the model's exporter measures it; -stride/2 for the pretrained backbone, export/positions.py).
    """

    rows: int
    cols: int
    channels: int
    stride: int
    offset: int = 0

    def __post_init__(self):
        if min(self.rows, self.cols, self.channels, self.stride) < 1:
            raise DataError(
                f"feature grid {self.rows}x{self.cols}x{self.channels}, stride {self.stride}: "
                "every size must be at least 1"
            )

    @property
    def positions(self) -> int:
        return self.rows * self.cols

    @property
    def size(self) -> int:
        return self.positions * self.channels

    def box_around(self, row: float, col: float, spec: InputSpec, cells: float = 1.5) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in model-input pixels: a box `cells` strides wide centred where the map says
        (fractional row and column: scoring.locate_worst), rounded outwards and clipped to the input."""
        half = cells * self.stride / 2.0
        cx = col * self.stride + self.offset + self.stride / 2.0
        cy = row * self.stride + self.offset + self.stride / 2.0
        x0, y0 = max(math.floor(cx - half), 0), max(math.floor(cy - half), 0)
        x1, y1 = min(math.ceil(cx + half), spec.width), min(math.ceil(cy + half), spec.height)
        x0, y0 = min(x0, spec.width - 1), min(y0, spec.height - 1)
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def box_in_frame(
    box: tuple[int, int, int, int], spec: InputSpec, roi: Roi | None, frame_shape: tuple
) -> tuple[int, int, int, int]:
    """A box of model-input pixels (x0, y0, x1, y1) -> (x, y, width, height) in frame pixels.

    The inverse of prepare_crop: the crop is the ROI (the whole frame without one) resized to the
    model's input, model pixel j covering ROI pixels [j * roi/input, (j + 1) * roi/input)
    (INTER_AREA's pixel-edge convention); the box is rounded outwards, so it always holds its cells.
    """
    if roi is None:
        roi = Roi(0, 0, int(frame_shape[1]), int(frame_shape[0]))
    sx, sy = roi.width / spec.width, roi.height / spec.height
    x0, y0, x1, y1 = box
    left, top = math.floor(x0 * sx + 1e-9), math.floor(y0 * sy + 1e-9)
    right, bottom = math.ceil(x1 * sx - 1e-9), math.ceil(y1 * sy - 1e-9)
    return roi.x + left, roi.y + top, max(right - left, 1), max(bottom - top, 1)
