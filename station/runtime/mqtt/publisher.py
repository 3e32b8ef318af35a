"""The station's MQTT side (paho-mqtt 2.x), topics after Frigate's:

    {prefix}/{station}/verdict          verdicts from the Outbox, QoS from the message, in order
    {prefix}/{station}/no_verdict       parts seen but not judged, with the reason; same seq, same path
    {prefix}/{station}/status           retained: "online" / will "offline" / "stopped"
    {prefix}/{station}/state            retained JSON, re-sent after every connect
    {prefix}/{station}/stats            JSON, not retained, dropped while offline
    {prefix}/{station}/command          subscribed; retained commands are never acted on
    {prefix}/{station}/command/result   answers to commands
    {prefix}/{station}/snapshot         retained JPEG of the latest NG part's region, QoS 0, live (not the
                                        Outbox), at most one a second; emptied (retained, QoS 1) at changeover
    {ha_prefix}/sensor/{station}/{object}/config
                                        retained Home Assistant discovery configs, QoS 1, re-sent after every
                                        connect; empty when homeassistant.discovery is turned off

Delivery: a drain thread sends Outbox messages in id order, at most
`max_inflight` unacknowledged at once, and acks each in the Outbox only on its
PUBACK. Each connection gets a fresh paho client: after a reconnect everything
unacked is sent again from the oldest, so order holds and nothing is lost
(a message may arrive twice, which QoS 1 allows). paho's own resend of its
in-flight queue is not used because it races new publishes on reconnect.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from station.core.backoff import Backoff
from station.runtime.config.station import MqttConfig
from station.core.errors import OutboxDiskError, OutboxError, PublisherError
from station.runtime.config.credentials import read_password
from station.runtime.mqtt.connection_watch import STABLE_AFTER, Connection, ConnectionWatch, GuardedClient
from station.runtime.mqtt.delivery import Delivery, packet_size
from station.runtime.mqtt.messages import encode, is_verdict
from station.runtime.mqtt.outbox import Outbox
from station.core.topics import Topics

log = logging.getLogger(__name__)

Reply = Callable[[dict], None]
CommandHandler = Callable[[bytes, Reply], None]

CONNACK_TIMEOUT = 10.0  # seconds for the broker to answer CONNECT
NOT_AUTHORISED = {"Not authorized", "Bad user name or password"}


def tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    """Server verification against the CA (or the system's), plus the client certificate."""
    if config.tls is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(config.tls.ca) if config.tls.ca else None)
        if config.tls.cert is not None:
            context.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise PublisherError(f"mqtt.tls: cannot load the CA, certificate or key ({exc})") from None
    return context


