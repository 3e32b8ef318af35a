"""GigE Vision and USB3 Vision cameras through Aravis (camera.source: genicam://DEVICE).

DEVICE is what Aravis opens: a device id as `arv-tool-0.8` lists it
(Vendor-Model-Serial) or an IP address. On every connect the camera gets the
station's settings (genicam_config.py): exposure, gain, pixel format, frame
rate and its trigger:

    free run      trigger continuous or presence: the camera streams
    hardware      trigger: hardware: TriggerMode On, TriggerSource from the config; each frame is a part
    software      trigger: mqtt: TriggerSource Software, fired by software_trigger() per trigger command

Frames come from a small pool of buffers that go back to the stream as soon
as the pixels are copied out. Lost packets and incomplete frames are counted
(counters()). When the camera goes away (control lost, or no frame in free
run) the source reconnects with backoff and applies the settings again.

Aravis is imported only here, and only when a genicam:// source is opened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import numpy as np

from station.core.backoff import Backoff
from station.core.errors import MissingExtraError
from station.runtime.sources.base import STALL_TIMEOUT, Frame, FrameSource
from station.runtime.sources.genicam_config import GenicamConfig
from station.runtime.sources.kinds import parse_genicam_source

log = logging.getLogger(__name__)

FREE, HARDWARE, SOFTWARE = "free", "hardware", "software"
POP_WAIT_US = 200_000  # a pop waits at most this long, so close() and a lost camera are noticed
INSTALL = (
    "apt-get install gir1.2-aravis-0.8 libgirepository1.0-dev libcairo2-dev pkg-config, "
    "then pip install '.[genicam]' (PyGObject) in the station's environment"
)
# GenICam Bayer names the top-left 2x2 cell; OpenCV names the cell one down and right of it.
BAYER_TO_GREY = {
    "BayerRG8": "COLOR_BayerBG2GRAY",
    "BayerGR8": "COLOR_BayerGB2GRAY",
    "BayerGB8": "COLOR_BayerGR2GRAY",
    "BayerBG8": "COLOR_BayerRG2GRAY",
}


class SettingError(Exception):
    """The camera refused a configured setting (out of its range, a feature it lacks)."""


def aravis():
    """(Aravis, GLib) from PyGObject; MissingExtraError naming what to install when absent."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis, GLib
    except (ImportError, ValueError) as exc:  # no PyGObject, or no Aravis typelib (ValueError from require_version)
        raise MissingExtraError(
            f"GenICam cameras (genicam://) need Aravis 0.8 through PyGObject ({exc}): {INSTALL}"
        ) from None
    return Aravis, GLib


def trigger_mode(trigger: str | None) -> str:
    """The camera's trigger for the station's `trigger:`."""
    return {"hardware": HARDWARE, "mqtt": SOFTWARE}.get(trigger or "", FREE)


