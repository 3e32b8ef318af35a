"""`station check`: is this configuration ready to run? Config, model, reference sets, files.

Returns every problem at once, each naming the file or key it concerns, so
plant IT can fix a station in one round instead of one error per restart.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from station.runtime.config.station import StationConfig
from station.core.errors import ModelError, StationError
from station.core.preprocess import InputSpec, regions_problem
from station.core.state_dir import state_dir_problem
from station.runtime.frame_feed import LatestFrame
from station.runtime.config.credentials import camera_credentials, read_password
from station.runtime.mqtt.publisher import tls_context
from station.runtime.sources import open_source
from station.runtime.sources.kinds import DEVICE, FILE, GENICAM, is_stored_media, source_kind

FRAME_WAIT = 5.0  # seconds to wait for a frame of a network stream
JUDGING_RUNS = 30  # timed judgements of one part for the judging-rate line


@dataclass(frozen=True)
class CheckResult:
    problems: list[str]
    summary: list[str]  # what was found good, one line each

    @property
    def ok(self) -> bool:
        return not self.problems


def check_station(config: StationConfig, env: dict[str, str] | None = None) -> CheckResult:
    from station.core import reference_set
    from station.core.embedder import Embedder
    from station.runtime.model_forms import form_of

    env = os.environ if env is None else env
    problems, summary = [], []
    embedder = None
    for form, model in config.model_paths.items():  # every form the bundle carries, each with its own references
        named = f"model.{form}" if form else "model"
        try:
            loaded_model = Embedder(model)
            info = loaded_model.info
            summary.append(
                f"{named} {model}: {info.arch}, {info.quantization}, {info.embedding_dim}-d, sha256 {info.short_id}"
            )
            if form and form_of(info.quantization) != form:
                raise ModelError(f"{model} is a {info.quantization} model, not the {form} form")
            embedder = embedder or loaded_model
        except StationError as exc:
            problems.append(f"{named}: {exc}")
            loaded_model = None
        for product, path in config.for_form(form).product_references.items():
            try:
                loaded = reference_set.load(path, model=loaded_model.info if loaded_model is not None else None)
                summary.append(
                    f"product {product}{f' ({form})' if form else ''}: {path} v{loaded.version:04d}, "
                    f"{loaded.metric} threshold {loaded.threshold:.6g}"
                )
            except StationError as exc:
                problems.append(f"product {product}{f' ({form})' if form else ''}: {exc}")
    problems += _file_problems(config, env)
    problem, line = _roi_against_a_frame(config, embedder.input_spec if embedder is not None else None)
    problems += [problem] if problem else []
    summary += [line] if line else []
    if not problems:
        try:
            summary += _judging_rate(config, embedder)
        except StationError as exc:
            problems.append(f"judging: {exc}")
    return CheckResult(problems, summary)


def _judging_rate(config: StationConfig, embedder) -> list[str]:
    """How long this machine takes to judge one part with this model and these regions.

    An integrator adding regions (each costs the model once) sees here, before the line runs, whether
    the station keeps up; the whole path, outbox and MQTT included, is `station bench`'s."""
    from station.runtime.inspector import load_inspector

    # With a model in several forms the station's own choice, timed here as at start (model_forms.py).
    inspector = load_inspector(config, embedder=None if isinstance(config.model, dict) else embedder)
    regions = max(len(inspector.regions), 1)
    spec = inspector.embedder.input_spec
    part = np.zeros((1, spec.height, spec.width * regions), np.uint8)  # every region's crop, side by side
    timings = []
    for _ in range(JUDGING_RUNS):
        start = time.perf_counter()
        inspector.judge_crops(part)
        timings.append(time.perf_counter() - start)
    per_part = statistics.median(timings)
    members = inspector.embedder.info.extra.get("members", "1")
    form = inspector.describe()["model_form"]
    chosen = [inspector.form.line()] if inspector.form else []
    model = f"{inspector.embedder.info.arch} x{members} {form}"
    rate = f"on this machine (~{1 / per_part:,.0f} parts/s before publishing; `station bench` times the whole path)"
    if config.tiles:  # a tiled part: every tile in one batch, what fit held to --max-ms-per-part
        from station.runtime.inspector import tile_geometry

        geometry = tile_geometry(config, inspector.reference_set, config.reference_for()[1])
        return chosen + [
            f"judging: {geometry.text()}, every tile of a part in one batch, with {model}: "
            f"{per_part * 1e3:.2f} ms a part, {per_part / regions * 1e3:.3f} ms a tile {rate}"
        ]
    per_region = f", {per_part / regions * 1e3:.3f} ms a region" if regions > 1 else ""
    return chosen + [
        f"judging: {regions} region(s) a part with {model}: {per_part * 1e3:.2f} ms a part{per_region} " + rate
    ]


