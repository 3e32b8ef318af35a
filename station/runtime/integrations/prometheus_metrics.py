"""/metrics for Prometheus (prometheus-client), served while the daemon runs.

Imported only when station.yaml has a `prometheus:` section. Two kinds of figures:

- counted as the broker acknowledges them (the drain thread): verdicts by
  verdict and product, and the latency from frame grabbed to PUBACK;
- read from the daemon when scraped (nothing per part): frames, parts,
  errors by kind, outbox depth, broker connection, camera state, reference
  set version, start time and uptime.

Verdicts are counted when their PUBACK arrives, so at any moment the OK+NG sum
lags the verdicts a subscriber has received by at most the in-flight window.
Verdicts judged by an earlier run (left in the outbox) and verdicts sent live
while the outbox could not write are not counted. Names: docs/observability.md.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from station.core.errors import ConfigError
from station.runtime.integrations.sink import Sink
from station.runtime.mqtt.messages import is_verdict
from station.runtime.sources.base import STARTING, STATES as CAMERA_STATES

log = logging.getLogger(__name__)

# Grab to PUBACK, seconds: a LAN broker answers in milliseconds, a backlog takes seconds to minutes.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _DaemonCollector:
    """Figures the daemon keeps anyway, read at scrape time (from the HTTP server's thread)."""

    def __init__(self, daemon, figures, started_wall: float, started: float):
        self.daemon, self.figures, self.started_wall, self.started = daemon, figures, started_wall, started

    def collect(self):
        d = self.daemon
        counted = self.figures(d)
        yield _counter("station_frames", "frames the camera delivered", counted.captured or 0)
        yield _counter("station_parts", "parts judged (each gave a verdict)", d.stats.processed)
        yield _counter(
            "station_frames_dropped",
            "frames not judged (live camera faster than judging, paused, no crop)",
            counted.dropped,
        )
        errors = CounterMetricFamily("station_errors", "faults since start, by kind", labels=["kind"])
        for kind, value in (
            ("camera_reconnect", counted.camera_reconnects),
            ("mqtt_refused", counted.mqtt_refused),
            ("outbox_write", counted.outbox_write_errors),
            ("crop_not_kept", counted.crops_not_kept),
        ):
            errors.add_metric([kind], value)
        yield errors
        yield _gauge("station_outbox_depth", "verdicts waiting for the broker's PUBACK", self._depth())
        yield _gauge("station_broker_connected", "1 while connected to the MQTT broker", int(d.publisher.connected))
        camera = GaugeMetricFamily("station_camera_state", "1 for the camera's current state", labels=["state"])
        current = getattr(getattr(d, "source", None), "state", STARTING)
        for state in CAMERA_STATES:
            camera.add_metric([state], int(state == current))
        yield camera
        inspector = getattr(d, "inspector", None)
        if inspector is not None:
            reference = GaugeMetricFamily(
                "station_reference_version", "version of the reference set judging now", labels=["product"]
            )
            reference.add_metric([inspector.product], inspector.reference_set.version)
            yield reference
        yield _gauge("station_paused", "1 while paused by a command", int(d.paused))
        yield _gauge("station_start_time_seconds", "when the daemon started, Unix time", self.started_wall)
        yield _gauge("station_uptime_seconds", "seconds since the daemon started", time.monotonic() - self.started)

    def _depth(self) -> float:
        try:
            return self.daemon.outbox.depth()
        except Exception:  # the outbox is closing or its disk failed: the daemon reports that itself
            return float("nan")


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class PrometheusExporter(Sink):
    """Owns the registry and the HTTP server; hears `queued` and `delivered` from the publisher (a Sink)."""

    def __init__(self, config, daemon, figures, started_wall: float, started: float):
        """`figures(daemon)`: the daemon's counted figures (station/runtime/stats.py), read at each scrape."""
        self.config = config
        self.registry = CollectorRegistry(auto_describe=False)
        self.verdicts = Counter(
            "station_verdicts",
            "verdicts the broker acknowledged (PUBACK), by verdict and product",
            ["verdict", "product"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "station_verdict_latency_seconds",
            "frame grabbed to the broker's PUBACK",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_DaemonCollector(daemon, figures, started_wall, started))
        self._pending: dict[int, tuple[tuple[str, str], float]] = {}  # outbox id -> ((verdict, product), grabbed)
        self._children: dict[tuple[str, str], object] = {}
        self._server = None

    def start(self):
        address = f"{self.config.host}:{self.config.port}"
        try:
            self._server, _ = start_http_server(self.config.port, addr=self.config.host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"prometheus: cannot serve /metrics on {address} ({exc.strerror or exc}); "
                f"give each station its own prometheus.port"
            ) from None
        log.info("Prometheus metrics on http://%s/metrics", address)

    def queued(self, ids: list[int], messages: list[dict]):
        """Verdicts put into the outbox (inside its transaction, before the drain can send them)."""
        now = time.monotonic()
        for outbox_id, message in zip(ids, messages):
            if is_verdict(message):
                self._pending[outbox_id] = (
                    (message["verdict"], message["product"]),
                    now - message["latency_ms"] / 1000.0,
                )

    def delivered(self, outbox_id: int):
        """The broker acknowledged an outbox message (the drain thread)."""
        entry = self._pending.pop(outbox_id, None)
        if entry is None:
            return
        labels, grabbed = entry
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.verdicts.labels(*labels)
        child.inc()
        self.latency.observe(time.monotonic() - grabbed)

    def close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
