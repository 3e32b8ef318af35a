"""Argument types of the `station` command: parsed where they are read, refused with a usage message."""

from __future__ import annotations

import argparse
from pathlib import Path


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (or :PORT for loopback) of an MQTT broker."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (a port from 1 to 65535)")
    return host or "127.0.0.1", int(port)


def seed(text: str) -> int:
    """A random seed: numpy takes 0 and up (a negative one ended in a ValueError traceback)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed (a whole number, 0 or more)")
    return int(text)


def positive(text: str) -> int:
    """A count of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def width_by_height(text: str) -> tuple[int, int]:
    """WxH in pixels, e.g. 36x26."""
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()) or min(int(width), int(height)) < 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not WxH in pixels, each at least 4 (e.g. 36x26)")
    return int(width), int(height)


def verbose_everywhere(parser: argparse.ArgumentParser, commands) -> None:
    """-v/--verbose before the subcommand and after it (`station run -c X -v`).

    The subcommands' copy has no default, so it never overwrites a -v given before the subcommand.
    """
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    for sub in commands.choices.values():
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A shell completion script of every subcommand and option (shtab), path arguments completing files."""
    import shtab

    parsers = [parser] + [
        sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for sub in action.choices.values()
    ]
    for each in parsers:
        for action in each._actions:
            if action.type is Path:
                action.complete = shtab.FILE
    return shtab.complete(parser, shell)
