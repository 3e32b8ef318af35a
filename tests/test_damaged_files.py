"""Files a person can damage (station/core/user_files.py), each filled with random bytes, cut short or emptied:
`station run` exits with the file's code and a message naming it, a reload refuses it while the old files keep
judging, `station check` names it; never a traceback. Real files, real processes, a real mosquitto.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from station.cli import main
from station.core import reference_set
from station.core.embedder import Embedder
from station.core.errors import ConfigError, ModelError
from station.core.reference_set import ReferenceSetError
from station.runtime.config.station import load_config
from tests.daemon_helpers import Output, start_station, wait_until, write_config
from tests.mqtt_helpers import Recorder

# file (relative to the copied station files) -> the exit code `station run` gives for it
FILES = {
    "refs/A/CURRENT": 65,
    "refs/A/v0001/reference.yaml": 65,
    "refs/A/v0001/arrays.npz": 65,
    "model.onnx": 66,
    "station.yaml": 78,
}
SPOILS = ("random bytes", "cut short", "empty")


def spoil(path, how: str, seed: int = 0):
    data = path.read_bytes()
    if how == "random bytes":
        path.write_bytes(random.Random(seed).randbytes(max(len(data), 64)))
    elif how == "cut short":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")


@pytest.fixture
def files(tmp_path, station_files, broker):
    """A private copy of the model and reference sets, and a station.yaml naming them."""
    copy = tmp_path / "files"
    shutil.copytree(station_files, copy)
    write_config(copy, copy, broker, '{source: "sim://?seed=7", fps: 30}')
    return copy


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "station", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("how", SPOILS)
def test_a_damaged_file_stops_the_start_with_its_code_and_check_names_it(files, how, capsys):
    config = files / "station.yaml"
    for name, code in FILES.items():
        original = (files / name).read_bytes()
        spoil(files / name, how, seed=len(name))
        done = run_cli("run", "-c", str(config))
        shown = f"{name} {how}: {done.stderr[-2000:]}"
        assert done.returncode == code and "Traceback" not in done.stderr, shown
        assert "station run: " in done.stderr and os.path.basename(name) in done.stderr, shown  # names the file
        assert main(["check", "-c", str(config)]) == 78
        err = capsys.readouterr().err
        assert err.startswith("station check: ") and os.path.basename(name) in err, f"{name} {how}: {err}"
        (files / name).write_bytes(original)


def test_damaged_files_on_reload_are_refused_and_the_old_ones_keep_judging(files, broker):
    config = files / "station.yaml"
    recorder = Recorder(broker.host, broker.port, "plant/#")
    process = start_station(config)
    output = Output(process)
    refused = 0
    try:
        recorder.wait_for(lambda: recorder.on("/verdict"), timeout=30, what="first verdicts")
        judging = recorder.json_on("/verdict")[-1]
        for name in FILES:
            original = (files / name).read_bytes()
            for how in SPOILS:
                spoil(files / name, how, seed=refused)
                process.send_signal(signal.SIGHUP)
                refused += 1
                wait_until(
                    lambda refused=refused: output.count("SIGHUP refused") >= refused, 30, f"{name} {how} refused"
                )
                refusal = [line for line in output.lines if "SIGHUP refused" in line][-1]
                assert os.path.basename(name) in refusal, refusal
                before = len(recorder.on("/verdict"))
                recorder.wait_for(
                    lambda before=before: len(recorder.on("/verdict")) > before + 3, 30, f"judging on after {name}"
                )
            (files / name).write_bytes(original)
        # The product command reads the other product's set through the same path.
        spoil(files / "refs/B/CURRENT", "random bytes")
        recorder.publish("plant/st1/command", json.dumps({"id": "b", "cmd": "product", "product": "B"}))
        recorder.wait_for(lambda: recorder.json_on("/command/result"), 30, what="the product command's answer")
        answer = recorder.json_on("/command/result")[0]
        assert answer["ok"] is False and "CURRENT: is not UTF-8 text" in answer["error"], answer
        latest = recorder.json_on("/verdict")[-1]
        assert (latest["model"], latest["reference"], latest["product"]) == (
            judging["model"],
            judging["reference"],
            judging["product"],
        )
        assert process.poll() is None
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code = output.finish(30)
        recorder.close()
    assert code == 0 and "Traceback" not in output.text, output.text[-3000:]


# -- adversarial probes of the same class: what sits where the file should be


def test_what_sits_in_a_files_place_is_named(files, tmp_path):
    refs = files / "refs" / "A"
    (refs / "CURRENT").write_text("v0007\n")  # a version that is not there
    with pytest.raises(ReferenceSetError, match=r"CURRENT: names v0007, which is not there \(versions: v0001\)"):
        reference_set.load(refs)
    (refs / "CURRENT").unlink()
    (refs / "CURRENT").mkdir()
    with pytest.raises(ReferenceSetError, match="CURRENT: is a folder"):
        reference_set.load(refs)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # a reference folder that is a symlink loop
    with pytest.raises(ReferenceSetError, match="Too many levels of symbolic links"):
        reference_set.load(loop)
    model = files / "model.onnx"
    model.unlink()
    model.mkdir()  # a model replaced by a folder
    with pytest.raises(ModelError, match="model.onnx: is a folder, not the ONNX model"):
        Embedder(model)
    model.rmdir()
    model.symlink_to("/dev/zero")  # endless bytes: refused before reading any
    with pytest.raises(ModelError, match="not a regular file"):
        Embedder(model)


def resign(folder, summary: str):
    """reference.yaml with this text, its checksum made valid again (a tool that writes what it likes)."""
    path = folder / "v0001" / "reference.yaml"
    data = yaml.safe_load(summary)
    data["checksum"] = reference_set._summary_checksum(data)
    path.write_text(summary + f"checksum: {data['checksum']}\n")


def test_a_summary_with_a_valid_checksum_but_hostile_yaml_is_refused(files):
    refs = files / "refs" / "A"
    summary = (refs / "v0001" / "reference.yaml").read_text().split("checksum:")[0]
    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(6)
    )
    (refs / "v0001" / "reference.yaml").write_text(summary + laughs)  # expands to 9**7 values if walked
    with pytest.raises(ReferenceSetError, match="aliases expand to more than 100,000 values"):
        reference_set.load(refs)
    (refs / "v0001" / "reference.yaml").write_text(summary + "1: one\n")  # keys that cannot be sorted together
    with pytest.raises(ReferenceSetError, match="reference.yaml: not a reference set summary"):
        reference_set.load(refs)


def test_arrays_with_a_valid_checksum_but_damaged_bytes_are_refused(files):
    import hashlib

    refs = files / "refs" / "A"
    arrays = refs / "v0001" / "arrays.npz"
    summary_path = refs / "v0001" / "reference.yaml"
    summary = yaml.safe_load(summary_path.read_text())
    for damaged in (arrays.read_bytes()[:300], b"", random.Random(3).randbytes(4000)):
        arrays.write_bytes(damaged)
        summary["arrays_sha256"] = hashlib.sha256(damaged).hexdigest()
        summary["checksum"] = reference_set._summary_checksum(summary)
        summary_path.write_text(yaml.safe_dump(summary))
        with pytest.raises(ReferenceSetError, match="arrays.npz: unusable arrays"):
            reference_set.load(refs)


# -- files read whole are capped before parsing


def test_a_huge_configuration_is_refused_before_parsing(tmp_path, capsys):
    config = tmp_path / "station.yaml"
    chunk = "".join(f"k{index:07d}: [1, 2]\n" for index in range(55_000))  # 1 MB of keys
    config.write_text("station: st1\n" + chunk * 50)  # 50 MB: parsing it took minutes and gigabytes
    assert main(["check", "-c", str(config)]) == 78
    err = capsys.readouterr().err
    assert "MiB is larger than a station configuration can be (256 KiB at most)" in err, err
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # would block an open() without a writer
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config(fifo)


def test_a_configuration_with_thousands_of_problems_lists_a_hundred(tmp_path):
    config = tmp_path / "station.yaml"
    config.write_text("".join(f"k{index}: 1\n" for index in range(5000)))
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    lines = str(refused.value).splitlines()
    assert len(lines) == 101 and lines[-1].startswith("... and ") and lines[-1].endswith(" more problems")


def test_a_huge_secret_file_is_refused_naming_the_key(tmp_path):
    from station.runtime.config.station import CameraConfig
    from station.runtime.config.credentials import camera_credentials

    secret = tmp_path / "camera.secret"
    secret.write_bytes(b"user:" + b"p" * (1 << 20))
    camera = CameraConfig(source="rtsp://10.0.0.5/stream", credentials_file=secret)
    with pytest.raises(ConfigError, match=r"camera.credentials_file: .*camera.secret: 1.0 MiB is larger than"):
        camera_credentials(camera, env={})
    secret.write_bytes(b"\xff\xfeuser:pass")
    with pytest.raises(ConfigError, match="camera.credentials_file: .*is not UTF-8 text"):
        camera_credentials(camera, env={})
