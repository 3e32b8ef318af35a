"""The station daemon as a real process against a real mosquitto, with real signals."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jsonschema

from tests.daemon_helpers import TimedNotify, finish, schema, start_station, write_config
from tests.mqtt_helpers import Recorder


def test_a_folder_of_parts_gives_one_verdict_each_then_stopped(tmp_path, station_files, sim_dataset, broker):
    recorder = Recorder(broker.host, broker.port, "plant/#")
    notify = TimedNotify(tmp_path / "notify.sock")
    config = write_config(tmp_path, station_files, broker, f"{{source: {sim_dataset}}}")
    code, output = finish(start_station(config, notify, watchdog_usec=2_000_000))
    assert code == 0, output
    n_images = sum(1 for p in sim_dataset.rglob("*.png"))
    recorder.wait_for(lambda: len(recorder.on("/verdict")) >= n_images, what="all verdicts")
    verdicts = recorder.json_on("/verdict")
    assert len(verdicts) == n_images
    assert [v["seq"] for v in verdicts] == list(range(1, n_images + 1))  # in order, no gaps
    verdict_schema = schema("verdict")
    for verdict in verdicts:
        jsonschema.validate(verdict, verdict_schema)
    assert sorted(v["source"] for v in verdicts) == sorted(
        str(p.relative_to(sim_dataset)) for p in sim_dataset.rglob("*.png")
    )
    assert {v["product"] for v in verdicts} == {"A"} and {v["metric"] for v in verdicts} == {"mahalanobis"}
    assert len({v["id"] for v in verdicts}) == n_images
    recorder.wait_for(
        lambda: recorder.on("/status") and recorder.on("/status")[-1].payload == b"stopped", what="stopped"
    )
    state = recorder.json_on("/state")[-1]
    jsonschema.validate(state, schema("state"))
    for stats in recorder.json_on("/stats"):
        jsonschema.validate(stats, schema("stats"))
    assert recorder.json_on("/stats")[-1]["processed"] == n_images
    ng_ids = {v["id"] for v in verdicts if v["verdict"] == "NG"}
    kept = {p.stem for p in (tmp_path / "state" / "crops" / "NG").glob("*.png")}
    assert ng_ids and kept == ng_ids  # every NG crop kept for review, named by its verdict id
    messages = notify.lines()
    notify.close()
    assert "READY=1" in messages and "STOPPING=1" in messages and "WATCHDOG=1" in messages
    assert any(m.startswith("STATUS=product A") for m in messages)
    recorder.close()

    # A restart continues the seq where the last run stopped, never reusing one.
    recorder = Recorder(broker.host, broker.port, "plant/+/verdict")
    code, output = finish(start_station(config))
    assert code == 0, output
    recorder.wait_for(lambda: len(recorder.on("/verdict")) >= n_images, what="second run")
    assert [v["seq"] for v in recorder.json_on("/verdict")] == list(range(n_images + 1, 2 * n_images + 1))
    recorder.close()


def test_an_outbox_smaller_than_a_batch_stores_it_in_parts_and_loses_nothing(
    tmp_path, station_files, sim_dataset, broker
):
    """A folder judged in batches larger than outbox.max_messages: each batch is stored as room comes.
    Stored whole, a batch waited forever (with the broker up) for more room than the outbox could give."""
    recorder = Recorder(broker.host, broker.port, "plant/+/verdict")
    config = write_config(tmp_path, station_files, broker, f"{{source: {sim_dataset}}}", outbox="{max_messages: 3}")
    code, output = finish(start_station(config), timeout=120)
    assert code == 0, output
    n_images = sum(1 for p in sim_dataset.rglob("*.png"))
    recorder.wait_for(lambda: len(recorder.on("/verdict")) >= n_images, what="all verdicts")
    assert [v["seq"] for v in recorder.json_on("/verdict")] == list(range(1, n_images + 1))
    assert "not stored" not in output and "Traceback" not in output
    recorder.close()


def test_commands_are_answered_and_a_malformed_one_changes_nothing(tmp_path, station_files, broker):
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=5", fps: 50}')
    command_topic = "plant/st1/command"
    # A retained command waits on the broker and reaches the station when it subscribes: never act on it.
    recorder.publish(command_topic, json.dumps({"id": "r1", "cmd": "pause"}), retain=True)
    process = start_station(config)
    try:
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > 5, what="first verdicts")
        assert recorder.json_on("/state")[-1]["paused"] is False
        assert not any(a["id"] == "r1" for a in recorder.json_on("/command/result"))
        recorder.publish(command_topic, b"", retain=True)  # clear it
        garbage = [
            b"\xff\xfe",
            b"[]",
            b"{}",
            b'{"id": 5, "cmd": "pause"}',
            b'{"id": "x1", "cmd": "explode"}',
            b'{"id": "x2", "cmd": "product"}',
            b'{"id": "x3", "cmd": "product", "product": "../etc"}',
            b'{"id": "x4", "cmd": "trigger", "part_id": "p1"}',
            b"{" * 5000,
            b"x" * 100_000,
        ]
        for payload in garbage:
            recorder.publish(command_topic, payload)
        recorder.wait_for(lambda: len(recorder.on("/command/result")) >= len(garbage), what="an answer each")
        answers = recorder.json_on("/command/result")
        assert all(a["ok"] is False and a["error"] for a in answers)
        assert {a["id"] for a in answers} >= {"x1", "x2", "x3", "x4"}
        assert "unknown product '../etc'" in next(a["error"] for a in answers if a["id"] == "x3")
        assert recorder.json_on("/state")[-1]["product"] == "A"

        recorder.publish(command_topic, json.dumps({"id": "c1", "cmd": "product", "product": "B"}))
        recorder.wait_for(lambda: any(a["id"] == "c1" for a in recorder.json_on("/command/result")), what="c1")
        assert next(a for a in recorder.json_on("/command/result") if a["id"] == "c1")["ok"] is True
        recorder.wait_for(lambda: recorder.json_on("/state")[-1]["product"] == "B", what="state B")
        seq_after_changeover = max(v["seq"] for v in recorder.json_on("/verdict"))
        recorder.wait_for(
            lambda: any(v["product"] == "B" and v["seq"] > seq_after_changeover for v in recorder.json_on("/verdict")),
            what="verdicts for B",
        )
        assert recorder.json_on("/verdict")[-1]["metric"] == "minkowski"

        recorder.publish(command_topic, json.dumps({"id": "p1", "cmd": "pause"}))
        recorder.wait_for(lambda: recorder.json_on("/state")[-1]["paused"] is True, what="paused")
        time.sleep(0.3)
        paused_count = len(recorder.on("/verdict"))
        time.sleep(0.6)
        assert len(recorder.on("/verdict")) == paused_count
        recorder.publish(command_topic, json.dumps({"id": "p2", "cmd": "resume"}))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > paused_count + 5, what="verdicts after resume")
    finally:
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, timeout=10)
    assert code == 0, output
    assert time.monotonic() - started < 5
    recorder.wait_for(lambda: recorder.on("/status")[-1].payload == b"stopped", what="stopped")
    recorder.close()


def test_a_corrupt_reference_on_reload_is_refused_and_the_old_one_keeps_running(tmp_path, station_files, broker):
    import shutil

    files = tmp_path / "files"
    shutil.copytree(station_files, files)
    recorder = Recorder(broker.host, broker.port, "plant/#")
    notify = TimedNotify(tmp_path / "notify.sock")
    config = write_config(tmp_path, files, broker, '{source: "sim://?seed=6", fps: 100}')
    process = start_station(config, notify)
    try:
        recorder.wait_for(lambda: recorder.on("/verdict"), what="first verdict")
        arrays = files / "refs" / "A" / "v0001" / "arrays.npz"
        arrays.write_bytes(arrays.read_bytes()[:-40])
        for _ in range(20):  # a storm of SIGHUPs
            process.send_signal(signal.SIGHUP)
        recorder.publish("plant/st1/command", json.dumps({"id": "r1", "cmd": "reload"}))
        recorder.wait_for(lambda: any(a["id"] == "r1" for a in recorder.json_on("/command/result")), what="r1")
        answer = next(a for a in recorder.json_on("/command/result") if a["id"] == "r1")
        assert answer["ok"] is False and "checksum mismatch" in answer["error"]
        before = len(recorder.on("/verdict"))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > before + 20, what="still judging")
        assert recorder.json_on("/verdict")[-1]["reference"] == 1
        messages = notify.lines()
        assert "RELOADING=1" in messages and messages.count("READY=1") >= 2
        assert any("refused" in m for m in messages if m.startswith("STATUS="))
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, timeout=10)
        notify.close()
    assert code == 0, output
    assert "reload refused" in output or "command refused" in output
    recorder.close()


def test_signals_with_no_meaning_are_said_and_ignored_not_a_silent_death(tmp_path, station_files, broker):
    recorder = Recorder(broker.host, broker.port, "plant/st1/verdict")
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=6", fps: 50}')
    process = start_station(config)
    try:
        recorder.wait_for(lambda: recorder.on("/verdict"), what="first verdict")
        for unused in (signal.SIGUSR1, signal.SIGUSR2):  # each would end the process unsaid by default
            process.send_signal(unused)
        before = len(recorder.on("/verdict"))
        recorder.wait_for(lambda: len(recorder.on("/verdict")) > before + 10, what="still judging")
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, timeout=30)
        recorder.close()
    assert code == 0, output
    for name in ("SIGUSR1", "SIGUSR2"):
        assert f"{name} means nothing to the station: ignored" in output, output


def test_the_daemon_with_the_bundled_int8_model_judges_simulated_parts_accurately(tmp_path, broker):
    """Through the whole path: folder camera -> daemon -> MQTT, against the simulated truth."""
    from station.tools.demo import DEMO_MODEL, DEMO_REFERENCE
    from station.tools.simulate import write_dataset

    parts = tmp_path / "parts"
    write_dataset(parts, count=300, seed=31)  # seeds the bundled model never saw (101, 102)
    config = tmp_path / "station.yaml"
    config.write_text(
        f"station: st1\ncamera: {{source: {parts}}}\nmodel: {DEMO_MODEL}\nreference: {DEMO_REFERENCE}\n"
        f"state_dir: {tmp_path / 'state'}\nmqtt: {{host: 127.0.0.1, port: {broker.port}}}\n"
    )
    recorder = Recorder(broker.host, broker.port, "inspection/st1/verdict")
    code, output = finish(start_station(config))
    assert code == 0, output
    recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 300, what="300 verdicts")
    verdicts = recorder.json_on("/verdict")
    truth_ng = [Path(v["source"]).parts[0] != "good" for v in verdicts]
    accuracy = sum((v["verdict"] == "NG") == ng for v, ng in zip(verdicts, truth_ng)) / len(verdicts)
    assert accuracy >= 0.97, accuracy
    recorder.close()


def test_mqtt_trigger_mode_judges_the_freshest_frame_once_per_trigger(tmp_path, station_files, broker):
    recorder = Recorder(broker.host, broker.port, "plant/#")
    config = write_config(tmp_path, station_files, broker, '{source: "sim://?seed=8", fps: 40}', trigger="mqtt")
    process = start_station(config)
    try:
        recorder.wait_for(
            lambda: recorder.json_on("/state") and recorder.json_on("/state")[-1]["trigger"] == "mqtt",
            what="state in trigger mode",
        )
        time.sleep(1.0)
        assert recorder.on("/verdict") == []  # nothing judged without a trigger, though frames flow
        for index in range(5):
            recorder.publish(
                "plant/st1/command", json.dumps({"id": f"t{index}", "cmd": "trigger", "part_id": f"P-{index}"})
            )
            time.sleep(0.1)
        recorder.wait_for(lambda: len(recorder.on("/verdict")) >= 5, what="five verdicts")
        verdicts = recorder.json_on("/verdict")
        assert [v["part_id"] for v in verdicts] == [f"P-{i}" for i in range(5)]
        frames = [int(v["source"].split(":")[-1]) for v in verdicts]
        assert frames == sorted(set(frames))  # a fresh frame each time, never the same one twice
        assert all(v["latency_ms"] < 1000 for v in verdicts)  # the freshest frame, not a queued one
        answers = {a["id"]: a for a in recorder.json_on("/command/result")}
        assert all(answers[f"t{i}"]["ok"] for i in range(5))
        time.sleep(0.5)
        assert len(recorder.on("/verdict")) == 5
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, timeout=10)
    assert code == 0, output
    recorder.close()
