"""The windows around the line, wired to the daemon in one place: Prometheus /metrics,
the NG snapshot, Home Assistant discovery, the OPC UA server, the station's page (docs/observability.md).

`Integrations` is the daemon's one dispatch point to them: `start` (before the publisher connects) builds a
Sink (sink.py) for each integration station.yaml turns on; `judged`, `state`, `queued`, `delivered` and
`close` hand each event to every sink, in the order they started (closed in reverse). Libraries of an
integration that is off are never imported.
"""

from __future__ import annotations

import time

from station.core.preprocess import crop
from station.core.verdict import NG
from station.runtime.integrations.homeassistant import Discovery
from station.runtime.integrations.sink import Sink
from station.runtime.integrations.snapshot import Snapshots
from station.runtime.mqtt.messages import is_verdict


def _box_in_region(message: dict, roi) -> tuple[int, int, int, int] | None:
    """A per-position verdict's worst position (frame pixels) in the pixels of the snapshot's region;
    without one, the worst of several regions (rois:, tiles:) that judged the part."""
    box = message.get("worst_position") or message.get("worst_roi")
    if box is None or "x" not in box:
        return None
    x0, y0 = (roi.x, roi.y) if roi is not None else (0, 0)
    return box["x"] - x0, box["y"] - y0, box["width"], box["height"]


class Integrations(Sink):
    def __init__(self, daemon, figures):
        self.daemon, self.figures = daemon, figures  # figures(daemon): station/runtime/stats.py
        self.started_wall, self.started = daemon.stats.started_wall, daemon.stats.started
        self.sinks: list[Sink] = []
        self.prometheus = self.snapshots = self.opcua = self.web = None
        self.discovery: Discovery | None = None

    def start(self, state_dir):
        d, config = self.daemon, self.daemon.config
        if config.prometheus is not None:
            from station.runtime.integrations.prometheus_metrics import PrometheusExporter

            self.prometheus = PrometheusExporter(config.prometheus, d, self.figures, self.started_wall, self.started)
            self.sinks.append(self.prometheus)
            self.prometheus.start()
        if config.snapshot.ng:
            self.snapshots = Snapshots(d.publisher, config.snapshot.interval, config.snapshot.max_kb * 1000)
            self.sinks.append(_SnapshotSink(self.snapshots))
        self.discovery = Discovery(config.homeassistant, config.station, d.publisher, state_dir)
        self.sinks.append(self.discovery)
        self.discovery.start()
        if config.opcua is not None:
            from station.runtime.integrations.opcua_server import start_opcua

            self.opcua = start_opcua(config.opcua, config.station, self.started_wall)
            self.sinks.append(_OpcuaSink(self.opcua, d.stats, self.started))
        if config.web is not None:  # the station's own page (station/runtime/web/)
            from station.runtime.web.server import WebPage

            self.web = WebPage(config.web, d, state_dir)
            self.sinks.append(_WebSink(self.web))
            self.web.start()

    def judged(self, inspector, messages: list[dict], frames: list):
        for sink in self.sinks:
            sink.judged(inspector, messages, frames)

    def state(self, state: dict):
        for sink in self.sinks:
            sink.state(state)

    def queued(self, ids, messages: list[dict]):
        for sink in self.sinks:
            sink.queued(ids, messages)

    def delivered(self, outbox_id: int):
        for sink in self.sinks:
            sink.delivered(outbox_id)

    def close(self):
        for sink in reversed(self.sinks):
            sink.close()


class _SnapshotSink(Sink):
    """An NG part's region, when it is time for another picture; a changeover clears the picture."""

    def __init__(self, snapshots: Snapshots):
        self.snapshots = snapshots
        self._product: str | None = None

    def judged(self, inspector, messages: list[dict], frames: list):
        for message, frame in zip(filter(is_verdict, messages), frames):
            if message["verdict"] == NG and self.snapshots.wants():
                self.snapshots.offer(crop(frame.image, inspector.roi), _box_in_region(message, inspector.roi))

    def state(self, state: dict):
        product = state.get("product")
        if self._product is not None and product != self._product:
            self.snapshots.clear()
        self._product = product

    def close(self):
        self.snapshots.close()


class _OpcuaSink(Sink):
    """The last verdict and the counts after each batch; the state when it changes."""

    def __init__(self, server, stats, started: float):
        self.server, self.stats, self.started = server, stats, started

    def judged(self, inspector, messages: list[dict], frames: list):
        verdicts = list(filter(is_verdict, messages))
        if verdicts:
            last = verdicts[-1]
            self.server.update(
                verdict=last["verdict"],
                score=last["score"],
                seq=last["seq"],
                ok=self.stats.ok,
                ng=self.stats.ng,
                processed=self.stats.processed,
            )

    def state(self, state: dict):
        self.server.update(
            product=state.get("product"),
            camera=state["camera"],
            paused=state["paused"],
            problems="; ".join(state["problems"]),
            reference=state["reference"],
            uptime=time.monotonic() - self.started,
        )

    def close(self):
        self.server.close()


class _WebSink(Sink):
    """The page's feed: every stored batch and every state."""

    def __init__(self, page):
        self.page = page

    def judged(self, inspector, messages: list[dict], frames: list):
        self.page.feed.judged(inspector, messages, frames)

    def state(self, state: dict):
        self.page.feed.state_changed(state)

    def close(self):
        self.page.close()
