"""station.yaml's `web:` section: the station's own page (station/runtime/web/, docs/observability.md).

    web: {port: 8080, bind: 127.0.0.1, users_file: /etc/station/web-users}

Off unless present. On a loopback address without users the page is open to whoever is on the line PC;
any other address is a control surface on the network and needs users (viewer, operator, integrator),
from a file or a systemd credential, never from station.yaml. Parsing is pure: the users file is read
when the daemon starts the page (station/runtime/web/users.py).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from station.core.config_model import ConfigModel, ConfigPath, CredentialName

LOOPBACK_NAMES = ("localhost",)


def _bind(value: str) -> str:
    if not value or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError("must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    return value


def is_loopback(bind: str) -> bool:
    """Only this machine can reach the address (127.0.0.0/8, ::1, localhost)."""
    if bind.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


class WebConfig(ConfigModel):
    port: int = Field(8080, ge=1, le=65535)
    bind: Annotated[str, AfterValidator(_bind)] = "127.0.0.1"
    users_file: ConfigPath | None = None  # lines NAME:ROLE:HASH written by `station web-user`
    users_credential: CredentialName | None = None  # LoadCredential=NAME:/etc/station/...
    certificate: ConfigPath | None = None  # PEM; with private_key the page is served over HTTPS only
    private_key: ConfigPath | None = None
    results: int = Field(300, ge=1, le=10_000)  # the filmstrip's results, and as many NG ones beside them

    @model_validator(mode="after")
    def _secured(self):
        if self.users_file is not None and self.users_credential is not None:
            raise ValueError("give users_file or users_credential, not both")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: give both for HTTPS, or neither")
        if not is_loopback(self.bind) and not self.has_users:
            raise ValueError(
                f"bind {self.bind} lets the network reach the page (it can pause the line): give "
                "users_file (lines from `station web-user NAME ROLE`) or users_credential, "
                "or bind 127.0.0.1"
            )
        return self

    @property
    def has_users(self) -> bool:
        return self.users_file is not None or self.users_credential is not None

    @property
    def tls(self) -> bool:
        return self.certificate is not None
