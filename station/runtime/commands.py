"""Commands from {prefix}/{station}/command: parsed and validated before anything acts.

A malformed command gets an error answer and changes nothing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from station.runtime.messages import SCHEMA_VERSION

COMMANDS = ("reload", "product", "trigger", "pause", "resume")
MAX_PAYLOAD = 16 * 1024
MAX_TEXT = 128


class CommandError(ValueError):
    """Why a command was refused; `command_id` is echoed in the answer when known."""

    def __init__(self, message: str, command_id: str | None = None):
        super().__init__(message)
        self.command_id = command_id


@dataclass(frozen=True)
class Command:
    id: str
    cmd: str
    product: str | None = None
    part_id: str | None = None


def parse_command(payload: bytes) -> Command:
    if len(payload) > MAX_PAYLOAD:
        raise CommandError(f"command of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CommandError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise CommandError("a command is a JSON object with id and cmd")
    command_id = message.get("id")
    if not isinstance(command_id, str) or not 0 < len(command_id) <= MAX_TEXT:
        raise CommandError(f"id must be a string of 1 to {MAX_TEXT} characters")
    version = message.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise CommandError(f"schema_version {version!r} is not spoken here (this station speaks {SCHEMA_VERSION})",
                           command_id)
    cmd = message.get("cmd")
    if cmd not in COMMANDS:
        raise CommandError(f"unknown cmd {cmd!r}; one of {', '.join(COMMANDS)}", command_id)
    product = _optional_text(message, "product", command_id)
    part_id = _optional_text(message, "part_id", command_id)
    if cmd == "product" and product is None:
        raise CommandError("cmd product needs a product", command_id)
    return Command(command_id, cmd, product, part_id)


def _optional_text(message: dict, key: str, command_id: str) -> str | None:
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise CommandError(f"{key} must be a string of 1 to {MAX_TEXT} characters", command_id)
    return value


def result(command_id: str | None, error: str | None = None) -> dict:
    return {"id": command_id, "ok": error is None, "error": error}
