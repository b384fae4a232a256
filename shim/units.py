"""Sizes as people write them on the command line and as vmshim prints them (docker's
binary units: ``64m`` is 64 MiB). The bottom floor: imports nothing of vmshim but errors."""

from __future__ import annotations

import re

from shim.errors import UsageError

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_bytes(text: str, flag: str) -> int:
    """docker's RAMInBytes: ``64m``, ``1.5g``, ``512MiB``, ``1024`` (bytes); binary units.
    Raises UsageError naming *flag*."""
    match = _SIZE.match(str(text).strip())
    if not match:
        raise UsageError(f"invalid {flag} {text!r}: expected a size such as 64m, 1g or 1024")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    return int(value)


def parse_bytes_or_unlimited(text: str, flag: str) -> int:
    """Like :func:`parse_bytes`, and ``-1`` means unlimited (returned as -1)."""
    if str(text).strip() == "-1":
        return -1
    return parse_bytes(text, flag)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"
