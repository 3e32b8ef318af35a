"""The station daemon: camera -> roi -> embed -> score -> verdict -> publish.

This module only wires the parts and owns the loop; each part lives in its
own module (camera, inspector, verdict, outbox, publisher, sdnotify). The loop
runs in the main thread and never blocks for long, so signals, commands,
stats and the watchdog keep working while a camera or the broker is away.

Every verdict is written to the durable outbox (with its seq, in the same
transaction) before it is published; the publisher removes it on PUBACK.
"""
from __future__ import annotations

import logging
import queue
import signal
import sys
import time
from pathlib import Path

import numpy as np

from station.runtime import sdnotify
from station.runtime.frame_feed import FrameFeed, LatestFrame
from station.runtime.sources import is_finite, is_lossless, open_source
from station.runtime.commands import MAX_PAYLOAD, Command, CommandError, parse_command, result
from station.runtime.config import StationConfig, load_config
from station.runtime.crops import CropKeeper
from station.core.errors import DataError, OutboxDiskError, OutboxError, StationError
from station.runtime.inspector import Inspector
from station.runtime.outbox import Outbox
from station.runtime.publisher import Publisher
from station.runtime.stats import StationStats
from station.runtime.messages import utc_timestamp, verdict_message

log = logging.getLogger(__name__)

BATCH = 128  # frames judged together when a stored source delivers faster than real time
POLL = 0.1  # longest wait of the loop, seconds
FINAL_FLUSH = 2.0  # seconds to deliver the outbox on SIGTERM; what is left goes out next start
TRIGGER_FRAME_WAIT = 1.0
# Changes that only a restart applies: they are wired into threads and connections.
RESTART_KEYS = ("station", "camera", "mqtt", "state_dir", "trigger", "outbox", "runtime")


def load_inspector(config: StationConfig, product: str | None = None) -> Inspector:
    """The inspector for a configured product (default: the config's), loaded and cross-checked."""
    if config.products is None:
        path, name = config.reference, None
    else:
        name = product or config.product
        if name not in config.products:
            raise StationError(f"unknown product {name!r}; configured: {', '.join(sorted(config.products))}")
        path = config.products[name]
    roi = config.roi.to_roi() if config.roi else None
    return Inspector.load(config.model, path, name, roi, threads=config.runtime.threads)


