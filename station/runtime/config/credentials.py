"""Secrets for the broker and the camera: from a file or a systemd credential, never from station.yaml.

A systemd credential (LoadCredential=NAME:/etc/station/...) is read by systemd
as root and handed over in $CREDENTIALS_DIRECTORY; a file is read as is. The
value never reaches a log line or a message.
"""

from __future__ import annotations

import os
from pathlib import Path

from station.core.errors import ConfigError, PublisherError
from station.core.user_files import read_text
from station.runtime.config.station import CameraConfig, MqttConfig
from station.core.mqtt_strings import binary_problem


def _secret_path(file: Path | None, credential: str | None, key: str, env) -> Path | None:
    if file is not None:
        return Path(file)
    if credential is None:
        return None
    folder = env.get("CREDENTIALS_DIRECTORY")
    if not folder:
        raise ConfigError(
            f"{key} {credential!r}: $CREDENTIALS_DIRECTORY is not set; "
            f"give the service LoadCredential={credential}:/path/to/file"
        )
    return Path(folder) / credential


def _read_secret(path: Path, key: str, what: str) -> str:
    try:
        value = read_text(path, ConfigError, f"{what} file").rstrip("\r\n")
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if not value:
        raise ConfigError(f"{key}: {path}: the {what} file is empty")
    return value


def read_password(config: MqttConfig, env: dict[str, str] | None = None) -> str | None:
    """The broker password from password_file or the systemd credential (PublisherError, exit 78)."""
    env = os.environ if env is None else env
    key = "mqtt.password_file" if config.password_file is not None else "mqtt.password_credential"
    try:
        path = _secret_path(config.password_file, config.password_credential, key, env)
        password = None if path is None else _read_secret(path, key, "MQTT password")
        problem = password and binary_problem(password.encode("utf-8"))  # paho cannot encode a CONNECT with it
        if problem:
            raise ConfigError(f"{key}: {path}: the MQTT password {problem}")
        return password
    except ConfigError as exc:
        raise PublisherError(str(exc)) from None


def camera_credentials(config: CameraConfig, env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) for a network camera, from a file or credential holding `user:password`."""
    env = os.environ if env is None else env
    key = "camera.credentials_file" if config.credentials_file is not None else "camera.credentials_credential"
    path = _secret_path(config.credentials_file, config.credentials_credential, key, env)
    if path is None:
        return None
    user, colon, password = _read_secret(path, key, "camera credentials").partition(":")
    if not colon or not user:
        raise ConfigError(f"{key}: {path}: write the camera's credentials as user:password on one line")
    return user, password
