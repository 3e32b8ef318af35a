"""Commands from {prefix}/{station}/command: parsed and validated where they arrive, before anything acts.

A command is untrusted input from anyone who may publish on the topic: parse_command turns every
way it can be wrong into a CommandError, answered from the MQTT thread; only valid commands are
queued for the loop. The loop serves the queue in slices (COMMAND_SLICE) and pings the watchdog
and checks for a stop between commands, so no queue, however long, starves either. A command
that fails inside the station is answered as an error and logged with its traceback; the loop
goes on.
"""

from __future__ import annotations

import json
import logging
import reprlib
import threading
import time
import unicodedata
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from station.runtime.mqtt.messages import SCHEMA_VERSION

log = logging.getLogger(__name__)

COMMANDS = ("reload", "product", "trigger", "pause", "resume")
MAX_PAYLOAD = 16 * 1024
MAX_TEXT = 128
MAX_ERROR = 300  # characters of an error answer: an answer never echoes a large payload back
QUEUE_DEPTH = 1024  # commands waiting for the loop; more are answered "busy"
REMEMBERED_TRIGGERS = 4096  # trigger ids kept to answer a repeated one without judging twice
COMMAND_SLICE = 0.2  # seconds of commands the loop serves before it judges frames again
STOPPING = "station stopping: not carried out"

_shown = reprlib.Repr()  # a value quoted in an answer: bounded, whatever its size or depth
_shown.maxstring = _shown.maxother = _shown.maxlong = 40


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
    received_at: float = field(default_factory=time.monotonic, compare=False)  # a trigger's part is there then