class GenicamSource(FrameSource):
    """A GenICam camera: frames in free run or on the camera's trigger, reconnecting when lost."""

    def __init__(
        self,
        source: str,
        settings: GenicamConfig | None = None,
        trigger: str | None = None,
        fps: float = 0.0,
        stall_timeout: float = STALL_TIMEOUT,
        backoff: Backoff | None = None,
    ):
        super().__init__(source, fps)
        self.device = parse_genicam_source(source)
        self.settings = settings or GenicamConfig()
        self.mode = trigger_mode(trigger)
        self.stall_timeout = stall_timeout
        self.backoff = backoff or Backoff(first=0.5, ceiling=30.0)
        self.Aravis, self.GLib = aravis()
        self.camera_name: str | None = None  # vendor, model, serial: known once connected
        self.applied: list[str] = []  # what the last connect set, for logs and `station check`
        self.last_error: str | None = None  # why the last connect failed (None once connected)
        self.trigger_sources: list[str] = []  # what the camera offers as TriggerSource
        self.lost_packets = self.incomplete_frames = self.parts = 0
        self._camera = None
        self._stream_lost_packets = 0  # of the current stream (its figures start at 0 on each connect)
        self._control_lost = threading.Event()
        self._camera_lock = threading.Lock()  # the trigger (daemon thread) against connect/disconnect

    # -- the loop

    def _frames(self) -> Iterator[Frame]:
        lost_before = False
        while not self.closed:
            try:
                camera, stream = self._connect()
            except SettingError as exc:
                lost_before = self._lost(f"camera {self.description}: {exc}", level=logging.ERROR)
                continue
            except self.GLib.Error as exc:
                lost_before = self._lost(f"cannot open camera {self.description}: {exc.message}")
                continue
            self._back(lost_before)
            lost_before, self.last_error = False, None
            try:
                outcome = yield from self._read(stream)
            finally:  # also when the consumer stops iterating
                self._disconnect(camera, stream)
            if outcome == "lost":
                lost_before = self._lost(f"camera {self.description} lost")

    def _lost(self, why: str, level: int = logging.WARNING) -> bool:
        self.last_error = why
        return super()._lost(why, level)

    def _read(self, stream) -> Iterator[Frame]:
        """Frames until the camera is lost ("lost") or the source is closed ("closed")."""
        success = self.Aravis.BufferStatus.SUCCESS
        waited = 0.0
        while not self.closed:
            if self._control_lost.is_set():
                log.warning("camera %s: control lost (no answer to the heartbeat)", self.description)
                return "lost"
            buffer = stream.timeout_pop_buffer(POP_WAIT_US)
            if buffer is None:
                waited += POP_WAIT_US / 1e6
                # A triggered camera may wait for parts for hours: only its heartbeat says it is gone.
                if self.mode == FREE and waited >= self.stall_timeout:
                    log.warning("no frame from %s for %.1f s", self.description, waited)
                    return "lost"
                continue
            grabbed_at, waited = time.monotonic(), 0.0
            status = buffer.get_status()
            image = self._image(buffer) if status == success else None
            camera_ts, frame_id = buffer.get_timestamp(), buffer.get_frame_id()
            stream.push_buffer(buffer)  # back to the pool before anything else: the pixels are copied out
            self._count_lost_packets(stream)
            if image is None:
                self.incomplete_frames += 1
                log.debug("camera %s: frame %d incomplete (%s)", self.description, frame_id, status.value_nick)
                continue
            self.backoff.reset()
            if not self._pace():
                break
            part_id = None
            if self.mode == HARDWARE:  # each frame is a part, numbered from 1 since start
                self.parts += 1
                part_id = str(self.parts)
            yield Frame(
                image,
                f"{self.description}#{frame_id}",
                next(self._count),
                grabbed_at,
                camera_ts=camera_ts or None,
                part_id=part_id,
            )
        return "closed"

    def _image(self, buffer) -> np.ndarray:
        """A grey 8-bit copy of the buffer's pixels (Bayer converted)."""
        height, width = buffer.get_image_height(), buffer.get_image_width()
        data = buffer.get_image_data()  # bytes: already a copy
        image = np.frombuffer(data, np.uint8, count=height * width).reshape(height, width)
        conversion = BAYER_TO_GREY.get(self.settings.pixel_format)
        if conversion is None:
            return image.copy()  # writable, and independent of `data`
        import cv2

        return cv2.cvtColor(image, getattr(cv2, conversion))

    def _count_lost_packets(self, stream):
        if not isinstance(stream, self.Aravis.GvStream):  # a USB3 Vision stream counts no packets: asking
            return  # for n_missing_packets there logs a GLib CRITICAL for every frame
        missing = stream.get_info_uint64_by_name("n_missing_packets")
        self.lost_packets += missing - self._stream_lost_packets
        self._stream_lost_packets = missing

    # -- connect

    def _connect(self):
        Aravis = self.Aravis
        camera = Aravis.Camera.new(self.device)  # GLib.Error when no such camera answers
        self._control_lost.clear()
        camera.get_device().connect("control-lost", lambda *_: self._control_lost.set())
        self.camera_name = describe(camera)
        self.trigger_sources = available_trigger_sources(camera)
        self.applied = apply_settings(camera, self.settings, self.mode)
        camera.set_acquisition_mode(Aravis.AcquisitionMode.CONTINUOUS)
        stream = camera.create_stream(None, None)
        if stream is None:
            raise SettingError("the camera gives no stream")
        payload = camera.get_payload()
        for _ in range(self.settings.buffers):
            stream.push_buffer(Aravis.Buffer.new_allocate(payload))
        self._stream_lost_packets = 0
        camera.start_acquisition()
        with self._camera_lock:
            self._camera = camera
        log.info("camera %s: %s; %s", self.description, self.camera_name, ", ".join(self.applied))
        return camera, stream

    def _disconnect(self, camera, stream):
        with self._camera_lock:
            self._camera = None
        try:
            camera.stop_acquisition()
        except self.GLib.Error as exc:  # a camera that is gone cannot be stopped: nothing is lost
            log.debug("camera %s: stop: %s", self.description, exc.message)
        self._count_lost_packets(stream)

    # -- for the daemon

    @property
    def waits_for_trigger(self) -> bool:
        """Frames come only on the camera's trigger: nothing to wait for at start."""
        return self.mode != FREE

    @property
    def every_frame_is_a_part(self) -> bool:
        """trigger: hardware: every frame is judged (lossless); in free run only the freshest matter."""
        return self.mode == HARDWARE

    def software_trigger(self) -> str | None:
        """trigger: mqtt: the camera takes a frame now; the error text, or None when fired."""
        with self._camera_lock:
            camera = self._camera
            if camera is None:
                return f"camera {self.description} is not connected ({self.state})"
            try:
                camera.software_trigger()
            except self.GLib.Error as exc:
                return f"camera {self.description}: TriggerSoftware failed: {exc.message}"
        return None

    def trigger_problem(self, trigger: str | None) -> str | None:
        """For `station check`, which grabs in free run: would the camera take the station's trigger?"""
        wanted = {HARDWARE: self.settings.trigger_source, SOFTWARE: "Software"}.get(trigger_mode(trigger))
        if wanted is None or wanted in self.trigger_sources:
            return None
        return f"trigger source {wanted} is not offered (the camera has {', '.join(self.trigger_sources) or 'none'})"

    def counters(self) -> dict:
        return {"camera_lost_packets": self.lost_packets, "camera_incomplete_frames": self.incomplete_frames}


