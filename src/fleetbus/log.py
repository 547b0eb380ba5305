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
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get(name: str, **context: Any) -> Any:
    """A logger bound to a component name and any fixed context.

    A program that embeds the SDK without configuring structlog itself gets
    warnings and errors on stderr only, never debug lines on its stdout.
    """
    if not structlog.is_configured():
        configure("warning")
    return structlog.get_logger(name).bind(component=name, **context)
