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
    return (f"{what} of {width}x{height} pixels is too small for the model's {spec.width}x{spec.height} input: "
            f"a region needs at least {least_width}x{least_height} (enlarged more than {MAX_ENLARGEMENT}x a side, "
            "the model would judge interpolated pixels, not the part)")


def region_problem(roi: Roi | None, frame_shape: tuple | None, spec: "InputSpec") -> str | None:
    """Why this region cannot be judged in frames of this shape (outside, or too few pixels); None when it can.
    roi None: the whole frame. Without a frame shape only a configured ROI's own size is checked."""
    if roi is None:
        return None if frame_shape is None else size_problem(
            "the whole frame (no roi is set)", frame_shape[1], frame_shape[0], spec)
    outside = roi_problem(roi, frame_shape) if frame_shape is not None else None
    return outside or size_problem(f"ROI x={roi.x} y={roi.y}", roi.width, roi.height, spec)


def regions_problem(regions: Sequence[tuple[str | None, Roi | None]], frame_shape: tuple | None,
                    spec: "InputSpec") -> str | None:
    """The one rule for what a frame must give the model: every (name, roi) region inside it and large
    enough (roi None: the whole frame; name None: the single roi). Used at check, at start, per frame."""
    problems = [f"region {name}: {problem}" if name else problem
                for name, roi in regions if (problem := region_problem(roi, frame_shape, spec))]
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


def preprocess(frames, spec: InputSpec, roi: Roi | None = None) -> np.ndarray:
    """Frames (any size, gray or colour) -> float32 model batch of len(frames)."""
    crops = np.empty((len(frames), spec.height, spec.width), dtype=np.uint8)
    for i, frame in enumerate(frames):
        crops[i] = prepare_crop(frame, spec, roi)
    return to_model_input(crops, spec)
