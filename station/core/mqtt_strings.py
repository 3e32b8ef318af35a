"""What an MQTT broker accepts in the strings the station sends: topic names, the user name, the password.

station.yaml is checked against these rules once, where it is parsed, so `station check` and
`station run` refuse a value the broker or paho would refuse later on every reconnect (a NUL
gives endless "Unspecified error" reconnects; over 65,535 bytes paho cannot encode the CONNECT).

The rules are MQTT's (5.0 section 1.5.4 and 4.7), as mosquitto enforces them: mosquitto also
refuses control characters and Unicode non-characters (which MQTT says SHOULD NOT be sent),
and a topic of more than 201 levels.
"""

from __future__ import annotations

import unicodedata

MAX_BYTES = 65_535  # every MQTT string and binary field is prefixed by its 16-bit length
MAX_TOPIC_LEVELS = 201  # mosquitto's limit (TOPIC_HIERARCHY_LIMIT, 200 separators): over it, it drops the client


def _character_problem(char: str) -> str | None:
    code = ord(char)
    if code == 0:
        return "contains a NUL character (U+0000), which MQTT forbids"
    if 0xD800 <= code <= 0xDFFF:
        return f"contains a lone surrogate (U+{code:04X}), which is not UTF-8"
    if unicodedata.category(char) == "Cc":
        return f"contains the control character U+{code:04X}, which MQTT brokers refuse"
    if 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE:
        return f"contains the Unicode non-character U+{code:04X}, which MQTT brokers refuse"
    return None


def string_problem(value: str) -> str | None:
    """Why an MQTT UTF-8 string field (topic, user name) cannot carry this value, or None."""
    problem = next(filter(None, map(_character_problem, value)), None)
    if problem:
        return problem
    size = len(value.encode("utf-8"))
    if size > MAX_BYTES:
        return f"is {size:,} bytes in UTF-8; MQTT allows at most {MAX_BYTES:,}"
    return None


def binary_problem(value: bytes) -> str | None:
    """Why an MQTT binary field (the password) cannot carry this value, or None."""
    if len(value) > MAX_BYTES:
        return f"is {len(value):,} bytes; MQTT allows at most {MAX_BYTES:,}"
    return None


def topic_part_problem(value: str) -> str | None:
    """Why a part of the station's topics (a prefix: one or more levels joined by '/') cannot be one, or None."""
    problem = string_problem(value)
    if problem:
        return problem
    if not value:
        return "must not be empty"
    if "+" in value or "#" in value:
        return "must not contain the MQTT wildcards + or # (they are for subscriptions, not topic names)"
    if value.startswith("$"):
        return (
            "must not start with $ (brokers keep such topics for themselves: $SYS; mosquitto delivers them to nobody)"
        )
    if value.startswith("/") or value.endswith("/") or "//" in value:
        return "must be levels joined by single slashes, none empty (no leading, trailing or double /)"
    if any(char.isspace() for char in value):
        return "must not contain spaces or other white space"
    return None


def topic_problem(topic: str) -> str | None:
    """Why the broker would refuse a whole topic name (length, levels), or None; parts checked before."""
    size = len(topic.encode("utf-8"))
    if size > MAX_BYTES:
        return f"is {size:,} bytes in UTF-8; MQTT allows at most {MAX_BYTES:,}"
    levels = topic.count("/") + 1
    if levels > MAX_TOPIC_LEVELS:
        return f"has {levels} levels; mosquitto drops a client publishing to more than {MAX_TOPIC_LEVELS}"
    return None
