"""Memory sizes as people write them (``24GiB``, ``80GB``) and as the planner prints them.

Standard library only: the ``earthmind-compat plan --gpu-memory`` option parses its value with
:func:`parse_size` before anything heavy is imported, so a mistyped size is an immediate argument error.
"""

from __future__ import annotations

import re

from earthmind_compat.errors import ConfigurationError


def parse_size(text: str | int | None) -> int | None:
    """Parse ``"24GiB"``, ``"80GB"``, ``"512MiB"`` or a byte count.

    Raises:
        ConfigurationError: for an unreadable size.
    """
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConfigurationError(f"Cannot read the memory size {text!r}; write it like 24GiB, 80GB or 512MiB.")
    value, unit, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    power = " KMGT".index(unit) if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


def format_bytes(count: int) -> str:
    """``1536`` -> ``"1.50 KiB"``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
