"""A client that speaks the wire protocol directly, for loading and flooding.

The SDK awaits each reply; these helpers keep a window of requests in flight
from one DEALER, so that what is measured (or built up) is the broker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import zmq

WINDOW = 64


class RawClient:
    """One DEALER on the broker; any number of session ids may speak through it."""

    def __init__(self, ctx: zmq.Context[Any], url: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(url)
        self.count = 0
        self.errors = 0

    def close(self) -> None:
        self.sock.close(linger=0)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request, waited for."""
        replies = self.pipeline([{"op": op, **fields}], window=1)
        return replies[0]

    def pipeline(
        self,
        messages: list[dict[str, Any]] | Iterator[dict[str, Any]],
        *,
        window: int = WINDOW,
        timeout_s: float = 120.0,
    ) -> list[dict[str, Any]]:
        """Send every message keeping ``window`` in flight; the replies, in order
        of arrival. Errors are counted in :attr:`errors`, not raised."""
        pending = iter(messages)
        inflight = 0
        replies: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        exhausted = False
        while (inflight or not exhausted) and time.monotonic() < deadline:
            while not exhausted and inflight < window:
                message = next(pending, None)
                if message is None:
                    exhausted = True
                    break
                self.count += 1
                message["rid"] = f"q{self.count}"
                self.sock.send(orjson.dumps(message))
                inflight += 1
            if inflight and self.sock.poll(1000):
                while True:
                    try:
                        reply = orjson.loads(self.sock.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if reply.get("queued"):
                        continue
                    inflight -= 1
                    if not reply.get("ok"):
                        self.errors += 1
                    replies.append(reply)
        return replies


def pump(
    work: list[tuple[RawClient, Iterator[dict[str, Any]]]],
    *,
    window: int = WINDOW,
    timeout_s: float = 120.0,
) -> int:
    """Drive several clients at once, each keeping ``window`` requests in flight;
    the number of replies."""
    poller = zmq.Poller()
    state = []
    for client, messages in work:
        poller.register(client.sock, zmq.POLLIN)
        state.append([client, messages, 0, False])
    replies = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = False
        for entry in state:
            client, messages, inflight, exhausted = entry
            while not exhausted and inflight < window:
                message = next(messages, None)
                if message is None:
                    exhausted = True
                    break
                client.count += 1
                message["rid"] = f"q{client.count}"
                client.sock.send(orjson.dumps(message))
                inflight += 1
            entry[2], entry[3] = inflight, exhausted
            busy = busy or inflight > 0 or not exhausted
        if not busy:
            break
        ready = dict(poller.poll(1000))
        for entry in state:
            client = entry[0]
            if client.sock not in ready:
                continue
            while True:
                try:
                    reply = orjson.loads(client.sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if reply.get("queued"):
                    continue
                entry[2] -= 1
                replies += 1
                if not reply.get("ok"):
                    client.errors += 1
    return replies


def hello(repo: str, sid: str) -> dict[str, Any]:
    """A ``hello`` for session ``sid`` of ``repo``."""
    return {"op": "hello", "repo": repo, "sid": sid, "name": sid, "meta": {}}


def publish(sid: str, topic: str, body: str) -> dict[str, Any]:
    """A ``publish`` of one fact on one topic."""
    return {"op": "publish", "sid": sid, "topics": [topic], "body": body}


def claim(sid: str, scopes: list[str]) -> dict[str, Any]:
    """An exclusive ``claim`` of ``scopes``."""
    return {"op": "claim", "sid": sid, "scopes": scopes, "mode": "exclusive"}


def marked(frames: list[bytes]) -> bytes:
    """The mark of a burst message: the first character of a fact's body.

    Works on a fleetbus fact event and on the same bytes relayed raw, so both
    kinds of subscriber do the same work per message.
    """
    body = frames[-1]
    at = body.find(b'"body":"')
    return body[at + 8 : at + 9] if at >= 0 else b""