class Daemon:
    def __init__(self, config_path: Path):
        self.config_path = Path(config_path)
        self.config = load_config(self.config_path)
        self.paused = False
        self._stop_requested = False
        self._reload_requested = False
        self._commands: queue.Queue = queue.Queue(maxsize=1024)
        self._last_ping = 0.0
        self._camera_state = None
        self._unjudged_frames = 0  # paused, or the frame gave no crop
        self._live_seq: int | None = None  # last seq published live while the outbox's disk is full
        self._live_verdicts = 0

    # -- lifecycle

    def run(self) -> int:
        """Run until SIGTERM, or until a finite source is fully judged and delivered."""
        self._install_signal_handlers()
        # The loop hands the GIL to onnxruntime once per part and must win it back from the capture
        # and MQTT threads; the default 5 ms switch interval made that wait dominate (measured:
        # 2,400 -> 2,750 parts/s judged at 1 ms on 2 cores).
        sys.setswitchinterval(0.001)
        sdnotify.notify("STATUS=starting")
        config = self.config
        state_dir = Path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.inspector = load_inspector(config)
        self.outbox = Outbox(state_dir / "outbox.sqlite3", config.outbox.max_messages)
        self.publisher = Publisher(config.mqtt, config.station, self.outbox, on_command=self._on_command)
        self.crop_keeper = self._crop_keeper(config)
        self.stats = StationStats()
        self.publisher.start()
        self.source = open_source(config.camera.source, config.camera.loop, config.camera.fps)
        self.finite = is_finite(self.source)
        self.feed = FrameFeed(self.source, is_lossless(self.source)) if config.trigger == "continuous" else None
        self.latest = LatestFrame(self.source) if config.trigger == "mqtt" else None
        self._publish_state()
        sdnotify.notify("READY=1", f"STATUS={self._status_line()}")
        log.info("station %s ready: %s", config.station, self._status_line())
        finished = False
        try:
            finished = self._loop()
        finally:
            self._shutdown(finished)
        return 0

    def _install_signal_handlers(self):
        # Handlers only set flags; the loop acts on them between batches.
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload_requested", True))

    def _request_stop(self):
        self._stop_requested = True

    def _loop(self) -> bool:
        """True when a finite source ended and everything was judged."""
        next_stats = time.monotonic() + self.config.stats_interval
        while not self._stop_requested:
            self._handle_events()
            if self.feed is not None:
                frames = self.feed.get_batch(BATCH, POLL)
                if frames and self.paused:
                    self._unjudged_frames += len(frames)  # drained so no frame is stale on resume
                elif frames:
                    self._inspect(frames)
                elif not frames and self.feed.ended and self.finite:
                    return True
            else:
                self._wait_for_command(POLL)
            self._ping_watchdog()
            self._publish_state_if_camera_changed()
            if time.monotonic() >= next_stats:
                self._publish_stats()
                next_stats = time.monotonic() + self.config.stats_interval
        return False

    def _shutdown(self, finished: bool):
        sdnotify.notify("STOPPING=1", "STATUS=stopping")
        (self.feed or self.latest).close(timeout=1.0)
        if finished:
            log.info("source %s ended: delivering the outbox (%d waiting)", self.source.description, self.outbox.depth())
            # Wait for the broker as long as it takes, but stay stoppable.
            while not self.publisher.flush(timeout=POLL * 5) and not self._stop_requested:
                self._ping_watchdog()
        else:
            self.publisher.flush(timeout=FINAL_FLUSH)
        self._publish_stats()
        self.crop_keeper.close()
        self.publisher.stop(clean=True)
        left = self.outbox.depth()
        if left:
            log.warning("%d verdicts not yet delivered stay in the outbox for the next start", left)
        self.outbox.close()

    # -- judging

    def _inspect(self, frames, part_id: str | None = None):
        inspector = self.inspector  # one snapshot per batch: reloads swap it whole
        crops, kept = [], []
        for frame in frames:
            try:
                crops.append(inspector.crop(frame.image))
                kept.append(frame)
            except DataError as exc:
                self._unjudged_frames += 1
                log.warning("frame %s cannot be judged: %s", frame.source, exc)
        if not kept:
            return
        crops = np.stack(crops)
        judgements = inspector.judge_crops(crops)
        ready = time.monotonic()
        messages = self._store_verdicts(inspector, kept, judgements, ready, part_id)
        self.publisher.notify_outbox()
        for message, crop in zip(messages, crops):
            self.stats.part_judged(message["verdict"], message["latency_ms"])
            if self.crop_keeper.wants(message["verdict"]):
                self.crop_keeper.keep(crop, message["verdict"], message["id"])

    def _store_verdicts(self, inspector: Inspector, frames, judgements, ready: float, part_id) -> list[dict]:
        """Seq and verdicts commit together; while the outbox is full, wait for the broker.

        While the outbox's disk is full, verdicts go out live instead (not durable), with
        seqs counted on in memory; the persisted seq is advanced past them, in the same
        transaction, as soon as the outbox stores again, so no seq is used twice.
        """
        reference = inspector.reference_set
        ts = utc_timestamp(time.time())  # one batch, one moment: formatted once

        def build(seq, frame, judgement) -> dict:
            return verdict_message(
                station=self.config.station, seq=seq, source=frame.source, part_id=part_id,
                product=inspector.product, judgement=judgement, threshold=reference.threshold,
                metric=reference.metric, model_id=inspector.embedder.info.short_id,
                reference_version=reference.version,
                latency_ms=(ready - frame.grabbed_at) * 1000.0, ts=ts,
            )

        done: list[dict] = []
        pending = list(zip(frames, judgements))
        while True:
            try:
                with self.outbox.transaction() as tx:
                    if self._live_seq is not None:
                        tx.advance_seq(self._live_seq)
                    messages = [build(seq, frame, judgement)
                                for seq, (frame, judgement) in zip(tx.next_seqs(len(pending)), pending)]
                    self.publisher.queue_verdicts(tx, messages)
                if self._live_seq is not None:
                    log.warning("outbox %s stores verdicts again (after seq %d published live)",
                                self.outbox.path, self._live_seq)
                    self._live_seq = None
                return done + messages
            except OutboxError as exc:
                if isinstance(exc, OutboxDiskError):
                    sent = self._publish_live(build, pending)
                    done, pending = done + sent, pending[len(sent):]
                    if not pending:
                        return done
                # Never drop a verdict: hold inspection until there is room (frames
                # from live cameras are dropped meanwhile, and counted).
                if self._stop_requested:
                    log.error("stopping with %d judged parts not stored: %s", len(pending), exc)
                    return done
                sdnotify.notify(f"STATUS=outbox cannot store verdicts: {exc}")
                self.publisher.flush(timeout=POLL * 5)
                self._handle_events()
                self._ping_watchdog()

    def _publish_live(self, build, pending) -> list[dict]:
        """The outbox's disk is full: publish verdicts live, not durable; those sent, in order."""
        if not self.publisher.connected:
            return []
        if self._live_seq is None:
            self._live_seq = self.outbox.last_seq()  # reading works on a full disk
            log.error("outbox %s cannot store verdicts (disk full): publishing them live, not durable, "
                      "from seq %d until it can", self.outbox.path, self._live_seq + 1)
        sent = []
        for frame, judgement in pending:
            self._live_seq += 1  # used even if the send fails: a gap, never a reuse
            message = build(self._live_seq, frame, judgement)
            if not self.publisher.publish_verdict_live(message):
                break
            sent.append(message)
        self._live_verdicts += len(sent)
        return sent

    # -- commands and reloads

    def _on_command(self, payload: bytes, reply):
        """From the MQTT thread: queue for the loop (which owns all state)."""
        if len(payload) > MAX_PAYLOAD:  # answered here: a queue of huge payloads would exhaust memory
            reply(result(None, f"command of {len(payload)} bytes is larger than {MAX_PAYLOAD}"))
            return
        try:
            self._commands.put_nowait((payload, reply))
        except queue.Full:
            reply(result(None, "station busy: too many commands waiting"))

    def _wait_for_command(self, timeout: float):
        try:
            payload, reply = self._commands.get(timeout=timeout)
        except queue.Empty:
            return
        self._run_command(payload, reply)

    def _handle_events(self):
        if self._reload_requested:
            self._reload_requested = False  # a storm of SIGHUPs is one reload
            self._reload(product=None, reason="SIGHUP")
        while True:
            try:
                payload, reply = self._commands.get_nowait()
            except queue.Empty:
                return
            self._run_command(payload, reply)

    def _run_command(self, payload: bytes, reply):
        try:
            command = parse_command(payload)
            error = self._execute(command)
            reply(result(command.id, error))
        except CommandError as exc:
            reply(result(exc.command_id, str(exc)))

    def _execute(self, command: Command) -> str | None:
        """Act on a valid command; the error text, or None when it worked."""
        handlers = {"pause": self._pause, "resume": self._pause, "reload": self._reload_command,
                    "product": self._changeover, "trigger": self._trigger}
        return handlers[command.cmd](command)

    def _pause(self, command: Command) -> None:
        self.paused = command.cmd == "pause"
        self._publish_state()

    def _reload_command(self, command: Command) -> str | None:
        return self._reload(product=self.inspector.product if self.config.products else None, reason="command")

    def _changeover(self, command: Command) -> str | None:
        if self.config.products is None:
            return "this station has a single reference set; configure products: to switch"
        if command.product not in self.config.products:
            return f"unknown product {command.product!r}; configured: {', '.join(sorted(self.config.products))}"
        return self._swap_inspector(self.config, command.product, reason=f"changeover to {command.product}")

    def _trigger(self, command: Command) -> str | None:
        if self.latest is None:
            return "trigger mode is continuous; set trigger: mqtt to judge on command"
        if self.paused:
            return "station is paused"
        frame = self.latest.get(timeout=TRIGGER_FRAME_WAIT)
        if frame is None:
            return f"no fresh frame from {self.source.description} within {TRIGGER_FRAME_WAIT} s"
        self._inspect([frame], part_id=command.part_id)
        return None

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
            self.crop_keeper = self._crop_keeper(self.config)
        return error

    def _swap_inspector(self, config: StationConfig, product: str | None, reason: str) -> str | None:
        sdnotify.notify(sdnotify.reloading(), f"STATUS={reason}")
        try:
            inspector = load_inspector(config, product)
        except StationError as exc:
            return self._refuse(reason, exc)
        self.inspector = inspector
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
        return f"product {d['product']}, model {d['model']}, reference v{d['reference']:04d} ({d['metric']})"

    def _state(self) -> dict:
        return {
            "station": self.config.station,
            **self.inspector.describe(),
            "camera": self.source.state if hasattr(self, "source") else "starting",
            "trigger": self.config.trigger,
            "paused": self.paused,
            "ts": utc_timestamp(time.time()),
        }

    def _publish_state(self):
        self._camera_state = self.source.state if hasattr(self, "source") else None
        self.publisher.publish_state(self._state())

    def _publish_state_if_camera_changed(self):
        if self.source.state != self._camera_state:
            log.info("camera %s: %s", self.source.description, self.source.state)
            self._publish_state()

    def _publish_stats(self):
        capture = self.feed or self.latest
        stats = self.stats.report(
            captured=getattr(capture, "captured", self.stats.processed),
            dropped=getattr(capture, "dropped", 0) + self._unjudged_frames,
            outbox_depth=self.outbox.depth(), camera_state=self.source.state,
            camera_reconnects=self.source.reconnects,
        )
        stats["verdicts_live"] = self._live_verdicts
        self.publisher.publish_stats({"station": self.config.station, "ts": utc_timestamp(time.time()), **stats})

    def _ping_watchdog(self):
        # Pinged from the loop itself: a stuck loop stops the pings and systemd restarts us.
        interval = sdnotify.watchdog_interval()
        now = time.monotonic()
        if interval and now - self._last_ping >= interval / 3:
            sdnotify.notify("WATCHDOG=1")
            self._last_ping = now

    @staticmethod
    def _crop_keeper(config: StationConfig) -> CropKeeper:
        keep = config.keep_crops
        return CropKeeper(Path(config.state_dir) / "crops", keep.ng, keep.ok_sample_rate, int(keep.max_mb * 1e6))
