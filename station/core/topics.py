"""The station's MQTT topics, their one owner (station/runtime/mqtt/publisher.py's docstring says what each carries).

station/runtime/config/station.py checks the topics a station would publish against MQTT's rules (mqtt_strings.py)
from here, so a prefix the broker would refuse is a configuration error, not a dead connection.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

# Home Assistant sensors, one discovery config each (station/runtime/integrations/homeassistant.py builds them).
DISCOVERY_OBJECTS = ("verdict", "score", "ok_count", "ng_count")


@dataclass(frozen=True)
class Topics:
    verdict: str
    no_verdict: str
    status: str
    state: str
    stats: str
    command: str
    command_result: str
    snapshot: str

    @classmethod
    def for_station(cls, prefix: str, station: str) -> "Topics":
        base = f"{prefix}/{station}"
        return cls(
            f"{base}/verdict",
            f"{base}/no_verdict",
            f"{base}/status",
            f"{base}/state",
            f"{base}/stats",
            f"{base}/command",
            f"{base}/command/result",
            f"{base}/snapshot",
        )

    @staticmethod
    def discovery(ha_prefix: str, station: str, object_id: str) -> str:
        """A Home Assistant discovery config topic (one per sensor)."""
        return f"{ha_prefix}/sensor/{station}/{object_id}/config"

    def names(self) -> tuple[str, ...]:
        return astuple(self)

    @classmethod
    def discovery_names(cls, ha_prefix: str, station: str) -> tuple[str, ...]:
        return tuple(cls.discovery(ha_prefix, station, object_id) for object_id in DISCOVERY_OBJECTS)
