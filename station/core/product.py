"""The one rule for product names, shared by station.yaml and reference sets.

A product name becomes a folder name under the state directory, so it may
hold only letters, digits, '_', '-' and '.', never a path separator or '..'.
"""

from __future__ import annotations

import re

_PRODUCT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def product_name_problem(name: object) -> str | None:
    """Why `name` cannot be a product name, or None when it can."""
    if isinstance(name, str) and _PRODUCT_NAME.match(name) and ".." not in name:
        return None
    return (
        f"product name {name!r} is not allowed (not a safe product name): use up to 64 letters, digits, "
        "'_', '-' or '.', starting with a letter or digit, no path separators and no '..'"
    )
