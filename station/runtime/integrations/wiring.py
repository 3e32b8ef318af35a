"""The windows around the line, wired to the daemon in one place: Prometheus /metrics,
the NG snapshot, Home Assistant discovery, the OPC UA server, the station's page (docs/observability.md).

The daemon calls four hooks: `start` (before the publisher connects), `judged`
(after each batch is stored), `state` (whenever the retained state is published)
and `close`. Libraries of an integration that is off are never imported.
"""
from __future__ import annotations

import time

from station.core.preprocess import crop
from station.core.verdict import NG
from station.runtime.integrations.homeassistant import Discovery
from station.runtime.mqtt.messages import is_verdict
from station.runtime.integrations.snapshot import Snapshots


def _box_in_region(message: dict, roi) -> tuple[int, int, int, int] | None:
    """A per-position verdict's worst position (frame pixels) in the pixels of the snapshot's region;
    without one, the worst of several regions (rois:, tiles:) that judged the part."""
    box = message.get("worst_position") or message.get("worst_roi")
    if box is None or "x" not in box:
        return None
    x0, y0 = (roi.x, roi.y) if roi is not None else (0, 0)
    return box["x"] - x0, box["y"] - y0, box["width"], box["height"]


class Integrations:
    def __init__(self, daemon, figures):
        self.daemon, self.figures = daemon, figures  # figures(daemon): station/runtime/stats.py
        self.started_wall, self.started = daemon.stats.started_wall, daemon.stats.started
        self.prometheus = self.snapshots = self.opcua = self.web = None
        self.discovery: Discovery | None = None
        self._product: str | None = None

    def start(self, state_dir):
        d, config = self.daemon, self.daemon.config
        if config.prometheus is not None:
            from station.runtime.integrations.prometheus_metrics import PrometheusExporter

            self.prometheus = PrometheusExporter(config.prometheus, d, self.figures, self.started_wall, self.started)
            d.publisher.on_queued = self.prometheus.queued
            d.publisher.delivery.on_delivered = self.prometheus.delivered
            self.prometheus.start()
        if config.snapshot.ng:
            self.snapshots = Snapshots(d.publisher, config.snapshot.interval, config.snapshot.max_kb * 1000)
        self.discovery = Discovery(config.homeassistant, config.station, d.publisher, state_dir)
        self.discovery.start()
        if config.opcua is not None:
            from station.runtime.integrations.opcua_server import start_opcua

            self.opcua = start_opcua(config.opcua, config.station, self.started_wall)
        if config.web is not None:  # the station's own page (station/runtime/web/)
            from station.runtime.web.server import WebPage

            self.web = WebPage(config.web, d, state_dir)
            self.web.start()

    def judged(self, inspector, messages: list[dict], frames: list):
        """A stored batch: verdict messages in order, with the frames they judged."""
        verdicts = list(filter(is_verdict, messages))
        if self.web is not None:
            self.web.feed.judged(inspector, messages, frames)
        if self.snapshots is not None:
            for message, frame in zip(verdicts, frames):
                if message["verdict"] == NG and self.snapshots.wants():
                    self.snapshots.offer(crop(frame.image, inspector.roi), _box_in_region(message, inspector.roi))
        if self.opcua is not None and verdicts:
            stats = self.daemon.stats
            self.opcua.update(verdict=verdicts[-1]["verdict"], score=verdicts[-1]["score"], seq=verdicts[-1]["seq"],
                              ok=stats.ok, ng=stats.ng, processed=stats.processed)

    def state(self, state: dict):
        """The retained state changed: a changeover clears the snapshot; OPC UA shows the state."""
        product = state.get("product")
        if self._product is not None and product != self._product and self.snapshots is not None:
            self.snapshots.clear()
        self._product = product
        if self.web is not None:
            self.web.feed.state_changed(state)
        if self.opcua is not None:
            self.opcua.update(product=product, camera=state["camera"], paused=state["paused"],
                              problems="; ".join(state["problems"]), reference=state["reference"],
                              uptime=time.monotonic() - self.started)

    def close(self):
        for part in (self.web, self.snapshots, self.opcua, self.prometheus, self.discovery):
            if part is not None:
                part.close()
