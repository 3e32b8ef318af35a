"""Outbox to broker: the in-flight window, PUBACKs, and topics the broker refuses.

The drain sends outbox messages in id order, at most `max_inflight`
unacknowledged at once, and forgets a message only on a successful PUBACK.

Under MQTT 5 the broker says when it refuses a message (PUBACK reason code
>= 0x80: 0x87 not authorized, 0x97 quota exceeded, 0x95 packet too large).
A refused message stays in the outbox and its topic is *held*: nothing more
is sent on that topic (order within a topic is kept) while other topics flow
on. After a backoff one message, the oldest held, is sent again as a probe;
when the broker accepts it the hold ends and the rest follow in order. A
message larger than the broker's Maximum Packet Size (from CONNACK) is held
the same way without being sent: mosquitto would drop the connection.
Each hold is logged when it starts, when its reason changes and when it ends.

Residual: messages already in flight on a topic when its first refusal
arrives may be accepted before the refused one is delivered.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from station.core.backoff import Backoff
from station.runtime.mqtt.outbox import Message, Outbox

log = logging.getLogger(__name__)

ACK_BATCH = 200  # delivered messages forgotten per outbox commit at full speed
ACK_INTERVAL = 0.05  # ...and at least this often, in seconds
PAGE = 500  # outbox messages read per query while filling the window
PACKET_OVERHEAD = 16  # fixed header, topic length, packet id, properties length


@dataclass
class Hold:
    """A topic the broker refuses: from which outbox id on, why, and when to probe again."""

    first_id: int
    reason: str
    until: float
    backoff: Backoff = field(default_factory=lambda: Backoff(first=1.0, ceiling=60.0))
    probe: int | None = None  # outbox id sent to test whether the broker accepts again
    drops_connection: bool = False  # the broker drops the connection on it: each probe costs a connection


def packet_size(topic: str, payload: bytes) -> int:
    """The PUBLISH packet's size, as the broker's Maximum Packet Size (MQTT 5 CONNACK) counts it, near enough."""
    return len(payload) + len(topic.encode()) + PACKET_OVERHEAD


class Delivery:
    """Owned by the drain thread; `on_publish` is the only method paho's thread calls."""

    def __init__(self, outbox: Outbox, max_inflight: int, inflight_timeout: float):
        self.outbox, self.max_inflight, self.inflight_timeout = outbox, max_inflight, inflight_timeout
        self.refused = 0  # PUBACKs with a failure reason code, since start
        self.holds: dict[str, Hold] = {}
        self.max_packet: int | None = None
        self._inflight: dict[int, tuple[int, str]] = {}  # mid -> (outbox id, topic), this connection only
        self._acks: deque[tuple[int, int, str | None]] = deque()  # (generation, mid, refusal) from on_publish
        self._ack_retry: list[int] = []  # outbox ids the broker accepted, not yet removed (batched)
        self._generation: int | None = None
        self._cursor = 0
        self._last_forget = self._last_ack = time.monotonic()
        self._stall_logged = False
        self._careful = False  # one message at a time, after a connection was lost mid-flight
        self._sole_when_lost: tuple[int, str] | None = None
        self.on_delivered = None  # called with the outbox id of each message the broker accepted

    # -- paho's network thread

    def on_publish(self, generation: int, mid: int, reason_code) -> None:
        refusal = str(reason_code) if getattr(reason_code, "is_failure", False) else None
        self._acks.append((generation, mid, refusal))

    # -- the drain thread

    def new_connection(self, generation: int, max_packet: int | None):
        """Everything unacknowledged goes out again from the oldest, as the broker now allows."""
        self.forget_delivered()
        self._find_poison()
        self._inflight.clear()
        self._generation, self._cursor, self.max_packet = generation, 0, max_packet
        self._last_ack = time.monotonic()
        for hold in self.holds.values():
            hold.probe = None
            if not hold.drops_connection:  # a new connection may allow it: probe at once
                hold.until = 0.0  # (a probe that drops the connection waits: other topics flow meanwhile)

    def apply_acks(self):
        while self._acks:
            generation, mid, refusal = self._acks.popleft()
            if generation != self._generation or mid not in self._inflight:
                continue
            outbox_id, topic = self._inflight.pop(mid)
            self._last_ack = time.monotonic()
            if refusal is None:
                self._ack_retry.append(outbox_id)
                if self.on_delivered is not None:
                    self.on_delivered(outbox_id)
                self._careful, self._sole_when_lost = False, None
                self._accepted(topic, outbox_id)
            else:
                self.refused += 1
                self._hold(topic, outbox_id, f"refused by the broker ({refusal})")
        # One outbox commit per PUBACK would cost more than the publish itself.
        if (
            len(self._ack_retry) >= ACK_BATCH
            or not self._inflight
            or time.monotonic() - self._last_forget >= ACK_INTERVAL
        ):
            self.forget_delivered()

    def forget_delivered(self):
        if self._ack_retry:
            self.outbox.ack(*self._ack_retry)  # OutboxError: kept, retried next time
            self._ack_retry = []
        self._last_forget = time.monotonic()

    def _find_poison(self):
        """A broker may drop the connection on a message instead of refusing it (mosquitto's
        message_size_limit does). After a connection is lost with messages in flight, the next
        one sends one message at a time until one is accepted, each only once the broker has
        acknowledged everything sent before it on that connection (the station's status and
        state too); a message that was alone in flight when two connections in a row were lost
        is held like a refused one. A broker that drops connections after acknowledging, before
        it reached the message, never gets the message blamed (connection_watch.py names it)."""
        in_flight = sorted(self._inflight.values())
        if not in_flight:
            return
        self._careful = True
        sole = in_flight[0] if len(in_flight) == 1 else None
        if sole is not None and sole == self._sole_when_lost:
            outbox_id, topic = sole
            self._hold(
                topic,
                outbox_id,
                "the broker drops the connection on this message "
                "(a size limit such as mosquitto's message_size_limit?)",
            )
            self.holds[topic].drops_connection = True
            sole = None
        self._sole_when_lost = sole

    def fill(self, client: mqtt.Client, others_acknowledged: bool = True):
        """Send outbox messages until the window is full, skipping held topics. others_acknowledged:
        the broker has acknowledged every other QoS 1 message of this connection (status, state)."""
        if self._careful and not others_acknowledged:
            return  # a message sent now would share the blame for a dropped connection
        now = time.monotonic()
        for hold in self.holds.values():
            if hold.probe is None and hold.until <= now:
                self._cursor = min(self._cursor, hold.first_id - 1)  # the probe is behind the cursor
        busy = {outbox_id for outbox_id, _ in self._inflight.values()} | set(self._ack_retry)
        window = 1 if self._careful else self.max_inflight
        while len(self._inflight) < window:
            # Without held topics every message after the cursor goes out: read only what fits the window
            # (this runs on every PUBACK wake-up); with holds, skipped messages need larger pages.
            limit = PAGE if self.holds else window - len(self._inflight) + len(busy)
            page = self.outbox.pending(limit, after_id=self._cursor)
            for message in page:
                if len(self._inflight) >= window:
                    return
                self._cursor = message.id
                if message.id in busy or not self._may_send(message, now):
                    continue
                if not self._publish(client, message):
                    self._cursor = message.id - 1  # not sent: the next fill starts here
                    return
            if len(page) < limit:
                return

    @property
    def stalled(self) -> bool:
        """The window is full and the broker has acknowledged nothing for inflight_timeout."""
        return len(self._inflight) >= self.max_inflight and time.monotonic() - self._last_ack > self.inflight_timeout

    @property
    def drops_connection(self) -> bool:
        """A topic is held because the broker drops the connection on its message."""
        return any(hold.drops_connection for hold in list(self.holds.values()))

    def problems(self) -> list[str]:
        found = [f"{topic}: {hold.reason}; held in the outbox, retrying" for topic, hold in sorted(self.holds.items())]
        stalled = self.stalled
        if stalled:
            found.append(
                f"the broker has acknowledged none of {len(self._inflight)} QoS 1 messages in flight "
                f"for over {self.inflight_timeout:g} s (mqtt.max_inflight)"
            )
        if stalled != self._stall_logged:  # logged once per change, not per look
            self._stall_logged = stalled
            if stalled:
                log.error("MQTT: %s", found[-1])
            else:
                log.info("MQTT: the broker acknowledges again")
        return found

    # -- holds

    def _may_send(self, message: Message, now: float) -> bool:
        size = packet_size(message.topic, message.payload)
        if self.max_packet is not None and size > self.max_packet:
            log.debug("outbox message %d (%d bytes) exceeds the broker's maximum packet size", message.id, size)
            self._hold(
                message.topic,
                message.id,
                f"a message larger than the broker's maximum packet size ({self.max_packet} bytes)",
            )
            return False
        hold = self.holds.get(message.topic)
        if hold is None:
            return True
        if hold.probe is None and hold.until <= now and message.id >= hold.first_id:
            hold.probe = message.id  # one message tests whether the broker accepts again
            return True
        return False

    def _publish(self, client: mqtt.Client, message: Message) -> bool:
        try:
            info = client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        except ValueError as exc:  # a topic or payload no broker accepts: it would block its topic forever
            log.error("dropping undeliverable outbox message %d on %r: %s", message.id, message.topic, exc)
            self.outbox.ack(message.id)
            return True
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("outbox message %d not sent (%s); will retry", message.id, mqtt.error_string(info.rc))
            hold = self.holds.get(message.topic)
            if hold is not None and hold.probe == message.id:
                hold.probe = None
            return False
        self._inflight[info.mid] = (message.id, message.topic)  # QoS 0 too: paho reports it sent
        return True

    def _hold(self, topic: str, outbox_id: int, reason: str):
        hold = self.holds.get(topic)
        if hold is None:
            hold = self.holds[topic] = Hold(first_id=outbox_id, reason=reason, until=0.0)
            log.error(
                "MQTT: %s on %s: keeping it and what follows on that topic in the outbox; other topics flow on",
                reason,
                topic,
            )
        elif hold.reason != reason:  # logged once per change, not once per probe
            log.error("MQTT: %s on %s (was: %s)", reason, topic, hold.reason)
            hold.reason = reason
        hold.first_id = min(hold.first_id, outbox_id)
        if hold.probe in (None, outbox_id):
            hold.probe = None
            hold.until = time.monotonic() + hold.backoff.next()

    def _accepted(self, topic: str, outbox_id: int):
        hold = self.holds.get(topic)
        if hold is not None and hold.probe == outbox_id:
            del self.holds[topic]
            log.info("MQTT: the broker accepts %s again: delivering what was held, in order", topic)
            self._cursor = min(self._cursor, hold.first_id - 1)
