"""A plant dashboard in miniature: subscribes and records what the station publishes."""

from __future__ import annotations

import json
import threading
import time
import uuid

import paho.mqtt.client as mqtt


class Recorder:
    def __init__(
        self,
        host: str,
        port: int,
        topic: str = "#",
        *,
        username: str | None = None,
        password: str | None = None,
        ca: str | None = None,
    ):
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"recorder-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.client.connect(host, port)
        self.client.loop_start()
        assert self._subscribed.wait(5), "recorder could not subscribe"

    def _on_message(self, client, userdata, message):
        with self._lock:
            self.messages.append(message)

    def on(self, suffix: str) -> list:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def json_on(self, suffix: str) -> list[dict]:
        return [json.loads(m.payload) for m in self.on(suffix)]

    def wait_for(self, predicate, timeout: float = 15.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def publish(self, topic: str, payload, retain: bool = False):
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()
