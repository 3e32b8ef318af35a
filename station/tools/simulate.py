"""`station simulate`: writes the simulated line (station.core.simulated_line)
as an image-folder dataset, an MJPG video with its ground truth, or a contact sheet."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from station.core.imagefolder import GOOD
from station.core.simulated_surface import render_surface
from station.core.simulated_line import (
    CROP_HEIGHT,
    CROP_WIDTH,
    DEFECT_CLASSES,
    FRAME_HEIGHT,
    FRAME_WIDTH,
    render_frame,
    render_part,
)


def write_dataset(out: Path, count: int, seed: int, pins: int = 3) -> dict[str, int]:
    """Write ``count`` parts as an image-folder dataset; returns parts per class."""
    parts = (render_part(seed, index, pins) for index in range(count))
    return _write_image_folder(out, ((p.defect_class, f"part_{p.index:06d}.png", p.crop) for p in parts))


def write_plate_dataset(out: Path, count: int, seed: int) -> dict[str, int]:
    """Write ``count`` large plates with small defects (station.core.simulated_surface) as an image folder."""
    plates = ((index, *render_surface(seed, index)) for index in range(count))
    return _write_image_folder(out, ((defect, f"plate_{index:06d}.png", photo) for index, defect, photo in plates))


def _write_image_folder(out: Path, photos) -> dict[str, int]:
    """photos: (class, file name, image); returns photos per class."""
    out = Path(out)
    counts: dict[str, int] = {}
    for defect_class, name, image in photos:
        folder = out / defect_class
        folder.mkdir(parents=True, exist_ok=True)
        _write_png(folder / name, image)
        counts[defect_class] = counts.get(defect_class, 0) + 1
    return counts


def write_video(video: Path, truth_csv: Path, count: int, seed: int, pins: int = 3, fps: float = 25.0):
    """An MJPG video of full frames, one part per frame, and its ground truth CSV."""
    video = Path(video)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), fps, (FRAME_WIDTH, FRAME_HEIGHT))
    if not writer.isOpened():
        raise OSError(f"{video}: OpenCV cannot write an MJPG video here")
    try:
        with open(truth_csv, "w", newline="") as handle:
            table = csv.writer(handle)
            table.writerow(["frame", "label", "defect_class"])
            for index in range(count):
                part = render_part(seed, index, pins)
                writer.write(render_frame(part, seed))
                table.writerow([index, part.label, part.defect_class])
    finally:
        writer.release()


# A stop-and-go belt: each part slides in over SLIDE frames, stands still for the dwell,
# slides out over SLIDE frames, then GAP frames of empty belt before the next one.
SLIDE_STEP = 12  # pixels per frame while the belt moves
SLIDE = 6
GAP = 6


def dwell_frames(dwell: int) -> list[tuple[str, int]]:
    """(phase, x offset of the part) for one part's frames, then the empty gap (offset None as 0)."""
    entering = [("entering", -SLIDE_STEP * k) for k in range(SLIDE, 0, -1)]
    leaving = [("leaving", SLIDE_STEP * k) for k in range(1, SLIDE + 1)]
    centre = [("settled", 0)] * dwell if dwell else [("passing", 0)]  # 0: the belt never stops
    return entering + centre + leaving + [("empty", 0)] * GAP


def write_dwell_video(
    video: Path, truth_csv: Path, count: int, seed: int, dwell: int, pins: int = 3, fps: float = 25.0
):
    """An MJPG belt video where parts slide in, settle for `dwell` frames, slide out, with empty belt
    between; the CSV gives every frame's part, phase (empty/entering/settled/leaving, or passing for
    the one centred frame when dwell is 0: a belt that never stops) and truth."""
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), fps, (FRAME_WIDTH, FRAME_HEIGHT))
    if not writer.isOpened():
        raise OSError(f"{video}: OpenCV cannot write an MJPG video here")
    frame_no, travel = 0, 0
    try:
        with open(truth_csv, "w", newline="") as handle:
            table = csv.writer(handle)
            table.writerow(["frame", "part", "phase", "label", "defect_class"])
            for _ in range(GAP):  # the belt starts empty: the station learns it
                writer.write(render_frame(None, seed, index=0, frame_no=frame_no))
                table.writerow([frame_no, "", "empty", "", ""])
                frame_no += 1
            for index in range(count):
                part = render_part(seed, index, pins)
                for phase, offset in dwell_frames(dwell):
                    travel += SLIDE_STEP if phase in ("entering", "passing", "leaving") else 0
                    shown = None if phase == "empty" else part
                    writer.write(render_frame(shown, seed, index=0, x_offset=offset, travel=travel, frame_no=frame_no))
                    table.writerow(
                        [
                            frame_no,
                            "" if shown is None else index,
                            phase,
                            "" if shown is None else part.label,
                            "" if shown is None else part.defect_class,
                        ]
                    )
                    frame_no += 1
    finally:
        writer.release()


def _write_png(path: Path, image: np.ndarray):
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    path.write_bytes(encoded.tobytes())


def write_contact_sheet(path: Path, seed: int, pins: int = 3):
    _write_png(Path(path), contact_sheet(seed, pins=pins))


def contact_sheet(seed: int, per_class: int = 6, scale: int = 4, pins: int = 3) -> np.ndarray:
    """Rows of enlarged parts, one row per class (good first): docs/simulated_parts.png."""
    wanted = (GOOD,) + DEFECT_CLASSES
    found: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    index = 0
    while any(len(v) < per_class for v in found.values()):
        part = render_part(seed, index, pins)
        if len(found[part.defect_class]) < per_class:
            found[part.defect_class].append(part.crop)
        index += 1
    label_width, gap = 130, 4
    tile_w, tile_h = CROP_WIDTH * scale, CROP_HEIGHT * scale
    sheet = np.full(((tile_h + gap) * len(wanted) + gap, label_width + (tile_w + gap) * per_class), 255, np.uint8)
    for row, name in enumerate(wanted):
        y = gap + row * (tile_h + gap)
        cv2.putText(sheet, name, (6, y + tile_h // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1, cv2.LINE_AA)
        for col, crop in enumerate(found[name]):
            x = label_width + col * (tile_w + gap)
            sheet[y : y + tile_h, x : x + tile_w] = cv2.resize(crop, (tile_w, tile_h), interpolation=cv2.INTER_NEAREST)
    return sheet
