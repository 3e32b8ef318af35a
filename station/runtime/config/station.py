"""The station configuration (station.yaml), parsed once into frozen, typed models.

Every problem is reported with its file, line and key path, all at once:

    station.yaml:7: mqtt.port: Input should be a valid integer

Parsing is pure: it resolves relative paths against the file's folder but never
opens the model, the reference sets or the password file (`station check` does).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from station.core.config_model import ConfigModel, ConfigPath, CredentialName, StationId, resolve_path
from station.core.errors import ConfigError, StationError
from station.core.imagefolder import DEFAULT_MAX_PIXELS
from station.core.product import product_name_problem
from station.core.user_files import read_text
from station.runtime.config.presence import PresenceConfig
from station.runtime.config.regions import Regions, RoiConfig
from station.runtime.config.tiles import Tiles
from station.runtime.config.forms import MODEL_FORMS, form_paths, form_problems
from station.runtime.config.yaml_lines import KeyPath, compose, format_problem, key_lines, line_of, validation_problems
from station.runtime.config.integrations import (
    HomeAssistantConfig,
    OpcuaConfig,
    PrometheusConfig,
    SnapshotConfig,
    TopicPart,
    mqtt_checked,
)
from station.runtime.config.web import WebConfig
from station.core.mqtt_strings import string_problem, topic_problem
from station.core.topics import Topics
from station.runtime.sources.genicam_config import GenicamField, Trigger
from station.runtime.sources.kinds import GENICAM, SIM, URL, parse_sim_source, source_kind

# Keys that would put a secret in the file; the message says where it goes instead.
SECRET_KEYS = frozenset({"password", "passwd", "secret", "token"})
# Where each section takes its secret: (a file it names, a systemd credential it names or None). A section
# not listed has no secret of its own: the advice then names no key.
SECRET_HOMES = {
    ("mqtt",): ("password_file", "password_credential"),
    ("camera",): ("credentials_file", "credentials_credential"),  # the file holds user:password
    ("opcua",): ("users_file", None),  # lines user:password
    ("web",): ("users_file", "users_credential"),  # lines NAME:ROLE:HASH from `station web-user`
}
DEFAULT_STATE_ROOT = Path("/var/lib/station")
MAX_LISTED_PROBLEMS = 100


def _safe_name(value: str) -> str:
    problem = product_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _host(value: str) -> str:
    problem = string_problem(value) or ("must not contain spaces" if any(c.isspace() for c in value) else None)
    if problem:
        raise ValueError(f"must be a host name or address: {problem}")
    return value


FormPaths = Annotated[
    Any, BeforeValidator(lambda value, info: form_paths(value, info, resolve_path))
]  # Path | {FORM: Path}
ProductName = Annotated[str, AfterValidator(_safe_name)]


def _camera_source(value: Any, info: ValidationInfo) -> int | str:
    """Device index, /dev/videoN, URL, sim://, or a file/folder path (made absolute)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("must be a device index, /dev/videoN, a URL, sim://... or a file or folder path")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a device index must be >= 0")
        return value
    if not value.strip():
        raise ValueError("must not be empty")
    kind = source_kind(value)  # ValueError for unknown URL schemes
    if kind == SIM:
        parse_sim_source(value)
    if kind == URL and "@" in urlsplit(value).netloc:  # the message must not repeat the URL: it holds a password
        raise ValueError(
            "credentials in the camera URL are refused: write user:password in a file named by "
            "camera.credentials_file, or a systemd credential named by camera.credentials_credential"
        )
    if kind in (SIM, URL, GENICAM):
        return value
    return str(resolve_path(Path(value), info))


class CameraConfig(ConfigModel):
    source: Annotated[int | str, BeforeValidator(_camera_source)]
    genicam: GenicamField = None  # genicam://DEVICE only: sources/genicam_config.py
    loop: bool = False
    fps: float = Field(0.0, ge=0)
    # A network camera's user:password, never in the URL (it would reach logs and dashboards).
    credentials_file: ConfigPath | None = None
    credentials_credential: CredentialName | None = None
    # Images larger than this are refused from their header, before decoding (decompression bombs).
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)

    @model_validator(mode="after")
    def _one_credentials_source(self):
        if self.credentials_file is not None and self.credentials_credential is not None:
            raise ValueError("give credentials_file or credentials_credential, not both")
        return self


