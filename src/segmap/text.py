"""Text helpers shared by every layer (ground floor: imports nothing of segmap's).

``one_line`` is how an exception or a container's log line becomes one line in a log, a job record or a page.
"""

from __future__ import annotations

from typing import Any


def one_line(value: Any, limit: int = 300) -> str:
    """``value`` (an exception or any text) as one line of at most ``limit`` characters.

    Whitespace runs (newlines included) collapse to one space; an exception with no message gives its type's name;
    a longer line is cut and ends with ``...``.
    """
    line = " ".join(str(value).split())
    if not line and isinstance(value, BaseException):
        line = type(value).__name__
    if limit > 3 and len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


def first_line(value: Any) -> str:
    """The first non-empty line of ``value`` (an exception's message, say); its type's name when it has none."""
    for line in str(value).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(value).__name__ if isinstance(value, BaseException) else ""
