"""One connection to the broker (its paho client, its bookkeeping) and whether connections hold:
when the reconnect backoff starts again, and what to say when they do not.

A CONNACK alone proves nothing: a broker (or something in front of it) that accepts every
connection and drops it again would otherwise reset the backoff each time and be hammered with
reconnects. A connection proves itself by staying up `stable_after` seconds; only then does the
backoff start again from its first delay. Connections that end sooner are counted and named in
the state for what they are (dropped after acknowledging messages, before, or with the broker's
reason) with the usual cause: another client with the same client id (mosquitto closes the older
connection without a word). Such drops are never blamed on a message (delivery.py).

An exception on an MQTT thread (paho's network loop and the callbacks it runs, the connect loop,
the drain) is a fault of its own: logged without a traceback (at debug level with one), named in
the state until a connection proves itself, and the connection is made again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from station.core.backoff import Backoff

log = logging.getLogger(__name__)

STABLE_AFTER = 10.0  # seconds a connection must last before the backoff starts again from its first delay


@dataclass
class Connection:
    """What the callbacks of one paho client need: which connection they belong to."""

    generation: int
    lost: threading.Event = field(default_factory=threading.Event)
    accepted: bool = False  # the broker answered CONNECT with success
    broker_reason: str | None = None  # the reason of the broker's DISCONNECT packet, if it sent one
    own: list[mqtt.MQTTMessageInfo] = field(default_factory=list)  # status, state, retained: QoS 1, not the outbox

    def own_acknowledged(self) -> bool:
        """Every QoS 1 message of the station's own on this connection has its PUBACK."""
        self.own = [info for info in self.own if not info.is_published()]
        return not self.own


class GuardedClient(mqtt.Client):
    """A paho client whose network thread cannot end without a word.

    paho's thread runs loop_forever; an exception there (in paho, or in a callback it runs) would
    end the thread silently and leave a connection nobody serves while the daemon runs on."""

    on_crash: Callable[[BaseException], None] | None = None

    def loop_forever(self, *args, **kwargs):
        try:
            return super().loop_forever(*args, **kwargs)
        except Exception as exc:
            if self.on_crash is None:
                raise
            with contextlib.suppress(OSError, AttributeError):  # nobody serves this socket any more
                self.socket().close()
            self.on_crash(exc)
            return mqtt.MQTT_ERR_UNKNOWN


class ConnectionWatch:
    def __init__(self, address: str, client_id: str, backoff: Backoff, stable_after: float = STABLE_AFTER):
        self.address, self.client_id, self.backoff, self.stable_after = address, client_id, backoff, stable_after
        self.short_lived = 0  # connections in a row that ended before proving themselves
        self._since: float | None = None  # when the current connection was accepted (CONNACK)
        self._proven = False
        self._acked = 0  # PUBACKs on the current connection
        self._drop_problem: str | None = None
        self._faults: dict[str, str] = {}  # where -> what went wrong, until a connection proves itself

    # -- paho's network thread

    def connected(self):
        self._since, self._proven, self._acked = time.monotonic(), False, 0

    def acknowledged(self):
        self._acked += 1

    # -- the connect loop

    def check(self):
        """Called while connected: a connection that has lasted stable_after seconds has proved itself."""
        if self._since is None or self._proven or time.monotonic() - self._since < self.stable_after:
            return
        self._proven = True
        self.backoff.reset()
        if self.short_lived:
            log.info(
                "MQTT: the connection to %s holds again (after %d short-lived connections)",
                self.address,
                self.short_lived,
            )
        self.short_lived, self._drop_problem = 0, None
        if self._faults:
            log.info("MQTT: the connection to %s holds again after: %s", self.address, "; ".join(self._faults.values()))
            self._faults.clear()

    def lost(self, broker_reason: str | None):
        """The connection ended; broker_reason is the broker's DISCONNECT reason, None when the socket closed."""
        since, self._since = self._since, None
        if since is None or self._proven:
            return
        self.short_lived += 1
        lasted = time.monotonic() - since
        if broker_reason:
            how = f"with the reason {broker_reason!r}"
        elif self._acked:
            how = "after acknowledging messages"  # so no message of ours is to blame
        else:
            how = "before acknowledging anything"
        self._drop_problem = (
            f"the broker at {self.address} drops each connection within {self.stable_after:g} s "
            f"of accepting it, {how} ({self.short_lived} in a row; another client with the client "
            f"id {self.client_id}?); reconnecting with backoff up to {self.backoff.ceiling:g} s"
        )
        log.error(
            "MQTT: %s (this one lasted %.1f s, %d message(s) acknowledged)", self._drop_problem, lasted, self._acked
        )

    def fault(self, where: str, exc: BaseException, reconnects: bool = True):
        """An exception on an MQTT thread: said once per change, kept in the state. reconnects: the
        connection it happened on is made again (our fault, not a drop by the broker)."""
        then = "the connection is made again" if reconnects else "delivery retried every second"
        text = f"internal error in {where} ({type(exc).__name__}: {exc}); {then}"
        if reconnects:
            self._since = None
        if self._faults.get(where) != text:
            log.error("MQTT: %s", text)
            log.debug("MQTT: %s", where, exc_info=exc)
        self._faults[where] = text

    def clear_fault(self, where: str):
        if self._faults.pop(where, None) is not None:
            log.info("MQTT: %s works again", where)

    def problems(self, blamed_on_a_message: bool = False) -> list[str]:
        """blamed_on_a_message: delivery.py found the message the broker drops connections on, and says so."""
        drops = [self._drop_problem] if self._drop_problem and not blamed_on_a_message else []
        return drops + list(self._faults.values())
