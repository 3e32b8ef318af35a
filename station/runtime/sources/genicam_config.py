"""`camera.genicam:` in station.yaml: what a GenICam camera (camera.source: genicam://DEVICE) is set to on connect.

    camera:
      source: genicam://Basler-210ab4     # or genicam://192.168.10.20
      genicam: {exposure_us: 4000, gain: 6, pixel_format: BayerRG8, trigger_source: Line1}

Pure settings (no Aravis here): config/station.py parses them, genicam.py applies them
on every connect, so a camera that was power-cycled comes back as configured.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo

from station.core.config_model import ConfigModel
from station.runtime.sources.kinds import GENICAM, source_kind

# Mono8 as it comes; Bayer mosaics are converted to grey (the model judges grey levels).
PIXEL_FORMATS = ("Mono8", "BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8")
# Triggers a camera takes frames on: trigger: hardware (the camera's TriggerSource) and
# trigger: mqtt with a GenICam camera (TriggerSoftware for each trigger command).
CAMERA_TRIGGERS = ("hardware",)


class GenicamConfig(ConfigModel):
    exposure_us: float | None = Field(None, gt=0)  # ExposureTime(Abs), microseconds; None: the camera's own
    gain: float | None = Field(None, ge=0)  # dB where the camera has Gain, GainRaw steps otherwise
    pixel_format: Literal[PIXEL_FORMATS] = "Mono8"
    frame_rate: float | None = Field(None, gt=0)  # AcquisitionFrameRate in free run; None: the camera's own
    trigger_source: str = Field("Line0", pattern=r"^[A-Za-z0-9_]+$")  # trigger: hardware (Line0, Line1, Software...)
    buffers: int = Field(4, ge=2, le=64)  # the stream's buffer pool, each one frame's payload
    packet_size: int | None = Field(None, ge=576, le=16000)  # GigE Vision only; None: negotiated on connect


def _only_for_genicam(value: GenicamConfig | None, info: ValidationInfo) -> GenicamConfig | None:
    source = info.data.get("source")
    if value is not None and source is not None and source_kind(source) != GENICAM:
        raise ValueError("GenICam settings apply to a genicam://DEVICE source only")
    return value


def _camera_trigger_needs_genicam(value: str, info: ValidationInfo) -> str:
    camera = info.data.get("camera")
    if value in CAMERA_TRIGGERS and camera is not None and source_kind(camera.source) != GENICAM:
        raise ValueError(f"{value} is the camera's own trigger: it needs a camera.source genicam://DEVICE")
    return value


GenicamField = Annotated[GenicamConfig | None, AfterValidator(_only_for_genicam)]
Trigger = Annotated[
    Literal["continuous", "mqtt", "presence", "hardware"], AfterValidator(_camera_trigger_needs_genicam)
]