class Publisher:
    """Connects, keeps reconnecting, drains the Outbox, answers commands."""

    def __init__(
        self,
        config: MqttConfig,
        station: str,
        outbox: Outbox,
        on_command: CommandHandler | None = None,
        *,
        on_queued=None,
        on_delivered=None,
        max_inflight: int | None = None,
        backoff: Backoff | None = None,
        env: dict[str, str] | None = None,
        stable_after: float = STABLE_AFTER,
    ):
        self.config = config
        self.station = station
        self.topics = Topics.for_station(config.topic_prefix, station)
        self.outbox = outbox
        self.on_command = on_command
        self.on_queued: Callable[[range, list[dict]], None] | None = on_queued  # outbox ids and their messages
        self.backoff = backoff or Backoff(first=1.0, ceiling=60.0)
        self.client_id = f"station-{station}"  # station names are [A-Za-z0-9_-]{1,64}: a client id any broker takes
        self.watch = ConnectionWatch(f"{config.host}:{config.port}", self.client_id, self.backoff, stable_after)
        self._env = env
        self._lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._connection: Connection | None = None
        self._generation = 0
        self._connected = False
        self._state_payload: bytes | None = None
        self._retained: dict[str, bytes] = {}  # topic -> retained payload re-sent after every connect
        self.mqtt5 = config.protocol == "5"
        self.delivery = Delivery(outbox, max_inflight or config.max_inflight, config.inflight_timeout)
        self.delivery.on_delivered = on_delivered  # the outbox id of each message the broker accepted
        self._max_packet: int | None = None  # the broker's Maximum Packet Size (MQTT 5 CONNACK)
        self._too_large: set[str] = set()  # topics whose live messages exceeded it (logged once)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._password: str | None = None
        self._tls: ssl.SSLContext | None = None
        self._commands_refused: str | None = None  # the broker refused the command subscription: why

    # -- public interface

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def max_inflight(self) -> int:
        return self.delivery.max_inflight

    @property
    def problems(self) -> list[str]:
        """Why messages are not being delivered right now (connections that do not hold, internal errors,
        held topics, a stalled window)."""
        refused = [self._commands_refused] if self._commands_refused else []
        return self.watch.problems(self.delivery.drops_connection) + self.delivery.problems() + refused

    def start(self):
        """Read credentials and TLS files (PublisherError if unusable), then connect in the background."""
        if not self.mqtt5:
            log.warning(
                "mqtt.protocol 3.1.1: the broker acknowledges messages it refuses (ACL, size) and they are "
                "lost without a trace; use MQTT 5 (mqtt.protocol: 5) where the broker speaks it"
            )
        self._password = read_password(self.config, self._env)
        self._tls = tls_context(self.config)
        for target, name in ((self._supervise, "mqtt-connect"), (self._drain, "mqtt-drain")):
            thread = threading.Thread(target=target, name=f"{name}-{self.station}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify_outbox(self):
        """New messages are in the Outbox: send them now rather than at the next poll."""
        self._wake.set()

    def queue_verdicts(self, transaction, verdicts: list[dict]):
        """Put verdict messages into an open Outbox transaction, for the drain to send in order.
        A message without a verdict (a part seen but not judged) goes to the no_verdict topic."""
        topic_of = lambda message: self.topics.verdict if is_verdict(message) else self.topics.no_verdict
        for topic, run in itertools.groupby(verdicts, key=topic_of):  # in order; one statement per run
            run = list(run)
            ids = transaction.put_many(topic, [encode(message) for message in run], self.config.qos)
            if self.on_queued is not None:
                self.on_queued(ids, run)

    def publish_verdict_live(self, verdict: dict) -> bool:
        """Send a verdict now, bypassing the Outbox (not durable: lost if the connection drops
        before the broker has it). For while the Outbox cannot store; False when offline."""
        return self._send(self.topics.verdict, encode(verdict), qos=self.config.qos)

    def publish_state(self, state: dict):
        """Retained station state; remembered and sent again after every reconnect."""
        self._state_payload = encode(state)
        self._send(self.topics.state, self._state_payload, qos=1, retain=True)

    def publish_retained(self, topic: str, payload: bytes):
        """A retained QoS 1 message sent now and again after every reconnect (discovery configs, clears)."""
        self._retained[topic] = payload
        self._send(topic, payload, qos=1, retain=True)

    def publish_snapshot(self, jpeg: bytes) -> bool:
        """The latest NG picture, retained, QoS 0, live: dropped while offline (the next one supersedes it)."""
        self._retained.pop(self.topics.snapshot, None)  # a clear waiting for a connection is superseded
        return self._send(self.topics.snapshot, jpeg, qos=0, retain=True)

    def clear_snapshot(self):
        """Changeover: the previous product's picture goes (an empty retained message deletes it)."""
        self.publish_retained(self.topics.snapshot, b"")

    def publish_stats(self, stats: dict) -> bool:
        """Periodic stats; dropped (False) while offline, the next ones supersede them."""
        return self._send(self.topics.stats, encode(stats), qos=0)

    def flush(self, timeout: float) -> bool:
        """Wait until the Outbox is empty (every message acknowledged); False on timeout."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.outbox.depth() > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, clean: bool = True, timeout: float = 5.0):
        """Leave status "stopped" (clean) or "offline" (the daemon failed), then disconnect."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        with self._lock:
            client, connected = self._client, self._connected
            self._connected = False
        if client is None:
            return
        if connected:
            info = client.publish(self.topics.status, "stopped" if clean else "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=min(timeout, 2.0))
            except (RuntimeError, ValueError):
                pass  # the connection went away meanwhile: the will says "offline"
        client.disconnect()
        client.loop_stop()

    # -- connection

    def _new_client(self, connection: Connection) -> mqtt.Client:
        session = {"protocol": mqtt.MQTTv5} if self.mqtt5 else {"protocol": mqtt.MQTTv311, "clean_session": True}
        client = GuardedClient(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            userdata=connection,
            reconnect_on_failure=False,
            **session,
        )
        client.on_crash = lambda exc: (self.watch.fault("the MQTT network thread", exc), connection.lost.set())
        client.max_inflight_messages_set(self.delivery.max_inflight)
        client.will_set(self.topics.status, "offline", qos=1, retain=True)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self._password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _supervise(self):
        """One connection after another until stop; an unexpected exception is a fault, not the end."""
        while not self._stopping.is_set():
            try:
                self._connect_once()
            except Exception as exc:  # a bug here would leave a station that never connects again, silently
                self.watch.fault("the MQTT connect loop", exc)
                with self._lock:
                    self._client, self._connected = None, False
                self._stopping.wait(self.backoff.next())

    def _connect_once(self):
        """One paho client, one connection; exponential backoff with jitter before the next."""
        address = f"{self.config.host}:{self.config.port}"
        self._generation += 1
        connection = Connection(self._generation)
        client = self._new_client(connection)
        try:
            client.connect(
                self.config.host,
                self.config.port,
                self.config.keepalive,
                **({"clean_start": True} if self.mqtt5 else {}),
            )
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS handshake
            self._stopping.wait(self._retry_delay(f"MQTT broker {address} unreachable ({exc})"))
            return
        # No Nagle: it held a PUBLISH back until the broker's delayed ACK (p99 grab->PUBACK 38 -> 1.2 ms at 100/s).
        with contextlib.suppress(OSError, AttributeError):  # closed at once: the loop sees it lost
            client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._client, self._connection = client, connection
        client.loop_start()
        answer_by = time.monotonic() + CONNACK_TIMEOUT
        while not connection.lost.wait(0.2) and not self._stopping.is_set():
            if self._connected:
                self.watch.check()
            elif not connection.accepted and time.monotonic() > answer_by:
                self._no_answer(address)
                client.disconnect()  # close the unanswered socket before the next attempt
                break
        if self._stopping.is_set():
            return  # stop() says goodbye on this client
        client.loop_stop()
        with self._lock:
            self._client, self._connected = None, False
        if connection.accepted:
            self.watch.lost(connection.broker_reason)
        self._wake.set()
        self._stopping.wait(self._retry_delay(f"MQTT connection to {address} lost"))

    def _no_answer(self, address: str):
        # An MQTT 3.1.1-only broker (amqtt, old mosquitto) may leave an MQTT 5 CONNECT unanswered.
        hint = "; if it speaks only MQTT 3.1.1, set mqtt.protocol: 3.1.1 in station.yaml" if self.mqtt5 else ""
        log.error(
            "MQTT broker %s accepted the connection but did not answer it within %g s%s", address, CONNACK_TIMEOUT, hint
        )

    def _retry_delay(self, why: str) -> float:
        delay = self.backoff.next()
        log.warning("%s; retrying in %.1f s", why, delay)
        return delay

    def _on_connect(self, client, connection: Connection, flags, reason_code, properties):
        address = f"{self.config.host}:{self.config.port}"
        if reason_code.is_failure:
            if self.mqtt5 and str(reason_code).lower() == "unsupported protocol version":
                log.error(
                    "MQTT broker %s does not speak MQTT 5: set mqtt.protocol: 3.1.1 in station.yaml "
                    "(the broker's refusals of messages then cannot be seen)",
                    address,
                )
            elif str(reason_code) in NOT_AUTHORISED:
                log.error(
                    "MQTT broker %s refused user %r: not authorised: check username/password",
                    address,
                    self.config.username,
                )
            else:
                log.error("MQTT broker %s refused the connection: %s", address, reason_code)
            connection.lost.set()
            return
        connection.accepted = True  # the backoff starts again only once the connection has proved itself
        self.watch.connected()
        self._max_packet = getattr(properties, "MaximumPacketSize", None) if self.mqtt5 else None
        log.info(
            "connected to MQTT broker %s as %s (MQTT %s%s)",
            address,
            self.client_id,
            self.config.protocol,
            f", maximum packet {self._max_packet} bytes" if self._max_packet else "",
        )
        connection.own.append(client.publish(self.topics.status, "online", qos=1, retain=True))
        client.subscribe(self.topics.command, qos=1)
        if self._state_payload is not None:
            connection.own.append(client.publish(self.topics.state, self._state_payload, qos=1, retain=True))
        for topic, payload in list(self._retained.items()):
            connection.own.append(client.publish(topic, payload, qos=1, retain=True))
        with self._lock:
            self._connected = connection.generation == self._generation
        self._wake.set()

    def _on_subscribe(self, client, connection: Connection, mid, reason_codes, properties):
        """A refused command subscription leaves the station deaf to the plant: commands and triggers sent
        to it reach nobody, and nobody would be told. Said once, and in the state until a SUBACK grants it."""
        refusals = [str(code) for code in reason_codes if code.is_failure]
        if refusals:
            problem = (
                f"the broker refused the subscription to {self.topics.command} ({refusals[0]}): commands "
                "and triggers sent to the station cannot arrive; let the station read that topic in the "
                "broker's ACL"
            )
            if problem != self._commands_refused:
                log.error("%s", problem)
            self._commands_refused = problem
        elif self._commands_refused:
            log.warning("the broker grants the subscription to %s again: commands arrive", self.topics.command)
            self._commands_refused = None

    def _on_disconnect(self, client, connection: Connection, flags, reason_code, properties):
        if getattr(flags, "is_disconnect_packet_from_server", False):
            connection.broker_reason = str(reason_code)
        with self._lock:
            if connection.generation == self._generation:
                self._connected = False
        if not self._stopping.is_set():
            log.warning("MQTT disconnected: %s", reason_code)
        connection.lost.set()

    def _on_publish(self, client, connection: Connection, mid, reason_code, properties):
        if connection.generation == self._generation:
            self.watch.acknowledged()
        self.delivery.on_publish(connection.generation, mid, reason_code)
        self._wake.set()

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        with self._lock:
            client, connection = (self._client, self._connection) if self._connected else (None, None)
        if client is None:
            return False
        if self._max_packet is not None and packet_size(topic, payload) > self._max_packet:
            if topic not in self._too_large:  # the broker would drop the connection: never sent, said once
                self._too_large.add(topic)
                log.error(
                    "MQTT: a %d-byte message on %s is larger than the broker's maximum packet size "
                    "(%d bytes): not sent",
                    len(payload),
                    topic,
                    self._max_packet,
                )
            return False
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            connection.own.append(info)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    # -- commands

    def _on_message(self, client, connection, message: mqtt.MQTTMessage):
        try:
            topic = message.topic
        except UnicodeDecodeError:  # the broker should have refused it; it is not our command topic either
            log.warning("ignoring a message whose topic is not UTF-8")
            return
        if topic != self.topics.command:
            return
        if message.retain:
            # A retained command would run again on every reconnect and restart.
            log.warning("ignoring a retained command on %s (commands must be sent live, not retained)", message.topic)
            return
        if self.on_command is None:
            self._reply({"ok": False, "error": "this station takes no commands"})
            return
        try:
            self.on_command(bytes(message.payload), self._reply)
        except Exception as exc:  # a handler bug must not take down the network thread
            log.exception("command handler failed")
            self._reply({"ok": False, "error": f"command failed: {exc}"})

    def _reply(self, result: dict):
        if not self._send(self.topics.command_result, encode(result), qos=1):
            log.warning("command result not sent (not connected): %s", result)

    # -- outbox drain

    def _drain(self):
        generation, last_error = None, None
        while not self._stopping.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self.delivery.apply_acks()
                with self._lock:
                    client, connection = self._client, self._connection
                    connected, current = self._connected, self._generation
                if connected and current != generation:  # a new connection: resend everything unacked
                    self.delivery.new_connection(current, self._max_packet)
                    generation = current
                if connected and client is not None:
                    self.delivery.fill(client, others_acknowledged=connection.own_acknowledged())
            except OutboxDiskError:
                self._stopping.wait(1.0)  # the Outbox logs a full disk itself, rate-limited
            except OutboxError as exc:
                if str(exc) != last_error:  # once per change: the drain retries every second
                    log.error("%s", exc)
                    last_error = str(exc)
                self._stopping.wait(1.0)
            except Exception as exc:  # a bug here would stop delivery while the station judges on
                self.watch.fault("the MQTT drain", exc, reconnects=False)
                last_error = None
                self._stopping.wait(1.0)
            else:
                last_error = None
                self.watch.clear_fault("the MQTT drain")
        self.delivery.forget_delivered()
