"""Readable forms of fleetbus state: times, ages, repo names, tables, colours.

Pure functions: each takes what it shows and returns text.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, TextIO

RESET = "\x1b[0m"
# Colours by what an event means to a reader: something taken, given back,
# lost, waited for, learned, or a session coming and going.
COLOURS = {
    "claimed": "\x1b[32m",
    "renewed": "\x1b[32m",
    "released": "\x1b[33m",
    "expired": "\x1b[31m",
    "lost": "\x1b[31m",
    "dropped": "\x1b[31m",
    "waits": "\x1b[35m",
    "wait": "\x1b[35m",
    "fact": "\x1b[36m",
    "session": "\x1b[34m",
    "notice": "\x1b[1m",
}


def use_colour(stream: TextIO) -> bool:
    """Colour for a terminal, unless ``$NO_COLOR`` says otherwise."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, tone: str, enabled: bool) -> str:
    """``text`` in the colour of ``tone`` when ``enabled``."""
    colour = COLOURS.get(tone)
    return f"{colour}{text}{RESET}" if enabled and colour else text


def short_repo(repo: str | None) -> str:
    """A repository id shortened for a column: 7 hex digits, or a base name."""
    if not repo:
        return "-"
    kind, _, rest = repo.partition(":")
    if kind == "git":
        return rest[:7]
    return os.path.basename(rest.rstrip("/")) or rest


def clock(wall: float | None) -> str:
    """Local time of day, ``HH:MM:SS``."""
    if wall is None:
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(wall))


def stamp(wall: float | None) -> str:
    """Local date and time, ``YYYY-MM-DD HH:MM:SS``."""
    if wall is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def age(seconds: float) -> str:
    """A duration in its largest sensible unit: ``42s``, ``3m10s``, ``2h05m``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86_400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86_400}d{seconds % 86_400 // 3600:02d}h"


def expiry(expires: float | None, now: float) -> str:
    """When a claim ends: ``lease`` (with its session) or the time left."""
    if expires is None:
        return "lease"
    left = expires - now
    return "due" if left <= 0 else f"in {age(left)}"


def clip(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    flat = " ".join(text.split())
    if width <= 0:
        return ""
    return flat if len(flat) <= width else flat[: max(0, width - 1)] + "…"


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters with an ellipsis, its spacing kept.

    Unlike :func:`clip` it keeps runs of spaces, so aligned columns stay
    aligned; line breaks and tabs become single spaces.
    """
    flat = text.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    if width <= 0:
        return ""
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, width: int = 0
) -> list[str]:
    """Rows as aligned columns under ``headers``; the last column takes the rest.

    With ``width`` the last column is clipped so each line fits.
    """
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    lines = []
    for row in cells:
        head = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
        last = row[-1]
        if width:
            last = clip(last, width - len(head) - 2)
        lines.append(f"{head}  {last}".rstrip() if head else last)
    return lines
