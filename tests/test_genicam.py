"""GenICam cameras through Aravis, against Aravis's own fake GigE Vision camera (Debian's aravis-tools).

No mocks: `arv-fake-gv-camera-0.8 -i 127.0.0.1` is a real GigE Vision device
on loopback (GVCP control, GVSP stream); `arv-tool-0.8` reads its settings
back as a second client would. The fake camera answers on 127.0.0.1 only, so
every test holds a lock file: test runs on the same machine take turns.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import jsonschema
import pytest

from station.runtime.config.station import parse_config
from station.core.errors import ConfigError
from tests.daemon_helpers import finish, schema, start_station, write_config
from tests.genicam_helpers import ADDRESS, ROOT, SOURCE, FakeCamera, genicam_config, needs_aravis
from tests.mqtt_helpers import Recorder


# ---------------------------------------------------------------- without a camera


def test_genicam_settings_are_checked_when_the_config_is_read():
    base = "station: s1\nmodel: m.onnx\nreference: r\n"
    config = parse_config(
        base + f"camera: {{source: {SOURCE}, genicam: {{exposure_us: 500, gain: 2}}}}\ntrigger: hardware\n"
    )
    assert config.camera.source == SOURCE and config.camera.genicam.exposure_us == 500
    assert config.camera.genicam.pixel_format == "Mono8" and config.trigger == "hardware"
    cases = {
        "camera: {source: 'genicam://'}\n": "station.yaml:4: camera.source: 'genicam://': a GenICam camera looks like",
        "camera: {source: 'sim://', genicam: {gain: 2}}\n": "station.yaml:4: camera.genicam: GenICam settings apply to",
        "camera: {source: 'sim://'}\ntrigger: hardware\n": "station.yaml:5: trigger: hardware is the camera's own trigger",
        f"camera: {{source: {SOURCE}, genicam: {{pixel_format: RGB8}}}}\n": "camera.genicam.pixel_format: Input should be",
        f"camera: {{source: {SOURCE}, genicam: {{exposure: 3}}}}\n": "camera.genicam.exposure: unknown key (did you mean exposure_us?)",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as caught:
            parse_config(base + text)
        assert expected in str(caught.value), (text, str(caught.value))


def test_the_daemon_imports_aravis_only_for_a_genicam_source():
    code = (
        "import sys; import station.runtime.daemon, station.runtime.sources, station.runtime.config.station, "
        "station.runtime.sources.genicam_config; print('gi' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_without_aravis_run_and_check_say_what_to_install(tmp_path, station_files, broker):
    config = genicam_config(tmp_path, station_files, broker, "exposure_us: 2500")
    blocked = (
        "import sys; sys.modules['gi'] = None  # as on a line PC without the genicam extra\n"
        "from station.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    for command, code in (("run", 69), ("check", 78)):
        done = subprocess.run(
            [sys.executable, "-c", blocked, command, "-c", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = done.stdout + done.stderr
        assert done.returncode == code, output
        assert "pip install '.[genicam]'" in output and "gir1.2-aravis-0.8" in output, output
        assert "Traceback" not in output, output


# ---------------------------------------------------------------- the source against the fake camera


@needs_aravis
def test_the_source_applies_settings_and_delivers_grey_frames_with_the_camera_timestamp(fake_camera):
    from station.runtime.sources import is_finite, is_lossless, open_source
    from station.runtime.sources.genicam_config import GenicamConfig

    settings = GenicamConfig(exposure_us=3300, gain=3, pixel_format="BayerRG8", frame_rate=50)
    source = open_source(SOURCE, genicam=settings, trigger="continuous")
    assert not is_finite(source) and not is_lossless(source)
    frames, started = [], time.time_ns()
    for frame in source:
        frames.append(frame)
        if len(frames) == 30:
            break
    source.close()
    assert all(f.image.shape == (512, 512) and f.image.dtype.name == "uint8" for f in frames)  # Bayer -> grey
    stamps = [f.camera_ts for f in frames]
    assert stamps == sorted(stamps) and stamps[0] > started - 10**9  # the fake camera's clock is the wall clock
    assert source.camera_name.startswith("Aravis Fake") and "exposure 3300 us" in source.applied
    assert "gain 3 raw" in source.applied  # the fake camera has GainRaw, no Gain (dB)
    assert [FakeCamera.control(name) for name in ("ExposureTimeAbs", "GainRaw", "PixelFormat")] == [
        "3300",
        "3",
        "BayerRG8",
    ]
    assert source.counters() == {"camera_lost_packets": 0, "camera_incomplete_frames": 0}


@needs_aravis
def test_lost_packets_and_incomplete_frames_are_counted(fake_camera_factory):
    from station.runtime.sources import open_source
    from station.runtime.sources.genicam_config import GenicamConfig

    fake_camera_factory("-r", "20")  # 20 of 1000 stream packets lost: most 512x512 frames miss one
    source = open_source(SOURCE, genicam=GenicamConfig(frame_rate=50))
    good, deadline = 0, time.monotonic() + 30
    for _ in source:
        good += 1
        if source.incomplete_frames >= 3 and good >= 1 or time.monotonic() > deadline:
            break
    source.close()
    counters = source.counters()
    assert counters["camera_lost_packets"] >= 3 and counters["camera_incomplete_frames"] >= 3, counters


# ---------------------------------------------------------------- station check and station run


@needs_aravis
def test_station_check_names_the_camera_and_applies_the_settings(tmp_path, station_files, broker, fake_camera):
    config = genicam_config(tmp_path, station_files, broker, "exposure_us: 4200")
    done = subprocess.run(
        [sys.executable, "-m", "station", "check", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: camera Aravis Fake, serial GV01" in done.stdout and "exposure 4200 us" in done.stdout, done.stdout
    assert f"fits the 512x512 frames of {SOURCE}" in done.stdout
    assert FakeCamera.control("ExposureTimeAbs") == "4200"

    config = genicam_config(tmp_path, station_files, broker, "exposure_us: 4200, gain: 50")
    done = subprocess.run(
        [sys.executable, "-m", "station", "check", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 78, done.stdout + done.stderr
    assert "gain 50 is outside the camera's range 0 to 10 (GainRaw)" in done.stderr + done.stdout

    config = genicam_config(tmp_path, station_files, broker, "trigger_source: Line7", trigger="hardware")
    done = subprocess.run(
        [sys.executable, "-m", "station", "check", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 78, done.stdout + done.stderr
    assert (
        "camera.genicam.trigger_source: trigger source Line7 is not offered (the camera has Line0, Software)"
        in done.stderr
    ), done.stderr


@needs_aravis
def test_station_run_publishes_verdicts_and_reconnects_when_the_camera_comes_back(
    tmp_path, station_files, broker, fake_camera
):
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = genicam_config(tmp_path, station_files, broker, "exposure_us: 2500, frame_rate: 20")
    process = start_station(config)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 5, timeout=30, what="verdicts from the camera")
        assert FakeCamera.control("ExposureTimeAbs") == "2500"  # applied on connect
        for verdict in recorder.json_on("/verdict"):
            jsonschema.validate(verdict, schema("verdict"))
            assert verdict["source"].startswith(f"{SOURCE}#") and verdict["camera_ts_ns"] > 0
            assert verdict["part_id"] is None

        fake_camera.kill()  # the camera goes away ...
        recorder.wait_for(
            lambda: recorder.json_on("/state")[-1]["camera"] == "reconnecting", timeout=20, what="camera reconnecting"
        )
        fake_camera.start()  # ... and comes back as a new camera with its defaults (exposure 10000)
        judged = len(recorder.on("/verdict"))
        recorder.wait_for(
            lambda: len(recorder.on("/verdict")) >= judged + 5, timeout=40, what="verdicts after reconnect"
        )
        assert recorder.json_on("/state")[-1]["camera"] == "ok"
        assert FakeCamera.control("ExposureTimeAbs") == "2500"  # applied again on reconnect
        recorder.wait_for(lambda: recorder.json_on("/stats")[-1]["camera_reconnects"] >= 1, what="a reconnect counted")
        stats = recorder.json_on("/stats")[-1]
        jsonschema.validate(stats, schema("stats"))
        # On loopback nothing is lost but the frame on its way when the camera was killed (measured: 1 frame,
        # 47 packets): at most one incomplete frame a reconnect, and its packets at most a whole frame's.
        assert stats["camera_incomplete_frames"] <= stats["camera_reconnects"], stats
        whole_frame = 512 * 512 // 576 + 1  # packets of a 512x512 Mono8 frame at GigE Vision's smallest packet
        assert stats["camera_lost_packets"] <= stats["camera_incomplete_frames"] * whole_frame, stats
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, timeout=20)
        recorder.close()
    assert code == 0, output
    assert "Aravis Fake, serial GV01; Mono8, exposure 2500 us" in output
    assert "camera genicam://127.0.0.1 is back (reconnect 1)" in output


@needs_aravis
def test_hardware_trigger_makes_each_frame_a_counted_part(fake_camera):
    """The camera's own trigger, TriggerSource Software: fired through the station's connection to the camera
    (the fake camera, like a real one, takes writes only from the application that controls it)."""
    import threading

    from station.runtime.sources import is_lossless, open_source
    from station.runtime.sources.genicam_config import GenicamConfig

    source = open_source(SOURCE, genicam=GenicamConfig(trigger_source="Software", frame_rate=50), trigger="hardware")
    assert is_lossless(source) and source.waits_for_trigger  # every part is judged; no frame to wait for at start
    frames = []
    reader = threading.Thread(target=lambda: frames.extend(source), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 15
        while source.state != "ok" or not source.applied:
            assert time.monotonic() < deadline, source.last_error
            time.sleep(0.05)
        assert [FakeCamera.control(name) for name in ("TriggerMode", "TriggerSource")] == ["On", "Software"]
        time.sleep(1.0)
        assert frames == []  # the camera waits for its trigger: no frame, no part
        for count in range(1, 4):
            assert source.software_trigger() is None
            deadline = time.monotonic() + 5
            while len(frames) < count:
                assert time.monotonic() < deadline, f"no frame for trigger {count}"
                time.sleep(0.02)
        time.sleep(0.5)
    finally:
        source.close()
        reader.join(5)
    assert [f.part_id for f in frames] == ["1", "2", "3"]
    assert all(f.camera_ts for f in frames) and "trigger Software" in source.applied


@needs_aravis
def test_station_run_with_hardware_trigger_sets_the_cameras_trigger(tmp_path, station_files, broker, fake_camera):
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = genicam_config(
        tmp_path, station_files, broker, "exposure_us: 2000, trigger_source: Line0", trigger="hardware"
    )
    process = start_station(config)
    try:
        recorder.wait_for(
            lambda: recorder.json_on("/state") and recorder.json_on("/state")[-1]["camera"] == "ok",
            timeout=30,
            what="the station ready",
        )
        assert recorder.json_on("/state")[-1]["trigger"] == "hardware"
        assert [FakeCamera.control(name) for name in ("TriggerMode", "TriggerSource", "ExposureTimeAbs")] == [
            "On",
            "Line0",
            "2000",
        ]
        time.sleep(1.5)
        assert recorder.on("/verdict") == []  # no pulse on Line0: no part, no verdict, and no camera "lost"
        assert recorder.json_on("/state")[-1]["camera"] == "ok"
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, timeout=20)
        recorder.close()
    assert code == 0, output
    assert "trigger Line0" in output


@needs_aravis
def test_an_mqtt_trigger_fires_the_cameras_software_trigger(tmp_path, station_files, broker, fake_camera):
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = genicam_config(tmp_path, station_files, broker, "exposure_us: 2000", trigger="mqtt")
    process = start_station(config)
    try:
        recorder.wait_for(lambda: recorder.json_on("/state"), timeout=30, what="the station ready")
        probe = 0
        while not recorder.json_on("/command/result"):  # the command subscription is in place
            probe += 1
            recorder.publish("plant/st1/command", json.dumps({"id": f"probe{probe}", "cmd": "resume"}))
            time.sleep(0.2)
            assert probe < 100, "the station never answered a command"
        assert [FakeCamera.control(name) for name in ("TriggerMode", "TriggerSource")] == ["On", "Software"]
        sent = []
        for index in range(3):
            sent.append(time.time_ns())
            recorder.publish(
                "plant/st1/command", json.dumps({"id": f"t{index}", "cmd": "trigger", "part_id": f"P-{index}"})
            )
            recorder.wait_for(
                lambda index=index: len(recorder.on("/verdict")) > index, timeout=15, what=f"verdict for P-{index}"
            )
        verdicts = recorder.json_on("/verdict")
        assert [v["part_id"] for v in verdicts] == ["P-0", "P-1", "P-2"]
        # Each frame was taken after its trigger was sent: the camera's clock is the wall clock here.
        assert all(v["camera_ts_ns"] > t for v, t in zip(verdicts, sent)), (verdicts, sent)
        answers = {a["id"]: a for a in recorder.json_on("/command/result")}
        assert all(answers[f"t{i}"]["ok"] for i in range(3)), answers
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, timeout=20)
        recorder.close()
    assert code == 0, output
    assert "trigger Software" in output


# ---------------------------------------------------------------- the systemd sandbox


GRAB = """
import threading, time
from station.runtime.sources import open_source
from station.runtime.sources.genicam_config import GenicamConfig
source = open_source(sys.argv[1], genicam=GenicamConfig(exposure_us=3000), trigger=sys.argv[2])
frames = []
reader = threading.Thread(target=lambda: frames.extend(f for f, _ in zip(source, range(10))), daemon=True)
reader.start()
deadline = time.monotonic() + float(sys.argv[3])
while len(frames) < 10 and time.monotonic() < deadline:
    if sys.argv[2] == "mqtt" and source.state == "ok" and source.applied:
        source.software_trigger()  # TriggerSoftware through the station's own connection
    time.sleep(0.05)