class TlsConfig(ConfigModel):
    ca: ConfigPath | None = None  # None: the system's trusted CAs
    cert: ConfigPath | None = None
    key: ConfigPath | None = None

    @model_validator(mode="after")
    def _cert_and_key_together(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: give both for a client certificate, or neither")
        return self


class MqttConfig(ConfigModel):
    host: Annotated[str, AfterValidator(_host)] = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: TopicPart = "inspection"  # the whole topics are checked with the station name: _topic_problems
    qos: Literal[0, 1, 2] = 1
    username: Annotated[str, AfterValidator(mqtt_checked)] | None = None  # an MQTT string in the CONNECT
    password_file: ConfigPath | None = None
    password_credential: CredentialName | None = None
    tls: TlsConfig | None = None
    keepalive: int = Field(30, ge=5, le=3600)
    # MQTT 5 lets the broker say when it refuses a message; 3.1.1 brokers acknowledge and drop it.
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(lambda v: str(v) if v in (5, 5.0) else v)] = "5"
    # Unacknowledged QoS 1 messages at once: covers a LAN round trip at line rate, bounds duplicates after a reconnect.
    max_inflight: int = Field(20, ge=1, le=1000)
    inflight_timeout: float = Field(30.0, gt=0)  # a full window without a PUBACK this long is reported

    @model_validator(mode="after")
    def _one_password_source(self):
        if self.password_file is not None and self.password_credential is not None:
            raise ValueError("give password_file or password_credential, not both")
        if self.username is None and (self.password_file or self.password_credential):
            raise ValueError("a password needs a username")
        return self


class OutboxConfig(ConfigModel):
    max_messages: int = Field(100_000, ge=1)


class KeepCropsConfig(ConfigModel):
    ng: bool = True
    ok_sample_rate: float = Field(0.0, ge=0.0, le=1.0)
    max_mb: float = Field(200.0, ge=0)


class RuntimeConfig(ConfigModel):
    threads: int = Field(1, ge=1, le=64)


class StationConfig(ConfigModel):
    station: StationId
    camera: CameraConfig
    roi: RoiConfig | None = None
    model: FormPaths
    model_form: Literal[MODEL_FORMS] = "auto"  # with model: {FORM: PATH}; _form_problems
    reference: FormPaths = None
    products: dict[ProductName, FormPaths] | None = None
    product: ProductName | None = None
    rois: Regions = None  # named regions, instead of roi (regions.py); after roi and products
    tiles: Tiles = None  # the roi cut into overlapping tiles (tiles.py); after roi and rois
    trigger: Trigger = "continuous"  # hardware: sources/genicam_config.py
    presence: PresenceConfig = PresenceConfig()
    state_dir: ConfigPath = Field(
        None, validate_default=True
    )  # default: $STATE_DIRECTORY or /var/lib/station/<station>
    mqtt: MqttConfig = MqttConfig()
    stats_interval: float = Field(10.0, gt=0)
    outbox: OutboxConfig = OutboxConfig()
    keep_crops: KeepCropsConfig = KeepCropsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    prometheus: PrometheusConfig | None = None  # integrations.py: observability and plant integration
    snapshot: SnapshotConfig = SnapshotConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    opcua: OpcuaConfig | None = None
    web: WebConfig | None = None  # web.py: the station's own page, off unless present
    _reference_name: str | None = PrivateAttr(None)  # for_form: the product's name, the same in every form

    @field_validator("state_dir", mode="before")
    @classmethod
    def _default_state_dir(cls, value, info: ValidationInfo):
        if value is not None:
            return value
        from_env = (info.context or {}).get("state_dir")
        return from_env or DEFAULT_STATE_ROOT / str(info.data.get("station", "station"))

    @model_validator(mode="after")
    def _one_reference(self):
        if self.products is None:
            if self.reference is None or self.reference == {}:
                raise ValueError("give reference: PATH, or products: {NAME: PATH} with product: NAME")
            if self.product is not None:
                raise ValueError("product: needs products: {NAME: PATH}")
            return self
        if self.reference is not None and self.reference != {}:
            raise ValueError("give reference or products, not both")
        if not self.products:
            raise ValueError("products must name at least one product")
        if self.product not in self.products:
            known = ", ".join(sorted(self.products))
            raise ValueError(f"product must be one of the products ({known}), got {self.product!r}")
        return self

    @property
    def model_paths(self) -> dict[str | None, Path]:
        """{form: model file}; a single `model: PATH` is the one form None (its file says what it is)."""
        return dict(self.model) if isinstance(self.model, dict) else {None: self.model}

    def for_form(self, form: str | None) -> "StationConfig":
        """This configuration with one form's model and reference sets, as a single-model station.yaml says
        them: everything that judges, calibrates or checks works on it unchanged."""
        if form is None:
            return self
        pick = lambda paths: paths[form] if isinstance(paths, dict) else paths
        products = None if self.products is None else {name: pick(path) for name, path in self.products.items()}
        single = self.model_copy(
            update={
                "model": self.model[form],
                "model_form": form,
                "reference": None if self.reference is None else pick(self.reference),
                "products": products,
            }
        )
        single._reference_name = next(iter(self.product_references))  # one product whatever the form
        return single

    def reference_for(self, product: str | None = None) -> tuple[str | None, Path]:
        """(product, reference set folder) the station judges `product` with, default the configured one: the one
        lookup of a product's reference set. A single `reference:` names no product here (None): its reference
        set's own product is the product, what verdicts carry."""
        if self.products is None:
            return None, self.reference
        name = product or self.product
        if name not in self.products:
            raise ConfigError(f"unknown product {name!r}; configured: {', '.join(sorted(self.products))}")
        return name, self.products[name]

    @property
    def product_references(self) -> dict[str, Path]:
        """Every product the station may switch to, with its reference set folder ({FORM: folder} with a model in
        several forms: for_form picks one). A single `reference:` is one product named as the station names it: by
        its reference set (the fp32 form's with several; by its folder before the first calibration, the name
        calibration then gives it). Reads the set, so `station check` and calibration ask, not the loop."""
        if self.products is None:
            named = (
                self.reference.get("fp32", self.reference[min(self.reference)])
                if isinstance(self.reference, dict)
                else self.reference
            )
            return {self._reference_name or _product_of(named): self.reference}
        return dict(self.products)


