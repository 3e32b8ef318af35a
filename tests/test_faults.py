"""Faults a plant's IT meets on a line PC: each loud, bounded, and nothing judged is lost.

Real processes, a real mosquitto, real files. See docs/faults.md for the matrix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import jsonschema
import numpy as np
import pytest

from station.cli import main
from tests.daemon_helpers import TimedNotify, finish, schema, start_station, write_config
from tests.mqtt_helpers import Recorder
from tests.test_security import png_header_only


def count_images(folder) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


def all_verdicts(recorder: Recorder, expected: int) -> list[dict]:
    recorder.wait_for(
        lambda: len({v["seq"] for v in recorder.json_on("/verdict")}) >= expected, what=f"{expected} verdicts"
    )
    return recorder.json_on("/verdict")


def test_a_second_station_on_the_same_state_exits_75_naming_the_first(tmp_path, station_files, broker):
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=5", fps: 20}')
    first = start_station(config)
    try:
        recorder = Recorder(broker.host, broker.port, "plant/#")
        recorder.wait_for(lambda: recorder.on("/verdict"), what="the first station judging")
        code, output = finish(start_station(config))
        assert code == 75, output
        assert f"already running (pid {first.pid})" in output and "Traceback" not in output
        assert first.poll() is None  # the first one runs on
        # Camera-mode calibration takes the camera only from a stopped station.
        assert main(["calibrate", "-c", str(config), "--product", "B", "--count", "30"]) == 75
        assert first.poll() is None
        recorder.close()
    finally:
        first.terminate()
        assert finish(first)[0] == 0


def test_pause_on_a_finite_source_holds_its_frames_and_survives_a_restart(tmp_path, station_files, broker, sim_dataset):
    n_images = count_images(sim_dataset)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, f"{{source: {sim_dataset}, fps: 40}}")
    process = start_station(config)
    recorder.wait_for(lambda: recorder.on("/verdict"), what="first verdicts")
    recorder.publish("plant/st1/command", json.dumps({"id": "p", "cmd": "pause"}))
    recorder.wait_for(
        lambda: any(a["id"] == "p" and a["ok"] for a in recorder.json_on("/command/result")), what="pause"
    )
    time.sleep(1.0)
    judged_while_paused = len(recorder.on("/verdict"))
    time.sleep(1.0)
    assert len(recorder.on("/verdict")) == judged_while_paused  # nothing judged, nothing dropped
    process.terminate()
    code, output = finish(process)
    assert code == 0, output
    # Restarted, the station says it is paused and judges nothing until resumed. Its first state follows
    # its command subscription: a resume sent before it (a fixed sleep under load) reached nobody.
    states_before = len(recorder.on("/state"))
    process = start_station(config)
    recorder.wait_for(lambda: len(recorder.on("/state")) > states_before, what="the restarted station's state")
    assert recorder.json_on("/state")[-1]["paused"] is True
    time.sleep(1.0)
    assert len(recorder.on("/verdict")) == judged_while_paused
    recorder.publish("plant/st1/command", json.dumps({"id": "r", "cmd": "resume"}))
    code, output = finish(process, timeout=60)
    assert code == 0 and "starts PAUSED" in output, output
    verdicts = all_verdicts(recorder, n_images)
    assert sorted({v["source"] for v in verdicts}) == sorted(
        str(p.relative_to(sim_dataset)) for p in sim_dataset.rglob("*.png")
    )
    recorder.close()


def test_an_roi_outside_the_frame_refuses_to_start_and_a_reload_to_it_is_refused(tmp_path, station_files, broker):
    outside = "{x: 300, y: 200, width: 36, height: 26}"  # sim frames are 320x240
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=1", fps: 20}', roi=outside)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    code, output = finish(start_station(config))
    assert code == 78 and "roi: ROI x=300 y=200 36x26 does not fit in a 320x240 frame" in output, output
    assert "Traceback" not in output
    recorder.wait_for(lambda: recorder.json_on("/state"), what="the state saying why")
    assert any(p.startswith("roi: ") for p in recorder.json_on("/state")[-1]["problems"])
    assert main(["check", "-c", str(config)]) == 78  # check finds it from one frame too

    good = "{x: 142, y: 107, width: 36, height: 26}"
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=1", fps: 20}', roi=good)
    process = start_station(config)
    try:
        recorder.wait_for(lambda: recorder.on("/verdict"), what="verdicts")
        config.write_text(config.read_text().replace(good, outside))
        recorder.publish("plant/st1/command", json.dumps({"id": "rl", "cmd": "reload"}))
        recorder.wait_for(lambda: any(a["id"] == "rl" for a in recorder.json_on("/command/result")), what="answer")
        answer = next(a for a in recorder.json_on("/command/result") if a["id"] == "rl")
        assert answer["ok"] is False and "does not fit" in answer["error"]
        before = len(recorder.on("/verdict"))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > before + 5, what="judging on with the old ROI")
    finally:
        process.terminate()
        assert finish(process)[0] == 0
    recorder.close()


def test_a_file_where_the_crops_folder_goes_loses_crops_never_verdicts(tmp_path, station_files, broker, sim_dataset):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "crops").write_text("not a folder")
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, f"{{source: {sim_dataset}}}")
    started = time.monotonic()
    code, output = finish(start_station(config), timeout=60)
    assert code == 0, output
    assert time.monotonic() - started < 30  # stop finished although the writer could not write
    assert output.count("cannot keep crops in") == 1 and "Traceback" not in output
    verdicts = all_verdicts(recorder, count_images(sim_dataset))
    assert len({v["seq"] for v in verdicts}) == count_images(sim_dataset)
    recorder.wait_for(
        lambda: recorder.json_on("/stats") and recorder.json_on("/stats")[-1]["crops_not_kept"] > 0,
        what="stats counting crops not kept",
    )
    assert any(p.startswith("crops: ") for p in recorder.json_on("/state")[-1]["problems"])
    recorder.close()


def test_start_up_faults_are_messages_and_check_finds_them_first(tmp_path, station_files, broker, capsys):
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=1&count=5"}')
    (tmp_path / "state").write_text("a file, not a folder")
    assert main(["check", "-c", str(config)]) == 78
    assert "state_dir: " in capsys.readouterr().err
    code, output = finish(start_station(config))
    assert code == 78 and "is a file, not a folder" in output and "Traceback" not in output, output
    (tmp_path / "state").unlink()
    config.write_text(config.read_text() + "keep_crops: {max_mb: .inf}\n")
    assert main(["check", "-c", str(config)]) == 78
    assert "keep_crops.max_mb" in capsys.readouterr().err


def test_a_broken_notify_socket_is_warned_about_and_the_station_runs(tmp_path, station_files, broker, sim_dataset):
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, f"{{source: {sim_dataset}}}")
    notify = TimedNotify(tmp_path / "notify.sock")
    notify.close()  # the path is left behind with nobody listening: sendto fails
    (tmp_path / "notify.sock").unlink(missing_ok=True)
    (tmp_path / "notify.sock").write_text("not a socket")
    code, output = finish(start_station(config, notify))
    assert code == 0 and "cannot be used" in output and "Traceback" not in output, output
    assert len({v["seq"] for v in all_verdicts(recorder, count_images(sim_dataset))}) == count_images(sim_dataset)
    recorder.close()


def test_credentials_in_a_camera_url_are_refused_without_repeating_them(tmp_path, station_files, broker, capsys):
    config = write_config(tmp_path, station_files, broker, '{source: "rtsp://admin:hunter2@127.0.0.1:8554/line"}')
    assert main(["check", "-c", str(config)]) == 78
    err = capsys.readouterr().err
    assert "camera.credentials_file" in err and "hunter2" not in err and "admin" not in err


def test_camera_credentials_come_from_a_file_and_never_reach_the_description(tmp_path):
    from station.core.errors import ConfigError
    from station.runtime.config.station import CameraConfig
    from station.runtime.config.credentials import camera_credentials
    from station.runtime.sources import open_source

    secret = tmp_path / "camera.secret"
    secret.write_text("line 1:p@ss word\n")
    camera = CameraConfig(source="rtsp://127.0.0.1:8554/line", credentials_file=secret)
    source = open_source(camera.source, credentials=camera_credentials(camera, env={}))
    assert source.target == "rtsp://line%201:p%40ss%20word@127.0.0.1:8554/line"
    assert source.description == "rtsp://127.0.0.1:8554/line"
    secret.write_text("no colon here")
    with pytest.raises(ConfigError, match="user:password"):
        camera_credentials(camera, env={})


def test_a_decompression_bomb_is_refused_by_its_header_and_the_rest_judged(
    tmp_path, station_files, broker, sim_dataset
):
    folder = tmp_path / "camera"
    shutil.copytree(sim_dataset / "good", folder)
    (folder / "bomb.png").write_bytes(png_header_only(30_000, 30_000))  # 900 MP declared
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, f"{{source: {folder}, max_pixels: 1000000}}")
    code, output = finish(start_station(config))
    assert code == 0, output
    assert "bomb.png: declares 900 MP, more than camera.max_pixels (1 MP): refused before decoding" in output
    assert (
        len({v["seq"] for v in all_verdicts(recorder, count_images(sim_dataset / "good"))}) == count_images(folder) - 1
    )
    recorder.close()


def test_under_systemd_log_lines_carry_syslog_priorities(tmp_path, station_files, broker):
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=1&count=3"}')
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"} | {"JOURNAL_STREAM": "8:12345"}
    done = subprocess.run(
        [sys.executable, "-m", "station", "run", "-c", str(config)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(re.match(r"^<[0-7]>station\.", line) for line in lines), lines
    assert any(line.startswith("<6>station.runtime.daemon: station st1 ready") for line in lines)


BAD_CONTENT = {
    "thresholds.mahalanobis": lambda s: s["thresholds"].update(mahalanobis=float("nan")),
    "thresholds.minkowski": lambda s: s["thresholds"].update(minkowski=-1.0),
    "metric": lambda s: s.update(metric="euclid"),
    "n_good": lambda s: s.pop("n_good"),
    "embedding_dim": lambda s: s.update(embedding_dim=7),  # the arrays are 32-d
}


def spoil(folder, change):
    """A reference set whose checksum is valid but whose content is not."""
    import yaml

    from station.core import reference_set

    summary_path = folder / "v0001" / "reference.yaml"
    summary = yaml.safe_load(summary_path.read_text())
    change(summary)
    summary["checksum"] = reference_set._summary_checksum(summary)
    summary_path.write_text(yaml.safe_dump(summary))


@pytest.mark.parametrize("field", sorted(BAD_CONTENT))
def test_a_reference_set_with_bad_content_is_refused_naming_the_field(tmp_path, station_files, field):
    from station.core import reference_set
    from station.core.reference_set import ReferenceSetError

    folder = tmp_path / "A"
    shutil.copytree(station_files / "refs" / "A", folder)
    spoil(folder, BAD_CONTENT[field])
    with pytest.raises(ReferenceSetError) as refused:
        reference_set.load(folder)
    message = str(refused.value)
    named = "reference.yaml" in message and field in message  # the file and the field
    assert named or ("arrays.npz: reference has shape" in message and field == "embedding_dim"), message


def test_a_bad_reference_set_is_refused_at_start_and_on_reload_the_old_one_runs(tmp_path, station_files, broker):
    refs = tmp_path / "refs"
    shutil.copytree(station_files / "refs", refs)
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=4", fps: 30}')
    config.write_text(config.read_text().replace(str(station_files / "refs"), str(refs)))
    spoil(refs / "B", BAD_CONTENT["thresholds.mahalanobis"])
    recorder = Recorder(broker.host, broker.port, "plant/#")
    process = start_station(config)
    try:
        recorder.wait_for(lambda: recorder.on("/verdict"), what="verdicts with product A")
        recorder.publish("plant/st1/command", json.dumps({"id": "c1", "cmd": "product", "product": "B"}))
        recorder.wait_for(lambda: recorder.json_on("/command/result"), what="an answer")
        answer = recorder.json_on("/command/result")[0]
        assert answer["ok"] is False and "thresholds.mahalanobis" in answer["error"]
        before = len(recorder.on("/verdict"))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > before + 5, what="judging on with A")
        assert {v["product"] for v in recorder.json_on("/verdict")} == {"A"}
    finally:
        process.terminate()
        code, output = finish(process)
    assert code == 0 and "Traceback" not in output
    config.write_text(config.read_text().replace("product: A", "product: B"))
    code, output = finish(start_station(config))
    assert code == 65 and "thresholds.mahalanobis" in output and "Traceback" not in output, output
    recorder.close()


def test_a_truncated_video_says_so_when_it_ends(tmp_path, station_files, broker):
    from station.tools.simulate import write_video

    video = tmp_path / "line.avi"
    write_video(video, tmp_path / "line.csv", count=40, seed=3)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(
        tmp_path, station_files, broker, f"{{source: {video}}}", roi="{x: 142, y: 107, width: 36, height: 26}"
    )
    code, output = finish(start_station(config))
    assert code == 0, output
    judged = len({v["seq"] for v in all_verdicts(recorder, 10)})
    assert f"ended after {judged} of the 40 frames its header announces: the file is truncated" in output
    recorder.close()


def test_calibrating_on_identical_goods_is_refused_with_a_reason(tmp_path, station_files, capsys):
    good = tmp_path / "good"
    good.mkdir()
    image = cv2.imencode(".png", np.full((26, 36), 128, np.uint8))[1].tobytes()
    for index in range(40):
        (good / f"part_{index}.png").write_bytes(image)
    code = main(
        [
            "calibrate",
            "--model",
            str(station_files / "model.onnx"),
            "--good",
            str(good),
            "--out",
            str(tmp_path / "refs"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 65 and "the good parts are identical" in err and "Traceback" not in err
    assert not (tmp_path / "refs").exists()


def test_an_infinite_threshold_is_refused_only_for_the_metric_that_judges(tmp_path, station_files):
    """SOART3 can be unusable (too many goods point away): its threshold is then inf, and the set still loads."""
    from station.core import reference_set
    from station.core.reference_set import ReferenceSetError

    folder = tmp_path / "A"
    shutil.copytree(station_files / "refs" / "A", folder)  # judged by mahalanobis
    spoil(folder, lambda s: s["thresholds"].update(soart3=float("inf")))
    assert reference_set.load(folder).thresholds["soart3"] == float("inf")
    spoil(folder, lambda s: s["thresholds"].update(mahalanobis=float("inf")))
    with pytest.raises(ReferenceSetError, match="thresholds.mahalanobis: the chosen metric's threshold is infinite"):
        reference_set.load(folder)


def test_seq_goes_on_after_the_outbox_is_moved_aside_or_lost_in_a_crash(tmp_path, station_files, broker):
    from tests.daemon_helpers import wait_until

    state = tmp_path / "state"
    recorder = Recorder(broker.host, broker.port, "plant/+/verdict")
    finite = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=4&count=12", fps: 60}')
    code, output = finish(start_station(finite))
    assert code == 0 and "holds no seq: seq starts at 1" in output, output  # a new station says so
    assert (state / "seq").read_text() == "12 last\n"  # a clean stop: the exact last seq
    (state / "outbox.sqlite3").rename(tmp_path / "outbox.aside")  # the exit-74 advice
    code, output = finish(start_station(finite))
    assert code == 0 and "is new, but this station has used seqs up to 12" in output, output
    recorder.wait_for(lambda: len({v["seq"] for v in recorder.json_on("/verdict")}) >= 24, what="24 verdicts")
    assert sorted({v["seq"] for v in recorder.json_on("/verdict")}) == list(range(1, 25))  # no seq twice, no gap

    live = tmp_path / "live.yaml"  # the same station (state folder) on an endless source
    live.write_text(finite.read_text().replace("seed=4&count=12", "seed=5"))
    process = start_station(live)
    recorder.wait_for(lambda: max(v["seq"] for v in recorder.json_on("/verdict")) > 30, what="judging on")
    process.send_signal(signal.SIGKILL)  # a crash: the mark holds a reservation, not the last seq
    process.wait(10)
    used = max(v["seq"] for v in recorder.json_on("/verdict"))
    for leftover in state.glob("outbox.sqlite3*"):  # the damaged outbox moved away, -wal and -shm too
        leftover.unlink()
    finite.write_text(finite.read_text().replace("seed=4&count=12", "seed=6&count=3"))
    code, output = finish(start_station(finite))
    assert code == 0 and "is new, but this station has used seqs up to" in output, output
    wait_until(
        lambda: len([v for v in recorder.json_on("/verdict") if v["source"].startswith("sim:6:")]) >= 3,
        what="the verdicts after the crash",
    )
    after = sorted(v["seq"] for v in recorder.json_on("/verdict") if v["source"].startswith("sim:6:"))
    assert used < after[0] <= used + 1001, (used, after)  # never a reuse; a gap of at most one reservation

    for lost in [*state.glob("outbox.sqlite3*"), state / "seq"]:  # both gone: said at start
        lost.unlink()
    code, output = finish(start_station(finite))
    assert code == 0 and "holds no seq: seq starts at 1" in output, output
    recorder.close()


def test_a_second_calibration_of_a_reference_folder_exits_75_naming_the_first(
    tmp_path, station_files, broker, sim_dataset
):
    from tests.daemon_helpers import wait_until

    refs = tmp_path / "refs"
    shutil.copytree(station_files / "refs", refs)
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=8", fps: 2}')
    config.write_text(config.read_text().replace(str(station_files / "refs"), str(refs)))
    # Camera mode at 2 frames a second holds the folder for 15 s or more.
    first = subprocess.Popen(
        [sys.executable, "-m", "station", "calibrate", "-c", str(config), "--count", "30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = refs / "A" / ".writing.lock"
    try:
        wait_until(lambda: lock.exists() and lock.read_text().startswith(f"{first.pid} "), 30, "the first holding A")
        first.send_signal(signal.SIGSTOP)  # it holds the lock however slow this machine is
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "station",
                "calibrate",
                "--model",
                str(station_files / "model.onnx"),
                "--good",
                str(sim_dataset / "good"),
                "--out",
                str(refs / "A"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 75, second.stderr
        assert f"another calibration (pid {first.pid}) is writing {refs / 'A'}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()  # a crashed calibration: the kernel releases its lock
        first.wait(10)
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(station_files / "model.onnx"),
                "--good",
                str(sim_dataset / "good"),
                "--out",
                str(refs / "A"),
            ]
        )
        == 0
    )
    assert reference_set_versions(refs / "A") == [1, 2]


def reference_set_versions(folder) -> list[int]:
    from station.core import reference_set

    return reference_set.versions(folder)


def write_images(folder, images: dict[str, np.ndarray]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        cv2.imwrite(str(folder / name), image)
    return folder


def good_crops(sim_dataset, count: int, scale: int = 1) -> dict[str, np.ndarray]:
    """The first good parts, enlarged `scale` times a side (the same parts at another frame size)."""
    paths = sorted((sim_dataset / "good").glob("*.png"))[:count]
    return {
        p.name: cv2.resize(
            cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST
        )
        for p in paths
    }


def test_a_source_that_gives_no_frame_is_refused_by_check_and_run(tmp_path, station_files, broker, capsys):
    recorder = Recorder(broker.host, broker.port, "plant/#")
    empty = tmp_path / "camera"
    empty.mkdir()
    cases = [  # (source, exit code of run, what both say)
        (empty, 65, f"image folder {empty} holds no images"),
        (write_images(tmp_path / "broken", {}), 65, "none of its 2 images can be read"),
        (tmp_path / "notes.avi", 65, "notes.avi cannot be opened as a video (not a video file"),
        (tmp_path / "absent.avi", 78, "absent.avi does not exist"),
    ]
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "b.png").write_bytes(b"")
    (tmp_path / "notes.avi").write_text("not a video")
    for source, exit_code, says in cases:
        config = write_config(tmp_path, station_files, broker, f"{{source: {source}}}")
        assert main(["check", "-c", str(config)]) == 78
        err = capsys.readouterr().err
        assert says in err and "camera.source: " in err, err
        code, output = finish(start_station(config))
        assert code == exit_code and "camera.source: nothing to judge: " in output and says in output, output
        assert "Traceback" not in output and "ready" not in output
    recorder.wait_for(
        lambda: any("camera: " in p and "absent.avi" in p for s in recorder.json_on("/state") for p in s["problems"]),
        what="state problem",
    )
    assert not recorder.on("/verdict")
    recorder.close()


def test_a_looping_folder_renamed_away_reconnects_with_a_problem_in_the_state(
    tmp_path, station_files, broker, sim_dataset
):
    folder = write_images(tmp_path / "camera", good_crops(sim_dataset, 5))
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, f"{{source: {folder}, loop: true, fps: 20}}")
    process = start_station(config)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 3, what="verdicts")
        folder.rename(tmp_path / "away")
        lost = lambda s: (
            s["camera"] == "reconnecting" and f"camera: image folder {folder} does not exist" in s["problems"]
        )
        recorder.wait_for(lambda: any(lost(s) for s in recorder.json_on("/state")), what="reconnecting with a problem")
        assert process.poll() is None  # the camera is away, the station is not
        before = len(recorder.on("/verdict"))
        (tmp_path / "away").rename(folder)
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > before + 3, timeout=30, what="verdicts again")
        recorder.wait_for(
            lambda: (
                recorder.json_on("/state")[-1]["camera"] == "ok" and recorder.json_on("/state")[-1]["problems"] == []
            ),
            what="the state clear again",
        )
    finally:
        process.terminate()
        code, output = finish(process)
    assert code == 0 and "is back (reconnect 1)" in output and "Traceback" not in output, output
    recorder.close()


def test_a_video_whose_frame_size_changes_mid_stream_gets_no_verdicts_for_the_other_size(
    tmp_path, station_files, broker
):
    from tests.test_camera import mixed_size_video

    sizes = [(320, 240)] * 6 + [(160, 120)] * 4 + [(320, 240)] * 3
    video = mixed_size_video(tmp_path / "line.mjpg", sizes)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(
        tmp_path, station_files, broker, f"{{source: {video}}}", roi="{x: 20, y: 20, width: 36, height: 26}"
    )  # fits both sizes: only the size gate refuses
    code, output = finish(start_station(config))
    assert code == 0 and "Traceback" not in output, output
    recorder.wait_for(lambda: len(recorder.on("/verdict")) + len(recorder.on("/no_verdict")) >= len(sizes), what="all")
    verdicts, refused = recorder.json_on("/verdict"), recorder.json_on("/no_verdict")
    assert sorted(v["seq"] for v in verdicts + refused) == list(range(1, len(sizes) + 1))  # every frame accounted for
    assert [v["source"] for v in refused] == ["6", "7", "8", "9"]
    assert all("frame size 160x120 differs from the 320x240 the station checked" in v["reason"] for v in refused)
    for message in refused:
        jsonschema.validate(message, schema("no_verdict"))
    problems = [p for s in recorder.json_on("/state") for p in s["problems"]]
    assert any(p.startswith("frame: frame size 160x120 differs") for p in problems)
    assert (
        output.count("frames are not judged: frame size 160x120") == 1 and "frames are judged again (320x240)" in output
    )
    recorder.wait_for(
        lambda: recorder.json_on("/stats") and recorder.json_on("/stats")[-1]["frames_not_judged"] == 4,
        what="stats counting the frames not judged",
    )
    recorder.close()


def test_a_new_frame_size_is_judged_once_a_reload_accepts_it(tmp_path, station_files, broker, sim_dataset):
    folder = write_images(tmp_path / "camera", good_crops(sim_dataset, 4))
    recorder = Recorder(broker.host, broker.port, "plant/#")
    # An ROI set on the first frames (without one, each photo is the whole part at its own size).
    config = write_config(
        tmp_path,
        station_files,
        broker,
        f"{{source: {folder}, loop: true, fps: 20}}",
        roi="{x: 0, y: 0, width: 36, height: 26}",
    )
    process = start_station(config)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 3, what="verdicts at 36x26")
        larger = write_images(tmp_path / "larger", good_crops(sim_dataset, 4, scale=2))
        folder.rename(tmp_path / "old")
        larger.rename(folder)  # the camera now gives 72x52 frames
        recorder.wait_for(lambda: len(recorder.on("/no_verdict")) >= 3, what="no_verdicts for 72x52")
        assert "frame size 72x52 differs from the 36x26" in recorder.json_on("/no_verdict")[-1]["reason"]
        assert any(p.startswith("frame: ") for p in recorder.json_on("/state")[-1]["problems"])
        recorder.publish("plant/st1/command", json.dumps({"id": "rl", "cmd": "reload"}))
        recorder.wait_for(
            lambda: any(a["id"] == "rl" and a["ok"] for a in recorder.json_on("/command/result")), what="the reload"
        )
        before = len(recorder.on("/verdict"))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > before + 3, what="72x52 frames judged")
        recorder.wait_for(lambda: recorder.json_on("/state")[-1]["problems"] == [], what="the problem cleared")
    finally:
        process.terminate()
        code, output = finish(process)
    assert code == 0 and "new frame size 72x52 is judged from now on" in output, output
    recorder.close()


def test_a_frame_too_small_for_the_model_is_refused_at_check_and_at_start(tmp_path, station_files, broker, capsys):
    folder = write_images(tmp_path / "camera", {"dot.png": np.full((1, 1), 128, np.uint8)})
    config = write_config(tmp_path, station_files, broker, f"{{source: {folder}}}")
    says = (
        "the whole frame (no roi is set) of 1x1 pixels is too small for the model's 36x26 input: "
        "a region needs at least 9x7"
    )
    assert main(["check", "-c", str(config)]) == 78
    assert says in capsys.readouterr().err
    code, output = finish(start_station(config))
    assert code == 78 and f"roi: {says}" in output and "Traceback" not in output, output
    # A configured ROI too small is refused from the configuration alone (a V4L2 device gives check no frame).
    config = write_config(
        tmp_path, station_files, broker, '{source: "sim://?seed=1&count=3"}', roi="{x: 10, y: 10, width: 8, height: 26}"
    )
    assert main(["check", "-c", str(config)]) == 78
    assert "ROI x=10 y=10 of 8x26 pixels is too small" in capsys.readouterr().err
    code, output = finish(start_station(config))
    assert code == 78 and "roi: ROI x=10 y=10 of 8x26 pixels is too small" in output and "Traceback" not in output


def test_a_live_camera_that_gives_nothing_keeps_the_station_up_reconnecting(tmp_path, station_files, broker):
    import socket

    with socket.socket() as probe:  # a port nobody listens on: the camera is off
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, f'{{source: "http://127.0.0.1:{port}/stream.mjpg"}}')
    process = start_station(config)
    try:
        says = f"camera: cannot open http://127.0.0.1:{port}/stream.mjpg"
        recorder.wait_for(
            lambda: any(s["camera"] == "reconnecting" and says in s["problems"] for s in recorder.json_on("/state")),
            timeout=30,
            what="the camera's problem",
        )
        assert process.poll() is None  # a live camera that is off is waited for, not a reason to stop
    finally:
        process.terminate()
        code, output = finish(process)
    assert code == 0 and "Traceback" not in output, output
    recorder.close()