def parse_command(payload: bytes) -> Command:
    """A valid command, or a CommandError saying why not: never any other exception."""
    if len(payload) > MAX_PAYLOAD:
        raise CommandError(f"command of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
    try:
        message = json.loads(payload, object_pairs_hook=_without_repeated_keys)
    except CommandError:
        raise
    except Exception as exc:  # JSONDecodeError, bad UTF-8, json's integer digit limit, deep nesting
        raise CommandError(_bounded(f"not JSON this station can read: {_reason(exc)}")) from None
    try:
        return _validated(message)
    except CommandError:
        raise
    except Exception as exc:  # whatever an odd value makes of a comparison or repr
        raise CommandError(_bounded(f"cannot read the command: {_reason(exc)}")) from None


def _without_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    # {"cmd": "pause", "cmd": "resume"} means different things to different parsers: refused.
    message = dict(pairs)
    if len(message) != len(pairs):
        repeated = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise CommandError(f"key {_shown.repr(repeated)} given more than once")
    return message


def _reason(exc: Exception) -> str:
    # The first clause only: json's digit-limit error goes on to advise sys.set_int_max_str_digits.
    return str(exc).split(";")[0] or type(exc).__name__


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


def _validated(message) -> Command:
    if not isinstance(message, dict):
        raise CommandError("a command is a JSON object with id and cmd")
    command_id = message.get("id")
    if not _is_text(command_id):
        raise CommandError(f"id must be a string of 1 to {MAX_TEXT} characters without control characters")
    version = message.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise CommandError(
            f"schema_version {_shown.repr(version)} is not spoken here (this station speaks {SCHEMA_VERSION})",
            command_id,
        )
    cmd = message.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise CommandError(f"unknown cmd {_shown.repr(cmd)}; one of {', '.join(COMMANDS)}", command_id)
    product = _optional_text(message, "product", command_id)
    part_id = _optional_text(message, "part_id", command_id)
    if cmd == "product" and product is None:
        raise CommandError("cmd product needs a product", command_id)
    return Command(command_id, cmd, product, part_id)


def _is_text(value) -> bool:
    """Text that can be logged and sent on as UTF-8: no control characters, no lone surrogates."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_TEXT
        and not any(unicodedata.category(char) in ("Cc", "Cs") for char in value)
    )


def _optional_text(message: dict, key: str, command_id: str) -> str | None:
    value = message.get(key)
    if value is None:
        return None
    if not _is_text(value):
        raise CommandError(
            f"{key} must be a string of 1 to {MAX_TEXT} characters without control characters", command_id
        )
    return value


def result(command_id: str | None, error: str | None = None) -> dict:
    return {"id": command_id, "ok": error is None, "error": error}


Reply = Callable[[dict], None]
Execute = Callable[[Command], "str | None"]


class CommandInbox:
    """Valid commands from the MQTT thread, queued for the daemon's loop, which owns all state.

    A trigger whose id was already carried out (QoS 1 may deliver a command
    twice, a PLC may resend) is answered but not judged twice. Reloads queued
    one behind another are carried out once, each answered with its result.
    """

    def __init__(self):
        self._waiting: deque[tuple[Command, Reply]] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._triggered: OrderedDict[str, None] = OrderedDict()

    def offer(self, payload: bytes, reply: Reply):
        """From the MQTT thread: queue a valid command; answer anything else at once."""
        try:
            command = parse_command(payload)
        except CommandError as exc:
            _send(reply, result(exc.command_id, str(exc)))
            return
        with self._changed:
            refusal = STOPPING if self._closed else None
            if refusal is None and len(self._waiting) >= QUEUE_DEPTH:
                refusal = "station busy: too many commands waiting"
            if refusal is None:
                self._waiting.append((command, reply))
                self._changed.notify()
        if refusal is not None:
            _send(reply, result(command.id, refusal))

    def serve(
        self,
        execute: Execute,
        timeout: float = 0.0,
        *,
        between: Callable[[], None] = lambda: None,
        stopping: Callable[[], bool] = lambda: False,
        budget: float = COMMAND_SLICE,
    ):
        """Carry out queued commands (waiting up to timeout for the first) for about `budget` seconds,
        answering each; `between()` runs after every command and `stopping()` ends the slice at once.
        What is left waits for the next slice."""
        batch = self._take(timeout)
        started = time.monotonic()
        while batch:
            self._carry_out(batch, execute)
            between()
            if stopping() or time.monotonic() - started >= budget:
                return
            batch = self._take(0.0)

    def close(self, unjudged: Callable[[Command, str], None] | None = None):
        """Stopping: every command still waiting is answered with a refusal, and those that arrive later.
        unjudged(trigger, reason), when given (trigger: mqtt), says that a queued trigger's part was not judged."""
        with self._changed:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
        for command, reply in waiting:
            _send(reply, result(command.id, self._repeated_trigger(command) or _refused(command, unjudged)))

    def _take(self, timeout: float) -> list[tuple[Command, Reply]]:
        with self._changed:
            if timeout > 0:
                self._changed.wait_for(lambda: self._waiting, timeout)
            if not self._waiting:
                return []
            batch = [self._waiting.popleft()]
            if batch[0][0].cmd == "reload":  # a reload re-reads everything: those right behind it add nothing
                while self._waiting and self._waiting[0][0].cmd == "reload":
                    batch.append(self._waiting.popleft())
            return batch

    def _carry_out(self, batch: list[tuple[Command, Reply]], execute: Execute):
        command = batch[0][0]
        error = self._repeated_trigger(command) or _executed(command, execute)
        for queued, reply in batch:
            _send(reply, result(queued.id, error))

    def _repeated_trigger(self, command: Command) -> str | None:
        """Why a trigger is not judged again; remembers the ids of those that are."""
        if command.cmd != "trigger":
            return None
        if command.id in self._triggered:
            return f"trigger {command.id!r} was already carried out: not judged twice"
        self._triggered[command.id] = None
        while len(self._triggered) > REMEMBERED_TRIGGERS:
            self._triggered.popitem(last=False)
        return None


def _executed(command: Command, execute: Execute) -> str | None:
    """execute(command); a failure inside the station is an answer and a log with its traceback, never the loop's end."""
    try:
        return execute(command)
    except Exception as exc:  # the loop must outlive any one command
        log.exception("command %r (%s) failed inside the station; the station runs on", command.id, command.cmd)
        return _bounded(
            f"cmd {command.cmd} failed inside the station ({type(exc).__name__}: {exc}); "
            "not carried out, the station runs on (its log has the details)"
        )


def _refused(command: Command, unjudged: Callable[[Command, str], None] | None) -> str:
    if command.cmd != "trigger" or unjudged is None:
        return STOPPING
    _executed(command, lambda trigger: unjudged(trigger, "the station stopped before judging it"))
    return "station stopping: trigger not judged"


def _send(reply: Reply, answer: dict):
    try:
        reply(answer)
    except Exception:  # an answer that cannot be sent must not end the loop
        log.exception("the answer to command %r could not be sent", answer.get("id"))
