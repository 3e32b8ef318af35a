"""Home Assistant MQTT discovery: the station as one device with four sensors.

Retained config messages on {ha_prefix}/sensor/{station}/{object}/config
(topics: publisher.py), re-sent after every connect, so the entities stay
across restarts of the station and of Home Assistant. Availability comes from
the station's own status topic ("online"; "offline" and "stopped" are both
unavailable). The topics published are remembered in STATE/homeassistant.json;
the entities are removed (empty retained configs) only when a start finds
`homeassistant.discovery: false` and that file, which goes once the broker had
them; a changed prefix removes the configs under the old one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from station.core.errors import StationError
from station.core.user_files import read_text
from station.core.version import __version__
from station.core.topics import Topics
from station.runtime.integrations.sink import Sink

log = logging.getLogger(__name__)

MARKER = "homeassistant.json"
AVAILABLE = "{{ 'online' if value == 'online' else 'offline' }}"


def sensor_configs(station: str, topics: Topics) -> dict[str, dict]:
    """{object id: discovery config} for the station's sensors."""
    device = {
        "identifiers": [f"inspection_station_{station}"],
        "name": f"Inspection station {station}",
        "manufacturer": "inspection-station",
        "model": "visual inspection station",
        "sw_version": __version__,
    }
    sensors = {
        "verdict": ("Last verdict", topics.verdict, "{{ value_json.verdict }}", {"icon": "mdi:check-decagram"}),
        "score": (
            "Last score",
            topics.verdict,
            "{{ value_json.score }}",
            {"state_class": "measurement", "suggested_display_precision": 4},
        ),
        "ok_count": (
            "OK parts",
            topics.stats,
            "{{ value_json.ok }}",
            {"state_class": "total_increasing", "unit_of_measurement": "parts"},
        ),
        "ng_count": (
            "NG parts",
            topics.stats,
            "{{ value_json.ng }}",
            {"state_class": "total_increasing", "unit_of_measurement": "parts"},
        ),
    }
    return {
        object_id: {
            "name": name,
            "unique_id": f"inspection_station_{station}_{object_id}",
            "state_topic": state_topic,
            "value_template": template,
            "availability_topic": topics.status,
            "availability_template": AVAILABLE,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device,
            **extra,
        }
        for object_id, (name, state_topic, template, extra) in sensors.items()
    }


class Discovery(Sink):
    """Publishes (or removes) the configs through the publisher's retained-after-connect messages."""

    def __init__(self, config, station: str, publisher, state_dir: Path):
        self.config, self.station, self.publisher = config, station, publisher
        self.marker = Path(state_dir) / MARKER
        self._removing = False

    def start(self):
        previous = self._previous_topics()
        if self.config.discovery:
            configs = {
                Topics.discovery(self.config.prefix, self.station, object_id): config
                for object_id, config in sensor_configs(self.station, self.publisher.topics).items()
            }
            for topic in sorted(set(previous) - set(configs)):  # e.g. the prefix changed
                self.publisher.publish_retained(topic, b"")
            for topic, config in configs.items():
                self.publisher.publish_retained(topic, json.dumps(config, separators=(",", ":")).encode())
            self._write_marker(sorted(configs))
        elif previous:
            log.info("homeassistant.discovery is off: removing the station's %d Home Assistant entities", len(previous))
            for topic in previous:
                self.publisher.publish_retained(topic, b"")
            self._removing = True

    def close(self):
        """After a removal reached the broker (sent on connect), the marker goes."""
        if self._removing and self.publisher.connected:
            self.marker.unlink(missing_ok=True)

    def _previous_topics(self) -> list[str]:
        if not self.marker.exists():
            return []
        try:
            return [
                str(topic) for topic in json.loads(read_text(self.marker, StationError, "discovery marker"))["topics"]
            ]
        except (StationError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "%s cannot be read (%s): Home Assistant configs published before are not removed", self.marker, exc
            )
            return []

    def _write_marker(self, topics: list[str]):
        try:
            self.marker.write_text(json.dumps({"topics": topics}))
        except OSError as exc:
            log.warning(
                "cannot remember the Home Assistant configs in %s (%s): turning discovery off later "
                "will not remove them",
                self.marker,
                exc,
            )
