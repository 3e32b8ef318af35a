"""Faults, for real: a broker that restarts, a daemon SIGKILLed, cameras that go away,
a full disk under the outbox, corrupt files on reload. The daemon runs as a real
process against a real mosquitto; nothing here is mocked."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import cv2
import jsonschema
import pytest

from station.runtime.mqtt.outbox import Outbox
from station.core.simulated_line import render_frame, render_part
from station.tools.simulate import write_video
from tests.daemon_helpers import (
    Output,
    TcpGate,
    TimedNotify,
    assert_complete_and_ordered,
    largest_gap,
    outbox_counters,
    schema,
    start_station,
    wait_until,
    write_config,
)
from tests.mqtt_helpers import Recorder


def resubscriptions(recorder: Recorder) -> list[float]:
    """Times at which the recorder (re-)subscribed: paho re-runs on_connect after a broker restart."""
    times: list[float] = []
    recorder.client.on_subscribe = lambda *args: times.append(time.monotonic())
    return times


def stop(process, output: Output, timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return output.finish(timeout)


# -- the broker


def test_a_broker_restart_loses_no_verdict_and_keeps_seq_order(tmp_path, station_files, broker):
    """mosquitto without persistence restarts mid-run: the station redelivers from its outbox."""
    count = 1200
    gate = TcpGate(broker.port)  # the station reaches the broker through the gate
    recorder = Recorder(broker.host, broker.port, "plant/+/verdict")
    subscribed = resubscriptions(recorder)
    config = write_config(
        tmp_path, station_files, SimpleNamespace(port=gate.port), f'{{source: "sim://?seed=3&count={count}", fps: 400}}'
    )
    process = start_station(config)
    output = Output(process)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > 100, what="first verdicts")
        gate.close()
        broker.stop()  # no persistence: every session and queued message on the broker is gone
        wait_until(lambda: outbox_counters(tmp_path / "state")["depth"] >= 100, what="verdicts waiting in the outbox")
        broker.start()
        wait_until(lambda: subscribed, what="the subscriber's new subscription")
        gate.open()
        assert output.finish(60) == 0, output.text
        recorder.wait_for(
            lambda: {v["seq"] for v in recorder.json_on("/verdict")} >= set(range(1, count + 1)),
            timeout=20,
            what="every seq",
        )
        assert_complete_and_ordered(recorder.json_on("/verdict"), count)
        assert "MQTT disconnected" in output.text or "connection to" in output.text
    finally:
        if process.poll() is None:
            process.kill()
        recorder.close()
        gate.shutdown()


def test_a_daemon_killed_while_the_broker_is_down_delivers_its_outbox_after_restart(tmp_path, station_files, broker):
    count = 600
    recorder = Recorder(broker.host, broker.port, "plant/+/verdict")
    subscribed = resubscriptions(recorder)
    state = tmp_path / "state"
    config = write_config(tmp_path, station_files, broker, f'{{source: "sim://?seed=4&count={count}", fps: 300}}')
    process = start_station(config)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > 50, what="first verdicts")
        broker.stop()
        wait_until(lambda: outbox_counters(state)["depth"] >= 150, what="verdicts piling up in the outbox")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    killed = outbox_counters(state)
    assert killed["depth"] >= 150 and killed["seq"] < count  # killed mid-run with verdicts undelivered
    broker.start()
    wait_until(lambda: subscribed, what="the subscriber's new subscription")

    process = start_station(config)  # same config, same state: the line PC after a crash
    output = Output(process)
    assert output.finish(60) == 0, output.text
    last = killed["seq"] + count
    recorder.wait_for(
        lambda: {v["seq"] for v in recorder.json_on("/verdict")} >= set(range(1, last + 1)),
        timeout=20,
        what="the killed run's outbox and the new run",
    )
    verdicts = recorder.json_on("/verdict")
    assert_complete_and_ordered(verdicts, last)
    assert {v["source"] for v in verdicts if v["seq"] > killed["seq"]} == {f"sim:4:{i}" for i in range(count)}
    with Outbox(state / "outbox.sqlite3") as outbox:
        assert outbox.depth() == 0 and outbox.last_seq() == last
    recorder.close()


# -- cameras


def test_a_video_file_removed_and_restored_is_reconnected(tmp_path, station_files, broker):
    video = tmp_path / "line.avi"
    write_video(video, tmp_path / "line.csv", count=20, seed=2)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, f"{{source: {video}, loop: true, fps: 40}}")
    process = start_station(config)
    output = Output(process)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > 10, what="verdicts from the video")
        video.rename(tmp_path / "away.avi")  # the file goes; the open handle reads on to its end
        recorder.wait_for(
            lambda: recorder.json_on("/state")[-1]["camera"] == "reconnecting", timeout=5, what="camera reconnecting"
        )
        away = len(recorder.on("/verdict"))
        (tmp_path / "away.avi").rename(video)
        recorder.wait_for(lambda: recorder.json_on("/state")[-1]["camera"] == "ok", timeout=8, what="camera ok again")
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > away + 10, what="verdicts after the file came back")
        recorder.wait_for(lambda: recorder.json_on("/stats")[-1]["camera_reconnects"] >= 1, what="reconnect counted")
        assert process.poll() is None
    finally:
        code = stop(process, output)
    assert code == 0, output.text
    assert "camera" in output.text and "is back" in output.text


class MjpegCamera(BaseHTTPRequestHandler):
    """An IP camera: a multipart/x-mixed-replace stream of JPEG frames at ~25 fps."""

    jpeg = None
    running = threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            while self.running.is_set():
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(self.jpeg))
                self.wfile.write(self.jpeg + b"\r\n")
                self.wfile.flush()
                time.sleep(0.04)
        except OSError:
            pass

    def log_message(self, *args):
        pass


class Camera:
    def __init__(self):
        MjpegCamera.jpeg = cv2.imencode(".jpg", render_frame(render_part(1, 0), 1))[1].tobytes()
        self.port = None
        self.server = None

    def start(self):
        MjpegCamera.running.set()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port or 0), MjpegCamera)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        MjpegCamera.running.clear()  # open streams end: the camera is switched off
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/stream.mjpg"


def test_an_mjpeg_camera_that_goes_away_and_a_stuck_loop_and_the_watchdog(tmp_path, station_files, broker):
    """Watchdog pings mean "the main loop turns". A camera that is away is the loop's business
    (it reports it and waits for frames at most POLL), so pings go on; a loop that cannot turn
    (here: blocked on an outbox locked by another process) stops pinging, and systemd restarts it."""
    camera = Camera()
    camera.start()
    recorder = Recorder(broker.host, broker.port, "plant/#")
    notify = TimedNotify(tmp_path / "notify.sock")
    config = write_config(tmp_path, station_files, broker, f"{{source: {camera.url}}}")
    process = start_station(config, notify, watchdog_usec=600_000)  # pings every 0.2 s
    output = Output(process)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > 10, timeout=20, what="verdicts from the camera")
        assert recorder.json_on("/state")[-1]["camera"] == "ok"

        camera.stop()
        gone = time.monotonic()
        recorder.wait_for(
            lambda: recorder.json_on("/state")[-1]["camera"] == "reconnecting", timeout=5, what="camera reconnecting"
        )
        noticed = time.monotonic() - gone
        assert noticed < 3.0, f"a camera that went away was noticed after {noticed:.1f} s"
        time.sleep(1.0)  # stay away a while: the watchdog is judged over this stretch
        camera.start()
        back = time.monotonic()
        assert largest_gap(notify.times("WATCHDOG=1"), gone, back) < 0.8, (
            "watchdog pings stopped while the camera was away"
        )
        recorder.wait_for(lambda: recorder.json_on("/state")[-1]["camera"] == "ok", timeout=10, what="camera ok again")
        recorder.wait_for(lambda: recorder.json_on("/stats")[-1]["camera_reconnects"] >= 1, what="reconnect in stats")
        jsonschema.validate(recorder.json_on("/stats")[-1], schema("stats"))
        judged = len(recorder.on("/verdict"))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > judged + 10, what="verdicts after the reconnect")

        # A stuck loop: another process holds the outbox's write lock for 2.5 s.
        with sqlite3.connect(tmp_path / "state" / "outbox.sqlite3", isolation_level=None) as db:
            db.execute("BEGIN IMMEDIATE")
            locked = time.monotonic()
            time.sleep(2.5)
            db.execute("ROLLBACK")
            unlocked = time.monotonic()
        wait_until(lambda: notify.times("WATCHDOG=1", since=unlocked), timeout=3, what="pings after the loop is free")
        assert largest_gap(notify.times("WATCHDOG=1"), locked, unlocked) > 2.0, "pings went on while the loop was stuck"
        judged = len(recorder.on("/verdict"))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > judged + 10, what="verdicts after the lock")
        assert process.poll() is None
    finally:
        code = stop(process, output)
        notify.close()
        camera.stop()
        recorder.close()
    assert code == 0, output.text


# -- the disk under the outbox


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 16 MB tmpfs for the state folder: filling it gives SQLite a real ENOSPC.

    Mounting needs root (CI and the line PC's test run are root); SQLite's max_page_count
    would fake the error inside the process, a real full filesystem also hits the WAL."""
    folder = tmp_path / "state"
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (64 * 1024))
                handle.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_under_the_outbox_publishes_live_and_never_reuses_a_seq(
    tmp_path, station_files, broker, small_filesystem
):
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=8", fps: 100}')
    process = start_station(config)
    output = Output(process)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > 5, what="first verdicts")
        filler = fill(small_filesystem)
        output.wait_for("publishing them live", timeout=10)
        recorder.wait_for(
            lambda: (recorder.json_on("/stats") or [{}])[-1].get("verdicts_live", 0) >= 50,
            timeout=10,
            what="50 verdicts published live",
        )
        assert recorder.json_on("/stats")[-1]["outbox_write_errors"] > 0
        assert any(p.startswith("outbox: ") for p in recorder.json_on("/state")[-1]["problems"])
        filler.unlink()
        output.wait_for("stores verdicts again", timeout=10)
        after = max(v["seq"] for v in recorder.json_on("/verdict"))
        recorder.wait_for(
            lambda: max(v["seq"] for v in recorder.json_on("/verdict")) > after + 30,
            what="stored verdicts after the disk has room",
        )
    finally:
        code = stop(process, output)
        recorder.close()
    assert code == 0, output.text
    verdicts = recorder.json_on("/verdict")
    with Outbox(small_filesystem / "outbox.sqlite3") as outbox:
        last = outbox.last_seq()
        assert outbox.depth() == 0
    assert last >= max(v["seq"] for v in verdicts)  # the persisted seq went past every live one
    assert_complete_and_ordered(verdicts, max(v["seq"] for v in verdicts))
    assert output.count("the disk is full") <= 2, "the disk-full error is not rate-limited"
    assert output.count("verdicts cannot be stored") == 1, "logged once per change, not per attempt"
    assert output.count("cannot keep crop") <= 2, "every crop not kept is logged: the journal floods"
    live = recorder.json_on("/stats")[-1]["verdicts_live"]
    assert live >= 50
    print(f"{live} verdicts published live while the disk was full, {last} seqs, none lost or reused")


