"""The Publisher against a real mosquitto on loopback: no mocks of the broker."""

import json
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from station.core.backoff import Backoff
from station.runtime.config.station import MqttConfig
from station.core.errors import PublisherError
from station.runtime.mqtt.outbox import Outbox
from station.tools.loopback import free_port
from station.runtime.config.credentials import read_password
from station.core.topics import Topics
from station.runtime.mqtt.publisher import Publisher

FAST = dict(first=0.1, ceiling=0.5)


@pytest.fixture
def new_broker(mosquitto, tmp_path):
    """Start a dedicated broker (conftest's Broker class) with extra configuration."""
    brokers = []

    def start(extra_config: str):
        broker = type(mosquitto)(tmp_path, extra_config=extra_config)
        broker.start()
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.stop()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Listener:
    """A plain paho subscriber recording (topic, payload, retain) of every message."""

    def __init__(self, broker, topic: str, client_id: str | None = None, clean: bool = True):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}", clean_session=clean
        )
        self.client.reconnect_delay_set(0.1, 0.5)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(5), "listener could not subscribe"

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [payload for t, payload, _ in list(self.messages) if topic is None or t == topic]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_config(broker, **overrides) -> MqttConfig:
    return MqttConfig(host=broker.host, port=broker.port, keepalive=5, **overrides)


def station_id() -> str:
    return f"st-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "outbox.db", max_messages=10_000)
    yield box
    box.close()


def put_verdicts(outbox: Outbox, topic: str, numbers) -> None:
    outbox.put_many([(topic, str(n).encode(), 1, False) for n in numbers])


def test_topics_follow_prefix_and_station():
    topics = Topics.for_station("plant/inspection", "line1-st1")
    assert topics.verdict == "plant/inspection/line1-st1/verdict"
    assert topics.command_result == "plant/inspection/line1-st1/command/result"


def test_messages_arrive_in_order_with_qos1_and_are_acked(mosquitto, outbox):
    station = station_id()
    publisher = Publisher(mqtt_config(mosquitto), station, outbox, max_inflight=8, backoff=Backoff(**FAST))
    listener = Listener(mosquitto, publisher.topics.verdict)
    put_verdicts(outbox, publisher.topics.verdict, range(300))
    publisher.start()
    try:
        assert publisher.flush(15), f"outbox still holds {outbox.depth()} messages"
        wait_for(lambda: len(listener.messages) >= 300, what="300 verdicts")
        assert listener.payloads() == [str(n).encode() for n in range(300)]
        assert outbox.depth() == 0 and publisher.connected
        put_verdicts(outbox, publisher.topics.verdict, [300])  # later messages go out on notify
        publisher.notify_outbox()
        wait_for(lambda: len(listener.messages) == 301, timeout=5, what="the notified verdict")
        # No Nagle on the connection: a lone verdict is not held back for the broker's delayed ACK.
        assert publisher._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        publisher.stop()
        listener.close()


def test_broker_restart_mid_stream_loses_nothing_and_keeps_order(new_broker, tmp_path, outbox):
    # Persistence keeps the listener's session (and what is queued for it) across the restart,
    # so the listener itself cannot miss messages while it reconnects.
    broker = new_broker(f"persistence true\npersistence_location {tmp_path}/\nuser root\n")
    station = station_id()
    publisher = Publisher(mqtt_config(broker), station, outbox, max_inflight=10, backoff=Backoff(**FAST))
    listener = Listener(broker, publisher.topics.verdict, client_id=f"listener-{station}", clean=False)
    total = 600
    publisher.start()
    try:
        for start in range(0, total, 20):  # a steady stream: 20 verdicts every 10 ms
            put_verdicts(outbox, publisher.topics.verdict, range(start, start + 20))
            publisher.notify_outbox()
            time.sleep(0.01)
            if start == 200:
                received_before = len(listener.messages)
                broker.stop()
                time.sleep(0.5)
                broker.start()
        assert 0 < received_before < total, "the broker must go down mid-stream"
        assert publisher.flush(20), f"outbox still holds {outbox.depth()} messages"
        wait_for(lambda: len(set(listener.payloads())) == total, timeout=10, what="every verdict")
    finally:
        publisher.stop()
        listener.close()
    numbers = [int(p) for p in listener.payloads()]
    highest, duplicates = -1, 0
    for n in numbers:
        if n <= highest:
            duplicates += 1  # a QoS 1 redelivery of something already seen
        else:
            assert n == highest + 1, f"gap or reorder: {n} after {highest}"
            highest = n
    assert highest == total - 1
    print(f"{duplicates} duplicate deliveries after the broker restart")
    assert duplicates <= 3 * publisher.max_inflight + 20  # bounded by the in-flight windows