def _file_problems(config: StationConfig, env) -> list[str]:
    """What `station run` checks before it opens the camera and the broker, by the same functions."""
    problems = []
    source = config.camera.source
    # Devices, URLs and sim:// are checked by the daemon (they come and go); a file or folder must exist.
    if source_kind(source) == FILE and not Path(source).exists():
        problems.append(f"camera.source: {source} does not exist (a video file or an image folder)")
    for validate in (
        lambda: read_password(config.mqtt, env),
        lambda: tls_context(config.mqtt),
        lambda: camera_credentials(config.camera, env),
    ):
        try:
            validate()
        except StationError as exc:
            problems.append(str(exc))
    problems.append(state_dir_problem(config.state_dir))
    if config.opcua is not None:
        from station.runtime.integrations.opcua_server import opcua_problems

        problems += opcua_problems(config.opcua)
    return [problem for problem in problems if problem]


def _roi_against_a_frame(config: StationConfig, spec: InputSpec | None) -> tuple[str | None, str]:
    """(problem, summary line): the ROI against one frame, where reading one disturbs nobody; stored media
    (files, folders) that give no frame is a problem, said with why. With the model's input (spec), the
    regions (or the whole frame) must be large enough for it, by the rule `run` judges by.

    Files, folders, sim:// and network streams can be read beside a running
    station; a V4L2 device streams to one process, so it is left to `run`.
    A GenICam camera is connected with the configured settings, in free run
    for one frame, and named; its trigger source is checked against the camera's.
    """
    regions = (
        [(r.name, r.to_roi()) for r in config.rois] if config.rois else [(None, config.roi and config.roi.to_roi())]
    )
    kind = source_kind(config.camera.source)
    if kind == FILE and not Path(config.camera.source).exists():
        return None, ""  # reported as a camera.source problem
    if kind == DEVICE:
        problem = spec and regions_problem(regions, None, spec)
        return (f"roi: {problem}" if problem else None), (
            "roi: not checked against a frame (a V4L2 device streams to one process; `run` checks it at start)"
        )
    try:
        source = open_source(
            config.camera.source,
            max_pixels=config.camera.max_pixels,
            credentials=camera_credentials(config.camera),
            genicam=config.camera.genicam,
        )
    except StationError as exc:  # GenICam without Aravis installed; the rest is reported among the file problems
        return (f"camera.source: {exc}" if kind == GENICAM else None), ""
    try:
        frame = next(iter(_first_frames(source)), None)
    except StationError as exc:
        return f"camera.source: {exc}", ""
    finally:
        source.close()
    if frame is None and getattr(source, "last_error", None):  # GenICam: no camera, or a setting it refused
        return f"camera.source: {source.last_error}", ""
    trigger = source.trigger_problem(config.trigger) if kind == GENICAM else None
    if trigger:
        return f"camera.genicam.trigger_source: {trigger}", ""
    if frame is None and is_stored_media(kind):
        return f"camera.source: cannot read a frame: {source.problem or f'no frame from {source.description}'}", ""
    if frame is None:
        why = f" ({source.problem})" if source.problem else ""
        return None, f"roi: not checked: no frame from {source.description} within {FRAME_WAIT:g} s{why}"
    height, width = frame.image.shape[:2]
    problem = regions_problem(regions, frame.image.shape, spec or InputSpec(1, 1))  # no model: only whether they fit
    camera = f"camera {source.camera_name} ({', '.join(source.applied)}); " if kind == GENICAM else ""
    return (
        f"roi: {problem}" if problem else None
    ), f"{camera}roi: fits the {width}x{height} frames of {source.description}"


def _first_frames(source):
    """At most one frame, waiting at most FRAME_WAIT seconds (a stream may not answer)."""
    feed = LatestFrame(source)
    deadline = time.monotonic() + FRAME_WAIT
    try:
        frame = feed.peek(FRAME_WAIT)
        while frame is not None and frame.problem is not None:  # an unreadable image: the next one tells the size
            frame = feed.get(timeout=max(0.0, deadline - time.monotonic()))
        return [frame] if frame is not None else []
    finally:
        feed.close(timeout=1.0)
