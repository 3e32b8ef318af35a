"""station.yaml sections for the windows around a line: Prometheus, NG snapshots,
Home Assistant discovery, OPC UA (docs/observability.md).

Each is off by default except the NG snapshot; station.py's StationConfig has
one field per section, and the daemon wires the enabled ones at start.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from station.core.config_model import ConfigModel, ConfigPath
from station.core.mqtt_strings import string_problem, topic_part_problem


def mqtt_checked(value: str) -> str:
    """An MQTT UTF-8 string the broker will take (mqtt_strings.py); station.yaml is where it enters."""
    problem = string_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _topic_part(value: str) -> str:
    problem = topic_part_problem(value)
    if problem:
        raise ValueError(problem)
    return value


TopicPart = Annotated[str, AfterValidator(_topic_part)]  # a topic prefix: levels joined by '/'


class PrometheusConfig(ConfigModel):
    """/metrics over HTTP while the daemon runs; 0.0.0.0 for a plant's scraper, one port per station@."""

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(9108, ge=1, le=65535)


class SnapshotConfig(ConfigModel):
    """The latest NG part's region as a retained JPEG on {prefix}/{station}/snapshot."""

    ng: bool = True
    interval: float = Field(1.0, ge=0.1)  # seconds between snapshots, at least
    max_kb: int = Field(200, ge=8, le=10_000)  # JPEG quality is lowered (then the picture scaled) to fit


class HomeAssistantConfig(ConfigModel):
    """Retained MQTT discovery configs: the station as one device in Home Assistant."""

    discovery: bool = False  # false after true: the entities are removed (empty retained configs)
    prefix: TopicPart = "homeassistant"


class OpcuaConfig(ConfigModel):
    """An OPC UA server (the `opcua` extra) with the last verdict, counters and state."""

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(4840, ge=1, le=65535)
    # Basic256Sha256 (sign and encrypt) needs the server's certificate and key; "none" only when written.
    security: list[Literal["Basic256Sha256", "none"]] = Field(["Basic256Sha256"], min_length=1)
    certificate: ConfigPath | None = None  # DER or PEM
    private_key: ConfigPath | None = None  # PEM
    users_file: ConfigPath | None = None  # lines user:password (mode 0600); the only way in unless anonymous
    anonymous: bool = False  # explicit: clients without a user may read

    @model_validator(mode="after")
    def _secured(self):
        if "Basic256Sha256" in self.security and (self.certificate is None or self.private_key is None):
            raise ValueError("security Basic256Sha256 needs certificate and private_key (the server's)")
        if self.users_file is None and not self.anonymous:
            raise ValueError("give users_file (lines user:password), or anonymous: true to let anyone read")
        return self