def retained_status(broker, topic: str) -> bytes | None:
    listener = Listener(broker, topic)
    try:
        wait_for(lambda: listener.messages, timeout=3, what=f"retained {topic}")
        topic_, payload, retain = listener.messages[0]
        assert retain
        return payload
    finally:
        listener.close()


def test_status_online_then_stopped_on_clean_exit(mosquitto, outbox):
    publisher = Publisher(mqtt_config(mosquitto), station_id(), outbox, backoff=Backoff(**FAST))
    publisher.start()
    try:
        wait_for(lambda: publisher.connected, what="connect")
        assert retained_status(mosquitto, publisher.topics.status) == b"online"
        publisher.publish_state({"product": "A", "paused": False})
        assert publisher.publish_stats({"fps": 12.5})
        wait_for(lambda: _retained(mosquitto, publisher.topics.state) is not None, what="state")
        assert json.loads(_retained(mosquitto, publisher.topics.state)) == {
            "schema_version": 1,
            "product": "A",
            "paused": False,
        }
    finally:
        publisher.stop(clean=True)
    assert not publisher.connected
    assert retained_status(mosquitto, publisher.topics.status) == b"stopped"
    assert not publisher.publish_stats({"fps": 0})  # offline: dropped, not queued


def _retained(broker, topic):
    listener = Listener(broker, topic)
    try:
        time.sleep(0.2)
        return listener.payloads()[0] if listener.messages else None
    finally:
        listener.close()


KILLED_STATION = textwrap.dedent("""
    import sys, time
    from station.runtime.config.station import MqttConfig
    from station.runtime.mqtt.outbox import Outbox
    from station.runtime.mqtt.publisher import Publisher
    host, port, station, db = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    publisher = Publisher(MqttConfig(host=host, port=port, keepalive=5), station, Outbox(db))
    publisher.start()
    while not publisher.connected:
        time.sleep(0.02)
    print("connected", flush=True)
    time.sleep(60)
""")


def test_killed_station_leaves_the_will_offline_retained(mosquitto, tmp_path):
    station = station_id()
    topics = Topics.for_station("inspection", station)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_STATION,
            mosquitto.host,
            str(mosquitto.port),
            station,
            str(tmp_path / "outbox.db"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "connected"
        assert retained_status(mosquitto, topics.status) == b"online"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(5)
    wait_for(lambda: _retained(mosquitto, topics.status) == b"offline", timeout=5, what="the will")


def test_retained_command_is_ignored_and_a_live_command_answered(mosquitto, outbox, caplog):
    station = station_id()
    topics = Topics.for_station("inspection", station)
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    sender.publish(topics.command, b'{"cmd": "retained-reset"}', qos=1, retain=True).wait_for_publish(5)
    calls = []

    def handle(payload: bytes, reply):
        calls.append(payload)
        reply({"ok": True, "got": json.loads(payload)["cmd"]})

    publisher = Publisher(mqtt_config(mosquitto), station, outbox, on_command=handle, backoff=Backoff(**FAST))
    results = Listener(mosquitto, topics.command_result)
    try:
        with caplog.at_level(logging.WARNING, logger="station.runtime.mqtt.publisher"):
            publisher.start()
            wait_for(lambda: publisher.connected, what="connect")
            time.sleep(0.2)  # the retained command arrives right after subscribing
            sender.publish(topics.command, b'{"cmd": "pause"}', qos=1).wait_for_publish(5)
            wait_for(lambda: results.messages, timeout=5, what="command result")
        assert calls == [b'{"cmd": "pause"}']
        assert json.loads(results.payloads()[0]) == {"schema_version": 1, "ok": True, "got": "pause"}
        assert any("ignoring a retained command" in r.getMessage() for r in caplog.records)
    finally:
        sender.publish(topics.command, b"", qos=1, retain=True).wait_for_publish(5)  # clear it
        sender.disconnect()
        sender.loop_stop()
        publisher.stop()
        results.close()


def test_a_failing_command_handler_answers_with_the_error(mosquitto, outbox):
    station = station_id()

    def broken(payload, reply):
        raise ValueError("unknown product Z")

    publisher = Publisher(mqtt_config(mosquitto), station, outbox, on_command=broken, backoff=Backoff(**FAST))
    results = Listener(mosquitto, publisher.topics.command_result)
    publisher.start()
    try:
        wait_for(lambda: publisher.connected, what="connect")
        results.client.publish(publisher.topics.command, b"switch Z", qos=1).wait_for_publish(5)
        wait_for(lambda: results.messages, timeout=5, what="command result")
        assert json.loads(results.payloads()[0]) == {
            "schema_version": 1,
            "ok": False,
            "error": "command failed: unknown product Z",
        }
        assert publisher.connected  # the network thread survived
    finally:
        publisher.stop()
        results.close()


@pytest.fixture
def auth_broker(new_broker, tmp_path):
    password_file = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(password_file), "station", "s3cret-pw"], check=True)
    password_file.chmod(0o644)
    # user root: mosquitto started as root drops to "mosquitto", which cannot read pytest's 0700 tmp folders.
    return new_broker(f"allow_anonymous false\npassword_file {password_file}\nuser root\n")


