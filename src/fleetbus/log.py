"""Structured logging: JSON lines for machines, a console renderer for people.

Event names are stable (``claim.granted``, ``session.lost``); keys are too.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


class LossyStream:
    """A stream whose write errors drop the line instead of raising.

    A full disk, a file size limit or a closed pipe must not stop the program
    that logs: losing a log line is better than losing the broker.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        """Write ``text``; 0 when it could not be written."""
        try:
            return self.stream.write(text)
        except OSError:
            return 0

    def flush(self) -> None:
        """Flush, ignoring failures."""
        try:
            self.stream.flush()
        except OSError:
            pass


def configure(
    level: str = "info", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Set up structlog once for a process.

    ``json`` defaults to true when ``stream`` is not a terminal.
    """
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not out.isatty()
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    # Written to as a text stream; structlog needs nothing else of it.
    lossy: Any = LossyStream(out)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=lossy),
        cache_logger_on_first_use=False,
    )


def enabled(configured: str, level: str) -> bool:
    """Whether a logger set to ``configured`` writes lines of ``level``."""
    names = logging.getLevelNamesMapping()
    return names[level.upper()] >= names.get(configured.upper(), logging.INFO)


def get(name: str, **context: Any) -> Any:
    """A logger bound to a component name and any fixed context.

    A program that embeds the SDK without configuring structlog itself gets
    warnings and errors on stderr only, never debug lines on its stdout.
    """
    if not structlog.is_configured():
        configure("warning")
    return structlog.get_logger(name).bind(component=name, **context)
