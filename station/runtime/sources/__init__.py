"""Camera sources behind one interface: iterate a FrameSource, get Frames.

    source = open_source("sim://?seed=3&count=100", loop=False, fps=10)
    for frame in source:          # ends for finite sources, never raises for live ones
        ...
    source.state                  # "ok" | "reconnecting" | "ended"

One module per kind: folder.py (image folders), simulated.py (sim://),
capture.py (V4L2 devices, RTSP/HTTP streams, video files), genicam.py
(GigE Vision / USB3 Vision through Aravis, imported only when used); kinds.py
says which kind a configured `camera.source` is.
"""

from __future__ import annotations

from pathlib import Path

from station.core.errors import DataError
from station.runtime.sources.base import ENDED, OK, RECONNECTING, Frame, FrameSource
from station.runtime.sources.capture import CaptureSource
from station.runtime.sources.folder import FolderSource
from station.runtime.sources.kinds import (
    DEVICE,
    FILE,
    FOLDER,
    GENICAM,
    SIM,
    URL,
    is_stored_media,
    parse_sim_source,
    source_kind,
    with_credentials,
)
from station.runtime.sources.simulated import SimSource

__all__ = [
    "ENDED",
    "OK",
    "RECONNECTING",
    "CaptureSource",
    "FolderSource",
    "Frame",
    "FrameSource",
    "SimSource",
    "is_finite",
    "is_lossless",
    "open_source",
]


def open_source(
    source: int | str | Path,
    loop: bool = False,
    fps: float = 0.0,
    *,
    max_pixels: int | None = None,
    credentials: tuple[str, str] | None = None,
    genicam=None,
    trigger: str | None = None,
) -> FrameSource:
    """The source for a configured `camera.source`; `credentials` (user, password) for network cameras;
    `genicam` (camera.genicam settings) and `trigger` (the station's trigger) for genicam:// cameras."""
    try:
        kind = source_kind(source)
        if kind == SIM:
            seed, count = parse_sim_source(str(source))
            return SimSource(seed, count, loop, fps)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if kind == GENICAM:
        from station.runtime.sources.genicam import GenicamSource  # imports Aravis (gi): only for these cameras

        return GenicamSource(str(source), genicam, trigger, fps)
    if kind == DEVICE:
        return CaptureSource(int(source) if str(source).isdigit() else str(source), DEVICE, fps=fps)
    if kind == URL:
        return CaptureSource(with_credentials(str(source), credentials), URL, fps=fps)
    if kind == FOLDER:
        return FolderSource(Path(source), loop, fps, max_pixels)
    return CaptureSource(str(source), FILE, loop, fps)


def is_finite(source: FrameSource) -> bool:
    """Files, folders and counted sim sources end; cameras and streams do not."""
    if isinstance(source, FolderSource):
        return not source.loop
    if isinstance(source, SimSource):
        return source.count is not None and not source.loop
    return isinstance(source, CaptureSource) and source.kind == FILE and not source.loop


def is_lossless(source: FrameSource) -> bool:
    """Every frame matters (stored media, a camera's own trigger); live cameras only need the freshest."""
    if hasattr(source, "every_frame_is_a_part"):  # GenICam: triggered by the camera, or free run
        return source.every_frame_is_a_part
    return not isinstance(source, CaptureSource) or is_stored_media(source.kind)