# -- corrupt files on reload


def test_a_corrupt_model_or_truncated_config_on_reload_is_refused(tmp_path, station_files, broker):
    files = tmp_path / "files"
    shutil.copytree(station_files, files)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, files, broker, '{source: "sim://?seed=6", fps: 100}')
    process = start_station(config)
    output = Output(process)
    model = files / "model.onnx"
    good_model, good_config = model.read_bytes(), config.read_text()
    try:
        recorder.wait_for(lambda: recorder.on("/verdict"), what="first verdict")
        model_id = recorder.json_on("/verdict")[-1]["model"]

        model.write_bytes(good_model[: len(good_model) // 2])  # a copy cut short
        process.send_signal(signal.SIGHUP)
        output.wait_for("SIGHUP refused", timeout=10)
        recorder.publish("plant/st1/command", json.dumps({"id": "m1", "cmd": "reload"}))
        recorder.wait_for(lambda: any(a["id"] == "m1" for a in recorder.json_on("/command/result")), what="m1")
        answer = next(a for a in recorder.json_on("/command/result") if a["id"] == "m1")
        assert answer["ok"] is False and "model.onnx" in answer["error"]
        model.write_bytes(good_model)

        config.write_text(good_config[: len(good_config) // 3])  # the editor's save was cut
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: output.count("SIGHUP refused") >= 2, what="the second refusal")
        assert "station.yaml" in output.lines[-1] or any("station.yaml" in line for line in output.lines[-5:])

        judged = len(recorder.on("/verdict"))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > judged + 20, what="still judging")
        assert {v["model"] for v in recorder.json_on("/verdict")} == {model_id}
        assert process.poll() is None
    finally:
        config.write_text(good_config)
        code = stop(process, output)
        recorder.close()
    assert code == 0, output.text


def test_a_read_only_state_folder_stops_the_start_with_a_message(tmp_path, station_files, broker, small_filesystem):
    # A filesystem cannot be remounted read-only under a writer (EBUSY), so the station meets it at start.
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=9&count=5"}')
    try:
        process = start_station(config)
        output = Output(process)
        code = output.finish(30)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_filesystem)], check=False)
    assert code == 78 and "state_dir: " in output.text and "read-only" in output.text, output.text
    assert "Traceback" not in output.text
