"""A small OPC UA server (asyncua, the `opcua` extra) for PLCs and SCADA that do not speak MQTT.

Read-only variables with stable node ids in namespace urn:inspection-station
(index 2, the only one registered), e.g. ns=2;s=Station.LastVerdict; the list
is NODES below and docs/observability.md. The server runs its own asyncio loop
in a thread; the daemon's loop only hands values over (`update`), and the
server writes those that changed every POLL seconds.

Security: Basic256Sha256 (sign and encrypt) with the server's certificate and
key by default, users from `users_file` (lines user:password); a "none"
policy or anonymous reading only when station.yaml says so.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import threading
from datetime import datetime, timezone
from pathlib import Path

from station.core.errors import ConfigError, MissingExtraError, StationError
from station.core.user_files import read_text
from station.runtime.sources.base import STARTING

log = logging.getLogger(__name__)

NAMESPACE = "urn:inspection-station"
POLL = 0.1  # seconds between writes of changed values
START_TIMEOUT = 30.0
# name -> (variant type name, initial value); node id ns=2;s=Station.<name>
NODES = {
    "LastVerdict": ("String", ""),
    "LastScore": ("Double", math.nan),
    "LastSeq": ("Int64", 0),
    "OkCount": ("Int64", 0),
    "NgCount": ("Int64", 0),
    "Processed": ("Int64", 0),
    "Product": ("String", ""),
    "Camera": ("String", STARTING),
    "Paused": ("Boolean", False),
    "Problems": ("String", ""),
    "ReferenceVersion": ("Int64", 0),
    "StartTime": ("DateTime", None),
    "UptimeSeconds": ("Double", 0.0),
}
# update() keywords -> node names
FIELDS = {
    "verdict": "LastVerdict",
    "score": "LastScore",
    "seq": "LastSeq",
    "ok": "OkCount",
    "ng": "NgCount",
    "processed": "Processed",
    "product": "Product",
    "camera": "Camera",
    "paused": "Paused",
    "problems": "Problems",
    "reference": "ReferenceVersion",
    "uptime": "UptimeSeconds",
}


def read_users(path: Path) -> dict[str, str]:
    """user:password per line; blank lines and # comments skipped."""
    try:
        lines = read_text(Path(path), ConfigError, "users file").splitlines()
    except ConfigError as exc:
        raise ConfigError(f"opcua.users_file: {exc}") from None
    users = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise ConfigError(f"opcua.users_file: {path}:{number}: expected user:password")
        users[user] = password
    if not users:
        raise ConfigError(f"opcua.users_file: {path} names no user")
    return users


class OpcuaServer:
    def __init__(self, config, station: str, started_wall: float):
        self.config, self.station = config, station
        self._values = {"StartTime": datetime.fromtimestamp(started_wall, tz=timezone.utc)}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="opcua", daemon=True)

    def start(self):
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise StationError(f"opcua: the server did not start within {START_TIMEOUT:g} s")
        if self._error is not None:
            raise self._error

    def update(self, **values):
        """New values by update() keyword (FIELDS); written by the server's thread."""
        with self._lock:
            for key, value in values.items():
                if key == "score" and value is None:
                    value = math.nan  # a part that points away from the reference
                self._values[FIELDS[key]] = value

    def close(self, timeout: float = 5.0):
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)

    # -- the server's thread

    def _run(self):
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); after start, logged
            if not self._ready.is_set():
                self._error = exc if isinstance(exc, StationError) else StationError(f"opcua: {exc}")
                self._ready.set()
            else:
                log.error("OPC UA server stopped: %s", exc)

    async def _serve(self):
        from asyncua import Server, ua

        logging.getLogger("asyncua").setLevel(logging.WARNING)
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = Server(user_manager=_Users(self.config))
        await server.init()
        url = f"opc.tcp://{self.config.host}:{self.config.port}/station"
        server.set_endpoint(url)
        server.set_server_name(f"Inspection station {self.station}")
        policies = []
        if "Basic256Sha256" in self.config.security:
            policies.append(ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt)
            try:
                await server.load_certificate(str(self.config.certificate))
                await server.load_private_key(str(self.config.private_key))
            except Exception as exc:
                raise ConfigError(
                    f"opcua: cannot load certificate {self.config.certificate} or private_key "
                    f"{self.config.private_key} ({exc})"
                ) from None
        if "none" in self.config.security:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies)
        tokens = ([ua.UserNameIdentityToken] if self.config.users_file else []) + (
            [ua.AnonymousIdentityToken] if self.config.anonymous else []
        )
        server.set_identity_tokens(tokens)
        index = await server.register_namespace(NAMESPACE)
        folder = await server.nodes.objects.add_object(ua.NodeId("Station", index), ua.QualifiedName("Station", index))
        nodes = {}
        for name, (kind, initial) in NODES.items():
            value = self._values.get(name, initial)
            nodes[name] = await folder.add_variable(
                ua.NodeId(f"Station.{name}", index),
                ua.QualifiedName(name, index),
                value,
                varianttype=getattr(ua.VariantType, kind),
            )
        try:
            await server.start()
        except OSError as exc:
            raise ConfigError(
                f"opcua: cannot listen on {self.config.host}:{self.config.port} ({exc.strerror or exc})"
            ) from None
        log.info("OPC UA server on %s (%s)", url, ", ".join(self.config.security))
        self._ready.set()
        written: dict[str, object] = {}
        try:
            while not self._stop.is_set():
                with self._lock:
                    changed = {k: v for k, v in self._values.items() if k not in written or not _same(written[k], v)}
                for name, value in changed.items():
                    await nodes[name].write_value(ua.Variant(value, getattr(ua.VariantType, NODES[name][0])))
                    written[name] = value
                try:
                    await asyncio.wait_for(self._stop.wait(), POLL)
                except asyncio.TimeoutError:
                    pass
        finally:
            await server.stop()


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


class _Users:
    """asyncua's user manager: users_file's users, anonymous only when configured."""

    def __init__(self, config):
        self.users = read_users(config.users_file) if config.users_file else {}
        self.anonymous = config.anonymous

    def get_user(self, iserver, username=None, password=None, certificate=None):
        from asyncua.crypto.permission_rules import User, UserRole

        if username is None:
            return User(role=UserRole.User) if self.anonymous else None
        expected = self.users.get(username)
        if expected is not None and password is not None and hmac.compare_digest(expected.encode(), password.encode()):
            return User(role=UserRole.User, name=username)
        return None


def opcua_problems(config) -> list[str]:
    """For `station check`: the extra, the users file, the certificate and key files."""
    problems = []
    try:
        import asyncua  # noqa: F401
    except ImportError:
        problems.append("opcua: the OPC UA server needs the opcua extra: pip install 'inspection-station[opcua]'")
    if config.users_file is not None:
        try:
            read_users(config.users_file)
        except ConfigError as exc:
            problems.append(str(exc))
    for key in ("certificate", "private_key"):
        path = getattr(config, key)
        if path is not None and not Path(path).is_file():
            problems.append(f"opcua.{key}: {path} does not exist")
    return problems


def start_opcua(config, station: str, started_wall: float) -> OpcuaServer:
    """The running server; MissingExtraError without asyncua, ConfigError for unusable files or ports."""
    try:
        import asyncua  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            "opcua: the OPC UA server needs the opcua extra: pip install 'inspection-station[opcua]'"
        ) from None
    server = OpcuaServer(config, station, started_wall)
    server.start()
    return server