def _product_of(reference: Path) -> str:
    from station.core.reference_set import load

    try:
        return load(reference).product
    except StationError:  # nothing saved yet, or unreadable (loading it again says why)
        return Path(reference).name


def _secrets(lines: dict[KeyPath, int]) -> list[tuple[KeyPath, str]]:
    found = []
    for path in lines:
        if path[-1].lower() in SECRET_KEYS and path[:1] != ("products",):
            found.append((path, "never put a secret in the configuration file" + _secret_home(path[:-1])))
    return found


def _secret_home(section: KeyPath) -> str:
    if section not in SECRET_HOMES:
        return " (no key here takes one)"
    file, credential = (".".join(section + (key,)) if key else None for key in SECRET_HOMES[section])
    return f": use {file}" + (f" or {credential} (a systemd credential)" if credential else "")


def _state_dir_from_env(env: dict[str, str]) -> Path | None:
    # systemd's StateDirectory= may list several folders separated by ':'.
    value = env.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(value) if value else None


def parse_config(
    text: str, name: str = "station.yaml", base: Path | None = None, env: dict[str, str] | None = None
) -> StationConfig:
    """Parse configuration text; `base` is the folder relative paths resolve against."""
    data, node = compose(text, name)
    lines = key_lines(node)
    if data is None:
        raise ConfigError(f"{name}: the configuration is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{name}:1: the configuration must be a mapping of keys (station:, camera:, ...)")
    problems = [format_problem(name, lines.get(path), path, message) for path, message in _secrets(lines)]
    context = {"base": base, "state_dir": _state_dir_from_env(os.environ if env is None else env)}
    try:
        config = StationConfig.model_validate(data, context=context)
        problems += [
            format_problem(name, lines.get(path), path, message)
            for path, message in _topic_problems(config) + form_problems(config)
        ]
    except ValidationError as exc:
        secret_paths = {".".join(path) for path, _ in _secrets(lines)}
        problems += [
            p for p in validation_problems(StationConfig, exc, name, lines) if not _names_secret(p, secret_paths)
        ]
        config = None
    except (RecursionError, ValueError, TypeError) as exc:  # cyclic aliases and the like
        problems.append(f"{name}: cannot be read as a configuration: {exc}")
        config = None
    if problems:
        raise ConfigError(_listed(sorted(problems, key=lambda text: line_of(text, name))))
    return config


def _listed(problems: list[str]) -> str:
    """Every problem of a real configuration; a generated one with thousands is cut short."""
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    return "\n".join(shown + ([f"... and {more} more problems"] if more else []))


def _topic_problems(config: StationConfig) -> list[tuple[KeyPath, str]]:
    """Every topic the station would publish, as a whole, against what the broker accepts (length, levels);
    the prefix is the key to change (a station name is at most 64 characters)."""
    found = []
    for key, topics in (
        (("mqtt", "topic_prefix"), Topics.for_station(config.mqtt.topic_prefix, config.station).names()),
        (("homeassistant", "prefix"), Topics.discovery_names(config.homeassistant.prefix, config.station)),
    ):
        for topic in sorted(topics, key=lambda name: len(name.encode("utf-8")), reverse=True):
            problem = topic_problem(topic)
            if problem:
                found.append((key, f"makes the topic {_shortened(topic)}, which {problem}"))
                break
    return found


def _shortened(topic: str) -> str:
    return topic if len(topic) <= 80 else f"{topic[:40]}...{topic[-30:]} ({len(topic):,} characters)"


def _names_secret(problem: str, secret_paths: set[str]) -> bool:
    """The 'unknown key' error for a secret is already reported, better worded."""
    return any(re.search(rf": {re.escape(path)}: unknown key", problem) for path in secret_paths)


def load_config(path: Path | str, env: dict[str, str] | None = None) -> StationConfig:
    """Read and parse a station.yaml; ConfigError lists every problem, one per line."""
    path = Path(path)
    text = read_text(path, ConfigError, "station configuration")
    return parse_config(text, name=str(path), base=path.absolute().parent, env=env)
