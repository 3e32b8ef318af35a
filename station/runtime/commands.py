"""Commands from {prefix}/{station}/command: parsed and validated before anything acts.

A malformed command gets an error answer and changes nothing.
"""
from __future__ import annotations

import json
import queue
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from station.runtime.messages import SCHEMA_VERSION

COMMANDS = ("reload", "product", "trigger", "pause", "resume")
MAX_PAYLOAD = 16 * 1024
MAX_TEXT = 128
QUEUE_DEPTH = 1024  # commands waiting for the loop; more are answered "busy"
REMEMBERED_TRIGGERS = 4096  # trigger ids kept to answer a repeated one without judging twice


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


Reply = Callable[[dict], None]


class CommandInbox:
    """Commands from the MQTT thread, queued for the daemon's loop, which owns all state.

    A trigger whose id was already carried out (QoS 1 may deliver a command
    twice, a PLC may resend) is answered but not judged twice.
    """

    def __init__(self):
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._triggered: OrderedDict[str, None] = OrderedDict()

    def offer(self, payload: bytes, reply: Reply):
        """From the MQTT thread: queue, or answer at once when too large or too many."""
        if len(payload) > MAX_PAYLOAD:  # answered here: a queue of huge payloads would exhaust memory
            reply(result(None, f"command of {len(payload)} bytes is larger than {MAX_PAYLOAD}"))
            return
        try:
            self._queue.put_nowait((payload, reply))
        except queue.Full:
            reply(result(None, "station busy: too many commands waiting"))

    def serve(self, execute: Callable[[Command], str | None], timeout: float = 0.0):
        """Carry out every queued command (waiting up to timeout for the first) and answer each."""
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            payload, reply = item
            reply(self._answer(payload, execute))
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                item = None

    def _answer(self, payload: bytes, execute: Callable[[Command], str | None]) -> dict:
        try:
            command = parse_command(payload)
        except CommandError as exc:
            return result(exc.command_id, str(exc))
        if command.cmd == "trigger":
            if command.id in self._triggered:
                return result(command.id, f"trigger {command.id!r} was already carried out: not judged twice")
            self._triggered[command.id] = None
            while len(self._triggered) > REMEMBERED_TRIGGERS:
                self._triggered.popitem(last=False)
        return result(command.id, execute(command))
