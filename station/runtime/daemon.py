"""The station daemon: camera -> roi -> embed -> score -> verdict -> publish.

This module only wires the parts and owns the loop; each part lives in its
own module (sources, frame_feed, inspector, recorder, outbox, publisher, sdnotify). The loop
runs in the main thread and never blocks for long, so signals, commands,
stats and the watchdog keep working while a camera or the broker is away.

Every verdict is written to the durable outbox (with its seq, in the same
transaction) before it is published; the publisher removes it on PUBACK.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import numpy as np

from station.runtime import presence_station, sdnotify
from station.runtime.frame_feed import FrameFeed, LatestFrame
from station.runtime.frame_sizes import FrameSizes
from station.runtime.sources import is_finite, is_lossless, open_source
from station.runtime.sources.base import STARTING
from station.runtime.commands import Command, CommandInbox
from station.runtime.config.station import StationConfig, load_config
from station.runtime.config.credentials import camera_credentials
from station.runtime.crops import CropKeeper
from station.core.errors import ConfigError, DataError, StationError
from station.core.preprocess import crop
from station.core.state_dir import StateLock, open_state_dir
from station.runtime.inspector import Inspector, load_inspector
from station.runtime.mqtt.outbox import Outbox
from station.runtime.mqtt.seq_mark import FILE as SEQ_MARK
from station.runtime.mqtt.publisher import Publisher
from station.runtime.mqtt.recorder import VerdictRecorder
from station.runtime.stats import StationStats, figures, stats_message
from station.runtime.integrations.wiring import Integrations
from station.runtime.mqtt.messages import is_verdict, part_messages, utc_timestamp
from station.runtime.presence import PresenceGate
from station.runtime.triggers import frame_for, unjudged_trigger

log = logging.getLogger(__name__)

BATCH = 128  # frames judged together when a stored source delivers faster than real time
POLL = 0.1  # longest wait of the loop, seconds
FINAL_FLUSH = 2.0  # seconds to deliver the outbox on SIGTERM; what is left goes out next start
FIRST_FRAME_WAIT = 5.0  # seconds to wait for a frame to check the ROI against before READY
PAUSE_FLAG = "paused"  # in the state folder while paused
# Changes that only a restart applies: they are wired into threads and connections.
RESTART_KEYS = (
    "station",
    "camera",
    "mqtt",
    "state_dir",
    "trigger",
    "outbox",
    "runtime",
    "prometheus",
    "homeassistant",
    "opcua",
    "snapshot",
    "web",
)


class Daemon:
    def __init__(self, config_path: Path):
        self.config_path = Path(config_path)
        self.config = load_config(self.config_path)
        self.paused = False  # read from the state folder at start: a pause survives restarts
        self._stop_requested = False
        self._reload_requested = False
        self.inbox = CommandInbox()
        self._last_ping = 0.0
        self._camera_state = None
        self.frame_sizes = FrameSizes(self._set_problem)  # frames of another size than the one checked: not judged
        self._ended_logged = False
        self.problems: dict[str, str] = {}  # kind -> why; in the retained state
        self._unjudged_frames = 0  # a live camera's frames while paused
        self.gate: PresenceGate | None = None  # trigger: presence

    # -- lifecycle

    def run(self) -> int:
        """Run until SIGTERM, or until a finite source is fully judged and delivered."""
        sdnotify.notify("STATUS=starting")
        state_dir = open_state_dir(self.config.state_dir)
        with StateLock(state_dir, f"station run -c {self.config_path}"):
            return self._run(state_dir)

    def _run(self, state_dir: Path) -> int:
        self._install_signal_handlers()
        # The loop hands the GIL to onnxruntime once per part and must win it back from the capture
        # and MQTT threads; the default 5 ms switch interval made that wait dominate (measured:
        # 2,400 -> 2,750 parts/s judged at 1 ms on 2 cores).
        sys.setswitchinterval(0.001)
        config = self.config
        self.inspector = load_inspector(config)
        self._pause_flag = state_dir / PAUSE_FLAG
        self.paused = self._pause_flag.exists()
        self.outbox = Outbox(state_dir / "outbox.sqlite3", config.outbox.max_messages, seq_mark=state_dir / SEQ_MARK)
        self.stats = StationStats()
        self.integrations = Integrations(self, figures)  # prometheus, snapshot, homeassistant, opcua, the page
        self.publisher = Publisher(
            config.mqtt,
            config.station,
            self.outbox,
            on_command=self.inbox.offer,
            on_queued=self.integrations.queued,
            on_delivered=self.integrations.delivered,
        )
        self.recorder = VerdictRecorder(self.outbox, self.publisher)
        self.crop_keeper = CropKeeper.for_station(config.state_dir, config.keep_crops)
        self.integrations.start(state_dir)
        self.publisher.start()
        self.source = open_source(
            config.camera.source,
            config.camera.loop,
            config.camera.fps,
            max_pixels=config.camera.max_pixels,
            credentials=camera_credentials(config.camera),
            genicam=config.camera.genicam,
            trigger=config.trigger,
        )
        self.finite = is_finite(self.source)
        self.feed = FrameFeed(self.source, is_lossless(self.source)) if config.trigger != "mqtt" else None
        self.gate = PresenceGate(config.presence.settings()) if config.trigger == "presence" else None
        self.latest = LatestFrame(self.source) if config.trigger == "mqtt" else None
        finished = clean = False
        try:
            self._check_first_frame()
            self._set_problem("camera", self.source.problem)
            self._publish_state()
            sdnotify.notify("READY=1", f"STATUS={self._status_line()}")
            log.info("station %s ready: %s", config.station, self._status_line())
            if self.paused:
                log.warning(
                    "station %s starts PAUSED (paused before it stopped): nothing is judged until a resume command",
                    config.station,
                )
            finished = self._loop()
            if finished and self.feed is not None and self.feed.readable == 0:
                raise self._nothing_to_judge()
            clean = True
        finally:
            self._shutdown(finished, clean)
        return 0

    def _check_first_frame(self):
        """The regions must fit the camera's frames and be large enough for the model: refuse to start (exit 78)
        rather than judge nothing; so is a finite source that gives no frame (_nothing_to_judge)."""
        capture = self.feed or self.latest
        frame = capture.peek(FIRST_FRAME_WAIT)
        if frame is None or frame.problem is not None:  # LatestFrame's freshest may be unreadable
            if self.finite and capture.exhausted:
                raise self._nothing_to_judge()
            return
        problem = self.frame_sizes.accept(frame.image.shape, self.inspector)
        if problem:
            self._set_problem("roi", problem)
            raise ConfigError(f"{self.config_path}: roi: {problem}")

    def _nothing_to_judge(self) -> StationError:
        """A finite source that gave no frame: not a clean finish. A path that is not there is the
        configuration's fault (78); media that holds nothing readable is the data's (65)."""
        why = self.source.problem or f"{self.source.description} gave no frame"
        self._set_problem("camera", why)
        error = DataError if Path(str(self.config.camera.source)).exists() else ConfigError
        return error(f"{self.config_path}: camera.source: nothing to judge: {why}")

    def _install_signal_handlers(self):
        # Handlers only set flags; the loop acts on them between batches.
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload_requested", True))
        # By default these end a process without a word (a log-rotation habit sends SIGUSR1): said, not obeyed.
        for unused in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(unused, _say_unused_signal)

    def _request_stop(self):
        self._stop_requested = True

    def _loop(self) -> bool:
        """True when a finite source ended and everything was judged."""
        next_stats = time.monotonic() + self.config.stats_interval
        while not self._stop_requested:
            self._handle_events()
            if self.feed is not None and not (self.paused and self.feed.lossless):
                frames = self.feed.get_batch(BATCH, POLL)
                if frames and self.paused:
                    self._unjudged_frames += len(frames)  # a live camera: drained so no frame is stale on resume
                elif frames:
                    self._inspect(frames)
                elif self.feed.ended and self.finite:
                    presence_station.stream_ends(self, "the source ended while a part was in the region")
                    if self._delivered():
                        return True
            else:  # trigger mode, or paused on stored media: its frames wait for resume
                self._wait_for_command(POLL)
            self._ping_watchdog()
            self._publish_state_if_camera_changed()
            if time.monotonic() >= next_stats:
                self._publish_stats()
                next_stats = time.monotonic() + self.config.stats_interval
        return False

    def _delivered(self) -> bool:
        """A finite source ended: the loop goes on (commands, state, stats) until the broker has it all."""
        if not self._ended_logged:
            self._ended_logged = True
            log.info(
                "source %s ended: delivering the outbox (%d waiting)", self.source.description, self.outbox.depth()
            )
        if self.publisher.flush(timeout=POLL):
            return True
        self._wait_for_command(POLL)  # also keeps this branch from spinning
        return False

    def _shutdown(self, finished: bool, clean: bool):
        sdnotify.notify("STOPPING=1", "STATUS=stopping")
        (self.feed or self.latest).close(timeout=1.0)
        self.inbox.close(self._record_unjudged if self.latest is not None else None)
        if not finished:
            presence_station.stream_ends(self, "the station stopped while a part was in the region")
            self.publisher.flush(timeout=FINAL_FLUSH)
        self._publish_stats()
        self.integrations.close()
        self.crop_keeper.close()
        self.publisher.stop(clean=clean)  # after a crash the status says offline, never stopped
        left = self.outbox.depth()
        if left:
            log.warning("%d verdicts not yet delivered stay in the outbox for the next start", left)
        self.outbox.close()

    # -- judging

    def _inspect(self, frames, part_id: str | None = None) -> list[str]:
        """Judge a batch; the reasons of the frames that were not judged (each gets a no_verdict)."""
        inspector = self.inspector  # one snapshot per batch: reloads swap it whole
        kept, crops, refused = self.frame_sizes.sort(frames, inspector)
        missed = []
        if self.gate is not None:  # trigger: presence: one settled frame per part
            kept, crops, missed = self.gate.select(kept, crops)
            presence_station.note_problem(self)
            refused = []  # frames, not parts: the gate says which frames are parts (counted, in the state)
        if not kept and not missed and not refused:
            return []
        judgements = inspector.judge_crops(np.stack(crops)) if kept else []
        ready = time.monotonic()
        pending = sorted([*zip(kept, judgements), *missed, *refused], key=lambda p: p[0].frame_no)
        messages = self._store_verdicts(inspector, pending, ready, part_id)
        self.publisher.notify_outbox()
        for message, frame in zip(filter(is_verdict, messages), kept):
            self.stats.part_judged(message["verdict"], message["latency_ms"])
            if self.crop_keeper.wants(message["verdict"]):  # the region at the camera's resolution
                self.crop_keeper.keep(crop(frame.image, inspector.roi), message["verdict"], message["id"])
        self.integrations.judged(inspector, messages, kept)
        return [reason for _, reason in refused]

    def _set_problem(self, kind: str, problem: str | None):
        """Problems that stop judging or delivery; in the retained state, published on change."""
        if self.problems.get(kind) == problem:
            return
        if problem is None:
            del self.problems[kind]
        else:
            self.problems[kind] = problem
        if hasattr(self, "publisher"):
            self._publish_state()

    def _store_verdicts(self, inspector: Inspector, pending: list, ready: float, part_id) -> list[dict]:
        """pending: (frame, judgement) in order; in place of a judgement, why a part or frame got none (a no_verdict)."""
        build = part_messages(
            self.config.station,
            inspector.product,
            inspector.reference_set,
            inspector.embedder.info.short_id,
            ready,
            part_id,
        )
        return self.recorder.record(build, pending, lambda: self._stop_requested, self._wait_for_outbox)

    def _wait_for_outbox(self, why: str):
        # Never drop a verdict: hold inspection until there is room (frames from
        # live cameras are dropped meanwhile, and counted).
        sdnotify.notify(f"STATUS={why}")
        self.publisher.flush(timeout=POLL * 5)
        self._handle_events()
        self._ping_watchdog()

    # -- commands and reloads

    def _wait_for_command(self, timeout: float):
        self.inbox.serve(self._execute, timeout, between=self._ping_watchdog, stopping=lambda: self._stop_requested)

    def _handle_events(self):
        if self._reload_requested:
            self._reload_requested = False  # a storm of SIGHUPs is one reload
            self._reload(product=None, reason="SIGHUP")
        self._wait_for_command(0.0)

    def _execute(self, command: Command) -> str | None:
        """Act on a valid command; the error text, or None when it worked."""
        handlers = {
            "pause": self._pause,
            "resume": self._pause,
            "reload": self._reload_command,
            "product": self._changeover,
            "trigger": self._trigger,
        }
        return handlers[command.cmd](command)

    def _pause(self, command: Command) -> None:
        """Pause survives a restart: frames of stored media wait, a live camera's are dropped and counted."""
        self.paused = command.cmd == "pause"
        if self.paused:
            self._pause_flag.touch()
        else:
            self._pause_flag.unlink(missing_ok=True)
        self._publish_state()

    def _reload_command(self, command: Command) -> str | None:
        return self._reload(product=self.inspector.product if self.config.products else None, reason="command")

    def _changeover(self, command: Command) -> str | None:
        if self.config.products is None:
            return "this station has a single reference set; configure products: to switch"
        try:
            self.config.reference_for(command.product)
        except ConfigError as exc:  # not configured: refused before anything reloads
            return str(exc)
        return self._swap_inspector(self.config, command.product, reason=f"changeover to {command.product}")

    def _trigger(self, command: Command) -> str | None:
        if self.latest is None:
            return f"trigger mode is {self.config.trigger}; set trigger: mqtt to judge on command"
        frame, error = (
            (None, "station is paused: not judged")
            if self.paused
            else frame_for(
                self.latest, command, self.source.description, self._ping_watchdog, lambda: self._stop_requested
            )
        )
        if frame is None:
            self._record_unjudged(command, error)
            return error
        refused = self._inspect([frame], part_id=command.part_id)
        return f"not judged: {refused[0]}" if refused else None

    def _record_unjudged(self, command: Command, reason: str):
        """A trigger's part not judged (paused, no frame in time, stopping): a no_verdict in the verdicts' seq."""
        build = unjudged_trigger(self.config.station, self.inspector.product, command, reason)
        self.recorder.record(build, [(None, None)], lambda: self._stop_requested, self._wait_for_outbox)
        self.publisher.notify_outbox()

    def _reload(self, product: str | None, reason: str) -> str | None:
        """Re-read config, model and reference; a bad new file is refused, the old one keeps running."""
        sdnotify.notify(sdnotify.reloading(), f"STATUS=reloading ({reason})")
        try:
            config = load_config(self.config_path)
        except StationError as exc:
            return self._refuse(reason, exc)
        changed = [key for key in RESTART_KEYS if getattr(config, key) != getattr(self.config, key)]
        if changed:
            log.warning("reload: %s changed; a restart applies that (systemctl restart)", ", ".join(changed))
        if config.products is not None and product not in config.products:
            product = None  # the config's own product
        error = self._swap_inspector(config, product, reason)
        if error is None:
            self.config = config.model_copy(update={key: getattr(self.config, key) for key in RESTART_KEYS})
            self.crop_keeper.close()
            self.crop_keeper = CropKeeper.for_station(self.config.state_dir, self.config.keep_crops)
        return error

    def _swap_inspector(self, config: StationConfig, product: str | None, reason: str) -> str | None:
        sdnotify.notify(sdnotify.reloading(), f"STATUS={reason}")
        try:
            inspector = load_inspector(config, product)
            accepted = self.frame_sizes.accepted
            problem = accepted and inspector.frame_problem(accepted)
            if problem:
                raise ConfigError(f"roi: {problem} (the camera's frames)")
        except StationError as exc:
            return self._refuse(reason, exc)
        previous, self.inspector = self.inspector, inspector
        presence_station.inspector_swapped(self, previous, reason)
        self._set_problem("roi", None)
        self.frame_sizes.after_reload(inspector, reason)
        log.info("%s: now %s", reason, self._status_line())
        self._publish_state()
        sdnotify.notify("READY=1", f"STATUS={self._status_line()}")
        return None

    def _refuse(self, reason: str, exc: Exception) -> str:
        message = f"{reason} refused, still running {self._status_line()}: {exc}"
        log.error(message)
        sdnotify.notify("READY=1", f"STATUS={message.splitlines()[0]}")
        return str(exc)

    # -- reporting

    def _status_line(self) -> str:
        d = self.inspector.describe()
        return f"product {d['product']}, model {d['model']} {d['model_form']}, reference v{d['reference']:04d} ({d['metric']})"

    def _state(self) -> dict:
        return {
            "station": self.config.station,
            **self.inspector.describe(),
            "camera": self.source.state if hasattr(self, "source") else STARTING,
            "trigger": self.config.trigger,
            "paused": self.paused,
            "problems": [f"{kind}: {text}" for kind, text in self.problems.items()],
            "presence": self.gate.state if self.gate else None,
            "ts": utc_timestamp(time.time()),
        }

    def _publish_state(self):
        self._camera_state = self.source.state if hasattr(self, "source") else None
        state = self._state()
        self.publisher.publish_state(state)
        self.integrations.state(state)

    def _publish_state_if_camera_changed(self):
        self._set_problem("camera", self.source.problem)
        self._set_problem("mqtt", "; ".join(self.publisher.problems) or None)
        self._set_problem("outbox", self.recorder.problem)
        self._set_problem("seq", self.outbox.seq_mark.problem)
        if self.source.state != self._camera_state:
            log.info("camera %s: %s", self.source.description, self.source.state)
            self._publish_state()

    def _publish_stats(self):
        self._set_problem("crops", self.crop_keeper.folder_error and f"not kept: {self.crop_keeper.folder_error}")
        self.publisher.publish_stats(stats_message(self))

    def _ping_watchdog(self):
        # Pinged from the loop itself: a stuck loop stops the pings and systemd restarts us.
        interval = sdnotify.watchdog_interval()
        now = time.monotonic()
        if interval and now - self._last_ping >= interval / 3:
            sdnotify.notify("WATCHDOG=1")
            self._last_ping = now


def _say_unused_signal(number, _frame):
    log.warning(
        "%s means nothing to the station: ignored (SIGTERM stops it, SIGHUP reloads)", signal.Signals(number).name
    )
