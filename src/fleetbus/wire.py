"""Encoding and decoding of messages, free of I/O.

A message body is one JSON object in one frame. Events travel as two frames,
``[topic, body]``; topics are built here so that ZeroMQ's prefix filtering is
exact on path segments.
"""

from __future__ import annotations

from typing import Any

import orjson

from fleetbus.errors import LimitExceeded, ProtocolError

MAX_MESSAGE_BYTES = 256 * 1024
# What a client accepts from its broker: a snapshot or a query reply grows with
# the repository's state (about 200 bytes a claim), far past a request's limit.
MAX_BROKER_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_ID_LEN = 64

# Topic layout: a kind byte, the repo id, then a separator. The separator byte
# cannot appear in a repo id or a scope segment, so a prefix subscription never
# matches a longer name by accident (``a.py`` against ``a.py.bak``).
SEP = b"\x00"
CLAIMS_KIND = b"c"
FACTS_KIND = b"f"
BROKER_TOPIC = b"b" + SEP


def encode(message: dict[str, Any]) -> bytes:
    """Encode one message body."""
    return orjson.dumps(message)


def decode(frame: bytes, *, limit: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode one message body, refusing anything that is not a JSON object.

    ``limit`` is the largest body accepted: a request's by default; clients
    reading what the broker sends pass :data:`MAX_BROKER_MESSAGE_BYTES`.
    """
    if len(frame) > limit:
        raise LimitExceeded(
            f"message of {len(frame)} bytes exceeds {limit}",
            limit="message_bytes",
        )
    try:
        value = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(
            f"message must be a JSON object, not {type(value).__name__}"
        )
    return value


def request_id(message: dict[str, Any]) -> str:
    """The ``rid`` of a request, checked."""
    rid = message.get("rid")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_LEN:
        raise ProtocolError(
            f"request needs a string 'rid' of 1 to {MAX_ID_LEN} characters"
        )
    return rid


def ok(rid: str | None, **fields: Any) -> dict[str, Any]:
    """A success reply."""
    return {"rid": rid, "ok": True, **fields}


def error(rid: str | None, err: dict[str, Any]) -> dict[str, Any]:
    """An error reply carrying ``err`` (see ``FleetbusError.to_wire``)."""
    return {"rid": rid, "ok": False, "error": err}


def claims_topic(repo: str) -> bytes:
    """Topic of a repository's claims stream."""
    return CLAIMS_KIND + repo.encode() + SEP


def facts_topic(repo: str, prefix: tuple[str, ...]) -> bytes:
    """Topic of a fact whose scope has the literal prefix ``prefix``.

    Each segment is followed by the separator and the topic ends with an end
    mark, so ``facts_subtree(repo, p)`` matches every topic under ``p`` and
    ``facts_exact(repo, p)`` matches ``p`` alone.
    """
    return facts_subtree(repo, prefix) + b"\x01"


def facts_subtree(repo: str, prefix: tuple[str, ...]) -> bytes:
    """Subscription prefix for facts at or beneath ``prefix``."""
    parts = [FACTS_KIND, repo.encode(), SEP]
    for segment in prefix:
        parts.append(segment.encode())
        parts.append(SEP)
    return b"".join(parts)


def facts_exact(repo: str, prefix: tuple[str, ...]) -> bytes:
    """Subscription prefix for facts whose literal prefix is exactly ``prefix``."""
    return facts_topic(repo, prefix)