def test_refused_login_is_explained_never_leaks_the_password_and_keeps_retrying(auth_broker, tmp_path, outbox, caplog):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    config = mqtt_config(auth_broker, username="station", password_file=wrong)
    publisher = Publisher(config, station_id(), outbox, backoff=Backoff(first=0.1, ceiling=0.2))
    with caplog.at_level(logging.DEBUG):
        publisher.start()
        try:
            wait_for(
                lambda: sum("not authorised: check username/password" in r.getMessage() for r in caplog.records) >= 2,
                timeout=5,
                what="two refused logins",
            )
            assert not publisher.connected
        finally:
            publisher.stop()
    assert all("not-the-password" not in r.getMessage() for r in caplog.records)


def test_password_from_a_systemd_credential_logs_in(auth_broker, tmp_path, outbox):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("s3cret-pw\n")
    config = mqtt_config(auth_broker, username="station", password_credential="mqtt-password")
    publisher = Publisher(
        config, station_id(), outbox, env={"CREDENTIALS_DIRECTORY": str(credentials)}, backoff=Backoff(**FAST)
    )
    publisher.start()
    try:
        wait_for(lambda: publisher.connected, timeout=5, what="login with the credential")
    finally:
        publisher.stop()


def test_password_sources_fail_with_a_message(tmp_path):
    config = MqttConfig(username="u", password_credential="mqtt")
    with pytest.raises(PublisherError, match="CREDENTIALS_DIRECTORY is not set"):
        read_password(config, env={})
    with pytest.raises(PublisherError, match="mqtt.password_file: .*absent: the MQTT password file cannot be read"):
        read_password(MqttConfig(username="u", password_file=tmp_path / "absent"), env={})
    assert read_password(MqttConfig(), env={}) is None


def test_unreachable_broker_backs_off_without_spinning(outbox, caplog):
    config = MqttConfig(host="127.0.0.1", port=free_port())
    publisher = Publisher(config, station_id(), outbox, backoff=Backoff(first=0.2, ceiling=0.4))
    with caplog.at_level(logging.WARNING, logger="station.runtime.mqtt.publisher"):
        publisher.start()
        time.sleep(1.5)
        publisher.stop()
    attempts = [r for r in caplog.records if "unreachable" in r.getMessage()]
    # Delays 0.1-0.2, 0.2-0.4, then 0.2-0.4 each: between 3 and 9 attempts in 1.5 s, never hundreds.
    assert 3 <= len(attempts) <= 9, len(attempts)
    assert not publisher.connected


def make_certificates(folder):
    """A CA, a server certificate for 127.0.0.1 and a client certificate (EC keys: fast)."""

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        run(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        (folder / f"{name}.ext").write_text(extra + "\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
        )
    for path in folder.iterdir():
        path.chmod(0o644)


def test_tls_with_ca_and_client_certificate(new_broker, tmp_path, outbox):
    tls = tmp_path / "tls"
    tls.mkdir()
    make_certificates(tls)
    broker = new_broker(
        f"cafile {tls}/ca.pem\ncertfile {tls}/server.pem\nkeyfile {tls}/server.key\n"
        f"require_certificate true\nuser root\n"
    )
    with_cert = mqtt_config(broker, tls={"ca": tls / "ca.pem", "cert": tls / "client.pem", "key": tls / "client.key"})
    publisher = Publisher(with_cert, station_id(), outbox, backoff=Backoff(**FAST))
    put_verdicts(outbox, publisher.topics.verdict, range(3))
    publisher.start()
    try:
        wait_for(lambda: publisher.connected, timeout=5, what="a TLS connection")
        assert publisher.flush(5)
    finally:
        publisher.stop()
    without_cert = mqtt_config(broker, tls={"ca": tls / "ca.pem"})
    refused = Publisher(without_cert, station_id(), outbox, backoff=Backoff(**FAST))
    refused.start()
    try:
        time.sleep(0.8)
        assert not refused.connected  # the broker requires a client certificate
    finally:
        refused.stop()
    with pytest.raises(PublisherError, match="mqtt.tls"):
        Publisher(mqtt_config(broker, tls={"ca": tls / "absent.pem"}), station_id(), outbox).start()