def describe(camera) -> str:
    """'Aravis Fake, serial GV01': vendor, model and serial number as the camera reports them."""
    serial, device_id = camera.get_device_serial_number(), camera.get_device_id()
    extra = f", id {device_id}" if device_id and device_id != serial else ""
    return f"{camera.get_vendor_name()} {camera.get_model_name()}, serial {serial}{extra}"


def apply_settings(camera, settings: GenicamConfig, mode: str) -> list[str]:
    """Set the camera as configured; what was set, one phrase each. SettingError names what the camera refused."""
    applied = []
    formats = camera.dup_available_pixel_formats_as_strings()
    if settings.pixel_format not in formats:
        raise SettingError(f"pixel_format {settings.pixel_format} is not offered (the camera has {', '.join(formats)})")
    camera.set_pixel_format_from_string(settings.pixel_format)
    applied.append(settings.pixel_format)
    if settings.packet_size is not None and camera.is_gv_device():
        camera.gv_set_packet_size(settings.packet_size)
        applied.append(f"packet size {settings.packet_size}")
    if settings.exposure_us is not None:
        _within("exposure_us", settings.exposure_us, camera.get_exposure_time_bounds())
        camera.set_exposure_time(settings.exposure_us)
        applied.append(f"exposure {camera.get_exposure_time():g} us")
    if settings.gain is not None:
        applied.append(_set_gain(camera, settings.gain))
    if mode == FREE:
        camera.clear_triggers()  # a camera left triggered by another program would never stream
        if settings.frame_rate is not None:
            _within("frame_rate", settings.frame_rate, camera.get_frame_rate_bounds())
            camera.set_frame_rate(settings.frame_rate)
            applied.append(f"{camera.get_frame_rate():g} frames/s")
        applied.append("free run")
    else:
        source = "Software" if mode == SOFTWARE else settings.trigger_source
        sources = available_trigger_sources(camera)
        if source not in sources:
            raise SettingError(
                f"trigger source {source} is not offered (the camera has {', '.join(sources) or 'none'})"
            )
        camera.set_trigger(source)  # FrameStart: TriggerMode On from this source; other selectors Off
        applied.append(f"trigger {source}")
    return applied


def available_trigger_sources(camera) -> list[str]:
    """What the camera offers as TriggerSource; none for a camera without triggers."""
    from gi.repository import GLib  # loaded already: there is a camera

    try:
        return list(camera.dup_available_trigger_sources() or [])
    except GLib.Error:
        return []


def _set_gain(camera, gain: float) -> str:
    """Gain in dB where the camera has Gain (SFNC), raw GainRaw steps otherwise (older GigE cameras)."""
    if camera.is_feature_available("Gain"):
        _within("gain", gain, camera.get_float_bounds("Gain"), "dB (Gain)")
        camera.set_float("Gain", gain)
        return f"gain {camera.get_float('Gain'):g} dB"
    if camera.is_feature_available("GainRaw"):
        _within("gain", gain, camera.get_integer_bounds("GainRaw"), "(GainRaw)")
        camera.set_integer("GainRaw", round(gain))
        return f"gain {camera.get_integer('GainRaw')} raw"
    raise SettingError("gain is set but the camera has neither Gain nor GainRaw")


def _within(key: str, value: float, bounds, unit: str = ""):
    low, high = bounds
    if not low <= value <= high:
        raise SettingError(f"{key} {value:g} is outside the camera's range {low:g} to {high:g} {unit}".rstrip())
