"""The broker refuses: ACLs, size limits, a broker that never acknowledges (MQTT 5).

A real mosquitto with an acl_file, max_packet_size or message_size_limit. In
each case the station says so once, keeps the refused verdicts in its outbox,
lets other topics flow, and delivers everything, in order, once the broker
allows it again.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time

import pytest

from tests.daemon_helpers import Output, finish, start_station, write_config
from tests.fault_proxy import PUBACK, FaultProxy
from tests.mqtt_helpers import Recorder
from tests.conftest import Broker

STATION_TOPICS = """topic read #
topic write plant/st1/status
topic write plant/st1/state
topic write plant/st1/stats
topic write plant/st1/command/result
"""


@pytest.fixture(autouse=True)
def launched():
    """Stations these tests start; a failing test must not leave one waiting for a broker forever."""
    processes = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def launch(launched: list, config):
    process = start_station(config)
    launched.append(process)
    return process


def running_broker(folder, extra: str) -> Broker:
    folder.mkdir(exist_ok=True)
    # user root: mosquitto started as root drops to "mosquitto", which cannot read pytest's 0700 tmp folders.
    return Broker(folder, "user root\n" + extra).start()


def assert_complete_in_order(verdicts: list[dict], expected: int):
    seqs = [v["seq"] for v in verdicts]
    assert sorted(set(seqs)) == list(range(1, expected + 1)), f"missing seqs among {len(set(seqs))}"
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == sorted(first_seen), "verdicts out of order"


def test_an_acl_refusal_holds_verdicts_until_the_broker_allows_them(launched, tmp_path, station_files, sim_dataset):
    acl = tmp_path / "acl"
    acl.write_text(STATION_TOPICS)
    broker = running_broker(tmp_path / "broker", f"acl_file {acl}\n")
    expected = sum(1 for _ in (sim_dataset / "good").glob("*.png"))
    try:
        recorder = Recorder(broker.host, broker.port, "plant/#")
        config = write_config(
            tmp_path, station_files, broker, f"{{source: {sim_dataset / 'good'}}}", stats_interval="0.3"
        )
        process = launch(launched, config)
        output = Output(process)
        recorder.wait_for(
            lambda: any(s.get("mqtt_refused", 0) > 0 for s in recorder.json_on("/stats")),
            what="stats counting refusals",
        )
        recorder.wait_for(
            lambda: any(
                "plant/st1/verdict: refused by the broker (Not authorized)" in p
                for st in recorder.json_on("/state")
                for p in st["problems"]
            ),
            what="state",
        )
        assert not recorder.on("/verdict") and process.poll() is None  # nothing lost, nothing claimed delivered
        acl.write_text(STATION_TOPICS + "topic write plant/st1/verdict\n")
        broker.process.send_signal(signal.SIGHUP)  # mosquitto reloads its ACL
        assert output.finish(60) == 0, output.text
        recorder.wait_for(
            lambda: len({v["seq"] for v in recorder.json_on("/verdict")}) >= expected,
            timeout=30,
            what="every held verdict",
        )
        assert_complete_in_order(recorder.json_on("/verdict"), expected)
        assert output.count("refused by the broker (Not authorized) on plant/st1/verdict") == 1, output.text
        assert "accepts plant/st1/verdict again" in output.text and "Traceback" not in output.text
        recorder.close()
    finally:
        broker.stop()


def test_messages_over_the_brokers_maximum_packet_size_are_kept_not_sent(
    launched, tmp_path, station_files, sim_dataset
):
    broker = running_broker(tmp_path / "broker", "max_packet_size 420\n")
    expected = sum(1 for _ in (sim_dataset / "good").glob("*.png"))
    config = write_config(tmp_path, station_files, broker, f"{{source: {sim_dataset / 'good'}}}")
    try:
        recorder = Recorder(broker.host, broker.port, "plant/#")
        process = launch(launched, config)
        output = Output(process)
        output.wait_for("larger than the broker's maximum packet size (420 bytes)", timeout=20)
        time.sleep(1.0)
        assert not recorder.on("/verdict") and process.poll() is None
        assert "MQTT disconnected" not in output.text  # never sent: the broker had no reason to drop us
        recorder.close()
        broker.stop()  # the same broker without the limit, on the same port
        broker.config.write_text(broker.config.read_text().replace("max_packet_size 420\n", ""))
        broker.start()
        recorder = Recorder(broker.host, broker.port, "plant/#")
        assert output.finish(60) == 0, output.text
        recorder.wait_for(
            lambda: len({v["seq"] for v in recorder.json_on("/verdict")}) >= expected,
            timeout=30,
            what="every kept verdict",
        )
        assert_complete_in_order(recorder.json_on("/verdict"), expected)
        recorder.close()
    finally:
        broker.stop()


def test_a_broker_that_drops_the_connection_on_a_message_gets_it_held(launched, tmp_path, station_files, sim_dataset):
    # Verdicts of parts with long file names exceed the limit; state and stats stay below it.
    folder = tmp_path / "camera"
    folder.mkdir()
    for index, image in enumerate(sorted((sim_dataset / "good").glob("*.png"))[:5]):
        shutil.copy(image, folder / f"{index}-{'long-name-' * 20}.png")
    broker = running_broker(tmp_path / "broker", "message_size_limit 600\n")  # mosquitto 2.0 disconnects
    config = write_config(tmp_path, station_files, broker, f"{{source: {folder}}}")
    try:
        recorder = Recorder(broker.host, broker.port, "plant/#")
        process = launch(launched, config)
        output = Output(process)
        output.wait_for("the broker drops the connection on this message", timeout=60)
        recorder.wait_for(
            lambda: any("drops the connection" in p for st in recorder.json_on("/state") for p in st["problems"]),
            what="the state saying so",
        )
        assert process.poll() is None
        process.terminate()
        assert output.finish(30) == 0 and "Traceback" not in output.text
        recorder.close()
    finally:
        broker.stop()


def test_a_broker_that_drops_the_connection_after_every_puback_is_named_and_backed_off(
    launched, tmp_path, station_files, mosquitto
):
    """Each CONNACK reset the backoff (about 80 connections a minute) and the state blamed a message size limit."""
    proxy = FaultProxy(mosquitto.port, close_after=PUBACK)
    recorder = Recorder(mosquitto.host, mosquitto.port, "plant/#")
    config = write_config(tmp_path, station_files, proxy, '{source: "sim://?seed=2", fps: 10}')
    process = launch(launched, config)
    output = Output(process)
    try:
        named = "drops each connection within 10 s of accepting it, after acknowledging messages"
        recorder.wait_for(
            lambda: any(named in p for st in recorder.json_on("/state") for p in st["problems"]),
            timeout=60,
            what="the state naming what the broker does",
        )
        started = proxy.connections[0]
        time.sleep(max(0.0, started + 20 - time.monotonic()))
        # Backoff 1 s ... 60 s, no longer reset by a CONNACK: delays of at least 0.5, 1, 2, 4, 8 s, so at most 6 in 20 s.
        assert 2 <= proxy.connections_between(started, started + 20) <= 6, proxy.connections
        assert process.poll() is None and output.count("drops the connection on this message") == 0, output.text
    finally:
        process.terminate()
        assert output.finish(30) == 0 and "Traceback" not in output.text
        recorder.close()
        proxy.shutdown()


def test_a_broker_that_never_acknowledges_is_reported(launched, tmp_path, station_files):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def silent_broker():  # CONNACK (MQTT 5, success, no properties), then never a PUBACK
        connection, _ = listener.accept()
        connection.recv(4096)
        connection.sendall(b"\x20\x03\x00\x00\x00")
        while connection.recv(65536):
            pass

    threading.Thread(target=silent_broker, daemon=True).start()
    fake = type("FakeBroker", (), {"host": "127.0.0.1", "port": port})()
    config = write_config(tmp_path, station_files, fake, '{source: "sim://?seed=2", fps: 50}')
    config.write_text(
        config.read_text().replace("topic_prefix: plant}", "topic_prefix: plant, max_inflight: 4, inflight_timeout: 1}")
    )
    process = launch(launched, config)
    output = Output(process)
    try:
        output.wait_for("has acknowledged none of 4 QoS 1 messages in flight for over 1 s", timeout=30)
    finally:
        process.terminate()
        assert output.finish(30) == 0
    listener.close()


def test_mqtt_3_1_1_warns_that_refusals_cannot_be_seen(tmp_path, station_files, mosquitto):
    config = write_config(tmp_path, station_files, mosquitto, '{source: "sim://?seed=1&count=3"}')
    config.write_text(config.read_text().replace("topic_prefix: plant}", "topic_prefix: plant, protocol: '3.1.1'}"))
    code, output = finish(start_station(config))
    assert code == 0 and "mqtt.protocol 3.1.1: the broker acknowledges messages it refuses" in output, output


def test_a_repeated_trigger_id_is_answered_and_not_judged_twice(launched, tmp_path, station_files, mosquitto):
    config = write_config(tmp_path, station_files, mosquitto, '{source: "sim://?seed=3", fps: 30}', trigger="mqtt")
    recorder = Recorder(mosquitto.host, mosquitto.port, "plant/#")
    process = launch(launched, config)
    try:
        for attempt in range(50):  # until the station's command subscription is in place (a load-proof probe)
            recorder.publish("plant/st1/command", json.dumps({"id": f"probe-{attempt}", "cmd": "resume"}))
            if any(a["id"].startswith("probe") for a in recorder.json_on("/command/result")):
                break
            time.sleep(0.2)
        for _ in range(2):
            recorder.publish("plant/st1/command", json.dumps({"id": "t-1", "cmd": "trigger", "part_id": "P1"}))
        trigger_answers = lambda: [a for a in recorder.json_on("/command/result") if a["id"] == "t-1"]
        recorder.wait_for(lambda: len(trigger_answers()) >= 2, timeout=30, what="two answers")
        time.sleep(0.5)
        answers = trigger_answers()
        assert answers[0]["ok"] is True and answers[1]["ok"] is False and "not judged twice" in answers[1]["error"]
        assert [v["part_id"] for v in recorder.json_on("/verdict")] == ["P1"]
    finally:
        process.terminate()
        assert finish(process)[0] == 0
        recorder.close()


def test_a_broker_that_leaves_an_mqtt5_connect_unanswered_gets_a_hint(launched, tmp_path, station_files):
    """amqtt (the demo's embedded broker) and old brokers speak 3.1.1 and never answer an MQTT 5 CONNECT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def mute_broker():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.recv(4096)  # the CONNECT, never answered

    threading.Thread(target=mute_broker, daemon=True).start()
    fake = type("FakeBroker", (), {"host": "127.0.0.1", "port": listener.getsockname()[1]})()
    config = write_config(tmp_path, station_files, fake, '{source: "sim://?seed=2", fps: 20}')
    process = launch(launched, config)
    output = Output(process)
    try:
        output.wait_for(
            "did not answer it within 10 s; if it speaks only MQTT 3.1.1, set mqtt.protocol: 3.1.1", timeout=30
        )
    finally:
        process.terminate()
        assert output.finish(30) == 0
        listener.close()


def test_a_refused_command_subscription_is_said_in_the_log_and_the_state(launched, tmp_path, station_files, broker):
    """A broker whose ACL lets the station publish but not read its command topic, and says so in its
    SUBACK: every command and trigger from the plant would vanish without a word. Said, and in the state."""
    proxy = FaultProxy(broker.port, refuse_subscriptions=True)
    recorder = Recorder(broker.host, broker.port, "plant/st1/state")
    config = write_config(tmp_path, station_files, proxy, '{source: "sim://?seed=3", fps: 20}', stats_interval="0.3")
    process = launch(launched, config)
    output = Output(process)
    try:
        output.wait_for("the broker refused the subscription to plant/st1/command (Not authorized)", timeout=30)
        recorder.wait_for(
            lambda: any(
                "refused the subscription to plant/st1/command" in p
                for st in recorder.json_on("/state")
                for p in st["problems"]
            ),
            what="state",
        )
        process.send_signal(signal.SIGTERM)
        assert output.finish(30) == 0, output.text
        assert output.count("refused the subscription") == 1 and "Traceback" not in output.text
    finally:
        recorder.close()
        proxy.shutdown()
