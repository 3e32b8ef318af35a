"""Files a person can damage, read one way: bounded, decoded, and every failure a StationError naming the file.

station.yaml, credentials and users files, a reference set's CURRENT, reference.yaml and arrays, the
ONNX model: random bytes, a truncated or empty file, a folder or a device in the file's place, or a
file far larger than any real one must give a message for a person (at start an exit code, on a
reload a refusal while the old files keep judging), never a traceback. Each reader takes the
StationError subclass that says which exit code the caller's kind of file has.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from station.core.errors import StationError

# Far above any real station.yaml, credentials file or reference.yaml (a few kB each), and small
# enough that the worst document this size is parsed and refused within seconds.
MAX_TEXT_BYTES = 256 << 10
# Values a YAML document may expand to through aliases before it is refused (a "billion laughs").
MAX_YAML_VALUES = 100_000


def _size(count: int) -> str:
    if count >= 1 << 20:
        return f"{count / (1 << 20):.1f} MiB"
    return f"{count / 1024:.0f} KiB" if count >= 1024 else f"{count} bytes"


def read_bytes(path: Path, error: type[StationError], max_bytes: int, what: str) -> bytes:
    """The whole file, refused (error naming the file) when it is not a regular file or exceeds max_bytes."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO in the file's place is refused below instead of blocking the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"{path}: the {what} cannot be read ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    problem = _kind_problem(info, max_bytes, what)
    if problem:
        os.close(fd)
        raise error(f"{path}: {problem}")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(max_bytes + 1)  # a file growing while read is bounded too
        except OSError as exc:
            raise error(f"{path}: the {what} cannot be read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: larger than a {what} can be ({_size(max_bytes)} at most)")
    return data


def _kind_problem(info: os.stat_result, max_bytes: int, what: str) -> str | None:
    if stat.S_ISDIR(info.st_mode):
        return f"is a folder, not the {what}"
    if not stat.S_ISREG(info.st_mode):
        return f"is not a regular file (a device, pipe or socket), not the {what}"
    if info.st_size > max_bytes:
        return (
            f"{_size(info.st_size)} is larger than a {what} can be ({_size(max_bytes)} at most); is it the right file?"
        )
    return None


def read_text(path: Path, error: type[StationError], what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The file as UTF-8 text; bytes that are not UTF-8 are refused naming where they start."""
    data = read_bytes(path, error, max_bytes, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: is not UTF-8 text (byte {exc.start} of {len(data)}): a damaged file, or not a {what}?"
        ) from None


def parse_yaml(text: str, where: Path | str, error: type[StationError], what: str) -> Any:
    """Safe-loaded YAML (no Python objects); a document expanding past MAX_YAML_VALUES through aliases is refused."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise error(f"{where}{line}: invalid YAML: {problem}") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML raises plain ValueError for e.g. a timestamp like 2024-13-45.
        raise error(f"{where}: not a {what}: invalid YAML ({exc})") from None
    if _expanded_values(data, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise error(f"{where}: not a {what}: its aliases expand to more than {MAX_YAML_VALUES:,} values")
    return data


def _expanded_values(data: Any, limit: int) -> int:
    """How many values `data` holds counting every alias as a copy, stopping once past `limit`."""
    count, stack = 0, [data]
    while stack and count <= limit:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):  # a recursive alias (&a [*a]) runs into the limit too
            stack.extend(value)
    return count