source.close()
print("frames", len(frames), source.camera_name, source.last_error)
"""
# socket(AF_NETLINK, ...) refused as RestrictAddressFamilies= without AF_NETLINK refuses it (x86_64: socket is 41).
NO_NETLINK = (
    "program += [(JEQ, 0, 4, 41), (LD, 0, 0, 16), (JEQ, 0, 1, 16), "
    "(RET, 0, 0, 0x00050000 | errno.EAFNOSUPPORT), (RET, 0, 0, ALLOW)]\n"
)


def sandboxed_grab(trigger: str, seconds: float, netlink: bool) -> subprocess.CompletedProcess:
    """The GenICam source under test_systemd's seccomp filter: station@.service's MemoryDenyWriteExecute=
    and ~@resources, and, without netlink, its RestrictAddressFamilies= as it is before the drop-in."""
    from tests.test_systemd import SANDBOXED

    prologue = SANDBOXED.split("# Only now the heavy libraries")[0]
    if not netlink:
        prologue = prologue.replace(
            "program.append((RET, 0, 0, ALLOW))", NO_NETLINK + "program.append((RET, 0, 0, ALLOW))"
        )
    return subprocess.run(
        [sys.executable, "-c", prologue + GRAB, SOURCE, trigger, str(seconds)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_aravis
def test_aravis_streams_under_the_units_write_xor_execute_lock_but_needs_netlink(fake_camera):
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the filter's syscall numbers are x86_64's")
    done = sandboxed_grab("mqtt", 20, netlink=True)  # PyGObject's signal closure, the stream thread, the trigger
    assert done.returncode == 0 and "frames 10 Aravis Fake" in done.stdout, done.stdout + done.stderr
    done = sandboxed_grab("continuous", 3, netlink=False)  # why systemd/station-genicam.conf allows AF_NETLINK
    assert done.returncode == 0 and "frames 0 None cannot open camera" in done.stdout, done.stdout + done.stderr


@needs_aravis
def test_camera_calibration_sets_the_camera_as_the_station_does(tmp_path, station_files, broker, fake_camera):
    config = write_config(
        tmp_path,
        station_files,
        broker,
        f"{{source: {SOURCE}, genicam: {{exposure_us: 3100, frame_rate: 50}}}}",
        products=f"{{A: {tmp_path / 'refs' / 'A'}}}",
    )
    done = subprocess.run(
        [sys.executable, "-m", "station", "calibrate", "-c", str(config), "--count", "30", "--min-good", "30"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "refs" / "A" / "CURRENT").is_file()
    assert FakeCamera.control("ExposureTimeAbs") == "3100"  # the reference set saw what `station run` will see


@needs_aravis
def test_station_check_says_when_no_camera_answers(tmp_path, station_files, broker, fake_camera_factory):
    config = genicam_config(tmp_path, station_files, broker, "exposure_us: 4200")  # the lock held, no camera started
    done = subprocess.run(
        [sys.executable, "-m", "station", "check", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 78, done.stdout + done.stderr
    assert f"camera.source: cannot open camera {SOURCE}: Can't connect to device at address '{ADDRESS}'" in done.stderr
    assert "Traceback" not in done.stderr
