"""YAML with line numbers: where each key of a document is, and pydantic's errors named by line and key.

    station.yaml:7: mqtt.port: Input should be a valid integer

Generic: the models it reports against are passed in (station/runtime/config/station.py uses it for
station.yaml). Aliases are visited once, so a "billion laughs" document cannot blow up the walk.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from station.core.errors import ConfigError

KeyPath = tuple[str, ...]


def compose(text: str, name: str) -> tuple[Any, yaml.Node | None]:
    """The document's data and its node tree (which knows every key's line)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the reader already rejects control characters here
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{name}{line}: invalid YAML: {problem}") from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc.reason} (character #x{exc.character:04x})") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML raises plain ValueError for e.g. a timestamp like 2024-13-45.
        raise ConfigError(f"{name}: invalid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node


def key_lines(node: yaml.Node | None) -> dict[KeyPath, int]:
    """{key path: 1-based line} for every mapping key and sequence item."""
    lines: dict[KeyPath, int] = {}
    seen: set[int] = set()  # aliases share nodes: visit each once (no billion laughs)
    stack = [((), node)]
    while stack:
        path, current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                child = path + (str(key.value),)
                lines.setdefault(child, key.start_mark.line + 1)
                stack.append((child, value))
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                lines.setdefault(path + (str(index),), item.start_mark.line + 1)
                stack.append((path + (str(index),), item))
    return lines


def _line_for(loc: KeyPath, lines: dict[KeyPath, int]) -> int | None:
    """The line of the deepest part of loc that is in the file."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _fields_at(root: type[BaseModel], loc: KeyPath) -> list[str]:
    """The keys the schema allows in the mapping at loc (for 'did you mean')."""
    model: Any = root
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = next(
            (
                arg
                for arg in (*getattr(field.annotation, "__args__", ()), field.annotation)
                if isinstance(arg, type) and issubclass(arg, BaseModel)
            ),
            None,
        )
    return list(getattr(model, "model_fields", {}))


def _message(root: type[BaseModel], error: dict, loc: KeyPath) -> str:
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(root, loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else (f" (allowed: {', '.join(allowed)})" if allowed else "")
        return f"unknown key{hint}"
    message = error["msg"]
    return message.removeprefix("Value error, ")


def format_problem(name: str, line: int | None, loc: KeyPath, message: str) -> str:
    where = f"{name}:{line}" if line else name
    key = ".".join(loc)
    return f"{where}: {key}: {message}" if key else f"{where}: {message}"


def validation_problems(
    root: type[BaseModel], error: ValidationError, name: str, lines: dict[KeyPath, int]
) -> list[str]:
    """One `file:line: key.path: message` per pydantic error, `root` the model the document was validated as."""
    problems = []
    for item in error.errors(include_url=False):
        # Dict keys show up as "[key]" in loc; the key itself names the line.
        loc = tuple(str(part) for part in item["loc"] if part != "[key]")
        problems.append(format_problem(name, _line_for(loc, lines), loc, _message(root, item, loc)))
    return problems


def line_of(problem: str, name: str) -> int:
    match = re.match(rf"{re.escape(name)}:(\d+):", problem)
    return int(match.group(1)) if match else 0
