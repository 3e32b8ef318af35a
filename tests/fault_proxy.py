"""A loopback TCP proxy in front of a real mosquitto that breaks each connection on a chosen MQTT packet.

mosquitto cannot be made to drop a connection right after acknowledging a message, or halfway
through a CONNACK; this proxy does, on the broker-to-client side, packet by packet:

    FaultProxy(broker_port, close_after=PUBACK)     every PUBACK forwarded, then the connection closed
    FaultProxy(broker_port, truncate=(CONNACK, 2))  the first 2 bytes of the CONNACK, then closed
    FaultProxy(broker_port, inject=PACKET)          PACKET sent to the client after each CONNACK
    FaultProxy(broker_port, refuse_subscriptions=True)  every SUBACK's reason codes made 0x87 (Not authorized),
                                                    as EMQX or HiveMQ answer a subscription their ACL denies
                                                    (mosquitto 2.0 grants it and filters what it delivers)

`heal()` makes it a plain proxy for the connections that follow.

It records when each connection was accepted (reconnects per minute).
"""

from __future__ import annotations

import socket
import threading
import time

CONNACK, PUBACK, SUBACK = 0x2, 0x4, 0x9  # MQTT control packet types (the high nibble of the first byte)
NOT_AUTHORIZED = 0x87


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_packet(sock: socket.socket) -> bytes:
    """One whole MQTT packet: fixed header, variable-length remaining length, the rest."""
    header = _read_exactly(sock, 1)
    length, shift, encoded = 0, 0, b""
    while True:
        byte = _read_exactly(sock, 1)
        encoded += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    return header + encoded + _read_exactly(sock, length)


class FaultProxy:
    def __init__(
        self,
        broker_port: int,
        *,
        close_after: int | None = None,
        truncate: tuple[int, int] | None = None,
        inject: bytes | None = None,
        refuse_subscriptions: bool = False,
    ):
        self.broker_port = broker_port
        self.refuse_subscriptions = refuse_subscriptions
        self.close_after, self.truncate, self.inject = close_after, truncate, inject
        self.connections: list[float] = []  # time.monotonic() of each accepted connection
        self.cuts = 0  # connections this proxy broke
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = "127.0.0.1", self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def heal(self):
        self.close_after = self.truncate = self.inject = None
        self.refuse_subscriptions = False

    def connections_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in list(self.connections))

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(time.monotonic())
            try:
                upstream = socket.create_connection(("127.0.0.1", self.broker_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump_up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(upstream, client), daemon=True).start()

    def _pump_up(self, client, upstream):
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def _pump_down(self, upstream, client):
        close_after, truncate, inject = self.close_after, self.truncate, self.inject  # this connection's faults
        try:
            while True:
                packet = read_packet(upstream)
                kind = packet[0] >> 4
                if truncate and kind == truncate[0]:
                    client.sendall(packet[: truncate[1]])
                    break
                if kind == SUBACK and self.refuse_subscriptions:
                    packet = refused_suback(packet)
                client.sendall(packet)
                if kind == CONNACK and inject:
                    client.sendall(inject)
                if kind == close_after:
                    break
        except OSError:
            _close(client, upstream)
            return
        # The cut: a FIN after what was sent, as a broker closing gracefully does. Closing at once while the
        # station's next packets sit unread here would send an RST, and a busy station would lose the packet
        # it had not read yet (the PUBACK this fault is about). _pump_up closes both once the station has.
        self.cuts += 1
        try:
            client.shutdown(socket.SHUT_WR)
        except OSError:
            _close(client, upstream)

    def shutdown(self):
        self._closed = True
        self.listener.close()


def _varint_end(data: bytes, start: int) -> tuple[int, int]:
    """(value, index after it) of the MQTT variable byte integer at `start`."""
    value, shift, index = 0, 0, start
    while True:
        value |= (data[index] & 0x7F) << shift
        shift, index = shift + 7, index + 1
        if not data[index - 1] & 0x80:
            return value, index


def refused_suback(packet: bytes) -> bytes:
    """An MQTT 5 SUBACK with every reason code Not authorized (fixed header, packet id, properties kept)."""
    _, body = _varint_end(packet, 1)
    properties, codes = _varint_end(packet, body + 2)
    codes += properties
    return packet[:codes] + bytes([NOT_AUTHORIZED]) * (len(packet) - codes)


def _close(*sockets: socket.socket):
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
