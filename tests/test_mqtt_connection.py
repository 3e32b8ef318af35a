"""Connections that do not hold, and exceptions on the MQTT threads: a real mosquitto, with a fault
proxy on loopback where mosquitto cannot be made to misbehave (tests/fault_proxy.py)."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from station.core.backoff import Backoff
from station.runtime.mqtt.publisher import Publisher
from tests.fault_proxy import CONNACK, PUBACK, FaultProxy
from tests.test_publisher import Listener, mqtt_config, put_verdicts, station_id, wait_for

# A PUBLISH whose topic is not UTF-8 (bytes ff fe): mosquitto would never send one, a broken broker may.
NOT_UTF8_PUBLISH = b"\x30\x06\x00\x02\xff\xfe\x00x"


@pytest.fixture
def outbox(tmp_path):
    from station.runtime.mqtt.outbox import Outbox

    box = Outbox(tmp_path / "outbox.db", max_messages=10_000)
    yield box
    box.close()


@pytest.fixture
def stopping():
    """Publishers and proxies these tests start, stopped even when a test fails."""
    started = []
    yield started
    for thing in reversed(started):
        thing.stop() if isinstance(thing, Publisher) else thing.shutdown()


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:])]


def test_a_broker_that_drops_every_connection_after_a_puback_is_backed_off_and_named(mosquitto, outbox, stopping):
    proxy = FaultProxy(mosquitto.port, close_after=PUBACK)
    stopping.append(proxy)
    publisher = Publisher(mqtt_config(proxy), station_id(), outbox, stable_after=1.0)  # backoff 1 s ... 60 s
    stopping.append(publisher)
    put_verdicts(outbox, publisher.topics.verdict, range(50))
    publisher.publish_state({"problems": []})  # a state to re-send after every connect, as the daemon has
    publisher.start()
    wait_for(lambda: len(proxy.connections) >= 5, timeout=60, what="five connections")
    # Each CONNACK used to reset the backoff: a new connection every 0.5-1 s (about 80 a minute).
    # Now the delays grow (0.5-1, 1-2, 2-4, 4-8 s): the fourth gap is at least 4 s.
    assert gaps(proxy.connections)[3] >= 3.5, gaps(proxy.connections)
    problems = publisher.problems
    assert any(
        "drops each connection within 1 s of accepting it, after acknowledging messages" in p for p in problems
    ), problems
    assert not any("drops the connection on this message" in p for p in problems), problems  # no message blamed
    assert outbox.depth() == 50  # nothing acknowledged by the station is lost, nothing claimed delivered
    proxy.heal()  # the broker behaves again: everything is delivered, the backoff starts over, the problem goes
    wait_for(lambda: outbox.depth() == 0, timeout=90, what="every kept verdict delivered")
    wait_for(
        lambda: not publisher.problems and publisher.backoff.attempts == 0,
        timeout=30,
        what="the connection proving itself",
    )


def test_a_connack_cut_in_half_backs_off_and_recovers(mosquitto, outbox, stopping, caplog):
    proxy = FaultProxy(mosquitto.port, truncate=(CONNACK, 2))
    stopping.append(proxy)
    publisher = Publisher(
        mqtt_config(proxy), station_id(), outbox, backoff=Backoff(first=0.2, ceiling=5.0), stable_after=1.0
    )
    stopping.append(publisher)
    put_verdicts(outbox, publisher.topics.verdict, range(5))
    with caplog.at_level(logging.WARNING):
        publisher.start()
        wait_for(lambda: len(proxy.connections) >= 5, timeout=60, what="five connections")
    assert gaps(proxy.connections)[3] >= 0.7, gaps(proxy.connections)  # 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6 s
    assert not publisher.connected and outbox.depth() == 5
    assert "Traceback" not in caplog.text and "lost; retrying in" in caplog.text
    proxy.heal()
    wait_for(lambda: outbox.depth() == 0, timeout=30, what="the verdicts once CONNACKs are whole")


def test_two_stations_with_one_name_are_told_so_not_hammered(mosquitto, tmp_path, stopping):
    """mosquitto closes the older of two connections with one client id (without a DISCONNECT), back and forth."""
    from station.runtime.mqtt.outbox import Outbox

    station = station_id()
    publishers = []
    for index in range(2):
        box = Outbox(tmp_path / f"outbox{index}.db", max_messages=100)
        publisher = Publisher(mqtt_config(mosquitto), station, box, stable_after=3.0)
        stopping.append(publisher)
        publishers.append(publisher)
        publisher.start()
    said = lambda: [p for publisher in publishers for p in publisher.problems]
    wait_for(
        lambda: any(f"another client with the client id station-{station}?" in p for p in said()),
        timeout=60,
        what="a problem naming the client id",
    )


def test_a_message_on_a_topic_that_is_not_utf8_is_ignored_and_commands_still_work(mosquitto, outbox, stopping, caplog):
    proxy = FaultProxy(mosquitto.port, inject=NOT_UTF8_PUBLISH)
    stopping.append(proxy)
    answered = threading.Event()
    publisher = Publisher(
        mqtt_config(proxy),
        station_id(),
        outbox,
        on_command=lambda payload, reply: (reply({"ok": True}), answered.set()),
    )
    stopping.append(publisher)
    listener = Listener(mosquitto, publisher.topics.command_result)
    with caplog.at_level(logging.WARNING):
        publisher.start()
        wait_for(lambda: publisher.connected, timeout=15, what="a connection")
        for _ in range(50):  # until the command subscription is in place
            listener.client.publish(publisher.topics.command, json.dumps({"id": "1", "cmd": "resume"}), qos=1)
            if answered.wait(0.3):
                break
    listener.close()
    assert answered.is_set() and publisher.connected and len(proxy.connections) == 1, caplog.text
    assert "ignoring a message whose topic is not UTF-8" in caplog.text and not publisher.problems


def test_an_exception_on_the_network_thread_is_said_and_the_connection_made_again(mosquitto, outbox, stopping, caplog):
    publisher = Publisher(
        mqtt_config(mosquitto), station_id(), outbox, backoff=Backoff(first=0.2, ceiling=1.0), stable_after=1.0
    )
    stopping.append(publisher)
    deliver = publisher.delivery.on_publish
    failures = []

    def fails_once(*args):  # a bug in a callback paho runs on its network thread
        if not failures:
            failures.append(args)
            raise RuntimeError("a bug in on_publish")
        deliver(*args)

    publisher.delivery.on_publish = fails_once
    put_verdicts(outbox, publisher.topics.verdict, range(20))
    with caplog.at_level(logging.INFO):
        publisher.start()
        wait_for(
            lambda: any("internal error in the MQTT network thread" in p for p in publisher.problems),
            timeout=15,
            what="the state naming the fault",
        )
        assert "(RuntimeError: a bug in on_publish); the connection is made again" in publisher.problems[0]
        wait_for(lambda: outbox.depth() == 0, timeout=30, what="delivery after the new connection")
        wait_for(lambda: not publisher.problems, timeout=30, what="the fault cleared once a connection holds")
    assert caplog.text.count("MQTT: internal error in the MQTT network thread") == 1 and "Traceback" not in caplog.text


def test_a_prefix_of_exactly_the_topic_limit_reaches_the_broker(mosquitto, outbox, stopping):
    """The config's limit is the broker's: the longest topic at 65,535 bytes connects, subscribes, publishes."""
    from station.runtime.config.station import MqttConfig
    from station.core.topics import Topics

    station = station_id()
    prefix = "p" * (65_535 - len(f"/{station}/command/result"))
    assert max(len(topic.encode()) for topic in Topics.for_station(prefix, station).names()) == 65_535
    publisher = Publisher(MqttConfig(host=mosquitto.host, port=mosquitto.port, topic_prefix=prefix), station, outbox)
    stopping.append(publisher)
    listener = Listener(mosquitto, publisher.topics.verdict)
    put_verdicts(outbox, publisher.topics.verdict, range(3))
    publisher.start()
    try:
        wait_for(lambda: len(listener.messages) >= 3, timeout=15, what="three verdicts on a topic near 65,535 bytes")
        assert publisher.flush(10) and publisher.connected and not publisher.problems
    finally:
        listener.close()


def test_a_password_longer_than_mqtt_allows_is_a_config_error(tmp_path):
    from station.core.errors import PublisherError
    from station.runtime.config.station import MqttConfig
    from station.runtime.config.credentials import read_password

    secret = tmp_path / "password"
    secret.write_text("x" * 65_536 + "\n")
    with pytest.raises(PublisherError, match="the MQTT password is 65,536 bytes; MQTT allows at most 65,535"):
        read_password(MqttConfig(username="u", password_file=secret), env={})
    secret.write_text("x" * 65_535 + "\n")
    assert len(read_password(MqttConfig(username="u", password_file=secret), env={})) == 65_535
