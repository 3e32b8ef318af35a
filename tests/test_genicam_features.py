"""GenICam paths the stock fake GigE Vision camera cannot show: gain in dB (SFNC Gain) and hardware-trigger pulses.

- Gain in dB: Aravis's fake camera declares only GainRaw. It takes another GenICam file (`-g`) as long as
  its features map onto the fake device's registers, so the tests build, from the XML the fake camera
  serves, a variant that also declares a Float `Gain` in dB (2 dB per GainRaw step, 0 to 20 dB) and
  read both features back with arv-tool.
- Pulses on Line0: the fake GigE Vision camera (arv-fake-gv-camera, arvgvfakecamera.c) sends a frame
  only in free run or for TriggerSoftware; with TriggerMode On from Line0 it never sends one (Aravis
  0.8.26 as in Debian, and upstream since). Aravis's in-process fake device (interface "Fake", device
  Fake_1: arvfakestream.c) fills a frame every 1/trigger_frequency while TriggerMode is On, whatever the
  source: a pulse generator on the line. `station run` opens it when the Fake interface is enabled in
  its process, and the test sets the generator's rate where the station opens the camera.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from tests.mqtt_helpers import Recorder
from tests.daemon_helpers import finish, schema, write_config
from tests.genicam_helpers import ROOT, SOURCE, FakeCamera, genicam_config, needs_aravis

GAIN_DB = """\t<Float Name="Gain" NameSpace="Standard">
\t\t<Description>Gain in dB: 2 dB per GainRaw step.</Description>
\t\t<pValue>GainConverter</pValue>
\t\t<Min>0.0</Min>
\t\t<Max>20.0</Max>
\t\t<Unit>dB</Unit>
\t</Float>

\t<Converter Name="GainConverter" NameSpace="Custom">
\t\t<FormulaTo>FROM / 2</FormulaTo>
\t\t<FormulaFrom>TO * 2</FormulaFrom>
\t\t<pValue>GainRaw</pValue>
\t</Converter>

"""
GAIN_RAW = '\t<Integer Name="GainRaw" NameSpace="Standard">'


@pytest.fixture
def camera_with_gain_in_db(tmp_path, fake_camera_factory):
    """The fake GigE Vision camera serving its own XML plus Gain (dB) on the GainRaw register."""
    import gi

    gi.require_version("Aravis", "0.8")
    from gi.repository import Aravis

    xml, _ = Aravis.FakeCamera.new("GV01").get_genicam_xml()  # what arv-fake-gv-camera serves (libaravis's resource)
    assert xml.count(GAIN_RAW) == 1 and 'Name="Gain"' not in xml, "the fake camera's XML changed: see GAIN_DB"
    xml = xml.replace(GAIN_RAW, GAIN_DB + GAIN_RAW)
    path = tmp_path / "fake-camera-gain-db.xml"
    path.write_text(xml)
    camera = fake_camera_factory("-g", str(path))
    assert FakeCamera.control("Gain") == "0 dB" and FakeCamera.control("GainRaw") == "0", "Gain (dB) not served"
    return camera


@needs_aravis
def test_the_source_sets_gain_in_db_through_the_cameras_gain_feature(camera_with_gain_in_db):
    from station.runtime.sources import open_source
    from station.runtime.sources.genicam_config import GenicamConfig

    source = open_source(SOURCE, genicam=GenicamConfig(gain=6, frame_rate=50), trigger="continuous")
    frames = []
    for frame in source:
        frames.append(frame)
        if len(frames) == 5:
            break
    source.close()
    assert len(frames) == 5 and frames[0].image.shape == (512, 512)
    assert "gain 6 dB" in source.applied, source.applied  # Gain (dB) taken over GainRaw
    # 6 dB at 2 dB per step is raw 3: the value went through Gain, not round(6) into GainRaw.
    assert [FakeCamera.control(name) for name in ("Gain", "GainRaw")] == ["6 dB", "3"]


@needs_aravis
def test_station_check_applies_gain_in_db_and_refuses_one_above_the_cameras_gain_maximum(
    tmp_path, station_files, broker, camera_with_gain_in_db
):
    config = genicam_config(tmp_path, station_files, broker, "gain: 6")
    done = subprocess.run(
        [sys.executable, "-m", "station", "check", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: camera Aravis Fake, serial GV01 (Mono8, gain 6 dB, free run)" in done.stdout, done.stdout
    assert FakeCamera.control("GainRaw") == "3"

    config = genicam_config(tmp_path, station_files, broker, "gain: 24")  # raw 12 would also pass GainRaw's 0..10
    done = subprocess.run(
        [sys.executable, "-m", "station", "check", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 78, done.stdout + done.stderr
    assert "gain 24 is outside the camera's range 0 to 20 dB (Gain)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert FakeCamera.control("GainRaw") == "3"  # refused before anything was written


# ---------------------------------------------------------------- pulses on Line0


PULSE_HZ = 8.0  # not the fake device's 25 Hz default (its free-run rate too): the spacing shows the generator ran
WITH_PULSES = f"""
import sys
import gi
gi.require_version("Aravis", "0.8")
from gi.repository import Aravis
Aravis.enable_interface("Fake")  # Aravis's in-process fake device, Fake_1, beside the real interfaces
open_camera = Aravis.Camera.new
def camera_with_pulses(device):  # the station opens the camera; the line's pulse rate is set on what it opened
    camera = open_camera(device)
    camera.get_device().get_fake_camera().set_trigger_frequency({PULSE_HZ})
    return camera
Aravis.Camera.new = camera_with_pulses
from station.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_station_with_pulses(config: Path) -> subprocess.Popen:
    """`station run` in a process where genicam://Fake_1 is Aravis's fake device pulsing its trigger at PULSE_HZ."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    return subprocess.Popen(
        [sys.executable, "-c", WITH_PULSES, "run", "-c", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@needs_aravis
def test_station_run_with_hardware_trigger_judges_each_pulse_as_the_next_part(tmp_path, station_files, broker):
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(
        tmp_path,
        station_files,
        broker,
        "{source: genicam://Fake_1, genicam: {exposure_us: 2000, trigger_source: Line0}}",
        trigger="hardware",
    )
    process = start_station_with_pulses(config)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 4, timeout=30, what="verdicts on the pulses")
        assert recorder.json_on("/state")[-1]["trigger"] == "hardware"
        judged, started = len(recorder.on("/verdict")), time.monotonic()
        time.sleep(3.0)
        per_second = (len(recorder.on("/verdict")) - judged) / (time.monotonic() - started)
        verdicts = recorder.json_on("/verdict")
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, timeout=20)
        recorder.close()
    assert code == 0, output
    assert "Aravis Fake, serial 1; Mono8, exposure 2000 us, trigger Line0" in output, output
    assert "CRITICAL" not in output and "Traceback" not in output, output
    for verdict in verdicts:
        jsonschema.validate(verdict, schema("verdict"))
        assert verdict["source"].startswith("genicam://Fake_1#") and verdict["camera_ts_ns"] > 0
    assert [v["part_id"] for v in verdicts] == [str(n) for n in range(1, len(verdicts) + 1)]  # every pulse a part
    spacing = statistics.median(b["camera_ts_ns"] - a["camera_ts_ns"] for a, b in zip(verdicts, verdicts[1:])) / 1e9
    assert spacing == pytest.approx(1 / PULSE_HZ, rel=0.05), spacing  # one frame per pulse, taken at the pulse
    assert PULSE_HZ * 0.7 <= per_second <= PULSE_HZ * 1.3, per_second  # and judged as fast as the line pulses
